"""Putting data given by input name into a model's input order: the one helper for dicts of inputs.

:func:`tfq.representative_dataset`, :class:`tfq.TFLiteModel` and :func:`tfq.evaluate` all accept a
dict keyed by input name; they order it with :func:`order_by_name`, so they accept and refuse the
same dicts with the same message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["order_by_name"]


def order_by_name(values: Mapping[Any, Any], names: Sequence[str], *, data: str = "the data",
                  target: str = "the model", fix: str = "key the data by the model's input names") -> list:
    """``values`` (keyed by input name) as a list in the order of ``names``.

    Args:
        values: a mapping from input name (any key; compared as ``str``) to its data.
        names: the model's input names, in its input order.
        data: how to call ``values`` in the message.
        target: how to call the model in the message.
        fix: what the user should do, for the message.

    Returns:
        ``[values[name] for name in names]``.

    Raises:
        ValueError: the keys are not exactly ``names``; the message lists the missing and the
            unexpected ones.

    Example:
        >>> order_by_name({"b": 2, "a": 1}, ["a", "b"])
        [1, 2]
    """
    by_name = {str(k): v for k, v in values.items()}
    keys = sorted(by_name)
    if keys != sorted(names) or len(by_name) != len(values):
        missing = [n for n in names if n not in by_name]
        unexpected = [k for k in keys if k not in names]
        raise ValueError(f"{data} has dict keys {keys} but {target} has inputs {list(names)} (missing: {missing}, "
                         f"unexpected: {unexpected}); {fix}.")
    return [by_name[name] for name in names]
