"""keras-hub's TransformerDecoder decomposed through its public surface only: tfq builds its own sublayers
from ``get_config()`` and gives them the layer's weights by path, and keeps the layer whole (with a
warning naming why) when the weights do not match what the config makes."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

import tfq
from tfq.quantsim import decompositions
from tfq.tflite.info import inspect_tflite
from tfq.tflite.interpreter import TFLiteModel

keras_hub = pytest.importorskip("keras_hub")

T, D = 16, 32


def _model(decoder):
    keras.utils.set_random_seed(1)
    x = keras.Input((T, D), name="x")
    padding = keras.Input((T,), dtype="int32", name="padding_mask")
    return keras.Model({"x": x, "padding_mask": padding}, decoder(x, decoder_padding_mask=padding),
                       name="decoder_model")


def _data(n, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(T // 2, T + 1, size=n)
    return {"x": rng.standard_normal((n, T, D)).astype("float32"),
            "padding_mask": (np.arange(T)[None] < lengths[:, None]).astype("int32")}


def _convert(model, n=64):
    data = _data(n, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        content = tfq.convert(model, "int8", data)
    return content, [str(w.message) for w in caught if str(w.message).startswith("tfq:")]


@pytest.mark.parametrize("normalize_first, activation", [(False, "relu"), (True, "gelu")])
def test_decoder_is_rebuilt_from_its_config_and_computes_the_layer(normalize_first, activation):
    # normalize_first, the activation and a layer_norm_epsilon of its own: all read from get_config(), the
    # weights by path; compared with the layer's own call (an independent path) on padded sequences.
    layer = keras_hub.layers.TransformerDecoder(intermediate_dim=32, num_heads=2, activation=activation,
                                                layer_norm_epsilon=1e-3, normalize_first=normalize_first)
    model = _model(layer)
    x, padding = keras.Input((T, D)), keras.Input((T,), dtype="int32")
    rebuilt = keras.Model([x, padding], decompositions.transformer_decoder(layer, x, decoder_padding_mask=padding))
    assert not {id(w) for w in rebuilt.weights} & {id(w) for w in layer.weights}  # its own sublayers
    test = _data(16, 1)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(rebuilt([test["x"], test["padding_mask"]])),
                               keras.ops.convert_to_numpy(model(test)), atol=2e-5)
    content, messages = _convert(model)
    assert [m for m in messages if "TransformerDecoder" in m] == []  # decomposed
    info = inspect_tflite(content)
    assert info.float_ops == [] and not {"RANGE", "NEG"} & {op.type for op in info.ops}
    reference = np.asarray(keras.ops.convert_to_numpy(model(test)), np.float64)
    got = np.asarray(TFLiteModel(content).predict(test), np.float64)
    valid = test["padding_mask"].astype(bool)  # padded positions are not compared (their output is unused)
    error = np.sum((reference[valid] - got[valid]) ** 2)
    assert 10 * np.log10(np.sum(reference[valid] ** 2) / error) > 25.0  # measured 29.2 dB (post-norm, relu)


class _ExtraWeightDecoder(keras_hub.layers.TransformerDecoder):
    """A decoder with one weight more than its config's sublayers hold (unused by its call)."""

    def build(self, decoder_sequence_shape, encoder_sequence_shape=None):
        super().build(decoder_sequence_shape, encoder_sequence_shape)
        self.extra = self.add_weight(shape=(3,), initializer="ones", name="extra")


def test_decoder_whose_weights_do_not_match_its_config_is_kept_whole_with_a_warning():
    model = _model(_ExtraWeightDecoder(intermediate_dim=32, num_heads=4))
    content, messages = _convert(model)
    kept = [m for m in messages if "transformer_decoder" in m.lower() or "ExtraWeightDecoder" in m]
    assert any("17 weights where its config makes 16" in m for m in kept), messages
    assert len(model.get_layer(index=-1).weights) == 17  # the caller's layer untouched
    floats = {op.type for op in inspect_tflite(content).float_ops}
    assert floats == {"NEG"}  # kept whole: its own lowering leaves NEG float (decomposed: no float op)
