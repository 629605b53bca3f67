"""Quantization-aware training for Keras 3: rewrite, training maths, callbacks, save/load, distribute.

Every exported model is checked through LiteRT's own interpreter (an independent path) or by
inspecting the .tflite file; training maths are checked against hand computations or against
Keras' own float layers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfq
import tfq.callbacks
import tfq.qat
from tests.conftest import background_python, tflite_accuracy
from tfq.quantsim.layers import ActivationQuantizer, FloatBarrier, QuantizedLayer, QuantizedNormalization

L = keras.layers


# --- the distribute test runs in a subprocess (devices must be configured before TF starts) -------------
DISTRIBUTE_SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    import tfq, tfq.qat
    from tfq.examples import digits_cnn, train_model

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    (x, y), (x_test, y_test) = tfq.datasets.load_digits()
    keras.utils.set_random_seed(0)
    model = digits_cnn(input_shape=x.shape[1:])
    train_model(model, x, y, epochs=8, seed=0)
    with strategy.scope():
        qat = tfq.qat.quantize_model(model, calibration_data=x[:256])
        qat.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy", metrics=["accuracy"])
    before = {n: q.current_range() for n, q in tfq.qat.quantizers_of(qat).items() if q.mode != "fixed"}
    qat.fit(x, y, epochs=2, batch_size=64, verbose=0)

    def replicas(variable):
        return [np.asarray(v).tolist() for v in strategy.experimental_local_results(variable.value)]

    ranges = {n: replicas(q.range_max) + replicas(q.range_min)
              for n, q in tfq.qat.quantizers_of(qat).items() if q.mode != "fixed"}
    stats = [replicas(l.batchnorm.moving_mean) for l in tfq.qat.quantized_layers_of(qat) if l.batchnorm is not None]
    content = tfq.convert(qat, "int8")
    info = tfq.inspect_tflite(content)
    tflite = tfq.TFLiteModel(content).predict(x_test)
    keras_out = qat.predict(x_test, verbose=0)
    print(json.dumps(dict(
        replicas=strategy.num_replicas_in_sync,
        ranges=ranges, stats=stats,
        ranges_moved=any(abs(before[n][1] - qat_range[1]) > 1e-6 for n, qat_range in
                         ((n, q.current_range()) for n, q in tfq.qat.quantizers_of(qat).items() if n in before)),
        float_ops=info.num_float_ops,
        accuracy=float((tflite.argmax(1) == y_test).mean()),
        agreement=float((tflite.argmax(1) == keras_out.argmax(1)).mean()),
    )))
    """
)


@pytest.fixture(scope="module")
def distribute_run():
    """Starts the MirroredStrategy run at once; the test that needs it waits for it."""
    yield from background_python(DISTRIBUTE_SCRIPT)


@pytest.fixture(scope="module", autouse=True)
def _start_distribute_early(request):
    """Runs the distribute subprocess alongside the module's other tests (when that test is selected)."""
    if any(item.name.startswith("test_mirrored_strategy") for item in request.session.items):
        request.getfixturevalue("distribute_run")
    yield


# --- shared models ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def float_digits(digits):
    """The packaged-digits CNN trained 10 epochs from a seeded initialisation: (model, test accuracy).

    Seeded before the model is built (unlike a model built first), so every run trains the same
    model and the accuracy comparisons below do not depend on test order.
    """
    (x_train, y_train), (x_test, y_test) = digits
    keras.utils.set_random_seed(0)
    model = tfq.examples.digits_cnn(input_shape=x_train.shape[1:])
    tfq.examples.train_model(model, x_train, y_train, epochs=10, seed=0)
    return model, float((model.predict(x_test, verbose=0).argmax(1) == y_test).mean())


@pytest.fixture(scope="module")
def qat_digits(float_digits, digits):
    """The trained digits CNN, QAT fine-tuned 2 epochs from calibrated ranges (as a user would)."""
    model, _ = float_digits
    (x_train, y_train), _ = digits
    weights_before = [w.copy() for w in model.get_weights()]
    layers_before = [(layer.name, type(layer).__name__) for layer in model.layers]
    keras.utils.set_random_seed(0)
    qat = tfq.qat.quantize_model(model, calibration_data=x_train[:500])
    qat.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy", metrics=["accuracy"])
    qat.fit(x_train, y_train, epochs=2, batch_size=32, verbose=0)
    return dict(model=model, qat=qat, tflite=tfq.convert(qat, "int8"), weights_before=weights_before,
                layers_before=layers_before)


def coverage_model() -> keras.Model:
    """One model with every layer type the issue lists (two inputs: an image and a sequence)."""
    image = keras.Input((16, 16, 3), name="image")
    seq = keras.Input((16, 3), name="sequence")
    x = L.Rescaling(1.0 / 255.0, name="rescale")(image)
    x = L.Normalization(mean=[0.5, 0.4, 0.3], variance=[0.08, 0.07, 0.09], name="normalize")(x)
    x = L.ZeroPadding2D(1, name="pad")(x)
    x = L.Conv2D(8, 3, use_bias=False, name="conv")(x)
    x = L.BatchNormalization(name="conv_bn")(x)
    x = L.ReLU(name="conv_relu")(x)
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.BatchNormalization(name="dw_bn")(x)
    x = L.ReLU(6.0, name="dw_relu6")(x)
    x = L.SeparableConv2D(8, 3, padding="same", name="sep")(x)
    x = L.BatchNormalization(name="sep_bn")(x)
    x = L.Activation("swish", name="swish")(x)
    a = L.LeakyReLU(0.1, name="leaky")(L.Conv2D(8, 1, name="branch_a")(x))
    b = L.Conv2D(8, 1, activation="sigmoid", name="branch_b")(x)
    c = L.Activation("hard_swish", name="hard_swish")(L.Conv2D(8, 1, name="branch_c")(x))
    d = L.Activation("relu", name="act_relu")(L.Conv2D(8, 1, name="branch_d")(x))
    x = L.Concatenate(name="concat")([
        L.Add(name="add_ab")([a, b]), L.Subtract(name="sub_ac")([a, c]), L.Multiply(name="mul_bc")([b, c]),
        L.Average(name="avg")([a, b, d]),
    ])
    x = L.BatchNormalization(name="standalone_bn")(x)
    x = L.MaxPooling2D(name="maxpool")(x)
    x = L.Conv2DTranspose(8, 3, strides=2, padding="same", name="deconv")(x)
    x = L.BatchNormalization(name="deconv_bn")(x)
    x = L.ReLU(name="deconv_relu")(x)
    x = L.AveragePooling2D(2, name="avgpool")(x)
    x = L.UpSampling2D(interpolation="bilinear", name="upsample")(x)
    x = L.Cropping2D(2, name="crop")(x)
    inner_in = keras.Input((12, 12, 8))
    t = L.Conv2D(8, 3, padding="same", use_bias=False, name="inner_conv")(inner_in)
    t = L.BatchNormalization(name="inner_bn")(t)
    t = L.ReLU(name="inner_relu")(t)
    x = keras.Model(inner_in, t, name="nested_block")(x)
    x = L.Dropout(0.1, name="dropout2d")(x)
    x = x * 0.5 + 0.25  # TF-op (keras.ops) nodes
    g = L.Concatenate(name="pools")([L.GlobalAveragePooling2D(name="gap")(x), L.GlobalMaxPooling2D(name="gmp")(x)])
    f = L.Dense(16, activation="relu", name="img_fc")(L.Flatten(name="flatten")(L.Reshape((-1, 8), name="reshape")(x)))
    s = L.Conv1D(8, 3, padding="causal", name="conv1d")(seq)
    s = L.BatchNormalization(name="conv1d_bn")(s)
    s = L.ReLU(name="conv1d_relu")(s)
    s = L.MaxPooling1D(name="pool1d")(s)
    s = L.GlobalAveragePooling1D(name="gap1d")(s)
    h = L.Concatenate(name="merge")([g, f, s])
    h = L.Dense(16, name="fc")(h)
    h = L.BatchNormalization(name="fc_bn")(h)
    h = L.ReLU(name="fc_relu")(h)
    h = L.Dropout(0.2, name="dropout")(h)
    out = L.Softmax(name="probs")(L.Dense(10, name="logits")(h))
    return keras.Model([image, seq], out, name="coverage")


def _recording_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    return result, [str(w.message) for w in caught if str(w.message).startswith("tfq:")]


# --- 1. digits: QAT from a trained float model ----------------------------------------------------------
def test_digits_qat_int8_keeps_float_accuracy_and_beats_ptq(float_digits, digits, qat_digits):
    model, float_acc = float_digits
    (x_train, _), (x_test, y_test) = digits
    ptq_acc = tflite_accuracy(tfq.convert(model, "int8", x_train[:500]), x_test, y_test)
    qat_acc = tflite_accuracy(qat_digits["tflite"], x_test, y_test)
    info = tfq.inspect_tflite(qat_digits["tflite"])
    assert info.num_float_ops == 0, info.summary()
    print(f"digits accuracy: float {float_acc:.4f}, PTQ int8 {ptq_acc:.4f}, QAT int8 {qat_acc:.4f}")
    assert qat_acc >= float_acc - 0.001, (qat_acc, float_acc)
    assert qat_acc >= ptq_acc, (qat_acc, ptq_acc)


def test_qat_tflite_matches_the_keras_qat_model(digits, qat_digits):
    _, (x_test, _) = digits
    keras_probs = qat_digits["qat"].predict(x_test, verbose=0)
    tflite_probs = tfq.TFLiteModel(qat_digits["tflite"]).predict(x_test)
    assert np.mean(keras_probs.argmax(1) == tflite_probs.argmax(1)) >= 0.99
    assert np.abs(keras_probs - tflite_probs).max() < 0.05


def test_quantize_model_leaves_the_caller_model_untouched(qat_digits):
    model = qat_digits["model"]
    assert [(layer.name, type(layer).__name__) for layer in model.layers] == qat_digits["layers_before"]
    assert all(np.array_equal(a, b) for a, b in zip(qat_digits["weights_before"], model.get_weights()))
    assert not tfq.qat.quantizers_of(model)
    qat_layers = {id(w) for w in qat_digits["qat"].weights}
    assert not qat_layers & {id(w) for w in model.weights}


# --- 2. layer coverage ------------------------------------------------------------------------------------
def test_every_listed_layer_type_trains_and_converts_fully_integer(tmp_path):
    keras.utils.set_random_seed(0)
    model = coverage_model()
    qat, caught = _recording_warnings(tfq.qat.quantize_model, model)
    assert caught == []
    kinds = {type(layer).__name__ for layer in qat.layers}
    assert {"QuantizedLayer", "QuantizedNormalization", "ActivationQuantizer"} <= kinds
    assert "BatchNormalization" not in kinds  # folded, or split into MUL + ADD
    folded = {layer.name: layer for layer in tfq.qat.quantized_layers_of(qat)}
    assert folded["conv"].batchnorm is not None and folded["conv"].activation == "relu"
    assert folded["dw"].activation == "relu6" and folded["conv1d"].batchnorm is not None
    rng = np.random.default_rng(0)
    x = {"image": (rng.random((16, 16, 16, 3)) * 255).astype("float32"),
         "sequence": rng.normal(size=(16, 16, 3)).astype("float32")}
    y = rng.integers(0, 10, 16)
    qat.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    qat.train_on_batch(x, y)
    content = tfq.convert(qat, "int8")
    info = tfq.inspect_tflite(content)
    assert info.num_float_ops == 0, [op.type for op in info.float_ops]
    expected_ops = {"CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED", "LEAKY_RELU", "HARD_SWISH",
                    "LOGISTIC", "ADD", "SUB", "MUL", "CONCATENATION", "MAX_POOL_2D", "AVERAGE_POOL_2D", "MEAN",
                    "REDUCE_MAX", "RESIZE_BILINEAR", "PAD", "SOFTMAX"}
    assert expected_ops <= set(info.op_types), expected_ops - set(info.op_types)
    # Per-channel weights for convolutions and Dense, per tensor for the transposed convolution.
    scales = {}
    for op in info.ops:
        if op.type in ("CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED"):
            scales.setdefault(op.type, []).append(len(info.tensors[op.inputs[1]].scales))
    assert sorted(scales["FULLY_CONNECTED"]) == [10, 16, 16] and scales["TRANSPOSE_CONV"] == [1]
    assert set(scales["CONV_2D"]) == {8}
    # Dense weights are exported float and quantized by the converter with the scale the
    # fake-quant used: max|w| / 127 per output channel.
    fc = next(op for op in info.ops if op.type == "FULLY_CONNECTED" and len(info.tensors[op.inputs[1]].scales) == 10)
    kernel = qat.get_layer("logits").layer.kernel.numpy()
    np.testing.assert_allclose(info.tensors[fc.inputs[1]].scales, np.abs(kernel).max(axis=0) / 127, rtol=1e-6)
    keras_out = qat.predict(x, verbose=0)
    tflite_out = tfq.TFLiteModel(content).predict(x)
    assert np.abs(keras_out - tflite_out).max() <= 2 / 256 + 1e-6
    # EvaluateTFLite takes a multi-input list in Keras order (TFLite orders these inputs otherwise).
    evaluate = tfq.callbacks.EvaluateTFLite([x["image"], x["sequence"]], y)
    evaluate.set_model(qat)
    assert evaluate.evaluate() == pytest.approx(float(np.mean(tflite_out.argmax(1) == y)))
    # Nested model, keras.ops nodes and split layers all survive a save/load in safe mode.
    qat.save(tmp_path / "coverage.keras")
    loaded = keras.models.load_model(tmp_path / "coverage.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), keras_out)


def test_sequential_model_and_shared_conv_output():
    keras.utils.set_random_seed(0)
    seq = keras.Sequential([keras.Input((12,)), L.Dense(16), L.BatchNormalization(), L.ReLU(), L.Dropout(0.1),
                            L.Dense(3, activation="softmax")])
    qat = tfq.qat.quantize_model(seq)
    assert [type(layer).__name__ for layer in qat.layers if not isinstance(layer, L.InputLayer)] == [
        "ActivationQuantizer", "QuantizedLayer", "Dropout", "QuantizedLayer"]
    # A conv whose output also feeds another branch: its BN cannot be folded (the converter would
    # keep the conv output), so it stays one conv and the BN becomes MUL + ADD.
    inputs = keras.Input((8, 8, 3))
    conv = L.Conv2D(4, 3, name="conv")(inputs)
    out = L.Add()([L.BatchNormalization(name="bn")(conv), L.ReLU(name="relu")(conv)])
    qat = tfq.qat.quantize_model(keras.Model(inputs, out))
    names = [layer.name for layer in qat.layers]
    assert names.count("conv") == 1 and isinstance(qat.get_layer("bn"), QuantizedNormalization)
    assert qat.get_layer("conv").batchnorm is None and qat.get_layer("conv").activation == "linear"


def test_custom_layer_is_decomposed_into_the_ops_it_calls():
    class ScaleShift(keras.layers.Layer):
        def call(self, x):
            return 2.0 * x + 1.0

    inputs = keras.Input((6,))
    x = L.Dense(4, name="fc")(inputs)
    x = ScaleShift(name="scale_shift")(x)
    model = keras.Model(inputs, L.Dense(2, name="out")(x))
    data = np.random.default_rng(0).normal(size=(64, 6)).astype("float32")
    qat, caught = _recording_warnings(tfq.qat.quantize_model, model, calibration_data=data)
    assert caught == []
    quantizers = tfq.qat.quantizers_of(qat)
    assert {"scale_shift_multiply_fq", "scale_shift_add_fq"} <= set(quantizers)
    # The ranges are those of 2·h and 2·h + 1, h the Dense output on the calibration data.
    h = data @ model.get_layer("fc").kernel.numpy() + model.get_layer("fc").bias.numpy()
    for name, values in (("scale_shift_multiply_fq", 2 * h), ("scale_shift_add_fq", 2 * h + 1)):
        lo, hi = quantizers[name].current_range()
        assert lo == pytest.approx(min(values.min(), 0.0), rel=1e-5, abs=1e-6)
        assert hi == pytest.approx(max(values.max(), 0.0), rel=1e-5)
    info = tfq.inspect_tflite(tfq.convert(qat, "int8"))  # every tensor has a tfq range: no data needed
    assert info.num_float_ops == 0 and {"MUL", "ADD"} <= set(info.op_types)


class _TFOpsLayer(keras.layers.Layer):
    """Calls TensorFlow directly: tfq cannot trace it on symbolic tensors, so it stays whole."""

    def call(self, x):
        return tf.nn.relu6(x) * tf.math.sigmoid(x)


def _tf_ops_model():
    inputs = keras.Input((6,))
    x = _TFOpsLayer(name="t1")(L.Dense(8, name="fc")(inputs))
    x = _TFOpsLayer(name="t2")(L.Dense(8, name="fc2")(x))
    return keras.Model(inputs, L.Dense(3, name="out")(x))


def test_untraceable_layer_is_kept_whole_and_the_converter_calibrates_inside():
    keras.utils.set_random_seed(0)
    model = _tf_ops_model()
    data = np.random.default_rng(0).normal(size=(128, 6)).astype("float32")
    qat, caught = _recording_warnings(tfq.qat.quantize_model, model, calibration_data=data)
    assert len(caught) == 1  # one warning for the class, naming both layers and the fix
    assert "_TFOpsLayer" in caught[0] and "'t1'" in caught[0] and "'t2'" in caught[0]
    assert "register_layer(_TFOpsLayer, 'composite', decompose=" in caught[0]
    assert not any(isinstance(layer, FloatBarrier) for layer in qat.layers)
    with pytest.raises(ValueError, match=r"'t1' \(_TFOpsLayer\).*representative_data"):
        tfq.convert(qat, "int8")
    info = tfq.inspect_tflite(tfq.convert(qat, "int8", representative_data=data))
    assert info.num_float_ops == 0 and "LOGISTIC" in info.op_types
    # The fix the warning suggests works: a decomposition makes every range tfq's.
    try:
        tfq.qat.register_layer(_TFOpsLayer, "composite",
                               decompose=lambda layer, x: keras.ops.relu6(x) * keras.ops.sigmoid(x))
        qat, caught = _recording_warnings(tfq.qat.quantize_model, model, calibration_data=data)
        assert caught == []
        assert "t1_multiply_fq" in tfq.qat.quantizers_of(qat)
        assert tfq.inspect_tflite(tfq.convert(qat, "int8")).num_float_ops == 0
        # A decomposition that computes something else is refused by name.
        tfq.qat.register_layer(_TFOpsLayer, "composite", decompose=lambda layer, x: keras.ops.relu(x))
        with pytest.raises(ValueError, match=r"decomposition registered for _TFOpsLayer.*'t1'"):
            tfq.qat.quantize_model(model)
    finally:
        tfq.qat.unregister_layer(_TFOpsLayer)


def test_activation_without_int8_rule_is_left_to_the_converter():
    inputs = keras.Input((6,))
    x = L.Dense(4, activation="elu", name="fc")(inputs)
    x = L.Activation("softplus", name="soft")(x)
    model = keras.Model(inputs, x)
    qat, caught = _recording_warnings(tfq.qat.quantize_model, model)
    assert len(caught) == 1 and "'fc_elu'" in caught[0] and "'soft'" in caught[0] and "Activation" in caught[0]
    assert qat.get_layer("fc").activation == "linear"  # the int8 Dense, then the ELU as its own op
    assert not any(isinstance(layer, FloatBarrier) for layer in qat.layers)
    data = np.random.default_rng(0).normal(size=(64, 6)).astype("float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = tfq.inspect_tflite(tfq.convert(model, "int8", data))
    # TFLite has no int8 ELU kernel: that one op stays float, named in one warning; softplus is int8.
    assert [op.type for op in info.float_ops] == ["ELU"]
    messages = [str(w.message) for w in caught if "stay float because" in str(w.message)]
    assert len(messages) == 1 and "ELU in fc" in messages[0]


# --- 3. training maths ------------------------------------------------------------------------------------
def test_moving_average_ranges_follow_the_formula():
    q = ActivationQuantizer(mode="moving_average", decay=0.9)
    q.build(None)
    batches = [np.float32([[-1.0, 2.0]]), np.float32([[-3.0, 1.0]]), np.float32([[0.5, 4.0]])]
    x0 = batches[0]
    np.testing.assert_array_equal(q(x0, training=False), x0)  # no range yet: identity
    lo, hi = None, None
    for batch in batches:
        q(batch, training=True)
        bmin, bmax = float(batch.min()), float(batch.max())
        lo, hi = (bmin, bmax) if lo is None else (0.9 * lo + 0.1 * bmin, 0.9 * hi + 0.1 * bmax)
        assert float(q.range_min.numpy()) == pytest.approx(lo, rel=1e-6)
        assert float(q.range_max.numpy()) == pytest.approx(hi, rel=1e-6)
    q(batches[0], training=False)  # inference never updates
    q.frozen.assign(1.0)
    q(np.float32([[-50.0, 50.0]]), training=True)  # frozen: unchanged
    assert float(q.range_min.numpy()) == pytest.approx(lo) and float(q.range_max.numpy()) == pytest.approx(hi)
    # The forward pass is TF's fake-quant on the (0-including) range: check one value by hand.
    nlo, nhi = min(lo, 0.0), hi
    scale = (nhi - nlo) / 255
    zero_point = round(-nlo / scale)
    expected = (round(1.234 / scale + zero_point) - zero_point) * scale
    assert float(q(np.float32([[1.234]]), training=False)[0, 0]) == pytest.approx(expected, abs=1e-3 * scale + 1e-6)


def test_straight_through_gradients_reach_weights_and_learned_ranges():
    # Weights: d/dW sum(x @ fq(W)) is x summed, exactly as without fake-quant (straight through).
    dense = L.Dense(3, use_bias=False)
    layer = QuantizedLayer(dense, output_quantizer=None)
    x = tf.constant(np.random.default_rng(0).normal(size=(5, 4)).astype("float32"))
    layer(x)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x, training=True))
    (grad,) = tape.gradient(loss, [dense.kernel.value])
    np.testing.assert_allclose(grad.numpy(), np.repeat(x.numpy().sum(0)[:, None], 3, axis=1), rtol=1e-5)
    # Learned ranges: inputs inside the range pass the gradient to x; clipped ones pass it to min/max.
    q = ActivationQuantizer(mode="learned", fixed_range=(-1.0, 1.0))
    q.build(None)
    assert {id(v) for v in q.trainable_weights} == {id(q.range_min), id(q.range_max)}
    values = tf.constant([[-3.0, -2.0, -0.5, 0.0, 0.25, 0.5, 2.0]])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(values)
        out = tf.reduce_sum(q(values, training=True))
    np.testing.assert_array_equal(tape.gradient(out, values).numpy(), [[0, 0, 1, 1, 1, 1, 0]])
    assert float(tape.gradient(out, q.range_min.value)) == pytest.approx(2.0)  # two values below min
    assert float(tape.gradient(out, q.range_max.value)) == pytest.approx(1.0)  # one above max


def test_folded_batchnorm_training_matches_keras_conv_then_batchnorm():
    """With float weights and no quantizers, the folded layer must equal Conv → BN exactly."""
    rng = np.random.default_rng(1)
    conv = L.Conv2D(4, 3, use_bias=True)
    bn = L.BatchNormalization(momentum=0.8)
    x = rng.normal(size=(6, 7, 7, 3)).astype("float32")
    ref_conv, ref_bn = L.Conv2D(4, 3, use_bias=True), L.BatchNormalization(momentum=0.8)
    ref_bn(ref_conv(x))
    conv.build(x.shape)
    conv.set_weights(ref_conv.get_weights())
    conv.bias.assign(rng.normal(size=4).astype("float32"))  # a bias, so the batch mean includes it
    ref_conv.bias.assign(conv.bias)
    bn.build((None, 5, 5, 4))
    stats = [rng.uniform(0.5, 2.0, 4), rng.normal(size=4), rng.normal(size=4), rng.uniform(0.5, 2.0, 4)]
    bn.set_weights([s.astype("float32") for s in stats])
    ref_bn.set_weights([s.astype("float32") for s in stats])
    folded = QuantizedLayer(conv, batchnorm=bn, float_weights=True, output_quantizer=None)
    for training in (True, False):
        ours = folded(x, training=training).numpy()
        theirs = ref_bn(ref_conv(x), training=training).numpy()
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.moving_mean.numpy(), ref_bn.moving_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), ref_bn.moving_variance.numpy(), rtol=1e-5, atol=1e-6)
    folded.bn_frozen = True
    before = bn.moving_mean.numpy().copy()
    np.testing.assert_allclose(folded(x, training=True).numpy(), folded(x, training=False).numpy(),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), before)


def test_calibration_initialises_ranges_and_training_without_it_starts_from_the_first_batch(digits):
    (x_train, _), _ = digits
    model = tfq.examples.digits_cnn(input_shape=x_train.shape[1:])
    calib = x_train[:200]
    qat = tfq.qat.quantize_model(model, calibration_data=calib)
    ranges = {n: q.current_range() for n, q in tfq.qat.quantizers_of(qat).items() if q.mode != "fixed"}
    reference = tfq.calibrate(model, calib, method="minmax", recipe="qat_int8")
    assert ranges.keys() == reference.ranges.keys()
    assert ranges["image_fq"] == pytest.approx((float(calib.min()), float(calib.max())))
    for name, (lo, hi) in reference.ranges.items():
        assert ranges[name] == pytest.approx((min(lo, 0.0), max(hi, 0.0)), rel=1e-6, abs=1e-7), name
    plain = tfq.qat.quantize_model(model)
    quantizers = [q for q in tfq.qat.quantizers_of(plain).values() if q.mode != "fixed"]
    assert all(float(q.initialized.numpy()) == 0.0 for q in quantizers)
    with pytest.raises(ValueError, match="needs representative_data"):
        tfq.convert(plain, "int8")
    plain(x_train[:32], training=True)
    assert plain.get_layer("image_fq").current_range() == pytest.approx(
        (float(x_train[:32].min()), float(x_train[:32].max())))


def test_learned_ranges_train_then_freeze(digits, float_digits):
    model, _ = float_digits
    (x_train, y_train), (x_test, y_test) = digits
    keras.utils.set_random_seed(0)
    qat = tfq.qat.quantize_model(model, range_mode="learned", calibration_data=x_train[:200])
    ranges_vars = [v for q in tfq.qat.quantizers_of(qat).values() if q.mode == "learned"
                   for v in (q.range_min, q.range_max)]
    assert ranges_vars and all(v.trainable for v in ranges_vars)
    snapshots = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: snapshots.append([float(v.numpy()) for v in ranges_vars]))
    start = [float(v.numpy()) for v in ranges_vars]
    qat.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    qat.fit(x_train[:512], y_train[:512], epochs=2, batch_size=64, verbose=0,
            callbacks=[tfq.callbacks.FreezeQuantizerRanges(1), record])
    assert not np.allclose(snapshots[0], start)  # gradients moved the ranges in epoch 0 …
    assert snapshots[1] == snapshots[0]  # … and not after the freeze
    assert not any(v.trainable for v in ranges_vars)
    assert tflite_accuracy(tfq.convert(qat, "int8"), x_test, y_test) > 0.9


# --- 4. callbacks -----------------------------------------------------------------------------------------
def test_callbacks_freeze_export_and_evaluate_from_plain_fit(float_digits, digits, tmp_path):
    model, _ = float_digits
    (x_train, y_train), (x_test, y_test) = digits
    keras.utils.set_random_seed(0)
    qat = tfq.qat.quantize_model(model, calibration_data=x_train[:200], decay=0.9)
    bn_layers = [layer for layer in tfq.qat.quantized_layers_of(qat) if layer.batchnorm is not None]
    quantizers = [q for q in tfq.qat.quantizers_of(qat).values() if q.mode != "fixed"]
    assert len(bn_layers) == 2

    def snapshot():
        return dict(mean=[layer.batchnorm.moving_mean.numpy().copy() for layer in bn_layers],
                    gamma=[layer.batchnorm.gamma.numpy().copy() for layer in bn_layers],
                    ranges=[q.current_range() for q in quantizers])

    snaps = [snapshot()]
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: snaps.append(snapshot()))
    evaluate = tfq.callbacks.EvaluateTFLite(x_test, y_test)
    export = tfq.callbacks.ExportTFLite(tmp_path / "ckpt_{epoch:02d}.tflite")
    qat.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy", metrics=["accuracy"])
    history = qat.fit(x_train[:512], y_train[:512], epochs=2, batch_size=64, verbose=0, callbacks=[
        tfq.callbacks.FreezeBatchNorm(1), tfq.callbacks.FreezeQuantizerRanges(1), evaluate, export, record])
    first, second = snaps[1], snaps[2]
    assert not all(np.array_equal(a, b) for a, b in zip(snaps[0]["mean"], first["mean"]))  # live in epoch 0
    assert all(np.array_equal(a, b) for a, b in zip(first["mean"], second["mean"]))  # frozen in epoch 1
    assert not all(np.array_equal(a, b) for a, b in zip(first["gamma"], second["gamma"]))  # γ still trains
    assert snaps[0]["ranges"] != first["ranges"] and first["ranges"] == second["ranges"]
    assert all(layer.bn_frozen for layer in bn_layers)
    assert sorted(os.listdir(tmp_path)) == ["ckpt_01.tflite", "ckpt_02.tflite"]
    assert export.paths == [str(tmp_path / "ckpt_01.tflite"), str(tmp_path / "ckpt_02.tflite")]
    last = (tmp_path / "ckpt_02.tflite").read_bytes()
    assert tfq.inspect_tflite(last).num_float_ops == 0
    accuracies = history.history["tflite_int8_accuracy"]
    assert len(accuracies) == 2 and [e for e, _ in evaluate.history] == [0, 1]
    assert accuracies[-1] == pytest.approx(tflite_accuracy(last, x_test, y_test))
    assert accuracies[-1] > 0.9


def test_freeze_batchnorm_covers_standalone_and_float_batchnorms():
    inputs = keras.Input((6,))
    a = L.Dense(8, name="fc_a")(inputs)
    b = L.Dense(8, name="fc_b")(inputs)
    x = L.BatchNormalization(name="standalone")(L.Add(name="add")([a, b]))  # MUL + ADD, quantized
    x = L.BatchNormalization(name="kept_float")(L.Dense(8, name="fc_c")(x))
    model = keras.Model(inputs, L.Dense(2, name="out")(x))
    recipe = dataclasses.replace(tfq.load_recipe("qat_int8"), float_layers=("kept_float",))
    qat = tfq.qat.quantize_model(model, recipe)
    standalone, kept = qat.get_layer("standalone"), qat.get_layer("kept_float")
    assert isinstance(standalone, QuantizedNormalization) and type(kept) is L.BatchNormalization
    assert {id(layer) for layer in tfq.qat.batchnorm_layers_of(qat)} == {id(standalone), id(kept)}
    rng = np.random.default_rng(0)
    x_data, y_data = rng.normal(size=(256, 6)).astype("float32"), rng.integers(0, 2, 256)
    stats = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: stats.append(
        [standalone.layer.moving_mean.numpy().copy(), kept.moving_mean.numpy().copy()]))
    qat.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    qat.fit(x_data, y_data, epochs=3, batch_size=32, verbose=0, callbacks=[tfq.callbacks.FreezeBatchNorm(2), record])
    assert not np.array_equal(stats[0][0], stats[1][0]) and not np.array_equal(stats[0][1], stats[1][1])
    np.testing.assert_array_equal(stats[1][0], stats[2][0])
    np.testing.assert_array_equal(stats[1][1], stats[2][1])
    assert standalone.bn_frozen and not kept.trainable


def test_callback_arguments_are_validated(tmp_path):
    with pytest.raises(ValueError, match="epoch must be an integer >= 0"):
        tfq.callbacks.FreezeBatchNorm(-1)
    with pytest.raises(ValueError, match="Received: epoch=1.5"):
        tfq.callbacks.FreezeQuantizerRanges(1.5)
    with pytest.raises(ValueError, match="every_n_epochs"):
        tfq.callbacks.ExportTFLite(tmp_path / "m.tflite", every_n_epochs=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tfq.callbacks.ExportTFLite(tmp_path / "missing" / "m.tflite")
    with pytest.raises(ValueError, match="same length"):
        tfq.callbacks.EvaluateTFLite(np.zeros((4, 8, 8, 1)), np.zeros(3))
    with pytest.raises(ValueError, match="at least one sample"):
        tfq.callbacks.EvaluateTFLite(np.zeros((0, 8, 8, 1)), np.zeros(0))
    export = tfq.callbacks.ExportTFLite(tmp_path / "m_{val_accuracy:.2f}.tflite")
    with pytest.raises(ValueError, match="does not format"):
        export._path(0, {"loss": 1.0})


# --- 5. save / load ---------------------------------------------------------------------------------------
def test_save_and_load_round_trip(qat_digits, digits, tmp_path):
    qat = qat_digits["qat"]
    _, (x_test, _) = digits
    conv = qat.get_layer("conv1")
    conv.bn_frozen = True
    try:
        path = tmp_path / "qat.keras"
        qat.save(path)
        loaded = keras.models.load_model(path, safe_mode=True)  # no lambdas: loads in safe mode
        np.testing.assert_array_equal(loaded.predict(x_test, verbose=0), qat.predict(x_test, verbose=0))
        assert len(loaded.weights) == len(qat.weights)
        assert all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), qat.get_weights()))
        assert loaded.get_layer("conv1").bn_frozen is True
        assert tfq.convert(loaded, "int8") == qat_digits["tflite"]
        # A fresh process: `import tfq` (which does not load TensorFlow) then Keras, as a user
        # does; tfq's layers register when Keras loads, so load_model finds them.
        np.save(tmp_path / "x.npy", x_test[:16])
        code = textwrap.dedent(f"""
            import sys, numpy as np
            import tfq
            assert "tensorflow" not in sys.modules
            import keras
            m = keras.models.load_model({str(path)!r}, safe_mode=True)
            np.save({str(tmp_path / "y.npy")!r}, m.predict(np.load({str(tmp_path / "x.npy")!r}), verbose=0))
        """)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), qat.predict(x_test[:16], verbose=0))
    finally:
        conv.bn_frozen = False
    # Every tfq class: get_config → from_config → the same config.
    for layer in [qat.get_layer("conv1"), qat.get_layer("image_fq"), qat.get_layer("fc1")]:
        config = layer.get_config()
        assert type(layer).from_config(config).get_config() == config
    norm = QuantizedNormalization(L.BatchNormalization(), output_quantizer={"mode": "moving_average"},
                                  intermediate_quantizer={"mode": "moving_average"})
    assert QuantizedNormalization.from_config(norm.get_config()).get_config() == norm.get_config()


# --- 6. tf.distribute -------------------------------------------------------------------------------------
def test_mirrored_strategy_on_two_cpus_trains_and_converts(distribute_run):
    stdout, stderr = distribute_run.communicate(timeout=600)
    assert distribute_run.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    # Ranges and BN statistics stay identical on both replicas (synchronised updates).
    for name, values in result["ranges"].items():
        assert values[0] == values[1] and values[2] == values[3], name
    assert all(np.array_equal(a, b) for a, b in result["stats"])
    assert result["ranges_moved"]
    assert result["float_ops"] == 0
    assert result["accuracy"] > 0.9 and result["agreement"] >= 0.99


def test_softmax_input_quantizer_moving_average_follows_the_formula():
    q = ActivationQuantizer(mode="moving_average", decay=0.9, calibration="softmax_input")
    q.build(None)
    rng = np.random.default_rng(0)
    lo = hi = None
    for scale in (3.0, 10.0, 1.0):
        batch = (rng.standard_normal((16, 10)) * scale).astype(np.float32)
        q(batch, training=True)
        blo, bhi = tfq.ops.softmax_input_range_numpy(batch)
        lo, hi = (blo, bhi) if lo is None else (0.9 * lo + 0.1 * blo, 0.9 * hi + 0.1 * bhi)
        assert float(q.range_min.numpy()) == pytest.approx(lo, rel=1e-5)
        assert float(q.range_max.numpy()) == pytest.approx(hi, rel=1e-5)
    assert ActivationQuantizer.from_config(q.get_config()).calibration == "softmax_input"
    with pytest.raises(ValueError, match="calibration must be one of .* Received: calibration='kl'"):
        ActivationQuantizer(calibration="kl")


def test_logits_range_softmax_calibrates_trains_and_exports_the_softmax_input_range(float_digits, digits):
    model, _ = float_digits
    (x_train, y_train), (x_test, y_test) = digits
    calib = x_train[:300]
    # The logits through an independent path: the float model with a linear last layer.
    logits_model = keras.models.clone_model(model)
    logits_model.set_weights(model.get_weights())
    logits_model.layers[-1].activation = keras.activations.linear
    logits = logits_model.predict(calib, verbose=0)
    expected = tfq.ops.softmax_input_range_numpy(logits)
    plain = tfq.qat.quantize_model(model, calibration_data=calib)  # logits_range="tensor", the default
    qat = tfq.qat.quantize_model(model, calibration_data=calib, logits_range="softmax")
    q, q_plain = (tfq.qat.quantizers_of(m)["probs_pre_activation_fq"] for m in (qat, plain))
    assert q.calibration == "softmax_input" and q_plain.calibration is None
    assert q.current_range() == pytest.approx((min(expected[0], 0.0), expected[1]), rel=1e-5, abs=1e-6)
    assert q_plain.current_range() == pytest.approx((min(logits.min(), 0.0), logits.max()), rel=1e-5, abs=1e-6)
    assert q.current_range()[1] - q.current_range()[0] < 0.8 * (q_plain.current_range()[1] - q_plain.current_range()[0])
    others = [n for n in tfq.qat.quantizers_of(qat) if n != "probs_pre_activation_fq"]
    assert all(tfq.qat.quantizers_of(qat)[n].calibration != "softmax_input" for n in others)
    keras.utils.set_random_seed(0)
    qat.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy")
    qat.fit(x_train[:256], y_train[:256], epochs=1, batch_size=32, verbose=0)
    lo, hi = q.current_range()
    content = tfq.convert(qat, "int8")
    softmax = [op for op in tfq.inspect_tflite(content).ops if op.type == "SOFTMAX"]
    assert len(softmax) == 1
    from ai_edge_litert.interpreter import Interpreter

    details = {d["index"]: d for d in Interpreter(model_content=content).get_tensor_details()}
    scale, zero_point = details[softmax[0].inputs[0]]["quantization"]
    assert scale == pytest.approx((hi - lo) / 255, rel=1e-3)  # the logits' int8 grid is the trained range
    assert zero_point == pytest.approx(-128 - lo / scale, abs=1.0)
    # The INT8 model agrees with the Keras QAT model (its fake-quant forward) on the test digits.
    keras_pred = qat.predict(x_test, verbose=0).argmax(1)
    assert tflite_accuracy(content, x_test, keras_pred) >= 0.99
    assert tflite_accuracy(content, x_test, y_test) >= 0.9
    with pytest.raises(ValueError, match="logits_range must be one of .* Received: logits_range='minmax'"):
        tfq.qat.quantize_model(model, logits_range="minmax")
