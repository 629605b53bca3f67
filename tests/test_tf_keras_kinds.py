"""tf_keras models of every kind (issue 28 item 3): subclassed models converted like Keras 3's (traced
through their call, or kept whole where the call cannot be traced), and QAT of a kept-whole custom layer.

Each test builds its own small model (no download); the independent paths are the plain TFLite converter
and LiteRT's interpreter.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfq
import tfq.qat
from tfq.tflite.info import inspect_tflite
from tfq.tflite.interpreter import TFLiteModel

tf_keras = pytest.importorskip("tf_keras")


def _sqnr(reference, got) -> float:
    reference, got = np.asarray(reference, np.float64), np.asarray(got, np.float64)
    return float(10 * np.log10(np.sum(reference ** 2) / max(np.sum((reference - got) ** 2), 1e-30)))


def _tfq_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("tfq:")]


def _plain_converter(model, x, shape) -> bytes:
    """The plain converter's full INT8 of a tf_keras model, through its call as a concrete function."""
    fn = tf.function(lambda t: model(t, training=False)).get_concrete_function(tf.TensorSpec((1, *shape), tf.float32))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([s[None]] for s in x[:100])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


class _TwoHeadPReLUNet(tf_keras.Model):
    """A subclassed tf_keras network as packages build them: PReLU blocks, a raw TF op, two outputs."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv1, self.prelu1 = tf_keras.layers.Conv2D(8, 3), tf_keras.layers.PReLU(shared_axes=[1, 2])
        self.conv2, self.prelu2 = tf_keras.layers.Conv2D(8, 3), tf_keras.layers.PReLU(shared_axes=[1, 2])
        self.flatten, self.boxes, self.scores = tf_keras.layers.Flatten(), tf_keras.layers.Dense(4), \
            tf_keras.layers.Dense(3)

    def call(self, x):
        h = self.flatten(self.prelu2(self.conv2(self.prelu1(self.conv1(x)))))
        return self.boxes(h), tf.nn.softmax(self.scores(h))


def test_subclassed_tf_keras_model_is_traced_and_converts():
    tf_keras.utils.set_random_seed(5)
    x = np.random.default_rng(5).random((160, 12, 12, 3)).astype("float32")
    net = _TwoHeadPReLUNet(name="net")
    net(x[:1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        content = tfq.convert(net, "int8", x)  # refused before: "a subclassed tf_keras model … no config"
    # Traced into its layers: only its raw TF op (tf.nn.softmax, an op layer Keras 3 has no class for) is
    # kept whole, not the model.
    (kept,) = _tfq_warnings(caught)
    assert kept.startswith("tfq: 1 layer(s) of class TFKerasLayer ('tf.nn.softmax')")
    assert inspect_tflite(content).float_ops == []
    references = [o.numpy() for o in net(x[:64])]
    got = TFLiteModel(content).predict(x[:64])
    plain = TFLiteModel(_plain_converter(net, x, (12, 12, 3))).predict(x[:64])
    plain = plain if isinstance(plain, list) else [plain]
    # The plain converter's outputs in the model's order (matched by shape).
    plain = sorted(plain, key=lambda o: o.shape[-1], reverse=True)
    for reference, mine, theirs in zip(references, got, plain):
        assert _sqnr(reference, mine) >= _sqnr(reference, theirs) - 1.0  # measured: see the report
        assert _sqnr(reference, mine) > 30.0
    np.testing.assert_array_equal(net(x[:4])[0].numpy(), references[0][:4])  # the caller's model is untouched
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = tfq.qat.quantize_model(net, calibration_data=x)
    assert len(tfq.qat.quantized_layers_of(qat)) == 4  # two convolutions and two Dense, each quantized by tfq


class _CondNet(tf_keras.Model):
    """A call with ``tf.cond``, which tf_keras cannot trace on symbolic inputs (no dispatch for KerasTensors)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv, self.flatten = tf_keras.layers.Conv2D(8, 3, activation="relu"), tf_keras.layers.Flatten()
        self.dense = tf_keras.layers.Dense(4)

    def call(self, x):
        h = self.flatten(self.conv(x))
        return self.dense(tf.cond(tf.reduce_max(h) > 1e6, lambda: h * 0.5, lambda: h))


def test_subclassed_tf_keras_model_that_cannot_be_traced_is_kept_whole():
    tf_keras.utils.set_random_seed(6)
    x = np.random.default_rng(6).random((128, 12, 12, 3)).astype("float32")
    net = _CondNet(name="condy")
    net(x[:1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        content = tfq.convert(net, "int8", x)  # refused before, as every subclassed tf_keras model
    messages = _tfq_warnings(caught)
    assert any(m.startswith("tfq: 1 layer(s) of class TFKerasLayer ('condy')") for m in messages)  # kept whole
    assert [op.type for op in inspect_tflite(content).float_ops] == ["IF"]  # no int8 kernel, and named:
    assert any("IF in condy" in m for m in messages)
    reference = net(x[:64]).numpy()
    plain = _plain_converter(net, x, (12, 12, 3))
    assert [op.type for op in inspect_tflite(plain).float_ops] == ["IF"]
    # The converter calibrates inside it: the plain converter's result (both 6.1 dB: the IF's float branches).
    assert abs(_sqnr(reference, TFLiteModel(content).predict(x[:64])) -
               _sqnr(reference, TFLiteModel(plain).predict(x[:64]))) < 0.5


class _GatedSwish(tf_keras.layers.Layer):
    """A tf_keras custom layer with a weight: Keras 3 has no class for it, so tfq keeps it whole."""

    def build(self, input_shape):
        self.alpha = self.add_weight("alpha", shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * tf.sigmoid(self.alpha * x)


def test_qat_trains_a_kept_whole_tf_keras_layer_and_exports_integer():
    tf_keras.utils.set_random_seed(0)
    inputs = tf_keras.Input((8, 8, 3))
    y = _GatedSwish(name="custom")(tf_keras.layers.Conv2D(8, 3, name="conv")(inputs))
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(4, name="head")(tf_keras.layers.Flatten()(y)))
    rng = np.random.default_rng(0)
    x = rng.random((128, 8, 8, 3)).astype("float32")
    target = rng.standard_normal((128, 4)).astype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = tfq.qat.quantize_model(model, calibration_data=x)
    alpha = next(w for w in qat.trainable_weights if w.path == "custom/alpha")  # a Keras 3 weight QAT trains
    qat.compile(keras.optimizers.Adam(1e-2), "mse")
    history = qat.fit(x, target, epochs=3, batch_size=32, verbose=0).history["loss"]
    assert history[-1] < history[0]
    trained = keras.ops.convert_to_numpy(alpha)
    assert np.abs(trained - 1.0).max() > 1e-3  # the layer's weight changed
    np.testing.assert_array_equal(model.get_layer("custom").get_weights()[0], np.ones(8, "float32"))  # not yours
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        content = tfq.convert(qat, "int8", x)  # its inner tensors calibrated by the converter
    info = inspect_tflite(content)
    assert info.float_ops == [] and "LOGISTIC" in {op.type for op in info.ops}
    # The export computes with the trained weight: it matches the QAT model, not the untrained one.
    reference = keras.ops.convert_to_numpy(qat(x[:64]))
    got = TFLiteModel(content).predict(x[:64])
    assert _sqnr(reference, got) > 30.0  # measured 41.0 dB
