"""Property-based tests: random bad inputs to the public functions give a valid result or a one-line
ValueError/TypeError naming the problem, and never leave a file behind (hypothesis).

Kept fast for the default suite: few examples each, no deadline (TensorFlow's first calls are slow).
"""

import contextlib
import io
import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tfq
from tfq.calibration_methods import calibration_method_names, get_calibration_method

# derandomize: the same examples on every run (a reproducible suite); database=None: no .hypothesis folder.
FAST = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SLOW = settings(max_examples=10, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Junk of every kind a user could pass by mistake.
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.binary(max_size=8))
junk = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                    max_leaves=6)
names = st.one_of(st.sampled_from(["int8", "int16x8", "fp16", "dynamic", "float", "kl", "minmax", "percentile",
                                   "mse", "moving_average", "INT8", "", "int4", "head", "class:Dense"]),
                  st.text(max_size=10))


def check_error(err: BaseException, allowed=(ValueError, TypeError)):
    """A user-facing error: an allowed type, one line, short, with a message."""
    assert isinstance(err, allowed), f"{type(err).__name__}: {err}"
    text = str(err)
    assert text.strip(), type(err).__name__
    assert "\n" not in text.strip(), text
    assert len(text) < 1500, text[:300]


def outcome(fn, *args, allowed=(ValueError, TypeError), **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - the property is about what escapes
        check_error(err, allowed)
        return None


# --------------------------------------------------------------------------------------------
# Data only (no TensorFlow): recipes, registries


recipe_fields = st.fixed_dictionaries({}, optional={
    "mode": st.one_of(names, junk), "calibration": st.one_of(names, junk),
    "calibration_params": st.one_of(st.dictionaries(st.sampled_from(["percentile", "num_bins", "decay",
                                                                     "batch_aggregate", "bogus"]),
                                                    st.one_of(st.floats(-200, 300), st.integers(-5, 5000),
                                                              st.none(), st.text(max_size=4)), max_size=2), junk),
    "io_dtype": st.one_of(st.sampled_from(["float32", "int8", "uint8", "int16", "float16"]), junk),
    "float_layers": st.one_of(st.lists(st.sampled_from(["head", "conv(", "class:", "class:Dense", "", ".*"]),
                                       max_size=2), junk),
    "num_calibration_samples": st.one_of(st.integers(-3, 5), junk),
    "weights": st.one_of(st.none(), st.fixed_dictionaries({}, optional={
        "bits": st.integers(0, 20), "symmetric": st.booleans(), "per_channel": st.one_of(st.booleans(), junk),
        "dtype": st.sampled_from(["int8", "int16", "float16", "float32", "int4"])})),
    "bitz": junk,
    "seed": junk,
    "equalize": st.one_of(st.booleans(), junk),
    "weight_rounding": st.one_of(st.sampled_from(["nearest", "adaround", "gptq"]), junk),
})


@FAST
@given(recipe_fields)
def test_recipe_from_dict_gives_a_recipe_or_one_line_error(fields):
    recipe = outcome(tfq.Recipe.from_dict, fields)
    if recipe is not None:
        assert tfq.Recipe.from_dict(recipe.to_dict()) == recipe  # a valid result round-trips


@FAST
@given(st.one_of(names, junk, st.sampled_from(["int8_kl", "configs/x.yaml", "x.json", "/nonexistent/r.yaml"])))
def test_load_recipe_gives_a_recipe_or_one_line_error(source):
    # A name that is no preset and a file that does not exist are FileNotFoundError (one line too).
    recipe = outcome(tfq.load_recipe, source, allowed=(ValueError, TypeError, FileNotFoundError))
    assert recipe is None or isinstance(recipe, tfq.Recipe)


@FAST
@given(st.sampled_from(calibration_method_names()),
       st.sampled_from(["percentile", "num_bins", "decay", "batch_aggregate"]),
       st.one_of(st.floats(-10, 300), st.just(float("nan")), st.integers(-10, 5000), st.none(), st.booleans(),
                 st.sampled_from(["median", "mean", ""]), st.just(np.float32(99.5)), st.just(np.int64(64))))
def test_registry_and_observer_accept_the_same_parameters(method, key, value):
    """The recipe's validation (the registry) and the observer's own checks agree value by value."""
    from tfq.observers import create_observer

    entry = get_calibration_method(method)
    if key not in entry.params:
        return
    try:
        entry.check_params({key: value})
        registry_ok = True
    except ValueError as err:
        check_error(err)
        registry_ok = False
    try:
        create_observer(method, **{key: value})
        observer_ok = True
    except (ValueError, TypeError) as err:
        check_error(err)
        observer_ok = False
    assert registry_ok == observer_ok, (method, key, value)


# --------------------------------------------------------------------------------------------
# With a model: representative_dataset, calibrate, convert, evaluate, the CLI


@pytest.fixture(scope="module")
def small():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 1), name="image"), keras.layers.Flatten(name="flat"),
                              keras.layers.Dense(3, activation="softmax", name="head")], name="small")
    x = np.random.default_rng(0).uniform(0, 1, (24, 4, 4, 1)).astype("float32")
    return model, x


data_like = st.one_of(
    junk,
    st.sampled_from(["good", "good_list", "good_dict", "bad_dict", "rank5", "nan", "empty", "strings", "ragged"]),
)


def materialize(kind, x):
    """A data value from a tag (the good ones and typical mistakes) or junk as is."""
    table = {
        "good": x, "good_list": [x], "good_dict": {"image": x}, "bad_dict": {"img": x}, "rank5": x[:, None],
        "nan": np.where(x > 0.5, np.nan, x), "empty": x[:0], "strings": np.array(["a", "b"]),
        "ragged": [x[:2, :2], x[:2]],
    }
    return table.get(kind, kind) if isinstance(kind, str) else kind


@FAST
@given(data_like, st.one_of(st.none(), st.integers(-2, 30), junk))
@example("good", 10)
@example("good_dict", None)
def test_representative_dataset_valid_or_one_line_error(small, kind, num_samples):
    model, x = small
    data = materialize(kind, x)

    def build_and_read():
        rep = tfq.representative_dataset(data, num_samples, model=model)
        batches = list(rep.batches(8))
        assert sum(len(b[0]) for b in batches) == len(rep)
        return rep

    outcome(build_and_read)


@SLOW
@given(st.one_of(names, junk), data_like, junk)
@example("kl", "good", {"num_bins": 64})
def test_calibrate_valid_or_one_line_error(small, method, kind, params):
    model, x = small
    params = params if isinstance(params, dict) and all(isinstance(k, str) and k.isidentifier() for k in params) else {}
    with np.errstate(all="ignore"):
        cal = outcome(tfq.calibrate, model, materialize(kind, x), method, **params)
    if cal is not None:
        assert all(math.isfinite(lo) and math.isfinite(hi) and lo <= hi for lo, hi in cal.ranges.values())


convert_kwargs = st.fixed_dictionaries({}, optional={
    "calibration": st.one_of(names, junk),
    "per_channel": st.one_of(st.booleans(), junk),
    "io_dtype": st.one_of(st.sampled_from(["float32", "int8", "uint8", "int16"]), junk),
    "float_layers": st.one_of(st.sampled_from(["head", "Head", ["flat"], ["class:Dense"], ["x("]]), junk),
    "calibration_params": st.one_of(st.none(), junk),
    "num_calibration_samples": st.one_of(st.none(), st.integers(-1, 30), junk),
    "verbose": st.one_of(st.booleans(), junk),
    "equalize": st.one_of(st.none(), st.booleans(), junk),
    "data_free": st.one_of(st.none(), st.booleans(), junk),
})


@SLOW
@given(st.one_of(names, junk), data_like, convert_kwargs, st.sampled_from(["ok.tflite", "sub/missing.tflite", "."]))
@example("int8", "good", {"calibration": "percentile", "float_layers": "head"}, "ok.tflite")
@example("int8", "good", {"calibration": "kl", "float_layers": "Head"}, "ok.tflite")
@example("fp16", None, {}, "ok.tflite")
def test_convert_valid_or_one_line_error_and_no_stray_file(small, tmp_path, mode, kind, kwargs, output):
    model, x = small
    before = set(os.listdir(tmp_path))
    target = tmp_path / output if output != "." else tmp_path
    with np.errstate(all="ignore"):
        # A missing output directory is FileNotFoundError, as everywhere in tfq (one line too).
        content = outcome(tfq.convert, model, mode, materialize(kind, x), output=target,
                          allowed=(ValueError, TypeError, FileNotFoundError), **kwargs)
    after = set(os.listdir(tmp_path))
    if content is None:
        assert after == before, after - before  # nothing written, no temporary file left
    else:
        assert content[4:8] == b"TFL3" and target.read_bytes() == content
        target.unlink()


@SLOW
@given(data_like, st.one_of(st.none(), junk, st.sampled_from(["good", "out_of_range", "short", "float"])),
       st.one_of(st.sampled_from(["accuracy", "top5", "top_k:2", "mse", "top_k:0"]), junk))
@example("good", "good", "top_k:2")
@example("good", "out_of_range", "accuracy")
def test_evaluate_valid_or_one_line_error(small, kind, labels_kind, metric):
    model, x = small
    labels = {"good": np.arange(24) % 3, "out_of_range": np.arange(24) % 5, "short": np.arange(5) % 3,
              "float": np.linspace(0, 2.5, 24)}.get(labels_kind, labels_kind) if isinstance(labels_kind, str) \
        else labels_kind
    report = outcome(tfq.evaluate, {"k": model}, materialize(kind, x), labels, metrics=metric, latency=False)
    if report is not None:
        assert report.rows[0]["name"] == "k"


flag_values = st.one_of(st.text(max_size=8), st.sampled_from(["int8", "fp16", "kl", "percentile", "-1", "0", "1e9"]))


@SLOW
@given(st.sampled_from(["convert", "evaluate", "inspect", "tune", "bogus"]),
       st.lists(st.tuples(st.sampled_from(["mode", "calibration", "io_dtype", "percentile", "num_samples", "data",
                                           "model", "output", "tflite", "max_drop", "weight_rounding"]),
                          flag_values), max_size=4, unique_by=lambda kv: kv[0]))
@example("convert", [("model", "1"), ("data", "1"), ("output", "ok"), ("mode", "int8")])
@example("convert", [("model", "1"), ("data", "1"), ("output", "ok"), ("mode", "fp16")])
@example("evaluate", [("model", "1"), ("data", "1"), ("tflite", "missing")])
def test_cli_exits_with_a_status_and_one_line(tmp_path, small, command, pairs):
    """Random flags: the command ends with status 0/1/2 and, on failure, one line on stderr (no traceback)."""
    from absl import flags

    from tfq.cli import commands as cli

    model, x = small
    model_path = tmp_path / "m.keras"
    if not model_path.exists():
        model.save(model_path)
        np.savez(tmp_path / "d.npz", x=x, y=np.arange(24) % 3)
    files = {"model": str(model_path), "data": str(tmp_path / "d.npz")}
    argv = ["tfq", "--quiet"] + (["--max_trials=1"] if command == "tune" else [])  # a command refuses others' flags
    for key, value in pairs:
        if key in files and value.startswith("1"):
            value = files[key]  # now and then a real file
        if key in ("output", "tflite"):
            value = str(tmp_path / (value.replace("/", "_") or "x")) + ".tflite"
        argv.append(f"--{key}={value}")
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(argv)
    except flags.Error:  # absl's own one-line usage error (a float flag given text): not tfq's concern
        return
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        status = cli.main(["tfq", command])
    flags.FLAGS.unparse_flags()
    assert status in (0, 1, 2)
    if status:
        lines = [line for line in err.getvalue().splitlines() if line.startswith("tfq")]
        assert len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()
