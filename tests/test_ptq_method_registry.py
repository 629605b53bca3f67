"""The post-training method registry (tfq.ptq_methods): one module and one registration add a method to
tfq.convert, recipes (dict and YAML), the CLI (``--method``) and tfq.tune; its options are validated by its entry.
Also convert's surface: a recipe alone is enough (mode defaults to it), fake_quantize shares convert's signature."""

import inspect

import keras
import numpy as np
import pytest
from absl import flags

import tfq
from tfq.core import ptq_methods
from tfq.core.ptq_methods import Param, PTQMethod, get_ptq_method, register_ptq_method

CALLS = []  # (method, value, options) of every step run


def clip_weights_step(model, ctx):
    """A real, tiny method: every kernel (ndim >= 2) clipped to ±k·std of its values, on a copy of the float model."""
    CALLS.append(("clip_weights", ctx.value, dict(ctx.options)))
    k = ctx.options["k"]
    clone = keras.models.clone_model(model)
    clone.set_weights([np.clip(w, -k * w.std(), k * w.std()) if w.ndim >= 2 else w for w in model.get_weights()])
    return clone


def frozen_probe_step(frozen, ctx):
    """Records what it sees on the frozen fake-quant model: the bias shifts so far, the shared references."""
    CALLS.append(("frozen_probe", ctx.value, dict(ctx.options)))
    return {"bias_shifts_before": dict(ctx.report.bias_shifts), "references": len(ctx.shared["references"])}


def _positive(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


CLIP = PTQMethod("clip_weights", {"float_model": clip_weights_step},
                 params={"k": Param(_positive, "a number > 0, e.g. 3.0", 3.0)}, tune=(False, {"k": 0.5}),
                 description="kernels clipped to ±k·std")
PROBE = PTQMethod("frozen_probe", {"frozen_model": frozen_probe_step}, description="records its context")


@pytest.fixture
def toy_methods():
    for method in (CLIP, PROBE):
        register_ptq_method(method)
    CALLS.clear()
    yield CALLS
    for method in (CLIP, PROBE):
        ptq_methods._REGISTRY.pop(method.name)


def _clipped_reference(model, k):
    return [np.clip(w, -k * w.std(), k * w.std()) if w.ndim >= 2 else w for w in model.get_weights()]


def _run_cli(*args) -> int:
    """``tfq convert …`` in this process (the method is registered here): absl parses the flags, main runs."""
    from tfq.cli import commands

    try:
        rest = flags.FLAGS(["tfq", *args])
        return commands.main(rest)
    finally:
        flags.FLAGS.unparse_flags()


def test_a_registered_method_works_through_convert_recipes_and_the_cli(toy_methods, trained_cnn, digits, tmp_path,
                                                                        capsys):
    model, _ = trained_cnn
    (x_train, _), _ = digits
    x = x_train[:128]
    plain = tfq.convert(model, "int8", x)
    assert toy_methods == []  # off unless asked for
    clipped = tfq.convert(model, "int8", x, methods={"clip_weights": {"k": 0.5}})
    assert toy_methods == [("clip_weights", True, {"k": 0.5})]
    assert clipped != plain
    # The effect is the clipping: converting the clipped float model by hand gives the same bytes.
    by_hand = keras.models.clone_model(model)
    by_hand.set_weights(_clipped_reference(model, 0.5))
    assert tfq.convert(by_hand, "int8", x) == clipped

    # A recipe: dict, round trip, YAML file.
    recipe = tfq.Recipe.from_dict({"mode": "int8", "methods": {"clip_weights": {"k": 0.5}}})
    assert recipe.to_dict()["methods"] == {"clip_weights": {"value": True, "k": 0.5}}
    assert tfq.Recipe.from_dict(recipe.to_dict()) == recipe
    assert recipe.method_settings() == {"clip_weights": (True, {"k": 0.5})}
    path = tfq.save_recipe(recipe, tmp_path / "clip.yaml")
    assert "clip_weights" in path.read_text() and tfq.load_recipe(path) == recipe
    toy_methods.clear()
    assert tfq.convert(model, recipe=str(path), representative_data=x) == clipped
    assert toy_methods == [("clip_weights", True, {"k": 0.5})]

    # The CLI: the generic --method flag (a method registered after the CLI was imported has no flag of its own).
    model_path, data_path, out = tmp_path / "m.keras", tmp_path / "calib.npz", tmp_path / "m.tflite"
    model.save(model_path)
    np.savez(data_path, x=x)
    toy_methods.clear()
    status = _run_cli("convert", f"--model={model_path}", f"--data={data_path}", "--method=clip_weights:k=0.5",
                      f"--output={out}", "--quiet")
    assert status == 0, capsys.readouterr().err
    assert toy_methods == [("clip_weights", True, {"k": 0.5})]
    assert out.read_bytes() == clipped


def test_a_registered_method_is_searched_by_tune(toy_methods, trained_cnn, digits):
    model, _ = trained_cnn
    (x_train, _), (x_test, y_test) = digits
    fixed = {"calibration": ["minmax"], "per_channel": [True], "symmetric_activations": [False], "precision": ["int8"],
             "float_layers": [], "equalize": [False], "bias_correction": [False], "weight_rounding": ["nearest"]}
    result = tfq.tune(model, x_train[:128], x_test[:200], y_test[:200], search_space=fixed, strategy="random",
                      max_trials=2, verbose=False)
    # The registry's tune values are in the default space: both were tried, the second with the method on.
    tried = sorted(str(t.choices.get("clip_weights")) for t in result.trials)
    assert tried == ["None", "{'k': 0.5}"]
    assert ("clip_weights", True, {"k": 0.5}) in toy_methods
    on = next(t for t in result.trials if "clip_weights" in t.choices)
    assert on.error is None and np.isfinite(on.metric)
    from tfq.analysis.tuning import _method_choices, _recipe_for

    assert _recipe_for(on.choices, 0, None).methods == {"clip_weights": {"value": True, "k": 0.5}}
    assert _method_choices({"clip_weights": [False, {"k": 0.5}]}) == [{"clip_weights": {"k": 0.5}}]


def test_frozen_stage_runs_in_order_and_reports(toy_methods, trained_cnn, digits):
    model, _ = trained_cnn
    (x_train, _), _ = digits
    report = tfq.MethodsReport()
    tfq.fake_quantize(model, representative_data=x_train[:64], methods={"frozen_probe": True},
                      bias_correction="empirical", report=report)
    assert toy_methods == [("frozen_probe", True, {})]
    seen = report.results["frozen_probe"]
    # order 50: after learned rounding (10), before bias correction (90), which corrects what it leaves.
    assert seen["bias_shifts_before"] == {} and report.bias_shifts
    assert seen["references"] == 4  # the float kernels of conv1, conv2, fc1, probs
    assert set(report.seconds) == {"frozen_probe", "bias_correction"}


def test_bad_option_values_are_refused_in_one_line(toy_methods, trained_cnn, tmp_path, capsys):
    model, _ = trained_cnn
    cases = [
        (lambda: tfq.convert(model, "int8", None, methods={"clip_weights": {"k": -1}}),
         "Recipe.methods['clip_weights'] option 'k' must be a number > 0, e.g. 3.0. Received: k=-1"),
        (lambda: tfq.Recipe.from_dict({"methods": {"clip_weights": {"k": "big"}}}),
         "option 'k' must be a number > 0, e.g. 3.0. Received: k='big'"),
        (lambda: tfq.Recipe(methods={"clip_weights": {"kk": 1.0}}),
         ("Unknown option 'kk' of method 'clip_weights' (Recipe.methods['clip_weights']). Allowed options: 'k'. "
          "Received: kk=1.0")),
        (lambda: tfq.Recipe(methods={"clip_weights": "yes"}), "Received: clip_weights='yes'"),
        (lambda: tfq.Recipe(mode="fp16", methods={"clip_weights": True}),
         "Recipe.methods['clip_weights']=True applies to mode 'int8', not mode='fp16'"),
        (lambda: tfq.Recipe(methods={"clip_wights": True}), "Received: Recipe.methods key='clip_wights'"),
    ]
    for call, message in cases:
        with pytest.raises((ValueError, TypeError)) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    path = tmp_path / "bad.yaml"
    path.write_text("mode: int8\nmethods:\n  clip_weights: {k: 0}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: recipe: Recipe.methods\['clip_weights'\] option 'k'.*k=0$"):
        tfq.load_recipe(path)
    model.save(tmp_path / "m.keras")
    status = _run_cli("convert", f"--model={tmp_path / 'm.keras'}", "--method=clip_weights:k=0",
                      f"--output={tmp_path / 'x.tflite'}")
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "option 'k'" in err[0] and "Received: k=0" in err[0], err
    assert not (tmp_path / "x.tflite").exists()
    assert toy_methods == []  # refused before anything ran


def test_registration_is_validated():
    step = {"frozen_model": frozen_probe_step}
    for kwargs, error, message in [
        (dict(name="bad name", steps=step), ValueError, "identifier"),
        (dict(name="m", steps={"after_convert": frozen_probe_step}), ValueError, "stage must be one of"),
        (dict(name="m", steps={"frozen_model": "not a path"}), TypeError, "'module:function'"),
        (dict(name="m", steps=step, values=("on",)), TypeError, "at least two"),
        (dict(name="m", steps=step, data="sometimes"), ValueError, "PTQMethod.data"),
        (dict(name="m", steps=step, tune=(True, False)), ValueError, "starts with the off value"),
        (dict(name="m", steps=step, tune=("maybe",)), TypeError, "tune value must be a bool"),
        (dict(name="m", steps=step, params={"value": Param(bool, "x")}), TypeError, "other than 'value'"),
    ]:
        with pytest.raises(error, match=message):
            PTQMethod(**kwargs)
    with pytest.raises(ValueError, match="already registered"):
        register_ptq_method(PTQMethod("equalize", step))
    with pytest.raises(ValueError, match="modes value must be one of"):
        register_ptq_method(PTQMethod("m", step, modes=("int4",)))
    with pytest.raises(ValueError, match="runs on the fake-quant model only.*'int16x8'"):
        register_ptq_method(PTQMethod("m", step, modes=("int8", "int16x8")))
    assert "m" not in ptq_methods.ptq_method_names()


def test_built_ins_are_registered_with_their_recipe_fields():
    assert ptq_methods.ptq_method_names()[:4] == ("equalize", "bias_correction", "weight_rounding", "data_free")
    for name in ("equalize", "bias_correction", "weight_rounding", "data_free"):
        entry = get_ptq_method(name)
        assert entry.off == getattr(tfq.Recipe(), name)  # the field's default is the method's off value
        # the modes a built-in applies to are the modes whose registry entry honours its option
        assert set(entry.modes) == {m for m in tfq.export_modes.export_mode_names()
                                    if name in tfq.export_modes.get_export_mode(m).honours}
    assert tfq.recipes.WEIGHT_ROUNDING == ("nearest", "adaround", "gptq")
    # A built-in given through ``methods`` goes to its own field; both ways make the same recipe.
    r = tfq.Recipe(methods={"weight_rounding": "gptq", "bias_correction": {"value": "analytical"}})
    assert r == tfq.Recipe(weight_rounding="gptq", bias_correction="analytical") and r.methods == {}
    with pytest.raises(ValueError, match="conflicts with Recipe.weight_rounding='adaround'"):
        tfq.Recipe(weight_rounding="adaround", methods={"weight_rounding": "gptq"})
    assert tfq.load_recipe("int8_dfq").with_methods({"equalize": False, "data_free": None}).method_settings() == {
        "bias_correction": ("analytical", {}), "data_free": (True, {})}


def test_method_flag_syntax():
    from tfq.cli.commands import method_flag
    from tfq.cli.flags import UsageError

    assert method_flag("equalize") == ("equalize", {})
    assert method_flag("weight_rounding=gptq") == ("weight_rounding", "gptq")
    assert method_flag("data_free=off") == ("data_free", False)
    assert method_flag("clip:k=2") == ("clip", {"k": 2})
    assert method_flag("clip=on:k=2.5,name=x") == ("clip", {"value": True, "k": 2.5, "name": "x"})
    for bad in ("", "a b", "clip:k", "clip:=3"):
        with pytest.raises(UsageError):
            method_flag(bad)


def test_a_recipe_alone_is_enough(trained_cnn, digits):
    from tfq.export.convert import _build_recipe

    model, _ = trained_cnn
    (x_train, _), _ = digits
    x = x_train[:64]
    content = tfq.convert(model, recipe="int16x8", representative_data=x)  # was: "mode='int8' conflicts with …"
    assert content == tfq.convert(model, "int16x8", x)
    assert "INT16" in {t.dtype for t in tfq.inspect_tflite(content).tensors}
    assert _build_recipe(None, None, "robust_minmax", True, "float32", (), None).mode == "int8"  # no recipe: int8
    with pytest.raises(ValueError, match="mode='int8' conflicts with the recipe's mode 'int16x8'"):
        tfq.convert(model, "int8", x, recipe="int16x8")  # an explicit mode that differs is still refused
    assert inspect.signature(tfq.convert).parameters["mode"].default is None


def test_fake_quantize_shares_converts_signature(trained_cnn):
    convert_params = inspect.signature(tfq.convert).parameters
    fake_params = inspect.signature(tfq.fake_quantize).parameters
    assert list(fake_params) == [p for p in convert_params
                                 if p not in ("io_dtype", "output", "check", "strict", "int16_layers")]
    assert all(fake_params[p] == convert_params[p] for p in fake_params)
    with pytest.raises(TypeError, match="output"):
        tfq.fake_quantize(trained_cnn[0], "int8", None, output="x.tflite")
    with pytest.raises(ValueError, match="conflicts with methods"):
        tfq.fake_quantize(trained_cnn[0], equalize=True, methods={"equalize": False})
