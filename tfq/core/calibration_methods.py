"""The calibration methods: one registry, read by observers, recipes, calibration, tuning and the CLI.

A calibration method is a name (``"kl"``) bound to the observer that computes its ranges, the
parameters a user may set (each with its check, its description and its default), and whether
the target grid's ``bits`` applies. Everything that accepts a method name reads it from here:
:func:`tfq.observers.create_observer` builds the observer, :class:`tfq.Recipe` validates
``calibration_params`` with the same checks the observer applies, :func:`tfq.calibrate` passes
``bits`` only where it applies, :func:`tfq.tune` searches the parameters a method has, and the
CLI lists the names. Adding a method is one call to :func:`register_calibration_method`.

This module imports nothing from tfq (and neither TensorFlow nor numpy): observers are named by
class name (looked up in :mod:`tfq.observers`' registry) or given as a class.

Example:
    >>> get_calibration_method("percentile").check_params({"percentile": 99.9})
    >>> get_calibration_method("percentile").check_params({"percentile": 30})
    Traceback (most recent call last):
    ...
    ValueError: calibration_params['percentile'] for calibration='percentile' must be a number in (50, 100], e.g. 99.99. Received: percentile=30
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
import types
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "COMMON_OBSERVER_PARAMS",
    "DEFAULT_CALIBRATION",
    "CalibrationMethod",
    "Param",
    "calibration_method_names",
    "get_calibration_method",
    "register_calibration_method",
]

#: The method tfq.convert, tfq.calibrate, Recipe and the CLI use when none is named: MinMax over the
#: calibration samples, the samples far outside the rest set aside (see tfq.outliers).
DEFAULT_CALIBRATION = "robust_minmax"

#: Observer arguments tfq sets itself from the quantizer (never user parameters).
COMMON_OBSERVER_PARAMS = ("symmetric", "per_channel", "axis")


def _is_int(value: Any) -> bool:
    """Python and numpy integers, not bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def _is_number(value: Any) -> bool:
    """Python and numpy reals, not bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


@dataclasses.dataclass(frozen=True)
class Param:
    """One user parameter of a calibration method.

    Attributes:
        check: ``check(value) -> bool``: whether the value is accepted.
        description: what is accepted, for the error message ("an int >= 16, e.g. 2048").
        default: the value used when the parameter is not given (documentation and tuning).
    """

    check: Callable[[Any], bool]
    description: str
    default: Any = None


@dataclasses.dataclass(frozen=True)
class CalibrationMethod:
    """A calibration method: its observer, its parameters and their validation.

    Attributes:
        name: the method name (``calibration="kl"``).
        observer: the observer class, or its class name in :mod:`tfq.observers`' registry.
        observer_args: fixed constructor arguments (``{"method": "kl"}`` for the histogram observer).
        params: user parameters by name; :meth:`check_params` validates them.
        uses_bits: the observer takes the target grid's ``bits`` (set by tfq from the tensor's spec).
        description: one line for documentation and ``--help``.

    Example:
        >>> sorted(get_calibration_method("kl").params)
        ['batch_aggregate', 'num_bins']
    """

    name: str
    observer: Any
    observer_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    params: Mapping[str, Param] = dataclasses.field(default_factory=dict)
    uses_bits: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"a calibration method name is an identifier such as 'kl'. Received: {self.name!r}")
        if not (isinstance(self.observer, str) or inspect.isclass(self.observer)):
            raise TypeError(f"CalibrationMethod.observer must be an observer class or its class name. "
                            f"Received: {self.observer!r}")
        for key, param in dict(self.params).items():
            if not isinstance(param, Param) or not callable(param.check):
                raise TypeError(f"CalibrationMethod.params[{key!r}] must be a Param(check, description). "
                                f"Received: {param!r}")
        clash = sorted(set(self.params) & set(COMMON_OBSERVER_PARAMS + ("bits",)))
        if clash:
            raise ValueError(f"parameters {clash} of method {self.name!r} are set by tfq from the tensor's spec; "
                             f"remove them from params.")
        object.__setattr__(self, "observer_args", types.MappingProxyType(dict(self.observer_args)))
        object.__setattr__(self, "params", types.MappingProxyType(dict(self.params)))
        if inspect.isclass(self.observer):
            _check_signature(self)

    @property
    def observer_params(self) -> tuple[str, ...]:
        """Every argument tfq may pass to the observer: user parameters, ``bits`` if it applies, common ones."""
        return tuple(self.params) + (("bits",) if self.uses_bits else ()) + COMMON_OBSERVER_PARAMS

    def check_params(self, params: Mapping[str, Any], where: str = "calibration_params") -> None:
        """Raises a one-line ValueError naming the first unknown key or bad value of ``params``.

        Example:
            >>> get_calibration_method("minmax").check_params({})
        """
        if not isinstance(params, Mapping):
            raise TypeError(f"{where} must be a dict of parameters (e.g. {{'percentile': 99.9}}). "
                            f"Received: {params!r}")
        for key, value in params.items():
            if key not in self.params:
                names = ", ".join(repr(k) for k in sorted(self.params)) or "none"
                raise ValueError(f"Unknown {where} key {key!r} for calibration={self.name!r}. Allowed keys: "
                                 f"{names}. Received: {key}={value!r}")
            param = self.params[key]
            if not param.check(value):
                raise ValueError(f"{where}[{key!r}] for calibration={self.name!r} must be {param.description}. "
                                 f"Received: {key}={value!r}")


def _check_signature(method: CalibrationMethod) -> None:
    """The observer class must take the fixed arguments and every parameter tfq may pass."""
    accepted = [p for p in inspect.signature(method.observer.__init__).parameters if p != "self"]
    missing = sorted((set(method.observer_args) | set(method.observer_params)) - set(accepted))
    if missing:
        raise TypeError(f"method {method.name!r}: {method.observer.__name__} takes no parameter(s) {missing}")


_REGISTRY: dict[str, CalibrationMethod] = {}


def register_calibration_method(method: CalibrationMethod, *, replace: bool = False) -> CalibrationMethod:
    """Registers a calibration method; from then on every tfq entry point accepts its name.

    Args:
        method: the method (validated at construction).
        replace: allow replacing a registered method of the same name.

    Returns:
        ``method``.

    Raises:
        ValueError: a method of that name exists and ``replace`` is False.
        TypeError: ``method`` is not a :class:`CalibrationMethod`.

    Example:
        >>> from tfq.observers import MinMaxObserver
        >>> _ = register_calibration_method(CalibrationMethod("my_minmax", MinMaxObserver))  # doctest: +SKIP
        >>> tfq.calibrate(model, x, method="my_minmax")                                       # doctest: +SKIP
    """
    if not isinstance(method, CalibrationMethod):
        raise TypeError(f"register_calibration_method expects a CalibrationMethod. Received: {method!r}")
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"a calibration method named {method.name!r} is already registered; pass replace=True "
                         f"to replace it.")
    _REGISTRY[method.name] = method
    return method


def calibration_method_names() -> tuple[str, ...]:
    """The registered method names, in registration order.

    Example:
        >>> calibration_method_names()[:3]
        ('minmax', 'moving_average', 'kl')
    """
    return tuple(_REGISTRY)


def get_calibration_method(name: Any, where: str = "calibration") -> CalibrationMethod:
    """The registered method ``name``; a one-line error listing the names otherwise.

    Raises:
        ValueError: unknown name.
        TypeError: ``name`` is not a string.

    Example:
        >>> get_calibration_method("mse").uses_bits
        True
    """
    if not isinstance(name, str):
        raise TypeError(f"{where} must be a method name, one of {', '.join(map(repr, _REGISTRY))}. "
                        f"Received: {where}={name!r} ({type(name).__name__})")
    if name not in _REGISTRY:
        raise ValueError(f"{where} must be one of {', '.join(map(repr, _REGISTRY))}. Received: {where}={name!r}")
    return _REGISTRY[name]


# ---------------------------------------------------------------------------------------------
# Built-in methods. The checks are the observers' own bounds (tests compare them value by value).

_NUM_BINS = Param(lambda v: _is_int(v) and v >= 16, "an int >= 16, e.g. 2048", 2048)
_BATCH_AGGREGATE = Param(lambda v: v is None or v == "median", "None or 'median'", None)
_DECAY = Param(lambda v: _is_number(v) and 0.0 < v < 1.0, "a number in (0, 1), e.g. 0.9", 0.9)
_PERCENTILE = Param(lambda v: _is_number(v) and 50.0 < v <= 100.0, "a number in (50, 100], e.g. 99.99", 99.99)

for _method in (
    CalibrationMethod("minmax", "MinMaxObserver", description="running minimum and maximum"),
    CalibrationMethod("moving_average", "MovingAverageMinMaxObserver", params={"decay": _DECAY},
                      description="exponential moving average of per-batch minimum and maximum"),
    CalibrationMethod("kl", "HistogramObserver", {"method": "kl"},
                      {"num_bins": _NUM_BINS, "batch_aggregate": _BATCH_AGGREGATE}, uses_bits=True,
                      description="smoothed entropy (KL divergence) calibration, TensorRT style"),
    CalibrationMethod("percentile", "HistogramObserver", {"method": "percentile"},
                      {"percentile": _PERCENTILE, "num_bins": _NUM_BINS, "batch_aggregate": _BATCH_AGGREGATE},
                      description="a percentile of the values"),
    CalibrationMethod("mse", "HistogramObserver", {"method": "mse"},
                      {"num_bins": _NUM_BINS, "batch_aggregate": _BATCH_AGGREGATE}, uses_bits=True,
                      description="the range minimizing the expected squared quantization error"),
    # The observer is MinMax; tfq.calibrate sets the samples far outside the rest aside (tfq.outliers).
    CalibrationMethod(DEFAULT_CALIBRATION, "MinMaxObserver",
                      description="MinMax over the calibration samples, those far outside the rest set aside "
                                  "(tfq's default)"),
):
    register_calibration_method(_method)
del _method
