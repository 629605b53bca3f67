"""Distribution: the ``tf.distribute`` strategy a QAT job runs under, where each worker writes, and the
training loop used under a strategy.

Under a strategy a job trains with its own loop (``strategy.run`` per step) instead of ``Model.fit``,
because Keras 3.15's ``fit`` fails under ``MultiWorkerMirroredStrategy`` (it reduces the first data
batch across workers to build the model, which that strategy cannot do for a tuple).
"""

from __future__ import annotations

import json
from pathlib import Path

from tfq.core.logs import logger, verbosity

__all__ = ["STRATEGIES", "fit_distributed", "make_strategy", "worker_output_dir"]

STRATEGIES = ("none", "mirrored", "multi_worker", "tpu")


def make_strategy(name: str, tpu: str = ""):
    """The ``tf.distribute`` strategy a QAT job runs under; call it first thing in the program.

    ``"none"`` gives None (one process, ``Model.fit``); ``"mirrored"``: the local devices;
    ``"multi_worker"``: ``MultiWorkerMirroredStrategy``, the cluster and this worker's task from
    ``TF_CONFIG`` (it must exist before TensorFlow runs any op); ``"tpu"``: ``TPUStrategy`` on the
    TPU named ``tpu`` (``""``: the local TPU VM / pod slice, found by ``TPUClusterResolver``).

    Raises:
        ValueError: an unknown name.

    Example:
        >>> strategy = make_strategy("multi_worker")  # doctest: +SKIP
        >>> qat, tflite, history = train_qat(model, x, y, strategy=strategy)  # doctest: +SKIP
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}. Received: strategy={name!r}")
    if name == "none":
        return None
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


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


def fit_distributed(model, strategy, x, y, epochs: int, batch_size: int, seed: int, callbacks, verbose: int):
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
            with verbosity(True):
                logger.info(f"epoch {epoch + 1}/{epochs}: " +
                            json.dumps({k: round(float(v), 4) for k, v in logs.items()}))
    callback_list.on_train_end()
    return history
