"""Issue 29, options: no option dropped by quantize_model, calibrate, convert, equalize and bias
correction — each honoured or refused in one line naming it. Each test failed before its fix.

Models are tiny (a 3×3 convolution with BatchNorm on 6×6 inputs) so that the refusals stay fast.
"""

import json
import warnings

import numpy as np
import pytest

import tfq


def one_line(err, *fragments):
    text = str(err)
    assert "\n" not in text.strip() and "Traceback" not in text, text
    for fragment in fragments:
        assert fragment in text, (fragment, text)


@pytest.fixture(scope="module")
def conv():
    """(model, x): Conv2D → BatchNorm → ReLU → Flatten → Dense on long-tailed 6×6 inputs (KL clips them)."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(4, 3, name="conv"),
                              keras.layers.BatchNormalization(name="bn"), keras.layers.ReLU(name="relu"),
                              keras.layers.Flatten(name="flat"), keras.layers.Dense(3, name="head")], name="conv")
    x = np.random.default_rng(0).lognormal(0.0, 1.5, (64, 6, 6, 1)).astype("float32")
    return model, x


@pytest.fixture(scope="module")
def dense():
    """(model, x): Dense → ReLU → Dense, no BatchNorm and no pair through a BatchNorm."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, name="d")], name="dense")
    return model, np.random.default_rng(0).normal(size=(32, 6)).astype("float32")


def activation_ranges(qmodel) -> dict:
    return {name: (float(q.range_min.numpy()), float(q.range_max.numpy()))
            for name, q in tfq.qat.quantizers_of(qmodel).items() if q.mode != "fixed"}


# --------------------------------------------------------------------------------------------
# 1. tfq.qat.quantize_model


def test_quantize_model_refuses_an_unknown_keyword(conv):
    model, x = conv
    with pytest.raises(TypeError) as info:
        tfq.qat.quantize_model(model, calibration_data=x, calibraton="kl")
    one_line(info.value, "unexpected keyword argument 'calibraton'", "Received: calibraton='kl'")


def test_quantize_model_refuses_a_parameter_of_another_method(conv):
    model, x = conv
    with pytest.raises(ValueError) as info:
        tfq.qat.quantize_model(model, calibration_data=x, percentile=99.9)
    one_line(info.value, "percentile=99.9", "calibration='percentile'", "'minmax'")


def test_quantize_model_refuses_a_calibration_choice_without_data(conv):
    model, _ = conv
    with pytest.raises(ValueError) as info:
        tfq.qat.quantize_model(model, calibration="kl")
    one_line(info.value, "calibration='kl'", "calibration_data")


def test_quantize_model_honours_the_recipes_calibration(conv):
    """recipe='int8_kl' starts from KL ranges (the recipe's calibration and num_bins), not MinMax."""
    model, x = conv
    qat = tfq.qat.quantize_model(model, recipe="int8_kl", calibration_data=x)
    kl = tfq.calibrate(model, x, "kl", recipe="int8_kl", num_bins=2048)
    minmax = tfq.calibrate(model, x, "minmax", recipe="int8_kl")
    ranges = activation_ranges(qat)
    assert sorted(ranges) == sorted(kl.ranges)
    for name, (lo, hi) in kl.ranges.items():
        assert ranges[name] == pytest.approx((lo, hi), rel=1e-5, abs=1e-6), name
    assert any(kl[name][1] < minmax[name][1] * 0.9 for name in kl.ranges)  # KL clipped somewhere: a real difference
    # Given explicitly, the same method agrees with the recipe; the default recipe keeps MinMax.
    assert activation_ranges(tfq.qat.quantize_model(model, recipe="int8_kl", calibration="kl",
                                                    calibration_data=x)) == ranges
    default = activation_ranges(tfq.qat.quantize_model(model, calibration_data=x))
    for name, (lo, hi) in tfq.calibrate(model, x, "minmax", recipe="qat_int8").ranges.items():
        assert default[name] == pytest.approx((lo, hi), rel=1e-5, abs=1e-6), name


def test_quantize_model_refuses_a_calibration_conflicting_with_the_recipe(conv):
    model, x = conv
    with pytest.raises(ValueError) as info:
        tfq.qat.quantize_model(model, recipe="int8_kl", calibration="minmax", calibration_data=x)
    one_line(info.value, "calibration='minmax'", "'kl'", "int8_kl")


@pytest.mark.parametrize("recipe", ["fp16", "float"])
def test_quantize_model_refuses_a_recipe_without_integer_tensors(conv, recipe):
    model, _ = conv
    with pytest.raises(ValueError) as info:
        tfq.qat.quantize_model(model, recipe=recipe)
    one_line(info.value, f"recipe {recipe!r}", "integer")


def test_quantize_model_of_a_qat_model_is_one_line(conv):
    model, _ = conv
    qat = tfq.qat.quantize_model(model)
    with pytest.raises(ValueError) as info:
        tfq.qat.quantize_model(qat)
    one_line(info.value, "already is a tfq QAT model")


def test_quantize_model_refuses_a_string_for_a_bool(conv):
    model, _ = conv
    with pytest.raises(TypeError) as info:
        tfq.qat.quantize_model(model, warn_unknown="False")
    one_line(info.value, "warn_unknown='False'")


# --------------------------------------------------------------------------------------------
# 2. tfq.calibrate and precomputed calibrations in tfq.convert


def test_calibrate_refuses_a_recipe_with_float_activations(conv):
    model, x = conv
    with pytest.raises(ValueError) as info:
        tfq.calibrate(model, x, recipe="fp16")
    one_line(info.value, "recipe 'fp16'", "no range to calibrate")


@pytest.mark.parametrize("keyword", ["keep_observers", "verbose"])
def test_calibrate_refuses_a_string_for_a_bool(conv, keyword):
    model, x = conv
    with pytest.raises(TypeError) as info:
        tfq.calibrate(model, x, **{keyword: "False"})
    one_line(info.value, f"{keyword}='False'")


def test_convert_refuses_a_cap_on_a_precomputed_calibration(conv):
    model, x = conv
    cal = tfq.calibrate(model, x)
    with pytest.raises(ValueError) as info:
        tfq.convert(model, "int8", x, calibration=cal, num_calibration_samples=5)
    one_line(info.value, "num_calibration_samples=5", "chosen already")
    # With a method that uses the data (learned rounding), the cap applies and is accepted.
    assert tfq.convert(model, "int8", x, calibration=cal, num_calibration_samples=5,
                       weight_rounding="adaround")[4:8] == b"TFL3"


def test_float_layers_selecting_only_a_data_moving_layer_is_refused(conv):
    model, x = conv
    with pytest.raises(ValueError) as info:
        tfq.convert(model, "int8", x, float_layers=["flat"])
    one_line(info.value, "float_layers pattern 'flat'", "'flat' (Flatten)", "changes nothing")
    # A pattern that also selects a layer that computes is honoured: the Dense stays float.
    info = tfq.inspect_tflite(tfq.convert(model, "int8", x, float_layers=["flat|head"]))
    float_types = {op.type for op in info.float_ops}
    assert "FULLY_CONNECTED" in float_types and "CONV_2D" not in float_types


def test_convert_refuses_a_range_for_a_tensor_the_model_lacks(conv):
    model, x = conv
    cal = tfq.calibrate(model, x)
    cal.ranges["no_such_tensor_fq"] = (0.0, 1.0)
    with pytest.raises(ValueError) as info:
        tfq.convert(model, "int8", calibration=cal)
    one_line(info.value, "'no_such_tensor_fq'", "does not quantize")


def test_a_calibration_made_before_float_layers_still_converts_with_them(conv):
    """Ranges of tensors the recipe keeps float are not 'another model's': they are accepted."""
    model, x = conv
    cal = tfq.calibrate(model, x)
    assert tfq.convert(model, "int8", calibration=cal, float_layers=["head"])[4:8] == b"TFL3"


@pytest.mark.parametrize("edited", [(0.0, 1e30), (float("nan"), 1.0), (2.0, 1.0), (0.0, float("inf"))])
def test_convert_refuses_a_non_finite_or_absurd_range(conv, edited, tmp_path):
    model, x = conv
    cal = tfq.calibrate(model, x)
    name = min(cal.ranges)
    cal.ranges[name] = edited
    with pytest.raises(ValueError) as info:
        tfq.convert(model, "int8", calibration=cal)
    one_line(info.value, f"calibration range for {name!r}")
    # The same edit in a saved file is refused at load, naming the file and the tensor.
    good = tfq.calibrate(model, x)
    path = good.save(tmp_path / "cal.json")
    data = json.loads(path.read_text())
    data["ranges"][name] = [edited[0], edited[1]] if np.isfinite(edited).all() else [0.0, 1e30]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as info:
        tfq.load_calibration(path)
    one_line(info.value, str(path), f"calibration range for {name!r}")


# --------------------------------------------------------------------------------------------
# 3. No effect, no word


def test_equalize_warns_when_there_is_no_pair(dense):
    model, x = dense
    with pytest.warns(UserWarning, match="model 'dense' has no pair of layers to equalize"):
        out = tfq.equalize(model)
    np.testing.assert_allclose(out.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)


def test_equalize_does_not_warn_when_it_equalizes():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="relu", name="a"),
                              keras.layers.Dense(2, name="b")], name="pair")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        tfq.equalize(model)


def test_equalize_refuses_a_qat_model(conv):
    model, _ = conv
    with pytest.raises(ValueError) as info:
        tfq.equalize(tfq.qat.quantize_model(model))
    one_line(info.value, "tfq QAT model", "tfq.qat.quantize_model(tfq.equalize(model))")


def test_analytical_bias_correction_refuses_a_model_without_batchnorm(dense):
    model, x = dense
    with pytest.raises(ValueError) as info:
        tfq.convert(model, "int8", x, bias_correction="analytical")
    one_line(info.value, "bias_correction='analytical'", "'empirical'")


def test_convert_warns_that_a_trained_qat_models_data_is_unused(conv):
    model, x = conv
    qat = tfq.qat.quantize_model(model, calibration_data=x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        without = tfq.convert(qat, "int8")
    with pytest.warns(UserWarning, match="representative_data was not used"):
        with_data = tfq.convert(qat, "int8", x[:8])
    assert with_data == without  # the warning is true: the data changed nothing
