"""4-bit weights in a ``.tflite`` file: packing, and rewriting a converter's INT8 weights as INT4.

The TFLite converter writes 4-bit fake-quant kernels of convolutions as INT4 but keeps Dense
(FULLY_CONNECTED) kernels INT8, their integers in [-7, 7]. :func:`rewrite_int4_weights` turns such
INT8 weight tensors into INT4 tensors — the same integers, the same scales, packed two per byte —
by editing the flatbuffer with the schema LiteRT ships (``ai_edge_litert.schema_py_generated``).

Packing (TFLite's and LiteRT quantizer's layout): the tensor is flattened in row-major order,
value ``2 i`` goes in the low nibble of byte ``i`` and value ``2 i + 1`` in its high nibble, as
two's-complement 4-bit numbers; an odd count leaves the last high nibble 0.

Which ops LiteRT 2.3 runs with INT4 weights was measured (``scripts/int4_op_table.py``) and is
recorded in :data:`INT4_WEIGHT_OPS`: op → the weight input index whose tensor may be INT4.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "INT4_BLOCK_SIZES",
    "INT4_FLOAT_ACTIVATION_OPS",
    "INT4_WEIGHT_OPS",
    "Int4Tensor",
    "float_weights_to_int4",
    "four_bit_integers",
    "int4_tensors",
    "load_model",
    "op_name",
    "pack_int4",
    "rewrite_int4_weights",
    "save_model",
    "schema",
    "tensor_name",
    "unpack_int4",
    "weight_tensors",
]

# op name → index of its weight input, for ops whose full-integer (int8 activation) kernel in
# LiteRT 2.3 runs INT4 weights per channel (or per tensor), bit-identical to the same integers
# stored INT8 (builtin kernels; XNNPACK runs FULLY_CONNECTED INT4 itself and hands INT4
# convolutions to the builtin kernels). Not here: GATHER (XNNPACK returns wrong values for an
# INT4 table), blockwise FULLY_CONNECTED with int8 activations (refused: "filter->quantization.type
# != kTfLiteAffineQuantization"). Measured by scripts/int4_op_table.py.
INT4_WEIGHT_OPS = {"FULLY_CONNECTED": 1, "CONV_2D": 1, "DEPTHWISE_CONV_2D": 1}

# Float activations: storage → op → (weight input index, granularities LiteRT 2.3 runs). "dynamic": the
# op's hybrid kernel reads the INT4 weight and quantizes its float input at run time; "dequantize": a
# DEQUANTIZE op turns the INT4 weight into float once and the float kernel runs (weight-only). Measured by
# scripts/int4_op_table.py (files by LiteRT's quantizer and by tfq, XNNPACK on and off): DEPTHWISE_CONV_2D
# has no hybrid INT4 kernel ("Type FLOAT32 with filter type INT4 not currently supported"), so "dynamic"
# dequantizes its weights; blockwise scales run only in FULLY_CONNECTED's hybrid kernel (CONV_2D's hybrid
# kernel and DEQUANTIZE accept a blockwise INT4 tensor but output zeros).
INT4_FLOAT_ACTIVATION_OPS = {
    "dynamic": {"FULLY_CONNECTED": (1, ("channel", "tensor", "block")), "CONV_2D": (1, ("channel", "tensor"))},
    "dequantize": {"FULLY_CONNECTED": (1, ("channel", "tensor")), "CONV_2D": (1, ("channel", "tensor")),
                   "DEPTHWISE_CONV_2D": (1, ("channel", "tensor"))},
}
#: Block sizes (along the input dimension) of blockwise INT4 weights (LiteRT's quantizer offers 32–256).
INT4_BLOCK_SIZES = (32, 64, 128)


def schema():
    """LiteRT's TFLite flatbuffer schema module (object API)."""
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


def pack_int4(values) -> bytes:
    """Packs integers in [-8, 7] two per byte, low nibble first (TFLite's INT4 layout).

    Example:
        >>> pack_int4([1, -1, 7]).hex()
        'f107'
    """
    v = np.asarray(values).reshape(-1).astype(np.int64)
    if v.size and (v.min() < -8 or v.max() > 7):
        raise ValueError(f"Expected 4-bit integers in [-8, 7]. Received: values in [{v.min()}, {v.max()}]")
    nib = (v & 0xF).astype(np.uint8)
    if nib.size % 2:
        nib = np.concatenate([nib, np.zeros(1, np.uint8)])
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_int4(data: bytes, count: int) -> np.ndarray:
    """The ``count`` signed 4-bit integers packed in ``data`` (inverse of :func:`pack_int4`), as int8.

    Example:
        >>> unpack_int4(bytes.fromhex('f107'), 3).tolist()
        [1, -1, 7]
    """
    b = np.frombuffer(bytes(data), np.uint8)
    if 2 * b.size < count or 2 * b.size > count + 1:
        raise ValueError(f"Expected {(count + 1) // 2} bytes for {count} 4-bit values. Received: {b.size} bytes")
    nib = np.empty(2 * b.size, np.int8)
    nib[0::2] = (b & 0xF).astype(np.int8)
    nib[1::2] = (b >> 4).astype(np.int8)
    nib = np.where(nib > 7, nib - 16, nib).astype(np.int8)
    return nib[:count]


class Int4Tensor:
    """An INT4 constant tensor of a ``.tflite`` file: name, shape, integers, scales, quantized dimension."""

    def __init__(self, name, shape, values, scales, quantized_dimension, op):
        self.name = name
        self.shape = tuple(int(s) for s in shape)
        self.values = values
        self.scales = tuple(float(s) for s in scales)
        self.quantized_dimension = int(quantized_dimension)
        self.op = op

    @property
    def packed_bytes(self) -> int:
        return (int(np.prod(self.shape)) + 1) // 2

    def __repr__(self):
        return f"Int4Tensor({self.name!r}, shape={self.shape}, op={self.op})"


def four_bit_integers(q8: np.ndarray, scales: np.ndarray, axis: int):
    """The 4-bit integers and scales an INT8 weight tensor stores, or None if it is not 4-bit.

    Either the integers already lie in [-7, 7] (kept with their scales), or the converter
    re-quantized a 4-bit fake-quant kernel at 8 bits (it does so for Dense kernels): each slice
    along ``axis`` (or the whole tensor, with one scale) then holds ``q8 = round(q4 · 127 / k)``
    with scale ``s8 = k · s4 / 127``, ``k = max|q4|`` (7 when the slice reaches the grid's end,
    as tfq's rounding methods pin it). ``q4 = round(q8 · k / 127)`` and ``s4 = s8 · 127 / k``
    recover tfq's integers and scales; every element must round-trip, else None.

    Example:
        >>> q, s = four_bit_integers(np.array([[127, -18, 0]], np.int8), np.array([7 / 127], np.float32), 0)
        >>> q.tolist(), [round(float(v), 6) for v in s]
        ([[7, -1, 0]], [1.0])
    """
    q8 = np.asarray(q8)
    if q8.size == 0:
        return None
    if q8.min() >= -7 and q8.max() <= 7:
        return q8.astype(np.int8), np.asarray(scales, np.float32)
    per_channel = len(scales) > 1
    moved = np.moveaxis(q8, axis, 0).reshape(q8.shape[axis], -1) if per_channel else q8.reshape(1, -1)
    out = np.zeros(moved.shape, np.int8)
    new_scales = np.array(scales, np.float64).reshape(-1)
    for row in range(moved.shape[0]):
        v = moved[row].astype(np.float64)
        if not np.any(v):
            continue
        for k in range(7, 0, -1):
            q4 = np.round(v * k / 127)
            if np.all(np.abs(q4 * 127 / k - v) <= 0.5 + 1e-9):
                out[row] = q4.astype(np.int8)
                new_scales[row] = new_scales[row] * 127 / k
                break
        else:
            return None
    if per_channel:
        shape = (q8.shape[axis],) + tuple(d for i, d in enumerate(q8.shape) if i != axis)
        values = np.moveaxis(out.reshape(shape), 0, axis)
    else:
        values = out.reshape(q8.shape)
    return values, new_scales.astype(np.float32)


def load_model(content: bytes):
    """The ``.tflite`` bytes as a mutable ``ModelT`` (schema object API)."""
    s = schema()
    return s.ModelT.InitFromPackedBuf(bytearray(content), 0)


def save_model(model) -> bytes:
    """A ``ModelT`` packed back into ``.tflite`` bytes (file identifier ``TFL3``)."""
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def op_name(model, op) -> str:
    """The builtin operator name of ``op`` (e.g. ``"FULLY_CONNECTED"``)."""
    s = schema()
    code = model.operatorCodes[op.opcodeIndex]
    value = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
    names = {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}
    return names.get(value, str(value))


def tensor_name(tensor) -> str:
    """A ``TensorT``'s name as ``str``."""
    n = tensor.name
    return n.decode() if isinstance(n, bytes) else str(n)


def weight_tensors(model, ops=None):
    """(subgraph, operator, tensor index, op name) of each weight input of an op in ``ops`` (INT4_WEIGHT_OPS)."""
    ops = INT4_WEIGHT_OPS if ops is None else ops
    out = []
    for sg in model.subgraphs:
        for op in sg.operators or []:
            name = op_name(model, op)
            index = ops.get(name)
            if index is None or op.inputs is None or len(op.inputs) <= index:
                continue
            t = int(op.inputs[index])
            if t >= 0:
                out.append((sg, op, t, name))
    return out


def _weight_buffers(model, ops, tensor_type):
    """Each weight tensor of ``tensor_type`` read by an op in ``ops``, once, with its data in the file:
    (subgraph, operator, tensor index, op name, tensor, buffer). Offset buffers (models > 2 GB) are skipped."""
    seen = set()
    for sg, op, t, name in weight_tensors(model, ops):
        tensor = sg.tensors[t]
        if (id(sg), t) in seen or tensor.type != tensor_type or tensor.buffer <= 0:
            continue
        seen.add((id(sg), t))
        buf = model.buffers[tensor.buffer]
        if buf.data is not None and len(buf.data) > 0:
            yield sg, op, t, name, tensor, buf


def _readers(sg, t) -> int:
    return sum(1 for op in sg.operators or [] if op.inputs is not None and t in [int(i) for i in op.inputs])


def _rescaled_bias(model, sg, op, ratio):
    """The op's INT32 bias (tensor, new integers, new scales) for weight scales multiplied by ``1 / ratio``.

    TFLite adds the bias integers to the accumulator, so they must use scale ``input_scale ·
    weight_scale``: ``b' = round(b · ratio)``. None when there is no bias; False when it cannot be
    rescaled (shared, not a constant INT32 tensor).
    """
    s = schema()
    if op.inputs is None or len(op.inputs) < 3 or int(op.inputs[2]) < 0:
        return None
    b = sg.tensors[int(op.inputs[2])]
    data = model.buffers[b.buffer].data if b.buffer > 0 else None
    if b.type != s.TensorType.INT32 or data is None or len(data) == 0 or b.quantization is None \
            or b.quantization.scale is None or _readers(sg, int(op.inputs[2])) > 1:
        return False
    shared = sum(1 for sg2 in model.subgraphs for t2 in sg2.tensors if t2.buffer == b.buffer)
    if shared > 1:
        return False
    old = np.asarray(data, np.uint8).view(np.int32).astype(np.float64)
    ratio = np.broadcast_to(np.asarray(ratio, np.float64), old.shape)
    new = np.clip(np.round(old * ratio), -(2 ** 31), 2 ** 31 - 1).astype(np.int32)
    scales = (np.asarray(b.quantization.scale, np.float64) / np.broadcast_to(ratio, (len(b.quantization.scale),))
              if len(b.quantization.scale) == len(ratio) else np.asarray(b.quantization.scale) / ratio[0])
    return b, new, np.asarray(scales, np.float32)


def rewrite_int4_weights(content: bytes, select=None, ops=None) -> tuple[bytes, list[str]]:
    """Rewrites the 4-bit INT8 weights of FULLY_CONNECTED/CONV_2D/DEPTHWISE_CONV_2D ops as INT4.

    A weight is 4-bit when :func:`four_bit_integers` finds its 4-bit integers: they and their
    scales are written as INT4, packed two values per byte (see the module docstring); the
    products ``q · s`` the kernel computes with are the ones the INT8 tensor held.

    Args:
        content: ``.tflite`` bytes (e.g. the converter's output for a 4-bit fake-quant model).
        select: optional callable ``tensor name -> bool``: only those tensors are rewritten.
            By default every eligible INT8 weight on a 4-bit grid is.
        ops: ``{op name: weight input index}`` to consider instead of :data:`INT4_WEIGHT_OPS`
            (to measure what LiteRT runs; files for use keep the default).

    Returns:
        (new ``.tflite`` bytes, names of the tensors rewritten). Unchanged bytes when none is.

    Raises:
        ValueError: a selected tensor is not on a 4-bit grid (its layer was not quantized to 4 bits).

    Example:
        >>> content, names = rewrite_int4_weights(int8_tflite)   # doctest: +SKIP
    """
    s = schema()
    model = load_model(content)
    done = []
    for sg, op, t, _op, tensor, buf in _weight_buffers(model, ops, s.TensorType.INT8):
        name = tensor_name(tensor)
        values = np.asarray(buf.data, np.uint8).view(np.int8).reshape(tuple(int(d) for d in tensor.shape))
        q = tensor.quantization
        if q is None or q.scale is None or len(q.scale) == 0 or (q.zeroPoint is not None and np.any(q.zeroPoint)):
            continue
        if select is not None and not select(name):
            continue
        found = four_bit_integers(values, np.asarray(q.scale, np.float32), int(q.quantizedDimension or 0))
        if found is None:
            if select is not None:
                raise ValueError(f"Expected 4-bit integers in tensor {name!r}. Received: integers in "
                                 f"[{values.min()}, {values.max()}] not on a 4-bit grid; quantize its layer "
                                 f"with weights bits=4")
            continue
        values, scales = found
        ratio = np.asarray(q.scale, np.float64) / scales.astype(np.float64)  # old scale / new scale
        bias = None
        if not np.all(ratio == 1.0):
            if _readers(sg, t) > 1:
                continue  # other ops' biases would need the same rescaling
            bias = _rescaled_bias(model, sg, op, ratio)
            if bias is False:
                continue
        shared = sum(1 for sg2 in model.subgraphs for t2 in sg2.tensors if t2.buffer == tensor.buffer)
        if shared > 1:
            continue  # a buffer another tensor reads too stays as it is
        buf.data = np.frombuffer(pack_int4(values), np.uint8)
        q.scale = scales
        if bias:
            b, new_bias, bias_scales = bias
            model.buffers[b.buffer].data = new_bias.view(np.uint8)
            b.quantization.scale = bias_scales
        tensor.type = s.TensorType.INT4
        done.append(name)
    if not done:
        return bytes(content), []
    return save_model(model), done


def int4_tensors(content: bytes) -> list[Int4Tensor]:
    """The INT4 constant tensors of a ``.tflite`` file, unpacked, with the op that reads each.

    Example:
        >>> [t.name for t in int4_tensors(w4a8_tflite)]   # doctest: +SKIP
    """
    s = schema()
    model = load_model(content)
    readers = {}
    for sg in model.subgraphs:
        for op in sg.operators or []:
            for i in op.inputs if op.inputs is not None else []:
                readers.setdefault((id(sg), int(i)), op_name(model, op))
    out = []
    for sg in model.subgraphs:
        for i, tensor in enumerate(sg.tensors):
            if tensor.type != s.TensorType.INT4 or tensor.buffer <= 0:
                continue
            data = model.buffers[tensor.buffer].data
            if data is None:
                continue
            shape = tuple(int(d) for d in tensor.shape)
            values = unpack_int4(np.asarray(data, np.uint8).tobytes(), int(np.prod(shape))).reshape(shape)
            q = tensor.quantization
            scales = () if q is None or q.scale is None else tuple(q.scale)
            out.append(Int4Tensor(tensor_name(tensor), shape, values, scales, q.quantizedDimension if q else 0,
                                  readers.get((id(sg), i), "?")))
    return out


def _opcode_index(model, builtin: int) -> int:
    """The index of ``builtin``'s operator code in ``model`` (added if absent)."""
    s = schema()
    for i, code in enumerate(model.operatorCodes):
        if max(int(code.builtinCode), int(code.deprecatedBuiltinCode)) == builtin:
            return i
    code = s.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(builtin, 127)
    code.version = 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def float_weights_to_int4(content: bytes, choose, storage: str) -> tuple[bytes, list[str], list[tuple[str, str]]]:
    """A float ``.tflite`` with the weights ``choose`` gives integers for stored INT4 (float activations).

    Each FLOAT32 constant weight of an op in :data:`INT4_FLOAT_ACTIVATION_OPS` (``storage`` or
    ``"dequantize"``: with ``"dynamic"``, an op without a hybrid INT4 kernel for the granularity chosen
    gets a DEQUANTIZE op) is passed to
    ``choose(tensor name, op name, values)``, which returns None (kept float) or ``(q, scales,
    quantized_dimension, block_size)``: integers in [-8, 7] shaped as the tensor, one scale per slice
    along ``quantized_dimension`` (one for the tensor), or with ``block_size`` scales shaped
    ``(rows, columns / block_size)`` (stored FLOAT16, as LiteRT's quantizer writes them). A weight
    stored with DEQUANTIZE feeds the op float weights.

    Returns:
        ``(bytes, names stored INT4, [(name, op)] of weights of those ops left float)``.

    Example:
        >>> content, done, left = float_weights_to_int4(float_tflite, choose, "dynamic")   # doctest: +SKIP
    """
    if storage not in INT4_FLOAT_ACTIVATION_OPS:
        raise ValueError(f"storage must be one of {tuple(INT4_FLOAT_ACTIVATION_OPS)}. Received: {storage!r}")
    ops = dict(INT4_FLOAT_ACTIVATION_OPS["dequantize"])
    ops.update(INT4_FLOAT_ACTIVATION_OPS[storage])
    s = schema()
    model = load_model(content)
    done, left = [], []
    for sg, op, t, name, tensor, buf in _weight_buffers(model, {k: v[0] for k, v in ops.items()},
                                                        s.TensorType.FLOAT32):
        tname = tensor_name(tensor)
        readers = [o for o in sg.operators if o.inputs is not None and t in [int(i) for i in o.inputs]]
        shared = sum(1 for sg2 in model.subgraphs for t2 in sg2.tensors if t2.buffer == tensor.buffer)
        if shared > 1 or any(op_name(model, o) not in ops or int(o.inputs[ops[op_name(model, o)][0]]) != t
                             for o in readers):
            left.append((tname, name))
            continue
        values = np.frombuffer(np.asarray(buf.data, np.uint8).tobytes(), np.float32).reshape(
            tuple(int(d) for d in tensor.shape))
        chosen = choose(tname, name, values)
        if chosen is None:
            left.append((tname, name))
            continue
        q, scales, axis, block = chosen
        granularity = "block" if block else ("tensor" if np.size(scales) == 1 else "channel")
        kernels = [INT4_FLOAT_ACTIVATION_OPS[storage].get(op_name(model, o), (0, ()))[1] for o in readers]
        dequantize = storage == "dequantize" or any(granularity not in k for k in kernels)
        deq_ok = all(granularity in INT4_FLOAT_ACTIVATION_OPS["dequantize"].get(op_name(model, o), (0, ()))[1]
                     for o in readers)
        if dequantize and not deq_ok:
            left.append((tname, name))
            continue
        buf.data = np.frombuffer(pack_int4(np.asarray(q).reshape(values.shape)), np.uint8)
        quant = s.QuantizationParametersT()
        quant.quantizedDimension = int(axis)
        if block:
            sbuf = s.BufferT()
            sbuf.data = np.frombuffer(np.asarray(scales, np.float16).tobytes(), np.uint8)
            model.buffers.append(sbuf)
            st = s.TensorT()
            st.name = (tname + "_scales").encode()
            st.type, st.shape, st.buffer = s.TensorType.FLOAT16, list(np.shape(scales)), len(model.buffers) - 1
            sg.tensors.append(st)
            quant.detailsType = s.QuantizationDetails.BlockwiseQuantization
            details = s.BlockwiseQuantizationT()
            details.scales, details.zeroPoints, details.blockSize = len(sg.tensors) - 1, -1, int(block)
            quant.details = details
        else:
            quant.scale = np.asarray(scales, np.float32).reshape(-1)
            quant.zeroPoint = np.zeros(quant.scale.size, np.int64)
        tensor.quantization = quant
        tensor.type = s.TensorType.INT4
        if dequantize:
            out = s.TensorT()
            out.name = (tname + "_dequant").encode()
            out.type, out.shape, out.buffer = s.TensorType.FLOAT32, list(tensor.shape), 0
            sg.tensors.append(out)
            new = len(sg.tensors) - 1
            for o in readers:
                o.inputs = np.asarray([new if int(i) == t else int(i) for i in o.inputs], np.int32)
            deq = s.OperatorT()
            deq.opcodeIndex = _opcode_index(model, s.BuiltinOperator.DEQUANTIZE)
            deq.inputs, deq.outputs = np.asarray([t], np.int32), np.asarray([new], np.int32)
            sg.operators.insert(0, deq)  # a constant input: first is a valid order
        done.append(tname)
    if not done:
        return bytes(content), [], left
    return save_model(model), done, left
