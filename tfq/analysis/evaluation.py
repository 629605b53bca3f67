"""Comparing a Keras model with its TFLite exports, and locating INT8 error layer by layer.

:func:`evaluate` runs every model on the same data and reports, per model, the task metrics, the
agreement with a reference model (top-1 match rate, SQNR, max abs difference), the size, the
batch-1 latency and the batched throughput. :func:`layer_errors` compares every quantized
activation of an INT8 model with the same tensor of the float model.

Example:
    >>> report = tfq.evaluate(model, x_test, y_test, representative_data=x_train[:300])  # doctest: +SKIP
    >>> print(report)                                                                     # doctest: +SKIP
    >>> int8 = report.converted["tflite_int8"]                                            # doctest: +SKIP
    >>> report.layer_errors = tfq.layer_errors(model, int8, x_test)                       # doctest: +SKIP
"""

from __future__ import annotations

import collections
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import keras
import numpy as np

from tfq.analysis.report import LayerErrorReport, Report
from tfq.compression.common import keras_kernels, strip_all, weight_stats
from tfq.core.export_modes import export_mode_names, get_export_mode
from tfq.core.input_order import order_by_name
from tfq.core.logs import logger, verbosity
from tfq.core.messages import check_bool, short_repr
from tfq.core.representative import model_input_specs
from tfq.export import tflite_frontend
from tfq.export.convert import convert
from tfq.models.interop import load_keras_model
from tfq.models.loading import SavedModelPath, is_tf_keras_model
from tfq.numerics.ops import round_half_away
from tfq.ptq.tflite_calibration import is_below_keras
from tfq.reference import explain
from tfq.reference.executor import as_graph
from tfq.reference.kernels import UnsupportedOpError
from tfq.tflite.info import gzip_size, inspect_tflite
from tfq.tflite.interpreter import (
    TFLiteModel,
    _quantize_input,
    available_cores,
    interpreter_class,
    load_tflite_bytes,
)

__all__ = ["evaluate", "layer_errors", "sqnr_db", "METRIC_NAMES"]

METRIC_NAMES = ("accuracy", "top5", "top_k:K", "mse", "mae")
"""Metric names :func:`evaluate` understands (``top_k:K`` with an integer ``K``, e.g. ``top_k:3``)."""

_DEFAULT_BATCH_SIZE = 64
_LATENCY_WARMUP = 5
# Keys every row has; a metric may not take one of these names.
_ROW_KEYS = ("name", "kind", "num_samples", "agreement", "sqnr_db", "max_abs_diff", "size", "size_kind",
             "size_ratio", "gzip_size", "weight_bytes", "weight_bits", "weight_bits_per_layer", "weight_sparsity", "max_distinct_per_channel", "latency_p50_ms",
             "latency_p90_ms", "throughput", "num_threads", "errors", "error", "sqnr_db_per_output")
_QUANTIZED_DTYPES = ("INT8", "UINT8", "INT16")
_FLOAT_DTYPES = ("FLOAT32", "FLOAT16")


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def sqnr_db(reference, output) -> float:
    """Signal-to-quantization-noise ratio of ``output`` against ``reference``, in dB.

    ``SQNR = 10·log10(Σ ref² / Σ (ref − out)²)`` over all elements (arrays or lists of arrays,
    flattened and concatenated). ``inf`` when the two are identical, ``-inf`` when the reference
    is all zeros and the output is not.

    Example:
        >>> round(sqnr_db([1.0, 1.0], [1.0, 0.9]), 2)
        23.01
    """
    ref, out = _flat(reference), _flat(output)
    if ref.shape != out.shape:
        raise ValueError(f"SQNR needs outputs of the same size. Received: {ref.size} and {out.size} elements.")
    noise = float(np.sum((ref - out) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _bits_summary(bits: Mapping[str, int]) -> str | None:
    """``{tensor: bits}`` as ``"4×3 8×1"`` (weight tensors per stored width, narrowest first); None for none.

    Example:
        >>> _bits_summary({"conv": 4, "fc1": 4, "fc2": 8})
        '4×2 8×1'
    """
    if not bits:
        return None
    counts = collections.Counter(bits.values())
    return " ".join(f"{b}×{counts[b]}" for b in sorted(counts))


def _flat(arrays) -> np.ndarray:
    if isinstance(arrays, (list, tuple)) and arrays and not np.isscalar(arrays[0]):
        return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])
    return np.asarray(arrays, np.float64).ravel()


def _class_indices(y_true: np.ndarray, y_pred: np.ndarray, metric: str) -> np.ndarray:
    """Integer labels shaped like ``y_pred`` without its class axis; one-hot labels are argmaxed."""
    if y_true.shape == y_pred.shape:
        return y_true.argmax(-1)
    target = y_pred.shape[:-1]
    if y_true.size != int(np.prod(target)):
        raise ValueError(
            f"{metric}: labels of shape {y_true.shape} do not fit the first output of shape {y_pred.shape}. "
            f"Pass integer labels of shape {target} or one-hot labels of shape {y_pred.shape}."
        )
    classes = y_pred.shape[-1]
    if y_true.size and not np.issubdtype(y_true.dtype, np.number) and y_true.dtype != bool:
        raise ValueError(f"{metric}: labels must be class indices (integers). Received dtype {y_true.dtype}.")
    labels = y_true.reshape(target).astype(np.float64)
    if labels.size and (not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels))
                        or labels.min() < 0 or labels.max() >= classes):
        bad = labels[~(np.isfinite(labels) & (labels == np.round(labels)) & (labels >= 0) & (labels < classes))]
        raise ValueError(f"{metric}: labels must be class indices in [0, {classes}) for a first output of {classes} "
                         f"classes; {bad.size} label(s) are not (e.g. {bad.ravel()[0].item():g}). Check the labels "
                         f"belong to this model (and are not one-hot or 1-based).")
    return labels.astype(np.int64)


def _accuracy(y_true, y_pred) -> float:
    """Top-1 accuracy; a one-unit output is a binary classifier thresholded at 0.5."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_pred.ndim >= 2 and y_pred.shape[-1] > 1:
        return float(np.mean(y_pred.argmax(-1) == _class_indices(y_true, y_pred, "accuracy")))
    if y_true.size != y_pred.size:
        raise ValueError(f"accuracy: labels of shape {y_true.shape} do not fit the first output of shape "
                         f"{y_pred.shape}. Pass one 0/1 label per sample.")
    flat = y_true.ravel().astype(np.float64) if y_true.dtype != object else None
    if flat is None or (flat.size and (not np.all(np.isfinite(flat)) or flat.min() < 0 or flat.max() > 1)):
        raise ValueError(f"accuracy: a one-unit output is a binary classifier, so labels must be 0/1 (or "
                         f"probabilities in [0, 1]). Received values outside [0, 1] (dtype {y_true.dtype}).")
    return float(np.mean((y_pred.ravel() > 0.5) == (y_true.ravel() > 0.5)))


def _top_k(y_true, y_pred, k: int) -> float:
    """Share of samples whose label scores among the ``k`` highest (ties count as in, like ``tf.math.in_top_k``)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_pred.ndim < 2 or y_pred.shape[-1] < k:
        classes = y_pred.shape[-1] if y_pred.ndim >= 2 else 1
        raise ValueError(f"top_k:{k} needs at least {k} classes; the first output has {classes} classes (shape "
                         f"{y_pred.shape}). Use k <= {classes}.")
    labels = _class_indices(y_true, y_pred, f"top_k:{k}")
    scores = y_pred.reshape(-1, y_pred.shape[-1])
    labels = labels.reshape(-1)
    true_scores = scores[np.arange(len(labels)), labels]
    rank = np.sum(scores > true_scores[:, None], axis=1)
    return float(np.mean(rank < k))


def _regression(kind: str):
    def metric(y_true, y_pred) -> float:
        y_true, y_pred = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
        if y_true.size != y_pred.size:
            raise ValueError(f"{kind}: labels of shape {y_true.shape} do not fit the first output of shape "
                             f"{y_pred.shape}. Pass targets with the output's shape.")
        diff = y_pred.ravel() - y_true.ravel()
        return float(np.mean(diff ** 2) if kind == "mse" else np.mean(np.abs(diff)))

    metric.__name__ = kind
    return metric


_DEFAULT_VARIANTS = ("float", "fp16", "dynamic", "int8")


def _resolve_metrics(metrics) -> list[tuple[str, Callable]]:
    if metrics is None:
        return []
    if isinstance(metrics, str) or callable(metrics):
        metrics = (metrics,)
    if not isinstance(metrics, (list, tuple)):
        raise TypeError(f"metrics must be a metric name, a callable or a list of them. "
                        f"Received: metrics={metrics!r}")
    resolved: list[tuple[str, Callable]] = []
    for metric in metrics:
        if callable(metric):
            name = getattr(metric, "__name__", type(metric).__name__)
            fn = metric
        elif isinstance(metric, str):
            name = metric
            top = re.fullmatch(r"top(?:_k:)?(\d+)", metric)
            if metric == "accuracy":
                fn = _accuracy
            elif metric in ("mse", "mae"):
                fn = _regression(metric)
            elif top and int(top.group(1)) >= 1:
                k = int(top.group(1))
                fn = lambda y_true, y_pred, k=k: _top_k(y_true, y_pred, k)  # noqa: E731
            else:
                raise ValueError(
                    f"unknown metric {metric!r}. Use one of 'accuracy', 'top5', 'top_k:K' (K >= 1), 'mse', "
                    f"'mae', or a callable f(y_true, y_pred) -> float. Received: metrics={metrics!r}"
                )
        else:
            raise TypeError(f"a metric is a name or a callable f(y_true, y_pred) -> float. "
                            f"Received: metrics={metrics!r}")
        if name in _ROW_KEYS or any(name == n for n, _ in resolved):
            raise ValueError(f"metric name {name!r} is used twice or clashes with a report column; give the "
                             f"callable another __name__.")
        resolved.append((name, fn))
    return resolved


# --------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------


def _as_arrays(data, what: str = "data") -> tuple[list[np.ndarray], list[str] | None]:
    """``(arrays, names)``: one array per model input; names when ``data`` is a dict."""
    if data is None:
        raise ValueError(f"{what} is None. Pass an array, a list of arrays (one per input) or a dict by input name.")
    names = None
    if isinstance(data, Mapping):
        names = [str(k) for k in data]
        items = list(data.values())
    elif isinstance(data, (list, tuple)) and data and all(hasattr(a, "shape") for a in data):
        items = list(data)
    else:
        items = [data]
    if not items:
        raise ValueError(f"{what} is empty. Pass at least one sample.")
    arrays = []
    for item in items:
        array = np.asarray(item)
        if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise ValueError(f"{what} must be numeric arrays. Received dtype {array.dtype} (shape {array.shape}).")
        if array.ndim == 0:
            raise ValueError(f"{what} needs a leading sample axis. Received a scalar: {item!r}.")
        arrays.append(array)
    counts = [len(a) for a in arrays]
    if len(set(counts)) > 1:
        raise ValueError(f"all inputs in {what} need the same number of samples. Received: {counts}.")
    if counts[0] == 0:
        raise ValueError(f"{what} is empty (0 samples, shape {arrays[0].shape}). Pass at least one sample.")
    return arrays, names


def _keras_input_order(name: str, model, arrays, names) -> list[np.ndarray]:
    """The data in ``model.inputs`` order, checked against the input shapes."""

    specs = model_input_specs(model)
    if len(specs) != len(arrays):
        raise ValueError(
            f"models[{name!r}] has {len(specs)} input(s) {[s[0] for s in specs]}; the data has {len(arrays)} "
            f"array(s). Pass one array per model input (a list in model.inputs order, or a dict by name)."
        )
    if names is not None and len(arrays) > 1:
        arrays = order_by_name(dict(zip(names, arrays)), [s[0] for s in specs], data="the data",
                               target=f"models[{name!r}]", fix="key the data by input name")
    for array, (input_name, shape, _) in zip(arrays, specs):
        got = array.shape[1:]
        if len(got) != len(shape) or any(e is not None and e != g for e, g in zip(shape, got)):
            expected = ", ".join("None" if e is None else str(e) for e in shape)
            raise ValueError(
                f"models[{name!r}] input {input_name!r} expects samples of shape ({expected}); received "
                f"{tuple(got)} (data shape {array.shape}). Reshape the data to (N, {expected})."
            )
    return arrays


def _signature_io(interpreter) -> tuple[list[str] | None, list[int] | None]:
    """Signature input names per input position, and the output positions in signature order.

    ``get_output_details()`` may list outputs in another order than the Keras model returns them;
    the signature keys (``output_0``, ``output_1`` … or the output names) give the Keras order.
    """
    try:
        signatures = interpreter.get_signature_list()
        if len(signatures) != 1:
            return None, None
        runner = interpreter.get_signature_runner(next(iter(signatures)))
        sig_inputs = runner.get_input_details()
        sig_outputs = runner.get_output_details()
    except (ValueError, RuntimeError, KeyError, AttributeError):
        return None, None
    input_index = {d["index"]: i for i, d in enumerate(interpreter.get_input_details())}
    output_index = {d["index"]: i for i, d in enumerate(interpreter.get_output_details())}
    input_names: list[str | None] = [None] * len(input_index)
    for key, detail in sig_inputs.items():
        if detail["index"] in input_index:
            input_names[input_index[detail["index"]]] = key
    keys = list(sig_outputs)
    numbered = [re.fullmatch(r"output_(\d+)", k) for k in keys]
    keys = sorted(keys, key=lambda k: int(k.split("_")[1])) if all(numbered) else sorted(keys)
    order = [output_index.get(sig_outputs[k]["index"]) for k in keys]
    if None in input_names or None in order or sorted(order) != list(range(len(output_index))):
        return None, None
    return input_names, order


def _tflite_input_order(where: str, input_names, arrays, names, strict: bool) -> list[np.ndarray]:
    """The data in the interpreter's input order: by signature name when it can, else by position."""
    if names is None or input_names is None or len(arrays) == 1:
        return arrays
    if strict or sorted(names) == sorted(input_names):
        return order_by_name(dict(zip(names, arrays)), input_names, data="the data", target=where,
                             fix="key the data by the model's input names")
    return arrays


def _normalize_outputs(outputs) -> list[np.ndarray]:
    if isinstance(outputs, Mapping):
        return [np.asarray(outputs[k]) for k in sorted(outputs)]
    if isinstance(outputs, (list, tuple)):
        return [np.asarray(o) for o in outputs]
    return [np.asarray(outputs)]


class _Runner:
    """One model under evaluation: a Keras model, a SavedModel or a TFLite model, with the same interface."""

    def __init__(self, name: str, model, num_threads: int | None, isolate: bool = False):
        self.name = name
        self.keras_model = None
        self.tflite = None
        self.saved_model = None
        self.error = None  # the first failure's message
        if isinstance(model, SavedModelPath) or (isinstance(model, (str, os.PathLike)) and Path(model).is_dir()):
            self._load_saved_model(model)
            return
        if isinstance(model, keras.Model) or is_tf_keras_model(model) or (
                isinstance(model, (str, os.PathLike)) and Path(model).suffix in (".keras", ".h5", ".hdf5")):

            try:
                self.keras_model = load_keras_model(model, where=f"models[{name!r}]")
            except (ValueError, FileNotFoundError) as err:
                raise type(err)(f"models[{name!r}]: {err}") from None
            self.kind = "keras"
            return
        if not isinstance(model, (bytes, bytearray, memoryview, str, os.PathLike)):
            raise TypeError(f"models[{name!r}] must be a Keras model, a SavedModel directory, TFLite bytes or a "
                            f".tflite path. Received: {type(model).__name__}")
        try:
            # Isolated: no kernel is prepared in this process (one may abort) until a sample ran in the worker.
            self.tflite = TFLiteModel(model, num_threads=num_threads, allocate=not isolate)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"models[{name!r}]: {err}") from None
        except ValueError as err:
            raise ValueError(f"models[{name!r}]: {err}") from None
        self.kind = "tflite"
        # TFLiteModel returns outputs in the signature's (Keras) order already.
        self.input_names, _ = _signature_io(self.tflite.interpreter)

    def _load_saved_model(self, path) -> None:
        import tensorflow as tf

        path = Path(path)
        if not (path / "saved_model.pb").is_file():
            raise ValueError(f"models[{self.name!r}]: {str(path)!r} is a directory without saved_model.pb: not a "
                             f"SavedModel. Pass a SavedModel directory, a Keras model or a .tflite file.")
        loaded = tf.saved_model.load(str(path))
        if "serving_default" not in loaded.signatures:
            raise ValueError(f"models[{self.name!r}]: SavedModel {str(path)!r} has no 'serving_default' signature "
                             f"(it has {sorted(loaded.signatures)}). Save it with signatures=... .")
        self.saved_model = (path, loaded, loaded.signatures["serving_default"])
        self.kind = "saved_model"
        specs = self.saved_model[2].structured_input_signature[1]
        self.input_names = list(specs)
        self._input_specs = [specs[k] for k in self.input_names]
        keys = list(self.saved_model[2].structured_outputs)
        numbered = all(re.fullmatch(r"output_(\d+)", k) for k in keys)
        self.saved_output_names = sorted(keys, key=lambda k: int(k.split("_")[1])) if numbered else sorted(keys)

    @property
    def output_names(self) -> list[str] | None:
        """Output names in this runner's output order (Keras: the model's; TFLite and SavedModel: signature keys)."""
        if self.keras_model is not None:
            names = getattr(self.keras_model, "output_names", None)
            return [str(n) for n in names] if names else None
        if self.saved_model is not None:
            return list(self.saved_output_names)
        try:
            runner = self.tflite.interpreter.get_signature_runner()
        except (ValueError, RuntimeError):
            return None
        by_index = {d["index"]: k for k, d in runner.get_output_details().items()}
        return [by_index.get(d["index"]) for d in self.tflite.output_details]

    @property
    def size(self) -> tuple[int, str]:
        if self.keras_model is not None:
            return int(strip_all(self.keras_model).count_params()) * 4, "params_fp32"
        if self.saved_model is not None:
            return sum(f.stat().st_size for f in self.saved_model[0].rglob("*") if f.is_file()), "saved_model"
        return self.tflite.size, "flatbuffer"

    def compression(self) -> dict:
        """gzip size of the stored weights' bytes, and sparsity / distinct values per channel of the weights.

        TFLite: the whole flatbuffer gzipped, and its constant weight tensors (2-D or more) as
        stored (int8 per channel). Keras: the float32 weights (pruning/clustering wrappers stripped)
        gzipped, and the main kernels of the weighted layers as computed with (per last axis).
        """

        if self.keras_model is not None:
            weights = strip_all(self.keras_model).get_weights()
            raw = b"".join(np.asarray(w, np.float32).tobytes() for w in weights)
            kernels = list(keras_kernels(self.keras_model))
            stats = weight_stats([(w, -1) for _, w in kernels])
            per_layer = {name: 32 for name, _ in kernels}
            return dict(gzip_size=gzip_size(raw), weight_bytes=sum(4 * int(np.size(w)) for _, w in kernels),
                        weight_bits=_bits_summary(per_layer), weight_bits_per_layer=per_layer, **stats)
        if self.saved_model is not None:
            weights = [v.numpy() for v in getattr(self.saved_model[1], "variables", ())]
            raw = b"".join(np.asarray(w).tobytes() for w in weights)
            stats = weight_stats([(w, -1) for w in weights if np.ndim(w) >= 2])
            return dict(gzip_size=gzip_size(raw), **stats)
        info = inspect_tflite(self.tflite.content)
        return dict(gzip_size=info.gzip_size, weight_bytes=info.weight_bytes, weight_bits=_bits_summary(info.weight_bits),
                    weight_bits_per_layer=dict(info.weight_bits), weight_sparsity=info.weight_sparsity,
                    max_distinct_per_channel=info.max_distinct_per_channel)

    def keras_input_names(self) -> list[str] | None:
        return [s[0] for s in model_input_specs(self.keras_model)] if self.keras_model is not None else None

    def order_inputs(self, arrays, names, strict) -> list[np.ndarray]:
        if self.keras_model is not None:
            return _keras_input_order(self.name, self.keras_model, arrays, names)
        if self.saved_model is not None:
            ordered = _tflite_input_order(f"models[{self.name!r}]", self.input_names, arrays, names, strict)
            if len(ordered) != len(self.input_names):
                raise ValueError(f"models[{self.name!r}] has {len(self.input_names)} input(s) {self.input_names}; the "
                                 f"data has {len(ordered)} array(s). Pass one array per model input.")
            for array, name, spec in zip(ordered, self.input_names, self._input_specs):
                expected = tuple(spec.shape[1:])
                if len(expected) != array.ndim - 1 or any(e is not None and e != g
                                                          for e, g in zip(expected, array.shape[1:])):
                    raise ValueError(f"models[{self.name!r}] input {name!r} expects samples of shape {expected}; "
                                     f"received {tuple(array.shape[1:])} (data shape {array.shape}). Reshape the "
                                     f"data.")
            return ordered
        ordered = _tflite_input_order(f"models[{self.name!r}]", self.input_names, arrays, names, strict)
        try:
            self.tflite._prepare(ordered)  # checks the number of inputs and the sample shapes
        except ValueError as err:
            raise ValueError(f"models[{self.name!r}]: {err}") from None
        return ordered

    def _predict(self, arrays, batch_size: int) -> list[np.ndarray]:
        if self.keras_model is not None:
            x = arrays if len(arrays) > 1 else arrays[0]
            return _normalize_outputs(self.keras_model.predict(x, batch_size=batch_size, verbose=0))
        if self.saved_model is not None:
            return self._saved_model_predict(arrays, batch_size)
        outputs = self.tflite.predict(list(arrays), batch_size=batch_size)
        return outputs if isinstance(outputs, list) else [outputs]

    def _saved_model_predict(self, arrays, batch_size: int) -> list[np.ndarray]:
        import tensorflow as tf

        fn = self.saved_model[2]
        fixed = [spec.shape[0] for spec in self._input_specs]
        step = int(fixed[0]) if fixed and fixed[0] is not None else batch_size
        chunks = []
        for start in range(0, len(arrays[0]), step):
            feed = {name: tf.constant(a[start:start + step], dtype=spec.dtype)
                    for name, a, spec in zip(self.input_names, arrays, self._input_specs)}
            out = fn(**feed)
            chunks.append([np.asarray(out[k].numpy()) for k in self.saved_output_names])
        return [np.concatenate([c[k] for c in chunks], axis=0) for k in range(len(self.saved_output_names))]

    def _isolated_predict(self, arrays) -> tuple[list[np.ndarray] | None, np.ndarray]:
        """A TFLite model run sample by sample in a worker process (:mod:`tfq.tflite.sandbox`): a kernel that
        aborts kills the worker, not this process; the sample is counted failed and the rest run on."""
        from tfq.tflite.sandbox import Sandbox

        n = len(arrays[0])
        failed = np.zeros(n, bool)
        per_sample: list = [None] * n
        raw = [d["index"] for d in self.tflite.interpreter.get_output_details()]
        order = [raw.index(d["index"]) for d in self.tflite.output_details]
        start = 0
        with Sandbox() as sandbox:
            while start < n:
                result = sandbox.run(self.tflite.content, [[a[i:i + 1] for a in arrays] for i in range(start, n)])
                for j, outputs in enumerate(result.outputs):
                    per_sample[start + j] = [outputs[k] for k in order]
                if result.failed_sample is None:
                    break
                self.error = self.error or ("process aborted: " if result.aborted else "") + result.message[:200]
                if result.failed_sample < 0:  # the model does not even load
                    failed[start:] = True
                    break
                failed[start + result.failed_sample] = True
                start += result.failed_sample + 1
        return _merge_samples(per_sample, failed)

    def predict(self, arrays, batch_size: int, isolate: bool = False) -> tuple[list[np.ndarray] | None, np.ndarray]:
        """(outputs, failed): a sample the model fails on (an interpreter error, a TF error) gets NaN outputs
        and ``failed[i] = True``; the others run in batches as usual. Outputs are None when every sample failed.
        ``isolate``: a TFLite model runs in a worker process (aborts counted too)."""
        if isolate and self.tflite is not None:
            return self._isolated_predict(arrays)
        n = len(arrays[0])
        try:
            return self._predict(arrays, batch_size), np.zeros(n, bool)
        except Exception as err:  # noqa: BLE001 - a model failing on some samples is measured, not fatal
            self.error = self.error or _one_line(err)
        failed = np.zeros(n, bool)
        per_sample: list = []
        for i in range(n):
            try:
                per_sample.append(self._predict([a[i:i + 1] for a in arrays], 1))
            except Exception as err:  # noqa: BLE001
                self.error = self.error or _one_line(err)
                failed[i] = True
                per_sample.append(None)
        return _merge_samples(per_sample, failed)

    def latency_ms(self, arrays, runs: int) -> np.ndarray:
        if self.tflite is not None:
            return self.tflite.latency_ms(list(arrays), warmup=_LATENCY_WARMUP, runs=runs)
        sample = [a[:1] for a in arrays]
        if self.saved_model is not None:
            def call():
                return self._predict(sample, 1)
        else:
            x = sample if len(sample) > 1 else sample[0]

            def call():
                return self.keras_model(x, training=False)
        for _ in range(_LATENCY_WARMUP):
            call()
        times = np.empty(runs)
        for i in range(runs):
            start = time.perf_counter()
            call()
            times[i] = (time.perf_counter() - start) * 1000.0
        return times


def _merge_samples(per_sample, failed) -> tuple[list[np.ndarray] | None, np.ndarray]:
    """Per-sample outputs (None where the sample failed) as one array per output, NaN rows for the failures."""
    good = next((o for o in per_sample if o is not None), None)
    if good is None:
        return None, failed
    filler = [np.full_like(np.asarray(o, np.float64), np.nan) for o in good]
    outputs = [np.concatenate([np.asarray(o[k], np.float64) if o is not None else filler[k]
                               for o in per_sample], axis=0) for k in range(len(good))]
    return outputs, failed


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:199] + "…"


def _convert_variants(model, variants, representative_data, verbose, reference: str = "keras") -> dict:
    if isinstance(variants, str):
        variants = (variants,)
    if not isinstance(variants, (list, tuple)):
        raise TypeError(f"variants must be a list of export modes (e.g. ['float', 'int8']). "
                        f"Received: variants={short_repr(variants)}")
    variants = tuple(variants)
    if not variants:
        raise ValueError("variants is empty. Pass at least one of " + ", ".join(map(repr, export_mode_names())) + ".")
    for variant in variants:
        get_export_mode(variant, "variants value")
    needs_data = [v for v in variants if get_export_mode(v).needs_data]
    if representative_data is not None and not needs_data:
        raise ValueError(f"representative_data calibrates the integer variants, and none of variants "
                         f"{list(variants)} needs calibration data: add one that does, or drop representative_data.")
    missing = needs_data
    if missing and representative_data is None:
        raise ValueError(f"variant {missing[0]!r} needs representative_data (calibration inputs, e.g. "
                         f"x_train[:300]): pass it or drop {missing[0]!r} from variants.")
    models = {reference: model}
    for variant in variants:
        start = time.perf_counter()
        data = representative_data if variant in needs_data else None
        models[f"tflite_{variant}"] = convert(model, variant, data)
        if verbose:
            with verbosity(True):
                logger.info(f"evaluate: converted {variant} in {time.perf_counter() - start:.1f} s")
    return models


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------


def evaluate(
    models,
    data,
    labels=None,
    *,
    metrics=("accuracy",),
    reference: str | None = None,
    latency: bool = True,
    num_threads: int | None = None,
    batch_size: int | None = None,
    max_samples: int | None = None,
    variants: Sequence[str] = _DEFAULT_VARIANTS,
    representative_data=None,
    latency_runs: int = 50,
    verbose: bool = False,
    output: int | str = 0,
    isolate: bool = False,
) -> Report:
    """Runs models on the same data and compares them: metrics, agreement, size and speed.

    Every model runs on all samples (``max_samples`` caps them). Per model (one row of the report):

    * metrics on the output chosen by ``output`` (the first by default) against ``labels`` (skipped when ``labels`` is None):
      ``"accuracy"`` (integer or one-hot labels; a one-unit output is binary, thresholded at 0.5),
      ``"top5"``/``"top_k:K"`` (ties count as in the top K, like ``tf.math.in_top_k``),
      ``"mse"``, ``"mae"``, or any callable ``f(y_true, y_pred) -> float`` (column named by its
      ``__name__``);
    * agreement with the reference model's predictions: ``agreement`` = share of samples whose
      top-1 class (argmax of the chosen output's last axis) equals the reference's (None unless that
      output is classifier-shaped, i.e. has a class axis of size ≥ 2);
      ``sqnr_db = 10·log10(Σ ref² / Σ (ref − out)²)`` over **all outputs** flattened and
      concatenated (inf when identical), and ``sqnr_db_per_output``: the same per output, in output
      order; ``max_abs_diff = max |ref − out|``;
    * ``errors``: the samples the model failed on (an interpreter error, a TensorFlow error), and
      ``error``: the first message (None when none failed). A failing sample does not abort the
      report: every figure above is taken over the samples both this model and the reference ran
      (all None when none did). A kernel that aborts the process (a failed ``TFLITE_CHECK``) cannot
      be caught in this process: pass ``isolate=True`` to run the TFLite models in a worker
      process, sample by sample (:func:`tfq.convert` checks its own models that way);
    * ``size`` in bytes: the flatbuffer length for TFLite rows (``size_kind="flatbuffer"``),
      ``count_params() × 4`` for Keras rows (``size_kind="params_fp32"``); ``size_ratio`` = size /
      reference size; ``gzip_size``: the same bytes gzip-compressed (level 9), how pruned and
      clustered models ship; ``weight_sparsity`` (zeros / weights) and ``max_distinct_per_channel``
      (the most distinct values in one output channel) of the weight tensors (TFLite: as stored;
      Keras: the weighted layers' kernels, pruning/clustering wrappers applied); ``weight_bytes``: the
      bytes the weight tensors take as stored (INT4 packed two per byte; Keras: kernels × 4),
      ``weight_bits_per_layer``: ``{weight tensor: bits per stored value}`` (4 for INT4, 8 for INT8,
      16/32 for float16/float32; Keras: 32 per kernel) and ``weight_bits``: its summary, e.g.
      ``"4×3 8×1"`` (three tensors at 4 bits, one at 8);
    * ``latency_p50_ms``/``latency_p90_ms``: batch-1 invocations after 5 warm-up runs. TFLite rows
      time ``interpreter.invoke()`` with ``num_threads``; Keras rows time an eager
      ``model(x[:1], training=False)`` call (Python and TensorFlow overhead included, so it is a
      baseline, not a like-for-like comparison with the interpreter);
    * ``throughput``: samples per second of the batched prediction run, first batch included
      (Keras rows after a one-batch warm-up that traces the predict function; TFLite models whose
      batch axis is fixed run one sample at a time); ``num_threads``: the interpreter threads used.

    Multi-output models: outputs are compared in the Keras model's order (TFLite outputs are
    reordered by their signature, since ``get_output_details()`` may list them differently; dict
    outputs are ordered by key).

    Args:
        models: a dict ``name -> Keras model | SavedModel directory | TFLite bytes | .tflite path``
            (a ``.keras`` path is loaded as a Keras model; a float ``.tflite`` is a TFLite model like
            any other, and may be the reference). Or a single Keras model or SavedModel directory: it
            is converted with :func:`tfq.convert` into each of ``variants`` and the report has a
            ``"keras"`` (or ``"saved_model"``) row and one ``"tflite_<variant>"`` row per variant; the
            bytes are in ``report.converted``.
        data: inputs: an array, a list of arrays (one per input, in ``model.inputs`` order) or a
            dict by input name.
        labels: targets for the metrics (first output), one per sample; None skips the metrics.
        metrics: metric names or callables (see above).
        reference: the name in ``models`` all rows are compared with. Default: the first Keras
            model, else the first entry.
        latency: measure batch-1 latency.
        num_threads: TFLite interpreter threads (None: one per CPU core this process may use).
        batch_size: batch size of the prediction run (default 64).
        max_samples: use only the first ``max_samples`` samples (and labels).
        variants: conversion modes for the single-model form.
        representative_data: calibration inputs for the ``"int8"``/``"int16x8"`` variants.
        latency_runs: timed runs per model.
        verbose: print progress.
        output: the output metrics and agreement read: an index in output order, or a name (a Keras
            output name, or a signature output key of a TFLite model or SavedModel, e.g.
            ``"output_1"``) of any of the models. Default: the first output.
        isolate: run TFLite models in a worker process, one sample at a time, so a kernel that
            aborts counts as a failed sample instead of ending this process (slower: for models
            you suspect). Latency is still timed here, on a sample that ran.

    Returns:
        A :class:`~tfq.analysis.report.Report`; ``print(report)`` shows the markdown table.

    Raises:
        ValueError: empty data, data that does not fit a model input, labels whose length differs
            from the number of samples, an unknown metric or reference, a corrupt ``.tflite``,
            int8 variants without ``representative_data``.
        FileNotFoundError: a ``.tflite`` path that does not exist.
        TypeError: a model that is neither Keras nor TFLite.

    Example:
        >>> report = tfq.evaluate({"float": model, "int8": int8_bytes}, x_test, y_test,
        ...                       metrics=("accuracy", "top_k:3"))          # doctest: +SKIP
        >>> report.rows[1]["agreement"], report.rows[1]["sqnr_db"]          # doctest: +SKIP
        (0.997, 31.2)
    """
    resolved_metrics = _resolve_metrics(metrics)
    for label, value in (("batch_size", batch_size), ("max_samples", max_samples), ("num_threads", num_threads)):
        if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{label} must be a positive integer or None. Received: {label}={value!r}")
    for label, value in (("latency", latency), ("verbose", verbose)):
        check_bool(label, value)
    if isinstance(latency_runs, bool) or not isinstance(latency_runs, (int, np.integer)) or latency_runs < 1:
        raise ValueError(f"latency_runs must be a positive integer. Received: latency_runs={latency_runs!r}")
    arrays, names = _as_arrays(data)
    num_samples = len(arrays[0])
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim == 0 or len(labels) != num_samples:
            got = "a scalar" if labels.ndim == 0 else f"{len(labels)} labels"
            raise ValueError(f"labels must have one entry per sample: the data has {num_samples} samples, "
                             f"received {got}. Pass labels aligned with the data.")
    if max_samples is not None and max_samples < num_samples:
        arrays = [a[:max_samples] for a in arrays]
        labels = labels[:max_samples] if labels is not None else None
        num_samples = max_samples
    _check_finite(arrays, names)
    batch_size = batch_size or _DEFAULT_BATCH_SIZE

    check_bool("isolate", isolate)
    if isinstance(output, bool) or not isinstance(output, (int, np.integer, str)):
        raise TypeError(f"output must be an output index or name. Received: output={output!r}")
    converted = {}
    if is_tf_keras_model(models):
        models = load_keras_model(models)
    if isinstance(models, (str, os.PathLike)) and Path(models).is_dir():
        reference_runner = _Runner("saved_model", SavedModelPath(str(models)), None)
        reference_runner.order_inputs(arrays, names, names is not None)  # data that does not fit fails first
        models = _convert_variants(SavedModelPath(str(models)), variants, representative_data, verbose,
                                   reference="saved_model")
        converted = {k: v for k, v in models.items() if isinstance(v, bytes)}
    elif isinstance(models, keras.Model):
        # Fail on data that does not fit before spending time on conversions.
        _keras_input_order("keras", models, arrays, names)
        models = _convert_variants(models, variants, representative_data, verbose)
        converted = {k: v for k, v in models.items() if isinstance(v, bytes)}
    elif not isinstance(models, Mapping):
        raise TypeError(f"models must be a dict name -> model, a single Keras model or a SavedModel directory. "
                        f"Received: {type(models).__name__}")
    else:
        default_variants = isinstance(variants, (list, tuple)) and tuple(variants) == _DEFAULT_VARIANTS
        for label, value, unset in (("variants", variants, default_variants),
                                    ("representative_data", representative_data, representative_data is None)):
            if not unset:
                raise ValueError(f"{label} applies to a single Keras model, which evaluate converts into each "
                                 f"variant; models is a dict of models already: drop {label}, or pass the Keras "
                                 f"model alone. Received: {label}={short_repr(value)}")
    if not models:
        raise ValueError("models is empty. Pass a dict name -> Keras model / TFLite bytes / .tflite path.")
    num_threads = available_cores() if num_threads is None else int(num_threads)
    runners = [_Runner(str(name), model, num_threads, isolate) for name, model in models.items()]
    if reference is None:
        reference = next((r.name for r in runners if r.kind in ("keras", "saved_model")), runners[0].name)
    elif reference not in [r.name for r in runners]:
        raise ValueError(f"reference={reference!r} is not in models ({[r.name for r in runners]}). "
                         f"Pass one of those names.")
    # List data is in model.inputs order: name it after the Keras model so TFLite inputs match by name.
    strict = names is not None
    if names is None and len(arrays) > 1:
        keras_runner = next((r for r in runners if r.kind == "keras"), None)
        names = keras_runner.keras_input_names() if keras_runner is not None else None
        names = names if names is not None and len(names) == len(arrays) else None
    ordered = {r.name: r.order_inputs(arrays, names, strict) for r in runners}

    runners.sort(key=lambda r: r.name != reference)  # the reference runs first
    output_index = _output_index(output, runners)
    rows, ref_outputs, ref_failed, ref_size = {}, None, None, None
    for runner in runners:
        start = time.perf_counter()
        inputs = ordered[runner.name]
        if runner.kind == "keras":  # tracing the predict function is a one-time cost, not throughput
            runner.predict([a[:batch_size] for a in inputs], batch_size)
        t0 = time.perf_counter()
        outputs, failed = runner.predict(inputs, batch_size, isolate)
        elapsed = time.perf_counter() - t0
        size, size_kind = runner.size
        if ref_failed is None:
            ref_outputs, ref_failed, ref_size = outputs, failed, size
        row = {"name": runner.name, "kind": runner.kind, "num_samples": num_samples}
        ok = ~failed & ~ref_failed
        if outputs is not None and output_index >= len(outputs):
            raise ValueError(f"output={output!r} is beyond models[{runner.name!r}]'s {len(outputs)} output(s). "
                             f"Pass an index below {len(outputs)}.")
        usable = outputs is not None and ref_outputs is not None and bool(ok.any())
        if labels is not None:
            for metric_name, fn in resolved_metrics:
                row[metric_name] = float(fn(labels[ok], outputs[output_index][ok])) if usable else None
        if usable:
            row.update(_agreement(runner.name, reference, [o[ok] for o in ref_outputs], [o[ok] for o in outputs],
                                  output_index))
        else:
            row.update(agreement=None, sqnr_db=None, max_abs_diff=None, sqnr_db_per_output=None)
        row.update(errors=int(failed.sum()), error=runner.error)
        row.update(size=size, size_kind=size_kind, size_ratio=size / ref_size if ref_size else None)
        row.update(runner.compression())
        first_ok = int(np.argmax(~failed)) if (~failed).any() else None
        if latency and first_ok is not None:
            times = runner.latency_ms([a[first_ok:] for a in inputs], latency_runs)
            row.update(latency_p50_ms=float(np.percentile(times, 50)), latency_p90_ms=float(np.percentile(times, 90)))
        else:
            row.update(latency_p50_ms=None, latency_p90_ms=None)
        row["throughput"] = num_samples / elapsed if elapsed > 0 else None
        row["num_threads"] = num_threads if runner.kind == "tflite" else None
        rows[runner.name] = row
        if row["errors"]:
            logger.warning(f"evaluate: {runner.name} failed on {row['errors']} sample(s): {runner.error}")
        if verbose:
            with verbosity(True):
                logger.info(f"evaluate: {runner.name} done in {time.perf_counter() - start:.1f} s")
    ordered_rows = [rows[str(name)] for name in models]
    metric_names = [n for n, _ in resolved_metrics] if labels is not None else []
    return Report(ordered_rows, reference=reference, metrics=metric_names, num_samples=num_samples,
                  converted=converted)


def _check_finite(arrays, names) -> None:
    """Refuses NaN/Inf samples in one line naming them (as convert does): their outputs would enter every figure."""
    bad = np.zeros(len(arrays[0]), bool)
    for array in arrays:
        if np.asarray(array).dtype.kind in "fc" and len(array):
            bad |= ~np.isfinite(np.asarray(array)).reshape(len(array), -1).all(axis=1)
    if bad.any():
        indices = np.flatnonzero(bad)
        shown = ", ".join(map(str, indices[:10])) + (", …" if len(indices) > 10 else "")
        raise ValueError(f"data has {len(indices)} sample(s) with NaN or Inf (indices {shown}): every figure of the "
                         f"report would include their outputs. Drop or fix them first, e.g. "
                         f"x[np.isfinite(x).reshape(len(x), -1).all(axis=1)].")




def _output_index(output, runners) -> int:
    """The index of ``output`` (an index, or a name any of the models gives an output)."""
    if not isinstance(output, str):
        if output < 0:
            raise ValueError(f"output must be a non-negative output index or a name. Received: output={output}")
        return int(output)
    known = {}
    for runner in runners:
        for i, name in enumerate(runner.output_names or []):
            if name is not None:
                known.setdefault(name, i)
    if output not in known:
        raise ValueError(f"output={output!r} is not an output name of these models ({sorted(known)}). Pass one of "
                         f"those names, or an index.")
    return known[output]


def _agreement(name: str, reference: str, ref_outputs, outputs, output_index: int = 0) -> dict:
    ref_shapes = [o.shape for o in ref_outputs]
    shapes = [o.shape for o in outputs]
    if ref_shapes != shapes:
        raise ValueError(f"models[{name!r}] gives outputs of shapes {shapes}; the reference {reference!r} gives "
                         f"{ref_shapes}. Compare models of the same network, or pick another reference.")
    chosen_ref, chosen = ref_outputs[output_index], outputs[output_index]
    agreement = None
    if chosen.ndim >= 2 and chosen.shape[-1] >= 2:
        agreement = float(np.mean(chosen.argmax(-1) == chosen_ref.argmax(-1)))
    diff = _flat(ref_outputs) - _flat(outputs)
    return {"agreement": agreement, "sqnr_db": sqnr_db(ref_outputs, outputs),
            "max_abs_diff": float(np.max(np.abs(diff))) if diff.size else 0.0,
            "sqnr_db_per_output": [sqnr_db(r, o) for r, o in zip(ref_outputs, outputs)]}


# --------------------------------------------------------------------------------------------
# layer_errors
# --------------------------------------------------------------------------------------------


def _debug_interpreter(content: bytes, num_threads):
    """An interpreter keeping every intermediate tensor, without delegates (so all are computed)."""
    kwargs = {"model_content": content, "num_threads": num_threads, "experimental_preserve_all_tensors": True}
    try:
        from ai_edge_litert.interpreter import OpResolverType
    except ImportError:  # pragma: no cover - LiteRT is a core dependency
        import tensorflow as tf

        OpResolverType = tf.lite.experimental.OpResolverType
    kwargs["experimental_op_resolver_type"] = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "preserve_all_tensors is for debugging": that is the point
        interpreter = interpreter_class()(**kwargs)
    interpreter.allocate_tensors()
    return interpreter


def _all_tensors(content: bytes, arrays, names, wanted, num_threads, where) -> dict[int, np.ndarray]:
    """Runs ``arrays`` one sample at a time; returns ``{tensor index: (N, *shape) values}``."""

    interpreter = _debug_interpreter(content, num_threads)
    input_names, _ = _signature_io(interpreter)
    details = interpreter.get_input_details()
    ordered = _tflite_input_order(where, input_names, arrays, names, strict=False)
    if len(ordered) != len(details):
        raise ValueError(f"{where} has {len(details)} input(s); the data has {len(ordered)} array(s). "
                         f"Pass one array per model input.")
    for array, detail in zip(ordered, details):
        expected = tuple(int(v) for v in detail["shape"][1:])
        if tuple(array.shape[1:]) != expected:
            raise ValueError(f"{where} input {detail['name']!r} expects samples of shape {expected}; received "
                             f"{tuple(array.shape[1:])} (data shape {array.shape}). Reshape the data.")
        if int(detail["shape"][0]) != 1:
            interpreter.resize_tensor_input(detail["index"], [1, *expected])
    interpreter.allocate_tensors()
    details = interpreter.get_input_details()
    values: dict[int, list[np.ndarray]] = {i: [] for i in wanted}
    for n in range(len(ordered[0])):
        for array, detail in zip(ordered, details):
            interpreter.set_tensor(detail["index"], _quantize_input(array[n:n + 1], detail))
        interpreter.invoke()
        for i in wanted:
            values[i].append(np.array(interpreter.get_tensor(i)))
    return {i: np.stack(v) for i, v in values.items()}


def _layer_tokens(tensor_name: str, layer_names: set[str]) -> frozenset[str]:
    """Keras layer names in a converter tensor name like ``model_1/conv1_1/Relu;model_1/bn1_1/add``.

    Each ``;``-separated part is a TF name-scope path; a scope component is a layer when it equals
    a layer name, possibly with the ``_<n>`` suffix TF adds to reused scopes. The last component is
    the op, not a layer.
    """
    tokens = set()
    for part in tensor_name.split(";"):
        for component in part.split("/")[:-1]:
            if component in layer_names:
                tokens.add(component)
            stripped = re.sub(r"_\d+$", "", component)
            if stripped in layer_names:
                tokens.add(stripped)
    return frozenset(tokens)


def _keras_layer_names(model) -> set[str]:
    names = set()
    for layer in model.layers:
        names.add(layer.name)
        if isinstance(layer, keras.Model):
            names |= _keras_layer_names(layer)
    return names - {model.name}


def _match_tensors(qinfo, finfo, qinterp, finterp, layer_names) -> tuple[dict[int, tuple[int, str]], list[dict]]:
    """Pairs each quantized activation of the INT8 model with a float tensor; see :func:`layer_errors`."""
    float_tensors = [t for t in finfo.tensors if not t.is_constant and t.dtype in _FLOAT_DTYPES]
    by_name = {t.name: t for t in float_tensors}
    float_tokens = {t.index: _layer_tokens(t.name, layer_names) for t in float_tensors}
    producers = {o: op for op in qinfo.ops for o in op.outputs}
    consumers: dict[int, list] = {}
    for op in qinfo.ops:
        for i in op.inputs:
            consumers.setdefault(i, []).append(op)
    # Graph inputs and outputs, paired through the signature keys (else by position).
    q_in_names, q_out_order = _signature_io(qinterp)
    f_in_names, f_out_order = _signature_io(finterp)
    q_inputs, f_inputs = list(qinfo.inputs), list(finfo.inputs)
    q_outputs, f_outputs = list(qinfo.outputs), list(finfo.outputs)
    if q_out_order and f_out_order:
        q_outputs = [q_outputs[i] for i in q_out_order]
        f_outputs = [f_outputs[i] for i in f_out_order]
    partners: dict[int, int] = {}  # INT8-model tensor -> float-model tensor, float graph I/O included
    if q_in_names and f_in_names and sorted(q_in_names) == sorted(f_in_names):
        f_by_key = dict(zip(f_in_names, f_inputs))
        partners.update({q: f_by_key[k] for q, k in zip(q_inputs, q_in_names)})
    elif len(q_inputs) == len(f_inputs):
        partners.update(zip(q_inputs, f_inputs))
    if len(q_outputs) == len(f_outputs):
        partners.update(zip(q_outputs, f_outputs))

    def find(t) -> tuple[int | None, str]:
        if t.index in partners:
            return partners[t.index], "io"
        op = producers.get(t.index)
        if op is not None and op.type == "QUANTIZE" and op.inputs and op.inputs[0] in partners:
            # a quantized graph input, or an int8 -> int8 requantization: same values, new scale
            return partners[op.inputs[0]], "io" if op.inputs[0] in q_inputs else "requantize"
        for op in consumers.get(t.index, []):
            if op.type == "DEQUANTIZE" and op.outputs and op.outputs[0] in partners:
                return partners[op.outputs[0]], "io"  # the tensor behind a float graph output
        same = by_name.get(t.name)
        if same is None:  # LiteRT's quantizer names the QUANTIZE of a float op's output "<name>_quantized"
            same = by_name.get(re.sub(r"_quantized$", "", t.name))
        if same is not None:
            return same.index, "name"
        tokens = _layer_tokens(t.name, layer_names)
        scored = sorted(((len(tokens & float_tokens[f.index]), f.index) for f in float_tensors
                         if tuple(f.shape[1:]) == tuple(t.shape[1:]) and tokens & float_tokens[f.index]),
                        reverse=True)
        if scored and (len(scored) == 1 or scored[0][0] > scored[1][0]):
            return scored[0][1], "layer"
        if scored:
            return None, "ambiguous: several float tensors of the same layers and shape"
        return None, "no float tensor of the same layers and shape"

    matches, skipped = {}, []
    for t in sorted(qinfo.tensors, key=lambda t: _graph_position(qinfo, t.index)):
        if t.is_constant or not t.is_quantized or t.dtype not in _QUANTIZED_DTYPES:
            continue
        partner, how = find(t)
        if partner is not None and tuple(finfo.tensors[partner].shape[1:]) != tuple(t.shape[1:]):
            partner, how = None, f"shape {tuple(t.shape)} differs from its float partner's"
        if partner is None:
            skipped.append({"tensor": t.name, "reason": how})
        else:
            partners[t.index] = partner
            matches[t.index] = (partner, how)
    return matches, skipped


def _broadcast_qparams(tensor, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero-points shaped to broadcast over ``(N, *tensor.shape)`` values."""
    scales = np.asarray(tensor.scales, np.float64)
    zero_points = np.asarray(tensor.zero_points or (0,) * len(scales), np.float64)
    if len(scales) > 1:  # per-axis: along the quantized dimension (+1 for the sample axis)
        shape = [1] * ndim
        shape[tensor.quantized_dimension + 1] = len(scales)
        return scales.reshape(shape), zero_points.reshape(shape)
    return scales, zero_points


def _dequantize(values: np.ndarray, tensor) -> np.ndarray:
    scales, zero_points = _broadcast_qparams(tensor, values.ndim)
    return (values.astype(np.float64) - zero_points) * scales


def _fake_quantize(x: np.ndarray, tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(x̃, clipped)``: ``x`` quantized with the tensor's own parameters and back, and where it clipped."""
    info = np.iinfo(tensor.dtype.lower())
    scales, zero_points = _broadcast_qparams(tensor, x.ndim)
    q = round_half_away(x / scales) + zero_points  # tfq's one tie rule (tfq.ops)
    clipped = (q < info.min) | (q > info.max)
    return (np.clip(q, info.min, info.max) - zero_points) * scales, clipped


def layer_errors(
    keras_model,
    int8_tflite,
    data,
    *,
    max_samples: int = 64,
    rmse_outlier: float = 0.7,
    sqnr_outlier_db: float = 10.0,
    num_threads: int | None = None,
) -> LayerErrorReport:
    """Error of every quantized activation of an INT8 (or int16x8) model against the float model.

    Both the INT8 model and the float TFLite model (``tfq.convert(keras_model, "float")``) run on
    the first ``max_samples`` samples with ``experimental_preserve_all_tensors=True`` and without
    delegates, so every intermediate tensor can be read. Each quantized activation ``q`` (scale
    ``s``, zero-point ``z``, integer range ``[qmin, qmax]``) is dequantized, ``x̂ = s·(q − z)``,
    and compared with the float tensor ``x`` it stands for::
        rmse = sqrt(mean((x̂ − x)²))          rmse_over_scale = rmse / s
        sqnr_db = 10·log10(Σ x² / Σ (x̂ − x)²)

    These are accumulated errors: the INT8 model runs end to end, so a tensor's error includes that
    of every layer before it (and of the weights' quantization). The tensor's own share — the error
    of quantizing the exact float values with its scale and zero-point — is reported too::
        x̃ = s·(clip(round(x/s) + z, qmin, qmax) − z)
        range_rmse_over_scale = sqrt(mean((x̃ − x)²)) / s     range_sqnr_db = SQNR of x̃
        clipped_fraction = share of values outside the range

    Rounding alone gives ``range_rmse_over_scale ≈ 1/√12 ≈ 0.289`` (uniform error over one
    step), the rule of thumb of TFLite's ``QuantizationDebugger``. A tensor is flagged ``outlier``
    when ``range_rmse_over_scale > rmse_outlier`` (its range is too narrow: values clip) or
    ``sqnr_db < sqnr_outlier_db`` (the INT8 values are mostly noise, e.g. a range widened by a
    calibration outlier). The accumulated ``rmse_over_scale`` is not used for the flag: it grows
    with depth in healthy models (measured 0.93 on a small regression head). Downstream of a broken
    layer the SQNR stays low, so the first outlier in graph order is the one to look at.

    Tensor matching (the converter names tensors after the Keras layers' name scopes, but fuses
    different ops in the two models, so names rarely agree exactly), in this order: graph inputs
    and outputs (and the QUANTIZE/DEQUANTIZE tensors next to them) pair through the signature;
    an int8 → int8 requantization takes its input's partner; an identical name; then the float
    tensor of the same shape sharing the most Keras layer names (e.g. ``m/conv1_1/Relu`` in the
    INT8 model, where BatchNorm is folded into ``conv1``, and
    ``m/relu1_1/Relu;m/bn1_1/…;m/conv1_1/…`` in the float model). Tensors without a unique partner
    are left out and listed in ``report.skipped`` with the reason.
    ``tf.lite.experimental.QuantizationDebugger`` is not used: it debugs only models it converts
    itself, with the converter's own calibration, not an INT8 file made by :func:`tfq.convert`.

    Args:
        keras_model: the float model the INT8 model was made from: a Keras model, or (for a model
            quantized below Keras, :mod:`tfq.export.tflite_frontend`) the float ``.tflite`` (bytes or
            path), the SavedModel directory or the ``TFSMLayer`` model. Then the float ``.tflite`` is
            the reference and tensors pair by name (LiteRT's quantizer keeps them): a per-op error.
        int8_tflite: the quantized model (bytes or ``.tflite`` path).
        data: inputs (array, list in ``model.inputs`` order, or dict by input name).
        max_samples: samples used (each runs through both models one at a time).
        rmse_outlier: flag threshold on ``range_rmse_over_scale``.
        sqnr_outlier_db: flag threshold on ``sqnr_db``.
        num_threads: interpreter threads.

    Returns:
        A :class:`~tfq.analysis.report.LayerErrorReport`: one dict per matched quantized activation, in
        graph order, with ``tensor``, ``op`` (the op type producing it), ``float_tensor``,
        ``match`` (``"io"``, ``"requantize"``, ``"name"`` or ``"layer"``), ``shape``, ``dtype``,
        ``scale``, ``zero_point``, ``rmse``, ``rmse_over_scale``, ``sqnr_db``, ``max_abs_error``,
        ``mean_error``, ``range_rmse_over_scale``, ``range_sqnr_db``, ``clipped_fraction``,
        ``outlier``, and the attribution of the tensor's own error: ``clip_rmse_over_scale`` and
        ``rounding_rmse_over_scale`` (range clipping vs rounding, their squares add up to
        ``range_rmse_over_scale²``), ``saturated`` / ``saturated_fraction`` (outputs of the op whose
        int32 → int8 requantization saturated, counted by :mod:`tfq.reference`'s bit-exact executor;
        None where it does not apply) and ``error_source`` (``"saturation"``, ``"range clipping"``
        or ``"rounding"``).

    Raises:
        TypeError: ``keras_model`` is not a Keras model, a float ``.tflite`` or a SavedModel directory.
        ValueError: the TFLite model is corrupt or has no quantized activations; data that is
            empty or does not fit the model.
        FileNotFoundError: a ``.tflite`` path that does not exist.

    Example:
        >>> errors = tfq.layer_errors(model, int8_bytes, x_test[:64])     # doctest: +SKIP
        >>> print(errors)                                                  # doctest: +SKIP
        >>> errors.outliers[0]["tensor"]                                   # doctest: +SKIP
    """

    below = tflite_frontend.is_tflite_input(keras_model) or (
        isinstance(keras_model, (str, os.PathLike)) and is_below_keras(keras_model))
    if not below and is_tf_keras_model(keras_model):
        keras_model = load_keras_model(keras_model)
    if not below and not isinstance(keras_model, keras.Model):
        raise TypeError(f"keras_model must be the float model the INT8 model was made from: a Keras model, a float "
                        f".tflite (bytes or path) or a SavedModel directory. Received: {type(keras_model).__name__}")
    below = below or tflite_frontend.has_tfsm_layer(keras_model)
    if not isinstance(max_samples, (int, np.integer)) or isinstance(max_samples, bool) or max_samples < 1:
        raise ValueError(f"max_samples must be a positive integer. Received: max_samples={max_samples!r}")
    qcontent = load_tflite_bytes(int8_tflite)
    qinfo = inspect_tflite(qcontent)
    if not any(not t.is_constant and t.is_quantized and t.dtype in _QUANTIZED_DTYPES for t in qinfo.tensors):
        raise ValueError("the TFLite model has no quantized activation tensors: it is not an INT8/int16x8 model. "
                         "Pass the output of tfq.convert(model, 'int8', representative_data).")
    arrays, names = _as_arrays(data)
    if below:  # the float .tflite the quantized model was made from: tensors match by name
        fcontent = tflite_frontend.float_tflite(keras_model)
        arrays = [a[:max_samples] for a in arrays]
        layer_names = set()
    else:
        arrays = [a[:max_samples] for a in _keras_input_order("keras_model", keras_model, arrays, names)]
        names = [spec[0] for spec in model_input_specs(keras_model)]
        fcontent = convert(keras_model, "float")
        layer_names = _keras_layer_names(keras_model)
    finfo = inspect_tflite(fcontent)
    matches, skipped = _match_tensors(qinfo, finfo, _debug_interpreter(qcontent, num_threads),
                                      _debug_interpreter(fcontent, num_threads), layer_names)
    qvalues = _all_tensors(qcontent, arrays, names, sorted(matches), num_threads, "the INT8 model")
    fvalues = _all_tensors(fcontent, arrays, names, sorted({f for f, _ in matches.values()}), num_threads,
                           "the float model")
    producers = {o: op.type for op in qinfo.ops for o in op.outputs}
    saturation = _reference_saturation(qcontent, arrays, names)
    rows = []
    for index, (f_index, how) in matches.items():  # in graph order
        tensor = qinfo.tensors[index]
        x = fvalues[f_index].astype(np.float64)
        x_hat = _dequantize(qvalues[index], tensor)
        x_tilde, clipped = _fake_quantize(x, tensor)
        err = x_hat - x
        scale = float(tensor.scales[0]) if len(tensor.scales) == 1 else float(np.mean(tensor.scales))
        rmse = float(np.sqrt(np.mean(err ** 2)))
        range_rmse = float(np.sqrt(np.mean((x_tilde - x) ** 2)))
        row = {
            "tensor": tensor.name,
            "op": producers.get(index, "INPUT"),
            "float_tensor": finfo.tensors[f_index].name,
            "match": how,
            "shape": list(tensor.shape),
            "dtype": tensor.dtype.lower(),
            "scale": scale,
            "zero_point": int(tensor.zero_points[0]) if tensor.zero_points else 0,
            "rmse": rmse,
            "rmse_over_scale": rmse / scale if scale > 0 else math.inf,
            "sqnr_db": sqnr_db(x, x_hat),
            "max_abs_error": float(np.max(np.abs(err))),
            "mean_error": float(np.mean(err)),
            "range_rmse_over_scale": range_rmse / scale if scale > 0 else math.inf,
            "range_sqnr_db": sqnr_db(x, x_tilde),
            "clipped_fraction": float(np.mean(clipped)),
        }
        row.update(_attribution(x, x_tilde, clipped, scale, saturation.get(index)))
        row["outlier"] = bool(row["range_rmse_over_scale"] > rmse_outlier or row["sqnr_db"] < sqnr_outlier_db)
        rows.append(row)
    return LayerErrorReport(rows, rmse_outlier=rmse_outlier, sqnr_outlier_db=sqnr_outlier_db,
                            num_samples=len(arrays[0]), skipped=skipped)


def _reference_saturation(content: bytes, arrays, names) -> dict:
    """Tensor index → (saturated outputs, outputs) of its requantizing op, from tfq.reference's executor.

    Empty when the reference executor cannot run the model (an op it has no kernel for).
    """

    runner = TFLiteModel(content)
    try:
        ordered = runner._prepare(dict(zip(names, arrays))) if runner.input_names and len(arrays) > 1 else arrays
        graph = as_graph(content)
        entries = explain(graph, inputs=ordered)
    except (UnsupportedOpError, ValueError, TypeError):
        return {}
    return {graph.operators[e.index].outputs[0]: (e.saturated, e.num_outputs) for e in entries
            if e.saturated is not None}


def _attribution(x, x_tilde, clipped, scale: float, saturation) -> dict:
    """A tensor's own quantization error split into range clipping and rounding; saturation from the trace.

    ``clip_rmse_over_scale² + rounding_rmse_over_scale² = range_rmse_over_scale²``: the squared error
    of quantizing the float values ``x`` with this tensor's scale, summed over the values outside the
    representable range (clipping) and inside it (rounding). ``saturated_fraction`` is the share of
    the op's outputs whose int32 → int8 requantization saturated in the integer model (None when the
    op does not requantize or tfq.reference cannot run the model). ``error_source`` names the larger
    share: ``"saturation"`` (clipping, and the integer op saturated), ``"range clipping"`` or
    ``"rounding"``.
    """
    sq = (x_tilde - x) ** 2
    n = max(sq.size, 1)
    clip = float(np.sqrt(np.sum(sq[clipped]) / n)) if np.any(clipped) else 0.0
    rounding = float(np.sqrt(np.sum(sq[~clipped]) / n))
    saturated = saturated_fraction = None
    if saturation is not None:
        saturated, total = saturation
        saturated_fraction = saturated / max(total, 1)
    if clip > rounding:
        source = "saturation" if saturated_fraction else "range clipping"
    else:
        source = "rounding"
    return {
        "clip_rmse_over_scale": clip / scale if scale > 0 else math.inf,
        "rounding_rmse_over_scale": rounding / scale if scale > 0 else math.inf,
        "saturated": saturated,
        "saturated_fraction": saturated_fraction,
        "error_source": source,
    }


def _graph_position(info, index: int) -> int:
    """Index of the op producing ``index`` (graph inputs first)."""
    for op in info.ops:
        if index in op.outputs:
            return op.index
    return -1
