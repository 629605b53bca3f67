"""tf_keras (Keras 2) models in tfq: to_keras3 equivalence, tfq entry points, tfmot QAT export.

The reference for every tf_keras model is an independent path: the same architecture built
directly in Keras 3 (``tfq.examples``) with the tf_keras weights copied in, or TFLite's own
interpreter. tfmot needs tf_keras as ``tf.keras`` and mutates ``os.environ`` on import, so the
tfmot test runs it in a subprocess with ``TF_USE_LEGACY_KERAS=1``.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import tfq
from tests.conftest import tflite_accuracy
from tfq.interop import convert_tfmot_model, is_tfmot_qat_model, to_keras3
from tfq.models.loading import is_tf_keras_model

tf_keras = pytest.importorskip("tf_keras")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_tf_keras(model, x, y, epochs, learning_rate=2e-3):
    tf_keras.utils.set_random_seed(0)
    model.compile(tf_keras.optimizers.Adam(learning_rate), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model


def _keras3_twin(tf_keras_model, builder, input_shape):
    """The same architecture built directly in Keras 3, with the tf_keras weights: the independent path."""
    twin = builder(input_shape=input_shape)
    twin.set_weights(tf_keras_model.get_weights())
    return twin


def _randomize(model, seed=0):
    """Random weights, BN variances kept positive: differences between paths cannot hide behind zeros/ones."""
    rng = np.random.default_rng(seed)
    values = []
    for w, v in zip(model.get_weights(), model.weights):
        r = rng.normal(0.0, 0.3, w.shape).astype(w.dtype)
        values.append(np.abs(r) + 0.5 if "variance" in v.name else r)
    model.set_weights(values)
    return model


def _run(model, x):
    """Inference outputs as numpy (a direct call: faster than ``predict`` for a few hundred samples)."""
    import tensorflow as tf

    return tf.nest.map_structure(np.asarray, model(x, training=False))


def _max_diff(a, b):
    if isinstance(a, dict):
        return max(_max_diff(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return max(_max_diff(x, y) for x, y in zip(a, b))
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.fixture(scope="module")
def tf_keras_cnn(digits):
    (x_train, y_train), _ = digits
    model = tfq.examples.digits_cnn(input_shape=(8, 8, 1), keras_module=tf_keras)
    return _train_tf_keras(model, x_train, y_train, epochs=2)


@pytest.fixture(scope="module")
def keras3_twin(tf_keras_cnn):
    return _keras3_twin(tf_keras_cnn, tfq.examples.digits_cnn, (8, 8, 1))


@pytest.fixture(scope="module")
def calib(digits):
    (x_train, _), _ = digits
    return x_train[:200]


# --- to_keras3 -------------------------------------------------------------------------------


def test_to_keras3_digits_cnn_same_predictions_and_caller_untouched(tf_keras_cnn, keras3_twin, digits):
    _, (x_test, _) = digits
    before = [w.copy() for w in tf_keras_cnn.get_weights()]
    k3 = to_keras3(tf_keras_cnn)
    assert isinstance(k3, keras.Model) and not is_tf_keras_model(k3)
    assert [layer.name for layer in k3.layers] == [layer.name for layer in tf_keras_cnn.layers]
    expected = _run(tf_keras_cnn, x_test)
    assert _max_diff(_run(k3, x_test), expected) < 1e-5
    assert _max_diff(_run(keras3_twin, x_test), expected) < 1e-5
    # A new model: the caller's weights are unchanged and not shared.
    k3.get_layer("fc1").kernel.assign(np.zeros(k3.get_layer("fc1").kernel.shape, "float32"))
    assert all(np.array_equal(a, b) for a, b in zip(before, tf_keras_cnn.get_weights()))
    assert to_keras3(keras3_twin) is keras3_twin  # Keras 3 models pass through


def test_to_keras3_mobilenet_style_same_predictions():
    (x_train, y_train), (x_test, _) = tfq.datasets.load_digits(image_size=16)
    model = tfq.examples.mobilenet_style(input_shape=(16, 16, 1), width=8, keras_module=tf_keras)
    _train_tf_keras(model, x_train[:512], y_train[:512], epochs=1)  # moving BN statistics are not 0/1 any more
    k3 = to_keras3(model)
    expected = _run(model, x_test)
    assert _max_diff(_run(k3, x_test), expected) < 1e-5
    twin = _keras3_twin(model, lambda input_shape: tfq.examples.mobilenet_style(input_shape, width=8), (16, 16, 1))
    assert _max_diff(_run(twin, x_test), _run(k3, x_test)) < 1e-5


def _graph_model():
    """Functional: Conv/BN/ReLU/Depthwise/pooling/Add/Concatenate/Dropout/Dense, a nested Functional
    model called twice and a nested Sequential, two outputs."""
    L = tf_keras.layers
    block_in = tf_keras.Input((8, 8, 4))
    y = L.BatchNormalization(name="b_bn")(L.Conv2D(4, 3, padding="same", name="b_conv")(block_in))
    block = tf_keras.Model(block_in, L.ReLU(6.0, name="b_relu")(y), name="block")
    head = tf_keras.Sequential([tf_keras.Input((16,)), L.Dense(8, activation="relu"), L.Dropout(0.5), L.Dense(3)],
                               name="head")
    inputs = tf_keras.Input((8, 8, 1), name="image")
    x = L.Conv2D(4, 3, padding="same", name="stem")(inputs)
    x = L.ReLU(name="stem_relu")(L.BatchNormalization(name="stem_bn")(x))
    x = L.Add(name="add")([block(block(x)), x])
    d = L.DepthwiseConv2D(3, padding="same", depth_multiplier=1, name="dw")(x)
    x = L.Concatenate(name="concat")([L.MaxPooling2D(name="max")(x), L.AveragePooling2D(name="avg")(d)])
    features = L.GlobalAveragePooling2D(name="gap")(L.Conv2D(16, 1, name="pw")(x))
    return tf_keras.Model(inputs, [head(features), L.Dense(2, name="aux")(features)], name="graph")


def _sequential_model():
    L = tf_keras.layers
    return tf_keras.Sequential([L.Conv2D(4, 3, input_shape=(8, 8, 1), name="c"), L.BatchNormalization(axis=-1),
                                L.LeakyReLU(0.1), L.Flatten(), L.Dense(5, activation="softmax")], name="seq")


@pytest.mark.parametrize("build", [_graph_model, _sequential_model], ids=["functional_nested", "sequential"])
def test_to_keras3_graph_and_sequential_same_predictions(build):
    model = _randomize(build())
    x = np.random.default_rng(1).random((16, 8, 8, 1), np.float32)
    k3 = to_keras3(model)
    assert type(k3).__name__ == ("Sequential" if build is _sequential_model else "Functional")
    assert len(k3.weights) == len(model.weights)
    assert _max_diff(_run(k3, x), _run(model, x)) < 1e-5


def test_to_keras3_multiple_inputs_and_shared_layer():
    a, b = tf_keras.Input((4,), name="a"), tf_keras.Input((4,), name="b")
    shared = tf_keras.layers.Dense(3, name="shared")
    model = _randomize(tf_keras.Model({"a": a, "b": b}, {"ya": shared(a), "yb": shared(b)}))
    data = {"a": np.eye(4, dtype="float32"), "b": -np.eye(4, dtype="float32")}
    k3 = to_keras3(model)
    assert len(k3.weights) == 2  # still one shared Dense
    assert _max_diff(_run(k3, data), _run(model, data)) < 1e-5


@pytest.mark.slow  # a fresh TensorFlow process: ~15 s
def test_to_keras3_works_with_legacy_keras_env():
    """With TF_USE_LEGACY_KERAS=1 (tf.keras is tf_keras) to_keras3 gives the same model."""
    code = textwrap.dedent("""
        import numpy as np, tensorflow as tf, tf_keras
        from tfq.examples import digits_cnn
        from tfq.interop import to_keras3
        assert tf.keras.__name__.startswith("tf_keras"), tf.keras.__name__
        m = digits_cnn(keras_module=tf.keras)
        x = np.random.default_rng(0).random((8, 8, 8, 1), np.float32)
        print("DIFF", float(np.abs(to_keras3(m).predict(x, verbose=0) - m.predict(x, verbose=0)).max()))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3"))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("DIFF")]
    assert lines, proc.stderr[-2000:]
    assert float(lines[-1].split()[1]) < 1e-5


def test_unsupported_layers_raise_one_line_errors_naming_the_layer():
    import tensorflow as tf

    class My(tf_keras.layers.Layer):
        def call(self, x):
            return x

    inputs = tf_keras.Input((4,))
    cases = {
        "'double' (Lambda)": tf_keras.Model(inputs, tf_keras.layers.Lambda(lambda t: 2 * t, name="double")(inputs)),
        "(TFOpLambda)": tf_keras.Model(inputs, tf.nn.relu(inputs)),
        "'my' (My)": tf_keras.Model(inputs, My(name="my")(inputs)),
        "(BatchNormalization)": tf_keras.Model(inputs, tf_keras.layers.BatchNormalization(renorm=True)(inputs)),
    }
    for expected, model in cases.items():
        with pytest.raises(ValueError) as info:
            to_keras3(model)
        message = str(info.value)
        assert expected in message and "Keras 3" in message and "\n" not in message, message
    with pytest.raises(TypeError, match="Received: int"):
        to_keras3(3)


def test_subclassed_tf_keras_model_is_refused():
    class Sub(tf_keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.dense = tf_keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = Sub()
    model(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match="'sub' is a subclassed tf_keras model"):
        to_keras3(model)


def test_custom_layer_with_keras3_implementation():
    class Scale2(tf_keras.layers.Layer):
        def call(self, x):
            return 2.0 * x

    class Scale2K3(keras.layers.Layer):
        def call(self, x):
            return 2.0 * x

    inputs = tf_keras.Input((3,))
    model = tf_keras.Model(inputs, Scale2(name="s")(inputs))
    k3 = to_keras3(model, custom_objects={"Scale2": Scale2K3})
    assert isinstance(k3.get_layer("s"), Scale2K3)
    np.testing.assert_allclose(k3.predict(np.ones((2, 3), "float32"), verbose=0), 2.0)


# --- tfq entry points accept tf_keras models ----------------------------------------------------


def test_convert_int8_tf_keras_matches_keras3_path(tf_keras_cnn, keras3_twin, digits, calib):
    _, (x_test, y_test) = digits
    from_tf_keras = tfq.convert(tf_keras_cnn, "int8", calib)
    from_keras3 = tfq.convert(keras3_twin, "int8", calib)
    info = tfq.inspect_tflite(from_tf_keras)
    assert info.num_float_ops == 0, info.summary()
    acc_tf_keras = tflite_accuracy(from_tf_keras, x_test, y_test)
    acc_keras3 = tflite_accuracy(from_keras3, x_test, y_test)
    assert abs(acc_tf_keras - acc_keras3) <= 0.01, (acc_tf_keras, acc_keras3)
    float_acc = float((_run(tf_keras_cnn, x_test).argmax(1) == y_test).mean())
    assert acc_tf_keras >= float_acc - 0.02, (acc_tf_keras, float_acc)


def test_calibrate_and_quantize_model_accept_tf_keras(tf_keras_cnn, keras3_twin, calib):
    cal = tfq.calibrate(tf_keras_cnn, calib)
    reference = tfq.calibrate(keras3_twin, calib)
    assert cal.ranges.keys() == reference.ranges.keys() and cal.ranges
    for name, (lo, hi) in reference.ranges.items():
        np.testing.assert_allclose(cal.ranges[name], (lo, hi), rtol=1e-5, atol=1e-6, err_msg=name)

    qat = tfq.qat.quantize_model(tf_keras_cnn, calibration_data=calib, warn_unknown=False)
    qat_reference = tfq.qat.quantize_model(keras3_twin, calibration_data=calib, warn_unknown=False)
    assert isinstance(qat, keras.Model)
    ours, theirs = tfq.qat.quantizers_of(qat), tfq.qat.quantizers_of(qat_reference)
    assert ours.keys() == theirs.keys() and ours
    x = calib[:32]
    assert _max_diff(qat(x, training=False), qat_reference(x, training=False)) < 1e-5


# --- tfmot / direct tf_keras conversion ---------------------------------------------------------


def test_is_tfmot_qat_model_by_class_name(tf_keras_cnn, keras3_twin):
    class QuantizeWrapperV2(tf_keras.layers.Layer):  # stands in for tfmot's wrapper: same class name
        def call(self, x):
            return x

    inputs = tf_keras.Input((3,))
    wrapped = tf_keras.Model(inputs, QuantizeWrapperV2()(inputs))
    nested_inputs = tf_keras.Input((3,))
    nested = tf_keras.Model(nested_inputs, tf_keras.layers.Dense(2)(wrapped(nested_inputs)))
    assert is_tfmot_qat_model(wrapped) and is_tfmot_qat_model(nested)
    assert not is_tfmot_qat_model(tf_keras_cnn) and not is_tfmot_qat_model(keras3_twin)
    with pytest.raises(ValueError, match="tfmot QAT model.*convert_tfmot_model"):
        to_keras3(nested)


def test_convert_tfmot_model_plain_tf_keras_float_modes(tf_keras_cnn, digits):
    _, (x_test, _) = digits
    expected = _run(tf_keras_cnn, x_test)
    float_tflite = convert_tfmot_model(tf_keras_cnn, "float")
    assert _max_diff(tfq.TFLiteModel(float_tflite).predict(x_test), expected) < 1e-5
    dynamic = convert_tfmot_model(tf_keras_cnn, "dynamic")
    assert _max_diff(tfq.TFLiteModel(dynamic).predict(x_test), expected) < 5e-2
    assert len(dynamic) < 0.3 * len(float_tflite)
    with pytest.raises(ValueError, match="Received: mode='int8'"):
        convert_tfmot_model(tf_keras_cnn, "int8")  # no fake-quant ops: tfq.convert calibrates instead
    with pytest.raises(ValueError, match="Received: io_dtype='int8'"):
        convert_tfmot_model(tf_keras_cnn, "float", io_dtype="int8")
    with pytest.raises(TypeError, match="tfq.convert"):
        convert_tfmot_model(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]), "float")


_TFMOT_WORKER = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import tensorflow as tf
    import tf_keras
    import tensorflow_model_optimization as tfmot
    import tfq
    from tfq.interop import convert_tfmot_model, is_tfmot_qat_model, to_keras3

    out = sys.argv[1]
    (x_train, y_train), (x_test, y_test) = tfq.datasets.load_digits()
    tf_keras.utils.set_random_seed(0)
    model = tfq.examples.digits_cnn(input_shape=(8, 8, 1), keras_module=tf_keras)
    model.compile(tf_keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=5, batch_size=32, verbose=0)
    np.savez(os.path.join(out, "float_weights.npz"), *model.get_weights())
    k3_diff = float(np.abs(to_keras3(model).predict(x_test, verbose=0) - model.predict(x_test, verbose=0)).max())
    qat = tfmot.quantization.keras.quantize_model(model)
    qat.compile(tf_keras.optimizers.Adam(2e-4), "sparse_categorical_crossentropy", metrics=["accuracy"])
    qat.fit(x_train, y_train, epochs=1, batch_size=32, verbose=0)
    with open(os.path.join(out, "qat.tflite"), "wb") as f:
        f.write(convert_tfmot_model(qat, "int8", io_dtype="int8"))
    np.save(os.path.join(out, "qat_keras_probs.npy"), qat.predict(x_test, verbose=0))
    try:
        to_keras3(qat)
        to_keras3_error = None
    except ValueError as err:
        to_keras3_error = str(err)
    info = {"tf_keras_is_tf_keras": tf.keras.__name__.startswith("tf_keras"), "is_qat": is_tfmot_qat_model(qat),
            "float_is_qat": is_tfmot_qat_model(model), "to_keras3_diff": k3_diff, "to_keras3_error": to_keras3_error}
    with open(os.path.join(out, "info.json"), "w") as f:
        json.dump(info, f)
""")


@pytest.mark.slow
def test_tfmot_qat_model_exports_integer_tflite(tmp_path, digits):
    """tfmot QAT (in a TF_USE_LEGACY_KERAS=1 subprocess) → convert_tfmot_model → checked here."""
    pytest.importorskip("tensorflow_model_optimization")
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", _TFMOT_WORKER, str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["tf_keras_is_tf_keras"] and info["is_qat"] and not info["float_is_qat"]
    assert info["to_keras3_diff"] < 1e-5
    assert "convert_tfmot_model" in info["to_keras3_error"]

    (x_train, y_train), (x_test, y_test) = digits
    content = (tmp_path / "qat.tflite").read_bytes()
    tflite_info = tfq.inspect_tflite(content)
    assert tflite_info.is_fully_integer and tflite_info.num_float_ops == 0, tflite_info.summary()
    assert {"CONV_2D", "FULLY_CONNECTED"} <= set(tflite_info.op_types)
    tfmot_acc = float((tfq.TFLiteModel(content).predict(x_test).argmax(1) == y_test).mean())
    tfmot_keras_acc = float((np.load(tmp_path / "qat_keras_probs.npy").argmax(1) == y_test).mean())
    # The converter honours tfmot's fake-quant ranges: the TFLite model scores as the Keras QAT model.
    assert abs(tfmot_acc - tfmot_keras_acc) <= 0.01, (tfmot_acc, tfmot_keras_acc)

    # The Keras 3 path from the same float weights: tfq PTQ and tfq QAT (1 epoch, same learning rate).
    weights = np.load(tmp_path / "float_weights.npz")
    twin = tfq.examples.digits_cnn(input_shape=(8, 8, 1))
    twin.set_weights([weights[f"arr_{i}"] for i in range(len(weights.files))])
    calib = x_train[:300]
    ptq_acc = tflite_accuracy(tfq.convert(twin, "int8", calib), x_test, y_test)
    qat = tfq.qat.quantize_model(twin, calibration_data=calib, warn_unknown=False)
    tfq.examples.train_model(qat, x_train, y_train, epochs=1, learning_rate=2e-4)
    tfq_qat_acc = tflite_accuracy(tfq.convert(qat, "int8"), x_test, y_test)
    assert tfmot_acc >= ptq_acc - 0.01, (tfmot_acc, ptq_acc)
    assert abs(tfmot_acc - tfq_qat_acc) <= 0.02, (tfmot_acc, tfq_qat_acc)


# --- what tfq's entry points take that to_keras3 alone refuses (issue 28) ------------------------------


class _GatedSwish(tf_keras.layers.Layer):
    """A tf_keras custom layer with a weight: Keras 3 has no class for it."""

    def build(self, input_shape):
        self.alpha = self.add_weight("alpha", shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        import tensorflow as tf

        return x * tf.sigmoid(self.alpha * x)


def _sqnr(reference, got):
    reference, got = np.asarray(reference, np.float64), np.asarray(got, np.float64)
    return float(10 * np.log10(np.sum(reference ** 2) / np.sum((reference - got) ** 2)))


def test_tf_keras_custom_layer_is_kept_whole_and_converts():
    tf_keras.utils.set_random_seed(0)
    inputs = tf_keras.Input((8, 8, 3))
    y = _GatedSwish(name="custom")(tf_keras.layers.Conv2D(8, 3, name="conv")(inputs))
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(4, name="head")(tf_keras.layers.Flatten()(y)))
    model.get_layer("custom").set_weights([np.linspace(0.5, 2.0, 8, dtype="float32")])
    x = np.random.default_rng(0).random((200, 8, 8, 3)).astype("float32")
    with pytest.raises(ValueError, match="'custom'"):
        to_keras3(model)  # the explicit translation still refuses it by name
    with pytest.warns(UserWarning, match="TFKerasLayer"):
        content = tfq.convert(model, "int8", x)  # refused before: "it is a custom or removed layer"
    info = tfq.inspect_tflite(content)
    assert info.num_float_ops == 0, info.summary()
    reference = model(x[:64]).numpy()
    got = tfq.TFLiteModel(content).predict(x[:64])
    assert _sqnr(reference, got) > 30.0  # the plain converter on the tf_keras model: 35.5 dB
    assert np.array_equal(model.get_layer("custom").get_weights()[0], np.linspace(0.5, 2.0, 8, dtype="float32"))


def test_keras_file_saved_by_tf_keras_loads(tmp_path):
    model = _randomize(tfq.examples.digits_cnn(input_shape=(8, 8, 1), keras_module=tf_keras))
    model.save(tmp_path / "cnn.keras")  # Keras 3 alone: "Could not locate class 'Functional'"
    loaded = tfq.interop.load_keras_model(str(tmp_path / "cnn.keras"))
    assert isinstance(loaded, keras.Model)
    x = np.random.default_rng(2).random((16, 8, 8, 1), np.float32)
    assert _max_diff(_run(loaded, x), _run(model, x)) < 1e-5
    content = tfq.convert(str(tmp_path / "cnn.keras"), "int8", np.random.default_rng(3).random((64, 8, 8, 1), np.float32))
    assert tfq.inspect_tflite(content).num_float_ops == 0
