"""Knowledge distillation: train a small student on a large teacher's softened predictions.

:class:`Distiller` is a Keras model that ``compile``/``fit`` train like any other; only the
student's weights move. The student may be a tfq QAT model (its fake-quant ranges and folded BN
train as usual) and the teacher a float model, so a student is distilled straight into the INT8
model it will ship as.

Example:
    >>> distiller = tfq.distillation.Distiller(student=small, teacher=big, temperature=4.0, alpha=0.1)  # doctest: +SKIP
    >>> distiller.compile(keras.optimizers.Adam(1e-3), metrics=["accuracy"])                            # doctest: +SKIP
    >>> distiller.fit(x_train, y_train, epochs=10)                                                      # doctest: +SKIP
    >>> tflite = tfq.convert(distiller.student, "int8", x_train[:300])                                  # doctest: +SKIP
"""

from __future__ import annotations

import math

import keras

__all__ = ["Distiller", "distillation_loss"]

_EPSILON = 1e-7


def _log_probabilities(outputs, from_logits: bool):
    """log-softmax of logits, or the log of probabilities (clipped away from 0).

    Probabilities from a Keras softmax carry their logits (``_keras_logits``, in a traced step),
    also through a tfq fake-quant of the softmax output: the log-softmax of those is exact where
    the log of a probability on the int8 output grid would be clipped, with no gradient.
    """
    if not from_logits and hasattr(outputs, "_keras_logits"):
        outputs, from_logits = outputs._keras_logits, True
    outputs = keras.ops.convert_to_tensor(outputs, "float32")
    if from_logits:
        return keras.ops.log_softmax(outputs, axis=-1)
    return keras.ops.log(keras.ops.clip(outputs, _EPSILON, 1.0))


def distillation_loss(teacher_outputs, student_outputs, temperature: float = 4.0, from_logits: bool = False):
    """``T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))``, averaged over the batch (Hinton et al. 2015).

    ``z`` are logits; with ``from_logits=False`` the outputs are probabilities and ``z = log p``
    (``softmax(log p / T)`` is the same as ``softmax(z / T)``: softmax ignores the shift). The ``T²``
    keeps the gradient scale of the soft term independent of ``T``.

    Example:
        >>> float(distillation_loss([[0.7, 0.3]], [[0.7, 0.3]]))   # identical predictions
        0.0
    """
    log_t = keras.ops.log_softmax(_log_probabilities(teacher_outputs, from_logits) / temperature, axis=-1)
    log_s = keras.ops.log_softmax(_log_probabilities(student_outputs, from_logits) / temperature, axis=-1)
    kl = keras.ops.sum(keras.ops.exp(log_t) * (log_t - log_s), axis=-1)
    return keras.ops.mean(kl) * (temperature ** 2)


@keras.saving.register_keras_serializable(package="tfq")
class Distiller(keras.Model):
    """A student trained on ``alpha · hard loss + (1 − alpha) · T² · KL(teacher ‖ student at T)``.

    The hard loss is the one given to :meth:`compile` (default: sparse categorical cross-entropy,
    with ``from_logits`` as set here) on the labels; the soft term is :func:`distillation_loss`. The
    teacher runs in inference mode and is never trained (its weights are not among the
    distiller's trainable weights; the caller's teacher is not modified). The student is the model
    being trained: like ``student.fit``, distilling updates its weights in place. ``distiller(x)`` and
    ``predict`` are the student's; metrics given to ``compile`` are the student's on the labels.
    The logs hold ``loss`` (the total), ``student_loss`` and ``distillation_loss``.

    Args:
        student: the Keras model to train (a float or tfq QAT model).
        teacher: a trained Keras model with the same output shape.
        temperature: ``T`` > 0 (softer targets for larger ``T``).
        alpha: weight of the hard-label loss, in [0, 1].
        from_logits: whether both models output logits (default False: probabilities, e.g. a
            softmax output layer).

    Raises:
        TypeError: student or teacher is not a Keras model.
        ValueError: ``temperature`` <= 0, ``alpha`` outside [0, 1], output shapes that differ.

    Example:
        >>> distiller = Distiller(student=tfq.qat.quantize_model(small), teacher=big)   # doctest: +SKIP
        >>> distiller.compile(keras.optimizers.Adam(5e-4), metrics=["accuracy"])         # doctest: +SKIP
        >>> distiller.fit(x_train, y_train, epochs=3)                                    # doctest: +SKIP
    """

    def __init__(self, student, teacher, temperature: float = 4.0, alpha: float = 0.1, from_logits: bool = False,
                 **kwargs):
        if isinstance(student, dict):
            student = keras.saving.deserialize_keras_object(student)
        if isinstance(teacher, dict):
            teacher = keras.saving.deserialize_keras_object(teacher)
        for name, m in (("student", student), ("teacher", teacher)):
            if not isinstance(m, keras.Model):
                raise TypeError(f"{name} must be a Keras 3 model. Received: {type(m).__name__}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be a number > 0. Received: temperature={temperature!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1]. Received: alpha={alpha!r}")
        if from_logits is not None and not isinstance(from_logits, bool):
            raise TypeError(f"from_logits must be True or False. Received: from_logits={from_logits!r}")
        s_shape, t_shape = _output_shape(student), _output_shape(teacher)
        if s_shape is not None and t_shape is not None and s_shape[-1] != t_shape[-1]:
            raise ValueError(f"student and teacher must predict the same classes. Received output shapes {s_shape} "
                             f"(student) and {t_shape} (teacher).")
        kwargs.setdefault("name", "distiller")
        super().__init__(**kwargs)
        self.student = student
        self.teacher = teacher
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.from_logits = bool(from_logits)
        self.student_loss_tracker = keras.metrics.Mean(name="student_loss")
        self.distillation_loss_tracker = keras.metrics.Mean(name="distillation_loss")

    @property
    def trainable_weights(self):
        return self.student.trainable_weights

    @property
    def trainable_variables(self):
        return self.student.trainable_weights

    def compile(self, optimizer="adam", loss=None, metrics=None, **kwargs):
        """``keras.Model.compile``; ``loss`` is the hard-label loss (default sparse categorical cross-entropy)."""
        if loss is None:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=self.from_logits)
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        hard = super().compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)
        teacher_pred = keras.ops.stop_gradient(self.teacher(x, training=False))
        soft = distillation_loss(teacher_pred, y_pred, self.temperature, self.from_logits)
        self.student_loss_tracker.update_state(hard)
        self.distillation_loss_tracker.update_state(soft)
        return self.alpha * hard + (1.0 - self.alpha) * soft

    def get_config(self):
        return {
            "name": self.name,
            "student": keras.saving.serialize_keras_object(self.student),
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "temperature": self.temperature,
            "alpha": self.alpha,
            "from_logits": self.from_logits,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _output_shape(model):
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        return None
    if not outputs or len(outputs) != 1:
        return None
    return tuple(outputs[0].shape)
