"""tf_keras (Keras 2) models in tfq: an equivalent Keras 3 model, or tfmot QAT models to TFLite.

tfq rewrites Keras 3 graphs, so a tf_keras model is first rebuilt in Keras 3 by
:func:`to_keras3`: its config (Keras 2 format) is translated to Keras 3 and deserialized, then
the weights are copied layer by layer, by name, with shape checks. Only public APIs are used:
``model.get_config()``, ``keras.Model.from_config`` / ``keras.Sequential.from_config``,
``get_weights`` / ``set_weights``.

A tfmot QAT model (tf_keras with ``QuantizeWrapperV2``/``QuantizeLayer``) already carries its
own fake-quant ops; :func:`convert_tfmot_model` traces it with ``tf.function`` and hands the
concrete function to the TFLite converter, which works whether ``tf.keras`` is Keras 3 or
tf_keras (``TF_USE_LEGACY_KERAS``) in this process.

Example:
    >>> k3_model = tfq.interop.to_keras3(tf_keras_model)                   # doctest: +SKIP
    >>> tflite = tfq.interop.convert_tfmot_model(tfmot_qat_model, "int8")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import importlib.util
import re

import keras

from tfq.core.export_modes import export_mode_names, get_export_mode
from tfq.models.loading import (
    SavedModelPath,
    is_keras3_model,
    is_tf_keras_model,
    load_model,
)
from tfq.quantsim.rewrite import (
    _has_graph,
    _scope_name,
    _walk_all_operations,
    copy_layer,
)
from tfq.tflite.converter import run_converter

__all__ = ["KERAS2_EXTRA", "convert_tfmot_model", "is_tfmot_qat_model", "load_keras_model", "missing_keras2",
           "require_keras2", "scope_safe_model",
           "to_keras3"]

# Keras 2 (tf_keras and tfmot) is an optional extra: module name -> distribution that provides it.
KERAS2_EXTRA = "tfq[keras2]"
_KERAS2_DISTRIBUTIONS = {"tf_keras": "tf-keras", "tensorflow_model_optimization": "tensorflow-model-optimization"}

TFMOT_QAT_CLASSES = frozenset({"QuantizeWrapper", "QuantizeWrapperV2", "QuantizeLayer"})
_FUNCTIONAL = "Functional"
_SEQUENTIAL = "Sequential"
_MODEL_CLASSES = frozenset({_FUNCTIONAL, _SEQUENTIAL, "Model"})
# Layers whose config holds Python code or a raw TF op: nothing Keras 3 can rebuild.
_CODE_LAYERS = {
    "Lambda": "a Python function, which cannot be carried over",
    "TFOpLambda": "a raw TensorFlow op called on a Keras tensor",
    "SlicingOpLambda": "a tensor slice (x[...]) on a Keras tensor",
}
_REBUILD = "rebuild the model with Keras 3 layers (keras.layers / keras.ops)"


def missing_keras2(modules=tuple(_KERAS2_DISTRIBUTIONS)) -> list[str]:
    """The distributions of ``modules`` (``"tf_keras"``, ``"tensorflow_model_optimization"``) not installed.

    Found without importing them (importing tfmot changes ``os.environ``).

    Example:
        >>> missing_keras2(("tf_keras",))  # doctest: +SKIP
        []
    """
    unknown = [m for m in modules if m not in _KERAS2_DISTRIBUTIONS]
    if unknown:
        raise ValueError(f"Expected Keras 2 modules among {tuple(_KERAS2_DISTRIBUTIONS)}. Received: {unknown}")
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken install, or a module set to None in sys.modules
            found = False
        if not found:
            missing.append(_KERAS2_DISTRIBUTIONS[module])
    return missing


def require_keras2(purpose: str, modules=tuple(_KERAS2_DISTRIBUTIONS)) -> None:
    """Raises a one-line ImportError naming the ``keras2`` extra when a Keras 2 path lacks its packages.

    tf-keras and tensorflow-model-optimization are not dependencies of tfq (tfmot pins
    absl-py 1.x); ``pip install 'tfq[keras2]'`` installs them.

    Args:
        purpose: what needs them, for the message (e.g. ``"the benchmark's tfmot rows"``).
        modules: the modules needed (default: both).

    Raises:
        ImportError: one of them is not installed.

    Example:
        >>> require_keras2("tfmot QAT", ("tf_keras", "tensorflow_model_optimization"))  # doctest: +SKIP
    """
    missing = missing_keras2(modules)
    if missing:
        raise ImportError(f"{purpose} needs {' and '.join(missing)} (Keras 2), which "
                          f"{'is' if len(missing) == 1 else 'are'} not installed: pip install '{KERAS2_EXTRA}'")


def _class_names(obj) -> set[str]:
    return {cls.__name__ for cls in type(obj).__mro__}


def _sublayers(model):
    """All layers of ``model``, nested models' layers included (depth first)."""
    for layer in getattr(model, "layers", ()):
        yield layer
        if hasattr(layer, "layers"):
            yield from _sublayers(layer)


def is_tfmot_qat_model(model) -> bool:
    """Whether ``model`` is a tf_keras model quantized by tfmot (``quantize_model``/``quantize_apply``).

    Recognised by class names (``QuantizeWrapper``, ``QuantizeWrapperV2``, ``QuantizeLayer``),
    without importing tfmot.

    Example:
        >>> is_tfmot_qat_model(tfmot.quantization.keras.quantize_model(model))  # doctest: +SKIP
        True
    """

    if not is_tf_keras_model(model):
        return False
    return any(_class_names(layer) & TFMOT_QAT_CLASSES for layer in _sublayers(model))


def load_keras_model(model, *, where: str = "model", saved_model: bool = False, tfmot: bool = False):
    """The one way tfq loads a model: a Keras 3 model from a model, a tf_keras model or a path.

    ``.keras``/``.h5`` files are loaded (:func:`tfq.models.loading.load_model`), tf_keras models rebuilt in
    Keras 3 (:func:`to_keras3`). A SavedModel directory is returned as a
    :class:`~tfq.models.loading.SavedModelPath` only with ``saved_model=True``, a tfmot QAT model as is only
    with ``tfmot=True``; otherwise each is refused with one line.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: an unreadable file, a SavedModel or tfmot model where it does not apply, a
            tf_keras model Keras 3 cannot rebuild.
        TypeError: neither a model nor a path.

    Example:
        >>> model = load_keras_model("model.keras")   # doctest: +SKIP
    """

    model = load_model(model)
    if isinstance(model, SavedModelPath):
        if saved_model:
            return model
        raise ValueError(f"{where} {str(model)!r} is a SavedModel directory, which tfq cannot rewrite or run as Keras; "
                         f"pass the .keras file (tfq.convert, tfq.calibrate and tfq.layer_errors take the SavedModel "
                         f"itself and quantize it below Keras).")
    if is_tf_keras_model(model):
        if tfmot and is_tfmot_qat_model(model):
            return model
        return scope_safe_model(to_keras3(model, keep_whole=True))
    return scope_safe_model(model)


def scope_safe_model(model):
    """``model``, or if a name in it is one TensorFlow refuses as a scope (``"my model (v2)"``: Keras
    cannot run such a model in a ``tf.function``, so neither ``predict`` nor the converter can), a copy
    whose such names are made valid (other characters replaced by ``_``, unique), with the same weights.

    Example:
        >>> scope_safe_model(keras.Model(inputs, outputs, name="my model (v2)")).name   # doctest: +SKIP
        'my_model__v2_'
    """
    if not isinstance(model, keras.Model) or not _has_graph(model):
        return model
    originals = [model, *_walk_all_operations(model)]
    if all(_scope_name(op.name) == op.name for op in originals):
        return model
    taken = {op.name for op in originals}
    renamed: dict[str, str] = {}

    def label(name):
        if _scope_name(name) == name:
            return name
        if name not in renamed:
            base = new = _scope_name(name)
            index = 0
            while new in taken:
                index += 1
                new = f"{base}_{index}"
            taken.add(new)
            renamed[name] = new
        return renamed[name]

    def copy_model(m):
        new = keras.models.clone_model(m, clone_function=clone)
        if new.name != label(m.name):
            new = keras.Model(new.inputs, new.outputs, name=label(m.name))
        return new

    def clone(layer):
        if isinstance(layer, keras.Model) and _has_graph(layer):
            return copy_model(layer)
        return copy_layer(layer, dict(layer.get_config(), name=label(layer.name)))

    new = copy_model(model)
    copies = [new, *_walk_all_operations(new)]
    sources = [op for op in originals if not isinstance(op, keras.Model)]
    targets = [op for op in copies if not isinstance(op, keras.Model)]
    for src, dst in zip(sources, targets):
        if isinstance(src, keras.layers.Layer) and src.weights:
            dst.set_weights(src.get_weights())
    return new


# ---------------------------------------------------------------------------------------------
# to_keras3: config translation
# ---------------------------------------------------------------------------------------------


def _model_kind(obj) -> str | None:
    """``"Functional"`` or ``"Sequential"`` for a tf_keras model, None for a subclassed one."""
    names = _class_names(obj)
    if _SEQUENTIAL in names:
        return _SEQUENTIAL
    if _FUNCTIONAL in names:
        return _FUNCTIONAL
    return None


def _unsupported(name, class_name, why) -> ValueError:
    return ValueError(f"cannot convert tf_keras layer {name!r} ({class_name}) to Keras 3: {why}; {_REBUILD}.")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


def _policy_name(dtype):
    """Keras 2 dtype policies (``{"class_name": "Policy", ...}``) become their name ("mixed_float16")."""
    if isinstance(dtype, dict):
        return dtype.get("config", {}).get("name", "float32")
    return dtype


def _fix_batch_norm(name, config):
    axis = config.get("axis", -1)
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            raise _unsupported(name, "BatchNormalization", f"axis={list(axis)} (Keras 3 takes a single axis)")
        config["axis"] = int(axis[0])
    for key in ("renorm", "virtual_batch_size", "adjustment"):
        if config.get(key):
            raise _unsupported(name, "BatchNormalization", f"{key}={config[key]!r} has no Keras 3 equivalent")
    for key in ("fused", "renorm", "renorm_clipping", "renorm_momentum", "virtual_batch_size", "adjustment"):
        config.pop(key, None)


def _fix_groups(name, config, class_name):
    if config.get("groups", 1) != 1:
        raise _unsupported(name, class_name, f"groups={config['groups']} is not a {class_name} argument in Keras 3")
    config.pop("groups", None)


def _fix_leaky_relu(name, config):
    if "alpha" in config:
        config["negative_slope"] = config.pop("alpha")


def _fix_separable(name, config, class_name):
    _fix_groups(name, config, class_name)
    for key in ("kernel_initializer", "kernel_regularizer", "kernel_constraint"):  # unused by Keras 2 either
        config.pop(key, None)


def _fix_rnn(name, config, class_name):
    if config.pop("time_major", False):
        raise _unsupported(name, class_name, "time_major=True has no Keras 3 equivalent")


def _fix_wrapper(name, config, class_name):
    """Bidirectional / TimeDistributed: the wrapped layers' configs get the same fixes."""
    for key in ("layer", "backward_layer"):
        inner = config.get(key)
        if isinstance(inner, dict) and "class_name" in inner:
            inner = dict(inner, config=dict(inner.get("config") or {}))
            _fix_config(inner["config"].get("name", name), inner["class_name"], inner["config"])
            config[key] = inner


# Keras 2 → Keras 3 argument changes of built-in layers: {class name: fix(name, config, class name)}.
_CONFIG_FIXES = {
    "BatchNormalization": lambda n, c, _: _fix_batch_norm(n, c),
    "LeakyReLU": lambda n, c, _: _fix_leaky_relu(n, c),
    **{cls: _fix_groups for cls in ("DepthwiseConv1D", "DepthwiseConv2D", "Conv1DTranspose", "Conv2DTranspose",
                                    "Conv3DTranspose")},
    **{cls: _fix_separable for cls in ("SeparableConv1D", "SeparableConv2D")},
    **{cls: _fix_rnn for cls in ("LSTM", "GRU", "SimpleRNN", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D")},
    **{cls: _fix_wrapper for cls in ("Bidirectional", "TimeDistributed")},
}


def _fix_config(name, class_name, config):
    """Applies the Keras 2 → Keras 3 fixes to a (non-input) layer config, in place."""
    config.pop("batch_input_shape", None)  # Keras 2 kept the model's input shape on its first layer
    config["dtype"] = _policy_name(config.get("dtype"))
    if class_name in _CONFIG_FIXES:
        _CONFIG_FIXES[class_name](name, config, class_name)


def _input_layer_config(name, config):
    config = dict(config)
    if "batch_input_shape" in config:
        config["batch_shape"] = config.pop("batch_input_shape")
    if config.get("ragged"):
        raise _unsupported(name, "InputLayer", "ragged inputs are not supported by Keras 3")
    config.pop("ragged", None)
    config["dtype"] = _policy_name(config.get("dtype"))
    return config


def _layer_entry(entry: dict, custom_objects) -> tuple[dict, int]:
    """Keras 3 form of one layer entry of a model config; also the node-index shift it needs.

    The shift is 1 for a nested model that tf_keras counts with a built-in first node (a model
    that starts with an InputLayer), 0 otherwise; Keras 3 never counts that node.
    """
    class_name = entry["class_name"]
    config = dict(entry.get("config") or {})
    name = config.get("name", entry.get("name"))
    out = {k: v for k, v in entry.items() if k not in ("config",)}
    if class_name in _MODEL_CLASSES:
        kind = _SEQUENTIAL if class_name == _SEQUENTIAL else _FUNCTIONAL
        layers = config.get("layers") or []
        shift = 1 if layers and layers[0].get("class_name") == "InputLayer" else 0
        out.update(module="keras", class_name="Sequential" if kind == _SEQUENTIAL else "Model",
                   registered_name=None, config=_model_config(config, kind, custom_objects))
        out.pop("build_config", None)
        return out, shift
    if class_name in TFMOT_QAT_CLASSES:
        raise ValueError(f"layer {name!r} ({class_name}) is a tfmot quantization wrapper: convert the tfmot QAT "
                         f"model with tfq.interop.convert_tfmot_model(model), or pass tfq the float model.")
    custom = custom_objects or {}
    kept = custom.get(_KEPT_WHOLE)
    if class_name in _CODE_LAYERS and kept is None:
        raise _unsupported(name, class_name, f"it holds {_CODE_LAYERS[class_name]}")
    if kept is not None and (class_name in _CODE_LAYERS or not _rebuildable(entry, class_name, custom)):
        # Kept whole: the tf_keras layer itself runs inside the Keras 3 model (both are TensorFlow ops).
        out.update(module=None, class_name=_KEPT_WHOLE, registered_name=_KEPT_WHOLE,
                   config={"name": name, "trainable": config.get("trainable", True)})
        return out, 0
    # Built-in layers are serialized with module "keras.layers" and no registered name.
    registered = entry.get("registered_name")
    builtin = not registered and str(entry.get("module") or "keras").startswith("keras")
    key = next((k for k in (registered, class_name) if k and k in custom), None)
    if key is None and not (builtin and (class_name == "InputLayer" or hasattr(keras.layers, class_name))):
        raise _unsupported(name, class_name, f"it is a custom or removed layer, not a Keras 3 built-in (or pass "
                           f"a Keras 3 implementation: to_keras3(model, custom_objects={{{class_name!r}: ...}}))")
    if class_name == "InputLayer":
        config = _input_layer_config(name, config)
    elif key is None:
        _fix_config(name, class_name, config)
    out["config"] = config
    if key is not None:  # Keras 3 looks custom classes up by registered name
        out.update(module=None, registered_name=key)
    if class_name != "InputLayer":
        _check_layer(out, name, class_name, custom_objects)
    return out, 0


def _rebuildable(entry, class_name, custom) -> bool:
    """Whether Keras 3 has the layer's class (a built-in, or given in custom_objects)."""
    registered = entry.get("registered_name")
    builtin = not registered and str(entry.get("module") or "keras").startswith("keras")
    if any(k and k in custom for k in (registered, class_name)):
        return True
    return builtin and (class_name == "InputLayer" or hasattr(keras.layers, class_name))


_KEPT_WHOLE = "tfq>TFKerasLayer"


def _kept_whole_class(layers: dict):
    """A Keras 3 layer class that calls, as is, the tf_keras layer of its name in ``layers``."""

    class TFKerasLayer(keras.layers.Layer):
        """A tf_keras layer Keras 3 cannot rebuild (a custom layer, a Lambda, a raw TF op), run as it is: tfq
        keeps it whole (its outputs quantized, the converter calibrating inside).

        Its weights that the tf_keras layer reads as attributes (``self.alpha`` in its ``call``) become this
        layer's Keras 3 weights (trainable as they were), and its copy of the tf_keras layer reads those
        instead: QAT trains them, and saving saves them. Weights held otherwise (in lists, nested layers)
        stay the tf_keras copy's, not trained."""

        def __init__(self, name=None, **kwargs):
            super().__init__(name=name, **kwargs)
            original = layers[name]  # the caller's layer: never changed, each TFKerasLayer runs its own copy
            self.tf_keras_layer = _built_tf_keras_copy(original)
            self.mirrored = _mirror_weights(self, self.tf_keras_layer) if self.tf_keras_layer is not original else 0

        def call(self, *args, **kwargs):
            kwargs.pop("training", None)
            return self.tf_keras_layer(*args, **kwargs)

    return TFKerasLayer


def _mirror_weights(owner, tf_layer) -> int:
    """Gives ``owner`` (a Keras 3 layer) a weight for each tf.Variable that ``tf_layer`` (tfq's copy of a
    tf_keras layer) holds as a direct attribute, with its value and trainability, and points that attribute
    at the Keras 3 weight, so that the tf_keras code computes with it and gradients reach it. Returns how
    many weights were mirrored. Only tfq's copy is changed (the caller's layer is never passed here)."""
    import tensorflow as tf

    count = 0
    for attribute, value in list(vars(tf_layer).items()):
        if not isinstance(value, tf.Variable) or attribute.startswith("_") or getattr(tf_layer, attribute) is not value:
            continue
        weight = owner.add_weight(shape=tuple(value.shape), dtype=value.dtype.name, trainable=value.trainable,
                                  initializer=keras.initializers.Constant(value.numpy()), name=attribute)
        object.__setattr__(tf_layer, attribute, weight)  # no tf_keras tracking: tfq's copy computes with it
        count += 1
    return count


def _built_tf_keras_copy(layer):
    """A copy of a tf_keras layer with its weights (the caller's stays untouched); the layer itself if it
    cannot be copied (it then only runs inference inside tfq's model, which changes nothing in it)."""
    import tensorflow as tf

    try:
        shapes = layer.input_shape
        new = type(layer).from_config(layer.get_config())
        zeros = tf.nest.map_structure(lambda s: tf.zeros([1, *s[1:]]), shapes,
                                      check_types=False) if not isinstance(shapes, tuple) else tf.zeros([1, *shapes[1:]])
        new(zeros)
        new.set_weights(layer.get_weights())
        return new
    except Exception:  # noqa: BLE001 - no config round trip, several input shapes …: run the layer itself
        return layer


def _check_layer(entry, name, class_name, custom_objects):
    """Instantiates the layer alone (unbuilt): a failure names the layer rather than the model."""
    probe = {k: v for k, v in entry.items() if k in ("module", "class_name", "config", "registered_name")}
    try:
        keras.layers.deserialize(probe, custom_objects=custom_objects)
    except Exception as err:  # Keras raises TypeError/ValueError/... for configs it cannot take
        raise _unsupported(name, class_name, f"Keras 3 does not accept its config ({_first_line(err)})") from None


def _config_entries(config: dict):
    """Every layer entry of a (Keras 3) model config, nested models' included."""
    for entry in config.get("layers") or []:
        yield entry
        if entry.get("class_name") in ("Model", "Sequential", "Functional"):
            yield from _config_entries(entry.get("config") or {})


def _is_ref(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) == 3 and isinstance(x[0], str) and isinstance(x[1], int)


def _map_refs(obj, fn):
    """Applies ``fn`` to every ``[layer_name, node_index, tensor_index]`` in a nested structure."""
    if _is_ref(obj):
        return fn(list(obj))
    if isinstance(obj, dict):
        return {k: _map_refs(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_map_refs(v, fn) for v in obj]
    return obj


def _inbound_nodes(nodes, shifts, layer_name, class_name):
    """Keras 2 inbound nodes (``[[name, node, tensor, kwargs], ...]`` per call), shifts applied."""
    out = []
    for node in nodes:
        if isinstance(node, dict):  # already Keras 3 format
            raise _unsupported(layer_name, class_name, "unexpected Keras 3 node format in a tf_keras config")
        if node and isinstance(node[0], str):  # an op layer's (TFOpLambda) one-tensor call: [name, node, tensor, kwargs]
            node = [node]
        call = []
        for item in node:
            inbound, node_index, tensor_index = item[0], item[1], item[2]
            kwargs = item[3] if len(item) > 3 else {}
            for key, value in kwargs.items():
                if not (value is None or isinstance(value, (bool, int, float, str))):
                    raise _unsupported(layer_name, class_name,
                                       f"it is called with a tensor or structure as keyword argument {key!r}")
            call.append([inbound, node_index - shifts.get(inbound, 0), tensor_index, kwargs])
        out.append(call)
    return out


def _model_config(config: dict, kind: str, custom_objects) -> dict:
    """Keras 3 config of a tf_keras Functional or Sequential model config."""
    config = copy.deepcopy(config)
    layers = config.get("layers") or []
    if kind == _SEQUENTIAL:
        converted = []
        first = layers[0] if layers else None
        shape = (first or {}).get("config", {}).get("batch_input_shape")
        if shape and first["class_name"] != "InputLayer":  # Keras 2's Dense(..., input_shape=...) as first layer
            cfg = first["config"]
            converted.append({"module": "keras.layers", "class_name": "InputLayer", "registered_name": None,
                              "config": {"batch_shape": shape, "dtype": _policy_name(cfg.get("dtype")),
                                         "name": f"{cfg.get('name', 'layer')}_input"}})
        for entry in layers:
            converted.append(_layer_entry(entry, custom_objects)[0])
        out = {"name": config.get("name"), "layers": converted}
        if config.get("build_input_shape") is not None:
            out["build_input_shape"] = config["build_input_shape"]
        return out
    entries, shifts, k3_classes = [], {}, {}
    for entry in layers:
        new, shift = _layer_entry(entry, custom_objects)
        layer_name = entry.get("name", new.get("config", {}).get("name"))
        shifts[layer_name] = shift
        k3_classes[layer_name] = new["class_name"]
        entries.append(new)
    for new in entries:
        nodes = new.get("inbound_nodes") or []
        new["inbound_nodes"] = _inbound_nodes(nodes, shifts, new["name"], new["class_name"])

    def io_refs(refs):
        # tf_keras always lists the inputs/outputs; Keras 3 returns a list only when given one.
        refs = _map_refs(refs, io_ref)
        return refs[0] if isinstance(refs, list) and len(refs) == 1 and _is_ref(refs[0]) else refs

    def io_ref(ref):
        # Keras 3 counts a nested Functional ("Model") model's first call as node 1 here.
        name, node_index, tensor_index = ref
        extra = 1 if k3_classes.get(name) == "Model" else 0
        return [name, node_index - shifts.get(name, 0) + extra, tensor_index]

    return {"name": config.get("name"), "trainable": config.get("trainable", True), "layers": entries,
            "input_layers": io_refs(config["input_layers"]),
            "output_layers": io_refs(config["output_layers"])}


# ---------------------------------------------------------------------------------------------
# to_keras3: weights
# ---------------------------------------------------------------------------------------------


def _copy_weights(src, dst, where: str):
    src_layers = {layer.name: layer for layer in src.layers}
    for layer in dst.layers:
        path = f"{where}/{layer.name}" if where else layer.name
        original = src_layers.get(layer.name)
        if original is None:
            if layer.weights:
                raise ValueError(f"layer {path!r} of the Keras 3 model has no tf_keras counterpart to copy weights "
                                 f"from; {_REBUILD}.")
            continue
        if hasattr(layer, "layers") and hasattr(original, "layers"):
            _copy_weights(original, layer, path)
            continue
        if hasattr(layer, "tf_keras_layer"):  # kept whole: it holds the tf_keras weights itself
            continue
        values = original.get_weights()
        targets = layer.weights
        if len(values) != len(targets):
            raise ValueError(f"layer {path!r} has {len(values)} weights in tf_keras but {len(targets)} in Keras 3; "
                             f"{_REBUILD}.")
        for value, target in zip(values, targets):
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"layer {path!r}: weight {target.name!r} has shape {tuple(value.shape)} in tf_keras "
                                 f"but {tuple(target.shape)} in Keras 3; {_REBUILD}.")
        if values:
            layer.set_weights(values)


_TRACE_RTOL = 1e-4


def _functional_tf_keras(model):
    """A tf_keras Functional model computing what the subclassed tf_keras ``model`` computes, on inputs of
    the shapes it was built with: ``Model(inputs, model.call(inputs))``, whose nodes are its layers (and
    its TF ops, as tf_keras's op layers), kept when it matches ``model`` on probe data (relative
    difference below ``_TRACE_RTOL``); else ``Model(inputs, model(inputs))``, the model one layer kept
    whole. Its layers are the caller's (``to_keras3`` copies their weights into Keras 3 layers).

    Raises:
        ValueError: the model was never called (its input shapes are unknown).
    """
    import sys

    import numpy as np

    lib = sys.modules[next(c.__module__ for c in type(model).__mro__ if c.__module__.startswith(("tf_keras", "keras")))
                      .split(".")[0]]
    shapes = (model.get_build_config() or {}).get("input_shape") if model.built else None
    if shapes is None:
        raise ValueError(
            f"model {model.name!r} ({type(model).__name__}) is a subclassed tf_keras model that was never called, so "
            f"its input shapes are unknown: call it once on a batch (model(x)), then pass it.")
    single = not shapes or not isinstance(shapes[0], (list, tuple, dict))
    inputs = lib.Input(batch_shape=(None, *tuple(shapes)[1:])) if single else \
        [lib.Input(batch_shape=(None, *tuple(v)[1:])) for v in shapes]
    rng = np.random.default_rng(0)
    probe = [rng.standard_normal((2, *t.shape[1:])).astype("float32") for t in (inputs if not single else [inputs])]
    feed = probe[0] if single else probe
    try:
        traced = lib.Model(inputs, model.call(inputs), name=model.name)
        want = [np.asarray(o) for o in _flat(model(feed, training=False))]
        got = [np.asarray(o) for o in _flat(traced(feed, training=False))]
    except Exception:  # noqa: BLE001 - a call tf_keras cannot trace symbolically (tf.cond …): kept whole
        traced, want, got = None, [], []
    if traced is not None and len(want) == len(got) and all(
            w.shape == g.shape and np.allclose(g, w, rtol=_TRACE_RTOL, atol=_TRACE_RTOL * max(float(np.abs(w).max()), 1.0))
            for w, g in zip(want, got)):
        return traced
    return lib.Model(inputs, model(inputs), name=model.name)


def _flat(outputs) -> list:
    if isinstance(outputs, dict):
        return [outputs[k] for k in sorted(outputs)]
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def to_keras3(model, custom_objects: dict | None = None, keep_whole: bool = False) -> keras.Model:
    """Returns an equivalent Keras 3 model of a tf_keras (Keras 2) Functional or Sequential model.

    The tf_keras model's config is translated (Keras 2 arguments such as ``batch_input_shape``,
    list-valued BatchNormalization ``axis``, dtype policies, node indices of nested models) and
    deserialized by Keras 3, then every layer's weights are copied by layer name, with shape
    checks. The result has the same layer names and computes the same function. The caller's
    model is not changed; a Keras 3 model is returned as is.

    Works whether or not ``TF_USE_LEGACY_KERAS`` is set: only the model's own methods are used.

    Args:
        model: a tf_keras ``Sequential`` or Functional model (nested models allowed).
        custom_objects: Keras 3 implementations of custom layers, by class name.
        keep_whole: instead of refusing a layer Keras 3 cannot rebuild (a custom layer without an
            implementation in ``custom_objects``, a ``Lambda``, a raw TF op), run the tf_keras layer
            itself inside the Keras 3 model (a copy, with its weights, which stay tf_keras weights:
            QAT does not train them). tfq's entry points pass True: such a layer is kept whole, its
            outputs quantized and its inside calibrated by the TFLite converter.

    Returns:
        A new ``keras.Model`` (Keras 3).

    Raises:
        TypeError: ``model`` is not a Keras model.
        ValueError: a layer cannot be rebuilt in Keras 3 (``Lambda``, raw TF ops such as
            ``tf.math.add`` on Keras tensors, custom layers, tfmot wrappers) or the model is
            subclassed; the message names the layer.

    Example:
        >>> import tf_keras
        >>> k2 = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(2)])
        >>> k3 = to_keras3(k2)
        >>> isinstance(k3, keras.Model)
        True
    """

    if is_keras3_model(model):
        return model
    if not is_tf_keras_model(model):
        raise TypeError(f"to_keras3 expects a tf_keras model. Received: {type(model).__name__}")
    if is_tfmot_qat_model(model):
        raise ValueError(f"model {model.name!r} is a tfmot QAT model (its layers are tfmot QuantizeWrappers): "
                         f"convert it with tfq.interop.convert_tfmot_model(model), or pass tfq the float model "
                         f"from before quantize_model.")
    kind = _model_kind(model)
    subclassed = (f"model {model.name!r} is a subclassed tf_keras model ({type(model).__name__}), which has no "
                  f"config to rebuild from; {_REBUILD} (Functional or Sequential).")
    if kind is None and keep_whole:
        model = _functional_tf_keras(model)  # its call traced into a graph of its layers, or the model whole
        kind = _model_kind(model)
    if kind is None:
        raise ValueError(subclassed)
    try:
        config = model.get_config()
    except NotImplementedError:  # a Functional subclass with its own __init__ and no get_config
        raise ValueError(subclassed) from None
    kept: dict = {}
    if keep_whole:
        custom_objects = dict(custom_objects or {})
        custom_objects[_KEPT_WHOLE] = _kept_whole_class(kept)
    k3_config = _model_config(config, kind, custom_objects)
    if keep_whole:
        names = {e.get("config", {}).get("name") for e in _config_entries(k3_config) if e.get("class_name") == _KEPT_WHOLE}
        for layer in _sublayers(model):
            if layer.name in names and layer.name not in kept:
                kept[layer.name] = layer
    cls = keras.Sequential if kind == _SEQUENTIAL else keras.Model
    try:
        new = cls.from_config(k3_config, custom_objects=custom_objects)
    except Exception as err:  # Keras raises many types for a graph it cannot rebuild
        raise ValueError(f"cannot rebuild tf_keras model {model.name!r} in Keras 3 ({_first_line(err)}); "
                         f"{_REBUILD}.") from None
    _copy_weights(model, new, "")
    kept_weights = sum(len(layer.weights) for layer in kept.values()) - sum(
        getattr(layer, "mirrored", 0) for layer in new.layers)
    if len(model.weights) != len(new.weights) + kept_weights:
        raise ValueError(f"model {model.name!r} has {len(model.weights)} weights in tf_keras but {len(new.weights)} "
                         f"after conversion to Keras 3; {_REBUILD}.")
    return new


# ---------------------------------------------------------------------------------------------
# tfmot QAT (and plain tf_keras) models → TFLite
# ---------------------------------------------------------------------------------------------


def _input_signature(model):
    """``tf.TensorSpec``s in the structure of ``model.input`` (batch dimension kept as the model has it)."""
    import tensorflow as tf

    def spec(t):
        name = re.sub(r"[^A-Za-z0-9_.\-/]", "_", str(getattr(t, "name", "input") or "input").split(":")[0])
        return tf.TensorSpec(tuple(t.shape), t.dtype, name=name)

    return tf.nest.map_structure(spec, model.input)


def convert_tfmot_model(model, mode: str = "int8", io_dtype: str = "float32") -> bytes:
    """Converts a tfmot QAT model (or a plain tf_keras model) to TFLite with TensorFlow's converter.

    A tfmot QAT model has its own fake-quant ops; with ``mode="int8"`` the converter
    (``optimizations=[Optimize.DEFAULT]``) turns their ranges into the tensors' scales, without
    calibration. The model is traced as ``model(x, training=False)`` by ``tf.function`` and given
    to ``TFLiteConverter.from_concrete_functions``, which works whether ``tf.keras`` is Keras 3 or
    tf_keras (``TF_USE_LEGACY_KERAS=1``) in this process. Plain tf_keras models convert the same
    way in ``"float"``, ``"dynamic"`` or ``"fp16"`` mode (for INT8 use :func:`tfq.convert`, which
    calibrates a Keras 3 copy made by :func:`to_keras3`).

    Args:
        model: a tf_keras model quantized by ``tfmot.quantization.keras.quantize_model`` (or
            ``quantize_apply``), or a plain tf_keras model.
        mode: ``"int8"`` for a tfmot QAT model; ``"float"``, ``"dynamic"`` or ``"fp16"`` for a plain one.
        io_dtype: model input/output type in int8 mode: ``"float32"`` (quantize/dequantize inside
            the model), ``"int8"`` or ``"uint8"``. Other modes take ``"float32"`` only.

    Returns:
        The ``.tflite`` flatbuffer bytes. The model is not changed.

    Raises:
        TypeError: ``model`` is not a tf_keras model.
        ValueError: a mode or io_dtype that does not fit the model.
        tfq.ConversionError: the converter refused an op (the message names it).

    Example:
        >>> qat = tfmot.quantization.keras.quantize_model(tf_keras_model)   # doctest: +SKIP
        >>> tflite = convert_tfmot_model(qat, "int8", io_dtype="int8")        # doctest: +SKIP
    """
    import tensorflow as tf

    if not is_tf_keras_model(model):
        raise TypeError(f"convert_tfmot_model expects a tf_keras (tfmot) model; for Keras 3 models use "
                        f"tfq.convert. Received: {type(model).__name__}")
    qat = is_tfmot_qat_model(model)
    # A tfmot QAT model carries its ranges: int8 only. A plain model: the modes the converter makes alone.
    modes = ("int8",) if qat else tuple(m for m in export_mode_names()
                                        if not get_export_mode(m).needs_data and not get_export_mode(m).tfq_ranges)
    if mode not in modes:
        kind = "a tfmot QAT model" if qat else "a tf_keras model without tfmot quantization"
        hint = ("its fake-quant ops make it an INT8 model" if qat else
                f"for INT8 use tfq.convert(model, {mode!r}, representative_data), which calibrates it")
        raise ValueError(f"mode must be one of {modes} for {kind} ({hint}). Received: mode={mode!r}")
    allowed_io = get_export_mode(mode).io_dtypes
    if io_dtype not in allowed_io:
        raise ValueError(f"io_dtype must be one of {allowed_io} in mode {mode!r}. Received: io_dtype={io_dtype!r}")
    function = tf.function(lambda inputs: model(inputs, training=False))
    concrete = function.get_concrete_function(_input_signature(model))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], model)
    get_export_mode(mode).configure(converter, io_dtype, None)  # the mode's driver; ranges from tfmot's ops
    return run_converter(converter, mode)
