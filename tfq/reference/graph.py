"""The main subgraph of a .tflite file as plain Python objects: tensors (with their quantization
and constant data) and operators (with their builtin options).

Read with the flatbuffer schema that ships with LiteRT (``ai_edge_litert.schema_py_generated``,
the same reader as :mod:`tfq.tflite.info`), through its object API.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tfq.tflite.int4 import unpack_int4
from tfq.tflite.interpreter import load_tflite_bytes

__all__ = ["Graph", "Tensor", "Operator", "read_graph"]

_NUMPY_TYPES = {
    "FLOAT32": np.float32, "FLOAT16": np.float16, "FLOAT64": np.float64, "INT32": np.int32,
    "UINT8": np.uint8, "INT64": np.int64, "BOOL": np.bool_, "INT16": np.int16, "INT8": np.int8,
    "UINT32": np.uint32, "UINT16": np.uint16, "UINT64": np.uint64,
}


def _schema():
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


@dataclass
class Tensor:
    """One tensor: dtype, shape, quantization (``scale``/``zero_point`` arrays; empty if float) and constant data."""

    index: int
    name: str
    type_name: str
    shape: tuple[int, ...]
    scale: np.ndarray
    zero_point: np.ndarray
    quantized_dimension: int = 0
    data: np.ndarray | None = None

    @property
    def dtype(self):
        return _NUMPY_TYPES.get(self.type_name)

    @property
    def is_quantized(self) -> bool:
        return self.scale.size > 0

    @property
    def is_constant(self) -> bool:
        return self.data is not None

    @property
    def per_channel(self) -> bool:
        return self.scale.size > 1

    def qparams(self) -> tuple[float, int]:
        """Per-tensor ``(scale, zero_point)``; ``(0.0, 0)`` for a float tensor."""
        if not self.is_quantized:
            return 0.0, 0
        return float(self.scale[0]), int(self.zero_point[0]) if self.zero_point.size else 0


@dataclass
class Operator:
    """One operator: its builtin type name, tensor indices (−1: an omitted optional input) and options."""

    index: int
    type: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    options: object = None


@dataclass
class Graph:
    """The main subgraph of a TFLite model."""

    tensors: list[Tensor]
    operators: list[Operator]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    num_subgraphs: int = 1
    extra: dict = field(default_factory=dict)

    def find_op(self, op) -> Operator:
        """An operator by index, or the first whose type or output tensor name contains ``op``."""
        if isinstance(op, (int, np.integer)) and not isinstance(op, bool):
            if not 0 <= op < len(self.operators):
                raise ValueError(f"op index {op} is out of range: the model has {len(self.operators)} operators "
                                 f"(0..{len(self.operators) - 1}).")
            return self.operators[int(op)]
        if isinstance(op, str):
            for o in self.operators:
                if o.type == op.upper() or any(op in self.tensors[t].name for t in o.outputs):
                    return o
            raise ValueError(f"no operator has type {op!r} or an output tensor whose name contains {op!r}. "
                             f"Pass an op index (0..{len(self.operators) - 1}) or a name from the model.")
        raise TypeError(f"op must be an operator index or a name; received {type(op).__name__}")


def read_graph(model) -> Graph:
    """Parses the main subgraph of ``model`` (TFLite bytes or a ``.tflite`` path).

    Raises:
        FileNotFoundError, TypeError, ValueError: missing, unreadable or corrupt model.
    """
    content = load_tflite_bytes(model)
    schema = _schema()
    try:
        root = schema.ModelT.InitFromPackedBuf(content, 0)
    except Exception as err:  # a flatbuffer that passed the identifier check but is truncated
        raise ValueError(f"TFLite model is corrupt and could not be parsed ({type(err).__name__}: {err}).") from None
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    codes = []
    for oc in root.operatorCodes:
        code = max(oc.builtinCode, oc.deprecatedBuiltinCode)
        codes.append(oc.customCode.decode() if oc.customCode else op_names.get(code, f"BUILTIN_{code}"))
    graph = root.subgraphs[0]
    tensors = []
    for i, t in enumerate(graph.tensors):
        q = t.quantization
        scale = np.asarray(q.scale if q is not None and q.scale is not None else [], dtype=np.float32)
        zero_point = np.asarray(q.zeroPoint if q is not None and q.zeroPoint is not None else [], dtype=np.int64)
        type_name = type_names.get(t.type, str(t.type))
        shape = tuple(int(v) for v in t.shape) if t.shape is not None else ()
        data = None
        buffer = root.buffers[t.buffer] if 0 < t.buffer < len(root.buffers) else None
        raw = None
        if buffer is not None:
            if buffer.data is not None and len(buffer.data):
                raw = np.asarray(buffer.data, dtype=np.uint8).tobytes()
            elif buffer.offset > 1 and buffer.size:
                raw = content[buffer.offset:buffer.offset + buffer.size]
        if raw is not None and type_name == "INT4":  # two per byte: unpacked, as LiteRT's kernels do
            data = unpack_int4(raw, int(np.prod(shape))).reshape(shape)
        elif raw is not None and type_name in _NUMPY_TYPES:
            data = np.frombuffer(raw, dtype=_NUMPY_TYPES[type_name]).reshape(shape).copy()
        name = t.name.decode(errors="replace") if isinstance(t.name, bytes) else str(t.name)
        tensors.append(Tensor(index=i, name=name, type_name=type_name, shape=shape, scale=scale,
                              zero_point=zero_point, quantized_dimension=int(q.quantizedDimension) if q else 0,
                              data=data))
    operators = []
    for i, op in enumerate(graph.operators):
        ins = tuple(int(v) for v in op.inputs) if op.inputs is not None else ()
        outs = tuple(int(v) for v in op.outputs) if op.outputs is not None else ()
        operators.append(Operator(index=i, type=codes[op.opcodeIndex], inputs=ins, outputs=outs,
                                  options=op.builtinOptions))
    return Graph(tensors=tensors, operators=operators, inputs=tuple(int(v) for v in graph.inputs),
                 outputs=tuple(int(v) for v in graph.outputs), num_subgraphs=len(root.subgraphs))
