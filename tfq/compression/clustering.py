"""Weight clustering (weight sharing) for Keras 3 models.

:func:`cluster_weights` returns a new model whose chosen layers are wrapped in
:class:`ClusterWeights`: each compressed weight is replaced by ``centroids[indices]``, with
``number_of_clusters`` trainable centroids per weight and a fixed assignment of every weight to one
of them (Han et al. 2016, "Deep Compression", §3). Training with ``fit`` moves the centroids (each
gets the sum of its members' gradients); :func:`strip_clustering` returns the plain model whose
weights hold at most ``number_of_clusters`` distinct values per layer. Per-channel INT8
quantization then keeps at most that many distinct int8 values per output channel (a channel's
values are a subset of the centroids, and quantization maps equal values to equal integers);
:func:`tfq.qat.quantize_model` with ``preserve="clusters"`` keeps this through QAT.

Example:
    >>> clustered = tfq.clustering.cluster_weights(model, number_of_clusters=16)   # doctest: +SKIP
    >>> clustered.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy")  # doctest: +SKIP
    >>> clustered.fit(x, y, epochs=2)                                              # doctest: +SKIP
    >>> tflite = tfq.convert(tfq.clustering.strip_clustering(clustered), "int8", x[:300])  # doctest: +SKIP
"""

from __future__ import annotations

import numbers

import keras
import numpy as np
import tensorflow as tf

from tfq.compression import common as _compression

__all__ = ["ClusterWeights", "INITS", "cluster_weights", "clustered_layers_of", "kmeans_1d", "strip_clustering"]

INITS = ("kmeans++", "linear")
_LLOYD_ITERATIONS = 30


def _check_clusters(number_of_clusters) -> int:
    if isinstance(number_of_clusters, bool) or not isinstance(number_of_clusters, (int, np.integer)) \
            or not 2 <= number_of_clusters <= 256:
        raise ValueError(f"number_of_clusters must be an integer in [2, 256] (int8 holds 255 values). "
                         f"Received: number_of_clusters={number_of_clusters!r}")
    return int(number_of_clusters)


def _assign(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for each value (centroids sorted ascending; ties go lower)."""
    midpoints = (centroids[1:] + centroids[:-1]) / 2.0
    return np.searchsorted(midpoints, values, side="right").astype(np.int32) if len(centroids) > 1 \
        else np.zeros(values.shape, np.int32)


def kmeans_1d(values, k: int, init: str = "kmeans++", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clusters scalars into ``k`` groups: ``(centroids ascending, index of each value's centroid)``.

    ``init="linear"``: centroids evenly spaced over ``[min, max]``, each value assigned to the
    nearest (no iterations; training moves the centroids). ``init="kmeans++"``: k-means++ seeding
    (Arthur & Vassilvitskii 2007; each next seed drawn with probability ∝ squared distance to the
    nearest chosen one, from ``numpy.random.default_rng(seed)``), then up to 30 Lloyd iterations
    (assign to nearest, centroid ← mean of its values; an emptied cluster keeps its centroid).
    With fewer distinct values than ``k``, the distinct values are the centroids.

    Example:
        >>> c, i = kmeans_1d(np.array([0.0, 0.1, 1.0, 1.1]), 2)
        >>> c.round(2).tolist(), i.tolist()
        ([0.05, 1.05], [0, 0, 1, 1])
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}. Received: init={init!r}")
    v = np.asarray(values, np.float64).ravel()
    if v.size == 0:
        raise ValueError("kmeans_1d needs at least one value. Received: an empty array")
    distinct = np.unique(v)
    if len(distinct) <= k:
        centroids = np.concatenate([distinct, np.full(k - len(distinct), distinct[-1])])
        return centroids, np.searchsorted(distinct, v).astype(np.int32)
    if init == "linear":
        centroids = np.linspace(v.min(), v.max(), k)
        return centroids, _assign(v, centroids)
    rng = np.random.default_rng(seed)
    seeds = [v[rng.integers(v.size)]]
    d2 = (v - seeds[0]) ** 2
    for _ in range(1, k):
        total = d2.sum()
        pick = rng.choice(v.size, p=d2 / total) if total > 0 else rng.integers(v.size)
        seeds.append(v[pick])
        d2 = np.minimum(d2, (v - v[pick]) ** 2)
    centroids = np.sort(np.asarray(seeds))
    for _ in range(_LLOYD_ITERATIONS):
        idx = _assign(v, centroids)
        sums = np.bincount(idx, weights=v, minlength=k)
        counts = np.bincount(idx, minlength=k)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        order = np.argsort(new, kind="stable")
        new = new[order]
        if np.allclose(new, centroids, rtol=0, atol=1e-12):
            centroids = new
            break
        centroids = new
    return centroids, _assign(v, centroids)


@keras.saving.register_keras_serializable(package="tfq")
class ClusterWeights(_compression.CompressionWrapper):
    """A layer whose main weight is ``cluster_centroids[cluster_indices]``.

    ``cluster_centroids`` (``number_of_clusters`` values) are trainable; ``cluster_indices`` (the
    weight's shape, int32) are fixed when the wrapper is made (:meth:`initialize`, by
    :func:`kmeans_1d`); the original weight is kept but no longer trained. The gradient of a
    centroid is the sum of the gradients of the weights that share it.

    Args:
        layer: the layer to cluster (used as is: pass a copy).
        number_of_clusters: centroids per weight, 2..256.
        init: ``"kmeans++"`` or ``"linear"`` (see :func:`kmeans_1d`).
        seed: seed of the k-means++ draw.
    """

    def __init__(self, layer, number_of_clusters: int = 16, init: str = "kmeans++", seed: int = 0, **kwargs):
        super().__init__(layer, **kwargs)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}. Received: init={init!r}")
        self.number_of_clusters = _check_clusters(number_of_clusters)
        self.init = init
        self.seed = int(seed)

    def build(self, input_shape):
        super().build(input_shape)
        main = self.main_weight
        main.trainable = False  # trained through the centroids
        self.cluster_centroids = self.add_weight(name="cluster_centroids", shape=(self.number_of_clusters,),
                                                 initializer="zeros", trainable=True, dtype=main.dtype)
        self.cluster_indices = self.add_weight(name="cluster_indices", shape=tuple(main.shape), dtype="int32",
                                               initializer="zeros", trainable=False)

    def initialize(self) -> None:
        """Clusters the current weight: sets the centroids and the indices."""
        values = keras.ops.convert_to_numpy(self.main_weight)
        centroids, indices = kmeans_1d(values, self.number_of_clusters, self.init, self.seed)
        self.cluster_centroids.assign(centroids.astype(values.dtype))
        self.cluster_indices.assign(indices.reshape(values.shape))

    def effective_weight(self, training=None):
        return tf.gather(tf.convert_to_tensor(self.cluster_centroids), tf.convert_to_tensor(self.cluster_indices))

    def get_config(self):
        config = super().get_config()
        config.update(number_of_clusters=self.number_of_clusters, init=self.init, seed=self.seed)
        return config


def cluster_weights(
    model,
    number_of_clusters: int = 16,
    init: str = "kmeans++",
    *,
    layers=None,
    skip_layers=(),
    seed: int = 0,
) -> keras.Model:
    """Returns a new model whose weights share ``number_of_clusters`` trainable values per layer.

    Fine-tune it with ``fit`` (a small learning rate: the centroids start at the k-means solution),
    then :func:`strip_clustering`. The caller's model is untouched.

    Args:
        model: a built Functional or Sequential Keras 3 model (nested models allowed), a tf_keras
            model, or a path.
        number_of_clusters: distinct values per clustered weight, 2..256.
        init: ``"kmeans++"`` (k-means with k-means++ seeding) or ``"linear"`` (evenly spaced).
        layers: names, regexes, ``"class:Name"`` patterns or classes of the layers to cluster
            (default: every Dense, EinsumDense, convolution and Embedding).
        skip_layers: the same, for layers left as they are.
        seed: seed of the k-means++ draw (same seed, same clusters).

    Returns:
        A new ``keras.Model`` with :class:`ClusterWeights` wrappers (same layer names).

    Raises:
        ValueError: bad ``number_of_clusters``/``init``, a pattern that matches no layer, nothing to
            cluster, an already pruned or clustered model.

    Example:
        >>> clustered = cluster_weights(model, 16, "kmeans++", skip_layers=["conv1"])   # doctest: +SKIP
    """

    k = _check_clusters(number_of_clusters)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int. Received: seed={seed!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}. Received: init={init!r}")
    model = _compression.load_plain_model(model, "cluster_weights")
    selected = _compression.layer_selector(model, layers, skip_layers, "cluster_weights")
    clustered = _compression.wrap_model(model, selected, lambda layer: ClusterWeights(layer, k, init, seed))
    if not clustered_layers_of(clustered):
        raise ValueError(f"cluster_weights: no layer of model {model.name!r} to cluster (layers={layers!r}, "
                         f"skip_layers={skip_layers!r}).")
    return clustered


def clustered_layers_of(model) -> list[ClusterWeights]:
    """Every :class:`ClusterWeights` wrapper of ``model`` (nested models included)."""
    return _compression.wrappers_of(model, ClusterWeights)


def strip_clustering(model) -> keras.Model:
    """A plain Keras model whose clustered weights hold ``centroids[indices]``; the caller's is untouched.

    Example:
        >>> final = strip_clustering(clustered)   # doctest: +SKIP
        >>> len(np.unique(final.get_layer("fc1").kernel.numpy()))   # doctest: +SKIP
        16
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"strip_clustering expects a keras.Model. Received: {type(model).__name__}")
    return _compression.strip_model(model, ClusterWeights)
