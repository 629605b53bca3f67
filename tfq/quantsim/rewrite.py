"""Rewrites a Keras model into its quantization-simulated twin.

The rewrite clones the model graph (``keras.models.clone_model`` with a ``call_function``) and:

* wraps weighted layers in :class:`~tfq.quantsim.layers.QuantizedLayer` (fake-quantized weights);
* folds a BatchNormalization that directly consumes a weighted layer into it, and fuses a
  following ReLU/ReLU6 — as the TFLite converter will;
* adds an :class:`~tfq.quantsim.layers.ActivationQuantizer` after every tensor TFLite quantizes (model
  inputs, op outputs) and none after ops that keep their input's scale (reshape, max-pool …);
* splits layers that TFLite runs as two ops into two quantized steps (Rescaling, Normalization and a
  standalone BatchNormalization: MUL then ADD; Average: ADD then MUL);
* keeps float, with a warning, the layers and activations with no int8 TFLite kernel;
* recurses into nested models (a model used as a layer), so transfer-learning models work.
* gives each call of a shared layer its own wrapper (ranges, fusions) around one copy of the layer
  (one kernel); traces subclassed models through their ``call``, like layers it has no rule for;
* names what it adds so that no name the user gave (any string Keras accepts) collides with it.

A BatchNormalization or ReLU is fused into the layer before it only when that layer's output has
no other consumer (as the converter does): the rewrite counts consumers and, if a fusion would
have duplicated a layer, runs again without it.

The caller's model is never changed: every layer in the result is a new copy with copied
weights.
"""

from __future__ import annotations

import collections
import re
import warnings
from dataclasses import dataclass

import keras
import numpy as np

from tfq.core.recipes import Recipe, TensorSpec, load_recipe
from tfq.quantsim import registry
from tfq.quantsim.layers import (
    BN_FOLDING,
    FUSABLE_ACTIVATIONS,
    INT8_ACTIVATIONS,
    LOGITS_RANGES,
    ActivationQuantizer,
    FloatBarrier,
    QuantizedLayer,
    QuantizedNormalization,
    QuantizedWeight,
    Statistic,
    activation_name,
    preserve_mode_for,
)

__all__ = ["batchnorm_layers_of", "fix_ranges_in_place", "freeze_model", "opaque_message", "quantized_layers_of", "quantizers_of",
           "rewrite_model", "uncovered_layers"]

_FUSABLE_LAYERS = (keras.layers.ReLU, keras.layers.Activation)
_MAX_PASSES = 4


def _fusable_activation(layer) -> str | None:
    """'relu'/'relu6' if ``layer`` is an activation TFLite fuses into the op before it."""
    if isinstance(layer, keras.layers.ReLU):
        if layer.negative_slope == 0 and layer.threshold == 0:
            if layer.max_value is None:
                return "relu"
            if float(layer.max_value) == 6.0:
                return "relu6"
        return None
    if isinstance(layer, keras.layers.Activation):
        name = activation_name(layer.activation)
        return name if name in ("relu", "relu6") else None
    return None


def copy_layer(layer, config: dict | None = None):
    """A new layer of ``layer``'s class built from its config (``config`` if given).

    A ``Lambda`` layer is rebuilt with ``safe_mode=False``: its function is the caller's, already
    running in this process, not code deserialized from a file, so Keras's safe-mode refusal (which
    would blame "the loading function") does not apply to tfq's internal copies.
    """
    config = layer.get_config() if config is None else config
    if isinstance(layer, keras.layers.Lambda):
        return layer.__class__.from_config(config, safe_mode=False)
    return layer.__class__.from_config(config)


def _copy_layer(layer, float32: bool = False):
    if not isinstance(layer, keras.layers.Layer):  # a stateless keras.ops operation node
        return layer
    config = layer.get_config()
    return copy_layer(layer, _float32_config(layer, config) if float32 else config)


def _float32_config(layer, config: dict) -> dict:
    """``config`` with a mixed-precision dtype policy replaced by float32 (for export: TFLite's
    integer kernels take float32 graphs; a float16 compute dtype would add float CAST ops)."""
    policy = getattr(layer, "dtype_policy", None)
    if policy is None or isinstance(layer, keras.layers.InputLayer) or "dtype" not in config:
        return config
    if keras.backend.standardize_dtype(policy.compute_dtype) in ("float16", "bfloat16") \
            and keras.backend.standardize_dtype(policy.variable_dtype) == "float32":
        return dict(config, dtype="float32")
    return config


def _copy_weights(src, dst) -> None:
    if src is dst or not isinstance(src, keras.layers.Layer):
        return
    weights = src.get_weights()
    if weights:
        dst.set_weights(weights)


@dataclass
class _Produced:
    """How a tensor of the new graph was made, for fusing later layers into its producer."""

    float_layer: object  # the original weighted layer
    inputs: object  # the new-graph input of that layer
    batchnorm: object = None  # the original BN folded in
    activation: str = "linear"
    site: str = ""  # the name of the wrapper of this call site (a fusion rebuilds it under that name)


class _Rewriter:
    def __init__(self, recipe: Recipe, range_mode: str, decay: float, inline_cache: dict,
                 no_fuse: frozenset = frozenset(), concat_fed: frozenset = frozenset(),
                 preserve: str | None = None, bn_folding: str = "unfolded", logits_range: str = "tensor"):
        self.logits_range = logits_range  # "softmax": a softmax's input quantizer keeps what the int8 softmax reads
        self.preserve = preserve  # QuantizedLayer(preserve=...) for the layers whose kernel has it
        self.recipe = recipe
        self.bn_folding = bn_folding
        self.range_mode = range_mode
        self.decay = decay
        # id(original layer) → the functional graph of its call (None: cannot be inlined). Shared
        # by the passes, so that every pass sees the same inlined layers and ids.
        self.inline_cache = inline_cache
        self.names: dict[int, str] = {}  # id(operation of an inlined graph) → stable unique name
        self.opaque: dict[str, list[str]] = {}  # class → layers kept whole: the converter calibrates inside
        self.reasons: dict[str, str] = {}  # layer kept whole → why it could not be decomposed
        self.unrolled: dict[str, list[str]] = {}  # class → recurrent layers unrolled
        self.shared: list = []  # layers that could not be copied, used as they are
        self.constants: dict[int, tuple] = {}  # id(variable read by an op) → (QuantizedWeight, variable)
        self.quantizer_of: dict[int, ActivationQuantizer] = {}  # id(new tensor) → the quantizer that made it
        self.no_fuse = no_fuse  # {(id(weighted layer), "bn" | "act")}: fusions that would duplicate a layer
        self.produced: dict[int, _Produced] = {}
        self.nested: dict[int, keras.Model] = {}
        self.copies: dict[int, object] = {}
        self.barriers: dict[int, object] = {}
        self.uses: collections.Counter = collections.Counter()  # id(new tensor) → consumers
        self.fusions: list[tuple[int, tuple[int, str]]] = []  # (id(fused-away tensor), no_fuse key)
        # id(original layer) whose output only feeds concatenations: it takes the concatenation's
        # range (TFLite's same-scale rule), so it gets no quantizer of its own.
        self.concat_fed = concat_fed
        self.producer: dict[int, int] = {}  # id(new tensor) → id(original layer that made it)
        self.consumers: dict[int, list] = collections.defaultdict(list)  # id(new tensor) → original layers
        self.current = None  # the original layer being rewritten
        self.seen: dict[str, str] = {}  # every layer (or inlined op) name the recipe was asked about -> class
        self.float_noops: set[str] = set()  # float_layers matches that move data only (kept in their input's type)
        self.alive: list = []  # every new tensor seen, so that no id above is reused during the pass
        # Every name in the new graph: the user's (reserved first, with the quantizer names their
        # wrappers derive from them) and tfq's, which give way (see :meth:`_unique`).
        self.taken: set[str] = set()
        self.site_names: dict[int, list[str]] = {}  # id(original weighted layer) → one wrapper name per call site
        self.inner: dict[int, object] = {}  # id(original weighted layer) → the one copy its wrappers share
        # Inside an unrolled recurrent layer, the ops of every step share their ranges (one range
        # per gate, cell and state over all steps), as tfq's decompositions intend.
        self.share_steps = False
        self.step_quantizers: dict[tuple, ActivationQuantizer] = {}  # (id(layer), output) → its quantizer
        self.step_wrappers: dict[tuple, QuantizedLayer] = {}  # (id(layer), id(BN), activation) → its wrapper
        self.labels: dict[str, str] = {}  # a user's name that is no valid TensorFlow scope → the one tfq uses

    def conflicts(self) -> set:
        """Fusions made on a tensor that something else also consumes."""
        return {key for tensor_id, key in self.fusions if self.uses[tensor_id] > 1}

    def feeding_only_concatenations(self) -> set:
        """Original layers whose output is consumed by concatenations only (and is no model output)."""
        only_concat: dict[int, bool] = {}  # a shared layer qualifies only if every call's output does
        for tensor_id, producer in self.producer.items():
            layers = self.consumers.get(tensor_id, [])
            fed = bool(layers) and self.uses[tensor_id] == len(layers) and all(map(_is_concat, layers))
            only_concat[producer] = only_concat.get(producer, True) and fed
        return {producer for producer, fed in only_concat.items() if fed}

    def _output_config(self, spec: TensorSpec | None, fixed_range=None) -> dict | None:
        """Config of the quantizer on the current layer's output (None where the concat's range rules)."""
        if fixed_range is None and self.current is not None and id(self.current) in self.concat_fed:
            return None
        return self._quantizer_config(spec, fixed_range)

    # -- names ---------------------------------------------------------------------------------------
    def reserve(self, model) -> None:
        """Reserves the names of every operation of ``model`` (nested levels included) and of the
        quantizers a wrapper named after one of them would hold."""
        ops = list(_walk_all_operations(model))
        for op in ops:
            self._take_with_quantizers(op.name)
        for op in ops:  # a name TensorFlow refuses as a scope ("my model (v2)"): tfq's copy gets a valid one
            if op.name not in self.labels and _scope_name(op.name) != op.name:
                self.labels[op.name] = self._unique(_scope_name(op.name), wrapper=True)

    def _label(self, layer) -> str:
        """The name of tfq's copy of ``layer`` (or of what is named after it): :meth:`_name`, made a
        valid TensorFlow scope name if it is not one."""
        name = self._name(layer)
        return self.labels.get(name, name)

    def _renamed_copy(self, layer, config: dict | None = None):
        """A copy of ``layer`` (:func:`_copy_layer`) under :meth:`_label`."""
        if not isinstance(layer, keras.layers.Layer):
            return layer
        config = dict(layer.get_config() if config is None else config)
        if "name" in config:
            config["name"] = self._label(layer)
        return copy_layer(layer, config)

    def _take_with_quantizers(self, name: str) -> None:
        self.taken.add(name)
        self.taken.update(f"{name}_{suffix}_fq" for suffix in _WRAPPER_QUANTIZERS)

    def _unique(self, base: str, wrapper: bool = False) -> str:
        """``base``, or ``base_1``, ``base_2`` … if taken: a name of tfq's own never collides with one
        a user gave (any string Keras accepts, ``<input>_fq`` included) nor with another of tfq's.
        Deterministic: the same model gives the same names."""
        def free(name):
            return name not in self.taken and not (
                wrapper and any(f"{name}_{suffix}_fq" in self.taken for suffix in _WRAPPER_QUANTIZERS))

        name, index = base, 0
        while not free(name):
            index += 1
            name = f"{base}_{index}"
        if wrapper:
            self._take_with_quantizers(name)
        else:
            self.taken.add(name)
        return name

    # -- quantizer configs ------------------------------------------------------------------------
    def _quantizer_config(self, spec: TensorSpec | None, fixed_range=None) -> dict | None:
        if spec is None:
            return None
        config = dict(bits=spec.bits, symmetric=spec.symmetric, narrow_range=spec.narrow_range)
        if fixed_range is not None:
            return dict(config, mode="fixed", fixed_range=fixed_range)
        return dict(config, mode=self.range_mode, decay=self.decay)

    def _pre_activation_config(self, spec: TensorSpec | None, activation: str) -> dict | None:
        """Config of the quantizer before a non-fused activation: a softmax's input, with
        ``logits_range="softmax"``, gets the range the int8 softmax reads (:class:`ActivationQuantizer`
        ``calibration="softmax_input"``)."""
        config = self._quantizer_config(spec)
        if config is not None and activation == "softmax" and self.logits_range == "softmax":
            config["calibration"] = "softmax_input"
        return config

    def _specs(self, layer):
        """(weights spec, output activations spec) of a layer.

        A float layer (float_layers, or no quantization rule) computes in float, but in an
        integer mode its output is still quantized so that the ops after it stay integer
        (TFLite's selective quantization: DEQUANTIZE → float op → QUANTIZE).
        """
        weights, activations = self.recipe.spec_for(self._name(layer), type(layer).__name__)
        if weights is None and activations is None and self.recipe.mode in ("int8", "int16x8"):
            activations = self.recipe.activations
        return weights, activations

    # -- graph rewrite ------------------------------------------------------------------------------
    def rewrite(self, model: keras.Model, quantize_inputs: bool, call_inputs=None) -> keras.Model:
        """The rewritten twin of ``model``; ``call_inputs``: the tensors a nested model is called on,
        whose static dimensions (a fixed sequence length) replace the model's unknown ones, so that its
        layers trace on static shapes (a causal mask of known size is a constant)."""
        functional = _as_functional(model)
        if not self.taken:
            self.reserve(functional)
        structure = functional.input
        originals = keras.tree.flatten(structure)
        given = _tensor_leaves(call_inputs) if call_inputs is not None else []
        shapes = [_specific_shape(t.shape, g.shape) for t, g in zip(originals, given)] \
            if len(given) == len(originals) else [t.shape for t in originals]
        inputs = [keras.Input(batch_shape=shape, dtype=t.dtype, name=t.name) for t, shape in zip(originals, shapes)]
        input_ids = {id(t): i for i, t in enumerate(inputs)}
        quantized_inputs: dict[int, object] = {}
        input_names = [t.name for t in originals]
        for input_name in input_names:
            self.seen.setdefault(input_name, "InputLayer")

        def quantize_input(t):
            i = input_ids.get(id(t))
            if i is None or not quantize_inputs:
                return t
            if i not in quantized_inputs:
                _, spec = self.recipe.spec_for(input_names[i], "InputLayer")
                config = self._quantizer_config(spec)
                if config is None or not t.dtype.startswith("float"):
                    quantized_inputs[i] = t
                else:
                    quantized_inputs[i] = ActivationQuantizer(name=self._unique(f"{input_names[i]}_fq"),
                                                              **config)(t)
            return quantized_inputs[i]

        def call_function(layer, *args, **kwargs):
            args = keras.tree.map_structure(quantize_input, args)
            kwargs = keras.tree.map_structure(quantize_input, kwargs)
            for t in keras.tree.flatten((args, kwargs)):
                self.uses[id(t)] += 1
                self.consumers[id(t)].append(layer)
            out = self._call(layer, args, kwargs)
            for t in keras.tree.flatten(out):
                self.producer[id(t)] = id(layer)
            self.alive.append((args, kwargs, out))
            return out

        new_inputs = keras.tree.pack_sequence_as(structure, inputs)
        new = keras.models.clone_model(
            functional, input_tensors=new_inputs, clone_function=lambda layer: layer, call_function=call_function
        )
        if _scope_name(new.name) != new.name:  # TensorFlow would refuse it as a scope when tracing the call
            new = keras.Model(new.input, new.output, name=self.labels.get(new.name) or _scope_name(new.name))
        for t in keras.tree.flatten(new.outputs):
            self.uses[id(t)] += 1
        return new

    def _call(self, layer, args, kwargs):
        if isinstance(layer, keras.Model) and _has_graph(layer):
            key = id(layer)
            if key not in self.nested:
                self.nested[key] = self.rewrite(layer, quantize_inputs=False, call_inputs=(args, kwargs))
            return self.nested[key](*args, **kwargs)

        if isinstance(layer, Statistic):
            quantizer = self.quantizer_of.get(id(args[0]))
            if quantizer is not None:
                quantizer.calibration = "minmax"
            return args[0]
        name = self._name(layer)
        label = self._label(layer)
        class_name = type(layer).__name__
        self.seen[name] = class_name
        if getattr(layer, "stateful", False) is True:
            raise ValueError(
                f"layer {name!r} ({class_name}) is stateful: its state carries over from one batch to the next, which "
                f"tfq cannot unroll and a TFLite model does not keep. Build the model with stateful=False (the same "
                f"weights) to convert it. Received: stateful=True")
        self.current = layer
        if not isinstance(layer, keras.layers.Layer):
            args, kwargs = self._quantize_variable_args(layer, label, args, kwargs)
        masked = kwargs.get("mask") is not None
        kind = registry.layer_kind(layer, masked=masked)
        weights_spec, act_spec = self._specs(layer)
        is_float = self.recipe.is_float_layer(name, class_name)
        if kind in (None, "composite") and not is_float:
            out = self._inline(layer, name, args, kwargs, label)
            if out is not None:
                return out
            if registry.has_decomposition(layer):
                raise ValueError(
                    f"the decomposition registered for {class_name} does not compute what layer {name!r} computes "
                    f"(or cannot be traced on symbolic tensors): fix the function given to "
                    f"tfq.qat.register_layer({class_name}, 'composite', decompose=...)."
                )
            if self.reasons.get(name) == CONSTANT_OUTPUT:
                kind = "output"
            elif masked and registry.layer_kind(layer) not in (None, "composite"):
                kind = registry.layer_kind(layer)  # a masked Softmax of unknown length: one op, as without a mask
            else:
                kind = "opaque"
        elif kind in (None, "composite"):
            kind = "output"
        if kind == "float":
            is_float = True
            kind = "output"
        if isinstance(layer, keras.layers.Activation) and not is_float \
                and activation_name(layer.activation) not in INT8_ACTIVATIONS:
            # No int8 rule of tfq's: the converter calibrates it (and keeps it float if TFLite has
            # no int8 kernel for it).
            kind = "opaque"

        if is_float and kind == "passthrough":
            self.float_noops.add(name)
        if is_float and self.recipe.mode in ("int8", "int16x8") and kind != "passthrough":
            args = keras.tree.map_structure(lambda t: self._barrier(t, label), args)
        source = args[0] if args else None
        produced = self.produced.get(id(source)) if source is not None and kwargs.get("mask") is None else None

        if kind == "weighted":
            return self._weighted(layer, source, weights_spec, act_spec, float_layer=is_float)
        if produced is not None and isinstance(layer, keras.layers.BatchNormalization) and not is_float \
                and produced.batchnorm is None and produced.activation == "linear" \
                and (id(produced.float_layer), "bn") not in self.no_fuse \
                and self._bn_foldable(layer, produced.float_layer):
            self.fusions.append((id(source), (id(produced.float_layer), "bn")))
            return self._weighted(produced.float_layer, produced.inputs, *self._specs(produced.float_layer),
                                  batchnorm=layer, site=produced.site)
        fused = _fusable_activation(layer)
        if produced is not None and fused is not None and not is_float and produced.activation == "linear" \
                and (id(produced.float_layer), "act") not in self.no_fuse:
            self.fusions.append((id(source), (id(produced.float_layer), "act")))
            return self._weighted(produced.float_layer, produced.inputs, *self._specs(produced.float_layer),
                                  batchnorm=produced.batchnorm, activation=fused, site=produced.site)

        if not is_float and act_spec is not None:
            if isinstance(layer, keras.layers.Rescaling):
                return self._rescaling(layer, source, act_spec)
            if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.Normalization)):
                return self._normalization(layer, source, act_spec)
            if isinstance(layer, keras.layers.Average):
                return self._average(layer, source, act_spec)

        out = self._call_copy(layer, args, kwargs)
        if kind == "opaque":
            self.opaque.setdefault(class_name, []).append(name)
        if kind == "passthrough" and not _makes_float(args, kwargs, out) and not _selects_two_tensors(layer, args):
            return out
        fixed = registry.fixed_output_range(layer) if kind == "fixed" else None
        config = self._output_config(act_spec, fixed_range=fixed)
        if config is None:
            return out
        return self._quantize_outputs(out, label, config, key=id(layer) if self.share_steps else None)

    def _name(self, layer) -> str:
        """The layer's name, or the stable name given to an operation of an inlined layer."""
        return self.names.get(id(layer), layer.name)

    def _quantize_outputs(self, out, name: str, config: dict, key=None):
        """An output quantizer on every float tensor of ``out`` (``name_fq``, ``name_fq_1`` …).

        A shared layer gets new quantizers at each call: each call site has its own ranges, as
        each of its output tensors has its own scale in TFLite. Inside an unrolled recurrent layer
        (``key``: the layer's id) the steps share them instead.
        """
        count = [0]

        def quantize(t):
            if not str(getattr(t, "dtype", "")).startswith("float"):
                return t
            index = count[0]
            count[0] += 1
            quantizer = self.step_quantizers.get((key, index)) if key is not None else None
            if quantizer is None:
                quantizer = ActivationQuantizer(name=self._unique(f"{name}_fq" + (f"_{index}" if index else "")),
                                                **config)
                if key is not None:
                    self.step_quantizers[(key, index)] = quantizer
            y = quantizer(t)
            self.quantizer_of[id(y)] = quantizer
            return y

        return keras.tree.map_structure(quantize, out)

    def _call_copy(self, layer, args, kwargs):
        """Calls a copy of ``layer`` with its weights; the layer itself if it cannot be copied.

        A layer whose config does not round-trip through ``from_config`` is used as is (shared
        with the caller's model): export never trains it, and QAT refuses it by name.
        """
        new_layer = self._copy(layer)
        if new_layer is not layer:
            try:
                out = new_layer(*args, **kwargs)
                _copy_weights(layer, new_layer)
                return out
            except Exception:  # noqa: BLE001 - any failure of a copy means: use the layer itself
                self.copies[id(layer)] = layer
        if isinstance(layer, keras.layers.Layer) and layer.weights:
            self.shared.append(layer)  # no weights: sharing a stateless layer changes nothing
        return layer(*args, **kwargs)

    def _quantize_variable_args(self, op, name, args, kwargs):
        """An operation that reads a variable (``x * self.gamma`` inside an inlined layer) reads a
        trainable copy of it, fake-quantized as TFLite stores that constant."""
        leaves = keras.tree.flatten((args, kwargs))
        anchor = next((t for t in leaves if isinstance(t, keras.KerasTensor)), None)
        if anchor is None or not any(_is_float_variable(v) for v in leaves):
            return args, kwargs
        symmetric = type(op).__name__ in _WEIGHT_OPS
        count = [0]

        def replace(v):
            if not _is_float_variable(v):
                return v
            key = id(v)
            if key not in self.constants:
                suffix = f"_{count[0]}" if count[0] else ""
                count[0] += 1
                self.constants[key] = (QuantizedWeight(
                    shape=tuple(v.shape), symmetric=symmetric, value_trainable=bool(v.trainable),
                    float_weights=self.recipe.mode not in ("int8", "int16x8"),
                    name=self._unique(f"{name}_weight{suffix}")), v)
            layer, variable = self.constants[key]
            out = layer(anchor)
            layer.set_weights([keras.ops.convert_to_numpy(variable)])
            return out

        return keras.tree.map_structure(replace, args), keras.tree.map_structure(replace, kwargs)

    def _inline(self, layer, name, args, kwargs, label=None):
        """Rewrites a layer tfq has no rule for as the graph of its ``call`` (sublayers and ops).

        Returns None when the layer's ``call`` cannot be traced on symbolic tensors or the traced
        graph does not compute what the layer computes: the layer then stays whole (opaque).
        """
        key = id(layer)
        if key not in self.inline_cache:
            self.inline_cache[key] = _inline_graph(layer, args, kwargs, name)
        sub, reason = self.inline_cache[key]
        if sub is None:
            self.reasons[name] = reason
            return None
        if isinstance(layer, keras.layers.RNN):
            self.unrolled.setdefault(type(layer).__name__, []).append(name)
        counts: collections.Counter = collections.Counter()
        for op in sub.operations:
            if isinstance(op, keras.layers.InputLayer):
                continue
            base = re.sub(r"_\d+$", "", op.name)
            self.names[id(op)] = self._unique(
                _scope_name(f"{label or name}_{base}" + (f"_{counts[base]}" if counts[base] else "")), wrapper=True)
            counts[base] += 1
        if id(sub) not in self.nested:
            share, self.share_steps = self.share_steps, self.share_steps or isinstance(layer, keras.layers.RNN)
            try:
                self.nested[id(sub)] = self.rewrite(sub, quantize_inputs=False)
            finally:
                self.share_steps = share
        return self.nested[id(sub)](_tensor_leaves((args, kwargs)))

    def _normalization(self, layer, x, act_spec):
        """A standalone BatchNormalization or a Normalization: MUL then ADD, both quantized."""
        config = self._quantizer_config(act_spec)
        inner = self._renamed_copy(layer)
        out = QuantizedNormalization(inner, intermediate_quantizer=config,
                                     output_quantizer=self._output_config(act_spec), name=self._label(layer))(x)
        _copy_weights(layer, inner)
        return out

    def _average(self, layer, inputs, act_spec):
        """``(x₁ + … + xₙ) / n`` is ADD then MUL in TFLite: each output gets a quantizer."""
        config = self._quantizer_config(act_spec)
        name = self._label(layer)
        total = keras.layers.Add(name=self._unique(f"{name}_sum"))(list(inputs))
        total = ActivationQuantizer(name=self._unique(f"{name}_sum_fq"), **config)(total)
        y = keras.layers.Rescaling(1.0 / len(inputs), name=self._unique(f"{name}_scale"))(total)
        out_config = self._output_config(act_spec)
        return ActivationQuantizer(name=self._unique(f"{name}_fq"), **out_config)(y) if out_config else y

    def _rescaling(self, layer, x, act_spec):
        """``x·scale + offset`` is two TFLite ops (MUL, ADD): each output gets a quantizer."""
        config = self._quantizer_config(act_spec)
        name = self._label(layer)
        y = keras.layers.Rescaling(layer.scale, 0.0, name=self._unique(f"{name}_scale"))(x)
        offset = layer.offset
        has_offset = not (isinstance(offset, (int, float)) and float(offset) == 0.0)
        scale_config = config if has_offset else self._output_config(act_spec)
        if scale_config:
            y = ActivationQuantizer(name=self._unique(f"{name}_scale_fq"), **scale_config)(y)
        if has_offset:
            y = keras.layers.Rescaling(1.0, offset, name=self._unique(f"{name}_offset"))(y)
            out_config = self._output_config(act_spec)
            y = ActivationQuantizer(name=self._unique(f"{name}_fq"), **out_config)(y) if out_config else y
        return y

    def _barrier(self, t, owner: str = "layer"):
        if not hasattr(t, "dtype") or not str(t.dtype).startswith("float"):
            return t
        key = id(t)
        if key not in self.barriers:
            # Named after the float layer it feeds: Keras's global name counter would make two
            # conversions of one model differ in their tensor names (and bytes).
            self.barriers[key] = FloatBarrier(name=self._unique(f"{owner}_float_in"))(t)
        return self.barriers[key]

    def _copy(self, layer):
        key = id(layer)  # a shared layer stays shared in the copy
        if key not in self.copies:
            try:
                self.copies[key] = self._renamed_copy(layer)
            except Exception:  # noqa: BLE001 - a config that does not round-trip: see _call_copy
                self.copies[key] = layer
        return self.copies[key]

    @staticmethod
    def _bn_foldable(bn, layer) -> bool:
        axis = bn.axis if isinstance(bn.axis, int) else (bn.axis[0] if len(bn.axis) == 1 else None)
        if axis is None:
            return False
        channels_first = getattr(layer, "data_format", "channels_last") == "channels_first"
        return axis in ((1,) if channels_first else (-1,)) or (not channels_first and axis == len(layer.output.shape) - 1
                                                               if _single_output(layer) else False)

    def _weighted(self, layer, x, weights_spec, act_spec, batchnorm=None, activation=None, float_layer=False,
                  site=None):
        """A :class:`QuantizedLayer` for one call site of a weighted layer.

        A layer called several times (a shared layer) gets one wrapper per call site, each with its
        own activation ranges and fusions (a BN or ReLU after one call is fused into that call only),
        all around one copy of the layer: the weights stay shared, fake-quantized from the one
        kernel (QAT trains that kernel through every call), and export reads one variable.
        A fusion rebuilds the wrapper of its call site under the same name (``site``).
        """
        step_key = (id(layer), id(batchnorm), activation)
        if self.share_steps and step_key in self.step_wrappers:  # one wrapper for every step
            wrapper = self.step_wrappers[step_key]
            out = wrapper(x)
            if activation is None and batchnorm is None:
                self.produced[id(out)] = _Produced(layer, x, batchnorm, wrapper.activation, wrapper.name)
            return out
        name = self._label(layer)
        # The first call site's wrapper is named after the layer (after its BN when only the BN is
        # fused), the others after a unique variant of the layer's name.
        preferred = self._label(batchnorm) if batchnorm is not None and activation is None else name
        sites = self.site_names.setdefault(id(layer), [])
        if site is None:
            site = preferred if not sites else self._unique(name, wrapper=True)
            sites.append(site)
        elif site == sites[0]:
            site = sites[0] = preferred
        # A new copy unless another call site already uses one (a layer called once gets a fresh copy
        # when a fusion rebuilds its wrapper, as the wrapper it replaces is dropped).
        first = id(layer) not in self.inner or len(sites) == 1
        inner = self.inner[id(layer)] if not first else self._renamed_copy(layer)
        bn = self._renamed_copy(batchnorm) if batchnorm is not None else None
        act = activation if activation is not None else activation_name(layer.activation)
        split_act = None
        if act not in INT8_ACTIVATIONS and not float_layer:
            # The op is int8; tfq has no int8 rule for the activation after it: it becomes its own
            # op, which the converter calibrates (and keeps float if TFLite has no int8 kernel).
            split_act, act = act, "linear"
        out_fixed = registry._FIXED_RANGES.get(act) if act not in FUSABLE_ACTIVATIONS else None
        wrapper = QuantizedLayer(
            inner,
            batchnorm=bn,
            activation=act,
            weight_bits=weights_spec.bits if weights_spec else 8,
            per_channel=weights_spec.per_channel if weights_spec else True,
            weight_narrow_range=weights_spec.narrow_range if weights_spec else True,
            float_weights=weights_spec is None,
            output_quantizer=(self._quantizer_config(act_spec) if split_act is not None
                              else self._output_config(act_spec, fixed_range=out_fixed)),
            pre_activation_quantizer=self._pre_activation_config(act_spec, act),
            preserve=preserve_mode_for(layer, self.preserve),
            name=site,
            bn_folding=self.bn_folding,
        )
        out = wrapper(x)
        if first:
            _copy_weights(layer, inner)
            self.inner[id(layer)] = inner
        if bn is not None:
            _copy_weights(batchnorm, bn)
        wrapper.init_preservation()
        if split_act is not None:
            function = layer.activation if activation is None else split_act
            act_name = self._unique(f"{site}_{split_act}")
            y = keras.layers.Activation(function, name=act_name)(out)
            self.opaque.setdefault("Activation", []).append(act_name)
            config = self._output_config(act_spec)
            return ActivationQuantizer(name=self._unique(f"{site}_{split_act}_fq"), **config)(y) if config else y
        if self.share_steps:
            self.step_wrappers[step_key] = wrapper
        if act == "linear" or (activation is None and batchnorm is None):
            self.produced[id(out)] = _Produced(layer, x, batchnorm, act, site)
        return out


# Operations that use a variable operand as a weight (symmetric int8 in TFLite, like a kernel).
_WEIGHT_OPS = ("Matmul", "Einsum", "Dot", "Tensordot")
_VERIFY_ATOL = 1e-4


def _is_float(t) -> bool:
    return str(getattr(t, "dtype", "")).startswith("float")


def _makes_float(args, kwargs, out) -> bool:
    """Whether an op makes a float tensor from no float tensor (a cast of a mask): a new range."""
    inputs = [t for t in keras.tree.flatten((args, kwargs)) if isinstance(t, keras.KerasTensor)]
    return any(map(_is_float, keras.tree.flatten(out))) and not any(map(_is_float, inputs))


def _selects_two_tensors(op, args) -> bool:
    """A ``where`` choosing between two float tensors of the graph: TFLite's SELECT_V2 gives both and its
    output one scale, so the output gets a range of its own (the union), to which the converter requantizes
    them. A ``where`` between a tensor and a constant keeps the tensor's scale."""
    if isinstance(op, keras.layers.Layer) or type(op).__name__ != "Where" or len(args) < 3:
        return False
    x, y = args[1], args[2]
    return all(isinstance(t, keras.KerasTensor) and _is_float(t) for t in (x, y)) and x is not y


def _is_float_variable(v) -> bool:
    return isinstance(v, keras.Variable) and str(v.dtype).startswith("float")


def _tensor_leaves(structure) -> list:
    """The distinct symbolic tensors in a structure of call arguments, in order."""
    seen, found = set(), []
    for leaf in keras.tree.flatten(structure):
        if isinstance(leaf, keras.KerasTensor) and id(leaf) not in seen:
            seen.add(id(leaf))
            found.append(leaf)
    return found


def _specific_shape(shape, call_shape) -> tuple:
    """``shape`` (a nested model's input) with its unknown dimensions after the batch taken from
    ``call_shape`` (the tensor it is called on), when both have the same rank and agree elsewhere."""
    shape = tuple(shape)
    if call_shape is None or len(call_shape) != len(shape):
        return shape
    if any(d is not None and c is not None and d != c for d, c in zip(shape, call_shape)):
        return shape
    return tuple(d if d is not None or i == 0 else c for i, (d, c) in enumerate(zip(shape, call_shape)))


def _probe_shapes(tensors) -> list[list[int]]:
    """Shapes of probe data for symbolic tensors: each unknown dimension is 2, or, after the batch, the
    size another tensor of the same rank has on that axis (a mask of known length next to attention
    logits whose length Keras' shape inference lost), so that they broadcast together as in the graph."""
    known: dict[tuple[int, int], int] = {}
    for t in tensors:
        for axis, d in enumerate(t.shape):
            if axis and d is not None and d > 1:
                known.setdefault((len(t.shape), axis), d)
    return [[d if d is not None else known.get((len(t.shape), axis), 2) if axis else 2
             for axis, d in enumerate(t.shape)] for t in tensors]


def _probe_value(t, rng, shape=None):
    """A small batch of data for a symbolic tensor (of ``shape``, default: its unknown dimensions 2):
    normal floats, ones for integers and booleans."""
    shape = [d if d is not None else 2 for d in t.shape] if shape is None else shape
    if str(t.dtype).startswith("float"):
        return rng.standard_normal(shape).astype(t.dtype)
    return np.ones(shape, dtype=t.dtype)


def _built_copy(layer, args, kwargs):
    """A copy of a layer with its weights, built by one call; the layer itself if it cannot be copied.

    Tracing a copy keeps the caller's sublayers free of the traced graph's nodes.
    """
    try:
        new = copy_layer(layer)
        new(*args, **kwargs)
        new.set_weights(layer.get_weights())
        return new
    except Exception:  # noqa: BLE001 - a config that does not round-trip: trace the layer itself
        return layer


def _inline_graph(layer, args, kwargs, name: str | None = None) -> tuple[keras.Model | None, str]:
    """The layer's ``call`` traced on fresh symbolic inputs as a functional model, or None and why.

    The model is named ``f"{name}_inlined"`` (``name``: the layer's name in the rewrite, which does
    not depend on what else the process built; an op's own name such as ``dot_product_attention_2``
    does, through Keras' global name counter, and would change the bytes of a second conversion).

    The model takes the distinct symbolic tensors of ``(args, kwargs)`` as a flat list. It is
    kept only if it computes what the layer computes on probe data (max abs difference below
    ``_VERIFY_ATOL`` relative to the output scale): a ``call`` with Python control flow on values,
    backend-specific ops or state would otherwise be rewritten wrongly.
    """
    tensors = _tensor_leaves((args, kwargs))
    if not tensors or (isinstance(layer, keras.Model) and _has_graph(layer)):
        return None, "it takes no tensor"
    sub, reason = _traced_graph(layer, args, kwargs, tensors, name, static_batch=False)
    if sub is None and any(t.shape and t.shape[0] is None for t in tensors):
        # A call that reads its batch size (ops.shape(x)[0], e.g. to broadcast a causal mask or position
        # embeddings) cannot be traced on an unknown one: traced on a batch of 1, its shape-dependent
        # ops become constants that broadcast; kept only if it computes the layer on a batch of 2 too.
        retry, why = _traced_graph(layer, args, kwargs, tensors, name, static_batch=True)
        if retry is not None or why == CONSTANT_OUTPUT:
            return retry, why
    return sub, reason


def _traced_graph(layer, args, kwargs, tensors, name, static_batch: bool):
    def placeholder(t):
        shape = tuple(t.shape)
        if static_batch and shape and shape[0] is None:
            shape = (1, *shape[1:])
        return keras.Input(batch_shape=shape, dtype=t.dtype)

    fresh = {id(t): placeholder(t) for t in tensors}
    new_args, new_kwargs = keras.tree.map_structure(lambda v: fresh.get(id(v), v), (args, kwargs))
    decompose = registry.decomposition(layer, masked=kwargs.get("mask") is not None)
    rng = np.random.default_rng(0)
    probe = [_probe_value(t, rng, shape) for t, shape in zip(tensors, _probe_shapes(tensors))]
    by_id = {id(t): p for t, p in zip(tensors, probe)}
    p_args, p_kwargs = keras.tree.map_structure(lambda v: by_id.get(id(v), v), (args, kwargs))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = keras.tree.flatten(layer(*p_args, **p_kwargs))
            target = _built_copy(layer, p_args, p_kwargs)
            out = decompose(target, *new_args, **new_kwargs)
            if not all(isinstance(t, keras.KerasTensor) for t in keras.tree.flatten(out)):
                if static_batch and _broadcasts_to(out, expected):
                    return None, CONSTANT_OUTPUT
                return None, "its call returns something other than tensors"
            sub = keras.Model([fresh[id(t)] for t in tensors], out,
                              name=_scope_name(f"{name or layer.name}_inlined"))
            if len(sub.operations) <= len(tensors):  # nothing but the inputs: no graph to rewrite
                return None, "its call has no op"
            got = keras.tree.flatten(sub(probe))
    except Exception as err:  # noqa: BLE001 - any failure to trace means the layer stays whole
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        return None, f"{type(err).__name__}: {first}" if first else type(err).__name__
    for e, g in zip(expected, got):
        e, g = keras.ops.convert_to_numpy(e), keras.ops.convert_to_numpy(g)
        if e.shape != g.shape:
            return None, f"the traced graph gives shape {g.shape}, the layer {e.shape}"
        if e.size and np.issubdtype(e.dtype, np.floating):
            scale = max(float(np.max(np.abs(e))), 1.0)
            diff = float(np.max(np.abs(e - g))) if np.all(np.isfinite(g)) else float("inf")
            if diff > _VERIFY_ATOL * scale:
                return None, f"the traced graph differs from the layer by {diff:.3g}"
        elif e.size and not np.array_equal(e, g):
            return None, "the traced graph differs from the layer"
    return sub, ""


# Why a layer is kept whole when its output depends on its inputs' shape only (position embeddings
# for a static sequence length): nothing inside it to calibrate, so no warning; tfq quantizes its output.
CONSTANT_OUTPUT = "its output is a constant for these input shapes"


def _broadcasts_to(out, expected) -> bool:
    """Whether ``out`` (concrete tensors) broadcast to the layer's outputs ``expected`` (a batch of 2)."""
    got = keras.tree.flatten(out)
    if len(got) != len(expected):
        return False
    try:
        return all(np.allclose(np.broadcast_to(keras.ops.convert_to_numpy(g), keras.ops.shape(e)),
                               keras.ops.convert_to_numpy(e), atol=1e-6) for g, e in zip(got, expected))
    except (ValueError, TypeError):
        return False


def _is_concat(layer) -> bool:
    """A concatenation: TFLite requires its inputs and output to share one scale."""
    return isinstance(layer, keras.layers.Concatenate) or (
        not isinstance(layer, keras.layers.Layer) and type(layer).__name__ in ("Concatenate", "Stack")
    )


_SCOPE_NAME = re.compile(r"[A-Za-z0-9.][A-Za-z0-9_.>-]*")


def _scope_name(name: str) -> str:
    """``name`` if TensorFlow accepts it as a name scope (Keras opens one per layer and model when
    tracing), else with every other character replaced by ``_`` (and a leading ``_`` prefixed by ``x``)."""
    if _SCOPE_NAME.fullmatch(name):
        return name
    fixed = re.sub(r"[^A-Za-z0-9_.>-]", "_", name)
    return fixed if _SCOPE_NAME.fullmatch(fixed) else f"x{fixed}"


def _float_activation_message(name: str, activation: str) -> str:
    return (
        f"tfq: activation {activation!r} of layer {name!r} has no int8 TFLite kernel and stays float "
        f"(DEQUANTIZE → float op → QUANTIZE). Int8 activations: {', '.join(INT8_ACTIVATIONS)}. Use one of them, "
        f"or list the layer in float_layers (recipe and tfq.convert) to accept this."
    )


def _single_output(layer) -> bool:
    try:
        layer.output  # noqa: B018 - raises for layers called more than once
        return True
    except (AttributeError, ValueError):
        return False


def _has_graph(model) -> bool:
    """Whether ``model`` is a Functional or Sequential model (a subclassed one has no graph of layers)."""
    if isinstance(model, keras.Sequential):
        return True
    try:
        return bool(model.inputs) and bool(model.outputs)
    except (AttributeError, ValueError):
        return False


def _traced_subclassed(model: keras.Model) -> keras.Model:
    """A Functional model around a subclassed one, on inputs of the shapes it was built with: the
    rewrite then traces its ``call`` into a graph of layers (as for a custom layer), or keeps it whole.

    Raises:
        ValueError: the model was never called (its input shapes are unknown).
    """
    shapes = (model.get_build_config() or {}).get("input_shape") if model.built else None
    if shapes is None:
        raise ValueError(
            f"Model {model.name!r} ({type(model).__name__}) is a subclassed model that was never called, so its "
            f"input shapes are unknown: call it once on a batch (model(x)) or wrap it, "
            f"keras.Model(inputs, model(inputs)) with inputs = keras.Input(shape=...), then pass that.")
    single = isinstance(shapes, (list, tuple)) and (not shapes or not isinstance(shapes[0], (list, tuple, dict)))
    if isinstance(shapes, dict):
        inputs = {k: keras.Input(batch_shape=(None, *tuple(v)[1:]), name=k) for k, v in shapes.items()}
        outputs = model(inputs)
    elif single:
        inputs = keras.Input(batch_shape=(None, *tuple(shapes)[1:]))
        outputs = model(inputs)
    else:
        inputs = [keras.Input(batch_shape=(None, *tuple(v)[1:])) for v in shapes]
        outputs = model(inputs)
    return keras.Model(inputs, outputs, name=model.name)


def _as_functional(model: keras.Model) -> keras.Model:
    if isinstance(model, keras.Sequential):
        if not model.built or not getattr(model, "inputs", None):
            raise ValueError(
                f"Sequential model {model.name!r} is not built: give it an Input (keras.Input(shape=...)) or "
                f"call it once on data before quantizing."
            )
        return keras.Model(model.inputs, model.outputs, name=model.name)
    if not hasattr(model, "inputs") or not getattr(model, "_is_graph_network", True) is not False:
        pass
    try:
        model.inputs  # noqa: B018
        model.outputs  # noqa: B018
    except (AttributeError, ValueError):
        model.inputs = None
    if not getattr(model, "inputs", None) or not getattr(model, "outputs", None):
        raise ValueError(
            f"Model {model.name!r} ({type(model).__name__}) is a subclassed model, with no graph of layers for this "
            f"step. Pass a Functional model that traces its call instead: inputs = keras.Input(shape=...); "
            f"keras.Model(inputs, model.call(inputs))."
        )
    return model


def check_float_layers(patterns, layers: dict, model_name: str, noops=frozenset()) -> None:
    """Every ``float_layers`` pattern must select a layer that computes: an error names the nearest layer
    names otherwise, or the layers selected if they only move data.

    Args:
        patterns: the recipe's ``float_layers`` (names/regexes, or ``"class:<regex>"``).
        layers: layer name -> class name, for every layer the rewrite saw (nested and inlined included).
        model_name: for the message.
        noops: names of layers that keep their input's type whatever the recipe (``"passthrough"``:
            Flatten, Reshape, MaxPooling …), so keeping them float changes nothing.

    Raises:
        ValueError: a pattern matches no layer (the message lists the nearest names, ``difflib``),
            or only layers of ``noops``.
    """
    import difflib

    for pattern in patterns:
        probe = Recipe(float_layers=(pattern,))
        matched = [name for name, class_name in layers.items() if probe.is_float_layer(name, class_name)]
        if matched and all(name in noops for name in matched):
            listed = ", ".join(f"{name!r} ({layers[name]})" for name in matched[:4])
            listed += " …" if len(matched) > 4 else ""
            raise ValueError(f"float_layers pattern {pattern!r} selects only layer(s) {listed} of model "
                             f"{model_name!r}, which move data without computing: they keep their input's type "
                             f"(TFLite's scale), so keeping them float changes nothing. Name the layer that "
                             f"computes (the one before or after), or drop {pattern!r}.")
        if matched:
            continue
        is_class = pattern.startswith("class:")
        target = pattern[len("class:"):] if is_class else pattern
        candidates = sorted(set(layers.values()) if is_class else set(layers))
        by_lower = {c.lower(): c for c in candidates}
        near = difflib.get_close_matches(target.lower(), list(by_lower), n=4, cutoff=0.5)
        listed = ", ".join(repr(("class:" if is_class else "") + by_lower[n]) for n in near) or \
            ", ".join(repr(c) for c in candidates[:8]) + (" …" if len(candidates) > 8 else "")
        what = "layer class" if is_class else "layer name"
        raise ValueError(f"float_layers pattern {pattern!r} matches no {what} of model {model_name!r} (patterns are "
                         f"regexes matched against the whole name); nearest: {listed}.")


def rewrite_model(
    model: keras.Model,
    recipe: Recipe | str | dict | None = None,
    *,
    range_mode: str = "moving_average",
    decay: float = 0.999,
    quantize_inputs: bool = True,
    warn_unknown: bool = True,
    trainable: bool = False,
    preserve: str | None = None,
    bn_folding: str = "unfolded",
    logits_range: str = "tensor",
) -> keras.Model:
    """Returns a new model with fake-quant ops where TFLite quantizes (see module docstring).

    Args:
        model: a built Functional or Sequential Keras 3 model (nested models allowed), or a subclassed
            model called once (traced through its ``call``, kept whole where that fails).
        recipe: a :class:`~tfq.recipes.Recipe`, preset name, dict or file; default ``"int8"``.
        range_mode: activation range mode of the new quantizers (``"moving_average"`` or
            ``"learned"``; ranges start uninitialised).
        decay: moving-average decay.
        quantize_inputs: add quantizers on the model inputs.
        warn_unknown: warn (once per layer class) about layers tfq keeps whole because it has no
            rule for them and cannot decompose them: the TFLite converter calibrates their inner
            tensors from representative data.
        trainable: the result will be trained (QAT): refuse layers that cannot be copied, which
            would otherwise share their weights with ``model``.
        preserve: ``"sparsity"``/``"clusters"``: weighted layers whose kernel has zeros / at most 256
            distinct values keep them (:meth:`QuantizedLayer.init_preservation`).
        bn_folding: how a folded BatchNormalization trains, ``"unfolded"`` or ``"two_pass"`` (see
            :class:`~tfq.qat.QuantizedLayer`).
        logits_range: range of the quantizer on a softmax's input (the logits): ``"tensor"``
            (the tensor's range, like every other quantizer) or ``"softmax"`` (the part of it the
            int8 softmax output depends on, see :class:`~tfq.observers.SoftmaxInputObserver`).

    Returns:
        A new ``keras.Model``; the caller's model is untouched.

    Raises:
        ValueError: with ``trainable``, a layer tfq must keep whole whose config does not
            round-trip through ``from_config`` (it cannot be copied).
    """
    recipe = load_recipe(recipe if recipe is not None else "int8")
    if logits_range not in LOGITS_RANGES:
        raise ValueError(f"logits_range must be one of {LOGITS_RANGES}. Received: logits_range={logits_range!r}")
    if bn_folding not in BN_FOLDING:
        raise ValueError(f"bn_folding must be one of {BN_FOLDING}. Received: bn_folding={bn_folding!r}")
    if not isinstance(model, keras.Model):
        raise TypeError(f"expected a keras.Model. Received: {type(model).__name__}")
    if not _has_graph(model):
        model = _traced_subclassed(model)
    # The first pass learns the graph's consumers; a second pass (needed only if a fusion would
    # duplicate a layer or a tensor feeds only concatenations) applies what it learned.
    # Each pass can only remove fusions or quantizers, so this settles within a few passes.
    no_fuse: frozenset = frozenset()
    concat_fed: frozenset = frozenset()
    inline_cache: dict = {}
    for _ in range(_MAX_PASSES):
        rewriter = _Rewriter(recipe, range_mode, decay, inline_cache, no_fuse, concat_fed, preserve=preserve,
                             bn_folding=bn_folding, logits_range=logits_range)
        try:
            new = rewriter.rewrite(model, quantize_inputs=quantize_inputs)
        except ValueError:
            # Two fusions of one tensor give two layers of one name: the graph cannot be built.
            if not rewriter.conflicts() - no_fuse:
                raise
            new = None
        conflicts = rewriter.conflicts() - no_fuse
        fed = frozenset(rewriter.feeding_only_concatenations())
        if new is not None and not conflicts and fed == concat_fed:
            break
        no_fuse = no_fuse | conflicts
        concat_fed = fed if new is not None else concat_fed
    else:
        raise ValueError(f"tfq could not settle the rewrite of model {model.name!r} in {_MAX_PASSES} passes; "
                         f"please report this model's architecture.")
    check_float_layers(recipe.float_layers, rewriter.seen, model.name, rewriter.float_noops)
    first_site: dict[int, QuantizedLayer] = {}
    for wrapper in quantized_layers_of(new):  # later call sites of a shared layer name the first (for loading)
        primary = first_site.setdefault(id(wrapper.layer), wrapper)
        if primary is not wrapper:
            wrapper.shares = primary.name
    if trainable and rewriter.shared:
        layer = rewriter.shared[0]
        raise ValueError(
            f"layer {layer.name!r} ({type(layer).__name__}) cannot be copied for QAT: its get_config() does not "
            f"round-trip through from_config(), and training would change your model's weights. Make its "
            f"get_config() return every constructor argument, or use PTQ (tfq.convert), which does not train it."
        )
    if warn_unknown:
        for class_name, names in sorted(rewriter.opaque.items()):
            warnings.warn(opaque_message(class_name, names, rewriter.reasons), stacklevel=3)
    for class_name, names in sorted(rewriter.unrolled.items()):
        warnings.warn(
            f"tfq: {class_name} layer(s) {', '.join(repr(n) for n in names)} unrolled over their time steps (TFLite "
            f"has no int8 kernel for the loop the converter makes of them): one int8 op per step and gate.",
            stacklevel=3,
        )
    return new


def opaque_message(class_name: str, names: list[str], reasons: dict | None = None) -> str:
    """The one-line warning for the layers of one class that tfq keeps whole."""
    shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    reason = (reasons or {}).get(names[0])
    if class_name in ("LSTM", "GRU", "SimpleRNN", "RNN"):
        return (
            f"tfq: {len(names)} recurrent layer(s) of class {class_name} ({shown}) cannot be unrolled ({reason}): "
            f"the converter makes a while loop of them, which TFLite cannot run as int8. Give the model a fixed "
            f"number of time steps (keras.Input(shape=(steps, features))), without masking, and not stateful."
        )
    if class_name == "Activation":
        fix = "use an activation tfq quantizes (relu, relu6, sigmoid, tanh, swish, hard_swish, gelu, …)"
    elif class_name == "TFKerasLayer":  # a tf_keras layer Keras 3 has no class for (tfq.models.interop)
        fix = ("give tfq a Keras 3 implementation of it: tfq.interop.to_keras3(model, custom_objects={class name: "
               "Keras 3 class}), and pass the result")
    elif reason and "static" in reason:  # e.g. a causal mask on a sequence of unknown length
        fix = ("give the model a fixed sequence length: call it on keras.Input(shape=(length, …)) inputs, "
               "keras.Model(inputs, model(inputs)), and pass that")
    else:
        fix = (f"write its call with keras.ops so tfq can trace it, or register how it computes: "
               f"tfq.qat.register_layer({class_name}, 'composite', decompose=fn)")
    why = f" ({reason})" if reason and class_name not in ("Activation", "TFKerasLayer") else ""
    return (
        f"tfq: {len(names)} layer(s) of class {class_name} ({shown}) have no tfq quantization rule and could "
        f"not be decomposed{why}: tfq quantizes their outputs and the TFLite converter calibrates what is inside "
        f"them from representative_data (MinMax; float only where TFLite has no int8 kernel). To choose those "
        f"ranges with tfq's calibration (and train them in QAT), {fix}."
    )


def _walk_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _walk_layers(layer)


# Suffixes of the quantizers a QuantizedLayer / QuantizedNormalization names after itself.
_WRAPPER_QUANTIZERS = ("output", "pre_activation", "depthwise", "scale")


def _walk_all_operations(model):
    """Every operation of a model and of the models nested in it (the nested models too)."""
    for op in getattr(model, "operations", None) or getattr(model, "layers", []):
        yield op
        if isinstance(op, keras.Model):
            yield from _walk_all_operations(op)


_TFQ_LAYERS = (ActivationQuantizer, QuantizedLayer, QuantizedNormalization, QuantizedWeight, FloatBarrier,
               Statistic)


def _walk_operations(model):
    for op in model.operations:
        if isinstance(op, keras.Model):
            yield from _walk_operations(op)
        elif not isinstance(op, keras.layers.InputLayer):
            yield op


def uncovered_layers(model: keras.Model) -> dict[str, list[str]]:
    """Layers of a rewritten model whose inner tensors tfq does not quantize, by class.

    They were kept whole (no rule, not decomposable) or are activations without an int8 rule of
    tfq's: converting such a model needs representative data, from which the TFLite converter
    calibrates their inner tensors.
    """
    found: dict[str, list[str]] = {}
    for op in _walk_operations(model):
        if isinstance(op, _TFQ_LAYERS):
            continue
        kind = registry.layer_kind(op)
        if kind in (None, "composite") or (
                isinstance(op, keras.layers.Activation) and activation_name(op.activation) not in INT8_ACTIVATIONS):
            found.setdefault(type(op).__name__, []).append(op.name)
    return found


def quantizers_of(model: keras.Model) -> dict[str, ActivationQuantizer]:
    """All activation quantizers of a rewritten model, by unique name (nested models included)."""
    found: dict[str, ActivationQuantizer] = {}
    for layer in _walk_layers(model):
        if isinstance(layer, ActivationQuantizer):
            found[layer.name] = layer
        elif isinstance(layer, (QuantizedLayer, QuantizedNormalization)):
            for q in layer.quantizers:
                found[q.name] = q
    return found


def quantized_layers_of(model: keras.Model) -> list[QuantizedLayer]:
    """All :class:`QuantizedLayer` wrappers of a rewritten model (nested models included)."""
    return [layer for layer in _walk_layers(model) if isinstance(layer, QuantizedLayer)]


def batchnorm_layers_of(model: keras.Model) -> list:
    """Every layer of a rewritten model that holds BatchNormalization statistics (nested included).

    :class:`QuantizedLayer` with a folded BN, :class:`QuantizedNormalization` of a standalone BN
    (both have a ``bn_frozen`` switch) and plain ``BatchNormalization`` layers left float.
    """
    found = []
    for layer in _walk_layers(model):
        if isinstance(layer, QuantizedLayer) and layer.batchnorm is not None:
            found.append(layer)
        elif isinstance(layer, QuantizedNormalization) and layer.is_batchnorm:
            found.append(layer)
        elif isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
    return found


def _fixed_config(quantizer: ActivationQuantizer) -> dict:
    config = quantizer.get_config()
    if quantizer.mode != "fixed":
        if float(keras.ops.convert_to_numpy(quantizer.initialized)) < 0.5:
            raise ValueError(
                f"quantizer {quantizer.name!r} has no range yet: calibrate the model (tfq.calibrate) or train it "
                f"for at least one step before exporting."
            )
        lo = float(keras.ops.convert_to_numpy(quantizer.range_min))
        hi = float(keras.ops.convert_to_numpy(quantizer.range_max))
        config.update(mode="fixed", fixed_range=[lo, hi])
    return config


def freeze_model(
    model: keras.Model, ranges: dict[str, tuple[float, float]] | None = None, strip: bool = False
) -> keras.Model:
    """A copy of a rewritten model with every quantizer fixed to its current range.

    Used for export: the result has no range variables, so the converter sees fake-quant ops
    with constant ranges. ``ranges`` (quantizer name → ``(min, max)``) overrides the stored ones.
    With ``strip``, the copy is the plain float model instead (quantizers removed, wrapped layers
    unwrapped, BN unfolded) — for float/FP16/dynamic export of a QAT model.

    Raises:
        ValueError: a quantizer never saw data (no calibration, no training step).
    """
    ranges = ranges or {}
    sources: dict[int, object] = {}

    def fixed(q):
        config = _fixed_config(q) if q.name not in ranges else dict(q.get_config(), mode="fixed",
                                                                      fixed_range=list(ranges[q.name]))
        return config

    def clone_function(layer):
        if isinstance(layer, ActivationQuantizer):
            return ActivationQuantizer.from_config(fixed(layer))
        if isinstance(layer, QuantizedLayer):
            config = layer.get_config()
            for key, q in (("output_quantizer", layer.output_quantizer),
                           ("pre_activation_quantizer", layer.pre_activation_quantizer),
                           ("intermediate_quantizer", layer.intermediate_quantizer)):
                if q is not None:
                    config[key] = fixed(q)
            config["layer"] = _copy_layer(layer.layer, float32=True)
            config["batchnorm"] = _copy_layer(layer.batchnorm, float32=True) if layer.batchnorm is not None else None
            if layer.exports_float_weights and not strip:
                config["converter_quantizes_weights"] = True  # per channel, on the grid computed here
            config["preserve"] = None  # the copy gets the preserved kernel itself (layer_weights)
            config.pop("shares", None)  # each copy gets the kernel's values (one constant for the converter)
            new = QuantizedLayer.from_config(_float32_config(layer, config))
        elif isinstance(layer, QuantizedNormalization):
            config = layer.get_config()
            for key, q in (("output_quantizer", layer.output_quantizer),
                           ("intermediate_quantizer", layer.intermediate_quantizer)):
                if q is not None:
                    config[key] = fixed(q)
            config["layer"] = _copy_layer(layer.layer, float32=True)
            new = QuantizedNormalization.from_config(_float32_config(layer, config))
        else:
            try:
                new = _copy_layer(layer, float32=True)
            except Exception:  # noqa: BLE001 - a config that does not round-trip: export uses the layer itself
                new = layer
        sources[id(new)] = layer
        return new

    def call_function(layer, *args, **kwargs):
        source = sources.get(id(layer))
        if strip and isinstance(layer, ActivationQuantizer):
            return args[0]
        if strip and isinstance(layer, QuantizedLayer):
            return _float_call(source, args[0])
        if strip and isinstance(layer, QuantizedNormalization):
            inner = _copy_layer(source.layer, float32=True)
            out = inner(args[0])
            _copy_weights(source.layer, inner)
            return out
        out = layer(*args, **kwargs)
        if isinstance(layer, QuantizedLayer):
            layer.layer.set_weights(source.layer_weights())
            if source.batchnorm is not None:
                _copy_weights(source.batchnorm, layer.batchnorm)
        elif isinstance(layer, QuantizedNormalization):
            _copy_weights(source.layer, layer.layer)
        elif source is not None:
            _copy_weights(source, layer)
        return out

    return _clone_nested(_as_functional(model), clone_function, call_function)


def _float_call(wrapper: QuantizedLayer, x):
    """The float computation of a :class:`QuantizedLayer`: layer, then BN, then activation."""
    config = _float32_config(wrapper.layer, wrapper.layer.get_config())
    config["activation"] = "linear"
    inner = wrapper.layer.__class__.from_config(config)
    y = inner(x)
    inner.set_weights(wrapper.layer_weights())
    if wrapper.batchnorm is not None:
        bn = _copy_layer(wrapper.batchnorm, float32=True)
        y = bn(y)
        _copy_weights(wrapper.batchnorm, bn)
    if wrapper.activation != "linear":
        y = keras.layers.Activation(wrapper.activation, name=f"{wrapper.name}_activation", dtype="float32")(y)
    return y


def _clone_nested(model, clone_function, call_function):
    def call(layer, *args, **kwargs):
        if isinstance(layer, keras.Model):
            return _clone_nested(_as_functional(layer), clone_function, call_function)(*args, **kwargs)
        return call_function(layer, *args, **kwargs)

    def clone(layer):
        return layer if isinstance(layer, keras.Model) else clone_function(layer)

    return keras.models.clone_model(model, clone_function=clone, call_function=call)


def fix_ranges_in_place(model: keras.Model, ranges: dict[str, tuple[float, float]]) -> keras.Model:
    """Fixes every quantizer of a model tfq rewrote for PTQ to its range, in place, and returns it.

    The same graph as :func:`freeze_model` (fake-quant ops with constant ranges; Dense kernels the
    converter quantizes marked as such) without copying every layer: for :func:`tfq.convert`, whose
    rewritten model nobody else holds. The range variables stay, unused: save
    :func:`freeze_model`'s copy instead if the model is to be kept.

    Args:
        model: a model from :func:`rewrite_model` (never the caller's model).
        ranges: quantizer name → ``(min, max)`` for every quantizer that is not fixed yet.

    Raises:
        ValueError: a quantizer with no range in ``ranges``, or a range that is not finite with min <= max.
    """
    for name, quantizer in quantizers_of(model).items():
        if quantizer.mode == "fixed":
            continue
        if name not in ranges:
            raise ValueError(f"quantizer {name!r} has no range: calibrate it first. Received ranges for "
                             f"{len(ranges)} other tensor(s).")
        lo, hi = (float(v) for v in ranges[name])
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
            raise ValueError(f"range of {name!r} must be finite with min <= max. Received: {ranges[name]!r}")
        quantizer.fixed_range = (lo, hi)
        quantizer.mode = "fixed"
    for layer in quantized_layers_of(model):
        if layer.exports_float_weights:
            layer.converter_quantizes_weights = True  # per channel, on the grid computed here
    return model
