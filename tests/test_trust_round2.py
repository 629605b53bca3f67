"""Trust, round 2 (issue 29): defaults that work for a user who passes nothing, options never
misread, one-line errors, faults and hostile input. Each test failed before its fix.

Models are tiny (a Dense head on 8 features or the 8×8 digits) so the file stays fast.
"""

import hashlib
import json
import os
import shutil
import threading
import time
import warnings

import keras
import numpy as np
import pytest

import tfq
from tfq import callbacks, pruning
from tfq.distillation import Distiller


def dense_model(name="dense", outputs=3, activation=None):
    inp = keras.Input((8,), name="x")
    h = keras.layers.Dense(16, activation="relu", name="d1")(inp)
    return keras.Model(inp, keras.layers.Dense(outputs, activation=activation, name="d2")(h), name=name)


def features(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    return x, (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0).astype("int32")


# --------------------------------------------------------------------------------------------
# Defaults: distillation
# --------------------------------------------------------------------------------------------


def test_distiller_reads_logits_from_linear_outputs_and_probabilities_from_softmax():
    # Before: from_logits defaulted to False, so logits were read as probabilities (25.8 % on digits).
    logits_t, logits_s = dense_model("t"), dense_model("s")
    d = Distiller(student=logits_s, teacher=logits_t)
    assert d.from_logits is True
    d.compile("adam")
    assert d.loss.get_config()["from_logits"] is True  # the hard loss reads logits too
    probs = Distiller(student=dense_model("s2", activation="softmax"), teacher=dense_model("t2", activation="softmax"))
    assert probs.from_logits is False
    # A softmax as its own layer (after a Dropout) and a Sequential: probabilities as well.
    inp = keras.Input((8,))
    seq_probs = keras.Model(inp, keras.layers.Dropout(0.1)(keras.layers.Softmax()(keras.layers.Dense(3)(inp))))
    assert Distiller(student=seq_probs, teacher=dense_model("t3", activation="softmax")).from_logits is False


def test_distiller_refuses_what_it_cannot_tell_and_a_disagreement_and_honours_an_explicit_choice():
    relu_out = dense_model("r", activation="relu")
    with pytest.raises(ValueError, match=r"cannot tell whether the student outputs logits or probabilities.*"
                                         r"pass from_logits=True"):
        Distiller(student=relu_out, teacher=dense_model("t"))
    with pytest.raises(ValueError, match="the student outputs probabilities but the teacher logits"):
        Distiller(student=dense_model("s", activation="softmax"), teacher=dense_model("t"))
    # An explicit value is used as given (a warning when the outputs say otherwise).
    assert Distiller(student=relu_out, teacher=dense_model("t"), from_logits=True).from_logits is True
    with pytest.warns(UserWarning, match=r"from_logits=False.*give logits"):
        d = Distiller(student=dense_model("s"), teacher=dense_model("t"), from_logits=False)
    assert d.from_logits is False
    with pytest.raises(TypeError, match="from_logits must be True, False or None"):
        Distiller(student=dense_model("s"), teacher=dense_model("t"), from_logits="yes")


def test_distiller_refuses_a_student_with_other_inputs_at_construction():
    # Before: accepted, failed inside fit with a shape traceback.
    inp = keras.Input((6,))
    other = keras.Model(inp, keras.layers.Dense(3)(inp), name="other")
    with pytest.raises(ValueError, match=r"same inputs.*\(6,\) \(student\) and \(8,\) \(teacher\)"):
        Distiller(student=other, teacher=dense_model("t"))


# --------------------------------------------------------------------------------------------
# Defaults: pruning and train_qat
# --------------------------------------------------------------------------------------------


class _SparsityPerStep(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append(pruning.pruned_layers_of(self.model)[0].sparsity)


def test_default_schedule_reaches_the_target_at_60_percent_with_frequent_updates():
    # Before: end_step=None was the last step of the fit and frequency 100: masks jumped 0 → 75 % at the
    # very last step (78.1 % on digits, 96.6 % with the target at 60 % and masks every 10 steps).
    keras.utils.set_random_seed(0)
    pruned = pruning.prune_low_magnitude(dense_model(), target_sparsity=0.75)
    pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = features(800)
    rec = _SparsityPerStep()
    pruned.fit(x, y, batch_size=32, epochs=4, verbose=0, callbacks=[callbacks.UpdatePruningStep(), rec])
    steps = 4 * 25
    end = round(0.6 * steps) - 1  # 59
    assert int(pruned.get_layer("d1").end_step.numpy()) == end
    frequency = (end - 0) // 10  # 5
    assert pruned.get_layer("d1").schedule.frequency_for(end) == frequency
    # The schedule by hand: s(t) = 0.75 · (1 − (1 − t/end)³) at t = 0, 5, 10 …, held between updates.
    for t in (4, 5, 30, end - 1, end, steps - 1):
        last_update = min(t - t % frequency, end) if t < end else end
        expected = 0.75 * (1 - (1 - last_update / end) ** 3)
        n = 8 * 16
        assert rec.seen[t] == pytest.approx(round(expected * n) / n), t
    assert len(set(rec.seen[:end + 1])) >= 10  # masks tightened often, not in one jump
    assert rec.seen[-1] == pytest.approx(0.75)


def test_end_step_zero_prunes_at_once():
    # Before: end_step=0 computed the sparsity at p = 0 (the initial 0 %) and never updated again.
    pruned = pruning.prune_low_magnitude(dense_model(), 0.5, end_step=0)
    pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = features()
    rec = _SparsityPerStep()
    pruned.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[callbacks.UpdatePruningStep(), rec])
    assert rec.seen == [0.5, 0.5, 0.5]
    assert pruning.PolynomialDecay(0.0, 0.5, begin_step=3, end_step=3).sparsity_at(3) == 0.5


def test_train_qat_names_a_freeze_epoch_that_never_comes():
    # Before: freeze_bn_epoch=5 with epochs=2 trained without a word (the callback's epoch never began).
    x, y = features()
    with pytest.warns(UserWarning, match=r"freeze_bn_epoch=5 never freezes in this fit.*epochs=2") as record:
        tfq.training.train_qat(dense_model(), x, y, epochs=2, verbose=0, freeze_bn_epoch=5, freeze_ranges_epoch=2)
    assert any("freeze_ranges_epoch=2 never freezes" in str(w.message) for w in record)
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        tfq.training.train_qat(dense_model(), x, y, epochs=0)


# --------------------------------------------------------------------------------------------
# Bools given as strings
# --------------------------------------------------------------------------------------------


def test_bool_options_refuse_strings():
    # Before: the string "False" is truthy and was read as True.
    model = dense_model()
    x, y = features()
    with pytest.raises(TypeError, match=r"warn_unknown must be True or False. Received: warn_unknown='False'"):
        tfq.qat.quantize_model(model, warn_unknown="False")
    with pytest.raises(TypeError, match=r"keep_observers must be True or False. Received: keep_observers='False'"):
        tfq.calibrate(model, x, "minmax", keep_observers="False")
    with pytest.raises(TypeError, match=r"relative must be True or False. Received: relative='False'"):
        tfq.tune(model, x, x, y, relative="False")
    from tfq.core.messages import check_bool

    assert check_bool("x", np.bool_(True)) is True


# --------------------------------------------------------------------------------------------
# Internal tracebacks → one line
# --------------------------------------------------------------------------------------------


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_calibrate_strategy_given_as_a_string():
    x, _ = features()
    with pytest.raises(TypeError) as err:  # before: AttributeError deep in the strategy code
        tfq.calibrate(dense_model(), x, "minmax", strategy="mirrored")
    assert "strategy must be a tf.distribute strategy" in one_line(err) and "'mirrored'" in one_line(err)


def test_embedding_index_out_of_range_names_sample_value_and_layer():
    inp = keras.Input((5,), dtype="int32", name="tokens")
    x = keras.layers.Flatten()(keras.layers.Embedding(10, 4, name="emb")(inp))
    model = keras.Model(inp, keras.layers.Dense(3)(x))
    data = np.zeros((20, 5), "int32")
    data[13, 2] = 12
    for call in (lambda: tfq.calibrate(model, data, "minmax"), lambda: tfq.convert(model, "int8", data)):
        with pytest.raises(ValueError) as err:  # before: InvalidArgumentError with a multi-line Keras message
            call()
        assert "sample 13 holds the index 12, outside [0, 10) of Embedding 'emb'" in one_line(err)


def test_saved_model_without_variables(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.export(str(tmp_path / "sm"), verbose=False)
    shutil.rmtree(tmp_path / "sm" / "variables")
    with pytest.raises(ValueError) as err:  # before: FileNotFoundError from TensorSliceReader, two lines
        tfq.convert(str(tmp_path / "sm"), "float")
    assert "is incomplete" in one_line(err) and "variables" in one_line(err)


def test_calibration_json_with_a_non_numeric_range(tmp_path):
    x, _ = features()
    path = tmp_path / "cal.json"
    tfq.calibrate(dense_model(), x, "minmax").save(path)
    d = json.loads(path.read_text())
    first = min(d["ranges"])
    d["ranges"][first] = ["0", "abc"]
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError) as err:  # before: TypeError from np.isfinite
        tfq.load_calibration(path)
    assert f"range for {first!r} must be [min, max]: numbers, finite" in one_line(err)
    assert "['0', 'abc']" in one_line(err)


def test_load_recipe_of_a_binary_file(tmp_path):
    for name in ("r.yaml", "r.json"):
        (tmp_path / name).write_bytes(bytes(range(256)) * 2)
        with pytest.raises(ValueError) as err:  # before: UnicodeDecodeError without the file
            tfq.load_recipe(tmp_path / name)
        assert str(tmp_path / name) in one_line(err) and "not a" in one_line(err)


# --------------------------------------------------------------------------------------------
# Faults and hostile input
# --------------------------------------------------------------------------------------------


def alias_bomb(levels: int) -> str:
    lines = ['l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    lines.append(f"mode: *l{levels - 1}")
    return "\n".join(lines) + "\n"


def test_recipe_of_nested_aliases_is_refused_small_and_fast(tmp_path):
    # 9⁶ = 531,441 values from 300 bytes: before, the message rendered them all (3 MB; the 9-level
    # file of the issue, 487 bytes, drove ~7 GB).
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(6))
    with pytest.raises(ValueError) as err:
        tfq.load_recipe(path)
    assert "aliases" in one_line(err) and len(one_line(err)) < 400
    path.write_text(alias_bomb(9))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="aliases"):
        tfq.load_recipe(path)
    assert time.perf_counter() - start < 5.0
    # A recursive alias (a list that holds itself) too.
    path.write_text("mode: &a [*a]\n")
    with pytest.raises(ValueError, match="aliases"):
        tfq.load_recipe(path)


def test_short_repr_never_renders_a_huge_value():
    from tfq.core.messages import short_repr

    leaf = list(range(10))
    huge = leaf
    for _ in range(7):
        huge = [huge] * 10  # 10⁸ leaves, shared
    start = time.perf_counter()
    text = short_repr(huge)
    assert time.perf_counter() - start < 0.5 and len(text) <= 80 and "too large" in text
    assert short_repr([1, 2]) == "[1, 2]"
    assert len(short_repr("x" * 10 ** 8)) == 80


def _tiny_digits_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((8, 8, 1), name="image"),
                             keras.layers.Conv2D(4, 3, activation="relu", name="c"),
                             keras.layers.Flatten(name="f"), keras.layers.Dense(10, activation="softmax", name="d")],
                            name="t")


def test_concurrent_converts_give_the_sequential_bytes(digits):
    # Before: 4 threads all failed ("MinMaxObserver has no statistics") or gave other bytes.
    (x, _), _ = digits
    model = _tiny_digits_model()
    sequential = tfq.convert(model, "int8", x[:64])
    results, errors = {}, {}

    def work(i):
        try:
            results[i] = tfq.convert(model, "int8", x[:64])
        except Exception as e:  # noqa: BLE001 - reported below
            errors[i] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == {}
    assert {i: hashlib.sha256(b).hexdigest() for i, b in results.items()} == \
        {i: hashlib.sha256(sequential).hexdigest() for i in range(4)}


def _attention_model(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8), name="rows")
    h = keras.layers.Dense(8, name="embed")(inp)
    a = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")(h, h)
    h = keras.layers.LayerNormalization(name="ln")(keras.layers.Add(name="res")([h, a]))
    out = keras.layers.Dense(10, activation="softmax", name="probs")(keras.layers.GlobalAveragePooling1D()(h))
    return keras.Model(inp, out, name="attn")


def test_attention_model_converts_to_the_same_bytes_twice(digits):
    # Before: the inlined attention op was named from Keras' global counter (dot_product_attention_2 …),
    # so a second conversion in the process wrote other tensor names.
    (x, _), _ = digits
    x = x[:32].reshape(32, 8, 8)
    model = _attention_model()
    first = tfq.convert(model, "int8", x)
    _attention_model(seed=1)  # another model built in between moves Keras' name counters
    second = tfq.convert(model, "int8", x)
    assert first == second


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def test_atomic_writes_respect_the_umask_and_an_existing_mode(tmp_path, umask):
    from tfq.core.fileio import atomic_write_bytes

    # Before: always 0644.
    umask(0o077)
    atomic_write_bytes(tmp_path / "private.bin", b"x")
    assert oct(os.stat(tmp_path / "private.bin").st_mode & 0o777) == oct(0o600)
    umask(0o022)
    atomic_write_bytes(tmp_path / "public.bin", b"x")
    assert oct(os.stat(tmp_path / "public.bin").st_mode & 0o777) == oct(0o644)
    os.chmod(tmp_path / "public.bin", 0o640)
    atomic_write_bytes(tmp_path / "public.bin", b"y")  # an existing file keeps its mode
    assert oct(os.stat(tmp_path / "public.bin").st_mode & 0o777) == oct(0o640)
    assert (tmp_path / "public.bin").read_bytes() == b"y"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["private.bin", "public.bin"]  # no temp file left


def test_endless_generator_is_capped_with_a_warning(monkeypatch):
    from tfq.core import representative

    monkeypatch.setattr(representative, "STREAM_SAMPLE_CAP", 40)
    read = []

    def endless():
        rng = np.random.default_rng(0)
        while True:
            read.append(1)
            if len(read) > 5000:  # before: read for ever (a guard so the old code fails instead of hanging)
                raise RuntimeError("the generator was read past any cap")
            yield [rng.normal(size=(1, 8)).astype("float32")]

    model = dense_model()
    with pytest.warns(UserWarning, match=r"more than 40 samples.*num_calibration_samples"):
        cal = tfq.calibrate(model, endless, "minmax")
    assert cal.num_samples == 40
    # The same 40 samples as an explicit cap gives the same ranges.
    again = tfq.calibrate(model, endless, "minmax", num_samples=40)
    assert cal.ranges == again.ranges
    # A generator that ends before the cap: all of it, no warning.
    x, _ = features(7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tfq.calibrate(model, lambda: ([x[i:i + 1]] for i in range(7)), "minmax").num_samples == 7


def test_evaluate_refuses_nan_samples_naming_them():
    model = dense_model()
    x, y = features(20)
    x[[2, 5]] = np.nan
    with pytest.raises(ValueError) as err:  # before: figures computed over NaN outputs, no word
        tfq.evaluate({"keras": model}, x, y)
    assert "2 sample(s) with NaN or Inf (indices 2, 5)" in one_line(err)
