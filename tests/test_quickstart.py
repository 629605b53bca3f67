"""The quickstart job writes its files, the plot included, out of the box."""

import json

import pytest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_quickstart_writes_report_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from tfq.cli.quickstart import run_quickstart

    report = run_quickstart(output_dir=str(tmp_path), epochs=1, qat_epochs=0, calibration="minmax", verbose=False)
    names = ["keras_float", "tflite_float", "tflite_fp16", "tflite_dynamic", "tflite_int8_ptq"]
    assert report.names == names
    assert (tmp_path / "report.png").read_bytes()[:8] == PNG_SIGNATURE
    assert json.loads((tmp_path / "report.json").read_text())["reference"] == "keras_float"
    table = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0][2:].rstrip(" *") for line in table[1:]] == names
    for name in names[1:]:
        assert (tmp_path / f"model_{name[len('tflite_'):]}.tflite").stat().st_size == report.row(name)["size"]
    assert len(report.plot().axes) == 3  # quality, latency and the per-tensor errors attached by the job
