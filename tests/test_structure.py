"""The house rules of issue 11: every module imports by name as a module, no module hides behind a function,
and every public function is still reachable where it was."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import types
from pathlib import Path

import pytest

import fastdeeplab
import fastdeeplab.kernels

ROOT = Path(__file__).resolve().parents[1]
# Modules that need an optional package at import time (their names say which).
OPTIONAL_IMPORTS = {"triton", "onnx", "onnxruntime", "openvino", "tensorrt", "yaml", "matplotlib"}


def _all_module_names() -> list[str]:
    names = []
    for package in (fastdeeplab, fastdeeplab.kernels):
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
            names.append(info.name)
    return sorted(set(names))


@pytest.mark.parametrize("name", _all_module_names())
def test_every_module_imports_as_a_module(name):
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or ""
        if missing.split(".")[0] in OPTIONAL_IMPORTS:
            pytest.skip(f"{name} needs the optional package {missing}")
        raise
    assert isinstance(module, types.ModuleType), f"{name} resolves to {type(module).__name__}, not a module"
    # And the attribute path gives the same thing the import system does, unless a public function keeps it.
    parent, _, leaf = name.rpartition(".")
    if parent:
        attr = getattr(importlib.import_module(parent), leaf, module)
        assert attr is module, f"{parent}.{leaf} is {attr!r}, which shadows the module {name}"


@pytest.mark.parametrize("path, kind", [
    ("fastdeeplab.optimize", "function"),
    ("fastdeeplab.evaluate", "function"),
    ("fastdeeplab.train", "function"),
    ("fastdeeplab.export_onnx", "function"),
    ("fastdeeplab.build_tensorrt_engine", "function"),
    ("fastdeeplab.TensorRTModel", "class"),
    ("fastdeeplab.kernels.conv_bn_relu", "function"),
    ("fastdeeplab.kernels.fold_bn", "function"),
    ("fastdeeplab.export.ort_session", "function"),
    ("fastdeeplab.export.openvino_compiled_model", "function"),
])
def test_public_names_keep_their_paths(path, kind):
    module_name, _, attr = path.rpartition(".")
    value = getattr(importlib.import_module(module_name), attr)
    if kind == "function" and attr == "conv_bn_relu" and not fastdeeplab.kernels.triton_available():
        pytest.skip("triton not installed")
    check = inspect.isfunction if kind == "function" else inspect.isclass
    assert check(value), f"{path} is {value!r}, expected a {kind}"
    # importing the submodules that used to share these names must not rebind the package attribute
    for sub in ("fastdeeplab.optimization", "fastdeeplab.evaluation", "fastdeeplab.training"):
        importlib.import_module(sub)
    assert getattr(importlib.import_module(module_name), attr) is value


def test_public_surface_is_all_there():
    for name in fastdeeplab.__all__:
        assert getattr(fastdeeplab, name) is not None, name


def test_python_dash_m_fastdeeplab_is_the_cli():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "fastdeeplab", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("bench", "demo", "export", "eval", "train", "predict"):
        assert command in result.stdout


def test_no_oversized_module_without_a_reason():
    """No file in fastdeeplab/ or kernels/ over ~500 lines unless its docstring says why it is one concern."""
    for path in [*(ROOT / "fastdeeplab").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]:
        lines = path.read_text(encoding="utf-8").count("\n")
        if lines > 550:
            doc = (ast_docstring(path) or "").lower()
            assert "one concern" in doc, f"{path.relative_to(ROOT)} has {lines} lines and no 'one concern' note"


def ast_docstring(path: Path) -> str | None:
    import ast

    return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
