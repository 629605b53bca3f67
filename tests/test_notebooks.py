"""The notebooks run top to bottom in a real Jupyter kernel, and show what they promise."""

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    texts, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                texts.append(out["text"])
            data = out.get("data", {})
            texts.extend(v for k, v in data.items() if k in ("text/plain", "text/markdown"))
            images += "image/png" in data
    return "\n".join(texts), images


def number_after(text, label):
    import re

    m = re.search(re.escape(label) + r"\s*([0-9.]+)", text)
    assert m, f"{label!r} not in notebook output"
    return float(m.group(1))


def test_01_ptq_quickstart(tmp_path):
    text, images = execute("01_ptq_quickstart.ipynb", tmp_path)
    assert "fully integer: True" in text
    float_acc, int8_acc = number_after(text, "vs float"), number_after(text, "INT8 accuracy")
    assert float_acc > 0.9 and int8_acc >= float_acc - 0.01
    assert number_after(text, "size ratio") <= 0.30
    assert images >= 1 and (tmp_path / "ptq_report.png").exists()


def test_02_qat_with_callbacks(tmp_path):
    text, images = execute("02_qat_with_callbacks.ipynb", tmp_path)
    assert "tflite_int8_accuracy" in text
    assert sorted(p.name for p in tmp_path.glob("qat_epoch*.tflite")) == [f"qat_epoch{i:02d}.tflite" for i in (1, 2, 3)]
    qat_acc, float_acc = number_after(text, "QAT int8 accuracy"), number_after(text, "(float")
    assert qat_acc >= float_acc - 0.01
    assert images >= 1


def test_03_evaluate_and_tune(tmp_path):
    text, images = execute("03_evaluate_and_tune.ipynb", tmp_path)
    assert "target drop <= 0.005 met" in text
    assert "recipe reproduces the model byte for byte: True" in text
    assert images >= 1 and (tmp_path / "layer_errors.png").exists()


def test_06_integer_arithmetic(tmp_path):
    text, _ = execute("06_integer_arithmetic.ipynb", tmp_path)
    assert "by hand == interpreter: True" in text
    assert number_after(text, "max abs diff:") == 0
    assert "M0 = " in text and "int32 accumulator worst case" in text
    assert "requantized in double" in text


def test_05_prune_cluster_distill(tmp_path):
    text, images = execute("05_prune_cluster_distill.ipynb", tmp_path)
    assert number_after(text, "sparsity:") == 75.0
    pruned_acc, float_acc = number_after(text, "pruned INT8 accuracy"), number_after(text, "(float")
    assert pruned_acc >= float_acc - 0.015
    assert number_after(text, "gzip ratio pruned/dense") < 0.5
    assert number_after(text, "max distinct int8 values per channel:") <= 16
    assert "weight sparsity: 7" in text  # the INT8 file's own zeros, from inspect_tflite's summary
    assert images >= 1 and (tmp_path / "compression_sizes.png").exists()


def test_04_data_free_and_equalization(tmp_path):
    text, images = execute("04_data_free_and_equalization.ipynb", tmp_path)
    float_acc = number_after(text, "float accuracy")
    assert float_acc > 0.9
    assert number_after(text, "per-tensor INT8 accuracy (unbalanced):") < float_acc - 0.3
    assert number_after(text, "max output difference:") < 1e-4
    assert number_after(text, "spread:") > 100 and number_after(text, "before,") < 2.0
    assert number_after(text, "per-tensor INT8 accuracy after CLE:") >= float_acc - 0.015
    assert number_after(text, "data-free per-tensor INT8 accuracy:") >= float_acc - 0.02
    assert images >= 1 and (tmp_path / "channel_ranges.png").exists()
