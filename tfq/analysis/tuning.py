"""Accuracy-aware tuning: the smallest (or fastest) TFLite model that meets an accuracy target.

The user says how much of a metric they can give up (``max_drop``, absolute or relative to the
float model); :func:`tune` searches quantization choices — calibration method (with its
percentile; pooled or per-batch median ranges), per-channel vs per-tensor weights, symmetric vs
asymmetric activations, int16x8 activations, and
which layers fall back to float — and returns the best model that meets the target, with the
recipe that reproduces it.

Strategies:

* ``"sensitivity"`` (after Intel Neural Compressor's *basic* strategy): first global
  configurations in order of cost; if none meets the target, the best of them with the methods
  beyond calibration (equalization, then bias correction, then learned rounding); if none meets
  it, rank the layers by sensitivity (the metric gained by keeping each one float alone) and fall
  back greedily, most sensitive first, until the target is met. With ``objective="latency"``, a
  speed stage follows on the configuration found: each layer class of the model (activations and
  normalisations before weighted layers) is tried kept float on top of the classes already kept;
  a class stays float when the model still meets the target and runs at least
  :data:`SPEED_MARGIN` faster, measured by interleaved runs of both models (an int8 kernel can be
  slower than float: LiteRT's XNNPACK delegate runs no int8 PReLU, which then runs in LiteRT's own
  kernel between delegated partitions).
* ``"random"``: random configurations from the search space, seeded.
* ``"bayesian"``: Optuna's TPE sampler (``pip install optuna`` / ``tfq[tune]``), seeded.

Every trial is appended to ``trials.jsonl`` in ``output_dir`` as it finishes; running again with
the same ``output_dir`` reuses finished trials, so an interrupted run resumes. Each record holds a
fingerprint of what decides its metric (the model's weights and architecture, the calibration data,
the evaluation data and labels, the metric, the calibration cap and the seed): a record is reused
only when the fingerprint matches, and whether it meets the target is judged again against the
current ``max_drop``. A torn last record (an interrupted write) is skipped with a warning naming
the file, and that trial runs again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tfq.analysis.report import _Table
from tfq.core.calibration_methods import DEFAULT_CALIBRATION, get_calibration_method
from tfq.core.export_modes import export_mode_names, get_export_mode
from tfq.core.fileio import atomic_write_bytes, atomic_write_text, check_writable_dir
from tfq.core.logs import logger, verbosity
from tfq.core.messages import check_bool
from tfq.core.ptq_methods import get_ptq_method, ptq_method_names
from tfq.core.recipes import Recipe, TensorSpec, save_recipe
from tfq.core.representative import representative_dataset
from tfq.tflite.info import inspect_tflite
from tfq.tflite.interpreter import TFLiteModel, available_cores

__all__ = ["DEFAULT_SEARCH_SPACE", "SPEED_MARGIN", "STRATEGIES", "FloatChoices", "Trial", "TuneResult", "tune"]

STRATEGIES = ("sensitivity", "random", "bayesian")
OBJECTIVES = ("size", "latency")
SPEED_MARGIN = 0.10
"""A layer class is kept float for speed only when the model runs at least this much faster with it
float (0.10: 10 %, medians of interleaved runs) and faster in all rounds of them but one; smaller or
less consistent gains are within the noise of a shared CPU."""

DEFAULT_SEARCH_SPACE = {
    "calibration": ["robust_minmax", "percentile", "kl", "mse"],  # robust_minmax: MinMax, outlier samples set aside
    "percentile": [99.99, 99.9, 99.0],
    "batch_aggregate": [None, "median"],  # kl/percentile/mse: pooled histogram, or median of per-batch ranges
    "per_channel": [True, False],
    "symmetric_activations": [False, True],
    "precision": ["int8", "int16x8"],
    "float_layers": "auto",  # candidates: the model's weighted layers
    "float_for_speed": "auto",  # objective="latency": layer classes tried float for speed (auto: every computing one)
    # Methods beyond calibration (tfq.equalize, bias correction, learned rounding, data-free, any registered
    # one): the values each registry entry lists in ``tune``, the first one the plain choice. "adaround" and
    # data_free=True can be added.
    **{name: list(get_ptq_method(name).tune) for name in ptq_method_names() if get_ptq_method(name).tune},
}
# The built-in methods, tried in combinations (_method_choices); a method registered later is tried alone.
_COMBINED_METHODS = ("equalize", "bias_correction", "weight_rounding", "data_free")


def _default_search_space() -> dict:
    """DEFAULT_SEARCH_SPACE with the ``tune`` values of the methods registered since tfq.tuning was imported."""
    registered = {name: list(get_ptq_method(name).tune) for name in ptq_method_names() if get_ptq_method(name).tune}
    return {**DEFAULT_SEARCH_SPACE, **{k: v for k, v in registered.items() if k not in DEFAULT_SEARCH_SPACE}}


def _method_keys(space: dict) -> list[str]:
    """The post-training methods the search space holds, in registration order."""
    return [name for name in ptq_method_names() if name in space]

_LOWER_IS_BETTER = ("mse", "mae", "loss")


def _takes(method: str, param: str) -> bool:
    """Whether calibration ``method`` has parameter ``param`` (registry: tfq.calibration_methods)."""
    return param in get_calibration_method(method).params


def _duration(seconds: float) -> str:
    """``"40 s"``, ``"3 min"``, ``"1.5 h"``: an estimate, rounded as one."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class Trial:
    """One evaluated configuration."""

    index: int
    choices: dict
    metric: float
    drop: float
    size: int
    latency_ms: float | None
    met: bool
    seconds: float
    int8_weight_fraction: float = 1.0
    error: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class FloatChoices(_Table, list):
    """Why :func:`tune` kept each layer (or op) float: one dict per layer, in model order.

    Each row holds ``layer``, ``class``, ``precision`` (``"float"``), ``reason`` (``"accuracy"``:
    the model missed ``max_drop`` with it quantized; ``"latency"``: the model ran at least
    :data:`SPEED_MARGIN` faster with it float) and ``evidence``, the measured figures behind the
    reason (metric drops, or the medians in ms of interleaved runs with and without it float).

    Example:
        >>> FloatChoices([{"layer": "prelu0", "class": "PReLU", "precision": "float", "reason": "latency",
        ...                "evidence": "0.74 -> 0.29 ms"}]).to_markdown().splitlines()[0]
        '| layer | class | kept | reason | evidence |'
    """

    _JSON_EXAMPLE = "float_choices.json"

    def _table_parts(self):
        header = ["layer", "class", "kept", "reason", "evidence"]
        body = [[r["layer"], r.get("class", ""), r.get("precision", "float"), r["reason"], r.get("evidence", "")]
                for r in self]
        notes = [f"{len(self)} layer(s) kept out of the integer model" if self else
                 "every layer quantized: none kept float"]
        return header, ["l"] * 5, body, notes

    def to_dict(self) -> dict:
        return {"rows": [dict(r) for r in self]}


@dataclass
class TuneResult:
    """What :func:`tune` found.

    Attributes:
        tflite: bytes of the chosen model.
        recipe: the :class:`~tfq.recipes.Recipe` that reproduces it with
            ``tfq.convert(model, recipe=result.recipe, representative_data=...)``.
        trials: every trial, in order.
        best: the chosen trial.
        met: whether the chosen trial meets the target (if not, it is the best found).
        baseline: the float model's metric.
        report: a :class:`~tfq.analysis.report.Report` comparing float and the chosen model.
        float_choices: :class:`FloatChoices`: why each layer kept float is float (accuracy or
            latency, with the measured figures).
        latency_ms: with ``objective="latency"``, medians of interleaved batch-1 runs of the
            float model (``"float"``), the first configuration that met the target before the
            speed stage (``"quantized"``) and the chosen one (``"tuned"``); else empty.
        speed_checks: the speed stage's measurements, one dict per layer class tried: ``class``,
            ``met``, ``before_ms``, ``after_ms``, ``rounds``, ``rounds_faster``, ``kept``.
        convert_options: :func:`tfq.convert` keywords that reproduce :attr:`tflite` with the same
            representative data: ``{"recipe": recipe}`` for a Keras model; for a float ``.tflite`` /
            SavedModel, ``mode``, ``calibration``, ``per_channel``, ``float_layers`` and
            ``int16_layers`` (op indices of the float model, see ``tflite_frontend.op_table``).
    """

    tflite: bytes
    recipe: Recipe
    trials: list[Trial]
    best: Trial
    met: bool
    baseline: float
    max_drop: float
    metric_name: str
    report: object = None
    settings: dict = field(default_factory=dict)
    float_choices: FloatChoices = field(default_factory=FloatChoices)
    latency_ms: dict = field(default_factory=dict)
    speed_checks: list = field(default_factory=list)
    convert_options: dict = field(default_factory=dict)

    def summary(self) -> str:
        status = "met" if self.met else "NOT met (best found returned)"
        b = self.best
        text = (f"target drop <= {self.max_drop:g} {status}: {self.metric_name} {b.metric:.4f} (float "
                f"{self.baseline:.4f}, drop {b.drop:.4f}), size {b.size:,} bytes, int8 weights "
                f"{100 * b.int8_weight_fraction:.1f}%, {len(self.trials)} trials; choices {b.choices}")
        if self.latency_ms:
            text += "; latency " + ", ".join(f"{k} {v:.3f} ms" for k, v in self.latency_ms.items())
        for row in self.float_choices:
            text += f"\n  kept {row.get('precision', 'float')} for {row['reason']}: {row['layer']} ({row['evidence']})"
        return text

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes model.tflite, recipe.yaml, trials.json and report.md/json into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "model.tflite", self.tflite)
        if self.recipe is not None:
            save_recipe(self.recipe, out / "recipe.yaml")
        atomic_write_text(out / "trials.json", json.dumps(
            {"met": self.met, "baseline": self.baseline, "max_drop": self.max_drop, "metric": self.metric_name,
             "best": self.best.to_dict(), "trials": [t.to_dict() for t in self.trials],
             "float_choices": [dict(r) for r in self.float_choices], "latency_ms": self.latency_ms,
             "speed_checks": self.speed_checks,
             "convert_options": {k: v for k, v in self.convert_options.items() if k != "recipe"}, **self.settings},
            indent=1))
        if self.report is not None:
            atomic_write_text(out / "report.md", self.report.to_markdown() + "\n\n## Kept float\n\n"
                              + self.float_choices.to_markdown() + "\n")
            self.report.to_json(out / "report.json")
        return out


def _metric_fn(metric) -> tuple[str, Callable, bool]:
    """(name, f(y_true, y_pred) -> float, higher_is_better)."""
    from tfq.analysis.evaluation import _resolve_metrics

    name, fn = _resolve_metrics([metric])[0]
    return name, fn, not any(name.startswith(k) for k in _LOWER_IS_BETTER)


def _weighted_layer_names(model) -> list[str]:
    from tfq.quantsim.layers import WEIGHTED_LAYER_TYPES
    from tfq.quantsim.rewrite import _walk_layers

    return [layer.name for layer in _walk_layers(model) if isinstance(layer, WEIGHTED_LAYER_TYPES)]


def _computing_classes(model) -> list[str]:
    """The classes of the model's layers that compute (not those that only move data), activations and
    normalisations first, then weighted layers, each group in model order: the speed stage's candidates."""
    import keras

    from tfq.quantsim.layers import WEIGHTED_LAYER_TYPES
    from tfq.quantsim.registry import layer_kind
    from tfq.quantsim.rewrite import _walk_layers

    first, weighted = [], []
    for layer in _walk_layers(model):
        if isinstance(layer, (keras.Model, keras.layers.InputLayer)) or layer_kind(layer) == "passthrough":
            continue
        group = weighted if isinstance(layer, WEIGHTED_LAYER_TYPES) else first
        if type(layer).__name__ not in group:
            group.append(type(layer).__name__)
    return first + weighted


def _float_choices(tuner, best: Trial, strategy: str) -> FloatChoices:
    """One row per layer the chosen model keeps float, with the reason and the figures behind it."""
    from tfq.quantsim.rewrite import _walk_layers

    classes = {layer.name: type(layer).__name__ for layer in _walk_layers(tuner.model)}
    rows = []
    base = tuner.accuracy_base
    for name in best.choices.get("float_layers", ()):
        if name in tuner.alone and base is not None:
            evidence = (f"{tuner.metric_name} drop {base.drop:.4f} with every layer quantized, {tuner.alone[name]:.4f} "
                        f"with only it float (max_drop {tuner.max_drop:g})")
        else:
            evidence = f"chosen by the {strategy} search; {tuner.metric_name} drop {best.drop:.4f}"
        rows.append({"layer": name, "class": classes.get(name, ""), "precision": "float", "reason": "accuracy",
                     "evidence": evidence})
    checks = {c["class"]: c for c in tuner.speed_checks}
    for class_name in best.choices.get("float_for_speed", ()):
        check = checks.get(class_name)
        if check is not None and check["kept"]:
            evidence = (f"{check['before_ms']:.3f} ms with it quantized, {check['after_ms']:.3f} ms float "
                        f"(medians of interleaved batch-1 runs)")
        else:
            evidence = (f"chosen by the {strategy} search; {best.latency_ms:.3f} ms" if best.latency_ms is not None
                        else f"chosen by the {strategy} search")
        listed = {row["layer"] for row in rows}
        for name, cls in classes.items():
            if cls == class_name and name not in listed:  # a layer kept for accuracy already has its row
                rows.append({"layer": name, "class": cls, "precision": "float", "reason": "latency",
                             "evidence": evidence})
    return FloatChoices(rows)


def _int8_weight_fraction(content: bytes) -> float:
    """Share of weight elements (constant tensors, biases excluded) stored as int8."""

    info = inspect_tflite(content)
    int8 = other = 0
    for t in info.tensors:
        if not t.is_constant or len(t.shape) < 2:
            continue
        n = int(np.prod(t.shape))
        if t.dtype == "INT8":
            int8 += n
        elif t.dtype in ("FLOAT32", "FLOAT16"):
            other += n
    return int8 / (int8 + other) if int8 + other else 1.0


def _float_patterns(choices: dict) -> tuple[str, ...]:
    """The recipe's ``float_layers``: the layer names kept float for accuracy, then the classes kept for speed."""
    return tuple(choices.get("float_layers", ())) + tuple(
        f"class:{re.escape(name)}" for name in choices.get("float_for_speed", ()))


def _recipe_for(choices: dict, base_seed: int, num_samples: int | None) -> Recipe:
    mode = choices.get("precision", "int8")
    entry = get_export_mode(mode)
    calibration = choices.get("calibration", DEFAULT_CALIBRATION)
    params = {"percentile": float(choices["percentile"])} if _takes(calibration, "percentile") else {}
    if _takes(calibration, "batch_aggregate") and choices.get("batch_aggregate") is not None:
        params["batch_aggregate"] = choices["batch_aggregate"]
    weights = TensorSpec(per_channel=bool(choices.get("per_channel", True)))
    methods = {key: choices[key] for key in _method_keys(choices) if mode in get_ptq_method(key).modes}
    if not entry.tfq_ranges:
        # The converter calibrates this mode itself (int16x8: per-channel weights, MinMax): only what it honours.
        return Recipe(mode=mode, calibration="minmax", seed=base_seed, num_calibration_samples=num_samples,
                      name="tuned", methods=methods)
    activations = TensorSpec(**dict(entry.default_activations,
                                    symmetric=bool(choices.get("symmetric_activations", False))))
    return Recipe(mode=mode, weights=weights, activations=activations, calibration=calibration,
                  calibration_params=params, float_layers=_float_patterns(choices),
                  seed=base_seed, num_calibration_samples=num_samples, name="tuned", methods=methods)


def _integer_modes() -> list[str]:
    """The precisions tune can try: registered modes whose activations are integers."""
    return [m for m in export_mode_names() if TensorSpec(**get_export_mode(m).default_activations).is_integer]


def _check_method_space(space: dict) -> None:
    """Each method's values are settings its registry entry accepts (a value, or a dict of its options)."""
    for key in _method_keys(space):
        values = space[key]
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"search_space[{key!r}] must be a non-empty list. Received: {values!r}")
        entry = get_ptq_method(key)
        for value in values:
            try:
                entry.check(value, f"search_space[{key!r}] value")
            except (TypeError, ValueError) as err:
                raise ValueError(f"search_space[{key!r}] values must be among {list(entry.values)} (or dicts of "
                                 f"its options): {err}") from None


def _method_choices(space: dict) -> list[dict]:
    """Method combinations to try on the best global configuration, cheapest first.

    Equalization, then bias correction (with and without equalization), then each learned rounding
    (alone, then with equalization and bias correction), then data-free, then each value of the other
    registered methods alone; only values the search space allows.
    """
    found = []

    def add(**choice):
        if all(value in space.get(key, [False]) for key, value in choice.items()) and choice not in found:
            found.append(choice)

    add(equalize=True)
    add(bias_correction=True)
    add(equalize=True, bias_correction=True)
    for rounding in space.get("weight_rounding", []):
        if rounding != "nearest":
            add(weight_rounding=rounding)
            add(equalize=True, bias_correction=True, weight_rounding=rounding)
    if True in space.get("data_free", []):
        add(data_free=True, equalize=True, bias_correction=True)
    for name in _method_keys(space):  # methods registered beyond the built-ins: each value alone
        if name not in _COMBINED_METHODS:
            for value in space[name][1:]:
                add(**{name: value})
    return found


def _canonical(choices: dict) -> str:
    return json.dumps(choices, sort_keys=True)


def _hash_arrays(digest, arrays) -> None:
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())


def fingerprint(model, rep, x_eval, y_eval, metric_name: str, num_samples, seed) -> str:
    """A hash of what decides a trial's metric: the model (architecture and weights), the
    calibration data (as the trials see it), the evaluation data and labels, the metric, the
    calibration-sample cap and the seed. Trials logged under another fingerprint are not reused."""
    digest = hashlib.sha256()
    try:
        digest.update(model.to_json().encode())
    except Exception:  # noqa: BLE001 - a layer that cannot serialize: its names and classes instead
        digest.update(repr([(layer.name, type(layer).__name__) for layer in model.layers]).encode())
    _hash_arrays(digest, model.get_weights())
    for batch in rep.batches(256):
        _hash_arrays(digest, batch)
    _hash_arrays(digest, [np.asarray(x_eval), np.asarray(y_eval)])
    digest.update(json.dumps([metric_name, num_samples, seed]).encode())
    return digest.hexdigest()[:16]


def _read_trial_log(path: Path, fingerprint_: str) -> tuple[dict, bool]:
    """Reusable records of a trial log, by canonical choices, and whether the file ends mid-line.

    A record that does not parse is skipped with a warning naming the file and line (a torn last
    record is what an interrupted write leaves); records of another fingerprint are left alone.
    """
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    previous, other = {}, 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            choices = record["choices"]
            fields = {k: record[k] for k in ("metric", "size", "latency_ms", "seconds")}
        except (json.JSONDecodeError, KeyError, TypeError):
            where = "its last line (a torn record: the run was interrupted while writing it)" \
                if number == len(lines) else f"line {number} (not a trial record)"
            warnings.warn(f"tfq.tune: skipped {where} of {str(path)!r}; that trial runs again.", stacklevel=4)
            continue
        if record.get("fingerprint") != fingerprint_:
            other += 1
            continue
        previous[_canonical(choices)] = dict(record, **fields)
    if other:
        warnings.warn(f"tfq.tune: {other} trial(s) in {str(path)!r} were run on another model, calibration data, "
                      f"evaluation data or metric; they are not reused.", stacklevel=4)
    return previous, bool(text) and not text.endswith("\n")


def _latency_samples(runner: TFLiteModel, sample, runs: int) -> np.ndarray:
    """Batch-1 latencies (ms) of ``runs`` invocations after a short warm-up: every latency tune measures."""
    return runner.latency_ms(sample, warmup=5, runs=runs)


class _Tuner:
    trial_errors: tuple = (ValueError, RuntimeError)  # a trial that raises one of these is recorded as failed

    def __init__(self, model, rep, x_eval, y_eval, metric, max_drop, relative, objective, output_dir,
                 max_trials, timeout, seed, num_threads, num_samples, verbose):
        self.model, self.rep, self.x_eval, self.y_eval = model, rep, x_eval, y_eval
        self.metric_name, self.metric, self.higher_better = _metric_fn(metric)
        self.max_drop, self.relative, self.objective = max_drop, relative, objective
        self.max_trials, self.timeout, self.seed = max_trials, timeout, seed
        self.num_threads, self.num_samples, self.verbose = num_threads, num_samples, verbose
        self.start = time.perf_counter()
        self.trials: list[Trial] = []
        self.contents: dict[str, bytes] = {}
        self.runners: dict[bytes, TFLiteModel] = {}
        self.calibrations: dict[str, object] = {}
        self.chosen: Trial | None = None  # set by the speed stage: its decision, not the noisier minimum
        self.accuracy_base: Trial | None = None  # stage 3: the configuration layers were kept float against
        self.alone: dict[str, float] = {}  # stage 3: layer -> drop with only it float
        self.speed_base: Trial | None = None
        self.speed_checks: list[dict] = []
        self.round_medians: list[list[float]] = []  # per model, the median of each round of paired_latency
        self.speed_classes: list[str] = []  # objective="latency": the layer classes the speed stage tries float
        self.log_path = Path(output_dir) / "trials.jsonl" if output_dir else None
        self.previous: dict[str, dict] = {}
        self.torn = False  # the log ends mid-line: the next record starts on a new line
        self.fingerprint = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.fingerprint = self.model_fingerprint()
            if self.log_path.exists():
                self.previous, self.torn = _read_trial_log(self.log_path, self.fingerprint)
        self.baseline = float(self.metric(y_eval, self.float_predict(x_eval)))

    # -- the model: a Keras model here (tfq.analysis.op_tuning: a float .tflite) ----------------------
    def model_fingerprint(self) -> str:
        return fingerprint(self.model, self.rep, self.x_eval, self.y_eval, self.metric_name, self.num_samples,
                           self.seed)

    def float_predict(self, x):
        return self.model.predict(x, verbose=0)

    # -- budget ------------------------------------------------------------------------------------
    def budget_left(self) -> bool:
        if len(self.trials) >= self.max_trials:
            return False
        return self.timeout is None or time.perf_counter() - self.start < self.timeout

    def drop_of(self, value: float) -> float:
        drop = (self.baseline - value) if self.higher_better else (value - self.baseline)
        return drop / abs(self.baseline) if self.relative and self.baseline else drop

    # -- one trial ---------------------------------------------------------------------------------
    def convert(self, choices: dict) -> bytes:
        from tfq.export.convert import convert

        key = _canonical(choices)
        if key in self.contents:
            return self.contents[key]
        recipe = _recipe_for(choices, self.seed, self.num_samples)
        excludes = any(get_ptq_method(name).data == "excludes" for name in recipe.method_settings())
        data = None if excludes else self.rep
        with warnings.catch_warnings():
            if self.objective == "latency":  # the speed stage measures what convert's hint about slow int8 ops says
                warnings.filterwarnings("ignore", message=r"tfq\.convert: \d+ int8 \w+ op\(s\): LiteRT's CPU delegate")
            content = convert(self.model, recipe=recipe, representative_data=data)
        self.contents[key] = content
        return content

    def run(self, choices: dict) -> Trial:
        key = _canonical(choices)
        for t in self.trials:
            if _canonical(t.choices) == key:
                return t
        start = time.perf_counter()
        record = self.previous.get(key)
        if record is not None and self.objective == "latency" and record.get("latency_ms") is None:
            record = None  # logged without a latency measurement
        if record is not None:  # resumed from the trial log: judged against the current target
            error = record.get("error")
            metric = float("nan") if record["metric"] is None else float(record["metric"])
            drop = float("inf") if error is not None or metric != metric else self.drop_of(metric)
            trial = Trial(len(self.trials), dict(record["choices"]), metric, drop, int(record["size"]),
                          record["latency_ms"], error is None and drop <= self.max_drop, float(record["seconds"]),
                          float(record.get("int8_weight_fraction", 1.0)), error=error)
        else:
            try:
                content = self.convert(choices)
                runner = self.runner(content)
                value = float(self.metric(self.y_eval, runner.predict(self.x_eval, batch_size=256)))
                latency = None
                if self.objective == "latency":
                    latency = float(np.median(_latency_samples(runner, self.x_eval[:1], 30)))
                drop = self.drop_of(value)
                trial = Trial(len(self.trials), choices, value, drop, len(content), latency,
                              drop <= self.max_drop, time.perf_counter() - start, _int8_weight_fraction(content))
            except self.trial_errors as err:
                text = (str(err).splitlines() or [""])[0] or type(err).__name__
                trial = Trial(len(self.trials), choices, float("nan"), float("inf"), 0, None, False,
                              time.perf_counter() - start, 0.0, error=text[:300])
            if self.log_path is not None:
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(("\n" if self.torn else "") + json.dumps(dict(trial.to_dict(),
                                                                       fingerprint=self.fingerprint)) + "\n")
                self.torn = False
        self.trials.append(trial)
        if self.verbose:
            status = "error: " + trial.error if trial.error else ("meets target" if trial.met else "misses target")
            left = self.max_trials - len(self.trials)
            eta = f", about {_duration(left * np.mean([t.seconds for t in self.trials]))} left" if left > 0 else ""
            with verbosity(True):
                logger.info(f"tune: trial {trial.index + 1}/{self.max_trials} ({trial.seconds:.1f} s{eta}): "
                            f"{self.metric_name}={trial.metric:.4f} drop={trial.drop:.4f} size={trial.size:,} "
                            f"{status} {choices}")
        return trial

    def runner(self, content: bytes) -> TFLiteModel:
        if content not in self.runners:
            self.runners[content] = TFLiteModel(content, num_threads=self.num_threads)
        return self.runners[content]

    def paired_latency(self, contents: list[bytes], rounds: int = 7, runs: int = 20) -> list[float]:
        """Median batch-1 latency (ms) of each model, measured in interleaved rounds (A, B, A, B …) so
        that a change in the machine's load falls on all of them alike."""
        for content in contents:  # a first round, not counted: the first runs after a resize are slower
            _latency_samples(self.runner(content), self.x_eval[:1], runs)
        times: list[list[float]] = [[] for _ in contents]
        self.round_medians = [[] for _ in contents]
        for _ in range(rounds):
            for store, rounds_of, content in zip(times, self.round_medians, contents):
                samples = _latency_samples(self.runner(content), self.x_eval[:1], runs)
                store.extend(samples)
                rounds_of.append(float(np.median(samples)))
        return [float(np.median(t)) for t in times]

    def faster(self, before: float, after: float) -> bool:
        """Whether the second model of the last :meth:`paired_latency` of two is faster beyond the noise:
        its median at least :data:`SPEED_MARGIN` below, and faster in all rounds but at most one (a sign
        test: by chance, at most 8 in 128 with 7 rounds)."""
        first, second = self.round_medians
        wins = sum(b < a for a, b in zip(first, second))
        return after <= (1 - SPEED_MARGIN) * before and wins >= len(first) - 1

    def cost(self, trial: Trial) -> float:
        return trial.latency_ms if self.objective == "latency" and trial.latency_ms is not None else trial.size

    def best(self) -> Trial:
        if self.chosen is not None:
            return self.chosen
        ok = [t for t in self.trials if t.met]
        if ok and self.objective == "latency" and all(t.latency_ms is not None for t in ok):
            # The fastest, or a smaller model within SPEED_MARGIN of it (closer is within the noise).
            fastest = min(t.latency_ms for t in ok)
            ok = [t for t in ok if t.latency_ms <= fastest * (1 + SPEED_MARGIN)]
            return min(ok, key=lambda t: (t.size, t.latency_ms, t.drop, t.index))
        if ok:
            return min(ok, key=lambda t: (self.cost(t), t.drop, t.index))
        valid = [t for t in self.trials if t.error is None]
        return min(valid or self.trials, key=lambda t: (t.drop, self.cost(t), t.index))


def _sensitivity(tuner: _Tuner, space: dict, candidates: list[str]) -> None:
    _accuracy_stages(tuner, space, candidates)
    if tuner.objective == "latency":
        _speed_stage(tuner)


def _accuracy_stages(tuner: _Tuner, space: dict, candidates: list[str]) -> None:
    # Stage 1: global configurations, cheapest first.
    globals_ = []
    blocks = itertools.product(space["per_channel"], space["symmetric_activations"], space["calibration"])
    for per_channel, symmetric, method in blocks:
        # Per-batch medians only with the first (default: per-channel, asymmetric) weights and
        # activations, so the per-tensor block and the later stages stay within the budget.
        first_block = per_channel == space["per_channel"][0] and symmetric == space["symmetric_activations"][0]
        percentiles = space["percentile"] if _takes(method, "percentile") else [None]
        aggregates = space["batch_aggregate"] if _takes(method, "batch_aggregate") and first_block else [None]
        for p, aggregate in itertools.product(percentiles, aggregates):
            c = {"precision": "int8", "calibration": method, "per_channel": per_channel,
                 "symmetric_activations": symmetric}
            if p is not None:
                c["percentile"] = p
            if aggregate is not None:
                c["batch_aggregate"] = aggregate
            globals_.append(c)
    # Per-channel, asymmetric first: what TFLite does best; then the rest.
    for choices in globals_:
        if not tuner.budget_left():
            return
        if tuner.run(choices).met:
            return
    # Stage 2: the methods beyond calibration on the best global configuration.
    base = {k: v for k, v in tuner.best().choices.items() if k != "float_layers"}
    if base.get("precision") == "int16x8":
        return
    for methods in _method_choices(space):
        if not tuner.budget_left():
            return
        if tuner.run(dict(base, **methods)).met:
            return
    # Stage 3: float fallback, layer by layer, ranked by sensitivity.
    tuner.accuracy_base = tuner.run(base)  # run already: the trial log's record of it
    gains = []
    for name in candidates:
        if not tuner.budget_left():
            break
        trial = tuner.run(dict(base, float_layers=[name]))
        tuner.alone[name] = trial.drop
        if trial.met:
            return
        gains.append((trial.drop, name))
    ranked = [name for _, name in sorted(gains)]
    chosen: list[str] = []
    for name in ranked:
        if not tuner.budget_left():
            break
        chosen.append(name)
        if len(chosen) > 1 and tuner.run(dict(base, float_layers=list(chosen))).met:
            return
    # Stage 4: int16 activations when float fallback could not meet the target.
    if "int16x8" in space["precision"] and tuner.budget_left():
        tuner.run({"precision": "int16x8"})


def _speed_stage(tuner: _Tuner) -> None:
    """Keeps layer classes float where that makes the model faster and it still meets the target.

    On the configuration the accuracy stages chose, each class of ``tuner.speed_classes`` is tried
    float on top of the classes kept so far; it stays float when the trial meets the target and
    the interleaved medians (:meth:`_Tuner.paired_latency`) show it at least :data:`SPEED_MARGIN`
    faster than the model kept so far.
    """
    ok = [t for t in tuner.trials if t.met]
    if not ok:
        logger.info("tune: no configuration met the target, so none was tried with float layers for speed.")
        return
    current = tuner.best()
    if current.choices.get("precision") == "int16x8":
        return  # the converter calibrates int16x8 itself: no layer can be kept float there
    tuner.speed_base = current
    base_choices = {k: v for k, v in current.choices.items() if k != "float_for_speed"}
    kept: list[str] = []
    for name in tuner.speed_classes:
        if not tuner.budget_left():
            logger.info(f"tune: max_trials/timeout reached before layer class(es) "
                        f"{tuner.speed_classes[tuner.speed_classes.index(name):]} were tried float for speed; "
                        f"raise max_trials to try them.")
            break
        trial = tuner.run(dict(base_choices, float_for_speed=sorted(kept + [name])))
        check = {"class": name, "met": trial.met, "before_ms": None, "after_ms": None, "rounds": None,
                 "rounds_faster": None, "kept": False}
        if trial.met and trial.error is None:
            before, after = tuner.paired_latency([tuner.convert(current.choices), tuner.convert(trial.choices)])
            first, second = tuner.round_medians
            check.update(before_ms=before, after_ms=after, rounds=len(first),
                         rounds_faster=sum(b < a for a, b in zip(first, second)), kept=tuner.faster(before, after))
            if check["kept"]:
                kept.append(name)
                current = trial
        tuner.speed_checks.append(check)
    tuner.chosen = current


def _random_choices(rng: random.Random, space: dict, candidates: list[str], speed: list[str] = ()) -> dict:
    precision = rng.choice(space["precision"])
    if precision == "int16x8":
        return {"precision": "int16x8"}  # the converter calibrates it: no other choice applies
    c = {"precision": "int8", "calibration": rng.choice(space["calibration"]),
         "per_channel": rng.choice(space["per_channel"]),
         "symmetric_activations": rng.choice(space["symmetric_activations"])}
    if _takes(c["calibration"], "percentile"):
        c["percentile"] = rng.choice(space["percentile"])
    if _takes(c["calibration"], "batch_aggregate"):
        aggregate = rng.choice(space["batch_aggregate"])
        if aggregate is not None:
            c["batch_aggregate"] = aggregate
    floats = sorted(n for n in candidates if rng.random() < 1.0 / max(2, len(candidates)))
    if floats:
        c["float_layers"] = floats
    fast = sorted(n for n in speed if rng.random() < 0.5)
    if fast:
        c["float_for_speed"] = fast
    _random_methods(rng, space, c)
    return c


def _random_methods(rng: random.Random, space: dict, c: dict) -> None:
    """Adds drawn method choices (only those off their plain first value) to ``c``."""
    for key in _method_keys(space):
        values = space.get(key, [])
        if len(values) > 1:
            value = rng.choice(values)
            if value != values[0]:
                c[key] = value


def _random(tuner: _Tuner, space: dict, candidates: list[str]) -> None:
    rng = random.Random(tuner.seed)
    attempts = 0
    while tuner.budget_left() and attempts < 20 * tuner.max_trials:
        attempts += 1
        tuner.run(_random_choices(rng, space, candidates, tuner.speed_classes))


def _bayesian(tuner: _Tuner, space: dict, candidates: list[str]) -> None:
    try:
        import optuna
    except ImportError:
        raise ImportError("strategy='bayesian' needs Optuna: pip install optuna (or tfq[tune]).") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=tuner.seed)
    study = optuna.create_study(direction="minimize", sampler=sampler)

    def objective(trial):
        precision = trial.suggest_categorical("precision", space["precision"])
        c = {"precision": precision}
        if precision == "int8":
            c["per_channel"] = trial.suggest_categorical("per_channel", space["per_channel"])
            c["calibration"] = trial.suggest_categorical("calibration", space["calibration"])
            c["symmetric_activations"] = trial.suggest_categorical(
                "symmetric_activations", space["symmetric_activations"])
            if _takes(c["calibration"], "percentile"):
                c["percentile"] = trial.suggest_categorical("percentile", space["percentile"])
            if _takes(c["calibration"], "batch_aggregate"):
                aggregate = trial.suggest_categorical("batch_aggregate", list(space["batch_aggregate"]))
                if aggregate is not None:
                    c["batch_aggregate"] = aggregate
            floats = [n for n in candidates if trial.suggest_categorical(f"float:{n}", [False, True])]
            if floats:
                c["float_layers"] = floats
            fast = [n for n in tuner.speed_classes if trial.suggest_categorical(f"fast:{n}", [False, True])]
            if fast:
                c["float_for_speed"] = fast
            for key in _method_keys(space):
                values = list(space.get(key, []))
                if len(values) > 1:
                    if all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
                        value = trial.suggest_categorical(key, values)
                    else:  # settings with options (dicts): Optuna draws their index
                        value = values[trial.suggest_categorical(key, list(range(len(values))))]
                    if value != values[0]:
                        c[key] = value
        result = tuner.run(c)
        if result.error:
            return 1e12
        penalty = 0.0 if result.met else 1e9 * (1.0 + result.drop)
        return penalty + tuner.cost(result)

    while tuner.budget_left():
        study.optimize(objective, n_trials=1)


def best_trial_content(tuner) -> tuple[Trial, bytes]:
    """The best trial of a finished search and its ``.tflite`` (converted again from its choices)."""
    if not tuner.trials:
        raise ValueError("no trial ran: max_trials/timeout left no budget.")
    best = tuner.best()
    if best.error is not None:
        raise ValueError(f"every trial failed; the first error: {best.error}")
    return best, tuner.convert(best.choices)


def _check_tune_options(relative, verbose, timeout, seed, output_dir, num_calibration_samples, search_space):
    """tune's keyword types, checked before any work (one line each)."""
    for name, value in (("relative", relative), ("verbose", verbose)):
        check_bool(name, value)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0):
        raise ValueError(f"timeout must be a number of seconds > 0, or None. Received: timeout={timeout!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int. Received: seed={seed!r}")
    if output_dir is not None and not isinstance(output_dir, (str, os.PathLike)):
        raise TypeError(f"output_dir must be a directory path or None. Received: output_dir={output_dir!r}")
    if num_calibration_samples is not None and (isinstance(num_calibration_samples, bool) or not isinstance(
            num_calibration_samples, (int, np.integer)) or num_calibration_samples < 1):
        raise ValueError(f"num_calibration_samples must be an int >= 1, or None for all. "
                         f"Received: num_calibration_samples={num_calibration_samples!r}")
    if search_space is not None and not isinstance(search_space, dict):
        raise TypeError(f"search_space must be a dict of choices (e.g. {{'calibration': ['kl']}}) or None. "
                        f"Received: search_space={search_space!r}")


def tune(
    model,
    representative_data,
    eval_data,
    eval_labels=None,
    *,
    metric="accuracy",
    max_drop: float = 0.01,
    relative: bool = False,
    objective: str = "size",
    strategy: str = "sensitivity",
    search_space: dict | None = None,
    max_trials: int = 20,
    timeout: float | None = None,
    seed: int = 0,
    output_dir=None,
    num_threads: int | None = None,
    num_calibration_samples: int | None = None,
    verbose: bool = True,
) -> TuneResult:
    """Searches quantization choices for the best TFLite model within ``max_drop`` of float.

    Args:
        model: a Keras model (or path); or a float ``.tflite`` (path or bytes), a SavedModel
            directory or a ``keras.layers.TFSMLayer`` model, tuned op by op
            (:mod:`tfq.analysis.op_tuning`: the candidates are ops kept float or int16, and
            ``float_layers`` in ``search_space`` lists op types, tensor names or indices).
        representative_data: calibration data (see :func:`tfq.representative_dataset`).
        eval_data: evaluation inputs; or ``(x, y)`` when ``eval_labels`` is None.
        eval_labels: evaluation labels.
        metric: ``"accuracy"``, ``"top5"``, ``"mse"`` … or a callable ``f(y_true, y_pred) -> float``
            (higher is better for callables).
        max_drop: largest accepted drop of the metric vs the float Keras model.
        relative: ``max_drop`` is relative to the float metric (0.01 = 1 %).
        objective: ``"size"`` or ``"latency"`` (median batch-1 latency through the interpreter).
            With ``"latency"``, tune also keeps layer classes float where that makes the model at
            least :data:`SPEED_MARGIN` faster within ``max_drop`` (an int8 PReLU runs ~2–3× slower
            than float in LiteRT's CPU runtime), and ``result.float_choices`` says why each float layer is float.
        strategy: ``"sensitivity"``, ``"random"`` or ``"bayesian"`` (needs optuna).
        search_space: overrides of :data:`DEFAULT_SEARCH_SPACE` keys; ``float_layers`` may list
            the candidate layer names (default ``"auto"``: every weighted layer);
            ``float_for_speed`` the layer class names tried float for speed with
            ``objective="latency"`` (default ``"auto"``: every class of layer that computes; ``[]``: none).
        max_trials: trial budget.
        timeout: seconds budget (checked between trials).
        seed: seed for random/bayesian strategies.
        output_dir: where ``trials.jsonl`` is appended (resume) — the result is not saved there
            unless you call :meth:`TuneResult.save`.
        num_threads: interpreter threads (None: one per CPU core this process may use).
        num_calibration_samples: cap on calibration samples.
        verbose: print one line per trial.

    Returns:
        :class:`TuneResult`. When no trial meets the target, ``result.met`` is False and the best
        trial found is returned — not an error.

    Example:
        >>> result = tfq.tune(model, x_train[:300], x_val, y_val, max_drop=0.005)   # doctest: +SKIP
        >>> result.save("tuned/")                                                     # doctest: +SKIP
    """
    from tfq.analysis import op_tuning
    from tfq.analysis.evaluation import evaluate
    from tfq.models.interop import load_keras_model

    _check_tune_options(relative, verbose, timeout, seed, output_dir, num_calibration_samples, search_space)
    if output_dir is not None:
        check_writable_dir(output_dir, "output_dir")
    below_keras = op_tuning.is_op_model(model)
    if not below_keras:
        model = load_keras_model(model)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}. Received: strategy={strategy!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}. Received: objective={objective!r}")
    if isinstance(max_drop, bool) or not (isinstance(max_drop, (int, float)) and max_drop >= 0):
        raise ValueError(f"max_drop must be a number >= 0. Received: max_drop={max_drop!r}")
    if isinstance(max_trials, bool) or not (isinstance(max_trials, int) and max_trials >= 1):
        raise ValueError(f"max_trials must be an int >= 1. Received: max_trials={max_trials!r}")
    if eval_labels is None:
        if not (isinstance(eval_data, (tuple, list)) and len(eval_data) == 2):
            raise ValueError("eval_labels is None: pass eval_data=(x, y) or eval_labels=y.")
        eval_data, eval_labels = eval_data
    x_eval, y_eval = np.asarray(eval_data), np.asarray(eval_labels)
    if len(x_eval) != len(y_eval):
        raise ValueError(f"eval_labels has {len(y_eval)} rows but eval_data has {len(x_eval)} samples; they must match.")
    if num_threads is None:
        num_threads = available_cores()
    space = _default_search_space()
    allowed = set(space) | set(ptq_method_names())
    for key, value in (search_space or {}).items():
        if key not in allowed:
            raise ValueError(f"unknown search_space key {key!r}; allowed: {sorted(allowed)}")
        space[key] = value
    _check_method_space(space)
    for method in space["calibration"]:
        get_calibration_method(method, "search_space['calibration'] value")
    tunable = _integer_modes()
    for precision in space["precision"]:
        if precision not in tunable:
            raise ValueError(f"search_space['precision'] values must be among {tunable}. Received: {precision!r}")
    if below_keras:
        return op_tuning.tune_ops(
            model, representative_data, x_eval, y_eval, space=space, overrides=dict(search_space or {}), metric=metric,
            max_drop=max_drop, relative=relative, objective=objective, strategy=strategy, max_trials=max_trials,
            timeout=timeout, seed=seed, output_dir=output_dir, num_threads=num_threads,
            num_calibration_samples=num_calibration_samples, verbose=verbose)
    weighted = _weighted_layer_names(model)
    candidates = weighted if space["float_layers"] == "auto" else list(space["float_layers"])
    unknown = [n for n in candidates if n not in weighted]
    if unknown:
        raise ValueError(f"search_space float_layers names {unknown} are not weighted layers of the model; "
                         f"choose from {weighted}")
    computing = _computing_classes(model)
    speed = computing if space["float_for_speed"] == "auto" else space["float_for_speed"]
    if not isinstance(speed, (list, tuple)) or any(name not in computing for name in speed):
        raise ValueError(f"search_space['float_for_speed'] must be 'auto' or a list of the model's layer classes "
                         f"that compute, among {computing}. Received: {space['float_for_speed']!r}")
    rep = representative_dataset(representative_data, num_calibration_samples, model=model)
    tuner = _Tuner(model, rep, x_eval, y_eval, metric, max_drop, relative, objective, output_dir, max_trials,
                   timeout, seed, num_threads, num_calibration_samples, verbose)
    tuner.speed_classes = list(speed) if objective == "latency" else []
    {"sensitivity": _sensitivity, "random": _random, "bayesian": _bayesian}[strategy](tuner, space, candidates)
    best, content = best_trial_content(tuner)
    recipe = _recipe_for(best.choices, seed, num_calibration_samples)
    report = evaluate({"keras_float": model, "tuned": content}, x_eval, y_eval, reference="keras_float",
                          latency=objective == "latency", num_threads=num_threads)
    latency = {}
    if objective == "latency":
        from tfq.export.convert import convert

        named = {"float": convert(model, "float")}
        if tuner.speed_base is not None and tuner.speed_base is not best:
            named["quantized"] = tuner.convert(tuner.speed_base.choices)
        named["tuned"] = content
        latency = dict(zip(named, tuner.paired_latency(list(named.values()))))
    return TuneResult(tflite=content, recipe=recipe, trials=tuner.trials, best=best, met=best.met,
                      baseline=tuner.baseline, max_drop=max_drop, metric_name=tuner.metric_name, report=report,
                      settings={"strategy": strategy, "objective": objective, "seed": seed, "relative": relative},
                      float_choices=_float_choices(tuner, best, strategy), latency_ms=latency,
                      speed_checks=list(tuner.speed_checks), convert_options={"recipe": recipe})
