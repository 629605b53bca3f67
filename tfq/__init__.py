"""tfq: quantize Keras models to fully integer TFLite (QAT and PTQ), evaluate and tune them.

Names are imported on first use, so ``import tfq`` (and ``tfq --help``) does not load
TensorFlow until something needs it. tfq's Keras layers (QAT wrappers, pruning and clustering
wrappers, the distiller) register themselves with Keras as soon as Keras is loaded — at
``import tfq`` if it already is, else when the user's ``import keras`` (or ``import tensorflow``)
completes — so that ``keras.models.load_model`` reads a saved tfq model after ``import tfq``.

Example:
    >>> import tfq
    >>> (x_train, y_train), (x_test, y_test) = tfq.datasets.load_digits()     # doctest: +SKIP
    >>> tflite = tfq.convert(model, "int8", x_train[:300], calibration="kl")   # doctest: +SKIP
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

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


# ------------------------------------------------------------------------------ Keras registration
# Modules whose import registers Keras-serializable classes (package "tfq").
_KERAS_SERIALIZABLE = ("tfq.qat.layers", "tfq.pruning", "tfq.clustering", "tfq.distillation")
_KERAS_MODULES = ("keras", "tensorflow")


def _register_keras_objects() -> None:
    """Imports the modules that register tfq's layers with Keras (once Keras is fully loaded)."""
    try:
        for module in _KERAS_SERIALIZABLE:
            importlib.import_module(module)
    except Exception as err:  # a broken TF install must not break the user's own import
        warnings.warn(f"tfq could not register its Keras layers ({type(err).__name__}: {err}); saved tfq models "
                      f"load after `import tfq.qat`.", stacklevel=2)


class _RegisterWhenKerasLoads(importlib.abc.MetaPathFinder):
    """Registers tfq's layers when the outermost import of keras or tensorflow completes.

    ``import keras`` imports tensorflow and ``import tensorflow`` imports keras: registering when
    the inner one finishes would meet the outer one half-initialised, so imports of either are
    counted and registration waits for the count to return to 0.
    """

    def __init__(self):
        self.depth = 0

    def find_spec(self, name, path=None, target=None):
        if name not in _KERAS_MODULES:
            return None
        sys.meta_path.remove(self)  # find the real spec without finding ourselves
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _CountingLoader(spec.loader, self)
        return spec

    def finished(self) -> None:
        if self.depth == 0 and "keras" in sys.modules:
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register_keras_objects()


class _CountingLoader(importlib.abc.Loader):
    def __init__(self, loader, finder: _RegisterWhenKerasLoads):
        self.loader, self.finder = loader, finder

    def __getattr__(self, name):  # get_resource_reader, get_filename, is_package …: the real loader's
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.finder.depth += 1
        try:
            self.loader.exec_module(module)
        finally:
            self.finder.depth -= 1
        self.finder.finished()


if "keras" in sys.modules:
    _register_keras_objects()
elif not any(isinstance(f, _RegisterWhenKerasLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenKerasLoads())
