"""Error-message helpers shared by every module: values shown short, on one line."""

from __future__ import annotations

from typing import Any

__all__ = ["check_bool", "nested_size_exceeds", "one_line", "short_repr"]

# Longest text short_repr renders before cutting it: a value (a YAML of nested aliases, a huge list)
# whose repr would take gigabytes is never rendered whole.
_REPR_BUDGET = 4096


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters; arrays by shape and dtype, not contents.

    Example:
        >>> short_repr("x" * 200)[:12], len(short_repr("x" * 200))
        ("'xxxxxxxxxxx", 80)
    """
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype") and not isinstance(value, (str, bytes)):
        return f"<{type(value).__name__} of shape {tuple(shape)}, dtype {value.dtype}>"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{type(value).__name__} of {len(value)} bytes>"
    if isinstance(value, (list, tuple, dict, set, frozenset)) and nested_size_exceeds(value, max(limit, _REPR_BUDGET)):
        return f"<{type(value).__name__} of {len(value)} items, too large to show>"
    if isinstance(value, str) and len(value) > _REPR_BUDGET:
        value = value[:_REPR_BUDGET]
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__}>"
    text = " ".join(text[:max(limit, _REPR_BUDGET)].split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def one_line(text: str, limit: int = 400) -> str:
    """``text`` with its whitespace (newlines included) collapsed, cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def nested_size_exceeds(value: Any, budget: int) -> bool:
    """Whether ``value`` holds more than ``budget`` items counted through its nesting, without rendering it.

    Shared sub-containers (as YAML aliases make them) count at every place they appear, and a
    container that holds itself counts without end: the walk stops as soon as the budget is spent,
    so it costs at most ``budget`` steps whatever the value.

    Example:
        >>> leaf = [0] * 10; nested_size_exceeds([[leaf] * 10] * 10, 1000)
        True
    """
    stack, seen = [value], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > budget:
            return True
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, (str, bytes)) and len(item) > budget:
            return True
    return False


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool; else a one-line TypeError naming ``name`` (the string ``"False"``
    is not read as true).

    Example:
        >>> check_bool("verbose", True)
        True
        >>> check_bool("verbose", "False")
        Traceback (most recent call last):
        ...
        TypeError: verbose must be True or False. Received: verbose='False' (str)
    """
    if isinstance(value, bool):
        return value
    import numpy as np  # a numpy bool (from an array or a config) is a bool

    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"{name} must be True or False. Received: {name}={short_repr(value)} ({type(value).__name__})")
