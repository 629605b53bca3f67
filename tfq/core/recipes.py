"""Recipes: data that says how to quantize a model.

A `Recipe` names a conversion mode, the global `TensorSpec` for weights and
activations, the calibration method, the model's input/output dtype, the layers
kept in float and per-layer `Override` rules. It is a frozen dataclass,
validated at construction, and it refuses combinations TFLite cannot run
unless `allow_non_tflite=True` (simulation only). Recipes load from presets in
`configs/`, from YAML/JSON files or from dicts, all through the same
`Recipe.from_dict`, so a bad file fails at load with the key and value named.

This module holds data only: it imports neither TensorFlow nor Keras.

Example:
    >>> recipe = load_recipe("int8")
    >>> recipe.spec_for("dense", "Dense")[0].per_channel
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Union

import yaml

from tfq.core.calibration_methods import (
    DEFAULT_CALIBRATION,
    calibration_method_names,
    get_calibration_method,
)
from tfq.core.export_modes import export_mode_names, get_export_mode, io_dtype_names
from tfq.core.fileio import atomic_write_text
from tfq.core.messages import nested_size_exceeds, one_line, short_repr
from tfq.core.ptq_methods import get_ptq_method, ptq_method_names

__all__ = [
    "BIAS_CORRECTION",
    "CALIBRATION_METHODS",
    "DATA_FREE",
    "DEFAULT_CALIBRATION",
    "DTYPES",
    "IO_DTYPES",
    "MODES",
    "Override",
    "Recipe",
    "TensorSpec",
    "WEIGHT_ROUNDING",
    "list_presets",
    "load_recipe",
    "save_recipe",
]

# MODES, CALIBRATION_METHODS and IO_DTYPES are read from the registries at use (module __getattr__
# below): tfq.export_modes and tfq.calibration_methods, where a new mode or method is one registration.
DTYPES = ("int8", "int16", "float16", "float32")
# The values of the built-in post-training methods' fields, from their registry (tfq.core.ptq_methods).
# True picks the default: bias correction empirical with data, analytical with data_free; data_free "synthetic".
BIAS_CORRECTION = get_ptq_method("bias_correction").values
WEIGHT_ROUNDING = get_ptq_method("weight_rounding").values
DATA_FREE = get_ptq_method("data_free").values

_REGISTRY_CONSTANTS = {
    "MODES": export_mode_names,
    "CALIBRATION_METHODS": calibration_method_names,
    "IO_DTYPES": io_dtype_names,
}


def __getattr__(name: str):
    """MODES, CALIBRATION_METHODS and IO_DTYPES, read from the registries (registered ones included)."""
    if name in _REGISTRY_CONSTANTS:
        return _REGISTRY_CONSTANTS[name]()
    raise AttributeError(f"module {short_repr(__name__)} has no attribute {short_repr(name)}")


_INTEGER_DTYPES = {"int8": 8, "int16": 16}  # dtype -> most bits it holds
_PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"
_FILE_SUFFIXES = (".yaml", ".yml", ".json")
_CLASS_PREFIX = "class:"

_ALLOW_NON_TFLITE_HINT = "Set allow_non_tflite=True to simulate it anyway (the model will not export)."


def _quote_all(values: Any) -> str:
    return ", ".join(repr(v) for v in values)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _escape(text: Any) -> str:
    """``text`` with newlines and other control characters escaped: messages stay on one line."""
    return str(text).encode("unicode_escape").decode("ascii") if not str(text).isprintable() else str(text)


def _check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}.{name} must be a bool (True or False). Received: {name}={short_repr(value)}")


def _check_choice(owner: str, name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(
            f"{owner}.{name} must be one of {_quote_all(allowed)}. Received: {name}={short_repr(value)}"
        )


def _check_pattern(where: str, pattern: Any) -> None:
    """Checks a layer pattern: a regex on the layer name, or "class:<regex>"."""
    if not isinstance(pattern, str) or not pattern:
        raise TypeError(
            f"{where} must be a non-empty string (a layer-name regex or 'class:<ClassName>'). "
            f"Received: {short_repr(pattern)}"
        )
    regex = pattern[len(_CLASS_PREFIX):] if pattern.startswith(_CLASS_PREFIX) else pattern
    if not regex:
        raise ValueError(f"{where} names no class after 'class:'. Received: {short_repr(pattern)}")
    try:
        re.compile(regex)
    except re.error as e:
        raise ValueError(f"{where} is not a valid regular expression ({e}). Received: {short_repr(pattern)}") from None


def _matches(pattern: str, layer_name: str, class_name: str) -> bool:
    """Whether `pattern` selects a layer: "class:X" matches the class name, else the layer name.

    The pattern matches when it equals the name or `re.fullmatch`es it.
    """
    if pattern.startswith(_CLASS_PREFIX):
        pattern, target = pattern[len(_CLASS_PREFIX):], class_name
    else:
        target = layer_name
    return pattern == target or re.fullmatch(pattern, target) is not None


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """How one kind of tensor (weights or activations) is stored.

    Integer dtypes are quantized affinely: `q = clamp(round(x / scale) + zero_point,
    qmin, qmax)` with `[qmin, qmax] = [-2^(bits-1), 2^(bits-1) - 1]`, or
    `[-2^(bits-1) + 1, 2^(bits-1) - 1]` with `narrow_range`. Symmetric specs have
    `zero_point = 0`. Float dtypes ("float16", "float32") are cast, not quantized,
    and take no integer-quantization fields (they keep their defaults and
    `to_dict` writes only the dtype).

    Attributes:
        bits: Number of integer levels as bits, 2..16 (at most 8 for int8).
        symmetric: Zero-point fixed at 0.
        per_channel: One scale per slice along `axis` instead of one per tensor.
        axis: Channel axis for `per_channel`.
        narrow_range: Drop the most negative level (TFLite int8 weights use [-127, 127]).
        dtype: Storage dtype: "int8", "int16", "float16" or "float32".
        block_size: Weights only: one scale per block of this many consecutive inputs of each
            output channel (blockwise), instead of one per channel; None (default) for none. Only
            modes whose kernels run blockwise weights accept it (``w4_dynamic``: 32, 64 or 128).

    Example:
        >>> TensorSpec(symmetric=False, per_channel=False, narrow_range=False).bits
        8
        >>> TensorSpec(bits=4, block_size=32).to_dict()["block_size"]
        32
    """

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = True
    axis: int = -1
    narrow_range: bool = True
    dtype: str = "int8"
    block_size: int | None = None

    def __post_init__(self) -> None:
        _check_choice("TensorSpec", "dtype", self.dtype, DTYPES)
        if not _is_int(self.bits) or not 2 <= self.bits <= 16:
            raise ValueError(f"TensorSpec.bits must be an int in 2..16. Received: bits={short_repr(self.bits)}")
        for name in ("symmetric", "per_channel", "narrow_range"):
            _check_bool("TensorSpec", name, getattr(self, name))
        if not _is_int(self.axis):
            raise TypeError(f"TensorSpec.axis must be an int. Received: axis={short_repr(self.axis)}")
        if self.block_size is not None and (not _is_int(self.block_size) or self.block_size < 2
                                            or not self.symmetric or not self.per_channel):
            raise ValueError(f"TensorSpec.block_size must be None or an int >= 2, with symmetric per-channel weights "
                             f"(blocks split each channel). Received: block_size={short_repr(self.block_size)}, "
                             f"symmetric={self.symmetric}, per_channel={self.per_channel}")
        if self.dtype in _INTEGER_DTYPES:
            max_bits = _INTEGER_DTYPES[self.dtype]
            if self.bits > max_bits:
                raise ValueError(
                    f"TensorSpec.bits must be at most {max_bits} for dtype={short_repr(self.dtype)}; use "
                    f"dtype='int16' for up to 16 bits. Received: bits={self.bits}, dtype={short_repr(self.dtype)}"
                )
        else:
            for f in dataclasses.fields(self):
                if f.name != "dtype" and getattr(self, f.name) != f.default:
                    raise ValueError(
                        f"TensorSpec with dtype={short_repr(self.dtype)} is a cast, not a quantization: "
                        f"leave {f.name} at its default {short_repr(f.default)}. "
                        f"Received: {f.name}={short_repr(getattr(self, f.name))}"
                    )

    def __repr__(self) -> str:
        if not self.is_integer:
            return f"TensorSpec(dtype={short_repr(self.dtype)})"
        fields = ", ".join(f"{f.name}={short_repr(getattr(self, f.name))}" for f in dataclasses.fields(self)
                           if f.name != "block_size" or self.block_size is not None)
        return f"TensorSpec({fields})"

    @property
    def is_integer(self) -> bool:
        """Whether the tensor is quantized to an integer dtype."""
        return self.dtype in _INTEGER_DTYPES

    def to_dict(self) -> dict[str, Any]:
        """Returns the spec as a plain dict (only `dtype` for float dtypes).

        Example:
            >>> TensorSpec(dtype="float16").to_dict()
            {'dtype': 'float16'}
        """
        if not self.is_integer:
            return {"dtype": self.dtype}
        d = dataclasses.asdict(self)
        if self.block_size is None:
            del d["block_size"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        """Builds a spec from `to_dict` output; missing keys take their defaults.

        Raises:
            ValueError: On an unknown key or a bad value, naming both.
            TypeError: If `d` is not a mapping or a value has the wrong type.

        Example:
            >>> TensorSpec.from_dict({"bits": 4}).bits
            4
        """
        return _spec_from_dict(d, "tensor_spec")


@dataclasses.dataclass(frozen=True)
class Override:
    """A per-layer rule: layers whose name (or "class:" class name) matches `pattern`.

    Attributes:
        pattern: Regex `re.fullmatch`ed against the layer name, or "class:<regex>"
            matched against the layer's class name (e.g. "class:Softmax").
        weights: Replaces the weights spec of matching layers, or None to keep it.
        activations: Replaces the activations spec of matching layers, or None.
        float: Keep matching layers in float (then give neither spec).

    Example:
        >>> Override("class:Dense", weights=TensorSpec(per_channel=False)).pattern
        'class:Dense'
    """

    pattern: str
    weights: TensorSpec | None = None
    activations: TensorSpec | None = None
    float: bool = False

    def __post_init__(self) -> None:
        _check_pattern("Override.pattern", self.pattern)
        for name in ("weights", "activations"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, TensorSpec):
                raise TypeError(f"Override.{name} must be a TensorSpec or None. Received: {name}={short_repr(value)}")
        _check_bool("Override", "float", self.float)
        given = [name for name in ("weights", "activations") if getattr(self, name) is not None]
        if self.float and given:
            raise ValueError(
                f"Override(float=True) keeps layers float, so it takes no {' or '.join(given)} spec. "
                f"Received: pattern={short_repr(self.pattern)}, float=True, {given[0]}={short_repr(getattr(self, given[0]))}"
            )
        if not self.float and not given:
            raise ValueError(
                "Override changes nothing: give weights, activations or float=True. "
                f"Received: pattern={short_repr(self.pattern)}"
            )

    def matches(self, layer_name: str, class_name: str) -> bool:
        """Whether this rule applies to a layer.

        Example:
            >>> Override("conv.*", float=True).matches("conv2d_1", "Conv2D")
            True
        """
        return _matches(self.pattern, layer_name, class_name)

    def to_dict(self) -> dict[str, Any]:
        """Returns the rule as a plain dict (None for specs it does not set)."""
        return {
            "pattern": self.pattern,
            "weights": None if self.weights is None else self.weights.to_dict(),
            "activations": None if self.activations is None else self.activations.to_dict(),
            "float": self.float,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Override:
        """Builds a rule from `to_dict` output.

        Raises:
            ValueError: On an unknown key or a bad value, naming both.
            TypeError: If `d` is not a mapping or a value has the wrong type.

        Example:
            >>> Override.from_dict({"pattern": "head", "float": True}).float
            True
        """
        return _override_from_dict(d, "override")


def _default_weights(mode: str) -> TensorSpec:
    return TensorSpec(**get_export_mode(mode).default_weights)


def _default_activations(mode: str) -> TensorSpec:
    return TensorSpec(**get_export_mode(mode).default_activations)


def _check_dtype_kind(mode: str, role: str, spec: TensorSpec, where: str) -> None:
    """Checks that a mode stores `role` tensors in a dtype of the right kind."""
    entry = get_export_mode(mode)
    allowed = entry.weight_dtypes if role == "weights" else entry.activation_dtypes
    if spec.dtype not in allowed:
        hint = " To keep a layer float, list it in float_layers." if spec.dtype.startswith("float") else ""
        raise ValueError(
            f"mode={short_repr(mode)} stores {role} as {' or '.join(allowed)}.{hint} "
            f"Received: {where}.dtype={short_repr(spec.dtype)}"
        )


def _check_tflite(mode: str, role: str, spec: TensorSpec, where: str) -> None:
    """Refuses specs that TFLite's kernels for `mode` cannot run (see ANCHORS: int8 spec)."""
    if role == "activations" and spec.block_size is not None:
        raise ValueError(f"block_size applies to weights only. Received: {where}.block_size={spec.block_size}; "
                         f"drop it.")
    if not spec.is_integer:
        return
    if role == "weights":
        entry = get_export_mode(mode)
        allowed_bits = entry.weight_bits
        if spec.dtype != "int8" or spec.bits not in allowed_bits:
            raise ValueError(
                f"TFLite {mode} kernels take {' or '.join(map(str, allowed_bits))}-bit int8 weights. "
                f"Received: {where}.dtype={short_repr(spec.dtype)}, {where}.bits={spec.bits}. {_ALLOW_NON_TFLITE_HINT}"
            )
        if not spec.symmetric:
            raise ValueError(
                "asymmetric int8 weights are not supported by TFLite: weights must be symmetric "
                f"(zero-point 0). Received: {where}.symmetric=False. {_ALLOW_NON_TFLITE_HINT}"
            )
        if not spec.narrow_range:
            raise ValueError(
                "TFLite int8 weights use the narrow range [-127, 127]. "
                f"Received: {where}.narrow_range=False. {_ALLOW_NON_TFLITE_HINT}"
            )
        if spec.block_size is not None and spec.block_size not in entry.block_sizes:
            runs = (f"takes blocks of {', '.join(map(str, entry.block_sizes))}" if entry.block_sizes else
                    "has no blockwise kernel in LiteRT 2.3 (only w4_dynamic's FULLY_CONNECTED runs blockwise "
                    "weights)")
            raise ValueError(
                f"mode={short_repr(mode)} {runs}. Received: {where}.block_size={spec.block_size}. "
                f"Use mode='w4_dynamic' for blockwise weights, or block_size=None (per channel)."
            )
        return
    if spec.per_channel:
        raise ValueError(
            "per-channel activations are not supported by TFLite: activations are quantized "
            f"per-tensor. Received: {where}.per_channel=True. {_ALLOW_NON_TFLITE_HINT}"
        )
    dtype, bits = ("int8", 8) if mode == "int8" else ("int16", 16)
    if spec.dtype != dtype or spec.bits != bits:
        raise ValueError(
            f"TFLite {mode} kernels take {bits}-bit {dtype} activations. "
            f"Received: {where}.dtype={short_repr(spec.dtype)}, {where}.bits={spec.bits}. {_ALLOW_NON_TFLITE_HINT}"
        )
    if mode == "int16x8" and not spec.symmetric:
        raise ValueError(
            "TFLite int16 activations are symmetric (zero-point 0). "
            f"Received: {where}.symmetric=False. {_ALLOW_NON_TFLITE_HINT}"
        )


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to quantize a model: mode, tensor specs, calibration and per-layer rules.

    Layer rules (see `spec_for`): a layer matched by `float_layers` or by an
    override with `float=True` stays float, whatever the order. Otherwise the
    layer starts from the global specs and each matching override replaces the
    specs it gives, in order, so later rules win.

    Attributes:
        mode: "float" (no quantization), "dynamic" (int8 weights, float
            activations), "fp16" (float16 weights), "int8" (full integer) or
            "int16x8" (int16 activations, int8 weights).
        weights: Global weights spec. None takes the mode's default: int8
            symmetric per-channel narrow range ("float16"/"float32" for fp16/float).
        activations: Global activations spec. None takes the mode's default:
            int8 asymmetric per-tensor (int8), int16 symmetric per-tensor
            (int16x8), else float32.
        calibration: Range estimator: "robust_minmax" (default: MinMax over the
            samples not far outside the rest, see `tfq.outliers`), "minmax",
            "moving_average", "kl", "percentile" or "mse".
        calibration_params: Method parameters: {"decay"} for moving_average,
            {"num_bins", "batch_aggregate"} for kl and mse, {"percentile", "num_bins",
            "batch_aggregate"} for percentile, none for minmax and robust_minmax.
            Stored read-only.
        io_dtype: Model input/output dtype: "float32"; "int8"/"uint8" with mode
            int8; "int16" with mode int16x8.
        float_layers: Layers kept float: layer-name regexes (`re.fullmatch`) or
            "class:<ClassName>".
        overrides: Per-layer `Override` rules, applied in order.
        num_calibration_samples: Cap on calibration samples, None for all.
        seed: Seed for anything random (e.g. sample selection).
        name: Free-form name (presets use their file stem).
        allow_non_tflite: Skip the TFLite-runnability checks, for simulation-only
            recipes (e.g. 3-bit weights, asymmetric weights); such a recipe cannot be exported.
            4-bit weights export without it (INT4 in the file: int8, w4_dynamic, w4_weight_only).
        equalize: Cross-layer equalization and high-bias absorption before
            quantizing (`tfq.equalize`); int8 and int16x8.
        bias_correction: Correct each layer's mean output shift caused by weight
            quantization: "empirical" (calibration data), "analytical" (BatchNorm
            statistics), True (empirical, or analytical with `data_free`), False; int8.
        weight_rounding: "nearest", "adaround" or "gptq" (learned rounding of each
            weight on calibration data, see `tfq.ptq.weight_rounding`); needs narrow-range
            weights; int8.
        data_free: Activation ranges without calibration data, from BatchNorm
            statistics: "synthetic" (inputs synthesized to match them, ZeroQ), "bn_statistics"
            (ranges from β ± 6γ where a BatchNorm precedes, synthetic elsewhere), True
            ("synthetic") or False; int8 and int16x8.
        methods: The other registered post-training methods (`tfq.ptq_methods`) switched on, by
            name: a value (e.g. True) or a dict of options (`{"k": 2.0}`, the value under "value").
            A built-in method given here goes to its own field. Stored read-only, in canonical form.

    Example:
        >>> recipe = Recipe(mode="int8", float_layers=("class:Softmax",))
        >>> recipe.spec_for("probs", "Softmax")
        (None, None)
    """

    mode: str = "int8"
    weights: TensorSpec | None = None
    activations: TensorSpec | None = None
    calibration: str = DEFAULT_CALIBRATION
    calibration_params: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    io_dtype: str = "float32"
    float_layers: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = ()
    num_calibration_samples: int | None = None
    seed: int = 0
    name: str = ""
    allow_non_tflite: bool = False
    equalize: bool = False
    bias_correction: Union[bool, str] = False
    weight_rounding: str = "nearest"
    data_free: Union[bool, str] = False
    methods: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _check_choice("Recipe", "mode", self.mode, export_mode_names())
        self._normalize()
        _check_choice("Recipe", "calibration", self.calibration, calibration_method_names())
        get_calibration_method(self.calibration).check_params(self.calibration_params)
        _check_choice("Recipe", "io_dtype", self.io_dtype, io_dtype_names())
        mode_io = get_export_mode(self.mode).io_dtypes
        if self.io_dtype not in mode_io:
            raise ValueError(
                f"With mode={short_repr(self.mode)}, io_dtype must be one of "
                f"{_quote_all(mode_io)} (integer inputs/outputs exist only in "
                f"full-integer models: int8/uint8 with mode='int8', int16 with mode='int16x8'). "
                f"Received: io_dtype={short_repr(self.io_dtype)}"
            )
        for i, pattern in enumerate(self.float_layers):
            _check_pattern(f"Recipe.float_layers[{i}]", pattern)
        n = self.num_calibration_samples
        if n is not None and (not _is_int(n) or n < 1):
            raise ValueError(
                f"Recipe.num_calibration_samples must be an int >= 1 or None. "
                f"Received: num_calibration_samples={short_repr(n)}"
            )
        if not _is_int(self.seed):
            raise TypeError(f"Recipe.seed must be an int. Received: seed={short_repr(self.seed)}")
        if not isinstance(self.name, str):
            raise TypeError(f"Recipe.name must be a str. Received: name={short_repr(self.name)}")
        _check_bool("Recipe", "allow_non_tflite", self.allow_non_tflite)
        self._check_specs()
        self._check_methods()

    def _check_methods(self) -> None:
        """Validates the post-training methods (their fields and ``methods``) through their registry entries:
        values, options, the modes they apply to, their own checks of the recipe."""
        if not isinstance(self.methods, Mapping):
            raise TypeError(f"Recipe.methods must be a mapping of method names to settings. "
                            f"Received: methods={short_repr(self.methods)}")
        fields = _method_fields()
        moved, methods = {}, {}
        for name, setting in self.methods.items():
            entry = get_ptq_method(name, "Recipe.methods key")
            normal = entry.normalize(setting, f"Recipe.methods[{name!r}]")
            if normal is None:
                continue
            if name in fields:  # a built-in given by name: its own field holds it
                if isinstance(normal, Mapping):
                    raise ValueError(f"Recipe.methods[{name!r}] takes no options (method {name!r} has none). "
                                     f"Received: {name}={short_repr(dict(setting))}")
                current = getattr(self, name)
                if not entry.is_off(current) and current != normal:
                    raise ValueError(f"Recipe.methods[{name!r}]={normal!r} conflicts with Recipe.{name}={current!r}. "
                                     f"Give one of them.")
                moved[name] = normal
            else:
                methods[name] = types.MappingProxyType(normal) if isinstance(normal, Mapping) else normal
        for name, value in moved.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "methods", types.MappingProxyType(methods))
        for name in fields:
            get_ptq_method(name).check(getattr(self, name), f"Recipe.{name}")
        for name, (value, _) in self.method_settings().items():
            entry = get_ptq_method(name)
            if self.mode not in entry.modes:
                modes = [m for m in entry.modes if m in export_mode_names()]
                where = f"Recipe.{name}" if name in fields else f"Recipe.methods[{name!r}]"
                raise ValueError(
                    f"{where}={value!r} applies to mode {' or '.join(map(repr, modes))}, not "
                    f"mode={self.mode!r}. Use mode={modes[0]!r} or leave {name} at its default."
                )
            if entry.check_recipe is not None:
                entry.check_recipe(self, value)

    def method_settings(self) -> dict[str, tuple[Any, dict]]:
        """The post-training methods switched on, in registration order: ``{name: (value, options)}``,
        every option present (defaults filled in).

        Example:
            >>> Recipe(equalize=True, weight_rounding="gptq").method_settings()
            {'equalize': (True, {}), 'weight_rounding': ('gptq', {})}
        """
        fields = _method_fields()
        out = {}
        for name in ptq_method_names():
            setting = getattr(self, name) if name in fields else self.methods.get(name)
            entry = get_ptq_method(name)
            if not entry.is_off(setting):
                out[name] = entry.check(setting, name)
        return out

    def with_methods(self, settings: Mapping[str, Any]) -> Recipe:
        """Returns a copy with the post-training methods in ``settings`` set (None: keep; off: switch off).

        Example:
            >>> load_recipe("int8_dfq").with_methods({"bias_correction": False}).bias_correction
            False
        """
        if not isinstance(settings, Mapping):
            raise TypeError(f"methods must be a dict of method names to settings (e.g. {{'equalize': True}}). "
                            f"Received: methods={short_repr(settings)}")
        fields = _method_fields()
        changes: dict[str, Any] = {}
        methods = dict(self.methods)
        for name, setting in settings.items():
            entry = get_ptq_method(name, "methods key")
            if setting is None:
                continue
            if name in fields:
                if isinstance(setting, Mapping):
                    value, _ = entry.check(setting, f"methods[{name!r}]")
                    if set(setting) - {"value"}:
                        raise ValueError(f"methods[{name!r}] takes no options (method {name!r} has none). "
                                         f"Received: {name}={short_repr(dict(setting))}")
                    setting = value
                changes[name] = setting
            else:
                methods.pop(name, None)
                if not entry.is_off(setting):
                    methods[name] = setting
        return self.replace(methods=methods, **changes)

    @property
    def bias_correction_method(self) -> str | None:
        """The bias correction that runs: "empirical", "analytical" or None.

        Example:
            >>> Recipe(bias_correction=True, data_free=True).bias_correction_method
            'analytical'
        """
        if self.bias_correction is False:
            return None
        if self.bias_correction is True:
            return "analytical" if self.data_free_method else "empirical"
        return self.bias_correction

    @property
    def data_free_method(self) -> str | None:
        """The data-free method that runs: "synthetic", "bn_statistics" or None.

        Example:
            >>> Recipe(data_free=True).data_free_method
            'synthetic'
        """
        if self.data_free is False:
            return None
        return "synthetic" if self.data_free is True else self.data_free

    def _normalize(self) -> None:
        """Fills mode defaults and freezes containers (lists from YAML/JSON become tuples)."""
        # object.__setattr__: the dataclass is frozen; this runs once, at construction.
        if self.weights is None:
            object.__setattr__(self, "weights", _default_weights(self.mode))
        if self.activations is None:
            object.__setattr__(self, "activations", _default_activations(self.mode))
        for name in ("weights", "activations"):
            if not isinstance(getattr(self, name), TensorSpec):
                raise TypeError(
                    f"Recipe.{name} must be a TensorSpec or None. Received: {name}={short_repr(getattr(self, name))}"
                )
        if not isinstance(self.calibration_params, Mapping):
            raise TypeError(
                f"Recipe.calibration_params must be a mapping. "
                f"Received: calibration_params={short_repr(self.calibration_params)}"
            )
        object.__setattr__(self, "calibration_params", types.MappingProxyType(dict(self.calibration_params)))
        for name, item_type in (("float_layers", str), ("overrides", Override)):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise TypeError(
                    f"Recipe.{name} must be a list or tuple of {item_type.__name__}. Received: {name}={short_repr(value)}"
                )
            for i, item in enumerate(value):
                if not isinstance(item, item_type):
                    raise TypeError(
                        f"Recipe.{name}[{i}] must be a {item_type.__name__}. Received: {short_repr(item)}"
                    )
            object.__setattr__(self, name, tuple(value))

    def _check_specs(self) -> None:
        specs = [("weights", self.weights, "weights"), ("activations", self.activations, "activations")]
        for i, override in enumerate(self.overrides):
            for role in ("weights", "activations"):
                spec = getattr(override, role)
                if spec is not None:
                    specs.append((role, spec, f"overrides[{i}].{role}"))
        for role, spec, where in specs:
            _check_dtype_kind(self.mode, role, spec, where)
            if not self.allow_non_tflite:
                _check_tflite(self.mode, role, spec, where)

    def is_float_layer(self, name: str, class_name: str) -> bool:
        """Whether a layer stays float: matched by `float_layers` or a `float=True` override.

        Args:
            name: The layer's name.
            class_name: The layer's class name, e.g. "Conv2D".

        Returns:
            True if the layer is kept in float.

        Example:
            >>> Recipe(float_layers=("head_.*",)).is_float_layer("head_1", "Dense")
            True
        """
        return any(_matches(p, name, class_name) for p in self.float_layers) or any(
            o.float and o.matches(name, class_name) for o in self.overrides
        )

    def spec_for(self, name: str, class_name: str) -> tuple[TensorSpec | None, TensorSpec | None]:
        """Returns the (weights, activations) specs of a layer; None means kept in float32.

        Float layers (see `is_float_layer`) give (None, None). Otherwise start from
        the global specs and apply the matching overrides in order: each replaces
        the specs it gives, so later rules win. A float32 spec (e.g. activations in
        "dynamic" mode) is returned as None.

        Args:
            name: The layer's name.
            class_name: The layer's class name, e.g. "Conv2D".

        Returns:
            A pair `(weights_spec, activations_spec)`, each a `TensorSpec` or None.

        Example:
            >>> recipe = Recipe(overrides=(Override("fc", weights=TensorSpec(per_channel=False)),))
            >>> recipe.spec_for("fc", "Dense")[0].per_channel
            False
        """
        if self.is_float_layer(name, class_name):
            return None, None
        weights, activations = self.weights, self.activations
        for override in self.overrides:
            if override.matches(name, class_name):
                if override.weights is not None:
                    weights = override.weights
                if override.activations is not None:
                    activations = override.activations
        return (
            None if weights.dtype == "float32" else weights,
            None if activations.dtype == "float32" else activations,
        )

    def replace(self, **changes: Any) -> Recipe:
        """Returns a copy with `changes` applied (and validated again).

        Example:
            >>> load_recipe("int8").replace(io_dtype="uint8").io_dtype
            'uint8'
        """
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Returns the recipe as plain dicts and lists, ready for YAML or JSON.

        Example:
            >>> Recipe(mode="fp16").to_dict()["weights"]
            {'dtype': 'float16'}
        """
        return {
            "name": self.name,
            "mode": self.mode,
            "weights": self.weights.to_dict(),
            "activations": self.activations.to_dict(),
            "calibration": self.calibration,
            "calibration_params": dict(self.calibration_params),
            "io_dtype": self.io_dtype,
            "float_layers": list(self.float_layers),
            "overrides": [o.to_dict() for o in self.overrides],
            "num_calibration_samples": self.num_calibration_samples,
            "seed": self.seed,
            "allow_non_tflite": self.allow_non_tflite,
            "equalize": self.equalize,
            "bias_correction": self.bias_correction,
            "weight_rounding": self.weight_rounding,
            "data_free": self.data_free,
            **({"methods": {k: dict(v) if isinstance(v, Mapping) else v for k, v in self.methods.items()}}
               if self.methods else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        """Builds a recipe from `to_dict` output; missing keys take their defaults.

        Raises:
            ValueError: On an unknown key (named by its path, e.g.
                "recipe.weights.bitz", with the allowed keys) or a bad value
                (named with the value and the allowed values).
            TypeError: If `d` is not a mapping or a value has the wrong type.

        Example:
            >>> Recipe.from_dict({"mode": "int8", "calibration": "kl"}).calibration
            'kl'
        """
        return _recipe_from_dict(d, "recipe")


# ---------------------------------------------------------------------------
# from_dict helpers: they carry the key path used in error messages.


@contextlib.contextmanager
def _at(path: str) -> Iterator[None]:
    """Prefixes validation errors raised inside with the key path."""
    try:
        yield
    except (ValueError, TypeError) as e:
        raise type(e)(f"{path}: {e}") from None


def _check_mapping(d: Any, path: str, allowed: tuple[str, ...]) -> None:
    if not isinstance(d, Mapping):
        raise TypeError(f"{path} must be a mapping. Received: {short_repr(d)} ({type(d).__name__})")
    for key in d:
        if key not in allowed:
            raise ValueError(f"Unknown key '{path}.{_escape(key)}'. Allowed keys: {', '.join(sorted(allowed))}.")


def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _method_fields() -> tuple[str, ...]:
    """The registered post-training methods that have a Recipe field of their name (the built-ins)."""
    return tuple(n for n in ptq_method_names() if n in _RECIPE_FIELDS)


def _spec_from_dict(d: Any, path: str) -> TensorSpec:
    _check_mapping(d, path, _field_names(TensorSpec))
    with _at(path):
        return TensorSpec(**d)


def _optional_spec(d: Mapping[str, Any], key: str, path: str) -> TensorSpec | None:
    value = d.get(key)
    return None if value is None else _spec_from_dict(value, f"{path}.{key}")


def _override_from_dict(d: Any, path: str) -> Override:
    _check_mapping(d, path, _field_names(Override))
    kwargs = dict(d)
    for key in ("weights", "activations"):
        kwargs[key] = _optional_spec(d, key, path)
    with _at(path):
        return Override(**kwargs)


def _recipe_from_dict(d: Any, path: str) -> Recipe:
    _check_mapping(d, path, _field_names(Recipe))
    kwargs = dict(d)
    for key in ("weights", "activations"):
        kwargs[key] = _optional_spec(d, key, path)
    overrides = d.get("overrides") or []
    if not isinstance(overrides, (list, tuple)):
        raise TypeError(f"{path}.overrides must be a list. Received: {short_repr(overrides)}")
    kwargs["overrides"] = tuple(_override_from_dict(o, f"{path}.overrides[{i}]") for i, o in enumerate(overrides))
    for key in ("float_layers", "calibration_params", "methods"):
        if key in kwargs and kwargs[key] is None:  # An empty YAML key reads as None.
            del kwargs[key]
    with _at(path):
        return Recipe(**kwargs)


_RECIPE_FIELDS = frozenset(_field_names(Recipe)) - {"methods"}

# ---------------------------------------------------------------------------
# Presets and files.

RecipeSource = Union[Recipe, Mapping[str, Any], str, os.PathLike]


def list_presets() -> list[str]:
    """Returns the preset names: the stems of the YAML files in `configs/`.

    Example:
        >>> "int8" in list_presets()
        True
    """
    return sorted(p.stem for p in _PRESET_DIR.glob("*.yaml"))


# Bounds on a recipe file: bytes read, and values once YAML aliases are expanded (a few hundred
# bytes of nested aliases expand to billions of values: refused before anything walks them).
_MAX_RECIPE_BYTES = 1 << 20
_MAX_RECIPE_VALUES = 100_000


def _read_file(path: Path) -> Any:
    kind = "JSON" if path.suffix == ".json" else "YAML"
    size = path.stat().st_size
    if size > _MAX_RECIPE_BYTES:
        raise ValueError(f"{_escape(path)}: a recipe file is at most {_MAX_RECIPE_BYTES} bytes. Received: {size} bytes; "
                         f"is it a recipe?")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{_escape(path)}: not a {kind} text file (byte {e.start} is not UTF-8); pass a recipe "
                         f".yaml/.json file.") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, RecursionError) as e:
        detail = " ".join(str(e).split()) if not isinstance(e, RecursionError) else "nested too deeply"
        raise ValueError(f"{_escape(path)}: not valid {kind}: {one_line(detail)}") from None
    if nested_size_exceeds(data, _MAX_RECIPE_VALUES):
        raise ValueError(f"{_escape(path)}: the recipe expands to more than {_MAX_RECIPE_VALUES} values (YAML aliases "
                         f"nested in each other, or one that holds itself); a recipe has a few dozen: write it out "
                         f"without aliases.")
    return data


def load_recipe(source: RecipeSource) -> Recipe:
    """Loads a recipe from a preset name, a .yaml/.yml/.json file, a dict or a Recipe.

    A string without a file suffix is a preset name (see `list_presets`).

    Args:
        source: A `Recipe` (returned as is), a mapping (`Recipe.from_dict`), a
            preset name such as "int8", or a path to a YAML or JSON file.

    Returns:
        The validated `Recipe`.

    Raises:
        FileNotFoundError: If the file or preset does not exist (the presets are listed).
        ValueError: If the file is invalid; the message starts with the file path
            and names the key, the value and the allowed values.
        TypeError: If `source` has none of the types above.

    Example:
        >>> load_recipe("int8_kl").calibration
        'kl'
    """
    if isinstance(source, Recipe):
        return source
    if isinstance(source, Mapping):
        return Recipe.from_dict(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            "load_recipe expects a Recipe, a dict, a preset name or a path to a .yaml/.json file. "
            f"Received: {short_repr(source)} ({type(source).__name__})"
        )
    path = Path(source)
    if isinstance(source, str) and not path.suffix and os.sep not in source:
        if source not in list_presets():
            raise FileNotFoundError(
                f"No preset named {short_repr(source)}. Presets: {', '.join(list_presets())}; "
                "or pass a path to a .yaml/.yml/.json file."
            )
        path = _PRESET_DIR / f"{source}.yaml"
    if path.suffix not in _FILE_SUFFIXES:
        raise ValueError(f"{_escape(path)}: a recipe file must end in {', '.join(_FILE_SUFFIXES)}. "
                         f"Received: {short_repr(str(path))}")
    if not path.is_file():
        raise FileNotFoundError(f"Recipe file not found: {short_repr(str(path))}. Presets: {', '.join(list_presets())}.")
    data = _read_file(path)
    if not isinstance(data, Mapping):
        raise ValueError(f"{_escape(path)}: a recipe file must hold a mapping of keys. Received: {short_repr(data)}")
    try:
        return Recipe.from_dict(data)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{_escape(path)}: {e}") from None


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> Path:
    """Writes a recipe as YAML (.yaml/.yml) or JSON (.json), atomically.

    The text goes to a temporary file in the same directory, which then replaces
    `path` in one step: on failure the temporary file is removed and an existing
    `path` is left untouched.

    Args:
        recipe: The recipe to write.
        path: Destination; its suffix picks the format.

    Returns:
        The destination as a `Path`.

    Raises:
        ValueError: If the suffix is not .yaml, .yml or .json.
        TypeError: If `recipe` is not a `Recipe`.

    Example:
        >>> save_recipe(load_recipe("int8"), "/tmp/my_int8.yaml")  # doctest: +SKIP
        PosixPath('/tmp/my_int8.yaml')
    """
    if not isinstance(recipe, Recipe):
        raise TypeError(f"save_recipe expects a Recipe. Received: {short_repr(recipe)} ({type(recipe).__name__})")
    path = Path(path)
    if path.suffix not in _FILE_SUFFIXES:
        raise ValueError(f"A recipe file must end in {', '.join(_FILE_SUFFIXES)}. Received: path={short_repr(str(path))}")
    buffer = io.StringIO()  # serialized in memory: a failure leaves no file behind
    if path.suffix == ".json":
        json.dump(recipe.to_dict(), buffer, indent=2)
        buffer.write("\n")
    else:
        yaml.safe_dump(recipe.to_dict(), buffer, sort_keys=False)
    atomic_write_text(path, buffer.getvalue())
    return path
