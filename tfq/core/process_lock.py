"""The one process-wide lock of tfq: what rewrites, calibrates and converts runs one call at a time.

Calibration switches every quantizer of the process into observing mode through module state
(:class:`tfq.quantsim.layers.observing`), rewriting draws layer names from Keras' global name
counters, and the TFLite converter traces with TensorFlow's global state: two such calls running
at once in two threads would read each other's state. :func:`tfq.convert`, :func:`tfq.calibrate`
and :func:`tfq.qat.quantize_model` therefore hold this lock (re-entrant: they call each other), so
concurrent calls from threads run one after another and give the bytes sequential calls give.
Processes are independent: run conversions in several processes to use several cores.
"""

from __future__ import annotations

import functools
import threading

__all__ = ["PROCESS_LOCK", "serialized"]

PROCESS_LOCK = threading.RLock()


def serialized(function):
    """Decorator: ``function`` runs holding :data:`PROCESS_LOCK`.

    Example:
        >>> @serialized
        ... def f():
        ...     return 1
        >>> f()
        1
    """

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with PROCESS_LOCK:
            return function(*args, **kwargs)

    return wrapper
