"""Data-free INT8: ranges from BatchNorm statistics, close to calibrated INT8."""

import numpy as np
import pytest

import tfq
from tests.conftest import tflite_accuracy
from tfq.ptq.data_free import batchnorm_matching_loss, batchnorm_range

# --------------------------------------------------------------------------- maths


def test_matching_loss_is_zero_for_matching_statistics_and_grows_with_the_gap():
    z = np.array([[1.0, 10.0], [3.0, 10.0]], np.float32)  # channel 0: mean 2, std 1; channel 1: mean 10, std 0
    beta, gamma = np.float32([2.0, 10.0]), np.float32([1.0, 1e-9])  # channel 1 is dead: left out
    assert float(batchnorm_matching_loss([z], [beta], [gamma])) == pytest.approx(0.0, abs=1e-3)
    # mean off by 1 std, std twice too big: ‖1‖ + ‖2 − 1‖ = 2
    z2 = np.array([[1.0, 0.0], [5.0, 0.0]], np.float32)  # mean 3, std 2
    assert float(batchnorm_matching_loss([z2], [beta], [gamma])) == pytest.approx(2.0, rel=1e-4)


def test_batchnorm_range_by_hand():
    assert batchnorm_range([0.0, 1.0], [1.0, 0.5], "linear", num_std=2.0) == (-2.0, 2.0)
    assert batchnorm_range([0.0, 1.0], [1.0, 0.5], "relu", num_std=2.0) == (0.0, 2.0)
    assert batchnorm_range([5.0], [1.0], "relu6", num_std=3.0) == (2.0, 6.0)


# --------------------------------------------------------------------------- on models


def test_synthetic_inputs_match_the_batchnorm_statistics(trained_cnn):
    from tfq.ptq.data_free import _bn_vectors, _bn_wrappers, synthesize_inputs
    from tfq.quantsim.layers import observing, tapping
    from tfq.quantsim.rewrite import rewrite_model

    q = rewrite_model(trained_cnn[0], "int8")
    wrappers = _bn_wrappers(q)

    def loss(x):
        with observing({}), tapping(wrappers) as records:
            q(x, training=False)
        return float(batchnorm_matching_loss([records[id(w)]["pre_activation"][0] for w in wrappers],
                                             *zip(*[_bn_vectors(w) for w in wrappers])))

    noise = np.random.default_rng(0).standard_normal((64, 8, 8, 1)).astype(np.float32)
    x = synthesize_inputs(q, 64, steps=60, seed=0)
    assert x.shape == (64, 8, 8, 1) and x.dtype == np.float32
    assert loss(x) < 0.3 * loss(noise)
    np.testing.assert_array_equal(x, synthesize_inputs(q, 64, steps=60, seed=0))  # seeded


def test_data_free_int8_is_within_one_point_of_calibrated(trained_cnn, digits):
    model, _ = trained_cnn
    (x_train, _), (x_test, y_test) = digits
    calibrated = tflite_accuracy(tfq.convert(model, "int8", x_train[:300]), x_test, y_test)
    report = tfq.MethodsReport()
    content = tfq.convert(model, "int8", None, data_free=True, report=report)
    assert tfq.inspect_tflite(content).num_float_ops == 0
    assert tflite_accuracy(content, x_test, y_test) >= calibrated - 0.01
    assert report.seconds["data_free"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["synthetic", "bn_statistics"])
def test_dfq_on_the_depthwise_model_is_within_two_points_of_calibrated(method, trained_mobilenet):
    model, (x_train, _), (x_test, y_test), float_acc = trained_mobilenet
    calibrated = tflite_accuracy(tfq.convert(model, "int8", x_train[:500]), x_test, y_test)
    content = tfq.convert(model, "int8", None, data_free=method, equalize=True, bias_correction="analytical")
    assert tflite_accuracy(content, x_test, y_test) >= calibrated - 0.02


@pytest.mark.slow
def test_int16x8_data_free(trained_cnn, digits):
    model, _ = trained_cnn
    _, (x_test, y_test) = digits
    content = tfq.convert(model, "int16x8", None, data_free=True, equalize=True)
    float_acc = float((model.predict(x_test, verbose=0).argmax(1) == y_test).mean())
    assert tflite_accuracy(content, x_test, y_test) >= float_acc - 0.01


def test_bn_statistics_ranges_cover_bn_outputs(trained_cnn):
    from tfq.ptq.data_free import batchnorm_ranges
    from tfq.quantsim.rewrite import quantized_layers_of, rewrite_model

    q = rewrite_model(trained_cnn[0], "int8")
    ranges = batchnorm_ranges(q)
    conv1 = next(w for w in quantized_layers_of(q) if w.layer.name == "conv1")
    beta, gamma = np.asarray(conv1.batchnorm.beta), np.abs(np.asarray(conv1.batchnorm.gamma))
    assert ranges[conv1.output_quantizer.name] == pytest.approx(
        (max(float((beta - 6 * gamma).min()), 0.0), float((beta + 6 * gamma).max())))
    assert len(ranges) == 2  # conv1 and conv2 have BatchNorms; fc1 and probs do not


def test_refusals(trained_cnn, digits):
    import keras

    model, _ = trained_cnn
    (x_train, _), _ = digits
    with pytest.raises(ValueError, match="excludes representative_data"):
        tfq.convert(model, "int8", x_train[:10], data_free=True)
    inputs = keras.Input((4,))
    no_bn = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    with pytest.raises(ValueError, match="no BatchNormalization"):
        tfq.convert(no_bn, "int8", None, data_free=True)
