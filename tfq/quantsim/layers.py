"""Keras layers that insert fake-quant ops where TFLite quantizes.

* :class:`ActivationQuantizer` fake-quantizes a tensor with a per-tensor range that is fixed
  (from calibration), tracked by moving average during training, or learned.
* :class:`QuantizedLayer` wraps a weighted layer (Dense, Conv1D/2D/3D, DepthwiseConv2D,
  SeparableConv1D/2D, Conv1D/2DTranspose), optionally with the BatchNormalization that follows
  it folded in the way the TFLite converter folds it, and computes the layer's op on
  fake-quantized weights (symmetric, narrow range, per output channel by default).

The ranges become the tensors' scales when the TFLite converter meets the
``FakeQuantWithMinMaxVars(PerChannel)`` ops these layers emit.
"""

from __future__ import annotations

import weakref

import keras
import numpy as np
import tensorflow as tf

from tfq.core.process_lock import PROCESS_LOCK
from tfq.numerics import ops

# QuantizedLayer.from_config: the wrappers deserialized last, by name (a later call site of a shared
# layer finds the first one's layer here).
_DESERIALIZED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

__all__ = [
    "ActivationQuantizer",
    "FloatBarrier",
    "INT8_ACTIVATIONS",
    "QuantizedLayer",
    "QuantizedNormalization",
    "QuantizedWeight",
    "RANGE_MODES",
    "Statistic",
    "WEIGHTED_LAYER_TYPES",
    "observing",
    "tapping",
]

RANGE_MODES = ("fixed", "moving_average", "learned")
PRESERVE_MODES = (None, "sparsity", "clusters")
MAX_CLUSTERS = 256  # shared values a cluster-preserving kernel may hold

# How a folded BatchNormalization trains before its statistics freeze (see QuantizedLayer).
BN_FOLDING = ("unfolded", "two_pass")
# Range of the quantizer on a softmax's input (the logits), see rewrite_model(logits_range=...).
LOGITS_RANGES = ("tensor", "softmax")
# ActivationQuantizer(calibration=...): None follows the calibration method.
QUANTIZER_CALIBRATIONS = (None, "minmax", "softmax_input")
_TINY = 1e-30

# While calibrating (see :func:`observing`), quantizers feed observers and pass data through
# unchanged, and weights stay float: statistics are those of the float model, as in TFLite.
_OBSERVERS: dict[int, object] | None = None


class observing:
    """Context manager: quantizers (by ``id``) feed these observers; the model runs in float.

    The model must be called eagerly inside the context.

    Example:
        >>> with observing({id(q): MinMaxObserver() for q in quantizers}):   # doctest: +SKIP
        ...     model(batch)
    """

    def __init__(self, observers: dict[int, object]):
        self.observers = observers

    def __enter__(self):
        global _OBSERVERS
        PROCESS_LOCK.acquire()  # module state: one observing pass in the process at a time
        _OBSERVERS = self.observers
        return self

    def __exit__(self, *exc):
        global _OBSERVERS
        _OBSERVERS = None
        PROCESS_LOCK.release()
        return False


# While tapping (see :func:`tapping`), QuantizedLayer wrappers record what they compute.
_TAPS: dict[int, dict] | None = None


class tapping:
    """Context manager: the given :class:`QuantizedLayer` wrappers record their inputs and outputs.

    Each call of a tapped wrapper appends its input tensor to ``records[id(layer)]["inputs"]`` and
    its output before the activation (after BatchNorm folding, bias added) to
    ``records[id(layer)]["pre_activation"]``. Tensors are kept as they are (inside a
    ``tf.GradientTape`` they carry gradients). The model must be called eagerly inside the context.

    Example:
        >>> with tapping([wrapper]) as records:          # doctest: +SKIP
        ...     model(batch)
        >>> x = records[id(wrapper)]["inputs"][0]       # doctest: +SKIP
    """

    def __init__(self, layers):
        self.records = {id(layer): {"inputs": [], "pre_activation": []} for layer in layers}

    def __enter__(self):
        global _TAPS
        PROCESS_LOCK.acquire()  # module state: one tapping pass in the process at a time
        _TAPS = self.records
        return self.records

    def __exit__(self, *exc):
        global _TAPS
        _TAPS = None
        PROCESS_LOCK.release()
        return False


# Activations that TFLite fuses into the preceding op (no quantized tensor in between).
FUSABLE_ACTIVATIONS = ("linear", "relu", "relu6")

# Activations the TFLite converter turns into one op with an int8 kernel (checked through the
# converter for each). The others (elu, selu, softplus, mish, hard_sigmoid …) decompose into
# ops on unquantized intermediate tensors, so they stay float.
INT8_ACTIVATIONS = FUSABLE_ACTIVATIONS + (
    "sigmoid", "tanh", "softmax", "log_softmax", "swish", "silu", "hard_swish", "hard_silu", "gelu",
    "gelu_approximate",  # keras-hub's (GPT-2, BERT): TFLite's GELU with approximate=True
    "leaky_relu", "hard_tanh", "exponential",
)

WEIGHTED_LAYER_TYPES = (
    keras.layers.Dense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv1D,
    keras.layers.SeparableConv2D,
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.EinsumDense,
)


def _no_autocast(kwargs: dict) -> dict:
    """Layer kwargs with Keras autocasting off: under a mixed-precision policy the quantization
    maths (ranges, fake-quant, BN folding) stay float32; :class:`QuantizedLayer` runs only its op
    in the compute dtype."""
    return dict(kwargs, autocast=False)


def _compute_dtype(layer) -> str:
    """The compute dtype of a wrapped layer (float16/bfloat16 under a mixed-precision policy)."""
    return keras.backend.standardize_dtype(getattr(layer, "compute_dtype", "float32"))


def activation_name(activation) -> str:
    """Name of a Keras activation (function, string or None)."""
    if activation is None:
        return "linear"
    if isinstance(activation, str):
        return activation
    return keras.activations.serialize(activation) if not hasattr(activation, "__name__") else activation.__name__


def _gelu_approximate(x):
    return keras.activations.gelu(x, approximate=True)


# Activations of other Keras libraries by the name they serialize under (keras.activations.get knows
# Keras's own only).
_NAMED_ACTIVATIONS = {"gelu_approximate": _gelu_approximate}


def activation_function(name: str):
    """The function of an activation name of :data:`INT8_ACTIVATIONS` (or any Keras one)."""
    return _NAMED_ACTIVATIONS.get(name) or keras.activations.get(name)


def preserve_mode_for(layer, preserve: str | None) -> str | None:
    """``preserve`` if ``layer``'s main kernel has something to keep (zeros; at most 256 distinct values), else None."""
    if preserve is None or not isinstance(layer, WEIGHTED_LAYER_TYPES):
        return None
    kernel = keras.ops.convert_to_numpy(layer.pointwise_kernel if isinstance(layer, _SEPARABLE) else layer.kernel)
    if preserve == "sparsity":
        return preserve if np.any(kernel == 0) else None
    return preserve if len(np.unique(kernel)) <= MAX_CLUSTERS else None


def _replica_context():
    """The replica context when running in one replica of several (tf.distribute), else None."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return None
    ctx = tf.distribute.get_replica_context()
    return ctx if ctx is not None and ctx.num_replicas_in_sync > 1 else None


def _replica_max(value):
    """``value`` (a scalar) maximised over the replicas in sync; ``value`` itself without a strategy."""
    ctx = _replica_context()
    if ctx is None:
        return value
    return tf.reduce_max(ctx.all_gather(tf.reshape(value, [1]), axis=0))


def _replica_moments(mean, variance):
    """Mean and variance over the whole global batch from equal-sized per-replica moments."""
    ctx = _replica_context()
    if ctx is None:
        return mean, variance
    global_mean = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, mean)
    second_moment = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, variance + tf.square(mean))
    return global_mean, tf.maximum(second_moment - tf.square(global_mean), 0.0)


def _keep_logits(probabilities, quantized):
    """``quantized`` carrying the logits Keras' softmax/sigmoid attached to ``probabilities``.

    Keras computes a crossentropy on a softmax or sigmoid output from the logits it finds on the
    tensor (``_keras_logits``). After a fake-quant the loss would see probabilities on the int8
    output grid instead: clipped to [1e-7, 1 − 1e-7] with no gradient where a wrong prediction
    rounds to 0 (p < 1/512), and the gradient of a 1/256-step quantity elsewhere. The fake-quant
    is kept in the forward pass (what the INT8 model outputs); the loss sees the fake-quantized
    logits, as in float training and in tfmot (which applies softmax after its last quantizer).
    """
    logits = getattr(probabilities, "_keras_logits", None)
    if logits is not None and quantized is not probabilities:
        try:
            quantized._keras_logits = tf.cast(logits, tf.float32)
        except AttributeError:  # eager tensors take no attributes; eager losses are not traced
            pass
    return quantized


@keras.saving.register_keras_serializable(package="tfq")
class ActivationQuantizer(keras.layers.Layer):
    """Per-tensor fake-quant of an activation.

    Range modes:

    * ``"fixed"``: ``fixed_range=(min, max)`` from calibration; never changes (PTQ, export).
    * ``"moving_average"``: in training, ``min ← decay·min + (1 − decay)·min(batch)`` (same for
      max); the first batch initialises the range. Frozen ranges stop updating (``frozen`` is a
      variable, so this works inside a compiled ``fit``). Under ``tf.distribute``, ``min(batch)``
      and ``max(batch)`` are taken over the global batch (all replicas), so replicas agree.
    * ``"learned"``: ``min``/``max`` are trainable; TF's fake-quant op gives them the gradient of
      the clipped values (straight-through for the rest).

    The range used is widened to contain 0.0 and made symmetric when ``symmetric`` (int16
    activations), following :func:`tfq.ops.prepare_range`. Until a moving-average range has seen
    a batch, the layer passes its input through unchanged.

    Args:
        bits: 2..16.
        symmetric: symmetric range (zero-point 0).
        narrow_range: grid without its lowest value.
        mode: one of :data:`RANGE_MODES`.
        decay: moving-average decay in (0, 1).
        fixed_range: ``(min, max)``; required for ``"fixed"``, initial range otherwise.
        calibration: ``"minmax"`` to calibrate this tensor by MinMax whatever the method (a
            statistic such as a LayerNormalization variance, where any clipping biases whole
            tokens); ``"softmax_input"`` for the logits of a softmax over the last axis: the
            range is what the ``bits``-bit softmax output depends on (see
            :func:`tfq.ops.softmax_input_range`), in calibration and in the moving average; None to
            follow the calibration method.
    """

    def __init__(
        self,
        bits: int = 8,
        symmetric: bool = False,
        narrow_range: bool = False,
        mode: str = "moving_average",
        decay: float = 0.999,
        fixed_range: tuple[float, float] | None = None,
        calibration: str | None = None,
        **kwargs,
    ):
        super().__init__(**_no_autocast(kwargs))
        if calibration not in QUANTIZER_CALIBRATIONS:
            raise ValueError(f"ActivationQuantizer calibration must be one of {QUANTIZER_CALIBRATIONS}. "
                             f"Received: calibration={calibration!r}")
        if mode not in RANGE_MODES:
            raise ValueError(f"ActivationQuantizer mode must be one of {RANGE_MODES}. Received: mode={mode!r}")
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"decay must be in (0, 1). Received: decay={decay!r}")
        if mode == "fixed" and fixed_range is None:
            raise ValueError("ActivationQuantizer(mode='fixed') needs fixed_range=(min, max). Received: None")
        if fixed_range is not None:
            lo, hi = (float(v) for v in fixed_range)
            if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
                raise ValueError(f"fixed_range must be finite with min <= max. Received: fixed_range={fixed_range!r}")
            fixed_range = (lo, hi)
        ops.qrange(bits)  # validates bits
        self.bits = int(bits)
        self.symmetric = bool(symmetric)
        self.narrow_range = bool(narrow_range)
        self.mode = mode
        self.decay = float(decay)
        self.fixed_range = fixed_range
        self.calibration = calibration
        self.supports_masking = True

    def build(self, input_shape):
        if self.mode == "fixed":
            self.built = True
            return
        lo, hi = self.fixed_range or (0.0, 0.0)
        trainable = self.mode == "learned"
        self.range_min = self.add_weight(
            name="range_min", shape=(), initializer=keras.initializers.Constant(lo), trainable=trainable
        )
        self.range_max = self.add_weight(
            name="range_max", shape=(), initializer=keras.initializers.Constant(hi), trainable=trainable
        )
        self.initialized = self.add_weight(
            name="initialized",
            shape=(),
            initializer=keras.initializers.Constant(1.0 if self.fixed_range else 0.0),
            trainable=False,
        )
        self.frozen = self.add_weight(name="frozen", shape=(), initializer="zeros", trainable=False)
        self.built = True

    # -- range handling ------------------------------------------------------------------------
    def _usable_range(self, lo, hi):
        lo = tf.minimum(lo, 0.0)
        hi = tf.maximum(hi, 0.0)
        if self.symmetric:
            qmin, qmax = ops.qrange(self.bits, signed=True, narrow_range=self.narrow_range)
            m = tf.maximum(tf.maximum(-lo, hi), ops.MIN_RANGE)
            return -m, m * (qmax / -qmin)
        return lo, tf.maximum(hi, lo + ops.MIN_RANGE)

    def current_range(self) -> tuple[float, float]:
        """The float range (before nudging) that the fake-quant uses now."""
        if self.mode == "fixed":
            lo, hi = ops.prepare_range(*self.fixed_range, symmetric=self.symmetric,
                                       narrow_range=self.narrow_range, bits=self.bits)
            return float(lo), float(hi)
        lo, hi = self._usable_range(tf.convert_to_tensor(self.range_min), tf.convert_to_tensor(self.range_max))
        return float(lo), float(hi)

    def set_range(self, min_val: float, max_val: float) -> None:
        """Sets the range (for calibration initialisation); marks it initialised."""
        if self.mode == "fixed":
            raise ValueError("set_range is for 'moving_average'/'learned' quantizers; this one is 'fixed'.")
        self.range_min.assign(float(min_val))
        self.range_max.assign(float(max_val))
        self.initialized.assign(1.0)

    def call(self, inputs, training=None):
        return _keep_logits(inputs, self._fake_quant(inputs, training))

    def _fake_quant(self, inputs, training):
        x = tf.convert_to_tensor(inputs)
        if x.dtype != tf.float32:
            x = tf.cast(x, tf.float32)
        if _OBSERVERS is not None:
            observer = _OBSERVERS.get(id(self))
            if observer is not None:
                observer.update(x.numpy())
            return x
        if self.mode == "fixed":
            lo, hi = ops.prepare_range(*self.fixed_range, symmetric=self.symmetric,
                                       narrow_range=self.narrow_range, bits=self.bits)
            return ops.fake_quant(x, float(lo), float(hi), self.bits, self.narrow_range)
        if training and self.mode == "moving_average":
            # The update initialises the range on the first batch, so no pass-through select.
            x_ = tf.stop_gradient(x)
            batch = (ops.softmax_input_range(x_, self.bits) if self.calibration == "softmax_input"
                     else (tf.reduce_min(x_), tf.reduce_max(x_)))
            lo, hi = self._usable_range(*self._update_moving_average(*batch))
            return ops.fake_quant(x, lo, hi, self.bits, self.narrow_range)
        lo, hi = self._usable_range(tf.convert_to_tensor(self.range_min), tf.convert_to_tensor(self.range_max))
        quantized = ops.fake_quant(x, lo, hi, self.bits, self.narrow_range)
        return tf.where(self.initialized > 0.5, quantized, x)

    def takes_relu(self, training) -> bool:
        """Whether :meth:`relu_fake_quant` can stand for ``self(relu(x), training)`` (see there)."""
        return bool(training) and self.mode == "moving_average" and not self.symmetric and _OBSERVERS is None

    def relu_fake_quant(self, x, cap: float | None = None):
        """``self(min(max(x, 0), cap), training=True)`` with one gradient op for the pair.

        For a ReLU (``cap`` None) or ReLU6 (``cap`` 6) fused before this (asymmetric,
        moving-average) quantizer. The ReLU's output minimum is taken as 0 (its range's lower
        end is 0 whatever it is) and its maximum is ``clip(max(x), 0, cap)``, so ``x`` is reduced
        once; the gradient of ReLU then straight-through fake-quant, which passes where
        ``0 < x < min(hi, cap)`` (up to the nudging of ``hi``), is one ``Relu6Grad`` on ``x``
        rescaled, instead of the fake-quant gradient op (which also reduces the tensor for the
        range's gradients, unused here) and the ReLU's.
        """
        batch_max = tf.maximum(tf.reduce_max(tf.stop_gradient(x)), 0.0)
        if cap is not None:
            batch_max = tf.minimum(batch_max, cap)
        lo, hi = self._usable_range(*self._update_moving_average(tf.zeros([]), batch_max))
        lo, hi = tf.stop_gradient(lo), tf.stop_gradient(hi)
        top = hi if cap is None else tf.minimum(hi, cap)
        bits, narrow = self.bits, self.narrow_range

        @tf.custom_gradient
        def relu_then_fake_quant(v):
            if cap is None:
                clipped = tf.nn.relu(v)
            else:
                clipped = tf.nn.relu6(v) if cap == 6.0 else tf.minimum(tf.nn.relu(v), cap)
            y = ops.fake_quant(clipped, lo, hi, bits, narrow)
            return y, lambda dy: tf.raw_ops.Relu6Grad(gradients=dy, features=v * (6.0 / top))

        return relu_then_fake_quant(x)

    def _update_moving_average(self, batch_min, batch_max):
        """Updates the range from the batch's min/max and returns it (min, max), not differentiated."""
        # Under tf.distribute every replica sees its own slice of the batch: use the global
        # min/max so that all replicas keep the same range.
        if _replica_context() is not None:
            batch_min = -_replica_max(-batch_min)
            batch_max = _replica_max(batch_max)
        # weight of the old range: 0 on the first batch (even if frozen), 1 once frozen, else decay
        # (the flags are 0.0 or 1.0)
        old_weight = self.initialized * tf.maximum(self.frozen, self.decay)
        new_min = old_weight * self.range_min + (1.0 - old_weight) * batch_min
        new_max = old_weight * self.range_max + (1.0 - old_weight) * batch_max
        self.range_min.assign(new_min)
        self.range_max.assign(new_max)
        self.initialized.assign(1.0)
        return new_min, new_max

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_output_spec(self, inputs, training=None):
        # float32 under any dtype policy (mixed precision): the quantization maths are float32.
        return keras.KerasTensor(self.compute_output_shape(inputs.shape), dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update(
            bits=self.bits,
            symmetric=self.symmetric,
            narrow_range=self.narrow_range,
            mode=self.mode,
            decay=self.decay,
            fixed_range=list(self.fixed_range) if self.fixed_range is not None else None,
            calibration=self.calibration,
        )
        return config


@keras.saving.register_keras_serializable(package="tfq")
class FloatBarrier(keras.layers.Layer):
    """Marks the input of a layer kept in float inside an integer model: ``y = (−x)·(−1)``, exact.

    A NEG (no int8 kernel in TFLite) then a MUL by the constant −1 (which the converter does not fold
    into the NEG, as it folds two NEGs): the converter gives the NEG's output no integer range, so the
    MUL and the layer that follows compute in float with float weights, between a DEQUANTIZE and a
    QUANTIZE. Both are float ops that XNNPACK runs; the float16 round trip (two CASTs) used before
    XNNPACK does not, so each float layer split the delegated graph (a 32×32 4×Conv-BN-PReLU digits net
    with its PReLUs float, LiteRT on one thread: 5 XNNPACK partitions and 0.071 ms with CASTs, 1 partition
    and 0.031 ms with this barrier; the float model 0.058 ms).
    """

    def call(self, inputs):
        return tf.multiply(tf.negative(inputs), tf.constant(-1.0, inputs.dtype))

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="tfq")
class Statistic(keras.layers.Layer):
    """Identity marking a statistic in a decomposition (a mean, a variance, its rsqrt).

    The rewrite removes it and calibrates the tensor it marks by MinMax: clipping such a tensor
    biases every value normalised by it.
    """

    def call(self, inputs):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="tfq")
class QuantizedWeight(keras.layers.Layer):
    """A variable that an operation reads (``x * self.gamma`` in a layer tfq decomposed), held as a
    trainable copy and fake-quantized per tensor the way TFLite stores that constant:

    * ``symmetric`` (the weight of a matmul-like op): ``[−m, m]``, ``m = max|v|``, narrow range;
    * otherwise (a constant operand of MUL, ADD …): ``[min(v, 0), max(v, 0)]``, full range.

    It is called on a tensor of the graph only to be placed in it; its output is ``fq(value)``.

    Args:
        shape: the variable's shape.
        symmetric: see above.
        bits: integer bits.
        float_weights: no fake-quant (float export modes).
        value_trainable: whether the copy trains (as the variable it copies did).
    """

    def __init__(self, shape, symmetric: bool = False, bits: int = 8, float_weights: bool = False,
                 value_trainable: bool = True, **kwargs):
        super().__init__(**kwargs)
        ops.qrange(bits)
        self.value_shape = tuple(int(d) for d in shape)
        self.symmetric = bool(symmetric)
        self.bits = int(bits)
        self.float_weights = bool(float_weights)
        self.value_trainable = bool(value_trainable)

    def build(self, input_shape):
        self.value = self.add_weight(name="value", shape=self.value_shape, initializer="zeros",
                                     trainable=self.value_trainable)
        self.built = True

    def call(self, inputs):
        v = tf.convert_to_tensor(self.value)
        if self.float_weights or _OBSERVERS is not None:
            return v
        if self.symmetric:
            m = tf.maximum(tf.reduce_max(tf.abs(v)), ops.MIN_RANGE)
            return ops.fake_quant(v, -m, m, self.bits, narrow_range=True)
        lo = tf.minimum(tf.reduce_min(v), 0.0)
        hi = tf.maximum(tf.maximum(tf.reduce_max(v), 0.0), lo + ops.MIN_RANGE)
        return ops.fake_quant(v, lo, hi, self.bits)

    def compute_output_shape(self, input_shape):
        return self.value_shape

    def get_config(self):
        config = super().get_config()
        config.update(shape=list(self.value_shape), symmetric=self.symmetric, bits=self.bits,
                      float_weights=self.float_weights, value_trainable=self.value_trainable)
        return config


_TRANSPOSED = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose)
_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
# Weights the converter's fake-quant path takes per tensor only (TRANSPOSE_CONV).
_PER_TENSOR = _TRANSPOSED
# Per-channel weights the converter's fake-quant path cannot carry through the transpose it inserts
# for FULLY_CONNECTED ("mismatched quantized axes"): exported as float weights, which the converter
# quantizes per output channel itself, with the scale the fake-quant used (max|w| / 127).
_EXPORT_FLOAT_PER_CHANNEL = (keras.layers.Dense, keras.layers.EinsumDense)


def _einsum_contraction(equation: str) -> int | None:
    """``k`` when an einsum ``x, kernel -> y`` is a matmul on 2-D views: the input's last ``k`` axes
    are the kernel's first ``k`` (same order), and the output is the input's other axes followed
    by the kernel's remaining ones. None otherwise."""
    if "." in equation:
        return None
    inputs, output = equation.split("->")
    x_axes, k_axes = inputs.split(",")
    contracted = [c for c in k_axes if c not in output]
    k = len(contracted)
    if k == 0 or list(x_axes[len(x_axes) - k:]) != contracted or list(k_axes[:k]) != contracted:
        return None
    return k if output == x_axes[:len(x_axes) - k] + k_axes[k:] else None


def _channel_axis(layer) -> int:
    """Axis of the kernel that indexes output channels (after depthwise reshaping)."""
    if isinstance(layer, _TRANSPOSED):
        return -2
    return -1


def _is_conv1d(layer) -> bool:
    """A plain Conv1D, computed as a Conv2D of height 1 (as TFLite runs it)."""
    return isinstance(layer, keras.layers.Conv1D) and not isinstance(layer, (*_SEPARABLE, *_TRANSPOSED))


def _flag(value) -> bool:
    return bool(float(keras.ops.convert_to_numpy(value)) > 0.5)


@keras.saving.register_keras_serializable(package="tfq")
class QuantizedLayer(keras.layers.Layer):
    """A weighted layer computed on fake-quantized weights, output fake-quantized.

    With ``batchnorm`` (the BatchNormalization that consumed this layer's output), the BN is
    folded into the weights the way the TFLite converter folds it::
        σ = sqrt(moving_variance + ε)
        W_fold = W · γ / σ              (per output channel)
        b_fold = β + (b − μ) · γ / σ

    In training, until the batch-norm statistics are frozen (:attr:`bn_frozen`), BN uses the
    batch's statistics and updates its moving ones with its momentum (``μ ← m·μ + (1 − m)·μ_B``,
    same for the variance; under ``tf.distribute`` with the moments of the global batch, so
    replicas stay equal). ``bn_folding`` chooses how:

    * ``"unfolded"`` (default, as tfmot and ``torch.ao`` train): the op runs on ``fq(W)`` and BN
      follows with the batch moments of ``u = x ⊛ fq(W) + b`` (:func:`_live_batchnorm`). Per output
      channel the fake-quant's scale absorbs ``γ/σ``: ``fq(W)·γ/σ = fq(W·γ/σ)``, so this is the
      folded layer with batch statistics, and frozen, exactly the exported one. (Per-tensor
      weights have no such identity: the op then runs on ``fq(W·γ/σ)``, with the moments of
      its output scaled back.)
    * ``"two_pass"``: the correction of Krishnamoorthi (2018): the op runs on ``fq(W · γ / σ)``,
      its output is rescaled by ``σ / σ_B`` and the bias is ``β + (b − μ_B) · γ / σ_B`` with
      ``μ_B``, ``σ_B²`` the moments of the float ``x ⊛ W + b``, from a second op (a second
      convolution per step until the freeze).

    Once frozen, training runs the folded form (one op, no statistics). ``bn_frozen`` is held in
    a non-trainable variable, so freezing takes effect inside an already-compiled ``fit``
    (selects on it); :class:`tfq.callbacks.FreezeBatchNorm` also re-traces the step so that
    frozen layers carry no batch-statistics ops at all.

    Under a mixed-precision policy (``mixed_float16``/``mixed_bfloat16``) the op runs in the
    layer's compute dtype; ranges, fake-quant and BN stay float32 and the output is float32.

    Weights are per output channel (the TFLite default), but per tensor for transposed
    convolutions: the converter's fake-quant path cannot carry a per-channel axis through the
    transpose it inserts for TRANSPOSE_CONV. For FULLY_CONNECTED (Dense, EinsumDense) it cannot
    either, so those per-channel weights are exported float and the converter quantizes them
    itself, per output channel with the same ``max|w| / 127`` scale (:attr:`exports_float_weights`).
    Conv1D is computed as a Conv2D of height 1, as TFLite runs it.

    Args:
        layer: the float layer (one of :data:`WEIGHTED_LAYER_TYPES`); used as is (pass a copy).
        batchnorm: optional BatchNormalization layer folded in.
        activation: activation applied after the (folded) op; ``None`` uses ``layer.activation``.
            Fused activations (relu, relu6, linear) sit before the output quantizer; others get
            a quantizer before and after them (they are separate TFLite ops).
        weight_bits: weight bit width.
        per_channel: per-output-channel weight ranges (conv layers; see above).
        weight_narrow_range: ``[-127, 127]`` for int8 weights.
        output_quantizer: config dict of the :class:`ActivationQuantizer` for the output, or
            ``None`` to leave the output float.
        pre_activation_quantizer: config of the quantizer before a non-fused activation.
        intermediate_quantizer: config of the quantizer between the depthwise and pointwise
            parts of a separable convolution.
        float_weights: keep the weights float (the layer stays a float op).
        bn_frozen: initial value of :attr:`bn_frozen`.
        bn_folding: ``"unfolded"`` or ``"two_pass"``: how BN trains before its freeze (above).
        preserve: ``None``, ``"sparsity"`` or ``"clusters"``: what of the main kernel (a separable
            convolution's pointwise kernel) QAT keeps, see :meth:`init_preservation`.
        converter_quantizes_weights: the call uses the float kernel, which the export writes
            float for the converter to quantize (set by ``freeze_model`` on per-channel
            Dense/EinsumDense, see :attr:`exports_float_weights`); the wrapper still describes
            the integer weights (bits, scales) for the weight methods.
    """

    def __init__(
        self,
        layer,
        batchnorm=None,
        activation=None,
        weight_bits: int = 8,
        per_channel: bool = True,
        weight_narrow_range: bool = True,
        output_quantizer: dict | None = None,
        pre_activation_quantizer: dict | None = None,
        intermediate_quantizer: dict | None = None,
        float_weights: bool = False,
        bn_frozen: bool = False,
        preserve: str | None = None,
        converter_quantizes_weights: bool = False,
        bn_folding: str = "unfolded",
        shares: str | None = None,
        **kwargs,
    ):
        if isinstance(layer, dict):
            layer = keras.saving.deserialize_keras_object(layer)
        self.shares = shares
        if preserve not in PRESERVE_MODES:
            raise ValueError(f"preserve must be one of {PRESERVE_MODES}. Received: preserve={preserve!r}")
        if isinstance(batchnorm, dict):
            batchnorm = keras.saving.deserialize_keras_object(batchnorm)
        if not isinstance(layer, WEIGHTED_LAYER_TYPES):
            raise TypeError(
                f"QuantizedLayer wraps {[t.__name__ for t in WEIGHTED_LAYER_TYPES]}. "
                f"Received: {type(layer).__name__} ({getattr(layer, 'name', '?')})"
            )
        if batchnorm is not None and not isinstance(batchnorm, keras.layers.BatchNormalization):
            raise TypeError(
                f"batchnorm must be a BatchNormalization layer or None. Received: {type(batchnorm).__name__}"
            )
        kwargs.setdefault("name", f"{layer.name}_quant")
        super().__init__(**_no_autocast(kwargs))
        self.layer = layer
        self.batchnorm = batchnorm
        self.preserve = preserve
        act = activation if activation is not None else activation_name(layer.activation)
        self.activation = activation_name(act)
        self._activation_fn = activation_function(self.activation)
        ops.qrange(weight_bits)
        self.weight_bits = int(weight_bits)
        self.per_channel = bool(per_channel) and not isinstance(layer, _PER_TENSOR)
        self.weight_narrow_range = bool(weight_narrow_range)
        self.float_weights = bool(float_weights)
        self.converter_quantizes_weights = bool(converter_quantizes_weights)
        self._bn_frozen_initial = bool(bn_frozen)
        if bn_folding not in BN_FOLDING:
            raise ValueError(f"bn_folding must be one of {BN_FOLDING}. Received: bn_folding={bn_folding!r}")
        self.bn_folding = bn_folding
        self.output_quantizer = self._make_quantizer(output_quantizer, "output")
        fused = self.activation in FUSABLE_ACTIVATIONS
        self.pre_activation_quantizer = (
            None if fused else self._make_quantizer(pre_activation_quantizer or output_quantizer, "pre_activation")
        )
        self.intermediate_quantizer = None
        if isinstance(layer, _SEPARABLE):
            self.intermediate_quantizer = self._make_quantizer(intermediate_quantizer or output_quantizer, "depthwise")

    def _make_quantizer(self, config, suffix):
        if config is None:
            return None
        config = dict(config)
        config.pop("name", None)
        config.pop("trainable", None)
        config.pop("dtype", None)
        return ActivationQuantizer(name=f"{self.name}_{suffix}_fq", **config)

    @property
    def quantizers(self) -> list[ActivationQuantizer]:
        return [q for q in (self.intermediate_quantizer, self.pre_activation_quantizer, self.output_quantizer) if q]

    @property
    def exports_float_weights(self) -> bool:
        """Per-channel Dense/EinsumDense weights: exported float, for the converter to quantize
        (per output channel, ``max|w| / 127``: the scale the fake-quant uses)."""
        return self.per_channel and not self.float_weights and isinstance(self.layer, _EXPORT_FLOAT_PER_CHANNEL)

    @property
    def bn_frozen(self) -> bool:
        """Whether training uses the moving statistics of the folded BN (and stops updating them)."""
        if not self.built or self.batchnorm is None:
            return self._bn_frozen_initial
        return _flag(self.bn_frozen_flag)

    @bn_frozen.setter
    def bn_frozen(self, value: bool) -> None:
        self._bn_frozen_initial = bool(value)
        if self.built and self.batchnorm is not None:
            self.bn_frozen_flag.assign(1.0 if value else 0.0)

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        out_shape = self.compute_output_shape(input_shape)
        if self.batchnorm is not None:
            if not self.batchnorm.built:
                self.batchnorm.build(out_shape)
            self.bn_frozen_flag = self.add_weight(
                name="bn_frozen", shape=(), trainable=False,
                initializer=keras.initializers.Constant(1.0 if self._bn_frozen_initial else 0.0),
            )
        if self.intermediate_quantizer is not None:
            self.intermediate_quantizer.build(None)
        for q in (self.pre_activation_quantizer, self.output_quantizer):
            if q is not None:
                q.build(out_shape)
        self._build_preservation()
        self.built = True

    # -- sparsity / cluster preservation ---------------------------------------------------------
    def _main_variable(self):
        layer = self.layer
        return layer.pointwise_kernel if isinstance(layer, _SEPARABLE) else layer.kernel

    def _build_preservation(self):
        if self.preserve is None:
            return
        main = self._main_variable()
        if self.preserve == "sparsity":
            self.preserve_mask = self.add_weight(name="preserve_mask", shape=tuple(main.shape), initializer="ones",
                                                 trainable=False)
        elif self.preserve == "clusters":
            main.trainable = False  # trained through the shared values
            self.cluster_centroids = self.add_weight(name="cluster_centroids", shape=(MAX_CLUSTERS,),
                                                     initializer="zeros", trainable=True)
            self.cluster_indices = self.add_weight(name="cluster_indices", shape=tuple(main.shape), dtype="int32",
                                                   initializer="zeros", trainable=False)

    def init_preservation(self) -> None:
        """Reads what to preserve from the current main kernel (call once its weights are set).

        ``"sparsity"``: the mask ``kernel ≠ 0`` is fixed, and the layer computes with
        ``kernel · mask``, so pruned weights stay exactly zero. ``"clusters"``: the kernel's distinct
        values (at most 256) become trainable shared values and every weight a fixed index into
        them, so the kernel keeps at most that many distinct values. Both survive what follows:
        BN folding scales each output channel by ``γ/σ`` (zeros stay zero, equal values stay equal
        within a channel) and symmetric per-channel fake-quant maps 0 to 0 and equal values to
        equal integers, so the INT8 kernel keeps the zeros and at most as many distinct values per
        output channel.

        Raises:
            ValueError: ``"clusters"`` on a kernel with more than 256 distinct values.
        """
        if self.preserve is None:
            return
        values = keras.ops.convert_to_numpy(self._main_variable())
        if self.preserve == "sparsity":
            self.preserve_mask.assign((values != 0).astype(values.dtype))
        elif self.preserve == "clusters":
            distinct, indices = np.unique(values, return_inverse=True)
            if len(distinct) > MAX_CLUSTERS:
                raise ValueError(f"layer {self.name!r}: preserve='clusters' needs a clustered kernel (at most "
                                 f"{MAX_CLUSTERS} distinct values); it has {len(distinct)}. Cluster it first "
                                 f"(tfq.clustering.cluster_weights, then strip_clustering).")
            padded = np.concatenate([distinct, np.zeros(MAX_CLUSTERS - len(distinct), distinct.dtype)])
            self.cluster_centroids.assign(padded.astype(values.dtype))
            self.cluster_indices.assign(indices.reshape(values.shape).astype(np.int32))

    def _preserved(self, kernel):
        """The main kernel as QAT uses it: masked or rebuilt from the shared values."""
        if self.preserve == "sparsity":
            return kernel * self.preserve_mask
        if self.preserve == "clusters":
            return tf.gather(tf.convert_to_tensor(self.cluster_centroids), tf.convert_to_tensor(self.cluster_indices))
        return kernel

    def layer_weights(self) -> list[np.ndarray]:
        """The wrapped layer's weights with the main kernel as used (preserved): for export and stripping."""
        main = self._main_variable()
        preserved = keras.ops.convert_to_numpy(self._preserved(tf.convert_to_tensor(main)))
        return [preserved if v is main else keras.ops.convert_to_numpy(v) for v in self.layer.weights]

    # -- weights ---------------------------------------------------------------------------------
    def _quantize_kernel(self, kernel, axis, training=False):
        """Symmetric fake-quant of ``kernel``, per channel along ``axis``.

        The range ``[-max|W|, max|W|]`` follows the weights but is not differentiated. With a
        narrow grid no weight lies outside it, so in training the gradient passes to the kernel
        unchanged (:func:`tfq.ops.fake_quant` with ``identity_gradient``: no gradient op).
        """
        if self.float_weights or _OBSERVERS is not None:
            return kernel
        bits, narrow = self.weight_bits, self.weight_narrow_range
        qmin, qmax = ops.qrange(bits, signed=True, narrow_range=narrow)
        ratio = qmax / -qmin
        identity = bool(training) and ratio == 1.0
        if not self.per_channel:
            m = tf.stop_gradient(tf.maximum(tf.reduce_max(tf.abs(kernel)), ops.MIN_RANGE))
            return ops.fake_quant(kernel, -m, m if ratio == 1.0 else m * ratio, bits, narrow,
                                  identity_gradient=identity)
        rank = len(kernel.shape)
        axis = axis % rank
        perm = None
        if axis != rank - 1:
            perm = [i for i in range(rank) if i != axis] + [axis]
            kernel = tf.transpose(kernel, perm)
        m = tf.stop_gradient(tf.maximum(tf.reduce_max(tf.abs(kernel), axis=list(range(rank - 1))), ops.MIN_RANGE))
        q = ops.fake_quant(kernel, -m, m if ratio == 1.0 else m * ratio, bits, narrow, per_channel=True,
                           identity_gradient=identity)
        if perm is not None:
            q = tf.transpose(q, np.argsort(perm))
        return q

    def _fq_depthwise(self, kernel, training=False):
        """Depthwise kernels ``(..., in, multiplier)`` are per channel over ``in × multiplier``."""
        if self.float_weights or _OBSERVERS is not None:
            return kernel
        k = kernel.shape
        flat = tf.reshape(kernel, list(k[:-2]) + [k[-2] * k[-1]])
        return tf.reshape(self._quantize_kernel(flat, -1, training), k)

    # -- the op ---------------------------------------------------------------------------------
    def _conv_args(self):
        layer = self.layer
        return dict(strides=layer.strides, padding=layer.padding, data_format=layer.data_format,
                    dilation_rate=layer.dilation_rate)

    def _causal_pad(self, x):
        layer = self.layer
        if getattr(layer, "padding", None) != "causal":
            return x, layer.padding if hasattr(layer, "padding") else None
        left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
        if layer.data_format == "channels_first":
            return tf.pad(x, [[0, 0], [0, 0], [left, 0]]), "valid"
        return tf.pad(x, [[0, 0], [left, 0], [0, 0]]), "valid"

    def _conv1d_as_2d(self, x, kernel):
        """Conv1D on a height-1 image with the (already 4-D) kernel ``(1, k, in, out)``."""
        layer = self.layer
        x, padding = self._causal_pad(x)
        y = keras.ops.conv(
            tf.expand_dims(x, self._spatial_axis()), kernel, strides=(1, layer.strides[0]), padding=padding,
            data_format=layer.data_format, dilation_rate=(1, layer.dilation_rate[0]),
        )
        return tf.squeeze(y, self._spatial_axis())

    def _linear(self, x, kernel):
        """Runs the layer's op with ``kernel`` (already scaled/quantized), no bias; float32 out.

        Under a mixed-precision policy the op runs in the wrapped layer's compute dtype (the
        fake-quantized kernel and the input are cast to it) and its output is cast back to float32.
        """
        dtype = _compute_dtype(self.layer)
        if dtype == "float32":
            return self._linear_op(x, kernel)
        y = self._linear_op(tf.cast(x, dtype), tf.cast(kernel, dtype))
        return tf.cast(y, tf.float32)

    def _linear_op(self, x, kernel):
        layer = self.layer
        if isinstance(layer, keras.layers.Dense):
            return keras.ops.matmul(x, kernel)
        if isinstance(layer, keras.layers.EinsumDense):
            return keras.ops.einsum(layer.equation, x, kernel)
        if isinstance(layer, _SEPARABLE):
            return keras.ops.conv(x, kernel, strides=1, padding="valid", data_format=layer.data_format)
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            return keras.ops.depthwise_conv(x, kernel, **self._conv_args())
        if isinstance(layer, _TRANSPOSED):
            return keras.ops.conv_transpose(x, kernel, output_padding=layer.output_padding, **self._conv_args())
        if _is_conv1d(layer):
            return self._conv1d_as_2d(x, kernel)
        x, padding = self._causal_pad(x)
        args = self._conv_args()
        args["padding"] = padding
        return keras.ops.conv(x, kernel, **args)

    def _channels_last(self) -> bool:
        return getattr(self.layer, "data_format", "channels_last") != "channels_first"

    def _output_channel_axis(self, rank: int) -> int:
        return rank - 1 if self._channels_last() else 1

    def _channel_vector(self, v, rank):
        return _per_channel(v, rank, self._output_channel_axis(rank))

    def _kernel_and_scale_axis(self):
        """The kernel of the op that :meth:`_linear` runs, and its output-channel axis."""
        layer = self.layer
        kernel = self._preserved(tf.convert_to_tensor(self._main_variable()))
        if isinstance(layer, keras.layers.SeparableConv1D):
            return tf.expand_dims(kernel, 0), -1
        if isinstance(layer, _SEPARABLE):
            return kernel, -1
        if _is_conv1d(layer):
            return tf.expand_dims(kernel, 0), -1
        return kernel, _channel_axis(layer)

    def _scale_kernel(self, kernel, factor, axis):
        """Multiplies the kernel by a per-output-channel factor."""
        if isinstance(self.layer, keras.layers.DepthwiseConv2D):
            k = kernel.shape
            return kernel * tf.reshape(factor, (k[-2], k[-1]))
        rank = len(kernel.shape)
        shape = [1] * rank
        shape[axis % rank] = -1
        return kernel * tf.reshape(factor, shape)

    def _quantize_any(self, kernel, axis, training=False):
        if self.converter_quantizes_weights:
            return kernel  # exported float; the converter puts it on the grid this wrapper computes
        if isinstance(self.layer, keras.layers.DepthwiseConv2D):
            return self._fq_depthwise(kernel, training)
        if isinstance(self.layer, keras.layers.EinsumDense) and self.per_channel:
            return self._fq_einsum(kernel, training)
        return self._quantize_kernel(kernel, axis, training)

    def _contracted_axes(self) -> int | None:
        """Input axes a Dense/EinsumDense contracts when it is a matmul on 2-D views (see
        :func:`_einsum_contraction`); None for other layers and other einsums."""
        if isinstance(self.layer, keras.layers.Dense):
            return 1
        if isinstance(self.layer, keras.layers.EinsumDense):
            return _einsum_contraction(self.layer.equation)
        return None

    def _einsum_is_matmul(self, x) -> bool:
        k = self._contracted_axes()
        if k is None or (isinstance(self.layer, keras.layers.Dense) and len(x.shape) <= 2):
            return False
        return all(d is not None for d in x.shape[1:len(x.shape) - k])

    def _einsum_matmul(self, x, kernel, bias):
        """A Dense on more than 2 axes, or an einsum that contracts the input's last axes with the
        kernel's first ones, as TFLite runs it: one FULLY_CONNECTED on 2-D views, its bias added
        before the output is reshaped (a bias over several output axes would otherwise be a
        separate ADD on an unquantized tensor)."""
        k = self._contracted_axes()
        rows = int(np.prod(kernel.shape[:k]))
        cols = int(np.prod(kernel.shape[k:]))
        y = tf.matmul(tf.reshape(x, [-1, rows]), tf.reshape(kernel, [rows, cols]))
        if bias is not None:
            y = y + tf.reshape(tf.broadcast_to(bias, kernel.shape[k:]), [cols])
        return tf.reshape(y, [-1, *x.shape[1:len(x.shape) - k], *kernel.shape[k:]])

    def _fq_einsum(self, kernel, training=False):
        """Per output channel: one scale per combination of the kernel axes the output keeps (the
        rows of the FULLY_CONNECTED weight the converter makes of the einsum)."""
        if self.float_weights or _OBSERVERS is not None:
            return kernel
        inputs, output = self.layer.equation.split("->")
        kernel_axes = inputs.split(",")[1]
        kept = [i for i, c in enumerate(kernel_axes) if c in output]
        if not kept:
            return self._quantize_kernel(kernel, -1, training)
        contracted = [i for i in range(len(kernel_axes)) if i not in kept]
        perm = contracted + kept
        shape = kernel.shape
        moved = tf.transpose(kernel, perm)
        flat = tf.reshape(moved, [-1, int(np.prod([shape[i] for i in kept]))])
        q = tf.reshape(self._quantize_kernel(flat, -1, training), [shape[i] for i in perm])
        return tf.transpose(q, np.argsort(perm))

    def _spatial_axis(self) -> int:
        """Where a 1-D layer's input gets its extra height-1 axis."""
        return 1 if self._channels_last() else 2

    def call(self, inputs, training=None):
        layer = self.layer
        x = inputs
        record = _TAPS.get(id(self)) if _TAPS is not None else None
        if record is not None:
            record["inputs"].append(inputs)
        separable_1d = isinstance(layer, keras.layers.SeparableConv1D)
        if separable_1d:  # computed as SeparableConv2D on a height-1 image, as TFLite runs it
            x, _ = self._causal_pad(x)
            x = tf.expand_dims(x, self._spatial_axis())
        if isinstance(layer, _SEPARABLE):
            x = self._separable_depthwise(x, training)
        kernel, axis = self._kernel_and_scale_axis()
        bias = getattr(layer, "bias", None) if getattr(layer, "use_bias", True) else None
        if self.batchnorm is None and self._einsum_is_matmul(x):
            y = self._einsum_matmul(x, self._quantize_any(kernel, axis, training), bias)
        elif self.batchnorm is None:
            y = self._linear(x, self._quantize_any(kernel, axis, training))
            if bias is not None:
                y = y + self._channel_vector(bias, len(y.shape))
        else:
            y = self._folded_call(x, kernel, axis, bias, training)
        if separable_1d:
            y = tf.squeeze(y, self._spatial_axis())
        if record is not None:
            record["pre_activation"].append(y)
        if self.pre_activation_quantizer is not None:
            y = self.pre_activation_quantizer(y, training=training)
        if self.activation in ("relu", "relu6") and self.output_quantizer is not None \
                and self.output_quantizer.takes_relu(training):
            return self.output_quantizer.relu_fake_quant(y, 6.0 if self.activation == "relu6" else None)
        y = self._activation_fn(y)
        if self.output_quantizer is not None:
            y = self.output_quantizer(y, training=training)
        return y

    def _separable_depthwise(self, x, training):
        """The depthwise half of a separable convolution (``x`` is 4-D, see :meth:`call`)."""
        layer = self.layer
        dk = layer.depthwise_kernel
        args = self._conv_args()
        if len(dk.shape) == 3:  # SeparableConv1D: (k, in, multiplier) → (1, k, in, multiplier)
            dk = tf.expand_dims(dk, 0)
            args = dict(strides=(1, layer.strides[0]), dilation_rate=(1, layer.dilation_rate[0]),
                        padding="valid" if layer.padding == "causal" else layer.padding,
                        data_format=layer.data_format)
        dtype = _compute_dtype(layer)
        y = keras.ops.depthwise_conv(tf.cast(x, dtype), tf.cast(self._fq_depthwise(dk, training), dtype), **args)
        y = tf.cast(y, tf.float32)
        if self.intermediate_quantizer is not None:
            y = self.intermediate_quantizer(y, training=training)
        return y

    def _folded_call(self, x, kernel, axis, bias, training):
        bn = self.batchnorm
        gamma = bn.gamma if bn.scale else tf.ones_like(bn.moving_mean)
        beta = bn.beta if bn.center else tf.zeros_like(bn.moving_mean)
        moving_mean = tf.convert_to_tensor(bn.moving_mean)
        moving_var = tf.convert_to_tensor(bn.moving_variance)
        b = bias if bias is not None else tf.zeros_like(moving_mean)
        factor = gamma * tf.math.rsqrt(moving_var + bn.epsilon)  # γ / σ

        def folded():
            # As exported: W·γ/σ folded into the weights, one op, no statistics.
            y = self._linear(x, self._quantize_any(self._scale_kernel(kernel, factor, axis), axis, training))
            return y + self._channel_vector(beta + (b - moving_mean) * factor, len(y.shape))

        if not training or self._bn_frozen_initial:
            # A layer frozen before tracing is traced without the batch-statistics ops; the flag
            # variable still rules inside a step traced before the freeze (selects below).
            return folded()
        frozen = self.bn_frozen_flag > 0.5
        per_tensor = not (self.per_channel or self.float_weights)
        if self.bn_folding == "unfolded" and not per_tensor:
            # BN after the op on fq(W), as Keras trains it: per output channel fq(W)·γ/σ equals
            # fq(W·γ/σ) (the channel's scale absorbs the factor), so this is the folded layer with
            # batch statistics, and with the moving ones (frozen) the folded layer as exported.
            y = self._linear(x, self._quantize_any(kernel, axis, training))
            if bias is not None:
                y = y + self._channel_vector(bias, len(y.shape))
            y, mean, var = _live_batchnorm(y, tf.convert_to_tensor(gamma), tf.convert_to_tensor(beta), bn.epsilon,
                                           self._output_channel_axis(len(y.shape)), frozen, moving_mean, moving_var)
            _update_moving_statistics(bn, frozen, mean, var, moving_mean, moving_var)
            return y
        y = self._linear(x, self._quantize_any(self._scale_kernel(kernel, factor, axis), axis, training))
        rank = len(y.shape)
        if self.bn_folding == "unfolded":
            # Per-tensor weights: fq(W)·γ/σ is not on the grid of fq(W·γ/σ), so the op runs on the
            # folded fq(W·γ/σ) = W'·γ/σ and BN normalises with the batch moments of x ⊛ W' + b,
            # which are those of y = (x ⊛ W')·γ/σ scaled back: one op, as unfolded.
            # σ/σ_B = |γ| / sqrt(var_y + ε·(γ/σ)²) needs no division by γ (γ = 0 gives y = 0).
            mean_y, var_y = tf.nn.moments(y, axes=_other_axes(rank, self._output_channel_axis(rank)))
            factor2 = tf.square(factor)
            _update_moving_statistics(bn, frozen, tf.math.divide_no_nan(mean_y, factor) + b,
                                      tf.math.divide_no_nan(var_y, factor2), moving_mean, moving_var)
            ratio = tf.where(frozen, 1.0, tf.abs(gamma) * tf.math.rsqrt(var_y + bn.epsilon * factor2 + _TINY))
            offset = tf.where(frozen, beta + (b - moving_mean) * factor, beta - mean_y * ratio)
            return y * self._channel_vector(ratio, rank) + self._channel_vector(offset, rank)
        # two_pass: the batch moments of the unquantized op x ⊛ W + b, from a second op.
        mean, var = tf.nn.moments(self._linear(x, kernel), axes=_other_axes(rank, self._output_channel_axis(rank)))
        mean = mean + b
        _update_moving_statistics(bn, frozen, mean, var, moving_mean, moving_var)
        mean, var = tf.where(frozen, moving_mean, mean), tf.where(frozen, moving_var, var)
        inv_sigma_b = tf.math.rsqrt(var + bn.epsilon)
        y = y * self._channel_vector(inv_sigma_b / tf.math.rsqrt(moving_var + bn.epsilon), rank)  # σ / σ_B
        return y + self._channel_vector(beta + (b - mean) * gamma * inv_sigma_b, rank)

    def compute_output_shape(self, input_shape):
        shape = tuple(self.layer.compute_output_shape(input_shape))
        if isinstance(self.layer, keras.layers.EinsumDense) and self.layer.built:
            shape = _einsum_dense_output_shape(self.layer, input_shape, shape)
        return shape

    def compute_output_spec(self, inputs, training=None):
        # float32 under any dtype policy (mixed precision): the quantization maths are float32.
        return keras.KerasTensor(self.compute_output_shape(inputs.shape), dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update(
            layer=keras.saving.serialize_keras_object(self.layer),
            batchnorm=keras.saving.serialize_keras_object(self.batchnorm) if self.batchnorm is not None else None,
            activation=self.activation,
            weight_bits=self.weight_bits,
            per_channel=self.per_channel,
            weight_narrow_range=self.weight_narrow_range,
            output_quantizer=self.output_quantizer.get_config() if self.output_quantizer else None,
            pre_activation_quantizer=(
                self.pre_activation_quantizer.get_config() if self.pre_activation_quantizer else None
            ),
            intermediate_quantizer=(
                self.intermediate_quantizer.get_config() if self.intermediate_quantizer else None
            ),
            float_weights=self.float_weights,
            bn_frozen=self.bn_frozen,
            preserve=self.preserve,
            converter_quantizes_weights=self.converter_quantizes_weights,
            bn_folding=self.bn_folding,
        )
        if self.shares is not None:
            config["shares"] = self.shares
        return config

    @classmethod
    def from_config(cls, config):
        """The layer from its config; with ``shares`` (another call site of the same shared layer, named),
        it wraps that wrapper's layer, deserialized just before it in the same model: the loaded
        model keeps one kernel for every call site, and loads its weights once."""
        primary = _DESERIALIZED.get(config.get("shares")) if config.get("shares") is not None else None
        if primary is not None and isinstance(config.get("layer"), dict) \
                and config["layer"].get("class_name") == type(primary.layer).__name__:
            config = dict(config, layer=primary.layer)
        new = super().from_config(config)
        _DESERIALIZED[new.name] = new
        return new


def _einsum_dense_output_shape(layer: keras.layers.EinsumDense, input_shape, shape) -> tuple:
    """``shape`` (what ``layer.compute_output_shape`` gives) with the dimensions it leaves unknown
    but the einsum fixes taken from ``input_shape``.

    An EinsumDense whose ``output_shape`` says ``None`` on an axis it shares with its input (the
    projections inside MultiHeadAttention: ``"abc,cde->abde"`` with ``output_shape=(None, heads,
    key_dim)``) reports that axis as unknown, even for an input of static length; Keras'
    MultiHeadAttention restores it in its own shape inference. Once tfq inlines the attention into
    its sublayers, the wrapper must restore it itself, or a Flatten after the attention has an
    unknown size and the Dense after it cannot be built. Example: input ``(None, 8, 8)``,
    ``"abc,cde->abde"``, kernel ``(8, 2, 4)``: Keras says ``(None, None, 2, 4)``, this ``(None, 8, 2,
    4)``.
    """
    inferred = keras.ops.einsum(layer.equation, keras.KerasTensor(tuple(input_shape)),
                                keras.KerasTensor(tuple(layer.kernel.shape))).shape
    shape = tuple(shape)
    if len(inferred) != len(shape):
        return shape
    return tuple(d if d is not None else i for d, i in zip(shape, inferred))


@keras.saving.register_keras_serializable(package="tfq")
class QuantizedNormalization(keras.layers.Layer):
    """A standalone BatchNormalization or Normalization as TFLite runs it: MUL, then ADD.

    With per-channel ``s`` and ``t``::
        BatchNormalization:  s = γ / sqrt(var + ε),        t = β − mean · s
        Normalization:       s = 1 / max(sqrt(var), ε),    t = −mean · s
        (invert=True:        s = max(sqrt(var), ε),         t = mean)
        y = fq_out(fq_mid(x · fq₈(s)) + fq₈(t))

    Both are separate int8 ops in TFLite, so each output gets a quantizer; ``fq₈`` is the
    per-tensor int8 quantization the converter gives the constant vectors ``s`` and ``t``. A BatchNormalization
    in training uses the batch's mean and variance and updates its moving statistics with its
    momentum (moments of the global batch under ``tf.distribute``), unless :attr:`bn_frozen`.

    Args:
        layer: the ``BatchNormalization`` or ``Normalization`` layer (used as is: pass a copy).
        intermediate_quantizer: config of the quantizer after the multiplication.
        output_quantizer: config of the quantizer after the addition.
        bn_frozen: initial value of :attr:`bn_frozen` (BatchNormalization only).
    """

    def __init__(self, layer, intermediate_quantizer: dict | None = None, output_quantizer: dict | None = None,
                 bn_frozen: bool = False, **kwargs):
        if isinstance(layer, dict):
            layer = keras.saving.deserialize_keras_object(layer)
        if not isinstance(layer, (keras.layers.BatchNormalization, keras.layers.Normalization)):
            raise TypeError(
                f"QuantizedNormalization wraps BatchNormalization or Normalization. Received: {type(layer).__name__}"
            )
        kwargs.setdefault("name", f"{layer.name}_quant")
        super().__init__(**_no_autocast(kwargs))
        self.layer = layer
        self._bn_frozen_initial = bool(bn_frozen)
        self.intermediate_quantizer = QuantizedLayer._make_quantizer(self, intermediate_quantizer, "scale")
        self.output_quantizer = QuantizedLayer._make_quantizer(self, output_quantizer, "output")

    @property
    def quantizers(self) -> list[ActivationQuantizer]:
        return [q for q in (self.intermediate_quantizer, self.output_quantizer) if q]

    @property
    def is_batchnorm(self) -> bool:
        return isinstance(self.layer, keras.layers.BatchNormalization)

    @property
    def bn_frozen(self) -> bool:
        """Whether a BatchNormalization uses (and keeps) its moving statistics in training."""
        if not self.built or not self.is_batchnorm:
            return self._bn_frozen_initial
        return _flag(self.bn_frozen_flag)

    @bn_frozen.setter
    def bn_frozen(self, value: bool) -> None:
        self._bn_frozen_initial = bool(value)
        if self.built and self.is_batchnorm:
            self.bn_frozen_flag.assign(1.0 if value else 0.0)

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        if self.is_batchnorm:
            self.bn_frozen_flag = self.add_weight(
                name="bn_frozen", shape=(), trainable=False,
                initializer=keras.initializers.Constant(1.0 if self._bn_frozen_initial else 0.0),
            )
        for q in self.quantizers:
            q.build(input_shape)
        self.built = True

    def _scale_offset(self, x, training):
        layer = self.layer
        rank = len(x.shape)
        if not self.is_batchnorm:
            mean = tf.cast(tf.convert_to_tensor(layer.mean), x.dtype)
            std = tf.maximum(tf.sqrt(tf.cast(tf.convert_to_tensor(layer.variance), x.dtype)), keras.config.epsilon())
            if layer.invert:
                return std, mean
            return 1.0 / std, -mean / std
        moving_mean = tf.convert_to_tensor(layer.moving_mean)
        moving_var = tf.convert_to_tensor(layer.moving_variance)
        mean, var = moving_mean, moving_var
        if training and not self._bn_frozen_initial:  # frozen: traced without the statistics ops
            # Selected on the flag, no tf.cond (a function call per layer and step), as in _live_batchnorm;
            # the gradient reaches the batch moments only while live.
            frozen = self.bn_frozen_flag > 0.5
            batch_mean, batch_var = tf.nn.moments(x, axes=_other_axes(rank, layer.axis))
            _update_moving_statistics(layer, frozen, batch_mean, batch_var, moving_mean, moving_var)
            mean, var = tf.where(frozen, moving_mean, batch_mean), tf.where(frozen, moving_var, batch_var)
        gamma = layer.gamma if layer.scale else tf.ones_like(moving_mean)
        beta = layer.beta if layer.center else tf.zeros_like(moving_mean)
        scale = gamma / tf.sqrt(var + layer.epsilon)
        return _per_channel(scale, rank, layer.axis), _per_channel(beta - mean * scale, rank, layer.axis)

    @staticmethod
    def _fq_constant(v):
        """The converter stores a constant operand of MUL/ADD as int8 over ``[min(v, 0), max(v, 0)]``."""
        if _OBSERVERS is not None:
            return v
        lo = tf.minimum(tf.reduce_min(v), 0.0)
        hi = tf.maximum(tf.maximum(tf.reduce_max(v), 0.0), lo + ops.MIN_RANGE)
        return ops.fake_quant(v, lo, hi, 8)

    def call(self, inputs, training=None):
        x = tf.cast(tf.convert_to_tensor(inputs), tf.float32)  # float32 maths, also under mixed precision
        scale, offset = self._scale_offset(x, training)
        if self.intermediate_quantizer is not None:
            scale, offset = self._fq_constant(scale), self._fq_constant(offset)
        y = x * scale
        if self.intermediate_quantizer is not None:
            y = self.intermediate_quantizer(y, training=training)
        y = y + offset
        if self.output_quantizer is not None:
            y = self.output_quantizer(y, training=training)
        return y

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_output_spec(self, inputs, training=None):
        # float32 under any dtype policy (mixed precision): the quantization maths are float32.
        return keras.KerasTensor(self.compute_output_shape(inputs.shape), dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update(
            layer=keras.saving.serialize_keras_object(self.layer),
            intermediate_quantizer=self.intermediate_quantizer.get_config() if self.intermediate_quantizer else None,
            output_quantizer=self.output_quantizer.get_config() if self.output_quantizer else None,
            bn_frozen=self.bn_frozen,
        )
        return config


def _per_channel(v, rank: int, axis: int):
    """A per-channel vector shaped to broadcast along ``axis`` of a rank-``rank`` tensor (as is when last)."""
    axis %= rank
    if axis == rank - 1:
        return v
    return tf.reshape(v, [-1 if i == axis else 1 for i in range(rank)])


def _other_axes(rank: int, channel_axis: int) -> list[int]:
    """The axes a per-channel statistic reduces over: all but ``channel_axis``."""
    return [i for i in range(rank) if i != channel_axis % rank]


def _update_moving_statistics(bn, frozen, mean, var, moving_mean, moving_var) -> None:
    """``μ ← m·μ + (1 − m)·μ_B`` (same for the variance) of BatchNormalization ``bn`` unless ``frozen``;
    moments of the global batch under ``tf.distribute`` (synchronised outside any control flow)."""
    global_mean, global_var = _replica_moments(mean, var)
    m = bn.momentum
    # Selected, not blended with a 0/1 weight: frozen statistics stay exact even when the batch's
    # moments are not finite (inf · 0 is NaN).
    bn.moving_mean.assign(tf.where(frozen, moving_mean, moving_mean * m + global_mean * (1.0 - m)))
    bn.moving_variance.assign(tf.where(frozen, moving_var, moving_var * m + global_var * (1.0 - m)))


def _live_batchnorm(y, gamma, beta, epsilon, channel_axis, frozen, moving_mean, moving_var):
    """BatchNormalization of ``y`` in training: ``γ·(y − μ)/sqrt(σ² + ε) + β``.

    ``μ, σ²`` are the batch moments of ``y`` over all axes but ``channel_axis`` (the biased variance,
    as Keras), or the moving statistics where ``frozen`` (a boolean scalar tensor, so that a step
    traced before the freeze honours it). Returns ``(out, μ_B, σ_B²)``, the batch moments for the moving update.

    No ``tf.cond`` and no fused kernel: both cost more than the statistics on CPU (a function call
    per layer and step; on MobileNetV2 α 0.35 at 32 px the fused forward and gradient kernels took
    16 ms of a 95 ms step, Keras' unfused BN ~13 ms).
    The gradient is written out, with ``d = y − μ``, ``s = Σ dout·d``, ``n`` values per channel::
        ∂β = Σ dout        ∂γ = s / σ        ∂y = (γ/σ)·dout − d·(γ/σ³)·s/n − (γ/σ)·∂β/n

    (σ = sqrt(σ² + ε)); the last two terms are the batch moments' share, 0 when frozen.
    """
    rank = len(y.shape)
    axes = _other_axes(rank, channel_axis)

    def along(v):
        return _per_channel(v, rank, channel_axis)

    stats_input = tf.stop_gradient(y)
    batch_mean = tf.reduce_mean(stats_input, axes)
    batch_var = tf.reduce_mean(tf.math.squared_difference(stats_input, along(batch_mean)), axes)
    mean = tf.where(frozen, moving_mean, batch_mean)
    inv_sigma = tf.math.rsqrt(tf.where(frozen, moving_var, batch_var) + epsilon)
    live = 1.0 - tf.cast(frozen, y.dtype)

    @tf.custom_gradient
    def normalize(y, gamma, beta):
        scale = gamma * inv_sigma
        out = y * along(scale) + along(beta - mean * scale)

        def grad(dout):
            n = tf.cast(tf.size(y, out_type=tf.int64) // tf.size(gamma, out_type=tf.int64), y.dtype)
            d = y - along(mean)
            d_beta = tf.reduce_sum(dout, axes)
            s = tf.reduce_sum(dout * d, axes)
            share = live / n
            d_y = (dout * along(scale) - d * along(scale * tf.square(inv_sigma) * s * share)
                   - along(scale * d_beta * share))
            return d_y, s * inv_sigma, d_beta

        return out, grad

    return normalize(y, gamma, beta), batch_mean, batch_var
