"""Benchmark: tfq against the plain TFLite converter and tfmot, on the same models and data, in one run.

For each model (a digits CNN on 8×8 digits, a MobileNet-style net on digits resized to 32×32):

* float Keras model and float TFLite: accuracy, size, latency;
* plain TFLite converter PTQ (representative dataset, MinMax — the converter's only calibration);
* tfq PTQ with its default calibration (robust_minmax) and each other method (minmax,
  moving_average, kl, percentile, mse, mse with the batch median), on clean calibration data and
  on data with 3 of 300 samples scaled ×100, for both tools: accuracy, whether tfq warned about
  those samples (the indices it named), and the time of calibrate+convert
  (``tfq.convert(model, "int8", x, calibration=...)``) as a ratio to the plain converter's time on
  the same model and data, measured in pairs (converter, then tfq) repeated ``timing_repeats``
  times in this one process: the median ratio and its spread (min, max) — other processes on the
  machine slow both alike within a pair;
* tfq QAT (fine-tune from the float model) and tfmot QAT (tf_keras, in a subprocess with
  ``TF_USE_LEGACY_KERAS=1``, the only way tfmot runs next to Keras 3; from the same float weights,
  carried over by layer name): accuracy and the ratio of a QAT training step's time to a float step's;
* evaluator throughput: :func:`tfq.evaluate` on the INT8 model against a per-sample interpreter loop,
  and the ceiling the kernels' own time sets on this machine;
* optionally (``compression=True``), compression on the digits CNN: dense INT8, 50/75/90 % pruned
  INT8 (sparsity-preserving QAT), 16-cluster INT8 (cluster-preserving QAT), a distilled small
  student INT8 next to the same student trained from labels alone, and tfmot's pruning of the same
  float model (tf_keras, subprocess) — accuracy, raw and gzip size, latency;
* methods beyond calibration (:func:`bench_methods`): the MobileNet-style model as trained (ReLU6)
  and a ReLU one whose channels were rescaled 300× apart (same function, see
  :func:`tfq.models.examples.unbalance_channels`), per tensor and per channel, INT8 through LiteRT with
  and without cross-layer equalization, bias correction, AdaRound, GPTQ and data-free ranges,
  against the plain converter, with each method's seconds; and W4A8 (4-bit weights, simulated in
  Keras) with nearest, AdaRound and GPTQ rounding;
* QAT cost (:func:`bench_qat_cost`): tfq's and tfmot's QAT epoch time over float epoch time (float
  and QAT epochs alternated in one process) and INT8 accuracy, from the same float weights, on the
  digits CNN and ``keras.applications.MobileNetV2`` (α 0.35 and 1.0, 32 and 96 px);
* calibration cost (:func:`bench_calibration`): samples/s of each calibration method, and the
  memory calibration adds for 5,000 and 50,000 streamed samples.

Every figure goes into one JSON document (:func:`run_benchmark`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

from tfq.core.calibration_methods import DEFAULT_CALIBRATION, calibration_method_names

__all__ = ["run_benchmark", "run_sections", "bench_calibration", "bench_int4", "bench_kinds", "bench_methods",
           "bench_qat_cost", "calibration_markdown", "int4_markdown", "kinds_markdown", "SECTIONS",
           "calibration_throughput_markdown", "qat_cost_markdown", "MODELS", "METHOD_ROWS", "PTQ_VARIANTS",
           "QAT_COST_MODELS", "SEQUENCE_MODELS"]

MODELS = {
    "digits_cnn": dict(builder="digits_cnn", image_size=8, epochs=10),
    "mobilenet_style": dict(builder="mobilenet_style", image_size=32, epochs=15),
}
# (row name, calibration, calibration_params): tfq's default first, then every other registered method.
PTQ_VARIANTS = tuple((f"tfq_{m}", m, None) for m in (DEFAULT_CALIBRATION, *(
    m for m in calibration_method_names() if m != DEFAULT_CALIBRATION))) + (
    ("tfq_mse_batch_median", "mse", {"batch_aggregate": "median"}),)
PTQ_METHODS = tuple(dict.fromkeys(method for _, method, _ in PTQ_VARIANTS))
OUTLIER_SAMPLES = (10, 150, 290)  # of the 300 calibration samples, scaled ×100
# Models on the digits read as 8 rows of 8 pixels: tokens for a transformer, time steps for an LSTM.
SEQUENCE_MODELS = {
    "digits_transformer": dict(builder="digits_transformer", epochs=20),
    "digits_lstm": dict(builder="digits_lstm", epochs=20),
}
SEQUENCE_PTQ_VARIANTS = ((f"tfq_{DEFAULT_CALIBRATION}", DEFAULT_CALIBRATION, None), ("tfq_minmax", "minmax", None),
                         ("tfq_kl", "kl", None), ("tfq_mse", "mse", None))
# Rows of the methods section: (name, tfq.convert keywords); data_free rows get no data.
METHOD_ROWS = (
    ("tfq_minmax", {}),
    ("equalize", {"equalize": True}),
    ("bias_correction", {"bias_correction": "empirical"}),
    ("equalize+bias_correction", {"equalize": True, "bias_correction": "empirical"}),
    ("adaround", {"weight_rounding": "adaround"}),
    ("gptq", {"weight_rounding": "gptq"}),
    ("equalize+gptq+bias_correction", {"equalize": True, "weight_rounding": "gptq", "bias_correction": "empirical"}),
    ("data_free", {"data_free": True}),
    ("dfq (data_free+equalize+analytical bias_correction)",
     {"data_free": True, "equalize": True, "bias_correction": "analytical"}),
)
UNBALANCED_SPREAD = 300.0


def _accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(predictions).argmax(-1) == labels).mean())


def _latency_ms(content: bytes, sample: np.ndarray, num_threads: int, runs: int = 100) -> float:
    from tfq.tflite.interpreter import TFLiteModel

    return float(np.median(TFLiteModel(content, num_threads=num_threads).latency_ms(sample, warmup=10, runs=runs)))


def _tflite_accuracy(content: bytes, x: np.ndarray, y: np.ndarray) -> float:
    from tfq.tflite.interpreter import TFLiteModel

    return _accuracy(TFLiteModel(content).predict(x, batch_size=256), y)


def _plain_converter_int8(model, calib: np.ndarray, allow_float: bool = False) -> bytes:
    """The baseline a user gets without tfq: TFLiteConverter PTQ with a representative dataset
    (``allow_float``: ops without an int8 kernel stay float, as the converter's docs suggest)."""
    import tensorflow as tf

    def representative():
        for i in range(len(calib)):
            yield [calib[i:i + 1]]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if allow_float:
        converter.target_spec.supported_ops.append(tf.lite.OpsSet.TFLITE_BUILTINS)
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return converter.convert()


def _outlier_calibration(x: np.ndarray) -> np.ndarray:
    """The first 300 samples of ``x`` with :data:`OUTLIER_SAMPLES` scaled ×100 (a bad crop, a mis-scaled image)."""
    calib = x[:300].copy()
    calib[list(OUTLIER_SAMPLES)] *= 100.0
    return calib


def _timed_ptq_rows(model, data, variants, repeats: int, log, label: str, converter_kwargs=None,
                    converter_model=None) -> list[dict]:
    """The plain converter and tfq with each calibration variant on ``data``, timed in interleaved pairs.

    For each variant, ``repeats`` times: the plain converter, then ``tfq.convert`` (calibrate and
    convert); the ratio of the two is taken per pair. Rows: ``{"name", "content", "seconds",
    "converter_seconds", "time_ratio", "time_ratio_min", "time_ratio_max", "warned_samples"}``
    (``content`` is popped by the caller; ``warned_samples`` are the indices tfq's warning named).
    """
    import warnings

    import tfq

    converter_model = converter_model if converter_model is not None else model
    converter_kwargs = converter_kwargs or {}

    def plain():
        start = time.perf_counter()
        content = _plain_converter_int8(converter_model, data, **converter_kwargs)
        return content, time.perf_counter() - start

    def run_tfq(method, params):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            content = tfq.convert(model, "int8", data, calibration=method, calibration_params=params)
            seconds = time.perf_counter() - start
        named = [str(w.message) for w in caught if "calibration samples lie far outside" in str(w.message)]
        return content, seconds, _named_indices(named[0]) if named else []

    # Warm-up: the first conversion of a process pays for imports and initialization.
    plain()
    run_tfq("minmax", None)
    rows = []
    converter_content, converter_times = None, []
    for name, method, params in variants:
        log(f"{label}: {name} ({repeats} timed pairs with the plain converter)")
        ratios, tfq_times, pair_converter_times = [], [], []
        for _ in range(repeats):
            converter_content, t_conv = plain()
            content, t_tfq, warned = run_tfq(method, params)
            ratios.append(t_tfq / t_conv)
            tfq_times.append(t_tfq)
            pair_converter_times.append(t_conv)
        converter_times += pair_converter_times
        rows.append({"name": name, "calibration": method, "calibration_params": params or {}, "content": content,
                     "seconds": float(np.median(tfq_times)), "converter_seconds": float(np.median(pair_converter_times)),
                     "time_ratio": float(np.median(ratios)), "time_ratio_min": float(np.min(ratios)),
                     "time_ratio_max": float(np.max(ratios)), "warned_samples": warned, "timing_repeats": repeats})
    rows.insert(0, {"name": "tflite_converter_minmax", "content": converter_content,
                    "seconds": float(np.median(converter_times)), "converter_seconds": float(np.median(converter_times)),
                    "time_ratio": 1.0, "warned_samples": []})
    return rows


def _named_indices(message: str) -> list[int]:
    """The sample indices a tfq outlier warning lists (``indices 10, 150, 290``)."""
    import re

    found = re.search(r"indices ([0-9, ]+)", message)
    return [int(v) for v in found.group(1).split(",") if v.strip()] if found else []


def _ptq_row(name, content, float_acc, float_size, float_latency, x_test, y_test, sample, threads, seconds):
    acc = _tflite_accuracy(content, x_test, y_test)
    latency = _latency_ms(content, sample, threads)
    return {
        "name": name, "accuracy": acc, "drop_vs_float": float_acc - acc, "size_bytes": len(content),
        "size_ratio": len(content) / float_size, "latency_ms": latency, "latency_ratio": latency / float_latency,
        "calibration_seconds": seconds,
    }


def _sample_loop_seconds(content: bytes, x: np.ndarray, num_threads) -> float:
    """The loop users write: one interpreter, then set_tensor / invoke / get_tensor per sample."""
    from tfq.tflite.interpreter import interpreter_class

    start = time.perf_counter()
    interpreter = interpreter_class()(model_content=content, num_threads=num_threads)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    for i in range(len(x)):
        interpreter.set_tensor(inp["index"], x[i:i + 1])
        interpreter.invoke()
        interpreter.get_tensor(out["index"])
    return time.perf_counter() - start


def _compute_floor_seconds(content: bytes, x: np.ndarray, num_threads: int, batch: int = 256) -> float:
    """``invoke()`` alone on full batches with every thread, after warm-up: the kernels' own time."""
    from tfq.tflite.interpreter import interpreter_class

    batch = min(batch, len(x))
    interpreter = interpreter_class()(model_content=content, num_threads=num_threads)
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], [batch, *x.shape[1:]], strict=False)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x[:batch])
    interpreter.invoke()
    batches = max(len(x) // batch, 1)
    start = time.perf_counter()
    for _ in range(batches):
        interpreter.invoke()
    return (time.perf_counter() - start) * len(x) / (batches * batch)


def _evaluator_throughput(content: bytes, x_test, y_test, threads: int, repeats: int) -> dict:
    """tfq.evaluate against per-sample loops on the test set repeated ``repeats`` times.

    Everything is timed from the interpreter's creation. ``loop_default_threads`` is the loop as
    usually written (no ``num_threads``); ``loop_same_threads`` gives the loop as many threads as
    the evaluator. ``compute_floor_seconds`` is what the kernels alone need for the same samples,
    so ``ceiling_ratio = loop_default_threads / compute_floor`` bounds any evaluator on this machine.
    """
    x = np.concatenate([x_test] * repeats)
    y = np.concatenate([y_test] * repeats)
    loop_default = _sample_loop_seconds(content, x, None)
    loop_threads = _sample_loop_seconds(content, x, threads)
    import tfq

    start = time.perf_counter()
    tfq.evaluate({"int8": content}, x, y, latency=False, num_threads=threads, batch_size=256)
    evaluate_seconds = time.perf_counter() - start
    floor = _compute_floor_seconds(content, x, threads)
    return {
        "samples": int(len(x)), "num_threads": threads,
        "per_sample_loop_seconds": loop_default, "per_sample_loop_same_threads_seconds": loop_threads,
        "evaluate_seconds": evaluate_seconds, "compute_floor_seconds": floor,
        "throughput_ratio": loop_default / evaluate_seconds,
        "throughput_ratio_same_threads": loop_threads / evaluate_seconds,
        "ceiling_ratio": loop_default / floor,
    }


def _bench_model(key: str, spec: dict, threads: int, quick: bool, log, timing_repeats: int = 3) -> dict:
    import keras

    import tfq
    from tfq.models import examples

    epochs = 2 if quick else spec["epochs"]
    (x_train, y_train), (x_test, y_test) = tfq.datasets.load_digits(image_size=spec["image_size"], seed=0)
    keras.utils.set_random_seed(0)
    builder = getattr(examples, spec["builder"])
    model = builder(input_shape=x_train.shape[1:])
    log(f"{key}: training float model ({epochs} epochs)")
    examples.train_model(model, x_train, y_train, epochs=epochs, seed=0)
    float_acc = _accuracy(model.predict(x_test, verbose=0), y_test)
    float_tflite = tfq.convert(model, "float")
    sample = x_test[:1]
    float_latency = _latency_ms(float_tflite, sample, threads)
    result = {
        "model": key, "params": int(model.count_params()), "input_shape": list(x_train.shape[1:]),
        "float": {"keras_accuracy": float_acc, "tflite_accuracy": _tflite_accuracy(float_tflite, x_test, y_test),
                  "size_bytes": len(float_tflite), "latency_ms": float_latency},
        "ptq": [], "ptq_outliers": [],
    }
    calib = x_train[:500]  # evaluator and QAT
    for label, data, rows in (("clean", x_train[:300], result["ptq"]), ("outliers", _outlier_calibration(x_train),
                                                                         result["ptq_outliers"])):
        # 3 of 300 samples ×100 are 1 % of the values: the percentile must sit below 99.
        variants = [(n, m, {"percentile": 99.0} if m == "percentile" and label == "outliers" else p)
                    for n, m, p in PTQ_VARIANTS]
        for row in _timed_ptq_rows(model, data, variants, timing_repeats, log, f"{key} {label}"):
            content = row.pop("content")
            row.update(_ptq_row(row["name"], content, float_acc, len(float_tflite), float_latency, x_test, y_test,
                                sample, threads, row["seconds"]))
            rows.append(row)

    # Evaluator throughput vs a per-sample interpreter loop, same INT8 model and data.
    int8 = tfq.convert(model, "int8", calib)
    result["evaluator"] = _evaluator_throughput(int8, x_test, y_test, threads, repeats=2 if quick else 10)

    # QAT: fine-tune from the float model; step time vs a float step of the same model.
    log(f"{key}: tfq QAT")
    qat_epochs = 1 if quick else 3
    float_copy = _float_twin(model, keras, 2e-4, metrics=["accuracy"])
    qat = tfq.qat.quantize_model(model, calibration_data=calib)
    examples.train_model(qat, x_train, y_train, epochs=qat_epochs, seed=0, learning_rate=2e-4)
    qat_tflite = tfq.convert(qat, "int8")
    qat_acc = _tflite_accuracy(qat_tflite, x_test, y_test)
    # Epoch times, float and QAT alternated (after the accuracy: these epochs train both further).
    timing_rounds = 1 if quick else 3
    timing = _interleaved_epochs(float_copy, qat, x_train, y_train, rounds=timing_rounds)
    result["qat"] = [{"name": "tfq_qat", "accuracy": qat_acc, "drop_vs_float": float_acc - qat_acc,
                      "size_bytes": len(qat_tflite), **_timing_fields(timing), "epochs": qat_epochs}]
    log(f"{key}: tfmot QAT (tf_keras, subprocess, from the same float weights)")
    with _weights_file(model) as weights:
        worker_spec = dict(spec, weights_path=str(weights), qat_epochs=qat_epochs, timing_rounds=timing_rounds)
        result["qat"].append(_in_subprocess("_tfmot_worker", worker_spec, legacy_keras=True, error_name="tfmot_qat",
                                            timeout=3600))
    return result


def _unrolled(model):
    """The same model with ``unroll=True`` on its recurrent layers: the only form the plain
    converter can make int8."""
    import keras

    config = model.get_config()
    for layer in config["layers"]:
        if layer["class_name"] in ("LSTM", "GRU", "SimpleRNN"):
            layer["config"]["unroll"] = True
    copy = keras.Model.from_config(config)
    copy.set_weights(model.get_weights())
    return copy


def _bench_sequence_model(key: str, spec: dict, threads: int, quick: bool, log, timing_repeats: int = 3) -> dict:
    """A transformer or LSTM on the digits' rows: the plain converter against tfq PTQ and QAT.

    tfmot has no rule for MultiHeadAttention, LayerNormalization or recurrent layers (tfmot #718,
    #942, #1114), so it has no row here.
    """
    import keras

    import tfq
    from tfq.models import examples

    epochs = 2 if quick else spec["epochs"]
    (x_train, y_train), (x_test, y_test) = tfq.datasets.load_digits(seed=0)
    x_train, x_test = x_train[..., 0], x_test[..., 0]
    keras.utils.set_random_seed(0)
    model = getattr(examples, spec["builder"])(input_shape=x_train.shape[1:])
    log(f"{key}: training float model ({epochs} epochs)")
    examples.train_model(model, x_train, y_train, epochs=epochs, seed=0)
    float_acc = _accuracy(model.predict(x_test, verbose=0), y_test)
    float_tflite = tfq.convert(model, "float")
    sample = x_test[:1]
    float_latency = _latency_ms(float_tflite, sample, threads)
    result = {"model": key, "params": int(model.count_params()), "input_shape": list(x_train.shape[1:]),
              "float": {"keras_accuracy": float_acc, "size_bytes": len(float_tflite), "latency_ms": float_latency},
              "ptq": []}
    calib = x_train[:300]
    log(f"{key}: plain converter")
    converter_model = model
    try:
        _plain_converter_int8(model, calib[:10], allow_float=True)
    except Exception as err:  # noqa: BLE001 - recorded: the converter cannot convert Keras's default LSTM
        result["ptq"].append({"name": "tflite_converter_minmax", "error": str(err).strip().splitlines()[0][:200]})
        converter_model = _unrolled(model)
    result["ptq_outliers"] = []
    for label, data, rows in (("clean", calib, result["ptq"]), ("outliers", _outlier_calibration(x_train),
                                                                 result["ptq_outliers"])):
        for row in _timed_ptq_rows(model, data, SEQUENCE_PTQ_VARIANTS, timing_repeats, log,
                                   f"{key} {label}", {"allow_float": True}, converter_model):
            content = row.pop("content")
            if row["name"] == "tflite_converter_minmax" and converter_model is not model:
                row["name"] = "tflite_converter_minmax_unroll_true"
            row.update(_ptq_row(row["name"], content, float_acc, len(float_tflite), float_latency, x_test, y_test,
                                sample, threads, row["seconds"]))
            row["num_float_ops"] = tfq.inspect_tflite(content).num_float_ops
            rows.append(row)
    log(f"{key}: tfq QAT")
    qat_epochs = 1 if quick else 2
    qat = tfq.qat.quantize_model(model, calibration_data=calib)
    examples.train_model(qat, x_train, y_train, epochs=qat_epochs, seed=0, learning_rate=2e-4)
    qat_tflite = tfq.convert(qat, "int8")
    qat_acc = _tflite_accuracy(qat_tflite, x_test, y_test)
    result["qat"] = [{"name": "tfq_qat", "accuracy": qat_acc, "drop_vs_float": float_acc - qat_acc,
                      "size_bytes": len(qat_tflite), "epochs": qat_epochs,
                      "num_float_ops": tfq.inspect_tflite(qat_tflite).num_float_ops},
                     {"name": "tfmot_qat", "error": "tfmot has no MultiHeadAttention/LayerNormalization/RNN rule"}]
    return result


def _tfmot_worker(spec: dict) -> dict:
    """Runs in a subprocess with TF_USE_LEGACY_KERAS=1: the same architecture in tf_keras + tfmot,
    from tfq's float weights (``spec["weights_path"]``, by layer name), so both QAT rows start alike.
    ``float_accuracy_tf_keras`` is those weights' accuracy in tf_keras: it matches tfq's float row
    unless the weights failed to carry over."""
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras

    import tfq
    from tfq.models import examples

    (x_train, y_train), (x_test, y_test) = tfq.datasets.load_digits(image_size=spec["image_size"], seed=0)
    tf_keras.utils.set_random_seed(0)
    model = getattr(examples, spec["builder"])(input_shape=x_train.shape[1:], keras_module=tf_keras)
    load_weights_by_layer(model, spec["weights_path"])
    float_acc = _accuracy(model.predict(x_test, verbose=0), y_test)
    float_copy = _float_twin(model, tf_keras, 2e-4, metrics=["accuracy"])
    qat = tfmot.quantization.keras.quantize_model(model)
    qat.compile(tf_keras.optimizers.Adam(2e-4), "sparse_categorical_crossentropy", metrics=["accuracy"])
    tf_keras.utils.set_random_seed(0)
    qat.fit(x_train, y_train, epochs=spec["qat_epochs"], batch_size=32, verbose=0, shuffle=True)
    converter = tf.lite.TFLiteConverter.from_keras_model(qat)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    content = converter.convert()
    acc = _tflite_accuracy(content, x_test, y_test)
    timing = _interleaved_epochs(float_copy, qat, x_train, y_train, rounds=spec["timing_rounds"])  # as for tfq
    return {"name": "tfmot_qat", "accuracy": acc, "float_accuracy_tf_keras": float_acc,
            "drop_vs_float": float_acc - acc, "size_bytes": len(content), **_timing_fields(timing),
            "epochs": spec["qat_epochs"],
            "num_float_ops": tfq.inspect_tflite(content).num_float_ops}


# --------------------------------------------------------------------------- QAT cost (issue 16)
# MobileNetV2 (keras.applications, weights=None) on the digits, grayscale, resized: the
# architecture tfmot's published QAT numbers use, at sizes a 2-core machine trains in minutes.
# ``rounds``: timed float/QAT epoch pairs (more for short epochs, whose times are noisier).
QAT_COST_MODELS = {
    "digits_cnn": dict(builder="digits_cnn", image_size=8, epochs=10, rounds=16),
    "mobilenet_v2_a0.35_32px": dict(builder="mobilenet_v2", alpha=0.35, image_size=32, epochs=15, rounds=6),
    "mobilenet_v2_a1.0_32px": dict(builder="mobilenet_v2", alpha=1.0, image_size=32, epochs=15, rounds=4),
    "mobilenet_v2_a0.35_96px": dict(builder="mobilenet_v2", alpha=0.35, image_size=96, epochs=8, rounds=4),
    "mobilenet_v2_a1.0_96px": dict(builder="mobilenet_v2", alpha=1.0, image_size=96, epochs=8, rounds=3),
}
DEFAULT_QAT_COST_MODELS = ("mobilenet_v2_a0.35_96px",)


def _qat_cost_model(spec: dict, input_shape, keras_module):
    from tfq.models import examples

    if spec["builder"] == "mobilenet_v2":
        model = keras_module.applications.MobileNetV2(input_shape=tuple(input_shape), alpha=spec["alpha"],
                                                      weights=None, classes=10)
        for layer in model.layers:  # momentum 0.999 needs thousands of steps; an epoch here has 45
            if isinstance(layer, keras_module.layers.BatchNormalization):
                layer.momentum = 0.9
        return model
    return getattr(examples, spec["builder"])(input_shape=tuple(input_shape), keras_module=keras_module)


def save_weights_by_layer(model, path) -> None:
    arrays = {f"{layer.name}/{i}": w for layer in model.layers for i, w in enumerate(layer.get_weights())}
    np.savez(path, **arrays)


@contextlib.contextmanager
def _weights_file(model):
    """A temporary file of ``model``'s weights by layer name (:func:`save_weights_by_layer`), for a
    worker process that starts from them; removed on exit."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "float_weights.npz")
        save_weights_by_layer(model, path)
        yield path


def load_weights_by_layer(model, path) -> None:
    """Sets every layer's weights from :func:`save_weights_by_layer` (Keras 3 ↔ tf_keras, same names)."""
    saved = np.load(path)
    for layer in model.layers:
        weights = [saved[f"{layer.name}/{i}"] for i in range(len(layer.get_weights()))]
        if weights:
            layer.set_weights(weights)


def _float_twin(model, keras_module, learning_rate: float, **compile_kwargs):
    """A compiled copy of ``model`` (same weights) to time float epochs against its QAT version."""
    twin = keras_module.models.clone_model(model)
    twin.set_weights(model.get_weights())
    twin.compile(keras_module.optimizers.Adam(learning_rate), "sparse_categorical_crossentropy", **compile_kwargs)
    return twin


TIMING_TOLERANCE = 1.15  # wall and CPU-time step ratios further apart than this: the timing was disturbed


def timing_consistent(wall_ratio: float, cpu_ratio: float) -> bool:
    """Whether a best-of wall-time ratio agrees with the CPU-time one within :data:`TIMING_TOLERANCE`."""
    return bool(abs(np.log(wall_ratio / cpu_ratio)) <= np.log(TIMING_TOLERANCE))


def _timing_fields(timing: dict) -> dict:
    """The fields of :func:`_interleaved_epochs` that a model section's QAT row keeps."""
    return {k: timing[k] for k in ("step_time_ratio", "cpu_time_ratio", "timing_consistent", "round_ratios")}


def _step_time_cell(row: dict) -> str:
    """A row's best-of step-time ratio, or "disturbed" with both ratios when they disagree."""
    step = f"×{row['step_time_ratio']:.2f}"
    if row.get("timing_consistent", True):
        return step
    return f"disturbed (wall {step} against CPU ×{row['cpu_time_ratio']:.2f}): re-run"


def _interleaved_epochs(float_model, qat_model, x, y, rounds: int, batch_size: int = 32, on_epoch=None) -> dict:
    """Epoch times of float and QAT training, alternated in one process after a warm-up epoch each.

    Round ``r`` times one float epoch and one QAT epoch back to back (in alternating order), so
    both see the same machine load. ``step_time_ratio`` is the ratio of the fastest QAT epoch to
    the fastest float epoch (best of ``rounds``, the least disturbed by other processes);
    ``round_ratios`` are the per-round ratios (their spread shows the noise); ``cpu_time_ratio``
    is the same best-of ratio on process CPU time. ``qat_model`` trains ``1 + rounds`` epochs.

    On this kind of shared VM an epoch sometimes runs ~1.5× slower for minutes at a time (whatever
    runs it), so a best-of ratio is only sound when both best epochs ran at full speed. When every
    float epoch ran slow and a QAT epoch did not, the wall ratio falls far below the CPU-time one
    (seen: ×0.72 against ×1.10): ``timing_consistent`` is False when the two differ by more than
    :data:`TIMING_TOLERANCE`, and the tables print such a ratio as disturbed, not as a figure.
    """
    def epoch(model):
        start, cpu = time.perf_counter(), time.process_time()
        model.fit(x, y, epochs=1, batch_size=batch_size, verbose=0, shuffle=True)
        return time.perf_counter() - start, time.process_time() - cpu

    epoch(float_model)
    epoch(qat_model)
    if on_epoch is not None:
        on_epoch(0)
    float_s, qat_s = [], []
    for r in range(rounds):
        if r % 2:
            qat_s.append(epoch(qat_model))
            float_s.append(epoch(float_model))
        else:
            float_s.append(epoch(float_model))
            qat_s.append(epoch(qat_model))
        if on_epoch is not None:
            on_epoch(r + 1)
    wall_f, cpu_f = [f[0] for f in float_s], [f[1] for f in float_s]
    wall_q, cpu_q = [q[0] for q in qat_s], [q[1] for q in qat_s]
    ratios = [q / f for q, f in zip(wall_q, wall_f)]
    wall_ratio, cpu_ratio = min(wall_q) / min(wall_f), min(cpu_q) / min(cpu_f)
    return {"step_time_ratio": wall_ratio, "cpu_time_ratio": cpu_ratio,
            "timing_consistent": timing_consistent(wall_ratio, cpu_ratio),
            "median_round_ratio": float(np.median(ratios)), "round_ratios": [round(r, 3) for r in ratios],
            "float_epoch_s": min(wall_f), "qat_epoch_s": min(wall_q), "rounds": rounds, "qat_epochs": rounds + 1}


def _qat_cost_data(spec: dict):
    """The digits at the spec's size; three channels (grey repeated) for MobileNetV2."""
    import tfq

    (x_train, y_train), (x_test, y_test) = tfq.datasets.load_digits(image_size=spec["image_size"], seed=0)
    if spec["builder"] == "mobilenet_v2":
        x_train, x_test = np.repeat(x_train, 3, axis=-1), np.repeat(x_test, 3, axis=-1)
    return (x_train, y_train), (x_test, y_test)


def _train_untimed(qat_model, x, y, epochs: int) -> dict:
    """``epochs`` QAT epochs (an accuracy-only run of another shuffling seed)."""
    qat_model.fit(x, y, epochs=epochs, batch_size=32, verbose=0, shuffle=True)
    return {"qat_epochs": epochs}


def _tfq_qat_cost(spec: dict, weights_path, rounds: int, learning_rate: float = 2e-4, jit_compile=False,
                  freeze_bn_round: int | None = None, seed: int = 0, timed: bool = True, **quantize_options) -> dict:
    """tfq QAT from the saved float weights: interleaved step-time ratio, then INT8 accuracy through LiteRT.

    ``seed`` seeds the shuffling of the QAT epochs; ``timed=False`` trains the same ``1 + rounds``
    epochs without the float twin and timing (accuracy over several seeds)."""
    import keras

    import tfq
    import tfq.training.callbacks

    (x_train, y_train), (x_test, y_test) = _qat_cost_data(spec)
    keras.utils.set_random_seed(0)
    model = _qat_cost_model(spec, x_train.shape[1:], keras)
    load_weights_by_layer(model, weights_path)
    # Built in untimed runs too: it draws from Keras' random stream, so a seed gives the same run either way.
    float_model = _float_twin(model, keras, learning_rate, jit_compile=jit_compile)
    qat = tfq.qat.quantize_model(model, calibration_data=x_train[:512], warn_unknown=False, **quantize_options)
    qat.compile(keras.optimizers.Adam(learning_rate), "sparse_categorical_crossentropy", jit_compile=jit_compile)

    def on_epoch(r):
        if freeze_bn_round is not None and r + 1 == freeze_bn_round:
            for layer in tfq.qat.batchnorm_layers_of(qat):
                layer.bn_frozen = True
            qat.make_train_function(force=True)

    if not timed and freeze_bn_round is not None:
        raise ValueError(f"freeze_bn_round={freeze_bn_round!r} is for timed runs: pass timed=True.")
    keras.utils.set_random_seed(seed)
    timing = (_interleaved_epochs(float_model, qat, x_train, y_train, rounds, on_epoch=on_epoch) if timed
              else _train_untimed(qat, x_train, y_train, rounds + 1))
    content = tfq.convert(qat, "int8")
    return {"name": "tfq_qat", **quantize_options, "jit_compile": jit_compile, "freeze_bn_round": freeze_bn_round,
            "seed": seed, **timing, "accuracy": _tflite_accuracy(content, x_test, y_test),
            "num_float_ops": tfq.inspect_tflite(content).num_float_ops}


def _tfmot_qat_cost(spec: dict, weights_path, rounds: int, learning_rate: float = 2e-4, seed: int = 0,
                    timed: bool = True) -> dict:
    """tfmot's default QAT (tf_keras; run with TF_USE_LEGACY_KERAS=1 in a subprocess), same protocol."""
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras

    import tfq

    (x_train, y_train), (x_test, y_test) = _qat_cost_data(spec)
    tf_keras.utils.set_random_seed(0)
    model = _qat_cost_model(spec, x_train.shape[1:], tf_keras)
    load_weights_by_layer(model, weights_path)
    float_model = _float_twin(model, tf_keras, learning_rate)
    qat = tfmot.quantization.keras.quantize_model(model)
    qat.compile(tf_keras.optimizers.Adam(learning_rate), "sparse_categorical_crossentropy")
    tf_keras.utils.set_random_seed(seed)
    timing = (_interleaved_epochs(float_model, qat, x_train, y_train, rounds) if timed
              else _train_untimed(qat, x_train, y_train, rounds + 1))
    converter = tf.lite.TFLiteConverter.from_keras_model(qat)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    content = converter.convert()
    return {"name": "tfmot_qat", "seed": seed, **timing, "accuracy": _tflite_accuracy(content, x_test, y_test),
            "num_float_ops": tfq.inspect_tflite(content).num_float_ops}


def _in_subprocess(function: str, *args, legacy_keras: bool = False, error_name: str | None = None,
                   timeout: float = 7200, **kwargs) -> dict:
    """``benchmark_lib.<function>(*args, **kwargs)`` in a fresh Python (JSON in, JSON out).

    ``legacy_keras`` runs it under tf_keras (``TF_USE_LEGACY_KERAS=1``, for tfmot); without the
    ``keras2`` extra installed the row is that one-line error, and no process starts. If it fails,
    the row is ``{"name": error_name or function, "error": <last lines of its output>}``."""
    if legacy_keras:
        from tfq.models.interop import require_keras2

        try:
            require_keras2(f"the benchmark's {error_name or function} row")
        except ImportError as err:
            return {"name": error_name or function, "error": str(err)}
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p))
    if legacy_keras:
        env["TF_USE_LEGACY_KERAS"] = "1"
    payload = json.dumps([list(args), kwargs])
    code = (f"import json, benchmark_lib as b; a, k = json.loads({payload!r}); "
            f"print('TFQ_JSON' + json.dumps(b.{function}(*a, **k)))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("TFQ_JSON"):
            return json.loads(line[len("TFQ_JSON"):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"name": error_name or function, "error": " | ".join(tail)}


def _train_float_for_qat_cost(spec: dict, weights_path, epochs: int) -> dict:
    import keras

    from tfq.models import examples

    (x_train, y_train), (x_test, y_test) = _qat_cost_data(spec)
    keras.utils.set_random_seed(0)
    model = _qat_cost_model(spec, x_train.shape[1:], keras)
    examples.train_model(model, x_train, y_train, epochs=epochs, seed=0)
    save_weights_by_layer(model, weights_path)
    return {"float_accuracy": _accuracy(model.predict(x_test, verbose=0), y_test), "float_epochs": epochs,
            "params": int(model.count_params())}


def bench_qat_cost(models=tuple(QAT_COST_MODELS), rounds: int | None = None, quick: bool = False, tfmot: bool = True,
                   variants=({},), seeds: int = 1, verbose: bool = True) -> dict:
    """QAT step-time ratio and INT8 accuracy, tfq against tfmot, from the same float weights.

    For each model a float model is trained once (Keras 3) and its weights saved by layer name;
    tfq QAT and tfmot's default QAT (tf_keras, ``TF_USE_LEGACY_KERAS=1``) each start from them in
    a fresh process, with the same optimizer (Adam 2e-4), batch size (32) and epochs
    (``1 + rounds``), BatchNorm statistics live throughout (as tfmot trains). Each process times
    float and QAT epochs alternately (:func:`_interleaved_epochs`), then converts to INT8 and
    measures accuracy through LiteRT.

    Args:
        models: keys of :data:`QAT_COST_MODELS`.
        rounds: timed float/QAT epoch pairs after the warm-up pair (None: the model's ``rounds``).
        quick: 2 float epochs, 1 round (smoke test; figures not meaningful).
        tfmot: include tfmot.
        variants: ``tfq.qat.quantize_model`` keywords, one tfq row each (e.g.
            ``({}, {"bn_folding": "two_pass"})``); a ``freeze_bn_round`` key freezes the BN
            statistics before that timed round instead.
        seeds: shuffling seeds of the QAT epochs per row: seed 0 is the timed run; seeds 1 ..
            ``seeds - 1`` train the same epochs untimed, each in its own process. One test sample
            is 0.28 points of the digits' test accuracy: a single run cannot tell tools apart
            within a few samples; the rows' ``accuracy_mean`` over the seeds can.

    Returns:
        ``{"models": [{"model", "rounds", "float_accuracy", "params", "rows": [...]}]}``; each
        row has ``step_time_ratio`` (fastest QAT epoch / fastest float epoch), ``round_ratios``,
        ``cpu_time_ratio``, the epoch seconds and ``accuracy`` (INT8, LiteRT).
    """
    def log(msg):
        if verbose:
            print(f"[benchmark] {msg}", flush=True)

    out = {"models": []}
    with tempfile.TemporaryDirectory() as tmp:
        for key in models:
            spec = QAT_COST_MODELS[key]
            spec_rounds = 1 if quick else rounds or spec["rounds"]
            weights = os.path.join(tmp, f"{key}.npz")
            log(f"QAT cost: {key}: training the float model")
            entry = {"model": key, "rounds": spec_rounds, "rows": [],
                     **_in_subprocess("_train_float_for_qat_cost", spec, weights, 2 if quick else spec["epochs"])}
            for options in variants:
                options = dict(options)
                log(f"QAT cost: {key}: tfq {options or ''}")
                entry["rows"].append(_seeded_row("_tfq_qat_cost", (spec, weights, spec_rounds), seeds, log,
                                                 f"{key}: tfq", **options))
            if tfmot:
                log(f"QAT cost: {key}: tfmot (tf_keras, subprocess)")
                entry["rows"].append(_seeded_row("_tfmot_qat_cost", (spec, weights, spec_rounds), seeds, log,
                                                 f"{key}: tfmot", legacy_keras=True))
            out["models"].append(entry)
    return out


def _seeded_row(function: str, args: tuple, seeds: int, log, label: str, **kwargs) -> dict:
    """The timed seed-0 row of ``function`` (in a subprocess), with the INT8 accuracy of seeds
    1 .. ``seeds - 1`` (untimed runs) and their mean."""
    row = _in_subprocess(function, *args, **kwargs)
    if seeds <= 1 or "error" in row:
        return row
    accuracies = [row["accuracy"]]
    for seed in range(1, seeds):
        log(f"QAT cost: {label}, seed {seed} (accuracy only)")
        other = _in_subprocess(function, *args, seed=seed, timed=False, **kwargs)
        if "error" in other:
            return {**row, "error": f"seed {seed}: {other['error']}"}
        accuracies.append(other["accuracy"])
    return {**row, "accuracy_by_seed": accuracies, "accuracy_mean": float(np.mean(accuracies))}


def qat_cost_markdown(section: dict) -> str:
    """The QAT-cost section as a table."""
    lines = ["| model | QAT | step time ×float (best epochs) | CPU time ×float | per-round ratios | INT8 accuracy "
             "| float accuracy |", "|---|---|---|---|---|---|---|"]
    for m in section["models"]:
        for row in m["rows"]:
            name = row.get("name", "?")
            extra = ", ".join(f"{k}={row[k]}" for k in ("bn_folding", "logits_range", "freeze_bn_round")
                              if row.get(k) is not None)
            if "error" in row:
                lines.append(f"| {m['model']} | {name} | error: {row['error'][:60]} | | | | |")
                continue
            ratios = row["round_ratios"]
            accuracy = f"{row['accuracy']:.4f}"
            if "accuracy_by_seed" in row:
                accuracy = (f"{row['accuracy_mean']:.4f} (mean of {len(row['accuracy_by_seed'])} seeds: "
                            f"{', '.join(f'{a:.4f}' for a in row['accuracy_by_seed'])})")
            lines.append(f"| {m['model']} | {name}{f' ({extra})' if extra else ''} | {_step_time_cell(row)} | "
                         f"×{row['cpu_time_ratio']:.2f} | {min(ratios):.2f}–{max(ratios):.2f} | {accuracy} | "
                         f"{m['float_accuracy']:.4f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ calibration cost
CALIBRATION_METHODS_BENCHED = PTQ_METHODS + ("mse_batch_median",)


def _calibration_model(input_shape):
    """The MobileNet-style example (untrained: calibration cost does not depend on the weights)."""
    import keras

    from tfq.models import examples

    keras.utils.set_random_seed(0)
    return examples.mobilenet_style(input_shape=tuple(input_shape))


def _method_params(name: str) -> tuple[str, dict]:
    return ("mse", {"batch_aggregate": "median"}) if name == "mse_batch_median" else (name, {})


def _streamed(x: np.ndarray, num_samples: int, batch_size: int = 32):
    """A function giving ``num_samples`` samples (``x`` tiled with noise) in batches, never held at once."""
    def batches():
        rng = np.random.default_rng(0)
        for start in range(0, num_samples, batch_size):
            idx = np.arange(start, min(start + batch_size, num_samples)) % len(x)
            yield (x[idx] + rng.normal(0.0, 0.01, x[idx].shape)).astype(np.float32)
    return batches


def _calibration_throughput(num_samples: int, batch_size: int = 32) -> list[dict]:
    """Samples per second of :func:`tfq.calibrate` for each method, on the same model and data."""
    import tfq

    (x, _), _ = tfq.datasets.load_digits(image_size=32, seed=0)
    model = _calibration_model(x.shape[1:])
    tfq.calibrate(model, x[:64], "minmax")  # builds the rewritten model once (not timed)
    rows = []
    for name in CALIBRATION_METHODS_BENCHED:
        method, params = _method_params(name)
        data = _streamed(x, num_samples, batch_size)
        start = time.perf_counter()
        cal = tfq.calibrate(model, data, method, batch_size=batch_size, **params)
        seconds = time.perf_counter() - start
        rows.append({"method": name, "samples": cal.num_samples, "seconds": seconds,
                     "samples_per_s": cal.num_samples / seconds})
    return rows


def _calibration_memory(method: str, num_samples: int) -> dict:
    """Peak resident memory added by calibrating ``num_samples`` streamed samples (run in a fresh process)."""
    import resource

    import tfq

    (x, _), _ = tfq.datasets.load_digits(image_size=32, seed=0)
    model = _calibration_model(x.shape[1:])
    name, params = _method_params(method)
    tfq.calibrate(model, _streamed(x, 256), name, **params)  # warm-up: traces, allocates
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cal = tfq.calibrate(model, _streamed(x, num_samples), name, **params)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "samples": cal.num_samples, "peak_rss_growth_mb": (after - before) / 1024.0}


def bench_calibration(num_samples: int = 2000, memory_samples=(5_000, 50_000), quick: bool = False,
                      verbose: bool = True) -> dict:
    """Calibration throughput (samples/s) per method, and memory against the number of samples.

    Throughput: :func:`tfq.calibrate` on ``num_samples`` streamed 32×32 digits, MobileNet-style
    model, batches of 32, after one untimed call. Memory: in a fresh process per point, the peak
    resident set added by calibrating ``memory_samples`` streamed samples after a warm-up
    calibration — flat in the sample count when observers keep fixed-size state.
    """
    def log(msg):
        if verbose:
            print(f"[benchmark] {msg}", flush=True)

    if quick:
        num_samples, memory_samples = 256, (512, 1024)
    log(f"calibration throughput ({num_samples} samples per method)")
    result = {"throughput": _calibration_throughput(num_samples), "memory": []}
    for method in ("robust_minmax", "minmax", "kl", "mse_batch_median"):
        for n in memory_samples:
            log(f"calibration memory: {method}, {n} samples (subprocess)")
            result["memory"].append(_in_subprocess("_calibration_memory", method, n))
    return result


def calibration_throughput_markdown(section: dict) -> str:
    lines = ["| calibration method | samples/s | peak RSS growth by samples |", "|---|---|---|"]
    memory = {}
    for row in section["memory"]:
        if "error" not in row:
            memory.setdefault(row["method"], []).append(f"{row['samples']:,}: +{row['peak_rss_growth_mb']:.1f} MB")
    for row in section["throughput"]:
        lines.append(f"| {row['method']} | {row['samples_per_s']:,.0f} | {'; '.join(memory.get(row['method'], [])) or '–'} |")
    return "\n".join(lines)


def _compression_row(name, content, float_acc, dense_gzip, x_test, y_test, sample, threads, seconds, **extra) -> dict:
    from tfq.tflite.info import inspect_tflite

    info = inspect_tflite(content)
    acc = _tflite_accuracy(content, x_test, y_test)
    return dict({
        "name": name, "accuracy": acc, "drop_vs_float": float_acc - acc, "size_bytes": info.size,
        "gzip_bytes": info.gzip_size, "gzip_vs_dense_int8": info.gzip_size / dense_gzip if dense_gzip else 1.0,
        "weight_sparsity": info.weight_sparsity, "max_distinct_per_channel": info.max_distinct_per_channel,
        "latency_ms": _latency_ms(content, sample, threads), "seconds": seconds,
        "num_float_ops": info.num_float_ops}, **extra)


def _small_student(input_shape, keras_module=None):
    """The distillation student: one 4-filter convolution and a softmax (690 weights on 8×8 digits)."""
    import keras

    km = keras_module or keras
    inp = km.Input(input_shape)
    x = km.layers.Conv2D(4, 3, padding="same", activation="relu", name="s_conv")(inp)
    x = km.layers.Flatten(name="s_flat")(km.layers.MaxPooling2D(name="s_pool")(x))
    return km.Model(inp, km.layers.Dense(10, activation="softmax", name="s_probs")(x), name="student")


def _bench_compression(threads: int, quick: bool, log) -> dict:
    """Compression on the digits CNN, every variant exported INT8 and run through the interpreter."""
    import keras

    import tfq
    from tfq.models import examples
    from tfq.training.jobs import prune_and_quantize

    epochs, prune_epochs, qat_epochs = (2, 1, 1) if quick else (10, 4, 1)
    student_epochs = 2 if quick else 40
    (x_train, y_train), (x_test, y_test) = tfq.datasets.load_digits(seed=0)
    keras.utils.set_random_seed(0)
    model = examples.digits_cnn(input_shape=x_train.shape[1:])
    log(f"compression: training the float digits CNN ({epochs} epochs)")
    examples.train_model(model, x_train, y_train, epochs=epochs, seed=0)
    float_acc = _accuracy(model.predict(x_test, verbose=0), y_test)
    sample, calib = x_test[:1], x_train[:300]
    start = time.perf_counter()
    dense = tfq.convert(model, "int8", calib)
    rows = [_compression_row("dense_int8", dense, float_acc, None, x_test, y_test, sample, threads,
                             time.perf_counter() - start)]
    dense_gzip = rows[0]["gzip_bytes"]
    rows.insert(0, _compression_row("float", tfq.convert(model, "float"), float_acc, dense_gzip, x_test, y_test,
                                    sample, threads, 0.0))
    for target in (0.5, 0.75, 0.9):
        log(f"compression: pruning to {target:.0%} ({prune_epochs} epochs) + sparsity-preserving QAT")
        start = time.perf_counter()
        _, content, summary = prune_and_quantize(model, x_train, y_train, target_sparsity=target, epochs=prune_epochs,
                                                 qat_epochs=qat_epochs, seed=0)
        rows.append(_compression_row(f"pruned{int(target * 100)}_int8", content, float_acc, dense_gzip, x_test, y_test,
                                     sample, threads, time.perf_counter() - start,
                                     keras_sparsity=summary["sparsity"]["total"]))
    log("compression: 16 clusters (2 epochs) + cluster-preserving QAT")
    start = time.perf_counter()
    keras.utils.set_random_seed(0)
    clustered = tfq.compression.clustering.cluster_weights(model, number_of_clusters=16)
    clustered.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy")
    clustered.fit(x_train, y_train, epochs=1 if quick else 2, batch_size=32, verbose=0)
    cqat = tfq.qat.quantize_model(tfq.compression.clustering.strip_clustering(clustered), calibration_data=calib,
                                  preserve="clusters")
    cqat.compile(keras.optimizers.Adam(2e-4), "sparse_categorical_crossentropy")
    cqat.fit(x_train, y_train, epochs=qat_epochs, batch_size=32, verbose=0)
    rows.append(_compression_row("clustered16_int8", tfq.convert(cqat, "int8"), float_acc, dense_gzip, x_test, y_test,
                                 sample, threads, time.perf_counter() - start))
    log(f"compression: small student, labels alone vs distilled ({student_epochs} epochs each)")
    for distill in (False, True):
        start = time.perf_counter()
        keras.utils.set_random_seed(1)
        student = _small_student(x_train.shape[1:])
        if distill:
            trainer = tfq.compression.distillation.Distiller(student=student, teacher=model, temperature=2.0, alpha=0.1)
            trainer.compile(keras.optimizers.Adam(2e-3))
        else:
            trainer = student
            trainer.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy")
        keras.utils.set_random_seed(1)
        trainer.fit(x_train, y_train, epochs=student_epochs, batch_size=32, verbose=0)
        rows.append(_compression_row("student_distilled_int8" if distill else "student_labels_int8",
                                     tfq.convert(student, "int8", calib), float_acc, dense_gzip, x_test, y_test,
                                     sample, threads, time.perf_counter() - start,
                                     keras_accuracy=_accuracy(student.predict(x_test, verbose=0), y_test),
                                     params=int(student.count_params()), temperature=2.0, alpha=0.1))
    log("compression: tfmot pruning to 75% (tf_keras, subprocess, from the same float weights)")
    with _weights_file(model) as weights:
        row = _in_subprocess("_tfmot_pruning_worker", dict(weights_path=weights, prune_epochs=prune_epochs),
                             legacy_keras=True, error_name="tfmot_pruned75_int8", timeout=3600)
    if "error" not in row:
        row["gzip_vs_dense_int8"] = row["gzip_bytes"] / dense_gzip
    rows.append(row)
    return {"model": "digits_cnn", "float_accuracy": float_acc, "rows": rows}


def _tfmot_pruning_worker(spec: dict) -> dict:
    """tfmot's prune_low_magnitude on the same architecture (tf_keras) from tfq's float weights
    (``spec["weights_path"]``), same schedule, then TFLite INT8 PTQ."""
    import math

    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras

    import tfq
    from tfq.models import examples
    from tfq.tflite.info import inspect_tflite

    (x_train, y_train), (x_test, y_test) = tfq.datasets.load_digits(seed=0)
    tf_keras.utils.set_random_seed(0)
    model = examples.digits_cnn(input_shape=x_train.shape[1:], keras_module=tf_keras)
    load_weights_by_layer(model, spec["weights_path"])
    float_acc = _accuracy(model.predict(x_test, verbose=0), y_test)
    start = time.perf_counter()
    steps = spec["prune_epochs"] * math.ceil(len(x_train) / 32)
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.75, begin_step=0,
                                                    end_step=max(int(round(0.6 * steps)) - 1, 1), frequency=10)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    pruned.compile(tf_keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    pruned.fit(x_train, y_train, epochs=spec["prune_epochs"], batch_size=32, verbose=0,
               callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    calib = x_train[:300]

    def representative():
        for i in range(len(calib)):
            yield [calib[i:i + 1]]

    converter = tf.lite.TFLiteConverter.from_keras_model(stripped)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        content = converter.convert()
    info = inspect_tflite(content)
    acc = _tflite_accuracy(content, x_test, y_test)
    return {"name": "tfmot_pruned75_int8", "accuracy": acc, "float_accuracy_tf_keras": float_acc,
            "drop_vs_float": float_acc - acc, "size_bytes": info.size, "gzip_bytes": info.gzip_size,
            "gzip_vs_dense_int8": None, "weight_sparsity": info.weight_sparsity,
            "max_distinct_per_channel": info.max_distinct_per_channel,
            "latency_ms": _latency_ms(content, x_test[:1], 2), "seconds": time.perf_counter() - start,
            "num_float_ops": info.num_float_ops}


def _trained(key: str, relu_max, epochs: int):
    """A model of :data:`MODELS` trained as the main benchmark trains it (``relu_max`` for MobileNet-style)."""
    import keras

    import tfq
    from tfq.models import examples

    spec = MODELS[key]
    (x_train, y_train), (x_test, y_test) = tfq.datasets.load_digits(image_size=spec["image_size"], seed=0)
    keras.utils.set_random_seed(0)
    kwargs = {"relu_max": relu_max} if key == "mobilenet_style" else {}
    model = getattr(examples, spec["builder"])(input_shape=x_train.shape[1:], **kwargs)
    examples.train_model(model, x_train, y_train, epochs=epochs, seed=0)
    return model, (x_train, y_train), (x_test, y_test)


def _agreement_and_sqnr(out: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement with the float model, and SQNR (dB) of the outputs: 10·log10(Σ ref² / Σ (out − ref)²)
    (None when the outputs are identical)."""
    noise = float(np.sum((out - reference) ** 2))
    sqnr = None if noise == 0 else 10.0 * np.log10(float(np.sum(reference ** 2)) / noise)  # None: exact
    return float((out.argmax(-1) == reference.argmax(-1)).mean()), sqnr


_QUICK_ROWS = ("tfq_minmax", "equalize", "gptq")


def _method_rows(label, model, calib, x_test, y_test, threads, log, quick=False) -> list[dict]:
    """INT8 rows through LiteRT: the plain converter, then tfq with each method, per tensor and per channel."""
    import tfq
    from tfq.tflite.interpreter import TFLiteModel

    float_out = model.predict(x_test, verbose=0)
    float_acc = _accuracy(float_out, y_test)
    rows = [{"model": label, "granularity": "-", "name": "float (Keras)", "accuracy": float_acc, "drop_vs_float": 0.0,
             "agreement": 1.0, "sqnr_db": None, "seconds": {}, "convert_seconds": 0.0}]

    def row(granularity, name, content, seconds, convert_seconds):
        out = TFLiteModel(content, num_threads=threads).predict(x_test, batch_size=256)
        acc = _accuracy(out, y_test)
        agreement, sqnr = _agreement_and_sqnr(out, float_out)
        rows.append({"model": label, "granularity": granularity, "name": name, "accuracy": acc,
                     "drop_vs_float": float_acc - acc, "agreement": agreement, "sqnr_db": sqnr,
                     "seconds": seconds, "convert_seconds": convert_seconds, "size_bytes": len(content)})

    start = time.perf_counter()
    content = _plain_converter_int8(model, calib)
    row("per-channel", "tflite_converter_minmax", content, {}, time.perf_counter() - start)
    for per_channel in (False,) if quick else (False, True):
        granularity = "per-channel" if per_channel else "per-tensor"
        for name, kwargs in METHOD_ROWS:
            if quick and name not in _QUICK_ROWS:
                continue
            log(f"methods: {label} {granularity} {name}")
            report = tfq.MethodsReport()
            data = None if kwargs.get("data_free") else calib
            start = time.perf_counter()
            content = tfq.convert(model, "int8", data, per_channel=per_channel, calibration="minmax", report=report,
                                  **kwargs)
            row(granularity, name, content, dict(report.seconds), time.perf_counter() - start)
    return rows


def _w4a8_rows(label, model, calib, x_test, y_test, log, quick=False) -> list[dict]:
    """4-bit weights, 8-bit activations, in Keras simulation (TFLite has no 4-bit kernels here)."""
    import tfq

    float_out = model.predict(x_test, verbose=0)
    float_acc = _accuracy(float_out, y_test)
    rows = []
    for per_channel in (True,) if quick else (True, False):
        for rounding in ("nearest", "gptq") if quick else ("nearest", "adaround", "gptq"):
            log(f"methods: {label} W4A8 {'per-channel' if per_channel else 'per-tensor'} {rounding}")
            recipe = tfq.Recipe(weights=tfq.TensorSpec(bits=4, per_channel=per_channel), allow_non_tflite=True,
                                weight_rounding=rounding)
            report = tfq.MethodsReport()
            start = time.perf_counter()
            sim = tfq.fake_quantize(model, recipe=recipe, representative_data=calib, report=report)
            seconds = time.perf_counter() - start
            out = sim.predict(x_test, verbose=0)
            acc = _accuracy(out, y_test)
            agreement, sqnr = _agreement_and_sqnr(out, float_out)
            rows.append({"model": label, "granularity": "per-channel" if per_channel else "per-tensor",
                         "name": f"w4a8_{rounding}", "accuracy": acc, "float_accuracy": float_acc,
                         "drop_vs_float": float_acc - acc, "agreement": agreement, "sqnr_db": sqnr,
                         "seconds": dict(report.seconds), "convert_seconds": seconds})
    return rows


def bench_methods(num_threads: int = 2, quick: bool = False, verbose: bool = True) -> dict:
    """The methods beyond calibration against plain PTQ and the plain converter (see the module docstring).

    Returns:
        ``{"int8": [rows], "w4a8": [rows], "unbalanced_spread": 300.0, "seconds": …}``; each row has the
        accuracy through LiteRT (Keras simulation for W4A8), the drop vs float, top-1 agreement and
        SQNR vs the float model, the seconds of each method and of the whole conversion.
    """
    from tfq.models.examples import unbalance_channels

    def log(msg):
        if verbose:
            print(f"[benchmark] {msg}", flush=True)

    start = time.perf_counter()
    epochs = 2 if quick else MODELS["mobilenet_style"]["epochs"]
    log("methods: training MobileNet-style models (ReLU6 and ReLU)")
    relu6, (x_train, _), (x_test, y_test) = _trained("mobilenet_style", 6.0, epochs)
    relu, _, _ = _trained("mobilenet_style", None, epochs)
    unbalanced = unbalance_channels(relu, spread=UNBALANCED_SPREAD)
    calib = x_train[:500]
    int8 = [] if quick else _method_rows("mobilenet_style", relu6, calib, x_test, y_test, num_threads, log)
    int8 += _method_rows(f"mobilenet_style_relu (channels ×{UNBALANCED_SPREAD:g} apart)", unbalanced, calib, x_test,
                         y_test, num_threads, log, quick)
    cnn_epochs = 2 if quick else MODELS["digits_cnn"]["epochs"]
    cnn, (cx_train, _), (cx_test, cy_test) = _trained("digits_cnn", None, cnn_epochs)
    w4a8 = _w4a8_rows("digits_cnn", cnn, cx_train[:512], cx_test, cy_test, log, quick)
    if not quick:
        w4a8 += _w4a8_rows("mobilenet_style", relu6, x_train[:512], x_test, y_test, log)
    return {"int8": int8, "w4a8": w4a8, "unbalanced_spread": UNBALANCED_SPREAD,
            "seconds": time.perf_counter() - start}


def run_benchmark(models=tuple(MODELS) + tuple(SEQUENCE_MODELS), num_threads: int = 2, quick: bool = False,
                  verbose: bool = True, compression: bool = False, methods: bool = True,
                  qat_cost=DEFAULT_QAT_COST_MODELS, qat_cost_rounds: int | None = None,
                  calibration: bool = True, timing_repeats: int | None = None, qat_variants=({},),
                  qat_seeds: int = 1) -> dict:
    """Runs the benchmark and returns the JSON-able results.

    Args:
        models: keys of :data:`MODELS` and :data:`SEQUENCE_MODELS`.
        num_threads: interpreter threads for latency.
        quick: 2 training epochs and 1 QAT epoch (for smoke tests); figures are then not meaningful.
        verbose: print progress.
        compression: add the compression section (digits CNN: pruning, clustering, distillation,
            tfmot pruning; about 4 minutes on 2 idle cores).
        methods: include the methods beyond calibration (:func:`bench_methods`).
        qat_cost: keys of :data:`QAT_COST_MODELS` for the QAT step-time section
            (:func:`bench_qat_cost`); empty to skip.
        qat_cost_rounds: timed epoch pairs per QAT-cost run (None: each model's default).
        qat_variants: ``tfq.qat.quantize_model`` keywords, one tfq QAT-cost row each (see :func:`bench_qat_cost`).
        qat_seeds: shuffling seeds per QAT-cost row for the INT8 accuracy (the first one timed).
        calibration: include calibration throughput and memory (:func:`bench_calibration`).
        timing_repeats: timed (converter, tfq) pairs per calibration variant (default 3; 1 with ``quick``).
    """
    import tensorflow as tf

    import tfq

    def log(msg):
        if verbose:
            print(f"[benchmark] {msg}", flush=True)

    known = {**MODELS, **SEQUENCE_MODELS}
    unknown = [m for m in models if m not in known]
    if unknown:
        raise ValueError(f"unknown benchmark model(s) {unknown}; choose from {list(known)}")
    unknown = [m for m in qat_cost if m not in QAT_COST_MODELS]
    if unknown:
        raise ValueError(f"unknown QAT-cost model(s) {unknown}; choose from {list(QAT_COST_MODELS)}")
    if isinstance(qat_seeds, bool) or not isinstance(qat_seeds, int) or qat_seeds < 1:
        raise ValueError(f"qat_seeds must be an int >= 1. Received: qat_seeds={qat_seeds!r}")
    if timing_repeats is None:
        timing_repeats = 1 if quick else 3
    if isinstance(timing_repeats, bool) or not isinstance(timing_repeats, int) or timing_repeats < 1:
        raise ValueError(f"timing_repeats must be an int >= 1. Received: timing_repeats={timing_repeats!r}")
    start = time.perf_counter()
    results = {
        "tfq_version": tfq.__version__, "tensorflow": tf.__version__, "python": platform.python_version(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "num_threads": num_threads,
        "quick": quick, "timing_repeats": timing_repeats, "outlier_samples": list(OUTLIER_SAMPLES),
        "models": [_bench_model(m, MODELS[m], num_threads, quick, log, timing_repeats) for m in models if m in MODELS],
        "sequence_models": [_bench_sequence_model(m, SEQUENCE_MODELS[m], num_threads, quick, log, timing_repeats)
                            for m in models if m in SEQUENCE_MODELS],
    }
    if compression:
        results["compression"] = _bench_compression(num_threads, quick, log)
    if methods:
        results["methods"] = bench_methods(num_threads, quick, verbose)
    if qat_cost:
        results["qat_cost"] = bench_qat_cost(qat_cost, rounds=qat_cost_rounds, quick=quick, variants=qat_variants,
                                            seeds=qat_seeds, verbose=verbose)
    if calibration:
        results["calibration_throughput"] = bench_calibration(quick=quick, verbose=verbose)
    results["seconds"] = time.perf_counter() - start
    return results


def to_markdown(results: dict) -> str:
    """A README-ready table of the main figures."""
    lines = ["| model | method | accuracy | drop vs float (pt) | size ratio | latency ratio |",
             "|---|---|---|---|---|---|"]
    for m in results["models"]:
        f = m["float"]
        lines.append(f"| {m['model']} | float (Keras) | {f['keras_accuracy']:.4f} | – | 1.00 | 1.00 |")
        for row in m["ptq"]:
            lines.append(f"| {m['model']} | {row['name']} | {row['accuracy']:.4f} | {100 * row['drop_vs_float']:.2f} "
                         f"| {row['size_ratio']:.3f} | {row['latency_ratio']:.2f} |")
        for row in m["ptq_outliers"]:
            lines.append(f"| {m['model']} (outlier calib.) | {row['name']} | {row['accuracy']:.4f} | "
                         f"{100 * row['drop_vs_float']:.2f} | {row['size_ratio']:.3f} | {row['latency_ratio']:.2f} |")
        for row in m.get("qat", []):
            if "error" in row:
                lines.append(f"| {m['model']} | {row['name']} | error: {row['error'][:60]} | | | |")
                continue
            lines.append(f"| {m['model']} | {row['name']} (step time {_step_time_cell(row)}) | "
                         f"{row['accuracy']:.4f} | {100 * row['drop_vs_float']:.2f} | – | – |")
        ev = m.get("evaluator")
        if ev:
            lines.append(f"| {m['model']} | tfq.evaluate throughput vs per-sample loop ({ev['samples']} samples; "
                         f"same threads ×{ev['throughput_ratio_same_threads']:.1f}; kernels' ceiling "
                         f"×{ev['ceiling_ratio']:.1f}) | ×{ev['throughput_ratio']:.1f} | | | |")
    for m in results.get("sequence_models", []):
        lines.append(f"| {m['model']} | float (Keras) | {m['float']['keras_accuracy']:.4f} | – | 1.00 | 1.00 |")
        for row in m["ptq"] + m.get("qat", []):
            if "error" in row:
                lines.append(f"| {m['model']} | {row['name']} | fails: {row['error'][:70]} | | | |")
                continue
            float_ops = f", {row['num_float_ops']} float ops" if row.get("num_float_ops") else ""
            size = f"{row['size_ratio']:.3f}" if "size_ratio" in row else "–"
            latency = f"{row['latency_ratio']:.2f}" if "latency_ratio" in row else "–"
            lines.append(f"| {m['model']} | {row['name']}{float_ops} | {row['accuracy']:.4f} | "
                         f"{100 * row['drop_vs_float']:.2f} | {size} | {latency} |")
    if not results["models"] and not results.get("sequence_models"):
        lines = []
    else:
        lines += ["", calibration_markdown(results)]
    for section, table in (("compression", compression_markdown), ("methods", methods_markdown),
                           ("qat_cost", qat_cost_markdown), ("calibration_throughput", calibration_throughput_markdown)):
        if results.get(section):
            lines += ["", table(results[section])] if lines else [table(results[section])]
    return "\n".join(lines)


def calibration_markdown(results: dict) -> str:
    """Every calibration method on clean and corrupt calibration data: INT8 accuracy, the samples tfq's warning
    named, and calibrate+convert time as a ratio to the plain converter's (median [min–max] of the timed pairs)."""
    bad = ", ".join(str(i) for i in results.get("outlier_samples", OUTLIER_SAMPLES))
    lines = [f"| model (float) | method | clean | corrupt (samples {bad} ×100) | samples tfq warned about | "
             f"time / converter, clean | time / converter, corrupt |", "|---|---|---|---|---|---|---|"]

    def ratio(row):
        if "time_ratio_min" not in row:
            return "1 (reference)" if row["name"].startswith("tflite_converter") else "–"
        return f"{row['time_ratio']:.2f} [{row['time_ratio_min']:.2f}–{row['time_ratio_max']:.2f}]"

    for m in results["models"] + results.get("sequence_models", []):
        corrupt = {r["name"]: r for r in m.get("ptq_outliers", [])}
        for row in m["ptq"]:
            if "error" in row:
                continue
            other = corrupt.get(row["name"], {})
            name = row["name"] + (" (default)" if row["name"] == PTQ_VARIANTS[0][0] else "")
            if row.get("calibration_params"):
                name += " " + ", ".join(f"{k}={v}" for k, v in row["calibration_params"].items())
            warned = ", ".join(map(str, other.get("warned_samples", []))) or "none"
            corrupt_acc = f"{other['accuracy']:.4f}" if "accuracy" in other else "–"
            lines.append(f"| {m['model']} ({m['float']['keras_accuracy']:.4f}) | {name} | {row['accuracy']:.4f} | "
                         f"{corrupt_acc} | {warned if not name.startswith('tflite') else '–'} | {ratio(row)} | "
                         f"{ratio(other) if other else '–'} |")
    return "\n".join(lines)


def compression_markdown(section: dict) -> str:
    """The compression section as a table: accuracy, raw and gzip size, sparsity, distinct values, latency."""
    lines = [f"| {section['model']} (float {section['float_accuracy']:.4f}) | accuracy | drop (pt) | size (KB) | "
             f"gzip (KB) | gzip vs dense INT8 | weight sparsity | distinct/ch | latency (ms) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in section["rows"]:
        if "error" in row:
            lines.append(f"| {row['name']} | error: {row['error'][:60]} | | | | | | | |")
            continue
        lines.append(f"| {row['name']} | {row['accuracy']:.4f} | {100 * row['drop_vs_float']:.2f} | "
                     f"{row['size_bytes'] / 1024:.1f} | {row['gzip_bytes'] / 1024:.1f} | {row['gzip_vs_dense_int8']:.3f} | "
                     f"{100 * (row['weight_sparsity'] or 0):.1f}% | {row['max_distinct_per_channel']} | "
                     f"{row['latency_ms']:.3f} |")
    return "\n".join(lines)


def methods_markdown(methods: dict) -> str:
    """The table of the methods section: accuracy, drop, agreement, SQNR and seconds per row."""
    lines = ["| model | weights | method | accuracy | drop vs float (pt) | agreement | SQNR (dB) | method seconds "
             "| convert seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for row in methods["int8"] + methods["w4a8"]:
        seconds = ", ".join(f"{k} {v:.1f}" for k, v in row["seconds"].items()) or "–"
        sqnr = "–" if row["sqnr_db"] is None else f"{row['sqnr_db']:.1f}"
        lines.append(f"| {row['model']} | {row['granularity']} | {row['name']} | {row['accuracy']:.4f} | "
                     f"{100 * row['drop_vs_float']:.2f} | {row['agreement']:.4f} | {sqnr} | {seconds} | "
                     f"{row['convert_seconds']:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# 4-bit weights in the file (issue 31): tfq against LiteRT's quantizer on the same float model.

INT4_MODELS = ("digits_cnn", "mobilenet_style", "digits_transformer")
# (row name, tfq.convert keywords without the data; "data": whether representative_data is passed).
TFQ_INT4_ROWS = (
    ("tfq_w4a8_nearest", {"recipe": {"weights": {"bits": 4}}, "data": True}),
    ("tfq_w4a8_adaround", {"recipe": "w4a8_adaround", "data": True}),
    ("tfq_w4a8_gptq", {"recipe": "w4a8_gptq", "data": True}),
    ("tfq_w4_dynamic_nearest", {"mode": "w4_dynamic", "data": False}),
    ("tfq_w4_dynamic_gptq", {"recipe": "w4_dynamic_gptq", "data": True}),
    ("tfq_w4_dynamic_gptq_block32", {"recipe": {"mode": "w4_dynamic", "weights": {"bits": 4, "block_size": 32},
                                                "weight_rounding": "gptq"}, "data": True}),
    ("tfq_w4_weight_only_nearest", {"mode": "w4_weight_only", "data": False}),
    ("tfq_w4_weight_only_gptq", {"recipe": "w4_weight_only_gptq", "data": True}),
)
# (row name, LiteRT quantizer config kind, granularity): its int4 recipes on the float .tflite.
AEQ_INT4_ROWS = tuple((f"aeq_{kind}_{'w4a8' if kind == 'static' else 'wi4'}{'' if g == 'CHANNELWISE' else '_block32'}",
                       kind, g) for kind in ("static", "dynamic", "weight_only")
                      for g in ("CHANNELWISE", "BLOCKWISE_32"))


def aeq_int4(float_content: bytes, kind: str, granularity: str, calib: np.ndarray) -> bytes:
    """LiteRT's quantizer (``ai_edge_quantizer``) on a float ``.tflite``: 4-bit weights for every op it
    supports, ``kind`` ``"static"`` (int8 activations, calibrated on ``calib`` one sample per step),
    ``"dynamic"`` or ``"weight_only"``; ``granularity`` ``"CHANNELWISE"`` or ``"BLOCKWISE_32"``."""
    from ai_edge_quantizer import qtyping, quantizer, recipe_manager

    rm = recipe_manager.RecipeManager()
    g = qtyping.QuantGranularity[granularity]
    op = qtyping.TFLOperationName.ALL_SUPPORTED
    if kind == "static":
        rm.add_static_config(regex=".*", operation_name=op, activation_num_bits=8, weight_num_bits=4,
                             weight_granularity=g)
    elif kind == "dynamic":
        rm.add_dynamic_config(regex=".*", operation_name=op, num_bits=4, granularity=g)
    else:
        rm.add_weight_only_config(regex=".*", operation_name=op, num_bits=4, granularity=g)
    qt = quantizer.Quantizer(bytearray(float_content))
    qt.load_quantization_recipe(rm.get_quantization_recipe())
    cal = None
    if qt.need_calibration or kind == "static":
        from ai_edge_litert.interpreter import Interpreter

        name = list(Interpreter(model_content=bytes(float_content)).get_signature_list()["serving_default"]["inputs"])[0]
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            cal = qt.calibrate({"serving_default": [{name: calib[i:i + 1]} for i in range(len(calib))]})
    return bytes(qt.quantize(cal, enable_progress_report=False).quantized_model)


def trained_precision_model(name: str):
    """(model, train, test) of the per-layer precision scripts (budget_curve.py, int16_mixed.py): ``"digits_cnn"``
    (8×8, 10 epochs) or ``"mobilenet_style"`` (32×32, 15 epochs), trained with seed 0."""
    import keras
    from tfq.examples import digits_cnn, mobilenet_style, train_model

    from tfq.datasets import load_digits

    size, builder, epochs = {"digits_cnn": (8, digits_cnn, 10), "mobilenet_style": (32, mobilenet_style, 15)}[name]
    (x_train, y_train), (x_test, y_test) = load_digits(image_size=size, seed=0)
    keras.utils.set_random_seed(0)
    model = builder(input_shape=x_train.shape[1:])
    train_model(model, x_train, y_train, epochs=epochs, seed=0)
    return model, (x_train, y_train), (x_test, y_test)


def _int4_model(key: str, quick: bool):
    """(model, (x_train, y_train), (x_test, y_test)) of an INT4 benchmark model, trained as the main benchmark trains it."""
    import keras

    import tfq
    from tfq.models import examples

    if key in MODELS:
        epochs = 2 if quick else MODELS[key]["epochs"]
        return _trained(key, 6.0 if key == "mobilenet_style" else None, epochs)
    spec = SEQUENCE_MODELS[key]
    (x_train, y_train), (x_test, y_test) = tfq.datasets.load_digits(seed=0)
    x_train, x_test = x_train[..., 0], x_test[..., 0]
    keras.utils.set_random_seed(0)
    model = getattr(examples, spec["builder"])(input_shape=x_train.shape[1:])
    examples.train_model(model, x_train, y_train, epochs=2 if quick else spec["epochs"], seed=0)
    return model, (x_train, y_train), (x_test, y_test)


def _int4_weight_bits(content: bytes) -> dict:
    """Weight bytes and counts of 4-bit / 8-bit / float weight tensors in a file."""
    import tfq

    info = tfq.inspect_tflite(content)
    return {"weight_bytes": info.weight_bytes, "int4_weights": sum(w.dtype == "INT4" for w in info.weights),
            "int8_weights": sum(w.dtype == "INT8" for w in info.weights),
            "float_weights": sum(w.dtype.startswith("FLOAT") for w in info.weights), "num_float_ops": info.num_float_ops}


def int4_rows(label: str, model, calib, x_test, y_test, rows=TFQ_INT4_ROWS, aeq_rows=AEQ_INT4_ROWS,
              log=print) -> list[dict]:
    """One model's INT4 rows through LiteRT: float, INT8 (tfq, and the converter's dynamic range), tfq's
    W4A8 / w4_dynamic / w4_weight_only rows and LiteRT's quantizer's int4 recipes on the same float file.

    Each row: accuracy (packaged digits test split, ai_edge_litert), drop vs float, top-1 agreement and
    SQNR vs the float model, file size and its ratio to tfq's INT8 file, weight bytes and the counts of
    4-bit / 8-bit / float weight tensors, conversion seconds; or the error's first line.
    """
    import warnings

    import tfq
    from tfq.tflite.interpreter import TFLiteModel

    float_out = model.predict(x_test, verbose=0)
    float_acc = _accuracy(float_out, y_test)
    out_rows = []

    def add(name, make):
        log(f"int4: {label} {name}")
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                content = make()
        except Exception as err:  # noqa: BLE001 - recorded in the table
            out_rows.append({"model": label, "name": name, "error": (str(err).strip().splitlines() or ["?"])[0][:240]})
            return None
        seconds = time.perf_counter() - start
        out = TFLiteModel(content).predict(x_test, batch_size=256)
        acc = _accuracy(out, y_test)
        agreement, sqnr = _agreement_and_sqnr(out, float_out)
        out_rows.append({"model": label, "name": name, "accuracy": acc, "float_accuracy": float_acc,
                         "drop_vs_float": float_acc - acc, "agreement": agreement, "sqnr_db": sqnr,
                         "size_bytes": len(content), "convert_seconds": seconds, **_int4_weight_bits(content)})
        return content

    float_tflite = add("float", lambda: tfq.convert(model, "float"))
    int8 = add("tfq_int8", lambda: tfq.convert(model, "int8", calib))
    add("converter_dynamic_int8", lambda: tfq.convert(model, "dynamic"))
    for name, spec in rows:
        spec = dict(spec)
        data = calib if spec.pop("data") else None
        recipe = spec.pop("recipe", None)

        def make(data=data, recipe=recipe, spec=spec):
            r = tfq.Recipe.from_dict(recipe) if isinstance(recipe, dict) else recipe
            return tfq.convert(model, representative_data=data, recipe=r, **spec)

        add(name, make)
    for name, kind, granularity in aeq_rows:
        add(name, lambda kind=kind, granularity=granularity: aeq_int4(float_tflite, kind, granularity, calib))
    for row in out_rows:
        if "size_bytes" in row and int8 is not None:
            row["size_vs_int8"] = row["size_bytes"] / len(int8)
    return out_rows


def bench_int4(models=INT4_MODELS, quick: bool = False, verbose: bool = True) -> dict:
    """4-bit weights in the file: :func:`int4_rows` on each model of :data:`INT4_MODELS` (calibration: 512
    training samples; ``quick``: 2 epochs, nearest and GPTQ rows only, channelwise LiteRT quantizer rows)."""

    def log(msg):
        if verbose:
            print(f"[benchmark] {msg}", flush=True)

    start = time.perf_counter()
    rows = TFQ_INT4_ROWS if not quick else tuple(r for r in TFQ_INT4_ROWS if "adaround" not in r[0])
    aeq_rows = AEQ_INT4_ROWS if not quick else tuple(r for r in AEQ_INT4_ROWS if r[2] == "CHANNELWISE")
    out = []
    for key in models:
        log(f"int4: training {key}")
        model, (x_train, _), (x_test, y_test) = _int4_model(key, quick)
        out += int4_rows(key, model, x_train[:512], x_test, y_test, rows, aeq_rows, log)
    return {"rows": out, "seconds": time.perf_counter() - start}


def int4_markdown(section: dict) -> str:
    """The INT4 rows as a Markdown table."""
    lines = ["| model | file | accuracy | SQNR vs float | size (B) | × INT8 | 4-bit / 8-bit / float weights | s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in section["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['name']} | fails: {r['error'][:80]} | – | – | – | – | – |")
            continue
        sqnr = "exact" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f} dB"
        lines.append(f"| {r['model']} | {r['name']} | {100 * r['accuracy']:.2f} % | {sqnr} | {r['size_bytes']} | "
                     f"{r.get('size_vs_int8', float('nan')):.3f} | {r['int4_weights']} / {r['int8_weights']} / "
                     f"{r['float_weights']} | {r['convert_seconds']:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Model kinds (issue 28): one row per kind of model a user brings, tfq against the plain converter.

MODEL_KINDS = ("subclassed_prelu_two_outputs", "subclassed_prelu_wrapped", "shared_layer_separate_relu",
               "odd_names", "tf_keras_custom_layer", "bidirectional_lstm", "keras_hub_gpt2_decoder",
               "keras_hub_gpt2_decoder_fixed_length", "audio_saved_model_stft_div")


def _kind_model(kind: str, tmp: str):
    """(model or SavedModel path, calibration data, test data, float reference function) of one kind; the models
    are built here, small, with random weights (copies of tests/test_model_kinds.py, test_interop.py and
    test_safety.py)."""
    import keras
    import tensorflow as tf

    layers = keras.layers
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)

    def keras_reference(model):
        def run(x):
            out = model(x, training=False)
            return [np.asarray(keras.ops.convert_to_numpy(o)) for o in keras.tree.flatten(out)]
        return run

    if kind.startswith("subclassed"):
        class TwoHeadPReLUNet(keras.Model):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self.conv1, self.prelu1 = layers.Conv2D(8, 3), layers.PReLU(shared_axes=[1, 2])
                self.conv2, self.prelu2 = layers.Conv2D(8, 3), layers.PReLU(shared_axes=[1, 2])
                self.flatten, self.boxes, self.scores = layers.Flatten(), layers.Dense(4), layers.Dense(3)

            def call(self, x):
                h = self.flatten(self.prelu2(self.conv2(self.prelu1(self.conv1(x)))))
                return self.boxes(h), keras.ops.softmax(self.scores(h))

        x = rng.random((224, 12, 12, 3)).astype("float32")
        net = TwoHeadPReLUNet()
        net(x[:1])
        model = net
        if kind.endswith("wrapped"):
            inputs = keras.Input((12, 12, 3))
            model = keras.Model(inputs, net(inputs))
        return model, x[:160], x[160:], keras_reference(net)
    if kind == "shared_layer_separate_relu":
        a, b = keras.Input((8, 8, 3), name="a"), keras.Input((8, 8, 3), name="b")
        shared = layers.Conv2D(4, 3, name="shared")
        out = layers.Add(name="add")([layers.ReLU(name="relu")(shared(a)), shared(b)])
        model = keras.Model([a, b], layers.Dense(3, name="head")(layers.Flatten()(out)))
        x = [rng.standard_normal((224, 8, 8, 3)).astype("float32") for _ in range(2)]
        return model, [v[:160] for v in x], [v[160:] for v in x], keras_reference(model)
    if kind == "odd_names":
        inputs = keras.Input((8, 8, 3), name="img")
        x = layers.Conv2D(8, 3, name="img_fq")(inputs)
        x = layers.ReLU(name="relu (x)")(x)
        x = layers.Conv2D(8, 3, name="conv (v2)")(x)
        x = layers.Activation("relu6", name="conv (v2)_fq")(x)
        x = layers.Add(name="img_fq_output_fq")([x, layers.Conv2D(8, 1, name="skip")(x)])
        x = layers.Flatten(name="flat")(layers.AveragePooling2D(2, name="flat_fq")(x))
        model = keras.Model(inputs, layers.Dense(4, name="logits")(x), name="my model (v2)")
        x = rng.standard_normal((224, 8, 8, 3)).astype("float32")
        return model, x[:160], x[160:], keras_reference(model)
    if kind == "tf_keras_custom_layer":
        import tf_keras

        class GatedSwish(tf_keras.layers.Layer):
            def build(self, input_shape):
                self.alpha = self.add_weight("alpha", shape=(input_shape[-1],), initializer="ones")

            def call(self, x):
                return x * tf.sigmoid(self.alpha * x)

        tf_keras.utils.set_random_seed(0)
        inputs = tf_keras.Input((8, 8, 3))
        y = GatedSwish(name="custom")(tf_keras.layers.Conv2D(8, 3, name="conv")(inputs))
        model = tf_keras.Model(inputs, tf_keras.layers.Dense(4, name="head")(tf_keras.layers.Flatten()(y)))
        model.get_layer("custom").set_weights([np.linspace(0.5, 2.0, 8, dtype="float32")])
        x = rng.random((224, 8, 8, 3)).astype("float32")
        return model, x[:160], x[160:], lambda v: [model(v).numpy()]
    if kind == "bidirectional_lstm":
        inputs = keras.Input((6, 4))
        model = keras.Model(inputs, layers.Dense(3)(layers.Bidirectional(layers.LSTM(8))(inputs)))
        x = rng.standard_normal((224, 6, 4)).astype("float32")
        return model, x[:160], x[160:], keras_reference(model)
    if kind.startswith("keras_hub_gpt2_decoder"):
        import keras_hub

        # The backbone as keras-hub builds it takes any length (its causal mask and positions are computed at
        # run time: NEG and RANGE, which TFLite has no int8 kernel for); on a fixed length they are constants.
        model = keras_hub.models.GPT2Backbone(vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=32,
                                              intermediate_dim=64, max_sequence_length=16)
        if kind.endswith("fixed_length"):
            inputs = {k: keras.Input((16,), dtype="int32", name=k) for k in ("token_ids", "padding_mask")}
            model = keras.Model(inputs, model(inputs), name="gpt2_fixed_length")
        n, seq = 112, 16
        lengths = rng.integers(seq // 2, seq + 1, size=n)
        mask = (np.arange(seq)[None] < lengths[:, None]).astype("int32")
        ids = np.where(mask, rng.integers(1, 100, size=(n, seq)), 0).astype("int32")
        data = {"token_ids": ids, "padding_mask": mask}
        return (model, {k: v[:64] for k, v in data.items()}, {k: v[64:] for k, v in data.items()},
                lambda d: [np.asarray(keras.ops.convert_to_numpy(model(d, training=False)))])
    if kind == "audio_saved_model_stft_div":
        class AudioFront(tf.Module):
            """Spectrogram front-end inside a SavedModel: STFT magnitude normalised by its largest value (a DIV:
            on silence the divisor is 1e-10), log, then a small classifier."""

            def __init__(self):
                super().__init__()
                r = np.random.default_rng(1)
                self.w = tf.Variable(r.normal(size=(7 * 33, 16)).astype("float32") * 0.1)
                self.w2 = tf.Variable(r.normal(size=(16, 4)).astype("float32"))

            @tf.function(input_signature=[tf.TensorSpec([1, 256], tf.float32, name="audio")])
            def __call__(self, audio):
                spec = tf.abs(tf.signal.stft(audio, frame_length=64, frame_step=32))
                normalised = spec / (tf.reduce_max(spec, axis=[-2, -1], keepdims=True) + 1e-10)
                logspec = tf.math.log(normalised + 1e-3)
                h = tf.nn.relu(tf.matmul(tf.reshape(logspec, [1, -1]), self.w))
                return {"scores": tf.matmul(h, self.w2)}

        module = AudioFront()
        path = os.path.join(tmp, "audio_saved_model")
        tf.saved_model.save(module, path, signatures=module.__call__)
        x = (rng.normal(size=(96, 256)) * rng.uniform(0.05, 1, size=(96, 1))).astype("float32")
        fn = tf.saved_model.load(path).signatures["serving_default"]
        return path, x[:64], x[64:], lambda v: [np.concatenate([fn(audio=tf.constant(s[None]))["scores"].numpy()
                                                                 for s in v])]
    raise ValueError(f"unknown model kind {kind!r}; choose from {MODEL_KINDS}")


def _plain_converter_int8_any(model, calib) -> bytes:
    """The plain converter's INT8 (ops without an int8 kernel kept float) on what the user has: a Keras or
    tf_keras model (``from_keras_model``) or a SavedModel directory (``from_saved_model``)."""
    import io

    import tensorflow as tf

    if isinstance(model, str):
        converter = tf.lite.TFLiteConverter.from_saved_model(model)
    else:
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if isinstance(calib, dict):
        names = list(calib)
        n = len(calib[names[0]])
        rep = lambda: ([calib[k][i:i + 1] for k in names] for i in range(n))  # noqa: E731
    elif isinstance(calib, list):
        rep = lambda: ([v[i:i + 1] for v in calib] for i in range(len(calib[0])))  # noqa: E731
    else:
        rep = lambda: ([calib[i:i + 1]] for i in range(len(calib)))  # noqa: E731
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = rep
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    with contextlib.redirect_stdout(io.StringIO()):
        return converter.convert()


def _samples(data) -> list:
    """Per-sample input lists (interpreter order: dict inputs sorted by name, as the converter orders them)."""
    if isinstance(data, dict):
        names = sorted(data)
        return [[data[k][i:i + 1] for k in names] for i in range(len(data[names[0]]))]
    if isinstance(data, list):
        return [[v[i:i + 1] for v in data] for i in range(len(data[0]))]
    return [[data[i:i + 1]] for i in range(len(data))]


def _match_inputs(content: bytes, sample_names, samples):
    """``samples`` reordered to the interpreter's input order (matched by signature name where it has one)."""
    from ai_edge_litert.interpreter import Interpreter

    if sample_names is None:
        return samples
    it = Interpreter(model_content=content)
    try:
        runner = it.get_signature_runner()
        by_index = {d["index"]: n for n, d in runner.get_input_details().items()}
        order = [sample_names.index(by_index[d["index"]]) for d in it.get_input_details()]
        return [[s[i] for i in order] for s in samples]
    except (ValueError, KeyError, RuntimeError):
        return samples


def kind_row(kind: str, tmp: str, log=print) -> dict:
    """One model kind: for the plain converter and tfq (``tfq.convert(model, "int8", calib)``), whether it
    converts (or the error's first line), the seconds, the float ops left (op types), the lowest
    per-output SQNR vs the float model through LiteRT (separate process) on held-out samples, and
    whether an all-zeros (silent) input crashes the interpreter or gives NaN/inf."""
    import warnings

    import tfq
    from tfq.tflite.sandbox import Sandbox

    model, calib, test, reference = _kind_model(kind, tmp)
    ref = reference(test)
    names = sorted(test) if isinstance(test, dict) else (
        [t.name.split(":")[0] for t in model.inputs] if isinstance(test, list) else None)
    test_samples = _samples(test)
    zeros = [[np.zeros_like(a) for a in test_samples[0]]]
    row = {"kind": kind}
    for tool, make in (("plain_converter", lambda: _plain_converter_int8_any(model, calib)),
                       ("tfq", lambda: tfq.convert(model, "int8", calib))):
        log(f"kinds: {kind} {tool}")
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                content = make()
        except Exception as err:  # noqa: BLE001 - recorded in the table
            row[tool] = {"converts": False, "error": (str(err).strip().splitlines() or ["?"])[0][:240],
                         "seconds": time.perf_counter() - start}
            continue
        seconds = time.perf_counter() - start
        info = tfq.inspect_tflite(content)
        entry = {"converts": True, "seconds": seconds, "float_ops": sorted({op.type for op in info.float_ops}),
                 "num_float_ops": info.num_float_ops, "size_bytes": len(content),
                 "warnings": [str(w.message).splitlines()[0][:200] for w in caught if "tfq" in str(w.message)][:3]}
        with Sandbox() as sandbox:
            result = sandbox.run(content, _match_inputs(content, names, test_samples))
            silence = sandbox.run(content, _match_inputs(content, names, zeros))
        if result.failed_sample is not None:
            entry["sqnr_db"] = None
            entry["run_error"] = result.message[:200]
        else:
            got = [np.concatenate([o[k] for o in result.outputs]) for k in range(len(result.outputs[0]))]
            sqnrs = []  # outputs in interpreter order, the reference in the model's: matched by shape, best SQNR
            for r in ref:
                r = np.asarray(r, np.float64).reshape(len(test_samples), -1)
                candidates = [np.asarray(g, np.float64).reshape(len(test_samples), -1) for g in got]
                candidates = [g for g in candidates if g.shape == r.shape]
                best = max((10 * np.log10(np.sum(r ** 2) / max(np.sum((r - g) ** 2), 1e-30)) for g in candidates),
                           default=None)
                sqnrs.append(None if best is None else float(best))
            entry["sqnr_db_per_output"] = sqnrs
            entry["sqnr_db"] = min((s for s in sqnrs if s is not None), default=None)
        entry["silence_crashes"] = silence.failed_sample is not None
        entry["silence_nonfinite"] = bool(silence.outputs) and any(
            not np.all(np.isfinite(o)) for o in silence.outputs[0])
        row[tool] = entry
    return row


def bench_kinds(kinds=MODEL_KINDS, verbose: bool = True) -> dict:
    """:func:`kind_row` for each of :data:`MODEL_KINDS`."""

    def log(msg):
        if verbose:
            print(f"[benchmark] {msg}", flush=True)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [kind_row(kind, tmp, log) for kind in kinds]
    return {"rows": rows, "seconds": time.perf_counter() - start}


def kinds_markdown(section: dict) -> str:
    """The model-kind rows as a Markdown table."""

    def cell(e):
        if not e.get("converts"):
            return f"fails: {e.get('error', '')[:70]}"
        sq = "–" if e.get("sqnr_db") is None else f"{e['sqnr_db']:.1f} dB"
        fl = ", ".join(e["float_ops"]) if e["float_ops"] else "none"
        silence = "crashes" if e["silence_crashes"] else ("NaN/inf" if e["silence_nonfinite"] else "ok")
        return f"{sq}; float ops: {fl}; silence: {silence}; {e['seconds']:.1f} s"

    lines = ["| model kind | plain converter | tfq |", "|---|---|---|"]
    for r in section["rows"]:
        lines.append(f"| {r['kind']} | {cell(r['plain_converter'])} | {cell(r['tfq'])} |")
    return "\n".join(lines)


SECTIONS = {"int4": "bench_int4", "kinds": "bench_kinds"}


def run_sections(sections, previous: dict | None = None, quick: bool = False, verbose: bool = True) -> dict:
    """Runs only ``sections`` (keys of :data:`SECTIONS`) and returns ``previous`` (e.g. the results file
    already written) with those sections replaced: ``int4`` (:func:`bench_int4`), ``kinds``
    (:func:`bench_kinds`)."""
    import tensorflow as tf

    import tfq

    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise ValueError(f"sections must be among {list(SECTIONS)}. Received: {list(sections)}")
    results = dict(previous or {})
    versions = {"tfq_version": tfq.__version__, "tensorflow": tf.__version__, "python": platform.python_version()}
    for name in sections:
        start = time.perf_counter()
        if name == "int4":
            section = bench_int4(quick=quick, verbose=verbose)
        else:
            section = bench_kinds(verbose=verbose)
        section.update(versions, seconds=time.perf_counter() - start, quick=quick)
        results[name] = section
    return results
