"""Training with Keras ``fit``: tfq's callbacks (QAT and pruning), the QAT and pruning jobs that end in
an INT8 ``.tflite``, and running them under a ``tf.distribute`` strategy.

Example:
    >>> qat, tflite, history = tfq.training.train_qat(model, x_train, y_train, epochs=2)  # doctest: +SKIP
"""

from tfq.training.distribute import STRATEGIES, make_strategy, worker_output_dir
from tfq.training.jobs import prune_and_quantize, train_qat

__all__ = ["STRATEGIES", "make_strategy", "prune_and_quantize", "train_qat", "worker_output_dir"]
