"""Tests for tfq.recipes: presets, round trips, layer rules and validation messages."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from tfq import recipes
from tfq.recipes import Override, Recipe, TensorSpec, list_presets, load_recipe, save_recipe

EXPECTED_PRESETS = [
    "dynamic",
    "float",
    "fp16",
    "int16x8",
    "int8",
    "int8_dfq",
    "int8_gptq",
    "int8_kl",
    "int8_uint8_io",
    "qat_int8",
    "w4_dynamic_gptq",
    "w4_weight_only_gptq",
    "w4a8_adaround",
    "w4a8_gptq",
]

PER_TENSOR_W = TensorSpec(per_channel=False)
INT16_ACT = TensorSpec(bits=16, dtype="int16", symmetric=True, per_channel=False)


def _rich_recipe() -> Recipe:
    """A recipe that uses every field, to exercise round trips."""
    return Recipe(
        mode="int8",
        calibration="percentile",
        calibration_params={"percentile": 99.99, "num_bins": 1024},
        io_dtype="int8",
        float_layers=("class:Softmax", "head_.*"),
        overrides=(
            Override("conv.*", weights=PER_TENSOR_W),
            Override("class:Dense", activations=TensorSpec(symmetric=True, per_channel=False)),
            Override("stem", float=True),
        ),
        num_calibration_samples=256,
        seed=7,
        name="rich",
    )


# --------------------------------------------------------------------------- presets


def test_list_presets_is_sorted_file_stems():
    assert list_presets() == EXPECTED_PRESETS


@pytest.mark.parametrize("name", EXPECTED_PRESETS)
def test_preset_loads_round_trips_and_is_documented(name, tmp_path):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    # The dict is plain data: JSON accepts it unchanged.
    assert json.loads(json.dumps(recipe.to_dict())) == recipe.to_dict()
    for suffix in (".yaml", ".json"):
        assert load_recipe(save_recipe(recipe, tmp_path / f"{name}{suffix}")) == recipe
    text = (Path(recipes.__file__).parents[1] / "configs" / f"{name}.yaml").read_text()
    assert text.startswith("# "), "each preset starts with a comment saying what it is for"


def test_preset_contents():
    int8 = load_recipe("int8")
    assert (int8.mode, int8.io_dtype, int8.calibration) == ("int8", "float32", "robust_minmax")
    assert int8.weights == TensorSpec(bits=8, symmetric=True, per_channel=True, narrow_range=True)
    assert int8.activations == TensorSpec(symmetric=False, per_channel=False, narrow_range=False)
    assert int8 == Recipe(name="int8")  # The preset spells out the defaults.
    assert load_recipe("int8_uint8_io").io_dtype == "uint8"
    assert load_recipe("int8_kl").calibration == "kl"
    qat = load_recipe("qat_int8")
    assert (qat.calibration, dict(qat.calibration_params)) == ("moving_average", {"decay": 0.999})
    assert load_recipe("int16x8").activations == INT16_ACT
    assert load_recipe("fp16").spec_for("dense", "Dense") == (TensorSpec(dtype="float16"), None)
    assert load_recipe("dynamic").spec_for("dense", "Dense") == (TensorSpec(), None)
    assert load_recipe("float").spec_for("dense", "Dense") == (None, None)


# --------------------------------------------------------------------------- round trips


def test_tensor_spec_round_trip():
    for spec in (TensorSpec(), TensorSpec(bits=4, symmetric=False, axis=0), INT16_ACT, TensorSpec(dtype="float16")):
        assert TensorSpec.from_dict(spec.to_dict()) == spec
    assert TensorSpec(dtype="float32").to_dict() == {"dtype": "float32"}


def test_override_round_trip():
    for override in (Override("a", weights=PER_TENSOR_W), Override("class:ReLU", float=True)):
        assert Override.from_dict(override.to_dict()) == override


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_rich_recipe_round_trips_through_dict_and_file(suffix, tmp_path):
    recipe = _rich_recipe()
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    path = save_recipe(recipe, tmp_path / f"r{suffix}")
    assert path == tmp_path / f"r{suffix}"
    assert load_recipe(path) == recipe
    assert load_recipe(str(path)) == recipe
    assert sorted(os.listdir(tmp_path)) == [f"r{suffix}"]


def test_recipe_is_frozen_hashable_and_copies_its_inputs():
    params = {"decay": 0.9}
    layers = ["head"]
    recipe = Recipe(calibration="moving_average", calibration_params=params, float_layers=layers)
    params["decay"] = 0.5
    layers.append("other")
    assert recipe.calibration_params["decay"] == 0.9
    assert recipe.float_layers == ("head",)
    with pytest.raises(TypeError):
        recipe.calibration_params["decay"] = 0.1  # Read-only mapping.
    with pytest.raises(AttributeError):
        recipe.mode = "float"  # Frozen dataclass.
    assert hash(recipe) == hash(Recipe(calibration="moving_average", calibration_params={"decay": 0.9}, float_layers=("head",)))
    assert isinstance(recipe.to_dict()["calibration_params"], dict)


def test_load_recipe_passes_recipe_and_dict_through():
    recipe = _rich_recipe()
    assert load_recipe(recipe) is recipe
    assert load_recipe(recipe.to_dict()) == recipe


def test_replace_validates_again():
    recipe = load_recipe("int8")
    assert recipe.replace(io_dtype="uint8").io_dtype == "uint8"
    assert recipe.io_dtype == "float32"
    with pytest.raises(ValueError, match="io_dtype='uint8'"):
        recipe.replace(mode="dynamic", io_dtype="uint8")


def test_mode_defaults_fill_missing_specs():
    assert Recipe.from_dict({"mode": "int16x8"}).activations == INT16_ACT
    assert Recipe.from_dict({"mode": "fp16"}).weights == TensorSpec(dtype="float16")
    assert Recipe(mode="dynamic").activations == TensorSpec(dtype="float32")


# --------------------------------------------------------------------------- layer rules


def test_spec_for_global_specs():
    recipe = Recipe()
    assert recipe.spec_for("conv2d", "Conv2D") == (recipe.weights, recipe.activations)


def test_spec_for_float_layers_by_name_regex_and_class():
    recipe = Recipe(float_layers=("logits", "head_\\d+", "class:Softmax"))
    assert recipe.spec_for("logits", "Dense") == (None, None)
    assert recipe.spec_for("head_12", "Dense") == (None, None)
    assert recipe.spec_for("probs", "Softmax") == (None, None)
    # fullmatch, not search: a prefix or a substring does not match.
    assert recipe.spec_for("head_1x", "Dense") == (recipe.weights, recipe.activations)
    assert recipe.spec_for("logits_2", "Dense") == (recipe.weights, recipe.activations)
    # "class:" matches the class name only, never the layer name.
    assert recipe.spec_for("Softmax", "Activation") == (recipe.weights, recipe.activations)
    assert recipe.is_float_layer("probs", "Softmax")
    assert not recipe.is_float_layer("conv", "Conv2D")


def test_spec_for_later_override_wins():
    sym_act = TensorSpec(symmetric=True, per_channel=False)
    recipe = Recipe(
        overrides=(
            Override("conv.*", weights=PER_TENSOR_W),
            Override("conv_2", weights=TensorSpec(axis=0)),
            Override("class:Conv2D", activations=sym_act),
        )
    )
    assert recipe.spec_for("conv_1", "Conv2D") == (PER_TENSOR_W, sym_act)
    assert recipe.spec_for("conv_2", "Conv2D") == (TensorSpec(axis=0), sym_act)
    assert recipe.spec_for("conv_2", "DepthwiseConv2D") == (TensorSpec(axis=0), recipe.activations)
    assert recipe.spec_for("dense", "Dense") == (recipe.weights, recipe.activations)
    reordered = recipe.replace(overrides=recipe.overrides[1::-1])
    assert reordered.spec_for("conv_2", "Dense")[0] == PER_TENSOR_W


def test_spec_for_float_override_wins_over_spec_overrides():
    recipe = Recipe(
        float_layers=("class:Softmax",),
        overrides=(Override("head", float=True), Override(".*", weights=PER_TENSOR_W)),
    )
    assert recipe.spec_for("head", "Dense") == (None, None)
    assert recipe.spec_for("probs", "Softmax") == (None, None)
    assert recipe.spec_for("body", "Dense") == (PER_TENSOR_W, recipe.activations)
    assert recipe.is_float_layer("head", "Dense")


def test_spec_for_layer_name_with_regex_characters():
    recipe = Recipe(float_layers=("block(1)+x",))
    assert recipe.spec_for("block(1)+x", "Add") == (None, None)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, error, fragments",
    [
        ({"bits": 20}, ValueError, ["TensorSpec.bits", "2..16", "bits=20"]),
        ({"bits": 1}, ValueError, ["bits=1"]),
        ({"bits": 8.0}, ValueError, ["bits=8.0"]),
        ({"bits": True}, ValueError, ["bits=True"]),
        ({"bits": 12}, ValueError, ["at most 8", "bits=12", "dtype='int8'"]),
        ({"dtype": "int4"}, ValueError, ["'int8', 'int16', 'float16', 'float32'", "dtype='int4'"]),
        ({"symmetric": "yes"}, TypeError, ["TensorSpec.symmetric", "symmetric='yes'"]),
        ({"axis": 1.5}, TypeError, ["axis=1.5"]),
        ({"dtype": "float16", "bits": 4}, ValueError, ["dtype='float16'", "bits=4"]),
    ],
)
def test_tensor_spec_rejects(kwargs, error, fragments):
    with pytest.raises(error) as info:
        TensorSpec(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        ({"mode": "int4"}, ["Recipe.mode", "'float', 'dynamic', 'fp16', 'int8', 'int16x8', 'w4_dynamic', 'w4_weight_only'", "mode='int4'"]),
        ({"weights": TensorSpec(symmetric=False)}, [
            "asymmetric int8 weights are not supported by TFLite: weights must be symmetric (zero-point 0). "
            "Received: weights.symmetric=False",
            "allow_non_tflite=True",
        ]),
        ({"weights": TensorSpec(narrow_range=False)}, ["[-127, 127]", "weights.narrow_range=False"]),
        ({"weights": TensorSpec(bits=3)}, ["4 or 8-bit int8 weights", "weights.bits=3"]),
        ({"weights": TensorSpec(bits=4, block_size=32)}, ["mode='int8' has no blockwise kernel", "block_size=32",
                                                          "mode='w4_dynamic'"]),
        ({"mode": "w4_dynamic", "weights": TensorSpec(bits=4, block_size=16)}, ["takes blocks of 32, 64, 128",
                                                                                 "weights.block_size=16"]),
        ({"mode": "w4_dynamic", "weights": TensorSpec(bits=8)}, ["4-bit int8 weights", "weights.bits=8"]),
        ({"activations": TensorSpec(symmetric=False, narrow_range=False)}, [
            "per-channel activations", "activations.per_channel=True",
        ]),
        ({"activations": INT16_ACT}, ["8-bit int8 activations", "activations.dtype='int16'"]),
        ({"mode": "int16x8", "activations": TensorSpec(bits=16, dtype="int16", symmetric=False, per_channel=False)},
         ["symmetric", "activations.symmetric=False"]),
        ({"mode": "int16x8", "activations": TensorSpec(per_channel=False)},
         ["16-bit int16 activations", "activations.bits=8"]),
        ({"mode": "dynamic", "io_dtype": "uint8"}, ["mode='dynamic'", "'float32'", "io_dtype='uint8'"]),
        ({"mode": "int8", "io_dtype": "int16"}, ["'float32', 'int8', 'uint8'", "io_dtype='int16'"]),
        ({"io_dtype": "float64"}, ["'float32', 'int8', 'uint8', 'int16'", "io_dtype='float64'"]),
        ({"mode": "fp16", "weights": TensorSpec()}, ["float16", "weights.dtype='int8'"]),
        ({"weights": TensorSpec(dtype="float32")}, ["float_layers", "weights.dtype='float32'"]),
        ({"calibration": "entropy"}, ["'minmax', 'moving_average', 'kl', 'percentile', 'mse'", "calibration='entropy'"]),
        ({"calibration": "percentile", "calibration_params": {"percentile": 150}},
         ["(50, 100]", "percentile=150"]),
        ({"calibration": "percentile", "calibration_params": {"percentile": 0}}, ["percentile=0"]),
        ({"calibration": "moving_average", "calibration_params": {"decay": 1.0}}, ["(0, 1)", "decay=1.0"]),
        ({"calibration": "kl", "calibration_params": {"num_bins": 8}}, [">= 16", "num_bins=8"]),
        ({"calibration_params": {"decay": 0.9}}, ["'decay'", "calibration='robust_minmax'", "Allowed keys: none"]),
        ({"calibration": "minmax", "calibration_params": {"decay": 0.9}}, ["calibration='minmax'", "Allowed keys: none"]),
        ({"calibration": "kl", "calibration_params": {"percentile": 99.0}}, ["'percentile'", "'num_bins'"]),
        ({"float_layers": ("conv(",)}, ["float_layers[0]", "regular expression", "'conv('"]),
        ({"float_layers": ("class:",)}, ["float_layers[0]", "'class:'"]),
        ({"num_calibration_samples": 0}, ["num_calibration_samples=0"]),
        ({"overrides": (Override("x", weights=TensorSpec(symmetric=False)),)}, ["overrides[0].weights.symmetric=False"]),
        ({"overrides": (Override("x", activations=TensorSpec()),)}, ["overrides[0].activations.per_channel=True"]),
    ],
)
def test_recipe_rejects(kwargs, fragments):
    with pytest.raises(ValueError) as info:
        Recipe(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        ({"float_layers": "softmax"}, ["float_layers must be a list", "'softmax'"]),
        ({"overrides": ({"pattern": "x", "float": True},)}, ["overrides[0] must be a Override"]),
        ({"weights": {"bits": 8}}, ["Recipe.weights", "{'bits': 8}"]),
        ({"seed": "1"}, ["seed='1'"]),
    ],
)
def test_recipe_rejects_wrong_types(kwargs, fragments):
    with pytest.raises(TypeError) as info:
        Recipe(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_override_rejects():
    with pytest.raises(ValueError, match="changes nothing.*pattern='x'"):
        Override("x")
    with pytest.raises(ValueError, match="float=True.*weights="):
        Override("x", weights=TensorSpec(), float=True)
    with pytest.raises(TypeError, match="Received: ''"):
        Override("")
    with pytest.raises(TypeError, match="weights=8"):
        Override("x", weights=8)


def test_allow_non_tflite_permits_simulation_only_specs():
    recipe = Recipe(
        weights=TensorSpec(bits=4, symmetric=False),
        activations=TensorSpec(bits=12, dtype="int16", symmetric=False),
        allow_non_tflite=True,
    )
    assert recipe.spec_for("conv", "Conv2D") == (recipe.weights, recipe.activations)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    # The mode still decides what is quantized, and io_dtype must match it.
    with pytest.raises(ValueError, match="activations.dtype='float32'"):
        Recipe(activations=TensorSpec(dtype="float32"), allow_non_tflite=True)
    with pytest.raises(ValueError, match="io_dtype='uint8'"):
        Recipe(mode="dynamic", io_dtype="uint8", allow_non_tflite=True)


@pytest.mark.parametrize(
    "data, error, fragments",
    [
        ({"weights": {"bitz": 8}}, ValueError, ["'recipe.weights.bitz'", "Allowed keys: axis, bits, block_size, dtype, narrow_range, per_channel, symmetric"]),
        ({"mod": "int8"}, ValueError, ["'recipe.mod'", "mode"]),
        ({"overrides": [{"pattern": "x", "activation": {}}]}, ValueError, ["'recipe.overrides[0].activation'"]),
        ({"overrides": [{"pattern": "x", "weights": {"bits": 99}}]}, ValueError, ["recipe.overrides[0].weights:", "bits=99", "2..16"]),
        ({"weights": {"bits": 20}}, ValueError, ["recipe.weights:", "bits=20", "2..16"]),
        ({"mode": "int9"}, ValueError, ["recipe:", "mode='int9'", "'int16x8'"]),
        ({"weights": 8}, TypeError, ["recipe.weights must be a mapping", "8 (int)"]),
        ({"overrides": {"pattern": "x"}}, TypeError, ["recipe.overrides must be a list"]),
    ],
)
def test_from_dict_names_key_path_and_value(data, error, fragments):
    with pytest.raises(error) as info:
        Recipe.from_dict(data)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_from_dict_rejects_non_mapping():
    with pytest.raises(TypeError, match="recipe must be a mapping"):
        Recipe.from_dict(["int8"])


# --------------------------------------------------------------------------- files


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("mode: int8\nweights:\n  bitz: 8\n", ["'recipe.weights.bitz'", "Allowed keys:"]),
        ("mode: int8\ncalibration: entropy\n", ["calibration='entropy'", "'minmax'"]),
        ("mode: int8\nweights:\n  symmetric: false\n", ["weights.symmetric=False"]),
        ("mode: dynamic\nio_dtype: uint8\n", ["io_dtype='uint8'"]),
        ("calibration: percentile\ncalibration_params:\n  percentile: 101\n", ["percentile=101", "(50, 100]"]),
        ("mode: int8\nseed: '3'\n", ["seed='3'"]),
        ("- int8\n", ["mapping"]),
        ("mode: [int8\n", ["not valid YAML"]),
    ],
)
def test_bad_yaml_file_fails_at_load_naming_path_key_and_value(tmp_path, text, fragments):
    path = _write(tmp_path, "bad.yaml", text)
    with pytest.raises(ValueError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_bad_json_file_names_its_path(tmp_path):
    path = _write(tmp_path, "bad.json", '{"mode": "int8",}')
    with pytest.raises(ValueError, match="not valid JSON") as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}: ")


def test_empty_yaml_keys_take_defaults(tmp_path):
    path = _write(tmp_path, "r.yaml", "mode: int8\nfloat_layers:\ncalibration_params:\noverrides:\n")
    assert load_recipe(path) == Recipe()


def test_missing_file_and_unknown_preset(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError) as info:
        load_recipe(missing)
    assert str(missing) in str(info.value) and "int8_kl" in str(info.value)
    with pytest.raises(FileNotFoundError, match="No preset named 'int9'.*int8, int8_dfq, int8_gptq, int8_kl"):
        load_recipe("int9")
    with pytest.raises(ValueError, match=r"\.txt"):
        load_recipe(tmp_path / "r.txt")
    with pytest.raises(TypeError, match="Received: 8"):
        load_recipe(8)


def test_save_rejects_unknown_suffix_without_writing(tmp_path):
    with pytest.raises(ValueError, match="r.toml"):
        save_recipe(Recipe(), tmp_path / "r.toml")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("suffix, module, function", [(".yaml", yaml, "safe_dump"), (".json", json, "dump")])
def test_failed_save_leaves_no_temp_file_and_keeps_existing_file(tmp_path, monkeypatch, suffix, module, function):
    path = tmp_path / f"recipe{suffix}"
    save_recipe(load_recipe("int8"), path)
    before = path.read_bytes()

    def broken_dump(*args, **kwargs):
        stream = args[1]
        stream.write("partial")  # Fail half-way through, as a real error would.
        raise OSError("disk full")

    monkeypatch.setattr(module, function, broken_dump)
    with pytest.raises(OSError, match="disk full"):
        save_recipe(load_recipe("int8_kl"), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "r.yaml"
    save_recipe(load_recipe("int8"), path)
    save_recipe(load_recipe("fp16"), path)
    assert load_recipe(path) == load_recipe("fp16")
    assert os.listdir(tmp_path) == ["r.yaml"]


def test_module_imports_no_tensorflow():
    source = Path(recipes.__file__).read_text()
    assert "import tensorflow" not in source and "import keras" not in source


# --------------------------------------------------------------------------- methods beyond calibration


def test_method_fields_default_off_and_round_trip():
    plain = Recipe()
    assert (plain.equalize, plain.bias_correction, plain.weight_rounding, plain.data_free) == (False, False, "nearest",
                                                                                              False)
    assert plain.bias_correction_method is None and plain.data_free_method is None
    rich = Recipe(equalize=True, bias_correction="analytical", weight_rounding="gptq", data_free="bn_statistics")
    assert Recipe.from_dict(rich.to_dict()) == rich
    assert Recipe.from_dict(json.loads(json.dumps(rich.to_dict()))) == rich


def test_bias_correction_true_picks_the_method_by_data():
    assert Recipe(bias_correction=True).bias_correction_method == "empirical"
    assert Recipe(bias_correction=True, data_free=True).bias_correction_method == "analytical"
    assert Recipe(data_free=True).data_free_method == "synthetic"


def test_method_presets():
    dfq = load_recipe("int8_dfq")
    assert (dfq.equalize, dfq.bias_correction_method, dfq.data_free_method) == (True, "analytical", "synthetic")
    w4 = load_recipe("w4a8_adaround")
    assert (w4.weights.bits, w4.weight_rounding, w4.allow_non_tflite) == (4, "adaround", False)  # exports INT4
    for name, mode in (("w4_dynamic_gptq", "w4_dynamic"), ("w4_weight_only_gptq", "w4_weight_only")):
        r = load_recipe(name)
        assert (r.mode, r.weights.bits, r.weight_rounding, r.activations.dtype) == (mode, 4, "gptq", "float32")
    assert load_recipe("w4a8_gptq").weight_rounding == "gptq"
    assert load_recipe("int8_gptq").weight_rounding == "gptq"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(equalize="yes"), TypeError, "Recipe.equalize must be a bool"),
        (dict(bias_correction="always"), ValueError, "Recipe.bias_correction must be one of"),
        (dict(bias_correction=1), ValueError, "Received: bias_correction=1"),
        (dict(weight_rounding="stochastic"), ValueError, "Recipe.weight_rounding must be one of"),
        (dict(data_free="zeroq"), ValueError, "Recipe.data_free must be one of"),
        (dict(mode="fp16", equalize=True), ValueError, "equalize=True applies to mode 'int8' or 'int16x8'"),
        (dict(mode="dynamic", data_free=True), ValueError, "data_free=True applies to mode"),
        (dict(mode="int16x8", weight_rounding="gptq"), ValueError, "weight_rounding='gptq' applies to mode 'int8'"),
        (dict(mode="int16x8", bias_correction=True), ValueError, "bias_correction=True applies to mode 'int8'"),
        (dict(weights=TensorSpec(narrow_range=False), allow_non_tflite=True, weight_rounding="adaround"), ValueError,
         "narrow_range=False"),
    ],
)
def test_method_fields_are_validated(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message) if "(" not in message else message):
        Recipe(**kwargs)


def test_method_field_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("mode: int8\nweight_rounding: round\n")
    with pytest.raises(ValueError, match="bad.yaml.*weight_rounding"):
        load_recipe(path)
