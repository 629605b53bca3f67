"""How each Keras layer type is quantized: the single dispatch point.

Every layer the rewrite meets falls in one kind:

* ``"weighted"``: computed by :class:`~tfq.quantsim.layers.QuantizedLayer` on fake-quantized weights.
* ``"passthrough"``: TFLite keeps its input's scale (reshape, pooling by max, padding, dropout …):
  no quantizer is added.
* ``"output"``: a quantizer is added after its output (add, concatenate, mean, swish …).
* ``"fixed"``: the output range is fixed by TFLite (softmax/sigmoid ``[0, 1)`` with scale 1/256,
  tanh ``[-1, 1)`` with scale 1/128).
* ``"float"``: the layer stays float (its output gets no quantizer).
* ``"composite"``: the layer is rewritten as the graph of the ops and sublayers it calls, each
  quantized by its own rule (its ``call`` traced on symbolic tensors, or a registered
  ``decompose`` function). A layer found nowhere is treated so too when its ``call`` can be
  traced and the traced graph computes what the layer computes; otherwise it is kept whole,
  its output quantized by tfq and its inner tensors calibrated by the TFLite converter.

Users register their own layers with :func:`register_layer`; an entry is validated when it is
registered.
"""

from __future__ import annotations

import keras

from tfq.quantsim import decompositions
from tfq.quantsim.layers import WEIGHTED_LAYER_TYPES, activation_name

__all__ = ["KINDS", "decomposition", "fixed_output_range", "has_decomposition", "is_registered", "layer_kind",
           "register_layer", "unregister_layer"]

KINDS = ("weighted", "passthrough", "output", "fixed", "float", "composite")

_L = keras.layers

_PASSTHROUGH = (
    _L.Reshape, _L.Flatten, _L.Dropout, _L.SpatialDropout1D, _L.SpatialDropout2D, _L.SpatialDropout3D,
    _L.GaussianNoise, _L.GaussianDropout, _L.AlphaDropout, _L.ActivityRegularization, _L.Identity,
    _L.MaxPooling1D, _L.MaxPooling2D, _L.MaxPooling3D, _L.GlobalMaxPooling1D, _L.GlobalMaxPooling2D,
    _L.GlobalMaxPooling3D, _L.AveragePooling1D, _L.AveragePooling2D, _L.AveragePooling3D,
    _L.ZeroPadding1D, _L.ZeroPadding2D, _L.ZeroPadding3D, _L.Cropping1D, _L.Cropping2D, _L.Cropping3D,
    _L.Permute, _L.RepeatVector, _L.Masking,
)

_OUTPUT = (
    _L.Add, _L.Subtract, _L.Multiply, _L.Average, _L.Maximum, _L.Minimum, _L.Concatenate,
    _L.GlobalAveragePooling1D, _L.GlobalAveragePooling2D, _L.GlobalAveragePooling3D,
    _L.BatchNormalization, _L.Rescaling, _L.Normalization, _L.LeakyReLU, _L.PReLU, _L.ReLU,
    _L.UpSampling1D, _L.UpSampling2D, _L.UpSampling3D, _L.Resizing,
)


_FIXED_RANGES = {
    "softmax": (0.0, 255.0 / 256.0),
    "sigmoid": (0.0, 255.0 / 256.0),
    "hard_sigmoid": None,
    "tanh": (-1.0, 127.0 / 128.0),
}

_USER: dict[type, str] = {}
_DECOMPOSE: dict[type, object] = {}
# Built-in layers and keras.ops operations rewritten as ops with int8 kernels (see decompositions).
_BUILTIN_DECOMPOSE = {
    _L.LayerNormalization: decompositions.layer_normalization,
    _L.LSTM: decompositions.lstm,
    _L.GRU: decompositions.gru,
    _L.SimpleRNN: decompositions.simple_rnn,
    _L.Bidirectional: decompositions.bidirectional,
}
_OP_DECOMPOSE = {"DotProductAttention": decompositions.dot_product_attention}
# Layers of other Keras libraries (matched by module and class name, so that the library is optional).
_LIBRARY_DECOMPOSE = {("keras_hub", "TransformerDecoder"): decompositions.transformer_decoder}
# Layers decomposed only when called with a mask (unmasked, each is one int8 op).
_MASKED_DECOMPOSE = {_L.Softmax: decompositions.masked_softmax}


def register_layer(layer_class: type, kind: str, decompose=None) -> None:
    """Tells tfq how to quantize ``layer_class`` (and its subclasses).

    Args:
        layer_class: a ``keras.layers.Layer`` subclass.
        kind: ``"output"`` for a layer that is one TFLite op whose output TFLite quantizes,
            ``"passthrough"`` for one that keeps its input's scale (reshape-like), ``"float"`` to
            keep it float, ``"composite"`` for a layer made of several ops: tfq rewrites it as
            the graph of those ops and sublayers and quantizes each (``"weighted"`` and
            ``"fixed"`` are reserved for built-in layers).
        decompose: with ``"composite"``, an optional function ``decompose(layer, *args,
            **kwargs)`` that computes the layer's output from its (symbolic) inputs with Keras
            layers and ``keras.ops``; by default tfq traces ``layer.call``. tfq checks on probe
            data that the graph computes what the layer computes.

    Raises:
        TypeError: ``layer_class`` is not a Keras layer class, or ``decompose`` is not callable.
        ValueError: unknown ``kind``, or ``decompose`` with another kind.

    Example:
        >>> class MyScale(keras.layers.Layer):
        ...     def call(self, x):
        ...         return 2.0 * x
        >>> register_layer(MyScale, "output")
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
        raise TypeError(f"register_layer expects a keras.layers.Layer subclass. Received: {layer_class!r}")
    allowed = ("passthrough", "output", "float", "composite")
    if kind not in allowed:
        raise ValueError(f"register_layer kind must be one of {allowed}. Received: kind={kind!r}")
    if decompose is not None and kind != "composite":
        raise ValueError(f"decompose= applies to kind='composite' only. Received: kind={kind!r}")
    if decompose is not None and not callable(decompose):
        raise TypeError(f"decompose must be a function (layer, *args, **kwargs) -> outputs. Received: {decompose!r}")
    _USER[layer_class] = kind
    if decompose is not None:
        _DECOMPOSE[layer_class] = decompose
    else:
        _DECOMPOSE.pop(layer_class, None)


def _registered(table: dict, layer):
    for cls in type(layer).__mro__:
        if cls in table:
            return table[cls]
    return None


def _library_decomposition(layer):
    for cls in type(layer).__mro__:
        found = _LIBRARY_DECOMPOSE.get((cls.__module__.split(".")[0], cls.__name__))
        if found is not None:
            return found
    return None


def has_decomposition(layer) -> bool:
    """Whether a ``decompose`` function was registered for ``layer``'s class."""
    return _registered(_DECOMPOSE, layer) is not None


def decomposition(layer, masked: bool = False):
    """The function that computes ``layer`` from ops: the registered one, a built-in one, or its ``call``.
    ``masked``: the layer is called with a mask (a Softmax is then decomposed, see :func:`layer_kind`)."""
    found = _registered(_DECOMPOSE, layer)
    if found is None and isinstance(layer, keras.layers.Layer):
        found = _registered(_BUILTIN_DECOMPOSE, layer) or _library_decomposition(layer) or (
            _registered(_MASKED_DECOMPOSE, layer) if masked else None)
    elif found is None:
        found = _OP_DECOMPOSE.get(type(layer).__name__)
    return found or _trace_call


def _trace_call(layer, *args, **kwargs):
    return layer.call(*args, **kwargs)


def unregister_layer(layer_class: type) -> None:
    """Removes a registration made with :func:`register_layer` (no-op if absent)."""
    _USER.pop(layer_class, None)
    _DECOMPOSE.pop(layer_class, None)


def is_registered(layer) -> bool:
    """Whether ``layer``'s class (or a base class) was registered with :func:`register_layer`."""
    return any(cls in _USER for cls in type(layer).__mro__)


# keras.ops operations whose int8 output range TFLite fixes.
_FIXED_OPS = {"Softmax": "softmax", "Sigmoid": "sigmoid", "Tanh": "tanh"}


def fixed_output_range(layer) -> tuple[float, float] | None:
    """The output range TFLite fixes for ``layer``'s activation, if any."""
    if not isinstance(layer, keras.layers.Layer):
        name = _FIXED_OPS.get(type(layer).__name__)
        return _FIXED_RANGES[name] if name else None
    if isinstance(layer, _L.Softmax):
        return _FIXED_RANGES["softmax"]
    if isinstance(layer, _L.Activation):
        return _FIXED_RANGES.get(activation_name(layer.activation))
    return None


# Keras operations that appear as graph nodes (``x + 3.0``, ``keras.ops.reshape`` in a functional
# model): those that only move data keep their input's scale; the rest get an output quantizer.
_PASSTHROUGH_OPS = ("Reshape", "Transpose", "Squeeze", "ExpandDims", "GetItem", "Flatten", "Identity",
                    "BroadcastTo", "Tile", "Repeat", "Split", "Stack", "Max", "Min", "Maximum", "Minimum",
                    "Where", "Slice", "Take", "TakeAlongAxis")
# Operations whose output is not a float activation (shapes, indices, masks): nothing to quantize.
_NON_FLOAT_OPS = ("Cast", "Shape", "Argmax", "Argmin", "Equal", "NotEqual", "Greater", "GreaterEqual", "Less",
                  "LessEqual", "LogicalAnd", "LogicalOr", "LogicalNot")


def _int8_relu(layer) -> bool:
    """A ReLU layer TFLite runs as one int8 op: relu, relu6 or leaky relu (no threshold, no other cap)."""
    if float(layer.threshold) != 0.0:
        return False
    if layer.max_value is None:
        return True
    return float(layer.negative_slope) == 0.0 and float(layer.max_value) == 6.0


def layer_kind(layer, masked: bool = False) -> str | None:
    """The kind of ``layer`` (see :data:`KINDS`), or ``None`` if tfq does not know it. ``masked``: the
    layer is called with a mask; a masked Softmax (attention's) is ``"composite"``: its masked logits
    need a range of their own (:func:`~tfq.quantsim.decompositions.masked_softmax`)."""
    if not isinstance(layer, keras.layers.Layer):  # a bare keras.ops operation node
        name = type(layer).__name__
        if name in _OP_DECOMPOSE:
            return "composite"
        if name in _PASSTHROUGH_OPS or name in _NON_FLOAT_OPS:
            return "passthrough"
        if name in _FIXED_OPS:
            return "fixed"
        return "output"
    for cls in type(layer).__mro__:
        if cls in _USER:
            return _USER[cls]
    if isinstance(layer, WEIGHTED_LAYER_TYPES):
        return "weighted"
    if _registered(_BUILTIN_DECOMPOSE, layer) is not None or _library_decomposition(layer) is not None or (
            masked and _registered(_MASKED_DECOMPOSE, layer)):
        return "composite"
    if isinstance(layer, _PASSTHROUGH):
        return "passthrough"
    if isinstance(layer, _L.ReLU) and not _int8_relu(layer):
        return None  # several ops: traced like any composite layer
    if isinstance(layer, _L.Activation) and activation_name(layer.activation) == "linear":
        return "passthrough"  # an identity: a quantizer after it would repeat the one before
    if fixed_output_range(layer) is not None:
        return "fixed"
    if isinstance(layer, (_L.Activation, _L.Softmax)) or isinstance(layer, _OUTPUT):
        return "output"
    if isinstance(layer, _L.Lambda):
        return "composite"  # its function is traced into ops (kept whole if it cannot be)
    if type(layer).__name__ in ("TFOpLambda", "SlicingOpLambda"):
        return "output"
    return None
