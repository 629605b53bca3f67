"""The post-training methods: one registry, read by recipes, the PTQ pipeline, conversion, tuning and the CLI.

A post-training method (cross-layer equalization, bias correction, learned weight rounding,
data-free ranges …) is a name bound to the pipeline stage(s) it runs at, the values its recipe
setting takes (the first one: off), its options (each with its check, description and default),
the export modes it applies to, whether it needs or excludes calibration data, the values
:func:`tfq.tune` may try, and its implementation. Everything that accepts a method reads it from
here: :class:`tfq.Recipe` validates the setting (its own field for the built-ins, ``methods`` for
the others), :mod:`tfq.ptq.pipeline` runs the steps of the methods switched on, stage by stage,
:func:`tfq.convert` and :func:`tfq.fake_quantize` take any of them through ``methods=``, the
``tfq convert`` command through ``--method=name[=value][:option=value,…]``, and :func:`tfq.tune`
searches the values each one lists. Adding a method is one module (its steps) and one call to
:func:`register_ptq_method`.

The stages, in the order :func:`tfq.convert` runs them (within a stage: by ``order``, then in
registration order):

1. ``"float_model"``: ``step(model, ctx) -> model`` on the float model, before the fake-quant rewrite.
2. ``"calibration_inputs"``: ``step(qmodel, ctx) -> data``: the calibration inputs (e.g. synthesized).
3. ``"ranges"``: ``step(qmodel, ctx) -> {quantizer name: (min, max)}``: ranges set without data.
4. ``"frozen_model"``: ``step(frozen, ctx) -> result`` on the frozen fake-quant model (changed in
   place) before the TFLite converter; ``result`` is kept in ``MethodsReport.results[name]``.

``ctx`` is a :class:`MethodContext` (the value, the options with their defaults, the recipe, the
calibration data, the report). A step is a callable or a lazy ``"module:function"`` string, so
the built-ins are declared here without importing TensorFlow.

This module imports nothing from tfq but :mod:`tfq.core.calibration_methods` (for :class:`Param`)
and :mod:`tfq.core.export_modes`; TensorFlow is imported only when a step runs.

Example:
    >>> get_ptq_method("weight_rounding").values
    ('nearest', 'adaround', 'gptq')
    >>> get_ptq_method("bias_correction").check("always", "Recipe.bias_correction")
    Traceback (most recent call last):
    ...
    ValueError: Recipe.bias_correction must be one of False, True, 'empirical', 'analytical'. Received: bias_correction='always'
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections.abc import Callable, Mapping
from typing import Any

from tfq.core.calibration_methods import Param
from tfq.core.export_modes import get_export_mode

__all__ = [
    "STAGES",
    "MethodContext",
    "PTQMethod",
    "Param",
    "get_ptq_method",
    "ptq_method_names",
    "register_ptq_method",
]

#: The pipeline stages a method's steps run at, in the order they run.
STAGES = ("float_model", "calibration_inputs", "ranges", "frozen_model")
#: What a method does with calibration data.
DATA_USES = ("optional", "needs", "excludes")
#: Stages that choose ranges (or change the model the ranges are chosen on): a precomputed
#: tfq.Calibration cannot be used with a method running there.
RANGE_STAGES = ("float_model", "calibration_inputs", "ranges")
_LAZY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _same(value: Any, allowed: Any) -> bool:
    """``value`` is ``allowed``: booleans by identity (1 is not True), strings by equality."""
    if isinstance(allowed, bool) or isinstance(value, bool):
        return value is allowed
    return type(value) is type(allowed) and value == allowed


def _quote_all(values) -> str:
    return ", ".join(repr(v) for v in values)


@dataclasses.dataclass
class MethodContext:
    """What a method's step receives besides the model.

    Attributes:
        name: the method's name.
        value: its setting (one of :attr:`PTQMethod.values`, never the off value).
        options: its options, every one present (defaults filled in).
        recipe: the :class:`tfq.Recipe` of the conversion.
        data: the calibration data (None without; the synthesized inputs after a
            ``"calibration_inputs"`` step).
        report: the :class:`tfq.MethodsReport` being filled.
        shared: state the pipeline passes between steps (``"references"``: the float kernels of
            the frozen model before any ``"frozen_model"`` step changed them, ``{id(wrapper): array}``).
    """

    name: str
    value: Any
    options: Mapping[str, Any]
    recipe: Any
    data: Any = None
    report: Any = None
    shared: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PTQMethod:
    """A post-training method: where it runs, the values and options it takes, and what it needs.

    Attributes:
        name: the method name (a recipe key, a :func:`tfq.convert` ``methods`` key, a CLI ``--method``).
        steps: ``{stage: step}``; ``step`` is ``step(target, ctx)`` (see :data:`STAGES`), a callable or
            a lazy ``"module:function"``.
        values: the values its setting takes; ``values[0]`` is off, ``values[1]`` what a setting
            given as options alone (``{"k": 2.0}``) switches on.
        params: its options by name (:class:`Param`: check, description, default).
        modes: the export modes it applies to (checked at registration).
        data: ``"needs"`` (calibration data, or inputs synthesized at ``"calibration_inputs"``),
            ``"excludes"`` (works without data, refuses it) or ``"optional"``.
        tune: the values :func:`tfq.tune` tries (first: the plain choice, off); empty: not searched.
        order: within a stage, steps run by increasing ``order`` (then in registration order).
        check_recipe: ``check_recipe(recipe, value)`` raises a one-line ValueError for a recipe the
            method cannot run with (e.g. learned rounding needs narrow-range weights); optional.
        description: one line for documentation and ``--help``.

    Example:
        >>> PTQMethod("noop", {"frozen_model": lambda frozen, ctx: None}).values
        (False, True)
    """

    name: str
    steps: Mapping[str, Any]
    values: tuple = (False, True)
    params: Mapping[str, Param] = dataclasses.field(default_factory=dict)
    modes: tuple[str, ...] = ("int8",)
    data: str = "optional"
    tune: tuple = ()
    order: int = 50
    check_recipe: Callable[[Any, Any], None] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"a PTQ method name is an identifier such as 'equalize'. Received: {self.name!r}")
        if not isinstance(self.steps, Mapping) or not self.steps:
            raise TypeError(f"PTQMethod.steps must be a non-empty dict {{stage: step}}, stages among {STAGES}. "
                            f"Received: steps={self.steps!r}")
        for stage, step in self.steps.items():
            if stage not in STAGES:
                raise ValueError(f"PTQMethod.steps stage must be one of {_quote_all(STAGES)}. Received: {stage!r}")
            if not (callable(step) or (isinstance(step, str) and _LAZY.match(step))):
                raise TypeError(f"PTQMethod.steps[{stage!r}] must be callable(target, ctx) or 'module:function'. "
                                f"Received: {step!r}")
        if not isinstance(self.values, tuple) or len(self.values) < 2 or not all(
                isinstance(v, (bool, str)) for v in self.values):
            raise TypeError(f"PTQMethod.values must be a tuple of at least two bools/strings, the first one off. "
                            f"Received: values={self.values!r}")
        for key, param in dict(self.params).items():
            if not isinstance(key, str) or key == "value" or not isinstance(param, Param) or not callable(param.check):
                raise TypeError(f"PTQMethod.params[{key!r}] must be a Param(check, description, default) under a "
                                f"name other than 'value'. Received: {param!r}")
        if not isinstance(self.modes, tuple) or not self.modes or not all(isinstance(m, str) for m in self.modes):
            raise TypeError(f"PTQMethod.modes must be a non-empty tuple of mode names. Received: modes={self.modes!r}")
        if self.data not in DATA_USES:
            raise ValueError(f"PTQMethod.data must be one of {_quote_all(DATA_USES)}. Received: data={self.data!r}")
        if self.check_recipe is not None and not callable(self.check_recipe):
            raise TypeError(f"PTQMethod.check_recipe must be callable(recipe, value) or None. "
                            f"Received: {self.check_recipe!r}")
        if not isinstance(self.order, int) or isinstance(self.order, bool):
            raise TypeError(f"PTQMethod.order must be an int. Received: order={self.order!r}")
        object.__setattr__(self, "steps", types.MappingProxyType(dict(self.steps)))
        object.__setattr__(self, "params", types.MappingProxyType(dict(self.params)))
        if not isinstance(self.tune, tuple):
            raise TypeError(f"PTQMethod.tune must be a tuple of settings. Received: tune={self.tune!r}")
        for setting in self.tune:
            self.check(setting, f"PTQMethod({self.name!r}).tune value")
        if self.tune and not self.is_off(self.tune[0]):
            raise ValueError(f"PTQMethod.tune starts with the off value {self.off!r} (the plain choice). "
                             f"Received: tune={self.tune!r}")

    @property
    def off(self) -> Any:
        """The value that switches the method off."""
        return self.values[0]

    def is_off(self, setting: Any) -> bool:
        """Whether ``setting`` (a value, an options dict, or None) leaves the method off."""
        if setting is None:
            return True
        if isinstance(setting, Mapping):
            return _same(setting.get("value", self.values[1]), self.off)
        return _same(setting, self.off)

    def check(self, setting: Any, where: str) -> tuple[Any, dict]:
        """Validates a setting; returns ``(value, options)`` with every option present.

        A setting is a value (one of :attr:`values`) or a dict of options, with the value under
        ``"value"`` (default: ``values[1]``). ``where`` names it in the one-line error.

        Raises:
            ValueError: a value not in :attr:`values`, an unknown option, an option value its
                check refuses (named with the value received).
            TypeError: ``values`` are ``(False, True)`` and the value is not a bool.

        Example:
            >>> get_ptq_method("weight_rounding").check("gptq", "weight_rounding")
            ('gptq', {})
        """
        given: Mapping[str, Any] = {}
        value = setting
        if isinstance(setting, Mapping):
            given = {k: v for k, v in setting.items() if k != "value"}
            value = setting.get("value", self.values[1])
        if self.values == (False, True) and not isinstance(value, bool):
            raise TypeError(f"{where} must be a bool (True or False). Received: {self.name}={value!r}")
        if not any(_same(value, allowed) for allowed in self.values):
            raise ValueError(f"{where} must be one of {_quote_all(self.values)}. Received: {self.name}={value!r}")
        for key, option in given.items():
            if key not in self.params:
                names = _quote_all(sorted(self.params)) or "none"
                raise ValueError(f"Unknown option {key!r} of method {self.name!r} ({where}). Allowed options: "
                                 f"{names}. Received: {key}={option!r}")
            if not self.params[key].check(option):
                raise ValueError(f"{where} option {key!r} must be {self.params[key].description}. "
                                 f"Received: {key}={option!r}")
        return value, {**{k: p.default for k, p in self.params.items()}, **given}

    def normalize(self, setting: Any, where: str) -> Any:
        """The canonical form of a setting, as a recipe stores it: the value alone without options, else
        ``{"value": …, option: …}`` with the options given; None when off.

        Example:
            >>> get_ptq_method("equalize").normalize({"value": True}, "methods['equalize']")
            True
        """
        value, _ = self.check(setting, where)
        if self.is_off(value):
            return None
        given = {k: v for k, v in setting.items() if k != "value"} if isinstance(setting, Mapping) else {}
        return {"value": value, **dict(sorted(given.items()))} if given else value


_REGISTRY: dict[str, PTQMethod] = {}


def register_ptq_method(method: PTQMethod, *, replace: bool = False) -> PTQMethod:
    """Registers a post-training method; from then on recipes, ``tfq.convert``, the CLI and ``tfq.tune`` take it.

    Args:
        method: the method (validated at construction; its modes here).
        replace: allow replacing a registered method of the same name.

    Returns:
        ``method``.

    Raises:
        ValueError: a method of that name exists and ``replace`` is False; a mode that is not
            registered, or a mode whose ranges the TFLite converter chooses (no fake-quant model) for a
            method with no ``"float_model"`` or ``"calibration_inputs"`` step.
        TypeError: ``method`` is not a :class:`PTQMethod`.

    Example:
        >>> def clip(frozen, ctx): ...                                             # doctest: +SKIP
        >>> register_ptq_method(PTQMethod("clip_weights", {"frozen_model": clip},
        ...     params={"k": Param(lambda v: v > 0, "a number > 0", 3.0)}))        # doctest: +SKIP
        >>> tfq.convert(model, "int8", x, methods={"clip_weights": {"k": 2.0}})    # doctest: +SKIP
    """
    if not isinstance(method, PTQMethod):
        raise TypeError(f"register_ptq_method expects a PTQMethod. Received: {method!r}")
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"a PTQ method named {method.name!r} is already registered; pass replace=True to replace it.")
    for mode in method.modes:
        entry = get_export_mode(mode, f"PTQMethod({method.name!r}).modes value")
        if not entry.tfq_ranges and not set(method.steps) & {"float_model", "calibration_inputs"}:
            raise ValueError(f"method {method.name!r} runs on the fake-quant model only, and mode {mode!r} has none "
                             f"(the TFLite converter chooses its ranges). Remove {mode!r} from modes.")
    _REGISTRY[method.name] = method
    return method


def ptq_method_names() -> tuple[str, ...]:
    """The registered method names, in registration order.

    Example:
        >>> ptq_method_names()[:4]
        ('equalize', 'bias_correction', 'weight_rounding', 'data_free')
    """
    return tuple(_REGISTRY)


def get_ptq_method(name: Any, where: str = "method") -> PTQMethod:
    """The registered method ``name``; a one-line error listing the names otherwise.

    Raises:
        ValueError: unknown name (or not a string).

    Example:
        >>> get_ptq_method("data_free").data
        'excludes'
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"{where} must be one of {_quote_all(_REGISTRY)}. Received: {where}={name!r}")
    return _REGISTRY[name]


def methods_at(stage: str) -> list[PTQMethod]:
    """The registered methods with a step at ``stage``, in the order they run."""
    found = [m for m in _REGISTRY.values() if stage in m.steps]
    return sorted(found, key=lambda m: m.order)  # stable: registration order within an order


# ---------------------------------------------------------------------------------------------
# Built-in methods. Their steps live in tfq.ptq.<module>; their settings are Recipe fields of their name.


def _check_weight_rounding(recipe, value) -> None:
    """Learned rounding keeps TFLite's narrow weight grid."""
    specs = [("weights", recipe.weights)] + [(f"overrides[{i}].weights", o.weights)
                                             for i, o in enumerate(recipe.overrides) if o.weights is not None]
    for where, spec in specs:
        if spec.is_integer and not spec.narrow_range:
            raise ValueError(
                f"weight_rounding={value!r} keeps TFLite's narrow weight grid "
                f"[-(2^(b-1)-1), 2^(b-1)-1]. Received: {where}.narrow_range=False; set it to True."
            )


for _method in (
    PTQMethod("equalize", {"float_model": "tfq.ptq.equalization:equalize_step"}, modes=("int8", "int16x8"),
              tune=(False, True),
              description="cross-layer equalization and high-bias absorption before quantizing (tfq.equalize)"),
    # True: "empirical" with data, "analytical" with data_free. Last of its stage (order 90): it corrects what
    # the others leave. Registration order (equalize, bias_correction, weight_rounding, data_free) is the order
    # of messages and of tfq.tune's draws; the order of the steps is their stage, then their ``order``.
    PTQMethod("bias_correction", {"frozen_model": "tfq.ptq.bias_correction:correction_step"},
              values=(False, True, "empirical", "analytical"), tune=(False, True), order=90,
              description="each layer's mean output shift from weight quantization, subtracted from its bias"),
    PTQMethod("weight_rounding", {"frozen_model": "tfq.ptq.weight_rounding:rounding_step"},
              values=("nearest", "adaround", "gptq"), data="needs", tune=("nearest", "gptq"), order=10,
              modes=("int8", "w4_dynamic", "w4_weight_only"),
              check_recipe=_check_weight_rounding,
              description="each weight's integer learned on calibration data (AdaRound, GPTQ)"),
    # True: "synthetic".
    PTQMethod("data_free", {"calibration_inputs": "tfq.ptq.data_free:synthesize_step",
                            "ranges": "tfq.ptq.data_free:ranges_step"},
              values=(False, True, "synthetic", "bn_statistics"), modes=("int8", "int16x8"), data="excludes",
              tune=(False,),
              description="activation ranges from BatchNorm statistics, without data: synthetic inputs (ZeroQ) "
                          "or BatchNorm ranges"),
):
    register_ptq_method(_method)
del _method
