"""Bias correction: the expected output shift of weight quantization, removed."""

import numpy as np
import pytest

import tfq
from tfq.ptq.bias_correction import clipped_normal_mean, expected_shift

# --------------------------------------------------------------------------- maths


@pytest.mark.parametrize("low, high", [(0.0, np.inf), (0.0, 6.0), (-np.inf, np.inf), (-1.0, 0.5)])
def test_clipped_normal_mean_matches_monte_carlo(low, high):
    rng = np.random.default_rng(0)
    mean, std = np.array([-1.0, 0.3, 2.0, 7.0]), np.array([0.5, 1.0, 3.0, 2.0])
    z = rng.normal(mean, std, size=(400_000, 4))
    np.testing.assert_allclose(clipped_normal_mean(mean, std, low, high), np.clip(z, low, high).mean(0), atol=0.01)


def test_clipped_normal_mean_with_zero_std_is_clipped_mean():
    assert clipped_normal_mean([-2.0, 3.0, 9.0], [0.0, 0.0, 0.0], 0.0, 6.0).tolist() == [0.0, 3.0, 6.0]


def test_expected_shift_is_the_response_to_a_constant_input():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    eps = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)
    mean = rng.normal(size=4).astype(np.float32)
    x = np.broadcast_to(mean, (1, 6, 6, 4)).astype(np.float32)
    y = tf.nn.conv2d(x, eps, 1, "VALID").numpy()  # no padding: every output sees the constant
    np.testing.assert_allclose(expected_shift(eps, mean), y[0, 0, 0], rtol=1e-5, atol=1e-5)
    dw = rng.normal(size=(3, 3, 4, 2)).astype(np.float32)
    y = tf.nn.depthwise_conv2d(x, dw, [1, 1, 1, 1], "VALID").numpy()
    np.testing.assert_allclose(expected_shift(dw, mean, depthwise=True), y[0, 0, 0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- on a model


def _layer_shift(frozen, model, layer_name, bn_name, x):
    """Per-channel mean of (quantized layer − float layer) on the same inputs, float side from the Keras weights."""
    import tensorflow as tf

    from tfq.quantsim.layers import tapping
    from tfq.quantsim.rewrite import quantized_layers_of

    wrapper = next(w for w in quantized_layers_of(frozen) if w.layer.name == layer_name)
    with tapping([wrapper]) as records:
        frozen(x, training=False)
    xin = records[id(wrapper)]["inputs"][0]
    y_quant = np.asarray(records[id(wrapper)]["pre_activation"][0])
    layer = model.get_layer(layer_name)
    kernel = np.asarray(layer.kernel)
    bias = np.asarray(layer.bias) if layer.use_bias else 0.0
    if bn_name is not None:
        bn = model.get_layer(bn_name)
        f = np.asarray(bn.gamma) / np.sqrt(np.asarray(bn.moving_variance) + bn.epsilon)
        kernel, bias = kernel * f, np.asarray(bn.beta) + (bias - np.asarray(bn.moving_mean)) * f
    if kernel.ndim == 4:
        y_float = tf.nn.conv2d(xin, kernel, 1, "SAME").numpy() + bias
    else:
        y_float = np.asarray(xin) @ kernel + bias
    return (y_quant - y_float).reshape(-1, y_float.shape[-1]).mean(0)


def test_empirical_correction_reduces_the_mean_output_error(trained_cnn, digits):
    model, _ = trained_cnn
    (x_train, _), (x_test, _) = digits  # measured on held-out data, not the calibration data
    plain = tfq.fake_quantize(model, "int8", x_train[:300], per_channel=False)
    corrected = tfq.fake_quantize(model, "int8", x_train[:300], per_channel=False, bias_correction="empirical")
    for layer, bn in (("conv2", "bn2"), ("fc1", None)):
        before = np.abs(_layer_shift(plain, model, layer, bn, x_test)).mean()
        after = np.abs(_layer_shift(corrected, model, layer, bn, x_test)).mean()
        assert after < 0.2 * before, (layer, before, after)


def test_analytical_correction_reduces_the_mean_output_error(trained_mobilenet):
    """From BatchNorm statistics only. On the MobileNet-style model the clipped-Gaussian estimate of
    E[x] is within ~20-30 % of the truth; on the 8×8 digits CNN (mostly-zero images) it is not, and
    the analytical correction does not help there: see the module docstring."""
    model, (x_train, _), (x_test, _), _ = trained_mobilenet
    plain = tfq.fake_quantize(model, "int8", x_train[:300], per_channel=False)
    corrected = tfq.fake_quantize(model, "int8", x_train[:300], per_channel=False, bias_correction="analytical")
    for layer, bn in (("pw1", "pw1_bn"), ("pw2", "pw2_bn")):
        before = np.abs(_layer_shift(plain, model, layer, bn, x_test[:128])).mean()
        after = np.abs(_layer_shift(corrected, model, layer, bn, x_test[:128])).mean()
        assert after < 0.5 * before, (layer, before, after)


def test_empirical_without_data_is_refused(trained_cnn, digits):
    (x_train, _), _ = digits
    cal = tfq.calibrate(trained_cnn[0], x_train[:32], "minmax")
    with pytest.raises(ValueError, match="bias_correction='empirical'.*representative_data"):
        tfq.convert(trained_cnn[0], "int8", calibration=cal, bias_correction="empirical")


def test_a_layer_without_bias_or_batchnorm_is_named():
    import keras

    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(4, use_bias=False, name="nobias")(inputs))
    x = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)
    with pytest.warns(UserWarning, match="nobias"):
        tfq.fake_quantize(model, "int8", x, bias_correction=True)
