"""Issue 28 item 4: the front-end below Keras (tfq.export.tflite_frontend through tfq.convert).

Models are built here, no downloads: a small CNN exported as a SavedModel (``model.export``), its float
``.tflite`` and a ``keras.layers.TFSMLayer`` model around it; an audio-like SavedModel written with
tf.Module + tf.function (frames → STFT → magnitude → divided by its max + 1e-6, the normalising DIV →
log(x + 1e-6) → Dense), calibrated on noise and fed silence. The independent path is LiteRT's interpreter
(in a separate process, tfq.tflite.sandbox, where a kernel may abort).
"""

from __future__ import annotations

import math
import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import save_audio_saved_model
from tfq.analysis.evaluation import layer_errors
from tfq.export import tflite_frontend as fe
from tfq.export.convert import ConversionError, convert
from tfq.tflite.info import inspect_tflite
from tfq.tflite.interpreter import TFLiteModel, interpreter_class
from tfq.tflite.sandbox import Sandbox


def _sqnr(ref, out) -> float:
    ref, out = np.asarray(ref, np.float64).ravel(), np.asarray(out, np.float64).ravel()
    noise = float(np.sum((ref - out) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(ref ** 2)) / noise)


def _plain_int8(saved_model, data) -> bytes:
    c = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.representative_dataset = lambda: ([s[None]] for s in data)
    c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return c.convert()


def _tensor_types(content) -> dict[str, str]:
    """Tensor name → dtype name, read through LiteRT's interpreter (the independent path)."""
    it = interpreter_class()(model_content=content)
    return {d["name"]: np.dtype(d["dtype"]).name for d in it.get_tensor_details()}


def _run_reference_kernels(content, x) -> np.ndarray:
    """Float outputs, one sample at a time, with LiteRT's built-in kernels (no XNNPACK, as layer_errors runs)."""
    from ai_edge_litert.interpreter import OpResolverType

    it = interpreter_class()(model_content=content,
                             experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    out = []
    for s in x:
        it.set_tensor(i["index"], s[None].astype(np.float32))
        it.invoke()
        out.append(it.get_tensor(o["index"]).copy())
    return np.concatenate(out)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """(SavedModel dir, float .tflite bytes, calibration data, held-out data)."""
    from tfq.datasets import load_digits

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1), name="image"),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1"),
        keras.layers.DepthwiseConv2D(3, padding="same", activation="relu", name="dw"),
        keras.layers.MaxPooling2D(name="pool"),
        keras.layers.Flatten(name="flat"),
        keras.layers.Dense(16, activation="relu", name="fc1"),
        keras.layers.Dense(10, name="logits"),
    ], name="cnn")
    (x_train, _), (x_test, _) = load_digits()
    path = tmp_path_factory.mktemp("cnn") / "saved_model"
    model.export(str(path), verbose=False)
    flt = tf.lite.TFLiteConverter.from_saved_model(str(path)).convert()
    return str(path), flt, x_train[:128].astype("float32"), x_test[:64].astype("float32")


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    """(SavedModel dir, noise for calibration, held-out noise)."""
    path = save_audio_saved_model(tmp_path_factory.mktemp("audio") / "saved_model")
    rng = np.random.default_rng(0)
    noise = (rng.normal(size=(72, 1024)) * rng.uniform(0.2, 1.0, size=(72, 1))).astype("float32")
    return path, noise[:48], noise[48:]


def test_doctests():
    import doctest

    from tfq.ptq import tflite_calibration

    for module in (fe, tflite_calibration):
        assert doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


# ------------------------------------------------------------------------------------ the CNN
def test_cnn_saved_model_int8_at_least_the_converters_sqnr(cnn):
    path, flt, data, test = cnn
    ref = TFLiteModel(flt).predict(test)
    ours = convert(path, "int8", data)
    theirs = _plain_int8(path, data)
    ours_db, theirs_db = _sqnr(ref, TFLiteModel(ours).predict(test)), _sqnr(ref, TFLiteModel(theirs).predict(test))
    # the same MinMax ranges: equal up to the float rounding of the scales (measured 2e-5 dB apart)
    assert ours_db >= theirs_db - 0.01, (ours_db, theirs_db)
    assert ours_db > 30
    info = inspect_tflite(ours)
    assert {op.type for op in info.ops} >= {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}
    assert not [op.type for op in info.float_ops if op.type in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    # per-channel by default: the conv kernel has one scale per output channel; per_channel=False: one
    kernel = info.tensors[next(op for op in info.ops if op.type == "CONV_2D").inputs[1]]
    assert kernel.dtype == "INT8" and len(kernel.scales) == kernel.shape[0] == 8
    per_tensor = inspect_tflite(convert(path, "int8", data, per_channel=False, check=False))
    kernel = per_tensor.tensors[next(op for op in per_tensor.ops if op.type == "CONV_2D").inputs[1]]
    assert kernel.dtype == "INT8" and len(kernel.scales) == 1


def test_float_tflite_bytes_path_and_tfsm_layer_are_one_model_and_deterministic(cnn, tmp_path):
    path, flt, data, test = cnn
    file = tmp_path / "float.tflite"
    file.write_bytes(flt)
    from_bytes = convert(flt, "int8", data)
    assert convert(str(file), "int8", data) == from_bytes
    assert convert(bytearray(flt), "int8", data) == from_bytes  # same inputs, same bytes
    layer = keras.layers.TFSMLayer(path, call_endpoint="serve")
    inp = keras.Input((8, 8, 1))
    wrapped = keras.Model(inp, layer(inp))
    from_tfsm = convert(wrapped, "int8", data)
    ref = TFLiteModel(flt).predict(test)
    assert _sqnr(ref, TFLiteModel(from_tfsm).predict(test)) > 30
    assert all(op.type == "SHAPE" for op in inspect_tflite(from_tfsm).float_ops)


def test_calibration_methods_choose_other_ranges(cnn):
    path, flt, data, _ = cnn
    minmax = fe.calibrate_tflite(flt, data, "minmax").ranges
    kl = fe.calibrate_tflite(flt, data, "kl").ranges
    # MinMax by hand: the input tensor's range is the data's
    name = inspect_tflite(flt).tensors[inspect_tflite(flt).inputs[0]].name
    assert minmax[name] == pytest.approx((float(data.min()), float(data.max())))
    assert set(kl) == set(minmax) and any(kl[n] != minmax[n] for n in minmax)
    # and tfq.convert honours it on a SavedModel (refused before): the scales in the file differ
    scales = {}
    for method in ("minmax", "kl"):
        info = inspect_tflite(convert(path, "int8", data, calibration=method, check=False))
        scales[method] = {t.name: t.scales for t in info.tensors if not t.is_constant and t.dtype == "INT8"}
    assert any(scales["kl"][n] != scales["minmax"][n] for n in scales["minmax"] if n in scales["kl"])


def test_robust_default_sets_an_outlier_sample_aside(cnn):
    _, flt, data, _ = cnn
    bad = data.copy()
    bad[5] *= 100.0
    name = inspect_tflite(flt).tensors[inspect_tflite(flt).inputs[0]].name
    with pytest.warns(UserWarning, match=r"1 of 128 calibration samples lie far outside.*indices 5"):
        robust = fe.calibrate_tflite(flt, bad, "robust_minmax")
    assert robust.outlier_samples == (5,)
    assert robust.ranges[name][1] == pytest.approx(float(np.delete(bad, 5, axis=0).max()))
    with pytest.warns(UserWarning, match="far outside"):
        assert fe.calibrate_tflite(flt, bad, "minmax").ranges[name][1] == pytest.approx(float(bad.max()))


def test_float_and_int16_ops_by_type_and_name_are_in_the_file(cnn):
    path, flt, data, test = cnn
    table = fe.op_table(flt)
    conv = next(name for _, t, name in table if t == "CONV_2D")
    fc = [name for _, t, name in table if t == "FULLY_CONNECTED"]
    content = convert(path, "int8", data, float_layers=["FULLY_CONNECTED"], int16_layers=[".*conv1.*"])
    types = _tensor_types(content)
    assert types[conv] == "int16"
    assert all(types[name] == "float32" for name in fc)
    # the same by op name for the float op, and the other ops int8
    content = convert(flt, "int8", data, float_layers=[re.escape(fc[-1])])
    types = _tensor_types(content)
    assert types[fc[-1]] == "float32" and types[fc[0]] == "int8" and types[conv] == "int8"
    ref = TFLiteModel(flt).predict(test)
    assert _sqnr(ref, TFLiteModel(content).predict(test)) > 30


def test_op_table_lists_the_interpreters_tensors(cnn):
    _, flt, _, _ = cnn
    table = fe.op_table(flt)
    names = set(_tensor_types(flt))
    assert [i for i, _, _ in table] == list(range(len(table)))
    assert all(name in names for _, _, name in table)
    assert [t for _, t, _ in table].count("FULLY_CONNECTED") == 2


def test_errors_are_one_line(cnn):
    _, flt, data, _ = cnn
    cases = [
        (dict(float_layers=["DIVV"]), r"float_layers='DIVV' matches no op of the model \(.*CONV_2D"),
        (dict(int16_layers=["conv"]), r"int16_layers='conv' matches no op .*nearest: 'CONV_2D'"),
        (dict(float_layers=["CONV_2D"], int16_layers=["CONV_2D"]), "chosen by both float_layers and int16_layers"),
        (dict(equalize=True), "equalize need a Keras model"),
        (dict(io_dtype="uint8"), r"io_dtype='uint8' does not apply"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as err:
            convert(flt, "int8", data, **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"mode='fp16' does not apply to a float \.tflite") as err:
        convert(flt, "fp16")
    with pytest.raises(ValueError, match="needs representative_data"):
        convert(flt, "int8")
    int8 = convert(flt, "int8", data, check=False)
    with pytest.raises(ValueError, match="already a quantized model"):
        convert(int8, "int8", data)
    keras_model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    with pytest.raises(ValueError, match=r"int16_layers=\['d'\] keeps ops of a float \.tflite.*Convert its float "
                                         r"\.tflite instead") as err:
        convert(keras_model, "int8", np.ones((8, 3), np.float32), int16_layers=["d"])
    assert "\n" not in str(err.value)


def test_layer_errors_on_a_float_tflite_and_saved_model(cnn):
    path, flt, data, test = cnn
    content = convert(flt, "int8", data)
    report = layer_errors(flt, content, test[:16])
    assert report and all(r["match"] in ("io", "name", "requantize") for r in report)
    ops = {r["op"] for r in report}
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"} <= ops
    # the model output's row, against an independent computation through the interpreter
    out = inspect_tflite(content).outputs[0]
    producer = next(op for op in inspect_tflite(content).ops if out in op.outputs)
    last = next(r for r in report if r["tensor"] == inspect_tflite(content).tensors[producer.inputs[0]].name)
    ref, got = _run_reference_kernels(flt, test[:16]), _run_reference_kernels(content, test[:16])
    assert last["sqnr_db"] == pytest.approx(_sqnr(ref, got), abs=0.05)
    assert [r["tensor"] for r in layer_errors(path, content, test[:16])] == [r["tensor"] for r in report]


# ------------------------------------------------------------------------------------ the audio front-end
def test_audio_plain_converter_crashes_on_silence_tfq_keeps_div_float(audio):
    path, noise, test = audio
    zeros = [np.zeros((1, 1024), np.float32)]
    with Sandbox() as sandbox:
        plain = sandbox.run(_plain_int8(path, noise), [zeros])
        assert plain.failed_sample == 0 and "div.cc" in plain.message
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            content = convert(path, "int8", noise)
        messages = [str(w.message) for w in caught if str(w.message).startswith("tfq")]
        assert len(messages) == 2, messages
        assert re.search(r"4 op\(s\) of the int8 model stay float.*\(COMPLEX_ABS, LOG, REDUCE_MAX, RFFT2D\)",
                         messages[0])
        assert re.search(r"op DIV fails in LiteRT's interpreter on the all-zeros input.*'truediv'.*kept float",
                         messages[1])
        ours = sandbox.run(content, [zeros] + [[s[None]] for s in test])
    assert ours.failed_sample is None and all(np.all(np.isfinite(o[0])) for o in ours.outputs)
    assert _tensor_types(content)["truediv"] == "float32"
    flt = fe.float_tflite(path)
    ref = TFLiteModel(flt).predict(test)
    assert _sqnr(ref, np.concatenate([o[0] for o in ours.outputs[1:]])) > 10
    report = layer_errors(path, content, test[:8])  # per op, against the float .tflite: every int8 tensor paired
    assert not report.skipped and {"MUL", "FULLY_CONNECTED", "QUANTIZE"} <= {r["op"] for r in report}
    with pytest.raises(ConversionError, match="op DIV fails .*strict=True refuses"):
        convert(path, "int8", noise, strict=True)
    # DIV kept float by the user: no crash, no fix to make, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = convert(path, "int8", noise, float_layers=["DIV", "ADD", "LOG"])
    assert _tensor_types(kept)["truediv"] == "float32"


def test_audio_every_calibration_method_runs_on_a_saved_model(audio):
    path, noise, test = audio
    flt = fe.float_tflite(path)
    ref = TFLiteModel(flt).predict(test)
    for method in ("minmax", "moving_average", "kl", "percentile", "mse"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            content = convert(path, "int8", noise, calibration=method, float_layers=["DIV", "ADD", "LOG"])
        assert np.all(np.isfinite(TFLiteModel(content).predict(test)))
        assert _sqnr(ref, TFLiteModel(content).predict(test)) > 0, method


def test_precomputed_calibration_and_dict_inputs(tmp_path, cnn):
    from tfq.ptq.calibration import calibrate

    path, flt, data, _ = cnn
    cal = calibrate(path, data, "kl")  # tfq.calibrate on a SavedModel: ranges by tensor name of its float .tflite
    assert cal.ranges == fe.calibrate_tflite(flt, data, "kl").ranges
    assert convert(flt, "int8", data, calibration=cal) == convert(flt, "int8", data, calibration="kl")
    with pytest.raises(ValueError, match="recipe does not apply to a float .tflite"):
        calibrate(flt, data, recipe="int8")

    class TwoInputs(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32, name="a"),
                                      tf.TensorSpec([1, 3], tf.float32, name="b")])
        def __call__(self, a, b):
            return {"y": tf.concat([a * 2.0, b], axis=-1)}

    module = TwoInputs()
    tf.saved_model.save(module, str(tmp_path / "two"), signatures=module.__call__)
    two = fe.float_tflite(str(tmp_path / "two"))
    rng = np.random.default_rng(0)
    inputs = {"b": rng.uniform(-5, 5, size=(16, 3)).astype("float32"),
              "a": rng.uniform(0, 1, size=(16, 4)).astype("float32")}
    ranges = fe.calibrate_tflite(two, inputs, "minmax").ranges
    it = interpreter_class()(model_content=two)
    runner = it.get_signature_runner()
    for key, detail in runner.get_input_details().items():  # each input tensor got its own data's range
        name = next(d["name"] for d in it.get_tensor_details() if d["index"] == detail["index"])
        x = inputs[key]  # MinMax ranges hold 0 (it must be exactly representable)
        assert ranges[name] == pytest.approx((min(float(x.min()), 0.0), max(float(x.max()), 0.0)))


def test_missing_quantizer_is_one_line(monkeypatch, cnn):
    import sys

    _, flt, data, _ = cnn
    monkeypatch.setitem(sys.modules, "ai_edge_quantizer", None)
    with pytest.raises(ImportError, match=r"LiteRT's quantizer, which is not installed: pip install "
                                          r"ai-edge-quantizer$") as err:
        convert(flt, "int8", data)
    assert "\n" not in str(err.value)


def test_int16_request_that_cannot_hold_is_refused(audio):
    path, noise, _ = audio
    flt = fe.float_tflite(path)
    with pytest.raises(ValueError, match=r"int16_layers: LiteRT's quantizer has no int16 rule for op\(s\) \d+ "
                                         r"\(LOG, 'Log'\)") as err:
        convert(flt, "int8", noise, int16_layers=["LOG"], check=False)
    assert "\n" not in str(err.value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        content = convert(flt, "int8", noise, int16_layers=["FULLY_CONNECTED"], float_layers=["DIV", "ADD", "LOG"])
    out = next(name for _, t, name in fe.op_table(flt) if t == "FULLY_CONNECTED")
    assert _tensor_types(content)[out] == "int16"


def test_num_samples_and_calibration_params_are_honoured(cnn):
    _, flt, data, _ = cnn
    name = inspect_tflite(flt).tensors[inspect_tflite(flt).inputs[0]].name
    few = fe.calibrate_tflite(flt, data, "minmax", num_samples=10)
    assert few.num_samples == 10 and few.ranges[name][1] == pytest.approx(float(data[:10].max()))
    p90 = fe.calibrate_tflite(flt, data, "percentile", params={"percentile": 90.0}).ranges
    p9999 = fe.calibrate_tflite(flt, data, "percentile", params={"percentile": 99.99}).ranges
    assert any(p90[n][1] < p9999[n][1] for n in p90)
    assert convert(flt, "int8", data, calibration="percentile", calibration_params={"percentile": 90.0},
                   check=False) != convert(flt, "int8", data, calibration="percentile", check=False)
    assert convert(flt, "int8", data, num_calibration_samples=10, check=False) != convert(flt, "int8", data,
                                                                                          check=False)
    with pytest.raises(ValueError, match="percentile"):
        convert(flt, "int8", data, calibration="percentile", calibration_params={"percentile": 250.0})
