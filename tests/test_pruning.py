"""Pruning: schedules and masks against hand-computed values, training, strip, serialization, selection."""

import math

import keras
import numpy as np
import pytest

import tfq
from tfq import callbacks, pruning


# --------------------------------------------------------------------------------------------
# Schedules and masks (no training)
# --------------------------------------------------------------------------------------------


def test_polynomial_schedule_matches_formula():
    s = pruning.PolynomialDecay(0.1, 0.8, begin_step=10, end_step=30, power=3, frequency=5)
    for step in (0, 10, 15, 20, 29, 30, 100):
        p = min(max((step - 10) / 20, 0.0), 1.0)
        assert s.sparsity_at(step) == pytest.approx(0.8 + (0.1 - 0.8) * (1 - p) ** 3)
    import tensorflow as tf

    updates = [t for t in range(0, 40) if bool(s.tf_should_update(tf.constant(t, tf.int64), tf.constant(30, tf.int64)))]
    assert updates == [10, 15, 20, 25, 30]
    assert float(s.tf_sparsity(tf.constant(20, tf.int64), tf.constant(30, tf.int64))) == pytest.approx(s.sparsity_at(20))


def test_end_step_is_an_update_step_even_off_the_frequency():
    import tensorflow as tf

    s = pruning.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=7, frequency=3)
    assert [t for t in range(12) if bool(s.tf_should_update(tf.constant(t, tf.int64), tf.constant(7, tf.int64)))] \
        == [0, 3, 6, 7]
    c = pruning.ConstantSparsity(0.5, begin_step=2, frequency=4)
    assert [t for t in range(12) if bool(c.tf_should_update(tf.constant(t, tf.int64), tf.constant(-1, tf.int64)))] \
        == [2, 6, 10]


@pytest.mark.parametrize("kwargs, message", [
    (dict(initial_sparsity=0.9, final_sparsity=0.5), "initial_sparsity must be <="),
    (dict(final_sparsity=1.0), "final_sparsity must be a number in [0, 1)"),
    (dict(begin_step=5, end_step=2), "end_step must be >= begin_step"),
    (dict(frequency=0), "frequency must be an integer >= 1"),
    (dict(power=0), "power must be a number > 0"),
])
def test_bad_schedules_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
        pruning.PolynomialDecay(**kwargs)


def test_schedule_dict_round_trip():
    for s in (pruning.PolynomialDecay(0.1, 0.7, 3, 40, 2.0, 7), pruning.ConstantSparsity(0.6, 5, None, 9)):
        assert pruning.schedule_from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="unknown polynomial schedule key"):
        pruning.schedule_from_dict({"kind": "polynomial", "final": 0.5})


def test_magnitude_mask_by_hand():
    w = np.array([[0.3, -0.1, 2.0], [-0.05, 0.7, -0.4]], np.float32)
    # |w| sorted: 0.05, 0.1, 0.3, 0.4, 0.7, 2.0 → 50 % drops the three smallest.
    np.testing.assert_array_equal(pruning.magnitude_mask(w, 0.5).numpy(), [[0, 0, 1], [0, 1, 1]])
    assert pruning.magnitude_mask(w, 0.0).numpy().sum() == 6
    # Ties: exactly round(s·n) zeros, lowest flat index first.
    np.testing.assert_array_equal(pruning.magnitude_mask(np.ones((2, 2), np.float32), 0.5).numpy(), [[0, 0], [1, 1]])
    # A 4-D kernel is seen as (kh·kw·in, out).
    k = np.arange(1, 17, dtype=np.float32).reshape(2, 2, 2, 2)
    m = pruning.magnitude_mask(k, 0.25).numpy()
    assert m.shape == k.shape and m.sum() == 12 and (m.reshape(-1)[:4] == 0).all()


def test_block_mask_drops_whole_blocks_by_mean_magnitude():
    w = np.array([[1, 1, 9, 9],
                  [1, 1, 9, 9],
                  [5, 5, 0.1, 0.1],
                  [5, 5, 0.1, 0.1]], np.float32)
    m = pruning.magnitude_mask(w, 0.5, (2, 2)).numpy()
    np.testing.assert_array_equal(m, [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]])
    # A shape that is not a multiple of the block: padded blocks, cropped mask.
    w3 = np.arange(1, 10, dtype=np.float32).reshape(3, 3)
    m3 = pruning.magnitude_mask(w3, 0.25, (2, 2)).numpy()  # blocks' means: 3, 1.5 (3,6 → /4), 4.5·…; one of 4 dropped
    scores = [(1 + 2 + 4 + 5) / 4, (3 + 6) / 4, (7 + 8) / 4, 9 / 4]
    dropped = int(np.argmin(scores))
    expected = np.ones((4, 4))
    expected[2 * (dropped // 2):2 * (dropped // 2) + 2, 2 * (dropped % 2):2 * (dropped % 2) + 2] = 0
    np.testing.assert_array_equal(m3, expected[:3, :3])


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def small_model(name="small"):
    inp = keras.Input((8,), name="x")
    h = keras.layers.Dense(16, activation="relu", name="d1")(inp)
    out = keras.layers.Dense(3, name="d2")(h)
    return keras.Model(inp, out, name=name)


def data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    return x, (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0).astype("int32")


class _SparsityPerStep(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append({w.name: w.sparsity for w in pruning.pruned_layers_of(self.model)})


def test_sparsity_follows_the_schedule_step_by_step():
    keras.utils.set_random_seed(0)
    model = small_model()
    pruned = pruning.prune_low_magnitude(model, 0.75, begin_step=1, end_step=7, frequency=3)
    pruned.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    rec = _SparsityPerStep()
    history = pruned.fit(x, y, batch_size=32, epochs=3, verbose=0, shuffle=False,
                         callbacks=[callbacks.UpdatePruningStep(), callbacks.PruningSummaries(), rec])
    schedule = pruning.PolynomialDecay(0.0, 0.75, 1, 7, 3.0, 3)
    level = 0.0
    for step, seen in enumerate(rec.seen):  # 3 steps per epoch, 9 steps
        if step in (1, 4, 7):
            level = schedule.sparsity_at(step)
        for name, size in (("d1", 8 * 16), ("d2", 16 * 3)):
            assert seen[name] == pytest.approx(round(level * size) / size), (step, name)
    assert rec.seen[7]["d1"] == 0.75 and rec.seen[-1]["d2"] == 0.75  # reached at the scheduled step
    assert history.history["sparsity/d1"] == pytest.approx([rec.seen[i]["d1"] for i in (2, 5, 8)])
    assert history.history["sparsity"][-1] == pytest.approx(0.75)
    # The weights themselves hold the zeros after fit, and the caller's model is untouched.
    d1 = pruned.get_layer("d1")
    kernel = keras.ops.convert_to_numpy(d1.layer.kernel)
    np.testing.assert_array_equal(kernel == 0, keras.ops.convert_to_numpy(d1.pruning_mask) == 0)
    assert np.count_nonzero(model.get_layer("d1").kernel.numpy() == 0) == 0


def test_open_ended_polynomial_ends_at_60_percent_of_the_first_fit():
    # Issue 29: the end used to be the last step of the fit (no step left to recover at the final masks).
    model = small_model()
    pruned = pruning.prune_low_magnitude(model, 0.5, frequency=100)
    pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    rec = _SparsityPerStep()
    pruned.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[callbacks.UpdatePruningStep(), rec])
    # 2 epochs × 3 steps: the end is round(0.6 · 6) − 1 = step 3; steps 4 and 5 train at the final masks.
    assert int(pruned.get_layer("d1").end_step.numpy()) == 3
    assert rec.seen[2]["d1"] == 0.0 and rec.seen[3]["d1"] == 0.5  # only steps 0 and 3 update
    assert rec.seen[5]["d1"] == 0.5


def test_fit_without_the_callback_is_refused():
    pruned = pruning.prune_low_magnitude(small_model(), 0.5, end_step=4)
    pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    with pytest.raises(Exception, match="UpdatePruningStep"):
        pruned.fit(x, y, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="has no pruned layer"):
        model = small_model()
        model.compile("adam", "mse")
        model.fit(x, y[:, None].astype("float32"), epochs=1, verbose=0, callbacks=[callbacks.UpdatePruningStep()])


def test_pruned_weights_get_no_gradient_and_strip_keeps_zeros(tmp_path):
    keras.utils.set_random_seed(1)
    pruned = pruning.prune_low_magnitude(small_model(), 0.6, "constant", frequency=1000)
    pruned.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    pruned.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[callbacks.UpdatePruningStep()])
    stripped = pruning.strip_pruning(pruned)
    assert all(type(layer).__name__ != "PruneLowMagnitude" for layer in stripped.layers)
    sparsity = pruning.sparsity_of(stripped)
    assert sparsity["d1"] == pytest.approx(round(0.6 * 128) / 128) and sparsity["d2"] == pytest.approx(round(0.6 * 48) / 48)
    # The masked computation: same outputs as x @ (W·mask) + b, computed here with numpy.
    d1, d2 = stripped.get_layer("d1"), stripped.get_layer("d2")
    h = np.maximum(x @ d1.kernel.numpy() + d1.bias.numpy(), 0)
    np.testing.assert_allclose(pruned.predict(x, verbose=0), h @ d2.kernel.numpy() + d2.bias.numpy(), atol=1e-5)
    np.testing.assert_allclose(stripped.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-6)
    path = tmp_path / "stripped.keras"
    stripped.save(path)
    assert pruning.sparsity_of(keras.models.load_model(path)) == sparsity


def test_wrapper_config_and_keras_file_round_trip(tmp_path):
    pruned = pruning.prune_low_magnitude(small_model(), 0.5, "constant", frequency=1, block_size=(1, 2))
    pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    pruned.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[callbacks.UpdatePruningStep()])
    wrapper = pruned.get_layer("d1")
    config = wrapper.get_config()
    again = pruning.PruneLowMagnitude.from_config(config)
    assert again.get_config() == config and again.schedule == wrapper.schedule and again.block_size == (1, 2)
    path = tmp_path / "pruned.keras"
    pruned.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.get_layer("d1").pruning_mask.numpy(), wrapper.pruning_mask.numpy())
    assert int(loaded.get_layer("d1").pruning_step.numpy()) == int(wrapper.pruning_step.numpy()) == 2
    np.testing.assert_allclose(loaded.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-6)
    # (1, 2) blocks: the mask is constant over each pair of output columns.
    mask = wrapper.pruning_mask.numpy()
    assert (mask[:, 0::2] == mask[:, 1::2]).all() and mask.mean() == 0.5


def test_nested_models_and_layer_selection():
    inner_in = keras.Input((6, 6, 1))
    c = keras.layers.Conv2D(4, 3, name="first_conv")(inner_in)
    c = keras.layers.BatchNormalization(name="bn")(c)
    c = keras.layers.DepthwiseConv2D(3, name="dw")(c)
    base = keras.Model(inner_in, c, name="base")
    inp = keras.Input((6, 6, 1))
    h = keras.layers.Flatten()(base(inp))
    out = keras.layers.Dense(2, name="head")(h)
    model = keras.Model(inp, out)
    pruned = pruning.prune_low_magnitude(model, 0.5, skip_layers=["first_conv"])
    names = {w.name for w in pruning.pruned_layers_of(pruned)}
    assert names == {"dw", "head"}
    assert {w.name for w in pruning.pruned_layers_of(pruning.prune_low_magnitude(model, layers=["class:Dense"]))} == {"head"}
    assert {w.name for w in pruning.pruned_layers_of(pruning.prune_low_magnitude(model, layers=["first_.*", "dw"]))} \
        == {"first_conv", "dw"}
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 1)).astype("float32")
    np.testing.assert_allclose(pruned.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    with pytest.raises(ValueError, match="matches no layer"):
        pruning.prune_low_magnitude(model, skip_layers=["conv_one"])
    with pytest.raises(ValueError, match="has no weight to compress"):
        pruning.prune_low_magnitude(model, layers=["bn"])
    assert {w.name for w in pruning.pruned_layers_of(pruning.prune_low_magnitude(model, layers=[".*"]))} \
        == {"first_conv", "dw", "head"}  # a regex over every layer skips those with nothing to prune
    with pytest.raises(ValueError, match="already has pruning/clustering wrappers"):
        pruning.prune_low_magnitude(pruned)
    with pytest.raises(ValueError, match="would be ignored"):
        pruning.prune_low_magnitude(model, 0.5, schedule=pruning.ConstantSparsity(0.5))
    with pytest.raises(ValueError, match="schedule must be one of"):
        pruning.prune_low_magnitude(model, schedule="cubic")


def test_steps_per_execution_refused():
    pruned = pruning.prune_low_magnitude(small_model(), 0.5, end_step=3)
    pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), steps_per_execution=2)
    x, y = data()
    with pytest.raises(ValueError, match="steps_per_execution=1"):
        pruned.fit(x, y, epochs=1, verbose=0, callbacks=[callbacks.UpdatePruningStep()])


def test_convert_strips_a_wrapped_model_and_reports_the_zeros():
    """tfq.convert takes the wrapped model; inspect and evaluate read the zeros back from the file."""
    keras.utils.set_random_seed(2)
    pruned = pruning.prune_low_magnitude(small_model(), 0.75, "constant", frequency=1000)
    pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    pruned.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[callbacks.UpdatePruningStep()])
    content = tfq.convert(pruned, "int8", x)
    info = tfq.inspect_tflite(content)
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=content)
    interp.allocate_tensors()
    read = {w.tensor: interp.get_tensor(w.tensor) for w in info.weights}
    assert len(read) == 2 and sorted(v.size for v in read.values()) == [48, 128]
    zeros = sum(int(np.count_nonzero(v == 0)) for v in read.values())
    assert info.weight_sparsity == pytest.approx(zeros / 176) and zeros == 96 + 36
    import gzip

    assert info.gzip_size == len(gzip.compress(content, 9, mtime=0)) < info.size
    report = tfq.evaluate({"pruned": pruned, "int8": content}, x, y, latency=False)
    row = report.row("int8")
    assert row["gzip_size"] == info.gzip_size and row["weight_sparsity"] == pytest.approx(zeros / 176)
    keras_row = report.row("pruned")
    assert keras_row["weight_sparsity"] == pytest.approx(0.75) and keras_row["size"] == (8 * 16 + 16 + 16 * 3 + 3) * 4
    assert "gzip (KB)" in report.to_markdown() and "75.0%" in report.to_markdown()
    assert math.isclose(pruning.sparsity_of(pruned)["total"], 0.75)
