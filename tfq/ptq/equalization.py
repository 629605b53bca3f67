"""Cross-layer equalization (CLE) and high-bias absorption: a float model that quantizes per tensor.

Data-free quantization (Nagel et al., 2019, "Data-Free Quantization Through Weight Equalization
and Bias Correction"). Two weighted layers joined by a ReLU (or nothing) compute
``W₂ · relu(W₁ x + b₁)``; since ``relu(s·z) = s·relu(z)`` for ``s > 0``, scaling output channel
``i`` of the first layer by ``1/sᵢ`` and input channel ``i`` of the second by ``sᵢ`` leaves the
function unchanged. With ``r₁ᵢ`` the range (max |w|) of output channel ``i`` of ``W₁`` and
``r₂ᵢ`` that of input channel ``i`` of ``W₂``::
    sᵢ = sqrt(r₁ᵢ / r₂ᵢ)          →   r₁ᵢ / sᵢ = r₂ᵢ · sᵢ = sqrt(r₁ᵢ · r₂ᵢ)

makes both channel ranges equal, which is what per-tensor weight quantization needs: no channel
is crushed by the largest one. Chains (conv → depthwise → pointwise …) are equalized pair by pair
until the scales stop changing.

Ranges are those of the kernels *after BatchNorm folding* (``W·γ/σ``, what the converter
quantizes). A BatchNormalization after a layer is kept by default and the scaling goes into its
``γ`` and ``β`` (folding then gives exactly the equalized kernel), so its statistics stay
available to analytical bias correction and data-free ranges; ``fold_batchnorm=True`` removes it.

High-bias absorption: after equalization some pre-activations ``z`` have large means. With the
BatchNorm's ``β`` (mean) and ``γ`` (standard deviation) of ``z``, ``cᵢ = max(0, βᵢ − 3|γᵢ|)`` is
subtracted from layer 1's bias and ``W₂·c`` added to layer 2's: ``relu(z − c) = relu(z) − c``
whenever ``z ≥ c``, which holds for all but ~0.13 % of values of a Gaussian ``z``.

The maths (:func:`equalization_scales`, :func:`absorption_amount`, :func:`fold_batchnorm`) takes
numpy arrays; :func:`equalize` walks the model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import keras
import numpy as np

from tfq.models.graph import GraphNode, ModelGraph, as_functional
from tfq.models.interop import load_keras_model
from tfq.models.loading import is_quantized_model
from tfq.quantsim.layers import activation_name
from tfq.quantsim.rewrite import copy_layer

__all__ = ["equalize", "equalization_scales", "absorption_amount", "fold_batchnorm", "channel_ranges",
           "RELU6_MODES"]

RELU6_MODES = ("replace", "skip")

# Layers between two weighted layers that commute with a positive per-channel scale (channels last).
_TRANSPARENT = (
    keras.layers.Dropout, keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D,
    keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.AveragePooling1D,
    keras.layers.AveragePooling2D, keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling1D, keras.layers.GlobalMaxPooling2D,
)
# These commute with scaling, but move values into places where zeros were: no bias absorption.
_PADDING = (keras.layers.ZeroPadding1D, keras.layers.ZeroPadding2D)


# ---------------------------------------------------------------------------------------------
# Maths on arrays.


def equalization_scales(range_1, range_2) -> np.ndarray:
    """``sᵢ = sqrt(r₁ᵢ / r₂ᵢ)``: the per-channel scale that equalizes a pair of layers.

    Layer 1's output channel ``i`` is divided by ``sᵢ`` and layer 2's input channel ``i``
    multiplied by it, so both ranges become ``sqrt(r₁ᵢ · r₂ᵢ)``. A channel with a zero range on
    either side (dead channel) keeps ``sᵢ = 1``.

    Args:
        range_1: per-output-channel ranges (max |w|) of layer 1.
        range_2: per-input-channel ranges of layer 2, same length.

    Returns:
        float64 scales, positive.

    Example:
        >>> equalization_scales([4.0, 1.0, 0.0], [1.0, 4.0, 2.0]).tolist()
        [2.0, 0.5, 1.0]
    """
    r1 = np.asarray(range_1, dtype=np.float64)
    r2 = np.asarray(range_2, dtype=np.float64)
    if r1.shape != r2.shape:
        raise ValueError(f"range_1 and range_2 must have the same shape. Received: {r1.shape} and {r2.shape}")
    ok = (r1 > 0) & (r2 > 0) & np.isfinite(r1) & np.isfinite(r2)
    return np.where(ok, np.sqrt(np.where(ok, r1, 1.0) / np.where(ok, r2, 1.0)), 1.0)


def absorption_amount(mean, std, num_std: float = 3.0) -> np.ndarray:
    """``cᵢ = max(0, βᵢ − k·|γᵢ|)``: the bias high-bias absorption moves to the next layer.

    ``mean``/``std`` are the per-channel mean and standard deviation of the pre-activation (a
    BatchNorm's ``β`` and ``γ``). For ``z ≥ c``, ``relu(z − c) = relu(z) − c``; with Gaussian
    ``z`` and ``k = 3``, ``z < c`` for 0.135 % of values.

    Example:
        >>> absorption_amount([5.0, 1.0, -2.0], [1.0, 1.0, 1.0]).tolist()
        [2.0, 0.0, 0.0]
    """
    mean = np.asarray(mean, dtype=np.float64)
    std = np.abs(np.asarray(std, dtype=np.float64))
    return np.maximum(mean - num_std * std, 0.0)


def fold_batchnorm(kernel, bias, gamma, beta, mean, variance, epsilon: float, depthwise: bool = False):
    """Folds a BatchNorm into the layer before it, as the TFLite converter does.

    ::
        σ = sqrt(variance + ε)
        W_fold = W · γ / σ            (per output channel)
        b_fold = β + (b − mean) · γ / σ

    Args:
        kernel: ``(..., in, out)``; depthwise ``(..., in, multiplier)`` with output channel
            ``in_index · multiplier + m``.
        bias: ``(out,)`` or None (zeros).
        gamma, beta, mean, variance: the BatchNorm's per-channel vectors (``out``).
        epsilon: the BatchNorm's ε.
        depthwise: ``kernel`` is a depthwise kernel.

    Returns:
        ``(W_fold, b_fold)`` as float64.

    Example:
        >>> w, b = fold_batchnorm(np.ones((1, 2)), None, [2.0, 1.0], [0.0, 1.0], [1.0, 0.0], [3.0, 0.0], 1.0)
        >>> w.tolist(), b.tolist()
        ([[1.0, 1.0]], [-1.0, 1.0])
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    factor = np.asarray(gamma, dtype=np.float64) / np.sqrt(np.asarray(variance, dtype=np.float64) + epsilon)
    b = np.zeros_like(factor) if bias is None else np.asarray(bias, dtype=np.float64)
    folded = kernel * _out_shape(factor, kernel.shape, depthwise)
    return folded, np.asarray(beta, dtype=np.float64) + (b - np.asarray(mean, dtype=np.float64)) * factor


def _out_shape(v, kernel_shape, depthwise):
    """A per-output-channel vector shaped to broadcast over a kernel."""
    if depthwise:
        return np.reshape(v, kernel_shape[-2:])
    return np.reshape(v, (1,) * (len(kernel_shape) - 1) + (-1,))


def channel_ranges(kernel, axis: str, depthwise: bool = False) -> np.ndarray:
    """Per-channel ranges ``max |w|`` of a kernel, over output (``"out"``) or input (``"in"``) channels.

    A depthwise kernel ``(..., in, multiplier)`` has ``in × multiplier`` output channels and
    ``in`` input channels.

    Example:
        >>> channel_ranges(np.array([[1.0, -3.0], [2.0, 0.5]]), "out").tolist()
        [2.0, 3.0]
        >>> channel_ranges(np.array([[1.0, -3.0], [2.0, 0.5]]), "in").tolist()
        [3.0, 2.0]
    """
    k = np.abs(np.asarray(kernel, dtype=np.float64))
    if axis not in ("in", "out"):
        raise ValueError(f"axis must be 'in' or 'out'. Received: axis={axis!r}")
    if depthwise:
        if axis == "out":
            return k.reshape(-1, k.shape[-2] * k.shape[-1]).max(axis=0)
        return np.moveaxis(k, -2, 0).reshape(k.shape[-2], -1).max(axis=1)
    if axis == "out":
        return k.reshape(-1, k.shape[-1]).max(axis=0)
    return np.moveaxis(k, -2, 0).reshape(k.shape[-2], -1).max(axis=1)


# ---------------------------------------------------------------------------------------------
# The model walk.


def _kind(layer) -> str | None:
    """'conv', 'depthwise' or 'dense' for layers CLE handles (channels last, ungrouped)."""
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return None
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return "depthwise"
    if isinstance(layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D, keras.layers.Conv1DTranspose,
                          keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)):
        return None
    if isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D)):
        return "conv" if getattr(layer, "groups", 1) == 1 else None
    if isinstance(layer, keras.layers.Dense):
        return "dense"
    return None


def _activation(layer) -> str:
    return activation_name(getattr(layer, "activation", None))


def _relu_kind(layer) -> str | None:
    """'relu', 'relu6' or 'linear' for activation layers that CLE can cross, else None."""
    if isinstance(layer, keras.layers.ReLU):
        if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
            return None
        if layer.max_value is None:
            return "relu"
        return "relu6" if float(layer.max_value) == 6.0 else None
    if isinstance(layer, keras.layers.Activation):
        name = _activation(layer)
        return name if name in ("relu", "relu6", "linear") else None
    return None


@dataclass(eq=False)
class _Unit:
    """A weighted layer with the BatchNorm folded into it (kept or removed), in float64."""

    node: GraphNode
    kind: str
    kernel: np.ndarray
    bias: np.ndarray | None
    bn: object = None  # the BatchNormalization layer
    gamma: np.ndarray | None = None
    beta: np.ndarray | None = None
    mean: np.ndarray | None = None
    variance: np.ndarray | None = None
    epsilon: float = 0.0
    needs_bias: bool = False

    @property
    def layer(self):
        return self.node.layer

    @property
    def depthwise(self) -> bool:
        return self.kind == "depthwise"

    def factor(self) -> np.ndarray:
        return self.gamma / np.sqrt(self.variance + self.epsilon)

    def folded_kernel(self) -> np.ndarray:
        if self.bn is None:
            return self.kernel
        return self.kernel * _out_shape(self.factor(), self.kernel.shape, self.depthwise)

    def folded_bias(self) -> np.ndarray:
        b = self.bias if self.bias is not None else np.zeros(self.num_out)
        if self.bn is None:
            return b
        return self.beta + (b - self.mean) * self.factor()

    @property
    def num_out(self) -> int:
        k = self.kernel.shape
        return k[-2] * k[-1] if self.depthwise else k[-1]

    @property
    def num_in(self) -> int:
        return self.kernel.shape[-2]

    def scale_out(self, inv: np.ndarray) -> None:
        """Output channel ``i`` times ``inv[i]`` (through γ and β when a BatchNorm follows)."""
        if self.bn is not None:
            self.gamma = self.gamma * inv
            self.beta = self.beta * inv
            return
        self.kernel = self.kernel * _out_shape(inv, self.kernel.shape, self.depthwise)
        if self.bias is not None:
            self.bias = self.bias * inv

    def scale_in(self, s: np.ndarray) -> None:
        """Input channel ``i`` times ``s[i]``."""
        shape = [1] * self.kernel.ndim
        shape[-2] = -1
        self.kernel = self.kernel * np.reshape(s, shape)

    def add_to_output(self, delta: np.ndarray) -> None:
        """Adds ``delta`` to the pre-activation output (through the BN's mean, or the bias)."""
        if self.bn is not None:
            # BN((z + δ) − mean') = BN(z − mean) with mean' = mean + δ.
            self.mean = self.mean + delta
            return
        if self.bias is None:
            self.bias = np.zeros(self.num_out)
            self.needs_bias = True
        self.bias = self.bias + delta

    def input_sums(self, c: np.ndarray) -> np.ndarray:
        """``Σ W[..., i, o] · c[i]`` per output channel: the layer's response to a constant input ``c``."""
        k = self.kernel
        if self.depthwise:
            return (k * np.reshape(c, (1,) * (k.ndim - 2) + (-1, 1))).reshape(-1, k.shape[-2] * k.shape[-1]).sum(0)
        shape = [1] * k.ndim
        shape[-2] = -1
        return (k * np.reshape(c, shape)).reshape(-1, k.shape[-1]).sum(0)


@dataclass(eq=False)
class _Pair:
    first: _Unit
    second: _Unit
    repeat: int  # input channels of `second` = `repeat` copies of the channels of `first` (Flatten)
    relu6: list = field(default_factory=list)  # nodes/units whose relu6 becomes relu
    has_relu: bool = False
    absorbable: bool = True

    def in_ranges(self) -> np.ndarray:
        r = channel_ranges(self.second.folded_kernel(), "in", self.second.depthwise)
        return r.reshape(self.repeat, -1).max(axis=0)


def _unit_of(node: GraphNode, graph: ModelGraph, units: dict) -> _Unit | None:
    """The unit of a weighted layer, with the BatchNorm that alone consumes its output."""
    if node.name in units:
        return units[node.name]
    layer = node.layer
    kind = _kind(layer) if isinstance(layer, keras.layers.Layer) else None
    if kind is None or node.calls != 1 or not layer.built:
        return None
    kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel), dtype=np.float64)
    bias = np.asarray(keras.ops.convert_to_numpy(layer.bias), dtype=np.float64) if layer.use_bias else None
    unit = _Unit(node, kind, kernel, bias)
    after = graph.only_consumer(node.output)
    if after is not None and isinstance(after.layer, keras.layers.BatchNormalization) and after.calls == 1 \
            and _activation(layer) == "linear" and _bn_on_last_axis(after.layer, node.shapes):
        bn = after.layer
        n = unit.num_out
        unit.bn = bn
        unit.gamma = _vector(bn.gamma, n) if bn.scale else np.ones(n)
        unit.beta = _vector(bn.beta, n) if bn.center else np.zeros(n)
        unit.mean = _vector(bn.moving_mean, n)
        unit.variance = _vector(bn.moving_variance, n)
        unit.epsilon = float(bn.epsilon)
    units[node.name] = unit
    return unit


def _vector(variable, n):
    return np.asarray(keras.ops.convert_to_numpy(variable), dtype=np.float64).reshape(n)


def _bn_on_last_axis(bn, shapes) -> bool:
    axis = bn.axis if isinstance(bn.axis, int) else (bn.axis[0] if len(bn.axis) == 1 else None)
    if axis is None:
        return False
    rank = len(shapes[0]) if shapes and shapes[0] else None
    return axis == -1 or (rank is not None and axis == rank - 1)


def _find_pair(unit: _Unit, graph: ModelGraph, units: dict, relu6: str) -> _Pair | None:
    """Follows ``unit``'s output through ReLUs and channel-wise ops to the next weighted layer."""
    act = _activation(unit.layer)
    if act not in ("linear", "relu", "relu6"):
        return None
    key = unit.node.output if unit.bn is None else graph.node(unit.bn.name).output
    repeat, absorbable = 1, True
    relu6_nodes = [unit] if act == "relu6" else []
    has_relu = act != "linear"
    while True:
        node = graph.only_consumer(key)
        if node is None or not isinstance(node.layer, keras.layers.Layer) or node.calls != 1 \
                or node.first_input != key or len(node.inputs) != 1:
            return None
        layer = node.layer
        relu = _relu_kind(layer)
        if relu is not None:
            if relu == "relu6":
                relu6_nodes.append(node)
            has_relu = has_relu or relu != "linear"
        elif isinstance(layer, _PADDING):
            absorbable = False
        elif isinstance(layer, keras.layers.Flatten):
            shape = node.shapes[0] if node.shapes else ()
            if len(shape) < 2 or any(d is None for d in shape[1:]) \
                    or getattr(layer, "data_format", "channels_last") != "channels_last":
                return None
            repeat *= int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
        elif not isinstance(layer, _TRANSPARENT):
            second = _unit_of(node, graph, units)
            if second is None or second.num_in != unit.num_out * repeat:
                return None
            if relu6_nodes and relu6 == "skip":
                return None
            absorbable = absorbable and _no_padding(second.layer)
            return _Pair(unit, second, repeat, relu6_nodes, has_relu, absorbable)
        key = node.output


def _no_padding(layer) -> bool:
    """Whether a layer never reads zero padding (so a constant input shift maps to a constant)."""
    if isinstance(layer, keras.layers.Dense):
        return True
    size = tuple(layer.kernel_size) if hasattr(layer, "kernel_size") else ()
    return getattr(layer, "padding", "valid") == "valid" or all(k == 1 for k in size)


@dataclass
class _Plan:
    units: dict
    pairs: list
    iterations: int = 0


def _plan(graph: ModelGraph, relu6: str, high_bias_absorption: bool, max_iterations: int, tolerance: float) -> _Plan:
    units: dict = {}
    pairs = []
    for node in graph.nodes:
        unit = _unit_of(node, graph, units) if node.layer is not None else None
        if unit is None:
            continue
        pair = _find_pair(unit, graph, units, relu6)
        if pair is not None:
            pairs.append(pair)
    plan = _Plan(units, pairs)
    for plan.iterations in range(1, max_iterations + 1):
        worst = 0.0
        for pair in pairs:
            s = equalization_scales(channel_ranges(pair.first.folded_kernel(), "out", pair.first.depthwise),
                                    pair.in_ranges())
            pair.first.scale_out(1.0 / s)
            pair.second.scale_in(np.tile(s, pair.repeat))
            worst = max(worst, float(np.max(np.abs(np.log(s)))) if s.size else 0.0)
        if worst < tolerance:
            break
    if high_bias_absorption:
        for pair in pairs:
            first = pair.first
            if not (pair.has_relu and pair.absorbable and first.bn is not None):
                continue
            c = absorption_amount(first.beta, first.gamma)
            if not np.any(c > 0):
                continue
            first.beta = first.beta - c
            pair.second.add_to_output(pair.second.input_sums(np.tile(c, pair.repeat)))
    return plan


def _check_options(relu6, high_bias_absorption, fold_batchnorm_, max_iterations, tolerance):
    if relu6 not in RELU6_MODES:
        raise ValueError(f"relu6 must be one of {RELU6_MODES}. Received: relu6={relu6!r}")
    for name, value in (("high_bias_absorption", high_bias_absorption), ("fold_batchnorm", fold_batchnorm_)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool. Received: {name}={value!r}")
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 1:
        raise ValueError(f"max_iterations must be an int >= 1. Received: max_iterations={max_iterations!r}")
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not tolerance > 0:
        raise ValueError(f"tolerance must be a number > 0. Received: tolerance={tolerance!r}")


def equalize(
    model,
    *,
    high_bias_absorption: bool = True,
    relu6: str = "replace",
    fold_batchnorm: bool = False,
    max_iterations: int = 100,
    tolerance: float = 1e-4,
) -> keras.Model:
    """Cross-layer equalization and high-bias absorption: a new float model that quantizes better.

    Pairs of Conv1D/Conv2D/DepthwiseConv2D/Dense layers whose first layer's output reaches only
    the second, through ReLU/linear activations and channel-wise ops (dropout, pooling, zero
    padding, Flatten into Dense), are rescaled channel by channel so that the first layer's
    output-channel ranges equal the second's input-channel ranges (``sᵢ = sqrt(r₁ᵢ / r₂ᵢ)``, see
    the module docstring); chains are iterated until no scale moves by more than ``tolerance``
    (in ``|log s|``). Ranges are those of the kernels after BatchNorm folding (``W·γ/σ``).
    Nested models are equalized inside (pairs do not cross a model boundary).

    ReLU6 is not scale-equivariant (``min(relu(s·z), 6) ≠ s·min(relu(z), 6)``); like the DFQ paper
    and AIMET, ``relu6="replace"`` turns the ReLU6 between an equalized pair into ReLU (the
    outputs then differ where the original clipped at 6), and ``relu6="skip"`` leaves such pairs
    alone (outputs preserved).

    Output equality: with ``high_bias_absorption=False`` (pure rescaling, no ReLU6 replaced) the
    new model computes the same function; outputs agree to float32 rounding (relative ~1e-6).
    High-bias absorption changes a pre-activation ``z`` only where ``z < β − 3|γ|`` (0.135 % of a
    Gaussian); it is applied only when the second layer reads no zero padding (Dense, 1×1
    convolutions, ``padding="valid"``), and only with BatchNorm statistics.

    Args:
        model: a built Functional or Sequential Keras 3 model (nested models allowed), tf_keras model or path.
        high_bias_absorption: move large biases into the next layer (needs a BatchNorm after the first).
        relu6: ``"replace"`` or ``"skip"`` (see above).
        fold_batchnorm: remove the BatchNorms after weighted layers, folded into kernels and biases
            (``False`` keeps them, scaled; BatchNorm statistics then remain for
            ``bias_correction="analytical"`` and ``data_free``).
        max_iterations: passes over the chains.
        tolerance: stop when every ``|log sᵢ|`` of a pass is below it.

    Returns:
        A new ``keras.Model`` (Functional); the caller's model is untouched.

    Raises:
        ValueError: bad options; a subclassed model (no graph to walk); a tfq QAT model (equalize
            the float model before ``tfq.qat.quantize_model``).
        TypeError: ``model`` is not a Keras model or path.

    Warns:
        UserWarning: the model has no pair to equalize (and nothing to fold): the result computes
            the same, unchanged.

    Example:
        >>> balanced = tfq.equalize(model)                                     # doctest: +SKIP
        >>> tflite = tfq.convert(balanced, "int8", x_train[:300], per_channel=False)  # doctest: +SKIP
    """

    _check_options(relu6, high_bias_absorption, fold_batchnorm, max_iterations, tolerance)
    model = load_keras_model(model)
    if not isinstance(model, keras.Model):
        raise TypeError(f"equalize expects a keras.Model or a path to one. Received: {type(model).__name__}")
    if is_quantized_model(model):
        raise ValueError(f"equalize rescales the weights of a float model, and {model.name!r} is a tfq QAT model "
                         f"whose quantizers (ranges, weight grids) were set for its weights: equalize before QAT, "
                         f"tfq.qat.quantize_model(tfq.equalize(model)), or convert this one as is.")
    options = dict(relu6=relu6, high_bias_absorption=high_bias_absorption, fold_batchnorm=fold_batchnorm,
                   max_iterations=max_iterations, tolerance=tolerance)
    plans: list = []
    new = _equalize_level(model, options, {}, plans)
    if not any(plan.pairs for plan in plans) and not (fold_batchnorm and any(
            unit.bn is not None for plan in plans for unit in plan.units.values())):
        skipped = " (relu6='skip' leaves pairs joined by ReLU6 alone)" if relu6 == "skip" else ""
        warnings.warn(
            f"tfq.equalize: model {model.name!r} has no pair of layers to equalize{skipped} (a Conv/Dense layer "
            f"whose output reaches only the next Conv/Dense through ReLU/linear, channel-wise ops): the model "
            f"returned computes the same as yours, unchanged.",
            stacklevel=2,
        )
    return new


def _equalize_level(model: keras.Model, options: dict, done: dict, plans: list) -> keras.Model:
    functional = as_functional(model)
    graph = ModelGraph(functional)
    plan = _plan(graph, options["relu6"], options["high_bias_absorption"], options["max_iterations"],
                 options["tolerance"])
    plans.append(plan)
    changed = {id(u.layer): u for u in plan.units.values()}
    bn_of = {id(u.bn): u for u in plan.units.values() if u.bn is not None}
    replace_relu6 = set()
    for pair in plan.pairs:
        for item in pair.relu6:
            replace_relu6.add(id(item.layer))
    fold = options["fold_batchnorm"]
    sources: dict[int, object] = {}

    def clone_function(layer):
        if isinstance(layer, keras.Model):
            key = id(layer)
            if key not in done:
                done[key] = _equalize_level(layer, options, done, plans)
            return done[key]
        config = layer.get_config()
        unit = changed.get(id(layer))
        if unit is not None:
            if unit.needs_bias or (fold and unit.bn is not None):
                config["use_bias"] = True
            if id(layer) in replace_relu6:
                config["activation"] = "relu"
        if id(layer) in bn_of and not fold:
            config["scale"] = True
            config["center"] = True
        if id(layer) in replace_relu6 and isinstance(layer, keras.layers.ReLU):
            config["max_value"] = None
        elif id(layer) in replace_relu6 and isinstance(layer, keras.layers.Activation):
            config["activation"] = "relu"
        new = copy_layer(layer, config)
        sources[id(new)] = layer
        return new

    def call_function(layer, *args, **kwargs):
        source = sources.get(id(layer))
        if fold and source is not None and id(source) in bn_of:
            return args[0]
        out = layer(*args, **kwargs)
        if source is not None:
            _set_weights(source, layer, changed.get(id(source)), bn_of.get(id(source)), fold)
        return out

    new = keras.models.clone_model(functional, clone_function=clone_function, call_function=call_function)
    return new


def _set_weights(source, new, unit: _Unit | None, bn_unit: _Unit | None, fold: bool) -> None:
    if unit is not None:
        kernel, bias = unit.kernel, unit.bias
        if fold and unit.bn is not None:
            kernel, bias = unit.folded_kernel(), unit.folded_bias()
        new.kernel.assign(kernel.astype(np.float32))
        if new.use_bias:
            new.bias.assign((bias if bias is not None else np.zeros(unit.num_out)).astype(np.float32))
        return
    if bn_unit is not None:
        if fold:
            return
        new.gamma.assign(bn_unit.gamma.astype(np.float32))
        new.beta.assign(bn_unit.beta.astype(np.float32))
        new.moving_mean.assign(bn_unit.mean.astype(np.float32))
        new.moving_variance.assign(bn_unit.variance.astype(np.float32))
        return
    weights = source.get_weights()
    if weights:
        new.set_weights(weights)


def equalize_step(model, ctx) -> keras.Model:
    """The ``equalize`` post-training method (:mod:`tfq.core.ptq_methods`): :func:`equalize` with its defaults."""
    del ctx
    return equalize(model)
