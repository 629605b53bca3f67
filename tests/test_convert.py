"""PTQ export: every mode through the converter, checked through LiteRT's own interpreter."""

import os

import keras
import numpy as np
import pytest

import tfq
from tfq import ops
from tests.conftest import tflite_accuracy


@pytest.fixture(scope="module")
def calib(digits):
    (x_train, _), _ = digits
    return x_train[:300]


@pytest.fixture(scope="module")
def int8_io(trained_cnn, calib):
    model, _ = trained_cnn
    return tfq.convert(model, "int8", calib, io_dtype="int8")


def test_int8_digits_accuracy_size_and_fully_integer(trained_cnn, digits, int8_io):
    model, float_acc = trained_cnn
    _, (x_test, y_test) = digits
    float_tflite = tfq.convert(model, "float")
    int8_acc = tflite_accuracy(int8_io, x_test, y_test)
    assert float_acc > 0.9
    assert int8_acc >= float_acc - 0.005, (int8_acc, float_acc)
    assert len(int8_io) <= 0.30 * len(float_tflite), (len(int8_io), len(float_tflite))
    info = tfq.inspect_tflite(int8_io)
    assert info.num_float_ops == 0, info.summary()
    assert info.is_fully_integer
    assert info.input_dtypes == ["INT8"] and info.output_dtypes == ["INT8"]
    assert {"CONV_2D", "FULLY_CONNECTED", "SOFTMAX"} <= set(info.op_types)


def test_float_fp16_dynamic_modes(trained_cnn, digits):
    model, _ = trained_cnn
    _, (x_test, y_test) = digits
    keras_out = model.predict(x_test, verbose=0)
    sizes = {}
    for mode in ("float", "fp16", "dynamic"):
        content = tfq.convert(model, mode)
        sizes[mode] = len(content)
        out = tfq.TFLiteModel(content).predict(x_test)
        tol = {"float": 1e-5, "fp16": 2e-2, "dynamic": 5e-2}[mode]
        assert np.abs(out - keras_out).max() < tol, mode
        info = tfq.inspect_tflite(content)
        assert info.input_dtypes == ["FLOAT32"]
    assert sizes["fp16"] < 0.55 * sizes["float"]
    assert sizes["dynamic"] < 0.30 * sizes["float"]
    fp16_weights = [t for t in tfq.inspect_tflite(tfq.convert(model, "fp16")).tensors if t.dtype == "FLOAT16"]
    assert fp16_weights, "fp16 mode should store weights as FLOAT16"


def test_int16x8_mode(trained_cnn, digits, calib):
    model, float_acc = trained_cnn
    _, (x_test, y_test) = digits
    content = tfq.convert(model, "int16x8", calib)
    info = tfq.inspect_tflite(content)
    activations = [t for t in info.tensors if not t.is_constant and t.dtype == "INT16"]
    assert activations, info.summary()
    assert tflite_accuracy(content, x_test, y_test) >= float_acc - 0.005


def test_uint8_io(trained_cnn, digits, calib):
    model, float_acc = trained_cnn
    _, (x_test, y_test) = digits
    content = tfq.convert(model, "int8", calib, io_dtype="uint8")
    info = tfq.inspect_tflite(content)
    assert info.input_dtypes == ["UINT8"] and info.output_dtypes == ["UINT8"]
    assert tflite_accuracy(content, x_test, y_test) >= float_acc - 0.005


def test_same_inputs_same_bytes(trained_cnn, calib, int8_io):
    model, _ = trained_cnn
    assert tfq.convert(model, "int8", calib, io_dtype="int8") == int8_io


def test_caller_model_untouched(trained_cnn, calib):
    model, _ = trained_cnn
    before = [w.copy() for w in model.get_weights()]
    names = [layer.name for layer in model.layers]
    tfq.convert(model, "int8", calib, calibration="percentile")
    assert [layer.name for layer in model.layers] == names
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


@pytest.mark.parametrize("method", ["minmax", "moving_average", "kl", "percentile", "mse"])
def test_calibrated_ranges_are_the_tflite_scales(trained_cnn, calib, method):
    model, _ = trained_cnn
    cal = tfq.calibrate(model, calib, method=method)
    content = tfq.convert(model, "int8", calibration=cal, io_dtype="int8")
    info = tfq.inspect_tflite(content)
    # The model input: its scale/zero-point must be exactly ours.
    expected = ops.range_to_qparams(*cal["image_fq"])
    inp = info.tensors[info.inputs[0]]
    assert inp.scales[0] == pytest.approx(float(expected.scale), rel=1e-6)
    assert inp.zero_points[0] == int(expected.zero_point)
    # Every hidden activation: the op output tensor named after the layer carries our range.
    for layer, quantizer in [("conv1", "conv1_output_fq"), ("conv2", "conv2_output_fq"), ("fc1", "fc1_output_fq")]:
        candidates = [t for t in info.tensors if f"/{layer}_" in t.name and not t.is_constant and t.dtype == "INT8"]
        assert len(candidates) == 1, [t.name for t in candidates]
        tensor = candidates[0]
        qp = ops.range_to_qparams(*cal[quantizer])
        assert tensor.scales[0] == pytest.approx(float(qp.scale), rel=1e-6), (layer, method)
        assert tensor.zero_points[0] == int(qp.zero_point)


def test_calibration_round_trip_and_reuse(trained_cnn, calib, tmp_path):
    model, _ = trained_cnn
    cal = tfq.calibrate(model, calib, method="percentile", percentile=99.9)
    path = cal.save(tmp_path / "cal.json")
    loaded = tfq.load_calibration(path)
    assert loaded.ranges.keys() == cal.ranges.keys()
    for name in cal.ranges:
        assert loaded[name] == pytest.approx(cal[name])
    assert loaded.method == "percentile" and loaded.params == {"percentile": 99.9}
    assert tfq.convert(model, "int8", calibration=loaded) == tfq.convert(model, "int8", calibration=cal)


def test_outlier_calibration_robust_methods_keep_accuracy(trained_cnn, digits):
    model, float_acc = trained_cnn
    (x_train, _), (x_test, y_test) = digits
    calib = x_train[:300].copy()
    calib[[10, 150, 290]] *= 100.0  # three corrupted samples
    results, input_scales = {}, {}
    # 3 of 300 samples ×100: ~0.5% of all values are outliers, so the percentile must sit below 99.5.
    params = {"minmax": None, "percentile": {"percentile": 99.0}, "kl": None, "mse": None,
              "mse_median": {"batch_aggregate": "median"}}
    for key in params:
        content = tfq.convert(model, "int8", calib, calibration=key.split("_")[0], io_dtype="int8",
                              calibration_params=params[key])
        method = key
        results[method] = tflite_accuracy(content, x_test, y_test)
        info = tfq.inspect_tflite(content)
        input_scales[method] = info.tensors[info.inputs[0]].scales[0]
    assert results["minmax"] < float_acc - 0.05, results
    assert results["percentile"] >= float_acc - 0.01, results
    assert input_scales["percentile"] < input_scales["minmax"] / 10, input_scales
    # KL folds the outliers into its last bin: a narrower range and most of MinMax's loss recovered.
    assert results["kl"] >= results["minmax"] + 0.03, results
    assert input_scales["kl"] < input_scales["minmax"], input_scales
    # MSE weighs the outliers' squared clipping error (0.5% of values at ~50) against rounding
    # noise, so it keeps their range: never wider than MinMax, but no protection here.
    assert input_scales["mse"] <= input_scales["minmax"] * (1 + 1e-6)
    # MSE per calibration batch (32 samples), median over the 10 batches: 3 hold an outlier.
    assert results["mse_median"] >= float_acc - 0.01, results
    assert input_scales["mse_median"] < input_scales["minmax"] / 10, input_scales


def test_kl_on_sparse_depthwise_relu6_keeps_accuracy(trained_mobilenet):
    # Depthwise ReLU6 outputs of digits hold one constant per channel over the empty background:
    # point masses that once pulled KL's threshold to a fifth of the range (74 % INT8 accuracy).
    model, (x_train, _), (x_test, y_test), float_acc = trained_mobilenet
    accuracy, cals = {}, {}
    for method in ("minmax", "kl"):
        cals[method] = tfq.calibrate(model, x_train[:500], method=method)
        accuracy[method] = tflite_accuracy(tfq.convert(model, "int8", calibration=cals[method]), x_test, y_test)
    assert accuracy["minmax"] >= float_acc - 0.01, accuracy
    assert accuracy["kl"] >= accuracy["minmax"] - 0.01, accuracy
    for i in range(4):
        name = f"dw{i}_output_fq"
        assert cals["kl"][name][1] >= 0.5 * cals["minmax"][name][1], (name, cals["kl"][name], cals["minmax"][name])


def test_float_layers_stay_float(trained_cnn, calib):
    model, _ = trained_cnn
    content = tfq.convert(model, "int8", calib, float_layers=["fc1"])
    info = tfq.inspect_tflite(content)
    fcs = [op for op in info.ops if op.type == "FULLY_CONNECTED"]
    assert len(fcs) == 2
    assert sum(op.is_float for op in fcs) == 1
    assert all(not op.is_float for op in info.ops if op.type == "CONV_2D")
    # by class: all Dense layers float
    info = tfq.inspect_tflite(tfq.convert(model, "int8", calib, float_layers=[keras.layers.Dense]))
    assert all(op.is_float for op in info.ops if op.type == "FULLY_CONNECTED")


def test_float_layer_barrier_is_exact_and_has_no_cast(digits, calib):
    """The barrier before a float layer is NEG then MUL by −1 (float ops XNNPACK runs), not a float16 CAST
    pair, which XNNPACK does not run and which split the delegated graph at every float layer."""
    from ai_edge_litert.interpreter import Interpreter

    from tfq.quantsim.layers import FloatBarrier

    x = np.random.default_rng(0).standard_normal((4, 33)).astype("float32") * np.float32(1e3)
    x[0, :3] = [0.0, np.finfo(np.float32).max, np.finfo(np.float32).tiny]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(FloatBarrier()(x)), x)  # exact, unlike float16
    keras.utils.set_random_seed(0)
    h = inputs = keras.Input(digits[0][0].shape[1:])
    for i in range(2):
        h = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name=f"conv{i}")(h)
        h = keras.layers.BatchNormalization(name=f"bn{i}")(h)
        h = keras.layers.PReLU(shared_axes=[1, 2], alpha_initializer=keras.initializers.Constant(0.2),
                               name=f"prelu{i}")(h)
    model = keras.Model(inputs, keras.layers.Dense(10, name="head")(keras.layers.GlobalAveragePooling2D()(h)))
    content = tfq.convert(model, "int8", calib, float_layers=["prelu.*"])
    info = tfq.inspect_tflite(content)
    types = [op.type for op in info.ops]
    assert "CAST" not in types and types.count("PRELU") == 2
    assert sorted(op.type for op in info.float_ops) == ["MUL", "MUL", "NEG", "NEG", "PRELU", "PRELU"]
    # Read back through LiteRT's interpreter: each PReLU's input and output tensors are float32.
    interpreter = Interpreter(model_content=content)
    dtypes = {d["index"]: d["dtype"] for d in interpreter.get_tensor_details()}
    for op in (op for op in info.ops if op.type == "PRELU"):
        assert dtypes[op.inputs[0]] == np.float32 and dtypes[op.outputs[0]] == np.float32
    test = digits[1][0][:64]
    reference = np.asarray(model.predict(test, verbose=0), np.float64)
    got = np.asarray(tfq.TFLiteModel(content).predict(test), np.float64)
    assert 10 * np.log10(np.sum(reference ** 2) / np.sum((reference - got) ** 2)) > 25.0


def test_per_tensor_weights(trained_cnn, calib):
    model, _ = trained_cnn
    per_channel = tfq.inspect_tflite(tfq.convert(model, "int8", calib))
    per_tensor = tfq.inspect_tflite(tfq.convert(model, "int8", calib, per_channel=False))

    def conv_weight_scales(info):
        op = next(op for op in info.ops if op.type == "CONV_2D")
        return len(info.tensors[op.inputs[1]].scales)

    assert conv_weight_scales(per_channel) == 32
    assert conv_weight_scales(per_tensor) == 1


def test_output_written_atomically(trained_cnn, calib, tmp_path):
    model, _ = trained_cnn
    out = tmp_path / "m.tflite"
    content = tfq.convert(model, "dynamic", output=out)
    assert out.read_bytes() == content
    with pytest.raises(ValueError):
        tfq.convert(model, "int8", np.full((4, 8, 8, 1), np.nan, np.float32), output=tmp_path / "bad.tflite")
    assert sorted(os.listdir(tmp_path)) == ["m.tflite"]


def test_model_from_keras_file(trained_cnn, tmp_path, calib):
    model, _ = trained_cnn
    path = tmp_path / "m.keras"
    model.save(path)
    assert tfq.convert(str(path), "int8", calib) == tfq.convert(model, "int8", calib)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="int4"), "mode must be one of"),
        (dict(mode="dynamic", io_dtype="int8"), "io_dtype"),
        (dict(mode="int8", calibration="median"), "calibration"),
        (dict(mode="int8"), "needs representative_data"),
    ],
)
def test_bad_arguments(trained_cnn, kwargs, message):
    model, _ = trained_cnn
    with pytest.raises(ValueError, match=message):
        tfq.convert(model, **kwargs)


def test_bad_inputs(trained_cnn, calib, tmp_path):
    model, _ = trained_cnn
    with pytest.raises(FileNotFoundError, match="missing.keras"):
        tfq.convert(str(tmp_path / "missing.keras"), "int8", calib)
    (tmp_path / "junk.keras").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.keras"):
        tfq.convert(str(tmp_path / "junk.keras"), "float")
    with pytest.raises(ValueError, match="shape"):
        tfq.convert(model, "int8", np.zeros((10, 9, 9, 1), np.float32))
    with pytest.raises(ValueError, match="empty"):
        tfq.convert(model, "int8", np.zeros((0, 8, 8, 1), np.float32))
    other = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(name="f"), keras.layers.Dense(3, name="d")])
    cal = tfq.calibrate(other, calib, method="minmax")
    with pytest.raises(ValueError, match="another model"):
        tfq.convert(model, "int8", calibration=cal)


def test_inspect_rejects_corrupt(tmp_path, int8_io):
    with pytest.raises(ValueError, match="not a TFLite model"):
        tfq.inspect_tflite(b"garbage bytes here")
    with pytest.raises(FileNotFoundError):
        tfq.inspect_tflite(tmp_path / "none.tflite")
    truncated = tmp_path / "t.tflite"
    truncated.write_bytes(int8_io[:200])
    with pytest.raises(ValueError):
        tfq.TFLiteModel(truncated)
