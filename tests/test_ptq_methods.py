"""The methods beyond calibration in tfq.convert, tfq.tune and the CLI: honoured, or refused in one line."""

import numpy as np
import pytest

import tfq
from tests.conftest import tflite_accuracy


@pytest.mark.parametrize("kwargs", [dict(equalize=True), dict(bias_correction=True), dict(weight_rounding="gptq"),
                                    dict(data_free=True)])
@pytest.mark.parametrize("mode", ["float", "fp16", "dynamic"])
def test_float_modes_refuse_the_methods(trained_cnn, mode, kwargs):
    (name, value), = kwargs.items()
    with pytest.raises(ValueError, match=f"{name}={value!r} applies to mode"):
        tfq.convert(trained_cnn[0], mode, **kwargs)


def test_saved_model_and_qat_models_refuse_the_methods(trained_cnn, digits, tmp_path):
    model, _ = trained_cnn
    (x_train, _), _ = digits
    saved = tmp_path / "sm"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"")  # recognised as a SavedModel; refused before it is read
    with pytest.raises(ValueError, match="equalize need a Keras model.*SavedModel"):
        tfq.convert(str(saved), "int8", x_train[:8], equalize=True)
    qat = tfq.qat.quantize_model(model)
    with pytest.raises(ValueError, match="weight_rounding apply to a float model.*QAT"):
        tfq.convert(qat, "int8", x_train[:8], weight_rounding="gptq")


def test_a_precomputed_calibration_cannot_be_equalized(trained_cnn, digits):
    model, _ = trained_cnn
    (x_train, _), _ = digits
    cal = tfq.calibrate(model, x_train[:16], "minmax")
    with pytest.raises(ValueError, match="equalize chooses the ranges itself"):
        tfq.convert(model, "int8", calibration=cal, equalize=True)


def test_keyword_options_replace_the_recipe_and_report_is_checked(trained_cnn):
    from tfq.export.convert import _build_recipe

    r = _build_recipe(None, "int8_dfq", "minmax", True, "float32", (), None,
                      dict(equalize=False, bias_correction=None, weight_rounding=None, data_free=None))
    assert (r.equalize, r.bias_correction, r.data_free) == (False, "analytical", True)
    with pytest.raises(TypeError, match="report must be a tfq.MethodsReport"):
        tfq.convert(trained_cnn[0], "int8", None, data_free=True, report={})


def test_tune_method_stage_and_search_space():
    from tfq.analysis.tuning import DEFAULT_SEARCH_SPACE, _method_choices

    assert _method_choices(DEFAULT_SEARCH_SPACE) == [
        {"equalize": True}, {"bias_correction": True}, {"equalize": True, "bias_correction": True},
        {"weight_rounding": "gptq"}, {"equalize": True, "bias_correction": True, "weight_rounding": "gptq"},
    ]
    space = dict(DEFAULT_SEARCH_SPACE, weight_rounding=["nearest", "adaround"], data_free=[False, True])
    assert _method_choices(space)[-2:] == [
        {"equalize": True, "bias_correction": True, "weight_rounding": "adaround"},
        {"data_free": True, "equalize": True, "bias_correction": True},
    ]
    space = dict(space, equalize=[False])  # only what the space allows
    assert _method_choices(space) == [{"bias_correction": True}, {"weight_rounding": "adaround"}]


@pytest.mark.parametrize("space, message", [
    ({"weight_rounding": ["nearest", "optimal"]}, "weight_rounding"),
    ({"equalize": []}, "non-empty list"),
    ({"data_free": [False, "zeroq"]}, "data_free"),
])
def test_tune_validates_method_choices(trained_cnn, digits, space, message):
    (x_train, _), (x_test, y_test) = digits
    with pytest.raises(ValueError, match=message):
        tfq.tune(trained_cnn[0], x_train[:10], x_test[:10], y_test[:10], search_space=space, verbose=False)


@pytest.mark.slow
def test_tune_meets_a_per_tensor_target_through_equalization(trained_mobilenet):
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
    space = {"per_channel": [False], "calibration": ["minmax"], "symmetric_activations": [False],
             "precision": ["int8"], "float_layers": []}
    result = tfq.tune(skewed, x_train[:300], x_test, y_test, max_drop=0.015, search_space=space, max_trials=4,
                      verbose=False)
    assert result.met, result.summary()
    assert result.best.choices.get("equalize") is True and len(result.trials) == 2
    assert result.recipe.equalize and not result.recipe.weights.per_channel
    assert tfq.convert(skewed, recipe=result.recipe, mode=None, representative_data=x_train[:300]) == result.tflite
    assert tflite_accuracy(result.tflite, x_test, y_test) == pytest.approx(result.best.metric)
    assert np.isfinite(result.best.metric)
