"""Cross-layer equalization: same function, equal channel ranges, per-tensor INT8 rescued."""

import numpy as np
import pytest

import tfq
from tests.conftest import tflite_accuracy
from tfq.ptq.equalization import absorption_amount, channel_ranges, equalization_scales, fold_batchnorm

# --------------------------------------------------------------------------- maths


def test_scales_equalize_both_ranges():
    r1, r2 = np.array([8.0, 0.5, 3.0]), np.array([2.0, 2.0, 3.0])
    s = equalization_scales(r1, r2)
    np.testing.assert_allclose(r1 / s, r2 * s)  # both become sqrt(r1 * r2)
    np.testing.assert_allclose(r1 / s, np.sqrt(r1 * r2))


def test_scales_leave_dead_channels_and_check_shapes():
    assert equalization_scales([0.0, 2.0], [1.0, 0.0]).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="same shape"):
        equalization_scales([1.0], [1.0, 2.0])


def test_absorption_amount_is_mean_minus_three_std_clipped():
    assert absorption_amount([10.0, 2.0, -1.0], [2.0, -1.0, 0.1]).tolist() == [4.0, 0.0, 0.0]


def test_fold_batchnorm_matches_batchnorm_after_layer():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3))
    w, b = rng.normal(size=(3, 4)), rng.normal(size=4)
    gamma, beta, mean, var = rng.normal(size=4), rng.normal(size=4), rng.normal(size=4), rng.uniform(0.5, 2, 4)
    eps = 1e-3
    z = x @ w + b
    expected = gamma * (z - mean) / np.sqrt(var + eps) + beta
    wf, bf = fold_batchnorm(w, b, gamma, beta, mean, var, eps)
    np.testing.assert_allclose(x @ wf + bf, expected, rtol=1e-12)


def test_fold_batchnorm_depthwise_uses_input_times_multiplier_channels():
    k = np.ones((1, 1, 2, 3))  # in=2, multiplier=3: output channel i*3+m
    gamma = np.arange(1.0, 7.0)
    wf, _ = fold_batchnorm(k, None, gamma, np.zeros(6), np.zeros(6), np.ones(6) - 1e-3, 1e-3, depthwise=True)
    assert wf[0, 0].ravel().tolist() == gamma.tolist()


def test_channel_ranges_of_depthwise_kernel():
    k = np.zeros((3, 3, 2, 2))
    k[0, 0, 1, 0] = -5.0  # input channel 1, output channel 1*2+0 = 2
    assert channel_ranges(k, "out", depthwise=True).tolist() == [0.0, 0.0, 5.0, 0.0]
    assert channel_ranges(k, "in", depthwise=True).tolist() == [0.0, 5.0]


# --------------------------------------------------------------------------- models


def _folded(layer, bn):
    """(kernel·γ/σ, bias) of a Keras layer and the BatchNorm after it, from their weights."""
    kernel = np.asarray(layer.kernel)
    if bn is None:
        return kernel
    gamma, var = np.asarray(bn.gamma), np.asarray(bn.moving_variance)
    return kernel * (gamma / np.sqrt(var + bn.epsilon))


def test_equalize_preserves_outputs_and_equalizes_pair_ranges(trained_cnn, digits):
    model, _ = trained_cnn
    _, (x_test, _) = digits
    before = [np.array(w) for w in model.get_weights()]
    eq = tfq.equalize(model, high_bias_absorption=False)
    assert eq is not model
    for a, b in zip(before, model.get_weights()):  # the caller's model is untouched
        np.testing.assert_array_equal(a, b)
    ref = model.predict(x_test, verbose=0)
    np.testing.assert_allclose(eq.predict(x_test, verbose=0), ref, atol=2e-6)
    # conv1 → conv2: conv1's folded output-channel ranges equal conv2's folded input-channel ranges.
    c1 = _folded(eq.get_layer("conv1"), eq.get_layer("bn1"))
    c2 = _folded(eq.get_layer("conv2"), eq.get_layer("bn2"))
    r_out = np.abs(c1).reshape(-1, c1.shape[-1]).max(0)
    r_in = np.abs(np.moveaxis(c2, 2, 0)).reshape(c2.shape[2], -1).max(1)
    np.testing.assert_allclose(r_out, r_in, rtol=2e-3)
    # Before equalization they were apart (by ×2.4 … ×4.6 for this model).
    o1 = _folded(model.get_layer("conv1"), model.get_layer("bn1"))
    o2 = _folded(model.get_layer("conv2"), model.get_layer("bn2"))
    ratio = np.abs(o1).reshape(-1, 32).max(0) / np.abs(np.moveaxis(o2, 2, 0)).reshape(32, -1).max(1)
    assert np.abs(np.log(ratio)).min() > 0.5
    # conv2 → fc1 through max-pool and Flatten: fc1's rows j read channel j % 64.
    c2 = _folded(eq.get_layer("conv2"), eq.get_layer("bn2"))
    fc1 = np.asarray(eq.get_layer("fc1").kernel)
    np.testing.assert_allclose(np.abs(c2).reshape(-1, 64).max(0), np.abs(fc1).reshape(16, 64, -1).max(axis=(0, 2)),
                               rtol=2e-3)


def test_high_bias_absorption_moves_bias_to_next_layer(trained_cnn, digits):
    """A BatchNorm whose β sits 5σ above 0 for 8 channels: c = β − 3γ leaves conv2 for fc1."""
    import keras

    model, _ = trained_cnn
    _, (x_test, _) = digits
    m = keras.models.clone_model(model)
    m.set_weights(model.get_weights())
    bn = m.get_layer("bn2")
    gamma = np.asarray(bn.gamma)
    beta = np.asarray(bn.beta).copy()
    beta[:8] = 5.0 * np.abs(gamma[:8])
    bn.beta.assign(beta)
    plain = tfq.equalize(m, high_bias_absorption=False)
    absorbed = tfq.equalize(m)
    # The absorbed amount, computed here from the equalized BatchNorm: c = max(0, β − 3|γ|).
    pb, pg = np.asarray(plain.get_layer("bn2").beta), np.asarray(plain.get_layer("bn2").gamma)
    c = np.maximum(pb - 3 * np.abs(pg), 0.0)
    assert (c[:8] > 0).all() and (c[8:] == 0).all()
    np.testing.assert_allclose(np.asarray(absorbed.get_layer("bn2").beta), pb - c, rtol=1e-5, atol=1e-6)
    fc1 = np.asarray(plain.get_layer("fc1").kernel)
    expected_bias = np.asarray(plain.get_layer("fc1").bias) + np.tile(c, 16) @ fc1
    np.testing.assert_allclose(np.asarray(absorbed.get_layer("fc1").bias), expected_bias, rtol=1e-4, atol=1e-5)
    # Outputs change only where the pre-activation fell below β − 3γ.
    ref = m.predict(x_test, verbose=0)
    got = absorbed.predict(x_test, verbose=0)
    assert np.abs(got - ref).max() < 1e-2
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.997


def test_nested_and_sequential_models(trained_cnn, digits):
    import keras

    model, _ = trained_cnn
    _, (x_test, _) = digits
    outer_in = keras.Input(model.input_shape[1:])
    outer = keras.Model(outer_in, keras.layers.Rescaling(1.0, name="pre")(outer_in), name="pre_model")
    nested = keras.Model(outer_in, model(outer(outer_in)), name="transfer")
    eq = tfq.equalize(nested, high_bias_absorption=False)
    np.testing.assert_allclose(eq.predict(x_test, verbose=0), nested.predict(x_test, verbose=0), atol=2e-6)
    inner = eq.get_layer(model.name)
    assert not np.allclose(np.asarray(inner.get_layer("conv2").kernel), np.asarray(model.get_layer("conv2").kernel))
    seq = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="relu", name="a"),
                            keras.layers.Dense(3, name="b")])
    seq.get_layer("a").kernel.assign(np.random.default_rng(0).normal(size=(6, 5)) * [1, 10, 100, 0.1, 1])
    x = np.random.default_rng(1).normal(size=(20, 6)).astype(np.float32)
    eq = tfq.equalize(seq)
    np.testing.assert_allclose(eq.predict(x, verbose=0), seq.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    ra = np.abs(np.asarray(eq.get_layer("a").kernel)).max(0)
    rb = np.abs(np.asarray(eq.get_layer("b").kernel)).max(1)
    np.testing.assert_allclose(ra, rb, rtol=1e-4)


def test_relu6_is_replaced_or_skipped(trained_mobilenet):
    import keras

    model, _, (x_test, _), _ = trained_mobilenet
    replaced = tfq.equalize(model)
    kept = tfq.equalize(model, relu6="skip")
    relus = [layer for layer in replaced.layers if isinstance(layer, keras.layers.ReLU)]
    assert relus and all(layer.max_value is None for layer in relus)
    np.testing.assert_allclose(kept.predict(x_test[:64], verbose=0), model.predict(x_test[:64], verbose=0), atol=2e-6)
    for name in ("dw0", "pw0"):  # not equalized: nothing crosses a ReLU6
        np.testing.assert_array_equal(np.asarray(kept.get_layer(name).kernel), np.asarray(model.get_layer(name).kernel))


@pytest.mark.parametrize("kwargs, error", [
    (dict(relu6="clip"), "relu6 must be one of"),
    (dict(max_iterations=0), "max_iterations"),
    (dict(tolerance=0), "tolerance"),
    (dict(fold_batchnorm="yes"), "fold_batchnorm must be a bool"),
])
def test_bad_options(trained_cnn, kwargs, error):
    with pytest.raises((ValueError, TypeError), match=error):
        tfq.equalize(trained_cnn[0], **kwargs)


def test_fold_batchnorm_removes_batchnorms(trained_cnn, digits):
    import keras

    model, _ = trained_cnn
    _, (x_test, _) = digits
    folded = tfq.equalize(model, fold_batchnorm=True)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    np.testing.assert_allclose(folded.predict(x_test, verbose=0), model.predict(x_test, verbose=0), atol=2e-6)


def test_qat_starts_from_an_equalized_model(trained_cnn, digits):
    (x_train, y_train), _ = digits
    qat = tfq.qat.quantize_model(tfq.equalize(trained_cnn[0]), calibration_data=x_train[:64])
    qat.compile("adam", "sparse_categorical_crossentropy")
    loss = qat.fit(x_train[:64], y_train[:64], epochs=1, verbose=0).history["loss"][0]
    assert np.isfinite(loss)
    assert len(tfq.qat.quantized_layers_of(qat)) == 4


# --------------------------------------------------------------------------- the unbalanced depthwise model


@pytest.fixture(scope="module")
def unbalanced(trained_mobilenet):
    """The trained MobileNet-style model with ReLU for ReLU6, then channels rescaled 300× apart."""
    import keras

    from tfq.examples import unbalance_channels

    model, (x_train, _), (x_test, y_test), _ = trained_mobilenet

    def relu(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.ReLU):
            config["max_value"] = None
        return layer.__class__.from_config(config)

    relu_model = keras.models.clone_model(model, clone_function=relu)
    relu_model.set_weights(model.get_weights())
    skewed = unbalance_channels(relu_model, spread=300.0)
    float_acc = float((relu_model.predict(x_test, verbose=0).argmax(1) == y_test).mean())
    return skewed, relu_model, x_train[:300], x_test, y_test, float_acc


def test_unbalanced_model_keeps_its_function(unbalanced):
    skewed, relu_model, _, x_test, _, _ = unbalanced
    ref = relu_model.predict(x_test[:64], verbose=0)
    np.testing.assert_allclose(skewed.predict(x_test[:64], verbose=0), ref, atol=1e-5)
    gamma = np.abs(np.asarray(skewed.get_layer("dw1_bn").gamma) / np.asarray(relu_model.get_layer("dw1_bn").gamma))
    assert gamma.max() / gamma.min() == pytest.approx(300.0, rel=1e-3)


def test_per_tensor_int8_collapses_and_cle_recovers_it(unbalanced):
    skewed, _, calib, x_test, y_test, float_acc = unbalanced
    plain = tfq.fake_quantize(skewed, "int8", calib, per_channel=False)
    plain_acc = float((plain.predict(x_test, verbose=0).argmax(1) == y_test).mean())
    assert plain_acc < float_acc - 0.3
    content = tfq.convert(skewed, "int8", calib, per_channel=False, equalize=True)
    assert tflite_accuracy(content, x_test, y_test) >= float_acc - 0.015


@pytest.mark.slow
def test_per_channel_int8_also_recovers_with_cle(unbalanced):
    skewed, _, calib, x_test, y_test, float_acc = unbalanced
    plain = tfq.convert(skewed, "int8", calib)
    assert tflite_accuracy(plain, x_test, y_test) < float_acc - 0.3
    content = tfq.convert(skewed, "int8", calib, equalize=True, bias_correction=True)
    assert tflite_accuracy(content, x_test, y_test) >= float_acc - 0.015
