"""Evaluation results as data: rows of figures, rendered as markdown, HTML, JSON or a matplotlib figure.

:class:`Report` holds what :func:`tfq.evaluate` measured, one row (a dict) per model;
:class:`LayerErrorReport` holds what :func:`tfq.layer_errors` measured, one row per quantized
tensor. Both are plain data: ``to_dict``/``from_dict`` round-trip, and JSON stores the
non-finite floats (an SQNR of ``inf`` for identical outputs) as the strings ``"inf"``, ``"-inf"``
and ``"nan"`` so the file stays strict JSON. In Jupyter both display as a table
(``_repr_html_``, ``_repr_markdown_``); ``plot()`` returns a ``matplotlib.figure.Figure``.

Example:
    >>> report = Report([{"name": "keras", "accuracy": 0.97, "size": 4000}], metrics=["accuracy"])
    >>> report.row("keras")["accuracy"]
    0.97
"""

from __future__ import annotations

import html
import io
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from tfq.core.fileio import atomic_write_bytes

__all__ = ["Report", "LayerErrorReport", "ROUNDING_RMSE_OVER_SCALE"]

ROUNDING_RMSE_OVER_SCALE = 1.0 / math.sqrt(12.0)
"""RMSE/scale of pure rounding error (uniform over one quantization step): ≈ 0.289."""

_REPORT_FORMAT = "tfq.analysis.report/1"
_LAYER_FORMAT = "tfq.layer_errors/1"
_REPORT_TEXT_KEYS = ("name", "kind", "size_kind", "error")
_LAYER_TEXT_KEYS = ("tensor", "op", "float_tensor", "match", "dtype")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _encode(value):
    """JSON-safe copy: non-finite floats become strings, numpy scalars plain Python."""
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _decode_value(value):
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, list):
        return [_decode_value(v) for v in value]
    return value


def _decode_row(row: Mapping, text_keys: tuple[str, ...]) -> dict:
    out = {}
    for key, value in row.items():
        if key not in text_keys:
            value = _decode_value(value)
        out[key] = value
    return out


def _number(value, spec: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, (int, float)) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], align: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_cell(text) -> str:
    text = str(text)
    if text.startswith("**") and text.endswith("**") and len(text) > 4:
        return f"<b>{html.escape(text[2:-2])}</b>"
    return html.escape(text)


def _html_table(header: list[str], align: list[str], rows: list[list[str]], notes: list[str]) -> str:
    """The same table as :func:`_table`, as HTML (what Jupyter and the docs site show)."""
    style = {"r": ' style="text-align:right"', "l": ' style="text-align:left"'}
    head = "".join(f"<th{style[a]}>{html.escape(h)}</th>" for h, a in zip(header, align))
    body = "".join("<tr>" + "".join(f"<td{style[a]}>{_html_cell(c)}</td>" for c, a in zip(row, align)) + "</tr>"
                   for row in rows)
    foot = "".join(f"<p><small>{html.escape(n)}</small></p>" for n in notes)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{foot}"


def _figure_class():
    """A ``matplotlib.figure.Figure`` that Jupyter shows as a PNG without pyplot or ``%matplotlib inline``.

    The figure is not registered with pyplot (no global state, nothing shown twice); where IPython's
    inline backend registers its own PNG printer for figures, that printer is used instead.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or pip install 'tfq[plot]').") from None

    class ReportFigure(Figure):
        """A matplotlib Figure with a PNG representation for Jupyter."""

        def _repr_png_(self) -> bytes:
            return _png_bytes(self)

    return ReportFigure


def _png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _write_file(path, data: bytes, method: str, example: str) -> Path:
    """Writes ``data`` atomically; a bad ``path`` is one line naming the caller's path, never a temp file."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{method} expects a file path, not a directory. Received: path={str(path)!r}; "
                         f"give a file name, e.g. {str(target / example)!r}.")
    if not target.parent.exists():
        raise FileNotFoundError(f"{method} cannot write path={str(path)!r}: its directory {str(target.parent)!r} "
                                "does not exist. Create it first or choose another path.")
    if not target.parent.is_dir():
        raise ValueError(f"{method} cannot write path={str(path)!r}: {str(target.parent)!r} is a file, not a "
                         "directory. Choose another path.")
    try:
        return atomic_write_bytes(target, data)
    except OSError as err:
        raise ValueError(f"{method} cannot write path={str(path)!r} ({err.strerror or type(err).__name__}). "
                         "Choose a writable location.") from None


def _save_png(fig, path, method: str) -> Path:
    return _write_file(path, _png_bytes(fig), method, "plot.png")


def _short_tensor_name(name: str, width: int = 48) -> str:
    first = name.split(";")[0]
    return first if len(first) <= width else "…" + first[-(width - 1):]


def _read_json(path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {str(path)!r}. Check the path.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err.msg} at line {err.lineno}): re-save the "
                         f"{what} with to_json.") from None


# --------------------------------------------------------------------------------------------
# Layer errors
# --------------------------------------------------------------------------------------------


class _Table:
    """A report shown as a table: markdown (``to_markdown``) and, in Jupyter, HTML, both from ``_table_parts``
    (header, alignment, rows, notes); written as JSON from ``to_dict``."""

    _JSON_EXAMPLE = "report.json"  # the file name a refusal suggests

    def _table_parts(self):
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError

    def to_json(self, path: str | os.PathLike) -> Path:
        """Writes :meth:`to_dict` as JSON (strict: ``inf`` is stored as ``"inf"``), atomically.

        Raises:
            ValueError: ``path`` is a directory, or cannot be written.
        """
        return _write_file(path, (json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n").encode("utf-8"),
                           f"{type(self).__name__}.to_json", self._JSON_EXAMPLE)

    def to_markdown(self) -> str:
        """The table as markdown, then its notes."""
        header, align, body, notes = self._table_parts()
        return _table(header, align, body) + "\n\n" + "\n".join(notes)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def _repr_html_(self) -> str:
        """The table of :meth:`to_markdown` as HTML: what Jupyter shows for a report."""
        return _html_table(*self._table_parts())


class LayerErrorReport(_Table, list):
    """Per-tensor INT8 error from :func:`tfq.layer_errors`: a list of dicts, in graph order.

    Args:
        rows: one dict per quantized activation (see :func:`tfq.layer_errors`).
        rmse_outlier: the flag threshold used on the own (range) ``rmse/scale``.
        sqnr_outlier_db: the SQNR flag threshold used.
        num_samples: samples compared.
        skipped: ``{"tensor", "reason"}`` for quantized tensors without a float partner.
    """

    _JSON_EXAMPLE = "layer_errors.json"

    def __init__(self, rows: Iterable[Mapping] = (), *, rmse_outlier: float = 0.7, sqnr_outlier_db: float = 10.0,
                 num_samples: int | None = None, skipped: Iterable[Mapping] = ()):
        super().__init__(dict(r) for r in rows)
        self.rmse_outlier = float(rmse_outlier)
        self.sqnr_outlier_db = float(sqnr_outlier_db)
        self.num_samples = num_samples
        self.skipped = [dict(s) for s in skipped]

    @property
    def outliers(self) -> list[dict]:
        """The flagged rows, in graph order (the first is the one to look at)."""
        return [r for r in self if r.get("outlier")]

    def _table_parts(self) -> tuple[list[str], list[str], list[list[str]], list[str]]:
        header = ["#", "tensor", "op", "scale", "zero point", "RMSE", "RMSE/scale", "SQNR (dB)", "own RMSE/scale",
                  "clipped", "saturated", "error source", "outlier"]
        align = ["r", "l", "l", "r", "r", "r", "r", "r", "r", "r", "r", "l", "l"]
        body = [[str(i), _short_tensor_name(r["tensor"]), r.get("op", ""), _number(r.get("scale"), ".4g"),
                 _number(r.get("zero_point"), "d"), _number(r.get("rmse"), ".4g"),
                 _number(r.get("rmse_over_scale"), ".3f"), _number(r.get("sqnr_db"), ".1f"),
                 _number(r.get("range_rmse_over_scale"), ".3f"),
                 _number(100 * r["clipped_fraction"], ".2f") + "%" if r.get("clipped_fraction") is not None else "–",
                 _number(100 * r["saturated_fraction"], ".2f") + "%" if r.get("saturated_fraction") is not None else "–",
                 r.get("error_source", ""),
                 "**yes**" if r.get("outlier") else ""] for i, r in enumerate(self)]
        notes = [f"{len(self)} quantized tensors"
                 + (f" on {self.num_samples} samples" if self.num_samples is not None else "")
                 + "; RMSE and SQNR: INT8 model vs float model (accumulated through the network); own RMSE/scale: "
                 f"quantizing the float values with this tensor's scale (rounding alone: "
                 f"{ROUNDING_RMSE_OVER_SCALE:.3f}); outlier: own RMSE/scale > {self.rmse_outlier:g} or "
                 f"SQNR < {self.sqnr_outlier_db:g} dB."]
        if self.skipped:
            notes.append(f"{len(self.skipped)} quantized tensor(s) without a float partner left out "
                         f"(e.g. {self.skipped[0]['tensor']!r}: {self.skipped[0]['reason']}).")
        return header, align, body, notes

    def to_dict(self) -> dict:
        return _encode({"format": _LAYER_FORMAT, "rmse_outlier": self.rmse_outlier,
                        "sqnr_outlier_db": self.sqnr_outlier_db, "num_samples": self.num_samples,
                        "skipped": self.skipped, "rows": list(self)})

    @classmethod
    def from_dict(cls, d: Mapping) -> LayerErrorReport:
        if not isinstance(d, Mapping) or d.get("format") != _LAYER_FORMAT:
            got = d.get("format") if isinstance(d, Mapping) else type(d).__name__
            raise ValueError(f"not a tfq layer-error report (expected format {_LAYER_FORMAT!r}). Received: {got!r}")
        return cls([_decode_row(r, _LAYER_TEXT_KEYS) for r in d.get("rows", [])],
                   rmse_outlier=d.get("rmse_outlier", 0.7), sqnr_outlier_db=d.get("sqnr_outlier_db", 10.0),
                   num_samples=d.get("num_samples"), skipped=d.get("skipped", []))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> LayerErrorReport:
        return cls.from_dict(_read_json(path, "layer-error report"))

    def _draw(self, ax) -> None:
        labels = [_short_tensor_name(r["tensor"], 36) for r in self]
        own = [min(float(r.get("range_rmse_over_scale", math.nan)), 1e6) for r in self]
        accumulated = [min(float(r["rmse_over_scale"]), 1e6) for r in self]
        positions = list(range(len(self)))
        ax.barh([p - 0.2 for p in positions], accumulated, height=0.4, color="tab:orange",
                label="INT8 vs float model (accumulated)")
        ax.barh([p + 0.2 for p in positions], own, height=0.4, color="tab:blue",
                label="own range (float values quantized)")
        ax.set_yticks(positions)
        ax.set_yticklabels(labels, fontsize=7)
        for tick, row in zip(ax.get_yticklabels(), self):
            if row.get("outlier"):
                tick.set_color("tab:red")
        ax.invert_yaxis()
        ax.axvline(ROUNDING_RMSE_OVER_SCALE, color="gray", linestyle=":", label="rounding 1/√12")
        ax.axvline(self.rmse_outlier, color="tab:red", linestyle="--", label=f"outlier > {self.rmse_outlier:g}")
        ax.set_xlabel("RMSE / scale")
        ax.set_title("INT8 error per tensor (outliers in red)")
        ax.legend(fontsize=7, loc="best")

    def plot(self, path: str | os.PathLike | None = None):
        """RMSE/scale per tensor as horizontal bars (accumulated and own range; outliers in red).

        Args:
            path: if given, the figure is also written there as a PNG, atomically.

        Returns:
            The ``matplotlib.figure.Figure`` (one axes; bars in graph order, the accumulated error
            first). Jupyter displays it when it is the cell's last expression.

        Raises:
            ImportError: matplotlib is not installed.
            ValueError: ``path`` is a directory, or cannot be written.

        Example:
            >>> fig = tfq.layer_errors(model, tflite, x_test[:64]).plot("layer_errors.png")  # doctest: +SKIP
        """
        figure = _figure_class()(figsize=(7, 1.5 + 0.3 * max(len(self), 1)))
        self._draw(figure.add_subplot(1, 1, 1))
        if path is not None:
            _save_png(figure, path, "LayerErrorReport.plot")
        return figure

    def __eq__(self, other) -> bool:
        if isinstance(other, LayerErrorReport):
            return self.to_dict() == other.to_dict()
        return list.__eq__(self, other)

    __hash__ = None

    def __str__(self) -> str:
        return self.to_markdown()

    __repr__ = __str__


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


class Report(_Table):
    """What :func:`tfq.evaluate` measured: one row (a dict) per model.

    Row keys: ``name``, ``kind`` (``"keras"``/``"tflite"``), ``num_samples``, one key per metric,
    ``agreement``, ``sqnr_db``, ``max_abs_diff``, ``size`` (bytes), ``size_kind``
    (``"flatbuffer"`` or ``"params_fp32"``), ``size_ratio``, ``gzip_size`` (bytes),
    ``weight_bytes`` (the weight tensors as stored), ``weight_bits`` (e.g. ``"4×3 8×1"``),
    ``weight_bits_per_layer`` (``{tensor: bits}``), ``weight_sparsity``, ``max_distinct_per_channel``, ``latency_p50_ms``,
    ``latency_p90_ms``, ``throughput`` (samples/s), ``num_threads`` (interpreter threads; None for
    Keras rows), ``errors`` (samples the model failed on) and ``error`` (the first message),
    ``sqnr_db_per_output`` (a list, in output order). Missing figures are None; rows written before
    the last three existed read back without them.

    Args:
        rows: the rows, in display order.
        reference: the row the others were compared with.
        metrics: metric names (row keys), in column order.
        num_samples: samples evaluated.
        layer_errors: an optional :class:`LayerErrorReport` (also settable later), shown by
            :meth:`plot` and kept by :meth:`to_dict`.
        converted: ``{row name: .tflite bytes}`` of the models :func:`tfq.evaluate` converted
            itself (its single-model form), e.g. to pass to :func:`tfq.layer_errors` or save.
            Not part of :meth:`to_dict`/JSON.

    Example:
        >>> report = tfq.evaluate(model, x_test, y_test, representative_data=x_train[:300])  # doctest: +SKIP
        >>> report.layer_errors = tfq.layer_errors(model, report.converted["tflite_int8"], x_test)  # doctest: +SKIP
        >>> report.to_json("eval.json"); report.plot("eval.png")                            # doctest: +SKIP
    """

    def __init__(self, rows: Iterable[Mapping], *, reference: str | None = None, metrics: Iterable[str] = (),
                 num_samples: int | None = None, layer_errors: LayerErrorReport | None = None,
                 converted: Mapping[str, bytes] | None = None):
        self.rows = [dict(r) for r in rows]
        names = [r.get("name") for r in self.rows]
        if len(set(names)) != len(names):
            raise ValueError(f"row names must be unique. Received: {names}")
        self.reference = reference if reference is not None else (names[0] if names else None)
        self.metrics = list(metrics)
        self.num_samples = num_samples
        self.layer_errors = layer_errors
        self.converted = dict(converted or {})

    def row(self, name: str) -> dict:
        """The row of model ``name``."""
        for r in self.rows:
            if r.get("name") == name:
                return r
        raise KeyError(f"no row named {name!r}; rows: {[r.get('name') for r in self.rows]}")

    @property
    def names(self) -> list[str]:
        return [r.get("name") for r in self.rows]

    # ---- rendering

    def _table_parts(self) -> tuple[list[str], list[str], list[list[str]], list[str]]:
        header = ["model"] + self.metrics + ["agreement", "SQNR (dB)", "size (KB)", "size ratio", "weights (KB)",
                                             "weight bits", "gzip (KB)", "sparsity", "distinct/ch", "p50 (ms)", "p90 (ms)", "samples/s"]
        align = ["l"] + ["r"] * (len(header) - 1)
        body = []
        for r in self.rows:
            name = r.get("name", "")
            if r.get("size_kind") == "params_fp32":
                name = f"{name} *"
            cells = [name]
            for metric in self.metrics:
                spec = ".4f" if metric == "accuracy" or metric.startswith("top") else ".4g"
                cells.append(_number(r.get(metric), spec))
            size = r.get("size")
            ratio = r.get("size_ratio")
            gz = r.get("gzip_size")
            sparsity = r.get("weight_sparsity")
            cells += [_number(r.get("agreement"), ".4f"), _number(r.get("sqnr_db"), ".1f"),
                      _number(size / 1024 if size is not None else None, ".1f"),
                      _number(ratio, ".3f") + ("×" if ratio is not None else ""),
                      _number(r["weight_bytes"] / 1024 if r.get("weight_bytes") is not None else None, ".1f"),
                      r.get("weight_bits") or "–",
                      _number(gz / 1024 if gz is not None else None, ".1f"),
                      _number(100 * sparsity if sparsity is not None else None, ".1f") + ("%" if sparsity is not None
                                                                                         else ""),
                      _number(r.get("max_distinct_per_channel"), "d"),
                      _number(r.get("latency_p50_ms"), ".3f"), _number(r.get("latency_p90_ms"), ".3f"),
                      _number(r.get("throughput"), ".0f")]
            body.append(cells)
        notes = [f"reference: {self.reference}"
                 + (f"; {self.num_samples} samples" if self.num_samples is not None else "")
                 + "; agreement = top-1 match rate with the reference; SQNR over all outputs; latency at batch 1."]
        if any(r.get("size_kind") == "params_fp32" for r in self.rows):
            notes.append("* Keras size = parameters × 4 bytes; Keras latency = eager model(x[:1]) call.")
        failing = [r for r in self.rows if r.get("errors")]
        if failing:
            notes.append("errors: " + "; ".join(f"{r.get('name')} failed on {r['errors']} sample(s) ({r.get('error')})"
                                                for r in failing)
                         + "; its figures are over the samples it ran.")
        per_output = [r for r in self.rows if len(r.get("sqnr_db_per_output") or ()) > 1]
        if per_output:
            notes.append("SQNR per output (dB): " + "; ".join(
                f"{r.get('name')} " + ", ".join(_number(v, ".1f") for v in r["sqnr_db_per_output"])
                for r in per_output))
        if any(r.get("gzip_size") is not None for r in self.rows):
            notes.append("gzip = the file (Keras: the float32 weights) gzip-compressed; sparsity = zeros among the "
                         "weight tensors; distinct/ch = most distinct weight values in one output channel.")
        return header, align, body, notes

    def to_dict(self) -> dict:
        return _encode({
            "format": _REPORT_FORMAT,
            "reference": self.reference,
            "metrics": self.metrics,
            "num_samples": self.num_samples,
            "rows": self.rows,
            "layer_errors": self.layer_errors.to_dict() if self.layer_errors is not None else None,
        })

    @classmethod
    def from_dict(cls, d: Mapping) -> Report:
        if not isinstance(d, Mapping) or d.get("format") != _REPORT_FORMAT:
            got = d.get("format") if isinstance(d, Mapping) else type(d).__name__
            raise ValueError(f"not a tfq evaluation report (expected format {_REPORT_FORMAT!r}). Received: {got!r}")
        layer = d.get("layer_errors")
        return cls([_decode_row(r, _REPORT_TEXT_KEYS) for r in d.get("rows", [])], reference=d.get("reference"),
                   metrics=d.get("metrics", []), num_samples=d.get("num_samples"),
                   layer_errors=LayerErrorReport.from_dict(layer) if layer is not None else None)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Report:
        """Reads a report written by :meth:`to_json`."""
        return cls.from_dict(_read_json(path, "report"))

    def plot(self, path: str | os.PathLike | None = None):
        """Quality vs size, latency per model and, if attached, per-tensor INT8 error, side by side.

        Quality is the first metric (agreement with the reference when there is no metric): one
        point per model with a size. Latency: one bar per model with a measured p50 (whisker to p90).
        The third panel, with :attr:`layer_errors` set, is :meth:`LayerErrorReport.plot`'s.

        Args:
            path: if given, the figure is also written there as a PNG, atomically.

        Returns:
            The ``matplotlib.figure.Figure``; Jupyter displays it when it is the cell's last
            expression. ``figure.axes`` holds the panels in the order above.

        Raises:
            ImportError: matplotlib is not installed (``pip install matplotlib``).
            ValueError: ``path`` is a directory, or cannot be written.

        Example:
            >>> report = tfq.evaluate({"keras": model, "int8": tflite}, x_test, y_test)  # doctest: +SKIP
            >>> fig = report.plot("report.png")  # doctest: +SKIP
        """
        Figure = _figure_class()
        panels = 3 if self.layer_errors else 2
        height = 4.5 if panels == 2 else max(4.5, 1.5 + 0.3 * len(self.layer_errors))
        figure = Figure(figsize=(6 * panels, height))
        self._draw_quality(figure.add_subplot(1, panels, 1))
        self._draw_latency(figure.add_subplot(1, panels, 2))
        if self.layer_errors:
            self.layer_errors._draw(figure.add_subplot(1, panels, 3))
        if path is not None:
            _save_png(figure, path, "Report.plot")
        return figure

    def _draw_quality(self, ax) -> None:
        key = self.metrics[0] if self.metrics else "agreement"
        points = [(r["size"] / 1024, r[key], r["name"]) for r in self.rows
                  if r.get("size") is not None and isinstance(r.get(key), (int, float))]
        for x, y, name in points:
            ax.scatter([x], [y])
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("size (KB)")
        ax.set_ylabel(key)
        ax.set_title(f"{key} vs size")
        ax.grid(True, alpha=0.3)
        if not points:
            ax.text(0.5, 0.5, f"no {key} figures", ha="center", va="center", transform=ax.transAxes)

    def _draw_latency(self, ax) -> None:
        rows = [r for r in self.rows if r.get("latency_p50_ms") is not None]
        if not rows:
            ax.text(0.5, 0.5, "latency not measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_title("latency (batch 1)")
            return
        p50 = [r["latency_p50_ms"] for r in rows]
        p90 = [r.get("latency_p90_ms") or r["latency_p50_ms"] for r in rows]
        positions = list(range(len(rows)))
        ax.bar(positions, p50, yerr=[[0] * len(rows), [b - a for a, b in zip(p50, p90)]], capsize=4,
               color="tab:green")
        ax.set_xticks(positions)
        ax.set_xticklabels([r["name"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("ms (bar p50, whisker p90)")
        if max(p90) > 20 * min(p50):  # e.g. an eager Keras call next to the interpreter
            ax.set_yscale("log")
        ax.set_title("latency (batch 1)")

    def __eq__(self, other) -> bool:
        return isinstance(other, Report) and self.to_dict() == other.to_dict()

    __hash__ = None

    def __str__(self) -> str:
        return self.to_markdown()

    __repr__ = __str__
