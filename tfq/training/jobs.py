"""Training jobs: QAT fine-tuning, and pruning then INT8 export.

Used by ``scripts/train_qat.py`` and ``scripts/prune_and_quantize.py``; all logic lives here so it
is testable.

The same QAT job runs on one process or under a ``tf.distribute`` strategy (``strategy=``), e.g.
``MultiWorkerMirroredStrategy`` on several machines: every worker runs the same command with its
own ``TF_CONFIG`` (:mod:`tfq.training.distribute`).
"""

from __future__ import annotations

import warnings

from tfq.core.fileio import atomic_write_bytes
from tfq.training.distribute import fit_distributed, worker_output_dir

__all__ = ["prune_and_quantize", "train_qat"]


def train_qat(model, x_train, y_train, *, x_val=None, y_val=None, epochs: int = 3, batch_size: int = 32,
              learning_rate: float = 2e-4, freeze_bn_epoch: int | None = 1, freeze_ranges_epoch: int | None = None,
              calibration: str = "minmax", output_dir=None, seed: int = 0, verbose: int = 1, strategy=None,
              bn_folding: str = "unfolded", logits_range: str = "tensor"):
    """Quantization-aware fine-tuning of a trained float model.

    Args:
        model: a trained Keras model (or path).
        x_train, y_train: training data (integer class labels: sparse cross-entropy).
        x_val, y_val: optional validation data; the INT8 TFLite accuracy on it is logged per epoch.
        epochs: QAT epochs.
        batch_size: batch size (global: split over the replicas under a strategy).
        learning_rate: Adam learning rate (fine-tuning: small).
        freeze_bn_epoch: first epoch (0-based) trained with frozen BatchNorm statistics (None:
            never); one >= ``epochs`` never comes: a warning names it.
        freeze_ranges_epoch: first epoch (0-based) trained with frozen activation ranges (None:
            never); one >= ``epochs``: a warning names it.
        calibration: method of the calibration pass that initialises the ranges.
        output_dir: if given, ``qat.keras``, ``qat_int8.tflite`` and per-epoch TFLite checkpoints
            are written there (by the chief; other workers write to :func:`worker_output_dir`).
        seed: random seed (data order and initialisation; the same on every worker).
        verbose: Keras ``fit`` verbosity (under a strategy: 1 prints one line per epoch).
        strategy: optional ``tf.distribute`` strategy (create it first thing in the program). The
            model is quantized and trained in its scope; each step's global batch is split over the
            replicas (across workers under ``MultiWorkerMirroredStrategy``), and BatchNorm moments
            and activation ranges are taken over the global batch, so every replica ends with the
            same weights and ranges.
        bn_folding: see :func:`tfq.qat.quantize_model`.
        logits_range: see :func:`tfq.qat.quantize_model`.

    Returns:
        ``(qat_model, tflite_bytes, history)`` (``history`` is the ``keras.callbacks.History``).
    """
    import contextlib

    import keras

    from tfq.export.convert import convert
    from tfq.qat import quantize_model
    from tfq.training import callbacks as cb

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1. Received: epochs={epochs!r}")
    for name, value in (("freeze_bn_epoch", freeze_bn_epoch), ("freeze_ranges_epoch", freeze_ranges_epoch)):
        if value is not None and not isinstance(value, bool) and isinstance(value, int) and value >= epochs:
            warnings.warn(f"train_qat: {name}={value} never freezes in this fit: epochs are counted from 0 and "
                          f"epochs={epochs} trains epochs 0 … {epochs - 1}. Pass {name} < epochs to freeze, or None.",
                          stacklevel=2)
    keras.utils.set_random_seed(seed)
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        qat = quantize_model(model, calibration_data=x_train[:512], calibration=calibration,
                                     bn_folding=bn_folding, logits_range=logits_range)
        qat.compile(keras.optimizers.Adam(learning_rate), "sparse_categorical_crossentropy", metrics=["accuracy"])
    callbacks = []
    if freeze_bn_epoch is not None:
        callbacks.append(cb.FreezeBatchNorm(freeze_bn_epoch))
    if freeze_ranges_epoch is not None:
        callbacks.append(cb.FreezeQuantizerRanges(freeze_ranges_epoch))
    if x_val is not None and y_val is not None:
        callbacks.append(cb.EvaluateTFLite(x_val, y_val))
    out = worker_output_dir(output_dir, strategy)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        callbacks.append(cb.ExportTFLite(str(out / "qat_epoch{epoch:02d}.tflite")))
    if strategy is None:
        history = qat.fit(x_train, y_train, epochs=epochs, batch_size=batch_size, verbose=verbose,
                          callbacks=callbacks, shuffle=True)
    else:
        history = fit_distributed(qat, strategy, x_train, y_train, epochs, batch_size, seed, callbacks, verbose)
    content = convert(qat, "int8")
    if out is not None:
        qat.save(out / "qat.keras")
        atomic_write_bytes(out / "qat_int8.tflite", content)
    return qat, content, history


def prune_and_quantize(model, x_train, y_train, *, x_val=None, y_val=None, target_sparsity: float = 0.75,
                       schedule: str = "polynomial", epochs: int = 4, end_fraction: float = 0.6,
                       frequency: int = 10, block_size=(1, 1), skip_layers=(), qat_epochs: int = 1,
                       batch_size: int = 32, learning_rate: float = 1e-3, qat_learning_rate: float = 2e-4,
                       num_calibration_samples: int = 300, output=None, seed: int = 0, verbose: int = 0):
    """Prunes a trained float model while fine-tuning it, then exports a full-integer TFLite model.

    Steps: :func:`tfq.pruning.prune_low_magnitude` (the target is reached after ``end_fraction`` of
    the ``epochs``, the rest of the fine-tuning recovers accuracy at that sparsity) →
    :func:`tfq.pruning.strip_pruning` → with ``qat_epochs`` > 0, sparsity-preserving QAT
    (``tfq.qat.quantize_model(..., preserve="sparsity")``), else PTQ on ``num_calibration_samples``
    training inputs → ``tfq.convert(..., "int8")``.

    Args:
        model: a trained Keras model (or path).
        x_train, y_train: training data (integer class labels: sparse cross-entropy).
        x_val, y_val: optional data for the accuracies in the summary.
        target_sparsity: share of zeros in each pruned weight.
        schedule: ``"polynomial"`` or ``"constant"``.
        epochs: pruning fine-tuning epochs.
        end_fraction: share of the pruning steps after which the target sparsity holds, in (0, 1].
        frequency: steps between mask updates.
        block_size: ``(rows, cols)`` pruned together.
        skip_layers: layers left dense (names, regexes, ``class:Name``).
        qat_epochs: sparsity-preserving QAT epochs (0: post-training quantization).
        batch_size: batch size.
        learning_rate: Adam learning rate while pruning.
        qat_learning_rate: Adam learning rate in QAT.
        num_calibration_samples: calibration inputs for the QAT ranges / PTQ.
        output: if given, the ``.tflite`` is written there atomically.
        seed: random seed.
        verbose: Keras ``fit`` verbosity.

    Returns:
        ``(pruned_float_model, tflite_bytes, summary)``; ``summary`` has ``sparsity`` (per layer
        and ``"total"``), ``size``, ``gzip_size`` and, with validation data, ``float_accuracy`` (of
        ``model``), ``pruned_accuracy`` (the stripped float model) and ``int8_accuracy``.

    Raises:
        ValueError: a bad argument (named), or no layer to prune.
    """
    import math

    import keras
    import numpy as np

    from tfq.compression.pruning import prune_low_magnitude, sparsity_of, strip_pruning
    from tfq.export.convert import convert
    from tfq.models.loading import load_model
    from tfq.qat import quantize_model
    from tfq.tflite.info import inspect_tflite
    from tfq.tflite.interpreter import TFLiteModel
    from tfq.training import callbacks as cb

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1. Received: epochs={epochs!r}")
    if isinstance(qat_epochs, bool) or not isinstance(qat_epochs, int) or qat_epochs < 0:
        raise ValueError(f"qat_epochs must be an integer >= 0. Received: qat_epochs={qat_epochs!r}")
    if not 0.0 < float(end_fraction) <= 1.0:
        raise ValueError(f"end_fraction must be in (0, 1]. Received: end_fraction={end_fraction!r}")
    model = load_model(model)
    keras.utils.set_random_seed(seed)
    steps = epochs * math.ceil(len(y_train) / batch_size)
    end_step = max(int(round(end_fraction * steps)) - 1, 0)
    pruned = prune_low_magnitude(model, target_sparsity, schedule, begin_step=0,
                                 end_step=end_step if schedule == "polynomial" else None,
                                 frequency=frequency, block_size=block_size, skip_layers=skip_layers)
    pruned.compile(keras.optimizers.Adam(learning_rate), "sparse_categorical_crossentropy", metrics=["accuracy"])
    pruned.fit(x_train, y_train, epochs=epochs, batch_size=batch_size, verbose=verbose, shuffle=True,
               callbacks=[cb.UpdatePruningStep(), cb.PruningSummaries()])
    stripped = strip_pruning(pruned)
    calib = x_train[:num_calibration_samples]
    if qat_epochs:
        qat = quantize_model(stripped, calibration_data=calib, preserve="sparsity")
        qat.compile(keras.optimizers.Adam(qat_learning_rate), "sparse_categorical_crossentropy", metrics=["accuracy"])
        qat.fit(x_train, y_train, epochs=qat_epochs, batch_size=batch_size, verbose=verbose, shuffle=True)
        content = convert(qat, "int8")
    else:
        content = convert(stripped, "int8", calib)
    info = inspect_tflite(content)
    summary = {"sparsity": sparsity_of(stripped), "size": info.size, "gzip_size": info.gzip_size,
               "int8_weight_sparsity": info.weight_sparsity, "end_step": end_step, "steps": steps}
    if x_val is not None and y_val is not None:
        labels = np.asarray(y_val).reshape(-1)

        def accuracy(predictions):
            return float(np.mean(np.asarray(predictions).argmax(-1) == labels))

        summary["float_accuracy"] = accuracy(model.predict(x_val, verbose=0))
        summary["pruned_accuracy"] = accuracy(stripped.predict(x_val, verbose=0))
        summary["int8_accuracy"] = accuracy(TFLiteModel(content).predict(x_val))
    if output is not None:
        atomic_write_bytes(output, content)
    return stripped, content, summary
