"""QAT fine-tuning as a job: load a float model and data, quantize, fit with tfq callbacks, export.

Used by ``scripts/train_qat.py``; all logic lives here so it is testable.

The same job runs on one process or under a ``tf.distribute`` strategy (``strategy=``), e.g.
``MultiWorkerMirroredStrategy`` on several machines: every worker runs the same command with its
own ``TF_CONFIG``. Under a strategy the job trains with its own loop (``strategy.run`` per step)
instead of ``Model.fit``, because Keras 3.15's ``fit`` fails under ``MultiWorkerMirroredStrategy``
(it reduces the first data batch across workers to build the model, which that strategy cannot
do for a tuple).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["train_qat", "worker_output_dir"]


def worker_output_dir(output_dir, strategy=None) -> Path | None:
    """Where this process writes: ``output_dir`` on the chief (or without a multi-worker strategy),
    ``output_dir/worker_<index>`` on the other workers, so that workers never write the same file.

    The chief is the ``"chief"`` task, or worker 0 when the cluster has no chief (as in Keras'
    multi-worker guide); the task comes from the strategy's cluster resolver (``TF_CONFIG``).
    """
    if output_dir is None:
        return None
    out = Path(output_dir)
    resolver = getattr(strategy, "cluster_resolver", None) if strategy is not None else None
    task_type = getattr(resolver, "task_type", None)
    task_id = getattr(resolver, "task_id", None)
    if task_type is None or task_type == "chief":
        return out
    cluster = resolver.cluster_spec().as_dict() if hasattr(resolver, "cluster_spec") else {}
    if task_type == "worker" and (task_id or 0) == 0 and "chief" not in cluster:
        return out
    return out / f"{task_type}_{task_id}"


def train_qat(model, x_train, y_train, *, x_val=None, y_val=None, epochs: int = 3, batch_size: int = 32,
              learning_rate: float = 2e-4, freeze_bn_epoch: int | None = 1, freeze_ranges_epoch: int | None = None,
              calibration: str = "minmax", output_dir=None, seed: int = 0, verbose: int = 1, strategy=None,
              bn_folding: str = "unfolded"):
    """Quantization-aware fine-tuning of a trained float model.

    Args:
        model: a trained Keras model (or path).
        x_train, y_train: training data (integer class labels: sparse cross-entropy).
        x_val, y_val: optional validation data; the INT8 TFLite accuracy on it is logged per epoch.
        epochs: QAT epochs.
        batch_size: batch size (global: split over the replicas under a strategy).
        learning_rate: Adam learning rate (fine-tuning: small).
        freeze_bn_epoch: freeze BatchNorm statistics after this epoch (None: never).
        freeze_ranges_epoch: freeze activation ranges after this epoch (None: never).
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

    Returns:
        ``(qat_model, tflite_bytes, history)`` (``history`` is the ``keras.callbacks.History``).
    """
    import contextlib

    import keras

    import tfq
    from tfq import callbacks as cb
    from tfq.fileio import atomic_write_bytes

    keras.utils.set_random_seed(seed)
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        qat = tfq.qat.quantize_model(model, calibration_data=x_train[:512], calibration=calibration,
                                     bn_folding=bn_folding)
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
        history = _fit_distributed(qat, strategy, x_train, y_train, epochs, batch_size, seed, callbacks, verbose)
    content = tfq.convert(qat, "int8")
    if out is not None:
        qat.save(out / "qat.keras")
        atomic_write_bytes(out / "qat_int8.tflite", content)
    return qat, content, history


def _fit_distributed(model, strategy, x, y, epochs: int, batch_size: int, seed: int, callbacks, verbose: int):
    """``model.fit`` for a strategy: one ``strategy.run`` per global batch, Keras callbacks per epoch.

    The data are shuffled with ``seed`` (identically on every worker), cut into global batches
    (the last partial one dropped, so every replica gets the same share) and sharded by data
    (``AutoShardPolicy.DATA``): replica ``r`` of step ``k`` gets the ``r``-th slice of global
    batch ``k``, the same samples a single process sees in its step ``k``.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise ValueError(f"batch_size must be a multiple of the {replicas} replicas in sync. "
                         f"Received: batch_size={batch_size}")
    if len(x) < batch_size:
        raise ValueError(f"need at least one full batch of {batch_size} samples. Received: {len(x)} samples")
    dataset = tf.data.Dataset.from_tensor_slices((np.asarray(x), np.asarray(y)))
    dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True).batch(batch_size, drop_remainder=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    distributed = strategy.experimental_distribute_dataset(dataset.with_options(options))
    optimizer = model.optimizer
    loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction=None)

    def step(xb, yb):
        with tf.GradientTape() as tape:
            prediction = model(xb, training=True)
            loss = tf.nn.compute_average_loss(loss_fn(yb, prediction), global_batch_size=batch_size)
        variables = model.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(prediction, -1), tf.cast(tf.reshape(yb, [-1]), tf.int64)),
                                        tf.float32))
        return loss, correct

    @tf.function
    def train_step(xb, yb):
        loss, correct = strategy.run(step, args=(xb, yb))
        return (strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
                strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None))

    history = keras.callbacks.History()
    callback_list = keras.callbacks.CallbackList([*callbacks, history], model=model)
    callback_list.on_train_begin()
    steps = len(x) // batch_size
    for epoch in range(epochs):
        callback_list.on_epoch_begin(epoch)
        total_loss, total_correct = 0.0, 0.0
        for xb, yb in distributed:
            loss, correct = train_step(xb, yb)
            total_loss += float(loss)
            total_correct += float(correct)
        logs = {"loss": total_loss / steps, "accuracy": total_correct / (steps * batch_size)}
        callback_list.on_epoch_end(epoch, logs)
        if verbose:
            print(f"epoch {epoch + 1}/{epochs}: " + json.dumps({k: round(float(v), 4) for k, v in logs.items()}),
                  flush=True)
    callback_list.on_train_end()
    return history
