"""Observers: streaming statistics of a tensor, turned into the float range it is quantized with.

An observer sees any number of batches (:meth:`Observer.update`) and, separately, turns what it
saw into a range ``(min, max)`` (:meth:`Observer.compute_range`). Turning that range into a
scale / zero-point is :func:`tfq.ops.range_to_qparams`'s job. Memory does not grow with the number
of batches: every observer keeps a fixed-size summary, never raw data.

Range conventions, shared by every observer:

* The range always contains 0.0 (``min ≤ 0 ≤ max``), because TFLite represents 0.0 exactly: the
  observed range is extended to 0.0. Data in ``[0.5, 2]`` gives ``(0.0, 2.0)``.
* The range is not widened: constant data ``c > 0`` gives ``(0.0, c)`` and all-zero data gives
  ``(0.0, 0.0)``. :func:`tfq.ops.prepare_range` later widens a range narrower than
  :data:`tfq.ops.MIN_RANGE`.
* ``symmetric=True`` gives ``(-m, m)`` with ``m = max(|min|, |max|)``.
* Per-tensor ranges are Python floats; per-channel ranges are float32 arrays of shape
  ``(channels,)``, one entry per index of ``axis`` (statistics are reduced over all other axes).

Observers of the same type and configuration merge (:meth:`Observer.merge`): the statistics of
data split into shards (per replica, per worker, per file) and observed apart combine into those
of all the data observed by one observer — exactly for :class:`MinMaxObserver` and
:class:`HistogramObserver` (float64 rounding for :class:`MovingAverageMinMaxObserver`).

Observers serialize two ways: :meth:`Observer.get_config` (constructor arguments) and
:meth:`Observer.get_state` (configuration plus statistics, JSON-able), restored by
:meth:`Observer.from_state`, which dispatches on the state's ``"type"``.
"""

from __future__ import annotations

import abc
import inspect
import math
import warnings
from typing import Any

import numpy as np

from tfq.core.calibration_methods import (
    calibration_method_names,
    get_calibration_method,
)
from tfq.numerics import ops

__all__ = [
    "Observer",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "HistogramObserver",
    "SoftmaxInputObserver",
    "create_observer",
    "OBSERVER_METHODS",
]

Range = tuple[Any, Any]


class Observer(abc.ABC):
    """Base class: collects statistics with :meth:`update`, returns a range with :meth:`compute_range`.

    Subclasses implement ``_update`` (a finite, non-empty numeric array), ``_raw_range`` (the range
    before the shared conventions of the module docstring are applied), ``_reset`` and
    ``_get_stats`` / ``_set_stats``.

    Args:
        symmetric: return ``(-m, m)`` with ``m = max(|min|, |max|)``.
        per_channel: one range per index of ``axis``.
        axis: the channel axis for ``per_channel``; statistics are reduced over all other axes.

    Raises:
        ValueError: if an argument has the wrong type.
    """

    def __init__(self, symmetric: bool = False, per_channel: bool = False, axis: int = -1):
        _check_bool("symmetric", symmetric)
        _check_bool("per_channel", per_channel)
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise ValueError(f"axis must be an int. Received: axis={axis!r}")
        self.symmetric = bool(symmetric)
        self.per_channel = bool(per_channel)
        self.axis = int(axis)
        self.reset()

    # ----------------------------------------------------------------------------- statistics
    def update(self, x) -> None:
        """Adds a batch to the statistics.

        Args:
            x: numpy array, TensorFlow tensor or anything ``np.asarray`` accepts. An empty array
                (size 0) is ignored.

        Raises:
            TypeError: if ``x`` is not numeric.
            ValueError: if ``x`` holds NaN or Inf (the statistics are left unchanged), or, for
                per-channel observers, if ``axis`` does not fit ``x`` or the number of channels
                changed.
        """
        x = np.asarray(x)
        if x.dtype.kind not in "biuf":
            raise TypeError(f"{type(self).__name__}.update expects a numeric array. Received: dtype={x.dtype}")
        if x.size == 0:
            return
        bad = x.size - int(np.count_nonzero(np.isfinite(x)))
        if bad:
            raise ValueError(
                f"{type(self).__name__}.update received {bad} non-finite value(s) (NaN or Inf) out of "
                f"{x.size}; the statistics were not updated. Fix or filter the input first."
            )
        if self.per_channel:
            x = self._channels_first(x)
        self._update(x)

    def compute_range(self) -> Range:
        """The range ``(min, max)`` for the data seen so far (conventions: module docstring).

        Returns:
            ``(min, max)`` as Python floats, or float32 arrays for a per-channel observer.

        Raises:
            ValueError: if :meth:`update` has not received any data yet.
        """
        if not self.has_data:
            raise ValueError(
                f"{type(self).__name__} has no statistics: call update(x) with some data before "
                "compute_range()."
            )
        lo, hi = self._raw_range()
        lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
        hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
        if self.symmetric:
            m = np.maximum(-lo, hi)
            lo, hi = -m, m
        if self.per_channel:
            return lo.astype(np.float32), hi.astype(np.float32)
        return float(lo), float(hi)

    def reset(self) -> None:
        """Forgets all statistics; the configuration is kept."""
        self._reset()

    def merge(self, other: "Observer") -> None:
        """Adds the statistics of ``other`` to this observer's, as if it had seen ``other``'s batches too.

        ``other`` must be an observer of the same type and configuration; it is not changed. The
        result equals one observer fed this observer's batches and then ``other``'s (see each
        class for the rule), so calibration can run per shard and be combined:

        Example:
            >>> a, b, whole = MinMaxObserver(), MinMaxObserver(), MinMaxObserver()
            >>> a.update([-1.0, 2.0]); b.update([0.5, 3.0])
            >>> whole.update([-1.0, 2.0]); whole.update([0.5, 3.0])
            >>> a.merge(b)
            >>> a.compute_range() == whole.compute_range() == (-1.0, 3.0)
            True

        Raises:
            TypeError: ``other`` is not an observer of this type.
            ValueError: the configurations differ, or a state cannot be merged (see the class).
        """
        if type(other) is not type(self):
            raise TypeError(f"{type(self).__name__}.merge needs a {type(self).__name__}. Received: {type(other).__name__}")
        if other.get_config() != self.get_config():
            raise ValueError(
                f"Cannot merge observers with different configurations: {self.get_config()} and {other.get_config()}. "
                f"Create every shard's observer with the same method and parameters."
            )
        if not other.has_data:
            return
        if not self.has_data:
            self._reset()
            self._set_stats(other._get_stats())
            return
        self._merge(other)

    @property
    @abc.abstractmethod
    def has_data(self) -> bool:
        """Whether :meth:`update` has received at least one non-empty batch."""

    @abc.abstractmethod
    def _update(self, x: np.ndarray) -> None:
        """``x``: finite, non-empty; per-channel observers get shape ``(channels, n)``."""

    @abc.abstractmethod
    def _raw_range(self) -> Range:
        """The range before the conventions of :meth:`compute_range`; only called with data."""

    @abc.abstractmethod
    def _reset(self) -> None: ...

    @abc.abstractmethod
    def _get_stats(self) -> dict: ...

    @abc.abstractmethod
    def _set_stats(self, stats: dict) -> None: ...

    @abc.abstractmethod
    def _merge(self, other: "Observer") -> None:
        """Folds ``other``'s statistics in; both have data and the same configuration."""

    def _channels_first(self, x: np.ndarray) -> np.ndarray:
        """``x`` reshaped to ``(channels, n)``, reducing over every axis but ``self.axis``."""
        if x.ndim == 0 or not -x.ndim <= self.axis < x.ndim:
            raise ValueError(
                f"{type(self).__name__}: axis={self.axis} does not fit an input of shape {x.shape}; "
                "per-channel observers need an input with that axis."
            )
        return np.moveaxis(x, self.axis, 0).reshape(x.shape[self.axis], -1)

    # -------------------------------------------------------------------------- serialization
    def get_config(self) -> dict:
        """Constructor arguments, so that ``type(obs).from_config(obs.get_config())`` rebuilds it."""
        return {"symmetric": self.symmetric, "per_channel": self.per_channel, "axis": self.axis}

    @classmethod
    def from_config(cls, config: dict) -> "Observer":
        """Builds an observer from :meth:`get_config`'s output.

        Raises:
            ValueError: if ``config`` has a key the constructor does not take.
        """
        allowed = _init_params(cls)
        unknown = sorted(set(config) - set(allowed))
        if unknown:
            raise ValueError(f"Unknown config key(s) {unknown} for {cls.__name__}. Allowed: {list(allowed)}")
        return cls(**config)

    def get_state(self) -> dict:
        """Configuration and statistics, made of JSON-able dicts, lists, floats, ints, strings, None.

        Example:
            >>> obs = MinMaxObserver()
            >>> obs.update([-1.0, 2.0])
            >>> obs.get_state()["stats"]
            {'min': -1.0, 'max': 2.0}
        """
        return {"type": type(self).__name__, "config": self.get_config(), "stats": self._get_stats()}

    def set_state(self, state: dict) -> None:
        """Restores the statistics of :meth:`get_state`; the configurations must be equal.

        Raises:
            ValueError: if the state is for another observer type or configuration, or malformed.
        """
        if not isinstance(state, dict) or not {"type", "config", "stats"} <= set(state):
            raise ValueError(
                f"A state is a dict with keys 'type', 'config', 'stats' (from get_state()). Received: {state!r:.200}"
            )
        if state["type"] != type(self).__name__:
            raise ValueError(
                f"State is for a {state['type']!r}, not a {type(self).__name__!r}; use Observer.from_state(state)."
            )
        # Through from_config: a state saved before an option existed gets that option's default.
        try:
            config = type(self).from_config(dict(state["config"])).get_config()
        except (TypeError, ValueError):
            config = state["config"]
        if config != self.get_config():
            raise ValueError(
                f"State config {state['config']} differs from this observer's config {self.get_config()}; "
                "use Observer.from_state(state) to build a matching observer."
            )
        self._reset()
        try:
            self._set_stats(state["stats"])
        except (KeyError, TypeError, ValueError) as e:
            self._reset()
            raise ValueError(f"Malformed {type(self).__name__} stats: {e}") from e

    @classmethod
    def from_state(cls, state: dict) -> "Observer":
        """Builds an observer from :meth:`get_state`, choosing the class from ``state["type"]``.

        Example:
            >>> obs = MinMaxObserver()
            >>> obs.update([0.0, 3.0])
            >>> Observer.from_state(obs.get_state()).compute_range()
            (0.0, 3.0)

        Raises:
            ValueError: if the type is unknown, or is not ``cls`` (or a subclass) when called on a
                subclass.
        """
        name = state.get("type") if isinstance(state, dict) else None
        if name not in _REGISTRY:
            raise ValueError(f"Unknown observer type {name!r}. Known: {sorted(_REGISTRY)}")
        target = _REGISTRY[name]
        if not issubclass(target, cls):
            raise ValueError(f"State is for a {name!r}, which is not a {cls.__name__!r}.")
        obs = target.from_config(state["config"])
        obs.set_state(state)
        return obs

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def _check_bool(name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool. Received: {name}={value!r}")


def _init_params(cls) -> tuple[str, ...]:
    return tuple(p for p in inspect.signature(cls.__init__).parameters if p != "self")


def _to_json(v):
    """float64 scalar/array → float / list of floats; None stays None."""
    if v is None:
        return None
    v = np.asarray(v, dtype=np.float64)
    return float(v) if v.ndim == 0 else v.tolist()


def _from_json(v, per_channel: bool):
    if v is None:
        return None
    out = np.asarray(v, dtype=np.float64)
    if out.ndim != (1 if per_channel else 0):
        raise ValueError(f"expected a {'list' if per_channel else 'number'}, got {v!r:.100}")
    return out


class _RangeObserver(Observer):
    """Shared storage for observers that keep a running ``min``/``max`` (float64)."""

    def _reset(self) -> None:
        self.min_val: np.ndarray | None = None
        self.max_val: np.ndarray | None = None

    @property
    def has_data(self) -> bool:
        return self.min_val is not None

    def _batch_min_max(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        axis = 1 if self.per_channel else None  # per-channel inputs arrive as (channels, n)
        return np.min(x, axis=axis).astype(np.float64), np.max(x, axis=axis).astype(np.float64)

    def _update(self, x: np.ndarray) -> None:
        lo, hi = self._batch_min_max(x)
        self._check_channels(lo)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self._combine(lo, hi)

    def _combine(self, lo: np.ndarray, hi: np.ndarray) -> None:
        """Folds one batch's ``(min, max)`` into the running statistics."""
        raise NotImplementedError

    def _check_channels(self, batch_min: np.ndarray) -> None:
        if self.min_val is not None and self.min_val.shape != batch_min.shape:
            raise ValueError(
                f"{type(self).__name__}: the number of channels changed from {self.min_val.size} to "
                f"{batch_min.size} (axis={self.axis}); call reset() to observe a different tensor."
            )

    def _raw_range(self) -> Range:
        return self.min_val, self.max_val

    def _get_stats(self) -> dict:
        return {"min": _to_json(self.min_val), "max": _to_json(self.max_val)}

    def _set_stats(self, stats: dict) -> None:
        lo, hi = _from_json(stats["min"], self.per_channel), _from_json(stats["max"], self.per_channel)
        if (lo is None) != (hi is None) or (lo is not None and lo.shape != hi.shape):
            raise ValueError(f"min and max must both be set, with the same shape. Received: {stats!r:.200}")
        self.min_val, self.max_val = lo, hi


class MinMaxObserver(_RangeObserver):
    """Running minimum and maximum over all batches.

    Starting from ``min_0 = +inf``, ``max_0 = -inf``, batch ``t`` updates::
        min_t = min(min_{t-1}, min(x_t))
        max_t = max(max_{t-1}, max(x_t))

    so the result does not depend on how the data is split into batches. Per-channel, ``min`` and
    ``max`` are taken over every axis but ``axis``. See the module docstring for the range
    conventions (contains 0.0; all-zero data gives ``(0.0, 0.0)``).

    Args:
        symmetric: return ``(-m, m)`` with ``m = max(|min|, |max|)``.
        per_channel: one range per index of ``axis``.
        axis: channel axis for ``per_channel``.

    Example:
        >>> obs = MinMaxObserver()
        >>> obs.update([0.5, 2.0])
        >>> obs.update([-1.0, 1.0])
        >>> obs.compute_range()
        (-1.0, 2.0)
    """

    def _combine(self, lo: np.ndarray, hi: np.ndarray) -> None:
        self.min_val, self.max_val = np.minimum(self.min_val, lo), np.maximum(self.max_val, hi)

    def _merge(self, other: "MinMaxObserver") -> None:
        """``min = min(min_a, min_b)``, ``max = max(max_a, max_b)``: exact, in any order."""
        self._check_channels(other.min_val)
        self._combine(other.min_val, other.max_val)


class SoftmaxInputObserver(MinMaxObserver):
    """Range of the logits a ``bits``-bit softmax (over the last axis) depends on.

    Per row (sample) with ``t1 >= t2`` its two largest logits and ``M = (bits + 1)·ln 2 +
    ln(classes - 1)`` (8.44 for int8 and 10 classes: logits that far below the largest have
    probabilities summing to under half a step of the output's ``2**-bits`` grid), as
    :func:`tfq.ops.softmax_input_range_numpy` computes it::
        hi_r = min(t1, t2 + M)        lo_r = max(min(x_r), hi_r - M)
        min = min_r lo_r              max = max_r hi_r

    Clipping to ``[min, max]`` keeps every row's argmax and moves no probability by more than
    one step of the output grid: a confident row, whose largest logit is far above the rest, no
    longer stretches the range, so the logits that decide between classes get a finer grid
    (MobileNetV2 on the digits: [-4.2, 17.1] against MinMax's [-19.6, 27.3]). A
    :class:`MinMaxObserver` of these per-row bounds: a running min and max, so the result does not
    depend on the batches and shards :meth:`merge` exactly. The same statistic drives the moving
    average of a QAT quantizer with ``calibration="softmax_input"`` (:func:`tfq.ops.softmax_input_range`).

    Args:
        bits: bits of the softmax output (8: int8, 16: int16x8).
        symmetric: return ``(-m, m)`` with ``m = max(|min|, |max|)``.

    Raises:
        ValueError: ``bits`` not in 2..16; ``per_channel`` (a per-tensor statistic).
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, per_channel: bool = False, axis: int = -1):
        ops.qrange(bits)  # validates bits (an int in 2..16)
        if per_channel:
            raise ValueError("SoftmaxInputObserver is per tensor (a range over whole rows): pass per_channel=False.")
        self.bits = int(bits)
        super().__init__(symmetric=symmetric, per_channel=False, axis=axis)

    def _batch_min_max(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = ops.softmax_input_range_numpy(x, self.bits)
        return np.float64(lo), np.float64(hi)

    def get_config(self) -> dict:
        return {**super().get_config(), "bits": self.bits}


class MovingAverageMinMaxObserver(_RangeObserver):
    """Exponential moving average of each batch's minimum and maximum.

    The first batch initializes ``min_1 = min(x_1)``, ``max_1 = max(x_1)``; batch ``t > 1`` updates::
        min_t = decay * min_{t-1} + (1 - decay) * min(x_t)
        max_t = decay * max_{t-1} + (1 - decay) * max(x_t)

    (float64). A rare extreme batch moves the range by only ``(1 - decay)`` of its excess, unlike
    :class:`MinMaxObserver`. Empty batches do not count.

    Args:
        decay: weight of the past, in ``(0, 1)``.
        symmetric: return ``(-m, m)`` with ``m = max(|min|, |max|)``.
        per_channel: one range per index of ``axis``.
        axis: channel axis for ``per_channel``.

    Raises:
        ValueError: if ``decay`` is not a number in ``(0, 1)``.

    Example:
        >>> obs = MovingAverageMinMaxObserver(decay=0.5)
        >>> obs.update([0.0, 2.0])
        >>> obs.update([0.0, 4.0])
        >>> obs.compute_range()
        (0.0, 3.0)
    """

    def __init__(self, decay: float = 0.9, symmetric: bool = False, per_channel: bool = False, axis: int = -1):
        if isinstance(decay, bool) or not isinstance(decay, (int, float, np.integer, np.floating)) \
                or not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be a number in (0, 1), e.g. 0.9. Received: decay={decay!r}")
        self.decay = float(decay)
        super().__init__(symmetric=symmetric, per_channel=per_channel, axis=axis)

    def _combine(self, lo: np.ndarray, hi: np.ndarray) -> None:
        d = self.decay
        self.min_val = d * self.min_val + (1.0 - d) * lo
        self.max_val = d * self.max_val + (1.0 - d) * hi

    # The batch count and the first batch's min/max make the average of a shard mergeable.
    def _reset(self) -> None:
        super()._reset()
        self.num_batches = 0
        self.first_min: np.ndarray | None = None
        self.first_max: np.ndarray | None = None

    def _update(self, x: np.ndarray) -> None:
        super()._update(x)
        if self.num_batches == 0:
            self.first_min, self.first_max = self.min_val, self.max_val
        self.num_batches += 1

    def _merge(self, other: "MovingAverageMinMaxObserver") -> None:
        """Continues the average over ``other``'s batches, as one observer seeing ours and then theirs.

        ``other`` (``n_b`` batches, first batch ``min_b1``) started from its first batch instead
        of from our average ``min_a``; every later step is the same affine map, so::
            min = min_b + decay^n_b · (min_a − min_b1)        (same for max)

        which equals the sequential result up to float64 rounding. Merge shards in data order.
        """
        if other.num_batches == 0 or other.first_min is None:
            raise ValueError(
                f"{type(self).__name__} state has no batch count (saved by an older tfq); re-run the "
                f"calibration of that shard to merge it."
            )
        self._check_channels(other.min_val)
        weight = self.decay ** other.num_batches
        self.min_val = other.min_val + weight * (self.min_val - other.first_min)
        self.max_val = other.max_val + weight * (self.max_val - other.first_max)
        self.num_batches += other.num_batches

    def _get_stats(self) -> dict:
        return {**super()._get_stats(), "num_batches": self.num_batches,
                "first_min": _to_json(self.first_min), "first_max": _to_json(self.first_max)}

    def _set_stats(self, stats: dict) -> None:
        super()._set_stats(stats)
        # States saved before merging existed have no batch count: they load, but do not merge.
        self.num_batches = int(stats.get("num_batches", 0))
        self.first_min = _from_json(stats.get("first_min"), self.per_channel)
        self.first_max = _from_json(stats.get("first_max"), self.per_channel)
        if self.num_batches < 0 or (self.first_min is None) != (self.first_max is None):
            raise ValueError(f"num_batches must be >= 0 and first_min/first_max both set or both None. "
                             f"Received: {stats!r:.200}")

    def get_config(self) -> dict:
        return {"decay": self.decay, **super().get_config()}


class HistogramObserver(Observer):
    """Streaming histogram of a tensor; the range is chosen by percentile, KL divergence or MSE.

    **Histogram.** ``num_bins`` bins of width ``w`` whose edges are the multiples of ``w``
    (bin ``g`` covers ``[g·w, (g+1)·w)``), over a window of ``num_bins`` consecutive bins that starts
    at the bin of ``min(x, 0)``. ``w`` is the smallest power of two for which the bins from
    ``min(x, 0)`` to ``max(x, 0)`` fit the window. When data falls outside the window, ``w`` doubles
    as often as needed, each new bin being the sum of ``f`` old ones (``g → floor(g / f)``, exact),
    and the window moves to its new start. The window therefore depends only on the data range,
    not on the order or split of the batches: histograms of shards :meth:`merge` bin for bin into
    the histogram of all the data. No raw data is kept and memory is fixed; resolution stays
    between ``span / num_bins`` and ``2·span / num_bins``. The exact data minimum and maximum are kept too, and the outermost
    bins are trimmed to them. Exact zeros (half of a ReLU output) are also counted apart:
    ``"percentile"`` includes them, ``"kl"`` and ``"mse"`` leave them out, since every grid
    represents 0.0 exactly and a zero spike spread over its bin would bias KL towards tiny
    thresholds.

    **Methods** (``method``):

    * ``"percentile"``: ``[P(100 - p), P(p)]`` of ``x``, or ``P(p)`` of ``|x|`` when symmetric.
      Within a bin the density is taken as exponential, with the log-slope of the two
      neighbouring bins, ``β = ln(c[k+1] / c[k-1]) / (2w)`` (uniform when a neighbour is empty),
      which is far more accurate in steep tails than linear interpolation.
    * ``"kl"``: TensorRT's entropy calibration on the histogram of ``|x|``. For every candidate
      ``i ≥ L`` bins: ``P`` is the first ``i`` bins with the mass beyond folded into bin ``i-1``;
      ``Q`` merges the first ``i`` (unfolded) bins into ``L`` levels (bin ``k`` in level
      ``floor(k·L / i)``, as pytorch-quantization does, rather than TensorRT's remainder-in-the-
      last-level) and spreads each level's mass evenly over its non-empty bins;
      the threshold ``i·w`` minimizes ``KL(P ‖ Q) = Σ P/ΣP · ln((P/ΣP) / (Q/ΣQ))``, smoothed as
      MXNet and ONNX Runtime do (a ``P > 0`` bin with ``Q = 0`` gets ``Q = 10⁻⁴`` counts, so
      clipping far outliers into an empty bin has a finite cost; see :func:`_kl_threshold_bins`).
      Evaluated for all candidates at once with cumulative sums.
      Point masses (a bin far above its neighbours, e.g. one channel's constant output over an
      image's empty background after BN and ReLU6) are split off first and kept exact, like the
      zeros: the grid maps each to a single value, so they lose no information inside the range
      and count as clipped mass outside it. Without this, ``Q`` spreads a spike's mass over its
      level's bins and KL favours tiny thresholds (a MobileNet-style depthwise output clipped at
      a fifth of its range, INT8 accuracy 74 % instead of 96 %).
      ``L = 2^(bits-1)`` for symmetric or mixed-sign data (the positive half of a signed grid);
      ``L = 2^bits`` for one-sided data (asymmetric, all ``x ≥ 0`` or all ``x ≤ 0``), whose other
      end is 0. Mixed-sign asymmetric data: the ``|x|`` threshold ``t`` is searched with
      ``L = 2^(bits-1)`` and the range is ``[max(min(x), -t), min(max(x), t)]``. Candidates start
      at ``L`` bins, so the threshold is never below ``L·w``; with extreme outliers
      (``max|x|`` hundreds of times the bulk) raise ``num_bins``. With fewer than ``L + 1``
      occupied bins nothing is clipped.
    * ``"mse"``: the range minimizing the expected squared error of quantize-dequantize,
      ``Σ_bins count · E[(x - fq(x))²]``, where ``fq`` is the grid
      ``ops.nudge_range(*ops.prepare_range(lo, hi, symmetric), bits)`` gives (``narrow_range=False``)
      and ``x`` is uniform within a bin, so the rounding noise inside the range and the clipping
      error ``(x - hi)²`` / ``(x - lo)²`` outside are integrated exactly. Inside, with
      ``y = (x - nmin) / Δ`` and ``s = y - round(y)``, ``∫ (x - fq(x))² dx = Δ³·G(y)`` with
      ``G(y) = floor(y + 1/2) / 12 + s³ / 3``. Candidates: ``t = M·2^(-j/8)`` down to about one
      bin, then 33 linear steps between the best one's neighbours. Symmetric: ``(-t, t)`` with
      ``M = max|x|``; one-sided data: the non-zero end only; mixed-sign asymmetric data: two
      rounds of coordinate descent, ``max`` then ``min``, from the data range. Squared error
      weighs outliers heavily: ``n`` outliers at ``X`` among ``N`` samples pull the int8 threshold
      to about ``n·X / (n + N / 195075)``.

    **Batch aggregation** (``batch_aggregate="median"``): the method also runs on each batch
    alone, and the range is the element-wise median of the per-batch ranges instead of the range
    of the pooled histogram. A few corrupted calibration samples then move only the ranges of the
    batches they fall in: MSE, whose pooled optimum keeps 0.5 % of values at ×100 (see above),
    recovers the clean range as long as fewer than half the batches hold an outlier. Costs one
    range search per batch; the per-batch ranges are part of the state.

    Per-channel histograms are not supported (use :class:`MinMaxObserver` or
    :class:`MovingAverageMinMaxObserver`). Range conventions: module docstring.

    Args:
        method: ``"percentile"``, ``"kl"`` or ``"mse"``.
        num_bins: number of histogram bins, ≥ 16.
        percentile: ``p`` in ``(50, 100]`` for ``"percentile"``.
        bits: bit width of the target grid (2..16) for ``"kl"`` and ``"mse"``.
        batch_aggregate: None (one pooled histogram) or ``"median"`` (median of per-batch ranges).
        symmetric: return ``(-m, m)``.
        per_channel: must be False.
        axis: unused (per-tensor); kept for a uniform configuration.

    Raises:
        ValueError: for an unknown ``method``, ``per_channel=True`` or an out-of-range argument.

    Example:
        >>> obs = HistogramObserver("percentile", percentile=99.0)
        >>> obs.update(np.linspace(0.0, 1.0, 10001))
        >>> round(obs.compute_range()[1], 3)
        0.99
    """

    METHODS = ("percentile", "kl", "mse")
    BATCH_AGGREGATES = (None, "median")

    def __init__(
        self,
        method: str = "percentile",
        num_bins: int = 2048,
        percentile: float = 99.99,
        bits: int = 8,
        symmetric: bool = False,
        per_channel: bool = False,
        axis: int = -1,
        batch_aggregate: str | None = None,
    ):
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {self.METHODS}. Received: method={method!r}")
        if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 16:
            raise ValueError(f"num_bins must be an int >= 16, e.g. 2048. Received: num_bins={num_bins!r}")
        if (
            isinstance(percentile, bool)
            or not isinstance(percentile, (int, float, np.integer, np.floating))
            or not 50.0 < percentile <= 100.0
        ):
            raise ValueError(
                f"percentile must be a number in (50, 100], e.g. 99.99. Received: percentile={percentile!r}"
            )
        ops.qrange(bits)  # validates bits, naming the received value
        if per_channel:
            raise ValueError(
                "HistogramObserver is per-tensor only; per-channel ranges are supported by "
                "MinMaxObserver and MovingAverageMinMaxObserver ('minmax', 'moving_average'). "
                "Received: per_channel=True"
            )
        if batch_aggregate not in self.BATCH_AGGREGATES:
            raise ValueError(
                f"batch_aggregate must be one of {self.BATCH_AGGREGATES}. Received: batch_aggregate={batch_aggregate!r}"
            )
        self.batch_aggregate = batch_aggregate
        self.method = method
        self.num_bins = int(num_bins)
        self.percentile = float(percentile)
        self.bits = int(bits)
        super().__init__(symmetric=symmetric, per_channel=per_channel, axis=axis)

    def get_config(self) -> dict:
        return {
            "method": self.method,
            "num_bins": self.num_bins,
            "percentile": self.percentile,
            "bits": self.bits,
            "batch_aggregate": self.batch_aggregate,
            **super().get_config(),
        }

    # ------------------------------------------------------------------------------- histogram
    def _reset(self) -> None:
        self._counts = np.zeros(self.num_bins, dtype=np.int64)
        self._start = 0  # global index of the first bin of the window
        self._width: float | None = None  # None while only zeros have been seen
        self._min: float | None = None
        self._max: float | None = None
        self._total = 0
        self._zeros = 0  # exact zeros, also counted in the bin of 0.0
        self._batch_ranges: list[tuple[float, float]] = []  # with batch_aggregate

    @property
    def has_data(self) -> bool:
        return self._total > 0

    def _update(self, x: np.ndarray) -> None:
        x = x.astype(np.float64, copy=False).ravel()
        if self.batch_aggregate is not None:
            single = HistogramObserver.from_config({**self.get_config(), "batch_aggregate": None})
            single._update(x)
            if single._width is not None:  # a batch of exact zeros has no range to vote for
                self._batch_ranges.append(single._raw_range())
        xmin, xmax = float(x.min()), float(x.max())
        seen_before = self._total
        self._min = xmin if self._min is None else min(self._min, xmin)
        self._max = xmax if self._max is None else max(self._max, xmax)
        self._total += x.size
        self._zeros += x.size - int(np.count_nonzero(x))
        if self._width is None:
            if max(xmax, 0.0) - min(xmin, 0.0) == 0.0:
                return  # all zeros so far: counted in _total, binned once a width exists
            lo = min(xmin, 0.0)
            self._width = self._smallest_width(lo, max(xmax, 0.0))
            self._start = int(math.floor(lo / self._width))
            self._counts[-self._start] = seen_before  # the zeros seen so far, in the bin of 0.0
        self._fit()
        g = np.floor(x / self._width).astype(np.int64) - self._start
        self._counts += np.bincount(g, minlength=self.num_bins)

    def _fits(self, lo: float, hi: float, width: float) -> bool:
        """Whether bins of ``width`` from the one holding ``lo`` to the one holding ``hi`` fit the window."""
        return math.floor(hi / width) - math.floor(lo / width) < self.num_bins

    def _smallest_width(self, lo: float, hi: float, at_least: float = 0.0) -> float:
        """The smallest power of two ``w ≥ at_least`` whose window holds ``[lo, hi]`` (``lo ≤ 0 ≤ hi``).

        Fitting is monotone in ``w`` (if ``w`` fits, ``2w`` does), and the smallest ``w`` that fits
        is at least ``(hi - lo) / num_bins ≥ 2^(e-1)`` with ``e`` from ``frexp``: double from there.
        """
        w = max(at_least, math.ldexp(1.0, max(math.frexp((hi - lo) / self.num_bins)[1] - 1, -1074)))
        while not self._fits(lo, hi, w):
            w *= 2.0
        return w

    def _fit(self) -> None:
        """Coarsens and moves the window to the canonical one for the data range seen so far.

        The canonical window has the smallest power-of-two width holding ``[min(x, 0), max(x, 0)]``
        and starts at the bin of ``min(x, 0)``. It depends on the data range only, not on how the
        data was split into batches or shards, which makes :meth:`merge` exact.
        """
        lo = min(self._min, 0.0)
        width = self._smallest_width(lo, max(self._max, 0.0), self._width)
        start = int(math.floor(lo / width))
        if width != self._width or start != self._start:
            self._counts = self._rebinned(int(width / self._width), start)
            self._width, self._start = width, start

    def _rebinned(self, factor: int, new_start: int) -> np.ndarray:
        """The counts on bins ``factor`` times wider, in the window starting at global bin ``new_start``."""
        occupied = np.flatnonzero(self._counts)
        g = self._start + occupied  # |g| < 2·num_bins, so a factor beyond int64 maps g to 0 or -1
        g_new = (g // factor if factor < 2**62 else np.where(g < 0, -1, 0)) - new_start
        counts = np.zeros(self.num_bins, dtype=np.int64)
        np.add.at(counts, g_new, self._counts[occupied])
        return counts

    def _merge(self, other: "HistogramObserver") -> None:
        """Sums the two histograms on the canonical window of the union of the data ranges.

        Both windows have power-of-two widths, so the coarser one is a whole multiple of the finer
        one and re-binning ``g → floor(g / f)`` is exact: the result equals one observer fed both
        shards' data, bin for bin, in any order. ``batch_aggregate`` ranges are concatenated.
        """
        sources = [(obs, obs._total) for obs in (self, other)]
        self._min, self._max = min(self._min, other._min), max(self._max, other._max)
        self._total += other._total
        self._zeros += other._zeros
        self._batch_ranges = self._batch_ranges + other._batch_ranges
        widths = [obs._width for obs, _ in sources if obs._width is not None]
        if not widths:
            return  # zeros only, on both sides
        lo = min(self._min, 0.0)
        width = self._smallest_width(lo, max(self._max, 0.0), max(widths))
        start = int(math.floor(lo / width))
        counts = np.zeros(self.num_bins, dtype=np.int64)
        for obs, total in sources:
            if obs._width is None:
                counts[-start] += total  # only zeros: the bin of 0.0
            else:
                counts += obs._rebinned(int(width / obs._width), start)
        self._counts, self._start, self._width = counts, start, width

    def _nonzero_counts(self) -> np.ndarray:
        """The window's counts without the exact zeros (which any grid represents exactly)."""
        counts = self._counts.copy()
        counts[-self._start] -= self._zeros
        return counts

    def _bins(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Occupied bins without exact zeros as ``(counts, lower, upper)``, trimmed to the data range."""
        counts = self._nonzero_counts()
        idx = np.flatnonzero(counts)
        lower = (self._start + idx) * self._width
        upper = lower + self._width
        return (
            counts[idx].astype(np.float64),
            np.clip(lower, self._min, self._max),
            np.clip(upper, self._min, self._max),
        )

    def _abs_counts(self, counts: np.ndarray) -> np.ndarray:
        """Histogram of ``|x|``: bin ``k`` covers ``[k·w, (k+1)·w)`` (negative bin g folds to -g-1)."""
        g = self._start + np.arange(self.num_bins)
        k = np.where(g >= 0, g, -g - 1)
        return np.bincount(k, weights=counts, minlength=int(k.max()) + 1)

    # ---------------------------------------------------------------------------------- ranges
    def _raw_range(self) -> Range:
        if self.batch_aggregate == "median":
            if not self._batch_ranges:  # only zeros
                return 0.0, 0.0
            lows, highs = zip(*self._batch_ranges)
            return float(np.median(lows)), float(np.median(highs))
        if self._width is None:  # only zeros
            return 0.0, 0.0
        if self.method == "percentile":
            return self._percentile_range()
        if self.method == "kl":
            return self._kl_range()
        return self._mse_range()

    def _percentile_range(self) -> Range:
        q = self.percentile / 100.0
        if self.symmetric:
            counts = self._abs_counts(self._counts)
            lower = np.arange(counts.size) * self._width
            amin = 0.0 if self._min <= 0.0 <= self._max else min(abs(self._min), abs(self._max))
            amax = max(-self._min, self._max)
            t = _hist_quantile(
                counts, np.clip(lower, amin, amax), np.clip(lower + self._width, amin, amax), self._width, q
            )
            return -t, t
        # The dense window (not _bins(), which skips empty bins): the neighbour slope needs it.
        dense = self._counts.astype(np.float64)
        lower = (self._start + np.arange(self.num_bins)) * self._width
        dlower = np.clip(lower, self._min, self._max)
        dupper = np.clip(lower + self._width, self._min, self._max)
        return (
            _hist_quantile(dense, dlower, dupper, self._width, 1.0 - q),
            _hist_quantile(dense, dlower, dupper, self._width, q),
        )

    def _kl_range(self) -> Range:
        smooth, point_mass = _split_point_masses(self._abs_counts(self._nonzero_counts()))
        amax = max(-self._min, self._max)
        one_sided = self._min >= 0.0 or self._max <= 0.0
        levels = 2 ** (self.bits - 1) if self.symmetric or not one_sided else 2**self.bits
        t = min(_kl_threshold_bins(smooth, levels, point_mass) * self._width, amax)
        if self.symmetric:
            return -t, t
        return max(self._min, -t), min(self._max, t)

    def _mse_range(self) -> Range:
        counts, lower, upper = self._bins()
        if counts.size == 0:  # only exact zeros
            return 0.0, 0.0

        def error(lo, hi):
            return _expected_sq_error(counts, lower, upper, lo, hi, self.bits, self.symmetric)

        if self.symmetric:
            t = _search_threshold(lambda t: error(-t, t), max(-self._min, self._max), self.num_bins)
            return -t, t
        lo, hi = min(self._min, 0.0), max(self._max, 0.0)
        if lo == 0.0:
            return 0.0, _search_threshold(lambda t: error(np.zeros_like(t), t), hi, self.num_bins)
        if hi == 0.0:
            return -_search_threshold(lambda t: error(-t, np.zeros_like(t)), -lo, self.num_bins), 0.0
        for _ in range(2):  # coordinate descent, max then min
            hi = _search_threshold(lambda t: error(np.full_like(t, lo), t), self._max, self.num_bins)
            lo = -_search_threshold(lambda t: error(-t, np.full_like(t, hi)), -self._min, self.num_bins)
        return lo, hi

    # --------------------------------------------------------------------------- serialization
    def _get_stats(self) -> dict:
        return {
            "bin_width": self._width,
            "start": self._start,
            "counts": self._counts.tolist(),
            "min": self._min,
            "max": self._max,
            "total": self._total,
            "zeros": self._zeros,
            # One entry per batch, by design of batch_aggregate: the only state that grows.
            **({"batch_ranges": [list(r) for r in self._batch_ranges]} if self.batch_aggregate else {}),
        }

    def _set_stats(self, stats: dict) -> None:
        counts = np.asarray(stats["counts"], dtype=np.int64)
        if counts.shape != (self.num_bins,) or (counts < 0).any():
            raise ValueError(f"counts must be {self.num_bins} non-negative ints")
        total = int(stats["total"])
        width = None if stats["bin_width"] is None else float(stats["bin_width"])
        if width is not None and not (width > 0 and math.isfinite(width)):
            raise ValueError(f"bin_width must be positive and finite, got {width!r}")
        if not -self.num_bins < int(stats["start"]) <= 0:
            raise ValueError(f"start must be in ({-self.num_bins}, 0] (the window holds 0.0), got {stats['start']!r}")
        if total < 0 or (width is not None and int(counts.sum()) != total) or (width is None and counts.any()):
            raise ValueError("total does not match counts")
        lo, hi = stats["min"], stats["max"]
        if (lo is None) != (total == 0) or (hi is None) != (total == 0):
            raise ValueError("min and max must be set exactly when total > 0")
        self._counts = counts
        self._start = int(stats["start"])
        self._width = width
        self._min = None if lo is None else float(lo)
        self._max = None if hi is None else float(hi)
        self._total = total
        self._zeros = int(stats["zeros"])
        ranges = stats.get("batch_ranges", []) if self.batch_aggregate is not None else []
        if self.batch_aggregate is not None and width is not None and not ranges:
            raise ValueError("batch_ranges is empty but non-zero data was seen (batch_aggregate needs them)")
        self._batch_ranges = [(float(lo), float(hi)) for lo, hi in ranges]
        if any(not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi) for lo, hi in self._batch_ranges):
            raise ValueError("batch_ranges must be finite [lo, hi] pairs with lo <= hi")
        if not 0 <= self._zeros <= total or (width is not None and self._zeros > counts[-self._start]):
            raise ValueError("zeros does not match counts")


# ------------------------------------------------------------------------------ histogram maths
def _hist_quantile(counts: np.ndarray, lower: np.ndarray, upper: np.ndarray, width: float, q: float) -> float:
    """The ``q``-quantile (0..1) of a histogram of equal-width bins (lower/upper possibly trimmed).

    The bin holding the quantile is found from the cumulative counts; inside it the density is
    ``∝ exp(β·(x - lower))`` with ``β = ln(c[k+1] / c[k-1]) / (2·width)`` (uniform if a neighbour
    is empty), so the fraction ``r`` of the bin's mass lies below ``lower + ln(1 + r·(e^(β·len) - 1)) / β``.
    """
    cdf = np.cumsum(counts)
    target = q * cdf[-1]
    k = int(np.searchsorted(cdf, target, side="left"))
    k = min(max(k, int(np.flatnonzero(counts)[0])), counts.size - 1)
    r = min(max((target - (cdf[k] - counts[k])) / counts[k], 0.0), 1.0)
    length = float(upper[k] - lower[k])
    left = counts[k - 1] if k > 0 else 0.0
    right = counts[k + 1] if k + 1 < counts.size else 0.0
    if left > 0 and right > 0 and left != right and length > 0:
        beta = math.log(right / left) / (2.0 * width)
        return float(lower[k] + math.log1p(r * math.expm1(beta * length)) / beta)
    return float(lower[k] + r * length)


def _split_point_masses(counts: np.ndarray, ratio: float = 8.0, window: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Splits a histogram into a smooth part and point masses (single bins standing far above their neighbours).

    Bin ``k``'s baseline ``b_k`` is the median of the ``window`` bins on each side of it. The bin
    holds a point mass ``c_k - b_k`` when ``c_k > ratio·b_k`` and
    ``c_k - b_k ≥ max(4·c̄, 5·√c_k)``, where ``c̄`` is the mean count of the occupied bins that are
    not candidates (0 when all are: data on a few values is all point masses); the second bound
    keeps sampling noise in a sparse tail from passing for a point mass.
    Returns ``(smooth, point_mass)`` with ``smooth + point_mass == counts``.
    """
    c = np.asarray(counts, dtype=np.float64)
    if not c.any():
        return c, np.zeros_like(c)
    padded = np.concatenate([np.full(window, np.nan), c, np.full(window, np.nan)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * window + 1)
    neighbours = np.delete(windows, window, axis=1)  # the bin itself is not its own baseline
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN only for a 1-bin histogram
        baseline = np.nan_to_num(np.nanmedian(neighbours, axis=1))
    excess = c - baseline
    candidate = (c > ratio * baseline) & (c > 0)
    rest = (c > 0) & ~candidate
    mean_rest = c[rest].mean() if rest.any() else 0.0
    spike = candidate & (excess >= np.maximum(4.0 * mean_rest, 5.0 * np.sqrt(c)))
    point_mass = np.where(spike, excess, 0.0)
    return c - point_mass, point_mass


#: Smoothing of the KL divergence (MXNet, ONNX Runtime): a bin where ``P > 0`` and ``Q = 0`` gets
#: ``Q = KL_EPSILON`` counts instead of an infinite divergence.
KL_EPSILON = 1e-4


def _kl_threshold_bins(counts: np.ndarray, levels: int, point_mass: np.ndarray | None = None) -> int:
    """Smoothed TensorRT entropy calibration: the number of bins ``i`` minimizing ``KL(P_i ‖ Q_i)``.

    ``P`` is the first ``i`` bins with the outliers ``o = Σ_{k≥i} (c_k + s_k)`` folded into bin
    ``i-1`` (``s`` the point masses). ``Q`` merges the first ``i`` (unfolded) bins into ``L``
    levels and spreads each level's sum ``A_j`` evenly over its ``n_j`` occupied bins of ``P``
    (the outliers' bin counts as occupied, as in MXNet and ONNX Runtime). With ``T = Σ c + Σ s``,
    ``C_i = Σ_{k<i} c_k``, ``S_i = Σ_{k<i} s_k``::
        T·KL = Σ_{k<i} P_k ln P_k - Σ_j A_j ln(A_j / n_j) - o·ln(Q_{i-1}) + T·ln((C_i + S_i) / T)

    where ``P_k = c_k`` except ``P_{i-1} = c_{i-1} + o``, and ``Q_{i-1} = A_{L-1} / n_{L-1}``, or
    :data:`KL_EPSILON` when that level is empty: the smoothing of MXNet's and ONNX Runtime's
    entropy calibration, which gives clipping into an empty bin a finite cost. Without it every
    candidate ending in an empty bin below far outliers is infinite, and the range keeps the
    outliers (10 values at 60 among 10⁶ N(0, 1) values, fed in batches: ``max = 60.1`` instead of
    the smallest candidate, 8.0). Smoothing also moves ``ε·zeros/nonzeros`` counts out of every
    occupied bin and gives each empty bin ``ε``; that changes ``KL`` by ``O(ε/T)`` and is left out.
    A point mass inside the range is its own atom in both ``P`` and ``Q`` (the grid maps it to
    one value: no information is lost, so it adds nothing but normalization); beyond the range it
    is clipped like any outlier. All candidates ``i = L .. last occupied bin + 1`` are evaluated at
    once from cumulative sums.
    """
    c = np.asarray(counts, dtype=np.float64)
    s = np.zeros_like(c) if point_mass is None else np.asarray(point_mass, dtype=np.float64)
    nz = np.flatnonzero(c + s)
    n = int(nz[-1]) + 1 if nz.size else 0
    if n <= levels:
        return n
    c, s = c[:n], s[:n]
    total = c.sum() + s.sum()
    cum = np.concatenate([[0.0], np.cumsum(c)])
    cum_s = np.concatenate([[0.0], np.cumsum(s)])
    clogc = np.where(c > 0, c * np.log(np.where(c > 0, c, 1.0)), 0.0)
    cum_clogc = np.concatenate([[0.0], np.cumsum(clogc)])
    cum_nz = np.concatenate([[0.0], np.cumsum(c > 0)])

    i = np.arange(levels, n + 1)
    # Bin k of the first i is in level floor(k·L / i): level j starts at ceil(j·i / L).
    bounds = (np.arange(levels + 1)[None, :] * i[:, None] + levels - 1) // levels
    level_sum = cum[bounds[:, 1:]] - cum[bounds[:, :-1]]
    level_nz = cum_nz[bounds[:, 1:]] - cum_nz[bounds[:, :-1]]

    last = c[i - 1]
    # Suffix sums: exactly 0 with nothing beyond the threshold (total - cum[i] can round to 1e-12).
    beyond = np.concatenate([np.cumsum((c + s)[::-1])[::-1], [0.0]])
    outliers = beyond[i]
    level_nz[:, -1] += (last == 0) & (outliers > 0)  # bin i-1 (last level) holds the outliers: occupied
    safe_sum = np.where(level_sum > 0, level_sum, 1.0)
    safe_nz = np.where(level_nz > 0, level_nz, 1.0)
    sum_p_log_q = np.sum(np.where(level_sum > 0, level_sum * np.log(safe_sum / safe_nz), 0.0), axis=1)
    last_q = np.where(level_sum[:, -1] > 0, safe_sum[:, -1] / safe_nz[:, -1], KL_EPSILON)
    sum_p_log_q = sum_p_log_q + np.where(outliers > 0, outliers * np.log(last_q), 0.0)
    folded = last + outliers
    sum_p_log_p = (
        cum_clogc[i]
        - np.where(last > 0, last * np.log(np.where(last > 0, last, 1.0)), 0.0)
        + folded * np.log(np.where(folded > 0, folded, 1.0))
    )
    kept = cum[i] + cum_s[i]
    with np.errstate(divide="ignore"):
        kl = (sum_p_log_p - sum_p_log_q) / total + np.log(np.where(kept > 0, kept, 1.0) / total)
    kl = np.where(kept > 0, kl, np.inf)
    return int(i[int(np.argmin(kl))])


def _sawtooth_integral(y: np.ndarray) -> np.ndarray:
    """``G(y) = ∫_0^y (v - round(v))² dv = floor(y + 1/2) / 12 + s³ / 3``, ``s = y - floor(y + 1/2)``."""
    r = np.floor(y + 0.5)
    s = y - r
    return r / 12.0 + s**3 / 3.0


def _expected_sq_error(counts, lower, upper, lo, hi, bits: int, symmetric: bool) -> np.ndarray:
    """``Σ count · mean over the bin of (x - fq(x))²`` for each candidate range ``(lo[j], hi[j])``.

    ``fq`` quantizes onto the grid ``ops.nudge_range(*ops.prepare_range(lo, hi, symmetric), bits)``
    gives; ``x`` is uniform within ``[lower, upper]`` (a point if they are equal).
    """
    lo = np.atleast_1d(np.asarray(lo, dtype=np.float64))
    hi = np.atleast_1d(np.asarray(hi, dtype=np.float64))
    pmin, pmax = ops.prepare_range(lo, hi, symmetric=symmetric, bits=bits)
    nmin, nmax, step = (v.astype(np.float64)[:, None] for v in ops.nudge_range(pmin, pmax, bits=bits))
    u, v = lower[None, :], upper[None, :]

    below_end = np.minimum(v, nmin)
    below = np.where(u < nmin, ((below_end - nmin) ** 3 - (u - nmin) ** 3) / 3.0, 0.0)
    above_start = np.maximum(u, nmax)
    above = np.where(v > nmax, ((v - nmax) ** 3 - (above_start - nmax) ** 3) / 3.0, 0.0)
    a, b = np.clip(u, nmin, nmax), np.clip(v, nmin, nmax)
    inside = step**3 * (_sawtooth_integral((b - nmin) / step) - _sawtooth_integral((a - nmin) / step))
    width = v - u
    mean_err = (below + above + inside) / np.where(width > 0, width, 1.0)

    # Zero-width bins (constant data): the error at the point itself.
    y = (np.clip(u, nmin, nmax) - nmin) / step
    point = (u - np.clip(u, nmin, nmax)) ** 2 + (step * (y - np.floor(y + 0.5))) ** 2
    mean_err = np.where(width > 0, mean_err, point)
    return mean_err @ counts


def _search_threshold(error, top: float, num_bins: int) -> float:
    """The ``t`` in ``(0, top]`` minimizing ``error(t)`` (vectorized): geometric grid, then linear."""
    if top <= 0.0:
        return 0.0
    steps = 8 * max(1, math.ceil(math.log2(num_bins)))
    coarse = top * 2.0 ** (-np.arange(steps + 1) / 8.0)  # descending: ties keep the wider range
    best = int(np.argmin(error(coarse)))
    fine = np.linspace(coarse[max(best - 1, 0)], coarse[min(best + 1, steps)], 33)
    return float(fine[int(np.argmin(error(fine)))])


# ---------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Observer]] = {}


def _register(cls: type[Observer]) -> type[Observer]:
    """Registers a concrete observer for :meth:`Observer.from_state`; names must be unique."""
    if not (isinstance(cls, type) and issubclass(cls, Observer)) or inspect.isabstract(cls):
        raise TypeError(f"Only concrete Observer subclasses can be registered. Received: {cls!r}")
    if cls.__name__ in _REGISTRY:
        raise ValueError(f"An observer named {cls.__name__!r} is already registered: {_REGISTRY[cls.__name__]!r}")
    _REGISTRY[cls.__name__] = cls
    return cls


for _cls in (MinMaxObserver, MovingAverageMinMaxObserver, HistogramObserver, SoftmaxInputObserver):
    _register(_cls)

for _method in calibration_method_names():  # the built-in methods' observers, validated once, at import
    _entry = get_calibration_method(_method)
    if isinstance(_entry.observer, str):
        _missing = (set(_entry.observer_args) | set(_entry.observer_params)) - set(_init_params(_REGISTRY[_entry.observer]))
        if _missing:
            raise TypeError(f"method {_method!r}: {_entry.observer} takes no parameter(s) {sorted(_missing)}")
del _method, _entry


def __getattr__(name: str):
    if name == "OBSERVER_METHODS":  # read at use: methods registered later are included
        return calibration_method_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create_observer(method: str, **params) -> Observer:
    """Builds the observer for a calibration method name.

    The method is looked up in :mod:`tfq.calibration_methods` (so registered methods work too):
    ``"minmax"`` → :class:`MinMaxObserver`, ``"moving_average"`` →
    :class:`MovingAverageMinMaxObserver`, ``"kl"`` / ``"percentile"`` / ``"mse"`` →
    :class:`HistogramObserver` with that method.

    Args:
        method: one of :data:`OBSERVER_METHODS`.
        **params: constructor arguments that apply to the method (e.g. ``percentile`` only for
            ``"percentile"``, ``bits`` only for ``"kl"`` and ``"mse"``).

    Returns:
        A new observer.

    Raises:
        ValueError: for an unknown method, a parameter the method does not take, or a bad value.

    Example:
        >>> obs = create_observer("percentile", percentile=99.9, symmetric=True)
        >>> type(obs).__name__, obs.method, obs.percentile, obs.symmetric
        ('HistogramObserver', 'percentile', 99.9, True)
    """
    entry = get_calibration_method(method, "method")
    unknown = sorted(set(params) - set(entry.observer_params))
    if unknown:
        raise ValueError(
            f"Unknown parameter(s) {unknown} for observer method {method!r}. Allowed: {list(entry.observer_params)}"
        )
    cls = _REGISTRY[entry.observer] if isinstance(entry.observer, str) else entry.observer
    return cls(**entry.observer_args, **params)
