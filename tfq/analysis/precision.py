"""Per-layer precision under a budget: which layers get 4-bit weights, which 8, which stay float.

:func:`mixed_precision` takes a float Keras model and returns the smallest ``.tflite`` whose
accuracy (measured through LiteRT's interpreter) stays within ``max_drop`` of float, or the most
accurate one that fits a size budget (bytes, or a fraction of the uniform INT8 file) and/or a
latency budget (ms per batch-1 invocation, measured through the interpreter).

Per-layer choices (each layer with a kernel LiteRT can run at 4 bits: Dense, Conv2D,
DepthwiseConv2D):

* ``"int4"``: 4-bit weights stored INT4 (:mod:`tfq.export.int4`), int8 activations;
* ``"int8"``: 8-bit weights, int8 activations;
* ``"float"``: the layer kept float (:func:`tfq.convert`'s ``float_layers``);
* ``"int16"`` (not in the default choices, see below): int16 activations, int8 weights (a16w8).

With ``"int16"`` among the choices every file of the search is built below Keras, since tfq's Keras conversion
writes one activation width per model: the model's float ``.tflite`` (``tfq.convert(model, "float")``) is
calibrated with tfq's calibration in LiteRT (:func:`tfq.ptq.tflite_calibration.calibrate_tflite`, once) and
quantized by LiteRT's quantizer (:func:`tfq.export.tflite_frontend.quantize_tflite`) with the int16 layers' ops
at 16-bit activations (it writes QUANTIZE int8→int16, the op with int16 activations, int8 weights and an int64
bias, QUANTIZE back) and the float layers' ops kept float; the 4-bit layers' float weights are first replaced
by their values on tfq's symmetric per-channel 4-bit grid (nearest), so the quantizer's 8-bit integers are
``round(q · 127 / max|q|)`` and :func:`tfq.tflite.int4.rewrite_int4_weights` stores exactly tfq's nearest
integers and scales as INT4. AdaRound/GPTQ integers are not carried on this route (``weight_rounding`` other
than ``"nearest"`` is refused with ``"int16"``), nor the Keras route's layer-by-layer checks; ``result.recipe``
is the Keras recipe with the int16 layers at int8 (``result.settings["int16_layers"]`` names them). A layer's
op is found by the name the converter gives its weight (``<model>_1/<layer>_1/…``, see :func:`layer_ops`),
and each choice's bytes are measured in the file (one file per layer and choice, as the ``"sqnr"``
sensitivity converts anyway), so the path sees an int16 layer's real cost. ``"int16"`` needs
``sensitivity="sqnr"`` (the Hessian estimate models weight rounding only).

Is ``"int16"`` worth a default place? Measured (``scripts/int16_mixed.py``, test accuracy through LiteRT, 359
samples): on both example models INT8 activations already keep the float
accuracy (digits CNN 98.33 %, MobileNet-style 96.10 %, uniform INT8 on this route), so int16 activations
have nothing to win back; the loss is the 4-bit weights'. With one layer changed and the rest INT8, int16
costs more bytes than float on small layers (its QUANTIZE ops, int16 tensors and int64 bias outweigh the
kernel): the MobileNet-style stem, the most sensitive layer at 4 bits, int16 41,520 B 95.82 % against float
41,296 B 96.10 %; it pays only on large kernels (digits CNN ``fc1``: int16 163,400 B, float 552,992 B, both
98.33 %, as INT8's 162,536 B). At the smallest MobileNet-style point within 1 pt (32,384 B: 8 layers INT4,
stem and dw0 INT8, 95.82 %), the stem at int16 gives 32,736 B and float 32,512 B, both 95.82 %; dw0 at int16
33,104 B 95.82 %, float 32,984 B 95.54 %. ``mixed_precision`` with ``"int16"`` added returns the same choices
as without on this route at ``max_drop`` 0, 0.005 and 0.01 (MobileNet-style 32,640 / 32,384 / 32,384 B;
digits CNN 87,000 B, every layer INT4): int16 is never chosen, so it is not a default choice. (The below-Keras
files are ~1.5 % larger than the Keras route's: MobileNet-style INT8 41,168 B against 40,624 B, W4A8 32,240 B
against 31,640 B; the search runs faster there, 2–9 s against 5–50 s on 2 shared cores.)

Sensitivity (how much a layer's accuracy suffers at fewer bits), two estimates:

* ``"hessian"`` (HAWQ-v2): ``Ω_l(b) = Tr(H_l) / n_l · ‖Q_b(W_l) − W_l‖²``, with ``Tr(H_l)`` the
  trace of the loss Hessian block of layer ``l``'s kernel by Hutchinson's estimator
  (``E[vᵀH_ll v]``, Rademacher ``v``, exact block Hessian-vector products by double
  backpropagation, all blocks from one forward pass per vector), the loss the KL divergence from the float model's own outputs on the
  calibration data (so no labels: its Hessian at the float weights is the Fisher information;
  mean squared error for outputs that are not probabilities), ``Q_b`` symmetric per-channel
  ``b``-bit rounding. No conversion; seconds on small models.
* ``"sqnr"``: measured in the file: one ``.tflite`` per layer with that layer at 4 bits (and one
  with it float), the rest INT8; the sensitivity is the increase of the output noise-to-signal
  power ``10^(−SQNR/10)`` over the uniform INT8 file, on the calibration data.

Which predicts the true per-layer accuracy drop better was measured (``scripts/budget_curve.py``,
Spearman rank correlation between each estimate and the test-set drop measured through LiteRT
with one layer at 4 bits, the rest INT8): MobileNet-style ρ = 0.68 (sqnr) against 0.63 (hessian) for the
accuracy drop, 0.89 for both against the cross-entropy increase; the digits CNN's layers all stay within
0.06 pt at 4 bits (0.77 against 0.26, nearly noise). ``"sqnr"`` is the default; the tables are in
``docs/benchmarks.md``.

Allocation: a multiple-choice knapsack solved by its Lagrangian relaxation. For each layer the
choices are points (bytes, Ω); on the lower convex hull of each layer's points, each move to
fewer bytes costs ``ΔΩ / Δbytes``; taking the moves in increasing order of that cost gives a
path from the largest model (everything float, or INT8) to the smallest (everything INT4) on
which every point is optimal for the (continuous) knapsack at its size. Along that path,
sizes fall and predicted damage rises monotonically, so the measured accuracy is searched by
bisection (a handful of conversions, each measured through LiteRT): an ILP would find the exact
optimum of the *predicted* damage per budget, but the prediction is only a ranking; the path's
nesting is what lets the measured accuracy pick the point.

Example:
    >>> result = tfq.mixed_precision(model, x_train[:256], x_test, y_test, max_drop=0.01)  # doctest: +SKIP
    >>> print(result.to_markdown())                                                      # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tfq.analysis.report import _encode, _Table, _table
from tfq.core.logs import logger, verbosity
from tfq.core.messages import check_bool
from tfq.core.recipes import Override, Recipe, TensorSpec

__all__ = ["ALL_CHOICES", "CHOICES", "DEFAULT_SENSITIVITY", "SENSITIVITIES", "MixedPrecisionResult", "allocation_path",
           "budget_curve", "hessian_traces", "layer_ops", "layer_sensitivities", "mixed_precision", "sensitivity_study"]

CHOICES = ("int4", "int8", "float")
"""Per-layer choices :func:`mixed_precision` searches by default."""
ALL_CHOICES = ("int4", "int8", "int16", "float")
"""Every per-layer choice :func:`mixed_precision` takes (``"int16"``: int16 activations, int8 weights, built below
Keras: see the module doc)."""
SENSITIVITIES = ("hessian", "sqnr")
DEFAULT_SENSITIVITY = "sqnr"
"""The default, measured (``scripts/budget_curve.py``, ``docs/benchmarks.md``): Spearman's ρ of each estimate
against the accuracy drop / cross-entropy increase measured through LiteRT with one layer at 4 bits (the rest
INT8), on 1,541 held-out digits: digits CNN (4 layers) hessian 0.26 / −0.80, sqnr 0.77 / −0.20 (every layer
within 0.06 pt: nearly noise); MobileNet-style (10 layers) hessian 0.63 / 0.89, sqnr 0.68 / 0.89. ``"sqnr"``
ranks as well or better everywhere; ``"hessian"`` needs no conversion."""

_WEIGHT_BITS = {"int4": 4, "int8": 8, "int16": 8, "float": 32}
_ACTIVATION_BITS = {"int4": 8, "int8": 8, "int16": 16, "float": 32}
_ORDER = ("float", "int16", "int8", "int4")  # bytes per layer strictly decrease along this order
_QMAX = {"int4": 7, "int8": 127}


# ------------------------------------------------------------------------------------------------ layers
def _candidate_layers(model) -> list:
    """The layers whose kernel LiteRT can store at 4 bits (Dense, Conv2D, DepthwiseConv2D), in graph order."""
    import keras

    from tfq.quantsim.rewrite import _walk_layers

    kinds = (keras.layers.Dense, keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
    out, seen = [], set()
    for layer in _walk_layers(model):
        if isinstance(layer, kinds) and getattr(layer, "kernel", None) is not None and layer.name not in seen:
            seen.add(layer.name)
            out.append(layer)
    return out


def _kernel_matrix(layer) -> np.ndarray:
    """The kernel as ``(fan-in, channels)``: one column per output channel (per input channel × multiplier
    for a depthwise kernel), the axis TFLite's per-channel scales run along."""
    kernel = np.asarray(layer.kernel.numpy(), np.float64)
    if _is_depthwise(layer):  # (kh, kw, channels, multiplier)
        return kernel.reshape(-1, kernel.shape[-2] * kernel.shape[-1])
    return kernel.reshape(-1, kernel.shape[-1])


def _is_depthwise(layer) -> bool:
    return type(layer).__name__ == "DepthwiseConv2D"


def _quantization_error(matrix: np.ndarray, qmax: int) -> float:
    """``‖Q(W) − W‖²`` for symmetric per-column rounding to ``[-qmax, qmax]``."""
    scale = np.abs(matrix).max(axis=0, keepdims=True) / qmax
    scale = np.where(scale > 0, scale, 1.0)
    return float(np.sum((np.clip(np.round(matrix / scale), -qmax, qmax) * scale - matrix) ** 2))


def _layer_bytes(layer, choice: str) -> int:
    """Bytes a layer's kernel (and bias) take in the file: INT4 packed two per byte plus a float scale per
    channel, INT8 one per byte plus scales, float 4 per weight; the bias int32 or float32 either way."""
    matrix_shape = _kernel_matrix(layer).shape
    n, channels = int(np.prod(matrix_shape)), int(matrix_shape[1])
    bias = getattr(layer, "bias", None)
    bias_bytes = 4 * int(np.prod(bias.shape)) if bias is not None else 0
    if choice == "float":
        return 4 * n + bias_bytes
    if choice == "int16":  # int8 weights, the bias int64 (ai-edge-quantizer's a16w8)
        return n + 8 * channels + 2 * max(bias_bytes, 4 * channels)
    return (n + 1) // 2 * (choice == "int4") + n * (choice == "int8") + 8 * channels + bias_bytes


# ------------------------------------------------------------------------------------------------ sensitivity
def _loss_fn(float_outputs: list[np.ndarray]):
    """KL divergence from the float outputs when they are probabilities, else half the mean squared error."""
    import tensorflow as tf

    def is_prob(y):
        return y.ndim >= 2 and y.shape[-1] > 1 and y.min() >= 0 and np.allclose(y.sum(-1), 1.0, atol=1e-3)

    targets = [tf.constant(y, tf.float32) for y in float_outputs]
    probs = [is_prob(y) for y in float_outputs]

    def loss(outputs):
        total = 0.0
        for out, target, prob in zip(outputs, targets, probs):
            if prob:
                p = tf.clip_by_value(out, 1e-12, 1.0)
                total += tf.reduce_mean(tf.reduce_sum(target * (tf.math.log(tf.clip_by_value(target, 1e-12, 1.0))
                                                                - tf.math.log(p)), axis=-1))
            else:
                total += 0.5 * tf.reduce_mean(tf.square(out - target))
        return total

    return loss


def _as_list(y) -> list:
    if isinstance(y, dict):
        return [y[k] for k in sorted(y)]
    return list(y) if isinstance(y, (list, tuple)) else [y]


def hessian_traces(model, x, layers, samples: int = 16, seed: int = 0) -> dict[str, float]:
    """Hutchinson estimates of ``Tr(H_l)`` of the loss (KL to the float outputs) w.r.t. each layer's kernel.

    Per sample, one Rademacher vector ``v_l`` per kernel and the exact block product ``H_ll v_l`` (the gradient of
    ``g_l · v_l`` w.r.t. ``W_l``, one persistent tape over one forward pass), so ``v_lᵀ H_ll v_l`` is an unbiased
    estimate of the block's trace with no cross-layer terms (non-negative where the block is positive
    semi-definite, as the Fisher information is). ``samples`` vectors per layer.
    """
    import tensorflow as tf

    float_outputs = [np.asarray(y) for y in _as_list(model(x, training=False))]
    loss_fn = _loss_fn(float_outputs)
    kernels = [layer.kernel.value if hasattr(layer.kernel, "value") else layer.kernel for layer in layers]
    rng = np.random.default_rng(seed)
    xs = tf.constant(x) if not isinstance(x, (list, dict)) else x
    traces = np.zeros(len(layers))
    for _ in range(samples):
        vs = [tf.constant(rng.integers(0, 2, size=tuple(k.shape)) * 2.0 - 1.0, k.dtype) for k in kernels]
        with tf.GradientTape(persistent=True) as outer:
            outer.watch(kernels)  # frozen (non-trainable) kernels too
            with tf.GradientTape() as inner:
                inner.watch(kernels)
                loss = loss_fn(_as_list(model(xs, training=False)))
            grads = inner.gradient(loss, kernels)
            dots = [tf.reduce_sum(g * v) for g, v in zip(grads, vs)]
        for i, (kernel, v, dot) in enumerate(zip(kernels, vs, dots)):
            hv = outer.gradient(dot, kernel)
            traces[i] += float(tf.reduce_sum(v * hv)) if hv is not None else 0.0
        del outer
    return {layer.name: float(t / samples) for layer, t in zip(layers, traces)}


def _output_noise(content: bytes, x, reference: list[np.ndarray], num_threads) -> float:
    """Noise-to-signal power of a ``.tflite``'s outputs against the float outputs (``10^(−SQNR/10)``)."""
    from tfq.tflite.interpreter import TFLiteModel

    out = _as_list(TFLiteModel(content, num_threads=num_threads).predict(x, batch_size=256))
    noise = sum(float(np.sum((np.asarray(o, np.float64) - r) ** 2)) for o, r in zip(out, reference))
    signal = sum(float(np.sum(r ** 2)) for r in reference)
    return noise / signal if signal > 0 else noise


@dataclasses.dataclass
class _Search:
    """What every step shares: the model, its data and the cached conversions."""

    model: object
    rep: object
    x_cal: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray
    layers: list
    metric_name: str
    metric: object
    higher_better: bool
    weight_rounding: str
    num_threads: int | None
    verbose: bool
    calibration: object = None
    contents: dict = dataclasses.field(default_factory=dict)
    measured: dict = dataclasses.field(default_factory=dict)
    below_keras: _BelowKeras | None = None
    layer_bytes: dict = dataclasses.field(default_factory=dict)

    def recipe(self, assignment: dict[str, str]) -> Recipe:
        return _recipe_for({n: "int8" if c == "int16" else c for n, c in assignment.items()}, self.weight_rounding)

    def convert(self, assignment: dict[str, str]) -> bytes:
        from tfq.export.convert import convert

        key = tuple(sorted(assignment.items()))
        if key not in self.contents and self.below_keras is not None:
            self.contents[key] = self.below_keras.convert(assignment)
        if key not in self.contents:
            if self.calibration is None:
                from tfq.ptq.calibration import calibrate

                self.calibration = calibrate(self.model, self.rep, recipe=Recipe(mode="int8"))
            data = self.rep if self.weight_rounding != "nearest" else None
            self.contents[key] = convert(self.model, recipe=self.recipe(assignment), calibration=self.calibration,
                                         representative_data=data, check=False)
        return self.contents[key]

    def measure(self, assignment: dict[str, str], latency: bool = False) -> dict:
        """Size, metric on the evaluation data (through LiteRT) and, if asked, median batch-1 latency."""
        from tfq.tflite.interpreter import TFLiteModel

        key = tuple(sorted(assignment.items()))
        m = self.measured.get(key)
        if m is None or (latency and m.get("latency_ms") is None):
            start = time.perf_counter()
            content = self.convert(assignment)
            runner = TFLiteModel(content, num_threads=self.num_threads)
            value = float(self.metric(self.y_eval, _as_list(runner.predict(self.x_eval, batch_size=256))[0]))
            m = {"size": len(content), "metric": value, "latency_ms": None}
            if latency:
                m["latency_ms"] = float(np.median(runner.latency_ms(self.x_eval[:1], warmup=5, runs=30)))
            self.measured[key] = m
            if self.verbose:
                with verbosity(True):
                    logger.info(f"mixed_precision: {_describe(assignment)}: {len(content):,} B, {self.metric_name} "
                                f"{value:.4f} ({time.perf_counter() - start:.1f} s)")
        return m


# ------------------------------------------------------------------------------------------------ int16: below Keras
_WEIGHT_OPS = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 0}  # op → its weight's output-channel axis
_DTYPE_BITS = {"INT4": 4, "INT8": 8, "INT16": 16, "INT32": 32, "FLOAT32": 32}


def layer_ops(content: bytes, names: Sequence[str]) -> dict[str, tuple[int, str]]:
    """``{layer: (op index, weight tensor name)}``: the CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED op of each
    Keras layer in the model's float ``.tflite`` (``tfq.convert(model, "float")``).

    The converter names a weight tensor by the Keras op scope it comes from, ``<model>_<n>/<layer>_<n>/<op>``
    (``mobilenet_style_1/dw0_1/depthwise``), and a folded or fused tensor by its sources joined with ``;``
    (``…/dw0_relu_1/Relu6;…/dw0_bn_1/batchnorm/mul_1;…/dw0_1/depthwise;``): a layer's op is the one whose weight
    name has a ``;``-part with the segment ``<layer>`` or ``<layer>_<n>``.

    Raises:
        ValueError: a layer matched by no op or by several (one line naming it).

    Example:
        >>> import keras
        >>> from tfq.export.graph_converter import keras_graph_converter
        >>> inp = keras.Input((4,))
        >>> m = keras.Model(inp, keras.layers.Dense(2, name="head")(keras.layers.Dense(3, name="hidden")(inp)))
        >>> layer_ops(keras_graph_converter(m).convert(), ["hidden", "head"])["head"][0]
        1
    """
    from tfq.tflite.info import inspect_tflite

    info = inspect_tflite(content)
    weights = [(i, info.tensors[op.inputs[1]].name) for i, op in enumerate(info.ops)
               if op.type in _WEIGHT_OPS and len(op.inputs) > 1 and op.inputs[1] >= 0]
    out = {}
    for name in names:
        scope = re.compile(rf"(^|/){re.escape(name)}(_\d+)?/")
        hits = [(i, w) for i, w in weights if any(scope.search(part) for part in w.split(";"))]
        if len(hits) != 1:
            found = ", ".join(repr(w) for _, w in hits[:3]) or "none"
            raise ValueError(f"layer {name!r}: expected one CONV_2D/DEPTHWISE_CONV_2D/FULLY_CONNECTED op of the float "
                             f".tflite whose weight is named after it, found {len(hits)} ({found}). Give the layer a "
                             f"name no other layer's name starts with, or leave 'int16' out of choices.")
        out[name] = hits[0]
    return out


def _nearest_int4(weight: np.ndarray, axis: int) -> np.ndarray:
    """``Q(W)`` on tfq's symmetric per-channel 4-bit grid (``s = max|W_c| / 7``, integers in [-7, 7], nearest)."""
    w = np.moveaxis(np.asarray(weight, np.float32), axis, 0)
    flat = w.reshape(w.shape[0], -1)
    scale = np.abs(flat).max(axis=1, keepdims=True) / np.float32(7)
    scale = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.round(flat / scale), -7, 7)
    return np.moveaxis((q * scale).astype(np.float32).reshape(w.shape), 0, axis)


@dataclasses.dataclass
class _BelowKeras:
    """Files with per-layer int16 activations, built from the model's float ``.tflite``: tfq's calibration on it
    (:func:`tfq.ptq.tflite_calibration.calibrate_tflite`), LiteRT's quantizer writing int8 / a16w8 / float ops
    (:func:`tfq.export.tflite_frontend.quantize_tflite`), then the 4-bit layers' weights stored INT4
    (:func:`tfq.tflite.int4.rewrite_int4_weights`). A 4-bit layer's float weight is replaced by ``Q(W)`` on tfq's
    4-bit grid first, so the quantizer's 8-bit integers are ``round(q · 127 / max|q|)`` and the rewrite recovers
    tfq's nearest 4-bit integers and scales exactly."""

    flt: bytes
    ops: dict
    ranges: dict
    int4_weights: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def build(cls, model, rep, names) -> _BelowKeras:
        from tfq.export.convert import convert
        from tfq.ptq.tflite_calibration import calibrate_tflite

        flt = convert(model, "float")
        return cls(flt, layer_ops(flt, names), calibrate_tflite(flt, rep).ranges)

    def _with_int4(self, layers: Sequence[str]) -> bytes:
        """The float file with the named layers' weights replaced by their 4-bit values."""
        from tfq.tflite import int4

        if not layers:
            return self.flt
        model = int4.load_model(self.flt)
        sg = model.subgraphs[0]
        by_name = {int4.tensor_name(t): t for t in sg.tensors}
        for layer in layers:
            index, name = self.ops[layer]
            tensor = by_name[name]
            users = sum(1 for t in sg.tensors if t.buffer == tensor.buffer)
            if users > 1:
                raise ValueError(f"layer {layer!r}: its weight {name!r} shares a buffer with {users - 1} other "
                                 f"tensor(s) in the float .tflite; leave 'int16' out of choices for this model.")
            if layer not in self.int4_weights:
                shape = tuple(int(d) for d in tensor.shape)
                weight = np.frombuffer(np.asarray(model.buffers[tensor.buffer].data, np.uint8).tobytes(),
                                       np.float32).reshape(shape)
                op = model.subgraphs[0].operators[index]
                self.int4_weights[layer] = _nearest_int4(weight, _WEIGHT_OPS[int4.op_name(model, op)])
            model.buffers[tensor.buffer].data = np.frombuffer(self.int4_weights[layer].tobytes(), np.uint8)
        return int4.save_model(model)

    def convert(self, assignment: dict[str, str]) -> bytes:
        from tfq.export.tflite_frontend import quantize_tflite
        from tfq.tflite.int4 import rewrite_int4_weights

        def pick(choice: str) -> list[str]:
            return [n for n, c in assignment.items() if c == choice]

        content = quantize_tflite(self._with_int4(pick("int4")), self.ranges,
                                  float_ops=sorted(self.ops[n][0] for n in pick("float")),
                                  int16_ops=sorted(self.ops[n][0] for n in pick("int16")))
        wanted = {self.ops[n][1] for n in pick("int4")}
        if wanted:
            content, done = rewrite_int4_weights(content, select=lambda name: name in wanted)
            if set(done) != wanted:
                raise ValueError(f"LiteRT's quantizer did not keep the 4-bit weights of "
                                 f"{sorted(wanted - set(done))!r}; leave 'int16' out of choices for this model.")
        return content

    def layer_precision(self, content: bytes) -> dict[str, tuple[int, int, int]]:
        """``{layer: (weight bits, weight bytes, activation bits)}`` read from a file this builder wrote: the
        layer's weight tensor (found by name) and the type of the input of the op that reads it."""
        from tfq.tflite.info import inspect_tflite

        info = inspect_tflite(content)
        index = {t.name: t.index for t in info.tensors}
        weights = {w.name: w for w in info.weights}
        out = {}
        for layer, (_, name) in self.ops.items():
            t = index.get(name)
            op = next((op for op in info.ops if len(op.inputs) > 1 and op.inputs[1] == t), None)
            if t is None or op is None:
                continue
            w = weights.get(name)
            nbytes = w.nbytes if w is not None else 0
            out[layer] = (_DTYPE_BITS.get(info.tensors[t].dtype, 32), nbytes,
                          _DTYPE_BITS.get(info.tensors[op.inputs[0]].dtype, 32))
        return out


def _recipe_for(assignment: dict[str, str], weight_rounding: str = "nearest") -> Recipe:
    float_layers = tuple(re.escape(n) for n, c in assignment.items() if c == "float")
    int4 = [n for n, c in assignment.items() if c == "int4"]
    overrides = (Override("|".join(re.escape(n) for n in int4), weights=TensorSpec(bits=4)),) if int4 else ()
    return Recipe(mode="int8", float_layers=float_layers, overrides=overrides, allow_non_tflite=bool(int4),
                  weight_rounding=weight_rounding, name="mixed_precision")


def _describe(assignment: dict[str, str]) -> str:
    counts = {c: sum(1 for v in assignment.values() if v == c) for c in ALL_CHOICES}
    return ", ".join(f"{c}×{n}" for c, n in counts.items() if n)


def _sensitivities(search: _Search, method: str, choices: Sequence[str], hutchinson_samples: int,
                   seed: int) -> dict[str, dict[str, float]]:
    """``{layer: {choice: Ω}}``: the damage each choice does to each layer (0 for float)."""
    names = [layer.name for layer in search.layers]
    out = {n: {"float": 0.0} for n in names}
    if method == "hessian":
        traces = hessian_traces(search.model, search.x_cal[:128], search.layers, hutchinson_samples, seed)
        for layer in search.layers:
            matrix = _kernel_matrix(layer)
            for choice in ("int8", "int4"):
                out[layer.name][choice] = max(traces[layer.name], 0.0) / matrix.size * _quantization_error(
                    matrix, _QMAX[choice])
        return out
    reference = [np.asarray(y, np.float64) for y in _as_list(search.model.predict(search.x_cal, verbose=0))]
    int8 = dict.fromkeys(names, "int8")
    base = _output_noise(search.convert(int8), search.x_cal, reference, search.num_threads)
    top = next(c for c in _ORDER if c in (*choices, "int8"))  # the most precise choice: Ω = 0
    int8_size = len(search.convert(int8))
    for layer in search.layers:
        n = layer.name
        noise = {c: _output_noise(search.convert({**int8, n: c}), search.x_cal, reference, search.num_threads)
                 for c in choices if c != "int8"}
        noise["int8"] = base
        if search.below_keras is not None:  # bytes as measured: the file with this layer changed, minus INT8's
            search.layer_bytes[n] = {c: _layer_bytes(layer, "int8") + len(search.convert({**int8, n: c})) - int8_size
                                     for c in (*choices, "int8")}
        out[n]["int8"] = max(base - noise[top], 0.0)
        if "int16" in choices:
            out[n]["int16"] = max(noise["int16"] - noise[top], 0.0)
        if "int4" in choices:
            out[n]["int4"] = max(noise["int4"] - base, 0.0) + out[n]["int8"]
    return out


# ------------------------------------------------------------------------------------------------ allocation
def allocation_path(layers, sensitivity: dict[str, dict[str, float]], choices: Sequence[str],
                    layer_bytes: dict[str, dict[str, int]] | None = None) -> list[dict]:
    """Assignments from the largest to the smallest, each optimal for the relaxed knapsack at its size.

    Per layer, the choices' ``(bytes, Ω)`` points on their lower convex hull; each hull step is a move
    costing ``ΔΩ / Δbytes``; moves are taken cheapest first (ties: graph order), a layer's moves in order.
    A choice with at least the bytes of another and more Ω is dominated and never taken (an ``"int16"`` small
    layer: its QUANTIZE ops and int64 bias can outweigh the float kernel it replaces).

    Args:
        layers: the candidate layers, graph order.
        sensitivity: ``{layer: {choice: Ω}}``.
        choices: the choices to use.
        layer_bytes: ``{layer: {choice: bytes}}`` (e.g. measured in the file); default: :func:`_layer_bytes`.
    """
    order = [c for c in _ORDER if c in choices]
    moves, start = [], {}
    for index, layer in enumerate(layers):
        size = (layer_bytes or {}).get(layer.name) or {c: _layer_bytes(layer, c) for c in order}
        points = [(size[c], sensitivity[layer.name].get(c, 0.0), c) for c in order]
        points = [p for p in points if not any(q[0] <= p[0] and q[1] < p[1] for q in points)]
        points.sort(key=lambda p: -p[0])  # stable: ties keep the order float, int16, int8, int4
        hull = [points[0]]
        for p in points[1:]:  # bytes decrease
            hull.append(p)
            while len(hull) >= 3:  # keep the lower convex hull: slopes (ΔΩ per byte saved) must increase
                (b0, s0, _), (b1, s1, _), (b2, s2, _) = hull[-3:]
                if (s1 - s0) * (b1 - b2) >= (s2 - s1) * (b0 - b1):
                    del hull[-2]
                else:
                    break
        start[layer.name] = hull[0][2]
        for (b0, s0, _), (b1, s1, c1) in itertools.pairwise(hull):
            moves.append(((s1 - s0) / max(b0 - b1, 1), index, layer.name, c1))
    moves.sort(key=lambda m: (m[0], m[1]))
    path = [dict(start)]
    for _, _, name, choice in moves:
        path.append({**path[-1], name: choice})
    return path


# ------------------------------------------------------------------------------------------------ result
@dataclasses.dataclass
class MixedPrecisionResult(_Table):
    """What :func:`mixed_precision` chose.

    Attributes:
        tflite: the chosen ``.tflite`` bytes.
        recipe: the :class:`~tfq.recipes.Recipe` that reproduces it with :func:`tfq.convert` (with int16 layers:
            the Keras route's file with them at int8; ``settings["int16_layers"]`` names them).
        rows: per layer: ``layer``, ``class``, ``choice``, ``weight_bits``, ``activation_bits`` (as stored in
            the file, read back with :func:`tfq.inspect_tflite`), ``params``, ``bytes`` (the layer's weight
            tensors in the file), ``sensitivity`` (Ω of 4 bits), ``sensitivity_int8`` and ``sensitivity_int16``.
        size: ``len(tflite)``.
        metric: the metric of the chosen file on the evaluation data, through LiteRT.
        baseline: the float Keras model's metric.
        drop: ``baseline − metric`` (or ``metric − baseline`` for lower-is-better metrics).
        met: whether every target (``max_drop``, ``size_budget``, ``latency_budget``) is met; if not, the
            result is the best point found.
        latency_ms: median batch-1 latency (measured when ``latency_budget`` is given, else None).
        references: ``{"int8": {...}, "w4a8": {...}}``: size and metric of the uniform INT8 and uniform W4A8
            files (every candidate layer at 4 bits), same calibration.
        trials: every point measured: ``{"index", "assignment", "size", "metric", "drop", "latency_ms"}``.
        settings: the options used.
    """

    tflite: bytes
    recipe: Recipe
    rows: list
    size: int
    metric: float
    baseline: float
    drop: float
    met: bool
    metric_name: str
    latency_ms: float | None = None
    references: dict = dataclasses.field(default_factory=dict)
    trials: list = dataclasses.field(default_factory=list)
    settings: dict = dataclasses.field(default_factory=dict)

    _JSON_EXAMPLE = "mixed_precision.json"

    @property
    def assignment(self) -> dict[str, str]:
        """``{layer: choice}``."""
        return {r["layer"]: r["choice"] for r in self.rows}

    def summary(self) -> str:
        refs = ", ".join(f"{k} {v['size']:,} B {self.metric_name} {v['metric']:.4f}" for k, v in self.references.items())
        return (f"mixed precision {'met' if self.met else 'NOT met (best found returned)'}: {self.size:,} B, "
                f"{self.metric_name} {self.metric:.4f} (float {self.baseline:.4f}, drop {self.drop:.4f}); {refs}")

    def _table_parts(self):
        header = ["layer", "class", "choice", "weight bits", "activation bits", "params", "bytes", "sensitivity (4 bit)"]
        align = ["l", "l", "l", "r", "r", "r", "r", "r"]
        body = [[r["layer"], r["class"], r["choice"], str(r["weight_bits"]), str(r["activation_bits"]),
                 f"{r['params']:,}", f"{r['bytes']:,}", f"{r['sensitivity']:.3g}"] for r in self.rows]
        return header, align, body, [self.summary(), f"sensitivity: {self.settings.get('sensitivity')}"]

    def to_dict(self) -> dict:
        return _encode({"size": self.size, "metric": self.metric, "metric_name": self.metric_name,
                        "baseline": self.baseline, "drop": self.drop, "met": self.met, "latency_ms": self.latency_ms,
                        "rows": self.rows, "references": self.references, "trials": self.trials,
                        "settings": self.settings, "recipe": self.recipe.to_dict()})

    def __repr__(self) -> str:
        return f"MixedPrecisionResult({self.summary()})"

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes model.tflite, recipe.yaml, mixed_precision.json and mixed_precision.md into ``directory`` (atomically).

        Example:
            >>> result.save("mixed/")   # doctest: +SKIP
        """
        from tfq.core.fileio import (
            atomic_write_bytes,
            atomic_write_text,
            check_writable_dir,
        )
        from tfq.core.recipes import save_recipe

        check_writable_dir(directory, "directory")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "model.tflite", self.tflite)
        save_recipe(self.recipe, out / "recipe.yaml")
        self.to_json(out / "mixed_precision.json")
        atomic_write_text(out / "mixed_precision.md", self.to_markdown() + "\n")
        return out


def _file_layer_bits(content: bytes, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``{layer: (weight bits, weight bytes)}`` read from the file's weight tensors: a tensor belongs to a layer
    when a segment of its name is the layer name, or the layer name and ``_<n>`` (Keras' op scopes)."""
    from tfq.tflite.info import inspect_tflite

    out = {}
    weights = inspect_tflite(content).weights
    for name in names:
        scope = re.compile(rf"(^|/){re.escape(name)}(_\d+)?(/|;|$)")
        found = [w for w in weights if scope.search(w.name.split(";")[0])]
        others = [n for n in names if n != name and n.startswith(name)]
        found = [w for w in found if not any(re.search(rf"(^|/){re.escape(o)}(_\d+)?/", w.name) for o in others)]
        if found:
            out[name] = (min(w.bits for w in found), sum(w.nbytes for w in found))
    return out


# ------------------------------------------------------------------------------------------------ entry point
def _check_options(max_drop, size_budget, latency_budget, choices, sensitivity, hutchinson_samples, seed) -> None:
    if max_drop is not None and (isinstance(max_drop, bool) or not isinstance(max_drop, (int, float))
                                 or not max_drop >= 0):
        raise ValueError(f"max_drop must be a number >= 0 or None. Received: max_drop={max_drop!r}")
    if size_budget is not None and (isinstance(size_budget, bool) or not isinstance(size_budget, (numbers.Integral, float))
                                    or not size_budget > 0 or (isinstance(size_budget, float) and size_budget > 1)):
        raise ValueError(f"size_budget must be bytes (an int > 0) or a fraction of the INT8 file's size (a float in "
                         f"(0, 1]). Received: size_budget={size_budget!r}")
    if latency_budget is not None and (isinstance(latency_budget, bool) or not isinstance(latency_budget, (int, float))
                                       or not latency_budget > 0):
        raise ValueError(f"latency_budget must be milliseconds (a number > 0) or None. "
                         f"Received: latency_budget={latency_budget!r}")
    if isinstance(choices, str) or not isinstance(choices, (list, tuple)) or not choices:
        raise ValueError(f"choices must be a non-empty list among {ALL_CHOICES}. Received: choices={choices!r}")
    for c in choices:
        if c not in ALL_CHOICES:
            raise ValueError(f"choices values must be among {ALL_CHOICES}. Received: {c!r} in "
                             f"choices={tuple(choices)!r}")
    if len(set(choices)) < 2:
        raise ValueError(f"choices must hold at least two different choices to choose between. "
                         f"Received: choices={tuple(choices)!r}")
    if sensitivity not in SENSITIVITIES:
        raise ValueError(f"sensitivity must be one of {SENSITIVITIES}. Received: sensitivity={sensitivity!r}")
    if "int16" in choices and sensitivity == "hessian":
        raise ValueError(f"sensitivity='hessian' models weight rounding only, not int16 activations: with 'int16' in "
                         f"choices use sensitivity='sqnr'. Received: choices={tuple(choices)!r}, "
                         f"sensitivity={sensitivity!r}")
    if isinstance(hutchinson_samples, bool) or not isinstance(hutchinson_samples, int) or hutchinson_samples < 1:
        raise ValueError(f"hutchinson_samples must be an int >= 1. Received: hutchinson_samples={hutchinson_samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int. Received: seed={seed!r}")


def _prepare(model, representative_data, eval_data, eval_labels, metric, num_calibration_samples,
             weight_rounding, num_threads, verbose, caller: str, below_keras: bool = False) -> _Search:
    from tfq.analysis.evaluation import _resolve_metrics
    from tfq.core.representative import representative_dataset
    from tfq.models.interop import load_keras_model

    model = load_keras_model(model)
    if eval_labels is None:
        if not (isinstance(eval_data, (tuple, list)) and len(eval_data) == 2):
            raise ValueError(f"{caller}: eval_labels is None: pass eval_data=(x, y) or eval_labels=y.")
        eval_data, eval_labels = eval_data
    x_eval, y_eval = np.asarray(eval_data), np.asarray(eval_labels)
    if len(x_eval) != len(y_eval):
        raise ValueError(f"eval_labels has {len(y_eval)} rows but eval_data has {len(x_eval)} samples; they must match.")
    if len(model.inputs) != 1:
        raise ValueError(f"{caller} takes single-input models. Received: model {model.name!r} with "
                         f"{len(model.inputs)} inputs; use tfq.tune for multi-input models.")
    layers = _candidate_layers(model)
    if not layers:
        raise ValueError(f"model {model.name!r} has no Dense, Conv2D or DepthwiseConv2D layer: there is no per-layer "
                         f"weight precision to choose. Use tfq.convert or tfq.tune.")
    rep = representative_dataset(representative_data, num_calibration_samples, model=model)
    x_cal = np.concatenate([np.asarray(_as_list(batch)[0]) for batch in rep()], axis=0)[:256]
    name, fn = _resolve_metrics([metric])[0]
    higher = not any(name.startswith(k) for k in ("mse", "mae"))
    search = _Search(model, rep, x_cal, x_eval, y_eval, layers, name, fn, higher, weight_rounding, num_threads,
                     verbose)
    if below_keras:
        search.below_keras = _BelowKeras.build(model, rep, [layer.name for layer in layers])
    return search


def layer_sensitivities(model, representative_data, *, sensitivity: str = DEFAULT_SENSITIVITY,
                        choices: Sequence[str] = CHOICES, hutchinson_samples: int = 16, seed: int = 0,
                        num_calibration_samples: int | None = None, num_threads: int | None = None,
                        ) -> dict[str, dict[str, float]]:
    """``{layer: {choice: Ω}}``: each candidate layer's estimated damage at each choice (see the module doc).

    Example:
        >>> omega = tfq.analysis.precision.layer_sensitivities(model, x_train[:256], sensitivity="hessian")  # doctest: +SKIP
        >>> max(omega, key=lambda n: omega[n]["int4"])                                                       # doctest: +SKIP
        'fc1'
    """
    _check_options(None, None, None, tuple(choices), sensitivity, hutchinson_samples, seed)
    x = np.zeros((1,))
    search = _prepare(model, representative_data, x, x, "accuracy", num_calibration_samples, "nearest", num_threads,
                      False, "layer_sensitivities", below_keras="int16" in choices)
    return _sensitivities(search, sensitivity, tuple(choices), hutchinson_samples, seed)


def mixed_precision(
    model,
    representative_data,
    eval_data,
    eval_labels=None,
    *,
    max_drop: float | None = None,
    size_budget: float | None = None,
    latency_budget: float | None = None,
    choices: Sequence[str] = CHOICES,
    sensitivity: str = DEFAULT_SENSITIVITY,
    metric="accuracy",
    weight_rounding: str = "nearest",
    hutchinson_samples: int = 16,
    seed: int = 0,
    num_calibration_samples: int | None = None,
    num_threads: int | None = None,
    verbose: bool = False,
) -> MixedPrecisionResult:
    """Chooses each layer's precision (4-bit, 8-bit weights or float) for the smallest ``.tflite`` within targets.

    Targets: ``max_drop`` (the metric, measured through LiteRT on ``eval_data``, may fall at most this much below
    the float Keras model's), ``size_budget`` (the file's bytes; a float in (0, 1] is a fraction of the uniform INT8
    file's size) and ``latency_budget`` (median batch-1 ms through the interpreter with ``num_threads``). With only
    ``max_drop`` (default 0.01 when no budget is given): the smallest file that meets it. With a budget and no
    ``max_drop``: the most accurate file (the least predicted damage) within the budget, measured. With both: the
    smallest within the budget that meets ``max_drop``. When nothing meets the targets, ``result.met`` is False and
    the most accurate point within the budget (or the largest point) is returned.

    The search (see :mod:`tfq.analysis.precision`): per-layer sensitivities, a path of assignments from the largest
    model to the smallest (relaxed knapsack, greedy on each layer's convex hull), then bisection on the path with
    every point converted and measured. The uniform INT8 and W4A8 files are measured too (``result.references``).

    Args:
        model: a Keras model (or path).
        representative_data: calibration data (see :func:`tfq.representative_dataset`).
        eval_data: evaluation inputs; or ``(x, y)`` when ``eval_labels`` is None.
        eval_labels: evaluation labels.
        max_drop: largest accepted drop of the metric (absolute).
        size_budget: bytes (int), or a fraction (float in (0, 1]) of the uniform INT8 file.
        latency_budget: milliseconds per batch-1 invocation, measured.
        choices: per-layer choices, among ``"int4"``, ``"int8"``, ``"float"`` and ``"int16"`` (int16 activations,
            int8 weights: every file is then built below Keras, see the module doc; not in the default, measured).
        sensitivity: ``"sqnr"`` (default: measured in the file, ranks the true per-layer drop best, see
            ``docs/benchmarks.md``) or ``"hessian"`` (HAWQ-v2 Hutchinson trace × quantization error, no conversion).
        metric: ``"accuracy"``, ``"mse"`` … (see :func:`tfq.evaluate`).
        weight_rounding: ``"nearest"``, ``"adaround"`` or ``"gptq"`` for every quantized layer's weights
            (``"nearest"`` only with ``"int16"`` in ``choices``).
        hutchinson_samples: Hessian-vector products for ``sensitivity="hessian"``.
        seed: seed of the Hutchinson vectors.
        num_calibration_samples: cap on calibration samples.
        num_threads: interpreter threads (None: one per core this process may use).
        verbose: one INFO line per measured point on the ``"tfq"`` logger.

    Returns:
        :class:`MixedPrecisionResult` (``print(result.to_markdown())`` shows the per-layer table).

    Raises:
        ValueError: a bad target, choice or sensitivity (one line naming it), a model without Dense/Conv layers,
            ``"int16"`` with ``sensitivity="hessian"`` or ``weight_rounding`` other than ``"nearest"``.

    Example:
        >>> result = tfq.mixed_precision(model, x_train[:256], x_test, y_test, size_budget=0.5)   # doctest: +SKIP
        >>> result.size <= 0.5 * result.references["int8"]["size"]                                # doctest: +SKIP
        True
    """
    from tfq.tflite.interpreter import available_cores

    choices = tuple(choices) if isinstance(choices, (list, tuple)) else choices
    _check_options(max_drop, size_budget, latency_budget, choices, sensitivity, hutchinson_samples, seed)
    check_bool("verbose", verbose)
    if weight_rounding not in ("nearest", "adaround", "gptq"):
        raise ValueError(f"weight_rounding must be 'nearest', 'adaround' or 'gptq'. "
                         f"Received: weight_rounding={weight_rounding!r}")
    below_keras = "int16" in choices
    if below_keras and weight_rounding != "nearest":
        raise ValueError(f"weight_rounding={weight_rounding!r} is not carried into files with int16 layers (built "
                         f"below Keras, 4-bit weights rounded to nearest): use weight_rounding='nearest' with 'int16' "
                         f"in choices, or leave 'int16' out. Received: choices={tuple(choices)!r}")
    if max_drop is None and size_budget is None and latency_budget is None:
        max_drop = 0.01
    if num_threads is None:
        num_threads = available_cores()
    start = time.perf_counter()
    search = _prepare(model, representative_data, eval_data, eval_labels, metric, num_calibration_samples,
                      weight_rounding, num_threads, verbose, "mixed_precision", below_keras=below_keras)
    names = [layer.name for layer in search.layers]
    baseline = float(search.metric(search.y_eval, _as_list(search.model.predict(search.x_eval, verbose=0))[0]))

    def drop_of(value: float) -> float:
        return baseline - value if search.higher_better else value - baseline

    latency = latency_budget is not None
    references = {}
    for ref, choice in (("int8", "int8"), ("w4a8", "int4")):
        m = search.measure(dict.fromkeys(names, choice), latency)
        references[ref] = {**m, "drop": drop_of(m["metric"])}
    budget_bytes = None
    if size_budget is not None:
        budget_bytes = (int(size_budget) if isinstance(size_budget, numbers.Integral)
                        else int(size_budget * references["int8"]["size"]))
    smallest = next(c for c in reversed(_ORDER) if c in choices)  # the fewest bytes per weight
    if budget_bytes is not None and smallest in ("int4", "int8") and budget_bytes < references[
            "w4a8" if smallest == "int4" else "int8"]["size"]:
        logger.warning(f"mixed_precision: size_budget={size_budget!r} ({budget_bytes:,} B) is below the smallest file "
                       f"the choices give ({references['w4a8' if smallest == 'int4' else 'int8']['size']:,} B, every "
                       f"layer {smallest}); the smallest is returned with met=False.")
    omega = _sensitivities(search, sensitivity, choices, hutchinson_samples, seed)
    path = allocation_path(search.layers, omega, choices, search.layer_bytes)
    overhead = references["int8"]["size"] - sum(_layer_bytes(layer, "int8") for layer in search.layers)

    def estimate(assignment) -> int:
        if search.layer_bytes:
            return overhead + sum(search.layer_bytes[n][assignment[n]] for n in names)
        return overhead + sum(_layer_bytes(layer, assignment[layer.name]) for layer in search.layers)

    trials = []

    def measure(k: int) -> dict:
        m = search.measure(path[k], latency)
        m = {**m, "drop": drop_of(m["metric"])}
        if not any(t["index"] == k for t in trials):
            trials.append({"index": k, "assignment": dict(path[k]), **m})
        return m

    def fits(m) -> bool:
        return (budget_bytes is None or m["size"] <= budget_bytes) and (
            latency_budget is None or m["latency_ms"] <= latency_budget)

    def meets(m) -> bool:
        return max_drop is None or m["drop"] <= max_drop

    # The first point within the size budget (by estimate, then measured bytes).
    first = 0
    if budget_bytes is not None:
        first = next((k for k, a in enumerate(path) if estimate(a) <= budget_bytes), len(path) - 1)
        while first < len(path) - 1 and measure(first)["size"] > budget_bytes:
            first += 1
        # int16 layers side by side share their QUANTIZE ops, so the per-layer bytes overestimate the file: step back
        while search.below_keras is not None and first > 0 and measure(first - 1)["size"] <= budget_bytes:
            first -= 1
    if latency_budget is not None:  # latency is not monotone along the path: measure every point from there
        ks = [k for k in range(first, len(path)) if fits(measure(k))]
        ok = [k for k in ks if meets(measure(k))]
        if max_drop is not None and ok:
            chosen = min(ok, key=lambda k: (measure(k)["size"], k))
        elif ks:
            chosen = max(ks, key=lambda k: (measure(k)["metric"] if search.higher_better else -measure(k)["metric"], -k))
        else:
            chosen = min(range(first, len(path)), key=lambda k: (measure(k)["latency_ms"], k))
    elif max_drop is None:
        chosen = first
    else:  # bisection: the last point on the path (smallest) that meets max_drop
        lo, hi = first, len(path) - 1
        if not meets(measure(lo)):
            chosen = lo
        elif meets(measure(hi)):
            chosen = hi
        else:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if meets(measure(mid)):
                    lo = mid
                else:
                    hi = mid
            chosen = lo
    m = measure(chosen)
    met = fits(m) and meets(m)
    assignment = path[chosen]
    content = search.convert(assignment)
    if search.below_keras is not None:
        in_file = search.below_keras.layer_precision(content)
    else:
        in_file = {n: (*v, _ACTIVATION_BITS[assignment[n]]) for n, v in _file_layer_bits(content, names).items()}
    rows = []
    for layer in search.layers:
        choice = assignment[layer.name]
        bits, nbytes, activation_bits = in_file.get(layer.name, (_WEIGHT_BITS[choice], _layer_bytes(layer, choice),
                                                                 _ACTIVATION_BITS[choice]))
        rows.append({"layer": layer.name, "class": type(layer).__name__, "choice": choice, "weight_bits": bits,
                     "activation_bits": activation_bits, "params": int(_kernel_matrix(layer).size),
                     "bytes": int(nbytes), "sensitivity": omega[layer.name].get("int4", math.nan),
                     "sensitivity_int8": omega[layer.name].get("int8", math.nan),
                     "sensitivity_int16": omega[layer.name].get("int16", math.nan)})
    settings = {"max_drop": max_drop, "size_budget": size_budget, "budget_bytes": budget_bytes,
                "latency_budget": latency_budget, "choices": list(choices), "sensitivity": sensitivity,
                "weight_rounding": weight_rounding, "seed": seed, "path_length": len(path), "chosen_index": chosen,
                "route": "below_keras" if below_keras else "keras",
                "int16_layers": [n for n in names if assignment[n] == "int16"],
                "seconds": round(time.perf_counter() - start, 2)}
    trials.sort(key=lambda t: t["index"])
    return MixedPrecisionResult(tflite=content, recipe=search.recipe(assignment), rows=rows, size=len(content),
                                metric=m["metric"], baseline=baseline, drop=m["drop"], met=met,
                                metric_name=search.metric_name, latency_ms=m["latency_ms"], references=references,
                                trials=trials, settings=settings)


# ------------------------------------------------------------------------------------------------ study
def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's ρ with average ranks for ties (Pearson correlation of the ranks)."""
    def ranks(v):
        v = np.asarray(v, np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):
            r[v == value] = r[v == value].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def sensitivity_study(model, representative_data, eval_data, eval_labels, *, hutchinson_samples: int = 16,
                      seed: int = 0, num_threads: int | None = None) -> dict:
    """Which sensitivity ranks the true per-layer drop better: both estimates against the measured drop.

    For each candidate layer, the truth is measured through LiteRT on the evaluation data with that layer at
    4 bits and the rest INT8: the metric drop and the cross-entropy increase (for probability outputs) over the
    uniform INT8 file. Returns per-layer rows and Spearman's ρ of each estimate against each truth.

    Example:
        >>> study = tfq.analysis.precision.sensitivity_study(model, x_train[:256], x_test, y_test)   # doctest: +SKIP
        >>> study["spearman"]["hessian"]["drop"]                                                    # doctest: +SKIP
    """
    from tfq.tflite.interpreter import TFLiteModel

    search = _prepare(model, representative_data, eval_data, eval_labels, "accuracy", None, "nearest", num_threads,
                      False, "sensitivity_study")
    names = [layer.name for layer in search.layers]
    estimates = {}
    for method in SENSITIVITIES:
        t0 = time.perf_counter()
        omega = _sensitivities(search, method, ("int4", "int8"), hutchinson_samples, seed)
        estimates[method] = ({n: omega[n]["int4"] for n in names}, time.perf_counter() - t0)
    int8 = dict.fromkeys(names, "int8")

    def truth(assignment):
        out = _as_list(TFLiteModel(search.convert(assignment), num_threads=num_threads).predict(search.x_eval,
                                                                                                  batch_size=256))[0]
        acc = float(search.metric(search.y_eval, out))
        p = np.clip(np.asarray(out, np.float64)[np.arange(len(out)), search.y_eval.astype(int)], 1e-12, 1)
        return acc, float(-np.mean(np.log(p)))

    base_acc, base_ce = truth(int8)
    rows = []
    for n in names:
        acc, ce = truth({**int8, n: "int4"})
        rows.append({"layer": n, "drop": base_acc - acc, "loss_increase": ce - base_ce,
                     **{f"{m}": estimates[m][0][n] for m in SENSITIVITIES}})
    spearman = {m: {t: _spearman([r[m] for r in rows], [r[t] for r in rows]) for t in ("drop", "loss_increase")}
                for m in SENSITIVITIES}
    return {"rows": rows, "spearman": spearman, "int8_metric": base_acc,
            "seconds": {m: round(estimates[m][1], 2) for m in SENSITIVITIES}}


def study_markdown(study: dict) -> str:
    """The study's per-layer rows and Spearman's ρ as markdown."""
    body = [[r["layer"], f"{r['drop']:+.4f}", f"{r['loss_increase']:+.4f}", f"{r['hessian']:.3g}", f"{r['sqnr']:.3g}"]
            for r in study["rows"]]
    table = _table(["layer", "drop (4-bit)", "loss increase", "hessian Ω", "sqnr Ω"], ["l", "r", "r", "r", "r"], body)
    rho = "; ".join(f"{m}: ρ(drop) {v['drop']:.2f}, ρ(loss) {v['loss_increase']:.2f}"
                    for m, v in study["spearman"].items())
    return table + "\n\n" + rho


def budget_curve(model, representative_data, eval_data, eval_labels=None, *, budgets: Sequence[float] = (),
                 sensitivity: str = DEFAULT_SENSITIVITY, choices: Sequence[str] = CHOICES, metric="accuracy",
                 hutchinson_samples: int = 16, seed: int = 0, num_threads: int | None = None) -> dict:
    """Size against accuracy along the whole allocation path, with the uniform INT8 and W4A8 files.

    Every point of :func:`allocation_path` is converted and measured through LiteRT (what
    :func:`mixed_precision` bisects), so the result is the curve the search chooses from; ``budgets``
    (fractions of the INT8 file) add the point :func:`mixed_precision` returns for each (the first on the path
    whose measured size fits).

    Returns:
        ``{"baseline", "metric_name", "sensitivity", "references": {"int8", "w4a8"}, "path": [{"index", "size",
        "metric", "drop", "counts"}], "budgets": [{"fraction", "bytes", "index", "size", "metric", "drop"}],
        "seconds"}``.

    Example:
        >>> curve = tfq.analysis.precision.budget_curve(model, x_train[:256], x_test, y_test, budgets=(0.6, 0.8))  # doctest: +SKIP
    """
    choices = tuple(choices) if isinstance(choices, (list, tuple)) else choices
    _check_options(None, None, None, choices, sensitivity, hutchinson_samples, seed)
    for b in budgets:
        _check_options(None, b, None, choices, sensitivity, hutchinson_samples, seed)
    start = time.perf_counter()
    search = _prepare(model, representative_data, eval_data, eval_labels, metric, None, "nearest", num_threads,
                      False, "budget_curve", below_keras="int16" in choices)
    names = [layer.name for layer in search.layers]
    baseline = float(search.metric(search.y_eval, _as_list(search.model.predict(search.x_eval, verbose=0))[0]))

    def drop_of(value: float) -> float:
        return baseline - value if search.higher_better else value - baseline

    references = {ref: search.measure(dict.fromkeys(names, c)) for ref, c in (("int8", "int8"), ("w4a8", "int4"))}
    references = {k: {**v, "drop": drop_of(v["metric"])} for k, v in references.items()}
    omega = _sensitivities(search, sensitivity, choices, hutchinson_samples, seed)
    path = allocation_path(search.layers, omega, choices, search.layer_bytes)
    points = []
    for k, assignment in enumerate(path):
        m = search.measure(assignment)
        points.append({"index": k, "size": m["size"], "metric": m["metric"], "drop": drop_of(m["metric"]),
                       "counts": {c: sum(1 for v in assignment.values() if v == c) for c in ALL_CHOICES},
                       "assignment": dict(assignment)})
    chosen = []
    for b in budgets:
        limit = int(b) if isinstance(b, numbers.Integral) else int(b * references["int8"]["size"])
        k = next((p["index"] for p in points if p["size"] <= limit), None)
        point = points[k] if k is not None else None
        chosen.append({"fraction": b, "bytes": limit, "index": k, "size": point and point["size"],
                       "metric": point and point["metric"], "drop": point and point["drop"]})
    return {"baseline": baseline, "metric_name": search.metric_name, "sensitivity": sensitivity,
            "references": references, "path": points, "budgets": chosen,
            "seconds": round(time.perf_counter() - start, 2)}
