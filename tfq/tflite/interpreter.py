"""Running TFLite models: LiteRT's interpreter, batched, with quantized I/O handled.

``ai_edge_litert`` is the interpreter; ``tf.lite.Interpreter`` (deprecated) is used only when
LiteRT is not installed.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tfq.core.input_order import order_by_name
from tfq.numerics.ops import quantize_to

__all__ = ["TFLiteModel", "load_tflite_bytes", "interpreter_class"]


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def interpreter_class():
    """The Interpreter class: LiteRT's, or TF's when LiteRT is missing."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - LiteRT is a core dependency
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter


def load_tflite_bytes(model) -> bytes:
    """Bytes of a TFLite model given as bytes or a path; validates the flatbuffer identifier.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the content is not a TFLite flatbuffer.
    """
    if isinstance(model, (bytes, bytearray, memoryview)):
        content = bytes(model)
        where = "the given bytes"
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"TFLite model not found: {str(path)!r}. Check the path (give a .tflite file).")
        content = path.read_bytes()
        where = repr(str(path))
    else:
        raise TypeError(f"expected TFLite bytes or a .tflite path. Received: {type(model).__name__}")
    if len(content) < 8 or content[4:8] != b"TFL3":
        raise ValueError(
            f"{where} is not a TFLite model (no 'TFL3' flatbuffer identifier; {len(content)} bytes): the file is "
            f"corrupt or of another format. Re-export it with tfq.convert."
        )
    return content


def _quantize_input(x: np.ndarray, detail: dict) -> np.ndarray:
    dtype = detail["dtype"]
    if np.issubdtype(dtype, np.integer) and np.issubdtype(np.asarray(x).dtype, np.floating):
        scale, zero_point = detail["quantization"]
        if scale == 0:
            return np.asarray(x).astype(dtype)
        return quantize_to(x, scale, zero_point, dtype)
    return np.asarray(x).astype(dtype)


def _dequantize_output(y: np.ndarray, detail: dict) -> np.ndarray:
    if np.issubdtype(detail["dtype"], np.integer):
        scale, zero_point = detail["quantization"]
        if scale != 0:
            return ((y.astype(np.float32) - zero_point) * scale).astype(np.float32)
    return y.astype(np.float32) if np.issubdtype(y.dtype, np.floating) else y


class TFLiteModel:
    """A TFLite model ready to run on numpy data.

    Inputs given as float are quantized with the input tensor's scale/zero-point when the
    model has integer inputs; integer outputs are dequantized. When the model's batch dimension
    is resizable (``shape_signature[0] == -1``) data runs in batches, otherwise one sample at a
    time.

    Args:
        model: TFLite bytes or a ``.tflite`` path.
        num_threads: interpreter threads (None: the interpreter's default).
        allocate: prepare the kernels now (``allocate_tensors``); False leaves it to the first run, so
            that a model whose kernel aborts in its Prepare can be inspected (and run in a worker
            process, :mod:`tfq.tflite.sandbox`) without taking this process down.

    Example:
        >>> runner = TFLiteModel(tflite_bytes)                     # doctest: +SKIP
        >>> probs = runner.predict(x_test, batch_size=64)          # doctest: +SKIP
    """

    def __init__(self, model, num_threads: int | None = None, allocate: bool = True):
        self.content = load_tflite_bytes(model)
        self.num_threads = num_threads
        try:
            self.interpreter = interpreter_class()(model_content=self.content, num_threads=num_threads)
            if allocate:
                self.interpreter.allocate_tensors()
        except (RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"TFLite model could not be loaded ({first}): the file is corrupt or truncated.") from None
        self._batch = None
        self._signature_order()
        self.input_details = self.interpreter.get_input_details()
        self.output_details = self._ordered_outputs()

    def _signature_order(self) -> None:
        """Input names and output order from the serving signature (the Keras model's order).

        ``get_output_details()`` may list outputs in another order than the model returns them;
        the signature's ``output_<i>`` keys give the model's order.
        """
        self.input_names: dict[str, int] = {}
        self._output_rank: dict[int, int] = {}
        try:
            runner = self.interpreter.get_signature_runner()
        except (ValueError, RuntimeError):
            return
        self.input_names = {name: d["index"] for name, d in runner.get_input_details().items()}
        outputs = runner.get_output_details()

        def key(name):
            m = re.fullmatch(r"output_(\d+)", name)
            return (0, int(m.group(1)), "") if m else (1, 0, name)

        for rank, name in enumerate(sorted(outputs, key=key)):
            self._output_rank[outputs[name]["index"]] = rank

    def _ordered_outputs(self) -> list[dict]:
        details = self.interpreter.get_output_details()
        if self._output_rank and all(d["index"] in self._output_rank for d in details):
            details = sorted(details, key=lambda d: self._output_rank[d["index"]])
        return details

    @property
    def size(self) -> int:
        return len(self.content)

    @property
    def resizable_batch(self) -> bool:
        return all(
            len(d.get("shape_signature", d["shape"])) > 0 and d.get("shape_signature", d["shape"])[0] == -1
            for d in self.input_details
        )

    def _prepare(self, inputs) -> list[np.ndarray]:
        if isinstance(inputs, dict):
            inputs = self._order_dict(inputs)
        if not isinstance(inputs, (list, tuple)):
            inputs = [inputs]
        arrays = [np.asarray(x) for x in inputs]
        if len(arrays) != len(self.input_details):
            raise ValueError(
                f"the TFLite model has {len(self.input_details)} input(s); received {len(arrays)} array(s). "
                f"Pass one array per model input."
            )
        n = len(arrays[0])
        for a, d in zip(arrays, self.input_details):
            expected = tuple(int(v) for v in d.get("shape_signature", d["shape"])[1:])
            got = a.shape[1:]
            if len(got) != len(expected) or any(e not in (-1, g) for e, g in zip(expected, got)):
                raise ValueError(
                    f"input {d['name']!r} expects samples of shape {expected}; received {got} (data shape "
                    f"{a.shape}). Reshape the data to (N, {', '.join(map(str, expected))})."
                )
            if len(a) != n:
                raise ValueError(f"all inputs need the same number of samples; received {[len(x) for x in arrays]}")
        return arrays

    def _order_dict(self, inputs: dict) -> list:
        """Dict inputs in the interpreter's input order, matched by signature name."""
        if not self.input_names:
            raise ValueError("this TFLite model has no signature with input names; pass a list of arrays in "
                             "input order instead of a dict.")
        name_of = {index: name for name, index in self.input_names.items()}
        return order_by_name(inputs, [name_of[d["index"]] for d in self.input_details], data="the inputs",
                             target="the TFLite model", fix="key them by the model's signature input names")

    def _set_batch(self, batch: int, arrays: Sequence[np.ndarray] | None = None) -> None:
        """Resizes the inputs to ``batch`` samples and, where the model's signature leaves a dimension
        unknown (a sequence length), to the size ``arrays`` have there."""
        shapes = []
        for i, d in enumerate(self.input_details):
            signature = d.get("shape_signature", d["shape"])
            shape = [batch] + [int(v) for v in d["shape"][1:]]
            if arrays is not None:
                shape[1:] = [int(g) if int(s) == -1 else int(v)
                             for s, v, g in zip(signature[1:], shape[1:], arrays[i].shape[1:])]
            shapes.append(tuple(shape))
        if self._batch == shapes:
            return
        for d, shape in zip(self.input_details, shapes):
            self.interpreter.resize_tensor_input(d["index"], list(shape), strict=False)
        self.interpreter.allocate_tensors()
        self.input_details = self.interpreter.get_input_details()
        self.output_details = self._ordered_outputs()
        self._batch = shapes

    def run_batch(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Runs one batch (already the right batch size) and returns float outputs."""
        self._set_batch(len(arrays[0]), arrays)
        for a, d in zip(arrays, self.input_details):
            self.interpreter.set_tensor(d["index"], _quantize_input(a, d))
        self.interpreter.invoke()
        return [_dequantize_output(self.interpreter.get_tensor(d["index"]), d) for d in self.output_details]

    def predict(self, inputs, batch_size: int | None = 64) -> np.ndarray | list[np.ndarray]:
        """Float outputs for ``inputs`` (an array, a list of arrays or a dict), one row per sample.

        Returns:
            One array for a single-output model, else a list in output order.
        """
        arrays = self._prepare(inputs)
        n = len(arrays[0])
        if n == 0:
            raise ValueError("no samples to run: the data is empty. Pass at least one sample.")
        step = (batch_size or n) if self.resizable_batch else 1
        outputs: list[list[np.ndarray]] = [[] for _ in self.output_details]
        for start in range(0, n, step):
            chunk = [a[start:start + step] for a in arrays]
            for store, out in zip(outputs, self.run_batch(chunk)):
                store.append(np.array(out))
        result = [np.concatenate(o, axis=0) for o in outputs]
        return result[0] if len(result) == 1 else result

    def latency_ms(self, sample, warmup: int = 5, runs: int = 50) -> np.ndarray:
        """Per-invocation latencies (ms) at batch 1 after ``warmup`` runs."""
        arrays = [a[:1] for a in self._prepare(sample)]
        self._set_batch(1, arrays)
        for a, d in zip(arrays, self.input_details):
            self.interpreter.set_tensor(d["index"], _quantize_input(a, d))
        for _ in range(warmup):
            self.interpreter.invoke()
        times = np.empty(runs)
        for i in range(runs):
            start = time.perf_counter()
            self.interpreter.invoke()
            times[i] = (time.perf_counter() - start) * 1000.0
        return times
