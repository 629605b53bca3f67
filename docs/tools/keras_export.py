"""What tfq adds over Keras 3's ``model.export(path, format="litert", **converter_options)``, measured.

The digits CNN of tfq.examples; 300 calibration samples of which 3 are scaled ×100 (a corrupted
sample or two in a calibration set is common). Routes compared on the same float model:

- keras_export: ``model.export(..., format="litert", optimizations=[DEFAULT], representative_dataset=...,
  target_spec={"supported_ops": [TFLITE_BUILTINS_INT8]})`` — the plain converter (MinMax calibration);
- tfq_default: ``tfq.convert(model, "int8", calib)`` — tfq's default calibration;
- and, for a QAT model made by ``tfq.qat.quantize_model``: ``qat_model.export(format="litert")``
  with and without ``optimizations``, next to ``tfq.convert(qat_model, "int8")``.

Run: ``PYTHONPATH=. python docs/tools/keras_export.py`` (~1–2 min on 2 cores); prints JSON.
"""

import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import tensorflow as tf

import tfq


def keras_export(model, calib=None, **options):
    """``model.export(format="litert")`` into a temp file; returns (bytes, seconds) or (error line, seconds)."""
    if calib is not None:
        def representative_dataset():
            for sample in calib:
                yield [sample[None]]
        options = dict(options, optimizations=[tf.lite.Optimize.DEFAULT], representative_dataset=representative_dataset,
                       target_spec={"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.tflite")
        start = time.perf_counter()
        try:
            model.export(path, format="litert", verbose=False, **options)
        except Exception as err:  # noqa: BLE001 - recorded, this is a measurement
            return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}", time.perf_counter() - start
        with open(path, "rb") as f:
            return f.read(), time.perf_counter() - start


def main():
    model, (x_train, y_train), (x_test, y_test) = tfq.examples.train_digits_cnn(epochs=8)
    calib = x_train[:300].copy()
    calib[[10, 150, 290]] *= 100.0  # three corrupted samples
    clean = x_train[:300]

    variants, seconds, notes = {"keras_float": model}, {}, {}
    variants["keras_export_clean_calib"], seconds["keras_export_clean_calib"] = keras_export(model, clean)
    variants["keras_export"], seconds["keras_export"] = keras_export(model, calib)
    start = time.perf_counter()
    variants["tfq_default"] = tfq.convert(model, "int8", calib)
    seconds["tfq_default"] = time.perf_counter() - start
    variants["tfq_minmax"] = tfq.convert(model, "int8", calib, calibration="minmax")

    keras.utils.set_random_seed(0)
    qat_model = tfq.qat.quantize_model(model, calibration_data=clean[:256])
    tfq.examples.train_model(qat_model, x_train, y_train, epochs=1, learning_rate=2e-4)
    variants["qat_tfq_convert"] = tfq.convert(qat_model, "int8")
    for name, options in (("qat_keras_export", {}), ("qat_keras_export_optimize",
                                                     {"optimizations": [tf.lite.Optimize.DEFAULT]})):
        content, seconds[name] = keras_export(qat_model, **options)
        if isinstance(content, bytes):
            variants[name] = content
        else:
            notes[name] = content

    for name, content in list(variants.items()):
        if isinstance(content, str):
            notes[name] = content
            del variants[name]
    report = tfq.evaluate(variants, x_test, y_test, reference="keras_float", latency=False)
    rows = {}
    for row in report.rows:
        name = row["name"]
        content = variants[name]
        info = tfq.inspect_tflite(content) if isinstance(content, bytes) else None
        rows[name] = {"accuracy": round(row["accuracy"], 4), "sqnr_db": round(row["sqnr_db"], 1),
                      "size_bytes": row["size"],
                      "fully_integer": info.is_fully_integer if info else None,
                      "op_types": sorted({op.type for op in info.ops}) if info else None,
                      "seconds": round(seconds[name], 1) if name in seconds else None}
    print(report.to_markdown())
    json.dump({"rows": rows, "errors": notes, "num_test": len(x_test)}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
