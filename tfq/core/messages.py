"""Error-message helpers shared by every module: values shown short, on one line."""

from __future__ import annotations

from typing import Any

__all__ = ["one_line", "short_repr"]


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
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def one_line(text: str, limit: int = 400) -> str:
    """``text`` with its whitespace (newlines included) collapsed, cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"
