"""The benchmark's int4 and model-kind sections (scripts/benchmark_lib.py) on tiny models.

Independent paths: the INT4 tensors LiteRT's interpreter reads (counted from the flatbuffer), the accuracy
recomputed here from LiteRT's outputs, and the plain converter's crash on silence from a separate process.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest

import tfq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # the benchmark lives in scripts/

import benchmark_lib  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Dense(64, activation="relu")(x)))
    rng = np.random.default_rng(0)
    x = rng.random((96, 8, 8, 1)).astype("float32")
    return model, x[:64], x[64:], rng.integers(0, 10, size=32)


def test_int4_rows_against_litert_quantizer(tiny):
    model, calib, x_test, y_test = tiny
    rows = benchmark_lib.int4_rows("tiny", model, calib, x_test, y_test,
                                   rows=(("tfq_w4_dynamic_nearest", {"mode": "w4_dynamic", "data": False}),
                                         ("tfq_w4a8_bad", {"recipe": {"weights": {"bits": 3}}, "data": True})),
                                   aeq_rows=(("aeq_dynamic_wi4", "dynamic", "CHANNELWISE"),), log=lambda m: None)
    by_name = {r["name"]: r for r in rows}
    assert list(by_name) == ["float", "tfq_int8", "converter_dynamic_int8", "tfq_w4_dynamic_nearest", "tfq_w4a8_bad",
                             "aeq_dynamic_wi4"]
    assert "4 or 8-bit int8 weights" in by_name["tfq_w4a8_bad"]["error"]  # recorded, not raised
    w4 = by_name["tfq_w4_dynamic_nearest"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        content = tfq.convert(model, "w4_dynamic")
    assert (w4["int4_weights"], w4["float_weights"]) == (3, 0) == (len(tfq.tflite.int4.int4_tensors(content)), 0)
    out = tfq.TFLiteModel(content).predict(x_test)
    assert w4["accuracy"] == pytest.approx(float((out.argmax(1) == y_test).mean()))
    assert w4["size_vs_int8"] == pytest.approx(len(content) / by_name["tfq_int8"]["size_bytes"])
    assert by_name["aeq_dynamic_wi4"]["int4_weights"] == 3
    table = benchmark_lib.int4_markdown({"rows": rows})
    assert "| tiny | tfq_w4_dynamic_nearest |" in table and "fails: " in table


def test_kind_row_audio_saved_model_silence(tmp_path):
    """The STFT/normalising-DIV SavedModel: the plain converter's INT8 crashes on silence (run in a separate
    process), tfq's does not and keeps the DIV float."""
    row = benchmark_lib.kind_row("audio_saved_model_stft_div", str(tmp_path), log=lambda m: None)
    plain, ours = row["plain_converter"], row["tfq"]
    assert plain["converts"] and plain["silence_crashes"]
    assert ours["converts"] and not ours["silence_crashes"] and not ours["silence_nonfinite"]
    assert "DIV" in ours["float_ops"] and "DIV" not in plain["float_ops"]
    assert ours["sqnr_db"] >= plain["sqnr_db"] - 0.5
    assert "crashes" in benchmark_lib.kinds_markdown({"rows": [row]})
