"""tfq.reference: the numpy executor reproduces LiteRT's reference kernels bit for bit.

The independent path is LiteRT's own interpreter with ``OpResolverType.BUILTIN_REF`` (its C++
reference kernels); the fixed-point helpers are checked against arbitrary-precision Python ints.
BUILTIN_REF can abort the process on untrained models (a failed CHECK), so models other than the
trained fixtures are compared in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tfq
from tfq.reference import fixedpoint as fp
from tfq.reference.graph import read_graph

INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)


# --- fixed point against Python integers -----------------------------------------------------------

def _round_half_away(value: Fraction) -> int:
    sign = 1 if value >= 0 else -1
    return sign * int((abs(value) + Fraction(1, 2)) // 1)


@settings(max_examples=400, deadline=None)
@given(st.floats(min_value=2.0**-31, max_value=2.0**30, allow_nan=False, allow_infinity=False))
def test_quantize_multiplier_mantissa_and_error(real):
    m0, shift = fp.quantize_multiplier(real)
    n = 31 - shift
    assert 2**30 <= m0 < 2**31
    # |M − M0·2^−n| ≤ ½·2^−n: half a unit of the 31-bit mantissa, i.e. a relative error ≤ 2^−31.
    error = abs(Fraction(real) - Fraction(m0) / Fraction(2) ** n)
    assert error <= Fraction(1, 2) / Fraction(2) ** n
    assert error / Fraction(real) <= Fraction(1, 2**31)


def test_quantize_multiplier_edges():
    assert fp.quantize_multiplier(0.0) == (0, 0)
    assert fp.quantize_multiplier(1.0) == (2**30, 1)
    assert fp.quantize_multiplier(2.0**-40) == (0, 0)  # flushed to zero below 2^-32
    # q·2^31 rounding up to 2^31 renormalizes: (1 − 2^−40) → M0 = 2^30, shift 1
    assert fp.quantize_multiplier(1.0 - 2.0**-40) == (2**30, 1)


def _round_half_up(value: Fraction) -> int:
    return int((value + Fraction(1, 2)) // 1)


@settings(max_examples=500, deadline=None)
@given(INT32, INT32)
def test_saturating_rounding_doubling_high_mul(a, b):
    expected = 2**31 - 1 if a == b == -(2**31) else _round_half_up(Fraction(a * b, 2**31))
    assert int(fp.saturating_rounding_doubling_high_mul(a, b)) == expected


def test_high_mul_rounds_halves_up_and_divide_rounds_them_away():
    # gemmlowp's nudge makes the high multiply round ties toward +inf; RoundingDivideByPOT away from zero.
    assert int(fp.saturating_rounding_doubling_high_mul(-1, 2**30)) == 0  # −0.5 → 0
    assert int(fp.saturating_rounding_doubling_high_mul(1, 2**30)) == 1  # 0.5 → 1
    assert int(fp.saturating_rounding_doubling_high_mul(-3, 2**30)) == -1  # −1.5 → −1
    assert int(fp.rounding_divide_by_pot(-1, 1)) == -1 and int(fp.rounding_divide_by_pot(-3, 1)) == -2
    assert int(fp.saturating_rounding_doubling_high_mul(-(2**31), -(2**31))) == 2**31 - 1


@settings(max_examples=500, deadline=None)
@given(INT32, st.integers(min_value=0, max_value=31))
def test_rounding_divide_by_pot(x, exponent):
    assert int(fp.rounding_divide_by_pot(x, exponent)) == _round_half_away(Fraction(x, 2**exponent))


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=-(2**24), max_value=2**24), st.floats(min_value=1e-6, max_value=0.99))
def test_multiply_by_quantized_multiplier_is_rounded_product(x, real):
    m0, shift = fp.quantize_multiplier(real)
    got = int(fp.multiply_by_quantized_multiplier(x, m0, shift))
    # Two roundings of the exact x·M0·2^(shift−31): within one unit of it, and of x·M within 1 + |x|·2^−31·M.
    exact = Fraction(x * m0, 2**31) * Fraction(2) ** shift
    assert abs(got - exact) <= 1
    high = _round_half_up(Fraction(x * m0, 2**31))
    assert got == _round_half_away(Fraction(high, 2**-shift))


def test_vectorized_matches_scalar():
    rng = np.random.default_rng(0)
    x = rng.integers(-(2**31), 2**31, 1000)
    m = rng.integers(2**30, 2**31, 1000)
    vec = fp.saturating_rounding_doubling_high_mul(x, m)
    assert [int(v) for v in vec] == [_round_half_up(Fraction(int(a) * int(b), 2**31)) for a, b in zip(x, m)]


# --- the executor against LiteRT's BUILTIN_REF ----------------------------------------------------

def _builtin_ref(content: bytes, arrays: list[np.ndarray], all_tensors: bool = False) -> dict:
    """Outputs (or every tensor) of LiteRT's reference kernels, in this process (trained models only)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(model_content=content, experimental_op_resolver_type=OpResolverType.BUILTIN_REF,
                         experimental_preserve_all_tensors=all_tensors)
    graph = read_graph(content)
    for index, a in zip(graph.inputs, arrays):
        interp.resize_tensor_input(index, a.shape, strict=False)
    interp.allocate_tensors()
    for index, a in zip(graph.inputs, arrays):
        interp.set_tensor(index, a)
    interp.invoke()
    wanted = range(len(graph.tensors)) if all_tensors else graph.outputs
    result = {}
    for i in wanted:
        if graph.tensors[i].data is None:
            try:
                result[i] = interp.get_tensor(i)
            except ValueError:
                pass
    return result


_SUBPROCESS = textwrap.dedent("""
    import sys, numpy as np
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    content = open(sys.argv[1], "rb").read()
    data = np.load(sys.argv[2])
    arrays = [data[f"arr_{i}"] for i in range(len(data.files))]
    interp = Interpreter(model_content=content, experimental_op_resolver_type=OpResolverType.BUILTIN_REF,
                         experimental_preserve_all_tensors=True)
    inputs = [int(v) for v in sys.argv[4].split(",")]
    for index, a in zip(inputs, arrays):
        interp.resize_tensor_input(index, a.shape, strict=False)
    interp.allocate_tensors()
    for index, a in zip(inputs, arrays):
        interp.set_tensor(index, a)
    interp.invoke()
    out = {}
    for i in range(int(sys.argv[5])):
        try:
            out[str(i)] = interp.get_tensor(i)
        except ValueError:
            pass
    np.savez(sys.argv[3], **out)
""")


def builtin_ref_subprocess(content: bytes, arrays, tmp_path) -> dict:
    """Every tensor of a BUILTIN_REF run in a child process (a failed CHECK aborts only the child)."""
    graph = read_graph(content)
    (tmp_path / "m.tflite").write_bytes(content)
    np.savez(tmp_path / "in.npz", *arrays)
    proc = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS, str(tmp_path / "m.tflite"), str(tmp_path / "in.npz"),
         str(tmp_path / "out.npz"), ",".join(map(str, graph.inputs)), str(len(graph.tensors))],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"BUILTIN_REF failed ({proc.returncode}): {proc.stderr[-2000:]}"
    data = np.load(tmp_path / "out.npz")
    return {int(k): data[k] for k in data.files}


def assert_bit_exact(content: bytes, inputs, reference: dict) -> dict:
    """Every tensor the reference interpreter kept equals the numpy executor's, bit for bit."""
    graph = read_graph(content)
    execution = tfq.reference.executor.execute(graph, inputs)
    compared = {}
    for op in graph.operators:
        for t in op.outputs:
            if t in reference:
                ours = execution.values[t]
                assert ours.shape == reference[t].shape, (op.index, op.type)
                diff = int(np.abs(ours.astype(np.float64) - reference[t].astype(np.float64)).max(initial=0) > 0)
                assert np.array_equal(ours, reference[t]), (
                    f"op {op.index} {op.type}: {np.count_nonzero(ours != reference[t])} values differ")
                compared[op.type] = compared.get(op.type, 0) + 1 - diff
    return compared


@pytest.fixture(scope="module")
def cnn_models(trained_cnn, digits):
    model, _ = trained_cnn
    (x_train, _), (x_test, _) = digits
    return {
        "float_io": tfq.convert(model, "int8", x_train[:300]),
        "int8_io": tfq.convert(model, "int8", x_train[:300], io_dtype="int8"),
    }, x_test


@pytest.mark.parametrize("io", ["float_io", "int8_io"])
def test_trained_cnn_bit_exact_every_tensor(cnn_models, io):
    models, x_test = cnn_models
    content = models[io]
    arrays = tfq.reference.executor.prepare_inputs(read_graph(content), [x_test[:200]])
    reference = _builtin_ref(content, arrays, all_tensors=True)
    compared = assert_bit_exact(content, arrays, reference)
    assert {"CONV_2D", "MAX_POOL_2D", "FULLY_CONNECTED", "SOFTMAX"} <= set(compared)
    outputs = tfq.reference.run(content, arrays)
    assert len(outputs) == 1 and np.array_equal(outputs[0], reference[read_graph(content).outputs[0]])
    assert outputs[0].dtype == (np.float32 if io == "float_io" else np.int8)


def test_float_data_is_quantized_like_tfliteModel(cnn_models):
    models, x_test = cnn_models
    content = models["int8_io"]
    detail = tfq.TFLiteModel(content).input_details[0]
    scale, zp = detail["quantization"]
    as_tfliteModel_feeds_it = np.clip(np.round(x_test[:50] / scale) + zp, -128, 127).astype(np.int8)
    ours = tfq.reference.run(content, x_test[:50])[0]
    assert ours.dtype == np.int8
    assert np.array_equal(ours, tfq.reference.run(content, as_tfliteModel_feeds_it)[0])
    assert np.array_equal(ours, _builtin_ref(content, [as_tfliteModel_feeds_it])[read_graph(content).outputs[0]])


def test_explain_conv_matches_scales_and_trace(cnn_models):
    models, x_test = cnn_models
    content = models["float_io"]
    info = tfq.inspect_tflite(content)
    [conv] = tfq.reference.explain(content, op="CONV_2D", inputs=x_test[:100])
    op = info.ops[conv.index]
    s_in = info.tensors[op.inputs[0]].scales[0]
    s_w = np.array(info.tensors[op.inputs[1]].scales, dtype=np.float64)
    s_out = info.tensors[op.outputs[0]].scales[0]
    np.testing.assert_allclose(conv.real_multiplier, np.float64(np.float32(s_in)) * s_w / np.float64(s_out), rtol=1e-12)
    for m, m0, n in zip(conv.real_multiplier, conv.m0, conv.n):
        assert 2**30 <= m0 < 2**31 and abs(m - m0 * 2.0**-n) <= 2.0**-n
    lo, hi = conv.accumulator_bounds
    assert lo <= conv.observed_accumulator[0] <= conv.observed_accumulator[1] <= hi
    assert not conv.int32_overflow
    # The trace's accumulator, requantized by hand with (M0, n), is the traced output.
    t = tfq.reference.trace(content, x_test[:100])
    acc = t.accumulators[conv.index]
    zp_out = info.tensors[op.outputs[0]].zero_points[0]
    by_hand = fp.multiply_by_quantized_multiplier(acc, np.array(conv.m0), 31 - np.array(conv.n)) + zp_out
    assert np.array_equal(np.clip(by_hand, *conv.clamp), t.tensors[op.outputs[0]])
    assert "M ∈" in str(conv) and "accumulator" in str(conv)
    table = tfq.reference.explain_table(content, inputs=x_test[:20])
    assert table.count("\n") == len(info.ops) + 1 and "FULLY_CONNECTED" in table


def test_explain_counts_saturation(cnn_models):
    """Saturation is counted against an independent recount of the traced unclamped values."""
    models, x_test = cnn_models
    content = models["float_io"]
    # Data far outside the calibration range saturates the last dense layer's int8 output.
    x = np.clip(x_test[:50] * 3.0, 0, 3.0)
    entries = tfq.reference.explain(content, inputs=x)
    dense = [e for e in entries if e.type == "FULLY_CONNECTED"][-1]
    execution = tfq.reference.executor.execute(read_graph(content), x)
    unclamped = execution.details[dense.index]["requantization"].unclamped
    assert dense.saturated == int(np.count_nonzero((unclamped < -128) | (unclamped > 127)))
    assert dense.saturated > 0 and dense.num_outputs == unclamped.size


def test_unsupported_op_is_one_line_error(cnn_models):
    models, x_test = cnn_models
    graph = read_graph(models["float_io"])
    graph.operators[1].type = "CUMSUM"
    with pytest.raises(tfq.reference.UnsupportedOpError, match=r"^op 1 CUMSUM is not supported") as err:
        tfq.reference.run(graph, x_test[:2])
    assert "\n" not in str(err.value)


def test_float_model_ops_are_refused(trained_cnn, digits):
    model, _ = trained_cnn
    content = tfq.convert(model, "float")
    with pytest.raises(tfq.reference.UnsupportedOpError, match="CONV_2D with inputs \\['FLOAT32'"):
        tfq.reference.run(content, digits[1][0][:2])


def test_bad_inputs(cnn_models):
    models, x_test = cnn_models
    with pytest.raises(ValueError, match="expects samples of shape"):
        tfq.reference.run(models["float_io"], x_test[:2, :4])
    with pytest.raises(ValueError, match="has 1 input"):
        tfq.reference.run(models["float_io"], [x_test[:2], x_test[:2]])
    with pytest.raises(ValueError, match="op index 99 is out of range"):
        tfq.reference.explain(models["float_io"], op=99)


# --- more models, compared in a subprocess ---------------------------------------------------------

def _unet():
    import keras

    L = keras.layers
    inp = keras.Input((16, 16, 3))
    c1 = L.Conv2D(8, 3, padding="same", activation="relu")(inp)
    c2 = L.LeakyReLU(0.1)(L.Conv2D(16, 3, padding="same")(L.AveragePooling2D(2)(c1)))
    b = L.Conv2D(16, 3, padding="same", activation="hard_swish")(L.MaxPooling2D(2)(c2))
    m2 = L.Conv2D(8, 3, padding="same", activation="sigmoid")(
        L.Concatenate()([L.Conv2DTranspose(16, 3, strides=2, padding="same")(b), c2]))
    u1 = L.UpSampling2D(interpolation="bilinear")(m2)
    t = L.Activation("tanh")(L.Conv2D(8, 1)(c1))
    s = L.Subtract()([L.Add()([u1, t]), L.Multiply()([u1, t])])
    n = L.Resizing(16, 16, interpolation="nearest")(L.Conv2D(4, 1, strides=2)(s))
    return keras.Model(inp, L.Conv2D(2, 1, activation="relu6")(L.Concatenate()([n, s])))


def _mha_block():
    import keras

    L = keras.layers
    inp = keras.Input((8, 16))
    x = L.MultiHeadAttention(num_heads=2, key_dim=8)(L.LayerNormalization()(inp), L.LayerNormalization()(inp))
    x = L.Add()([inp, x])
    y = L.Dense(16)(L.Dense(32, activation="gelu")(L.LayerNormalization()(x)))
    x = L.GlobalAveragePooling1D()(L.Add()([x, y]))
    return keras.Model(inp, L.Dense(4, activation="softmax")(x))


def _recurrent():
    import keras

    L = keras.layers
    inp = keras.Input((6, 5))
    x = L.LSTM(8, unroll=True, return_sequences=True)(inp)
    x = L.GRU(8, unroll=True, return_sequences=True)(x)
    return keras.Model(inp, L.Dense(2)(L.SimpleRNN(8, unroll=True)(x)))


def _plain_converter_int8(model, x) -> bytes:
    """The TFLite converter's own full-integer PTQ (for layers tfq.convert does not quantize yet)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x[i:i + 1]] for i in range(len(x)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def _fitted_int8(builder, seed=0, plain_converter=False):
    """A briefly trained model (trained weights keep BUILTIN_REF's multipliers in range) and its INT8 export."""
    import keras

    keras.utils.set_random_seed(seed)
    model = builder()
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(160, *model.inputs[0].shape[1:])).astype(np.float32)
    y = rng.normal(size=(160, *model.outputs[0].shape[1:])).astype(np.float32)
    model.compile("adam", "mse")
    model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    if plain_converter:
        return _plain_converter_int8(model, x[:100]), x[100:]
    return tfq.convert(model, "int8", x[:100]), x[100:]


def test_unet_style_ops_bit_exact(tmp_path):
    """CONV, TRANSPOSE_CONV, pools, ADD/SUB/MUL, LOGISTIC, TANH, HARD_SWISH, LEAKY_RELU, RESIZE_*, CONCATENATION."""
    content, x = _fitted_int8(_unet)
    arrays = tfq.reference.executor.prepare_inputs(read_graph(content), [x])
    compared = assert_bit_exact(content, arrays, builtin_ref_subprocess(content, arrays, tmp_path))
    assert {"TRANSPOSE_CONV", "HARD_SWISH", "LOGISTIC", "TANH", "LEAKY_RELU", "RESIZE_BILINEAR",
            "RESIZE_NEAREST_NEIGHBOR", "AVERAGE_POOL_2D", "ADD", "SUB", "MUL"} <= set(compared), compared


@pytest.mark.slow
@pytest.mark.parametrize("builder", [_mha_block, _recurrent], ids=["mha_block", "lstm_gru_rnn"])
def test_transformer_and_recurrent_bit_exact(builder, tmp_path):
    content, x = _fitted_int8(builder, plain_converter=True)
    arrays = tfq.reference.executor.prepare_inputs(read_graph(content), [x])
    compared = assert_bit_exact(content, arrays, builtin_ref_subprocess(content, arrays, tmp_path))
    if builder is _mha_block:
        assert {"BATCH_MATMUL", "SOFTMAX", "GELU", "RSQRT", "SQUARED_DIFFERENCE", "MEAN"} <= set(compared)


@pytest.mark.slow
def test_mobilenet_bit_exact(trained_mobilenet):
    model, (x_train, _), (x_test, _), _ = trained_mobilenet
    content = tfq.convert(model, "int8", x_train[:300])
    arrays = tfq.reference.executor.prepare_inputs(read_graph(content), [x_test[:100]])
    compared = assert_bit_exact(content, arrays, _builtin_ref(content, arrays, all_tensors=True))
    assert {"DEPTHWISE_CONV_2D", "MEAN"} <= set(compared)


@pytest.mark.slow
def test_multi_input_and_int16x8_bit_exact(trained_cnn, digits, tmp_path):
    model, _ = trained_cnn
    (x_train, _), (x_test, _) = digits
    content = tfq.convert(model, "int16x8", x_train[:200])
    arrays = tfq.reference.executor.prepare_inputs(read_graph(content), [x_test[:100]])
    assert_bit_exact(content, arrays, _builtin_ref(content, arrays, all_tensors=True))
    import keras

    keras.utils.set_random_seed(0)
    a, b = keras.Input((4,)), keras.Input((6,))
    h = keras.layers.Dense(16, activation="relu")(keras.layers.Concatenate()([a, b]))
    two = keras.Model([a, b], [keras.layers.Dense(3, activation="softmax")(h), keras.layers.Dense(1)(h)])
    rng = np.random.default_rng(0)
    xa, xb = rng.random((200, 4), np.float32), rng.random((200, 6), np.float32)
    two.compile("adam", ["mse", "mse"])
    two.fit([xa, xb], [rng.random((200, 3)), rng.random((200, 1))], epochs=2, verbose=0)
    content = tfq.convert(two, "int8", [xa[:100], xb[:100]])
    graph = read_graph(content)
    by_shape = {4: xa[100:], 6: xb[100:]}
    arrays = tfq.reference.executor.prepare_inputs(graph, [by_shape[graph.tensors[i].shape[1]] for i in graph.inputs])
    assert_bit_exact(content, arrays, builtin_ref_subprocess(content, arrays, tmp_path))


def test_cli_inspect_explain(cnn_models, tmp_path):
    models, _ = cnn_models
    path = tmp_path / "m.tflite"
    path.write_bytes(models["float_io"])
    proc = subprocess.run([sys.executable, "-m", "tfq.cli", "inspect", f"--tflite={path}", "--explain"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "acc worst case" in proc.stdout and proc.stdout.count("CONV_2D") >= 2
    info = tfq.inspect_tflite(models["float_io"])
    assert all(op.type in proc.stdout for op in info.ops)
    json.dumps([e.to_dict() for e in tfq.reference.explain(models["float_io"])])  # serializable
