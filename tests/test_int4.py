"""W4A8 in the file: 4-bit weights stored INT4, the integers tfq chose, run by LiteRT."""

import re
import warnings

import numpy as np
import pytest

import tfq
from tfq.tflite.int4 import (
    four_bit_integers,
    int4_tensors,
    pack_int4,
    rewrite_int4_weights,
    unpack_int4,
)

W4A8 = {"weights": tfq.TensorSpec(bits=4)}  # exports without allow_non_tflite: INT4 in the file


def test_pack_int4_layout_low_nibble_first():
    # 1 -> 0x1, -1 -> 0xF, 7 -> 0x7, -8 -> 0x8; pairs (low, high): (1, -1) = 0xF1, (7, -8) = 0x87, (0,) = 0x00
    assert pack_int4([1, -1, 7, -8, 0]) == bytes([0xF1, 0x87, 0x00])
    values = np.arange(-8, 8).repeat(3)[:47]
    np.testing.assert_array_equal(unpack_int4(pack_int4(values), values.size), values)
    with pytest.raises(ValueError, match="Received: values in \\[-9, 0\\]"):
        pack_int4([-9, 0])


def test_four_bit_integers_inverts_the_converters_8_bit_requantization():
    q4 = np.array([[7, -3, 1, 0], [-5, 2, 0, 1]])  # row 1 reaches only 5: k = 5 there
    s4 = np.array([0.5, 0.25])
    k = np.abs(q4).max(axis=1)
    s8 = (k * s4 / 127).astype(np.float32)
    q8 = np.round(q4 * 127 / k[:, None]).astype(np.int8)
    q, s = four_bit_integers(q8, s8, 0)
    np.testing.assert_array_equal(q, q4)
    np.testing.assert_allclose(s, s4, rtol=1e-6)
    assert four_bit_integers(np.array([[127, -64, 3]], np.int8), np.array([1.0], np.float32), 0) is None


def _small_model():
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(256, activation="relu", name="fc1")(x)
    outputs = keras.layers.Dense(10, name="fc2")(x)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).normal(size=(64, 8, 8, 2)).astype(np.float32)
    return model, x


@pytest.fixture(scope="module")
def small_w4a8():
    model, x = _small_model()
    recipe = tfq.Recipe(**W4A8)
    return model, x, tfq.convert(model, recipe=recipe, representative_data=x), tfq.convert(model, "int8", x), recipe


def _nearest_4bit(kernel):
    """Per-output-channel symmetric 4-bit integers of a Keras kernel, ``(out, fan-in)`` (computed here)."""
    m = kernel.reshape(-1, kernel.shape[-1]).T.astype(np.float64)
    scale = np.abs(m).max(axis=1, keepdims=True) / 7
    return np.round(m / scale).astype(np.int8)


def test_w4a8_file_stores_tfqs_integers_as_int4(small_w4a8):
    model, _, content, int8, _ = small_w4a8
    found = {t.name.split("/")[1]: t for t in int4_tensors(content)}
    assert {t.op for t in found.values()} == {"CONV_2D", "FULLY_CONNECTED"}
    for layer in ("conv", "fc1", "fc2"):
        t = next(v for k, v in found.items() if k.startswith(layer))
        expected = _nearest_4bit(model.get_layer(layer).kernel.numpy())
        np.testing.assert_array_equal(t.values.reshape(t.shape[0], -1), expected)  # TFLite: (out, ..., in)
    info = tfq.inspect_tflite(content)
    assert not [w for w in info.weights if w.dtype == "INT8"]
    fc1 = next(w for w in info.weights if "fc1" in w.name)
    assert (fc1.bits, fc1.nbytes) == (4, 256 * 288 // 2)
    assert info.weight_bytes < 0.51 * tfq.inspect_tflite(int8).weight_bytes
    assert len(content) <= 0.6 * len(int8)  # weight-dominated: 74 k weights


def _run(content, x, resolver):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_content=content, experimental_op_resolver_type=getattr(OpResolverType, resolver))
    it.resize_tensor_input(it.get_input_details()[0]["index"], x.shape)
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


@pytest.mark.parametrize("layer", ["dense", "conv", "depthwise"])
def test_w4a8_interpreter_matches_tfqs_simulation_within_one_step(layer):
    """One layer: LiteRT's INT4 kernels give tfq's simulated W4A8 output within one output step
    (on the samples the file's calibrated output range does not clip)."""
    import keras

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    if layer == "dense":
        model = keras.Sequential([keras.Input((288,)), keras.layers.Dense(64, bias_initializer="random_normal")])
        x = rng.normal(size=(64, 288)).astype(np.float32)
    else:
        cls = keras.layers.Conv2D if layer == "conv" else keras.layers.DepthwiseConv2D
        args = (16, 3) if layer == "conv" else (3,)
        model = keras.Sequential([keras.Input((8, 8, 16)), cls(*args, bias_initializer="random_normal")])
        x = rng.normal(size=(64, 8, 8, 16)).astype(np.float32)
    recipe = tfq.Recipe(**W4A8)
    content = tfq.convert(model, recipe=recipe, representative_data=x)
    assert [w.bits for w in tfq.inspect_tflite(content).weights] == [4]
    sim = tfq.fake_quantize(model, recipe=recipe, representative_data=x).predict(x, verbose=0)
    info = tfq.inspect_tflite(content)
    out_t = info.tensors[next(op for op in info.ops if op.type == "DEQUANTIZE").inputs[0]]
    step, zp = out_t.scales[0], out_t.zero_points[0]
    inside = np.all((sim >= (-128 - zp) * step) & (sim <= (127 - zp) * step), axis=tuple(range(1, sim.ndim)))
    assert inside.mean() > 0.5
    for resolver in ("AUTO", "BUILTIN_WITHOUT_DEFAULT_DELEGATES"):
        out = _run(content, x, resolver)
        assert np.abs(out - sim)[inside].max() <= 1.0001 * step


def test_reference_executes_int4_weights_bit_exactly(small_w4a8, tmp_path):
    """tfq.reference unpacks INT4 weights and equals LiteRT's BUILTIN_REF kernels on every tensor."""
    from test_reference import assert_bit_exact, builtin_ref_subprocess

    _, x, content, _, _ = small_w4a8
    compared = assert_bit_exact(content, [x[:8]], builtin_ref_subprocess(content, [x[:8]], tmp_path))
    assert {"CONV_2D", "FULLY_CONNECTED"} <= set(compared)


def test_int8_recipe_files_are_unchanged_and_rewrite_is_idempotent(small_w4a8):
    _, _, content, int8, _ = small_w4a8
    assert rewrite_int4_weights(int8) == (int8, [])  # 8-bit weights are not on a 4-bit grid
    assert rewrite_int4_weights(content) == (content, [])
    with pytest.raises(ValueError, match="Expected 4-bit integers in tensor"):
        rewrite_int4_weights(int8, select=lambda name: "fc1" in name)


@pytest.mark.slow
def test_digits_cnn_w4a8_gptq_file(trained_cnn, digits):
    """The packaged-digits CNN: GPTQ's integers in the file, ≤ 0.6× the INT8 size, accuracy of the simulation."""
    model, float_acc = trained_cnn
    (x_train, _), (x_test, y_test) = digits
    report = tfq.MethodsReport()
    content = tfq.convert(model, recipe="w4a8_gptq", representative_data=x_train[:512], report=report)
    int8 = tfq.convert(model, "int8", x_train[:512])
    assert len(content) <= 0.6 * len(int8)
    tensors = int4_tensors(content)
    assert len(tensors) == 4
    for t in tensors:
        layer = t.name.split("/")[1].rsplit("_", 1)[0]
        np.testing.assert_array_equal(t.values.reshape(t.shape[0], -1), report.rounding[layer].integers)
    out = tfq.tflite.interpreter.TFLiteModel(content).predict(x_test)
    assert (out.argmax(1) == y_test).mean() >= float_acc - 0.01


def test_four_bit_weights_of_ops_without_int4_kernels_stay_int8_with_a_warning(small_w4a8, monkeypatch):
    """An op LiteRT cannot run at 4 bits keeps its 4-bit integers INT8, named in one warning."""
    import tfq.export.int4 as export_int4
    import tfq.tflite.int4 as tflite_int4

    model, x, _, _, recipe = small_w4a8
    monkeypatch.setattr(tflite_int4, "INT4_WEIGHT_OPS", {"CONV_2D": 1})  # as if FC had no INT4 kernel
    monkeypatch.setattr(export_int4, "INT4_WEIGHT_OPS", {"CONV_2D": 1})
    import tfq.export.convert as convert_module

    monkeypatch.setattr(convert_module, "write_int4_weights", lambda c, r, frozen=None: c)
    raw = tfq.convert(model, recipe=recipe, representative_data=x)  # the converter's file: FC kernels INT8
    with pytest.warns(UserWarning, match=r"2 weight tensor\(s\) hold 4-bit integers but stay INT8.*fc1.*FULLY_CONNECTED"):
        out = export_int4.write_int4_weights(raw, recipe)
    info = tfq.inspect_tflite(out)
    assert sorted(w.bits for w in info.weights) == [4, 8, 8]
    fc1 = next(w for w in info.weights if "fc1" in w.name)
    expected = _nearest_4bit(model.get_layer("fc1").kernel.numpy())
    stored = next(t for t in tfq.reference.graph.read_graph(out).tensors if t.name == fc1.name).data
    np.testing.assert_array_equal(np.round(stored.astype(np.float64) * 7 / 127), expected)  # round(q·127/7)


def test_qat_model_trained_at_4_bits_exports_int4(small_w4a8):
    """A QAT model made with a W4 recipe converts with mode="int8" to INT4 weights: its own 4-bit integers."""
    from tfq.quantsim.rewrite import quantized_layers_of

    model, x, _, int8, recipe = small_w4a8
    qat = tfq.qat.quantize_model(model, recipe, calibration_data=x)
    content = tfq.convert(qat, "int8")
    found = {t.name.split("/")[1]: t for t in int4_tensors(content)}
    assert {t.op for t in found.values()} == {"CONV_2D", "FULLY_CONNECTED"} and len(found) == 3
    for wrapper in quantized_layers_of(qat):
        name = wrapper.layer.name
        t = next(v for k, v in found.items() if k.startswith(name))
        np.testing.assert_array_equal(t.values.reshape(t.shape[0], -1), _nearest_4bit(wrapper.layer.kernel.numpy()))
    assert len(content) <= 0.6 * len(int8)


def test_per_tensor_w4a8_integers_in_the_file():
    model, x = _small_model()
    recipe = tfq.Recipe(weights=tfq.TensorSpec(bits=4, per_channel=False), allow_non_tflite=True)
    content = tfq.convert(model, recipe=recipe, representative_data=x)
    tensors = int4_tensors(content)
    assert len(tensors) == 3 and all(len(t.scales) == 1 for t in tensors)
    for t in tensors:
        k = model.get_layer(t.name.split("/")[1].rsplit("_", 1)[0]).kernel.numpy()
        m = k.reshape(-1, k.shape[-1]).T
        np.testing.assert_array_equal(t.values.reshape(t.shape[0], -1), np.round(m / (np.abs(m).max() / 7)))
        assert t.scales[0] == pytest.approx(np.abs(m).max() / 7, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Float activations: w4_dynamic (LiteRT's hybrid kernels) and w4_weight_only (DEQUANTIZE).


def _float_activation_model():
    import keras

    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.DepthwiseConv2D(3, activation="relu", name="dw")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(64, activation="relu", name="fc1")(x)
    outputs = keras.layers.Dense(10, name="fc2")(x)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(1).normal(size=(64, 8, 8, 2)).astype(np.float32)
    return model, x


def _matrix(layer):
    """A Keras kernel as (channels, fan-in), the rows TFLite quantizes (depthwise: one row per channel)."""
    k = layer.kernel.numpy()
    if "dw" in layer.name:
        return k.reshape(-1, k.shape[2] * k.shape[3]).T
    return k.reshape(-1, k.shape[-1]).T


def _file_matrix(t):
    v = t.values
    return v.reshape(-1, v.shape[-1]).T if t.op == "DEQUANTIZE" and t.quantized_dimension == 3 else v.reshape(v.shape[0], -1)


def _dequantized_model(model, tensors):
    """A copy of ``model`` whose kernels are the file's integers times their scales (computed here)."""
    import keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for t in tensors:
        layer = copy.get_layer(t.name.split("/")[1].rsplit("_", 1)[0])
        m = _file_matrix(t).astype(np.float64) * np.asarray(t.scales).reshape(-1, 1)
        k = layer.kernel.numpy()
        if layer.name == "dw":
            layer.kernel.assign(m.T.reshape(k.shape).astype(np.float32))
        else:
            layer.kernel.assign(m.T.reshape(k.shape).astype(np.float32))
    return copy


def _sqnr(ref, y):
    return 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - y) ** 2))


@pytest.fixture(scope="module")
def float_activation_files():
    model, x = _float_activation_model()
    out = {}
    for mode in ("w4_dynamic", "w4_weight_only"):
        out[mode] = tfq.convert(model, mode)
        report = tfq.MethodsReport()
        out[mode + "_gptq"] = (tfq.convert(model, mode, x, weight_rounding="gptq", report=report), report)
    return model, x, out


@pytest.mark.parametrize("mode", ["w4_dynamic", "w4_weight_only"])
def test_float_activation_modes_store_nearest_integers_and_run(mode, float_activation_files):
    """Every kernel INT4 with the per-channel nearest integers computed here; hybrid kernels for FC/CONV in
    w4_dynamic (depthwise dequantized: LiteRT has no hybrid INT4 depthwise), DEQUANTIZE for all in
    w4_weight_only; LiteRT's output equals the Keras model with those dequantized kernels (weight-only)
    or is within 30 dB of it (dynamic: activations rounded at run time; measured 37–40 dB)."""
    model, x, files = float_activation_files
    content = files[mode]
    tensors = int4_tensors(content)
    found = {t.name.split("/")[1].rsplit("_", 1)[0]: t for t in tensors}
    assert set(found) == {"conv", "dw", "fc1", "fc2"}
    expected_ops = {"conv": "CONV_2D", "dw": "DEQUANTIZE", "fc1": "FULLY_CONNECTED", "fc2": "FULLY_CONNECTED"} \
        if mode == "w4_dynamic" else dict.fromkeys(found, "DEQUANTIZE")
    assert {k: t.op for k, t in found.items()} == expected_ops
    for name, t in found.items():
        m = _matrix(model.get_layer(name))
        scale = np.abs(m).max(axis=1) / 7
        np.testing.assert_array_equal(_file_matrix(t), np.round(m / scale[:, None]))
        np.testing.assert_allclose(t.scales, scale, rtol=1e-6)
    info = tfq.inspect_tflite(content)
    assert info.input_dtypes == ["FLOAT32"] and not [w for w in info.weights if w.dtype == "FLOAT32"]
    assert len(content) < 0.3 * len(tfq.convert(model, "float"))
    ref = _dequantized_model(model, tensors).predict(x, verbose=0)
    for resolver in ("AUTO", "BUILTIN_WITHOUT_DEFAULT_DELEGATES"):
        out = _run(content, x, resolver)
        if mode == "w4_weight_only":
            np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        else:
            assert _sqnr(ref, out) > 30


@pytest.mark.parametrize("mode", ["w4_dynamic", "w4_weight_only"])
def test_float_activation_modes_write_gptqs_integers(mode, float_activation_files):
    """With weight_rounding='gptq' the file holds the integers GPTQ chose (the report's), and the output
    is closer to float than nearest rounding's on the calibration data."""
    model, x, files = float_activation_files
    content, report = files[mode + "_gptq"]
    found = {t.name.split("/")[1].rsplit("_", 1)[0]: t for t in int4_tensors(content)}
    assert set(report.rounding) == set(found)
    for name, t in found.items():
        np.testing.assert_array_equal(_file_matrix(t), report.rounding[name].integers)
    ref = model.predict(x, verbose=0)
    assert _sqnr(ref, _run(content, x, "AUTO")) > _sqnr(ref, _run(files[mode], x, "AUTO")) + 1.0


def test_w4_dynamic_blockwise_dense_weights():
    """block_size=32: Dense weights stored blockwise (FLOAT16 scales per 32 inputs, the nearest integers per
    block computed here), run by FULLY_CONNECTED's hybrid kernel; the convolutions keep per-channel scales
    (one warning names them)."""
    from tfq.tflite import int4 as tflite_int4

    model, x = _float_activation_model()
    recipe = tfq.Recipe(mode="w4_dynamic", weights=tfq.TensorSpec(bits=4, block_size=32))
    with pytest.warns(UserWarning, match=r"block_size applies to Dense layers.*'conv', 'dw' keep per-channel"):
        content = tfq.convert(model, recipe=recipe)
    m = tflite_int4.load_model(content)
    sg = m.subgraphs[0]
    blockwise = {}
    for t in sg.tensors:
        q = t.quantization
        if q is not None and q.detailsType == tflite_int4.schema().QuantizationDetails.BlockwiseQuantization:
            st = sg.tensors[q.details.scales]
            scales = np.frombuffer(np.asarray(m.buffers[st.buffer].data, np.uint8).tobytes(), np.float16)
            blockwise[tflite_int4.tensor_name(t).split("/")[1].rsplit("_", 1)[0]] = (t, scales, q.details.blockSize)
    assert set(blockwise) == {"fc1", "fc2"}
    for name, (t, scales, block) in blockwise.items():
        w = _matrix(model.get_layer(name))
        blocks = w.reshape(w.shape[0], -1, 32)
        s = (np.abs(blocks).max(axis=2) / 7).astype(np.float16)
        assert block == 32
        np.testing.assert_array_equal(scales.reshape(s.shape), s)
        values = tflite_int4.unpack_int4(np.asarray(m.buffers[t.buffer].data, np.uint8).tobytes(), w.size)
        np.testing.assert_array_equal(values.reshape(w.shape),
                                      np.clip(np.round(blocks / s.astype(np.float64)[..., None]), -7, 7).reshape(w.shape))
    ref = model.predict(x, verbose=0)
    per_channel = tfq.convert(model, "w4_dynamic")
    assert _sqnr(ref, _run(content, x, "AUTO")) > _sqnr(ref, _run(per_channel, x, "AUTO"))


def test_float_activation_modes_refuse_in_one_line():
    import keras

    model, x = _float_activation_model()
    cases = [
        (lambda: tfq.Recipe(mode="w4_weight_only", weights=tfq.TensorSpec(bits=4, block_size=32)),
         "mode='w4_weight_only' has no blockwise kernel"),
        (lambda: tfq.convert(model, recipe=tfq.Recipe(mode="w4_dynamic", weights=tfq.TensorSpec(bits=4, block_size=32),
                                                      weight_rounding="adaround"), representative_data=x),
         "weight_rounding='adaround' learns one rounding per weight on a per-channel grid"),
        (lambda: tfq.convert(model, "w4_dynamic", x, calibration="kl"), "mode='w4_dynamic' cannot honour calibration"),
        (lambda: tfq.convert(model, "w4_weight_only", io_dtype="int8"), "io_dtype must be one of 'float32'"),
        (lambda: tfq.convert(model, "w4_dynamic", weight_rounding="gptq"),
         "weight_rounding='gptq' learns from calibration data: pass representative_data."),
    ]
    for call, fragment in cases:
        with pytest.raises(ValueError, match=re.escape(fragment)) as info:
            call()
        assert "\n" not in str(info.value)
    with pytest.warns(UserWarning, match="representative_data was not used"):
        tfq.convert(model, "w4_dynamic", x)
    del keras


@pytest.mark.slow
def test_digits_cnn_float_activation_modes_accuracy(trained_cnn, digits):
    """Packaged-digits CNN: GPTQ's 4-bit weights with float activations, through LiteRT, within 1 pt of
    float (the benchmark's digits CNN: 98.33 % for float, w4_dynamic_gptq and w4_weight_only_gptq)."""
    model, float_acc = trained_cnn
    (x_train, _), (x_test, y_test) = digits
    for recipe in ("w4_dynamic_gptq", "w4_weight_only_gptq"):
        content = tfq.convert(model, recipe=recipe, representative_data=x_train[:512])
        assert len(content) <= 0.6 * len(tfq.convert(model, "dynamic"))
        out = tfq.tflite.interpreter.TFLiteModel(content).predict(x_test)
        assert (out.argmax(1) == y_test).mean() >= float_acc - 0.01


def test_attention_projections_are_4_bit_in_w4a8_and_w4_dynamic():
    """MultiHeadAttention's EinsumDense projections (FULLY_CONNECTED in the file) hold 4-bit integers, one scale per
    output unit, equal to nearest rounding computed here; before, W4A8 left them 8-bit in the file and in the
    simulation."""
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input((6, 16))
    mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, name="mha")
    y = keras.layers.GlobalAveragePooling1D()(mha(inputs, inputs))
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(y))
    x = np.random.default_rng(3).normal(size=(64, 6, 16)).astype(np.float32)
    value = next(w for w in model.get_layer("mha").weights if w.path.endswith("value/kernel")).numpy()  # (16, 2, 8)
    m = value.reshape(16, -1).T.astype(np.float64)
    expected = np.round(m / (np.abs(m).max(axis=1, keepdims=True) / 7))
    for kwargs in ({"recipe": tfq.Recipe(weights=tfq.TensorSpec(bits=4)), "representative_data": x},
                   {"mode": "w4_dynamic"}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            content = tfq.convert(model, **kwargs)
        tensors = int4_tensors(content)
        assert len(tensors) == 5  # query, key, value, attention output, head
        t = next(t for t in tensors if "value" in t.name)
        np.testing.assert_array_equal(t.values.reshape(t.shape[0], -1), expected)
    sim = tfq.fake_quantize(model, recipe=tfq.Recipe(weights=tfq.TensorSpec(bits=4)), representative_data=x)
    assert _sqnr(sim.predict(x, verbose=0), _run(tfq.convert(model, recipe=tfq.Recipe(weights=tfq.TensorSpec(bits=4)),
                                                             representative_data=x), x, "AUTO")) > 25


def test_float_activation_modes_honour_options(float_activation_files):
    """float_layers keeps a layer float, per_channel=False stores one scale per weight (run by LiteRT: equal to the
    dequantized model for weight-only, within 30 dB for dynamic; measured 40–42 dB), and the same inputs give the
    same bytes."""
    model, x, files = float_activation_files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = tfq.convert(model, "w4_weight_only", float_layers=["fc1"])
        assert {t.name.split("/")[1].rsplit("_", 1)[0] for t in int4_tensors(kept)} == {"conv", "dw", "fc2"}
        for mode in ("w4_dynamic", "w4_weight_only"):
            content = tfq.convert(model, mode, per_channel=False)
            tensors = int4_tensors(content)
            assert [len(t.scales) for t in tensors] == [1] * 4
            ref = _dequantized_model(model, tensors).predict(x, verbose=0)
            assert _sqnr(ref, _run(content, x, "AUTO")) > (100 if mode == "w4_weight_only" else 30)
        again = tfq.convert(model, "w4_dynamic", x, weight_rounding="gptq")
    assert again == files["w4_dynamic_gptq"][0]
