"""Property-based tests: random bad inputs to the public functions give a valid result or a one-line
ValueError/TypeError naming the problem, and never leave a file behind (hypothesis).

Kept fast for the default suite: few examples each, no deadline (TensorFlow's first calls are slow).
"""

import contextlib
import io
import math
import os
import warnings

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


# --------------------------------------------------------------------------------------------
# Every keyword of every public entry point: a wrong-type value is refused in one line naming it
# (issue 29), and a valid non-default value changes something observable.

BOOL = ["False", "True", 1, 0, 0.5, [True]]
COUNT_OR_NONE = ["5", 2.5, True, -3, [4]]  # an int >= 1, or None
COUNT = COUNT_OR_NONE + [None]
CHOICE = [1, 2.5, "bogus", ["x"], b"x"]  # a name among a few
CHOICE_OR_NONE = [1, 2.5, "bogus", ["x"]]
MAPPING_OR_NONE = ["x", 1, [1]]
PATH_OR_NONE = [1, 2.5, ["x"]]
NAMES = [1, 2.5, [1], {"a": 1}]  # names/patterns (a string or a list of them)
RECIPE = [1, 2.5, ["x"]]


def _number(low: float, high: float, none_ok: bool = False):
    """Wrong values for a number that must lie in [low, high]."""
    bad = ["0.5", [0.5], True, float("nan")]
    bad += [low - 1.0] if math.isfinite(low) else []
    bad += [high + 1.0] if math.isfinite(high) else []
    return bad if none_ok else bad + [None]


# entry point -> {keyword: wrong values}. Positional-only inputs (the model, the data) are covered above.
KEYWORDS = {
    "convert": {
        "mode": CHOICE, "recipe": RECIPE, "calibration": [1, 2.5, "bogus", ["kl"]], "per_channel": BOOL,
        "io_dtype": CHOICE, "float_layers": NAMES, "num_calibration_samples": COUNT_OR_NONE,
        "output": PATH_OR_NONE, "calibration_params": MAPPING_OR_NONE, "verbose": BOOL,
        "equalize": ["False", 1, [True]], "bias_correction": ["False", 1, "bogus", [True]],
        "weight_rounding": [1, "bogus", [True]], "data_free": ["False", 1, "bogus", [True]], "report": [1, "x", {}],
    },
    "fake_quantize": {
        "mode": CHOICE, "recipe": RECIPE, "calibration": [1, 2.5, "bogus"], "per_channel": BOOL,
        "float_layers": NAMES, "num_calibration_samples": COUNT_OR_NONE, "calibration_params": MAPPING_OR_NONE,
        "verbose": BOOL, "equalize": ["False", 1], "bias_correction": ["False", 1, "bogus"],
        "weight_rounding": [1, "bogus"], "data_free": ["False", 1, "bogus"], "report": [1, "x"],
    },
    "calibrate": {
        "method": [1, 2.5, "bogus", ["kl"]], "recipe": RECIPE, "num_samples": COUNT_OR_NONE,
        "batch_size": COUNT_OR_NONE, "verbose": BOOL, "keep_observers": BOOL, "strategy": [1, "mirrored", [1]],
    },
    "quantize_model": {
        "recipe": RECIPE, "range_mode": CHOICE, "decay": _number(0.0, 1.0, none_ok=True),
        "calibration": [1, 2.5, "bogus", ["kl"]], "num_calibration_samples": COUNT_OR_NONE, "warn_unknown": BOOL,
        "preserve": CHOICE_OR_NONE, "bn_folding": CHOICE, "logits_range": CHOICE, "percentile": [99.9],
        "bogus_keyword": [1],
    },
    "equalize": {
        "high_bias_absorption": BOOL, "relu6": CHOICE, "fold_batchnorm": BOOL, "max_iterations": COUNT,
        "tolerance": ["0.1", None, [0.1], True, -1.0, float("nan")],
    },
    "evaluate": {
        "metrics": [1, 2.5, "bogus", [1]], "reference": [1, "bogus", ["k"]], "latency": BOOL,
        "num_threads": COUNT_OR_NONE, "batch_size": COUNT_OR_NONE, "max_samples": COUNT_OR_NONE,
        "variants": [1, "bogus", ["int8"]], "representative_data": ["x", [1]], "latency_runs": COUNT,
        "verbose": BOOL,
    },
    "tune": {
        "metric": [1, 2.5, "bogus"], "max_drop": _number(0.0, math.inf), "relative": BOOL,
        "objective": CHOICE, "strategy": CHOICE, "search_space": ["x", 1, [1], {"bogus": [1]}],
        "max_trials": COUNT, "timeout": ["5", [5], True, -1.0, float("nan")], "seed": ["0", 2.5, None, [0]],
        "output_dir": PATH_OR_NONE, "num_threads": COUNT_OR_NONE, "num_calibration_samples": COUNT_OR_NONE,
        "verbose": BOOL,
    },
    "prune_low_magnitude": {
        "target_sparsity": _number(0.0, 0.999), "schedule": CHOICE, "begin_step": ["0", 2.5, None, True, -1],
        "end_step": ["5", 2.5, True, -1, [4]], "frequency": COUNT, "block_size": [1, "x", (0, 1), (1, 2, 3)],
        "layers": NAMES, "skip_layers": NAMES, "initial_sparsity": _number(0.0, 0.999), "power": _number(0.0, math.inf),
    },
    "cluster_weights": {
        "number_of_clusters": COUNT + [1], "init": CHOICE, "layers": NAMES, "skip_layers": NAMES,
        "seed": ["0", 2.5, None, [0]],
    },
    "Distiller": {
        "temperature": _number(0.0, math.inf), "alpha": _number(0.0, 1.0), "from_logits": BOOL,
    },
}


@pytest.fixture(scope="module")
def keyword_models(small):
    """(float model, x, labels, a QAT-free conv model with a BatchNorm) for the keyword properties."""
    import keras

    model, x = small
    keras.utils.set_random_seed(1)
    conv = keras.Sequential([keras.Input((4, 4, 1), name="image"), keras.layers.Conv2D(4, 3, name="conv"),
                             keras.layers.BatchNormalization(name="bn"), keras.layers.ReLU(name="relu"),
                             keras.layers.Flatten(name="flat"), keras.layers.Dense(3, name="head")], name="conv")
    heavy = np.random.default_rng(1).lognormal(0.0, 1.5, (64, 4, 4, 1)).astype("float32")  # long-tailed inputs
    return model, x, np.arange(len(x)) % 3, conv, heavy


def call_entry(entry: str, models, **kwargs):
    """One call of a public entry point on the tiny models, with ``kwargs`` added."""
    model, x, y, conv, _ = models
    if entry == "convert":
        return tfq.convert(model, **{"mode": "int8", **kwargs}, representative_data=x)
    if entry == "fake_quantize":
        return tfq.fake_quantize(model, **{"mode": "int8", **kwargs}, representative_data=x)
    if entry == "calibrate":
        return tfq.calibrate(model, x, **kwargs)
    if entry == "quantize_model":
        return tfq.qat.quantize_model(model, **kwargs)
    if entry == "equalize":
        return tfq.equalize(conv, **kwargs)
    if entry == "evaluate":
        return tfq.evaluate({"k": model}, x, y, **{"latency": False, **kwargs})
    if entry == "tune":
        return tfq.tune(model, x, x, y, **{"max_trials": 1, "verbose": False, **kwargs})
    if entry == "prune_low_magnitude":
        return tfq.pruning.prune_low_magnitude(conv, **kwargs)
    if entry == "cluster_weights":
        return tfq.clustering.cluster_weights(conv, **kwargs)
    if entry == "Distiller":
        return tfq.distillation.Distiller(model, model, **kwargs)
    raise AssertionError(entry)


KEYWORD_CASES = [(entry, keyword) for entry, keywords in KEYWORDS.items() for keyword in keywords]


@pytest.mark.parametrize("entry, keyword", KEYWORD_CASES, ids=[f"{e}-{k}" for e, k in KEYWORD_CASES])
@settings(max_examples=3, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_every_keyword_refuses_a_wrong_value_in_one_line_naming_it(keyword_models, tmp_path, entry, keyword, data):
    value = data.draw(st.sampled_from(KEYWORDS[entry][keyword]), label="value")
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = call_entry(entry, keyword_models, **{keyword: value})
        except (ValueError, TypeError, FileNotFoundError) as err:
            check_error(err, (ValueError, TypeError, FileNotFoundError))
            assert keyword in str(err) or (keyword == "method" and "calibration" in str(err)), \
                f"{entry}({keyword}={value!r}): {err}"
            return
    pytest.fail(f"{entry}({keyword}={value!r}) was accepted: {type(result).__name__}")


# A valid non-default value of each keyword changes what the call returns (or writes, or prints).
# Knobs of speed only (batch_size, num_threads) and of printing (verbose) are compared on what they
# print or left out; tune's keywords have their own tests (tests/test_tune.py).
CHANGES = {
    "convert": {
        "mode": "int16x8", "recipe": "int8_kl", "calibration": "kl", "per_channel": False, "io_dtype": "int8",
        "float_layers": ["head"], "num_calibration_samples": 5, "equalize": True,
        "bias_correction": "empirical", "weight_rounding": "adaround",
    },
    "fake_quantize": {
        "mode": "int16x8", "recipe": "int8_kl", "calibration": "kl", "per_channel": False,
        "float_layers": ["head"], "num_calibration_samples": 5, "equalize": True, "bias_correction": "empirical",
    },
    "calibrate": {"method": "kl", "recipe": "int16x8", "num_samples": 5, "keep_observers": True},
    "quantize_model": {
        "recipe": "int8_kl", "calibration": "kl", "num_calibration_samples": 5, "range_mode": "learned",
        "decay": 0.5, "preserve": "sparsity", "bn_folding": "two_pass", "logits_range": "softmax",
    },
    "equalize": {"high_bias_absorption": False, "relu6": "skip", "fold_batchnorm": True, "max_iterations": 1,
                 "tolerance": 10.0},
    "evaluate": {"metrics": ["top_k:2"], "reference": "j", "latency": True, "max_samples": 5},
    "prune_low_magnitude": {"target_sparsity": 0.5, "schedule": "constant", "begin_step": 3, "end_step": 7,
                            "frequency": 2, "block_size": (1, 2), "layers": ["conv"], "skip_layers": ["head"],
                            "initial_sparsity": 0.2, "power": 1.0},
    "cluster_weights": {"number_of_clusters": 2, "init": "linear", "layers": ["conv"], "skip_layers": ["head"],
                        "seed": 3},
    "Distiller": {"temperature": 2.0, "alpha": 0.5, "from_logits": True},
}
# Keywords whose default does nothing unless another keyword is set: compared from that base.
BASES = {
    ("quantize_model", "calibration"): {"calibration_data": "x"},
    ("quantize_model", "num_calibration_samples"): {"calibration_data": "x"},
    ("quantize_model", "recipe"): {"calibration_data": "x"},
    ("quantize_model", "logits_range"): {"calibration_data": "x"},
    ("quantize_model", "preserve"): {"model": "sparse"},
    ("equalize", "relu6"): {"model": "relu6"},
    ("evaluate", "reference"): {"models": 2},
}


def observe(result, models):
    """What a call returned, as plain comparable data."""
    import keras

    from tfq.analysis.report import Report

    model, x, y, conv, _ = models
    if isinstance(result, bytes):
        return result
    if isinstance(result, tfq.Calibration):
        return result.to_dict() | {"seconds": 0}
    if isinstance(result, Report):
        timed = ("latency", "throughput", "seconds")  # measured: whether they are there, not their values
        return [{k: (v is not None) if any(t in k for t in timed) else v for k, v in row.items()}
                for row in result.rows]
    if isinstance(result, tfq.distillation.Distiller):
        return (result.temperature, result.alpha, result.from_logits)
    if isinstance(result, keras.Model):
        inputs = x if result.inputs[0].shape[1:] == x.shape[1:] else None
        outputs = result.predict(inputs, verbose=0).round(6).tolist() if inputs is not None else None
        return (repr(result.get_config()), [w.round(6).tolist() for w in result.get_weights()], outputs)
    raise AssertionError(type(result))


def call_with_base(entry, models, base, **kwargs):
    import keras

    model, x, y, conv, heavy = models
    if entry == "quantize_model":
        if base.get("model") == "sparse":
            sparse = keras.models.clone_model(model)
            kernel = model.get_layer("head").get_weights()
            kernel[0][::2] = 0.0
            sparse.set_weights(kernel)
            model = sparse
        extra = {"calibration_data": heavy} if "calibration_data" in base else {}
        return tfq.qat.quantize_model(model, **extra, **kwargs)
    if entry == "equalize" and base.get("model") != "relu6":
        # A chain of three Dense layers (iterations matter) after a BatchNorm with large β (absorption applies).
        keras.utils.set_random_seed(2)
        chain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, name="a"), keras.layers.BatchNormalization(
            name="bn"), keras.layers.ReLU(), keras.layers.Dense(6, name="b"), keras.layers.ReLU(),
            keras.layers.Dense(3, name="c")])
        chain.get_layer("bn").set_weights([np.full(6, 0.5, "float32"), np.linspace(1, 4, 6).astype("float32"),
                                           np.zeros(6, "float32"), np.ones(6, "float32")])
        chain.get_layer("a").set_weights([np.random.default_rng(0).normal(0, 1, (4, 6)).astype("float32")
                                          * np.geomspace(0.1, 10, 6).astype("float32"), np.zeros(6, "float32")])
        return tfq.equalize(chain, **kwargs)
    if entry == "equalize" and base.get("model") == "relu6":
        keras.utils.set_random_seed(2)
        six = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="a"), keras.layers.ReLU(6.0),
                                keras.layers.Dense(2, name="b")])
        six.get_layer("a").set_weights([np.diag([10.0, 1.0, 0.1, 5.0]).astype("float32"), np.zeros(4, "float32")])
        return tfq.equalize(six, **kwargs)
    if entry == "evaluate" and base.get("models") == 2:
        return tfq.evaluate({"k": model, "j": tfq.convert(model, "int8", x)}, x, y, **{"latency": False, **kwargs})
    if entry in ("convert", "fake_quantize"):
        fn = tfq.convert if entry == "convert" else tfq.fake_quantize
        return fn(conv, **{"mode": "int8", **kwargs}, representative_data=heavy)
    if entry == "calibrate":
        return tfq.calibrate(conv, heavy, **kwargs)
    if entry == "evaluate":
        return tfq.evaluate({"k": conv}, x, y, **{"latency": False, **kwargs})
    return call_entry(entry, models, **kwargs)


CHANGE_CASES = [(entry, keyword) for entry, keywords in CHANGES.items() for keyword in keywords]


@pytest.mark.parametrize("entry, keyword", CHANGE_CASES, ids=[f"{e}-{k}" for e, k in CHANGE_CASES])
def test_every_keyword_changes_the_result(keyword_models, entry, keyword):
    import keras

    value = CHANGES[entry][keyword]
    if entry == "convert" and keyword == "float_layers":
        value = ["conv"]
    base = BASES.get((entry, keyword), {})
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keras.utils.set_random_seed(0)
        default = observe(call_with_base(entry, keyword_models, base), keyword_models)
        keras.utils.set_random_seed(0)
        changed = observe(call_with_base(entry, keyword_models, base, **{keyword: value}), keyword_models)
    assert changed != default, f"{entry}({keyword}={value!r}) returned the same as without it"


@FAST
@given(st.one_of(junk, st.sampled_from([b"TFL3", b"\x00" * 64, "missing.tflite", bytearray(b"xx")])))
def test_inspect_tflite_gives_one_line_for_anything_but_a_model(source):
    """inspect_tflite takes only bytes or a path: the rest is one line (missing file: FileNotFoundError)."""
    with pytest.raises((ValueError, TypeError, FileNotFoundError)) as info:
        tfq.inspect_tflite(source)
    check_error(info.value, (ValueError, TypeError, FileNotFoundError))
