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

# public name -> module that defines it.
_EXPORTS = {
    "Calibration": "tfq.ptq.calibration",
    "ConversionError": "tfq.tflite.converter",
    "LayerErrorReport": "tfq.analysis.report",
    "MethodsReport": "tfq.ptq.pipeline",
    "MixedPrecisionResult": "tfq.analysis.precision",
    "Override": "tfq.core.recipes",
    "Recipe": "tfq.core.recipes",
    "Report": "tfq.analysis.report",
    "RepresentativeDataset": "tfq.core.representative",
    "TFLiteInfo": "tfq.tflite.info",
    "TFLiteModel": "tfq.tflite.interpreter",
    "TensorSpec": "tfq.core.recipes",
    "TuneResult": "tfq.analysis.tuning",
    "calibrate": "tfq.ptq.calibration",
    "convert": "tfq.export.convert",
    "equalize": "tfq.ptq.equalization",
    "evaluate": "tfq.analysis.evaluation",
    "fake_quantize": "tfq.export.convert",
    "inspect_tflite": "tfq.tflite.info",
    "layer_errors": "tfq.analysis.evaluation",
    "list_presets": "tfq.core.recipes",
    "load_calibration": "tfq.ptq.calibration",
    "load_recipe": "tfq.core.recipes",
    "merge_calibrations": "tfq.ptq.calibration",
    "mixed_precision": "tfq.analysis.precision",
    "representative_dataset": "tfq.core.representative",
    "save_recipe": "tfq.core.recipes",
    "tune": "tfq.analysis.tuning",
}

# The stages, in the order they depend on one another (each imports only those before it).
_PACKAGES = ("datasets", "core", "numerics", "tflite", "reference", "quantsim", "models", "compression", "ptq", "qat",
             "export", "training", "analysis", "cli")

# Public submodules that live inside a stage: ``tfq.pruning`` is ``tfq.compression.pruning``, and
# ``import tfq.pruning`` / ``from tfq.pruning import …`` work too.
_ALIASES = {
    "calibration_methods": "tfq.core.calibration_methods",
    "callbacks": "tfq.training.callbacks",
    "clustering": "tfq.compression.clustering",
    "distillation": "tfq.compression.distillation",
    "examples": "tfq.models.examples",
    "export_modes": "tfq.core.export_modes",
    "interop": "tfq.models.interop",
    "observers": "tfq.numerics.observers",
    "ops": "tfq.numerics.ops",
    "outliers": "tfq.numerics.outliers",
    "pruning": "tfq.compression.pruning",
    "ptq_methods": "tfq.core.ptq_methods",
    "recipes": "tfq.core.recipes",
}

__all__ = ["__version__", *sorted(_EXPORTS), *sorted(set(_PACKAGES) | set(_ALIASES))]


# ------------------------------------------------------------------------------ Keras registration
# Keras' own way, ``keras.saving.register_keras_serializable`` on each class, runs when the module
# defining the class is imported; ``import tfq`` imports no Keras, so tfq imports those modules for
# the user once Keras has loaded. Registering needs every module it imports whole: it waits until
# the outermost import of keras, tensorflow or any tfq module is over (a tfq module that imports
# Keras at its top is still half-initialised when Keras finishes).
# Modules whose import registers Keras-serializable classes (package "tfq").
_KERAS_SERIALIZABLE = ("tfq.quantsim.layers", "tfq.compression.pruning", "tfq.compression.clustering",
                       "tfq.compression.distillation")
_KERAS_MODULES = ("keras", "tensorflow")


def _register_keras_objects() -> None:
    """Imports the modules that register tfq's layers with Keras (once Keras is fully loaded)."""
    try:
        for module in _KERAS_SERIALIZABLE:
            importlib.import_module(module).__dict__  # noqa: B018 - a lazily loaded alias executes here
    except Exception as err:  # a broken TF install must not break the user's own import
        warnings.warn(f"tfq could not register its Keras layers ({type(err).__name__}: {err}); saved tfq models "
                      f"load after `import tfq.qat`.", stacklevel=2)


class _RegisterWhenKerasLoads(importlib.abc.MetaPathFinder):
    """Registers tfq's layers when Keras has loaded and no import of keras, tensorflow or tfq is under way.

    ``import keras`` imports tensorflow and ``import tensorflow`` imports keras, and a tfq module may
    import Keras at its top: registering when the inner import finishes would meet the outer module
    half-initialised, so these imports are counted and registration waits for the count to return to 0.
    """

    def __init__(self):
        self.depth = 0
        self.registered = False

    def counts(self, name: str) -> bool:
        return name in _KERAS_MODULES or name.startswith(f"{__name__}.")

    def find_spec(self, name, path=None, target=None):
        if not self.counts(name):
            return None
        sys.meta_path.remove(self)  # find the real spec without finding ourselves
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or not hasattr(spec.loader, "exec_module") or isinstance(spec.loader, _CountingLoader):
            return spec
        spec.loader = _CountingLoader(spec.loader, self)
        return spec

    def finished(self) -> None:
        if self.depth == 0 and "keras" in sys.modules and not self.registered:
            self.registered = True
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


_REGISTRAR = next((f for f in sys.meta_path if type(f).__name__ == "_RegisterWhenKerasLoads"), None)
if _REGISTRAR is None:
    _REGISTRAR = _RegisterWhenKerasLoads()
    if "keras" in sys.modules:
        _REGISTRAR.registered = True  # registered below, once the aliases exist
    else:
        sys.meta_path.insert(0, _REGISTRAR)


def _lazy_module(name: str):
    """The module ``name``, executed on first attribute access (``importlib.util.LazyLoader``)."""
    module = sys.modules.get(name)
    if module is not None:
        return module
    spec = importlib.util.find_spec(name)  # imports the parent package only (no TensorFlow)
    counting = spec.loader if isinstance(spec.loader, _CountingLoader) else _CountingLoader(spec.loader, _REGISTRAR)
    loader = importlib.util.LazyLoader(counting)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    parent, _, leaf = name.rpartition(".")
    setattr(sys.modules[parent], leaf, module)
    loader.exec_module(module)
    return module


for _alias, _target in _ALIASES.items():
    sys.modules.setdefault(f"{__name__}.{_alias}", _lazy_module(_target))
del _alias, _target


def __getattr__(name):
    if name in _ALIASES:
        return sys.modules[f"{__name__}.{name}"]
    if name in _PACKAGES:
        return importlib.import_module(f"tfq.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tfq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if "keras" in sys.modules and _REGISTRAR not in sys.meta_path:
    _register_keras_objects()
