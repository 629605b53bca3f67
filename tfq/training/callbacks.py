"""Keras callbacks for quantization-aware training and pruning.

Freeze BN and ranges, export and evaluate TFLite; drive a pruning schedule
(:class:`UpdatePruningStep`) and log per-layer sparsity (:class:`PruningSummaries`).

All of them work from a plain ``model.fit(..., callbacks=[...])`` on a model returned by
:func:`tfq.qat.quantize_model`. Epochs are counted as Keras counts them in callbacks (from 0), so
``FreezeBatchNorm(2)`` trains two epochs with live statistics and freezes them from the third.

Example:
    >>> qat_model.fit(x_train, y_train, epochs=6, callbacks=[            # doctest: +SKIP
    ...     tfq.callbacks.FreezeBatchNorm(2),
    ...     tfq.callbacks.FreezeQuantizerRanges(4),
    ...     tfq.callbacks.EvaluateTFLite(x_val, y_val),
    ...     tfq.callbacks.ExportTFLite("ckpt_{epoch:02d}.tflite"),
    ... ])
"""

from __future__ import annotations

import os

import keras
import numpy as np

from tfq.compression.pruning import END_FRACTION, PolynomialDecay, pruned_layers_of
from tfq.core.fileio import atomic_write_bytes
from tfq.quantsim.rewrite import batchnorm_layers_of, quantizers_of

__all__ = ["EvaluateTFLite", "ExportTFLite", "FreezeBatchNorm", "FreezeQuantizerRanges", "PruningSummaries",
           "UpdatePruningStep"]


def _check_epoch(epoch) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise ValueError(f"epoch must be an integer >= 0 (epochs count from 0, as in Keras). Received: epoch={epoch!r}")
    return int(epoch)


def _check_every(every_n_epochs) -> int:
    if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, (int, np.integer)) or every_n_epochs < 1:
        raise ValueError(f"every_n_epochs must be an integer >= 1. Received: every_n_epochs={every_n_epochs!r}")
    return int(every_n_epochs)


def _require_quantized(model, who: str) -> None:
    if not quantizers_of(model):
        raise ValueError(
            f"{who} needs a tfq QAT model (from tfq.qat.quantize_model); model {model.name!r} has no quantizer."
        )


class FreezeBatchNorm(keras.callbacks.Callback):
    """Freezes batch-norm statistics from epoch ``epoch`` on (Krishnamoorthi 2018, §3.2).

    Folded BNs (:class:`~tfq.qat.QuantizedLayer`) and standalone ones
    (:class:`~tfq.quantsim.layers.QuantizedNormalization`) switch their ``bn_frozen`` variable: training
    then runs on the moving statistics (the ones the TFLite model uses) and stops updating them,
    while γ and β keep training. The switch is a variable read inside the compiled step, so it
    takes effect at once; the training step is then re-traced once, so that frozen layers run
    folded, without the batch-statistics ops (cheaper steps for the rest of training). A plain
    ``BatchNormalization`` left float has no such switch: it is made non-trainable (which also
    freezes its γ, β).

    Args:
        epoch: first epoch (0-based) trained with frozen statistics; 0 freezes from the start.

    Raises:
        ValueError: ``epoch`` is not an integer >= 0.
    """

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = _check_epoch(epoch)
        self.frozen_at: int | None = None

    def on_epoch_begin(self, epoch, logs=None):
        if self.frozen_at is not None or epoch < self.epoch:
            return

        retrace = False
        for layer in batchnorm_layers_of(self.model):
            if isinstance(layer, keras.layers.BatchNormalization):
                if layer.trainable:
                    layer.trainable = False
                    retrace = True
            elif not layer.bn_frozen:
                layer.bn_frozen = True
                retrace = True
        if retrace:
            self.model.make_train_function(force=True)
        self.frozen_at = epoch


class FreezeQuantizerRanges(keras.callbacks.Callback):
    """Freezes every activation range from epoch ``epoch`` on.

    Moving-average quantizers set their ``frozen`` variable (read inside the compiled step: the
    next batch already keeps the range). Learned ranges are made non-trainable and the training
    step is re-traced, so the optimizer (whose momentum would keep moving them) no longer sees
    them.

    Args:
        epoch: first epoch (0-based) trained with frozen ranges.

    Raises:
        ValueError: ``epoch`` is not an integer >= 0, or the model has no quantizer.
    """

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = _check_epoch(epoch)
        self.frozen_at: int | None = None

    def on_train_begin(self, logs=None):
        _require_quantized(self.model, "FreezeQuantizerRanges")

    def on_epoch_begin(self, epoch, logs=None):
        if self.frozen_at is not None or epoch < self.epoch:
            return

        retrace = False
        for quantizer in quantizers_of(self.model).values():
            if quantizer.mode == "fixed":
                continue
            quantizer.frozen.assign(1.0)
            if quantizer.mode == "learned":
                for variable in (quantizer.range_min, quantizer.range_max):
                    if variable.trainable:
                        variable.trainable = False
                        retrace = True
        if retrace:
            self.model.make_train_function(force=True)
        self.frozen_at = epoch


class ExportTFLite(keras.callbacks.Callback):
    """Writes the model as TFLite every ``every_n_epochs`` epochs, atomically.

    Args:
        path_template: file path, formatted with ``epoch`` (1-based, as in
            ``keras.callbacks.ModelCheckpoint``) and the epoch's logs, e.g.
            ``"ckpt_{epoch:02d}.tflite"`` or ``"m_{epoch}_{val_loss:.3f}.tflite"``.
        every_n_epochs: export period.
        mode: :func:`tfq.convert` mode (``"int8"`` needs no data for a trained QAT model).
        **convert_kwargs: passed to :func:`tfq.convert` (``io_dtype``, ``representative_data`` …).

    Attributes:
        paths: the files written, in order.

    Raises:
        ValueError: bad ``every_n_epochs``; a template that does not format with the logs.
        FileNotFoundError: the output directory does not exist (checked at construction).
    """

    def __init__(self, path_template: str | os.PathLike, every_n_epochs: int = 1, mode: str = "int8",
                 **convert_kwargs):
        super().__init__()
        self.path_template = os.fspath(path_template)
        directory = os.path.dirname(self.path_template) or "."
        if "{" not in directory and not os.path.isdir(directory):
            raise FileNotFoundError(f"output directory does not exist: {directory!r}. Create it first.")
        self.every_n_epochs = _check_every(every_n_epochs)
        self.mode = mode
        self.convert_kwargs = convert_kwargs
        self.paths: list[str] = []

    def _path(self, epoch: int, logs: dict) -> str:
        try:
            return self.path_template.format(epoch=epoch + 1, **logs)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"ExportTFLite path_template {self.path_template!r} does not format with epoch={epoch + 1} and logs "
                f"{sorted(logs)}: {err}. Use keys among 'epoch' and the logged metrics."
            ) from None

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        from tfq.export.convert import convert

        path = self._path(epoch, dict(logs or {}))
        content = convert(self.model, self.mode, **self.convert_kwargs)
        atomic_write_bytes(path, content)
        self.paths.append(path)


class EvaluateTFLite(keras.callbacks.Callback):
    """Converts the model and puts its accuracy through the TFLite interpreter into the epoch logs.

    The value lands in ``logs[name]`` (so in ``History``, the progress bar and later callbacks
    such as ``EarlyStopping(monitor=name)``). Accuracy is ``mean(argmax(prediction) == label)``;
    labels may be integers or one-hot.

    Args:
        x: inputs (array, or list in the model's input order / dict by input name).
        y: labels, integer ``(n,)`` or ``(n, 1)``, or one-hot ``(n, classes)``.
        every_n_epochs: evaluation period.
        name: the logs key.
        mode: :func:`tfq.convert` mode.
        **convert_kwargs: passed to :func:`tfq.convert`.

    Attributes:
        history: ``[(epoch, accuracy), ...]`` (epoch 0-based).

    Raises:
        ValueError: bad ``every_n_epochs``, empty data, or ``x`` and ``y`` of different lengths.
    """

    def __init__(self, x, y, every_n_epochs: int = 1, name: str = "tflite_int8_accuracy", mode: str = "int8",
                 **convert_kwargs):
        super().__init__()
        y = np.asarray(y)
        n = len(keras.tree.flatten(x)[0])
        if n == 0:
            raise ValueError("EvaluateTFLite needs at least one sample. Received: empty x")
        if len(y) != n:
            raise ValueError(f"x and y must have the same length. Received: {n} inputs and {len(y)} labels")
        self.x = x
        self.labels = y.argmax(-1) if y.ndim > 1 and y.shape[-1] > 1 else y.reshape(len(y))
        self.every_n_epochs = _check_every(every_n_epochs)
        self.name = str(name)
        self.mode = mode
        self.convert_kwargs = convert_kwargs
        self.history: list[tuple[int, float]] = []

    def evaluate(self) -> float:
        """Converts the current model and returns its TFLite accuracy on ``(x, y)``."""
        from tfq.export.convert import convert
        from tfq.tflite.interpreter import TFLiteModel

        content = convert(self.model, self.mode, **self.convert_kwargs)
        predictions = TFLiteModel(content).predict(self._named_inputs())
        return float(np.mean(np.asarray(predictions).argmax(-1) == self.labels))

    def _named_inputs(self):
        """A list of inputs in Keras order becomes a dict by input name (TFLite may order them otherwise)."""
        if isinstance(self.x, (list, tuple)) and len(self.x) > 1:
            names = [t.name for t in self.model.inputs]
            if len(names) == len(self.x):
                return dict(zip(names, self.x))
        return self.x

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        accuracy = self.evaluate()
        self.history.append((epoch, accuracy))
        if logs is not None:
            logs[self.name] = accuracy


class UpdatePruningStep(keras.callbacks.Callback):
    """Drives the pruning schedule of a model from :func:`tfq.pruning.prune_low_magnitude`.

    Before every training batch it sets each :class:`~tfq.pruning.PruneLowMagnitude` wrapper's
    ``pruning_step`` to the optimizer's step count (so a second ``fit`` continues the schedule);
    at the end of every epoch it writes ``weight · mask`` into the weights, so the model's weights
    hold the zeros. A ``"polynomial"`` schedule without ``end_step`` gets the step at 60 % of this
    ``fit`` as its end (``round(0.6 · steps_per_epoch · epochs) − 1`` after the current step), so the
    rest of the fit trains at the final masks.

    Raises:
        ValueError: the model has no pruned layer; ``steps_per_execution`` > 1 (the step would only
            be set every few batches); an open-ended schedule in a ``fit`` of unknown length.

    Example:
        >>> pruned.fit(x, y, epochs=4, callbacks=[tfq.callbacks.UpdatePruningStep()])   # doctest: +SKIP
    """

    def __init__(self):
        super().__init__()
        self.step: int | None = None
        self._wrappers: list = []

    def on_train_begin(self, logs=None):
        self._wrappers = pruned_layers_of(self.model)
        if not self._wrappers:
            raise ValueError(f"UpdatePruningStep needs a model from tfq.pruning.prune_low_magnitude; model "
                             f"{self.model.name!r} has no pruned layer.")
        spe = getattr(self.model, "steps_per_execution", 1)
        if isinstance(spe, (int, np.integer)) and spe > 1:
            raise ValueError(f"UpdatePruningStep sets the pruning step before every batch: compile with "
                             f"steps_per_execution=1. Received: steps_per_execution={spe}")
        optimizer = getattr(self.model, "optimizer", None)
        self.step = int(keras.ops.convert_to_numpy(optimizer.iterations)) if optimizer is not None else 0
        open_ended = [w for w in self._wrappers if isinstance(w.schedule, PolynomialDecay) and not w.end_step_known]
        if open_ended:
            steps, epochs = (self.params or {}).get("steps"), (self.params or {}).get("epochs")
            if not steps or not epochs:
                raise ValueError(f"layer {open_ended[0].name!r} has a polynomial schedule with end_step=None, set from "
                                 f"the length of fit, which is unknown here: pass steps_per_epoch to fit or end_step "
                                 f"to prune_low_magnitude.")
            end = self.step + max(round(END_FRACTION * int(steps) * int(epochs)) - 1, 0)
            for wrapper in open_ended:
                wrapper.end_step.assign(max(end, wrapper.schedule.begin_step))

    def on_train_batch_begin(self, batch, logs=None):
        for wrapper in self._wrappers:
            wrapper.pruning_step.assign(self.step)

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1

    def on_epoch_end(self, epoch, logs=None):
        for wrapper in self._wrappers:
            wrapper.apply_mask()


class PruningSummaries(keras.callbacks.Callback):
    """Puts the sparsity of every pruned layer into the epoch logs (and optionally TensorBoard).

    Keys: ``sparsity`` (zeros / weights over all pruned layers) and ``sparsity/<layer name>``,
    so they land in ``History`` and the progress bar. With ``log_dir`` they are also written as
    TensorBoard scalars (``tf.summary``), one point per epoch.

    Args:
        log_dir: optional TensorBoard directory.

    Example:
        >>> history = pruned.fit(x, y, epochs=4, callbacks=[
        ...     tfq.callbacks.UpdatePruningStep(), tfq.callbacks.PruningSummaries()])   # doctest: +SKIP
        >>> history.history["sparsity"][-1]                                           # doctest: +SKIP
        0.75
    """

    def __init__(self, log_dir: str | os.PathLike | None = None):
        super().__init__()
        self.log_dir = os.fspath(log_dir) if log_dir is not None else None
        self._writer = None

    def on_train_begin(self, logs=None):
        if not pruned_layers_of(self.model):
            raise ValueError(f"PruningSummaries needs a model from tfq.pruning.prune_low_magnitude; model "
                             f"{self.model.name!r} has no pruned layer.")
        if self.log_dir is not None and self._writer is None:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_epoch_end(self, epoch, logs=None):
        values, zeros, total = {}, 0, 0
        for wrapper in pruned_layers_of(self.model):
            mask = keras.ops.convert_to_numpy(wrapper.effective_weight(False))
            values[f"sparsity/{wrapper.name}"] = float(np.mean(mask == 0))
            zeros += int(np.count_nonzero(mask == 0))
            total += mask.size
        values["sparsity"] = zeros / total if total else 0.0
        if logs is not None:
            logs.update(values)
        if self._writer is not None:
            import tensorflow as tf

            with self._writer.as_default():
                for key, value in values.items():
                    tf.summary.scalar(key, value, step=epoch)
            self._writer.flush()
