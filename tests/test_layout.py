"""The package layout: stages that depend one way, public names that stay, and a TensorFlow-free ``import tfq``."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tfq

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "tfq"


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _tfq_imports(path: Path):
    """(line, imported module) for every tfq import in a file, at module level or inside functions."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tfq":
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "tfq" else []
            yield node.lineno, node.module, names
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tfq":
                    yield node.lineno, alias.name, []


def test_stages_are_the_folders_and_cover_every_module():
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert folders == sorted(tfq._PACKAGES)
    top_modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top_modules == ["__init__.py"], "a module at the top of tfq/ belongs in one of the stage folders"


def test_stages_depend_one_way():
    """A module imports only from its own stage or earlier ones (tfq._PACKAGES order), functions included,
    and never the root package (whose lazy names reach every stage)."""
    order = {name: i for i, name in enumerate(tfq._PACKAGES)}
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        if module == "tfq":
            continue
        own = order[_stage(module)]
        for line, target, names in _tfq_imports(path):
            stages = [_stage(n) for n in names] if target == "tfq" else [_stage(target)]
            for stage in stages:
                if stage == "" or stage not in order or order[stage] > own:
                    violations.append(f"{path.relative_to(REPO)}:{line} imports {target} {names or ''}")
    assert not violations, "\n".join(violations)


def test_checker_sees_a_backward_import(tmp_path):
    """The rule above is not vacuous: an import of a later stage is what it reports."""
    source = "def f():\n    from tfq.analysis.evaluation import evaluate\n"
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert [t for _, t, _ in _tfq_imports(path)] == ["tfq.analysis.evaluation"]
    assert tfq._PACKAGES.index("analysis") > tfq._PACKAGES.index("core")


def test_import_tfq_loads_no_tensorflow_and_public_aliases_work():
    code = textwrap.dedent("""
        import sys
        import tfq
        assert "tensorflow" not in sys.modules and "keras" not in sys.modules, "import tfq loaded TensorFlow"
        import tfq.ops
        from tfq.recipes import Recipe
        assert "tensorflow" not in sys.modules, "the maths and the recipes need no TensorFlow either"
        import tfq.pruning, tfq.callbacks
        from tfq.examples import digits_cnn
        assert tfq.ops.quantize_to is sys.modules["tfq.numerics.ops"].quantize_to
        assert tfq.pruning is sys.modules["tfq.compression.pruning"]
        assert tfq.examples is tfq.models.examples and digits_cnn is tfq.models.examples.digits_cnn
        assert Recipe is tfq.Recipe and tfq.training.train_qat is tfq.training.jobs.train_qat
        import keras  # loaded by the examples: tfq's layers registered once that import was over
        assert keras.saving.get_registered_object("tfq>QuantizedLayer") is tfq.qat.QuantizedLayer
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


@pytest.mark.parametrize("first", ["import tfq.models.loading", "import tfq.compression.clustering",
                                   "import tfq; tfq.interop.load_keras_model", "import keras; import tfq"])
def test_keras_registration_whatever_is_imported_first(first):
    """Registration waits for the outermost import: a tfq module that imports Keras at its top is whole by then."""
    code = (f"{first}\nimport keras\n"
            "names = ['QuantizedLayer', 'PruneLowMagnitude', 'ClusterWeights', 'Distiller']\n"
            "assert all(keras.saving.get_registered_object('tfq>' + n) for n in names), names\n")
    proc = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_keras_layer_tfq_defines_is_registered():
    """A tfq layer a saved model holds must load: each Layer/Model class defined in the registering
    modules is registered under its own name (a decorator moved onto a function would leave it out)."""
    import importlib
    import inspect

    import keras

    missing = []
    for module_name in tfq._KERAS_SERIALIZABLE:
        module = importlib.import_module(module_name)
        for name, cls in vars(module).items():
            if inspect.isclass(cls) and cls.__module__ == module_name and issubclass(cls, keras.layers.Layer):
                if keras.saving.get_registered_object(f"tfq>{name}") is not cls:
                    missing.append(f"{module_name}.{name}")
    assert not missing, missing


@pytest.mark.parametrize("name", sorted(tfq._ALIASES))
def test_alias_is_the_stage_module(name):
    assert getattr(tfq, name) is sys.modules[tfq._ALIASES[name]]
    assert getattr(tfq, name).__name__ == tfq._ALIASES[name]


def test_every_public_name_resolves():
    for name in tfq.__all__:
        assert getattr(tfq, name) is not None, name
