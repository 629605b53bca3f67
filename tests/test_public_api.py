"""tfq uses public TensorFlow / Keras APIs only, and exports what its __all__ promises."""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent / "tfq"
FORBIDDEN = ("tensorflow.python", "keras.src", "tf_keras.src", "tensorflow_model_optimization.python")
SOURCES = sorted(PACKAGE_DIR.rglob("*.py"))


def _is_forbidden(dotted: str) -> bool:
    return any(dotted == p or dotted.startswith(p + ".") for p in FORBIDDEN)


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a chain of attributes on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def forbidden_uses(source: str) -> list[str]:
    """Private TF/Keras modules a source reaches: imports, attribute chains, importlib strings."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}  # local name → module it is bound to
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_forbidden(alias.name):
                    found.append(f"line {node.lineno}: import {alias.name}")
                if alias.asname:  # import a.b as c: c is a.b
                    aliases[alias.asname] = alias.name
                else:  # import a.b: binds a
                    aliases[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if _is_forbidden(node.module) or _is_forbidden(full):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                aliases[alias.asname or alias.name] = full
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:  # whole chains only
            dotted = _dotted(node)
            if dotted:
                head, _, rest = dotted.partition(".")
                resolved = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
                if _is_forbidden(resolved):
                    found.append(f"line {node.lineno}: {dotted} (= {resolved})")
        elif isinstance(node, ast.Call):  # importlib.import_module("tensorflow.python..."), __import__(...)
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and _is_forbidden(arg.value):
                    found.append(f"line {node.lineno}: call with {arg.value!r}")
    return sorted(set(found))


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import tensorflow.python.ops", 1),
        ("from keras.src import layers", 1),
        ("from tensorflow import python", 1),
        ("import tf_keras.src.engine as e", 1),
        ("from tensorflow_model_optimization.python.core import x", 1),
        ("import importlib\nimportlib.import_module('tensorflow.python.framework')", 1),
        ("import tensorflow as tf\ntf.python.keras", 1),
        ("import keras\nkeras.src.layers.Dense", 1),
        ("import tensorflow as tf\nimport keras\ntf.quantization.fake_quant_with_min_max_vars\nkeras.layers.Dense", 0),
        ('"""Never import tensorflow.python: it is private."""', 0),  # documentation is fine
        ("from . import ops\nfrom .src import x", 0),  # relative imports inside tfq
    ],
)
def test_checker_catches_private_imports(source, expected):
    assert len(forbidden_uses(source)) == expected, forbidden_uses(source)


def test_package_has_sources():
    assert PACKAGE_DIR.is_dir() and (PACKAGE_DIR / "__init__.py") in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
def test_no_private_tensorflow_or_keras(path):
    uses = forbidden_uses(path.read_text(encoding="utf-8"))
    assert not uses, f"{path.relative_to(PACKAGE_DIR.parent)} uses private modules: {uses}"


def test_all_names_exist():
    tfq = importlib.import_module("tfq")
    assert isinstance(tfq.__all__, (list, tuple))
    assert len(set(tfq.__all__)) == len(tfq.__all__), "duplicate names in tfq.__all__"
    missing = [name for name in tfq.__all__ if not hasattr(tfq, name)]
    assert not missing, f"tfq.__all__ names missing from tfq: {missing}"


def test_reference_submodule_exports():
    tfq = importlib.import_module("tfq")
    assert "reference" in tfq.__all__
    missing = [name for name in tfq.reference.__all__ if not hasattr(tfq.reference, name)]
    assert not missing, f"tfq.reference.__all__ names missing: {missing}"
    assert callable(tfq.reference.run) and callable(tfq.reference.explain) and callable(tfq.reference.trace)


@pytest.mark.parametrize("module", ["pruning", "clustering", "distillation", "callbacks"])
def test_compression_modules_export_what_they_promise(module):
    tfq = importlib.import_module("tfq")
    mod = getattr(tfq, module)
    assert module in tfq.__all__
    missing = [name for name in mod.__all__ if not hasattr(mod, name)]
    assert not missing, f"tfq.{module}.__all__ names missing: {missing}"
    expected = {"pruning": {"prune_low_magnitude", "strip_pruning", "PolynomialDecay", "ConstantSparsity"},
                "clustering": {"cluster_weights", "strip_clustering"}, "distillation": {"Distiller"},
                "callbacks": {"UpdatePruningStep", "PruningSummaries"}}[module]
    assert expected <= set(mod.__all__)
