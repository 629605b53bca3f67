"""The check that runs after every conversion: the produced ``.tflite`` against the float model.

:func:`check_conversion` runs the converted model in LiteRT's interpreter, in a separate process
(:mod:`tfq.tflite.sandbox`: a kernel that aborts, like INT8 DIV's ``data[i] != zero_point`` check on a
silent input, cannot take the caller down), on a few calibration samples and on edge inputs (all
zeros, and the first sample scaled by 1e-6: silence and near-silence), and compares it with the float
model run on the same inputs. It finds:

* ``"crash"``: the interpreter fails on an input (an error or an abort), naming the op (a kernel that
  aborts without a message is named from the file when its requantization multiplier is out of the range
  LiteRT CHECKs: an int8 ADD whose output range is ~10⁶ times narrower than its inputs',
  :func:`tfq.tflite.info.requantization_aborts`). An abort while the model is prepared is named, not fixed:
  the converter's calibration of the model that keeps the op float would run it in this process;
* ``"nonfinite"``: an output is NaN or inf where the float model's is finite, naming the first op
  whose output is non-finite while its inputs are finite;
* ``"low_sqnr"``: an output whose SQNR against the float model (calibration samples only) is below
  :data:`SQNR_FLOOR_DB`, or more than :data:`SQNR_GAP_DB` below the model's best output;
* ``"io_dtype"``: a model input or output left float when an integer ``io_dtype`` was asked for
  (integer tensors such as token ids or argmax indices keep their type).

:func:`tfq.convert` then fixes what it can (int8: the crashing or NaN op, and the int8 ops feeding it
where their rounding is the cause, kept float through the converter's ``denylisted_nodes``, and the
model converted again), warns naming what it could not (e.g. fp16, whose weights the converter casts
as a whole), or, with ``strict=True``, refuses.

Cost (measured on a shared 2-core machine, median of 3): the worker process starts while the model
converts (0.3–0.8 s of one core, once per Python process); then the check adds 0.06–0.3 s to a
conversion (digits CNN int8 1.26 → 1.48 s, fp16 1.93 → 2.22 s; the DIV front-end fp16 0.47 → 0.53 s):
the interpreter run in the worker (10–40 ms) and one batched eager call of the float model. A model
that needs the fix converts again (the DIV front-end int8: 0.35 → 1.32 s).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from tfq.core.messages import check_bool
from tfq.tflite.info import inspect_tflite
from tfq.tflite.interpreter import interpreter_class
from tfq.tflite.sandbox import Sandbox, prestart

__all__ = ["Finding", "check_conversion", "SQNR_FLOOR_DB", "SQNR_GAP_DB", "NUM_CHECK_SAMPLES"]

NUM_CHECK_SAMPLES = 8
"""Calibration samples the check runs (plus the edge inputs)."""

SQNR_FLOOR_DB = 10.0
"""An output below this SQNR (dB) against the float model is flagged (the outlier threshold of
:func:`tfq.layer_errors` too): its error is a third of its magnitude. Measured on tfq's example models
(random weights, uniform inputs in [0, 1], 8 samples; digits CNN, MobileNet-style, transformer, LSTM):
the lowest healthy output is 36.1 dB in int8 (MobileNet-style), 64.6 dB in int16x8, 52 dB in dynamic,
78 dB in fp16, so no healthy example comes within 26 dB of it; the audio front-end of issue 28 in full
INT8 (5–9 dB) is below it."""

SQNR_GAP_DB = 30.0
"""An output more than this many dB below the model's best output (multi-output models) is flagged."""

_EDGE_SCALE = 1e-6
_FIX_ROUNDS = 3


@dataclass(frozen=True)
class Finding:
    """One defect of a converted model.

    Attributes:
        kind: ``"crash"``, ``"nonfinite"``, ``"low_sqnr"`` or ``"io_dtype"``.
        op_type: the op at fault (e.g. ``"DIV"``), when known.
        tensors: names of the output tensors of the op(s) at fault (they carry the Keras layer names).
        nodes: the tensors whose ops to keep float to fix it (the op at fault; for a float op making NaN,
            also the int8 ops that feed it through a DEQUANTIZE: their rounding, e.g. of an epsilon to 0,
            is the cause).
        where: the input it happened on, e.g. ``"the all-zeros input"``, or the output it concerns.
        detail: the interpreter's message, the SQNR, or the dtype found.
    """

    kind: str
    op_type: str | None
    tensors: tuple[str, ...]
    where: str
    detail: str
    nodes: tuple[str, ...] = ()

    def describe(self) -> str:
        op = f"op {self.op_type}" if self.op_type else "an op"
        if self.kind == "crash":
            return f"{op} fails in LiteRT's interpreter on {self.where} ({self.detail})"
        if self.kind == "nonfinite":
            return f"{op} outputs NaN/inf on {self.where} where the float model is finite"
        if self.kind == "low_sqnr":
            return f"{self.where} is at {self.detail} against the float model"
        return f"{self.where} is {self.detail}"


def _samples(data, keras_model, input_details, num_samples):
    """(samples, labels, calibration count): lists of arrays with a batch axis of 1, interpreter order."""
    samples, labels = [], []
    if data is not None:
        from tfq.core.representative import representative_dataset

        for batch in representative_dataset(data, num_samples, model=keras_model):
            for j in range(len(batch[0])):
                samples.append([np.asarray(a[j:j + 1]) for a in batch])
                labels.append(f"calibration sample {len(labels)}")
            if len(samples) >= num_samples:
                break
        samples, labels = samples[:num_samples], labels[:num_samples]
    calibration = len(samples)
    if samples:
        template = samples[0]
    else:
        shapes = [d.get("shape_signature", d["shape"]) for d in input_details]
        if any(int(v) < 0 for s in shapes for v in s[1:]):
            return [], [], 0  # dynamic sizes and no data: nothing to build an input from
        template = [np.zeros([1, *[int(v) for v in s[1:]]], np.float32 if np.issubdtype(d["dtype"], np.integer)
                             and d["quantization"][0] else d["dtype"]) for s, d in zip(shapes, input_details)]
    if all(np.issubdtype(a.dtype, np.floating) for a in template):
        samples.append([np.zeros_like(a) for a in template])
        labels.append("the all-zeros input")
        if calibration:
            samples.append([a * np.asarray(_EDGE_SCALE, a.dtype) for a in template])
            labels.append(f"calibration sample 0 × {_EDGE_SCALE:g} (near silence)")
    return samples, labels, calibration


def _keras_reference(model, samples, input_names):
    """Float outputs of a Keras model per sample (a list per sample, in the model's output order).

    One eager call on all samples stacked (10 samples cost about one call); one call per sample when
    the model takes a fixed batch size."""
    def call(arrays):
        y = model(arrays if len(arrays) > 1 else arrays[0], training=False)
        if isinstance(y, dict):
            y = [y[k] for k in sorted(y)]
        elif not isinstance(y, (list, tuple)):
            y = [y]
        return [np.asarray(v.numpy() if hasattr(v, "numpy") else v).astype(np.float32) for v in y]

    try:
        stacked = call([np.concatenate([s[k] for s in samples]) for k in range(len(samples[0]))])
        if all(len(y) == len(samples) for y in stacked):
            return [[y[i:i + 1] for y in stacked] for i in range(len(samples))]
    except Exception:  # noqa: BLE001 - a fixed batch size, or a model that cannot batch: one call per sample
        pass
    return [call(sample) for sample in samples]


def _saved_model_reference(path, samples, input_names):
    """Float outputs of a SavedModel's serving signature per sample, keyed by output name."""
    import tensorflow as tf

    fn = tf.saved_model.load(str(path)).signatures["serving_default"]
    out = []
    for sample in samples:
        y = fn(**{name: tf.constant(a) for name, a in zip(input_names, sample)})
        out.append({k: v.numpy().astype(np.float32) for k, v in y.items()})
    return out


def _tflite_reference(content, samples, output_names, sandbox):
    """Float outputs of a float ``.tflite`` per sample (interpreter order, matched to ``output_names``
    by signature key when both have them), run in the worker; None when the float model itself fails."""
    result = (sandbox or prestart()).run(content, samples)
    if result.failed_sample is not None:
        return None
    ref = result.outputs
    if output_names and result.output_names and sorted(output_names) == sorted(result.output_names):
        position = {name: k for k, name in enumerate(result.output_names)}
        ref = [[r[position[name]] for name in output_names] for r in ref]
    return ref


def _input_details(content):
    """Input details and signature input names (by tensor index), read without allocating tensors: a
    kernel's Prepare runs only in the worker process."""
    interpreter = interpreter_class()(model_content=content)
    details = interpreter.get_input_details()
    name_of = {}
    try:
        signatures = interpreter.get_signature_list()
        if len(signatures) == 1:
            runner = interpreter.get_signature_runner(next(iter(signatures)))
            name_of = {d["index"]: name for name, d in runner.get_input_details().items()}
    except (ValueError, RuntimeError, KeyError):
        name_of = {}
    return details, name_of


def _culprit_ops(info, message):
    """Ops named by an interpreter message: ``Node number 4 (DIV)``, or the kernel file (``kernels/div.cc``)."""
    node = re.search(r"Node number (\d+) \((\w+)\)", message)
    if node:
        index, op_type = int(node.group(1)), node.group(2)
        if index < len(info.ops) and info.ops[index].type == op_type:
            return op_type, [info.ops[index]]
        return op_type, [op for op in info.ops if op.type == op_type]
    kernel = re.search(r"kernels/(?:internal/)?(?:\w+/)*(\w+)\.cc", message)
    if kernel:
        op_type = kernel.group(1).upper()
        ops = [op for op in info.ops if op.type == op_type]
        if ops:
            return op_type, ops
    return None, []


def _int8_feeders(info, op) -> list:
    """The int8 ops whose outputs reach the float op ``op`` through a DEQUANTIZE."""
    if op is None or not op.is_float:
        return []
    producer = {o: p for p in info.ops for o in p.outputs}
    feeders = []
    for i in op.inputs:
        dq = producer.get(i)
        if dq is not None and dq.type == "DEQUANTIZE" and dq.inputs:
            src = producer.get(dq.inputs[0])
            if src is not None and src.type not in ("QUANTIZE", "DEQUANTIZE"):
                feeders.append(src)
    return feeders


def _first_nonfinite_op(info, bad):
    bad = set(bad)
    for op in info.ops:
        if any(o in bad for o in op.outputs) and not any(i in bad for i in op.inputs if i >= 0):
            return op
    return None


def check_conversion(content: bytes, model, data=None, *, io_dtype: str = "float32",
                     sandbox: Sandbox | None = None, num_samples: int = NUM_CHECK_SAMPLES) -> list[Finding]:
    """Runs ``content`` against the float ``model`` and returns what is wrong with it (empty: nothing).

    Args:
        content: the converted ``.tflite`` bytes.
        model: the float reference: a Keras model (or tfq QAT model), a SavedModel directory, or the
            float ``.tflite`` bytes the model was quantized from.
        data: calibration data (any form :func:`tfq.convert` takes); None: the edge inputs only.
        io_dtype: the input/output type asked for; ``"float32"`` leaves them free.
        sandbox: the worker process (default: the process's own, :func:`tfq.tflite.sandbox.prestart`).
        num_samples: calibration samples run.

    Returns:
        A list of :class:`Finding`, crashes and non-finite outputs first.

    Example:
        >>> findings = check_conversion(tflite_bytes, model, x_train[:8])     # doctest: +SKIP
        >>> [f.describe() for f in findings]                                  # doctest: +SKIP
        ['op DIV crashes the interpreter on the all-zeros input (…data[i] != zero_point…)']
    """
    info = inspect_tflite(content)
    findings = _io_findings(info, io_dtype)
    details, name_of = _input_details(content)
    tflite_names = [name_of.get(d["index"]) for d in details]
    is_tflite = isinstance(model, (bytes, bytearray, memoryview))
    is_keras = not is_tflite and (hasattr(model, "layers") or hasattr(model, "inputs"))
    keras_model = model if is_keras else None
    try:
        samples, labels, calibration = _samples(data, keras_model, details, num_samples)
    except (ValueError, TypeError):
        return findings  # data the conversion took but we cannot slice: the check cannot run
    if not samples:
        return findings
    run_samples = samples  # in the interpreter's input order
    if is_keras and len(details) > 1:
        keras_names = [t.name.split(":")[0] for t in getattr(model, "inputs", [])]
        if None not in tflite_names and sorted(keras_names) == sorted(tflite_names):
            position = {name: i for i, name in enumerate(keras_names)}
            run_samples = [[sample[position[name]] for name in tflite_names] for sample in samples]
    result = (sandbox or prestart()).run(content, run_samples, scan=range(calibration, len(samples)))
    try:
        if is_tflite:
            ref = _tflite_reference(bytes(model), run_samples, result.output_names, sandbox)
            if ref is None:
                return findings
        elif is_keras:
            ref = _keras_reference(model, samples, tflite_names)
        else:
            ref_dicts = _saved_model_reference(model, samples, tflite_names)
    except Exception:  # noqa: BLE001 - the float model itself fails on an edge input: nothing to compare
        return findings
    if is_tflite:
        pass
    elif not is_keras:
        names = result.output_names or []
        ref = [[d[n] for n in names] if names and all(n in d for n in names) else [d[k] for k in sorted(d)]
               for d in ref_dicts]
    else:
        ref = [_in_interpreter_order(r, result.output_names) for r in ref]

    if result.failed_sample is not None:
        op_type, ops = _culprit_ops(info, result.message)
        kind = "abort" if result.aborted else "error"
        where = "loading (allocate_tensors)" if result.failed_sample < 0 else labels[result.failed_sample]
        # An op that aborts when its kernel is prepared aborts the converter's own calibration of the model
        # that keeps it float too (it runs the int8 ops in this process): named, never converted again.
        fixable = not (result.aborted and result.failed_sample < 0)
        findings.insert(0, Finding("crash", op_type, _tensor_names(info, ops), where,
                                   f"{kind}: {result.message[:300]}", _tensor_names(info, ops) if fixable else ()))
    produced = {o for op in info.ops for o in op.outputs}
    for i, bad in sorted(result.nonfinite_tensors.items()):
        if i >= len(ref) or not all(np.all(np.isfinite(r)) for r in ref[i]):
            continue
        # Only tensors ops produce: a kernel's scratch tensors (hybrid kernels' scaling factors, accumulators),
        # kept by the debug run, may hold uninitialised memory (seen as NaN in 2 of 15 checks of a w4_dynamic CNN).
        bad = [t for t in bad if t in produced]
        if not bad:
            continue
        op = _first_nonfinite_op(info, bad)
        ops = [op] if op else []
        findings.insert(0, Finding("nonfinite", op.type if op else None, _tensor_names(info, ops), labels[i],
                                   "NaN/inf", _tensor_names(info, ops + _int8_feeders(info, op))))
        break
    findings += _sqnr_findings(ref[:calibration], result.outputs[:calibration], result.output_names)
    return findings


def _in_interpreter_order(outputs, output_names):
    """Keras outputs (model order) in the interpreter's order, through the signature keys ``output_<i>``."""
    if not output_names or len(output_names) != len(outputs):
        return outputs
    order = []
    for name in output_names:
        m = re.fullmatch(r"output_(\d+)", name or "")
        if not m or int(m.group(1)) >= len(outputs):
            return outputs
        order.append(int(m.group(1)))
    return [outputs[k] for k in order]


def _tensor_names(info, ops) -> tuple[str, ...]:
    return tuple(info.tensors[o].name for op in ops for o in op.outputs[:1])


def _io_findings(info, io_dtype: str) -> list[Finding]:
    if io_dtype in (None, "float32"):
        return []
    want = io_dtype.upper()
    found = []
    for kind, indices in (("input", info.inputs), ("output", info.outputs)):
        for k, index in enumerate(indices):
            tensor = info.tensors[index]
            if tensor.dtype != want and tensor.dtype in ("FLOAT32", "FLOAT16", "FLOAT64"):  # ids, masks stay theirs
                found.append(Finding("io_dtype", None, (tensor.name,), f"{kind} {k} ({tensor.name!r})",
                                     f"{tensor.dtype.lower()}, not io_dtype={io_dtype!r}"))
    return found


def _sqnr_findings(ref, out, output_names) -> list[Finding]:
    from_samples = [(r, o) for r, o in zip(ref, out) if len(r) == len(o)]
    if not from_samples:
        return []
    per_output = []
    for k in range(len(from_samples[0][0])):
        r = np.concatenate([np.ravel(s[0][k]).astype(np.float64) for s in from_samples])
        o = np.concatenate([np.ravel(s[1][k]).astype(np.float64) for s in from_samples])
        if r.shape != o.shape or not np.all(np.isfinite(r)):
            per_output.append(math.nan)
            continue
        noise, signal = float(np.sum((r - o) ** 2)), float(np.sum(r ** 2))
        ratio = signal / noise if noise else math.inf  # noise inf (an int8 output overflowed): ratio 0, -inf dB
        per_output.append(math.inf if noise == 0 else (-math.inf if ratio == 0 else 10 * math.log10(ratio)))
    finite = [s for s in per_output if not math.isnan(s)]
    best = max(finite) if finite else math.nan
    found = []
    for k, s in enumerate(per_output):
        if math.isnan(s):
            continue
        gap = len(per_output) > 1 and math.isfinite(best) and best - s > SQNR_GAP_DB
        if s < SQNR_FLOOR_DB or gap:
            name = output_names[k] if output_names and output_names[k] else str(k)
            best_text = f", best output {best:.1f} dB" if len(per_output) > 1 else ""
            found.append(Finding("low_sqnr", None, (), f"output {name!r}", f"{s:.1f} dB SQNR{best_text}"))
    return found


def check_keywords(check, strict) -> None:
    """``check``/``strict`` are booleans, and ``strict`` needs the check; starts the checker process early."""
    for name, value in (("check", check), ("strict", strict)):
        check_bool(name, value)
    if strict and not check:
        raise ValueError("strict=True refuses what the check finds, so it needs check=True. Received: check=False, "
                         "strict=True")
    if check:
        prestart()  # the worker imports LiteRT while the model converts


def checked(content: bytes, model, data, *, mode: str, io_dtype: str = "float32", strict: bool = False,
            reconvert=None, layer_names=(), stacklevel: int = 3) -> bytes:
    """``content`` after :func:`check_conversion`: fixed, warned about, or refused.

    A crashing or NaN op is fixed when ``reconvert`` is given: ``reconvert(nodes)`` converts again with
    the ops making those tensors kept float (:attr:`Finding.nodes`), and the result is checked again, up
    to 3 rounds (a float DIV of an int8 epsilon rounded to 0 makes NaN: the second round keeps the ADD
    float too). A warning names the op, the layer its tensors come from (``layer_names``) and the ops
    kept float. Anything else is named in one warning, or, with
    ``strict``, refused with a :class:`~tfq.tflite.converter.ConversionError`. An ``io_dtype`` that is
    not honoured on every input and output is always refused.
    """
    import warnings

    from tfq.tflite.converter import ConversionError

    findings = check_conversion(content, model, data, io_dtype=io_dtype)
    io = [f for f in findings if f.kind == "io_dtype"]
    if io:
        raise ConversionError(
            f"io_dtype={io_dtype!r} is not honoured: {io[0].where} stays {io[0].detail.split(',')[0]} "
            f"({len(io)} input/output(s) in all), because the op that makes it has no {io_dtype} kernel or is kept "
            f"float. Pass io_dtype='float32', or keep that op quantized (drop it from float_layers).")
    broken = [f for f in findings if f.kind in ("crash", "nonfinite")]
    if broken and strict:
        fix = (f"Without strict=True, tfq keeps that {broken[0].op_type} op float" if reconvert and broken[0].nodes
               else _fix_hint(broken[0], (), mode))
        raise ConversionError(f"the {mode} model is broken: {broken[0].describe()}. {fix} (strict=True refuses "
                              f"instead of fixing).")
    first, kept = (broken[0] if broken else None), []
    for _ in range(_FIX_ROUNDS if reconvert is not None else 0):
        new = [n for f in broken for n in f.nodes if n not in kept]
        if not new:
            break
        kept += new
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the first conversion's warnings were given already
            content = reconvert(kept)
        findings = check_conversion(content, model, data, io_dtype=io_dtype)
        io = [f for f in findings if f.kind == "io_dtype"]
        if io:
            raise ConversionError(
                f"{first.describe()}; keeping {len(kept)} op(s) float fixes it, but then {io[0].where} is "
                f"{io[0].detail}. Pass io_dtype='float32' to accept that, or strict=True to refuse the model.")
        broken = [f for f in findings if f.kind in ("crash", "nonfinite")]
    if kept and not broken:
        layers = _layers_of([first], layer_names)
        where = f" (layer {', '.join(map(repr, layers))})" if layers else ""
        ops = ", ".join(repr(n) for n in kept[:4]) + (" …" if len(kept) > 4 else "")
        warnings.warn(f"tfq: {first.describe()}{where}; op(s) {ops} kept float, and the model now runs. Pass "
                      f"strict=True to refuse such a model instead.", stacklevel=stacklevel)
    if broken:
        warnings.warn(f"tfq: the {mode} model is broken: {broken[0].describe()}. "
                      f"{_fix_hint(broken[0], layer_names, mode)}", stacklevel=stacklevel)
    low = [f for f in findings if f.kind == "low_sqnr"]
    if low and strict:
        raise ConversionError(f"the {mode} model is far from the float model: {low[0].describe()} (threshold "
                              f"{SQNR_FLOOR_DB:g} dB, or {SQNR_GAP_DB:g} dB below the best output). Keep the layers "
                              f"that make it float (float_layers=[...]) or use mode='int16x8'.")
    if low:
        warnings.warn(f"tfq: the {mode} model is far from the float model: "
                      f"{'; '.join(f.describe() for f in low[:3])}. Find the layer with tfq.layer_errors and keep it "
                      f"float (float_layers=[...]).", stacklevel=stacklevel)
    return content


def convert_keeping_float(converter, nodes, mode: str) -> bytes:
    """``converter``'s int8 conversion with the ops making the tensors ``nodes`` kept float.

    Through ``tf.lite.experimental.QuantizationDebugger``'s ``denylisted_ops``, the converter's public
    route to selective quantization (``denylisted_nodes``: output tensor names, stable from one
    conversion of a model to the next) (it works on a SavedModel as on a Keras graph). The converter must
    have its representative dataset; float kernels are allowed for the denylisted ops. Its model has
    float inputs and outputs (the debugger quantizes without ``inference_input_type``).
    """
    import contextlib
    import io
    import warnings

    import tensorflow as tf

    from tfq.tflite.converter import (
        ConversionError,
        _captured_stderr,
        summarize_converter_error,
    )

    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=list(nodes))
    failure = None
    with _captured_stderr() as stderr:
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                debugger = tf.lite.experimental.QuantizationDebugger(
                    converter=converter, debug_dataset=converter.representative_dataset, debug_options=options)
                return debugger.get_nondebug_quantized_model()
        except Exception as err:  # noqa: BLE001 - the converter's errors, summarised below
            failure = str(err)
    raise ConversionError(summarize_converter_error(failure + "\n" + "".join(stderr), mode))


def _layers_of(findings, layer_names) -> list[str]:
    """The Keras layers the findings' tensors come from (the longest layer name in each tensor name)."""
    names = sorted(set(layer_names), key=len, reverse=True)
    out = []
    for f in findings:
        for tensor in f.tensors:
            for part in re.split(r"[;/]", tensor):
                hit = next((n for n in names if n == part or re.fullmatch(re.escape(n) + r"_\d+", part)), None)
                if hit and hit not in out:
                    out.append(hit)
    return out


def _fix_hint(finding, layer_names, mode: str) -> str:
    """What the user can do about ``finding``, naming the layers its op comes from."""
    layers = _layers_of([finding], layer_names)
    where = f"It comes from layer(s) {', '.join(map(repr, layers))}. " if layers else ""
    if finding.kind == "nonfinite" and mode == "fp16":
        return (f"{where}A constant too small for float16 (e.g. an epsilon under 6e-8 becomes 0) is the usual cause: "
                f"use mode='float' or 'dynamic', or a larger epsilon.")
    return (f"{where}Keep that layer float (float_layers=[...], with representative_data so the converter can keep "
            f"its inner ops float), or use mode='dynamic' (float activations).")
