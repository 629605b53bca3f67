"""Beyond calibration: where the registered post-training methods run in the INT8 pipeline.

:func:`tfq.convert` calls these hooks around its pipeline (rewrite → calibrate → freeze →
converter); each runs the steps the methods switched on in the recipe have at its stage
(:mod:`tfq.core.ptq_methods`, where a method is registered), in their order:

1. :func:`prepare_model` — ``"float_model"``, before the rewrite: e.g. cross-layer equalization
   (:mod:`tfq.ptq.equalization`).
2. :func:`calibration_inputs` and :func:`data_free_ranges` — ``"calibration_inputs"`` and
   ``"ranges"``, instead of calibration data: e.g. ZeroQ-style synthetic inputs, and ranges from
   BatchNorm statistics (:mod:`tfq.ptq.data_free`).
3. :func:`apply_weight_methods` — ``"frozen_model"``, on the frozen fake-quant model before the
   converter: e.g. learned rounding (:mod:`tfq.ptq.weight_rounding`), then bias correction
   (:mod:`tfq.ptq.bias_correction`) measured against the float kernels.

Each records what it did, with its wall time, so that callers (the benchmark) can report cost.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field

import numpy as np

from tfq.core.ptq_methods import MethodContext, PTQMethod, get_ptq_method, methods_at
from tfq.core.recipes import Recipe

__all__ = ["MethodsReport", "apply_weight_methods", "calibration_inputs", "data_free_ranges", "prepare_model",
           "uses_methods", "uses_stage"]


@dataclass
class MethodsReport:
    """What the methods beyond calibration did during one conversion.

    Attributes:
        seconds: wall time per method (``"equalize"``, ``"data_free"``, ``"weight_rounding"``,
            ``"bias_correction"``, or any registered method).
        rounding: per layer, the :class:`~tfq.ptq.weight_rounding.RoundingResult`.
        bias_shifts: per layer, the shift subtracted from its folded bias.
        results: per method, what its ``"frozen_model"`` step returned.
    """

    seconds: dict = field(default_factory=dict)
    rounding: dict = field(default_factory=dict)
    bias_shifts: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)


def uses_methods(r: Recipe) -> list[str]:
    """The post-training methods switched on in ``r``, in registration order."""
    return list(r.method_settings())


def uses_stage(r: Recipe, stage: str) -> bool:
    """Whether a method switched on in ``r`` has a step at ``stage``."""
    settings = r.method_settings()
    return any(m.name in settings for m in methods_at(stage))


def _step(method: PTQMethod, stage: str):
    """The step callable (a lazy ``"module:function"`` imported now)."""
    step = method.steps[stage]
    if isinstance(step, str):
        module, _, name = step.partition(":")
        step = getattr(importlib.import_module(module), name)
    return step


def _run(stage: str, target, r: Recipe, data, report: MethodsReport | None, shared: dict | None = None):
    """Runs the steps at ``stage`` of the methods switched on; yields (method, what its step returned)."""
    settings = r.method_settings()
    for method in methods_at(stage):
        if method.name not in settings:
            continue
        value, options = settings[method.name]
        ctx = MethodContext(method.name, value, options, r, data, report, shared if shared is not None else {})
        start = time.perf_counter()
        out = _step(method, stage)(target, ctx)
        if report is not None:
            report.seconds[method.name] = report.seconds.get(method.name, 0.0) + time.perf_counter() - start
        yield method, out


def prepare_model(model, r: Recipe, report: MethodsReport | None = None):
    """The float model to quantize, after the ``"float_model"`` steps (e.g. equalized with ``r.equalize``)."""
    for _, out in _run("float_model", model, r, None, report):
        model = out
    return model


def calibration_inputs(qmodel, r: Recipe, data, report: MethodsReport | None = None):
    """Calibration data: ``data``, or what the ``"calibration_inputs"`` steps give (inputs synthesized from
    BatchNorm statistics with ``r.data_free``)."""
    for _, out in _run("calibration_inputs", qmodel, r, data, report):
        data = out
    return data


def data_free_ranges(qmodel, r: Recipe) -> dict:
    """Ranges set without data by the ``"ranges"`` steps (``data_free="bn_statistics"``), by quantizer name."""
    ranges: dict = {}
    for _, out in _run("ranges", qmodel, r, None, None):
        ranges.update(out)
    return ranges


def apply_weight_methods(frozen, r: Recipe, data, report: MethodsReport | None = None) -> MethodsReport:
    """The ``"frozen_model"`` steps on the frozen fake-quant model (changed in place): learned rounding,
    then registered methods, then bias correction (by their ``order``)."""
    from tfq.ptq.weight_rounding import wrapped_kernel
    from tfq.quantsim.rewrite import quantized_layers_of

    report = report if report is not None else MethodsReport()
    settings = r.method_settings()
    on = [m for m in methods_at("frozen_model") if m.name in settings]
    if not on:
        return report
    for method in on:
        if method.data == "needs" and data is None:
            synthesize = " (or data_free=True to synthesize it)" if r.mode in get_ptq_method("data_free").modes else ""
            raise ValueError(f"{method.name}={settings[method.name][0]!r} learns from calibration data: pass "
                             f"representative_data{synthesize}.")
    references = {}  # the float kernels before any step changes them (bias correction measures against them)
    for w in quantized_layers_of(frozen):
        target = wrapped_kernel(w)
        if target is not None:
            references[id(w)] = np.array(target.folded)
    for method, out in _run("frozen_model", frozen, r, data, report, {"references": references}):
        report.results[method.name] = out
    return report
