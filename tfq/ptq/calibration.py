"""Calibration: activation ranges of every tensor an INT8 model quantizes.

:func:`calibrate` runs representative data through the float model (as rewritten by tfq, so
the tensors are exactly those TFLite will quantize), feeds one observer per tensor, and returns
a :class:`Calibration`: ranges by tensor name, JSON-saveable, accepted by :func:`tfq.convert` so
a model is not calibrated twice.

Calibration scales out two ways, with the same result as one process on the same data:

* **Shards** (per worker, per file): calibrate each shard with ``keep_observers=True``, save,
  and combine with :func:`merge_calibrations` (the observers' states merge, see
  :meth:`tfq.observers.Observer.merge`).
* **A tf.distribute strategy**: ``calibrate(..., strategy=strategy)`` splits every batch over
  the replicas, each replica observing its slice, and merges the replicas' observers (across
  workers too, under ``MultiWorkerMirroredStrategy``).

Every tensor is also summarised per sample (:mod:`tfq.outliers`): samples far outside the rest
are named in one warning, whatever the method, and the default method, ``"robust_minmax"``, sets
them aside (MinMax over the other samples).
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from tfq.core.calibration_methods import DEFAULT_CALIBRATION, get_calibration_method
from tfq.core.fileio import atomic_write_text
from tfq.core.logs import Progress, logger, verbosity
from tfq.core.messages import check_bool, short_repr
from tfq.core.process_lock import serialized
from tfq.core.recipes import load_recipe
from tfq.core.representative import pack_model_inputs, representative_dataset
from tfq.models.interop import load_keras_model
from tfq.models.loading import is_quantized_model
from tfq.numerics.observers import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    Observer,
    SoftmaxInputObserver,
    create_observer,
)
from tfq.numerics.outliers import (
    DEFAULT_OUTLIER_FACTOR,
    OutlierTest,
    warn_outlier_samples,
)
from tfq.quantsim.layers import observing
from tfq.quantsim.rewrite import quantizers_of, rewrite_model

__all__ = ["Calibration", "calibrate", "check_ranges", "load_calibration", "merge_calibrations"]

_FORMAT = "tfq.ptq.calibration/1"


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
        observers: the observers' states by tensor name (:meth:`tfq.observers.Observer.get_state`),
            kept with ``calibrate(..., keep_observers=True)`` so that calibrations of shards can be
            merged (:meth:`merge`); None otherwise.
        outlier_samples: positions of the samples found far outside the rest (:mod:`tfq.outliers`);
            ``"robust_minmax"`` set them aside, other methods kept them.
    """

    ranges: dict[str, tuple[float, float]]
    method: str = "minmax"
    params: dict = field(default_factory=dict)
    num_samples: int = 0
    model_name: str = ""
    seconds: float = 0.0
    observers: dict[str, dict] | None = None
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
            **({"observers": self.observers} if self.observers is not None else {}),
            "outlier_samples": [int(i) for i in self.outlier_samples],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(
                f"not a tfq calibration (expected format {_FORMAT!r}). Received: format="
                f"{d.get('format') if isinstance(d, dict) else type(d).__name__!r}"
            )
        try:
            ranges = check_ranges(d["ranges"])
        except TypeError as err:
            raise ValueError(str(err)) from None
        observers = d.get("observers")
        if observers is not None and (not isinstance(observers, dict) or set(observers) != set(ranges)):
            raise ValueError(f"calibration 'observers' must be a dict of observer states for the tensors of 'ranges'. "
                             f"Received: {type(observers).__name__} with keys {sorted(observers)[:5] if isinstance(observers, dict) else ''}")
        return cls(ranges=ranges, method=d.get("method", ""), params=d.get("params", {}),
                   num_samples=int(d.get("num_samples", 0)), model_name=d.get("model_name", ""),
                   seconds=float(d.get("seconds", 0.0)), observers=observers,
                   outlier_samples=tuple(int(i) for i in d.get("outlier_samples", ())))

    def save(self, path: str | os.PathLike) -> Path:
        """Writes JSON atomically."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        return load_calibration(path)

    def merge(self, *others: Calibration) -> Calibration:
        """This calibration merged with others of other shards of the data: see :func:`merge_calibrations`."""
        return merge_calibrations([self, *others])


#: Largest magnitude a calibrated range may reach: beyond it the int8 step (range / 255) is so
#: coarse that every typical activation rounds to zero — an edited or corrupt file, not a model.
MAX_RANGE_MAGNITUDE = 1e12


def check_ranges(ranges) -> dict[str, tuple[float, float]]:
    """``{tensor name: (min, max)}`` as floats, or a one-line ValueError naming the first bad range.

    A range is two real numbers, finite, ``min <= max``, both within ±:data:`MAX_RANGE_MAGNITUDE`.

    Example:
        >>> check_ranges({"x_fq": [0, 1]})
        {'x_fq': (0.0, 1.0)}
    """
    if not isinstance(ranges, dict):
        raise TypeError(f"calibration ranges must be a dict of tensor name -> [min, max]. "
                         f"Received: {type(ranges).__name__}")
    out = {}
    for name, value in ranges.items():
        try:
            lo, hi = (float(v) for v in value)
            ok = all(np.isfinite((lo, hi))) and lo <= hi and max(abs(lo), abs(hi)) <= MAX_RANGE_MAGNITUDE \
                and not any(isinstance(v, (str, bytes, bool)) for v in value)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"calibration range for {name!r} must be [min, max]: numbers, finite, min <= max, "
                             f"within ±{MAX_RANGE_MAGNITUDE:g}; re-run tfq.calibrate. Received: {short_repr(value)}")
        out[name] = (lo, hi)
    return out


def merge_calibrations(calibrations) -> Calibration:
    """Combines calibrations of shards of the data into the calibration of all of it.

    Each calibration must come from ``calibrate(..., keep_observers=True)`` on the same model with
    the same method and parameters. Their observers merge (:meth:`tfq.observers.Observer.merge`),
    so the ranges equal those of one :func:`calibrate` call on all the shards' batches: exactly for
    ``"minmax"``, ``"kl"``, ``"percentile"`` and ``"mse"`` (histograms merge bin for bin), up to
    float64 rounding for ``"moving_average"``, whose average runs over the shards in the order
    given. With ``batch_aggregate``, a shard's last partial batch counts as a batch: shard on
    batch boundaries to get the one-process result.

    Args:
        calibrations: :class:`Calibration` objects (or paths to saved ones), in data order.

    Returns:
        A new :class:`Calibration` with merged observers; ``num_samples`` and ``seconds`` are sums.

    Raises:
        ValueError: an empty list, a calibration without observers, or calibrations of different
            tensors, methods or parameters.

    Example:
        >>> shards = [tfq.calibrate(model, x[i::4], "kl", keep_observers=True) for i in range(4)]  # doctest: +SKIP
        >>> cal = tfq.merge_calibrations(shards)                                                  # doctest: +SKIP
    """

    cals = [load_calibration(c) if isinstance(c, (str, os.PathLike)) else c for c in calibrations]
    if not cals:
        raise ValueError("merge_calibrations needs at least one calibration. Received: an empty list")
    first = cals[0]
    for i, cal in enumerate(cals):
        if not isinstance(cal, Calibration):
            raise TypeError(f"merge_calibrations takes Calibration objects or paths. Received: {type(cal).__name__}")
        if cal.observers is None:
            raise ValueError(f"calibration {i} has no observer states: calibrate each shard with keep_observers=True.")
        if (cal.method, cal.params, sorted(cal.ranges)) != (first.method, first.params, sorted(first.ranges)):
            raise ValueError(
                f"calibration {i} ({cal.method!r}, {cal.params}, {len(cal.ranges)} tensors) differs from calibration 0 "
                f"({first.method!r}, {first.params}, {len(first.ranges)} tensors): calibrate every shard of one model "
                f"with the same method and parameters."
            )
    observers = {name: Observer.from_state(state) for name, state in first.observers.items()}
    for cal in cals[1:]:
        for name, observer in observers.items():
            observer.merge(Observer.from_state(cal.observers[name]))
    return _calibration_from(observers, first.method, first.params, sum(c.num_samples for c in cals),
                             first.model_name, sum(c.seconds for c in cals), keep_observers=True)


def _calibration_from(observers: dict, method: str, params: dict, num_samples: int, model_name: str,
                      seconds: float, keep_observers: bool, outlier_samples=()) -> Calibration:
    ranges = {}
    for name, observer in observers.items():
        lo, hi = observer.compute_range()
        ranges[name] = (float(np.min(lo)), float(np.max(hi)))
    _warn_degenerate(observers, ranges, model_name)
    states = {name: observer.get_state() for name, observer in observers.items()} if keep_observers else None
    return Calibration(ranges=ranges, method=method, params=dict(params), num_samples=num_samples,
                       model_name=model_name, seconds=seconds, observers=states,
                       outlier_samples=tuple(outlier_samples))


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
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"{str(p)!r}: {err}") from None


def _observer_params(method: str, quantizer, params: dict) -> dict:
    out = dict(params)
    out.setdefault("symmetric", quantizer.symmetric)
    if get_calibration_method(method).uses_bits:
        out.setdefault("bits", quantizer.bits)
    return out


_FIRST_BATCH = 32
_MAX_BATCH = 1024
_BATCH_BYTES = 32 << 20  # observed activations per forward pass, for batch_size=None


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
        stacklevel=4,
    )


@serialized
def calibrate(
    model,
    representative_data,
    method: str = DEFAULT_CALIBRATION,
    *,
    recipe=None,
    num_samples: int | None = None,
    batch_size: int | None = None,
    verbose: bool = False,
    keep_observers: bool = False,
    strategy=None,
    **params,
) -> Calibration:
    """Chooses the range of every activation tensor that the INT8 model will quantize.

    Args:
        model: a Keras model (or path); it is rewritten the way :func:`tfq.convert` rewrites it,
            or used as is if it already is a tfq-quantized model.
            A float ``.tflite`` (path or bytes), a SavedModel directory or a ``TFSMLayer`` model is
            calibrated below Keras (:func:`tfq.ptq.tflite_calibration.calibrate_tflite`): every
            float tensor of its float ``.tflite``, keyed by tensor name, for
            ``tfq.convert(model, "int8", calibration=...)``.
        representative_data: arrays, dict of arrays, ``tf.data.Dataset`` or callable (see
            :func:`tfq.representative_dataset`).
        method: ``"robust_minmax"`` (default: MinMax over the samples that are not far outside the
            rest, see :mod:`tfq.outliers`), ``"minmax"``, ``"moving_average"``, ``"kl"``,
            ``"percentile"`` or ``"mse"``. Whatever the method, samples far outside the rest are
            named in one warning.
        recipe: recipe (or preset name) deciding which tensors are quantized; default int8.
        num_samples: cap on samples used (None: all).
        batch_size: samples per forward pass (per replica with ``strategy``). None (default): 32
            for the methods whose ranges depend on how the data is split (moving average,
            histograms) and under a strategy; for ``"minmax"`` and ``"robust_minmax"``, which do
            not, 32 for the first pass and then as many as fit in about 32 MB of observed
            activations (at most 1024): fewer, larger passes.
        verbose: show a progress bar (on a terminal) and a line when done, through the ``"tfq"`` logger.
        keep_observers: keep the observers' states in the result, so that calibrations of
            shards of the data merge (:func:`merge_calibrations`). They are saved with it.
        strategy: a ``tf.distribute`` strategy whose ``run`` executes eagerly per replica
            (``MirroredStrategy``, ``MultiWorkerMirroredStrategy``, ``OneDeviceStrategy``). Every
            batch of ``batch_size × num_replicas_in_sync`` samples is split into one slice per
            replica; each replica observes its slice; the replicas' observers merge at the end
            (gathered across workers: every worker passes the same data and gets the same
            result). The ranges equal one process's on the same data — for ``"moving_average"``
            the replicas' batch minima and maxima are combined at every step, so the average runs
            over the global batches. ``batch_aggregate`` (a range per batch) is refused.
        **params: method parameters (``percentile=99.99``, ``decay=0.9``, ``num_bins=2048`` …).

    Returns:
        A :class:`Calibration`.

    Raises:
        ValueError: unknown method, empty data, ``batch_aggregate`` with ``strategy``; a recipe
            whose activations stay float (``"fp16"``: nothing to calibrate); ``recipe`` with a
            tfq QAT model (its quantizers are fixed).
        TypeError: ``verbose``/``keep_observers`` not a bool; ``strategy`` not a ``tf.distribute``
            strategy.

    Example:
        >>> cal = tfq.calibrate(model, x_train[:500], method="percentile", percentile=99.99)  # doctest: +SKIP
        >>> tflite = tfq.convert(model, "int8", calibration=cal)                           # doctest: +SKIP
    """

    get_calibration_method(method, "method").check_params(params, "params")
    for name, value in (("verbose", verbose), ("keep_observers", keep_observers)):
        check_bool(name, value)
    from tfq.ptq import tflite_calibration

    if tflite_calibration.is_below_keras(model):
        given = [name for name, value in (("recipe", recipe), ("batch_size", batch_size), ("strategy", strategy))
                 if value is not None] + (["keep_observers"] if keep_observers else [])
        if given:
            raise ValueError(f"{given[0]} does not apply to a float .tflite, SavedModel or TFSMLayer model, which "
                             f"tfq calibrates in LiteRT one sample at a time (ranges keyed by tensor name). Drop "
                             f"{given[0]}.")
        with verbosity(verbose):
            return tflite_calibration.calibrate_tflite(tflite_calibration.float_tflite(model), representative_data,
                                                       method, num_samples=num_samples, params=params)
    if strategy is not None and params.get("batch_aggregate") is not None:
        raise ValueError(
            f"batch_aggregate={params['batch_aggregate']!r} takes one range per batch, but with strategy every replica "
            f"sees a slice of each batch: calibrate without strategy, or without batch_aggregate."
        )
    if strategy is not None and method == DEFAULT_CALIBRATION:
        raise ValueError(
            f"method={method!r} (the default) tests every sample against the others, which replicas observing "
            f"slices of a batch cannot do: with strategy pass method='minmax' (or another method)."
        )
    if strategy is not None and not (callable(getattr(strategy, "run", None)) and hasattr(strategy, "scope")):
        raise TypeError(f"strategy must be a tf.distribute strategy (e.g. tf.distribute.MirroredStrategy()) or None. "
                        f"Received: strategy={short_repr(strategy)} ({type(strategy).__name__})")
    r = load_recipe(recipe if recipe is not None else "int8")
    if not r.activations.is_integer:
        raise ValueError(f"recipe {r.name or r.mode!r} (mode {r.mode!r}) keeps activations float "
                         f"({r.activations.dtype}), so there is no range to calibrate: pass an integer recipe "
                         f"(e.g. 'int8'), or convert without calibration: tfq.convert(model, {r.mode!r}).")
    model = load_keras_model(model)
    if not is_quantized_model(model):
        model = rewrite_model(model, r)
    elif recipe is not None:
        raise ValueError(f"recipe={short_repr(recipe)} decides which tensors a float model quantizes, but model "
                         f"{model.name!r} is a tfq QAT model whose quantizers are fixed: drop recipe.")
    data = representative_dataset(representative_data, num_samples, model=model)
    quantizers = {name: q for name, q in quantizers_of(model).items() if q.mode != "fixed"}
    robust = method == DEFAULT_CALIBRATION  # MinMax, the samples far outside the rest set aside

    def make_observer(name):
        q = quantizers[name]
        if q.calibration == "softmax_input":  # a softmax's logits: the range its int8 output depends on
            return SoftmaxInputObserver(bits=q.bits, symmetric=q.symmetric)
        if q.calibration == "minmax" or robust:  # a quantizer that asks for min/max whatever the method
            return create_observer("minmax", symmetric=q.symmetric)
        return create_observer(method, **_observer_params(method, q, params))

    observers = {name: make_observer(name) for name in quantizers}
    start = time.perf_counter()
    total = len(data)
    with verbosity(verbose), Progress(f"calibrating ({method})", total, unit="samples") as bar:
        if strategy is not None:
            seen, outliers = _observe_with_strategy(model, data, batch_size or _FIRST_BATCH, strategy, quantizers,
                                                    observers, make_observer, method, bar), ()
        else:
            seen, outliers = _observe_per_sample(model, data, batch_size, method, quantizers, observers, robust,
                                                 bar)
        if seen:
            logger.info(f"calibrated {len(observers)} tensors ({method}) on {seen} samples in "
                        f"{time.perf_counter() - start:.1f} s")
    if seen == 0:
        raise ValueError("representative data is empty: got 0 samples. Pass at least one sample.")
    return _calibration_from(observers, method, params, seen, model.name, time.perf_counter() - start,
                             keep_observers, outlier_samples=outliers)


_INDEX_ERROR = re.compile(r"indices\[(\d+)[\d,]*\] = (-?\d+) is not in \[0, (\d+)\)")


def _embeddings_of(model, input_dim: int) -> list[str]:
    """Names of the Embedding layers of ``model`` (nested models and tfq wrappers included) with ``input_dim`` rows."""
    names, stack = [], list(model.layers)
    while stack:
        layer = stack.pop(0)
        if isinstance(layer, keras.Model):
            if layer.name.endswith("_inlined") and any(type(op).__name__ == "Take" for op in layer.operations) \
                    and any(len(w.shape) == 2 and int(w.shape[0]) == input_dim for w in layer.weights):
                names.append(layer.name[:-len("_inlined")])  # an Embedding as tfq decomposes it (a table and a take)
                continue
            stack.extend(layer.layers)
            continue
        inner = getattr(layer, "layer", None)
        for candidate in (layer, inner):
            if isinstance(candidate, keras.layers.Embedding) and int(candidate.input_dim) == input_dim:
                names.append(layer.name)
                break
    return names


def _forward(model, batch, offset: int) -> None:
    """``model`` on one batch in inference; an index out of an Embedding's range is one line naming it."""
    import tensorflow as tf

    try:
        model(pack_model_inputs(model, batch), training=False)
    except tf.errors.InvalidArgumentError as err:
        match = _INDEX_ERROR.search(str(err))
        if match is None:
            raise
        row, value, size = (int(g) for g in match.groups())
        layers = _embeddings_of(model, size)
        where = f"Embedding {', '.join(map(repr, layers))} (input_dim={size})" if layers else f"a lookup of {size} rows"
        raise ValueError(f"calibration sample {offset + row} holds the index {value}, outside [0, {size}) of {where}. "
                         f"Map the indices into range (e.g. an out-of-vocabulary id) or enlarge input_dim.") from None


def _observe_per_sample(model, data, batch_size, method, quantizers, observers, robust, bar):
    """One process: feeds ``observers`` and runs the outlier test (:class:`tfq.outliers.OutlierTest`,
    fixed-size state whatever the number of samples).

    Returns ``(samples seen, indices of the samples far outside the rest)``; with ``robust`` the
    observers of those samples' tensors are replaced by MinMax over the other samples (also what a
    shard's kept state holds). In the rare case the test's state cannot tell (more samples far
    outside than it keeps), it runs the data through the model a second time (observers untouched).
    """

    def feed(recorder, taps, bar=None):
        seen = 0
        with observing(taps):
            for batch in _batches(data, batch_size, method, recorder):
                recorder.begin_batch(len(batch[0]))
                _forward(model, batch, seen)
                seen += len(batch[0])
                if bar is not None:
                    bar.update(seen)
        return seen

    def rerun(recorder):  # the same batches again, recorded only
        feed(recorder, {id(q): recorder.tap(name) for name, q in quantizers.items()})

    test = OutlierTest(rerun=rerun)
    seen = feed(test, {id(q): test.tap(name, observers[name]) for name, q in quantizers.items()}, bar)
    if seen == 0:
        return 0, ()
    outliers = test.result(DEFAULT_OUTLIER_FACTOR)
    warn_outlier_samples(outliers, method, set_aside=robust, stacklevel=4)
    if robust and outliers:
        set_aside_outliers(test, observers)
    return seen, outliers.indices


def set_aside_outliers(test: OutlierTest, observers: dict) -> None:
    """Replaces each MinMax observer the outlier ``test`` covers by one of the range its samples give
    without the outlier samples (``robust_minmax``); other observers (a softmax input's) are kept."""
    tested = set(test.tensors)
    for name in list(observers):
        kept = test.robust_range(name) if name in tested else None
        if kept is not None and type(observers[name]) is MinMaxObserver:  # not a softmax input's
            observer = MinMaxObserver(symmetric=observers[name].symmetric)
            observer.update(np.array(kept))
            observers[name] = observer


class _ReplicaObservers:
    """Stands for one quantizer's observer under a strategy: each replica updates its own."""

    def __init__(self, name: str, make, lock):
        self.name, self.make, self.lock = name, make, lock
        self.by_replica: dict[int, object] = {}

    def update(self, x) -> None:
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        replica = int(context.replica_id_in_sync_group) if context is not None else 0
        with self.lock:
            observer = self.by_replica.get(replica)
            if observer is None:
                observer = self.by_replica[replica] = self.make()
        observer.update(x)


def _observe_with_strategy(model, data, batch_size, strategy, quantizers, observers, make_observer, method, bar):
    """Per-replica observation (see :func:`calibrate`); merges into ``observers``; returns the samples seen."""
    import threading

    import tensorflow as tf

    lock = threading.Lock()
    names = list(quantizers)
    # A moving average is per global batch: each step, the replicas' min/max are combined into the
    # global batch's and folded in. Every other observer runs per replica and is merged at the end.
    averaged = [name for name in names
                if method == "moving_average" and type(observers[name]) is MovingAverageMinMaxObserver]
    merged = [name for name in names if name not in averaged]
    make = {name: (lambda q=quantizers[name]: MinMaxObserver(symmetric=q.symmetric)) if name in averaged
            else (lambda name=name: make_observer(name)) for name in names}
    per_replica = {name: _ReplicaObservers(name, make[name], lock) for name in names}
    replicas = strategy.num_replicas_in_sync
    seen = 0
    with observing({id(quantizers[name]): per_replica[name] for name in names}):
        for batch in data.batches(batch_size * replicas):
            n = len(batch[0])

            def slice_of(context, batch=batch, n=n):
                r, k = context.replica_id_in_sync_group, context.num_replicas_in_sync
                return [tf.constant(b[r * n // k:(r + 1) * n // k]) for b in batch]

            values = strategy.experimental_distribute_values_from_function(slice_of)
            strategy.run(lambda *b: model(pack_model_inputs(model, b), training=False), args=tuple(values))
            if averaged:
                _fold_step_into_average(strategy, averaged, per_replica, observers)
            seen += n
            if bar is not None:
                bar.update(seen)
    if merged:
        states = _gather_replica_states(strategy, {r: {name: per_replica[name].by_replica[r].get_state()
                                                       for name in merged if r in per_replica[name].by_replica}
                                                   for r in sorted({r for p in per_replica.values() for r in p.by_replica})})
        for replica in sorted(states):
            for name, state in states[replica].items():
                observers[name].merge(Observer.from_state(state))
    return seen


def _local_replica_ids(strategy) -> list[int]:
    import tensorflow as tf

    ids = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(context.replica_id_in_sync_group, tf.int64))
    return [int(v) for v in strategy.experimental_local_results(ids)]


def _gather(strategy, value_for_replica) -> np.ndarray:
    """``value_for_replica(replica id)`` (a 1-D array, same length everywhere) of every replica, in id order."""
    import tensorflow as tf

    values = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(value_for_replica(context.replica_id_in_sync_group)))
    gathered = strategy.gather(values, axis=0)
    return np.asarray(gathered).reshape(strategy.num_replicas_in_sync, -1)


def _fold_step_into_average(strategy, names, per_replica, observers) -> None:
    """Feeds the global batch's (min, max) of every quantizer to its moving average, then resets."""
    def extremes(replica):
        out = np.empty(2 * len(names))
        for i, name in enumerate(names):
            observer = per_replica[name].by_replica.get(replica)
            has = observer is not None and observer.has_data
            out[2 * i], out[2 * i + 1] = (observer.min_val, observer.max_val) if has else (np.inf, -np.inf)
        return out

    table = _gather(strategy, extremes)
    lo, hi = table[:, 0::2].min(axis=0), table[:, 1::2].max(axis=0)
    for i, name in enumerate(names):
        if lo[i] <= hi[i]:
            observers[name].update(np.array([lo[i], hi[i]]))
        for observer in per_replica[name].by_replica.values():
            observer.reset()


def _gather_replica_states(strategy, local: dict[int, dict]) -> dict[int, dict]:
    """Every replica's observer states (JSON), gathered from all workers: ``{replica id: {name: state}}``."""
    payloads = {r: np.frombuffer(json.dumps(local.get(r, {})).encode(), dtype=np.uint8).astype(np.int32)
                for r in _local_replica_ids(strategy)}
    lengths = _gather(strategy, lambda r: np.array([len(payloads[r])], np.int64))[:, 0]
    width = int(lengths.max())
    table = _gather(strategy, lambda r: np.pad(payloads[r], (0, width - len(payloads[r]))))
    return {r: json.loads(bytes(table[r, :lengths[r]].astype(np.uint8)).decode()) for r in range(len(lengths))}
