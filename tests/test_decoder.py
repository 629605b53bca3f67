"""A keras-hub decoder with a causal mask (issue 28): fully integer INT8 through tfq, where the plain
TFLite converter fails and tfq used to keep each TransformerDecoder whole (NEG and RANGE float).

The model is a GPT-2 backbone built from a tiny config with random weights (no download), on a fixed
sequence length, as a decoder is deployed in TFLite.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfq
from tfq.tflite.info import inspect_tflite
from tfq.tflite.interpreter import TFLiteModel

keras_hub = pytest.importorskip("keras_hub")

T, VOCAB = 16, 50


def _sqnr(reference, got) -> float:
    reference, got = np.asarray(reference, np.float64), np.asarray(got, np.float64)
    return float(10 * np.log10(np.sum(reference ** 2) / max(np.sum((reference - got) ** 2), 1e-30)))


def _gpt2():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=32,
                                             intermediate_dim=64, max_sequence_length=T)
    inputs = {"token_ids": keras.Input((T,), dtype="int32", name="token_ids"),
              "padding_mask": keras.Input((T,), dtype="int32", name="padding_mask")}
    return keras.Model(inputs, backbone(inputs), name="gpt2")


def _tokens(n, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(T // 2, T + 1, size=n)  # right-padded sequences of 8 to 16 tokens
    mask = np.arange(T)[None] < lengths[:, None]
    return {"token_ids": np.where(mask, rng.integers(1, VOCAB, size=(n, T)), 0).astype("int32"),
            "padding_mask": mask.astype("int32")}


def _plain_converter(model, data):
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    names = sorted(data)
    converter.representative_dataset = lambda: ({k: data[k][i:i + 1] for k in names} for i in range(64))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def test_gpt2_decoder_with_causal_mask_is_fully_integer():
    model = _gpt2()
    calibration, test = _tokens(128, 0), _tokens(48, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        content = tfq.convert(model, "int8", calibration)
    # Decomposed (the causal mask a constant of the static length, the position embeddings a constant
    # too): no layer kept whole, so no warning, and no float op. Kept whole, each decoder left NEG and
    # RANGE float (6 ops, 4 on a fixed length).
    assert [str(w.message) for w in caught if "tfq" in str(w.message)] == []
    info = inspect_tflite(content)
    assert info.float_ops == []
    assert not {"RANGE", "NEG"} & {op.type for op in info.ops}
    assert sum(op.type == "SOFTMAX" for op in info.ops) == 2  # int8, as every op
    runner = TFLiteModel(content)
    assert {d["name"]: d["dtype"] for d in runner.input_details} == {"token_ids": np.int32, "padding_mask": np.int32}
    reference = keras.ops.convert_to_numpy(model(test))
    got = runner.predict(test)
    valid = test["padding_mask"].astype(bool)  # padded positions are not compared (their output is unused)
    assert _sqnr(reference[valid], got[valid]) > 28.0  # measured 31.1 dB (kept whole before: 30.7 dB, 4 NEG float)
    # The causal mask holds in the integer model: the first tokens' outputs do not depend on later ones.
    changed = {k: v.copy() for k, v in test.items()}
    changed["token_ids"][:, T // 2:] = (changed["token_ids"][:, T // 2:] % (VOCAB - 1)) + 1
    np.testing.assert_array_equal(runner.predict(changed)[:, :T // 2], got[:, :T // 2])
    # The plain converter cannot convert it at all: alone, Keras' trace fails inside the backbone
    # ("'NoneType' object is not callable"); after other models in the same process, on the inputs' structure.
    with pytest.raises((TypeError, ValueError), match="NoneType|structure of `inputs`"):
        _plain_converter(model, calibration)


def test_gpt2_backbone_of_unknown_length_names_its_float_ops_and_the_fix():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=32,
                                             intermediate_dim=64, max_sequence_length=T)  # inputs (None, None)
    calibration, test = _tokens(128, 0), _tokens(32, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        content = tfq.convert(backbone, "int8", calibration)
    messages = [str(w.message) for w in caught if str(w.message).startswith("tfq:")]
    kept = next(m for m in messages if "TransformerDecoder" in m)
    assert "static sequence length" in kept and "fixed sequence length" in kept
    floats = sorted(op.type for op in inspect_tflite(content).float_ops)
    assert floats == ["NEG"] * 4 + ["RANGE"] * 2  # TFLite has no int8 kernel for either
    assert any("NEG in transformer_layer_0" in m and "RANGE" in m for m in messages)
    # The .tflite takes any length (its signature says -1): run at the data's, 16.
    got = TFLiteModel(content).predict(test)
    reference = keras.ops.convert_to_numpy(backbone(test))
    valid = test["padding_mask"].astype(bool)
    assert _sqnr(reference[valid], got[valid]) > 25.0
