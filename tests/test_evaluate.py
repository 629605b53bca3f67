"""Tests of tfq.evaluate and tfq.analysis.report: every figure against an independent interpreter loop."""

from __future__ import annotations

import json
import math
import os
import sys

import keras
import numpy as np
import pytest

from tfq.export.convert import convert
from tfq.analysis.evaluation import evaluate, layer_errors, sqnr_db
from tfq.tflite.info import inspect_tflite
from tfq.analysis.report import LayerErrorReport, Report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# The independent path: LiteRT's interpreter, one sample at a time, (de)quantized by hand
# --------------------------------------------------------------------------------------------


def hand_run(content: bytes, inputs: dict[str, np.ndarray], builtin_kernels: bool = False) -> list[np.ndarray]:
    """Float outputs in signature order (output_0, output_1, …), one invoke per sample.

    ``builtin_kernels`` turns off the default XNNPACK delegate (as layer_errors does, to read every
    tensor): its int8 kernels may round an element one step differently.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if builtin_kernels else OpResolverType.AUTO
    interp = Interpreter(model_content=content, experimental_op_resolver_type=resolver)
    runner = interp.get_signature_runner()
    in_details = runner.get_input_details()
    out_details = runner.get_output_details()
    outputs = {key: [] for key in out_details}
    n = len(next(iter(inputs.values())))
    for i in range(n):
        feed = {}
        for key, detail in in_details.items():
            value = np.asarray(inputs[key][i:i + 1], np.float32)
            if detail["dtype"] != np.float32:
                scale, zero_point = detail["quantization"]
                info = np.iinfo(detail["dtype"])
                value = np.clip(np.round(value / scale) + zero_point, info.min, info.max).astype(detail["dtype"])
            feed[key] = value
        for key, value in runner(**feed).items():
            detail = out_details[key]
            if detail["dtype"] != np.float32:
                scale, zero_point = detail["quantization"]
                value = (value.astype(np.float32) - zero_point) * scale
            outputs[key].append(value)
    keys = sorted(outputs, key=lambda k: int(k.rsplit("_", 1)[1]))
    return [np.concatenate(outputs[k]) for k in keys]


def hand_sqnr(ref: list[np.ndarray], out: list[np.ndarray]) -> float:
    r = np.concatenate([a.astype(np.float64).ravel() for a in ref])
    o = np.concatenate([a.astype(np.float64).ravel() for a in out])
    noise = np.sum((r - o) ** 2)
    return math.inf if noise == 0 else 10 * math.log10(np.sum(r ** 2) / noise)


def assert_sqnr(value: float, expected: float) -> None:
    """Equal SQNR; above 100 dB both are float32 rounding noise, which batching changes."""
    if expected > 100:
        assert value > 100, (value, expected)
    else:
        assert value == pytest.approx(expected, rel=1e-3)


def keras_size(model) -> int:
    return 4 * sum(int(np.prod(w.shape)) for w in model.weights)


def mean_confidence(y_true, y_pred):
    return float(np.max(y_pred, axis=1).mean())


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# --------------------------------------------------------------------------------------------
# Fixtures (session-scoped: each model is trained and converted once)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cnn(digits):
    """The digits CNN trained 2 epochs and its TFLite exports."""
    from tfq.examples import digits_cnn, train_model

    (x_train, y_train), (x_test, y_test) = digits
    keras.utils.set_random_seed(0)  # the same initial weights whichever tests ran before
    model = digits_cnn(input_shape=x_train.shape[1:])
    train_model(model, x_train, y_train, epochs=2, seed=0)
    rep = x_train[:200]
    tflite = {
        "float": convert(model, "float"),
        "int8": convert(model, "int8", rep),
        "int8_io": convert(model, "int8", rep, io_dtype="int8"),
        "uint8_io": convert(model, "int8", rep, io_dtype="uint8"),
    }
    return model, rep, x_test, y_test, tflite


@pytest.fixture(scope="session")
def cnn_report(cnn):
    model, _, x_test, y_test, tflite = cnn
    models = {"keras": model, **tflite}
    report = evaluate(models, x_test, y_test, metrics=("accuracy", "top5", "top_k:3", mean_confidence),
                      latency=False)
    return report


@pytest.fixture(scope="session")
def multi():
    """Two inputs (declared zeta, alpha), two outputs (classes, regression): order-sensitive."""
    keras.utils.set_random_seed(0)
    zeta = keras.Input((4,), name="zeta")
    alpha = keras.Input((6,), name="alpha")
    merged = keras.layers.Concatenate(name="cat")([zeta, alpha])
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(merged)
    classes = keras.layers.Dense(3, activation="softmax", name="zz_classes")(hidden)
    value = keras.layers.Dense(1, name="aa_value")(hidden)
    model = keras.Model([zeta, alpha], [classes, value], name="two_by_two")
    rng = np.random.default_rng(0)
    xz = rng.random((240, 4)).astype(np.float32)
    xa = rng.random((240, 6)).astype(np.float32)
    y = np.clip((xa[:, 0] * 3).astype(int), 0, 2)
    model.compile(keras.optimizers.Adam(1e-2), ["sparse_categorical_crossentropy", "mse"])
    model.fit([xz, xa], [y, xa.sum(1, keepdims=True)], epochs=3, verbose=0)
    tflite = {"float": convert(model, "float"), "int8": convert(model, "int8", [xz[:200], xa[:200]])}
    return model, xz, xa, y, tflite


@pytest.fixture(scope="session")
def spiky():
    """A model whose 'spike' layer has a huge output on 3 calibration samples only (never in test data)."""
    keras.utils.set_random_seed(0)
    x = keras.Input((4,), name="x")
    pre = keras.layers.Dense(6, activation="relu", name="pre")(x)
    spike = keras.layers.Dense(6, name="spike")(pre)
    model = keras.Model(x, keras.layers.Dense(3, name="head")(spike), name="spiky")
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 6)).astype(np.float32) * 0.5
    w[:, 0] = 0.0
    w[3, :] = 0.0
    w[3, 0] = 1.0  # pre unit 0 carries feature 3 only
    model.get_layer("pre").set_weights([w, np.zeros(6, np.float32)])
    k = rng.normal(size=(6, 6)).astype(np.float32)
    k[0, :] = 1000.0  # ... which the spike layer amplifies
    model.get_layer("spike").set_weights([k, np.zeros(6, np.float32)])
    data = rng.random((300, 4)).astype(np.float32)
    data[:, 3] = 0.0
    calibration = data.copy()
    calibration[:3, 3] = 1.0
    # MinMax keeps the 3 samples (the default would set them aside) and breaks the spike layer's range.
    return model, data, convert(model, "int8", calibration, calibration="minmax")


# --------------------------------------------------------------------------------------------
# evaluate: every figure by hand
# --------------------------------------------------------------------------------------------


def test_every_figure_matches_the_hand_loop(cnn, cnn_report):
    import tensorflow as tf

    model, _, x_test, y_test, tflite = cnn
    report = cnn_report
    assert report.names == ["keras", "float", "int8", "int8_io", "uint8_io"]
    assert report.reference == "keras"
    assert report.metrics == ["accuracy", "top5", "top_k:3", "mean_confidence"]
    reference = model.predict(x_test, verbose=0)
    ref_size = keras_size(model)
    keras_row = report.row("keras")
    assert keras_row["accuracy"] == float(np.mean(reference.argmax(1) == y_test))
    assert keras_row["agreement"] == 1.0 and keras_row["sqnr_db"] == math.inf and keras_row["max_abs_diff"] == 0.0
    assert keras_row["size"] == ref_size and keras_row["size_kind"] == "params_fp32" and keras_row["size_ratio"] == 1.0
    for name, content in tflite.items():
        row = report.row(name)
        out = hand_run(content, {"image": x_test})[0]
        assert row["kind"] == "tflite" and row["num_samples"] == len(x_test)
        assert row["accuracy"] == float(np.mean(out.argmax(1) == y_test)), name
        for key, k in (("top5", 5), ("top_k:3", 3)):
            in_top = tf.math.in_top_k(targets=y_test.astype(np.int32), predictions=out, k=k).numpy()
            assert row[key] == pytest.approx(in_top.mean(), abs=1e-12), (name, key)
        assert row["mean_confidence"] == pytest.approx(out.max(1).mean(), abs=1e-6)
        assert row["agreement"] == float(np.mean(out.argmax(1) == reference.argmax(1))), name
        assert_sqnr(row["sqnr_db"], hand_sqnr([reference], [out]))
        assert row["max_abs_diff"] == pytest.approx(np.abs(reference - out).max(), abs=1e-5), name
        assert row["size"] == len(content) and row["size_kind"] == "flatbuffer"
        assert row["size_ratio"] == pytest.approx(len(content) / ref_size)
        assert row["latency_p50_ms"] is None and row["latency_p90_ms"] is None
        assert row["throughput"] > 0 and row["num_threads"] == len(os.sched_getaffinity(0))  # None: one per core
    # Sanity of the exports themselves: INT8 is ~4x smaller and still agrees with the float model.
    assert report.row("int8")["size_ratio"] < 0.35
    assert report.row("int8")["agreement"] > 0.9 and report.row("float")["sqnr_db"] > 80


def test_integer_io_models_agree_with_float_io(cnn, cnn_report):
    """int8 and uint8 I/O quantize the input by hand in the loop above; the figures stay close."""
    _, _, _, _, tflite = cnn
    int8 = cnn_report.row("int8")
    for name, dtype in (("int8_io", "INT8"), ("uint8_io", "UINT8")):
        info = inspect_tflite(tflite[name])
        assert info.input_dtypes == [dtype] and info.output_dtypes == [dtype]
        row = cnn_report.row(name)
        assert abs(row["accuracy"] - int8["accuracy"]) <= 0.01
        assert row["sqnr_db"] > 20


def test_multi_input_multi_output(multi):
    model, xz, xa, y, tflite = multi
    as_list = evaluate({"keras": model, **tflite}, [xz, xa], y, latency=False)
    as_dict = evaluate({"keras": model, **tflite}, {"alpha": xa, "zeta": xz}, y, latency=False)
    reference = model.predict([xz, xa], verbose=0)  # [classes (N, 3), value (N, 1)]
    for name, content in tflite.items():
        out = hand_run(content, {"zeta": xz, "alpha": xa})
        assert [o.shape for o in out] == [(240, 3), (240, 1)]
        for report in (as_list, as_dict):
            row = report.row(name)
            assert row["accuracy"] == float(np.mean(out[0].argmax(1) == y))  # first output
            assert row["agreement"] == float(np.mean(out[0].argmax(1) == reference[0].argmax(1)))
            assert_sqnr(row["sqnr_db"], hand_sqnr(reference, out))  # both outputs
            diff = max(np.abs(reference[0] - out[0]).max(), np.abs(reference[1] - out[1]).max())
            assert row["max_abs_diff"] == pytest.approx(diff, abs=1e-5)
    assert as_list.row("float")["sqnr_db"] > 80  # outputs were not swapped
    # Without a Keras model: the first entry is the reference, dict data matches inputs by name.
    tflite_only = evaluate(tflite, {"alpha": xa, "zeta": xz}, y, latency=False)
    assert tflite_only.reference == "float"
    float_out = hand_run(tflite["float"], {"zeta": xz, "alpha": xa})
    int8_out = hand_run(tflite["int8"], {"zeta": xz, "alpha": xa})
    assert_sqnr(tflite_only.row("int8")["sqnr_db"], hand_sqnr(float_out, int8_out))
    assert tflite_only.row("int8")["size_ratio"] == pytest.approx(len(tflite["int8"]) / len(tflite["float"]))


def test_regression_metrics():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((5,), name="features")
    model = keras.Model(inputs, keras.layers.Dense(1, name="value")(keras.layers.Dense(8, activation="tanh")(inputs)))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 5)).astype(np.float32)
    targets = x.sum(1)
    content = convert(model, "float")
    report = evaluate({"keras": model, "float": content}, x, targets, metrics=("mse", "mae"), latency=False)
    out = hand_run(content, {"features": x})[0].ravel()
    row = report.row("float")
    assert row["mse"] == pytest.approx(np.mean((out - targets) ** 2), rel=1e-5)
    assert row["mae"] == pytest.approx(np.mean(np.abs(out - targets)), rel=1e-5)
    assert row["agreement"] is None  # one output unit: not a classifier
    # (N, 1) targets give the same figures as (N,)
    again = evaluate({"float": content}, x, targets[:, None], metrics=("mse",), latency=False)
    assert again.row("float")["mse"] == pytest.approx(row["mse"], rel=1e-6)


def test_max_samples_and_one_hot_labels(cnn):
    model, _, x_test, y_test, tflite = cnn
    one_hot = np.eye(10)[y_test]
    report = evaluate({"int8": tflite["int8"]}, x_test, one_hot, max_samples=50, latency=False)
    out = hand_run(tflite["int8"], {"image": x_test[:50]})[0]
    row = report.row("int8")
    assert report.num_samples == 50 and row["num_samples"] == 50
    assert row["accuracy"] == float(np.mean(out.argmax(1) == y_test[:50]))
    assert row["sqnr_db"] == math.inf  # the only model is its own reference


def test_latency_is_measured_at_batch_one(cnn):
    model, _, x_test, _, tflite = cnn
    report = evaluate({"keras": model, "int8": tflite["int8"]}, x_test[:20], latency_runs=5, num_threads=1)
    for row in report.rows:
        assert 0 < row["latency_p50_ms"] <= row["latency_p90_ms"] < 5000
    assert report.metrics == []  # no labels: no metric columns
    assert "accuracy" not in report.row("int8")


def test_convenience_form_converts_each_variant(cnn, caplog):
    model, rep, x_test, y_test, tflite = cnn
    report = evaluate(model, x_test, y_test, variants=("float", "int8"), representative_data=rep, latency=False,
                      verbose=True)
    assert report.names == ["keras", "tflite_float", "tflite_int8"]
    assert set(report.converted) == {"tflite_float", "tflite_int8"}
    assert "converted int8" in caplog.text  # through the "tfq" logger (printed on stderr when logging is not set up)
    for name in ("tflite_float", "tflite_int8"):
        content = report.converted[name]
        assert report.row(name)["size"] == len(content)
        out = hand_run(content, {"image": x_test})[0]
        assert report.row(name)["accuracy"] == float(np.mean(out.argmax(1) == y_test))
    # Conversion is deterministic: the same bytes as the fixture's.
    assert report.converted["tflite_int8"] == tflite["int8"]


def test_convenience_form_needs_representative_data_for_int8(cnn):
    model, _, x_test, y_test, _ = cnn
    with pytest.raises(ValueError, match="representative_data") as excinfo:
        evaluate(model, x_test, y_test)
    assert "'int8'" in one_line(excinfo)
    with pytest.raises(ValueError, match="'bogus'") as excinfo:
        evaluate(model, x_test, y_test, variants=("float", "bogus"))
    one_line(excinfo)


def test_numpy_num_threads(cnn):
    _, _, x_test, y_test, tflite = cnn
    report = evaluate({"int8": tflite["int8"]}, x_test[:8], y_test[:8], num_threads=np.int64(1), latency=False)
    assert report.rows[0]["num_threads"] == 1 and type(report.rows[0]["num_threads"]) is int


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_num_threads(cnn, bad):
    _, _, x_test, y_test, tflite = cnn
    with pytest.raises(ValueError, match=f"num_threads={bad!r}") as excinfo:
        evaluate({"int8": tflite["int8"]}, x_test[:4], y_test[:4], num_threads=bad)
    one_line(excinfo)


def test_sqnr_db_formula():
    assert sqnr_db([1.0, 1.0], [1.0, 0.9]) == pytest.approx(10 * math.log10(2 / 0.01))
    assert sqnr_db([np.ones(2), np.ones((1, 2))], [np.ones(2), np.zeros((1, 2))]) == pytest.approx(10 * math.log10(2))
    assert sqnr_db([0.0, 0.0], [0.0, 0.0]) == math.inf
    assert sqnr_db([0.0, 0.0], [1.0, 0.0]) == -math.inf


# --------------------------------------------------------------------------------------------
# evaluate: error paths (one line, the value and the fix)
# --------------------------------------------------------------------------------------------


def test_error_missing_and_corrupt_tflite(cnn, tmp_path):
    _, _, x_test, _, tflite = cnn
    missing = tmp_path / "nope.tflite"
    with pytest.raises(FileNotFoundError, match="nope.tflite") as excinfo:
        evaluate({"m": str(missing)}, x_test, latency=False)
    assert "models['m']" in one_line(excinfo)
    with pytest.raises(ValueError, match="not a TFLite model") as excinfo:
        evaluate({"m": b"definitely not a flatbuffer"}, x_test, latency=False)
    one_line(excinfo)
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(tflite["float"][:200])
    with pytest.raises(ValueError, match="models\\['m'\\]") as excinfo:
        evaluate({"m": truncated}, x_test, latency=False)
    one_line(excinfo)


def test_error_data_that_does_not_fit(cnn):
    model, _, x_test, _, tflite = cnn
    flat = x_test.reshape(len(x_test), -1)
    with pytest.raises(ValueError, match=r"\(8, 8, 1\)") as excinfo:
        evaluate({"keras": model}, flat, latency=False)
    assert "(359, 64)" in one_line(excinfo)
    with pytest.raises(ValueError, match=r"\(64,\)") as excinfo:
        evaluate({"int8": tflite["int8"]}, flat, latency=False)
    one_line(excinfo)
    with pytest.raises(ValueError, match="2 array") as excinfo:
        evaluate({"keras": model}, [x_test, x_test], latency=False)
    one_line(excinfo)


def test_error_labels_empty_data_metric_reference_models(cnn):
    model, _, x_test, y_test, tflite = cnn
    with pytest.raises(ValueError, match="359 samples, received 358 labels") as excinfo:
        evaluate({"float": tflite["float"]}, x_test, y_test[:-1], latency=False)
    one_line(excinfo)
    for empty in (x_test[:0], [], {}):
        with pytest.raises(ValueError, match="empty") as excinfo:
            evaluate({"float": tflite["float"]}, empty, latency=False)
        one_line(excinfo)
    with pytest.raises(ValueError, match="unknown metric 'f1'") as excinfo:
        evaluate({"float": tflite["float"]}, x_test, y_test, metrics=("accuracy", "f1"))
    one_line(excinfo)
    with pytest.raises(ValueError, match="top_k:0"):
        evaluate({"float": tflite["float"]}, x_test, y_test, metrics=("top_k:0",))
    with pytest.raises(ValueError, match="top_k:11.*10 classes") as excinfo:
        evaluate({"float": tflite["float"]}, x_test, y_test, metrics=("top_k:11",), latency=False)
    one_line(excinfo)
    with pytest.raises(ValueError, match="reference='nope'") as excinfo:
        evaluate({"float": tflite["float"]}, x_test, reference="nope")
    one_line(excinfo)
    with pytest.raises(ValueError, match="models is empty"):
        evaluate({}, x_test)
    with pytest.raises(TypeError, match="list"):
        evaluate([model], x_test)
    with pytest.raises(TypeError, match="models\\['x'\\].*int"):
        evaluate({"x": 3}, x_test)


# --------------------------------------------------------------------------------------------
# layer_errors
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cnn_layers(cnn):
    model, _, x_test, _, tflite = cnn
    return layer_errors(model, tflite["int8"], x_test, max_samples=32)


def test_layer_errors_one_row_per_quantized_activation(cnn, cnn_layers):
    model, _, x_test, _, tflite = cnn
    info = inspect_tflite(tflite["int8"])
    activations = [t.name for t in info.tensors if t.is_quantized and not t.is_constant and t.dtype == "INT8"]
    assert sorted(r["tensor"] for r in cnn_layers) == sorted(activations)
    assert cnn_layers.skipped == [] and cnn_layers.num_samples == 32
    for row in cnn_layers:
        assert all(math.isfinite(row[k]) for k in ("rmse", "rmse_over_scale", "sqnr_db", "range_rmse_over_scale"))
        assert row["sqnr_db"] > 20 and 0.05 < row["range_rmse_over_scale"] < 0.5 and not row["outlier"]
    assert [r["op"] for r in cnn_layers][:3] == ["QUANTIZE", "CONV_2D", "CONV_2D"]  # graph order
    # The input row, by hand: quantizing the input with its scale / zero-point.
    first = cnn_layers[0]
    x = x_test[:32].astype(np.float64)
    scale, zero_point = first["scale"], first["zero_point"]
    x_hat = (np.clip(np.round(x / scale) + zero_point, -128, 127) - zero_point) * scale
    assert first["rmse"] == pytest.approx(np.sqrt(np.mean((x_hat - x) ** 2)), rel=1e-4)
    # The output row, by hand: the INT8 model's dequantized output vs the float model's output.
    last = cnn_layers[-1]
    assert last["op"] == "SOFTMAX"
    q_out = hand_run(tflite["int8"], {"image": x_test[:32]}, builtin_kernels=True)[0].astype(np.float64)
    f_out = hand_run(tflite["float"], {"image": x_test[:32]}, builtin_kernels=True)[0].astype(np.float64)
    assert last["rmse"] == pytest.approx(np.sqrt(np.mean((q_out - f_out) ** 2)), rel=1e-5)
    assert last["sqnr_db"] == pytest.approx(hand_sqnr([f_out], [q_out]), rel=1e-5)
    assert last["max_abs_error"] == pytest.approx(np.abs(q_out - f_out).max(), rel=1e-5)
    assert last["mean_error"] == pytest.approx(np.mean(q_out - f_out), rel=1e-4, abs=1e-9)


def test_layer_errors_flags_the_broken_layer(spiky):
    model, data, int8 = spiky
    errors = layer_errors(model, int8, data)
    by_layer = {r["tensor"].split(";")[0].split("/")[1].split("_")[0]: r for r in errors}
    assert set(by_layer) == {"x", "pre", "spike", "head"}
    assert not by_layer["x"]["outlier"] and not by_layer["pre"]["outlier"]
    assert errors.outliers[0] is by_layer["spike"] or errors.outliers[0] == by_layer["spike"]
    assert by_layer["spike"]["sqnr_db"] < 10 and by_layer["spike"]["scale"] > 1  # range set by the outlier
    # Clipping: data 4x beyond the calibrated input range breaks the input tensor itself.
    clipped = layer_errors(model, int8, data * 4)
    assert clipped[0]["op"] == "QUANTIZE" and clipped[0]["outlier"]
    assert clipped[0]["range_rmse_over_scale"] > 0.7 and clipped[0]["clipped_fraction"] > 0.3


def test_layer_errors_attributes_clipping_rounding_and_saturation(cnn, cnn_layers):
    """The own error splits into clipping and rounding (squares add up); saturation matches tfq.reference."""
    import tfq.reference

    model, _, x_test, _, tflite = cnn
    for row in cnn_layers:
        total = row["clip_rmse_over_scale"] ** 2 + row["rounding_rmse_over_scale"] ** 2
        assert total == pytest.approx(row["range_rmse_over_scale"] ** 2, rel=1e-9, abs=1e-12)
        assert row["error_source"] in ("rounding", "range clipping", "saturation")
    requantizing = {op.outputs[0]: op for op in inspect_tflite(tflite["int8"]).ops
                    if op.type in ("CONV_2D", "FULLY_CONNECTED")}
    names = {t.index: t.name for t in inspect_tflite(tflite["int8"]).tensors}
    explained = {e.index: e for e in tfq.reference.explain(tflite["int8"], inputs=x_test[:32])}
    checked = 0
    for row in cnn_layers:
        ops = [op for index, op in requantizing.items() if names[index] == row["tensor"]]
        if ops:
            assert row["saturated"] == explained[ops[0].index].saturated
            assert row["saturated_fraction"] == explained[ops[0].index].saturated_fraction
            checked += 1
    assert checked >= 3
    # Data 4× beyond the calibrated range: the input tensor's error is clipping, not rounding.
    clipped = layer_errors(model, tflite["int8"], np.clip(x_test * 4, 0, None), max_samples=32)
    assert clipped[0]["error_source"] == "range clipping" and clipped[0]["clip_rmse_over_scale"] > 0.5
    assert "error source" in clipped.to_markdown()


def test_layer_errors_multi_input(multi):
    model, xz, xa, _, tflite = multi
    errors = layer_errors(model, tflite["int8"], {"alpha": xa, "zeta": xz}, max_samples=16)
    info = inspect_tflite(tflite["int8"])
    assert len(errors) + len(errors.skipped) == sum(
        1 for t in info.tensors if t.is_quantized and not t.is_constant and t.dtype == "INT8")
    assert errors.skipped == [] and not errors.outliers


def test_layer_errors_errors(cnn):
    model, _, x_test, _, tflite = cnn
    with pytest.raises(ValueError, match="no quantized activation") as excinfo:
        layer_errors(model, tflite["float"], x_test)
    one_line(excinfo)
    with pytest.raises(TypeError, match="Keras model, a float .tflite"):
        layer_errors(42, tflite["int8"], x_test)
    # a float .tflite is a reference too (the front-end below Keras): tensors pair by name, graph I/O by signature
    assert any(r["match"] == "io" for r in layer_errors(tflite["float"], tflite["int8"], x_test[:8]))
    with pytest.raises(ValueError, match="empty"):
        layer_errors(model, tflite["int8"], x_test[:0])
    with pytest.raises(ValueError, match="max_samples"):
        layer_errors(model, tflite["int8"], x_test, max_samples=0)


# --------------------------------------------------------------------------------------------
# Report: markdown, JSON, plot
# --------------------------------------------------------------------------------------------


def test_markdown_table(cnn_report, cnn_layers):
    text = cnn_report.to_markdown()
    assert str(cnn_report) == text and repr(cnn_report) == text
    lines = text.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["model", "accuracy", "top5", "top_k:3", "mean_confidence", "agreement", "SQNR (dB)",
                      "size (KB)", "size ratio", "weights (KB)", "weight bits", "gzip (KB)", "sparsity", "distinct/ch",
                      "p50 (ms)", "p90 (ms)", "samples/s"]
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + len(cnn_report.rows)
    int8 = cnn_report.row("int8")
    line = next(row for row in table if row.startswith("| int8 |"))
    assert f"{int8['accuracy']:.4f}" in line and f"{int8['size'] / 1024:.1f}" in line
    assert f"{int8['sqnr_db']:.1f}" in line and f"{int8['size_ratio']:.3f}×" in line
    assert f"| {int8['gzip_size'] / 1024:.1f} | {100 * int8['weight_sparsity']:.1f}% | " \
           f"{int8['max_distinct_per_channel']} |" in line
    assert "| keras * |" in text and "parameters × 4 bytes" in text and "| inf |" in text
    layer_text = cnn_layers.to_markdown()
    assert str(cnn_layers) == layer_text
    assert len([line for line in layer_text.splitlines() if line.startswith("|")]) == 2 + len(cnn_layers)
    assert "RMSE/scale" in layer_text and "SOFTMAX" in layer_text


def test_json_round_trip(cnn_report, cnn_layers, tmp_path):
    report = Report.from_dict(cnn_report.to_dict())
    report.layer_errors = cnn_layers
    path = report.to_json(tmp_path / "report.json")
    text = path.read_text()

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    data = json.loads(text, parse_constant=refuse)  # strict JSON: inf is stored as "inf"
    assert data["rows"][0]["sqnr_db"] == "inf"
    loaded = Report.from_json(path)
    assert loaded == report
    assert loaded.rows == report.rows and loaded.row("keras")["sqnr_db"] == math.inf
    assert isinstance(loaded.layer_errors, LayerErrorReport) and loaded.layer_errors == cnn_layers
    assert list(tmp_path.iterdir()) == [path]  # atomic: no temp file left behind
    layer_path = cnn_layers.to_json(tmp_path / "layers.json")
    assert LayerErrorReport.from_json(layer_path) == cnn_layers
    with pytest.raises(ValueError, match="not a tfq evaluation report"):
        Report.from_dict({"rows": []})


def test_plot_writes_png(cnn_report, cnn_layers, tmp_path):
    pytest.importorskip("matplotlib")
    report = Report.from_dict(cnn_report.to_dict())
    report.rows[0]["latency_p50_ms"], report.rows[0]["latency_p90_ms"] = 12.0, 15.0
    report.plot(tmp_path / "plain.png")  # plot() returns the Figure and writes the PNG when given a path
    assert (tmp_path / "plain.png").read_bytes()[:8] == PNG_SIGNATURE
    report.layer_errors = cnn_layers
    with_layers = report.plot(tmp_path / "layers.png")
    assert len(with_layers.axes) == 3
    assert (tmp_path / "layers.png").read_bytes()[:8] == PNG_SIGNATURE
    cnn_layers.plot(tmp_path / "only_layers.png")
    assert (tmp_path / "only_layers.png").read_bytes()[:8] == PNG_SIGNATURE


def test_plot_without_matplotlib(cnn_report, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib") as excinfo:
        cnn_report.plot(tmp_path / "x.png")
    one_line(excinfo)
    assert not (tmp_path / "x.png").exists()
