"""Which ops LiteRT runs with INT4 weights: the table behind tfq.tflite.int4.INT4_WEIGHT_OPS.

For each op (FULLY_CONNECTED, CONV_2D, DEPTHWISE_CONV_2D, GATHER from an Embedding) and mode it
builds a small .tflite and runs it in a subprocess (LiteRT aborts on some failed checks) with the
default op resolver (XNNPACK on) and with BUILTIN_WITHOUT_DEFAULT_DELEGATES:

- ``w4a8``: the converter's full-integer file with the weights requantized to [-7, 7] and the
  tensor rewritten INT4 by tfq (same integers, same scales); checked against the same file with
  the integers left INT8 (must be bit-identical).
- ``tfq_dynamic`` / ``tfq_dequantize`` (channelwise and blockwise 32): the float file with its weights
  stored INT4 by tfq (:func:`tfq.tflite.int4.float_weights_to_int4`, every op and granularity tried,
  nearest 4-bit integers), checked against the float file whose weights are those integers times
  their scales (``rel_err_vs_dequantized``: 0 for weight-only, activation rounding for dynamic).
- ``aeq_static_w4a8`` / ``aeq_dynamic`` / ``aeq_weight_only`` (channelwise and blockwise 32):
  files written by LiteRT's quantizer (ai-edge-quantizer) from the float file; checked against the
  float file's output (relative max error).

Usage: PYTHONPATH=$PWD python scripts/int4_op_table.py [--json out.json] [--only tfq]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

_RUNNER = r"""
import sys, json, numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType
path, resolver, xpath = sys.argv[1], sys.argv[2], sys.argv[3]
r = OpResolverType.AUTO if resolver == "default" else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
try:
    it = Interpreter(model_path=path, experimental_op_resolver_type=r)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    x = np.load(xpath)
    if d["dtype"] == np.int8:
        s, z = d["quantization"]
        x = np.clip(np.round(x / s) + z, -128, 127).astype(np.int8)
    it.set_tensor(d["index"], x.astype(d["dtype"]))
    it.invoke()
    o = it.get_output_details()[0]
    y = it.get_tensor(o["index"]).astype(np.float64)
    if o["dtype"] == np.int8:
        s, z = o["quantization"]
        y = (y - z) * s
    np.save(xpath + ".out.npy", y)
    print(json.dumps({"ok": True}))
except Exception as e:
    print(json.dumps({"ok": False, "error": str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}))
"""


def _models():
    import keras

    keras.utils.set_random_seed(0)
    fc = keras.Sequential([keras.Input((64,)), keras.layers.Dense(16)])
    conv = keras.Sequential([keras.Input((8, 8, 32)), keras.layers.Conv2D(8, 3)])
    dw = keras.Sequential([keras.Input((8, 8, 32)), keras.layers.DepthwiseConv2D(3)])
    emb = keras.Sequential([keras.Input((4,), dtype="int32"), keras.layers.Embedding(64, 32)])
    rng = np.random.default_rng(0)
    xs = {
        "FULLY_CONNECTED": rng.normal(size=(1, 64)).astype(np.float32),
        "CONV_2D": rng.normal(size=(1, 8, 8, 32)).astype(np.float32),
        "DEPTHWISE_CONV_2D": rng.normal(size=(1, 8, 8, 32)).astype(np.float32),
        "GATHER": rng.integers(0, 64, size=(1, 4)).astype(np.int32),
    }
    return {"FULLY_CONNECTED": (fc, 1), "CONV_2D": (conv, 1), "DEPTHWISE_CONV_2D": (dw, 1),
            "GATHER": (emb, 0)}, xs


def _float_and_int8(model, x):
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    flt = conv.convert()
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if x.dtype != np.int32:
        conv.representative_dataset = lambda: ([np.random.default_rng(i).normal(size=x.shape).astype(np.float32)]
                                               for i in range(20))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    else:
        conv.representative_dataset = lambda: ([x] for _ in range(2))
    return flt, conv.convert()


def _requantize_to_4_bits(content, op_name, index):
    """The INT8 file with the op's weights requantized to [-7, 7] (scales × 127/7), still INT8."""
    from tfq.tflite import int4

    s = int4.schema()
    m = int4.load_model(content)
    for sg, _op, t, _ in int4.weight_tensors(m, {op_name: index}):
        tensor = sg.tensors[t]
        if tensor.type != s.TensorType.INT8:
            continue
        buf = m.buffers[tensor.buffer]
        q8 = np.asarray(buf.data, np.uint8).view(np.int8).astype(np.float64)
        buf.data = np.clip(np.round(q8 * 7 / 127), -7, 7).astype(np.int8).view(np.uint8)
        tensor.quantization.scale = (np.asarray(tensor.quantization.scale) * 127 / 7).astype(np.float32)
    return int4.save_model(m)


def _gather_pair(int8):
    """(INT8 reference, INT4) files of the Embedding's GATHER: a symmetric table of random integers in
    [-7, 7] (zero points 0, output scale = table scale), stored INT8 and INT4."""
    from tfq.tflite import int4

    s = int4.schema()
    m = int4.load_model(int8)
    sg = m.subgraphs[0]
    g = next(op for op in sg.operators if int4.op_name(m, op) == "GATHER")
    table, out = sg.tensors[g.inputs[0]], sg.tensors[g.outputs[0]]
    vals = np.random.default_rng(0).integers(-7, 8, size=tuple(table.shape)).astype(np.int8)
    table.quantization.zeroPoint = np.zeros(1, np.int64)
    out.quantization.zeroPoint = np.zeros(1, np.int64)
    out.quantization.scale = table.quantization.scale
    m.buffers[table.buffer].data = vals.view(np.uint8).reshape(-1)
    ref = int4.save_model(m)
    m.buffers[table.buffer].data = np.frombuffer(int4.pack_int4(vals), np.uint8)
    table.type = s.TensorType.INT4
    return ref, int4.save_model(m)


def _blockwise(w4, block=32):
    """The W4A8 FULLY_CONNECTED file with its INT4 weight given blockwise scales (FLOAT16 scales tensor,
    the layout LiteRT's quantizer writes for dynamic-range blockwise), each block the channel's scale."""
    from tfq.tflite import int4

    s = int4.schema()
    m = int4.load_model(w4)
    sg = m.subgraphs[0]
    fc = next(op for op in sg.operators if int4.op_name(m, op) == "FULLY_CONNECTED")
    wt = sg.tensors[fc.inputs[1]]
    sc = np.asarray(wt.quantization.scale, np.float32)
    scales = np.repeat(sc[:, None], int(wt.shape[1]) // block, axis=1).astype(np.float16)
    buf = s.BufferT()
    buf.data = np.frombuffer(scales.tobytes(), np.uint8)
    m.buffers.append(buf)
    st = s.TensorT()
    st.name, st.type, st.shape, st.buffer = b"w_scales", s.TensorType.FLOAT16, list(scales.shape), len(m.buffers) - 1
    sg.tensors.append(st)
    q = s.QuantizationParametersT()
    q.detailsType = s.QuantizationDetails.BlockwiseQuantization
    d = s.BlockwiseQuantizationT()
    d.scales, d.zeroPoints, d.blockSize = len(sg.tensors) - 1, -1, block
    q.details, q.quantizedDimension = d, 0
    wt.quantization = q
    return int4.save_model(m)


def _nearest_int4(values, op_name, block):
    """(q, scales, axis, block) nearest 4-bit integers of a float TFLite weight, per output channel
    (DEPTHWISE_CONV_2D: last axis) or per block of ``block`` inputs (FULLY_CONNECTED/CONV_2D rows)."""
    axis = 3 if op_name == "DEPTHWISE_CONV_2D" else 0
    m = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1).astype(np.float64)
    if block:
        if m.shape[1] % block:
            return None
        blocks = m.reshape(m.shape[0], -1, block)
        s = (np.abs(blocks).max(axis=2) / 7).astype(np.float16).astype(np.float64)
        q = np.clip(np.round(blocks / s[..., None]), -7, 7).reshape(m.shape)
        deq = (q.reshape(blocks.shape) * s[..., None]).reshape(m.shape)
    else:
        s = np.abs(m).max(axis=1) / 7
        q = np.clip(np.round(m / s[:, None]), -7, 7)
        deq = q * s[:, None]
    shape = (values.shape[axis],) + tuple(d for i, d in enumerate(values.shape) if i != axis)
    back = lambda a: np.moveaxis(a.reshape(shape), 0, axis)  # noqa: E731
    return (back(q).astype(np.int8), s.astype(np.float32), axis, block), back(deq).astype(np.float32)


def _tfq_float_activation(flt, op_name, storage, block):
    """(file, the float file with the dequantized weights) with every op and granularity allowed."""
    from tfq.tflite import int4

    allowed = {k: (v, ("channel", "tensor", "block")) for k, v in INT4_OPS.items()}
    saved = dict(int4.INT4_FLOAT_ACTIVATION_OPS)
    int4.INT4_FLOAT_ACTIVATION_OPS[storage] = allowed
    deqs = {}

    def choose(name, op, values):
        found = _nearest_int4(values, op, block)
        if found is None:
            return None
        deqs[name] = found[1]
        return found[0]

    try:
        content, done, _ = int4.float_weights_to_int4(flt, choose, storage)
    finally:
        int4.INT4_FLOAT_ACTIVATION_OPS.clear()
        int4.INT4_FLOAT_ACTIVATION_OPS.update(saved)
    m = int4.load_model(flt)
    for sg in m.subgraphs:
        for t in sg.tensors:
            if int4.tensor_name(t) in deqs:
                m.buffers[t.buffer].data = np.frombuffer(deqs[int4.tensor_name(t)].tobytes(), np.uint8)
    return (content if done else None), int4.save_model(m)


INT4_OPS = {"FULLY_CONNECTED": 1, "CONV_2D": 1, "DEPTHWISE_CONV_2D": 1}


def _aeq(flt, kind, op_name, x, granularity="CHANNELWISE"):
    """LiteRT's quantizer's 4-bit file of ``flt`` (the benchmark's recipe), calibrated on 20 random samples
    shaped like ``x`` (batch 1)."""
    from benchmark_lib import aeq_int4

    calib = np.concatenate([np.random.default_rng(i).normal(size=x.shape).astype(x.dtype) for i in range(20)])
    return aeq_int4(flt, kind, granularity, calib)


def _types_of(content, op_name):
    from tfq.tflite import int4

    s = int4.schema()
    names = {v: k for k, v in vars(s.TensorType).items() if not k.startswith("_")}
    m = int4.load_model(content)
    out = set()
    for sg in m.subgraphs:
        for op in sg.operators:
            n = int4.op_name(m, op)
            if n in (op_name, "DEQUANTIZE") or (op_name == "GATHER" and n == "EMBEDDING_LOOKUP"):
                for i in op.inputs:
                    if i >= 0 and sg.tensors[i].buffer > 0 and m.buffers[sg.tensors[i].buffer].data is not None:
                        t = sg.tensors[i]
                        q = t.quantization
                        blk = q is not None and q.detailsType == s.QuantizationDetails.BlockwiseQuantization
                        out.add(f"{n}:{names[t.type]}{'/blockwise' if blk else ''}")
    return sorted(out)


def _run(path, resolver, x, tmp):
    xp = os.path.join(tmp, "x.npy")
    np.save(xp, x)
    p = subprocess.run([sys.executable, "-c", _RUNNER, path, resolver, xp], capture_output=True, text=True,
                       timeout=120)
    try:
        res = json.loads(p.stdout.strip().splitlines()[-1])
    except Exception:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"ok": False, "error": f"process died (rc {p.returncode}): {tail[:200]}"}, None
    return res, (np.load(xp + ".out.npy") if res["ok"] else None)


def main():
    models, xs = _models()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for op_name, (model, index) in models.items():
            if "--only" in sys.argv and op_name == "GATHER":
                continue
            x = xs[op_name]
            flt, int8 = _float_and_int8(model, x)
            files = {"float": flt}
            if op_name == "GATHER":
                files["w4a8_int8_ref"], files["w4a8_tfq_int4"] = _gather_pair(int8)
            else:
                from tfq.tflite.int4 import rewrite_int4_weights

                ref8 = _requantize_to_4_bits(int8, op_name, index)  # the test models' biases are 0
                w4, _ = rewrite_int4_weights(ref8, ops={op_name: index})
                files["w4a8_int8_ref"] = ref8
                files["w4a8_tfq_int4"] = w4
                if op_name == "FULLY_CONNECTED":
                    files["w4a8_blockwise_32"] = _blockwise(w4)
            if op_name != "GATHER":
                for storage in ("dynamic", "dequantize"):
                    for block in (0, 32):
                        content, ref = _tfq_float_activation(flt, op_name, storage, block)
                        tag = f"tfq_{storage}_{'blockwise_32' if block else 'channelwise'}"
                        if content is not None:
                            files[tag], files[tag + "_dequantized_ref"] = content, ref
            for kind in (() if "--only" in sys.argv else ("static", "dynamic", "weight_only")):
                for g in ("CHANNELWISE", "BLOCKWISE_32"):
                    try:
                        files[f"aeq_{kind}_{g.lower()}"] = _aeq(flt, kind, op_name, x, g)
                    except Exception as e:  # noqa: BLE001 - recorded in the table
                        rows.append(dict(op=op_name, file=f"aeq_{kind}_{g.lower()}", resolver="-", ok=False,
                                         error=f"quantizer: {str(e).strip().splitlines()[0][:160]}"))
            outs = {}
            for name, content in files.items():
                if name.endswith("_dequantized_ref"):
                    continue
                path = os.path.join(tmp, f"{op_name}_{name}.tflite")
                with open(path, "wb") as f:
                    f.write(content)
                for resolver in ("default", "no_delegate"):
                    res, y = _run(path, resolver, x, tmp)
                    outs[(name, resolver)] = y
                    row = dict(op=op_name, file=name, resolver=resolver, bytes=len(content),
                               weight_types=_types_of(content, op_name), **res)
                    yf = outs.get(("float", resolver))
                    if y is not None and yf is not None and name != "float":
                        row["rel_err_vs_float"] = float(np.abs(y - yf).max() / (np.abs(yf).max() + 1e-12))
                    if name.startswith("tfq_") and not name.endswith("_ref"):
                        path_ref = os.path.join(tmp, f"{op_name}_{name}_dequantized_ref.tflite")
                        with open(path_ref, "wb") as f:
                            f.write(files[name + "_dequantized_ref"])
                        _, yr = _run(path_ref, resolver, x, tmp)
                        if y is not None and yr is not None:
                            row["rel_err_vs_dequantized"] = float(np.abs(y - yr).max() / (np.abs(yr).max() + 1e-12))
                    if name == "w4a8_tfq_int4" and y is not None and outs.get(("w4a8_int8_ref", resolver)) is not None:
                        y8 = outs[("w4a8_int8_ref", resolver)]
                        row["equal_to_int8_ref"] = bool(np.array_equal(y, y8))
                        row["max_diff_vs_int8_ref"] = float(np.abs(y - y8).max())
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if "--json" in sys.argv:
        with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
