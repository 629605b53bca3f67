"""Which engine quantizes a float .tflite / SavedModel best: the figures behind tfq.export.tflite_frontend.

Two SavedModels built here (no downloads): (a) the digits CNN (trained 8 epochs on tfq's digits,
``model.export``), (b) an audio-like front-end (tf.Module: frames → STFT → magnitude → divided by its max
(+1e-6, the normalising DIV) → log(x + 1e-6) → Dense). Each is quantized to INT8 by

- ``converter``: the plain TFLite converter (its MinMax calibration, TFLITE_BUILTINS_INT8);
- ``converter_fallback``: the same, float kernels allowed (TFLITE_BUILTINS too);
- ``aeq_default``: LiteRT's quantizer (ai-edge-quantizer) with its own calibration, static a8w8 for all ops;
- ``aeq_float_io``: the same with float model inputs/outputs (the recipe tfq uses);
- ``aeq_tfq_<method>``: the same recipe fed tfq's ranges (tfq.export.tflite_frontend.calibrate_tflite);
- ``tfq``: tfq.convert(saved_model, "int8", data) (default options); ``tfq_<method>``: with calibration=<method>.

SQNR (dB) of the outputs against the float .tflite, both run in LiteRT's interpreter (a separate
process: an aborting kernel is recorded, not fatal) on held-out samples, and whether silence
(all-zeros input) runs.

Usage: PYTHONPATH=$PWD python scripts/frontend_engines.py [--json out.json]
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
import warnings

import numpy as np


def cnn_saved_model(path):
    from tfq.models.examples import train_digits_cnn

    model, (x_train, _), (x_test, _) = train_digits_cnn(epochs=8)
    model.export(path, verbose=False)
    return x_train[:300].astype("float32"), x_test[:100].astype("float32")


def audio_module(frame=256, frames=8, units=8):
    """The audio-like SavedModel's module: audio [1, frames·frame] → STFT magnitude → / (max + 1e-6) → log → Dense."""
    import tensorflow as tf

    class Audio(tf.Module):
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(3)
            bins = frame // 2 + 1
            self.w = tf.Variable((rng.normal(size=(bins, units)) / np.sqrt(bins)).astype("float32"))
            self.b = tf.Variable(rng.normal(size=(units,)).astype("float32") * 0.1)

        @tf.function(input_signature=[tf.TensorSpec([1, frames * frame], tf.float32, name="audio")])
        def __call__(self, audio):
            spec = tf.signal.stft(audio, frame_length=frame, frame_step=frame, fft_length=frame)
            mag = tf.abs(spec)
            norm = mag / (tf.reduce_max(mag, axis=[-2, -1], keepdims=True) + 1e-6)  # the normalising DIV
            return tf.matmul(tf.math.log(norm + 1e-6), self.w) + self.b

    return Audio(), frames * frame


def audio_saved_model(path):
    import tensorflow as tf

    module, n = audio_module()
    tf.saved_model.save(module, str(path), signatures=module.__call__)
    rng = np.random.default_rng(0)

    def noise(k):
        return (rng.normal(size=(k, n)) * rng.uniform(0.2, 1.0, size=(k, 1))).astype("float32")

    return noise(200), noise(50)


def plain_converter(path, data, fallback=False):
    import tensorflow as tf

    c = tf.lite.TFLiteConverter.from_saved_model(str(path))
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.representative_dataset = lambda: ([s[None]] for s in data)
    c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8] + (
        [tf.lite.OpsSet.TFLITE_BUILTINS] if fallback else [])
    return c.convert()


def aeq_own(flt, data, float_io):
    from ai_edge_quantizer import qtyping, quantizer, recipe_manager

    from tfq.tflite.interpreter import interpreter_class

    rm = recipe_manager.RecipeManager()
    ops = qtyping.TFLOperationName
    rm.add_static_config(".*", ops.ALL_SUPPORTED, activation_num_bits=8, weight_num_bits=8)
    if float_io:
        for io in (ops.INPUT, ops.OUTPUT):
            rm.add_quantization_config(".*", io, algorithm_key="no_quantize")
    qt = quantizer.Quantizer(bytearray(flt))
    qt.load_quantization_recipe(rm.get_quantization_recipe())
    it = interpreter_class()(model_content=flt)
    sig = it.get_signature_list()
    key = next(iter(sig))
    name = sig[key]["inputs"][0]
    cal = qt.calibrate({key: [{name: s[None]} for s in data]})
    return bytes(qt.quantize(cal, enable_progress_report=False).quantized_model)


def sqnr_and_silence(content, flt_outputs, test, sandbox):
    res = sandbox.run(content, [[s[None]] for s in test] + [[np.zeros_like(test[0][None])]])
    if res.failed_sample is not None and res.failed_sample < len(test):
        return {"sqnr_db": None, "error": res.message[:160]}
    ref = np.concatenate([np.ravel(o[0]) for o in flt_outputs]).astype(np.float64)
    got = np.concatenate([np.ravel(o[0]) for o in res.outputs[:len(test)]]).astype(np.float64)
    noise = float(np.sum((ref - got) ** 2))
    sq = math.inf if noise == 0 else 10 * math.log10(float(np.sum(ref ** 2)) / noise)
    silence = "ok"
    if res.failed_sample is not None:
        silence = "crash: " + res.message[:120]
    elif not np.all(np.isfinite(res.outputs[-1][0])):
        silence = "NaN"
    return {"sqnr_db": round(sq, 2), "silence": silence}


def main():
    import tensorflow as tf

    from tfq.export.convert import convert
    from tfq.export.tflite_frontend import (
        calibrate_tflite,
        float_tflite,
        quantize_tflite,
    )
    from tfq.tflite.info import inspect_tflite
    from tfq.tflite.sandbox import Sandbox

    rows = []
    with tempfile.TemporaryDirectory() as tmp, Sandbox() as sandbox:
        for kind, build in (("cnn", cnn_saved_model), ("audio", audio_saved_model)):
            path = f"{tmp}/{kind}"
            data, test = build(path)
            flt = float_tflite(path)
            ref = sandbox.run(flt, [[s[None]] for s in test]).outputs
            files = {}
            for name, fn in (
                ("converter", lambda path=path, data=data: plain_converter(path, data)),
                ("converter_fallback", lambda path=path, data=data: plain_converter(path, data, fallback=True)),
                ("aeq_default", lambda flt=flt, data=data: aeq_own(flt, data, float_io=False)),
                ("aeq_float_io", lambda flt=flt, data=data: aeq_own(flt, data, float_io=True)),
            ):
                start = time.perf_counter()
                try:
                    files[name] = (fn(), time.perf_counter() - start)
                except Exception as err:  # noqa: BLE001 - recorded in the table
                    rows.append({"model": kind, "engine": name, "error": str(err).splitlines()[0][:160]})
            for method in ("robust_minmax", "minmax", "kl", "percentile", "mse"):
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cal = calibrate_tflite(flt, data, method)
                files[f"aeq_tfq_{method}"] = (quantize_tflite(flt, cal.ranges), time.perf_counter() - start)
            caught = {}
            for method in ("robust_minmax", "percentile", "mse", "kl"):
                start = time.perf_counter()
                with warnings.catch_warnings(record=True) as caught[method]:
                    warnings.simplefilter("always")
                    content = convert(path, "int8", data, calibration=method)
                files["tfq" if method == "robust_minmax" else f"tfq_{method}"] = (content, time.perf_counter() - start)
            for name, (content, seconds) in files.items():
                info = inspect_tflite(content)
                row = {"model": kind, "engine": name, "seconds": round(seconds, 2), "bytes": len(content),
                       "float_ops": sorted({op.type for op in info.float_ops}),
                       **sqnr_and_silence(content, ref, test, sandbox)}
                if name.startswith("tfq"):
                    method = name[4:] or "robust_minmax"
                    row["warnings"] = [str(w.message)[:200] for w in caught[method] if "tfq" in str(w.message)]
                rows.append(row)
                print(json.dumps(row), flush=True)
    if "--json" in sys.argv:
        with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
            json.dump(rows, f, indent=1)
    del tf


if __name__ == "__main__":
    main()
