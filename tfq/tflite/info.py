"""Reading a .tflite file: ops, tensor dtypes, quantization parameters, size, weight statistics.

Parsed with the TFLite flatbuffer schema that ships with LiteRT
(``ai_edge_litert.schema_py_generated``), so nothing needs to run.
"""

from __future__ import annotations

import functools
import gzip
from dataclasses import asdict, dataclass, field

import numpy as np

from tfq.tflite.int4 import unpack_int4
from tfq.tflite.interpreter import load_tflite_bytes

__all__ = ["TFLiteInfo", "OpInfo", "TensorInfo", "WeightInfo", "gzip_size", "inspect_tflite", "requantization_aborts"]

_NUMPY_TYPES = {"INT8": np.int8, "UINT8": np.uint8, "INT16": np.int16, "FLOAT32": np.float32,
                "FLOAT16": np.float16, "INT4": np.int8}  # INT4: two per byte, unpacked to int8
_BITS = {"INT4": 4, "INT8": 8, "UINT8": 8, "INT16": 16, "FLOAT16": 16, "FLOAT32": 32}


def distinct_per_channel(values: np.ndarray, axis: int | None) -> np.ndarray:
    """Number of distinct values in each slice along ``axis`` (the whole tensor when None)."""
    v = np.asarray(values)
    if axis is None or v.ndim == 0:
        return np.array([len(np.unique(v))])
    v = np.moveaxis(v, axis, 0).reshape(v.shape[axis], -1)
    s = np.sort(v, axis=1)
    return 1 + np.count_nonzero(np.diff(s, axis=1), axis=1)


def gzip_size(content: bytes) -> int:
    """Bytes of ``content`` gzip-compressed at level 9 (how sparse and clustered models ship).

    Example:
        >>> gzip_size(bytes(1000)) < 100
        True
    """
    return len(gzip.compress(bytes(content), compresslevel=9, mtime=0))


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
class WeightInfo:
    """A constant weight tensor (2-D or more: filters, FC weights, embeddings) and what it holds.

    ``sparsity`` = share of stored zeros; ``distinct_per_channel`` = the most distinct stored values
    in any one slice along ``quantized_dimension`` (per output channel for per-channel INT8; the
    whole tensor when it has one scale, or none); ``bits`` per stored value (4 for INT4, packed
    two per byte) and ``nbytes`` of its buffer.
    """

    tensor: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    sparsity: float
    distinct_per_channel: int
    channels: int
    bits: int = 8
    nbytes: int = 0


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
    content: bytes = field(default=b"", repr=False, compare=False)

    @functools.cached_property
    def gzip_size(self) -> int | None:
        """The file gzip-compressed at level 9, in bytes (computed on first use)."""
        return gzip_size(self.content) if self.content else None

    @functools.cached_property
    def weights(self) -> tuple[WeightInfo, ...]:
        """Every constant weight tensor (2-D or more) with its sparsity and distinct values per channel."""
        return _read_weights(self.content, self.tensors) if self.content else ()

    @property
    def weight_sparsity(self) -> float | None:
        """Zeros / elements over all :attr:`weights` (None without weight tensors)."""
        total = sum(int(np.prod(w.shape)) for w in self.weights)
        if not total:
            return None
        return sum(w.sparsity * int(np.prod(w.shape)) for w in self.weights) / total

    @property
    def weight_bits(self) -> dict[str, int]:
        """Bits per stored value of each weight tensor, by name (4 = INT4, 8 = INT8, 32 = float)."""
        return {w.name: w.bits for w in self.weights}

    @property
    def weight_bytes(self) -> int:
        """Bytes the weight tensors' buffers take in the file (INT4 packed two values per byte)."""
        return sum(w.nbytes for w in self.weights)

    @property
    def max_distinct_per_channel(self) -> int | None:
        """The most distinct values any channel of any weight tensor holds."""
        return max((w.distinct_per_channel for w in self.weights), default=None)

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
            "gzip_size": self.gzip_size,
            "weight_sparsity": self.weight_sparsity,
            "max_distinct_per_channel": self.max_distinct_per_channel,
            "weight_bytes": self.weight_bytes,
            "ops": [asdict(op) for op in self.ops],
            "tensors": [asdict(t) for t in self.tensors],
            "weights": [asdict(w) for w in self.weights],
        }

    def summary(self) -> str:
        """A short human-readable table of ops and dtypes."""
        lines = [
            f"size: {self.size} bytes; ops: {len(self.ops)}; float ops: {self.num_float_ops}; "
            f"inputs: {self.input_dtypes}; outputs: {self.output_dtypes}"
        ]
        if self.gzip_size is not None:
            sparsity = self.weight_sparsity
            lines.append(f"gzip: {self.gzip_size} bytes ({self.gzip_size / max(self.size, 1):.3f} of the file); "
                         f"weight sparsity: {'-' if sparsity is None else f'{100 * sparsity:.1f}%'}; "
                         f"max distinct values per channel: {self.max_distinct_per_channel or '-'}")
        for op in self.ops:
            lines.append(f"  {op.index:3d} {op.type:<22} in={list(op.input_dtypes)} out={list(op.output_dtypes)}")
        for w in self.weights:
            lines.append(f"  weight {w.name[:48]:<48} {w.dtype:<7} {w.bits:2d} bits {w.nbytes:>9} B "
                         f"{list(w.shape)!s:<18} sparsity {100 * w.sparsity:5.1f}%  "
                         f"distinct/channel {w.distinct_per_channel}")
        return "\n".join(lines)


# LiteRT's integer ADD and SUB bring both inputs to 2·max(s₁, s₂) / 2^shift (shift 20 for int8, 15 for
# int16), then that to the output scale s with a multiplier their Prepare requires below 1
# (QuantizeMultiplierSmallerThanOneExp, a TFLITE_CHECK): an output scale below 2·max(s₁, s₂) / 2^shift
# (an output range a million times narrower than the inputs', e.g. two branches that cancel) aborts
# the process, without a message.
_ADD_SHIFT = {"INT8": 20, "INT16": 15}


def requantization_aborts(info: TFLiteInfo) -> list[tuple[OpInfo, str]]:
    """The ops whose requantization multiplier is out of the range LiteRT's kernels CHECK (they abort
    the process when the model is prepared), each with a one-line reason.

    Example:
        >>> [(op.type, why) for op, why in requantization_aborts(inspect_tflite(content))]  # doctest: +SKIP
        [('ADD', 'output scale 4e-09 below 2·max(input scales)/2^20 = 4.62e-08')]
    """
    found = []
    for op in info.ops:
        if op.type not in ("ADD", "SUB") or len(op.inputs) < 2 or not op.outputs or min(op.inputs[:2]) < 0:
            continue
        a, b, out = (info.tensors[i] for i in (op.inputs[0], op.inputs[1], op.outputs[0]))
        shift = _ADD_SHIFT.get(out.dtype)
        if shift is None or not (a.scales and b.scales and out.scales):
            continue
        floor = 2 * max(a.scales[0], b.scales[0]) / 2 ** shift
        if out.scales[0] <= floor:
            found.append((op, f"output scale {out.scales[0]:.3g} below 2·max(input scales)/2^{shift} = {floor:.3g}"))
    return found


def inspect_tflite(model) -> TFLiteInfo:
    """Ops, dtypes and quantization parameters of a TFLite model (main subgraph).

    Args:
        model: TFLite bytes or a ``.tflite`` path.

    Returns:
        :class:`TFLiteInfo`; ``info.is_fully_integer`` and ``info.num_float_ops`` say whether the
        model runs in integer arithmetic end to end; ``info.gzip_size``, ``info.weight_sparsity``
        and ``info.weights`` (per weight tensor: sparsity, distinct values per channel) describe how
        far the weights compress.

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
                      outputs=outputs, num_subgraphs=num_subgraphs, content=content)


def _read_weights(content: bytes, tensors) -> tuple[WeightInfo, ...]:
    schema = _schema()
    root = schema.Model.GetRootAsModel(content, 0)
    graph = root.Subgraphs(0)
    found = []
    for t in tensors:
        if not t.is_constant or len(t.shape) < 2 or t.dtype not in _NUMPY_TYPES:
            continue
        buffer = root.Buffers(graph.Tensors(t.index).Buffer())
        info = _weight_info(t, _buffer_bytes(buffer, content))
        if info is not None:
            found.append(info)
    return tuple(found)


def _buffer_bytes(buffer, content: bytes) -> bytes:
    """A buffer's data: inline, or (models over 2 GB) at an offset in the file."""
    if buffer.DataLength() > 0:
        return buffer.DataAsNumpy().tobytes()
    offset, size = int(buffer.Offset()), int(buffer.Size())
    return bytes(content[offset:offset + size]) if offset > 1 and size > 0 else b""


def _weight_info(t: TensorInfo, data: bytes) -> WeightInfo | None:
    dtype = np.dtype(_NUMPY_TYPES[t.dtype])
    count = int(np.prod(t.shape))
    if t.dtype == "INT4":
        if len(data) != (count + 1) // 2:
            return None
        values = unpack_int4(data, count).reshape(t.shape)
    elif len(data) != count * dtype.itemsize:
        return None  # packed or sparse storage: not read here
    else:
        values = np.frombuffer(data, dtype).reshape(t.shape)
    axis = t.quantized_dimension if len(t.scales) > 1 else None
    per_channel = distinct_per_channel(values, axis)
    return WeightInfo(tensor=t.index, name=t.name, dtype=t.dtype, shape=t.shape,
                      sparsity=float(np.count_nonzero(values == 0) / count) if count else 0.0,
                      distinct_per_channel=int(per_channel.max()) if count else 0, channels=len(per_channel),
                      bits=_BITS.get(t.dtype, 8 * dtype.itemsize), nbytes=len(data))


