"""Packaging: the wheel's contents, one version, the Keras 2 extra and its one-line message."""

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import tfq

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel ``pip wheel --no-deps`` builds from a copy of the repository (the build writes
    build/ and tfq.egg-info/ next to the sources; the copy keeps them out of the working tree)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "build", "dist", "*.egg-info", "*.tflite", ".hypothesis", "tfq_quickstart"))
    assert (src / "tfq" / "configs").is_symlink()  # as in the repository: tfq/configs -> ../configs
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "out"), str(src)],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = (tmp / "out").glob("tfq-*.whl")
    with zipfile.ZipFile(path) as z:
        return path, z.namelist(), z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()


def test_wheel_holds_the_package_presets_and_digits_and_nothing_else(wheel):
    path, names, _ = wheel
    assert path.name == f"tfq-{tfq.__version__}-py3-none-any.whl"
    presets = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert len(presets) >= 10
    assert sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("tfq/configs/")) == presets
    assert {"tfq/datasets/data/digits.csv.gz", "tfq/datasets/data/LICENSE.txt"} <= set(names)
    sources = sorted(str(p.relative_to(REPO)) for p in (REPO / "tfq").rglob("*.py") if "__pycache__" not in p.parts)
    assert sorted(n for n in names if n.endswith(".py")) == sources
    tops = {n.split("/")[0] for n in names}
    assert tops == {"tfq", f"tfq-{tfq.__version__}.dist-info"}, tops  # no scripts/, tests/, notebooks/
    assert not [n for n in names if re.search(r"benchmark|notebook|\.ipynb|/tests?/|test_|__pycache__", n)]
    assert f"tfq-{tfq.__version__}.dist-info/licenses/LICENSE" in names


def test_wheel_metadata(wheel):
    _, _, metadata = wheel
    fields = [line.split(": ", 1) for line in metadata.split("\n\n", 1)[0].splitlines() if ": " in line]
    get = lambda key: [v for k, v in fields if k == key]  # noqa: E731
    assert get("Version") == [tfq.__version__]
    assert get("License-Expression") == ["Apache-2.0"]
    assert {u.split(",")[0] for u in get("Project-URL")} >= {"Homepage", "Documentation", "Source", "Issues"}
    requires = get("Requires-Dist")
    core = [r for r in requires if "extra ==" not in r]
    assert any(r.startswith("matplotlib") for r in core)
    assert not [r for r in core if re.match(r"tf-keras|tensorflow-model-optimization", r)], core
    keras2 = [r.split(";")[0] for r in requires if 'extra == "keras2"' in r]
    assert sorted(re.split(r"[<>=]", r)[0] for r in keras2) == ["tensorflow-model-optimization", "tf-keras"]
    assert 'tfq[keras2]; extra == "test"' in requires  # the tests compare with tfmot
    docs = {re.split(r"[<>=\[]", r)[0] for r in requires if 'extra == "docs"' in r}
    assert docs == {"mkdocs", "mkdocs-material", "mkdocstrings", "mkdocstrings-python", "mkdocs-jupyter"}
    assert "mkdocstrings[python]" in metadata


def test_one_version_source():
    """The version is written once, in tfq/__init__.py; pyproject.toml reads it without importing tfq."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "tfq.__version__"}
    assert not (REPO / "setup.cfg").exists() and not (REPO / "setup.py").exists()
    # A literal, so that setuptools reads it statically (an import would load nothing heavy either).
    tree = ast.parse((REPO / "tfq" / "__init__.py").read_text())
    (value,) = [n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "__version__"]
    assert isinstance(value, ast.Constant) and value.value == tfq.__version__
    hits = [str(p.relative_to(REPO)) for p in REPO.rglob("*.py") if tfq.__version__ in p.read_text()
            and "tests" not in p.parts and ".git" not in p.parts]
    assert hits == ["tfq/__init__.py"], hits


def test_license_file_is_apache_2():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_version_flag():
    proc = subprocess.run([sys.executable, "-m", "tfq.cli", "--version"], capture_output=True, text=True, env=ENV,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout == f"tfq {tfq.__version__}\n" and proc.stderr == "", proc


# ------------------------------------------------------------------ Keras 2 (tf_keras, tfmot): the keras2 extra

def test_keras2_installed_here():
    """The test extra brings the keras2 extra: nothing missing in this environment."""
    assert tfq.interop.missing_keras2() == []


@pytest.mark.parametrize("absent", [["tf_keras"], ["tensorflow_model_optimization"],
                                    ["tf_keras", "tensorflow_model_optimization"]])
def test_keras2_missing_is_one_line_naming_the_extra(monkeypatch, absent):
    for module in absent:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    dists = {"tf_keras": "tf-keras", "tensorflow_model_optimization": "tensorflow-model-optimization"}
    assert tfq.interop.missing_keras2() == [dists[m] for m in absent]
    with pytest.raises(ImportError) as info:
        tfq.interop.require_keras2("tfmot QAT")
    message = str(info.value)
    assert "\n" not in message and message.startswith("tfmot QAT needs ")
    assert message.endswith("pip install 'tfq[keras2]'") and all(dists[m] in message for m in absent)
    tfq.interop.require_keras2("tf_keras models", [m for m in dists if m not in absent])  # the rest: no error
    with pytest.raises(ValueError, match=r"Received: \['keras'\]"):
        tfq.interop.missing_keras2(["keras"])


def test_benchmark_tfmot_row_names_the_extra_without_starting_a_process(monkeypatch):
    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark_lib

    monkeypatch.setitem(sys.modules, "tensorflow_model_optimization", None)
    monkeypatch.setattr(benchmark_lib.subprocess, "run", lambda *a, **k: pytest.fail("a process was started"))
    row = benchmark_lib._in_subprocess("_tfmot_worker", {}, legacy_keras=True, error_name="tfmot_qat")
    assert row == {"name": "tfmot_qat", "error": "the benchmark's tfmot_qat row needs tensorflow-model-optimization "
                                                 "(Keras 2), which is not installed: pip install 'tfq[keras2]'"}


def test_tfmot_h5_file_is_refused_in_one_line_naming_the_extra(tmp_path, monkeypatch):
    """A tfmot QAT model saved as .h5 (layers QuantizeLayer / QuantizeWrapperV2) cannot load in Keras 3:
    the message says how to load it, and names the extra when tfmot is missing."""
    import keras

    from tfq.models.loading import load_model

    class QuantizeLayer(keras.layers.Layer):  # not registered: Keras reads the class name only
        def call(self, x):
            return x

    model = keras.Sequential([keras.Input((4,)), QuantizeLayer(), keras.layers.Dense(2)])
    model.save(tmp_path / "tfmot.h5")
    with pytest.raises(ValueError) as info:
        load_model(tmp_path / "tfmot.h5")
    message = str(info.value)
    assert "tfmot QAT model (layer class 'QuantizeLayer')" in message and "quantize_scope()" in message
    assert "tfq[keras2]" not in message and "\n" not in message
    monkeypatch.setitem(sys.modules, "tensorflow_model_optimization", None)
    with pytest.raises(ValueError, match=r"needs tensorflow-model-optimization: pip install 'tfq\[keras2\]'\)\.$"):
        load_model(tmp_path / "tfmot.h5")
