"""Quantization maths: ranges, scale/zero-point, quantize, dequantize, fake-quant.

Plain functions over numpy arrays (and one TensorFlow op wrapper, :func:`fake_quant`). Nothing
here knows about Keras layers.

Conventions follow TFLite's int8 specification:

* An integer grid of ``bits`` bits is ``[qmin, qmax]``: signed ``[-2^(b-1), 2^(b-1) - 1]``,
  unsigned ``[0, 2^b - 1]``; ``narrow_range`` drops the lowest value (int8 weights live in
  ``[-127, 127]``).
* ``x ≈ scale * (q - zero_point)``; 0.0 is always exactly representable.
* Weights are symmetric (``zero_point = 0``); activations are asymmetric, with the range nudged
  onto the grid exactly as TensorFlow's ``FakeQuantWithMinMaxVars`` nudges it, so that the ranges
  tfq computes are the scales the TFLite converter writes.

Nudging (TF ``Nudge``), with ``Q = qmax - qmin`` on the unsigned grid ``[narrow, 2^b - 1]``::

    scale        = (max - min) / Q
    zp_from_min  = qmin - min / scale
    zp           = clip(round_half_away(zp_from_min), qmin, qmax)
    nudged_min   = (qmin - zp) * scale
    nudged_max   = (qmax - zp) * scale
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "QParams",
    "qrange",
    "prepare_range",
    "nudge_range",
    "range_to_qparams",
    "quantize",
    "quantize_to",
    "dequantize",
    "round_half_away",
    "fake_quant_numpy",
    "fake_quant",
    "softmax_margin",
    "softmax_input_range_numpy",
    "softmax_input_range",
    "MIN_RANGE",
]

# Smallest width a range may have. A constant (or all-zero) tensor still needs a finite scale:
# its range is widened to at least this, keeping 0.0 inside, so scale > 0 always holds.
MIN_RANGE = 1e-6


class QParams(NamedTuple):
    """Quantization parameters: ``x ≈ scale * (q - zero_point)``, ``q`` in ``[qmin, qmax]``."""

    scale: np.ndarray
    zero_point: np.ndarray
    qmin: int
    qmax: int


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an int in 2..16. Received: bits={bits!r}")


def qrange(bits: int = 8, signed: bool = True, narrow_range: bool = False) -> tuple[int, int]:
    """Integer grid ``(qmin, qmax)`` for ``bits``.

    Example:
        >>> qrange(8)
        (-128, 127)
        >>> qrange(8, narrow_range=True)
        (-127, 127)
        >>> qrange(8, signed=False)
        (0, 255)
    """
    _check_bits(bits)
    if signed:
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        qmin, qmax = 0, (1 << bits) - 1
    return qmin + int(narrow_range), qmax


def _as_f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def prepare_range(
    min_val, max_val, symmetric: bool = False, narrow_range: bool = False, bits: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Turns an observed ``[min, max]`` into the float range a quantizer uses.

    The range is widened to contain 0.0 (``min ≤ 0 ≤ max``). A range narrower than
    :data:`MIN_RANGE` (constant or all-zero data) is widened to ``MIN_RANGE`` on the side(s) it
    already extends to (``[0, MIN_RANGE]`` for all-zero data). Symmetric ranges become
    ``[-m, m]`` with ``m = max(|min|, |max|)``; without ``narrow_range`` the positive end is
    ``m * qmax / (-qmin)`` so that the grid is centred on zero (zero-point exactly 0).

    Args:
        min_val: observed minimum (scalar or per-channel array).
        max_val: observed maximum, same shape as ``min_val``.
        symmetric: make the range symmetric around 0.
        narrow_range: the grid drops its lowest value (``[-127, 127]`` for int8).
        bits: bit width, used for the non-narrow symmetric case.

    Returns:
        ``(min, max)`` as float32 arrays with ``min ≤ 0 ≤ max`` and ``max - min ≥ MIN_RANGE``.

    Raises:
        ValueError: if a bound is NaN or ``min > max``.

    Example:
        >>> [float(v) for v in prepare_range(0.5, 2.0)]
        [0.0, 2.0]
        >>> [float(v) for v in prepare_range(-1.0, 3.0, symmetric=True, narrow_range=True)]
        [-3.0, 3.0]
    """
    lo = np.minimum(_as_f32(min_val), 0.0)
    hi = np.maximum(_as_f32(max_val), 0.0)
    if np.isnan(lo).any() or np.isnan(hi).any():
        raise ValueError(f"range bounds must not be NaN. Received: min={min_val!r}, max={max_val!r}")
    if np.isinf(lo).any() or np.isinf(hi).any():
        raise ValueError(
            f"range bounds must be finite; observe some data first. Received: min={min_val!r}, "
            f"max={max_val!r}"
        )
    if (np.asarray(min_val) > np.asarray(max_val)).any():
        raise ValueError(f"min must be <= max. Received: min={min_val!r}, max={max_val!r}")
    if symmetric:
        m = np.maximum(np.maximum(-lo, hi), np.float32(MIN_RANGE))
        qmin, qmax = qrange(bits, signed=True, narrow_range=narrow_range)
        return (-m).astype(np.float32), (m * np.float32(qmax / -qmin)).astype(np.float32)
    width = hi - lo
    short = width < MIN_RANGE
    if short.any():
        # Widen on the negative side only when the data is entirely non-positive.
        only_neg = short & (hi <= 0) & (lo < 0)
        hi = np.where(short & ~only_neg, lo + np.float32(MIN_RANGE), hi)
        lo = np.where(only_neg, hi - np.float32(MIN_RANGE), lo)
    return lo.astype(np.float32), hi.astype(np.float32)


def round_half_away(x) -> np.ndarray:
    """Round to nearest, ties away from zero (``std::round``, TFLite's rule): tfq's one tie rule.

    Example:
        >>> round_half_away(np.float32([0.5, 1.5, -0.5, 2.4])).tolist()
        [1.0, 2.0, -1.0, 2.0]
    """
    x = np.asarray(x)
    half = x.dtype.type(0.5) if x.dtype.kind == "f" else 0.5  # float32 stays float32, as TF computes it
    return np.sign(x) * np.floor(np.abs(x) + half)


_round_half_away = round_half_away


def nudge_range(
    min_val, max_val, bits: int = 8, narrow_range: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TensorFlow's FakeQuant nudging, in float32 exactly as the TF kernel computes it.

    Args:
        min_val: range minimum (scalar or array), expected ``≤ 0``.
        max_val: range maximum, expected ``≥ 0`` and ``> min_val``.
        bits: bit width 2..16.
        narrow_range: grid ``[1, 2^b - 1]`` instead of ``[0, 2^b - 1]``.

    Returns:
        ``(nudged_min, nudged_max, scale)`` float32 arrays; 0.0 lies exactly on the grid.

    Example:
        >>> float(nudge_range(-1.0, 1.0)[2] * 255)
        2.0
    """
    qmin, qmax = qrange(bits, signed=False, narrow_range=narrow_range)
    lo, hi = _as_f32(min_val), _as_f32(max_val)
    qmin_f, qmax_f = np.float32(qmin), np.float32(qmax)
    scale = (hi - lo) / (qmax_f - qmin_f)
    zp_from_min = qmin_f - lo / scale
    zp = np.clip(_round_half_away(zp_from_min), qmin_f, qmax_f).astype(np.float32)
    return ((qmin_f - zp) * scale).astype(np.float32), ((qmax_f - zp) * scale).astype(np.float32), scale


def range_to_qparams(
    min_val,
    max_val,
    bits: int = 8,
    symmetric: bool = False,
    narrow_range: bool = False,
    signed: bool = True,
) -> QParams:
    """Scale and zero-point for a range, as TFLite writes them.

    The range is first :func:`prepare_range`-d (contains 0, non-degenerate, symmetric if asked),
    then nudged (:func:`nudge_range`). Per-channel ranges give per-channel arrays.

    Args:
        min_val: observed minimum (scalar or per-channel array).
        max_val: observed maximum.
        bits: bit width 2..16.
        symmetric: symmetric range; the zero-point is then 0 on the signed grid.
        narrow_range: drop the lowest grid value (TFLite int8 weights).
        signed: signed grid (int8) or unsigned (uint8).

    Returns:
        :class:`QParams` with float32 ``scale`` and int32 ``zero_point``.

    Example:
        >>> p = range_to_qparams(-1.0, 1.0, symmetric=True, narrow_range=True)
        >>> bool(p.scale == np.float32(2.0) / 254), int(p.zero_point), (p.qmin, p.qmax)
        (True, 0, (-127, 127))
    """
    lo, hi = prepare_range(min_val, max_val, symmetric=symmetric, narrow_range=narrow_range, bits=bits)
    nmin, _, scale = nudge_range(lo, hi, bits=bits, narrow_range=narrow_range)
    uqmin, _ = qrange(bits, signed=False, narrow_range=narrow_range)
    # zero-point on the unsigned grid, then shifted to the signed one.
    zp_unsigned = np.rint(np.float32(uqmin) - nmin / scale).astype(np.int32)
    shift = (1 << (bits - 1)) if signed else 0
    qmin, qmax = qrange(bits, signed=signed, narrow_range=narrow_range)
    return QParams(scale.astype(np.float32), (zp_unsigned - shift).astype(np.int32), qmin, qmax)


def _expand(p, x: np.ndarray, axis: int | None) -> np.ndarray:
    p = np.asarray(p)
    if axis is None or p.ndim == 0:
        return p
    axis = axis % x.ndim
    shape = [1] * x.ndim
    shape[axis] = -1
    return p.reshape(shape)


def _int_dtype(qmin: int, qmax: int):
    for dt in (np.int8, np.uint8, np.int16, np.uint16, np.int32):
        info = np.iinfo(dt)
        if info.min <= qmin and qmax <= info.max:
            return dt
    return np.int32


def quantize(x, qparams: QParams, axis: int | None = None) -> np.ndarray:
    """``q = clip(round_half_away(x / scale) + zero_point, qmin, qmax)``.

    Args:
        x: float array.
        qparams: from :func:`range_to_qparams`.
        axis: the channel axis for per-channel ``qparams`` (None for per-tensor).

    Returns:
        The smallest integer array type holding ``[qmin, qmax]`` (int8 for signed 8 bits).

    Example:
        >>> quantize([0.0, 0.5, 9.0], range_to_qparams(-1.0, 1.0, symmetric=True, narrow_range=True))
        array([  0,  64, 127], dtype=int8)
    """
    x = _as_f32(x)
    scale = _expand(qparams.scale, x, axis)
    zp = _expand(qparams.zero_point, x, axis)
    q = _round_half_away(x / scale) + zp
    return np.clip(q, qparams.qmin, qparams.qmax).astype(_int_dtype(qparams.qmin, qparams.qmax))


def quantize_to(x, scale, zero_point, dtype, axis: int | None = None) -> np.ndarray:
    """``x`` quantized into the full range of integer ``dtype``: ``clip(round_half_away(x / scale) + zero_point)``.

    The helper every float-to-integer conversion of data goes through (interpreter inputs, the
    reference executor, per-layer error analysis), so they share one tie rule.

    Example:
        >>> quantize_to(np.float32([0.25, -0.25, 9.0]), 0.5, 0, np.int8).tolist()
        [1, -1, 18]
    """
    info = np.iinfo(dtype)
    qparams = QParams(np.asarray(scale, np.float32), np.asarray(zero_point, np.int32), int(info.min), int(info.max))
    return quantize(x, qparams, axis).astype(dtype)


def dequantize(q, qparams: QParams, axis: int | None = None) -> np.ndarray:
    """``x = scale * (q - zero_point)`` as float32.

    Example:
        >>> p = range_to_qparams(-1.0, 1.0, symmetric=True, narrow_range=True)
        >>> float(dequantize(np.int8(127), p))
        1.0
    """
    q = np.asarray(q)
    scale = _expand(qparams.scale, q, axis)
    zp = _expand(qparams.zero_point, q, axis)
    return ((q.astype(np.int32) - zp).astype(np.float32) * scale).astype(np.float32)


def fake_quant_numpy(x, min_val, max_val, bits: int = 8, narrow_range: bool = False, axis: int | None = None):
    """Quantize-dequantize, equal to TF's ``fake_quant_with_min_max_vars`` bit for bit.

    ``min_val``/``max_val`` are used as given (TF semantics: nudged, not widened); use
    :func:`prepare_range` first for tfq's conventions. Per-channel ranges (``axis`` given) follow
    ``fake_quant_with_min_max_vars_per_channel``. A channel whose range is exactly ``[0, 0]``
    outputs zeros, as in TF. After nudging, with ``inv = Q / (max - min)``::

        quant_zero = floor(-nmin * inv + 0.5)
        y = floor((clip(x, nmin, nmax) - nmin) / scale - quant_zero + 0.5) * scale   # per-tensor
        y = floor((clip(x, nmin, nmax) - nmin) * inv   - quant_zero + 0.5) * scale   # per-channel

    Example:
        >>> [round(float(v), 4) for v in fake_quant_numpy(np.float32([0.3, 5.0]), -1.0, 1.0)]
        [0.298, 1.0039]
    """
    x = _as_f32(x)
    lo, hi = _as_f32(min_val), _as_f32(max_val)
    both_zero = (lo == 0) & (hi == 0)
    # Nudging a [0, 0] range divides by zero; TF returns zeros there, so compute on a dummy range.
    safe_hi = np.where(both_zero, np.float32(1.0), hi)
    nmin, nmax, scale = nudge_range(lo, safe_hi, bits=bits, narrow_range=narrow_range)
    qmin, qmax = qrange(bits, signed=False, narrow_range=narrow_range)
    inv = ((np.float32(qmax) - np.float32(qmin)) / (safe_hi - lo)).astype(np.float32)
    quant_zero = np.floor(-nmin * inv + np.float32(0.5)).astype(np.float32)
    nmin, nmax, scale, inv, quant_zero, both_zero = (
        _expand(v, x, axis) for v in (nmin, nmax, scale, inv, quant_zero, both_zero)
    )
    shifted = np.minimum(np.maximum(x, nmin), nmax) - nmin
    steps = shifted * inv if axis is not None else shifted / scale
    y = np.floor(steps - quant_zero + np.float32(0.5)) * scale
    return np.where(both_zero, np.float32(0.0), y).astype(np.float32)


def fake_quant(x, min_val, max_val, bits: int = 8, narrow_range: bool = False, per_channel: bool = False,
               identity_gradient: bool = False):
    """TensorFlow fake-quant op with a straight-through gradient.

    Built on ``tf.quantization.fake_quant_with_min_max_vars`` (or its ``_per_channel`` form, over
    the last axis), which the TFLite converter turns into the tensor's quantization parameters.
    Gradients pass straight through inside the nudged range and are zero outside; ``min_val`` and
    ``max_val`` receive the gradient of the clipped values, so ranges can be learned.

    With ``identity_gradient`` the gradient passes to ``x`` unchanged and ``min``/``max`` get none:
    for a tensor that lies inside its range by construction (weights on their own ``max|w|``
    range), where the straight-through mask is all ones, this skips the gradient op (which also
    reduces the whole tensor for the range's gradients). Use it in training graphs only: the
    forward op is the same, wrapped for the custom gradient.

    Args:
        x: float tensor.
        min_val: scalar (or, with ``per_channel``, a vector the size of the last axis).
        max_val: same shape as ``min_val``.
        bits: 2..16.
        narrow_range: grid ``[1, 2^b - 1]``.
        per_channel: ranges are per last-axis channel.
        identity_gradient: ``d fake_quant(x) / dx = 1`` (see above).

    Returns:
        A float tensor of the shape of ``x``.
    """
    import tensorflow as tf

    _check_bits(bits)

    def forward(v):
        if per_channel:
            return tf.quantization.fake_quant_with_min_max_vars_per_channel(
                v, min_val, max_val, num_bits=bits, narrow_range=narrow_range
            )
        return tf.quantization.fake_quant_with_min_max_vars(v, min_val, max_val, num_bits=bits,
                                                            narrow_range=narrow_range)

    if not identity_gradient:
        return forward(x)

    @tf.custom_gradient
    def straight_through(v):
        return forward(v), lambda dy: dy

    min_val, max_val = tf.stop_gradient(min_val), tf.stop_gradient(max_val)
    return straight_through(x)


def softmax_margin(bits: int = 8, classes: int = 2) -> float:
    """How far below a row's largest logit the logits stop mattering to a ``bits``-bit softmax
    output over ``classes`` classes: ``M = (bits + 1)·ln 2 + ln(classes - 1)`` (8.44 for int8 and
    10 classes).

    TFLite's quantized softmax output has scale ``2**-bits`` (zero point at the lowest value):
    half a step is ``2**-(bits + 1)``. Logits more than ``M`` below the largest have
    probabilities summing to less than ``(classes - 1)·exp(-M)`` = half a step, whatever they are.
    """
    _check_bits(bits)
    if isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) or classes < 2:
        raise ValueError(f"classes must be an int >= 2. Received: classes={classes!r}")
    return (int(bits) + 1) * float(np.log(2.0)) + float(np.log(classes - 1))


def softmax_input_range_numpy(x, bits: int = 8) -> tuple[float, float]:
    """``(lo, hi)``: the range of logits ``x`` (softmax over the last axis) that a ``bits``-bit
    softmax output depends on.

    Per row, with ``t1 >= t2`` its two largest logits and ``M`` = :func:`softmax_margin`::

        hi_r = min(t1, t2 + M)        lo_r = max(min(x_r), hi_r - M)
        lo = min_r lo_r               hi = max_r hi_r

    Clipping a row to ``[lo, hi]`` keeps its argmax (``t1`` only comes down to ``t2 + M`` or
    more), and each side moves its probabilities by less than half a step of the output grid:
    a clipped ``t1`` leaves the other logits at least ``M`` below it, and the logits raised to
    ``lo`` stay at least ``M`` below the row's clipped largest, so either group's probabilities
    sum to under ``2**-(bits + 1)`` before and after. So no probability moves by more than one
    step (``2**-bits``). A confident row, whose largest logit is far above the rest, no longer
    stretches the range: the logits that decide between classes get a finer grid. One class (or
    a scalar): the min and max.

    Example:
        >>> lo, hi = softmax_input_range_numpy([[20.0, 1.0, -9.0], [3.0, 2.5, -2.0]])  # M = 6.93
        >>> round(lo, 3), round(hi, 3)  # row 1: hi = 1 + M, lo = 1; row 2: hi = 3, lo = -2
        (-2.0, 7.931)
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 0 or x.shape[-1] < 2:
        return float(np.min(x)), float(np.max(x))
    rows = x.reshape(-1, x.shape[-1])
    top = np.partition(rows, -2, axis=1)[:, -2:]
    margin = softmax_margin(bits, rows.shape[1])
    hi = np.minimum(top[:, 1], top[:, 0] + margin)
    lo = np.maximum(rows.min(axis=1), hi - margin)
    return float(lo.min()), float(hi.max())


def softmax_input_range(x, bits: int = 8):
    """TensorFlow form of :func:`softmax_input_range_numpy` (scalar tensors ``lo``, ``hi``), for
    the moving average of a QAT quantizer on a softmax's input."""
    import tensorflow as tf

    x = tf.convert_to_tensor(x)
    classes = x.shape[-1] if x.shape.rank else None
    if classes is None or classes < 2:
        return tf.reduce_min(x), tf.reduce_max(x)
    rows = tf.reshape(x, [-1, classes])
    top = tf.math.top_k(rows, k=2, sorted=True).values
    margin = softmax_margin(bits, classes)
    hi = tf.minimum(top[:, 0], top[:, 1] + margin)
    lo = tf.maximum(tf.reduce_min(rows, axis=1), hi - margin)
    return tf.reduce_min(lo), tf.reduce_max(hi)
