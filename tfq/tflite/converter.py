"""Running the TFLite converter: quietly, with its errors summarised in one line.

The converter prints its progress and its errors to the process's stderr (C++ code) and
stdout; :func:`run_converter` captures both and turns a failure into a :class:`ConversionError`
naming the cause and the fix, without the MLIR locations that precede it. How the converter is
set up for each mode is in :mod:`tfq.export_modes`.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import warnings

from tfq.core.logs import Progress

__all__ = ["ConversionError", "run_converter"]


class ConversionError(ValueError):
    """The TFLite converter refused the model; the message says which op and what to do."""


def _all_layers(model):
    for layer in getattr(model, "layers", []):
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def _is_rnn(layer) -> bool:
    import keras

    return isinstance(layer, keras.layers.RNN)


def summarize_converter_error(text: str, mode: str, model=None) -> str:
    """One line: the converter's first error (without MLIR locations), and what to do."""
    cause = first_error_line(text)
    if "TensorList" in text:
        rnns = [f"{layer.name!r} ({type(layer).__name__})" for layer in _all_layers(model)
                if _is_rnn(layer)] if model is not None else []
        where = f"recurrent layer {rnns[0]}" if rnns else "a recurrent layer"
        return (f"{where} loops over a sequence of unknown length, which the TFLite converter cannot export in "
                f"mode {mode!r} (it said: {cause}). Give the model a fixed number of time steps "
                f"(keras.Input(shape=(steps, features))): tfq then unrolls it.")
    op = re.search(r"'(tfl?\.\w+)' op", text)
    op_name = op.group(1) if op else None
    if "neither a custom op nor a flex op" in text or "is not supported" in text or "Failed to" in text:
        hint = (f"op {op_name!r} cannot run in {mode}" if op_name else f"an op cannot run in {mode}")
        return (f"{hint}: keep the layer that makes it in float (float_layers=[...]) or use mode='dynamic'. "
                f"Converter said: {cause}")
    return f"the TFLite converter failed: {cause}"


def strip_location(text: str) -> str:
    """``text`` without a leading MLIR location: ``loc(callsite(fused[...] at ...)): cause`` → ``cause``.

    The location's parentheses are matched (quoted strings skipped), so a location of any length
    goes and the cause stays whole.

    Example:
        >>> strip_location("loc(callsite(f(x) at g)): op 'tf.A' failed")
        "op 'tf.A' failed"
    """
    text = text.strip()
    if not text.startswith("loc("):
        return text
    depth, quoted = 0, False
    for i, char in enumerate(text):
        if char == '"' and text[i - 1] != "\\":
            quoted = not quoted
        elif not quoted and char == "(":
            depth += 1
        elif not quoted and char == ")":
            depth -= 1
            if depth == 0:
                return text[i + 1:].lstrip(" :")
    return text


def first_error_line(text: str, limit: int = 300) -> str:
    """The converter's first error, without the MLIR location that precedes it (at most ``limit`` characters)."""
    for line in text.splitlines():
        if "error:" in line:
            cause = " ".join(strip_location(line.split("error:", 1)[1]).split())
            return cause if len(cause) <= limit else cause[:limit - 1] + "…"
    lines = [strip_location(line) for line in text.splitlines() if line.strip()]
    first = " ".join(lines[0].split()) if lines else "no message"
    return first if len(first) <= limit else first[:limit - 1] + "…"


@contextlib.contextmanager
def _captured_stderr():
    """Redirects the process's stderr (file descriptor 2, where the converter's C++ code writes its
    progress and its errors) into a buffer; yields a list that receives the text."""
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


def run_converter(converter, mode: str, model=None) -> bytes:
    """``converter.convert()`` with its output captured; a failure raises :class:`ConversionError` (one line)."""
    sink = io.StringIO()
    failure = None
    with Progress("converting (TFLite converter)"), _captured_stderr() as stderr:
        try:
            with contextlib.redirect_stdout(sink), warnings.catch_warnings():
                # Emitted for every fake-quant graph with integer I/O; the ranges come from the graph.
                warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
                return converter.convert()
        except Exception as err:  # ConverterError and friends
            failure = str(err)
    raise ConversionError(summarize_converter_error(failure + "\n" + "".join(stderr), mode, model)) from None
