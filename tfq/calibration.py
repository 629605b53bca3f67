"""Calibration: activation ranges of every tensor an INT8 model quantizes.

:func:`calibrate` runs representative data through the float model (as rewritten by tfq, so
the tensors are exactly those TFLite will quantize), feeds one observer per tensor, and returns
a :class:`Calibration`: ranges by tensor name, JSON-saveable, accepted by :func:`tfq.convert` so
a model is not calibrated twice.

Every tensor is also summarised per sample (:mod:`tfq.outliers`): samples far outside the rest
are named in one warning, whatever the method, and the default method, ``"robust_minmax"``, sets
them aside (MinMax over the other samples).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from tfq.calibration_methods import DEFAULT_CALIBRATION, get_calibration_method
from tfq.fileio import atomic_write_text

__all__ = ["Calibration", "calibrate", "load_calibration"]

_FORMAT = "tfq.calibration/1"


@dataclass
class Calibration:
    """Activation ranges by quantized-tensor name.

    Attributes:
        ranges: ``{tensor name: (min, max)}`` as observed (before TFLite's nudging).
        method: the calibration method that chose them.
        params: the method's parameters.
        num_samples: samples seen.
        model_name: the model calibrated.
        seconds: wall time of calibration.
        outlier_samples: positions of the samples found far outside the rest (:mod:`tfq.outliers`);
            ``"robust_minmax"`` set them aside, other methods kept them.
    """

    ranges: dict[str, tuple[float, float]]
    method: str = "minmax"
    params: dict = field(default_factory=dict)
    num_samples: int = 0
    model_name: str = ""
    seconds: float = 0.0
    outlier_samples: tuple[int, ...] = ()

    def __getitem__(self, name: str) -> tuple[float, float]:
        return self.ranges[name]

    def __len__(self) -> int:
        return len(self.ranges)

    def to_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "method": self.method,
            "params": dict(self.params),
            "num_samples": self.num_samples,
            "model_name": self.model_name,
            "seconds": self.seconds,
            "ranges": {k: [float(v[0]), float(v[1])] for k, v in self.ranges.items()},
            "outlier_samples": [int(i) for i in self.outlier_samples],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(
                f"not a tfq calibration (expected format {_FORMAT!r}). Received: format="
                f"{d.get('format') if isinstance(d, dict) else type(d).__name__!r}"
            )
        ranges = {}
        for name, value in d["ranges"].items():
            if not (isinstance(value, (list, tuple)) and len(value) == 2) or not all(np.isfinite(value)) \
                    or value[0] > value[1]:
                raise ValueError(f"calibration range for {name!r} must be [min, max] finite with min <= max. "
                                 f"Received: {value!r}")
            ranges[name] = (float(value[0]), float(value[1]))
        return cls(ranges=ranges, method=d.get("method", ""), params=d.get("params", {}),
                   num_samples=int(d.get("num_samples", 0)), model_name=d.get("model_name", ""),
                   seconds=float(d.get("seconds", 0.0)),
                   outlier_samples=tuple(int(i) for i in d.get("outlier_samples", ())))

    def save(self, path: str | os.PathLike) -> Path:
        """Writes JSON atomically."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        return load_calibration(path)


def load_calibration(path: str | os.PathLike) -> Calibration:
    """Reads a calibration written by :meth:`Calibration.save`."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"calibration file not found: {str(p)!r}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(p)!r} is not valid JSON ({err}); re-run tfq.calibrate and save again.") from None
    try:
        return Calibration.from_dict(data)
    except (KeyError, ValueError) as err:
        raise ValueError(f"{str(p)!r}: {err}") from None


def _observer_params(method: str, quantizer, params: dict) -> dict:
    out = dict(params)
    out.setdefault("symmetric", quantizer.symmetric)
    if get_calibration_method(method).uses_bits:
        out.setdefault("bits", quantizer.bits)
    return out


_FIRST_BATCH = 32
_MAX_BATCH = 1024
_BATCH_BYTES = 256 << 20  # observed activations per forward pass, for batch_size=None


def _batches(data, batch_size, method: str, samples):
    """Batches of ``batch_size``; with None, 32, then (MinMax methods) as many as fit in ``_BATCH_BYTES``
    of the activations the first batch showed (``samples.batch_bytes``)."""
    if batch_size is not None or method not in ("minmax", "robust_minmax"):
        yield from data.batches(_FIRST_BATCH if batch_size is None else batch_size)
        return
    pending, count, target = [], 0, _FIRST_BATCH
    for batch in data.batches(_FIRST_BATCH):
        pending.append(batch)
        count += len(batch[0])
        if count >= target:
            yield [np.concatenate(parts) for parts in zip(*pending)] if len(pending) > 1 else pending[0]
            per_sample = samples.batch_bytes / max(count, 1)
            target = int(min(max(_BATCH_BYTES // max(per_sample, 1.0), _FIRST_BATCH), _MAX_BATCH))
            pending, count = [], 0
    if pending:
        yield [np.concatenate(parts) for parts in zip(*pending)] if len(pending) > 1 else pending[0]


def _constant_value(observer):
    """The single value a tensor took on all the calibration data, or None (from the observer's public state)."""
    stats = observer.get_state()["stats"]
    lo, hi = stats.get("min"), stats.get("max")
    if lo is None or hi is None:
        return None
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    return float(lo.ravel()[0]) if lo.size and np.all(lo == hi) and np.all(lo == lo.ravel()[0]) else None


def _warn_degenerate(observers: dict, ranges: dict, model_name: str) -> None:
    """One warning listing the tensors that took a single value on the calibration data (constant or all zeros).

    Such a tensor's range is empty (all zeros: widened to :data:`tfq.ops.MIN_RANGE`) or ends at that
    value: any other value it takes at inference saturates. The layer is the quantizer's name
    without its ``_fq`` suffix.
    """
    degenerate = []
    for name, observer in observers.items():
        value = _constant_value(observer)
        if value is not None or ranges[name][1] - ranges[name][0] <= 0.0:
            degenerate.append((name, value if value is not None else ranges[name][0]))
    if not degenerate:
        return
    described = ", ".join(f"{name!r} (layer {name.rsplit('_fq', 1)[0]!r}, always {value:g})"
                          for name, value in degenerate[:6])
    more = f" and {len(degenerate) - 6} more" if len(degenerate) > 6 else ""
    warnings.warn(
        f"tfq.calibrate: {len(degenerate)} tensor(s) of model {model_name!r} took a single value on the calibration "
        f"data: {described}{more}. Their range is degenerate, so any other value saturates at inference: calibrate "
        f"on typical inputs, not constant or all-zero ones.",
        stacklevel=3,
    )


def calibrate(
    model,
    representative_data,
    method: str = DEFAULT_CALIBRATION,
    *,
    recipe=None,
    num_samples: int | None = None,
    batch_size: int | None = None,
    verbose: bool = False,
    **params,
) -> Calibration:
    """Chooses the range of every activation tensor that the INT8 model will quantize.

    Args:
        model: a Keras model (or path); it is rewritten the way :func:`tfq.convert` rewrites it,
            or used as is if it already is a tfq-quantized model.
        representative_data: arrays, dict of arrays, ``tf.data.Dataset`` or callable (see
            :func:`tfq.representative_dataset`).
        method: ``"robust_minmax"`` (default: MinMax over the samples that are not far outside the
            rest, see :mod:`tfq.outliers`), ``"minmax"``, ``"moving_average"``, ``"kl"``,
            ``"percentile"`` or ``"mse"``. Whatever the method, samples far outside the rest are
            named in one warning.
        recipe: recipe (or preset name) deciding which tensors are quantized; default int8.
        num_samples: cap on samples used (None: all).
        batch_size: samples per forward pass. None (default): 32 for the methods whose ranges
            depend on how the data is split (moving average, histograms); for ``"minmax"`` and
            ``"robust_minmax"``, which do not, 32 for the first pass and then as many as fit
            in about 256 MB of observed activations (at most 1024): fewer, larger passes.
        verbose: show a progress bar.
        **params: method parameters (``percentile=99.99``, ``decay=0.9``, ``num_bins=2048`` …).

    Returns:
        A :class:`Calibration`.

    Example:
        >>> cal = tfq.calibrate(model, x_train[:500], method="percentile", percentile=99.99)  # doctest: +SKIP
        >>> tflite = tfq.convert(model, "int8", calibration=cal)                           # doctest: +SKIP
    """
    from tfq.interop import load_keras_model
    from tfq.models import is_quantized_model
    from tfq.observers import MinMaxObserver, create_observer
    from tfq.outliers import DEFAULT_OUTLIER_FACTOR, SampleRanges, find_outlier_samples, warn_outlier_samples
    from tfq.representative import pack_model_inputs, representative_dataset
    from tfq.qat.layers import observing
    from tfq.qat.transform import quantizers_of, rewrite_model
    from tfq.recipes import load_recipe

    get_calibration_method(method, "method").check_params(params, "params")
    model = load_keras_model(model)
    if not is_quantized_model(model):
        model = rewrite_model(model, load_recipe(recipe if recipe is not None else "int8"))
    data = representative_dataset(representative_data, num_samples, model=model)
    quantizers = {name: q for name, q in quantizers_of(model).items() if q.mode != "fixed"}
    robust = method == DEFAULT_CALIBRATION  # MinMax, the samples far outside the rest set aside
    observers = {
        name: create_observer("minmax", symmetric=q.symmetric) if q.calibration == "minmax" or robust
        else create_observer(method, **_observer_params(method, q, params))
        for name, q in quantizers.items()
    }
    samples = SampleRanges()  # per-sample ranges of every tensor: the outlier test
    by_id = {id(q): samples.tap(name, observers[name]) for name, q in quantizers.items()}
    start = time.perf_counter()
    total = len(data)
    bar = keras.utils.Progbar(total, unit_name="sample") if verbose else None
    seen = 0
    with observing(by_id):
        for batch in _batches(data, batch_size, method, samples):
            samples.begin_batch(len(batch[0]))
            model(pack_model_inputs(model, batch), training=False)
            seen += len(batch[0])
            if bar is not None:
                bar.update(seen)
    if seen == 0:
        raise ValueError("representative data is empty: got 0 samples. Pass at least one sample.")
    per_sample = samples.ranges()
    outliers = find_outlier_samples(per_sample, DEFAULT_OUTLIER_FACTOR)
    warn_outlier_samples(outliers, method, set_aside=robust)
    keep = np.ones(samples.num_samples, dtype=bool)
    keep[list(outliers.indices)] = False
    ranges = {}
    for name, observer in observers.items():
        if robust and outliers and name in per_sample:  # MinMax over the samples not set aside
            observer = MinMaxObserver(symmetric=observer.symmetric)
            observer.update([per_sample[name][0][keep].min(), per_sample[name][1][keep].max()])
        lo, hi = observer.compute_range()
        ranges[name] = (float(np.min(lo)), float(np.max(hi)))
    _warn_degenerate(observers, ranges, model.name)
    return Calibration(ranges=ranges, method=method, params=dict(params), num_samples=seen,
                       model_name=model.name, seconds=time.perf_counter() - start,
                       outlier_samples=outliers.indices)
