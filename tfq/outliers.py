"""Calibration samples far outside the rest: found from per-sample statistics, named in a warning.

While :func:`tfq.calibrate` runs the data through the model, every quantized tensor is also
summarised per sample: the smallest and largest value each sample gives it
(:class:`SampleRanges`; a tensor computed several times per sample — an unrolled RNN's time
steps, a shared layer — folds them). With ``m[i, t] = max(|min_i(t)|, |max_i(t)|)`` the largest
magnitude sample ``i`` gives tensor ``t``, and ``q[t]`` the 90th percentile of ``m[:, t]`` over
the samples (the sample at rank ``floor(0.9·(n - 1))``), sample ``i`` lies *far outside the rest*
when, in some tensor with ``q[t] > 0``::

    m[i, t] > factor · q[t]          (factor = 8 by default)

Measured here on 300 digits, the largest ``m[i, t] / q[t]`` over all tensors is 1.3 (digits
CNN), 1.5 (MobileNet-style), 1.8 (transformer), 1.2 (LSTM) and 2.1 (MobileNetV2 α 0.35); with
three of the samples scaled ×100, those three reach 92 to 6800 and the others stay where they
were (:func:`find_outlier_samples`). The 90th percentile is a reference that up to a tenth of
corrupt samples do not move. With fewer than 8 samples nothing is tested. Memory: two floats
per sample and tensor.

``calibration="robust_minmax"`` (tfq's default) sets such samples aside: each range is the
MinMax range of the other samples; every other method keeps them, and tfq warns either way.
Calibration uses the factor 8; to test with another, call :func:`find_outlier_samples` on the
per-sample ranges yourself. Where the TFLite converter calibrates (a SavedModel, int16x8),
tfq can only see the model inputs: :func:`input_outlier_samples` tests them alone.

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

__all__ = ["DEFAULT_OUTLIER_FACTOR", "OutlierSamples", "SampleRanges", "find_outlier_samples", "input_outlier_samples",
           "warn_outlier_samples", "without_samples"]

#: ``factor`` of the test: a sample is far outside when its magnitude exceeds this many times the 90th percentile.
DEFAULT_OUTLIER_FACTOR = 8.0
#: The reference quantile of the per-sample magnitudes.
REFERENCE_QUANTILE = 0.9
#: Fewer samples than this: no sample is called an outlier.
MIN_SAMPLES = 8
_SHOWN = 10  # indices listed in the warning


class SampleRanges:
    """Per-sample minimum and maximum of named tensors over a stream of batches.

    Call :meth:`begin_batch` before each batch, then :meth:`record` for every tensor computed on
    it (any number of times per tensor: calls fold by element-wise min/max). A tensor whose first
    axis is not the batch (a constant, a reshape across samples), or that is missing from a batch,
    has no per-sample ranges.

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
        self._done: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self._current: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._invalid: set[str] = set()
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
            self._invalid.add(name)
            self._current.pop(name, None)
            self._done.pop(name, None)
            return None
        flat = x.reshape(self._batch, -1)
        lo, hi = flat.min(axis=1), flat.max(axis=1)
        previous = self._current.get(name)
        if previous is not None:
            lo, hi = np.minimum(previous[0], lo), np.maximum(previous[1], hi)
        self._current[name] = (lo, hi)
        return lo, hi

    def tap(self, name: str, observer):
        """An object with ``update(x)`` (what calibration feeds) that records ``x`` under ``name`` and
        passes it on to ``observer``.

        A :class:`tfq.observers.MinMaxObserver` (per tensor) gets the batch's minimum and maximum
        instead of every value: the same statistics, without a second pass over the tensor.
        """
        return _Tap(self, name, observer)

    def _close_batch(self) -> None:
        if self._batch is None:
            return
        for name in set(self._done) | set(self._current):
            if name in self._invalid:
                continue
            # Seen in some batches only: its per-sample ranges would not line up with the samples.
            if name not in self._current or len(self._done.get(name, [])) != self._batches:
                self._invalid.add(name)
                self._done.pop(name, None)
                continue
            self._done.setdefault(name, []).append(self._current[name])
        self._current = {}
        self._batches += 1
        self.num_samples += self._batch
        self._batch = None

    def ranges(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{tensor: (per-sample minima, per-sample maxima)}`` (one entry per sample in order, in the
        tensors' dtype: float32 activations keep 8 bytes per sample and tensor, not 16)."""
        self._close_batch()
        return {name: (np.concatenate([b[0] for b in parts]), np.concatenate([b[1] for b in parts]))
                for name, parts in self._done.items() if name not in self._invalid}


class _Tap:
    def __init__(self, recorder: SampleRanges, name: str, observer):
        from tfq.observers import MinMaxObserver

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
    if isinstance(factor, bool) or not isinstance(factor, (int, float, np.floating)) or not factor > 1:
        raise ValueError(f"factor must be a number > 1, e.g. {DEFAULT_OUTLIER_FACTOR:g}. Received: factor={factor!r}")
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
        ``data`` itself when ``indices`` is empty, else a :class:`tfq.representative.RepresentativeDataset`
        that yields the other samples in the same order.

    Example:
        >>> rep = without_samples(np.arange(5.0)[:, None], [1, 3])
        >>> [b[0].ravel().tolist() for b in rep.batches(8)]
        [[0.0, 2.0, 4.0]]
    """
    from tfq.representative import representative_dataset

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
        data: a :class:`tfq.representative.RepresentativeDataset`.
        factor: the test's factor.

    Example:
        >>> from tfq.representative import representative_dataset
        >>> x = np.ones((20, 3), np.float32); x[5] *= 1000
        >>> input_outlier_samples(representative_dataset(x)).indices
        (5,)
    """
    recorder = SampleRanges()
    for arrays in data.batches(256):
        recorder.begin_batch(len(arrays[0]))
        for i, a in enumerate(arrays):
            if np.asarray(a).dtype.kind == "f":
                recorder.record(f"input {i}", a)
    return find_outlier_samples(recorder.ranges(), factor)
