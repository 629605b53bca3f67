"""Reading a .tflite file: ops, tensor dtypes, quantization parameters, size.

Parsed with the TFLite flatbuffer schema that ships with LiteRT
(``ai_edge_litert.schema_py_generated``), so nothing needs to run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


from tfq.interpreter import load_tflite_bytes

__all__ = ["TFLiteInfo", "OpInfo", "TensorInfo", "inspect_tflite"]

_FLOAT_TYPES = ("FLOAT32", "FLOAT16", "FLOAT64")
# Ops that convert between float and integer at the model's edges; not float compute.
_BOUNDARY_OPS = ("QUANTIZE", "DEQUANTIZE")


def _schema():
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the main subgraph."""

    index: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    scales: tuple[float, ...] = ()
    zero_points: tuple[int, ...] = ()
    quantized_dimension: int = 0
    is_constant: bool = False

    @property
    def is_quantized(self) -> bool:
        return bool(self.scales)


@dataclass(frozen=True)
class OpInfo:
    """One operator: its type and the dtypes of its (non-optional) inputs and outputs."""

    index: int
    type: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    input_dtypes: tuple[str, ...]
    output_dtypes: tuple[str, ...]

    @property
    def is_float(self) -> bool:
        """A compute op on float data. QUANTIZE/DEQUANTIZE at the edges do not count, nor does a
        CAST of integer data (a mask or ids) to float: it computes nothing, and the converter
        quantizes its result right after it."""
        if self.type in _BOUNDARY_OPS:
            return False
        if self.type == "CAST" and not any(d in _FLOAT_TYPES for d in self.input_dtypes):
            return False
        return any(d in _FLOAT_TYPES for d in self.input_dtypes + self.output_dtypes)


@dataclass(frozen=True)
class TFLiteInfo:
    """What :func:`inspect_tflite` found."""

    size: int
    ops: tuple[OpInfo, ...]
    tensors: tuple[TensorInfo, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    num_subgraphs: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def float_ops(self) -> list[OpInfo]:
        return [op for op in self.ops if op.is_float]

    @property
    def num_float_ops(self) -> int:
        return len(self.float_ops)

    @property
    def op_types(self) -> list[str]:
        return [op.type for op in self.ops]

    @property
    def input_dtypes(self) -> list[str]:
        return [self.tensors[i].dtype for i in self.inputs]

    @property
    def output_dtypes(self) -> list[str]:
        return [self.tensors[i].dtype for i in self.outputs]

    @property
    def is_fully_integer(self) -> bool:
        """No float compute op and integer model inputs and outputs."""
        return self.num_float_ops == 0 and not any(
            d in _FLOAT_TYPES for d in self.input_dtypes + self.output_dtypes
        ) and not any(op.type in _BOUNDARY_OPS for op in self.ops)

    def tensor(self, name_substring: str) -> TensorInfo:
        """The first tensor whose name contains ``name_substring``."""
        for t in self.tensors:
            if name_substring in t.name:
                return t
        raise KeyError(f"no tensor name contains {name_substring!r}")

    def to_dict(self) -> dict:
        return {
            "size": self.size,
            "num_float_ops": self.num_float_ops,
            "is_fully_integer": self.is_fully_integer,
            "input_dtypes": self.input_dtypes,
            "output_dtypes": self.output_dtypes,
            "ops": [asdict(op) for op in self.ops],
            "tensors": [asdict(t) for t in self.tensors],
        }

    def summary(self) -> str:
        """A short human-readable table of ops and dtypes."""
        lines = [
            f"size: {self.size} bytes; ops: {len(self.ops)}; float ops: {self.num_float_ops}; "
            f"inputs: {self.input_dtypes}; outputs: {self.output_dtypes}"
        ]
        for op in self.ops:
            lines.append(f"  {op.index:3d} {op.type:<22} in={list(op.input_dtypes)} out={list(op.output_dtypes)}")
        return "\n".join(lines)


def inspect_tflite(model) -> TFLiteInfo:
    """Ops, dtypes and quantization parameters of a TFLite model (main subgraph).

    Args:
        model: TFLite bytes or a ``.tflite`` path.

    Returns:
        :class:`TFLiteInfo`; ``info.is_fully_integer`` and ``info.num_float_ops`` say whether the
        model runs in integer arithmetic end to end.

    Raises:
        FileNotFoundError, ValueError: missing or corrupt file.

    Example:
        >>> info = inspect_tflite("model_int8.tflite")        # doctest: +SKIP
        >>> info.num_float_ops, info.input_dtypes              # doctest: +SKIP
        (0, ['INT8'])
    """
    content = load_tflite_bytes(model)
    schema = _schema()
    try:
        root = schema.Model.GetRootAsModel(content, 0)
        graph = root.Subgraphs(0)
        op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
        type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
        codes = []
        for i in range(root.OperatorCodesLength()):
            oc = root.OperatorCodes(i)
            code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
            custom = oc.CustomCode()
            codes.append(custom.decode() if custom else op_names.get(code, f"BUILTIN_{code}"))
        tensors = []
        for i in range(graph.TensorsLength()):
            t = graph.Tensors(i)
            q = t.Quantization()
            scales = tuple(float(v) for v in q.ScaleAsNumpy()) if q is not None and q.ScaleLength() else ()
            zps = tuple(int(v) for v in q.ZeroPointAsNumpy()) if q is not None and q.ZeroPointLength() else ()
            buffer = root.Buffers(t.Buffer()) if t.Buffer() < root.BuffersLength() else None
            constant = buffer is not None and (buffer.DataLength() > 0 or buffer.Size() > 0)
            shape = tuple(int(v) for v in t.ShapeAsNumpy()) if t.ShapeLength() else ()
            tensors.append(TensorInfo(
                index=i, name=t.Name().decode(errors="replace"), dtype=type_names.get(t.Type(), str(t.Type())),
                shape=shape, scales=scales, zero_points=zps,
                quantized_dimension=int(q.QuantizedDimension()) if q is not None else 0, is_constant=constant,
            ))
        ops = []
        for i in range(graph.OperatorsLength()):
            op = graph.Operators(i)
            ins = tuple(int(v) for v in op.InputsAsNumpy() if v >= 0) if op.InputsLength() else ()
            outs = tuple(int(v) for v in op.OutputsAsNumpy() if v >= 0) if op.OutputsLength() else ()
            ops.append(OpInfo(
                index=i, type=codes[op.OpcodeIndex()], inputs=ins, outputs=outs,
                input_dtypes=tuple(tensors[j].dtype for j in ins),
                output_dtypes=tuple(tensors[j].dtype for j in outs),
            ))
        inputs = tuple(int(v) for v in graph.InputsAsNumpy())
        outputs = tuple(int(v) for v in graph.OutputsAsNumpy())
        num_subgraphs = root.SubgraphsLength()
    except Exception as err:  # a flatbuffer that passed the identifier check but is truncated
        raise ValueError(f"TFLite model is corrupt and could not be parsed ({type(err).__name__}: {err}).") from None
    return TFLiteInfo(size=len(content), ops=tuple(ops), tensors=tuple(tensors), inputs=inputs,
                      outputs=outputs, num_subgraphs=num_subgraphs)


