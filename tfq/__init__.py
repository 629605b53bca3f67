"""tfq: quantize Keras models to fully integer TFLite (QAT and PTQ), evaluate and tune them.

Names are imported on first use, so ``import tfq`` (and ``tfq --help``) does not load
TensorFlow until something needs it.

Example:
    >>> import tfq
    >>> (x_train, y_train), (x_test, y_test) = tfq.datasets.load_digits()     # doctest: +SKIP
    >>> tflite = tfq.convert(model, "int8", x_train[:300], calibration="kl")   # doctest: +SKIP
"""

import importlib

__version__ = "0.1.0"

# public name -> module that defines it (a module itself when the name is the module's).
_EXPORTS = {
    "Calibration": "tfq.calibration",
    "ConversionError": "tfq.conversion",
    "LayerErrorReport": "tfq.report",
    "MethodsReport": "tfq.ptq_methods",
    "Override": "tfq.recipes",
    "Recipe": "tfq.recipes",
    "Report": "tfq.report",
    "RepresentativeDataset": "tfq.representative",
    "TFLiteInfo": "tfq.tflite_info",
    "TFLiteModel": "tfq.interpreter",
    "TensorSpec": "tfq.recipes",
    "TuneResult": "tfq.tuning",
    "calibrate": "tfq.calibration",
    "convert": "tfq.conversion",
    "equalize": "tfq.equalization",
    "evaluate": "tfq.evaluation",
    "fake_quantize": "tfq.conversion",
    "inspect_tflite": "tfq.tflite_info",
    "layer_errors": "tfq.evaluation",
    "list_presets": "tfq.recipes",
    "load_calibration": "tfq.calibration",
    "load_recipe": "tfq.recipes",
    "merge_calibrations": "tfq.calibration",
    "representative_dataset": "tfq.representative",
    "save_recipe": "tfq.recipes",
    "tune": "tfq.tuning",
}
_SUBMODULES = ("calibration_methods", "callbacks", "clustering", "datasets", "distillation", "examples", "export_modes",
               "interop", "observers", "ops", "outliers", "pruning", "qat", "recipes", "reference")

__all__ = ["__version__", *sorted(_EXPORTS), *_SUBMODULES]


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"tfq.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tfq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
