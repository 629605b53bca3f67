"""Executes the notebooks once and writes their outputs back, so the repository and the docs site show them.

Run after changing a notebook (or tfq's output): ``PYTHONPATH=. python docs/tools/execute_notebooks.py
[names...]``. Each notebook runs in a fresh temp directory (its files, e.g. ``ptq_report.png``, stay
out of the repository); the time per notebook is printed. The docs build renders the committed
outputs (``execute: false`` in mkdocs.yml) because executing all six takes minutes; tests/test_notebooks.py
executes them again and checks what they print.
"""

import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


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
        nbformat.write(nb, path)
        print(f"{path.name}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
