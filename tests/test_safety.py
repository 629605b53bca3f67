"""Issue 28 items 5 and 6: no broken model leaves tfq.convert silently; tfq.evaluate takes every model form.

The failing case is built here, small and without downloads: a normalising front-end,
``x / (max|x| + 1e-10)``, fed silence. Its INT8 DIV fails in LiteRT's kernel (``data[i] != zero_point``:
the divisor rounds to the zero-point) and its FP16 model outputs NaN (1e-10 is 0 in float16).
The independent path is LiteRT's interpreter, run in a separate process (tfq.tflite.sandbox) or in
this one where the model is known not to abort.
"""

from __future__ import annotations

import math
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfq.analysis.evaluation import evaluate, sqnr_db
from tfq.analysis.report import Report
from tfq.export import check as checker
from tfq.export.convert import ConversionError, convert
from tfq.tflite.info import inspect_tflite
from tfq.tflite.interpreter import TFLiteModel
from tfq.tflite.sandbox import Sandbox


class Normalise(keras.layers.Layer):
    """The spectrogram front-end's normalisation: each window divided by its largest |value| (+ eps)."""

    def call(self, x):
        return x / (tf.reduce_max(tf.abs(x), axis=-1, keepdims=True) + 1e-10)


def frontend_model():
    inp = keras.Input((64,), name="audio")
    x = Normalise(name="normalise")(inp)
    x = keras.layers.Dense(16, activation="relu", name="d1")(x)
    return keras.Model(inp, keras.layers.Dense(4, name="head")(x), name="frontend")


class FrontModule(tf.Module):
    """The same front-end as a plain SavedModel (tf.saved_model.save), with three outputs."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(1)
        self.w = tf.Variable(rng.normal(size=(64, 8)).astype("float32") * 0.3)
        self.w2 = tf.Variable(rng.normal(size=(8, 3)).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec([1, 64], tf.float32, name="audio")])
    def __call__(self, audio):
        x = audio / (tf.reduce_max(tf.abs(audio), axis=-1, keepdims=True) + 1e-10)
        h = tf.nn.relu(tf.matmul(x, self.w))
        return {"embedding": h, "scores": tf.nn.sigmoid(tf.matmul(h, self.w2)),
                "energy": tf.reduce_mean(tf.square(audio), axis=-1, keepdims=True)}


@pytest.fixture(scope="module")
def audio():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(48, 64)) * rng.uniform(0.1, 1, size=(48, 1))).astype("float32")


@pytest.fixture(scope="module")
def frontend():
    keras.utils.set_random_seed(0)
    return frontend_model()


@pytest.fixture(scope="module")
def frontend_saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("front") / "saved_model"
    module = FrontModule()
    tf.saved_model.save(module, str(path), signatures=module.__call__)
    return str(path)


def _plain_int8(model, data) -> bytes:
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([s[None]] for s in data)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def _sandbox_run(content, samples):
    with Sandbox() as sandbox:
        return sandbox.run(content, samples)


def _zeros():
    return np.zeros((1, 64), np.float32)


# --------------------------------------------------------------------------------------------
# The failing case, with the plain converter, in a separate process
# --------------------------------------------------------------------------------------------


def test_plain_converter_int8_fails_on_silence_in_a_worker(frontend, audio):
    content = _plain_int8(frontend, audio[:32])
    result = _sandbox_run(content, [[audio[:1]], [_zeros()]])
    assert len(result.outputs) == 1 and np.all(np.isfinite(result.outputs[0][0]))  # a loud window runs
    assert result.failed_sample == 1  # silence fails
    assert "div.cc" in result.message and "data[i] != zero_point" in result.message


def test_sandbox_survives_an_aborting_kernel():
    """A failed TFLITE_CHECK kills the process: the worker dies, the caller gets the sample and the message."""
    script = ("import os, sys\nsys.stdin.readline()\nprint('sample 0', flush=True)\nprint('sample 1', flush=True)\n"
              "sys.stderr.write('tflite/kernels/div.cc:262 data[i] != zero_point was not true.\\n')\n"
              "sys.stderr.flush()\nos.abort()\n")

    class Aborting(Sandbox):
        def start(self):
            import subprocess
            import tempfile

            if self._proc is None or self._proc.poll() is not None:
                self._stderr = tempfile.TemporaryFile()
                self._proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, stderr=self._stderr, text=True)

    with Aborting() as sandbox:
        result = sandbox.run(b"TFL3", [[_zeros()], [_zeros()]])
    assert result.aborted and result.failed_sample == 1
    assert "data[i] != zero_point" in result.message
    info = inspect_tflite(convert(frontend_model(), "float", check=False))
    op_type, ops = checker._culprit_ops(info, result.message)  # the kernel file names the op
    assert op_type == "DIV" and [op.type for op in ops] == ["DIV"]


# --------------------------------------------------------------------------------------------
# tfq.convert: fixed by default, named, or refused
# --------------------------------------------------------------------------------------------


def test_int8_crash_is_fixed_and_named(frontend, audio):
    unchecked = convert(frontend, "int8", audio[:32], check=False)
    assert _sandbox_run(unchecked, [[_zeros()]]).failed_sample == 0  # tfq alone ships the same crash

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        content = convert(frontend, "int8", audio[:32])
    messages = [str(w.message) for w in caught if "kept float" in str(w.message)]
    assert len(messages) == 1
    assert "op DIV fails" in messages[0] and "'normalise'" in messages[0] and "all-zeros input" in messages[0]
    assert "strict=True" in messages[0]
    info = inspect_tflite(content)
    assert [op.type for op in info.float_ops] == ["ADD", "DIV"]  # the eps ADD too: int8 rounds 1e-10 to 0
    assert sum(op.type == "FULLY_CONNECTED" and not op.is_float for op in info.ops) == 2  # the rest stays int8

    def dense_scales(c):
        i = inspect_tflite(c)
        return [i.tensors[op.outputs[0]].scales for op in i.ops if op.type == "FULLY_CONNECTED"]

    assert dense_scales(content) == dense_scales(unchecked)  # tfq's ranges survive the fix, not the converter's
    # Runs on silence (this process: the fixed model no longer fails), equal to the float model there.
    runner = TFLiteModel(content)
    for x in (_zeros(), audio[:8]):
        out = runner.predict(x)
        ref = frontend(x).numpy()
        assert np.all(np.isfinite(out))
        assert sqnr_db(ref, out) > 20 or np.max(np.abs(ref - out)) < 1e-3
    # Near silence (1e-6) is below the int8 input's step: it reads as silence, finite but not the float output.
    assert np.all(np.isfinite(runner.predict(audio[:4] * 1e-6)))


def test_int8_crash_refused_with_strict(frontend, audio):
    with pytest.raises(ConversionError, match=r"op DIV fails .*all-zeros input.*keeps that DIV op float"):
        convert(frontend, "int8", audio[:32], strict=True)


def test_fp16_nan_is_named(frontend):
    with pytest.warns(UserWarning, match=r"fp16 model is broken: op DIV outputs NaN/inf on the all-zeros input.*"
                                         r"'normalise'.*float16"):
        content = convert(frontend, "fp16")
    assert np.isnan(TFLiteModel(content).predict(_zeros())).all()  # named, not hidden: the NaN is real
    with pytest.raises(ConversionError, match="op DIV outputs NaN/inf"):
        convert(frontend, "fp16", strict=True)


def test_saved_model_int8_crash_is_fixed(frontend_saved_model, audio):
    with pytest.warns(UserWarning, match=r"op DIV fails in LiteRT's interpreter on the all-zeros input.*kept float"):
        content = convert(frontend_saved_model, "int8", audio[:32])
    assert {"DIV", "ADD"} <= {op.type for op in inspect_tflite(content).float_ops}
    outputs = _sandbox_run(content, [[_zeros()], [audio[:1]]])
    assert outputs.failed_sample is None and all(np.all(np.isfinite(o)) for s in outputs.outputs for o in s)


def test_io_dtype_is_honoured_or_refused(frontend_saved_model, frontend, audio):
    # A SavedModel is quantized below Keras (tfq.export.tflite_frontend): DIV is kept float inside the model
    # (QUANTIZE/DEQUANTIZE around it) and io_dtype='int8' holds on every input and output (three outputs).
    with pytest.warns(UserWarning, match=r"op DIV fails .*kept float"):
        content = convert(frontend_saved_model, "int8", audio[:32], io_dtype="int8")
    interpreter = tf.lite.Interpreter(model_content=content)
    io = interpreter.get_input_details() + interpreter.get_output_details()
    assert len(io) == 4 and all(d["dtype"] == np.int8 for d in io)
    assert "DIV" in {op.type for op in inspect_tflite(content).float_ops}
    # A model whose inputs/outputs stay float is refused for io_dtype='int8' on every output it misses.
    float_content = convert(frontend, "float", check=False)
    with pytest.raises(ConversionError, match=r"io_dtype='int8' is not honoured: input 0 .* stays float32 "
                                              r"\(2 input/output\(s\) in all\)"):
        checker.checked(float_content, frontend, None, mode="int8", io_dtype="int8")


def test_healthy_model_passes_silently():
    from tfq.models.examples import digits_cnn

    keras.utils.set_random_seed(0)
    model = digits_cnn()
    x = np.random.default_rng(0).uniform(0, 1, size=(64, 8, 8, 1)).astype("float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        content = convert(model, "int8", x)
    assert not [w for w in caught if "broken" in str(w.message) or "far from" in str(w.message)
                or "kept float" in str(w.message)]
    assert checker.check_conversion(content, model, x) == []
    assert not inspect_tflite(content).float_ops


def test_low_sqnr_output_is_named():
    rng = np.random.default_rng(0)
    good = [rng.normal(size=(1, 4)).astype("float32") for _ in range(8)]
    bad = [rng.normal(size=(1, 3)).astype("float32") for _ in range(8)]
    ref = [[g, b] for g, b in zip(good, bad)]
    # output 0: 1 % noise (40 dB); output 1: noise of 0.5 × the signal (6 dB), under the 10 dB floor.
    out = [[g * 1.01, b * 1.5] for g, b in zip(good, bad)]
    found = checker._sqnr_findings(ref, out, ["output_0", "output_1"])
    assert [f.where for f in found] == ["output 'output_1'"]
    assert found[0].detail.startswith(f"{10 * math.log10(1 / 0.25):.1f} dB SQNR, best output 40.0 dB")


def test_check_options_are_validated(frontend):
    with pytest.raises(TypeError, match=r"strict must be True or False. Received: strict='yes'"):
        convert(frontend, "float", strict="yes")
    with pytest.raises(ValueError, match=r"strict=True .* needs check=True"):
        convert(frontend, "float", check=False, strict=True)


# --------------------------------------------------------------------------------------------
# tfq.evaluate: SavedModels, float .tflite, error counts, output=, SQNR per output
# --------------------------------------------------------------------------------------------


def two_head_model():
    keras.utils.set_random_seed(1)
    inp = keras.Input((16,), name="x")
    h = keras.layers.Dense(12, activation="relu", name="h")(inp)
    boxes = keras.layers.Dense(4, name="boxes")(h)
    cls = keras.layers.Dense(3, activation="softmax", name="cls")(h)
    return keras.Model(inp, [boxes, cls], name="two_heads")


def test_evaluate_saved_model_float_tflite_output_and_per_output_sqnr(tmp_path):
    model = two_head_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 16)).astype("float32")
    labels = rng.integers(0, 3, 40)
    exported = str(tmp_path / "exported")
    model.export(exported, verbose=False)  # a SavedModel, as Keras writes it
    float_tflite = convert(model, "float")
    int8 = convert(model, "int8", x)
    # "cls" is the Keras model's name of output 1 (the TFLite models and the SavedModel call it output_1)
    report = evaluate({"keras": model, "sm": exported, "float": float_tflite, "int8": int8}, x, labels, output="cls",
                      reference="sm", latency=False)
    assert report.reference == "sm"
    assert report.row("keras")["sqnr_db"] == math.inf  # the SavedModel's outputs in the Keras order
    boxes_ref, cls_ref = model.predict(x, verbose=0)
    q_boxes, q_cls = TFLiteModel(int8).predict(x)
    row = report.row("int8")
    assert row["accuracy"] == pytest.approx(np.mean(q_cls.argmax(1) == labels))
    assert row["agreement"] == pytest.approx(np.mean(q_cls.argmax(1) == cls_ref.argmax(1)))
    assert row["sqnr_db_per_output"] == pytest.approx([sqnr_db(boxes_ref, q_boxes), sqnr_db(cls_ref, q_cls)],
                                                      abs=0.05)
    assert report.row("sm")["kind"] == "saved_model" and report.row("sm")["errors"] == 0
    assert report.row("float")["sqnr_db_per_output"][0] > 100
    # by index or signature key; by default the first output (boxes, argmax of its 4 columns)
    by_index = evaluate({"sm": exported, "int8": int8}, x, output=1, latency=False)
    assert evaluate({"sm": exported, "int8": int8}, x, output="output_1", latency=False).row("int8")["agreement"] \
        == row["agreement"]
    assert by_index.row("int8")["agreement"] == row["agreement"]
    default = evaluate({"sm": exported, "int8": int8}, x, latency=False)
    assert default.row("int8")["agreement"] == pytest.approx(np.mean(q_boxes.argmax(1) == boxes_ref.argmax(1)))
    assert "SQNR per output (dB): " in str(report)
    again = Report.from_dict(report.to_dict())
    assert again == report and again.row("sm")["sqnr_db_per_output"] == [math.inf, math.inf]
    with pytest.raises(ValueError, match=r"output='scores' is not an output name of these models"):
        evaluate({"sm": exported, "int8": int8}, x, output="scores", latency=False)


def test_evaluate_single_saved_model_form(frontend_saved_model, audio):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = evaluate(frontend_saved_model, audio[:6], variants=("float", "int8"), representative_data=audio[:32],
                          latency=False, output="scores")
    assert report.names == ["saved_model", "tflite_float", "tflite_int8"]
    assert set(report.converted) == {"tflite_float", "tflite_int8"}
    assert report.row("tflite_float")["sqnr_db"] > 60
    assert len(report.row("tflite_int8")["sqnr_db_per_output"]) == 3


def test_evaluate_counts_failing_samples(frontend, audio):
    crashing = convert(frontend, "int8", audio[:32], check=False)  # DIV fails on silence (an error, no abort)
    data = audio[:10].copy()
    data[[2, 7]] = 0.0
    report = evaluate({"keras": frontend, "int8": crashing}, data, latency=False)
    row = report.row("int8")
    assert row["errors"] == 2 and "data[i] != zero_point" in row["error"]
    assert report.row("keras")["errors"] == 0 and report.row("keras")["error"] is None
    ok = np.ones(10, bool)
    ok[[2, 7]] = False
    expected = sqnr_db(frontend(data[ok]).numpy(), TFLiteModel(crashing).predict(data[ok]))
    assert row["sqnr_db"] == pytest.approx(expected, abs=0.01)
    assert "int8 failed on 2 sample(s)" in str(report)


def test_evaluate_isolated_counts_failures_in_a_worker(frontend, audio):
    crashing = convert(frontend, "int8", audio[:32], check=False)
    data = audio[:6].copy()
    data[[0, 4]] = 0.0  # the first sample fails too: the worker goes on from the next one
    isolated = evaluate({"keras": frontend, "int8": crashing}, data, latency=True, latency_runs=3, isolate=True)
    in_process = evaluate({"keras": frontend, "int8": crashing}, data, latency=False)
    row = isolated.row("int8")
    assert row["errors"] == 2 and "data[i] != zero_point" in row["error"]
    assert row["sqnr_db"] == pytest.approx(in_process.row("int8")["sqnr_db"], abs=0.01)
    assert row["latency_p50_ms"] is not None  # timed on a sample that ran


# --------------------------------------------------------------------------------------------
# A real kernel abort: LiteRT's int8 ADD CHECKs its requantization multiplier when it is prepared
# --------------------------------------------------------------------------------------------


def _cancelling_model():
    """Two branches that cancel (x·I + x·(−I·(1+1e-6))): their ADD's output range is ~1e-6 of its inputs',
    so its int8 output scale is below 2·max(input scales)/2^20 and LiteRT's ADD aborts when prepared."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,), name="x")
    eye = np.eye(4, dtype="float32")
    a = keras.layers.Dense(4, use_bias=False, name="a", kernel_initializer=keras.initializers.Constant(eye))(inp)
    b = keras.layers.Dense(4, use_bias=False, name="b",
                           kernel_initializer=keras.initializers.Constant(-eye * (1 + 1e-6)))(inp)
    small = keras.layers.Dense(2, name="small")(keras.layers.Add(name="cancel")([a, b]))
    return keras.Model(inp, keras.layers.Add(name="out")([keras.layers.Dense(2, name="main")(inp), small]))


_PREPARE = ("import sys\nfrom ai_edge_litert.interpreter import Interpreter\n"
            "Interpreter(model_path=sys.argv[1]).allocate_tensors()\nprint('prepared')\n")


def test_real_kernel_abort_is_survived_and_named(tmp_path):
    import signal
    import subprocess

    model = _cancelling_model()
    x = np.random.default_rng(0).standard_normal((64, 4)).astype("float32")
    content = convert(model, "int8", x, check=False)
    # Independent path: LiteRT itself, in a child process, dies preparing the model (SIGABRT, no message).
    (tmp_path / "m.tflite").write_bytes(content)
    proc = subprocess.run([sys.executable, "-c", _PREPARE, str(tmp_path / "m.tflite")], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == -signal.SIGABRT and "prepared" not in proc.stdout
    # tfq names the op from the file: the ADD whose output scale is below 2·max(input scales)/2^20.
    add = next(op for op in inspect_tflite(content).ops if op.type == "ADD" and "cancel" in
               inspect_tflite(content).tensors[op.outputs[0]].name)
    scales = [inspect_tflite(content).tensors[i].scales[0] for i in (*add.inputs[:2], add.outputs[0])]
    assert scales[2] < 2 * max(scales[:2]) / 2 ** 20

    # The check runs it in its worker: this process survives, and the warning names the op and the layer.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert(model, "int8", x)
    message = next(str(w.message) for w in caught if "broken" in str(w.message))
    assert f"Node number {add.index} (ADD)" in message and "loading (allocate_tensors)" in message
    assert "'cancel'" in message and "float_layers" in message
    with pytest.raises(ConversionError, match=r"op ADD fails in LiteRT's interpreter on loading"):
        convert(model, "int8", x, strict=True)

    # evaluate(isolate=True) survives too: every sample failed, the op named; the float model is unharmed.
    report = evaluate({"keras": model, "int8": content}, x[:6], latency=True, latency_runs=3, isolate=True)
    row = report.row("int8")
    assert row["errors"] == 6 and f"Node number {add.index} (ADD)" in row["error"]
    assert row["latency_p50_ms"] is None and report.row("keras")["errors"] == 0

    # The fix the message gives works: that layer float, the model runs (its output is the main branch's).
    fixed = convert(model, "int8", x, float_layers=["cancel"])
    assert sqnr_db(model.predict(x, verbose=0), TFLiteModel(fixed).predict(x)) > 30.0  # measured 39.5 dB
