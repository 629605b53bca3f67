"""Magnitude pruning for Keras 3 models: train with a sparsity schedule, strip, export with the zeros.

:func:`prune_low_magnitude` returns a new model whose chosen layers are wrapped in
:class:`PruneLowMagnitude`. Each wrapper holds a 0/1 mask per compressed weight and the current
pruning step in non-trainable variables; during training, at the steps the schedule names, the
mask is recomputed so that the smallest-magnitude weights (or blocks of weights) are zero, and the
layer always computes with ``weight · mask`` (pruned weights get no gradient). The step comes from
:class:`tfq.callbacks.UpdatePruningStep`, which ``fit`` must be given. :func:`strip_pruning` returns
the plain Keras model with the zeros in its weights, ready for :func:`tfq.convert` (which strips a
wrapped model itself) or :func:`tfq.qat.quantize_model` with ``preserve="sparsity"``.

Example:
    >>> pruned = tfq.pruning.prune_low_magnitude(model, target_sparsity=0.75, frequency=20)  # doctest: +SKIP
    >>> pruned.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])               # doctest: +SKIP
    >>> pruned.fit(x, y, epochs=4, callbacks=[tfq.callbacks.UpdatePruningStep()])            # doctest: +SKIP
    >>> tflite = tfq.convert(tfq.pruning.strip_pruning(pruned), "int8", x[:300])            # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import keras
import numpy as np
import tensorflow as tf

from tfq.compression import common as _compression

__all__ = [
    "ConstantSparsity",
    "PolynomialDecay",
    "PruneLowMagnitude",
    "prune_low_magnitude",
    "pruned_layers_of",
    "sparsity_of",
    "strip_pruning",
]

SCHEDULES = ("polynomial", "constant")

# Defaults of the polynomial schedule, for a user who passes neither end_step nor frequency: the
# target is reached after END_FRACTION of the first fit (the rest of it recovers the accuracy at the
# final masks), and the masks change about UPDATES_TO_TARGET times on the way (every
# (end_step − begin_step) // UPDATES_TO_TARGET steps, at least 1, at most MAX_AUTO_FREQUENCY).
# Measured (README "Compression"): 75 % on the digits CNN, 4 epochs of fit: 90.5 % with the target at
# the last step and masks every 100 steps (the former default), 97.8 % with these.
END_FRACTION = 0.6
UPDATES_TO_TARGET = 10
MAX_AUTO_FREQUENCY = 100


def _check_sparsity(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1). Received: {name}={value!r}")
    return float(value)


def _check_step(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0{' or None' if allow_none else ''}. Received: {name}={value!r}")
    return int(value)


def _check_frequency(frequency, allow_none: bool = False):
    if frequency is None and allow_none:
        return None
    if isinstance(frequency, bool) or not isinstance(frequency, (int, np.integer)) or frequency < 1:
        raise ValueError(f"frequency must be an integer >= 1 (steps between mask updates){' or None' if allow_none else ''}. "
                         f"Received: frequency={frequency!r}")
    return int(frequency)


@dataclasses.dataclass(frozen=True)
class PolynomialDecay:
    """Sparsity rising from ``initial_sparsity`` to ``final_sparsity`` between two steps (Zhu & Gupta 2017)::
        p(t) = clip((t − begin_step) / (end_step − begin_step), 0, 1)
        s(t) = final + (initial − final) · (1 − p(t))^power

    Masks are updated at ``t = begin_step + k·frequency`` up to ``end_step``, and at ``end_step``
    itself, so ``final_sparsity`` is reached exactly at ``end_step`` (at once when
    ``end_step == begin_step``); after it the masks stay. ``end_step=None`` is set by
    :class:`tfq.callbacks.UpdatePruningStep` to the step at :data:`END_FRACTION` (60 %) of the first
    ``fit``, so the rest of that fit trains at the final masks. ``frequency=None``:
    ``clip((end_step − begin_step) // 10, 1, 100)`` — about 10 updates on the way to the target.

    Example:
        >>> PolynomialDecay(0.0, 0.8, begin_step=0, end_step=100).sparsity_at(50)
        0.7
    """

    initial_sparsity: float = 0.0
    final_sparsity: float = 0.75
    begin_step: int = 0
    end_step: int | None = None
    power: float = 3.0
    frequency: int | None = None

    def __post_init__(self):
        initial = _check_sparsity("initial_sparsity", self.initial_sparsity)
        final = _check_sparsity("final_sparsity", self.final_sparsity)
        if initial > final:
            raise ValueError(f"initial_sparsity must be <= final_sparsity. Received: {initial} > {final}")
        begin = _check_step("begin_step", self.begin_step)
        end = _check_step("end_step", self.end_step, allow_none=True)
        if end is not None and end < begin:
            raise ValueError(f"end_step must be >= begin_step. Received: begin_step={begin}, end_step={end}")
        if isinstance(self.power, bool) or not isinstance(self.power, (int, float)) or self.power <= 0:
            raise ValueError(f"power must be a number > 0. Received: power={self.power!r}")
        object.__setattr__(self, "initial_sparsity", initial)
        object.__setattr__(self, "final_sparsity", final)
        object.__setattr__(self, "power", float(self.power))
        object.__setattr__(self, "frequency", _check_frequency(self.frequency, allow_none=True))

    @property
    def target_sparsity(self) -> float:
        return self.final_sparsity

    def sparsity_at(self, step: int, end_step: int | None = None) -> float:
        """``s(step)`` in Python (for reading the schedule; training uses :meth:`tf_sparsity`)."""
        end = self.end_step if self.end_step is not None else end_step
        if end is None:
            raise ValueError("this schedule's end_step is set by UpdatePruningStep; pass end_step=...")
        p = 1.0 if step >= end else min(max((step - self.begin_step) / max(end - self.begin_step, 1), 0.0), 1.0)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - p) ** self.power

    def tf_sparsity(self, step, end):
        span = tf.cast(tf.maximum(end - self.begin_step, 1), tf.float32)
        p = tf.where(step >= end, 1.0, tf.clip_by_value(tf.cast(step - self.begin_step, tf.float32) / span, 0.0, 1.0))
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * tf.pow(1.0 - p, self.power)

    def frequency_for(self, end_step: int) -> int:
        """Steps between mask updates (``frequency``, or the one ``frequency=None`` picks for ``end_step``)."""
        if self.frequency is not None:
            return self.frequency
        return int(min(max((end_step - self.begin_step) // UPDATES_TO_TARGET, 1), MAX_AUTO_FREQUENCY))

    def tf_should_update(self, step, end):
        in_range = (step >= self.begin_step) & (step <= end)
        if self.frequency is not None:
            frequency = tf.cast(self.frequency, step.dtype)
        else:
            frequency = tf.clip_by_value((end - self.begin_step) // UPDATES_TO_TARGET, 1, MAX_AUTO_FREQUENCY)
        return in_range & ((tf.math.floormod(step - self.begin_step, frequency) == 0) | (step == end))

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), kind="polynomial")


@dataclasses.dataclass(frozen=True)
class ConstantSparsity:
    """One sparsity from ``begin_step`` on: masks updated every ``frequency`` steps until ``end_step``.

    ``end_step=None``: no end (masks keep being recomputed at the same sparsity, which lets weights
    swap in and out of the mask early in training).

    Example:
        >>> ConstantSparsity(0.5, begin_step=10).sparsity_at(1000)
        0.5
    """

    target_sparsity: float = 0.75
    begin_step: int = 0
    end_step: int | None = None
    frequency: int = 100

    def __post_init__(self):
        object.__setattr__(self, "target_sparsity", _check_sparsity("target_sparsity", self.target_sparsity))
        begin = _check_step("begin_step", self.begin_step)
        end = _check_step("end_step", self.end_step, allow_none=True)
        if end is not None and end < begin:
            raise ValueError(f"end_step must be >= begin_step. Received: begin_step={begin}, end_step={end}")
        object.__setattr__(self, "frequency", _check_frequency(self.frequency))

    def sparsity_at(self, step: int, end_step: int | None = None) -> float:
        return self.target_sparsity

    def tf_sparsity(self, step, end):
        return tf.constant(self.target_sparsity, tf.float32)

    def tf_should_update(self, step, end):
        in_range = (step >= self.begin_step) & ((end < 0) | (step <= end))
        return in_range & ((tf.math.floormod(step - self.begin_step, self.frequency) == 0) | (step == end))

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), kind="constant")


def schedule_from_dict(d: Mapping):
    """Inverse of ``schedule.to_dict()``."""
    if not isinstance(d, Mapping):
        raise TypeError(f"a pruning schedule is a PolynomialDecay, ConstantSparsity or dict. Received: {d!r}")
    d = dict(d)
    kind = d.pop("kind", None)
    classes = {"polynomial": PolynomialDecay, "constant": ConstantSparsity}
    if kind not in classes:
        raise ValueError(f"schedule kind must be one of {sorted(classes)}. Received: kind={kind!r}")
    fields = {f.name for f in dataclasses.fields(classes[kind])}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"unknown {kind} schedule key(s) {unknown}; known: {sorted(fields)}")
    return classes[kind](**d)


def _check_block(block_size) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in block_size)
        ok = rows >= 1 and cols >= 1 and all(float(v) == int(v) for v in block_size)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"block_size must be two integers >= 1, e.g. (1, 1) or (1, 4). Received: block_size={block_size!r}")
    return rows, cols


def magnitude_mask(scores, sparsity, block_size=(1, 1)):
    """The 0/1 mask that zeroes the ``round(sparsity · n)`` smallest scores (or blocks of them).

    The weight is seen as a matrix ``(∏ other dims, last dim)``. With ``block_size=(r, c)`` it is
    zero-padded to multiples of ``(r, c)``, each block is scored by its mean score, and whole blocks
    are kept or dropped (``n`` then counts blocks). Ties go to the lower flat index, so exactly
    ``round(sparsity · n)`` entries (blocks) are zero. Works in TF (inside a compiled step).

    Example:
        >>> magnitude_mask(np.array([[0.1, -2.0], [0.5, 0.05]], np.float32), 0.5).numpy()
        array([[0., 1.],
               [1., 0.]], dtype=float32)
    """
    scores = tf.convert_to_tensor(scores)
    shape = scores.shape
    cols = int(shape[-1]) if len(shape) else 1
    matrix = tf.reshape(tf.abs(scores), [-1, cols])
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    br, bc = block_size
    if (br, bc) != (1, 1):
        pr, pc = -rows % br, -cols % bc
        padded = tf.pad(matrix, [[0, pr], [0, pc]])
        nr, nc = (rows + pr) // br, (cols + pc) // bc
        matrix = tf.reduce_mean(tf.reshape(padded, [nr, br, nc, bc]), axis=[1, 3])
    flat = tf.reshape(matrix, [-1])
    n = flat.shape[0]
    k = tf.cast(tf.round(tf.cast(sparsity, tf.float32) * n), tf.int32)
    ranks = tf.math.invert_permutation(tf.argsort(flat, stable=True))
    keep = tf.cast(ranks >= k, scores.dtype)
    keep = tf.reshape(keep, matrix.shape)
    if (br, bc) != (1, 1):
        keep = tf.repeat(tf.repeat(keep, br, axis=0), bc, axis=1)[:rows, :cols]
    return tf.reshape(keep, shape)


@keras.saving.register_keras_serializable(package="tfq")
class PruneLowMagnitude(_compression.CompressionWrapper):
    """A layer trained with its main weight multiplied by a magnitude mask that the schedule tightens.

    Non-trainable variables: ``pruning_mask`` (shape of the weight), ``pruning_step`` (set before
    every batch by :class:`tfq.callbacks.UpdatePruningStep`; −1 until then) and ``end_step``. In a
    training call, when ``schedule`` says so, the mask becomes :func:`magnitude_mask` of
    ``|weight · mask|`` at the scheduled sparsity (a pruned weight never comes back). Every call
    computes with ``weight · mask``. Compressed weight: a convolution's or Dense/EinsumDense's
    ``kernel``, a separable convolution's ``pointwise_kernel``, an Embedding's ``embeddings``.

    Args:
        layer: the layer to prune (used as is: pass a copy).
        schedule: :class:`PolynomialDecay`, :class:`ConstantSparsity` or their ``to_dict()``.
        block_size: ``(rows, cols)`` blocks pruned together (see :func:`magnitude_mask`).
    """

    def __init__(self, layer, schedule=None, block_size=(1, 1), **kwargs):
        super().__init__(layer, **kwargs)
        if schedule is None:
            schedule = PolynomialDecay()
        if isinstance(schedule, Mapping):
            schedule = schedule_from_dict(schedule)
        if not isinstance(schedule, (PolynomialDecay, ConstantSparsity)):
            raise TypeError(f"schedule must be PolynomialDecay, ConstantSparsity or a dict. Received: {schedule!r}")
        self.schedule = schedule
        self.block_size = _check_block(block_size)

    def build(self, input_shape):
        super().build(input_shape)
        main = self.main_weight
        self.pruning_mask = self.add_weight(name="pruning_mask", shape=tuple(main.shape), initializer="ones",
                                            trainable=False, dtype=main.dtype)
        self.pruning_step = self.add_weight(name="pruning_step", shape=(), dtype="int64", trainable=False,
                                            initializer=keras.initializers.Constant(-1))
        end = self.schedule.end_step
        self.end_step = self.add_weight(name="end_step", shape=(), dtype="int64", trainable=False,
                                        initializer=keras.initializers.Constant(-1 if end is None else end))

    @property
    def end_step_known(self) -> bool:
        return int(keras.ops.convert_to_numpy(self.end_step)) >= 0

    def effective_weight(self, training=None):
        if training:
            self._update_mask()
        return keras.ops.convert_to_tensor(self.main_weight) * keras.ops.convert_to_tensor(self.pruning_mask)

    def _update_mask(self):
        step = tf.convert_to_tensor(self.pruning_step)
        end = tf.convert_to_tensor(self.end_step)
        checks = [tf.debugging.assert_non_negative(
            step, message=f"tfq: layer {self.name!r} is pruned but its pruning step was never set: pass "
                          f"callbacks=[tfq.callbacks.UpdatePruningStep()] to fit.")]
        with tf.control_dependencies(checks):
            mask = tf.convert_to_tensor(self.pruning_mask)
            weight = tf.convert_to_tensor(self.main_weight)
            new_mask = tf.cond(
                self.schedule.tf_should_update(step, end),
                lambda: magnitude_mask(weight * mask, self.schedule.tf_sparsity(step, end), self.block_size),
                lambda: mask)
            self.pruning_mask.assign(new_mask)

    def apply_mask(self) -> None:
        """Writes ``weight · mask`` into the weight variable (eagerly), so the layer's weights show the zeros."""
        self.main_weight.assign(keras.ops.convert_to_tensor(self.main_weight) * self.pruning_mask)

    @property
    def sparsity(self) -> float:
        """Share of zeros in the weight the layer computes with."""
        return float(np.mean(keras.ops.convert_to_numpy(self.effective_weight(False)) == 0))

    def get_config(self):
        config = super().get_config()
        config.update(schedule=self.schedule.to_dict(), block_size=list(self.block_size))
        return config


def _make_schedule(target_sparsity, schedule, begin_step, end_step, frequency, initial_sparsity, power):
    if isinstance(schedule, (PolynomialDecay, ConstantSparsity)):
        return schedule
    if schedule == "polynomial":
        return PolynomialDecay(initial_sparsity, target_sparsity, begin_step, end_step, power, frequency)
    if schedule == "constant":
        return ConstantSparsity(target_sparsity, begin_step, end_step, 100 if frequency is None else frequency)
    raise ValueError(f"schedule must be one of {SCHEDULES} or a PolynomialDecay/ConstantSparsity. "
                     f"Received: schedule={schedule!r}")


def prune_low_magnitude(
    model,
    target_sparsity: float = 0.75,
    schedule="polynomial",
    begin_step: int = 0,
    end_step: int | None = None,
    frequency: int | None = None,
    block_size=(1, 1),
    *,
    layers=None,
    skip_layers=(),
    initial_sparsity: float = 0.0,
    power: float = 3.0,
) -> keras.Model:
    """Returns a new model that prunes its weights by magnitude while it trains; the caller's is untouched.

    Train it with ``fit(..., callbacks=[tfq.callbacks.UpdatePruningStep()])`` (add
    :class:`tfq.callbacks.PruningSummaries` for per-layer sparsity in the logs), then
    :func:`strip_pruning`. Schedules (``t`` = training step, counted by the optimizer)::
        "polynomial":  s(t) = target + (initial − target) · (1 − p)^power,
                       p = clip((t − begin_step) / (end_step − begin_step), 0, 1)
        "constant":    s(t) = target for t ≥ begin_step

    Masks are recomputed at ``begin_step + k·frequency`` and at ``end_step`` (so the target is
    reached exactly there; ``end_step == begin_step`` prunes to the target at once). For
    ``"polynomial"``, ``end_step=None`` is the step at 60 % of the first ``fit`` (the rest of it
    trains at the final masks and recovers the accuracy) and ``frequency=None`` about 10 updates
    on the way (``clip((end_step − begin_step) // 10, 1, 100)`` steps apart). For ``"constant"``,
    ``end_step=None`` is no end and ``frequency=None`` 100 steps.

    Args:
        model: a built Functional or Sequential Keras 3 model (nested models allowed), a tf_keras
            model, or a path.
        target_sparsity: share of each pruned weight set to zero, in [0, 1).
        schedule: ``"polynomial"``, ``"constant"``, or a :class:`PolynomialDecay` /
            :class:`ConstantSparsity` (then the other schedule arguments must stay at their defaults).
        begin_step: first step that prunes.
        end_step: last step that changes the masks (see above).
        frequency: steps between mask updates (None: see above).
        block_size: ``(rows, cols)`` of weights pruned together (of the weight seen as a matrix
            ``(∏ other dims, output dim)``), e.g. ``(1, 4)`` for 4 output channels at once.
        layers: names, regexes, ``"class:Name"`` patterns or classes of the layers to prune
            (default: every Dense, EinsumDense, convolution and Embedding).
        skip_layers: the same, for layers left dense (e.g. ``["conv1"]``, the first convolution).
        initial_sparsity: ``"polynomial"`` only: sparsity at ``begin_step``.
        power: ``"polynomial"`` only: exponent of the decay.

    Returns:
        A new ``keras.Model`` with :class:`PruneLowMagnitude` wrappers (same layer names).

    Raises:
        ValueError: a bad schedule argument, a pattern that matches no layer, nothing to prune, a
            model that is already pruned or clustered.
        TypeError: ``model`` is not a model or a path.

    Example:
        >>> pruned = prune_low_magnitude(model, 0.75, frequency=20, skip_layers=["conv1"])   # doctest: +SKIP
    """
    if isinstance(schedule, (PolynomialDecay, ConstantSparsity)):
        given = dict(target_sparsity=target_sparsity, begin_step=begin_step, end_step=end_step, frequency=frequency,
                     initial_sparsity=initial_sparsity, power=power)
        defaults = dict(target_sparsity=0.75, begin_step=0, end_step=None, frequency=None, initial_sparsity=0.0,
                        power=3.0)
        changed = sorted(k for k in given if given[k] != defaults[k])
        if changed:
            raise ValueError(f"schedule is a {type(schedule).__name__} object, so {changed} would be ignored: set them "
                             f"in the schedule instead.")
    sched = _make_schedule(_check_sparsity("target_sparsity", target_sparsity), schedule, begin_step, end_step,
                           frequency, initial_sparsity, power)
    if schedule == "constant" and (initial_sparsity != 0.0 or power != 3.0):
        raise ValueError("initial_sparsity and power apply to schedule='polynomial' only. Received: schedule='constant' "
                         f"with initial_sparsity={initial_sparsity!r}, power={power!r}")
    block = _check_block(block_size)
    model = _compression.load_plain_model(model, "prune_low_magnitude")
    selected = _compression.layer_selector(model, layers, skip_layers, "prune_low_magnitude")
    pruned = _compression.wrap_model(model, selected, lambda layer: PruneLowMagnitude(layer, sched, block))
    if not pruned_layers_of(pruned):
        raise ValueError(f"prune_low_magnitude: no layer of model {model.name!r} to prune (layers={layers!r}, "
                         f"skip_layers={skip_layers!r}). Prunable: {', '.join(_compression.supported_layer_types())}.")
    return pruned


def pruned_layers_of(model) -> list[PruneLowMagnitude]:
    """Every :class:`PruneLowMagnitude` wrapper of ``model`` (nested models included)."""
    return _compression.wrappers_of(model, PruneLowMagnitude)


def strip_pruning(model) -> keras.Model:
    """A plain Keras model with the pruned weights' zeros in place; the caller's model is untouched.

    Each :class:`PruneLowMagnitude` becomes its layer holding ``weight · mask``. The result has no
    tfq class in it: it saves, loads and converts like any Keras model.

    Example:
        >>> final = strip_pruning(pruned); final.save("pruned.keras")   # doctest: +SKIP
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"strip_pruning expects a keras.Model. Received: {type(model).__name__}")
    return _compression.strip_model(model, PruneLowMagnitude)


def sparsity_of(model) -> dict[str, float]:
    """Share of zeros in each compressible layer's main weight, by layer name, plus ``"total"``.

    Works on pruned (wrapped), stripped and QAT models alike: wrappers report the weight they
    compute with.

    Example:
        >>> sparsity_of(strip_pruning(pruned))["total"]   # doctest: +SKIP
        0.75
    """
    kernels = _compression.keras_kernels(model)
    out = {name: float(np.mean(w == 0)) for name, w in kernels}
    total = sum(w.size for _, w in kernels)
    out["total"] = float(sum(np.count_nonzero(w == 0) for _, w in kernels) / total) if total else 0.0
    return out
