"""What pruning and clustering share: which weight of a layer they compress, layer selection, the
wrapper base class, and the model rewrites that add or remove wrappers.

Internal: the public API is :mod:`tfq.pruning` and :mod:`tfq.clustering`.
"""

from __future__ import annotations

import inspect

import keras
import numpy as np

from tfq.core.messages import short_repr
from tfq.core.recipes import _matches
from tfq.models.interop import load_keras_model
from tfq.models.loading import is_quantized_model
from tfq.quantsim.layers import QuantizedLayer
from tfq.quantsim.rewrite import (
    _as_functional,
    _clone_nested,
    _copy_layer,
    _walk_layers,
)
from tfq.tflite.info import distinct_per_channel

# The weight each layer type has compressed (the one TFLite stores as the op's filter), most
# specific class first: a separable convolution's pointwise kernel holds nearly all its weights.
_MAIN_WEIGHTS = (
    ((keras.layers.SeparableConv1D, keras.layers.SeparableConv2D), "pointwise_kernel"),
    ((keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
      keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D, keras.layers.Conv1DTranspose,
      keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose), "kernel"),
    ((keras.layers.Embedding,), "embeddings"),
)


def main_weight_name(layer) -> str | None:
    """Name of the weight pruning/clustering compresses in ``layer`` (None: nothing to compress)."""
    for classes, name in _MAIN_WEIGHTS:
        if isinstance(layer, classes):
            return name
    return None


def supported_layer_types() -> list[str]:
    return [cls.__name__ for classes, _ in _MAIN_WEIGHTS for cls in classes]


def _patterns(value, what: str) -> list[str]:
    """Names/regexes stay; layer classes become ``class:Name`` (as ``float_layers`` in tfq.convert)."""
    if value is None:
        return []
    if isinstance(value, (str, type)):
        value = [value]
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(f"{what} must be a list of layer names, regexes, 'class:Name' or layer classes (or one). "
                        f"Received: {what}={short_repr(value)}")
    out = []
    for item in value:
        if isinstance(item, type):
            out.append(f"class:{item.__name__}")
        elif isinstance(item, str):
            out.append(item)
        else:
            raise TypeError(f"{what} items are layer names, regexes, 'class:Name' or layer classes. "
                            f"Received: {what}=[{short_repr(item)}, ...]")
    return out


def layer_selector(model, layers, skip_layers, who: str):
    """A predicate ``layer -> bool`` for the layers ``who`` compresses.

    ``layers`` (None: every layer with a compressible weight) and ``skip_layers`` are layer names,
    regexes (``re.fullmatch``), ``"class:Name"`` patterns or layer classes, as in recipes. A pattern
    that matches no layer of the model (nested models included) is refused: it is a typo.
    """
    chosen, skipped = _patterns(layers, "layers"), _patterns(skip_layers, "skip_layers")
    all_layers = [layer for layer in _walk_layers(model) if not isinstance(layer, keras.Model)]
    for what, patterns in (("layers", chosen), ("skip_layers", skipped)):
        for p in patterns:
            if not any(_matches(p, layer.name, type(layer).__name__) for layer in all_layers):
                raise ValueError(f"{who}: {what} pattern {p!r} matches no layer of model {model.name!r}. "
                                 f"Layers: {[layer.name for layer in all_layers][:20]}.")

    def selected(layer) -> bool:
        name, cls = layer.name, type(layer).__name__
        if chosen and not any(_matches(p, name, cls) for p in chosen):
            return False
        if any(_matches(p, name, cls) for p in skipped):
            return False
        return main_weight_name(layer) is not None

    for layer in all_layers:  # a layer named exactly, with nothing to compress: refused, not skipped
        if chosen and main_weight_name(layer) is None and layer.name in chosen:
            raise ValueError(f"{who}: layer {layer.name!r} ({type(layer).__name__}) has no weight to compress. "
                             f"Supported: {', '.join(supported_layer_types())}.")
    return selected


class CompressionWrapper(keras.layers.Layer):
    """A layer computed with a transformed main weight (masked, clustered …).

    The wrapped layer runs through ``Layer.stateless_call`` with its main weight replaced by
    :meth:`effective_weight`, so gradients reach what the transform is made of (the kept weights,
    the centroids) and nothing else.
    """

    def __init__(self, layer, **kwargs):
        if isinstance(layer, dict):
            layer = keras.saving.deserialize_keras_object(layer)
        name = main_weight_name(layer)
        if name is None:
            raise TypeError(f"{type(self).__name__} wraps one of {supported_layer_types()}. "
                            f"Received: {type(layer).__name__} ({getattr(layer, 'name', '?')})")
        if isinstance(layer, CompressionWrapper):
            raise TypeError(f"layer {layer.name!r} is already wrapped; strip it first.")
        kwargs.setdefault("name", layer.name)
        super().__init__(**kwargs)
        self.layer = layer
        self.weight_name = name
        self._accepts_training = "training" in inspect.signature(layer.call).parameters
        self.supports_masking = getattr(layer, "supports_masking", False)

    @property
    def main_weight(self):
        """The wrapped layer's variable that is compressed."""
        return getattr(self.layer, self.weight_name)

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        self.built = True

    def effective_weight(self, training=None):
        """The main weight the layer computes with (subclasses define it)."""
        raise NotImplementedError

    def initialize(self) -> None:
        """Called once the wrapped layer holds its weights (subclasses set their state from them)."""

    def call(self, inputs, training=None, **kwargs):
        main = self.main_weight
        effective = self.effective_weight(training)
        trainable = [effective if v is main else keras.ops.convert_to_tensor(v) for v in self.layer.trainable_variables]
        non_trainable = [effective if v is main else keras.ops.convert_to_tensor(v)
                         for v in self.layer.non_trainable_variables]
        if self._accepts_training:
            kwargs["training"] = training
        outputs, _ = self.layer.stateless_call(trainable, non_trainable, inputs, **kwargs)
        return outputs

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def stripped_weights(self) -> list[np.ndarray]:
        """The wrapped layer's weights (``layer.get_weights()`` order) with the main one transformed."""
        main = self.main_weight
        effective = keras.ops.convert_to_numpy(self.effective_weight(False))
        return [effective if v is main else keras.ops.convert_to_numpy(v) for v in self.layer.weights]

    def get_config(self):
        config = super().get_config()
        config["layer"] = keras.saving.serialize_keras_object(self.layer)
        return config


def wrappers_of(model, cls=CompressionWrapper) -> list:
    """Every wrapper of class ``cls`` in ``model`` (nested models and subclassed containers included)."""
    return [layer for layer in _walk_layers(model) if isinstance(layer, cls)]


def wrap_model(model, selected, make_wrapper) -> keras.Model:
    """A copy of ``model`` whose selected layers are wrapped by ``make_wrapper(copy_of_layer)``.

    Weights are copied; ``wrapper.initialize()`` (if any) runs once the wrapped layer holds them.
    """
    sources: dict[int, object] = {}
    copies: dict[int, object] = {}
    copied: set[int] = set()

    def clone_function(layer):
        if id(layer) not in copies:  # a shared layer stays shared
            inner = _copy_layer(layer)
            new = make_wrapper(inner) if selected(layer) else inner
            copies[id(layer)] = new
            sources[id(new)] = layer
        return copies[id(layer)]

    def call_function(layer, *args, **kwargs):
        out = layer(*args, **kwargs)
        source = sources.get(id(layer))
        if source is not None and isinstance(source, keras.layers.Layer) and source.weights and id(layer) not in copied:
            wrapped = isinstance(layer, CompressionWrapper)
            (layer.layer if wrapped else layer).set_weights(source.get_weights())
            if wrapped:
                layer.initialize()
            copied.add(id(layer))
        return out

    return _clone_nested(_as_functional(model), clone_function, call_function)


def strip_model(model, cls=CompressionWrapper) -> keras.Model:
    """A copy of ``model`` with each ``cls`` wrapper replaced by its layer holding :meth:`stripped_weights`."""
    sources: dict[int, object] = {}
    copies: dict[int, object] = {}
    copied: set[int] = set()

    def clone_function(layer):
        if id(layer) not in copies:
            new = _copy_layer(layer.layer if isinstance(layer, cls) else layer)
            copies[id(layer)] = new
            sources[id(new)] = layer
        return copies[id(layer)]

    def call_function(layer, *args, **kwargs):
        out = layer(*args, **kwargs)
        source = sources.get(id(layer))
        if source is not None and isinstance(source, keras.layers.Layer) and source.weights and id(layer) not in copied:
            layer.set_weights(source.stripped_weights() if isinstance(source, cls) else source.get_weights())
            copied.add(id(layer))
        return out

    return _clone_nested(_as_functional(model), clone_function, call_function)


def strip_all(model):
    """``model`` without pruning or clustering wrappers (itself when it has none)."""
    if not isinstance(model, keras.Model) or not wrappers_of(model):
        return model
    return strip_model(model)


# ----------------------------------------------------------------------------------------------
# Weight statistics (the reports)
# ----------------------------------------------------------------------------------------------


def keras_kernels(model) -> list[tuple[str, np.ndarray]]:
    """``(layer name, main weight as used)`` for every compressible layer of a Keras model.

    Wrappers give their effective weight (masked, clustered; a tfq QAT layer its preserved kernel),
    so the figures describe what the model computes with.
    """

    found = []
    for layer in _walk_layers(model):
        if isinstance(layer, CompressionWrapper):
            found.append((layer.name, keras.ops.convert_to_numpy(layer.effective_weight(False))))
        elif isinstance(layer, QuantizedLayer):
            inner = layer.layer
            name = main_weight_name(inner)
            if name is not None:
                weights = layer.layer_weights() if hasattr(layer, "layer_weights") else inner.get_weights()
                main = getattr(inner, name)
                found.append((layer.name, next(w for w, v in zip(weights, inner.weights) if v is main)))
        elif not isinstance(layer, keras.Model) and main_weight_name(layer) is not None and layer.built:
            found.append((layer.name, keras.ops.convert_to_numpy(getattr(layer, main_weight_name(layer)))))
    return found


def weight_stats(arrays_and_axes) -> dict:
    """Sparsity and distinct values per channel over ``[(array, channel axis or None), ...]``.

    ``weight_sparsity`` = zeros / elements over all the arrays; ``max_distinct_per_channel`` = the
    most distinct values any one channel holds (None without arrays).
    """
    total = zeros = 0
    distinct = 0
    for values, axis in arrays_and_axes:
        v = np.asarray(values)
        total += v.size
        zeros += int(np.count_nonzero(v == 0))
        if v.size:
            distinct = max(distinct, int(distinct_per_channel(v, axis).max()))
    return {"weight_sparsity": zeros / total if total else None,
            "max_distinct_per_channel": distinct if total else None}


def load_plain_model(model, who: str) -> keras.Model:
    """``model`` (or the file it names) as a Keras 3 model to compress: refused if it already carries
    compression wrappers or is a tfq QAT model, with the fix named after ``who``."""
    model = load_keras_model(model, where=who)
    if wrappers_of(model):
        raise ValueError(f"{who}: model {model.name!r} already has pruning/clustering wrappers; strip them first "
                         f"(tfq.pruning.strip_pruning / tfq.clustering.strip_clustering).")
    if is_quantized_model(model):
        raise ValueError(f"{who}: model {model.name!r} is a tfq QAT model; compress the float model, strip it, then "
                         f"quantize it with tfq.qat.quantize_model(..., preserve=...).")
    return model
