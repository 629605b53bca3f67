"""The fixed-point arithmetic of TFLite's integer kernels, in numpy.

Every real multiplier of an integer kernel (``M = S_in·S_w / S_out`` for a convolution) is stored
as a 31-bit fixed-point mantissa and a power of two, ``M ≈ M0 · 2^(shift − 31)`` with
``M0 ∈ [2^30, 2^31)`` (:func:`quantize_multiplier`), and an int32 accumulator ``x`` is scaled by it
in two roundings, as gemmlowp does (TFLite's default ``TFLITE_SINGLE_ROUNDING=0`` build)::

    x · M  ≈  RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(x · 2^max(shift, 0), M0),
                                  max(−shift, 0))

    SaturatingRoundingDoublingHighMul(a, b) = floor(a·b / 2^31 + 1/2)   (halves up; saturated at 2^31 − 1)
    RoundingDivideByPOT(x, e)               = round_half_away(x / 2^e)  (halves away from zero)

All functions take numpy arrays (or Python ints) and compute in int64, wrapping to int32 where
the C++ wraps, so their results are those of the kernels bit for bit.

Example:
    >>> m0, shift = quantize_multiplier(0.0123)
    >>> int(multiply_by_quantized_multiplier(1000, m0, shift))
    12
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "INT32_MIN",
    "INT32_MAX",
    "quantize_multiplier",
    "saturating_rounding_doubling_high_mul",
    "rounding_divide_by_pot",
    "multiply_by_quantized_multiplier",
    "multiply_by_quantized_multiplier_smaller_than_one",
    "multiply_by_quantized_multiplier_greater_than_one",
    "round_half_away",
    "wrap_int32",
]

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


def round_half_away(x):
    """C's ``round``: to the nearest integer, halves away from zero (numpy's rounds halves to even).

    Exact for float32 and float64 inputs (computed in float64 on the exact input value).
    """
    x = np.asarray(x, dtype=np.float64) if not np.isscalar(x) else np.float64(x)
    r = np.trunc(x)
    frac = x - r
    return r + np.where(np.abs(frac) >= 0.5, np.sign(x), 0.0)


def wrap_int32(x):
    """Two's-complement wrap of int64 values to int32 (what an overflowing C ``int32_t`` does)."""
    x = np.asarray(x, dtype=np.int64)
    return ((x + 2**31) & 0xFFFFFFFF) - 2**31


def quantize_multiplier(real: float) -> tuple[int, int]:
    """``(M0, shift)`` with ``real ≈ M0 · 2^(shift − 31)``, ``M0 ∈ [2^30, 2^31)`` (TFLite's ``QuantizeMultiplier``).

    ``real = q · 2^shift`` with ``q ∈ [0.5, 1)`` (``frexp``); ``M0 = round_half_away(q · 2^31)``
    (when that rounds up to ``2^31``, ``M0 = 2^30`` and ``shift + 1``). The error is at most half a
    unit of the mantissa: ``|real − M0·2^(shift−31)| ≤ 2^(shift−32)``. Multipliers below ``2^−32``
    (``shift < −31``) flush to ``(0, 0)``; ``real = 0`` gives ``(0, 0)``.

    Args:
        real: the real multiplier (a Python float, i.e. C ``double``; compute it in float32 first
            where the kernel does).

    Returns:
        ``(M0, shift)`` as Python ints; ``shift > 0`` is a left shift.

    Example:
        >>> quantize_multiplier(0.5)
        (1073741824, 0)
        >>> quantize_multiplier(3.0)
        (1610612736, 2)
    """
    real = float(real)
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    q_fixed = int(round_half_away(q * 2.0**31))
    if abs(q_fixed) == 2**31:
        q_fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return q_fixed, shift


def saturating_rounding_doubling_high_mul(a, b):
    """gemmlowp's ``SaturatingRoundingDoublingHighMul``: the high 32 bits of ``2·a·b``, rounded.

    ``(a·b + nudge) / 2^31`` with C's truncating division and ``nudge = 2^30`` for ``a·b ≥ 0``,
    ``1 − 2^30`` otherwise, which is ``floor(a·b/2^31 + 1/2)``: halves round up (−0.5 → 0, not −1);
    ``a = b = −2^31`` saturates to ``2^31 − 1``. ``a`` and ``b`` are int32 values.
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    ab = a * b
    nudged = ab + np.where(ab >= 0, 2**30, 1 - 2**30)
    high = np.where(nudged >= 0, nudged >> 31, -((-nudged) >> 31))
    return np.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, high)


def rounding_divide_by_pot(x, exponent):
    """gemmlowp's ``RoundingDivideByPOT``: ``x / 2^exponent`` rounded to nearest, halves away from zero.

    ``exponent`` in ``[0, 31]`` (scalar or array broadcasting with ``x``).
    """
    x = np.asarray(x, dtype=np.int64)
    exponent = np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(x, multiplier, shift):
    """TFLite's ``MultiplyByQuantizedMultiplier(int32 x, M0, shift)``: ``x · M0 · 2^(shift − 31)``, rounded.

    A left shift ``shift > 0`` is applied to ``x`` first (wrapping in int32, as the C++ does), a
    right shift ``shift < 0`` after the high multiply (``RoundingDivideByPOT``).
    """
    shift = np.asarray(shift, dtype=np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    shifted = wrap_int32(np.asarray(x, dtype=np.int64) << left)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, multiplier), right)


def multiply_by_quantized_multiplier_smaller_than_one(x, multiplier, shift):
    """``MultiplyByQuantizedMultiplierSmallerThanOneExp`` (``shift ≤ 0``): high multiply, then rounding right shift."""
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, multiplier), -np.asarray(shift))


def multiply_by_quantized_multiplier_greater_than_one(x, multiplier, shift):
    """``MultiplyByQuantizedMultiplierGreaterThanOne`` (``shift ≥ 0``): wrapping left shift, then high multiply."""
    shifted = wrap_int32(np.asarray(x, dtype=np.int64) << np.asarray(shift, dtype=np.int64))
    return saturating_rounding_doubling_high_mul(shifted, multiplier)


def multiply_by_quantized_multiplier_int64(x, multiplier, shift):
    """The int64-accumulator overload (int16x8 convolutions): a 16-bit multiplier, one rounding.

    ``M0`` is reduced to ``round(M0 / 2^16)`` (at most ``2^15 − 1``) and
    ``result = (x·M0' + 2^(14 − shift)) >> (15 − shift)``.
    """
    multiplier = np.asarray(multiplier, dtype=np.int64)
    reduced = np.where(multiplier < 0x7FFF0000, (multiplier + (1 << 15)) >> 16, 0x7FFF)
    total_shift = 15 - np.asarray(shift, dtype=np.int64)
    x = np.asarray(x, dtype=np.int64)
    return wrap_int32((x * reduced + (np.int64(1) << (total_shift - 1))) >> total_shift)


# --- gemmlowp fixed-point helpers used by the quantized softmax -----------------------------------
# A FixedPoint<int32, I> value is an int32 raw r standing for r / 2^(31 − I). Additions wrap.

def _add(a, b):
    return wrap_int32(np.asarray(a, np.int64) + b)


def _sub(a, b):
    return wrap_int32(np.asarray(a, np.int64) - b)


def _saturating_multiply_by_pot(x, exponent: int):
    """gemmlowp ``SaturatingRoundingMultiplyByPOT<exponent>``: a saturating left or a rounding right shift."""
    x = np.asarray(x, dtype=np.int64)
    if exponent == 0:
        return x
    if exponent < 0:
        return rounding_divide_by_pot(x, -exponent)
    threshold = (1 << (31 - exponent)) - 1
    out = wrap_int32(x << exponent)
    out = np.where(x > threshold, INT32_MAX, out)
    return np.where(x < -threshold, INT32_MIN, out)


def rescale(x, src_integer_bits: int, dst_integer_bits: int):
    """gemmlowp ``Rescale``: the same real value with another number of integer bits."""
    return _saturating_multiply_by_pot(x, src_integer_bits - dst_integer_bits)


def _exp_on_interval_between_negative_one_quarter_and_0_excl(a):
    """exp(a) for a in [−1/4, 0), Q0.31 in and out: Taylor series around −1/8."""
    srdhm = saturating_rounding_doubling_high_mul
    constant_term = 1895147668  # exp(-1/8)
    constant_1_over_3 = 715827883
    x = _add(a, 1 << 28)  # a + 1/8
    x2 = srdhm(x, x)
    x3 = srdhm(x2, x)
    x4 = srdhm(x2, x2)
    x4_over_4 = _saturating_multiply_by_pot(x4, -2)
    poly = _saturating_multiply_by_pot(_add(srdhm(_add(x4_over_4, x3), constant_1_over_3), x2), -1)
    return _add(constant_term, srdhm(constant_term, _add(x, poly)))


def exp_on_negative_values(a, integer_bits: int):
    """gemmlowp ``exp_on_negative_values``: exp(a) for a ≤ 0 given as FixedPoint<int32, integer_bits>; Q0.31 out."""
    a = np.asarray(a, dtype=np.int64)
    fractional_bits = 31 - integer_bits
    one_quarter = 1 << (fractional_bits - 2)
    mask = one_quarter - 1
    a_mod_quarter_minus_one_quarter = _sub(a & mask, one_quarter)
    result = _exp_on_interval_between_negative_one_quarter_and_0_excl(
        rescale(a_mod_quarter_minus_one_quarter, integer_bits, 0))
    remainder = _sub(a_mod_quarter_minus_one_quarter, a)
    for exponent, multiplier in ((-2, 1672461947), (-1, 1302514674), (0, 790015084), (1, 290630308),
                                 (2, 39332535), (3, 720401), (4, 242)):
        if integer_bits > exponent:
            bit = 1 << (fractional_bits + exponent)
            result = np.where(remainder & bit, saturating_rounding_doubling_high_mul(result, multiplier), result)
    if integer_bits > 5:
        clamp = -(1 << (36 - integer_bits))
        result = np.where(a < clamp, 0, result)
    return np.where(a == 0, INT32_MAX, result)


def _rounding_half_sum(a, b):
    s = np.asarray(a, np.int64) + b
    sign = np.where(s >= 0, 1, -1)
    t = s + sign
    return np.where(t >= 0, t // 2, -((-t) // 2))


def one_over_one_plus_x_for_x_in_0_1(a):
    """gemmlowp ``one_over_one_plus_x_for_x_in_0_1``: 1/(1+a) for a in [0, 1), Q0.31 in and out (Newton–Raphson)."""
    srdhm = saturating_rounding_doubling_high_mul
    half_denominator = _rounding_half_sum(a, INT32_MAX)
    x = _add(1515870810, srdhm(half_denominator, -1010580540))  # 48/17 − 32/17·d, Q2.29
    one_q2 = 1 << 29
    for _ in range(3):
        half_denominator_times_x = srdhm(half_denominator, x)
        one_minus = _sub(one_q2, half_denominator_times_x)
        x = _add(x, rescale(srdhm(x, one_minus), 4, 2))
    # ExactMulByPot<-1>: Q2.29 → Q1.30 with the same raw value, then Rescale<0>.
    return rescale(x, 1, 0)


def get_reciprocal(x, x_integer_digits: int):
    """TFLite's ``GetReciprocal``: ``(1/x as Q0.31 raw, num_bits_over_unit)`` for a positive FixedPoint x."""
    x = np.asarray(x, dtype=np.int64)
    headroom_plus_one = count_leading_zeros32(x)
    num_bits_over_unit = x_integer_digits - headroom_plus_one
    shifted_sum_minus_one = wrap_int32(((x << headroom_plus_one) & 0xFFFFFFFF) - (1 << 31))
    return one_over_one_plus_x_for_x_in_0_1(shifted_sum_minus_one), num_bits_over_unit


def count_leading_zeros32(x):
    """Leading zero bits of x read as a uint32 (32 for 0)."""
    x = np.asarray(x, dtype=np.int64) & 0xFFFFFFFF
    _, bit_length = np.frexp(x.astype(np.float64))  # exact: x < 2^53
    return 32 - np.where(x > 0, bit_length, 0).astype(np.int64)
