"""The export modes: one registry, read by recipes, conversion, evaluation, tuning, interop, the CLI and the benchmark.

An export mode (``"int8"``, ``"fp16"`` …) says what a ``.tflite`` of that mode stores and how it is
made: the model input/output dtypes it allows, the dtypes of its weights and activations, the
default weights/activations specs of a recipe, whether it needs representative data, whether tfq
chooses its ranges (rewrite, calibrate, fake-quant nodes) or the TFLite converter does, which
:func:`tfq.convert` options it honours, and the converter settings (the driver). Every module
that accepts a mode reads it from here, and an option a mode does not honour is refused with one
line naming it (never dropped). Adding a mode is one call to :func:`register_export_mode`.

This module imports nothing from tfq; TensorFlow is imported only when a driver runs.

Example:
    >>> get_export_mode("int16x8").io_dtypes
    ('float32', 'int16')
    >>> "float_layers" in get_export_mode("fp16").honours
    False
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "CONVERT_OPTIONS",
    "ExportMode",
    "export_mode_names",
    "get_export_mode",
    "io_dtype_names",
    "register_export_mode",
]

#: The options of :func:`tfq.convert` (and the recipe fields) a mode may honour.
CONVERT_OPTIONS = (
    "representative_data",  # data to calibrate activations on
    "calibration",          # a method other than the default (robust_minmax), or a tfq.Calibration
    "calibration_params",
    "num_calibration_samples",
    "per_channel",          # per_channel=False: per-tensor weights
    "weights",              # a recipe's weights spec other than the mode's default
    "activations",          # a recipe's activations spec other than the mode's default
    "overrides",            # a recipe's per-layer rules
    "float_layers",
    "equalize",
    "bias_correction",
    "weight_rounding",
    "data_free",
)
_TF_IO_DTYPES = ("float32", "int8", "uint8", "int16")


@dataclasses.dataclass(frozen=True)
class ExportMode:
    """What a ``.tflite`` of one mode stores, and how tfq makes it.

    Attributes:
        name: the mode name (``mode="int8"``).
        io_dtypes: model input/output dtypes it allows (first: the default).
        weight_dtypes: dtypes its weights may be stored in (a recipe's weights spec is checked).
        activation_dtypes: dtypes its activations may be stored in.
        default_weights: the :class:`tfq.TensorSpec` fields of a recipe's default weights spec.
        default_activations: the same for activations.
        needs_data: it needs representative data (unless the model carries its ranges: QAT).
        tfq_ranges: tfq rewrites the model and chooses every range (calibration, fake-quant nodes
            the converter honours); otherwise the TFLite converter makes the model alone.
        honours: the :data:`CONVERT_OPTIONS` it honours; the others are refused.
        limits: why it does not honour the others, for the one-line refusal.
        configure: the driver: ``configure(converter, io_dtype, data)`` sets a
            ``tf.lite.TFLiteConverter`` up (``data``: a representative dataset callable or None).
        description: one line for documentation and ``--help``.
        weight_bits: bit widths of integer weights its files store (4: INT4, packed two per byte).
        block_sizes: block sizes of blockwise weights it writes (empty: none).
        float_activations: how a mode with float activations and tfq's integer weights runs them:
            ``"dynamic"`` (LiteRT's hybrid kernels quantize activations at run time; ops without one
            get a DEQUANTIZE) or ``"dequantize"`` (weight-only: DEQUANTIZE ops, float kernels);
            ``""`` for the other modes.
    """

    name: str
    io_dtypes: tuple[str, ...]
    weight_dtypes: tuple[str, ...]
    activation_dtypes: tuple[str, ...]
    default_weights: Mapping[str, Any]
    default_activations: Mapping[str, Any]
    needs_data: bool
    tfq_ranges: bool
    honours: frozenset
    configure: Callable[..., None]
    limits: str = ""
    description: str = ""
    weight_bits: tuple[int, ...] = (8,)
    block_sizes: tuple[int, ...] = ()
    float_activations: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"an export mode name is an identifier such as 'int8'. Received: {self.name!r}")
        for field in ("io_dtypes", "weight_dtypes", "activation_dtypes"):
            value = getattr(self, field)
            if not isinstance(value, tuple) or not value or not all(isinstance(v, str) for v in value):
                raise TypeError(f"ExportMode.{field} must be a non-empty tuple of dtype names. Received: {value!r}")
        bad_io = [d for d in self.io_dtypes if d not in _TF_IO_DTYPES]
        if bad_io:
            raise ValueError(f"ExportMode.io_dtypes must be among {_TF_IO_DTYPES}. Received: {bad_io}")
        unknown = sorted(set(self.honours) - set(CONVERT_OPTIONS))
        if unknown:
            raise ValueError(f"ExportMode.honours names unknown option(s) {unknown}; options: {CONVERT_OPTIONS}")
        if not callable(self.configure):
            raise TypeError(f"ExportMode.configure must be callable(converter, io_dtype, data). "
                            f"Received: {self.configure!r}")
        if self.float_activations not in ("", "dynamic", "dequantize"):
            raise ValueError(f"ExportMode.float_activations must be '', 'dynamic' or 'dequantize'. "
                             f"Received: {self.float_activations!r}")
        if self.float_activations and not self.tfq_ranges:
            raise ValueError(f"mode {self.name!r}: float_activations means tfq chooses the weights; set tfq_ranges=True.")
        if self.needs_data and "representative_data" not in self.honours:
            raise ValueError(f"mode {self.name!r} needs data, so it must honour 'representative_data'.")
        for field in ("default_weights", "default_activations"):
            object.__setattr__(self, field, types.MappingProxyType(dict(getattr(self, field))))
        object.__setattr__(self, "honours", frozenset(self.honours))

    def refusal(self, option: str, shown: str, fix: str = "") -> str:
        """The one-line message refusing ``option`` (its value shown as ``shown``) in this mode.

        Example:
            >>> get_export_mode("fp16").refusal("float_layers", "['head']")[:44]
            "mode='fp16' cannot honour float_layers=['head']"
        """
        fix = fix or "Drop it" + (", or use mode='int8'" if self.name != "int8" else "")
        return f"mode={self.name!r} cannot honour {option}={shown}: {self.limits}. {fix}."


_REGISTRY: dict[str, ExportMode] = {}


def register_export_mode(mode: ExportMode, *, replace: bool = False) -> ExportMode:
    """Registers an export mode; from then on recipes, ``tfq.convert``, ``tfq.evaluate`` and the CLI accept it.

    Raises:
        ValueError: a mode of that name exists and ``replace`` is False.
        TypeError: ``mode`` is not an :class:`ExportMode`.

    Example:
        >>> register_export_mode(ExportMode("bf16", ...))   # doctest: +SKIP
    """
    if not isinstance(mode, ExportMode):
        raise TypeError(f"register_export_mode expects an ExportMode. Received: {mode!r}")
    if mode.name in _REGISTRY and not replace:
        raise ValueError(f"an export mode named {mode.name!r} is already registered; pass replace=True to replace it.")
    _REGISTRY[mode.name] = mode
    return mode


def export_mode_names() -> tuple[str, ...]:
    """The registered mode names, in registration order.

    Example:
        >>> export_mode_names()
        ('float', 'dynamic', 'fp16', 'int8', 'int16x8', 'w4_dynamic', 'w4_weight_only')
    """
    return tuple(_REGISTRY)


def io_dtype_names() -> tuple[str, ...]:
    """Every input/output dtype some registered mode allows.

    Example:
        >>> io_dtype_names()
        ('float32', 'int8', 'uint8', 'int16')
    """
    return tuple(d for d in _TF_IO_DTYPES if any(d in m.io_dtypes for m in _REGISTRY.values()))


def get_export_mode(name: Any, where: str = "mode") -> ExportMode:
    """The registered mode ``name``; a one-line error listing the modes otherwise.

    Raises:
        ValueError: unknown name (or not a string).

    Example:
        >>> get_export_mode("int8").needs_data
        True
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"{where} must be one of {', '.join(map(repr, _REGISTRY))}. Received: {where}={name!r}")
    return _REGISTRY[name]


# ---------------------------------------------------------------------------------------------
# Drivers: how the TFLite converter is set up for each built-in mode.


def tf_io_type(io_dtype: str):
    """The ``tf.DType`` of an input/output dtype name."""
    import tensorflow as tf

    return {"float32": tf.float32, "int8": tf.int8, "uint8": tf.uint8, "int16": tf.int16}[io_dtype]


def _configure_float(converter, io_dtype: str, data) -> None:
    del converter, io_dtype, data  # the converter's defaults: a float32 model


def _configure_dynamic(converter, io_dtype: str, data) -> None:
    import tensorflow as tf

    converter.optimizations = [tf.lite.Optimize.DEFAULT]


def _configure_fp16(converter, io_dtype: str, data) -> None:
    import tensorflow as tf

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]


def _configure_int8(converter, io_dtype: str, data) -> None:
    """Fake-quant ranges become scales; with ``data`` the converter calibrates the tensors without one
    (MinMax) and keeps float only ops that have no int8 kernel."""
    import tensorflow as tf

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = tf_io_type(io_dtype)
    converter.inference_output_type = tf_io_type(io_dtype)
    if data is not None:
        converter.representative_dataset = data
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]


def _configure_int16x8(converter, io_dtype: str, data) -> None:
    import tensorflow as tf

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = data
    converter.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    if io_dtype != "float32":
        converter.inference_input_type = tf_io_type(io_dtype)
        converter.inference_output_type = tf_io_type(io_dtype)


_WEIGHTS_4 = {"bits": 4, "symmetric": True, "per_channel": True, "axis": -1, "narrow_range": True, "dtype": "int8"}
_W4_HONOURS = frozenset({"representative_data", "num_calibration_samples", "per_channel", "weights", "overrides",
                         "float_layers", "weight_rounding"})
_W4_LIMITS = ("its activations stay float (nothing to calibrate); tfq chooses only the 4-bit weight integers "
              "(nearest, or weight_rounding='gptq'/'adaround' on representative_data)")
_FLOAT_LIMITS = ("its activations stay float and the TFLite converter makes it alone, so there is nothing to "
                 "calibrate and no layer to keep float")
_WEIGHTS_8 = {"bits": 8, "symmetric": True, "per_channel": True, "axis": -1, "narrow_range": True, "dtype": "int8"}

for _mode in (
    ExportMode("float", ("float32",), ("float32",), ("float32",), {"dtype": "float32"}, {"dtype": "float32"},
               needs_data=False, tfq_ranges=False, honours=frozenset(), configure=_configure_float,
               limits=_FLOAT_LIMITS, description="float32 TFLite model"),
    ExportMode("dynamic", ("float32",), ("int8", "int16"), ("float32",), _WEIGHTS_8, {"dtype": "float32"},
               needs_data=False, tfq_ranges=False, honours=frozenset(), configure=_configure_dynamic,
               limits="the TFLite converter quantizes every weight itself (int8, per channel) and keeps activations "
                      "float, with no public way to keep a layer float or choose weight scales",
               description="int8 weights, float activations (dynamic range)"),
    ExportMode("fp16", ("float32",), ("float16",), ("float32",), {"dtype": "float16"}, {"dtype": "float32"},
               needs_data=False, tfq_ranges=False, honours=frozenset(), configure=_configure_fp16,
               limits=_FLOAT_LIMITS.replace("stay float", "stay float (weights float16)"),
               description="float16 weights"),
    ExportMode("int8", ("float32", "int8", "uint8"), ("int8", "int16"), ("int8", "int16"), _WEIGHTS_8,
               {"bits": 8, "symmetric": False, "per_channel": False, "axis": -1, "narrow_range": False,
                "dtype": "int8"},
               needs_data=True, tfq_ranges=True, honours=frozenset(CONVERT_OPTIONS), configure=_configure_int8,
               limits="", description="full integer: int8 weights and activations, ranges chosen by tfq (4-bit "
                                      "weights stored INT4 with TensorSpec(bits=4))", weight_bits=(4, 8)),
    ExportMode("int16x8", ("float32", "int16"), ("int8", "int16"), ("int8", "int16"), _WEIGHTS_8,
               {"bits": 16, "symmetric": True, "per_channel": False, "axis": -1, "narrow_range": True,
                "dtype": "int16"},
               needs_data=True, tfq_ranges=False,
               honours=frozenset({"representative_data", "num_calibration_samples", "equalize", "data_free"}),
               configure=_configure_int16x8,
               limits="the TFLite converter chooses int16x8 ranges itself (MinMax on representative_data) for every "
                      "layer, weights per channel; tfq cannot hand it other ranges (16-bit fake-quant nodes convert, but "
                      "LiteRT then computes wrong results: 10 % accuracy instead of 97 % on the digits CNN)",
               description="int16 activations, int8 weights (converter calibration, MinMax)"),
    ExportMode("w4_dynamic", ("float32",), ("int8",), ("float32",), _WEIGHTS_4, {"dtype": "float32"},
               needs_data=False, tfq_ranges=True, honours=_W4_HONOURS, configure=_configure_float,
               limits=_W4_LIMITS, weight_bits=(4,), block_sizes=(32, 64, 128), float_activations="dynamic",
               description="4-bit weights (tfq's integers, INT4), float activations quantized at run time by "
                           "LiteRT's hybrid kernels"),
    ExportMode("w4_weight_only", ("float32",), ("int8",), ("float32",), _WEIGHTS_4, {"dtype": "float32"},
               needs_data=False, tfq_ranges=True, honours=_W4_HONOURS, configure=_configure_float,
               limits=_W4_LIMITS, weight_bits=(4,), float_activations="dequantize",
               description="4-bit weights (tfq's integers, INT4) dequantized to float when the model loads; "
                           "float compute"),
):
    register_export_mode(_mode)
del _mode
