"""Small example models on the packaged digits, used by the quickstart, tests and benchmark.

Example:
    >>> model, (x_test, y_test) = train_digits_cnn(epochs=8)    # doctest: +SKIP
"""

from __future__ import annotations

import keras

from tfq.datasets import load_digits

__all__ = ["PositionEmbedding", "digits_cnn", "digits_lstm", "digits_transformer", "mobilenet_style",
           "train_digits_cnn", "train_model", "unbalance_channels"]


def digits_cnn(input_shape=(8, 8, 1), num_classes: int = 10, name: str = "digits_cnn", keras_module=None):
    """Conv-BN-ReLU ×2, max-pool, Dense-ReLU, Dense-softmax: a classic small CNN (~150k weights).

    ``keras_module`` builds the same architecture with another Keras (e.g. ``tf_keras``).
    """
    km = keras_module or keras
    inputs = km.Input(input_shape, name="image")
    x = km.layers.Conv2D(32, 3, padding="same", use_bias=False, name="conv1")(inputs)
    x = km.layers.BatchNormalization(name="bn1")(x)
    x = km.layers.ReLU(name="relu1")(x)
    x = km.layers.Conv2D(64, 3, padding="same", use_bias=False, name="conv2")(x)
    x = km.layers.BatchNormalization(name="bn2")(x)
    x = km.layers.ReLU(name="relu2")(x)
    x = km.layers.MaxPooling2D(name="pool")(x)
    x = km.layers.Flatten(name="flatten")(x)
    x = km.layers.Dense(128, activation="relu", name="fc1")(x)
    x = km.layers.Dropout(0.2, name="dropout")(x)
    outputs = km.layers.Dense(num_classes, activation="softmax", name="probs")(x)
    return km.Model(inputs, outputs, name=name)


def mobilenet_style(input_shape=(32, 32, 1), num_classes: int = 10, width: int = 16,
                    name: str = "mobilenet_style", keras_module=None, relu_max: float | None = 6.0):
    """A MobileNet-like stack: depthwise-separable blocks with BN and ReLU6, global pooling.

    ``keras_module`` builds the same architecture with another Keras (e.g. ``tf_keras``);
    ``relu_max=None`` uses plain ReLU instead of ReLU6 (positively homogeneous, so channels can be
    rescaled without changing the function: see :func:`unbalance_channels`).
    """
    km = keras_module or keras
    inputs = km.Input(input_shape, name="image")
    x = km.layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False, name="stem")(inputs)
    x = km.layers.BatchNormalization(name="stem_bn")(x)
    x = km.layers.ReLU(relu_max, name="stem_relu")(x)
    for i, (filters, stride) in enumerate([(2 * width, 1), (4 * width, 2), (4 * width, 1), (8 * width, 2)]):
        x = km.layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"dw{i}")(x)
        x = km.layers.BatchNormalization(name=f"dw{i}_bn")(x)
        x = km.layers.ReLU(relu_max, name=f"dw{i}_relu")(x)
        x = km.layers.Conv2D(filters, 1, use_bias=False, name=f"pw{i}")(x)
        x = km.layers.BatchNormalization(name=f"pw{i}_bn")(x)
        x = km.layers.ReLU(relu_max, name=f"pw{i}_relu")(x)
    x = km.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = km.layers.Dense(num_classes, activation="softmax", name="probs")(x)
    return km.Model(inputs, outputs, name=name)


@keras.saving.register_keras_serializable(package="tfq_examples")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned vector per position: ``y[:, t] = x[:, t] + p[t]`` (a user-style custom layer)."""

    def build(self, input_shape):
        self.position = self.add_weight(name="position", shape=tuple(input_shape[1:]),
                                        initializer=keras.initializers.RandomNormal(stddev=0.02))

    def call(self, x):
        return x + self.position


def digits_transformer(input_shape=(8, 8), num_classes: int = 10, dim: int = 32, heads: int = 4,
                       depth: int = 2, name: str = "digits_transformer"):
    """A small pre-norm transformer encoder reading a digit's 8 pixel rows as 8 tokens.

    Token projection (Dense), learned position embedding, ``depth`` blocks of
    LayerNormalization → MultiHeadAttention → residual add → LayerNormalization → Dense-GELU →
    Dense → residual add, a final LayerNormalization, mean over tokens and a softmax head.
    """
    inputs = keras.Input(input_shape, name="rows")
    x = keras.layers.Dense(dim, name="embed")(inputs)
    x = PositionEmbedding(name="position")(x)
    for i in range(depth):
        h = keras.layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln1")(x)
        h = keras.layers.MultiHeadAttention(heads, dim // heads, name=f"block{i}_mha")(h, h)
        x = keras.layers.Add(name=f"block{i}_res1")([x, h])
        h = keras.layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln2")(x)
        h = keras.layers.Dense(2 * dim, activation="gelu", name=f"block{i}_mlp1")(h)
        h = keras.layers.Dense(dim, name=f"block{i}_mlp2")(h)
        x = keras.layers.Add(name=f"block{i}_res2")([x, h])
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="final_ln")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name=name)


def digits_lstm(input_shape=(8, 8), num_classes: int = 10, units: int = 32, name: str = "digits_lstm",
                layer: str = "LSTM"):
    """Two recurrent layers (``layer``: LSTM, GRU or SimpleRNN, Keras defaults) over a digit's 8
    pixel rows, then a softmax head."""
    rnn = getattr(keras.layers, layer)
    inputs = keras.Input(input_shape, name="rows")
    x = rnn(units, return_sequences=True, name=f"{layer.lower()}1")(inputs)
    x = rnn(units, name=f"{layer.lower()}2")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name=name)


def train_model(model: keras.Model, x, y, epochs: int = 8, batch_size: int = 32, seed: int = 0,
                learning_rate: float = 2e-3, verbose: int = 0, validation_data=None, callbacks=None):
    """Compiles (Adam, sparse cross-entropy) and fits ``model`` in place; returns the History."""
    keras.utils.set_random_seed(seed)
    model.compile(keras.optimizers.Adam(learning_rate), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=verbose, shuffle=True,
                     validation_data=validation_data, callbacks=callbacks)


def train_digits_cnn(epochs: int = 8, image_size: int = 8, seed: int = 0, verbose: int = 0, builder=digits_cnn):
    """Trains ``builder`` on the packaged digits; returns ``(model, (x_train, y_train), (x_test, y_test))``."""

    (x_train, y_train), (x_test, y_test) = load_digits(image_size=image_size, seed=seed)
    keras.utils.set_random_seed(seed)
    model = builder(input_shape=x_train.shape[1:])
    train_model(model, x_train, y_train, epochs=epochs, seed=seed, verbose=verbose)
    return model, (x_train, y_train), (x_test, y_test)


def unbalance_channels(model: keras.Model, spread: float = 100.0, seed: int = 0,
                       pairs=None) -> keras.Model:
    """A copy of a ReLU model with the same function but channel ranges ``spread``× apart.

    For each ``(batchnorm, next_layer)`` pair, output channel ``c`` of the BatchNorm is multiplied
    by ``s_c`` (its ``γ`` and ``β``) and input channel ``c`` of the next layer's kernel divided by
    it. With a ReLU between them (``relu(s·z) = s·relu(z)`` for ``s > 0``) the function is
    unchanged, but per-channel weight and activation ranges now differ by ``max s / min s =
    spread``, as in trained MobileNets: per-tensor INT8 collapses. The scales are a geometric
    series from ``spread^-½`` to ``spread^½`` in a seeded random order.

    Args:
        model: a trained model whose pairs are joined by plain ReLU (e.g.
            ``mobilenet_style(relu_max=None)``).
        spread: ratio of the largest to the smallest scale (> 1).
        seed: order of the scales over the channels.
        pairs: ``[(batchnorm name, next layer name), ...]``; default: ``mobilenet_style``'s
            ``(dw{i}_bn, pw{i})`` blocks.

    Returns:
        A new model (the caller's is untouched).

    Example:
        >>> skewed = unbalance_channels(model, spread=300.0)     # doctest: +SKIP
    """
    import numpy as np

    if not spread > 1:
        raise ValueError(f"spread must be > 1. Received: spread={spread!r}")
    if pairs is None:
        pairs = [(f"dw{i}_bn", f"pw{i}") for i in range(4)]
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    rng = np.random.default_rng(seed)
    for bn_name, next_name in pairs:
        bn, nxt = copy.get_layer(bn_name), copy.get_layer(next_name)
        channels = int(bn.gamma.shape[0])
        s = rng.permutation(np.geomspace(spread ** -0.5, spread ** 0.5, channels))
        bn.gamma.assign(keras.ops.convert_to_numpy(bn.gamma) * s)
        bn.beta.assign(keras.ops.convert_to_numpy(bn.beta) * s)
        kernel = keras.ops.convert_to_numpy(nxt.kernel)
        shape = [1] * kernel.ndim
        shape[-2] = -1
        nxt.kernel.assign(kernel / s.reshape(shape))
    return copy
