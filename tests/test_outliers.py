"""Calibration samples far outside the rest: the per-sample test, its warning, and the default calibration
(robust_minmax) that sets them aside; the one-trace converter that tfq.convert uses for INT8."""

import doctest
import re
import warnings

import keras
import numpy as np
import pytest

import tfq
from tfq import outliers
from tfq.outliers import SampleRanges, find_outlier_samples, input_outlier_samples, without_samples
from tests.conftest import tflite_accuracy

BAD = [7, 123, 250]  # corrupted calibration samples (×100) in these tests


def _warnings(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in caught if "calibration samples lie far outside" in str(w.message)]


def _named(message):
    return [int(v) for v in re.search(r"indices ([0-9, ]+)", message).group(1).split(",")]


@pytest.fixture(scope="module")
def corrupt(digits):
    (x_train, _), _ = digits
    calib = x_train[:300].copy()
    calib[BAD] *= 100.0
    return calib


# ------------------------------------------------------------------------------------------- maths
def test_doctests():
    assert doctest.testmod(outliers, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


def test_sample_ranges_fold_repeated_calls_and_drop_tensors_without_a_batch_axis():
    rec = SampleRanges()
    rec.begin_batch(2)
    rec.record("rnn", np.array([[1.0, -2.0], [0.5, 0.5]]))
    rec.record("rnn", np.array([[3.0, 0.0], [-4.0, 0.0]]))  # the same tensor at the next time step
    rec.record("const", np.ones((5, 3)))  # first axis is not the batch: no per-sample ranges
    rec.record("once", np.zeros((2, 1)))
    rec.begin_batch(3)
    rec.record("rnn", np.full((3, 4), 7.0))
    rec.record("const", np.ones((5, 3)))  # "once" is missing from this batch: dropped too
    ranges = rec.ranges()
    assert set(ranges) == {"rnn"} and rec.num_samples == 5
    lo, hi = ranges["rnn"]
    assert lo.tolist() == [-2.0, -4.0, 7.0, 7.0, 7.0] and hi.tolist() == [3.0, 0.5, 7.0, 7.0, 7.0]


def test_find_outlier_samples_against_a_direct_computation():
    rng = np.random.default_rng(0)
    n = 200
    hi = rng.uniform(1.0, 3.0, (2, n))
    lo = -rng.uniform(0.0, 2.0, (2, n))
    hi[0, [5, 99]] = [40.0, 25.0]  # far out in tensor a
    lo[1, 150] = -1e3  # far out (negative side) in tensor b
    hi[1, 60] = 5.0  # above the rest but within 8× the 90th percentile
    ranges = {"a": (lo[0], hi[0]), "b": (lo[1], hi[1])}

    def direct(factor):
        flagged, ratios = set(), {}
        for t, name in enumerate("ab"):
            m = np.maximum(np.abs(lo[t]), np.abs(hi[t]))
            q = sorted(m)[int(0.9 * (n - 1))]
            for i in range(n):
                if m[i] > factor * q:
                    flagged.add(i)
                    ratios[i] = (name, m[i] / q)
        return tuple(sorted(flagged)), ratios

    found = find_outlier_samples(ranges)
    expected, ratios = direct(8.0)
    assert found.indices == expected == (5, 99, 150) and found.num_samples == n
    for i in found.indices:
        assert found.evidence[i][0] == ratios[i][0] and found.evidence[i][1] == pytest.approx(ratios[i][1])
    assert find_outlier_samples(ranges, factor=12.0).indices == direct(12.0)[0] == (5, 150)
    # Fewer than MIN_SAMPLES samples: nothing is far outside "the rest".
    assert not find_outlier_samples({"a": (np.zeros(5), np.array([1, 1, 1, 1, 100.0]))})
    # A tensor that is zero for most samples has no reference: it flags nothing.
    sparse = np.zeros(50)
    sparse[3] = 1.0
    assert not find_outlier_samples({"s": (np.zeros(50), sparse)})
    with pytest.raises(ValueError, match=r"factor must be a number > 1.*Received: factor=1"):
        find_outlier_samples(ranges, factor=1)


def test_without_samples_and_input_test():
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    x[[4, 17]] *= 1000
    rep = tfq.representative_dataset(x)
    found = input_outlier_samples(rep)
    assert found.indices == (4, 17) and found.num_samples == 20
    kept = np.concatenate([b[0] for b in without_samples(x, found.indices).batches(7)])
    np.testing.assert_array_equal(kept, np.delete(x, [4, 17], axis=0))
    assert without_samples(x, ()) is x


# ------------------------------------------------------------------------------------ calibration
def test_warning_names_the_corrupt_samples_for_every_method(trained_cnn, corrupt):
    model, _ = trained_cnn
    # Independent path: the per-sample largest |activation| of the first block, from the float Keras model.
    conv1 = keras.Model(model.input, model.get_layer("relu1").output)
    m = np.abs(conv1.predict(corrupt, verbose=0)).reshape(len(corrupt), -1).max(axis=1)
    q = np.sort(m)[int(0.9 * (len(m) - 1))]
    assert sorted(np.flatnonzero(m > 8 * q).tolist()) == BAD
    for method in ("robust_minmax", "minmax", "moving_average", "kl", "percentile", "mse"):
        cal, messages = _warnings(tfq.calibrate, model, corrupt, method=method)
        assert len(messages) == 1, (method, messages)
        assert _named(messages[0]) == BAD and messages[0].startswith("tfq: 3 of 300 calibration samples"), messages
        assert list(cal.outlier_samples) == BAD
        assert ("set aside" in messages[0]) == (method == "robust_minmax"), messages[0]
    conv1_ratio = float(re.search(r"(\d+)× the 90th percentile of the samples' largest \|value\| in tensor "
                                  r"'conv1_output_fq'", messages[0]).group(1)) if "conv1_output_fq" in messages[0] else None
    if conv1_ratio is not None:  # the strongest evidence is reported; when it is conv1, it matches Keras
        assert conv1_ratio == pytest.approx(m.max() / q, abs=1.0)


def test_robust_minmax_is_minmax_without_the_samples_set_aside(trained_cnn, corrupt, digits):
    model, _ = trained_cnn
    robust, _ = _warnings(tfq.calibrate, model, corrupt)  # the default method
    assert robust.method == "robust_minmax"
    reference, messages = _warnings(tfq.calibrate, model, np.delete(corrupt, BAD, axis=0), method="minmax")
    assert not messages
    assert robust.ranges.keys() == reference.ranges.keys()
    for name in reference.ranges:
        assert robust[name] == pytest.approx(reference[name], rel=1e-6), name
    # Clean data: nothing set aside, MinMax (in batches of 32 here: the same up to float rounding in the model).
    (x_train, _), _ = digits
    clean, messages = _warnings(tfq.calibrate, model, x_train[:300])
    assert not messages and clean.outlier_samples == ()
    minmax32 = tfq.calibrate(model, x_train[:300], method="minmax", batch_size=32)
    for name in clean.ranges:
        assert clean[name] == pytest.approx(minmax32[name], rel=1e-6), name
    loaded = tfq.Calibration.from_dict(robust.to_dict())
    assert loaded.outlier_samples == robust.outlier_samples and loaded.ranges == robust.ranges


def test_robust_minmax_is_the_default_everywhere_and_takes_no_parameter(trained_cnn, corrupt):
    model, _ = trained_cnn
    assert tfq.Recipe().calibration == "robust_minmax" == tfq.load_recipe("int8").calibration
    assert tfq.calibrate(model, corrupt[:20]).method == "robust_minmax"
    with pytest.raises(ValueError, match=r"Unknown params key 'num_bins' for calibration='robust_minmax'.*none"):
        tfq.calibrate(model, corrupt[:20], num_bins=128)
    with pytest.raises(ValueError, match=r"Unknown calibration_params key 'percentile'.*robust_minmax"):
        tfq.convert(model, "int8", corrupt[:20], calibration_params={"percentile": 99.0})


def test_default_convert_within_half_a_point_on_corrupt_digits(trained_cnn, corrupt, digits):
    model, float_acc = trained_cnn
    _, (x_test, y_test) = digits
    content, messages = _warnings(tfq.convert, model, "int8", corrupt)
    assert len(messages) == 1 and _named(messages[0]) == BAD  # warned once
    assert tflite_accuracy(content, x_test, y_test) >= float_acc - 0.005
    # The scales the clean samples alone give (what was set aside is not used anywhere).
    clean = tfq.inspect_tflite(tfq.convert(model, "int8", np.delete(corrupt, BAD, axis=0)))
    info = tfq.inspect_tflite(content)
    scales = [(t.name, t.scales[0]) for t in info.tensors if len(t.scales) == 1]
    assert scales and [s for _, s in scales] == pytest.approx(
        [t.scales[0] for t in clean.tensors if len(t.scales) == 1], rel=1e-6)
    minmax, _ = _warnings(tfq.convert, model, "int8", corrupt, calibration="minmax")
    assert tflite_accuracy(minmax, x_test, y_test) < float_acc - 0.05


# --------------------------------------------------------------------------- the one-trace converter
def test_graph_converter_matches_from_keras_model_with_its_signature(digits):
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from tfq.graph_converter import keras_graph_converter

    (x_train, _), _ = digits
    keras.utils.set_random_seed(0)
    a, b = keras.Input((8, 8, 1), name="pixels"), keras.Input((4,), name="extra")
    h = keras.layers.Concatenate()([keras.layers.Flatten()(keras.layers.Conv2D(4, 3, activation="relu")(a)),
                                    keras.layers.Dense(8)(b)])
    heads = [keras.layers.Dense(3)(h), keras.layers.Dense(5, activation="softmax")(h)]
    data = {"pixels": x_train[:1], "extra": np.random.default_rng(0).normal(size=(1, 4)).astype(np.float32)}
    listed = keras.Model([a, b], heads)
    reference = tf.lite.TFLiteConverter.from_keras_model(listed).convert()  # the SavedModel route
    content = keras_graph_converter(listed).convert()
    assert keras_graph_converter(listed).convert() == content  # deterministic
    assert bytes(content)[4:8] == b"TFL3"
    runners = [Interpreter(model_content=c).get_signature_runner() for c in (reference, content)]
    assert [Interpreter(model_content=c).get_signature_list() for c in (reference, content)] == 2 * [
        {"serving_default": {"inputs": ["extra", "pixels"], "outputs": ["output_0", "output_1"]}}]
    outs = [runner(**data) for runner in runners]
    for key in ("output_0", "output_1"):
        np.testing.assert_allclose(outs[0][key], outs[1][key], rtol=1e-5, atol=1e-6)
    # Dict outputs are keyed by their names, as from_keras_model keys them.
    named = keras.Model({"pixels": a, "extra": b}, {"logits": heads[0], "probs": heads[1]})
    runner = Interpreter(model_content=keras_graph_converter(named).convert()).get_signature_runner()
    out = runner(**data)
    assert sorted(out) == ["logits", "probs"]
    np.testing.assert_allclose(out["probs"], outs[0]["output_1"], rtol=1e-5, atol=1e-6)


def test_convert_in_place_equals_the_frozen_copy(trained_cnn, digits):
    model, _ = trained_cnn
    (x_train, _), _ = digits
    from tfq.conversion import _build_recipe, _int8_converter_run

    content = tfq.convert(model, "int8", x_train[:64], io_dtype="int8")
    frozen = tfq.fake_quantize(model, "int8", x_train[:64])  # the copy freeze_model makes
    r = _build_recipe("int8", None, "robust_minmax", True, "int8", (), None)
    assert _int8_converter_run(frozen, r, None) == content


# ------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_default_within_half_a_point_on_mobilenet_style_clean_and_corrupt(trained_mobilenet):
    model, (x_train, _), (x_test, y_test), float_acc = trained_mobilenet
    calib = x_train[:300].copy()
    for corrupt_it in (False, True):
        if corrupt_it:
            calib[BAD] *= 100.0
        content, messages = _warnings(tfq.convert, model, "int8", calib)
        assert [_named(m) for m in messages] == ([BAD] if corrupt_it else [])
        assert tflite_accuracy(content, x_test, y_test) >= float_acc - 0.005, corrupt_it
    minmax, _ = _warnings(tfq.convert, model, "int8", calib, calibration="minmax")
    assert tflite_accuracy(minmax, x_test, y_test) < float_acc - 0.05


@pytest.mark.slow
def test_converter_calibrated_paths_screen_their_inputs(trained_cnn, corrupt, digits, tmp_path):
    """A SavedModel (and int16x8) is calibrated by the TFLite converter: tfq tests the inputs alone."""
    model, float_acc = trained_cnn
    _, (x_test, y_test) = digits
    model.export(str(tmp_path / "sm"), verbose=False)
    content, messages = _warnings(tfq.convert, str(tmp_path / "sm"), "int8", corrupt)
    assert len(messages) == 1 and _named(messages[0]) == BAD and "set aside" in messages[0]
    assert tflite_accuracy(content, x_test, y_test) >= float_acc - 0.005
    kept, messages = _warnings(tfq.convert, str(tmp_path / "sm"), "int8", corrupt, calibration="minmax")
    assert len(messages) == 1 and "keeps them" in messages[0]
    assert tflite_accuracy(kept, x_test, y_test) < float_acc - 0.05
    int16, messages = _warnings(tfq.convert, model, "int16x8", corrupt)
    assert len(messages) == 1 and _named(messages[0]) == BAD
    assert tflite_accuracy(int16, x_test, y_test) >= float_acc - 0.005
