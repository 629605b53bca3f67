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

Weights of 4-bit layers read by other ops (GATHER from an Embedding: LiteRT's builtin kernel runs
an INT4 table but its XNNPACK delegate, on by default, returns wrong values) stay INT8 — the same
4-bit integers, 8-bit storage — with a warning naming them.
"""

from __future__ import annotations

import warnings

import numpy as np

from tfq.core.recipes import Recipe
from tfq.ptq.weight_rounding import nearest_round, set_integer_weights, wrapped_kernel
from tfq.quantsim.rewrite import quantized_layers_of
from tfq.tflite import int4
from tfq.tflite.int4 import INT4_WEIGHT_OPS, rewrite_int4_weights

__all__ = ["has_four_bit_weights", "snap_four_bit_kernels", "uses_int4_weights", "write_int4_weights"]


def uses_int4_weights(r: Recipe) -> bool:
    """Whether some integer weight spec of ``r`` (global or an override) has at most 4 bits."""
    specs = [r.weights] + [o.weights for o in r.overrides if o.weights is not None]
    return any(s.is_integer and s.bits <= 4 for s in specs)


def has_four_bit_weights(frozen) -> bool:
    """Whether a frozen fake-quant model has a layer with integer weights of at most 4 bits (a W4
    recipe's, or a QAT model trained with one)."""
    return any(not getattr(w, "float_weights", True) and getattr(w, "weight_bits", 8) <= 4
               for w in quantized_layers_of(frozen))


def snap_four_bit_kernels(frozen) -> list[str]:
    """Sets every 4-bit kernel of a frozen fake-quant model on its grid, ``q · s`` with nearest ``q`` (in place).

    A frozen per-channel Dense computes with its float kernel and leaves quantizing it to the
    converter (``converter_quantizes_weights``), which re-quantizes it at 8 bits whatever the
    recipe's bits: a 4-bit W4A8 simulation then ran Dense layers with float weights and the file
    held 8-bit integers. A kernel on the 4-bit grid (as AdaRound/GPTQ leave it, and as this sets
    it for nearest rounding, before bias correction) is simulated as W4 and survives the
    converter as ``round(q · 127 / 7)``, which :func:`tfq.tflite.int4.four_bit_integers` inverts.
    Layers whose weights tfq fake-quantizes itself compute the same ``q · s`` before and after.

    Returns:
        The names of the layers snapped (those with at most 4-bit weights).
    """
    snapped = []
    for wrapper in quantized_layers_of(frozen):
        if getattr(wrapper, "float_weights", True) or getattr(wrapper, "weight_bits", 8) > 4:
            continue  # 8-bit layers: nothing to do (and no kernel copied)
        target = wrapped_kernel(wrapper)
        if target is None or target.qmax > 7:
            continue
        scales = target.scales()
        q = nearest_round(target.matrix, scales, target.qmax)
        set_integer_weights(target, q, scales)
        snapped.append(wrapper.name)
    return snapped


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
