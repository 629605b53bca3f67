"""Learned weight rounding: the maths, the integers in the .tflite, and the gain over nearest rounding."""

import re

import numpy as np
import pytest

import tfq
from tfq.ptq.weight_rounding import (
    adaround_init,
    adaround_regularizer,
    beta_schedule,
    gptq_round,
    nearest_round,
    rectified_sigmoid,
)

# --------------------------------------------------------------------------- maths


def test_rectified_sigmoid_reaches_zero_and_one():
    h = np.asarray(rectified_sigmoid(np.array([-50.0, -2.0, 0.0, 2.0, 50.0])))
    assert h[0] == 0.0 and h[-1] == 1.0 and h[2] == pytest.approx(0.5)
    # σ(±2)·1.2 − 0.1 = 0.043 / 0.957: exactly 0 or 1 only beyond |V| = ln 11 ≈ 2.4
    assert h[1] == pytest.approx(0.1192 * 1.2 - 0.1, abs=1e-3) and h[3] == pytest.approx(0.8808 * 1.2 - 0.1, abs=1e-3)


def test_regularizer_is_zero_at_hard_decisions_and_one_per_weight_at_half():
    assert float(adaround_regularizer(np.array([0.0, 1.0, 1.0]), 20.0)) == 0.0
    assert float(adaround_regularizer(np.array([0.5, 0.5]), 2.0)) == pytest.approx(2.0)
    # β large: flat near ½, so weights can still move; β = 2: 1 − (2h − 1)² pulls them to 0 or 1.
    assert float(adaround_regularizer(np.array([0.25]), 20.0)) == pytest.approx(1 - 0.5 ** 20)


def test_beta_schedule_warmup_then_linear_decay():
    assert [beta_schedule(i, 10) for i in (0, 1)] == [None, None]
    assert beta_schedule(2, 10) == 20.0
    assert beta_schedule(6, 10) == pytest.approx(20.0 - 18.0 * 0.5)
    assert beta_schedule(10, 10) == 2.0


def test_adaround_init_inverts_the_rectified_sigmoid():
    f = np.linspace(0.01, 0.99, 13)
    np.testing.assert_allclose(np.asarray(rectified_sigmoid(adaround_init(f))), f, atol=1e-5)


def test_nearest_round_is_half_away_from_zero_and_clipped():
    q = nearest_round(np.array([[0.5, -0.5, 1.49, 9.0, -9.0]]), np.array([1.0]), 7)
    assert q.tolist() == [[1, -1, 1, 7, -7]]


def test_gptq_with_uncorrelated_inputs_is_nearest_rounding():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 40))
    s = np.abs(w).max(1) / 7
    assert np.array_equal(gptq_round(w, np.eye(40), s, 7, damp=0.0), nearest_round(w, s, 7))


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(2000, 8))
    x = base @ rng.normal(size=(8, 64)) + 0.1 * rng.normal(size=(2000, 64))  # strongly correlated inputs
    w = rng.normal(size=(16, 64))
    s = np.abs(w).max(1) / 7

    def error(q):
        return float(np.sum(((w - q * s[:, None]) @ x.T) ** 2))

    q = gptq_round(w, x.T @ x, s, 7)
    assert np.abs(q).max() <= 7
    assert error(q) < 0.5 * error(nearest_round(w, s, 7))
    # Lazy batches change the order of the arithmetic only.
    assert np.array_equal(q, gptq_round(w, x.T @ x, s, 7, block=5))


def test_gptq_keeps_pinned_integers():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(3, 10))
    x = rng.normal(size=(100, 10))
    q = gptq_round(w, x.T @ x, 0.1, 7, pin=(np.array([0, 2]), np.array([4, 9]), np.array([7, -7])))
    assert q[0, 4] == 7 and q[2, 9] == -7


# --------------------------------------------------------------------------- the .tflite holds the chosen integers


def _tensors(content):
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=content)
    interp.allocate_tensors()
    out = {}
    for d in interp.get_tensor_details():
        try:
            out[d["name"]] = (interp.get_tensor(d["index"]), d["quantization_parameters"]["scales"])
        except ValueError:  # activations have no data before invoke
            pass
    return out


def _layer_tensor(tensors, layer, dtype):
    pattern = re.compile(rf"/{layer}(_\d+)?/")
    found = [(v, s) for name, (v, s) in tensors.items() if pattern.search(name) and v.dtype == dtype and v.ndim >= 1]
    assert len(found) == 1, (layer, dtype, [n for n in tensors if pattern.search(n)])
    return found[0]


def _folded_bias(model, layer, bn):
    """β + (b − μ)·γ/σ from the Keras weights (or b)."""
    b = np.asarray(model.get_layer(layer).bias) if model.get_layer(layer).use_bias else 0.0
    if bn is None:
        return np.asarray(b, np.float64)
    bn = model.get_layer(bn)
    f = np.asarray(bn.gamma) / np.sqrt(np.asarray(bn.moving_variance) + bn.epsilon)
    return np.asarray(bn.beta) + (b - np.asarray(bn.moving_mean)) * f


def test_gptq_integers_and_corrected_biases_are_what_the_tflite_holds(trained_cnn, digits):
    model, _ = trained_cnn
    (x_train, _), _ = digits
    report = tfq.MethodsReport()
    content = tfq.convert(model, "int8", x_train[:256], per_channel=False, weight_rounding="gptq",
                          bias_correction="empirical", report=report)
    tensors = _tensors(content)
    assert set(report.rounding) == {"conv1", "conv2", "fc1", "probs"}
    for layer, result in report.rounding.items():
        q = result.integers  # (output channels, fan-in): TFLite's [out, kh, kw, in] / [out, in] order
        stored, _ = _layer_tensor(tensors, layer, np.int8)
        np.testing.assert_array_equal(stored.reshape(q.shape), q)
        assert 0.01 < result.nearest_changed < 0.5  # GPTQ chose other integers than nearest rounding
    # Biases: the converter wrote the folded bias minus the correction, to one integer step.
    for layer, bn in (("conv1", "bn1"), ("conv2", "bn2"), ("fc1", None), ("probs", None)):
        stored, scales = _layer_tensor(tensors, layer, np.int32)
        written = stored * scales
        expected = _folded_bias(model, layer, bn) - report.bias_shifts[layer]
        np.testing.assert_allclose(written, expected, atol=1.01 * np.max(scales))
        assert np.max(np.abs(report.bias_shifts[layer]) / scales) > 5  # a visible change, not rounding noise


def test_adaround_on_a_dense_layer_beats_nearest():
    """One Dense layer, 4-bit weights: AdaRound's output error on held-out inputs is below nearest rounding's."""
    import keras

    from tfq.quantsim.rewrite import freeze_model, quantized_layers_of, rewrite_model
    from tfq.ptq.weight_rounding import layer_inputs, round_weights, wrapped_kernel

    rng = np.random.default_rng(0)
    inputs = keras.Input((24,))
    model = keras.Model(inputs, keras.layers.Dense(12, name="d")(inputs))
    model.get_layer("d").kernel.assign(rng.normal(size=(24, 12)).astype(np.float32))
    mix = rng.normal(size=(24, 24))
    x = (rng.normal(size=(600, 24)) @ mix).astype(np.float32)  # correlated features
    recipe = tfq.Recipe(weights=tfq.TensorSpec(bits=4), allow_non_tflite=True)
    q = rewrite_model(model, recipe)
    cal = tfq.calibrate(q, x[:400], "minmax")
    frozen = freeze_model(q, cal.ranges)
    wrapper = quantized_layers_of(frozen)[0]
    w_float = wrapped_kernel(wrapper).folded
    held_out = x[400:]

    def error():
        xin = np.concatenate(layer_inputs(frozen, wrapper, [[held_out]], float_mode=False))
        wq = np.asarray(wrapper._quantize_kernel(wrapper.layer.kernel, -1))
        return float(np.mean((xin @ wq - xin @ w_float) ** 2))

    nearest = error()
    result = round_weights(frozen, x[:400], "adaround", iterations=500)
    assert result["d"].nearest_changed > 0
    assert error() < 0.75 * nearest


# --------------------------------------------------------------------------- W4A8: where rounding matters


def _sim_metrics(model, recipe, calib, x_test):
    sim = tfq.fake_quantize(model, recipe=recipe, representative_data=calib)
    reference = model.predict(x_test, verbose=0)
    out = sim.predict(x_test, verbose=0)
    return float((out.argmax(1) == reference.argmax(1)).mean()), float(np.mean((out - reference) ** 2))


@pytest.fixture(scope="module")
def w4a8_nearest(trained_cnn, digits):
    """W4A8 with per-tensor weights: nearest rounding's loss is clear there (with per-channel 4-bit
    weights this CNN stays within a sample or two of float whatever the rounding)."""
    (x_train, _), (x_test, _) = digits
    recipe = tfq.Recipe(weights=tfq.TensorSpec(bits=4, per_channel=False), allow_non_tflite=True)
    return recipe, _sim_metrics(trained_cnn[0], recipe, x_train[:512], x_test)


@pytest.mark.parametrize("method", ["gptq", pytest.param("adaround", marks=pytest.mark.slow)])
def test_learned_rounding_beats_nearest_at_w4a8(method, trained_cnn, digits, w4a8_nearest):
    (x_train, _), (x_test, _) = digits
    recipe, (nearest_agree, nearest_mse) = w4a8_nearest
    agree, mse = _sim_metrics(trained_cnn[0], recipe.replace(weight_rounding=method), x_train[:512], x_test)
    assert agree >= nearest_agree
    assert mse < 0.8 * nearest_mse


def test_layers_it_cannot_round_keep_nearest_with_a_warning():
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.SeparableConv2D(4, 3, name="sep")(inputs)
    x = keras.layers.Conv2D(4, 3, name="conv")(x)
    model = keras.Model(inputs, x)
    data = np.random.default_rng(0).normal(size=(32, 8, 8, 3)).astype(np.float32)
    report = tfq.MethodsReport()
    with pytest.warns(UserWarning, match="sep"):
        tfq.fake_quantize(model, "int8", data, weight_rounding="gptq", report=report)
    assert set(report.rounding) == {"conv"}


# --------------------------------------------------------------------------- slow: depthwise, determinism


@pytest.mark.slow
def test_adaround_depthwise_per_tensor_int8_integers_in_tflite_and_deterministic(trained_mobilenet):
    model, (x_train, _), (x_test, y_test), float_acc = trained_mobilenet
    report = tfq.MethodsReport()
    content = tfq.convert(model, "int8", x_train[:256], per_channel=False, weight_rounding="adaround", report=report)
    tensors = _tensors(content)
    q = report.rounding["dw1"].integers  # (in·multiplier, kh·kw); TFLite stores [1, kh, kw, in·multiplier]
    stored, scales = _layer_tensor(tensors, "dw1", np.int8)
    assert len(scales) == 1  # per tensor
    np.testing.assert_array_equal(stored.reshape(-1, q.shape[0]).T, q)
    again = tfq.convert(model, "int8", x_train[:256], per_channel=False, weight_rounding="adaround")
    assert again == content
