"""The quickstart job: train a small CNN on the packaged digits, export every variant, compare.

``tfq quickstart`` runs :func:`run_quickstart`: float Keras model → float, FP16, dynamic-range and
INT8 (PTQ) TFLite models, plus a QAT fine-tune exported to INT8; all evaluated through the
interpreter into report.md / report.json / report.png (the plot of :meth:`Report.plot`: quality vs
size, latency, per-tensor INT8 error; matplotlib is a dependency of tfq).
"""

from __future__ import annotations

import time
from pathlib import Path

from tfq.core.logs import logger, verbosity

__all__ = ["run_quickstart"]


def _say(message: str, verbose: bool) -> None:
    with verbosity(verbose):
        logger.info(message)


def run_quickstart(output_dir: str = "tfq_quickstart", epochs: int = 10, qat_epochs: int = 2,
                   calibration: str = "kl", seed: int = 0, verbose: bool = True):
    """Runs the quickstart and returns the :class:`~tfq.analysis.report.Report`.

    Args:
        output_dir: where the .tflite files and reports go (created if missing).
        epochs: float training epochs.
        qat_epochs: QAT fine-tuning epochs (0 skips QAT).
        calibration: PTQ calibration method.
        seed: seed for data split, initialisation and training.
        verbose: progress messages (INFO on the ``"tfq"`` logger, printed on stderr by default).
    """
    import keras

    from tfq.analysis.evaluation import evaluate, layer_errors
    from tfq.datasets import load_digits
    from tfq.export.convert import convert
    from tfq.models.examples import digits_cnn, train_model
    from tfq.qat import quantize_model

    start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (x_train, y_train), (x_test, y_test) = load_digits(seed=seed)
    _say(f"digits: {len(x_train)} train / {len(x_test)} test images of {x_train.shape[1:]}", verbose)

    keras.utils.set_random_seed(seed)
    model = digits_cnn(input_shape=x_train.shape[1:])
    _say(f"training the float CNN ({model.count_params():,} parameters) for {epochs} epochs ...", verbose)
    train_model(model, x_train, y_train, epochs=epochs, seed=seed, verbose=0)
    model.save(out / "float.keras")

    calib = x_train[:500]
    models = {"keras_float": model}
    for mode in ("float", "fp16", "dynamic"):
        _say(f"exporting {mode} ...", verbose)
        models[f"tflite_{mode}"] = convert(model, mode, output=out / f"model_{mode}.tflite")
    _say(f"exporting int8 (PTQ, {calibration} calibration on {len(calib)} samples) ...", verbose)
    models["tflite_int8_ptq"] = convert(model, "int8", calib, calibration=calibration,
                                            output=out / "model_int8_ptq.tflite")
    if qat_epochs > 0:
        _say(f"QAT: fine-tuning the fake-quantized model for {qat_epochs} epochs ...", verbose)
        qat_model = quantize_model(model, calibration_data=calib)
        train_model(qat_model, x_train, y_train, epochs=qat_epochs, seed=seed, learning_rate=2e-4, verbose=0)
        models["tflite_int8_qat"] = convert(qat_model, "int8", output=out / "model_int8_qat.tflite")

    _say("evaluating every variant through the TFLite interpreter ...", verbose)
    report = evaluate(models, x_test, y_test, reference="keras_float", num_threads=2)
    report.layer_errors = layer_errors(model, models["tflite_int8_ptq"], x_test[:64])
    report.to_json(out / "report.json")
    (out / "report.md").write_text(report.to_markdown() + "\n")
    try:
        report.plot(out / "report.png")
    except ImportError as err:  # matplotlib uninstalled by hand: the figures are in report.md/json anyway
        _say(f"report.png not written: {err}", verbose)
    _say(f"done in {time.perf_counter() - start:.0f} s; files in {out.resolve()}", verbose)
    return report
