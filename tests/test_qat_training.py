"""QAT training paths: the BatchNorm folding modes, frozen-BN tracing, mixed precision.

Folding modes are checked against Keras' own Conv → BatchNormalization (float weights, so the
results must agree to float32 rounding); mixed-precision QAT is checked by exporting and running
the INT8 model through LiteRT against a float32-policy run from the same weights.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfq
import tfq.callbacks
import tfq.qat
from tfq.quantsim.layers import BN_FOLDING, QuantizedLayer, QuantizedNormalization

L = keras.layers


def _layer_and_reference(kind: str, rng):
    """(our copy, Keras reference) of a weighted layer with a bias, an input, the BN input shape and channels."""
    if kind == "conv":
        make, x, channels = (lambda: L.Conv2D(4, 3)), rng.normal(size=(6, 7, 7, 3)), 4
    elif kind == "depthwise":
        make, x, channels = (lambda: L.DepthwiseConv2D(3)), rng.normal(size=(6, 7, 7, 3)), 3
    else:
        make, x, channels = (lambda: L.Dense(4)), rng.normal(size=(16, 5)), 4
    x = x.astype("float32")
    ours, ref = make(), make()
    ref(x)
    ours.build(x.shape)
    ours.set_weights(ref.get_weights())
    ours.bias.assign(rng.normal(size=channels).astype("float32"))  # a bias: the batch mean includes it
    ref.bias.assign(ours.bias)
    return ours, ref, x, channels


def _batchnorms(channels: int, shape, rng, axis: int = -1):
    bn, ref = L.BatchNormalization(axis=axis, momentum=0.8), L.BatchNormalization(axis=axis, momentum=0.8)
    bn.build(shape)
    ref.build(shape)
    gamma = rng.uniform(0.5, 2.0, channels) * np.where(np.arange(channels) % 2, -1.0, 1.0)  # negative γ too
    stats = [gamma, rng.normal(size=channels), rng.normal(size=channels), rng.uniform(0.5, 2.0, channels)]
    bn.set_weights([s.astype("float32") for s in stats])
    ref.set_weights([s.astype("float32") for s in stats])
    return bn, ref


@pytest.mark.parametrize("mode", BN_FOLDING)
@pytest.mark.parametrize("kind", ["conv", "depthwise", "dense"])
def test_every_folding_mode_trains_as_keras_layer_then_batchnorm(mode, kind):
    rng = np.random.default_rng(1)
    layer, ref_layer, x, channels = _layer_and_reference(kind, rng)
    bn, ref_bn = _batchnorms(channels, ref_layer(x).shape, rng)
    folded = QuantizedLayer(layer, batchnorm=bn, float_weights=True, output_quantizer=None, bn_folding=mode)
    for training in (True, False):  # batch statistics, then the moving ones (the exported, folded form)
        np.testing.assert_allclose(folded(x, training=training).numpy(),
                                   ref_bn(ref_layer(x), training=training).numpy(), rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(bn.moving_mean.numpy(), ref_bn.moving_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), ref_bn.moving_variance.numpy(), rtol=1e-6, atol=1e-6)
    # Freezing through the variable inside a step traced before the freeze: moving statistics are
    # used and kept, exactly as the folded inference form.
    step = tf.function(lambda v: folded(v, training=True))
    step(x)
    folded.bn_frozen_flag.assign(1.0)
    before = [bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()]
    np.testing.assert_allclose(step(x).numpy(), folded(x, training=False).numpy(), rtol=1e-5, atol=2e-6)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), before[0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), before[1])


@pytest.mark.parametrize("kind", ["conv", "depthwise", "dense"])
def test_unfolded_gradients_are_keras_conv_then_batchnorm_gradients_live_and_frozen(kind):
    """The unfolded BN's written-out gradient equals autodiff through Keras' layers, with the batch
    moments (live) and, frozen through the variable in a step traced live, with the moving ones."""
    rng = np.random.default_rng(7)
    layer, ref_layer, x, channels = _layer_and_reference(kind, rng)
    x = x + 3.0  # a mean far from 0: the centred gradient must not cancel
    bn, ref_bn = _batchnorms(channels, ref_layer(x).shape, rng)
    folded = QuantizedLayer(layer, batchnorm=bn, float_weights=True, output_quantizer=None)
    upstream = tf.constant(rng.normal(size=ref_layer(x).shape).astype("float32"))
    step = tf.function(lambda v: folded(v, training=True))
    for frozen in (False, True):
        if frozen:
            folded.bn_frozen_flag.assign(1.0)  # the variable only: `step` stays the live trace
            ref_bn.trainable = False  # Keras: moving statistics in training
        v = tf.constant(x)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(v)
            ours = tf.reduce_sum(step(v) * upstream)
            theirs = tf.reduce_sum(ref_bn(ref_layer(v), training=True) * upstream)
        pairs = {"input": (v, v), "kernel": (layer.kernel, ref_layer.kernel), "bias": (layer.bias, ref_layer.bias),
                 "gamma": (bn.gamma, ref_bn.gamma), "beta": (bn.beta, ref_bn.beta)}
        if frozen:
            del pairs["gamma"], pairs["beta"]  # Keras' BN with trainable=False gives γ, β no gradient
        scale = float(tf.reduce_sum(tf.abs(upstream))) / channels  # a channel's share: the bias gradient is 0 live
        for name, (a, b) in pairs.items():
            np.testing.assert_allclose(tape.gradient(ours, a).numpy(), tape.gradient(theirs, b).numpy(), rtol=1e-4,
                                       atol=1e-5 * scale, err_msg=f"frozen={frozen} {name}")
        np.testing.assert_allclose(bn.moving_mean.numpy(), ref_bn.moving_mean.numpy(), rtol=1e-6, atol=1e-6)


def test_frozen_statistics_survive_a_non_finite_batch_in_a_step_traced_live():
    rng = np.random.default_rng(8)
    layer, ref_layer, x, channels = _layer_and_reference("conv", rng)
    bn, _ = _batchnorms(channels, ref_layer(x).shape, rng)
    folded = QuantizedLayer(layer, batchnorm=bn, float_weights=True, output_quantizer=None)
    step = tf.function(lambda v: folded(v, training=True))
    step(x)
    folded.bn_frozen_flag.assign(1.0)
    before = [bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()]
    x = x.copy()
    x[0, 0, 0, 0] = np.inf  # the batch moments are inf/NaN; the frozen ones must not take any of it
    step(x)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), before[0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), before[1])


@pytest.mark.parametrize("axis", [-1, 1])
def test_standalone_batchnorm_trains_as_keras_live_and_frozen_in_a_step_traced_live(axis):
    """The standalone BN wrapper (no quantizers) against Keras' BatchNormalization: outputs, moving
    statistics and gradients, live and then frozen through the variable inside the live trace (the
    flag selects the statistics, no cond); a non-finite batch after the freeze leaves them exact."""
    rng = np.random.default_rng(9)
    channels = 3
    x = (rng.normal(size=(6, 5, 5, channels) if axis == -1 else (6, channels, 5, 5)) + 3.0).astype("float32")
    bn, ref = _batchnorms(channels, x.shape, rng, axis)
    norm = QuantizedNormalization(bn, intermediate_quantizer=None, output_quantizer=None)
    upstream = tf.constant(rng.normal(size=x.shape).astype("float32"))
    step = tf.function(lambda v: norm(v, training=True))
    assert not {"If", "StatelessIf"} & set(_op_types(norm, x))
    for frozen in (False, True):
        if frozen:
            norm.bn_frozen_flag.assign(1.0)
            ref.trainable = False  # Keras: moving statistics in training, γ and β without gradient
        v = tf.constant(x)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(v)
            ours = step(v)
            theirs = ref(v, training=True)
            loss_ours, loss_theirs = tf.reduce_sum(ours * upstream), tf.reduce_sum(theirs * upstream)
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-5, err_msg=f"frozen={frozen}")
        pairs = {"input": (v, v)} if frozen else {"input": (v, v), "gamma": (bn.gamma, ref.gamma),
                                                   "beta": (bn.beta, ref.beta)}
        for name, (a, b) in pairs.items():
            np.testing.assert_allclose(tape.gradient(loss_ours, a).numpy(), tape.gradient(loss_theirs, b).numpy(),
                                       rtol=1e-4, atol=1e-4, err_msg=f"frozen={frozen} {name}")
        np.testing.assert_allclose(bn.moving_mean.numpy(), ref.moving_mean.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(bn.moving_variance.numpy(), ref.moving_variance.numpy(), rtol=1e-6, atol=1e-6)
    before = [bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()]
    x[0, 0, 0, 0] = np.inf
    step(x)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), before[0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), before[1])


def test_unfolded_training_sees_the_weights_the_folded_layer_exports():
    """Per output channel, fq(W)·γ/σ = fq(W·γ/σ): the channel's scale absorbs the factor."""
    rng = np.random.default_rng(2)
    layer, ref_layer, x, channels = _layer_and_reference("conv", rng)
    bn, _ = _batchnorms(channels, ref_layer(x).shape, rng)
    unfolded = QuantizedLayer(layer, batchnorm=bn, output_quantizer=None, bn_folding="unfolded")
    unfolded(x, training=False)
    unfolded.bn_frozen_flag.assign(1.0)  # variable only: the traced training graph stays unfolded
    trained_form = tf.function(lambda v: unfolded(v, training=True))(x).numpy()
    exported_form = unfolded(x, training=False).numpy()  # conv on fq(W·γ/σ), as in the .tflite
    np.testing.assert_allclose(trained_form, exported_form, rtol=1e-5, atol=1e-5)
    # A weight step of the grid is far larger than that difference: the grids are the same.
    step = np.abs(layer.kernel.numpy()).max() / 127
    assert np.abs(trained_form - exported_form).max() < 1e-3 * step * np.abs(x).sum(axis=(1, 2, 3)).max()


def test_per_tensor_unfolded_trains_as_keras_on_the_folded_quantized_weights():
    """Per-tensor weights run the folded op on fq(W·γ/σ): BN then normalises x ⊛ W' + b, with
    W' = fq(W·γ/σ)·σ/γ the effective weights, exactly as Keras' Conv(W') → BatchNormalization."""
    rng = np.random.default_rng(3)
    layer, ref_layer, x, channels = _layer_and_reference("conv", rng)
    bn, ref_bn = _batchnorms(channels, ref_layer(x).shape, rng)
    q = QuantizedLayer(layer, batchnorm=bn, output_quantizer=None, per_channel=False)
    factor = (bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)).astype("float32")
    folded = layer.kernel.numpy() * factor
    m = np.abs(folded).max()
    effective = tfq.ops.fake_quant_numpy(folded, -m, m, narrow_range=True) / factor
    ref_layer.kernel.assign(effective)
    np.testing.assert_allclose(q(x, training=True).numpy(), ref_bn(ref_layer(x), training=True).numpy(),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.moving_mean.numpy(), ref_bn.moving_mean.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), ref_bn.moving_variance.numpy(), rtol=1e-5, atol=1e-5)


def _op_types(layer, x) -> list[str]:
    """Op types of a training call's graph, with those of its cond branches (function library)."""
    graph = tf.function(lambda v: layer(v, training=True)).get_concrete_function(x).graph
    types = [op.type for op in graph.get_operations()]
    for function in graph.as_graph_def().library.function:
        types += [node.op for node in function.node_def]
    return types


def test_frozen_layers_are_traced_without_batch_statistics_and_fit_retraces_once(trained_cnn, digits):
    rng = np.random.default_rng(5)
    layer, ref_layer, x, channels = _layer_and_reference("conv", rng)
    bn, _ = _batchnorms(channels, ref_layer(x).shape, rng)
    q = QuantizedLayer(layer, batchnorm=bn, output_quantizer=None)
    live = _op_types(q, x)
    # one conv; the batch moments, selected against the moving ones on the frozen flag (no cond, no
    # function call per layer); the moving statistics are updated
    assert live.count("Conv2D") == 1 and live.count("Mean") == 2 and "AssignVariableOp" in live
    assert "SelectV2" in live and not {"If", "StatelessIf", "FusedBatchNormV3"} & set(live)
    q.bn_frozen = True
    frozen = _op_types(q, x)
    assert frozen.count("Conv2D") == 1 and "AssignVariableOp" not in frozen
    assert not {"If", "StatelessIf", "FusedBatchNormV3", "Mean", "SelectV2"} & set(frozen)

    model, _ = trained_cnn
    (x_train, y_train), _ = digits
    qat = tfq.qat.quantize_model(model, calibration_data=x_train[:128])
    qat.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy")
    functions = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: functions.append(qat.train_function))
    qat.fit(x_train[:128], y_train[:128], epochs=3, batch_size=64, verbose=0,
            callbacks=[tfq.callbacks.FreezeBatchNorm(1), record])
    assert functions[0] is not functions[1] and functions[1] is functions[2]  # one re-trace, at the freeze
    assert all(layer.bn_frozen for layer in tfq.qat.batchnorm_layers_of(qat))


def test_bn_folding_is_validated_and_saved(trained_cnn, digits):
    model, _ = trained_cnn
    with pytest.raises(ValueError, match="bn_folding must be one of \\('unfolded', 'two_pass'\\). "
                                         "Received: bn_folding='fused'"):
        tfq.qat.quantize_model(model, bn_folding="fused")
    with pytest.raises(ValueError, match="bn_folding='x'"):
        QuantizedLayer(L.Dense(2), bn_folding="x")
    qat = tfq.qat.quantize_model(model, bn_folding="two_pass")
    layer = qat.get_layer("conv1")
    assert layer.bn_folding == "two_pass"
    assert QuantizedLayer.from_config(layer.get_config()).bn_folding == "two_pass"
    (x_train, _), _ = digits
    frozen = tfq.qat.freeze_model(tfq.qat.quantize_model(model, calibration_data=x_train[:64], bn_folding="two_pass"))
    assert frozen.get_layer("conv1").bn_folding == "two_pass"


# --- cheaper gradients --------------------------------------------------------------------------------
def test_identity_gradient_fake_quant_is_the_same_op_with_the_gradient_passed_through():
    x = tf.constant(np.random.default_rng(6).uniform(-1.0, 1.0, (4, 3)).astype("float32"))
    m = tf.reduce_max(tf.abs(x), axis=0)  # the weights' own per-channel range: the STE mask is all ones
    upstream = tf.constant(np.arange(12, dtype="float32").reshape(4, 3))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, m])
        plain = tfq.ops.fake_quant(x, -m, m, narrow_range=True, per_channel=True)
        fast = tfq.ops.fake_quant(x, -m, m, narrow_range=True, per_channel=True, identity_gradient=True)
        loss = tf.reduce_sum(fast * upstream)
    np.testing.assert_array_equal(fast.numpy(), plain.numpy())
    np.testing.assert_array_equal(tape.gradient(loss, x).numpy(), upstream.numpy())
    assert tape.gradient(loss, m) is None  # the range gets no gradient
    # A layer's training step has no fake-quant gradient op for its (narrow-range) weights.
    layer = QuantizedLayer(L.Conv2D(4, 3), output_quantizer=None)
    images = tf.zeros((2, 5, 5, 3))
    layer(images)

    @tf.function
    def step(v):
        with tf.GradientTape() as t:
            out = tf.reduce_sum(layer(v, training=True))
        return t.gradient(out, layer.layer.kernel)

    types = [op.type for op in step.get_concrete_function(images).graph.get_operations()]
    assert "FakeQuantWithMinMaxVarsPerChannel" in types
    assert "FakeQuantWithMinMaxVarsPerChannelGradient" not in types


@pytest.mark.parametrize("cap", [None, 6.0])
def test_relu_fake_quant_equals_relu_then_the_quantizer(cap):
    """One gradient op for ReLU/ReLU6 → moving-average fake-quant: same values, ranges and gradients."""
    rng = np.random.default_rng(7)
    x = rng.normal(1.0, 3.0, (64, 9)).astype("float32")
    hi = 4.0
    x[np.abs(x - hi) < 0.05] = 0.5  # away from the range's nudged end, where the two masks may differ
    act = (lambda v: tf.nn.relu(v)) if cap is None else (lambda v: tf.nn.relu6(v))
    fast, reference = (tfq.qat.ActivationQuantizer(mode="moving_average", decay=0.9) for _ in range(2))
    for q in (fast, reference):
        q.build(None)
        q.set_range(0.0, hi)
    assert fast.takes_relu(True) and not fast.takes_relu(False)
    upstream = tf.constant(rng.normal(size=x.shape).astype("float32"))
    v = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(v)
        ours = fast.relu_fake_quant(v, cap)
        theirs = reference(act(v), training=True)
        loss_ours, loss_theirs = tf.reduce_sum(ours * upstream), tf.reduce_sum(theirs * upstream)
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    assert fast.current_range() == reference.current_range()
    # by hand: max 0.9·4 + 0.1·min(max(x), cap); the minimum of a ReLU output is 0
    expected_max = 0.9 * hi + 0.1 * min(float(x.max()), cap or np.inf)
    assert float(fast.range_max.numpy()) == pytest.approx(expected_max, rel=1e-6) and float(fast.range_min.numpy()) == 0
    grad = tape.gradient(loss_ours, v).numpy()
    np.testing.assert_array_equal(grad, tape.gradient(loss_theirs, v).numpy())
    top = min(float(fast.range_max.numpy()), cap or np.inf)
    np.testing.assert_array_equal(grad != 0, (x > 0) & (x < top))  # the gradient passes where 0 < x < top
    # Symmetric quantizers (int16 activations) and learned ranges keep the generic path.
    assert not tfq.qat.ActivationQuantizer(mode="moving_average", symmetric=True).takes_relu(True)
    assert not tfq.qat.ActivationQuantizer(mode="learned").takes_relu(True)


@pytest.mark.parametrize("separate", [False, True])
def test_crossentropy_on_a_quantized_softmax_is_taken_from_its_fake_quantized_logits(separate):
    """The loss on a fixed-range softmax output sees the logits, as Keras' float loss does.

    On the quantized probabilities (1/256 grid) a wrong prediction with p < 1/512 rounds to 0,
    Keras clips it to 1e-7 and passes no gradient: such samples would never be learned.
    """
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 6)).astype("float32")
    inp = keras.Input((6,))
    h = L.Dense(12, activation="relu", name="hidden")(inp)
    if separate:
        out = L.Activation("softmax")(L.Dense(4, name="logits")(h))
    else:
        out = L.Dense(4, activation="softmax", name="logits")(h)
    model = keras.Model(inp, out)
    logits_layer = model.get_layer("logits")
    logits_layer.kernel.assign(logits_layer.kernel * 8.0)  # confident: many probabilities below 1/512
    qat = tfq.qat.quantize_model(model, calibration_data=x, warn_unknown=False)
    y = np.argmin(model.predict(x, verbose=0), axis=1)  # every sample confidently wrong

    @tf.function
    def per_sample_loss(inputs):
        probs = qat(inputs, training=False)
        return probs, keras.losses.sparse_categorical_crossentropy(y, probs)

    probs, loss = (t.numpy() for t in per_sample_loss(x))
    p_true = probs[np.arange(len(y)), y]
    assert (p_true == 0).sum() >= 16  # the case that matters is there
    # exp(−loss) is the float softmax of the logits the output was quantized from: within half a step
    np.testing.assert_allclose(np.exp(-loss), p_true, atol=0.5 / 256 + 1e-6)
    clipped = -np.log(1e-7)  # the loss of a 0 probability
    assert np.all(np.abs(loss[p_true == 0] - clipped) > 1e-3) and np.all(loss[p_true == 0] > np.log(512) - 1e-3)
    # and the gradient reaches the weights from samples whose output probability is 0
    qat.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    zero = p_true == 0
    qlogits = next(layer for layer in qat.layers if isinstance(layer, QuantizedLayer)
                   and layer.layer.name.startswith("logits"))
    before = qlogits.layer.kernel.numpy().copy()
    qat.train_on_batch(x[zero], y[zero])
    assert np.abs(qlogits.layer.kernel.numpy() - before).max() > 1e-3


# --- mixed precision ------------------------------------------------------------------------------------
@pytest.fixture
def global_policy():
    """Sets a global dtype policy for one test and restores float32 whatever happens."""
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy("float32")


def _qat_int8(model, x, y, policy: str, setter):
    setter(policy)
    float_copy = tfq.examples.digits_cnn(input_shape=x.shape[1:])  # built under the policy, as a user would
    float_copy.set_weights(model.get_weights())
    keras.utils.set_random_seed(0)
    qat = tfq.qat.quantize_model(float_copy, calibration_data=x[:256])
    qat.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy")
    qat.fit(x, y, epochs=1, batch_size=64, verbose=0, shuffle=False)
    ranges = {n: q.current_range() for n, q in tfq.qat.quantizers_of(qat).items() if q.mode != "fixed"}
    return qat, tfq.convert(qat, "int8"), ranges


@pytest.fixture(scope="module")
def float32_qat(trained_cnn, digits):
    (x_train, y_train), _ = digits
    keras.mixed_precision.set_global_policy("float32")
    _, content, ranges = _qat_int8(trained_cnn[0], x_train[:640], y_train[:640], "float32",
                                   keras.mixed_precision.set_global_policy)
    return content, ranges


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_qat_exports_the_float32_int8_model(policy, trained_cnn, digits, float32_qat,
                                                            global_policy):
    (x_train, y_train), (x_test, y_test) = digits
    qat, content, ranges = _qat_int8(trained_cnn[0], x_train[:640], y_train[:640], policy, global_policy)
    conv = qat.get_layer("conv1")
    assert conv.layer.compute_dtype == policy.split("_")[1] and conv.dtype_policy.name == policy  # op in 16 bits
    assert qat.output.dtype == "float32" and conv.batchnorm.moving_mean.dtype == "float32"
    reference, reference_ranges = float32_qat
    assert tfq.inspect_tflite(content).num_float_ops == 0  # export is float32 whatever the policy
    for name, (lo, hi) in reference_ranges.items():  # float32 ranges, tracked from 16-bit op outputs
        assert ranges[name] == pytest.approx((lo, hi), rel=0.03, abs=0.02), name
    ours = tfq.TFLiteModel(content).predict(x_test)
    theirs = tfq.TFLiteModel(reference).predict(x_test)
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.97
    assert abs((ours.argmax(1) == y_test).mean() - (theirs.argmax(1) == y_test).mean()) <= 0.02
