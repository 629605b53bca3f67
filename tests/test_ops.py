"""Tests for tfq.ops: hand-computed quantization parameters, TF bit-exactness, properties."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from tfq import ops

f32 = np.float32
PROPERTY_SETTINGS = settings(deadline=None, max_examples=60)


def test_docstring_examples():
    assert doctest.testmod(ops, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


# ------------------------------------------------------------------ hand-computed qparams
# Derivations (TF's Nudge, on the unsigned grid [qmin_u, qmax_u] = [narrow, 2^b - 1], float32):
#   scale = (max - min) / (qmax_u - qmin_u);  zp_u = round_half_away(qmin_u - min / scale);
#   signed zero-point = zp_u - 2^(b-1).
HAND_TABLE = [
    # int8 asymmetric [-1, 1]: scale = 2/255. In reals zp_u = 0 + 1/(2/255) = 127.5 → 128, but
    # float32(2/255) = 0.0078431377 > 2/255, so 1/scale = 127.49999 (float32) → 127, and the
    # int8 zero-point is 127 - 128 = -1: the nudged range is [-127, 128]·scale. TF agrees (below).
    dict(lo=-1.0, hi=1.0, bits=8, scale=f32(2) / f32(255), zp=-1, grid=(-128, 127)),
    # relu6 [0, 6]: scale = 6/255, zp_u = 0 - 0/scale = 0 → int8 zero-point 0 - 128 = -128.
    dict(lo=0.0, hi=6.0, bits=8, scale=f32(6) / f32(255), zp=-128, grid=(-128, 127)),
    # [-6, 0]: scale = 6/255, zp_u = 0 + 6/(6/255) = 255 → 255 - 128 = 127.
    dict(lo=-6.0, hi=0.0, bits=8, scale=f32(6) / f32(255), zp=127, grid=(-128, 127)),
    # symmetric narrow [-3, 3]: grid [1, 255] (Q = 254), scale = 6/254 = 3/127,
    # zp_u = 1 + 3/(3/127) = 128 → 0; signed grid [-127, 127].
    dict(lo=-3.0, hi=3.0, bits=8, symmetric=True, narrow_range=True, scale=f32(3) / f32(127), zp=0, grid=(-127, 127)),
    # symmetric, not narrow, [-1, 1]: prepare_range gives [-1, 127/128] (centred grid),
    # scale = (1 + 127/128)/255 = 1/128, zp_u = 0 + 1/(1/128) = 128 → 0.
    dict(lo=-1.0, hi=1.0, bits=8, symmetric=True, scale=f32(1) / f32(128), zp=0, grid=(-128, 127)),
    # uint8 [0, 1]: scale = 1/255, zp = 0 on the unsigned grid [0, 255].
    dict(lo=0.0, hi=1.0, bits=8, signed=False, scale=f32(1) / f32(255), zp=0, grid=(0, 255)),
    # int16 symmetric narrow [-1, 1]: Q = 65534, scale = 2/65534 = 1/32767, zp 0, grid ±32767.
    dict(lo=-1.0, hi=1.0, bits=16, symmetric=True, narrow_range=True, scale=f32(1) / f32(32767), zp=0,
         grid=(-32767, 32767)),
    # int16 asymmetric [0, 1]: scale = 1/65535, zp_u = 0 → -32768.
    dict(lo=0.0, hi=1.0, bits=16, scale=f32(1) / f32(65535), zp=-32768, grid=(-32768, 32767)),
    # int4 symmetric narrow [-1, 1]: Q = 14, scale = 2/14 = 1/7, zp 0, grid [-7, 7].
    dict(lo=-1.0, hi=1.0, bits=4, symmetric=True, narrow_range=True, scale=f32(2) / f32(14), zp=0, grid=(-7, 7)),
    # int4 asymmetric [0, 3]: scale = 3/15 = 0.2, zp_u = 0 → 0 - 8 = -8.
    dict(lo=0.0, hi=3.0, bits=4, scale=f32(3) / f32(15), zp=-8, grid=(-8, 7)),
    # An exact tie: [-64.5/128, 190.5/128] has scale (255/128)/255 = 1/128 (exact in float32) and
    # zp_u = 0 + 64.5 → half away from zero: 65 (not 64, as round-half-even would give) → -63.
    dict(lo=-64.5 / 128, hi=190.5 / 128, bits=8, scale=f32(1) / f32(128), zp=-63, grid=(-128, 127)),
]


@pytest.mark.parametrize("case", HAND_TABLE, ids=lambda c: f"[{c['lo']},{c['hi']}]b{c['bits']}")
def test_range_to_qparams_hand_table(case):
    kwargs = {k: case[k] for k in ("bits", "symmetric", "narrow_range", "signed") if k in case}
    p = ops.range_to_qparams(case["lo"], case["hi"], **kwargs)
    assert p.scale.dtype == np.float32 and p.zero_point.dtype == np.int32
    assert p.scale == case["scale"]
    assert int(p.zero_point) == case["zp"]
    assert (p.qmin, p.qmax) == case["grid"]


def test_int8_minus_one_one_zero_point_matches_tensorflow():
    scale = f32(2) / f32(255)
    assert f32(1) / scale < f32(127.5)  # why the zero-point is -1 and not 0
    ends = tf.quantization.fake_quant_with_min_max_vars(tf.constant([-9.0, 9.0]), -1.0, 1.0).numpy()
    np.testing.assert_array_equal(ends, [f32(-127) * scale, f32(128) * scale])


def test_nudge_rounds_ties_away_from_zero_like_tensorflow():
    lo, hi = -64.5 / 128, 190.5 / 128  # zp_from_min = 64.5 exactly
    nmin, nmax, scale = ops.nudge_range(lo, hi)
    assert (nmin, nmax, scale) == (f32(-65 / 128), f32(190 / 128), f32(1 / 128))
    ends = tf.quantization.fake_quant_with_min_max_vars(tf.constant([-9.0, 9.0]), lo, hi).numpy()
    np.testing.assert_array_equal(ends, [nmin, nmax])


def test_range_to_qparams_per_channel():
    p = ops.range_to_qparams([0.0, -6.0, -1.0], [6.0, 0.0, 1.0])
    np.testing.assert_array_equal(p.scale, [f32(6) / f32(255), f32(6) / f32(255), f32(2) / f32(255)])
    np.testing.assert_array_equal(p.zero_point, [-128, 127, -1])

    s = ops.range_to_qparams([-1.0, -2.0, -4.0], [1.0, 0.5, 4.0], symmetric=True, narrow_range=True)
    # m = max(|min|, |max|) = [1, 2, 4]; scale = 2m/254 = m/127.
    np.testing.assert_array_equal(s.scale, [f32(1) / f32(127), f32(2) / f32(127), f32(4) / f32(127)])
    np.testing.assert_array_equal(s.zero_point, [0, 0, 0])


@pytest.mark.parametrize(
    "bits, signed, narrow, expected",
    [(8, True, False, (-128, 127)), (8, True, True, (-127, 127)), (8, False, False, (0, 255)),
     (2, True, False, (-2, 1)), (16, True, True, (-32767, 32767)), (16, False, False, (0, 65535))],
)
def test_qrange(bits, signed, narrow, expected):
    assert ops.qrange(bits, signed=signed, narrow_range=narrow) == expected


def test_quantize_dequantize_hand_computed():
    p = ops.range_to_qparams(0.0, 6.0)  # scale 6/255, zero-point -128
    q = ops.quantize([0.0, 3.0, 6.0, 7.0, -1.0], p)
    assert q.dtype == np.int8
    # 3/(6/255) = 127.5 → half away from zero: 128 → 128 - 128 = 0; 7 and -1 clamp.
    np.testing.assert_array_equal(q, [-128, 0, 127, 127, -128])
    np.testing.assert_array_equal(ops.dequantize(q, p), [0.0, f32(128) * p.scale, f32(255) * p.scale, f32(6), 0.0])
    # Ties round half away from zero: with scale 1/128 (exact), ±2.5 steps → ±3, 3.5 → 4.
    half = ops.range_to_qparams(-1.0, 1.0, symmetric=True)
    assert half.scale == f32(1 / 128) and int(half.zero_point) == 0
    np.testing.assert_array_equal(ops.quantize(np.float32([2.5, -2.5, 3.5, 0.5]) / 128, half), [3, -3, 4, 1])
    assert ops.quantize([1.0], ops.range_to_qparams(0.0, 1.0, signed=False)).dtype == np.uint8
    assert ops.quantize([1.0], ops.range_to_qparams(0.0, 1.0, bits=16)).dtype == np.int16


def test_quantize_per_channel_axis():
    p = ops.range_to_qparams([-1.0, -2.0], [1.0, 2.0], symmetric=True, narrow_range=True)  # 1/127, 2/127
    x = np.array([[1.0, 1.0], [0.5, -2.0]], dtype=np.float32)
    np.testing.assert_array_equal(ops.quantize(x, p, axis=-1), [[127, 64], [64, -127]])  # columns
    np.testing.assert_array_equal(ops.quantize(x, p, axis=0), [[127, 127], [32, -127]])  # rows
    np.testing.assert_allclose(ops.dequantize(ops.quantize(x, p, axis=-1), p, axis=-1), x, atol=1 / 127)


# ----------------------------------------------------------------- bit-exactness with TF
def _random_ranges(rng, n):
    lo = rng.uniform(-5.0, 0.5, n).astype(np.float32)
    width = np.exp(rng.uniform(np.log(1e-3), np.log(10.0), n)).astype(np.float32)
    return lo, (lo + width).astype(np.float32)


@pytest.mark.parametrize("bits", range(2, 17))
@pytest.mark.parametrize("narrow_range", [False, True])
def test_fake_quant_numpy_equals_tensorflow_per_tensor(bits, narrow_range):
    rng = np.random.default_rng(bits * 2 + narrow_range)
    for lo, hi in zip(*_random_ranges(rng, 4)):
        x = np.concatenate(
            [rng.uniform(lo - 1, hi + 1, 500), np.linspace(lo, hi, 101), [0.0, lo, hi]]
        ).astype(np.float32)
        expected = tf.quantization.fake_quant_with_min_max_vars(
            x, float(lo), float(hi), num_bits=bits, narrow_range=narrow_range
        ).numpy()
        got = ops.fake_quant_numpy(x, lo, hi, bits=bits, narrow_range=narrow_range)
        assert got.dtype == np.float32
        assert np.array_equal(got, expected), (bits, narrow_range, lo, hi)


@pytest.mark.parametrize("bits", range(2, 17))
@pytest.mark.parametrize("narrow_range", [False, True])
def test_fake_quant_numpy_equals_tensorflow_per_channel(bits, narrow_range):
    rng = np.random.default_rng(100 + bits * 2 + narrow_range)
    lo, hi = _random_ranges(rng, 6)
    lo[0], hi[0] = 0.0, 0.0  # a [0, 0] channel: TF outputs zeros there
    x = rng.uniform(-6.0, 11.0, (4, 9, 6)).astype(np.float32)
    expected = tf.quantization.fake_quant_with_min_max_vars_per_channel(
        x, lo, hi, num_bits=bits, narrow_range=narrow_range
    ).numpy()
    got = ops.fake_quant_numpy(x, lo, hi, bits=bits, narrow_range=narrow_range, axis=-1)
    assert np.array_equal(got, expected)
    assert not got[..., 0].any()


def test_fake_quant_op_forward_equals_numpy():
    x = np.linspace(-2.0, 2.0, 41, dtype=np.float32)
    np.testing.assert_array_equal(ops.fake_quant(x, -1.0, 1.5).numpy(), ops.fake_quant_numpy(x, -1.0, 1.5))


# ---------------------------------------------------------------------- property tests
ranges = st.tuples(
    st.floats(-100.0, 0.0, width=32), st.floats(0.0, 100.0, width=32)
).filter(lambda r: r[1] - r[0] >= 1e-3)


def _nudged_ends(p: ops.QParams) -> tuple[np.float32, np.float32]:
    return f32(p.qmin - int(p.zero_point)) * p.scale, f32(p.qmax - int(p.zero_point)) * p.scale


@PROPERTY_SETTINGS
@given(
    r=ranges,
    bits=st.integers(2, 16),
    narrow=st.booleans(),
    signed=st.booleans(),
    fractions=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20),
)
def test_round_trip_error_at_most_half_a_step(r, bits, narrow, signed, fractions):
    p = ops.range_to_qparams(*r, bits=bits, narrow_range=narrow, signed=signed)
    nmin, nmax = _nudged_ends(p)
    x = (nmin + np.asarray(fractions, dtype=np.float32) * (nmax - nmin)).astype(np.float32)
    x = np.clip(x, nmin, nmax)
    y = ops.dequantize(ops.quantize(x, p), p)
    # float32 rounding of x / scale adds at most |x|·2^-24 per operation.
    tol = p.scale / 2 + f32(2**-20) * max(abs(nmin), abs(nmax))
    assert np.all(np.abs(y - x) <= tol)


@PROPERTY_SETTINGS
@given(r=ranges, bits=st.integers(2, 16), narrow=st.booleans(), signed=st.booleans(), symmetric=st.booleans())
def test_zero_is_exact_and_outside_values_clamp(r, bits, narrow, signed, symmetric):
    p = ops.range_to_qparams(*r, bits=bits, narrow_range=narrow, signed=signed, symmetric=symmetric)
    q0 = ops.quantize(np.float32(0.0), p)
    assert int(q0) == int(p.zero_point)
    assert ops.dequantize(q0, p) == 0.0
    big = f32(1e4)
    q = ops.quantize([-big, big], p)
    assert (int(q[0]), int(q[1])) == (p.qmin, p.qmax)
    # The clamped ends are exactly the nudged range TF's fake-quant uses.
    lo, hi = ops.prepare_range(*r, symmetric=symmetric, narrow_range=narrow, bits=bits)
    nmin, nmax, _ = ops.nudge_range(lo, hi, bits=bits, narrow_range=narrow)
    np.testing.assert_array_equal(ops.dequantize(q, p), [nmin, nmax])


@PROPERTY_SETTINGS
@given(
    lo=st.floats(-1e3, 1e3, width=32),
    width=st.floats(0.0, 1e3, width=32),
    symmetric=st.booleans(),
    narrow=st.booleans(),
)
def test_prepare_range_contains_zero_and_is_wide_enough(lo, width, symmetric, narrow):
    hi = f32(lo) + f32(width)
    a, b = ops.prepare_range(lo, hi, symmetric=symmetric, narrow_range=narrow)
    assert a <= 0.0 <= b
    assert a <= min(lo, 0.0) and b >= max(hi, 0.0) * (127 / 128 if symmetric and not narrow else 1) * (1 - 1e-6)
    assert b - a >= f32(ops.MIN_RANGE) * f32(0.999)
    if symmetric and narrow:
        assert a == -b


# ------------------------------------------------------------------------ prepare_range
@pytest.mark.parametrize(
    "lo, hi, kwargs, expected",
    [
        (0.5, 2.0, {}, (0.0, 2.0)),  # extended to contain 0
        (3.0, 3.0, {}, (0.0, 3.0)),  # constant: 0 makes it non-degenerate
        (-3.0, -3.0, {}, (-3.0, 0.0)),
        (0.0, 0.0, {}, (0.0, f32(ops.MIN_RANGE))),  # all-zero: widened upwards
        (1e-9, 1e-9, {}, (0.0, f32(ops.MIN_RANGE))),
        (-1e-9, -1e-9, {}, (-f32(ops.MIN_RANGE), 0.0)),  # all-negative: widened downwards
        (-1.0, 3.0, {"symmetric": True, "narrow_range": True}, (-3.0, 3.0)),
        (-1.0, 3.0, {"symmetric": True}, (-3.0, f32(3.0) * f32(127 / 128))),  # centred int8 grid
        (0.0, 0.0, {"symmetric": True, "narrow_range": True}, (-f32(ops.MIN_RANGE), f32(ops.MIN_RANGE))),
    ],
)
def test_prepare_range_cases(lo, hi, kwargs, expected):
    a, b = ops.prepare_range(lo, hi, **kwargs)
    assert a.dtype == b.dtype == np.float32
    assert (a, b) == (f32(expected[0]), f32(expected[1]))


def test_prepare_range_per_channel():
    a, b = ops.prepare_range([0.0, -2.0, 1.0], [0.0, -1.0, 4.0])
    np.testing.assert_array_equal(a, [0.0, -2.0, 0.0])
    np.testing.assert_array_equal(b, [f32(ops.MIN_RANGE), 0.0, 4.0])


# ------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bits", [1, 17, 8.0, True, "8", None])
def test_bad_bits_raise(bits):
    message = f"bits must be an int in 2..16. Received: bits={bits!r}"
    for call in (
        lambda: ops.qrange(bits),
        lambda: ops.range_to_qparams(-1.0, 1.0, bits=bits),
        lambda: ops.fake_quant_numpy(np.zeros(3, np.float32), -1.0, 1.0, bits=bits),
        lambda: ops.fake_quant(np.zeros(3, np.float32), -1.0, 1.0, bits=bits),
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == message


@pytest.mark.parametrize(
    "lo, hi, match",
    [
        (np.nan, 1.0, r"must not be NaN. Received: min=nan, max=1.0"),
        (-1.0, np.nan, r"must not be NaN. Received: min=-1.0, max=nan"),
        (2.0, 1.0, r"min must be <= max. Received: min=2.0, max=1.0"),
        (-1.0, -2.0, r"min must be <= max. Received: min=-1.0, max=-2.0"),
        (-np.inf, 1.0, r"must be finite; observe some data first. Received: min=-inf"),
    ],
)
def test_bad_ranges_raise(lo, hi, match):
    with pytest.raises(ValueError, match=match):
        ops.prepare_range(lo, hi)
    with pytest.raises(ValueError, match=match):
        ops.range_to_qparams(lo, hi)


# ---------------------------------------------------------------------------- gradients
def test_fake_quant_gradient_is_straight_through():
    x = tf.constant([-2.0, -0.5, 0.0, 0.5, 2.0])  # nudged range of [-1, 1]: [-0.996, 1.004]
    lo, hi = tf.Variable(-1.0), tf.Variable(1.0)
    upstream = tf.constant([1.0, 2.0, 3.0, 4.0, 5.0])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        loss = tf.reduce_sum(ops.fake_quant(x, lo, hi) * upstream)
    np.testing.assert_array_equal(tape.gradient(loss, x).numpy(), [0.0, 2.0, 3.0, 4.0, 0.0])
    assert float(tape.gradient(loss, lo)) == 1.0  # upstream of the value clipped at min (-2)
    assert float(tape.gradient(loss, hi)) == 5.0  # upstream of the value clipped at max (2)


def test_fake_quant_gradient_per_channel():
    x = tf.constant([[-2.0, 0.5, 7.0], [0.2, -3.0, -0.1]])
    lo, hi = tf.Variable([-1.0, -1.0, 0.0]), tf.Variable([1.0, 1.0, 6.0])
    upstream = tf.reshape(tf.range(1.0, 7.0), (2, 3))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        loss = tf.reduce_sum(ops.fake_quant(x, lo, hi, per_channel=True) * upstream)
    inside = np.array([[0, 1, 0], [1, 0, 0]], dtype=np.float32)
    np.testing.assert_array_equal(tape.gradient(loss, x).numpy(), inside * upstream.numpy())
    # Clipped below: x[0,0] (channel 0, upstream 1), x[1,1] (ch 1, 5), x[1,2] = -0.1 < 0 (ch 2, 6).
    np.testing.assert_array_equal(tape.gradient(loss, lo).numpy(), [1.0, 5.0, 6.0])
    # Clipped above: only x[0,2] = 7 > 6 (channel 2, upstream 3).
    np.testing.assert_array_equal(tape.gradient(loss, hi).numpy(), [0.0, 0.0, 3.0])


def test_softmax_input_range_hand_computed_and_tensorflow_twin():
    m = 9 * np.log(2.0) + np.log(2)  # int8 output (half a step: 2**-9), 3 classes
    assert ops.softmax_margin(8, 3) == pytest.approx(m)
    assert ops.softmax_margin(16, 1001) == pytest.approx(17 * np.log(2.0) + np.log(1000))
    x = np.array([[20.0, 1.0, -9.0],   # confident: t1 clipped to t2 + M; -9 is below t2 + M - M = 1
                  [3.0, 2.5, -1.0],    # close call: the whole row
                  [0.0, -30.0, -1.0]])  # -30 raised to 0 - M
    lo, hi = ops.softmax_input_range_numpy(x)
    assert hi == pytest.approx(max(min(20.0, 1.0 + m), 3.0, min(0.0, -1.0 + m)))
    assert lo == pytest.approx(min(max(-9.0, 1.0), -1.0, max(-30.0, 0.0 - m)))
    assert (lo, hi) == pytest.approx((-m, 1.0 + m))
    # 16-bit output: M = 17·ln 2 + ln 2 = 12.48, so t1 = 20 is clipped to 1 + 12.48
    assert ops.softmax_input_range_numpy(x, bits=16)[1] == pytest.approx(1.0 + 18 * np.log(2.0))
    assert ops.softmax_input_range_numpy([[2.0], [-3.0]]) == (-3.0, 2.0)  # one class: min/max
    with pytest.raises(ValueError, match="classes must be an int >= 2. Received: classes=1"):
        ops.softmax_margin(8, 1)
    rng = np.random.default_rng(0)
    for shape in [(7, 10), (2, 3, 5), (64, 1000)]:
        z = (rng.standard_normal(shape) * rng.uniform(1, 12)).astype(np.float32)
        tf_lo, tf_hi = (float(v) for v in ops.softmax_input_range(z))
        np_lo, np_hi = ops.softmax_input_range_numpy(z)
        assert (tf_lo, tf_hi) == pytest.approx((np_lo, np_hi), abs=1e-5)
        assert np_lo >= z.min() and np_hi <= z.max()


@pytest.mark.parametrize("classes, bits", [(10, 8), (1000, 8), (10, 16)])
def test_clipping_to_the_softmax_input_range_keeps_argmax_and_moves_probabilities_by_under_a_step(classes, bits):
    rng = np.random.default_rng(classes)
    n = 512
    confident = 40 * np.eye(classes)[rng.integers(0, classes, n)] * rng.integers(0, 2, (n, 1))
    logits = rng.standard_normal((n, classes)) * 6 + confident
    lo, hi = ops.softmax_input_range_numpy(logits, bits)
    assert hi < logits.max() - 1.0 and lo > logits.min() + 1.0  # these logits are clipped
    clipped = np.clip(logits, lo, hi)
    assert (clipped != logits).any(axis=1).mean() > 0.4
    p, q = tf.nn.softmax(logits).numpy(), tf.nn.softmax(clipped).numpy()
    np.testing.assert_array_equal(p.argmax(1), q.argmax(1))
    assert np.abs(p - q).max() <= 2.0**-bits
