"""Beyond calibration: where the recipe's equalize / data_free / weight_rounding / bias_correction run.

:func:`tfq.convert` calls these three hooks around its INT8 pipeline (rewrite → calibrate →
freeze → converter):

1. :func:`prepare_model` — before the rewrite: cross-layer equalization (:mod:`tfq.ptq.equalization`).
2. :func:`calibration_inputs` and :func:`data_free_ranges` — instead of calibration data:
   ZeroQ-style synthetic inputs, and ranges from BatchNorm statistics (:mod:`tfq.ptq.data_free`).
3. :func:`apply_weight_methods` — on the frozen fake-quant model, before the converter: learned
   rounding (:mod:`tfq.ptq.weight_rounding`), then bias correction (:mod:`tfq.ptq.bias_correction`)
   measured against the float kernels.

Each returns what it did, with its wall time, so that callers (the benchmark) can report cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from tfq.core.recipes import Recipe

__all__ = ["MethodsReport", "apply_weight_methods", "calibration_inputs", "data_free_ranges", "prepare_model",
           "uses_methods"]


@dataclass
class MethodsReport:
    """What the methods beyond calibration did during one conversion.

    Attributes:
        seconds: wall time per method (``"equalize"``, ``"data_free"``, ``"weight_rounding"``,
            ``"bias_correction"``).
        rounding: per layer, the :class:`~tfq.ptq.weight_rounding.RoundingResult`.
        bias_shifts: per layer, the shift subtracted from its folded bias.
    """

    seconds: dict = field(default_factory=dict)
    rounding: dict = field(default_factory=dict)
    bias_shifts: dict = field(default_factory=dict)


def uses_methods(r: Recipe) -> list[str]:
    """The method fields of ``r`` that are switched on."""
    on = []
    if r.equalize:
        on.append("equalize")
    if r.bias_correction is not False:
        on.append("bias_correction")
    if r.weight_rounding != "nearest":
        on.append("weight_rounding")
    if r.data_free is not False:
        on.append("data_free")
    return on


def prepare_model(model, r: Recipe, report: MethodsReport | None = None):
    """The float model to quantize: equalized when ``r.equalize``."""
    if not r.equalize:
        return model
    from tfq.ptq.equalization import equalize

    start = time.perf_counter()
    out = equalize(model)
    if report is not None:
        report.seconds["equalize"] = time.perf_counter() - start
    return out


def calibration_inputs(qmodel, r: Recipe, data, report: MethodsReport | None = None):
    """Calibration data: ``data``, or inputs synthesized from BatchNorm statistics with ``r.data_free``."""
    if not r.data_free_method:
        return data
    from tfq.ptq.data_free import NUM_SAMPLES, synthesize_inputs

    start = time.perf_counter()
    x = synthesize_inputs(qmodel, r.num_calibration_samples or NUM_SAMPLES, seed=r.seed)
    if report is not None:
        report.seconds["data_free"] = time.perf_counter() - start
    return x


def data_free_ranges(qmodel, r: Recipe) -> dict:
    """Ranges taken from BatchNorm statistics (``data_free="bn_statistics"``), by quantizer name."""
    if r.data_free_method != "bn_statistics":
        return {}
    from tfq.ptq.data_free import batchnorm_ranges

    return batchnorm_ranges(qmodel)


def apply_weight_methods(frozen, r: Recipe, data, report: MethodsReport | None = None) -> MethodsReport:
    """Learned rounding, then bias correction, on the frozen fake-quant model (changed in place)."""
    from tfq.ptq.weight_rounding import round_weights, wrapped_kernel
    from tfq.quantsim.rewrite import quantized_layers_of

    report = report if report is not None else MethodsReport()
    references = {}
    if r.weight_rounding != "nearest":
        if data is None:
            raise ValueError(f"weight_rounding={r.weight_rounding!r} learns from calibration data: pass "
                             f"representative_data (or data_free=True to synthesize it).")
        for w in quantized_layers_of(frozen):
            target = wrapped_kernel(w)
            if target is not None:
                references[id(w)] = np.array(target.folded)
        start = time.perf_counter()
        report.rounding = round_weights(frozen, data, r.weight_rounding, num_samples=r.num_calibration_samples,
                                        seed=r.seed)
        report.seconds["weight_rounding"] = time.perf_counter() - start
    method = r.bias_correction_method
    if method is not None:
        from tfq.ptq.bias_correction import correct_biases

        if method == "empirical" and data is None:
            raise ValueError("bias_correction='empirical' measures the shift on calibration data: pass "
                             "representative_data, or use bias_correction='analytical' (BatchNorm statistics).")
        start = time.perf_counter()
        report.bias_shifts = correct_biases(frozen, method, data, num_samples=r.num_calibration_samples or 512,
                                            references=references)
        report.seconds["bias_correction"] = time.perf_counter() - start
    return report
