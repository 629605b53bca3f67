"""Report and LayerErrorReport as a user sees them: matplotlib figures, Jupyter tables, one-line write errors."""

import math
import os

import pytest

from tfq.analysis.report import ROUNDING_RMSE_OVER_SCALE, LayerErrorReport, Report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture()
def layers():
    return LayerErrorReport([
        {"tensor": "conv1;relu", "op": "CONV_2D", "scale": 0.02, "zero_point": -128, "rmse": 0.006,
         "rmse_over_scale": 0.3, "sqnr_db": 35.0, "range_rmse_over_scale": 0.29, "clipped_fraction": 0.0,
         "saturated_fraction": 0.001, "error_source": "rounding", "outlier": False},
        {"tensor": "dense|logits", "op": "FULLY_CONNECTED", "scale": 0.5, "zero_point": 3, "rmse": 0.9,
         "rmse_over_scale": 1.8, "sqnr_db": 4.5, "range_rmse_over_scale": 1.2, "clipped_fraction": 0.125,
         "saturated_fraction": 0.25, "error_source": "range", "outlier": True},
    ], num_samples=64)


@pytest.fixture()
def report(layers):
    rows = [
        {"name": "keras", "kind": "keras", "accuracy": 0.97, "agreement": 1.0, "sqnr_db": math.inf, "size": 40960,
         "size_kind": "params_fp32", "size_ratio": 1.0, "latency_p50_ms": 2.0, "latency_p90_ms": 3.0},
        {"name": "int8 <q>", "kind": "tflite", "accuracy": 0.9625, "agreement": 0.99, "sqnr_db": 31.25,
         "size": 10240, "size_kind": "flatbuffer", "size_ratio": 0.25, "latency_p50_ms": 0.5, "latency_p90_ms": 0.75},
        {"name": "fp16", "kind": "tflite", "accuracy": 0.97, "size": 20480, "size_kind": "flatbuffer"},  # no latency
    ]
    return Report(rows, reference="keras", metrics=["accuracy"], num_samples=400, layer_errors=layers)


def test_report_plot_returns_figure_with_the_values(report, tmp_path):
    figure_class = pytest.importorskip("matplotlib.figure").Figure
    fig = report.plot()
    assert isinstance(fig, figure_class) and len(fig.axes) == 3
    quality, latency, errors = fig.axes
    # quality vs size: one point per model with a size, at (KB, accuracy)
    points = sorted(tuple(map(float, c.get_offsets()[0])) for c in quality.collections)
    assert points == sorted([(40.0, 0.97), (10.0, 0.9625), (20.0, 0.97)])
    assert quality.get_xlabel() == "size (KB)" and quality.get_ylabel() == "accuracy"
    # latency: one bar per model with a p50 (fp16 has none), height p50
    assert [p.get_height() for p in latency.patches] == [2.0, 0.5]
    assert [t.get_text() for t in latency.get_xticklabels()] == ["keras", "int8 <q>"]
    # layer errors: accumulated bars then own-range bars, widths the RMSE/scale values, the outlier label red
    assert [p.get_width() for p in errors.patches] == [0.3, 1.8, 0.29, 1.2]
    labels = errors.get_yticklabels()
    assert [t.get_text() for t in labels] == ["conv1", "dense|logits"]
    assert labels[1].get_color() == "tab:red" and labels[0].get_color() != "tab:red"
    assert sorted(line.get_xdata()[0] for line in errors.get_lines()) == [ROUNDING_RMSE_OVER_SCALE, 0.7]
    assert list(tmp_path.iterdir()) == []  # no path: nothing written


def test_report_plot_without_layers_or_latency(report, tmp_path):
    pytest.importorskip("matplotlib")
    report.layer_errors = None
    for row in report.rows:
        row.pop("latency_p50_ms", None)
    fig = report.plot(tmp_path / "r.png")
    assert len(fig.axes) == 2
    assert len(fig.axes[1].patches) == 0 and fig.axes[1].texts[0].get_text() == "latency not measured"
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG_SIGNATURE


def test_layer_plot_returns_figure_and_saves(layers, tmp_path):
    pytest.importorskip("matplotlib")
    fig = layers.plot(tmp_path / "layers.png")
    [ax] = fig.axes
    assert [p.get_width() for p in ax.patches] == [0.3, 1.8, 0.29, 1.2]
    assert (tmp_path / "layers.png").read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers.png"]  # atomic: no temp file left


@pytest.mark.parametrize("method", ["plot", "to_json"])
def test_directory_path_is_one_line_naming_it(report, layers, tmp_path, method):
    pytest.importorskip("matplotlib")
    for obj in (report, layers):
        with pytest.raises(ValueError, match="not a directory") as excinfo:
            getattr(obj, method)(tmp_path)
        message = one_line(excinfo)
        assert f"path={str(tmp_path)!r}" in message and ".tmp" not in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["plot", "to_json"])
def test_unwritable_path_is_one_line_naming_the_users_path(report, tmp_path, monkeypatch, method):
    pytest.importorskip("matplotlib")
    # a parent that is a file
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory") as excinfo:
        getattr(report, method)(tmp_path / "file" / "out")
    assert repr(str(tmp_path / "file" / "out")) in one_line(excinfo)
    # a missing directory
    with pytest.raises(FileNotFoundError, match="does not exist") as excinfo:
        getattr(report, method)(tmp_path / "missing" / "out")
    assert repr(str(tmp_path / "missing" / "out")) in one_line(excinfo)
    # a read-only directory (root ignores permission bits, so the refusal of the file system is simulated
    # where the temp file is created, as on a read-only mount)
    from tfq.core import fileio

    def read_only(target):
        raise PermissionError(13, "Permission denied", os.path.join(target.parent, f".{target.name}.tmp"))

    monkeypatch.setattr(fileio, "_create_temp", read_only)
    target = tmp_path / "out"
    with pytest.raises(ValueError, match="Permission denied") as excinfo:
        getattr(report, method)(target)
    message = one_line(excinfo)
    assert f"path={str(target)!r}" in message and ".tmp" not in message
    assert not target.exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only dirs")
def test_read_only_directory(report, tmp_path):
    pytest.importorskip("matplotlib")
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="cannot write") as excinfo:
            report.plot(tmp_path / "r.png")
        assert repr(str(tmp_path / "r.png")) in one_line(excinfo)
    finally:
        tmp_path.chmod(0o700)


def test_report_displays_as_a_table(report):
    markdown = report._repr_markdown_()
    assert markdown == report.to_markdown() == repr(report)
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| keras * | 0.9700 | 1.0000 | inf | 40.0 | 1.000× |")
    assert rows[2].startswith("| int8 <q> | 0.9625 | 0.9900 | 31.2 | 10.0 | 0.250× |")
    html = report._repr_html_()
    assert html.startswith("<table>") and html.count("<tr>") == 1 + 3
    assert "<th style=\"text-align:left\">model</th>" in html and "<th style=\"text-align:right\">SQNR (dB)</th>" in html
    assert ("<td style=\"text-align:left\">int8 &lt;q&gt;</td><td style=\"text-align:right\">0.9625</td>"
            "<td style=\"text-align:right\">0.9900</td><td style=\"text-align:right\">31.2</td>") in html
    assert "reference: keras; 400 samples" in html and "<q>" not in html


def test_layer_errors_display_as_a_table(layers):
    assert layers._repr_markdown_() == layers.to_markdown()
    assert "| 1 | dense\\|logits | FULLY_CONNECTED | 0.5 | 3 | 0.9 | 1.800 | 4.5 | 1.200 | 12.50% | 25.00% | range | **yes** |" \
        in layers.to_markdown()
    html = layers._repr_html_()
    assert html.count("<tr>") == 1 + 2
    assert "<td style=\"text-align:left\">dense|logits</td>" in html and "<b>yes</b>" in html
    assert "2 quantized tensors on 64 samples" in html


def test_figure_displays_as_png_in_jupyter(report):
    pytest.importorskip("matplotlib")
    png = report.plot()._repr_png_()  # what IPython shows when the figure is a cell's last expression
    assert png[:8] == PNG_SIGNATURE
    assert report.layer_errors.plot()._repr_png_()[:8] == PNG_SIGNATURE
