"""tfq's calibration of a float ``.tflite``: ranges read from the model's own tensors in LiteRT.

The calibration half of the front-end below Keras (:mod:`tfq.export.tflite_frontend` writes the file):
a SavedModel directory or a ``keras.layers.TFSMLayer`` model becomes a float ``.tflite`` through the
plain converter (:func:`float_tflite`); that model runs in LiteRT's interpreter with every tensor kept
(``experimental_preserve_all_tensors``), one sample at a time, and every float model input and op
output feeds tfq's observers and the outlier test (:func:`calibrate_tflite`), as a Keras model's
fake-quant tensors do in :func:`tfq.calibrate` — which takes such models too.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np

from tfq.core.calibration_methods import DEFAULT_CALIBRATION, get_calibration_method
from tfq.core.logs import logger
from tfq.core.representative import representative_dataset
from tfq.numerics.observers import create_observer
from tfq.numerics.outliers import (
    DEFAULT_OUTLIER_FACTOR,
    OutlierTest,
    warn_outlier_samples,
)
from tfq.ptq.calibration import Calibration, set_aside_outliers
from tfq.tflite.info import inspect_tflite
from tfq.tflite.interpreter import interpreter_class, load_tflite_bytes

__all__ = ["calibrate_tflite", "debug_interpreter", "fit_sample", "float_tflite", "has_tfsm_layer", "is_below_keras", "is_tflite_input"]


# ----------------------------------------------------------------------------------------- inputs
def is_tflite_input(model) -> bool:
    """Whether ``model`` is a ``.tflite`` file path or TFLite bytes (what :func:`float_tflite` reads as is)."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        return True
    return isinstance(model, (str, os.PathLike)) and str(model).lower().endswith(".tflite")


def has_tfsm_layer(model) -> bool:
    """Whether a Keras model holds a ``keras.layers.TFSMLayer`` (a SavedModel wrapped as a layer)."""
    import keras

    tfsm = getattr(keras.layers, "TFSMLayer", None)
    if tfsm is None:
        return False
    stack = list(getattr(model, "layers", []) if isinstance(model, keras.Model) else [])
    if isinstance(model, tfsm):
        return True
    while stack:
        layer = stack.pop()
        if isinstance(layer, tfsm):
            return True
        if isinstance(layer, keras.Model):
            stack.extend(layer.layers)
    return False


def float_tflite(model) -> bytes:
    """The float ``.tflite`` of a model tfq quantizes below Keras.

    Args:
        model: ``.tflite`` bytes or path (returned as is, after checking it is float), a SavedModel
            directory, or a Keras model made of a ``keras.layers.TFSMLayer`` (both converted by the
            plain TFLite converter, no optimisation).

    Raises:
        ValueError: the ``.tflite`` is already quantized (int8 activations), or not a TFLite model.
        FileNotFoundError: a path that does not exist.
    """
    if is_tflite_input(model):
        content = load_tflite_bytes(model)
        info = inspect_tflite(content)
        quantized = [t.name for t in info.tensors if t.dtype in ("INT8", "INT16", "UINT8") and t.is_quantized
                     and not t.is_constant]
        if quantized:
            where = "the given bytes" if not isinstance(model, (str, os.PathLike)) else repr(str(model))
            raise ValueError(f"{where} is already a quantized model (e.g. tensor {quantized[0]!r}): tfq quantizes a "
                             f"float .tflite. Pass the float model it was made from.")
        return content
    import tensorflow as tf

    from tfq.tflite.converter import run_converter

    if isinstance(model, (str, os.PathLike)):
        from tfq.models.loading import check_saved_model_complete

        if not Path(model).is_dir():
            raise FileNotFoundError(f"SavedModel directory not found: {str(model)!r}. Pass a SavedModel directory or "
                                    f"a .tflite file.")
        check_saved_model_complete(model)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(model))
    else:
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
    return run_converter(converter, "float")


# ----------------------------------------------------------------------------------------- calibration
def _float_activation_tensors(info) -> list[int]:
    """Indices of the float tensors that carry activations: model inputs and op outputs."""
    produced = {o for op in info.ops for o in op.outputs if o >= 0}
    wanted = [i for i in sorted(produced | set(info.inputs)) if info.tensors[i].dtype == "FLOAT32"]
    return wanted


def _input_names(interpreter, details) -> list[str] | None:
    """The signature key of each input (in ``details`` order), or None without a single signature."""
    try:
        signatures = interpreter.get_signature_list()
        if len(signatures) != 1:
            return None
        runner = interpreter.get_signature_runner(next(iter(signatures)))
        name_of = {d["index"]: name for name, d in runner.get_input_details().items()}
    except (ValueError, RuntimeError, KeyError):
        return None
    names = [name_of.get(d["index"]) for d in details]
    return None if None in names else names


def _samples(data, num_samples, details, input_names=None):
    """Calibration samples one at a time, as lists of arrays with a batch axis of 1, interpreter input order
    (a dict of inputs is ordered by the signature's input names)."""
    rep = representative_dataset(data, num_samples, input_names=input_names)
    for batch in rep.batches(64):
        if len(batch) != len(details):
            raise ValueError(f"representative_data gives {len(batch)} input(s) per sample, but the model takes "
                             f"{len(details)} ({', '.join(repr(d['name']) for d in details)}). Pass one array per "
                             f"model input.")
        for j in range(len(batch[0])):
            yield [np.asarray(a[j:j + 1]) for a in batch]


def debug_interpreter(content, preserve: bool):
    """A one-thread LiteRT interpreter of ``content`` (every intermediate tensor kept when ``preserve``)."""
    cls = interpreter_class()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "preserve_all_tensors … for debugging purposes only"
        interpreter = cls(model_content=content, experimental_preserve_all_tensors=preserve, num_threads=1)
    return interpreter


def fit_sample(sample, details):
    """``sample`` cast to the model's input types and shapes (a leading batch axis of 1)."""
    out = []
    for a, d in zip(sample, details):
        a = np.asarray(a, dtype=d["dtype"])
        shape = tuple(int(v) for v in d["shape"])
        if a.shape != shape:
            if a.size != int(np.prod(shape)):
                raise ValueError(f"a calibration sample of shape {a.shape} does not fit model input {d['name']!r} "
                                 f"of shape {shape}. Pass samples shaped like the model's input.")
            a = a.reshape(shape)
        out.append(a)
    return out


def calibrate_tflite(content: bytes, data, method: str = DEFAULT_CALIBRATION, *, num_samples: int | None = None,
                     params: dict | None = None, bits: dict | None = None) -> Calibration:
    """Ranges of every float activation tensor of a float ``.tflite``, by a tfq calibration method.

    The model runs in LiteRT's interpreter with every tensor kept (``experimental_preserve_all_tensors``)
    one sample at a time; each float model input and op output feeds an observer of ``method``
    (:func:`tfq.numerics.observers.create_observer`) and the outlier test (:mod:`tfq.numerics.outliers`):
    samples far outside the rest are named in a warning, and set aside by ``"robust_minmax"``.

    Args:
        content: float ``.tflite`` bytes.
        data: calibration data (any form :func:`tfq.representative_dataset` takes): one array per
            model input in the interpreter's input order, or a dict keyed by the signature's input names.
        method: a calibration method name (``"robust_minmax"``, ``"minmax"``, ``"moving_average"``,
            ``"kl"``, ``"percentile"``, ``"mse"`` or a registered one).
        num_samples: cap on samples.
        params: the method's parameters (e.g. ``{"percentile": 99.9}``).
        bits: ``{tensor name: bits}`` for tensors quantized to other than 8 bits (int16 ops).

    Returns:
        A :class:`tfq.Calibration` keyed by tensor name.

    Example:
        >>> import keras
        >>> from tfq.export.graph_converter import keras_graph_converter
        >>> inp = keras.Input((4,))
        >>> m = keras.Model(inp, keras.layers.Dense(2)(inp))
        >>> content = keras_graph_converter(m).convert()
        >>> x = np.linspace(-1, 1, 40, dtype="float32").reshape(10, 4)
        >>> cal = calibrate_tflite(content, x, "minmax")
        >>> [round(v, 3) for v in cal.ranges[inspect_tflite(content).tensors[0].name]]
        [-1.0, 1.0]
    """
    entry = get_calibration_method(method, "calibration")
    params = dict(params or {})
    entry.check_params(params, "calibration_params")
    bits = dict(bits or {})
    info = inspect_tflite(content)
    interpreter = debug_interpreter(content, preserve=True)
    interpreter.allocate_tensors()
    details = interpreter.get_input_details()
    input_names = _input_names(interpreter, details) if len(details) > 1 else None
    tensors = _float_activation_tensors(info)
    robust = method == DEFAULT_CALIBRATION

    def make(name):
        if robust or method == "minmax":
            return create_observer("minmax")
        p = dict(params)
        if entry.uses_bits:
            p.setdefault("bits", bits.get(name, 8))
        if bits.get(name, 8) == 16:
            p.setdefault("symmetric", True)
        return create_observer(method, **p)

    names = {i: info.tensors[i].name for i in tensors}
    observers = {names[i]: make(names[i]) for i in tensors}

    def feed(recorder, taps):
        seen = 0
        for sample in _samples(data, num_samples, details, input_names):
            for d, a in zip(details, fit_sample(sample, details)):
                interpreter.set_tensor(d["index"], a)
            interpreter.invoke()
            recorder.begin_batch(1)
            for i in tensors:
                value = interpreter.get_tensor(i)
                taps[i].update(value.reshape(1, -1) if value.ndim else value.reshape(1, 1))
            seen += 1
        return seen

    start = time.perf_counter()
    test = OutlierTest(rerun=lambda recorder: feed(recorder, {i: recorder.tap(names[i]) for i in tensors}))
    seen = feed(test, {i: test.tap(names[i], observers[names[i]]) for i in tensors})
    if seen == 0:
        raise ValueError("representative data is empty: got 0 samples. Pass at least one sample.")
    outliers = test.result(DEFAULT_OUTLIER_FACTOR)
    warn_outlier_samples(outliers, method, set_aside=robust, stacklevel=4)
    if robust and outliers:
        set_aside_outliers(test, observers)  # every observer is MinMax here (make)
    logger.info(f"calibrated {len(observers)} tensors of the float .tflite ({method}) on {seen} samples in "
                f"{time.perf_counter() - start:.1f} s")
    ranges = {}
    for name, observer in observers.items():
        if not observer.has_data:
            continue
        lo, hi = observer.compute_range()
        ranges[name] = (float(np.min(lo)), float(np.max(hi)))
    return Calibration(ranges=ranges, method=method, params=params, num_samples=seen,
                       model_name="float .tflite", seconds=time.perf_counter() - start,
                       outlier_samples=tuple(outliers.indices))


def is_below_keras(model) -> bool:
    """Whether ``model`` is calibrated below Keras: a ``.tflite`` path or bytes, a SavedModel directory
    (a path to a directory, or a :class:`tfq.models.loading.SavedModelPath`), or a ``TFSMLayer`` model."""
    if is_tflite_input(model):
        return True
    if isinstance(model, (str, os.PathLike)):  # a directory without saved_model.pb: load_model names it
        return Path(model).is_dir() and (Path(model) / "saved_model.pb").exists()
    return has_tfsm_layer(model)
