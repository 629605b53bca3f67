""":func:`tfq.tune` on a model below Keras (a float ``.tflite``, a SavedModel or a ``TFSMLayer`` model):
the candidates are ops, kept float or int16.

The model is quantized the way :func:`tfq.convert` quantizes it (:mod:`tfq.export.tflite_frontend`:
tfq's calibration on the float ``.tflite``, LiteRT's quantizer writing the file). Each calibration
method runs once; a trial only re-quantizes with other ops float or int16 (0.1–0.2 s on small models).

Strategy (``"sensitivity"``, the only one for these models):

1. global configurations: each calibration method (and percentile) with per-channel, then per-tensor
   weights; the first that meets the target wins;
2. otherwise, on the best of them, each candidate op alone kept float, in order of its own
   quantization error (the SQNR of its output quantized with its range, worst first); ops ranked by
   the metric each recovers; kept float greedily, most sensitive first, until the target is met;
   then each kept op is dropped again where the target holds without it (a minimal set), and, with
   ``objective="size"``, moved from float to int16 activations where the target still holds
   (an integer op, int8 weights);
3. with ``objective="latency"``, op types are tried float for speed (as for Keras models);
4. if no set met the target, every op at int16 activations (``"int16x8"``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np

from tfq.analysis.tuning import (
    FloatChoices,
    Trial,
    _canonical,
    _hash_arrays,
    _speed_stage,
    _takes,
    _Tuner,
    best_trial_content,
)
from tfq.core.calibration_methods import get_calibration_method
from tfq.core.logs import logger
from tfq.core.recipes import Recipe, TensorSpec
from tfq.export import tflite_frontend
from tfq.ptq import tflite_calibration
from tfq.tflite.info import inspect_tflite
from tfq.tflite.interpreter import TFLiteModel

__all__ = ["candidate_ops", "is_op_model"]

# search_space keys that mean something only for a Keras model (tfq rewrites its graph).
_KERAS_ONLY_KEYS = ("symmetric_activations", "batch_aggregate", "equalize", "bias_correction", "weight_rounding",
                    "data_free")
_OWN_ERROR_SAMPLES = 32


def is_op_model(model) -> bool:
    """Whether :func:`tfq.tune` takes ``model`` below Keras: ``.tflite`` bytes or path, a SavedModel
    directory, or a Keras model holding a ``keras.layers.TFSMLayer``."""
    if tflite_frontend.is_tflite_input(model):
        return True
    if isinstance(model, (str, os.PathLike)):
        return Path(model).is_dir()
    return tflite_frontend.has_tfsm_layer(model)


def _known_op_types() -> set[str]:
    """Op types LiteRT's quantizer quantizes (the others stay float whatever tune chooses)."""
    qtyping = tflite_frontend.litert_quantizer()[0]
    return {v.value for v in qtyping.TFLOperationName} - {"*", "INPUT", "OUTPUT"}


def candidate_ops(content: bytes) -> list[int]:
    """Indices of the ops tune may keep float or int16: ops LiteRT's quantizer quantizes with a float
    output (not QUANTIZE/DEQUANTIZE, not shape arithmetic)."""
    info = inspect_tflite(content)
    known = _known_op_types()
    return [i for i, op in enumerate(info.ops)
            if op.type in known and op.outputs and info.tensors[op.outputs[0]].dtype == "FLOAT32"]


def _weighted(info, op) -> bool:
    return any(i >= 0 and info.tensors[i].is_constant and len(info.tensors[i].shape) >= 2 for i in op.inputs)


def _own_sqnr(content: bytes, ranges: dict, ops: list[int], x) -> dict[int, float]:
    """For each op, the SQNR (dB) of its float output against that output quantized to int8 with its own
    range, over up to 32 samples: the error the op adds by itself (low first: the likeliest culprits)."""
    info = inspect_tflite(content)
    interpreter = tflite_calibration.debug_interpreter(content, preserve=True)
    interpreter.allocate_tensors()
    details = interpreter.get_input_details()
    arrays = x if isinstance(x, (list, tuple)) else [x]
    signal = {i: 0.0 for i in ops}
    noise = {i: 0.0 for i in ops}
    for j in range(min(_OWN_ERROR_SAMPLES, len(arrays[0]))):
        sample = tflite_calibration.fit_sample([np.asarray(a[j:j + 1]) for a in arrays], details)
        for d, a in zip(details, sample):
            interpreter.set_tensor(d["index"], a)
        interpreter.invoke()
        for i in ops:
            tensor = info.tensors[info.ops[i].outputs[0]]
            if tensor.name not in ranges:
                continue
            value = interpreter.get_tensor(tensor.index).astype(np.float64)
            lo, hi = min(ranges[tensor.name][0], 0.0), max(ranges[tensor.name][1], 0.0)
            scale = (hi - lo) / 255.0 or 1.0
            zero = np.round(-128 - lo / scale)
            q = (np.clip(np.round(value / scale + zero), -128, 127) - zero) * scale
            finite = np.isfinite(value)
            signal[i] += float(np.sum(value[finite] ** 2))
            noise[i] += float(np.sum((value[finite] - q[finite]) ** 2))
    return {i: (10 * np.log10(signal[i] / noise[i]) if noise[i] > 0 and signal[i] > 0 else float("inf"))
            for i in ops}


class _OpTuner(_Tuner):
    """A :class:`_Tuner` whose model is a float ``.tflite``: trials quantize it with ops float or int16."""

    # LiteRT's quantizer may refuse an op configuration with its own exception types (KeyError, AssertionError …):
    # that trial fails, the search goes on.
    trial_errors = (Exception,)

    def __init__(self, flt: bytes, *args, **kwargs):
        self.flt = flt
        self.info = inspect_tflite(flt)
        self.ranges_cache: dict[str, dict] = {}
        self.own_sqnr: dict[int, float] = {}
        self.check_float: dict[str, list[int]] = {}  # choices -> ops the check kept float (crash, NaN)
        self.check_data = None  # the representative data as given: what tfq.convert's check runs
        super().__init__(flt, *args, **kwargs)

    def model_fingerprint(self) -> str:
        digest = hashlib.sha256(self.flt)
        for batch in self.rep.batches(256):
            _hash_arrays(digest, batch)
        _hash_arrays(digest, [np.asarray(self.x_eval), np.asarray(self.y_eval)])
        digest.update(json.dumps([self.metric_name, self.num_samples, self.seed]).encode())
        return digest.hexdigest()[:16]

    def float_predict(self, x):
        return TFLiteModel(self.flt, num_threads=self.num_threads).predict(x, batch_size=256)

    def ranges(self, choices: dict, int16_ops=()) -> dict:
        method = choices.get("calibration", "robust_minmax")
        params = {"percentile": float(choices["percentile"])} if _takes(method, "percentile") else {}
        bits = {}
        if get_calibration_method(method).uses_bits:  # kl/mse/percentile ranges depend on the bits; minmax ones do not
            bits = {self.info.tensors[o].name: 16 for i in int16_ops for o in self.info.ops[i].outputs if o >= 0}
        key = json.dumps([method, params, sorted(bits)])
        if key not in self.ranges_cache:
            self.ranges_cache[key] = tflite_frontend.calibrate_tflite(
                self.flt, self.rep, method, num_samples=self.num_samples, params=params, bits=bits).ranges
        return self.ranges_cache[key]

    def op_sets(self, choices: dict) -> tuple[list[int], list[int]]:
        """(float op indices, int16 op indices) of a trial's choices."""
        floats = set(choices.get("float_ops", ()))
        for op_type in choices.get("float_for_speed", ()):
            floats |= {i for i, op in enumerate(self.info.ops) if op.type == op_type}
        if choices.get("precision") == "int16x8":
            return sorted(floats), sorted(set(range(len(self.info.ops))) - floats)
        return sorted(floats), sorted(set(choices.get("int16_ops", ())) - floats)

    def convert(self, choices: dict) -> bytes:
        """The model :func:`tfq.convert` makes for these choices: quantized, then checked (an op that crashes
        the interpreter or outputs NaN/inf on the calibration or edge inputs is kept float, as there)."""
        from tfq.export import check as checker

        key = _canonical(choices)
        if key not in self.contents:
            floats, int16 = self.op_sets(choices)
            ranges = self.ranges(choices, int16)
            added: list[int] = []

            def build(extra=()):
                return tflite_frontend.quantize_tflite(
                    self.flt, ranges, per_channel=bool(choices.get("per_channel", True)),
                    float_ops=sorted(set(floats) | set(extra)), int16_ops=[i for i in int16 if i not in set(extra)])

            def reconvert(nodes):
                added[:] = tflite_frontend.nodes_to_ops(self.info, nodes)
                return build(added)

            mode = "int16x8" if choices.get("precision") == "int16x8" else "int8"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # what the check fixed is in the result's float_choices
                self.contents[key] = checker.checked(build(), self.flt, self.check_data, mode=mode,
                                                     io_dtype="float32", strict=False, reconvert=reconvert)
            self.check_float[key] = sorted(set(added) - set(floats))
        return self.contents[key]


def _check_space(space: dict, overrides: dict, flt: bytes) -> tuple[list[int], list[str]]:
    """(candidate op indices, op types tried float for speed) from the search space."""
    given = [k for k in overrides if k in _KERAS_ONLY_KEYS]
    if given:
        raise ValueError(f"search_space[{given[0]!r}] applies to Keras models, which tfq rewrites; a float .tflite or "
                         f"SavedModel is tuned over calibration, per_channel, precision, float_layers (ops) and "
                         f"float_for_speed (op types). Drop {given[0]!r}.")
    candidates = candidate_ops(flt)
    if space["float_layers"] != "auto":
        chosen = tflite_frontend.select_ops(flt, list(space["float_layers"]), "search_space['float_layers']")
        candidates = [i for i in chosen if i in set(candidates)] or chosen
    info = inspect_tflite(flt)
    types = []
    for weighted in (False, True):
        for i in candidate_ops(flt):
            op = info.ops[i]
            if _weighted(info, op) == weighted and op.type not in types:
                types.append(op.type)
    speed = types if space["float_for_speed"] == "auto" else list(space["float_for_speed"])
    unknown = [t for t in speed if t not in types]
    if unknown:
        raise ValueError(f"search_space['float_for_speed'] must be 'auto' or op types of the model that tfq quantizes, "
                         f"among {types}. Received: {space['float_for_speed']!r}")
    return candidates, speed


def _op_sensitivity(tuner: _OpTuner, space: dict, candidates: list[int]) -> None:
    _op_accuracy_stages(tuner, space, candidates)
    if tuner.objective == "latency":
        _speed_stage(tuner)


def _op_accuracy_stages(tuner: _OpTuner, space: dict, candidates: list[int]) -> None:
    # 1. Global configurations.
    for per_channel in space["per_channel"]:
        for method in space["calibration"]:
            for p in (space["percentile"] if _takes(method, "percentile") else [None]):
                c = {"precision": "int8", "calibration": method, "per_channel": per_channel}
                if p is not None:
                    c["percentile"] = p
                if not tuner.budget_left() or tuner.run(c).met:
                    return
    # 2. Ops kept float, ranked by sensitivity.
    base_trial = tuner.best()
    tuner.accuracy_base = base_trial
    base = dict(base_trial.choices)
    own = _own_sqnr(tuner.flt, tuner.ranges(base), candidates, tuner.x_eval)
    tuner.own_sqnr = own
    gains = []
    for i in sorted(candidates, key=lambda i: (own.get(i, float("inf")), i)):
        if not tuner.budget_left():
            logger.info(f"tune: max_trials/timeout reached after {len(gains)} of {len(candidates)} ops were tried "
                        f"float alone; raise max_trials to try the rest.")
            break
        trial = tuner.run(dict(base, float_ops=[i]))
        tuner.alone[i] = trial.drop
        gains.append((trial.drop, i))
        if trial.met:
            break
    chosen: list[int] = []
    met = None
    for _, i in sorted(gains):
        if not tuner.budget_left():
            break
        chosen.append(i)
        trial = tuner.run(dict(base, float_ops=sorted(chosen)))
        if trial.met:
            met = trial
            break
    if met is None:
        if "int16x8" in space["precision"] and tuner.budget_left():
            tuner.run({k: v for k, v in base.items() if k != "per_channel"} | {"precision": "int16x8"})
        return
    # A minimal set: drop each op (least sensitive first) where the target holds without it.
    for i in sorted(chosen, key=lambda i: -tuner.alone.get(i, float("inf"))):
        if len(chosen) == 1 or not tuner.budget_left():
            break
        rest = [j for j in chosen if j != i]
        if tuner.run(dict(base, float_ops=sorted(rest))).met:
            chosen = rest
    # Integer where the target allows: int16 activations instead of float (objective="size").
    if tuner.objective == "size" and "int16x8" in space["precision"]:
        int16: list[int] = []
        for i in sorted(chosen):
            if not tuner.budget_left():
                break
            floats = sorted(j for j in chosen if j != i)
            trial = tuner.run(dict(base, float_ops=floats, int16_ops=sorted(int16 + [i])))
            if trial.met:
                chosen, int16 = floats, sorted(int16 + [i])


def _op_name(info, i: int) -> str:
    op = info.ops[i]
    return info.tensors[op.outputs[0]].name if op.outputs else ""


def op_float_choices(tuner: _OpTuner, best: Trial) -> FloatChoices:
    """Why each op the chosen model keeps float (or int16) is so: one row per op, with the figures."""
    info = tuner.info
    rows = []
    base = tuner.accuracy_base
    floats, int16 = tuner.op_sets(best.choices)
    speed_types = set(best.choices.get("float_for_speed", ()))
    checks = {c["class"]: c for c in tuner.speed_checks}
    for precision, ops in (("float", floats), ("int16", int16 if best.choices.get("precision") != "int16x8" else [])):
        for i in ops:
            op = info.ops[i]
            if precision == "float" and op.type in speed_types and i not in best.choices.get("float_ops", ()):
                check = checks.get(op.type)
                reason = "latency"
                evidence = (f"{check['before_ms']:.3f} ms with {op.type} quantized, {check['after_ms']:.3f} ms float "
                            f"(medians of interleaved batch-1 runs)") if check and check["kept"] else "latency search"
            else:
                reason = "accuracy"
                alone = tuner.alone.get(i)
                evidence = (f"{tuner.metric_name} drop {base.drop:.4f} with every op int8, {alone:.4f} with only it "
                            f"float; own int8 SQNR {tuner.own_sqnr.get(i, float('nan')):.1f} dB (max_drop "
                            f"{tuner.max_drop:g})") if base is not None and alone is not None else \
                    f"{tuner.metric_name} drop {best.drop:.4f}"
            rows.append({"layer": _op_name(info, i), "class": op.type, "op": i, "precision": precision,
                         "reason": reason, "evidence": evidence})
    for i in tuner.check_float.get(_canonical(best.choices), []):
        rows.append({"layer": _op_name(info, i), "class": info.ops[i].type, "op": i, "precision": "float",
                     "reason": "check", "evidence": "int8, the model crashed or output NaN/inf on the calibration or "
                                                    "edge inputs (all zeros) where float is finite"})
    return FloatChoices(rows)


def convert_options(tuner: _OpTuner, choices: dict) -> dict:
    """The :func:`tfq.convert` keywords that reproduce a trial (with the same representative data)."""
    floats, int16 = tuner.op_sets(choices)
    options = {"mode": "int16x8" if choices.get("precision") == "int16x8" else "int8",
               "calibration": choices.get("calibration", "robust_minmax"),
               "per_channel": bool(choices.get("per_channel", True)), "float_layers": floats}
    if _takes(options["calibration"], "percentile"):
        options["calibration_params"] = {"percentile": float(choices["percentile"])}
    if options["mode"] == "int8":
        options["int16_layers"] = int16
    if tuner.num_samples is not None:
        options["num_calibration_samples"] = tuner.num_samples
    return options


def op_recipe(tuner: _OpTuner, choices: dict, seed: int) -> Recipe | None:
    """A :class:`~tfq.recipes.Recipe` for the trial's float ops (by output tensor name), or None where a
    recipe cannot say it (int16 ops, int16x8): :attr:`TuneResult.convert_options` holds every choice."""
    options = convert_options(tuner, choices)
    if options["mode"] != "int8" or options.get("int16_layers"):
        return None
    return Recipe(mode=options["mode"], weights=TensorSpec(per_channel=options["per_channel"]),
                  calibration=options["calibration"], calibration_params=options.get("calibration_params", {}),
                  float_layers=tuple(re.escape(_op_name(tuner.info, i)) for i in options["float_layers"]),
                  seed=seed, num_calibration_samples=tuner.num_samples, name="tuned")


def tune_ops(model, representative_data, x_eval, y_eval, *, space: dict, overrides: dict, metric, max_drop, relative,
             objective, strategy, max_trials, timeout, seed, output_dir, num_threads, num_calibration_samples,
             verbose):
    """:func:`tfq.tune` for a float ``.tflite`` / SavedModel / TFSMLayer model (arguments checked there)."""
    from tfq.analysis.evaluation import evaluate
    from tfq.analysis.tuning import TuneResult
    from tfq.core.representative import representative_dataset

    if strategy != "sensitivity":
        raise ValueError(f"strategy={strategy!r} applies to Keras models; a float .tflite, SavedModel or TFSMLayer "
                         f"model is tuned op by op with strategy='sensitivity' (the default).")
    flt = tflite_frontend.float_tflite(model)
    candidates, speed = _check_space(space, overrides, flt)
    rep = representative_dataset(representative_data, num_calibration_samples)
    tuner = _OpTuner(flt, rep, x_eval, y_eval, metric, max_drop, relative, objective, output_dir, max_trials,
                     timeout, seed, num_threads, num_calibration_samples, verbose)
    tuner.speed_classes = list(speed) if objective == "latency" else []
    tuner.check_data = representative_data
    _op_sensitivity(tuner, space, candidates)
    best, content = best_trial_content(tuner)
    report = evaluate({"float": flt, "tuned": content}, x_eval, y_eval, reference="float",
                      latency=objective == "latency", num_threads=num_threads)
    latency = {}
    if objective == "latency":
        named = {"float": flt}
        if tuner.speed_base is not None and tuner.speed_base is not best:
            named["quantized"] = tuner.convert(tuner.speed_base.choices)
        named["tuned"] = content
        latency = dict(zip(named, tuner.paired_latency(list(named.values()))))
    return TuneResult(tflite=content, recipe=op_recipe(tuner, best.choices, seed), trials=tuner.trials, best=best,
                      met=best.met, baseline=tuner.baseline, max_drop=max_drop, metric_name=tuner.metric_name,
                      report=report, settings={"strategy": strategy, "objective": objective, "seed": seed,
                                               "relative": relative, "model": "float .tflite (ops)"},
                      float_choices=op_float_choices(tuner, best), latency_ms=latency,
                      speed_checks=list(tuner.speed_checks), convert_options=convert_options(tuner, best.choices))
