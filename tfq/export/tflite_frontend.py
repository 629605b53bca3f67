"""The front-end below Keras: a float ``.tflite`` (or a SavedModel, or a ``TFSMLayer`` model) → INT8,
with tfq's calibration choosing the ranges.

A model tfq cannot rewrite as a Keras graph still has a float ``.tflite`` (a SavedModel or a
``keras.layers.TFSMLayer`` model becomes one through the plain TFLite converter, no optimisation).
This module:

1. runs that float model in LiteRT's interpreter (``experimental_preserve_all_tensors=True``) over
   the calibration samples, one sample at a time, and feeds every float activation tensor (model
   inputs and op outputs) to tfq's observers (:mod:`tfq.numerics.observers`) and to the outlier test
   (:mod:`tfq.numerics.outliers`): the same calibration methods as for a Keras model, the same
   robust default (``"robust_minmax"``: MinMax over the samples not far outside the rest);
2. hands those ranges to LiteRT's quantizer (``ai-edge-quantizer``), which writes the quantized
   ``.tflite`` from a recipe (regex on an op's output tensor names → op config): int8 weights
   (per-channel by default) and int8 activations, the ops chosen by ``int16_ops`` with int16
   activations, those chosen by ``float_ops`` kept float (QUANTIZE/DEQUANTIZE around them).

Why this engine (measured with ``scripts/frontend_engines.py``, table in docs/guides/ptq.md; SQNR of
the outputs against the float ``.tflite`` in LiteRT, held-out samples): on a digits CNN SavedModel the
plain converter's INT8 reaches 45.58 dB, LiteRT's quantizer with its own calibration (a moving average
of per-sample extremes) 27.24 dB, and the same quantizer fed tfq's ``robust_minmax`` ranges 45.58 dB;
on an audio-like SavedModel (STFT magnitude / (max + 1e-6) → log → Dense) 20.36, 14.99 and 20.36 dB,
all three crashing on silence (INT8 DIV), while ``tfq.convert`` keeps the DIV float (the check) and
reaches 22.48 dB. So tfq's calibration chooses the ranges and LiteRT's quantizer writes the file: as
good as the converter where the converter works, every calibration method, and any named op kept
float or int16 — which the converter cannot do for a model without Keras layers.

Example:
    >>> content = float_tflite(saved_model_dir)                                    # doctest: +SKIP
    >>> [row for row in op_table(content)][:2]                                     # doctest: +SKIP
    [(0, 'CONV_2D', 'sequential_1/conv2d_1/Relu;sequential_1/conv2d_1/convolution'), (1, 'RESHAPE', ...)]
"""

from __future__ import annotations

import difflib
import re
import warnings

import numpy as np

from tfq.core.calibration_methods import DEFAULT_CALIBRATION
from tfq.core.export_modes import get_export_mode
from tfq.core.messages import short_repr
from tfq.core.recipes import TensorSpec
from tfq.ptq.calibration import Calibration
from tfq.ptq.tflite_calibration import (
    _float_activation_tensors,
    calibrate_tflite,
    float_tflite,
    has_tfsm_layer,
    is_tflite_input,
)
from tfq.tflite.info import inspect_tflite
from tfq.tflite.interpreter import load_tflite_bytes

__all__ = [
    "AEQ_INSTALL",
    "calibrate_tflite",
    "convert_tflite",
    "float_tflite",
    "has_tfsm_layer",
    "is_tflite_input",
    "op_table",
    "quantize_tflite",
    "select_ops",
]

AEQ_INSTALL = "pip install ai-edge-quantizer"

# ----------------------------------------------------------------------------------------- op table
def _scope(info, op) -> str:
    """An op's scope for LiteRT's quantizer: its output tensor names joined by ``;`` with a trailing ``;``."""
    names = [info.tensors[o].name for o in op.outputs if o >= 0 and info.tensors[o].name]
    return ";".join(names) + ";" if names else ""


def op_table(content) -> list[tuple[int, str, str]]:
    """Every op of the main subgraph: ``(op index, op type, output tensor name)``.

    The candidates for ``float_layers`` / ``int16_layers`` of :func:`tfq.convert` on a float
    ``.tflite``: pass an op type (``"DIV"``) or an output tensor name (a regex, ``re.fullmatch``).

    Args:
        content: ``.tflite`` bytes or path (a SavedModel or TFSMLayer model: :func:`float_tflite` first).

    Example:
        >>> import keras
        >>> from tfq.export.graph_converter import keras_graph_converter
        >>> inp = keras.Input((4,))
        >>> m = keras.Model(inp, keras.layers.Dense(2, name="head")(inp))
        >>> content = keras_graph_converter(m).convert()
        >>> [(i, t) for i, t, _ in op_table(content)]
        [(0, 'FULLY_CONNECTED')]
    """
    info = inspect_tflite(load_tflite_bytes(content))
    return [(i, op.type, info.tensors[op.outputs[0]].name if op.outputs else "") for i, op in enumerate(info.ops)]


def select_ops(content: bytes, patterns, keyword: str) -> list[int]:
    """Indices of the ops that ``patterns`` name: an op type (``"DIV"``, case-insensitive), a regex
    fully matching one of an op's output tensor names or one of its ``;``-separated parts (the
    converter names a fused op ``relu;conv;bias``), or an op index (an int).

    Raises:
        ValueError: a pattern that matches no op (naming the nearest op types and names), or a bad regex.
        TypeError: a pattern that is not a string or an int.
    """
    if isinstance(patterns, (str, int)):
        patterns = [patterns]
    table = op_table(content)
    info = inspect_tflite(content)
    types = sorted({t for _, t, _ in table})
    chosen: set[int] = set()
    for pattern in patterns:
        if isinstance(pattern, bool) or not isinstance(pattern, (str, int)):
            raise TypeError(f"{keyword} items of a .tflite/SavedModel are op types (e.g. 'DIV'), output tensor names "
                            f"or regexes, or op indices. Received: {short_repr(pattern)}")
        if isinstance(pattern, int):
            if not 0 <= pattern < len(table):
                raise ValueError(f"{keyword}: op index {pattern} is outside the model's {len(table)} ops (0 to "
                                 f"{len(table) - 1}); list them with tfq.export.tflite_frontend.op_table.")
            chosen.add(pattern)
            continue
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{keyword}: {pattern!r} is not a valid regex ({err}). Pass an op type such as 'DIV' "
                             f"or an output tensor name.") from None
        hits = {i for i, t, _ in table if t == pattern.upper() and pattern.upper() in types}
        for i, op in enumerate(info.ops):
            names = [info.tensors[o].name for o in op.outputs if o >= 0]
            parts = [p for n in names for p in n.split(";")]  # the converter joins fused ops' names with ";"
            if any(regex.fullmatch(n) for n in names + parts):
                hits.add(i)
        if not hits:
            names = [n for _, _, n in table]
            near = difflib.get_close_matches(pattern.upper(), types, n=3, cutoff=0.5) + \
                difflib.get_close_matches(pattern, names, n=3, cutoff=0.3)
            hint = f"nearest: {', '.join(map(repr, near))}" if near else f"op types: {', '.join(types[:12])}"
            raise ValueError(f"{keyword}={pattern!r} matches no op of the model ({hint}). Pass an op type or an output "
                             f"tensor name (regex, full match) from tfq.export.tflite_frontend.op_table.")
        chosen |= hits
    return sorted(chosen)


# ----------------------------------------------------------------------------------------- quantization
def litert_quantizer():
    """LiteRT's quantizer's modules (qtyping, quantizer, recipe_manager), or a one-line ImportError saying how to
    install it."""
    try:
        from ai_edge_quantizer import qtyping, quantizer, recipe_manager
    except ImportError:
        raise ImportError(f"tfq quantizes a float .tflite/SavedModel with LiteRT's quantizer, which is not installed: "
                          f"{AEQ_INSTALL}") from None
    return qtyping, quantizer, recipe_manager


def _qsvs(info, ranges: dict) -> dict:
    """Ranges as LiteRT's quantizer's calibration result: ``{tensor: {"min": array, "max": array}}``
    (keepdims-shaped like its own calibrator's)."""
    out = {}
    for t in info.tensors:
        if t.name in ranges:
            lo, hi = ranges[t.name]
            shape = [1] * len(t.shape)
            out[t.name] = {"min": np.full(shape, lo, np.float32),
                           "max": np.full(shape, hi, np.float32)}
    return out


def quantize_tflite(content: bytes, ranges: dict, *, per_channel: bool = True, float_ops=(), int16_ops=(),
                    io_dtype: str = "float32") -> bytes:
    """The float ``.tflite`` quantized by LiteRT's quantizer with the ``ranges`` given.

    Args:
        content: float ``.tflite`` bytes.
        ranges: ``{tensor name: (min, max)}`` for every float activation tensor (:func:`calibrate_tflite`).
        per_channel: per-output-channel weight scales (else per tensor).
        float_ops: op indices kept float.
        int16_ops: op indices with int16 activations (int8 weights).
        io_dtype: ``"float32"`` (float model inputs/outputs, QUANTIZE/DEQUANTIZE inside) or ``"int8"``.

    Returns:
        The quantized ``.tflite`` bytes (same inputs: same bytes).
    """
    qtyping, quantizer, recipe_manager = litert_quantizer()
    info = inspect_tflite(content)
    ops = qtyping.TFLOperationName
    granularity = qtyping.QuantGranularity.CHANNELWISE if per_channel else qtyping.QuantGranularity.TENSORWISE
    rm = recipe_manager.RecipeManager()
    rm.add_static_config(".*", ops.ALL_SUPPORTED, activation_num_bits=8, weight_num_bits=8,
                         weight_granularity=granularity)
    if io_dtype == "float32":
        for io in (ops.INPUT, ops.OUTPUT):
            rm.add_quantization_config(".*", io, algorithm_key="no_quantize")
    known = {v.value: v for v in ops}
    for indices, kind in ((int16_ops, 16), (float_ops, None)):
        for i in sorted(set(indices)):
            op = info.ops[i]
            scope = _scope(info, op)
            name = known.get(op.type)
            if not scope or name is None:
                continue  # an op LiteRT's quantizer does not know stays float anyway
            regex = "^" + re.escape(scope) + "$"
            if kind is None:
                rm.add_quantization_config(regex, name, algorithm_key="no_quantize")
            else:
                rm.add_static_config(regex, name, activation_num_bits=16, weight_num_bits=8,
                                     weight_granularity=granularity)
    qt = quantizer.Quantizer(bytearray(content))
    qt.load_quantization_recipe(rm.get_quantization_recipe())
    import absl.logging

    level = absl.logging.get_verbosity()
    absl.logging.set_verbosity(absl.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")  # its own check's
            result = qt.quantize(_qsvs(info, ranges), enable_progress_report=False, enable_progress_bar=False)
    finally:
        absl.logging.set_verbosity(level)
    return bytes(result.quantized_model)


# ----------------------------------------------------------------------------------------- the route
def nodes_to_ops(flt_info, nodes) -> list[int]:
    """Float-model op indices making the tensors named ``nodes`` (names of the quantized model: the
    quantizer keeps an op's output name, or adds a suffix such as ``_dequant``)."""
    wanted = set()
    for n in nodes:
        wanted.add(n)
        wanted.add(re.sub(r"_(dequant|quantized|requantized)\d*$", "", n))
    return sorted(i for i, op in enumerate(flt_info.ops)
                  if any(flt_info.tensors[o].name in wanted for o in op.outputs if o >= 0))


def convert_tflite(model, data, *, mode: str = "int8", calibration=DEFAULT_CALIBRATION,
                   calibration_params: dict | None = None, per_channel: bool = True, float_layers=(),
                   int16_layers=(), num_calibration_samples: int | None = None, io_dtype: str = "float32",
                   check: bool = True, strict: bool = False) -> bytes:
    """A float ``.tflite`` / SavedModel / TFSMLayer model quantized with tfq's calibration (what
    :func:`tfq.convert` runs for such a model; see there for the arguments).

    ``float_layers`` / ``int16_layers``: op types or output tensor names (regex, full match) or op
    indices (:func:`op_table`). ``mode="int16x8"``: every op with int16 activations.
    """
    from tfq.export import check as checker

    flt = float_tflite(model)
    info = inspect_tflite(flt)
    float_ops = select_ops(flt, float_layers, "float_layers") if float_layers else []
    int16_ops = select_ops(flt, int16_layers, "int16_layers") if int16_layers else []
    both = sorted(set(float_ops) & set(int16_ops))
    if both:
        op = info.ops[both[0]]
        raise ValueError(f"op {both[0]} ({op.type}, {info.tensors[op.outputs[0]].name!r}) is chosen by both "
                         f"float_layers and int16_layers. Keep it in one of them.")
    all_int16 = TensorSpec(**get_export_mode(mode).default_activations).bits == 16  # int16x8
    if all_int16:
        int16_ops = sorted(set(range(len(info.ops))) - set(float_ops))
    int16_tensors = {info.tensors[o].name: 16 for i in int16_ops for o in info.ops[i].outputs if o >= 0}
    if isinstance(calibration, Calibration):
        if num_calibration_samples is not None:
            raise ValueError(f"num_calibration_samples={num_calibration_samples} caps the samples tfq calibrates on, "
                             f"but calibration is a tfq.Calibration whose ranges are chosen already: drop "
                             f"num_calibration_samples, or pass calibration='{DEFAULT_CALIBRATION}'.")
        ranges = _precomputed(calibration, info)
        data_for_check = data
    else:
        if data is None:
            raise ValueError(f"mode={mode!r} needs representative_data (a few hundred typical inputs) to choose "
                             f"activation ranges. Pass representative_data=x_train[:300].")
        ranges = calibrate_tflite(flt, data, calibration, num_samples=num_calibration_samples,
                                  params=calibration_params, bits=int16_tensors).ranges
        data_for_check = data
    qt_io = io_dtype if io_dtype == "float32" else "int"

    def build(extra_float=()):
        return quantize_tflite(flt, ranges, per_channel=per_channel,
                               float_ops=sorted(set(float_ops) | set(extra_float)), int16_ops=[i for i in int16_ops if i not in set(extra_float)], io_dtype=qt_io)

    content = build()
    _check_selection(content, info, float_ops, int16_ops, mode, all_int16)
    if not float_layers:
        _warn_float_ops(content, mode)
    if not check:
        return content
    return checker.checked(content, flt, data_for_check, mode=mode, io_dtype=io_dtype, strict=strict,
                           reconvert=lambda nodes: build(nodes_to_ops(info, nodes)), stacklevel=6)


def _check_selection(content: bytes, info, float_ops, int16_ops, mode: str, all_int16: bool) -> None:
    """Every op asked float has float outputs in the file and every op asked int16 has int16 outputs (LiteRT's
    quantizer falls back to its int8 rule, silently, for an op it has no int16 rule for): else a one-line
    error (``int16_layers``) or warning (``mode="int16x8"``) naming the ops."""
    types = {t.name: t.dtype for t in inspect_tflite(content).tensors}

    def missed(indices, dtype, also_ok=()):
        out = []
        for i in indices:
            names = [info.tensors[o].name for o in info.ops[i].outputs
                     if o >= 0 and info.tensors[o].dtype == "FLOAT32"]
            if names and any(types.get(n) not in (dtype, None, *also_ok) for n in names):
                out.append(f"{i} ({info.ops[i].type}, {names[0]!r})")
        return out

    floats = missed(float_ops, "FLOAT32")
    if floats:
        raise ValueError(f"float_layers: op(s) {', '.join(floats[:3])} could not be kept float by LiteRT's quantizer. "
                         f"Name the op(s) after it in float_layers too, or report the model.")
    int16 = missed(int16_ops, "INT16", ("FLOAT32",) if all_int16 else ())  # float ones: warned after
    if int16 and all_int16:
        warnings.warn(f"tfq: {len(int16)} op(s) of the {mode} model have int8, not int16, activations (LiteRT's "
                      f"quantizer has no int16 rule for them): {', '.join(int16[:4])}.", stacklevel=6)
    elif int16:
        raise ValueError(f"int16_layers: LiteRT's quantizer has no int16 rule for op(s) {', '.join(int16[:3])}. Drop "
                         f"them from int16_layers (they stay int8, or float where there is no int8 rule either), or "
                         f"keep them float (float_layers).")


#: Ops that read only a tensor's shape: float in, integer out, nothing to quantize.
_SHAPE_ONLY = frozenset({"SHAPE", "RANK"})


def _warn_float_ops(content: bytes, mode: str) -> None:
    """One warning naming the op types left float that the user did not choose (no int8 rule in LiteRT's
    quantizer, or no int8 kernel in TFLite), as the Keras route warns."""
    info = inspect_tflite(content)
    left = [op for op in info.float_ops if op.type not in _SHAPE_ONLY]
    if not left:
        return
    types = sorted({op.type for op in left})
    warnings.warn(f"tfq: {len(left)} op(s) of the {mode} model stay float: LiteRT's quantizer has no {mode} rule or "
                  f"TFLite no {mode} kernel for them ({', '.join(types)}). The rest is {mode}; list them in "
                  f"float_layers (e.g. float_layers={types[:2]!r}) to accept this.", stacklevel=6)


def _precomputed(calibration: Calibration, info) -> dict:
    from tfq.ptq.calibration import check_ranges

    ranges = check_ranges(calibration.ranges)
    names = {info.tensors[i].name for i in _float_activation_tensors(info)}
    missing = sorted(names - set(ranges))
    if missing:
        raise ValueError(f"the calibration has no range for {len(missing)} tensor(s) of this model (e.g. "
                         f"{missing[0]!r}): it was made for another model. Calibrate this one (tfq.calibrate on it, "
                         f"or pass a method name).")
    return ranges
