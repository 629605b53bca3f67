"""tune keeps layers float for speed (objective="latency") and says why each float layer is float.

Latency decisions are checked on injected latencies (deterministic: what each op costs is set by the test) and,
on real measurements, against the medians tune recorded; raw timings are never asserted.
"""

import json

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

import tfq
from tests.conftest import save_audio_saved_model, tflite_accuracy
from tfq.analysis import tuning

L = keras.layers


@pytest.fixture(scope="module")
def prelu_cnn(digits):
    """Conv-PReLU ×3 on the 8×8 digits, trained 8 epochs: (model, x_train, x_test, y_test)."""
    from tfq.examples import train_model

    (x_train, y_train), (x_test, y_test) = digits
    keras.utils.set_random_seed(0)
    inputs = keras.Input(x_train.shape[1:])
    x = inputs
    for i, filters in enumerate([16, 32, 32]):
        x = L.Conv2D(filters, 3, padding="same", name=f"conv{i}")(x)
        x = L.PReLU(shared_axes=[1, 2], name=f"prelu{i}")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, L.Dense(10, activation="softmax", name="probs")(x))
    train_model(model, x_train, y_train, epochs=8, seed=0)
    return model, x_train, x_test, y_test


def _op_dtypes(content):
    """(op type, first output dtype) of each op, lower case: ``("PRELU", "int8")``."""
    return [(op.type, op.output_dtypes[0].lower()) for op in tfq.inspect_tflite(content).ops]


def _cost_model(int8_prelu_ms):
    """Injected latency: 1 ms per op, ``int8_prelu_ms`` per int8 PRELU (the graph decides, not the clock)."""

    def samples(runner, sample, runs):
        cost = sum(int8_prelu_ms if (op == "PRELU" and dtype == "int8") else 1.0 for op, dtype in _op_dtypes(
            runner.content))
        return np.full(runs, cost)

    return samples


def test_latency_objective_keeps_slow_int8_ops_float(prelu_cnn, monkeypatch):
    model, x_train, x_test, y_test = prelu_cnn
    monkeypatch.setattr(tuning, "_latency_samples", _cost_model(int8_prelu_ms=20.0))
    result = tfq.tune(model, x_train[:200], x_test, y_test, objective="latency", max_drop=0.02, verbose=False,
                      search_space={"float_for_speed": ["PReLU", "Conv2D"]})
    assert result.met, result.summary()
    assert result.best.choices["float_for_speed"] == ["PReLU"]  # Conv2D float adds DEQUANTIZE/QUANTIZE: slower
    ops = _op_dtypes(result.tflite)
    assert [dtype for op, dtype in ops if op == "PRELU"] == ["float32"] * 3
    assert [dtype for op, dtype in ops if op == "CONV_2D"] == ["int8"] * 3
    # Why each layer is float: latency, with the medians tune measured (injected: 3×20 + n ops vs 3×1 + more ops).
    assert [(r["layer"], r["reason"]) for r in result.float_choices] == [(f"prelu{i}", "latency") for i in range(3)]
    prelu_check, conv_check = result.speed_checks
    assert prelu_check["kept"] and prelu_check["after_ms"] < 0.9 * prelu_check["before_ms"]
    assert not conv_check["kept"] and conv_check["after_ms"] > prelu_check["after_ms"]
    assert "latency" in result.float_choices.to_markdown()
    assert result.latency_ms["tuned"] < result.latency_ms["quantized"]
    # Within max_drop through LiteRT (independent of tune's own evaluation).
    float_acc = float((model.predict(x_test, verbose=0).argmax(1) == y_test).mean())
    assert tflite_accuracy(result.tflite, x_test, y_test) >= float_acc - 0.02
    # The recipe reproduces the model.
    assert tfq.convert(model, recipe=result.recipe, mode=None, representative_data=x_train[:200]) == result.tflite


def test_latency_objective_keeps_fast_int8_ops_int8(prelu_cnn, monkeypatch):
    model, x_train, x_test, y_test = prelu_cnn
    monkeypatch.setattr(tuning, "_latency_samples", _cost_model(int8_prelu_ms=0.5))
    result = tfq.tune(model, x_train[:200], x_test, y_test, objective="latency", max_drop=0.02, verbose=False,
                      search_space={"float_for_speed": ["PReLU"]})
    assert result.met
    assert "float_for_speed" not in result.best.choices
    assert not result.float_choices and "none kept float" in result.float_choices.to_markdown()
    assert all(dtype == "int8" for op, dtype in _op_dtypes(result.tflite) if op in ("PRELU", "CONV_2D"))
    assert result.speed_checks[0]["kept"] is False


def test_latency_decision_follows_measured_medians(prelu_cnn, tmp_path):
    """Real timing: whatever the machine measures, each class is kept float exactly when its paired medians
    show it SPEED_MARGIN faster in all rounds but one, and the chosen model keeps exactly those classes."""
    model, x_train, x_test, y_test = prelu_cnn
    result = tfq.tune(model, x_train[:200], x_test[:200], y_test[:200], objective="latency", max_drop=0.03,
                      verbose=False, search_space={"float_for_speed": ["PReLU", "Dense"]})
    assert [c["class"] for c in result.speed_checks] == ["PReLU", "Dense"]
    kept = []
    for check in result.speed_checks:
        if check["met"]:
            assert check["kept"] == (check["after_ms"] <= (1 - tfq.analysis.tuning.SPEED_MARGIN) * check["before_ms"]
                                     and check["rounds_faster"] >= check["rounds"] - 1)
        kept += [check["class"]] if check["kept"] else []
    assert result.best.choices.get("float_for_speed", []) == kept
    assert set(result.latency_ms) >= {"float", "tuned"} and all(v > 0 for v in result.latency_ms.values())
    saved = json.loads((result.save(tmp_path) / "trials.json").read_text())
    assert saved["speed_checks"] == result.speed_checks and saved["latency_ms"] == result.latency_ms
    assert "## Kept float" in (tmp_path / "report.md").read_text()


def test_size_objective_tries_no_float_for_speed(prelu_cnn):
    model, x_train, x_test, y_test = prelu_cnn
    result = tfq.tune(model, x_train[:200], x_test[:200], y_test[:200], max_drop=0.03, max_trials=3, verbose=False)
    assert result.speed_checks == [] and result.latency_ms == {}
    assert all("float_for_speed" not in t.choices for t in result.trials)


def test_float_choices_name_layers_kept_for_accuracy(digits):
    """A Dense kernel with one huge weight on a pixel that is 0 in every image: per-tensor INT8 rounds the
    other weights to 0 (accuracy collapses) although the function is unchanged; keeping that layer float fixes it."""
    from tfq.examples import train_model

    (x_train, y_train), (x_test, y_test) = digits
    keras.utils.set_random_seed(1)
    inputs = keras.Input(x_train.shape[1:])
    h = L.Dense(64, activation="relu", name="fc1")(L.Flatten()(inputs))
    model = keras.Model(inputs, L.Dense(10, activation="softmax", name="probs")(h))
    train_model(model, x_train, y_train, epochs=8, seed=1)
    assert not x_train.reshape(len(x_train), -1)[:, 0].any() and not x_test.reshape(len(x_test), -1)[:, 0].any()
    kernel, bias = model.get_layer("fc1").get_weights()
    kernel[0] = 1e4  # reads pixel 0, always 0
    model.get_layer("fc1").set_weights([kernel, bias])
    float_acc = float((model.predict(x_test, verbose=0).argmax(1) == y_test).mean())
    space = {"calibration": ["minmax"], "per_channel": [False], "symmetric_activations": [False],
             "precision": ["int8"], "equalize": [False], "bias_correction": [False], "weight_rounding": ["nearest"]}
    result = tfq.tune(model, x_train[:200], x_test, y_test, max_drop=0.01, verbose=False, search_space=space)
    assert result.met, result.summary()
    assert result.trials[0].drop > 0.1  # all INT8 per-tensor: the collapse the float layer fixes
    assert result.best.choices["float_layers"] == ["fc1"]
    (row,) = result.float_choices
    assert (row["layer"], row["class"], row["reason"]) == ("fc1", "Dense", "accuracy")
    assert f"{result.trials[0].drop:.4f}" in row["evidence"]
    assert tflite_accuracy(result.tflite, x_test, y_test) >= float_acc - 0.01
    assert "kept float for accuracy: fc1" in result.summary()


def test_float_for_speed_bad_values(prelu_cnn):
    model, x_train, x_test, y_test = prelu_cnn
    with pytest.raises(ValueError, match=r"float_for_speed.*'Conv2D'.*Received: \['MaxPooling2D'\]"):
        tfq.tune(model, x_train[:10], x_test[:10], y_test[:10], objective="latency", verbose=False,
                 search_space={"float_for_speed": ["MaxPooling2D"]})


def test_convert_warns_once_about_int8_prelu(prelu_cnn):
    model, x_train, _, _ = prelu_cnn
    with pytest.warns(UserWarning, match=r"3 int8 PRELU op\(s\).*XNNPACK.*float_layers=\[keras.layers.PReLU\]"):
        tfq.convert(model, "int8", x_train[:100])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        content = tfq.convert(model, "int8", x_train[:100], float_layers=[L.PReLU])
    assert [dtype for op, dtype in _op_dtypes(content) if op == "PRELU"] == ["float32"] * 3


# --- a model below Keras: a SavedModel / float .tflite, tuned op by op -----------------------------------------

def _litert_outputs(content, x):
    """Float outputs sample by sample through LiteRT's interpreter (the independent path)."""
    interpreter = Interpreter(model_content=content)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    rows = []
    for sample in x:
        interpreter.set_tensor(inp["index"], sample[None].astype(inp["dtype"]))
        interpreter.invoke()
        rows.append(interpreter.get_tensor(out["index"])[0].copy())
    return np.array(rows)


def _sqnr(reference, output):
    noise = float(np.sum((np.asarray(reference, np.float64) - output) ** 2))
    return 10 * np.log10(float(np.sum(np.asarray(reference, np.float64) ** 2)) / noise) if noise else np.inf


def snr_capped(y_true, y_pred):
    """SQNR (dB) against the float model's outputs, capped at 60 (the float model itself scores 60)."""
    return float(min(60.0, _sqnr(y_true, y_pred)))


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    """(SavedModel dir, float .tflite, calibration noise, held-out noise, float outputs on it)."""
    from tfq.export import tflite_frontend

    path = save_audio_saved_model(tmp_path_factory.mktemp("audio") / "saved_model")
    rng = np.random.default_rng(0)
    noise = (rng.normal(size=(120, 1024)) * rng.uniform(0.2, 1.0, size=(120, 1))).astype("float32")
    flt = tflite_frontend.float_tflite(path)
    return path, flt, noise[:48], noise[48:], _litert_outputs(flt, noise[48:])


def test_tune_saved_model_keeps_few_ops_float_within_max_drop(audio, tmp_path):
    from tfq.export import tflite_frontend

    path, flt, calib, x_eval, reference = audio
    full = tflite_frontend.quantize_tflite(flt, tflite_frontend.calibrate_tflite(flt, calib).ranges)
    full_db = _sqnr(reference, _litert_outputs(full, x_eval))
    assert full_db < 15.0  # full INT8: the front-end's quantization costs > 45 dB against float
    result = tfq.tune(path, calib, x_eval, reference, metric=snr_capped, max_drop=35.0, max_trials=40, verbose=False)
    assert result.met, result.summary()
    tuned_db = _sqnr(reference, _litert_outputs(result.tflite, x_eval))
    assert tuned_db >= 25.0 and tuned_db >= full_db + 10.0
    assert tuned_db == pytest.approx(result.best.metric, abs=1e-3)
    table = {i: t for i, t, _ in tflite_frontend.op_table(flt)}
    options = result.convert_options
    kept = options["float_layers"] + options.get("int16_layers", [])
    assert 1 <= len(kept) <= 4  # of 12 ops
    # The DIV the all-zeros input breaks in INT8 (NaN) is kept float by the check, as tfq.convert does.
    checked = [r["op"] for r in result.float_choices if r["reason"] == "check"]
    assert "DIV" in {table[i] for i in checked}
    # Why: one row per op, accuracy (with the measured drops) or the check.
    assert [r["op"] for r in result.float_choices if r["reason"] == "accuracy"] == sorted(kept)
    assert all("drop" in r["evidence"] for r in result.float_choices if r["reason"] == "accuracy")
    # Minimal: any one of tune's float ops back to int8 misses the target (checked through LiteRT).
    ranges = tflite_frontend.calibrate_tflite(flt, calib, options["calibration"],
                                              params=options.get("calibration_params")).ranges
    for i in options["float_layers"]:
        rest = [j for j in options["float_layers"] if j != i] + checked
        fewer = tflite_frontend.quantize_tflite(flt, ranges, float_ops=rest, int16_ops=options.get("int16_layers", []))
        assert _sqnr(reference, _litert_outputs(fewer, x_eval)) < 60.0 - 35.0
    # tfq.convert with the options tune gives reproduces the model.
    assert tfq.convert(path, representative_data=calib, **result.convert_options) == result.tflite
    out = result.save(tmp_path / "tuned")
    assert (out / "model.tflite").read_bytes() == result.tflite
    assert json.loads((out / "trials.json").read_text())["convert_options"] == result.convert_options


def test_tune_float_tflite_latency_keeps_slow_op_types_float(audio, monkeypatch):
    """Injected costs: an int8 FULLY_CONNECTED costs 20, any other op 1; tune keeps FULLY_CONNECTED float."""
    _, flt, calib, x_eval, reference = audio

    def samples(runner, sample, runs):
        cost = sum(20.0 if op == "FULLY_CONNECTED" and dtype == "int8" else 1.0 for op, dtype in _op_dtypes(
            runner.content))
        return np.full(runs, cost)

    monkeypatch.setattr(tuning, "_latency_samples", samples)
    result = tfq.tune(flt, calib, x_eval, reference, metric=snr_capped, max_drop=50.0, objective="latency",
                      verbose=False, search_space={"float_for_speed": ["FULLY_CONNECTED", "MUL"]})
    assert result.met
    assert result.best.choices["float_for_speed"] == ["FULLY_CONNECTED"]
    assert [c["kept"] for c in result.speed_checks] == [True, False]
    rows = [r for r in result.float_choices if r["reason"] == "latency"]
    assert [r["class"] for r in rows] == ["FULLY_CONNECTED"]
    assert [d for op, d in _op_dtypes(result.tflite) if op == "FULLY_CONNECTED"] == ["float32"]


def test_tune_below_keras_refuses_keras_only_choices(audio):
    _, flt, calib, x_eval, reference = audio
    with pytest.raises(ValueError, match=r"search_space\['equalize'\] applies to Keras models"):
        tfq.tune(flt, calib, x_eval, reference, metric=snr_capped, verbose=False,
                 search_space={"equalize": [False, True]})
    with pytest.raises(ValueError, match=r"strategy='random' applies to Keras models"):
        tfq.tune(flt, calib, x_eval, reference, metric=snr_capped, strategy="random", verbose=False)
    with pytest.raises(ValueError, match=r"float_for_speed.*op types.*Received: \['PRELU'\]"):
        tfq.tune(flt, calib, x_eval, reference, metric=snr_capped, objective="latency", verbose=False,
                 search_space={"float_for_speed": ["PRELU"]})


def test_check_sqnr_of_an_output_whose_error_overflows():
    """An int8 output so far off that the squared error overflows (inf noise) is a -inf dB finding, not a
    math domain error (tune met it keeping a FULLY_CONNECTED float after an int8 DIV)."""
    from tfq.export.check import _sqnr_findings

    reference, output = [[np.array([1.0, 2.0])]], [[np.array([1e200, 2.0])]]
    (finding,) = _sqnr_findings(reference, output, ["y"])
    assert finding.kind == "low_sqnr" and "-inf dB" in finding.detail


def test_doctests():
    import doctest

    assert doctest.testmod(tuning, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


@pytest.mark.slow  # keeps this file's default part near 60 s
def test_tune_saved_model_resumes_from_its_trial_log(audio, tmp_path):
    path, _, calib, x_eval, reference = audio
    args = (path, calib, x_eval, reference)
    first = tfq.tune(*args, metric=snr_capped, max_drop=35.0, max_trials=40, verbose=False, output_dir=tmp_path)
    logged = (tmp_path / "trials.jsonl").read_text().splitlines()
    assert len(logged) == len(first.trials)
    again = tfq.tune(*args, metric=snr_capped, max_drop=35.0, max_trials=40, verbose=False, output_dir=tmp_path)
    assert len((tmp_path / "trials.jsonl").read_text().splitlines()) == len(logged)  # every trial reused
    assert [t.metric for t in again.trials] == [t.metric for t in first.trials]
    assert again.tflite == first.tflite and again.float_choices == first.float_choices


def test_tune_float_tflite_with_an_outlier_channel_keeps_ops_int16_or_float(digits):
    """An MLP whose first Dense has 2 of 32 channels 500× larger (the next Dense divides them back: the same
    function). Per-tensor int8 activations collapse the other 30 channels; tune keeps that op's activations
    int16 (or float) and the one after it within max_drop, checked through LiteRT."""
    import tensorflow as tf

    from tfq.examples import train_model

    (x_train, y_train), (x_test, y_test) = digits
    keras.utils.set_random_seed(0)
    inputs = keras.Input(x_train.shape[1:])
    h = L.Dense(32, activation="relu", name="fc1")(L.Flatten()(inputs))
    h = L.Dense(32, activation="relu", name="fc2")(h)
    model = keras.Model(inputs, L.Dense(10, activation="softmax", name="probs")(h))
    train_model(model, x_train, y_train, epochs=10, seed=0)
    k1, b1 = model.get_layer("fc1").get_weights()
    k2, b2 = model.get_layer("fc2").get_weights()
    scale = np.ones(32, np.float32)
    scale[:2] = 500.0
    model.get_layer("fc1").set_weights([k1 * scale, b1 * scale])
    model.get_layer("fc2").set_weights([k2 / scale[:, None], b2])
    flt = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    reference = _litert_outputs(flt, x_test)
    float_acc = float((reference.argmax(1) == y_test).mean())
    full = tfq.convert(flt, "int8", x_train[:300])
    assert _sqnr(reference, _litert_outputs(full, x_test)) < 10.0  # the plain INT8 collapses
    result = tfq.tune(flt, x_train[:300], x_test, reference, metric=snr_capped, max_drop=25.0, max_trials=40,
                      verbose=False)
    assert result.met, result.summary()
    tuned = _litert_outputs(result.tflite, x_test)
    assert _sqnr(reference, tuned) >= 35.0
    assert float((tuned.argmax(1) == y_test).mean()) >= float_acc - 0.02
    options = result.convert_options
    assert len(options["float_layers"]) + len(options["int16_layers"]) <= 2  # of 4 FULLY_CONNECTED
    precisions = {r["op"]: r["precision"] for r in result.float_choices}
    assert precisions == {**{i: "float" for i in options["float_layers"]}, **{i: "int16" for i in options["int16_layers"]}}
    # An int16 op's output tensor is INT16 in the file LiteRT runs.
    info = tfq.inspect_tflite(result.tflite)
    assert sum(op.output_dtypes[0] == "INT16" for op in info.ops) >= len(options["int16_layers"])
    assert tfq.convert(flt, representative_data=x_train[:300], **options) == result.tflite
