"""Executes the notebooks once and writes their outputs back, so the repository and the docs site show them.

Run after changing a notebook (or tfq's output): ``PYTHONPATH=. python docs/tools/execute_notebooks.py
[names...]``. Each notebook runs in a fresh temp directory (its files, e.g. ``ptq_report.png``, stay
out of the repository); the time per notebook is printed. The docs build renders the committed
outputs (``execute: false`` in mkdocs.yml) because executing all six takes minutes; tests/test_notebooks.py
executes them again and checks what they print.

Log lines that TensorFlow and LiteRT write at start-up or on every conversion (absl's pre-init line,
oneDNN/CUDA/CPU-feature notices, ``INFO:tensorflow:Assets written to: /tmp/…``, the XNNPACK delegate
notice) are left out of the committed outputs: they name temp paths and differ between machines.
Everything the notebooks themselves print or display is kept (paths inside this repository, as in a
warning's ``tfq/export/convert.py:591: UserWarning: …``, made relative to it).
"""

import re
import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"

_LOG_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IWE]\d{4} [\d:. ]+\d+ \w+\.cc:\d+\] .*"
    r"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\."
    r"|INFO:tensorflow:Assets written to: .*"
    r"|INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.)$")


def drop_log_noise(nb) -> None:
    """Removes TensorFlow's and LiteRT's log lines (see the module docstring) from the stream outputs."""
    for cell in nb.cells:
        outputs = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                lines = [line for line in out["text"].splitlines(keepends=True) if not _LOG_NOISE.match(line.rstrip("\n"))]
                if not lines:
                    continue
                out["text"] = "".join(lines).replace(f"{ROOT}/", "")
            outputs.append(out)
        if cell.get("cell_type") == "code":
            cell["outputs"] = outputs


def main(names):
    paths = [NOTEBOOKS / n for n in names] if names else sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                    resources={"metadata": {"path": tmp}}).execute()
        for cell in nb.cells:  # no timestamps: re-running changes only what the notebook printed
            cell.get("metadata", {}).pop("execution", None)
        drop_log_noise(nb)
        nbformat.write(nb, path)
        print(f"{path.name}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
