"""W4A8 export: the 4-bit weight integers tfq chose, stored as INT4 in the ``.tflite``.

For a recipe with weights of at most 4 bits, :func:`tfq.convert` builds the INT8 file as usual
(the converter turns each 4-bit fake-quant kernel into integers in [-7, 7] with tfq's scales, and
packs convolution kernels as INT4 already) and then :func:`write_int4_weights` rewrites every
INT8 weight of an op LiteRT runs with INT4 weights (:data:`tfq.tflite.int4.INT4_WEIGHT_OPS`:
FULLY_CONNECTED, CONV_2D, DEPTHWISE_CONV_2D) as INT4: same integers, same scales, half the bytes.

Engine choice (measured, see ``scripts/int4_op_table.py``): the converter alone leaves Dense
kernels INT8; LiteRT's quantizer (ai-edge-quantizer) writes INT4 only from a float ``.tflite``
and computes its own integers and scales (nearest rounding, its own calibration), so it cannot
carry AdaRound/GPTQ integers; rewriting the converter's file keeps every integer and range tfq
chose and only changes storage.

Float activations (modes ``w4_dynamic`` and ``w4_weight_only``): :func:`float_activation_weights`
chooses the integers on the weight-only fake-quant model (nearest, AdaRound, GPTQ; blockwise
scales with nearest or GPTQ), the float ``.tflite`` of the model with those weights is converted,
and :func:`write_float_activation_int4` stores each matching weight INT4
(:func:`tfq.tflite.int4.float_weights_to_int4`): read by LiteRT's hybrid kernels (FULLY_CONNECTED,
CONV_2D; blockwise FULLY_CONNECTED) or dequantized by a DEQUANTIZE op (weight-only; depthwise).

Weights of 4-bit layers read by other ops (GATHER from an Embedding: LiteRT's builtin kernel runs
an INT4 table but its XNNPACK delegate, on by default, returns wrong values) stay INT8 — the same
4-bit integers, 8-bit storage — with a warning naming them.
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import numpy as np

from tfq.core.recipes import Recipe
from tfq.core.representative import representative_dataset
from tfq.ptq.weight_rounding import (
    MAX_SAMPLES,
    RoundingResult,
    gptq_round,
    layer_hessian,
    layer_inputs,
    nearest_round,
    set_folded_kernel,
    set_integer_weights,
    wrapped_kernel,
)
from tfq.quantsim.rewrite import quantized_layers_of
from tfq.tflite import int4
from tfq.tflite.int4 import (
    INT4_FLOAT_ACTIVATION_OPS,
    INT4_WEIGHT_OPS,
    float_weights_to_int4,
    rewrite_int4_weights,
)

__all__ = [
    "Int4Choice",
    "blockwise_integers",
    "float_activation_weights",
    "has_four_bit_weights",
    "snap_four_bit_kernels",
    "uses_int4_weights",
    "write_float_activation_int4",
    "write_int4_weights",
]


def uses_int4_weights(r: Recipe) -> bool:
    """Whether some integer weight spec of ``r`` (global or an override) has at most 4 bits."""
    specs = [r.weights] + [o.weights for o in r.overrides if o.weights is not None]
    return any(s.is_integer and s.bits <= 4 for s in specs)


def has_four_bit_weights(frozen) -> bool:
    """Whether a frozen fake-quant model has a layer with integer weights of at most 4 bits (a W4
    recipe's, or a QAT model trained with one)."""
    return any(not getattr(w, "float_weights", True) and getattr(w, "weight_bits", 8) <= 4
               for w in quantized_layers_of(frozen))


def snap_four_bit_kernels(frozen, unhandled_only: bool = False) -> list[str]:
    """Sets every 4-bit kernel of a frozen fake-quant model on its grid, ``q · s`` with nearest ``q`` (in place).

    A frozen per-channel Dense computes with its float kernel and leaves quantizing it to the
    converter (``converter_quantizes_weights``), which re-quantizes it at 8 bits whatever the
    recipe's bits: a 4-bit W4A8 simulation then ran Dense layers with float weights and the file
    held 8-bit integers. A kernel on the 4-bit grid (as AdaRound/GPTQ leave it, and as this sets
    it for nearest rounding, before bias correction) is simulated as W4 and survives the
    converter as ``round(q · 127 / 7)``, which :func:`tfq.tflite.int4.four_bit_integers` inverts.
    Layers whose weights tfq fake-quantizes itself compute the same ``q · s`` before and after.
    EinsumDense kernels that are a matmul on 2-D views (MultiHeadAttention's projections), which the
    weight methods do not handle, get one scale per output unit (a row of the FULLY_CONNECTED weight
    the converter makes of them).

    Args:
        frozen: the frozen fake-quant model (changed in place).
        unhandled_only: snap only the kernels AdaRound/GPTQ do not choose (EinsumDense), for recipes
            with learned rounding.

    Returns:
        The names of the layers snapped (those with at most 4-bit weights).
    """
    snapped = []
    for wrapper in quantized_layers_of(frozen):
        if getattr(wrapper, "float_weights", True) or getattr(wrapper, "weight_bits", 8) > 4:
            continue  # 8-bit layers: nothing to do (and no kernel copied)
        target = wrapped_kernel(wrapper)
        if target is None:
            if _snap_einsum(wrapper):
                snapped.append(wrapper.name)
            continue
        if target.qmax > 7 or unhandled_only:
            continue
        scales = target.scales()
        q = nearest_round(target.matrix, scales, target.qmax)
        set_integer_weights(target, q, scales)
        snapped.append(wrapper.name)
    return snapped


def _snap_einsum(wrapper) -> bool:
    """Nearest 4-bit integers, one scale per output unit, for an EinsumDense kernel that contracts its first axes."""
    import keras

    layer = wrapper.layer
    if not isinstance(layer, keras.layers.EinsumDense) or getattr(wrapper, "batchnorm", None) is not None:
        return False
    k = wrapper._contracted_axes()  # tfq's own wrapper: the kernel axes the einsum contracts
    if k is None:
        return False
    kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel), np.float64)
    rows = int(np.prod(kernel.shape[:k]))
    m = kernel.reshape(rows, -1).T  # (output units, fan-in)
    qmax = 2 ** (wrapper.weight_bits - 1) - 1
    top = np.abs(m).max(axis=1) if wrapper.per_channel else np.full(m.shape[0], np.abs(m).max())
    scales = np.maximum(top, 1e-12) / qmax
    q = nearest_round(m, scales, qmax)
    layer.kernel.assign((q * scales[:, None]).T.reshape(kernel.shape).astype(np.float32))
    return True


def write_int4_weights(content: bytes, r: Recipe, frozen=None) -> bytes:
    """``content`` with the 4-bit weights of LiteRT's INT4 ops stored as INT4 (unchanged otherwise).

    Args:
        content: the converter's INT8 ``.tflite`` for the fake-quant model of recipe ``r``.
        r: the recipe; nothing is rewritten unless :func:`uses_int4_weights` holds, or
        frozen: the frozen fake-quant model converted, when :func:`has_four_bit_weights` (a QAT
            model trained at 4 bits converts with ``mode="int8"``, whose recipe is 8-bit).

    Returns:
        The ``.tflite`` bytes. Warns (one line) naming 4-bit weights kept in INT8 storage.

    Example:
        >>> w4a8 = write_int4_weights(int8_bytes, recipe)   # doctest: +SKIP
    """
    if not uses_int4_weights(r) and (frozen is None or not has_four_bit_weights(frozen)):
        return content
    content, _ = rewrite_int4_weights(content)
    kept = _four_bit_int8_weights(content)
    if kept:
        names = ", ".join(f"{name!r} ({op})" for name, op in kept[:5]) + (" …" if len(kept) > 5 else "")
        warnings.warn(
            f"tfq: {len(kept)} weight tensor(s) hold 4-bit integers but stay INT8 in the file: {names}. LiteRT 2.3 "
            f"runs INT4 weights only in {', '.join(sorted(INT4_WEIGHT_OPS))}; the integers are tfq's either way.",
            UserWarning, stacklevel=3,
        )
    return content


def _four_bit_int8_weights(content: bytes) -> list[tuple[str, str]]:
    """(tensor name, op) of INT8 constant weights (2-D or more, zero-point 0) on a 4-bit grid."""
    s = int4.schema()
    model = int4.load_model(content)
    out = []
    for sg in model.subgraphs:
        for op in sg.operators or []:
            name = int4.op_name(model, op)
            for i in op.inputs if op.inputs is not None else []:
                if i < 0:
                    continue
                t = sg.tensors[i]
                data = model.buffers[t.buffer].data if t.buffer > 0 else None
                if t.type != s.TensorType.INT8 or data is None or len(data) == 0 or len(t.shape) < 2:
                    continue
                q = t.quantization
                if q is None or q.scale is None or len(q.scale) == 0 or q.zeroPoint is None or np.any(q.zeroPoint):
                    continue
                v = np.asarray(data, np.uint8).view(np.int8).reshape(tuple(int(d) for d in t.shape))
                if int4.four_bit_integers(v, np.asarray(q.scale), int(q.quantizedDimension or 0)) is not None:
                    out.append((int4.tensor_name(t), name))
    return out


@dataclasses.dataclass(eq=False)
class Int4Choice:
    """The 4-bit integers tfq chose for one layer's kernel, in the layouts the ``.tflite`` uses.

    Attributes:
        layer: the wrapped layer's name.
        kind: ``"dense"``, ``"conv"``, ``"conv1d"`` or ``"depthwise"``.
        integers: ``(channels, fan-in)`` (see :attr:`tfq.ptq.weight_rounding.WrappedKernel.matrix`).
        scales: ``(channels,)`` per channel or per tensor (equal values), or ``(channels, fan-in /
            block_size)`` blockwise.
        block_size: None, or the inputs per scale.
    """

    layer: str
    kind: str
    integers: np.ndarray
    scales: np.ndarray
    block_size: int | None = None

    @property
    def dequantized(self) -> np.ndarray:
        """``q · s`` as a ``(channels, fan-in)`` float64 matrix."""
        s = np.repeat(self.scales, self.block_size, axis=1) if self.block_size else self.scales.reshape(-1, 1)
        return self.integers.astype(np.float64) * s

    def tflite_layout(self, shape: tuple) -> tuple[np.ndarray, np.ndarray, int] | None:
        """(integers, dequantized, quantized dimension) in the TFLite tensor layout ``shape``, or None
        when the layout does not fit: FULLY_CONNECTED ``(out, in)``, CONV_2D ``(out, kh, kw, in)``,
        DEPTHWISE_CONV_2D ``(1, kh, kw, channels)``."""
        q, d = self.integers, self.dequantized
        if self.kind == "depthwise":
            q, d, axis = q.T, d.T, len(shape) - 1
        else:
            axis = 0
        if int(np.prod(shape)) != q.size or (self.kind != "depthwise" and shape[0] != q.shape[0]) or \
                (self.kind == "depthwise" and shape[-1] != q.shape[1]):
            return None
        return q.reshape(shape), d.reshape(shape), axis


def _block_spec(r: Recipe, wrapper):
    spec, _ = r.spec_for(wrapper.layer.name, type(wrapper.layer).__name__)
    return None if spec is None else spec.block_size


def blockwise_integers(frozen, r: Recipe, data, report=None) -> dict[str, Int4Choice]:
    """Blockwise 4-bit integers for the Dense layers of ``frozen`` whose weights spec has a ``block_size``.

    Each block of ``block_size`` inputs of an output channel gets the scale ``max|w| / 7`` (rounded
    to float16, as the file stores it); the integers are nearest, or GPTQ's (:func:`gptq_round`
    with the scales per block; Hessian from the float model's layer inputs) with
    ``weight_rounding="gptq"``. Called before the per-channel weight methods, which leave these
    kernels on their own grid (:func:`float_activation_weights` sets them back).

    Raises:
        ValueError: ``weight_rounding="adaround"`` with a block size (one line). Layers that cannot
            take blocks (convolutions; Dense layers whose input size is not a multiple of the block)
            keep per-channel scales, named in one warning.
    """
    out = {}
    rep = None
    per_channel = []
    for wrapper in quantized_layers_of(frozen):
        block = _block_spec(r, wrapper)
        target = wrapped_kernel(wrapper) if block else None
        if target is None:
            continue
        if target.kind != "dense":
            per_channel.append(wrapper.layer.name)
            continue
        if r.weight_rounding == "adaround":
            raise ValueError(f"weight_rounding='adaround' learns one rounding per weight on a per-channel grid; "
                             f"layer {wrapper.layer.name!r} has block_size={block}. Use weight_rounding='gptq' (or "
                             f"'nearest') with blockwise weights.")
        m = target.matrix
        if m.shape[1] % block:
            per_channel.append(wrapper.layer.name)  # fewer inputs than a block, or not a multiple of it
            continue
        start = time.perf_counter()
        blocks = m.reshape(m.shape[0], -1, block)
        scales = np.maximum(np.abs(blocks).max(axis=2), 1e-8) / target.qmax
        scales = scales.astype(np.float16).astype(np.float64)  # stored FLOAT16
        full = np.repeat(scales, block, axis=1)
        nearest = nearest_round(m.reshape(1, -1) / full.reshape(1, -1), 1.0, target.qmax).reshape(m.shape)
        if r.weight_rounding == "gptq" and data is not None:
            rep = rep or representative_dataset(data, r.num_calibration_samples or MAX_SAMPLES, model=frozen)
            inputs = layer_inputs(frozen, wrapper, rep.batches(256), float_mode=True)
            q = gptq_round(m, layer_hessian(wrapper, inputs, "dense"), full, target.qmax)
        else:
            q = nearest
        out[wrapper.name] = Int4Choice(wrapper.layer.name, "dense", q.astype(np.int8), scales.astype(np.float32), block)
        if report is not None and r.weight_rounding == "gptq":
            report.rounding[wrapper.name] = RoundingResult(q, scales, float(np.mean(q != nearest)),
                                                           time.perf_counter() - start)
    if per_channel:
        warnings.warn(f"tfq: block_size applies to Dense layers whose inputs are a multiple of it (LiteRT 2.3 runs "
                      f"blockwise INT4 weights only in FULLY_CONNECTED's hybrid kernel); "
                      f"{', '.join(map(repr, per_channel[:5]))}{' …' if len(per_channel) > 5 else ''} keep "
                      f"per-channel scales.", UserWarning, stacklevel=3)
    return out


def float_activation_weights(frozen, r: Recipe, blockwise: dict) -> tuple[dict[str, Int4Choice], list[str]]:
    """The per-layer 4-bit integers of a weight-only fake-quant model after its weight methods ran (kernels on
    their grid), with the blockwise choices of :func:`blockwise_integers` put back into the kernels; and the
    names of the 4-bit layers whose kernels the weight methods do not handle (EinsumDense …): their
    FULLY_CONNECTED weights get nearest integers from the file (:func:`write_float_activation_int4`)."""
    out, by_name = {}, []
    for wrapper in quantized_layers_of(frozen):
        if getattr(wrapper, "float_weights", True) or getattr(wrapper, "weight_bits", 8) > 4:
            continue
        target = wrapped_kernel(wrapper)
        if target is None:
            by_name.append(wrapper.layer.name)
            continue
        if wrapper.name in blockwise:
            choice = blockwise[wrapper.name]
            set_folded_kernel(target, choice.dequantized)
            out[wrapper.name] = choice
            continue
        scales = target.scales()
        q = nearest_round(target.matrix, scales, target.qmax)
        out[wrapper.name] = Int4Choice(wrapper.layer.name, target.kind, q.astype(np.int8), scales.astype(np.float32))
    return out, by_name


def _named_in(layer: str, tensor: str) -> bool:
    """Whether a converter tensor name (``model_1/block0_mha_key_1/MatMul``, fused names joined by ``;``) comes
    from layer ``layer``."""
    import re

    return re.search(rf"(^|[/;]){re.escape(layer)}(_\d+)?(/|;|$)", tensor) is not None


def write_float_activation_int4(float_content: bytes, choices: dict, storage: str, by_name=()) -> bytes:
    """The float ``.tflite`` with the weights tfq chose stored INT4 (``storage``: ``"dynamic"`` or
    ``"dequantize"``, see :data:`tfq.tflite.int4.INT4_FLOAT_ACTIVATION_OPS`).

    A float weight is matched to the layer whose ``q · s`` it equals (within 1 % of a step: the
    converter folds BatchNorm in float32) and stored with exactly that layer's integers and scales.
    A FULLY_CONNECTED weight of a layer in ``by_name`` (4-bit layers whose kernel the weight methods
    do not handle, e.g. MultiHeadAttention's EinsumDense projections, which the converter reshapes or
    folds) gets nearest 4-bit integers per output channel from the file's own values.
    Warns (one line) naming 4-bit layers left float.
    """
    used = set()

    def choose(name, op, values):
        found = _choose(name, op, values)
        if found is None and op == "FULLY_CONNECTED" and values.ndim == 2:
            layer = next((n for n in by_name if _named_in(n, name)), None)
            if layer is not None:
                used.add(layer)
                scales = np.maximum(np.abs(values).max(axis=1).astype(np.float64), 1e-12) / 7
                return nearest_round(values, scales, 7).astype(np.int8), scales.astype(np.float32), 0, None
        return found

    def _choose(name, op, values):
        for key, choice in choices.items():
            laid = choice.tflite_layout(values.shape)
            if laid is None:
                continue
            q, deq, axis = laid
            step = np.abs(deq).max() / 7 if not choice.block_size else float(np.min(choice.scales))
            if not np.all(np.abs(values.astype(np.float64) - deq) <= 0.01 * max(step, 1e-12)):
                continue
            used.add(key)
            if choice.block_size:
                if op != "FULLY_CONNECTED":
                    return None
                return q, choice.scales, 0, choice.block_size
            scales = choice.scales if len(set(np.round(choice.scales, 12))) > 1 else choice.scales[:1]
            return q, scales, axis, None
        return None

    content, _, left = float_weights_to_int4(float_content, choose, storage)
    missing = [c.layer for k, c in choices.items() if k not in used] + [n for n in by_name if n not in used]
    if missing:
        ops = ", ".join(sorted(INT4_FLOAT_ACTIVATION_OPS["dequantize"]))
        warnings.warn(
            f"tfq: {len(missing)} layer(s) with 4-bit weights stay float in the file: "
            f"{', '.join(map(repr, missing[:5]))}{' …' if len(missing) > 5 else ''}. LiteRT 2.3 runs INT4 weights with "
            f"float activations only in {ops} (blockwise: FULLY_CONNECTED in w4_dynamic).",
            UserWarning, stacklevel=3,
        )
    return content
