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
from tfq.outliers import OutlierTest, SampleRanges, find_outlier_samples, input_outlier_samples, without_samples
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


# ------------------------------------------------------------------------------ streaming test
def _planted_batches(seed, batch_size, many):
    """Batches of named float32 tensors (5 values per sample) with samples planted far outside the rest."""
    rng = np.random.default_rng(seed)
    n = 3000 + seed  # a partial last batch for most batch sizes
    samples = rng.permutation(n)
    s1, s2, s3, s4 = samples[:40], samples[40:80], samples[80:85], samples[85:235]
    t = {"a": rng.normal(size=(n, 5)), "b": np.maximum(rng.normal(size=(n, 5)), 0.0),
         "neg": rng.normal(size=(n, 5)), "e": rng.normal(size=(n, 5)), "rnn": rng.uniform(-1, 1, (n, 2, 5)),
         "zeros": np.zeros((n, 5)), "late": rng.normal(size=(n, 5))}
    t["a"][s1] *= 60.0
    t["a"][s1, 3] = 150.0
    t["b"][s2, 0] = 90.0
    t["neg"][s3, 2] = -500.0  # far out on the negative side only
    t["e"][np.concatenate([s1, s2]), 0] = 6.0  # largest in e, but within 8x: flagged only through a and b
    t["zeros"][samples[-100:]] = rng.uniform(0, 1, (100, 5))  # q = 0: not tested ...
    t["zeros"][samples[-1], 0] = 1e6  # ... so this is not flagged
    t["rnn"][s3[:2], 1] *= 40.0  # at the second "time step" only
    if many:
        t["many"] = rng.normal(size=(n, 5))
        t["many"][s4, 1] = 300.0  # 150 samples: more than a small capacity keeps
    t = {k: v.astype(np.float32) for k, v in t.items()}
    batches = []
    for k, start in enumerate(range(0, n, batch_size)):
        part = {name: v[start:start + batch_size] for name, v in t.items() if name != "late" or k > 0}
        batches.append(part)
    return batches


def _feed(recorder, batches):
    for batch in batches:
        recorder.begin_batch(len(batch["a"]))
        for name, x in batch.items():
            if name == "rnn":  # one tensor computed twice per sample: folds
                recorder.record(name, x[:, 0])
                recorder.record(name, x[:, 1])
            else:
                recorder.record(name, x)


@pytest.mark.parametrize("seed,batch_size,capacity,many,passes", [
    (0, 32, 1024, True, 0), (1, 7, 64, False, 1), (2, 256, 64, True, 1), (3, 100, 16, False, 1),
    (4, 3, 2048, True, 0)])
def test_streaming_test_equals_the_exact_one(seed, batch_size, capacity, many, passes):
    batches = _planted_batches(seed, batch_size, many)
    exact = SampleRanges()
    _feed(exact, batches)
    per_sample = exact.ranges()
    expected = find_outlier_samples(per_sample)
    reruns = []
    test = OutlierTest(capacity, rerun=lambda recorder: (reruns.append(1), _feed(recorder, batches)))
    _feed(test, batches)
    found = test.result()
    assert found.indices == expected.indices and len(found.indices) == 85 + 150 * many
    assert found.num_samples == expected.num_samples == exact.num_samples
    assert test.tensors == sorted(per_sample) and "late" not in per_sample and "zeros" in per_sample
    for i in found.indices:
        name, ratio = found.evidence[i]
        assert name == expected.evidence[i][0]
        # Exact when the kept samples hold the 90th percentile, else m / q-hat, at most 0.8% below m / q.
        assert expected.evidence[i][1] / (1 + 2 ** -7) <= ratio <= expected.evidence[i][1] * (1 + 1e-6)
        if capacity >= 1024:
            assert ratio == expected.evidence[i][1]
    keep = np.ones(exact.num_samples, bool)
    keep[list(expected.indices)] = False
    for name, (lo, hi) in per_sample.items():
        assert test.robust_range(name) == (float(lo[keep].min()), float(hi[keep].max())), name
    assert len(reruns) == passes  # a second pass only when the state cannot tell
    for summary in test._tensors.values():  # bounded state
        assert len(summary.top.index) <= capacity and len(summary.bottom.index) <= capacity
        assert len(summary.counts) <= 128 * 40
    assert OutlierTest(capacity).result().indices == ()  # no data: nothing
    with pytest.raises(ValueError, match=r"factor must be a number > 1.*Received: factor=1"):
        test.result(factor=1)


def test_streaming_reference_is_the_upper_edge_of_its_bin():
    """Beyond what the kept samples hold, q is the upper edge of its bin (128 per octave): a sample between
    factor*q and factor*q-hat is flagged by the exact test only; above, by both."""
    import math

    rng = np.random.default_rng(5)
    m = rng.uniform(1.0, 3.0, 2000).astype(np.float32)
    m[[10, 20]] = 100.0  # planted below: above q, so q does not depend on their values
    q = float(np.sort(m)[int(0.9 * 1999)])
    mantissa, exponent = math.frexp(q)  # q = mantissa * 2**exponent, mantissa in [0.5, 1)
    q_hat = (math.floor((2 * mantissa - 1) * 128) + 1) / 128 * 2.0 ** (exponent - 1) + 2.0 ** (exponent - 1)
    assert q * 1.001 < q_hat < q * (1 + 2 ** -7)  # (this seed: the band between 8q and 8q-hat is not empty)
    between, above = np.float32(8 * q * (q_hat / q) ** 0.5), np.float32(8 * q_hat * 1.001)
    m[[10, 20]] = [between, above]
    assert float(between) > 8 * q and float(between) < 8 * q_hat
    test = OutlierTest(capacity=8)
    for part in np.array_split(m, 10):
        test.begin_batch(len(part))
        test.record("t", np.stack([-part / 2, part], axis=1))
    assert find_outlier_samples({"t": (-m / 2, m)}).indices == (10, 20)
    found = test.result()
    assert found.indices == (20,) and found.evidence[20][1] == pytest.approx(float(above) / q_hat, rel=1e-6)
    assert test.robust_range("t") == (float(-np.delete(m, 20).max() / 2), float(np.delete(m, 20).max()))


def test_streaming_second_pass_needs_the_same_data():
    batches = _planted_batches(0, 64, True)
    with pytest.raises(ValueError, match=r"more samples reach the outlier threshold.*Pass rerun="):
        test = OutlierTest(capacity=16)
        _feed(test, batches)
        test.result()
    shuffled = [{k: v[::-1] for k, v in b.items()} for b in batches]
    test = OutlierTest(capacity=16, rerun=lambda recorder: _feed(recorder, shuffled))
    _feed(test, batches)
    with pytest.raises(ValueError, match=r"other values on the second pass.*same order on every pass"):
        test.result()
    test = OutlierTest(capacity=16, rerun=lambda recorder: _feed(recorder, batches[:-1]))
    _feed(test, batches)
    with pytest.raises(ValueError, match=r"other values on the second pass"):
        test.result()
    with pytest.raises(ValueError, match=r"call result\(factor\) before robust_range"):
        OutlierTest().robust_range("a")


def test_input_test_reruns_arrays_datasets_and_functions():
    """The second pass iterates the representative data again: arrays, tf.data and functions all re-iterate;
    a tf.data pipeline that reshuffles every pass is refused, not answered wrong."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3)).astype(np.float32)
    bad = [3, 50, 51, 52, 199, 250, 251, 300, 301, 399]
    x[bad] *= 1000
    sources = {"arrays": x, "tf.data": tf.data.Dataset.from_tensor_slices(x).batch(16),
               "function": lambda: (x[i:i + 10] for i in range(0, 400, 10))}
    for kind, data in sources.items():
        rep = tfq.representative_dataset(data)

        def feed(recorder, rep=rep):
            for arrays in rep.batches(32):
                recorder.begin_batch(len(arrays[0]))
                recorder.record("input 0", arrays[0])

        reruns = []
        test = OutlierTest(capacity=4, rerun=lambda recorder, feed=feed: (reruns.append(1), feed(recorder)))
        feed(test)
        assert test.result().indices == tuple(bad) and reruns == [1], kind
        kept = np.delete(x, bad, axis=0)
        assert test.robust_range("input 0") == (float(kept.min()), float(kept.max())), kind
    assert input_outlier_samples(tfq.representative_dataset(x)).indices == tuple(bad)
    reshuffled = tfq.representative_dataset(tf.data.Dataset.from_tensor_slices(x).shuffle(400, seed=1).batch(16))

    def feed(recorder):
        for arrays in reshuffled.batches(32):
            recorder.begin_batch(len(arrays[0]))
            recorder.record("input 0", arrays[0])

    test = OutlierTest(capacity=4, rerun=feed)
    feed(test)
    with pytest.raises(ValueError, match=r"reshuffle_each_iteration=False"):
        test.result()


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


@pytest.mark.parametrize("capacity", [None, 2])
def test_calibrate_ranges_equal_the_per_sample_path(trained_cnn, corrupt, monkeypatch, capacity):
    """calibrate's streaming test gives the ranges of the path that kept every sample's ranges (computed here
    by hand on the same batches); with a capacity of 2 (3 corrupt samples) it takes its second pass."""
    from tfq.ptq.calibration import _batches
    from tfq.observers import MinMaxObserver
    from tfq.quantsim.layers import observing
    from tfq.quantsim.rewrite import quantizers_of, rewrite_model
    from tfq.core.representative import pack_model_inputs

    model, _ = trained_cnn
    if capacity is not None:
        monkeypatch.setattr(outliers, "DEFAULT_CAPACITY", capacity)
    calls = []
    original = outliers._Recheck.finish
    monkeypatch.setattr(outliers._Recheck, "finish", lambda self: (calls.append(1), original(self))[1])
    cal, messages = _warnings(tfq.calibrate, model, corrupt)
    assert len(calls) == (capacity is not None) and len(messages) == 1 and list(cal.outlier_samples) == BAD
    qmodel = rewrite_model(model, tfq.load_recipe("int8"))
    quantizers = {name: q for name, q in quantizers_of(qmodel).items() if q.mode != "fixed"}
    rec = SampleRanges()
    data = tfq.representative_dataset(corrupt, model=qmodel)
    with observing({id(q): rec.tap(name, MinMaxObserver()) for name, q in quantizers.items()}):
        for batch in _batches(data, None, "robust_minmax", rec):
            rec.begin_batch(len(batch[0]))
            qmodel(pack_model_inputs(qmodel, batch), training=False)
    per_sample = rec.ranges()
    assert find_outlier_samples(per_sample).indices == tuple(BAD) and set(per_sample) <= set(cal.ranges)
    keep = np.ones(len(corrupt), bool)
    keep[BAD] = False
    for name, (lo, hi) in per_sample.items():
        assert cal.ranges[name] == (float(lo[keep].min()), float(hi[keep].max())), name


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

    from tfq.export.graph_converter import keras_graph_converter

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
    from tfq.export.convert import _build_recipe, _int8_converter_run

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


def test_calibrate_names_non_finite_activations():
    """MinMax calibration folds each activation into per-sample minima and maxima; a NaN inside the
    model (here a NaN bias) still reaches the observer, which names it."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d1"), keras.layers.Dense(2, name="d2")])
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    cal = tfq.calibrate(model, x, "minmax")
    hidden = x @ model.get_layer("d1").get_weights()[0] + model.get_layer("d1").get_weights()[1]
    lo, hi = cal.ranges["d1_output_fq"]
    assert (lo, hi) == pytest.approx((min(hidden.min(), 0.0), max(hidden.max(), 0.0)), rel=1e-6)
    w, b = model.get_layer("d1").get_weights()
    b[1] = np.nan
    model.get_layer("d1").set_weights([w, b])
    for method in ("robust_minmax", "minmax"):
        with pytest.raises(ValueError, match="non-finite"):
            tfq.calibrate(model, x, method)
