"""Clustering: k-means against hand-computed clusters, training keeps the shared values, strip, serialization."""

import keras
import numpy as np
import pytest

from tfq import clustering


def test_kmeans_1d_by_hand():
    values = np.array([0.0, 0.1, 0.2, 5.0, 5.2, 9.9, 10.0, 10.1])
    centroids, idx = clustering.kmeans_1d(values, 3, "kmeans++", seed=0)
    np.testing.assert_allclose(centroids, [0.1, 5.1, 10.0])
    assert idx.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    lin_c, lin_idx = clustering.kmeans_1d(values, 3, "linear")
    np.testing.assert_allclose(lin_c, [0.0, 5.05, 10.1])
    assert lin_idx.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    # Fewer distinct values than clusters: the values themselves.
    c, i = clustering.kmeans_1d(np.array([3.0, 1.0, 3.0]), 4)
    assert np.unique(c).tolist() == [1.0, 3.0] and c[i].tolist() == [3.0, 1.0, 3.0]
    # Deterministic for a seed.
    rng = np.random.default_rng(0).normal(size=500)
    a, b = clustering.kmeans_1d(rng, 8, seed=3), clustering.kmeans_1d(rng, 8, seed=3)
    np.testing.assert_array_equal(a[0], b[0])
    # Lloyd's fixed point: every centroid is the mean of its members, and each value is nearest to its own.
    c, i = a
    for k in range(8):
        if np.any(i == k):
            assert c[k] == pytest.approx(rng[i == k].mean())
    assert np.all(np.abs(rng - c[i]) <= np.abs(rng[:, None] - c[None, :]).min(1) + 1e-12)
    with pytest.raises(ValueError, match="init must be one of"):
        clustering.kmeans_1d(rng, 4, "density")


def small_model():
    inp = keras.Input((8,), name="x")
    h = keras.layers.Dense(32, activation="relu", name="d1")(inp)
    out = keras.layers.Dense(3, name="d2")(h)
    return keras.Model(inp, out, name="small")


def test_cluster_train_strip_and_reload(tmp_path):
    keras.utils.set_random_seed(0)
    model = small_model()
    original = [w.copy() for w in model.get_weights()]
    clustered = clustering.cluster_weights(model, number_of_clusters=4, skip_layers=["d2"])
    assert [w.name for w in clustering.clustered_layers_of(clustered)] == ["d1"]
    wrapper = clustered.get_layer("d1")
    before = wrapper.cluster_centroids.numpy().copy()
    # The k-means solution: each weight replaced by its cluster's mean.
    kernel = model.get_layer("d1").kernel.numpy()
    idx = wrapper.cluster_indices.numpy()
    for k in range(4):
        assert before[k] == pytest.approx(kernel[idx == k].mean(), abs=1e-6)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    clustered.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    clustered.fit(x, y, epochs=2, batch_size=16, verbose=0)
    after = wrapper.cluster_centroids.numpy()
    assert not np.allclose(before, after)  # the centroids train …
    np.testing.assert_array_equal(wrapper.cluster_indices.numpy(), idx)  # … the assignment stays
    stripped = clustering.strip_clustering(clustered)
    d1 = stripped.get_layer("d1").kernel.numpy()
    assert len(np.unique(d1)) <= 4 and np.allclose(np.sort(np.unique(d1)), np.sort(np.unique(after)))
    np.testing.assert_allclose(stripped.predict(x, verbose=0), clustered.predict(x, verbose=0), atol=1e-6)
    assert len(np.unique(stripped.get_layer("d2").kernel.numpy())) == 96  # skipped: untouched count
    for a, b in zip(model.get_weights(), original):  # the caller's model is untouched
        np.testing.assert_array_equal(a, b)
    config = wrapper.get_config()
    assert clustering.ClusterWeights.from_config(config).get_config() == config
    path = tmp_path / "clustered.keras"
    clustered.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), clustered.predict(x, verbose=0), atol=1e-6)
    assert not loaded.get_layer("d1").layer.kernel.trainable


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(number_of_clusters=1), ValueError, "number_of_clusters must be an integer in"),
    (dict(number_of_clusters=300), ValueError, "number_of_clusters must be an integer in"),
    (dict(init="random"), ValueError, "init must be one of"),
    (dict(layers=["nope"]), ValueError, "matches no layer"),
])
def test_bad_arguments_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        clustering.cluster_weights(small_model(), **kwargs)


def test_preserving_qat_on_a_conv_bn_model_keeps_zeros_and_values_per_channel():
    """Both preserve modes through BN folding and per-channel INT8, read back through LiteRT's interpreter."""
    from ai_edge_litert.interpreter import Interpreter

    import tfq

    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    out = keras.layers.Dense(3, activation="softmax", name="head")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    x_data = rng.normal(size=(64, 6, 6, 2)).astype("float32")
    y_data = rng.integers(0, 3, 64)
    kernel = model.get_layer("conv").kernel.numpy()
    kernel[np.abs(kernel) < np.quantile(np.abs(kernel), 0.6)] = 0.0  # 60 % zeros
    model.get_layer("conv").kernel.assign(kernel)
    clustered = clustering.strip_clustering(clustering.cluster_weights(model, 5, layers=["head"]))
    for preserve, source in (("sparsity", model), ("clusters", clustered)):
        qat = tfq.qat.quantize_model(source, calibration_data=x_data, preserve=preserve)
        qat.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
        qat.fit(x_data, y_data, epochs=1, batch_size=16, verbose=0)  # BN statistics and weights move
        content = tfq.convert(qat, "int8")
        info = tfq.inspect_tflite(content)
        interp = Interpreter(model_content=content)
        interp.allocate_tensors()
        read = {("conv" if w.shape[0] == 8 else "head"): interp.get_tensor(w.tensor) for w in info.weights}
        if preserve == "sparsity":
            conv = np.transpose(read["conv"], (1, 2, 3, 0))  # (out, h, w, in) → Keras (h, w, in, out)
            assert np.all(conv[kernel == 0] == 0) and np.mean(conv == 0) == pytest.approx(np.mean(kernel == 0))
        else:
            assert max(len(np.unique(row)) for row in read["head"]) <= 5  # Dense: per output channel
            assert info.max_distinct_per_channel == max(len(np.unique(read["conv"][c])) for c in range(8))
    # Without preserve, the same training moves the zeros: the checks above can fail.
    qat = tfq.qat.quantize_model(model, calibration_data=x_data)
    qat.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    qat.fit(x_data, y_data, epochs=1, batch_size=16, verbose=0)
    w = next(w for w in tfq.inspect_tflite(tfq.convert(qat, "int8")).weights if w.shape[0] == 8)
    assert w.sparsity < 0.5
