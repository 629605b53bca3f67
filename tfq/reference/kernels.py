"""One small numpy function per TFLite op: the integer arithmetic of LiteRT's reference kernels.

Each kernel takes an :class:`OpContext` (the operator, its quantization parameters and input
arrays) and returns its output arrays. Kernels that requantize an int32 accumulator record it
through :meth:`OpContext.record` (accumulator, real multiplier, ``(M0, shift)``, unclamped and
clamped range), which is what :func:`tfq.reference.explain` shows.

The arithmetic follows the TFLite 8-bit quantization spec (``r = S·(q − Z)``) and LiteRT's
``OpResolverType.BUILTIN_REF`` kernels (``tensorflow/lite/kernels/internal/reference/``), including
where the kernels compute a multiplier in float32 rather than double, and which ops run a 256-entry
lookup table (LOGISTIC, TANH, GELU in int8) or gemmlowp fixed point (SOFTMAX).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from tfq.reference import fixedpoint as fp
from tfq.reference.graph import Graph, Operator, Tensor

__all__ = ["KERNELS", "OpContext", "UnsupportedOpError", "supported_ops"]

F32 = np.float32


class UnsupportedOpError(ValueError):
    """The reference executor has no kernel for an op (or for its dtypes)."""


@dataclass
class Requantization:
    """What one requantizing op did: its int32 accumulator and how it was scaled back to int8/int16."""

    accumulator: np.ndarray | None  # int64 values of the int32 accumulator (bias included), channel last
    real_multiplier: np.ndarray  # one per output channel (or one)
    m0: np.ndarray
    shift: np.ndarray
    unclamped: np.ndarray | None  # requantized values + output zero point, before the clamp
    clamp: tuple[int, int]  # the activation / dtype range applied last
    worst_case: tuple[int, int] | None = None  # accumulator bounds over every possible input
    note: str = ""
    activation: tuple = (None, None)  # the fused activation's own bounds (before the dtype's), None: none


@dataclass
class OpContext:
    """One operator being run: graph, operator, and its input arrays (None for an omitted optional input)."""

    graph: Graph
    op: Operator
    values: list
    details: dict = field(default_factory=dict)

    def tensor(self, i: int) -> Tensor:
        return self.graph.tensors[self.op.inputs[i]]

    def out(self, i: int = 0) -> Tensor:
        return self.graph.tensors[self.op.outputs[i]]

    def has_input(self, i: int) -> bool:
        return i < len(self.op.inputs) and self.op.inputs[i] >= 0

    def record(self, requant: Requantization) -> None:
        self.details["requantization"] = requant

    def fail(self, why: str) -> UnsupportedOpError:
        dtypes = [self.graph.tensors[t].type_name for t in self.op.inputs if t >= 0]
        return UnsupportedOpError(f"op {self.op.index} {self.op.type} with inputs {dtypes} is not supported by "
                                  f"the reference executor: {why}.")


def supported_ops() -> list[str]:
    """Names of the TFLite builtin ops the reference executor runs."""
    return sorted(KERNELS)


# --- helpers -------------------------------------------------------------------------------------

def _qinfo(t: Tensor) -> tuple[int, int]:
    info = np.iinfo(t.dtype)
    return int(info.min), int(info.max)


def _c_div(a, b):
    """C integer division (truncates toward zero)."""
    a = np.asarray(a, dtype=np.int64)
    q = np.abs(a) // np.abs(b)
    return np.where((a < 0) != (np.asarray(b) < 0), -q, q)


def _quantize_scalar(value: float, scale: float, zero_point: int) -> int:
    """kernel_util's ``Quantize``: ``zp + round(f / scale)`` in float32."""
    return zero_point + int(fp.round_half_away(F32(value) / F32(scale)))


def activation_range(activation: int, out: Tensor) -> tuple[int, int]:
    """``CalculateActivationRangeQuantized``: the int range a fused activation clamps to."""
    qmin, qmax = _qinfo(out)
    if activation == 0 or not out.is_quantized:
        return qmin, qmax
    scale, zp = out.qparams()
    if activation == 1:  # RELU
        return max(qmin, _quantize_scalar(0.0, scale, zp)), qmax
    if activation == 3:  # RELU6
        return max(qmin, _quantize_scalar(0.0, scale, zp)), min(qmax, _quantize_scalar(6.0, scale, zp))
    if activation == 2:  # RELU_N1_TO_1
        return max(qmin, _quantize_scalar(-1.0, scale, zp)), min(qmax, _quantize_scalar(1.0, scale, zp))
    raise UnsupportedOpError(f"fused activation {activation} (TANH/SIGN_BIT) is not supported on an integer op.")


def activation_bounds(activation: int, out: Tensor) -> tuple:
    """The fused activation's own int bounds, not limited to the dtype (None: no bound on that side)."""
    if not out.is_quantized or activation == 0:
        return None, None
    scale, zp = out.qparams()
    bounds = {1: (0.0, None), 3: (0.0, 6.0), 2: (-1.0, 1.0)}.get(activation, (None, None))
    return tuple(None if b is None else _quantize_scalar(b, scale, zp) for b in bounds)


def _fused(ctx: OpContext) -> int:
    return int(getattr(ctx.op.options, "fusedActivationFunction", 0) or 0)


def _quantize_multipliers(reals) -> tuple[np.ndarray, np.ndarray]:
    pairs = [fp.quantize_multiplier(float(r)) for r in np.atleast_1d(reals)]
    return np.array([p[0] for p in pairs], dtype=np.int64), np.array([p[1] for p in pairs], dtype=np.int64)


def _requantize(ctx: OpContext, acc: np.ndarray, reals, lo: int, hi: int, worst_case=None,
                int64_acc: bool = False, in_double: bool = False) -> np.ndarray:
    """``clamp(MultiplyByQuantizedMultiplier(acc, M0, shift) + Z_out, lo, hi)``, recorded for explain.

    ``in_double``: ``round(acc · M)`` in double instead (LiteRT's reference int8 FULLY_CONNECTED).
    """
    out = ctx.out()
    reals = np.atleast_1d(np.asarray(reals, dtype=np.float64))
    m0, shift = _quantize_multipliers(reals)
    _, zp_out = out.qparams()
    if in_double:
        acc = acc if int64_acc else fp.wrap_int32(acc)
        scaled = fp.wrap_int32(fp.round_half_away(acc.astype(np.float64) * reals).astype(np.int64))
    elif int64_acc:
        scaled = fp.multiply_by_quantized_multiplier_int64(acc, m0, shift)
    else:
        scaled = fp.multiply_by_quantized_multiplier(fp.wrap_int32(acc), m0, shift)
    unclamped = scaled + zp_out
    ctx.record(Requantization(accumulator=acc, real_multiplier=reals, m0=m0, shift=shift, unclamped=unclamped,
                              clamp=(lo, hi), worst_case=worst_case,
                              activation=activation_bounds(_fused(ctx), out) if ctx.op.type != "RELU" else (lo, None),
                              note="requantized in double: round(acc·M), not M0·2^-n" if in_double else ""))
    return np.clip(unclamped, lo, hi).astype(out.dtype)


def _weights(t: Tensor, values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64) - (t.zero_point.reshape(-1)[0] if t.zero_point.size == 1 else 0)


def _padding(padding: int, size: int, k: int, stride: int, dilation: int = 1) -> tuple[int, int, int]:
    """``(out_size, pad_before, pad_after)`` of TFLite's SAME (0) / VALID (1) padding."""
    effective = (k - 1) * dilation + 1
    if padding == 0:
        out_size = (size + stride - 1) // stride
    else:
        out_size = (size - effective + stride) // stride
    total = max((out_size - 1) * stride + effective - size, 0)
    return out_size, total // 2, total - total // 2


def _patches(x: np.ndarray, kh: int, kw: int, sh: int, sw: int, dh: int, dw: int, oh: int, ow: int) -> np.ndarray:
    """(N, OH, OW, KH, KW, C) windows of an already padded NHWC array."""
    n, _, _, c = x.shape
    s = x.strides
    return np.lib.stride_tricks.as_strided(
        x, shape=(n, oh, ow, kh, kw, c), strides=(s[0], s[1] * sh, s[2] * sw, s[1] * dh, s[2] * dw, s[3]),
        writeable=False)


def _worst_case(w: np.ndarray, bias, in_lo: int, in_hi: int, axes) -> tuple[int, int]:
    """Accumulator bounds over every input in ``[in_lo, in_hi]`` (zero point already subtracted)."""
    pos = np.where(w > 0, w, 0).sum(axis=axes)
    neg = np.where(w < 0, w, 0).sum(axis=axes)
    hi = pos * in_hi + neg * in_lo
    lo = pos * in_lo + neg * in_hi
    if bias is not None:
        hi, lo = hi + bias, lo + bias
    return int(np.min(lo)), int(np.max(hi))


def _matmul_exact(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer matrix product through float64 BLAS: exact while every partial sum stays below 2^53."""
    bound = float(np.abs(a).max(initial=0)) * float(np.abs(b).max(initial=0)) * a.shape[-1]
    if bound < 2.0**53:
        return np.matmul(a.astype(np.float64), b.astype(np.float64)).astype(np.int64)
    return np.matmul(a.astype(np.int64), b.astype(np.int64))


def _conv_multipliers(ctx: OpContext, w: Tensor) -> np.ndarray:
    """``S_in·S_w[c] / S_out`` in double (per-channel), as ``PopulateConvolutionQuantizationParams``."""
    s_in, _ = ctx.tensor(0).qparams()
    s_out, _ = ctx.out().qparams()
    return np.float64(s_in) * w.scale.astype(np.float64) / np.float64(s_out)


def _input_offset(ctx: OpContext, i: int = 0):
    t = ctx.tensor(i)
    _, zp = t.qparams()
    return np.asarray(ctx.values[i], dtype=np.int64) - zp, zp


def _bias(ctx: OpContext, index: int):
    if not ctx.has_input(index) or ctx.values[index] is None:
        return None
    return np.asarray(ctx.values[index], dtype=np.int64)


def _is_int(t: Tensor) -> bool:
    return t.type_name in ("INT8", "INT16", "UINT8", "INT4")  # INT4: weights, unpacked by read_graph


def _require_quantized(ctx: OpContext) -> None:
    if not _is_int(ctx.tensor(0)) or not ctx.tensor(0).is_quantized:
        raise ctx.fail("only quantized int8/int16 inputs are run (this is a float op)")


# --- convolutions and matrix products ----------------------------------------------------------

def conv_2d(ctx: OpContext) -> list:
    _require_quantized(ctx)
    o = ctx.op.options
    x, zp_in = _input_offset(ctx, 0)
    w_t = ctx.tensor(1)
    w = np.asarray(ctx.values[1], dtype=np.int64)  # (OC, KH, KW, IC), symmetric
    oc, kh, kw, ic = w.shape
    groups = x.shape[3] // ic
    oh, pt, pb = _padding(o.padding, x.shape[1], kh, o.strideH, o.dilationHFactor)
    ow, pl, pr = _padding(o.padding, x.shape[2], kw, o.strideW, o.dilationWFactor)
    # Padding with the zero point contributes (Z − Z)·w = 0, as the kernel's skipped taps do.
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    cols = _patches(xp, kh, kw, o.strideH, o.strideW, o.dilationHFactor, o.dilationWFactor, oh, ow)
    if groups == 1:
        acc = _matmul_exact(cols.reshape(-1, kh * kw * ic), w.reshape(oc, -1).T).reshape(x.shape[0], oh, ow, oc)
    else:
        per = oc // groups
        parts = [_matmul_exact(cols[..., g * ic:(g + 1) * ic].reshape(-1, kh * kw * ic),
                               w[g * per:(g + 1) * per].reshape(per, -1).T) for g in range(groups)]
        acc = np.concatenate(parts, axis=-1).reshape(x.shape[0], oh, ow, oc)
    bias = _bias(ctx, 2)
    if bias is not None:
        acc = acc + bias
    lo_in, hi_in = _qinfo(ctx.tensor(0))
    worst = _worst_case(w, bias, lo_in - zp_in, hi_in - zp_in, axes=(1, 2, 3))
    lo, hi = activation_range(_fused(ctx), ctx.out())
    return [_requantize(ctx, acc, _conv_multipliers(ctx, w_t), lo, hi, worst,
                        int64_acc=ctx.tensor(0).type_name == "INT16")]


def depthwise_conv_2d(ctx: OpContext) -> list:
    _require_quantized(ctx)
    o = ctx.op.options
    x, zp_in = _input_offset(ctx, 0)
    w_t = ctx.tensor(1)
    w = np.asarray(ctx.values[1], dtype=np.int64)  # (1, KH, KW, IC·mult)
    _, kh, kw, oc = w.shape
    ic = x.shape[3]
    mult = oc // ic
    oh, pt, pb = _padding(o.padding, x.shape[1], kh, o.strideH, o.dilationHFactor)
    ow, pl, pr = _padding(o.padding, x.shape[2], kw, o.strideW, o.dilationWFactor)
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    cols = _patches(xp, kh, kw, o.strideH, o.strideW, o.dilationHFactor, o.dilationWFactor, oh, ow)
    if mult > 1:
        cols = np.repeat(cols, mult, axis=-1)
    acc = np.einsum("nhwijc,ijc->nhwc", cols.astype(np.float64), w[0].astype(np.float64)).astype(np.int64)
    bias = _bias(ctx, 2)
    if bias is not None:
        acc = acc + bias
    lo_in, hi_in = _qinfo(ctx.tensor(0))
    worst = _worst_case(w, bias, lo_in - zp_in, hi_in - zp_in, axes=(0, 1, 2))
    lo, hi = activation_range(_fused(ctx), ctx.out())
    return [_requantize(ctx, acc, _conv_multipliers(ctx, w_t), lo, hi, worst,
                        int64_acc=ctx.tensor(0).type_name == "INT16")]


def fully_connected(ctx: OpContext) -> list:
    _require_quantized(ctx)
    o = ctx.op.options
    x, zp_in = _input_offset(ctx, 0)
    w_t = ctx.tensor(1)
    if not _is_int(w_t):
        raise ctx.fail("float weights (hybrid models) are not run")
    w = _weights(w_t, ctx.values[1])  # (OC, depth)
    depth = w.shape[1]
    acc = _matmul_exact(x.reshape(-1, depth), w.T)
    bias = _bias(ctx, 2)
    if bias is not None:
        acc = acc + bias
    if getattr(o, "keepNumDims", False):
        acc = acc.reshape(*x.shape[:-1], w.shape[0])
    s_in, _ = ctx.tensor(0).qparams()
    s_out, _ = ctx.out().qparams()
    # LiteRT's reference FULLY_CONNECTED (int8 and int16) requantizes in double with
    # M = S_in·S_w/S_out: round(acc·M), no (M0, shift).
    reals = np.float64(s_in) * w_t.scale.astype(np.float64) / np.float64(s_out)
    lo_in, hi_in = _qinfo(ctx.tensor(0))
    worst = _worst_case(w, bias, lo_in - zp_in, hi_in - zp_in, axes=1)
    lo, hi = activation_range(_fused(ctx), ctx.out())
    return [_requantize(ctx, acc, reals, lo, hi, worst, in_double=True,
                        int64_acc=ctx.tensor(0).type_name == "INT16")]


def transpose_conv(ctx: OpContext) -> list:
    # inputs: output_shape, weights (OC, KH, KW, IC), input, optional bias
    if not _is_int(ctx.tensor(2)):
        raise ctx.fail("only quantized int8/int16 inputs are run (this is a float op)")
    o = ctx.op.options
    t_in = ctx.tensor(2)
    _, zp_in = t_in.qparams()
    x = np.asarray(ctx.values[2], dtype=np.int64) - zp_in
    w_t = ctx.tensor(1)
    w = np.asarray(ctx.values[1], dtype=np.int64)
    oc, kh, kw, ic = w.shape
    out_shape = [int(v) for v in np.asarray(ctx.values[0]).reshape(-1)]
    n, ih, iw, _ = x.shape
    out_h, out_w = out_shape[1], out_shape[2]
    _, pt, _ = _padding(o.padding, out_h, kh, o.strideH)
    _, pl, _ = _padding(o.padding, out_w, kw, o.strideW)
    full_h = max((ih - 1) * o.strideH + kh, pt + out_h)
    full_w = max((iw - 1) * o.strideW + kw, pl + out_w)
    acc = np.zeros((n, full_h, full_w, oc), dtype=np.int64)
    flat = x.reshape(-1, ic)
    for ky in range(kh):
        for kx in range(kw):
            contrib = _matmul_exact(flat, w[:, ky, kx, :].T).reshape(n, ih, iw, oc)
            acc[:, ky:ky + (ih - 1) * o.strideH + 1:o.strideH, kx:kx + (iw - 1) * o.strideW + 1:o.strideW] += contrib
    acc = acc[:, pt:pt + out_h, pl:pl + out_w]
    n_in = len(ctx.op.inputs)
    bias = _bias(ctx, 3) if n_in > 3 else None
    if bias is not None:
        acc = acc + bias
    s_in, _ = t_in.qparams()
    s_out, _ = ctx.out().qparams()
    reals = np.float64(s_in) * w_t.scale.astype(np.float64) / np.float64(s_out)
    lo_in, hi_in = _qinfo(t_in)
    worst = _worst_case(w, bias, lo_in - zp_in, hi_in - zp_in, axes=(1, 2, 3))
    lo, hi = activation_range(_fused(ctx), ctx.out())
    return [_requantize(ctx, acc, reals, lo, hi, worst, int64_acc=t_in.type_name == "INT16")]


def batch_matmul(ctx: OpContext) -> list:
    _require_quantized(ctx)
    o = ctx.op.options
    a, zp_a = _input_offset(ctx, 0)
    b, zp_b = _input_offset(ctx, 1)
    if getattr(o, "adjX", False):
        a = np.swapaxes(a, -1, -2)
    if getattr(o, "adjY", False):
        b = np.swapaxes(b, -1, -2)
    acc = _matmul_exact(a, b)
    s_a, _ = ctx.tensor(0).qparams()
    s_b, _ = ctx.tensor(1).qparams()
    s_out, _ = ctx.out().qparams()
    real = np.float64(F32(s_a) * F32(s_b)) / np.float64(s_out)
    lo, hi = _qinfo(ctx.out())
    return [_requantize(ctx, acc, real, lo, hi, int64_acc=ctx.tensor(0).type_name == "INT16")]


# --- elementwise arithmetic ----------------------------------------------------------------------

def _add_sub(ctx: OpContext, sign: int) -> list:
    _require_quantized(ctx)
    t1, t2, out = ctx.tensor(0), ctx.tensor(1), ctx.out()
    s1, z1 = t1.qparams()
    s2, z2 = t2.qparams()
    s_out, z_out = out.qparams()
    int16 = out.type_name == "INT16"
    if int16 and getattr(ctx.op.options, "potScaleInt16", False) and all(
            math.log2(s).is_integer() for s in (s1, s2, s_out)):
        raise ctx.fail("int16 ADD/SUB with power-of-two scales (the LSTM path) is not implemented")
    left_shift = 15 if int16 else 20
    twice_max = 2.0 * float(max(F32(s1), F32(s2)))
    r1 = float(s1) / twice_max
    r2 = float(s2) / twice_max
    r_out = twice_max / (float(1 << left_shift) * float(s_out))
    m1, sh1 = fp.quantize_multiplier(r1)
    m2, sh2 = fp.quantize_multiplier(r2)
    mo, sho = fp.quantize_multiplier(r_out)
    x1 = (np.asarray(ctx.values[0], np.int64) - z1) << left_shift
    x2 = (np.asarray(ctx.values[1], np.int64) - z2) << left_shift
    a = fp.multiply_by_quantized_multiplier_smaller_than_one(x1, m1, sh1)
    b = fp.multiply_by_quantized_multiplier_smaller_than_one(x2, m2, sh2)
    raw = fp.wrap_int32(a + sign * b)
    scaled = fp.multiply_by_quantized_multiplier_smaller_than_one(raw, mo, sho)
    unclamped = scaled + z_out
    lo, hi = activation_range(_fused(ctx), out)
    ctx.record(Requantization(
        accumulator=raw, real_multiplier=np.array([r_out]), m0=np.array([mo]), shift=np.array([sho]),
        unclamped=unclamped, clamp=(lo, hi),
        note=f"inputs rescaled by 2^{left_shift}·(S_i / 2·max(S_1, S_2)): M_1={r1:.6g}, M_2={r2:.6g}"))
    return [np.clip(unclamped, lo, hi).astype(out.dtype)]


def _plain(ctx: OpContext, fn) -> list | None:
    """Arithmetic on non-quantized integer tensors (shape computations): exact numpy."""
    t = ctx.tensor(0)
    if t.is_quantized or not np.issubdtype(np.asarray(ctx.values[0]).dtype, np.integer):
        return None
    return [fn(np.asarray(ctx.values[0]), np.asarray(ctx.values[1])).astype(ctx.out().dtype)]


def add(ctx: OpContext) -> list:
    return _plain(ctx, np.add) or _add_sub(ctx, +1)


def sub(ctx: OpContext) -> list:
    return _plain(ctx, np.subtract) or _add_sub(ctx, -1)


def mul(ctx: OpContext) -> list:
    plain = _plain(ctx, np.multiply)
    if plain is not None:
        return plain
    _require_quantized(ctx)
    t1, t2, out = ctx.tensor(0), ctx.tensor(1), ctx.out()
    s1, z1 = t1.qparams()
    s2, z2 = t2.qparams()
    s_out, _ = out.qparams()
    real = np.float64(F32(s1) * F32(s2) / F32(s_out))  # float32 in the kernel's Prepare
    acc = (np.asarray(ctx.values[0], np.int64) - z1) * (np.asarray(ctx.values[1], np.int64) - z2)
    lo, hi = activation_range(_fused(ctx), out)
    return [_requantize(ctx, acc, real, lo, hi)]


def squared_difference(ctx: OpContext) -> list:
    _require_quantized(ctx)
    t1, t2, out = ctx.tensor(0), ctx.tensor(1), ctx.out()
    s1, z1 = t1.qparams()
    s2, z2 = t2.qparams()
    s_out, z_out = out.qparams()
    left_shift = 7
    twice_max = 2.0 * float(max(F32(s1), F32(s2)))
    r1 = float(s1) / twice_max
    r2 = float(s2) / twice_max
    r_out = (twice_max * twice_max) / ((1 << (left_shift * 2)) * float(s_out))
    m1, sh1 = fp.quantize_multiplier(r1)
    m2, sh2 = fp.quantize_multiplier(r2)
    mo, sho = fp.quantize_multiplier(r_out)
    x1 = (np.asarray(ctx.values[0], np.int64) - z1) << left_shift
    x2 = (np.asarray(ctx.values[1], np.int64) - z2) << left_shift
    a = fp.multiply_by_quantized_multiplier_smaller_than_one(x1, m1, sh1)
    b = fp.multiply_by_quantized_multiplier_smaller_than_one(x2, m2, sh2)
    d = a - b
    raw = fp.wrap_int32(d * d)
    scaled = fp.multiply_by_quantized_multiplier_smaller_than_one(raw, mo, sho)
    unclamped = scaled + z_out
    lo, hi = _qinfo(out)
    ctx.record(Requantization(accumulator=raw, real_multiplier=np.array([r_out]), m0=np.array([mo]),
                              shift=np.array([sho]), unclamped=unclamped, clamp=(lo, hi)))
    return [np.clip(unclamped, lo, hi).astype(out.dtype)]


def _same_scale_elementwise(ctx: OpContext, fn) -> list:
    return [fn(*[np.asarray(v) for v in ctx.values[:2]]).astype(ctx.out().dtype)]


def maximum(ctx: OpContext) -> list:
    return _same_scale_elementwise(ctx, np.maximum)


def minimum(ctx: OpContext) -> list:
    return _same_scale_elementwise(ctx, np.minimum)


# --- reductions and pooling ----------------------------------------------------------------------

def _axes(ctx: OpContext) -> tuple[int, ...]:
    x = np.asarray(ctx.values[0])
    axes = np.asarray(ctx.values[1]).reshape(-1)
    return tuple(sorted({int(a) % x.ndim for a in axes}))


def _mean_or_sum(ctx: OpContext, compute_sum: bool) -> list:
    t_in, out = ctx.tensor(0), ctx.out()
    if not _is_int(t_in):
        raise ctx.fail("only quantized int8/int16 inputs are run (this is a float op)")
    x = np.asarray(ctx.values[0])
    as_uint8 = compute_sum and x.dtype == np.int8
    if compute_sum and x.dtype == np.int16:
        raise ctx.fail("int16 SUM is not implemented")
    # LiteRT's reference SUM (reduce.cc, QuantizedMeanOrSum<kReference>) reads int8 data as uint8 and
    # writes uint8 (clamped to [0, 255]) into the int8 output: reproduced here bit for bit.
    x = x.view(np.uint8).astype(np.int64) if as_uint8 else x.astype(np.int64)
    axes = _axes(ctx)
    keep = bool(getattr(ctx.op.options, "keepDims", False))
    s_in, z_in = t_in.qparams()
    s_out, z_out = out.qparams()
    real = np.float64(s_in) / np.float64(s_out)
    m0, shift = fp.quantize_multiplier(real)
    total = fp.wrap_int32(x.sum(axis=axes, keepdims=keep))
    count = int(np.prod([x.shape[a] for a in axes]))
    if not compute_sum:
        s = min(count.bit_length() - 1, 32, 31 + shift)  # 63 − CountLeadingZeros64(count), clamped
        m0 = int((m0 << s) // count)
        shift = shift - s
        real = real / count
    shifted = fp.wrap_int32(total - z_in * count)
    scaled = fp.multiply_by_quantized_multiplier(shifted, m0, shift)
    unclamped = scaled + z_out
    lo, hi = (0, 255) if as_uint8 else _qinfo(out)
    note = f"mean over {count} values: M0 folds in 1/{count}"
    if as_uint8:
        note = "LiteRT's reference SUM reads the int8 input as uint8 and writes uint8 bytes (a kernel bug)"
    elif compute_sum:
        note = ""
    ctx.record(Requantization(accumulator=shifted, real_multiplier=np.array([real]), m0=np.array([m0]),
                              shift=np.array([shift]), unclamped=unclamped, clamp=(lo, hi), note=note))
    result = np.clip(unclamped, lo, hi)
    return [result.astype(np.uint8).view(np.int8) if as_uint8 else result.astype(out.dtype)]


def mean(ctx: OpContext) -> list:
    return _mean_or_sum(ctx, compute_sum=False)


def sum_(ctx: OpContext) -> list:
    return _mean_or_sum(ctx, compute_sum=True)


def reduce_max(ctx: OpContext) -> list:
    keep = bool(getattr(ctx.op.options, "keepDims", False))
    return [np.asarray(ctx.values[0]).max(axis=_axes(ctx), keepdims=keep)]


def _pool_windows(ctx: OpContext, fill):
    o = ctx.op.options
    x = np.asarray(ctx.values[0], dtype=np.int64)
    oh, pt, pb = _padding(o.padding, x.shape[1], o.filterHeight, o.strideH)
    ow, pl, pr = _padding(o.padding, x.shape[2], o.filterWidth, o.strideW)
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=fill)
    return _patches(xp, o.filterHeight, o.filterWidth, o.strideH, o.strideW, 1, 1, oh, ow), (pt, pb, pl, pr), x.shape


def max_pool_2d(ctx: OpContext) -> list:
    if not _is_int(ctx.tensor(0)):
        raise ctx.fail("only quantized int8/int16 inputs are run (this is a float op)")
    cols, _, _ = _pool_windows(ctx, fill=np.iinfo(np.int64).min)
    lo, hi = activation_range(_fused(ctx), ctx.out())
    return [np.clip(cols.max(axis=(3, 4)), lo, hi).astype(ctx.out().dtype)]


def average_pool_2d(ctx: OpContext) -> list:
    if not _is_int(ctx.tensor(0)):
        raise ctx.fail("only quantized int8/int16 inputs are run (this is a float op)")
    cols, pads, shape = _pool_windows(ctx, fill=0)
    o = ctx.op.options
    ones = np.pad(np.ones((1, shape[1], shape[2], 1), np.int64), ((0, 0), pads[:2], pads[2:], (0, 0)))
    count = _patches(ones, o.filterHeight, o.filterWidth, o.strideH, o.strideW, 1, 1,
                     cols.shape[1], cols.shape[2]).sum(axis=(3, 4))
    total = cols.sum(axis=(3, 4))
    # Round to nearest, halves away from zero, with C's truncating division.
    avg = np.where(total > 0, _c_div(total + count // 2, count), _c_div(total - count // 2, count))
    lo, hi = activation_range(_fused(ctx), ctx.out())
    return [np.clip(avg, lo, hi).astype(ctx.out().dtype)]


# --- activations ---------------------------------------------------------------------------------

def _lut_int8(ctx: OpContext, transform) -> np.ndarray:
    """``LUTPopulate<int8>``: table[q] = clamp(round(f(S_in·(q − Z_in)) / S_out) + Z_out), float32 arithmetic."""
    t_in, out = ctx.tensor(0), ctx.out()
    s_in, z_in = t_in.qparams()
    s_out, z_out = out.qparams()
    qmin, qmax = _qinfo(t_in)
    inverse = F32(1.0) / F32(s_out)
    table = np.empty(qmax - qmin + 1, dtype=np.int64)
    for i, q in enumerate(range(qmin, qmax + 1)):
        dequantized = F32(s_in) * F32(q - z_in)
        transformed = F32(transform(dequantized))
        rescaled = fp.round_half_away(F32(transformed * inverse))
        table[i] = min(max(int(rescaled) + z_out, qmin), qmax)
    return table


def _apply_lut(ctx: OpContext, transform, what: str) -> list:
    t_in = ctx.tensor(0)
    if t_in.type_name not in ("INT8", "UINT8"):
        raise ctx.fail(f"{what} is run for int8 (a 256-entry table); int16 is not implemented")
    table = _lut_int8(ctx, transform)
    qmin, _ = _qinfo(t_in)
    ctx.details["lut"] = table
    return [table[np.asarray(ctx.values[0], np.int64) - qmin].astype(ctx.out().dtype)]


def _f32(fn):
    return lambda v: F32(fn(float(v)))


def logistic(ctx: OpContext) -> list:
    def sigmoid(v):
        return F32(1.0) / (F32(1.0) + F32(math.exp(-float(v))))
    return _apply_lut(ctx, sigmoid, "LOGISTIC")


def tanh(ctx: OpContext) -> list:
    return _apply_lut(ctx, _f32(math.tanh), "TANH")


def gelu(ctx: OpContext) -> list:
    approximate = bool(getattr(ctx.op.options, "approximate", False))
    if approximate:
        sqrt_2_over_pi = F32(math.sqrt(2.0 / math.pi))

        def transform(v):
            v = F32(v)
            inner = sqrt_2_over_pi * (v + F32(0.044715) * v * v * v)
            return F32(0.5) * v * (F32(1.0) + F32(math.tanh(float(inner))))
    else:
        def transform(v):
            v = F32(v)
            return F32(0.5) * v * F32(math.erfc(float(v * F32(-math.sqrt(0.5)))))
    return _apply_lut(ctx, transform, "GELU")


def lut_int16(input_scale: float, input_zero_point: int, output_scale: float, output_zero_point: int,
              transform) -> np.ndarray:
    """``LUTPopulateInt16<double>``: 513 samples of ``transform`` over the int16 input range, with the
    midpoint bias correction of LiteRT's table generator."""
    input_min = input_scale * (-32768 - input_zero_point)
    input_max = input_scale * (32767 - input_zero_point)
    output_min = output_scale * (-32768 - output_zero_point)
    output_max = output_scale * (32767 - output_zero_point)
    steps = 512
    step = (input_max - input_min) / steps
    half_step = step / 2
    scaling = 65536.0 / (output_max - output_min)
    rnd = fp.round_half_away
    lut = np.zeros(steps + 1, dtype=np.int64)
    for i in range(steps):
        val = transform(input_min + i * step)
        val_midpoint = transform(input_min + i * step + half_step)
        val_next = transform(input_min + (i + 1) * step)
        sample_val = rnd(val * scaling)
        midpoint_interp_val = rnd((val_next * scaling + rnd(val * scaling)) / 2)
        midpoint_val = rnd(val_midpoint * scaling)
        bias = rnd((midpoint_interp_val - midpoint_val) / 2)
        lut[i] = int(min(max(sample_val - bias, -32768.0), 32767.0))
    lut[steps] = int(min(max(rnd(transform(input_max) * scaling), -32768.0), 32767.0))
    return lut


def lut_lookup_int16(value, lut: np.ndarray):
    """``LUTLookup`` for int16: linear interpolation between the 513 table entries."""
    value = np.asarray(value, dtype=np.int64)
    index = 256 + (value >> 7)
    offset = value & 0x7F
    base = lut[index]
    slope = lut[index + 1] - base
    return base + ((slope * offset + 64) >> 7)


def _softmax_int16(ctx: OpContext) -> list:
    t_in = ctx.tensor(0)
    beta = F32(getattr(ctx.op.options, "beta", 1.0))
    s_in, _ = t_in.qparams()
    span = 65535
    exp_lut = lut_int16(10.0 / span, 32767, 2.0 / span, 0, math.exp)
    recip_lut = lut_int16(1.0 / span, -32768, 2.0 / span, 0, lambda v: 1.0 / (1.0 + v))
    m0, shift = fp.quantize_multiplier(float(F32(s_in) * beta) / (10.0 / 65535.0))
    x = np.asarray(ctx.values[0], dtype=np.int64)
    diff = x - x.max(axis=-1, keepdims=True)
    scaled = fp.multiply_by_quantized_multiplier(diff, m0, shift)
    exps = lut_lookup_int16(np.clip(scaled + 32767, -32768, 32767), exp_lut)
    sum_of_exps = fp.wrap_int32(exps.sum(axis=-1, keepdims=True))
    headroom_plus_one = fp.count_leading_zeros32(sum_of_exps)
    shifted_sum = ((sum_of_exps << (headroom_plus_one - 1)) + (1 << 13)) >> 14
    sym = np.clip(shifted_sum - ((1 << 15) + (1 << 16)), -32768, 32767)
    reciprocal = lut_lookup_int16(sym, recip_lut)
    right_shift = 31 - headroom_plus_one
    result = (exps * reciprocal + (np.int64(1) << (right_shift - 1))) >> right_shift
    ctx.details["softmax"] = {"input_multiplier": m0, "input_shift": shift}
    return [np.clip(result, 0, 32767).astype(np.int16)]


def softmax(ctx: OpContext) -> list:
    t_in, out = ctx.tensor(0), ctx.out()
    if t_in.type_name == "INT16" and out.type_name == "INT16":
        return _softmax_int16(ctx)
    if t_in.type_name != "INT8" or out.type_name != "INT8":
        raise ctx.fail("SOFTMAX is run for int8 → int8 and int16 → int16")
    beta = float(getattr(ctx.op.options, "beta", 1.0))
    s_in, _ = t_in.qparams()
    scaled_diff_integer_bits, accumulation_integer_bits = 5, 12
    # PreprocessSoftmaxScaling (double rounding build): min(β·S_in·2^(31−5), 2^31 − 1)
    real = min(beta * float(s_in) * float(1 << (31 - scaled_diff_integer_bits)), float((1 << 31) - 1))
    m0, left_shift = fp.quantize_multiplier(real)
    radius = math.floor(((1 << scaled_diff_integer_bits) - 1) * float(1 << (31 - scaled_diff_integer_bits))
                        / float(1 << left_shift))
    diff_min = -radius
    x = np.asarray(ctx.values[0], dtype=np.int64)
    diff = x - x.max(axis=-1, keepdims=True)
    used = diff >= diff_min
    rescaled = fp.multiply_by_quantized_multiplier_greater_than_one(diff, m0, left_shift)
    exps = fp.exp_on_negative_values(rescaled, scaled_diff_integer_bits)  # Q0.31
    in_accum = fp.rescale(exps, 0, accumulation_integer_bits)
    sum_of_exps = fp.wrap_int32(np.where(used, in_accum, 0).sum(axis=-1, keepdims=True))
    recip, bits_over_unit = fp.get_reciprocal(sum_of_exps, accumulation_integer_bits)
    exponent = bits_over_unit + 31 - 8
    unsat = fp.rounding_divide_by_pot(fp.saturating_rounding_doubling_high_mul(recip, exps), exponent)
    result = np.where(used, np.clip(unsat - 128, -128, 127), -128)
    ctx.details["softmax"] = {"input_multiplier": m0, "input_left_shift": left_shift, "diff_min": diff_min}
    return [result.astype(np.int8)]


def hard_swish(ctx: OpContext) -> list:
    t_in, out = ctx.tensor(0), ctx.out()
    if t_in.type_name not in ("INT8", "UINT8"):
        raise ctx.fail("HARD_SWISH is run for int8 only")
    s_in, z_in = t_in.qparams()
    s_out, z_out = out.qparams()
    hires_input_scale = F32(1.0 / 128.0) * F32(s_in)
    reluish_scale = F32(3.0 / 32768.0)
    out_m, out_exp = fp.quantize_multiplier(float(hires_input_scale / F32(s_out)))
    rel_m, rel_exp = fp.quantize_multiplier(float(hires_input_scale / reluish_scale))

    def to_int16(m):
        return 32767 if m >= 2**31 - 1 - (1 << 15) else (m + (1 << 15)) >> 16

    out_m16, rel_m16 = to_int16(out_m), to_int16(rel_m)
    x = np.asarray(ctx.values[0], dtype=np.int64) - z_in
    hires = x * 128
    preshift = _srdhm16(hires, out_m16)
    reluish = hires
    if rel_exp > 0:
        reluish = np.clip(reluish * (1 << (rel_exp - 1)), -32768, 32767)
    reluish = _srdhm16(reluish, rel_m16)
    if rel_exp > 0:
        reluish = np.clip(reluish * 2, -32768, 32767)
    if rel_exp < 0:
        reluish = fp.rounding_divide_by_pot(reluish, -rel_exp)
    reluish = (reluish + (1 << 15)) >> 1
    both_min = (reluish == -32768) & (preshift == -32768)
    pre_out = np.where(both_min, 32767, _c_div(reluish * preshift, 1 << 15))
    value = fp.rounding_divide_by_pot(pre_out, -out_exp) + z_out
    qmin, qmax = _qinfo(out)
    return [np.clip(value, qmin, qmax).astype(out.dtype)]


def _srdhm16(a, b):
    """gemmlowp's int16 ``SaturatingRoundingDoublingHighMul``."""
    a = np.asarray(a, np.int64)
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 14, 1 - (1 << 14))
    r = _c_div(ab + nudge, 1 << 15)
    r = ((r + 2**15) & 0xFFFF) - 2**15  # the int16 cast
    return np.where((a == -32768) & (b == -32768), 32767, r)


def _relu_x(ctx: OpContext, act_min: float, act_max: float) -> list:
    t_in, out = ctx.tensor(0), ctx.out()
    if not _is_int(t_in):
        raise ctx.fail("only quantized int8/int16 inputs are run (this is a float op)")
    s_in, z_in = t_in.qparams()
    s_out, z_out = out.qparams()
    qmin, qmax = _qinfo(out)
    lo = max(qmin, z_out + int(fp.round_half_away(F32(act_min) / F32(s_out))))
    hi = qmax if math.isinf(act_max) else min(qmax, z_out + int(fp.round_half_away(F32(act_max) / F32(s_out))))
    real = np.float64(F32(s_in) / F32(s_out))
    x = np.asarray(ctx.values[0], np.int64) - z_in
    return [_requantize(ctx, x, real, lo, hi)]


def relu(ctx: OpContext) -> list:
    return _relu_x(ctx, 0.0, math.inf)


def relu6(ctx: OpContext) -> list:
    return _relu_x(ctx, 0.0, 6.0)


def relu_n1_to_1(ctx: OpContext) -> list:
    return _relu_x(ctx, -1.0, 1.0)


def leaky_relu(ctx: OpContext) -> list:
    t_in, out = ctx.tensor(0), ctx.out()
    if not _is_int(t_in):
        raise ctx.fail("only quantized int8/int16 inputs are run (this is a float op)")
    alpha = F32(ctx.op.options.alpha)
    s_in, z_in = t_in.qparams()
    s_out, z_out = out.qparams()
    m_alpha, sh_alpha = fp.quantize_multiplier(float(F32(s_in) * alpha / F32(s_out)))
    m_id, sh_id = fp.quantize_multiplier(float(F32(s_in) / F32(s_out)))
    x = np.asarray(ctx.values[0], np.int64) - z_in
    pos = fp.multiply_by_quantized_multiplier(x, m_id, sh_id)
    neg = fp.multiply_by_quantized_multiplier(x, abs(m_alpha), sh_alpha)
    neg = -neg if m_alpha < 0 else neg
    unclamped = z_out + np.where(x >= 0, pos, neg)
    qmin, qmax = _qinfo(out)
    return [np.clip(unclamped, qmin, qmax).astype(out.dtype)]


# --- conversions ---------------------------------------------------------------------------------

def quantize(ctx: OpContext) -> list:
    t_in, out = ctx.tensor(0), ctx.out()
    s_out, z_out = out.qparams()
    qmin, qmax = _qinfo(out)
    x = np.asarray(ctx.values[0])
    if np.issubdtype(x.dtype, np.floating):
        if out.per_channel:
            raise ctx.fail("per-channel QUANTIZE is not implemented")
        q = fp.round_half_away(x.astype(F32) / F32(s_out)).astype(np.int64) + z_out
        return [np.clip(q, qmin, qmax).astype(out.dtype)]
    s_in, z_in = t_in.qparams()
    real = np.float64(s_in) / np.float64(s_out)
    return [_requantize(ctx, x.astype(np.int64) - z_in, real, qmin, qmax)]


def dequantize(ctx: OpContext) -> list:
    t_in = ctx.tensor(0)
    x = np.asarray(ctx.values[0])
    if t_in.type_name == "FLOAT16":
        return [x.astype(np.float32)]
    if t_in.per_channel:
        shape = [1] * x.ndim
        shape[t_in.quantized_dimension] = -1
        scale = t_in.scale.astype(np.float64).reshape(shape)
        zp = t_in.zero_point.reshape(shape)
        return [(scale * (x.astype(np.int64) - zp)).astype(np.float32)]
    s, z = t_in.qparams()
    return [(np.float64(s) * (x.astype(np.int64) - z)).astype(np.float32)]


def rsqrt(ctx: OpContext) -> list:
    t_in, out = ctx.tensor(0), ctx.out()
    if t_in.type_name != "INT8":
        raise ctx.fail("RSQRT is run for int8 only")
    s_in, z_in = t_in.qparams()
    s_out, z_out = out.qparams()
    # elementwise.cc RsqrtPrepare / RsqrtEvalQuantizedInt8: a per-value fixed-point inverse sqrt.
    table = _rsqrt_table(float(s_in), z_in, float(s_out), z_out)
    ctx.details["lut"] = table
    return [table[np.asarray(ctx.values[0], np.int64) + 128].astype(np.int8)]


def _rsqrt_table(s_in: float, z_in: int, s_out: float, z_out: int) -> np.ndarray:
    kshift = 20
    # SetRsqrtOutputMultiplier: 1. / (sqrtf(S_in) · S_out), the product in float32.
    m, shift = fp.quantize_multiplier(1.0 / float(np.sqrt(F32(s_in)) * F32(s_out)))
    table = np.zeros(256, np.int64)
    for q in range(-128, 128):
        value = q - z_in
        if value <= 0:
            table[q + 128] = 127 if value == 0 else -128  # error in the kernel; marked
            continue
        inv_sqrt_multiplier, inv_sqrt_shift = _inv_sqrt_quantized_multiplier_exp(value, -1)
        data = int(fp.multiply_by_quantized_multiplier(1, inv_sqrt_multiplier, inv_sqrt_shift + kshift))
        output = int(fp.multiply_by_quantized_multiplier(data, m, shift - kshift)) + z_out
        table[q + 128] = min(max(output, -128), 127)
    return table


def _inv_sqrt_quantized_multiplier_exp(value: int, reverse_shift: int) -> tuple[int, int]:
    """TFLite's ``GetInvSqrtQuantizedMultiplierExp`` (common.h), in Python ints."""
    if value <= 1:
        return 2**31 - 1, 0
    shift = 11
    while value >= (1 << 29):
        value //= 4
        shift += 1
    max_left_shift_bits = (32 - value.bit_length()) - 1
    left_shift_bit_pairs = max_left_shift_bits // 2 - 1
    shift -= left_shift_bit_pairs
    value <<= 2 * left_shift_bit_pairs
    fixedpoint_input = value >> 1  # FixedPoint<int32, 3>
    half_input = fp._saturating_multiply_by_pot(fixedpoint_input, -1)
    fixedpoint_half_three = (3 << 28) >> 1  # F3 constant 1.5 raw = 1.5·2^28
    x = 1 << 28  # F3 one
    for _ in range(5):
        x3 = fp.rescale(fp.saturating_rounding_doubling_high_mul(
            fp.saturating_rounding_doubling_high_mul(x, x), x), 9, 3)
        difference = fp.wrap_int32(fp.saturating_rounding_doubling_high_mul(fixedpoint_half_three, x)
                                   - fp.saturating_rounding_doubling_high_mul(half_input, x3))  # Q6.25
        x = int(fp.rescale(difference, 6, 3))
    fixedpoint_half_sqrt_2 = 1518500250  # F0 sqrt(2)/2
    x = int(fp.saturating_rounding_doubling_high_mul(x, fixedpoint_half_sqrt_2))
    output_inv_sqrt = x
    if shift < 0:
        output_inv_sqrt <<= -shift
        shift = 0
    output_shift = shift * reverse_shift
    return output_inv_sqrt, output_shift


# --- data movement -------------------------------------------------------------------------------

def _target_shape(shape, size: int) -> list[int]:
    """A reshape target; a static batch of 1 written into the graph follows the data's batch."""
    shape = [int(v) for v in shape]
    if -1 not in shape and int(np.prod(shape)) != size and shape and shape[0] == 1:
        shape[0] = -1
    return shape


def reshape(ctx: OpContext) -> list:
    x = np.asarray(ctx.values[0])
    if ctx.has_input(1) and ctx.values[1] is not None:
        shape = np.asarray(ctx.values[1]).reshape(-1)
    else:
        shape = getattr(ctx.op.options, "newShape", None)
        if shape is None:
            shape = ctx.out().shape
    return [x.reshape(_target_shape(shape, x.size))]


def squeeze(ctx: OpContext) -> list:
    x = np.asarray(ctx.values[0])
    dims = getattr(ctx.op.options, "squeezeDims", None)
    if dims is None or len(dims) == 0:
        return [np.squeeze(x)]
    return [np.squeeze(x, axis=tuple(int(d) % x.ndim for d in dims))]


def expand_dims(ctx: OpContext) -> list:
    x = np.asarray(ctx.values[0])
    axis = int(np.asarray(ctx.values[1]).reshape(-1)[0])
    return [np.expand_dims(x, axis if axis >= 0 else x.ndim + 1 + axis)]


def concatenation(ctx: OpContext) -> list:
    out = ctx.out()
    arrays = [np.asarray(v) for v in ctx.values]
    if out.is_quantized:
        for i in range(len(arrays)):
            t = ctx.tensor(i)
            if t.qparams() != out.qparams():
                raise ctx.fail("inputs with another scale or zero point than the output")
    axis = int(ctx.op.options.axis)
    result = np.concatenate(arrays, axis=axis)
    lo, hi = activation_range(_fused(ctx), out) if out.is_quantized else (None, None)
    return [np.clip(result, lo, hi) if lo is not None else result]


def pad(ctx: OpContext) -> list:
    x = np.asarray(ctx.values[0])
    pads = np.asarray(ctx.values[1]).reshape(-1, 2)
    fill = 0
    if len(ctx.op.inputs) > 2 and ctx.has_input(2):
        fill = np.asarray(ctx.values[2]).reshape(-1)[0]
    elif ctx.out().is_quantized:
        fill = ctx.out().qparams()[1]
    return [np.pad(x, [(int(a), int(b)) for a, b in pads], constant_values=fill).astype(x.dtype)]


def gather(ctx: OpContext) -> list:
    x = np.asarray(ctx.values[0])
    idx = np.asarray(ctx.values[1]).astype(np.int64)
    axis = int(getattr(ctx.op.options, "axis", 0)) % x.ndim
    batch_dims = int(getattr(ctx.op.options, "batchDims", 0))
    if batch_dims:
        raise ctx.fail("GATHER with batch_dims is not implemented")
    if np.any((idx < 0) | (idx >= x.shape[axis])):
        raise ValueError(f"GATHER (op {ctx.op.index}): index out of range [0, {x.shape[axis]}).")
    return [np.take(x, idx, axis=axis)]


def transpose(ctx: OpContext) -> list:
    return [np.transpose(np.asarray(ctx.values[0]), [int(p) for p in np.asarray(ctx.values[1]).reshape(-1)])]


def _mask_bits(mask: int, i: int) -> bool:
    return bool((mask >> i) & 1)


def strided_slice(ctx: OpContext) -> list:
    x = np.asarray(ctx.values[0])
    begin = [int(v) for v in np.asarray(ctx.values[1]).reshape(-1)]
    end = [int(v) for v in np.asarray(ctx.values[2]).reshape(-1)]
    strides = [int(v) for v in np.asarray(ctx.values[3]).reshape(-1)] if ctx.has_input(3) else [1] * len(begin)
    o = ctx.op.options
    if o.ellipsisMask or o.newAxisMask:
        raise ctx.fail("STRIDED_SLICE with an ellipsis or new-axis mask is not implemented")
    offset = bool(getattr(o, "offset", False))
    index = []
    for i in range(len(begin)):
        b = None if _mask_bits(o.beginMask, i) else begin[i]
        e = None if _mask_bits(o.endMask, i) else end[i]
        if offset and e is not None and b is not None:
            e = b + e
        if _mask_bits(o.shrinkAxisMask, i):
            index.append(begin[i])
        else:
            index.append(slice(b, e, strides[i]))
    return [x[tuple(index)]]


def slice_(ctx: OpContext) -> list:
    x = np.asarray(ctx.values[0])
    begin = [int(v) for v in np.asarray(ctx.values[1]).reshape(-1)]
    size = [int(v) for v in np.asarray(ctx.values[2]).reshape(-1)]
    return [x[tuple(slice(b, None if s == -1 else b + s) for b, s in zip(begin, size))]]


def split(ctx: OpContext) -> list:
    axis = int(np.asarray(ctx.values[0]).reshape(-1)[0])
    x = np.asarray(ctx.values[1])
    return list(np.split(x, int(ctx.op.options.numSplits), axis=axis))


def split_v(ctx: OpContext) -> list:
    x = np.asarray(ctx.values[0])
    sizes = [int(v) for v in np.asarray(ctx.values[1]).reshape(-1)]
    axis = int(np.asarray(ctx.values[2]).reshape(-1)[0]) % x.ndim
    if -1 in sizes:
        sizes[sizes.index(-1)] = x.shape[axis] - (sum(sizes) + 1)
    return list(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


def pack(ctx: OpContext) -> list:
    return [np.stack([np.asarray(v) for v in ctx.values], axis=int(ctx.op.options.axis))]


def unpack(ctx: OpContext) -> list:
    x = np.asarray(ctx.values[0])
    axis = int(ctx.op.options.axis)
    return [np.take(x, i, axis=axis) for i in range(x.shape[axis])]


def shape(ctx: OpContext) -> list:
    return [np.asarray(np.asarray(ctx.values[0]).shape, dtype=ctx.out().dtype or np.int32)]


def tile(ctx: OpContext) -> list:
    return [np.tile(np.asarray(ctx.values[0]), [int(v) for v in np.asarray(ctx.values[1]).reshape(-1)])]


def broadcast_to(ctx: OpContext) -> list:
    return [np.broadcast_to(np.asarray(ctx.values[0]), [int(v) for v in np.asarray(ctx.values[1])]).copy()]


def fill(ctx: OpContext) -> list:
    return [np.full([int(v) for v in np.asarray(ctx.values[0]).reshape(-1)], np.asarray(ctx.values[1]).reshape(-1)[0])]


def cast(ctx: OpContext) -> list:
    return [np.asarray(ctx.values[0]).astype(ctx.out().dtype)]


def arg_max(ctx: OpContext) -> list:
    axis = int(np.asarray(ctx.values[1]).reshape(-1)[0])
    return [np.argmax(np.asarray(ctx.values[0]), axis=axis).astype(ctx.out().dtype)]


def neg(ctx: OpContext) -> list:
    """``reference_ops::Negate``: −q on the raw values (the converter gives the output ``Z_out = −Z_in``)."""
    x = np.asarray(ctx.values[0])
    if np.issubdtype(x.dtype, np.integer):
        info = np.iinfo(x.dtype)
        wrapped = (-x.astype(np.int64) - info.min) % (int(info.max) - int(info.min) + 1) + info.min
        return [wrapped.astype(x.dtype)]
    return [-x]


def _comparison(fn):
    def kernel(ctx: OpContext) -> list:
        if any(ctx.tensor(i).is_quantized for i in range(2)):
            raise ctx.fail("comparisons of quantized tensors are not implemented")
        return [fn(np.asarray(ctx.values[0]), np.asarray(ctx.values[1]))]
    kernel.__name__ = fn.__name__
    return kernel


def select_v2(ctx: OpContext) -> list:
    return [np.where(np.asarray(ctx.values[0]), ctx.values[1], ctx.values[2]).astype(ctx.out().dtype)]


def reduce_prod(ctx: OpContext) -> list:
    if ctx.tensor(0).is_quantized:
        raise ctx.fail("REDUCE_PROD of a quantized tensor is not implemented")
    keep = bool(getattr(ctx.op.options, "keepDims", False))
    return [np.prod(np.asarray(ctx.values[0]), axis=_axes(ctx), keepdims=keep).astype(ctx.out().dtype)]


def _resize_size(ctx: OpContext) -> tuple[int, int]:
    size = np.asarray(ctx.values[1]).reshape(-1)
    return int(size[0]), int(size[1])


def resize_bilinear(ctx: OpContext) -> list:
    if not _is_int(ctx.tensor(0)):
        raise ctx.fail("only quantized int8/int16 inputs are run (this is a float op)")
    o = ctx.op.options
    x = np.asarray(ctx.values[0], dtype=np.int64)
    out_h, out_w = _resize_size(ctx)
    in_h, in_w = x.shape[1], x.shape[2]
    align, half = bool(o.alignCorners), bool(o.halfPixelCenters)

    def axis_values(in_size, out_size):
        scale = ((1 << 10) * in_size + out_size // 2) // out_size
        if align and out_size > 1:
            scale = ((1 << 10) * (in_size - 1) + (out_size - 1) // 2) // (out_size - 1)
        v = np.arange(out_size, dtype=np.int64)
        scaled = v * scale + scale // 2 - (1 << 9) if half else v * scale
        lower = np.maximum(_c_div(scaled, 1 << 10), 0)
        upper = np.minimum(_c_div(scaled + (1 << 10) - 1, 1 << 10), in_size - 1)
        return scaled, lower, upper

    ys, y0, y1 = axis_values(in_h, out_h)
    xs, x0, x1 = axis_values(in_w, out_w)
    dy = (ys - (1 << 10) * y0)[None, :, None, None]
    dx = (xs - (1 << 10) * x0)[None, None, :, None]
    ll = x[:, y0][:, :, x0]
    lu = x[:, y1][:, :, x0]
    rl = x[:, y0][:, :, x1]
    ru = x[:, y1][:, :, x1]
    one = 1 << 10
    total = ll * (one - dy) * (one - dx) + lu * dy * (one - dx) + rl * (one - dy) * dx + ru * dy * dx
    rounded = _c_div(total + np.where(total > 0, 1 << 19, -(1 << 19)), 1 << 20)
    return [rounded.astype(ctx.out().dtype)]


def resize_nearest_neighbor(ctx: OpContext) -> list:
    o = ctx.op.options
    x = np.asarray(ctx.values[0])
    out_h, out_w = _resize_size(ctx)
    align, half = bool(o.alignCorners), bool(o.halfPixelCenters)

    def nearest(in_size, out_size):
        scale = (F32(in_size - 1) / F32(out_size - 1)) if (align and out_size > 1) else F32(in_size) / F32(out_size)
        offset = F32(0.5) if half else F32(0.0)
        v = (np.arange(out_size).astype(F32) + offset) * scale
        idx = fp.round_half_away(v).astype(np.int64) if align else np.floor(v).astype(np.int64)
        idx = np.minimum(idx, in_size - 1)
        return np.maximum(idx, 0) if half else idx

    return [x[:, nearest(x.shape[1], out_h)][:, :, nearest(x.shape[2], out_w)]]


KERNELS = {
    "ADD": add,
    "ARG_MAX": arg_max,
    "AVERAGE_POOL_2D": average_pool_2d,
    "BATCH_MATMUL": batch_matmul,
    "BROADCAST_TO": broadcast_to,
    "CAST": cast,
    "CONCATENATION": concatenation,
    "CONV_2D": conv_2d,
    "DEPTHWISE_CONV_2D": depthwise_conv_2d,
    "DEQUANTIZE": dequantize,
    "EXPAND_DIMS": expand_dims,
    "FILL": fill,
    "FULLY_CONNECTED": fully_connected,
    "GATHER": gather,
    "GELU": gelu,
    "HARD_SWISH": hard_swish,
    "LEAKY_RELU": leaky_relu,
    "LOGISTIC": logistic,
    "MAXIMUM": maximum,
    "MAX_POOL_2D": max_pool_2d,
    "MEAN": mean,
    "MINIMUM": minimum,
    "MUL": mul,
    "NEG": neg,
    "LESS": _comparison(np.less),
    "LESS_EQUAL": _comparison(np.less_equal),
    "GREATER": _comparison(np.greater),
    "GREATER_EQUAL": _comparison(np.greater_equal),
    "EQUAL": _comparison(np.equal),
    "NOT_EQUAL": _comparison(np.not_equal),
    "SELECT": select_v2,
    "SELECT_V2": select_v2,
    "REDUCE_PROD": reduce_prod,
    "PACK": pack,
    "PAD": pad,
    "PADV2": pad,
    "QUANTIZE": quantize,
    "REDUCE_MAX": reduce_max,
    "RELU": relu,
    "RELU6": relu6,
    "RELU_N1_TO_1": relu_n1_to_1,
    "RESHAPE": reshape,
    "RESIZE_BILINEAR": resize_bilinear,
    "RESIZE_NEAREST_NEIGHBOR": resize_nearest_neighbor,
    "RSQRT": rsqrt,
    "SHAPE": shape,
    "SLICE": slice_,
    "SOFTMAX": softmax,
    "SPLIT": split,
    "SPLIT_V": split_v,
    "SQUARED_DIFFERENCE": squared_difference,
    "SQUEEZE": squeeze,
    "STRIDED_SLICE": strided_slice,
    "SUB": sub,
    "SUM": sum_,
    "TANH": tanh,
    "TILE": tile,
    "TRANSPOSE": transpose,
    "TRANSPOSE_CONV": transpose_conv,
    "UNPACK": unpack,
}
