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
import warnings

import keras

from tfq.models.graph import ModelGraph
from tfq.quantsim.layers import ActivationQuantizer, activation_name

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
        from_logits: whether both models output logits. None (default): read from the models'
            output layers — a softmax or sigmoid activation (or ``Softmax`` layer) outputs
            probabilities, a linear one logits; a model whose output tells neither (a subclassed
            model, a ReLU output …), or a teacher and student that differ, are refused: pass
            ``from_logits`` then. An explicit True/False is used as given (with a warning if the
            output layers say otherwise).

    Raises:
        TypeError: student or teacher is not a Keras model; ``from_logits`` not a bool or None.
        ValueError: ``temperature`` <= 0, ``alpha`` outside [0, 1], output shapes or input shapes that
            differ, ``from_logits=None`` and the models do not tell (or disagree).

    Example:
        >>> distiller = Distiller(student=tfq.qat.quantize_model(small), teacher=big)   # doctest: +SKIP
        >>> distiller.compile(keras.optimizers.Adam(5e-4), metrics=["accuracy"])         # doctest: +SKIP
        >>> distiller.fit(x_train, y_train, epochs=3)                                    # doctest: +SKIP
    """

    def __init__(self, student, teacher, temperature: float = 4.0, alpha: float = 0.1,
                 from_logits: bool | None = None, **kwargs):
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
            raise TypeError(f"from_logits must be True, False or None (read from the models). "
                            f"Received: from_logits={from_logits!r}")
        s_shape, t_shape = _output_shape(student), _output_shape(teacher)
        if s_shape is not None and t_shape is not None and s_shape[-1] != t_shape[-1]:
            raise ValueError(f"student and teacher must predict the same classes. Received output shapes {s_shape} "
                             f"(student) and {t_shape} (teacher).")
        _check_input_shapes(student, teacher)
        from_logits = _resolve_from_logits(student, teacher, from_logits)
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


def _input_shapes(model):
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    return [tuple(t.shape[1:]) for t in inputs] if inputs else None


def _check_input_shapes(student, teacher) -> None:
    """The teacher sees the student's inputs: their input shapes must match (None matches any size)."""
    s_shapes, t_shapes = _input_shapes(student), _input_shapes(teacher)
    if s_shapes is None or t_shapes is None:
        return
    compatible = len(s_shapes) == len(t_shapes) and all(
        len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))
        for a, b in zip(s_shapes, t_shapes))
    if not compatible:
        shown = (lambda shapes: shapes[0] if len(shapes) == 1 else shapes)
        raise ValueError(f"student and teacher must take the same inputs (the teacher is called on the student's "
                         f"batches). Received input shapes {shown(s_shapes)} (student) and {shown(t_shapes)} (teacher).")


_PASSTHROUGH = (keras.layers.Dropout, keras.layers.Identity, keras.layers.Reshape, keras.layers.Flatten,
                keras.layers.GaussianNoise, keras.layers.GaussianDropout, keras.layers.ActivityRegularization,
                ActivationQuantizer)


def _output_kind(model) -> str | None:
    """``"probabilities"``, ``"logits"`` or None (cannot tell) for a single-output model, from its output layer.

    A softmax or sigmoid activation (fused in the layer, an ``Activation`` layer, a ``Softmax``
    layer or ``keras.ops.softmax``) gives probabilities; a linear activation logits. Layers that
    only pass the values on (Dropout, Reshape, a tfq activation quantizer …) are looked through,
    nested models entered. Read from the model's config (:class:`tfq.models.graph.ModelGraph`).

    Example:
        >>> _output_kind(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]))   # doctest: +SKIP
        'logits'
    """
    try:
        graph = ModelGraph(model)
    except (ValueError, TypeError, AttributeError):
        return None
    if len(graph.outputs) != 1:
        return None
    key = next(iter(graph.outputs))
    for _ in range(64):
        node = graph.producer(key)
        layer = node.layer if node is not None else None
        if layer is None:
            return None
        if isinstance(layer, keras.Model):
            return _output_kind(layer)
        if isinstance(layer, keras.layers.Softmax) or type(layer).__name__ in ("Softmax", "Sigmoid"):
            return "probabilities"
        if isinstance(layer, _PASSTHROUGH) and node.first_input is not None:
            key = node.first_input
            continue
        if hasattr(layer, "activation"):
            name = activation_name(layer.activation)
            if name in ("softmax", "sigmoid", "log_softmax"):
                return "probabilities" if name != "log_softmax" else None
            return "logits" if name == "linear" else None
        return None
    return None


def _resolve_from_logits(student, teacher, from_logits) -> bool:
    """``from_logits`` as given (a warning if the models say otherwise), or read from both models' outputs."""
    if from_logits is not None and not isinstance(from_logits, bool):
        raise TypeError(f"from_logits must be True, False or None (read from the models). "
                        f"Received: from_logits={from_logits!r} ({type(from_logits).__name__})")
    kinds = {"student": _output_kind(student), "teacher": _output_kind(teacher)}
    if from_logits is not None:
        said = "logits" if from_logits else "probabilities"
        other = sorted(name for name, kind in kinds.items() if kind is not None and kind != said)
        if other:
            whose = " and the ".join(f"{name}'s" for name in other)
            verb = "layers give" if len(other) > 1 else "layer gives"
            warnings.warn(f"Distiller(from_logits={from_logits}) reads the outputs as {said}, but the {whose} output {verb} "
                          f"{kinds[other[0]]}: check from_logits (None reads it from the models).", stacklevel=3)
        return from_logits
    unknown = [name for name, kind in kinds.items() if kind is None]
    if unknown:
        raise ValueError(f"Distiller cannot tell whether the {' and '.join(unknown)} output{'' if len(unknown) > 1 else 's'} "
                         f"logits or probabilities (no softmax, sigmoid or linear activation on the output "
                         f"layer): pass from_logits=True (logits) or from_logits=False (probabilities).")
    if kinds["student"] != kinds["teacher"]:
        raise ValueError(f"the student outputs {kinds['student']} but the teacher {kinds['teacher']}: give both the same "
                         f"output (e.g. both a softmax layer, or both linear logits). Received: from_logits=None.")
    return kinds["student"] == "logits"
