"""tune keeps layers float for speed (objective="latency") and says why each float layer is float.

Latency decisions are checked on injected latencies (deterministic: what each op costs is set by the test) and,
on real measurements, against the medians tune recorded; raw timings are never asserted.
"""

import json

import keras
import numpy as np
import pytest

import tfq
from tfq.analysis import tuning
from tests.conftest import tflite_accuracy

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
    show it SPEED_MARGIN faster, and the chosen model keeps exactly those classes."""
    model, x_train, x_test, y_test = prelu_cnn
    result = tfq.tune(model, x_train[:200], x_test[:200], y_test[:200], objective="latency", max_drop=0.03,
                      verbose=False, search_space={"float_for_speed": ["PReLU", "Dense"]})
    assert [c["class"] for c in result.speed_checks] == ["PReLU", "Dense"]
    kept = []
    for check in result.speed_checks:
        if check["met"]:
            assert check["kept"] == (check["after_ms"] <= (1 - tfq.analysis.tuning.SPEED_MARGIN) * check["before_ms"])
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
