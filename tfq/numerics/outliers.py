"""Calibration samples far outside the rest: found from per-sample statistics, named in a warning.

While :func:`tfq.calibrate` runs the data through the model, every quantized tensor is also
summarised per sample: the smallest and largest value each sample gives it (a tensor computed
several times per sample — an unrolled RNN's time steps, a shared layer — folds them). With
``m[i, t] = max(|min_i(t)|, |max_i(t)|)`` the largest magnitude sample ``i`` gives tensor ``t``,
and ``q[t]`` the 90th percentile of ``m[:, t]`` over the samples (the sample at rank
``floor(0.9·(n - 1))``), sample ``i`` lies *far outside the rest* when, in some tensor with
``q[t] > 0`` (and finite)::
    m[i, t] > factor · q[t]          (factor = 8 by default)

Measured here on 300 digits, the largest ``m[i, t] / q[t]`` over all tensors is 1.3 (digits
CNN), 1.5 (MobileNet-style), 1.8 (transformer), 1.2 (LSTM) and 2.1 (MobileNetV2 α 0.35); with
three of the samples scaled ×100, those three reach 92 to 6800 and the others stay where they
were (:func:`find_outlier_samples`). The 90th percentile is a reference that up to a tenth of
corrupt samples do not move. With fewer than 8 samples nothing is tested.

Two implementations of the one test:

* :class:`SampleRanges` keeps every sample's ranges (two values per sample and tensor) and
  :func:`find_outlier_samples` tests them exactly: for per-sample ranges you hold yourself.
* :class:`OutlierTest`, what calibration uses, keeps a fixed-size state per tensor whatever the
  number of samples: a histogram of the magnitudes (128 bins per octave) and the
  :data:`DEFAULT_CAPACITY` samples with the largest maxima and smallest minima. It gives the same
  samples and ranges, except that beyond about 10,000 samples ``q`` is known to 0.8% (the upper
  edge of its bin, so it never flags a sample the exact test would not; a sample within 0.8% above
  the threshold may go unflagged). When more samples are far outside than it keeps, it runs the
  data a second time (and refuses data that changed in between).

``calibration="robust_minmax"`` (tfq's default) sets such samples aside: each range is the
MinMax range of the other samples; every other method keeps them, and tfq warns either way.
Calibration uses the factor 8; to test with another, call :meth:`OutlierTest.result` (or
:func:`find_outlier_samples`) yourself. Where the TFLite converter calibrates (a SavedModel,
int16x8), tfq can only see the model inputs: :func:`input_outlier_samples` tests them alone.

Example:
    >>> rec = SampleRanges()
    >>> for batch in np.split(np.ones((16, 4)), 2):
    ...     rec.begin_batch(len(batch))
    ...     _ = rec.record("t", batch)
    >>> x = np.ones((4, 4)); x[2] *= 100
    >>> rec.begin_batch(4); _ = rec.record("t", x)
    >>> find_outlier_samples(rec.ranges()).indices
    (18,)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from tfq.core.representative import representative_dataset
from tfq.numerics.observers import MinMaxObserver

__all__ = ["DEFAULT_CAPACITY", "DEFAULT_OUTLIER_FACTOR", "OutlierSamples", "OutlierTest", "SampleRanges",
           "find_outlier_samples", "input_outlier_samples", "warn_outlier_samples", "without_samples"]

#: ``factor`` of the test: a sample is far outside when its magnitude exceeds this many times the 90th percentile.
DEFAULT_OUTLIER_FACTOR = 8.0
#: The reference quantile of the per-sample magnitudes.
REFERENCE_QUANTILE = 0.9
#: Fewer samples than this: no sample is called an outlier.
MIN_SAMPLES = 8
#: Samples kept per tensor and side (largest maxima, smallest minima) by :class:`OutlierTest`.
DEFAULT_CAPACITY = 1024
_SHOWN = 10  # indices listed in the warning


class _PerSampleFolding:
    """Per-sample minimum and maximum of named tensors, batch by batch: what every recorder here shares.

    A tensor recorded several times in a batch folds by element-wise min/max; a tensor whose first
    axis is not the batch, or that is missing from a batch, is dropped (its per-sample ranges would
    not line up with the samples). Each closed batch goes to :meth:`_fold` (the recorder keeps what it
    needs of it), a dropped tensor to :meth:`_forget`.
    """

    def __init__(self):
        self._current: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._invalid: set[str] = set()
        self._folded: dict[str, int] = {}  # batches folded, by tensor
        self._batch: int | None = None
        self._batches = 0
        self.num_samples = 0
        self.batch_bytes = 0  # bytes recorded in the current (or last) batch

    def begin_batch(self, size: int) -> None:
        """Starts a batch of ``size`` samples (closing the previous one)."""
        self._close_batch()
        self._batch = int(size)
        self.batch_bytes = 0

    def record(self, name: str, x) -> tuple[np.ndarray, np.ndarray] | None:
        """Folds ``x`` (batch on axis 0) into the current batch's per-sample ranges of ``name``.

        Returns:
            The tensor's per-sample ``(min, max)`` in this batch so far, or None when ``x`` has no
            batch axis (then the tensor has no per-sample ranges at all).
        """
        if name in self._invalid or self._batch is None:
            return None
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] != self._batch or x.size == 0:
            self._drop(name)
            return None
        flat = x.reshape(self._batch, -1)
        lo, hi = flat.min(axis=1), flat.max(axis=1)
        previous = self._current.get(name)
        if previous is not None:
            lo, hi = np.minimum(previous[0], lo), np.maximum(previous[1], hi)
        self._current[name] = (lo, hi)
        return lo, hi

    def tap(self, name: str, observer=None):
        """An object with ``update(x)`` (what calibration feeds) that records ``x`` under ``name`` and
        passes it on to ``observer`` (None: records only).

        A :class:`tfq.observers.MinMaxObserver` (per tensor) gets the batch's minimum and maximum
        instead of every value: the same statistics, without a second pass over the tensor.
        """
        return _Tap(self, name, observer)

    def _drop(self, name: str) -> None:
        self._invalid.add(name)
        self._current.pop(name, None)
        self._folded.pop(name, None)
        self._forget(name)

    def _close_batch(self) -> None:
        if self._batch is None:
            return
        closed = {}
        for name in sorted(set(self._folded) | set(self._current)):
            if name in self._invalid:
                continue
            if name not in self._current or self._folded.get(name, 0) != self._batches:
                self._drop(name)  # seen in some batches only
                continue
            self._folded[name] = self._batches + 1
            closed[name] = self._current[name]
        self._fold(self.num_samples, self._batch, closed)
        self._current = {}
        self._batches += 1
        self.num_samples += self._batch
        self._batch = None

    def _fold(self, start: int, size: int, batch: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        raise NotImplementedError

    def _forget(self, name: str) -> None:
        raise NotImplementedError


class SampleRanges(_PerSampleFolding):
    """Per-sample minimum and maximum of named tensors over a stream of batches, all kept.

    Call :meth:`begin_batch` before each batch, then :meth:`record` for every tensor computed on
    it (any number of times per tensor: calls fold by element-wise min/max). A tensor whose first
    axis is not the batch (a constant, a reshape across samples), or that is missing from a batch,
    has no per-sample ranges. Memory grows with the samples (two values per sample and tensor):
    calibration uses the fixed-size :class:`OutlierTest` instead.

    Example:
        >>> rec = SampleRanges()
        >>> rec.begin_batch(2)
        >>> _ = rec.record("a", np.array([[0.0, 3.0], [-1.0, 1.0]]))
        >>> _ = rec.record("a", np.array([[5.0, 0.0], [0.0, 0.0]]))   # same tensor again (an RNN step)
        >>> lo, hi = rec.ranges()["a"]
        >>> lo.tolist(), hi.tolist()
        ([0.0, -1.0], [5.0, 1.0])
    """

    def __init__(self):
        super().__init__()
        self._done: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}

    def _fold(self, start, size, batch):
        for name, ranges in batch.items():
            self._done.setdefault(name, []).append(ranges)

    def _forget(self, name):
        self._done.pop(name, None)

    def ranges(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{tensor: (per-sample minima, per-sample maxima)}`` (one entry per sample in order, in the
        tensors' dtype: float32 activations keep 8 bytes per sample and tensor, not 16)."""
        self._close_batch()
        return {name: (np.concatenate([b[0] for b in parts]), np.concatenate([b[1] for b in parts]))
                for name, parts in self._done.items()}


class _Tap:
    def __init__(self, recorder: _PerSampleFolding, name: str, observer):
        self.recorder, self.name, self.observer = recorder, name, observer
        self.summarize = type(observer) is MinMaxObserver and not observer.per_channel

    def update(self, x) -> None:
        x = np.asarray(x)
        self.recorder.batch_bytes += x.nbytes
        if x.dtype.kind == "f":  # anything else: the observer refuses it in its own words
            per_sample = self.recorder.record(self.name, x)
            if self.summarize and per_sample is not None:
                lo, hi = per_sample[0].min(), per_sample[1].max()
                if np.isfinite(lo) and np.isfinite(hi):  # NaN/Inf: the observer names them
                    self.observer.update(np.array([lo, hi], dtype=x.dtype))
                    return
        if self.observer is not None:
            self.observer.update(x)


@dataclass(frozen=True)
class OutlierSamples:
    """The samples far outside the rest, and the evidence for each.

    Attributes:
        indices: sample positions (0-based, in the order the data yields them), sorted.
        evidence: ``{index: (tensor name, m / q)}``, the tensor where the sample is furthest out.
        num_samples: samples tested.
        factor: the test's factor.
    """

    indices: tuple[int, ...] = ()
    evidence: dict = field(default_factory=dict)
    num_samples: int = 0
    factor: float = DEFAULT_OUTLIER_FACTOR

    def __bool__(self) -> bool:
        return bool(self.indices)

    def message(self, method: str, set_aside: bool) -> str:
        """The one-line warning: how many samples, which indices, the strongest evidence, what was done."""
        shown = ", ".join(str(i) for i in self.indices[:_SHOWN])
        more = f" and {len(self.indices) - _SHOWN} more" if len(self.indices) > _SHOWN else ""
        worst = max(self.indices, key=lambda i: self.evidence[i][1])
        tensor, ratio = self.evidence[worst]
        head = (f"tfq: {len(self.indices)} of {self.num_samples} calibration samples lie far outside the rest "
                f"(indices {shown}{more}; sample {worst} reaches {ratio:.0f}× the 90th percentile of the samples' "
                f"largest |value| in tensor {tensor!r}, the test's threshold is {self.factor:g}×)")
        if set_aside:
            return (f"{head}: set aside, the ranges come from the other {self.num_samples - len(self.indices)} "
                    f"samples. Check those samples; calibration='minmax' keeps them.")
        return (f"{head}: calibration={method!r} keeps them, and they can stretch the ranges of every tensor they "
                f"reach. Check those samples, or use calibration='robust_minmax' (the default), which sets them aside.")


def find_outlier_samples(ranges: dict, factor: float = DEFAULT_OUTLIER_FACTOR) -> OutlierSamples:
    """The samples whose magnitude in some tensor exceeds ``factor`` times that tensor's 90th percentile.

    Args:
        ranges: ``{tensor: (per-sample minima, per-sample maxima)}`` (:meth:`SampleRanges.ranges`),
            all of the same length.
        factor: the threshold, > 1.

    Returns:
        An :class:`OutlierSamples` (empty, and false, when no sample is far outside).

    Raises:
        ValueError: ``factor`` is not a number > 1, or the tensors have different numbers of samples.

    Example:
        >>> m = np.ones(20); m[[3, 7]] = 50.0
        >>> find_outlier_samples({"x": (-m, m)}).indices
        (3, 7)
    """
    _check_factor(factor)
    sizes = {len(lo) for lo, _ in ranges.values()}
    if len(sizes) > 1:
        raise ValueError(f"per-sample ranges must have one entry per sample for every tensor. Received lengths "
                         f"{sorted(sizes)}")
    n = sizes.pop() if sizes else 0
    evidence: dict[int, tuple[str, float]] = {}
    if n < MIN_SAMPLES:
        return OutlierSamples((), {}, n, float(factor))
    rank = int(np.floor(REFERENCE_QUANTILE * (n - 1)))
    for name in sorted(ranges):
        lo, hi = ranges[name]
        magnitude = np.maximum(np.abs(lo), np.abs(hi))
        reference = float(np.partition(magnitude, rank)[rank])
        if not reference > 0 or not np.isfinite(reference):
            continue
        ratio = magnitude / reference
        for i in np.flatnonzero(ratio > factor):
            if int(i) not in evidence or ratio[i] > evidence[int(i)][1]:
                evidence[int(i)] = (name, float(ratio[i]))
    return OutlierSamples(tuple(sorted(evidence)), evidence, n, float(factor))


# ------------------------------------------------------------------------------------ streaming test
_MANTISSA_BITS = 7  # histogram bins: 2**7 per octave, from the top mantissa bits of the float64 magnitude
_SHIFT = 52 - _MANTISSA_BITS


def _check_factor(factor) -> float:
    if isinstance(factor, bool) or not isinstance(factor, (int, float, np.floating)) or not factor > 1:
        raise ValueError(f"factor must be a number > 1, e.g. {DEFAULT_OUTLIER_FACTOR:g}. Received: factor={factor!r}")
    return float(factor)


def _bin_upper_edge(b: int) -> float:
    """The smallest float64 of bin ``b + 1``: every magnitude in bin ``b`` is below it."""
    return float(np.array([(b + 1) << _SHIFT], np.int64).view(np.float64)[0])


class _Extremes:
    """The ``capacity`` samples with the largest ``key`` (with index, min and max), and whether any was dropped.

    Every dropped sample's key is <= :attr:`floor` (the smallest key kept once the list is full).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.index = np.zeros(0, np.int64)
        self.lo = self.hi = self.key = np.zeros(0, np.float32)  # float32 activations stay float32
        self.truncated = False

    @property
    def floor(self):
        return self.key.min() if len(self.key) >= self.capacity else None

    def add(self, index, lo, hi, key) -> None:
        floor = self.floor
        if floor is not None:
            better = key > floor
            if not better.all():
                self.truncated = True
                index, lo, hi, key = index[better], lo[better], hi[better], key[better]
            if not len(index):
                return
        index, lo = np.concatenate([self.index, index]), np.concatenate([self.lo, lo])
        hi, key = np.concatenate([self.hi, hi]), np.concatenate([self.key, key])
        if len(key) > self.capacity:
            self.truncated = True
            keep = np.argpartition(key, len(key) - self.capacity)[len(key) - self.capacity:]
            index, lo, hi, key = index[keep], lo[keep], hi[keep], key[keep]
        self.index, self.lo, self.hi, self.key = index, lo, hi, key

    def descending(self):
        order = np.argsort(-self.key, kind="stable")
        return self.index[order], self.lo[order], self.hi[order]


class _TensorSummary:
    """What :class:`OutlierTest` keeps of one tensor: a histogram of the per-sample magnitudes, the
    samples with the largest maxima and the smallest minima, counts of zero / infinite / NaN magnitudes."""

    def __init__(self, capacity: int):
        self.top, self.bottom = _Extremes(capacity), _Extremes(capacity)
        self.first_bin, self.counts = 0, np.zeros(0, np.int64)
        self.zeros = self.infinite = self.nan = 0
        self.dtype = None

    def fold(self, start: int, lo: np.ndarray, hi: np.ndarray) -> None:
        self.dtype = lo.dtype if self.dtype is None else np.result_type(self.dtype, lo.dtype)
        magnitude = np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64)
        nan, infinite = np.isnan(magnitude), np.isinf(magnitude)
        self.nan += int(nan.sum())
        self.infinite += int(infinite.sum())
        self.zeros += int((magnitude == 0).sum())
        positive = (magnitude > 0) & ~infinite
        if positive.any():
            self._count(magnitude[positive].view(np.int64) >> _SHIFT)
        index = np.arange(start, start + len(lo), dtype=np.int64)
        if nan.any():  # a NaN magnitude is never far outside; it only makes the ranges NaN (see robust_range)
            index, lo, hi = index[~nan], lo[~nan], hi[~nan]
        self.top.add(index, lo, hi, hi)
        self.bottom.add(index, lo, hi, -lo)

    def _count(self, bins: np.ndarray) -> None:
        low, high = int(bins.min()), int(bins.max())
        if not len(self.counts):
            self.first_bin, self.counts = low, np.zeros(high + 1 - low, np.int64)
        elif low < self.first_bin or high >= self.first_bin + len(self.counts):
            first = min(low, self.first_bin)
            grown = np.zeros(max(high + 1, self.first_bin + len(self.counts)) - first, np.int64)
            grown[self.first_bin - first:self.first_bin - first + len(self.counts)] = self.counts
            self.first_bin, self.counts = first, grown
        self.counts += np.bincount(bins - self.first_bin, minlength=len(self.counts))

    def candidates(self):
        """``(indices, magnitudes, bound)``: every sample whose magnitude exceeds ``bound`` (None: every
        sample that is not NaN), with its magnitude, in the tensor's dtype."""
        index = np.concatenate([self.top.index, self.bottom.index])
        index, first = np.unique(index, return_index=True)
        lo = np.concatenate([self.top.lo, self.bottom.lo]).astype(self.dtype)[first]
        hi = np.concatenate([self.top.hi, self.bottom.hi]).astype(self.dtype)[first]
        magnitude = np.maximum(np.abs(lo), np.abs(hi))
        if not (self.top.truncated and self.bottom.truncated):
            return index, magnitude, None
        # A sample in neither list has max <= top.floor and -min <= bottom.floor.
        bound = np.asarray(max(self.top.floor, self.bottom.floor)).astype(self.dtype)
        above = magnitude > bound
        return index[above], magnitude[above], bound

    def reference(self, from_top: int):
        """The ``from_top``-th largest magnitude (1-based; NaN above +inf above the finite ones, as numpy
        sorts): ``(value, exact)``, or None when it is 0, infinite or NaN (the tensor is not tested).
        Exact when the kept samples hold it, else the upper edge of its histogram bin."""
        if from_top <= self.nan + self.infinite:
            return None
        from_top -= self.nan + self.infinite
        _, magnitude, _ = self.candidates()
        finite = np.sort(magnitude[np.isfinite(magnitude)])
        if from_top <= len(finite):
            value = float(finite[len(finite) - from_top])
            return (value, True) if value > 0 else None
        above = np.cumsum(self.counts[::-1])
        if not len(above) or from_top > above[-1]:
            return None  # among the zeros
        b = self.first_bin + len(self.counts) - 1 - int(np.searchsorted(above, from_top))
        return _bin_upper_edge(b), False


class OutlierTest(_PerSampleFolding):
    """The outlier-sample test of :func:`find_outlier_samples` over a stream of batches, in memory
    that does not grow with the samples.

    Fed like :class:`SampleRanges` (:meth:`begin_batch`, then :meth:`record` or a :meth:`tap` per
    tensor). Of each tensor it keeps, instead of two values per sample:

    * a histogram of the per-sample magnitudes ``m = max(|min|, |max|)`` with 128 bins per octave
      (the top 7 mantissa bits of the float64 ``m``; bins span the magnitudes seen), and counts of
      zero, infinite and NaN magnitudes;
    * the ``capacity`` samples with the largest maxima and the ``capacity`` with the smallest
      minima, with their indices.

    The 90th percentile ``q`` is exact when those samples hold it: every sample whose magnitude
    exceeds that of all samples outside the lists is in them, at least ``capacity - 1`` samples
    unless many tie, so up to about ``10 · capacity`` samples (10,000). Beyond, ``q`` is the upper
    edge of its histogram bin, ``q ≤ q̂ < q · (1 + 2⁻⁷)`` (at most 0.8% above). The test
    flags ``m / q̂ > factor``: never a sample the exact test would not flag, and every sample with
    ``m > factor · q · 1.008``; the evidence ratio is then ``m / q̂``. A flagged sample is in one
    of the lists unless more than ``capacity`` samples reach the threshold in that tensor; the
    range of a tensor without the flagged samples is the largest maximum and smallest minimum of
    the lists' samples that are not flagged, unless every one of them is. In those two cases
    (detected, never guessed) the test runs the data again through ``rerun`` and checks that it
    gives the same values at the samples it kept (else ValueError); without ``rerun`` it raises.

    Memory per tensor, whatever the number of samples: ``2 · capacity`` kept samples (index, min,
    max and sort key: 40 KB for float32 activations at the default capacity) and 8 bytes per
    histogram bin between the smallest and largest nonzero magnitude seen (128 per octave: 10 KB
    for magnitudes spanning 10 octaves; at most 2¹⁸ bins). The result lists the flagged samples.
    Per batch it costs one pass over the batch's per-sample ranges and a partial sort of the
    samples above the kept lists' smallest entry.

    Args:
        capacity: samples kept per tensor and side (None: :data:`DEFAULT_CAPACITY`).
        rerun: ``rerun(recorder)`` feeds the same batches, in the same order, to ``recorder`` (which
            has ``begin_batch``, ``record``, ``tap`` and ``batch_bytes``), for the rare second pass.

    Example:
        >>> test = OutlierTest()
        >>> x = np.ones((20, 4)); x[18] *= 100
        >>> for batch in np.split(x, 4):
        ...     test.begin_batch(len(batch))
        ...     _ = test.record("t", batch)
        >>> test.result().indices, test.robust_range("t")
        ((18,), (1.0, 1.0))
    """

    def __init__(self, capacity: int | None = None, rerun=None):
        capacity = DEFAULT_CAPACITY if capacity is None else capacity
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, e.g. {DEFAULT_CAPACITY}. Received: capacity={capacity!r}")
        super().__init__()
        self.capacity, self.rerun = int(capacity), rerun
        self._tensors: dict[str, _TensorSummary] = {}
        self._last = None  # (factor, references, flagged indices, OutlierSamples, robust ranges or None)

    def _fold(self, start, size, batch):
        for name, (lo, hi) in batch.items():
            if name not in self._tensors:
                self._tensors[name] = _TensorSummary(self.capacity)
            self._tensors[name].fold(start, lo, hi)

    def _forget(self, name):
        self._tensors.pop(name, None)

    @property
    def tensors(self) -> list[str]:
        """The tensors with per-sample ranges (sorted)."""
        self._close_batch()
        return sorted(self._tensors)

    def result(self, factor: float = DEFAULT_OUTLIER_FACTOR) -> OutlierSamples:
        """The samples far outside the rest (see :func:`find_outlier_samples` and the class notes).

        Raises:
            ValueError: ``factor`` is not a number > 1; more than ``capacity`` samples reach the
                threshold in a tensor and there is no ``rerun``; the second pass saw other data.
        """
        factor = _check_factor(factor)
        self._close_batch()
        n = self.num_samples
        if n < MIN_SAMPLES:
            found = OutlierSamples((), {}, n, factor)
            self._last = (factor, {}, np.zeros(0, np.int64), found, None)
            return found
        from_top = n - int(np.floor(REFERENCE_QUANTILE * (n - 1)))
        references, evidence, overflow = {}, {}, []
        for name in sorted(self._tensors):
            summary = self._tensors[name]
            reference = summary.reference(from_top)
            if reference is None:
                continue
            q = references[name] = reference[0]
            index, magnitude, bound = summary.candidates()
            ratio = magnitude / q
            for k in np.flatnonzero(ratio > factor):
                i = int(index[k])
                if i not in evidence or ratio[k] > evidence[i][1]:
                    evidence[i] = (name, float(ratio[k]))
            if bound is not None and bound / q > factor:
                overflow.append(name)
        if overflow:
            found, ranges = self._second_pass(factor, references, overflow)
        else:
            found, ranges = OutlierSamples(tuple(sorted(evidence)), evidence, n, factor), None
        self._last = (factor, references, np.array(found.indices, np.int64), found, ranges)
        return found

    def robust_range(self, name: str):
        """``(min, max)`` of tensor ``name`` over the samples the last :meth:`result` did not flag
        (None when it flagged them all; NaN when a sample not flagged has a NaN).

        Raises:
            KeyError: ``name`` has no per-sample ranges. ValueError: no :meth:`result` yet, or the
                range needs a second pass and there is no ``rerun``.
        """
        if self._last is None:
            raise ValueError("call result(factor) before robust_range(name): the range leaves out the samples it flags.")
        self._close_batch()
        if name not in self._tensors:
            raise KeyError(f"no per-sample ranges for tensor {name!r}; tensors: {sorted(self._tensors)[:10]}")
        factor, references, flagged, found, ranges = self._last
        if ranges is not None:
            return ranges.get(name)
        summary = self._tensors[name]
        if summary.nan:
            return (np.nan, np.nan)
        ends = []
        for extremes, pick in ((summary.bottom, 1), (summary.top, 2)):
            values = extremes.descending()
            clear = np.flatnonzero(~np.isin(values[0], flagged))
            if not len(clear):
                if not extremes.truncated:
                    return None  # every sample flagged
                _, ranges = self._second_pass(factor, references, [name])
                self._last = (factor, references, flagged, found, ranges)
                return ranges.get(name)
            ends.append(values[pick][clear[0]])
        return float(ends[0]), float(ends[1])

    def _second_pass(self, factor, references, needs):
        if self.rerun is None:
            raise ValueError(
                f"tensor(s) {needs[:5]}: more samples reach the outlier threshold than the {self.capacity} kept per "
                f"tensor, so the test cannot name them all from its state. Pass rerun= (a function feeding the same "
                f"batches again) or a larger capacity.")
        recheck = _Recheck(self, factor, references)
        self.rerun(recheck)
        return recheck.finish()


class _Recheck(_PerSampleFolding):
    """The second pass of :class:`OutlierTest`: the test by value (references known), ranges without
    the flagged samples, and a check that the data gives the values the first pass kept."""

    def __init__(self, test: OutlierTest, factor: float, references: dict):
        super().__init__()
        self.test, self.factor, self.references = test, factor, references
        self.evidence: dict[int, tuple[str, float]] = {}
        self.ranges: dict[str, tuple] = {}
        self.kept = {}
        for name, summary in test._tensors.items():
            index = np.concatenate([summary.top.index, summary.bottom.index])
            order = np.argsort(index, kind="stable")
            self.kept[name] = (index[order], np.concatenate([summary.top.lo, summary.bottom.lo])[order],
                               np.concatenate([summary.top.hi, summary.bottom.hi])[order])

    def _mismatch(self, what: str):
        return ValueError(
            f"tfq: the calibration data gave other values on the second pass of the outlier test ({what}): it must "
            f"yield the same samples in the same order on every pass (no random augmentation; tf.data shuffle with "
            f"reshuffle_each_iteration=False), or use calibration='minmax'.")

    def _fold(self, start, size, batch):
        flagged = np.zeros(size, bool)
        for name in sorted(batch):
            lo, hi = batch[name]
            if name not in self.kept:
                raise self._mismatch(f"tensor {name!r} has per-sample ranges now and had none before")
            index, kept_lo, kept_hi = self.kept[name]
            a, b = np.searchsorted(index, [start, start + size])
            at = index[a:b] - start
            for now, before in ((lo[at], kept_lo[a:b]), (hi[at], kept_hi[a:b])):
                scale = float(np.max(np.abs(before), initial=0.0, where=np.isfinite(before)))
                if not np.allclose(now, before, rtol=1e-5, atol=1e-6 * scale, equal_nan=True):
                    first = int(np.flatnonzero(~np.isclose(now, before, 1e-5, 1e-6 * scale, True))[0])
                    raise self._mismatch(f"sample {int(index[a + first])}, tensor {name!r}: {now[first]!r}, "
                                         f"before {before[first]!r}")
            q = self.references.get(name)
            if q is None:
                continue
            ratio = np.maximum(np.abs(lo), np.abs(hi)) / q
            hit = ratio > self.factor
            for k in np.flatnonzero(hit):
                i = start + int(k)
                if i not in self.evidence or ratio[k] > self.evidence[i][1]:
                    self.evidence[i] = (name, float(ratio[k]))
            flagged |= hit
        if flagged.all():
            return
        for name, (lo, hi) in batch.items():
            low, high = lo[~flagged].min(), hi[~flagged].max()
            if name in self.ranges:
                low, high = np.minimum(self.ranges[name][0], low), np.maximum(self.ranges[name][1], high)
            self.ranges[name] = (low, high)

    def _forget(self, name):
        if name in self.test._tensors:
            raise self._mismatch(f"tensor {name!r} lost its per-sample ranges")

    def finish(self):
        self._close_batch()
        if self.num_samples != self.test.num_samples or sorted(self._folded) != sorted(self.test._tensors):
            raise self._mismatch(f"{self.num_samples} samples and {len(self._folded)} tensors, before "
                                 f"{self.test.num_samples} and {len(self.test._tensors)}")
        found = OutlierSamples(tuple(sorted(self.evidence)), self.evidence, self.num_samples, self.factor)
        ranges = {name: tuple(float(v) for v in self.ranges[name]) if name in self.ranges else None
                  for name in self.test._tensors}
        return found, ranges


def warn_outlier_samples(found: OutlierSamples, method: str, set_aside: bool, stacklevel: int = 3) -> None:
    """One warning naming the samples (nothing when there are none)."""
    if found:
        warnings.warn(found.message(method, set_aside), stacklevel=stacklevel)


def without_samples(data, indices, num_samples: int | None = None, model=None):
    """``data`` without the samples at ``indices`` (positions as :func:`tfq.representative_dataset` yields them).

    Args:
        data: calibration data in any form :func:`tfq.representative_dataset` takes.
        indices: sample positions to leave out.
        num_samples: the cap applied before counting positions (as in calibration).
        model: the model the data is for (input order and checks).

    Returns:
        ``data`` itself when ``indices`` is empty, else a :class:`tfq.core.representative.RepresentativeDataset`
        that yields the other samples in the same order.

    Example:
        >>> rep = without_samples(np.arange(5.0)[:, None], [1, 3])
        >>> [b[0].ravel().tolist() for b in rep.batches(8)]
        [[0.0, 2.0, 4.0]]
    """

    drop = {int(i) for i in indices}
    if not drop:
        return data
    source = representative_dataset(data, num_samples, model=model)

    def kept():
        start = 0
        for arrays in source.batches(256):
            n = len(arrays[0])
            keep = [j for j in range(n) if start + j not in drop]
            start += n
            if keep:
                yield [a[keep] for a in arrays]

    return representative_dataset(kept, model=model)


def input_outlier_samples(data, factor: float = DEFAULT_OUTLIER_FACTOR) -> OutlierSamples:
    """The outlier test on the model inputs alone (float inputs), for models tfq cannot run itself
    (a SavedModel, converted by the TFLite converter).

    Args:
        data: a :class:`tfq.core.representative.RepresentativeDataset`.
        factor: the test's factor.

    Example:
        >>> from tfq.core.representative import representative_dataset
        >>> x = np.ones((20, 3), np.float32); x[5] *= 1000
        >>> input_outlier_samples(representative_dataset(x)).indices
        (5,)
    """
    def feed(recorder):
        for arrays in data.batches(256):
            recorder.begin_batch(len(arrays[0]))
            for i, a in enumerate(arrays):
                if np.asarray(a).dtype.kind == "f":
                    recorder.record(f"input {i}", a)

    test = OutlierTest(rerun=feed)
    feed(test)
    return test.result(factor)
