"""Every model a user brings (issue 28): any name, shared layers, subclassed models, Bidirectional RNNs.

Each test builds its own small model (no downloads) and checks the INT8 export through LiteRT's
interpreter against the float model: SQNR, the ops left float, the weight tensors in the file.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

import tfq
import tfq.qat
from tfq.tflite.info import inspect_tflite
from tfq.tflite.interpreter import TFLiteModel

L = keras.layers


def _sqnr(reference, got) -> float:
    reference, got = np.asarray(reference, np.float64), np.asarray(got, np.float64)
    return float(10 * np.log10(np.sum(reference ** 2) / max(np.sum((reference - got) ** 2), 1e-30)))


def _float(model, x):
    """The float outputs, from an eager call (Keras' own predict refuses a model named "my model (v2)")."""
    out = model(x, training=False)
    return [keras.ops.convert_to_numpy(o) for o in keras.tree.flatten(out)]


def _tflite(content, feed):
    got = TFLiteModel(content).predict(feed)
    return got if isinstance(got, list) else [got]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# --- names --------------------------------------------------------------------------------------------

def _oddly_named_model():
    """A model and layers with names tfq's own would collide with, and names TensorFlow refuses as scopes."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3), name="img")
    x = L.Conv2D(8, 3, name="img_fq")(inputs)  # the name tfq gives the input's quantizer
    x = L.ReLU(name="relu (x)")(x)
    x = L.Conv2D(8, 3, name="conv (v2)")(x)
    x = L.Activation("relu6", name="conv (v2)_fq")(x)  # the name of the previous layer's output quantizer
    x = L.Add(name="img_fq_output_fq")([x, L.Conv2D(8, 1, name="skip")(x)])  # a wrapper quantizer's name
    x = L.Flatten(name="flat")(L.AveragePooling2D(2, name="flat_fq")(x))
    return keras.Model(inputs, L.Dense(4, name="logits")(x), name="my model (v2)")


def test_names_a_user_may_give_never_collide_with_tfqs():
    model = _oddly_named_model()
    x = np.random.default_rng(0).standard_normal((128, 8, 8, 3)).astype("float32")
    content = _quiet(tfq.convert, model, "int8", x)
    assert inspect_tflite(content).float_ops == []
    (reference,), (got,) = _float(model, x[:64]), _tflite(content, x[:64])
    assert _sqnr(reference, got) > 25.0
    assert np.mean(reference.argmax(1) == got.argmax(1)) >= 0.9

    qat = _quiet(tfq.qat.quantize_model, model, calibration_data=x)
    names = [layer.name for layer in qat.layers]
    assert len(names) == len(set(names))
    # The user's layers keep their names (made valid TensorFlow scopes); tfq's quantizers give way.
    assert {"img_fq", "conv__v2_", "skip", "logits"} <= set(names)
    quantizers = tfq.qat.quantizers_of(qat)
    total = sum(1 for layer in qat.layers if isinstance(layer, tfq.qat.ActivationQuantizer)) + sum(
        len(layer.quantizers) for layer in tfq.qat.quantized_layers_of(qat))
    assert len(quantizers) == total  # no two quantizers share a name (ranges are keyed by name)
    np.testing.assert_allclose(_float(qat, x[:8])[0], _float(model, x[:8])[0], atol=0.5)


def test_evaluate_runs_a_model_keras_itself_cannot_trace():
    model = _oddly_named_model()  # model.predict fails: "'my model (v2)' is not a valid root scope name"
    x = np.random.default_rng(1).standard_normal((96, 8, 8, 3)).astype("float32")
    report = _quiet(tfq.evaluate, model, x, latency=False, representative_data=x, variants=("float", "int8"))
    assert report.row("tflite_float")["sqnr_db"] > 80
    assert report.row("tflite_int8")["agreement"] > 0.9 and report.row("tflite_int8")["sqnr_db"] > 25


# --- shared layers ------------------------------------------------------------------------------------

def _shared_conv_model(nested: bool):
    """One Conv2D called on two inputs, its first call followed by a separate ReLU layer."""
    keras.utils.set_random_seed(1)
    a, b = keras.Input((8, 8, 3), name="a"), keras.Input((8, 8, 3), name="b")
    shared = L.Conv2D(4, 3, name="shared")
    out = L.Add(name="add")([L.ReLU(name="relu")(shared(a)), shared(b)])
    model = keras.Model([a, b], L.Dense(3, name="head")(L.Flatten()(out)), name="inner" if nested else "outer")
    if not nested:
        return model
    i1, i2 = keras.Input((8, 8, 3), name="left"), keras.Input((8, 8, 3), name="right")
    return keras.Model([i1, i2], model([i1, i2]), name="outer")


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_shared_layer_converts_with_one_kernel_and_a_range_per_call(nested):
    model = _shared_conv_model(nested)
    rng = np.random.default_rng(2)
    x = [rng.standard_normal((160, 8, 8, 3)).astype("float32") for _ in range(2)]
    content = _quiet(tfq.convert, model, "int8", x)
    info = inspect_tflite(content)
    assert info.float_ops == []
    # Weights shared and quantized once: one int8 4×3×3×3 kernel in the file for the two convolutions.
    assert [w.shape for w in info.weights if len(w.shape) == 4] == [(4, 3, 3, 3)]
    assert sum(op.type == "CONV_2D" for op in info.ops) == 2
    feed = dict(zip([t.name for t in model.inputs], [v[:64] for v in x]))
    (reference,), (got,) = _float(model, [v[:64] for v in x]), _tflite(content, feed)
    assert _sqnr(reference, got) > 25.0


def test_shared_layer_qat_trains_the_one_kernel(tmp_path):
    model = _shared_conv_model(nested=False)
    rng = np.random.default_rng(3)
    x = [rng.standard_normal((32, 8, 8, 3)).astype("float32") for _ in range(2)]
    y = rng.standard_normal((32, 3)).astype("float32")
    qat = _quiet(tfq.qat.quantize_model, model, calibration_data=x)
    wrappers = [w for w in tfq.qat.quantized_layers_of(qat) if isinstance(w.layer, L.Conv2D)]
    assert len(wrappers) == 2 and wrappers[0].layer is wrappers[1].layer
    # Each call site has its own fusion and range: the ReLU is fused into the first call only.
    assert sorted(w.activation for w in wrappers) == ["linear", "relu"]
    assert wrappers[0].output_quantizer is not wrappers[1].output_quantizer
    kernels = [v for v in qat.trainable_weights if v.path.endswith("kernel") and len(v.shape) == 4]
    assert len(kernels) == 1
    before = keras.ops.convert_to_numpy(kernels[0]).copy()
    qat.compile("sgd", "mse")
    qat.fit(x, y, epochs=1, batch_size=32, verbose=0)
    assert np.abs(keras.ops.convert_to_numpy(kernels[0]) - before).max() > 0
    np.testing.assert_array_equal(model.get_layer("shared").kernel.numpy(), before)  # the caller's is untouched
    content = _quiet(tfq.convert, qat, "int8")
    assert [w.shape for w in inspect_tflite(content).weights if len(w.shape) == 4] == [(4, 3, 3, 3)]
    # Saved and loaded, it keeps one kernel (the later call site names the first one's wrapper).
    qat.save(tmp_path / "shared.keras")
    loaded = keras.models.load_model(tmp_path / "shared.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), qat.predict(x, verbose=0))
    assert len([v for v in loaded.trainable_weights if v.path.endswith("kernel") and len(v.shape) == 4]) == 1
    loaded_wrappers = [w for w in tfq.qat.quantized_layers_of(loaded) if isinstance(w.layer, L.Conv2D)]
    assert loaded_wrappers[0].layer is loaded_wrappers[1].layer


def test_layer_called_twice_in_sequence():
    keras.utils.set_random_seed(4)
    inputs = keras.Input((8,), name="x")
    dense = L.Dense(8, name="shared")
    model = keras.Model(inputs, dense(L.ReLU(name="relu")(dense(inputs))))
    x = np.random.default_rng(4).standard_normal((160, 8)).astype("float32")
    content = _quiet(tfq.convert, model, "int8", x)
    info = inspect_tflite(content)
    assert info.float_ops == []
    assert [w.shape for w in info.weights] == [(8, 8)]
    assert _sqnr(_float(model, x[:64])[0], _tflite(content, x[:64])[0]) > 25.0


# --- subclassed models --------------------------------------------------------------------------------

class _TwoHeadPReLUNet(keras.Model):
    """A subclassed network as packages build them: PReLU blocks, two outputs (one a softmax)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv1, self.prelu1 = L.Conv2D(8, 3), L.PReLU(shared_axes=[1, 2])
        self.conv2, self.prelu2 = L.Conv2D(8, 3), L.PReLU(shared_axes=[1, 2])
        self.flatten, self.boxes, self.scores = L.Flatten(), L.Dense(4), L.Dense(3)

    def call(self, x):
        h = self.flatten(self.prelu2(self.conv2(self.prelu1(self.conv1(x)))))
        return self.boxes(h), keras.ops.softmax(self.scores(h))


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "wrapped"])
def test_subclassed_model_is_traced_and_converts(wrapped):
    keras.utils.set_random_seed(5)
    x = np.random.default_rng(5).random((160, 12, 12, 3)).astype("float32")
    net = _TwoHeadPReLUNet()
    net(x[:1])
    model = net
    if wrapped:
        inputs = keras.Input((12, 12, 3))
        model = keras.Model(inputs, net(inputs))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        content = tfq.convert(model, "int8", x)
    assert not [w for w in caught if "tfq:" in str(w.message)]  # traced: nothing kept whole
    assert inspect_tflite(content).float_ops == []
    references, got = _float(net, x[:64]), _tflite(content, x[:64])
    assert len(got) == 2
    for reference, output in zip(references, got):
        assert _sqnr(reference, output) > 30.0  # the plain converter: 35.6 and 47.5 dB on the same model
    qat = _quiet(tfq.qat.quantize_model, model, calibration_data=x)
    assert len(tfq.qat.quantized_layers_of(qat)) == 4  # two convolutions and two Dense, each quantized


def test_subclassed_model_never_called_gets_a_fix_that_works():
    net = _TwoHeadPReLUNet()
    x = np.random.default_rng(6).random((32, 12, 12, 3)).astype("float32")
    with pytest.raises(ValueError, match=r"never called.*model\(x\)") as err:
        tfq.convert(net, "int8", x)
    assert "\n" not in str(err.value)
    net(x[:1])  # the fix the message gives
    assert inspect_tflite(_quiet(tfq.convert, net, "int8", x)).float_ops == []


# --- recurrent layers ---------------------------------------------------------------------------------

# Plain converter on the same models with unroll=True inside (its only route): 29.6 dB and 33.0 dB.
@pytest.mark.parametrize("rnn", ["lstm_last_concat", "gru_sequences_sum"])
def test_bidirectional_rnn_on_fixed_length_is_unrolled_to_int8(rnn):
    keras.utils.set_random_seed(7)
    inputs = keras.Input((6, 4))
    if rnn == "lstm_last_concat":
        y = L.Bidirectional(L.LSTM(8))(inputs)
    else:
        y = L.Flatten()(L.Bidirectional(L.GRU(8, return_sequences=True), merge_mode="sum")(inputs))
    model = keras.Model(inputs, L.Dense(3)(y))
    x = np.random.default_rng(7).standard_normal((160, 6, 4)).astype("float32")
    content = _quiet(tfq.convert, model, "int8", x)  # refused before: "a sequence of unknown length"
    info = inspect_tflite(content)
    assert info.float_ops == []
    assert not {"WHILE", "UNIDIRECTIONAL_SEQUENCE_LSTM", "BIDIRECTIONAL_SEQUENCE_LSTM"} & {op.type for op in info.ops}
    assert _sqnr(_float(model, x[:64])[0], _tflite(content, x[:64])[0]) > 25.0


def test_stateful_rnn_gets_one_line():
    inputs = keras.Input(batch_shape=(1, 6, 4))
    model = keras.Model(inputs, L.LSTM(5, stateful=True, name="state")(inputs))
    x = np.random.default_rng(8).standard_normal((8, 6, 4)).astype("float32")
    with pytest.raises(ValueError, match="stateful=False") as err:
        tfq.convert(model, "int8", x)
    assert "\n" not in str(err.value) and "'state'" in str(err.value)
