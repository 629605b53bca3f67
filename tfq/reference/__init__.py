"""The integer arithmetic of an INT8 TFLite model, made visible: a bit-exact numpy executor.

An INT8 model computes with ``r = S·(q − Z)``: int8 × int8 products summed in int32 with the zero
points folded in, the bias in int32 at scale ``S_in·S_w``, and a requantization by the real
multiplier ``M = S_in·S_w / S_out`` written as the fixed-point ``M0·2^−n`` and saturated to
``[−128, 127]``. :func:`run` does exactly that in numpy, op by op, and reproduces LiteRT's reference
kernels (``OpResolverType.BUILTIN_REF``) bit for bit; :func:`trace` keeps every intermediate int
tensor and accumulator; :func:`explain` shows, per op, the scales and zero points, ``M`` and
``(M0, n)``, the int32 accumulator bounds (worst case from the weights, and observed on data) and
how many outputs saturated.

Where LiteRT's reference kernels are not the textbook formula, the executor follows the kernels
(and :func:`explain` says so): FULLY_CONNECTED requantizes in double (``round(acc·M)``), LOGISTIC,
TANH and GELU in int8 are 256-entry tables built in float32, SOFTMAX is gemmlowp fixed point.

Example:
    >>> outputs = tfq.reference.run(tflite, x_test[:100])                  # doctest: +SKIP
    >>> print(tfq.reference.explain(tflite, op="CONV_2D", inputs=x_test[:100])[0])  # doctest: +SKIP
"""

from __future__ import annotations

from tfq.reference.executor import as_graph, execute
from tfq.reference.explain import (
    OpExplanation,
    Trace,
    build_trace,
    explain_ops,
    format_table,
)
from tfq.reference.fixedpoint import (
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)
from tfq.reference.kernels import UnsupportedOpError, supported_ops

__all__ = [
    "OpExplanation",
    "Trace",
    "UnsupportedOpError",
    "explain",
    "explain_table",
    "multiply_by_quantized_multiplier",
    "quantize_multiplier",
    "rounding_divide_by_pot",
    "run",
    "saturating_rounding_doubling_high_mul",
    "supported_ops",
    "trace",
]


def run(tflite, inputs) -> list:
    """Runs an INT8 (or int16x8) TFLite model in numpy, bit for bit as LiteRT's reference kernels.

    Args:
        tflite: TFLite bytes or a ``.tflite`` path.
        inputs: an array (single-input model) or a list of arrays in the model's input order, with a
            leading batch dimension of any size. Float data for an integer model input is
            quantized as :class:`tfq.TFLiteModel` does: ``clip(round(x/S) + Z)``.

    Returns:
        The model's output arrays in the graph's output order, with the output tensors' dtypes
        (int8 for int8-I/O models, float32 after a DEQUANTIZE).

    Raises:
        UnsupportedOpError: an op has no reference kernel (the message names it).
        ValueError, TypeError: inputs that do not fit the model.

    Example:
        >>> probs = tfq.reference.run(tflite, x_test[:100])[0]     # doctest: +SKIP
    """
    return execute(as_graph(tflite), inputs, keep=False).outputs


def trace(tflite, inputs) -> Trace:
    """Runs the model like :func:`run` and keeps every intermediate tensor and int32 accumulator.

    Returns:
        A :class:`Trace`: ``trace.tensors`` (index → array), ``trace[name_substring]``,
        ``trace.accumulators`` (op index → the int32 accumulator before requantization) and
        ``trace.ops`` (one :class:`OpExplanation` per op, with what was observed on ``inputs``).

    Example:
        >>> t = tfq.reference.trace(tflite, x_test[:10])          # doctest: +SKIP
        >>> t["conv1"].dtype, t.accumulators[1].max()             # doctest: +SKIP
    """
    return build_trace(execute(as_graph(tflite), inputs))


def explain(tflite, op=None, inputs=None) -> list[OpExplanation]:
    """The integer arithmetic of each op (or of ``op``): scales, ``M ≈ M0·2^−n``, accumulator bounds, saturation.

    Args:
        tflite: TFLite bytes or a ``.tflite`` path.
        op: an op index, an op type (``"CONV_2D"``: its first occurrence) or a substring of an op's
            output tensor name (e.g. a Keras layer name); a list of those; None for every op.
        inputs: data to observe the accumulators and count saturated outputs on (optional: without
            it only the static quantities — multipliers and worst-case bounds — are given).

    Returns:
        A list of :class:`OpExplanation` (``str()`` prints one op; :func:`explain_table` all).

    Example:
        >>> [conv] = tfq.reference.explain(tflite, op="conv1", inputs=x_test[:100])   # doctest: +SKIP
        >>> conv.m0, conv.n, conv.saturated                                          # doctest: +SKIP
    """
    graph = as_graph(tflite)
    ops = None if op is None else (list(op) if isinstance(op, (list, tuple)) else [op])
    execution = execute(graph, inputs) if inputs is not None else None
    return explain_ops(graph, execution, ops)


def explain_table(tflite, inputs=None) -> str:
    """:func:`explain` for every op as a text table, one line per op (what ``tfq inspect --explain`` prints)."""
    return format_table(explain(tflite, inputs=inputs))
