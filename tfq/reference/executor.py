"""Running a TFLite graph op by op with the numpy kernels of :mod:`tfq.reference.kernels`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tfq.numerics.ops import quantize_to
from tfq.reference.graph import Graph, read_graph
from tfq.reference.kernels import KERNELS, OpContext, UnsupportedOpError

__all__ = ["Execution", "execute", "prepare_inputs", "as_graph"]


def as_graph(tflite) -> Graph:
    """A :class:`Graph` from TFLite bytes, a path, or an already read graph."""
    return tflite if isinstance(tflite, Graph) else read_graph(tflite)


@dataclass
class Execution:
    """Every tensor value of one run, and what each op recorded (requantization, tables)."""

    graph: Graph
    values: dict[int, np.ndarray]
    details: list[dict] = field(default_factory=list)

    @property
    def outputs(self) -> list[np.ndarray]:
        return [self.values[i] for i in self.graph.outputs]


def _quantize_input(x: np.ndarray, tensor) -> np.ndarray:
    """Float data for an integer input: ``clip(round(x/S) + Z)``, as :class:`tfq.TFLiteModel` feeds it."""
    scale, zero_point = tensor.qparams()
    return quantize_to(x, scale, zero_point, tensor.dtype)


def prepare_inputs(graph: Graph, inputs) -> list[np.ndarray]:
    """One array per graph input, in the graph's input order, with the input tensors' dtypes."""
    if isinstance(inputs, dict):
        raise TypeError("pass the inputs as an array or a list of arrays in the model's input order "
                        f"(received a dict with keys {sorted(inputs)}).")
    if not isinstance(inputs, (list, tuple)):
        inputs = [inputs]
    if len(inputs) != len(graph.inputs):
        raise ValueError(f"the TFLite model has {len(graph.inputs)} input(s); received {len(inputs)} array(s). "
                         f"Pass one array per model input, in input order.")
    arrays = []
    for x, index in zip(inputs, graph.inputs):
        t = graph.tensors[index]
        x = np.asarray(x)
        expected = t.shape[1:]
        if x.shape[1:] != expected:
            raise ValueError(f"input {t.name!r} expects samples of shape {expected}; received data of shape "
                             f"{x.shape}. Reshape the data to (N, {', '.join(map(str, expected))}).")
        if t.is_quantized and np.issubdtype(x.dtype, np.floating) and not np.issubdtype(t.dtype, np.floating):
            x = _quantize_input(x, t)
        else:
            x = x.astype(t.dtype)
        arrays.append(x)
    return arrays


def check_supported(graph: Graph) -> None:
    """Raises a one-line error naming the first op the executor cannot run."""
    for op in graph.operators:
        if op.type not in KERNELS:
            raise UnsupportedOpError(
                f"op {op.index} {op.type} is not supported by tfq.reference (supported: "
                f"{', '.join(sorted(KERNELS))}).")


def execute(graph: Graph, inputs, keep: bool = True) -> Execution:
    """Runs ``graph`` on ``inputs``; with ``keep=False`` intermediate tensors are dropped once used."""
    check_supported(graph)
    values: dict[int, np.ndarray] = {}
    for t in graph.tensors:
        if t.data is not None:
            values[t.index] = t.data
    for index, x in zip(graph.inputs, prepare_inputs(graph, inputs)):
        values[index] = x
    last_use: dict[int, int] = {}
    if not keep:
        for op in graph.operators:
            for i in op.inputs:
                last_use[i] = op.index
    details = []
    for op in graph.operators:
        missing = [i for i in op.inputs if i >= 0 and i not in values]
        if missing:
            raise ValueError(f"op {op.index} {op.type} reads tensor {missing[0]} "
                             f"({graph.tensors[missing[0]].name!r}) that nothing computed: the graph is not "
                             f"in execution order.")
        ctx = OpContext(graph=graph, op=op, values=[values[i] if i >= 0 else None for i in op.inputs])
        outputs = KERNELS[op.type](ctx)
        for index, value in zip(op.outputs, outputs):
            values[index] = value
        details.append(ctx.details)
        if not keep:
            for i in set(op.inputs):
                if i >= 0 and last_use.get(i) == op.index and i not in graph.outputs and graph.tensors[i].data is None:
                    values.pop(i, None)
    return Execution(graph=graph, values=values, details=details)
