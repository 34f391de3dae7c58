"""The house rules of issues 11 and 20: every module imports by name as a module, no module hides behind a
function, every public function is still reachable where it was, and no module imports (directly or through
others) a module that imports it back."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
import types
from pathlib import Path

import fastdeeplab.kernels
import pytest

import fastdeeplab

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


# --------------------------------------------------------------------------------------------------
# No import circles: a static graph of every import statement (module level, in functions, under
# TYPE_CHECKING) across fastdeeplab/, kernels/ (as fastdeeplab.kernels) and bench/.
# --------------------------------------------------------------------------------------------------
SOURCE_TREES = (("fastdeeplab", "fastdeeplab"), ("kernels", "fastdeeplab.kernels"), ("bench", "bench"))


def _module_files() -> dict[str, Path]:
    files = {}
    for folder, prefix in SOURCE_TREES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join((prefix, *parts))] = path
    return files


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules its import statements name. ``from pkg import name`` points at the
    submodule ``pkg.name`` when there is one, else at ``pkg``; importing a submodule is not counted as importing
    its parent packages (Python runs their ``__init__`` first, but they are not what the code depends on)."""
    import ast

    files = _module_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        try:
            source = path.read_text(encoding="utf-8")
        except FileNotFoundError:  # removed since the listing (an editor's or a formatter's temporary file)
            continue
        for node in ast.walk(ast.parse(source, filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                           for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # `import fastdeeplab.x.y` names the module x.y
                    target = target.rpartition(".")[0]
                if target and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as one circle's path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_circle_path(graph, set(c)) for c in components]


def _circle_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One circle through the component's first module, for the failure message: a -> b -> ... -> a."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return sorted(component)


def test_no_import_circles():
    circles = import_circles(import_graph())
    assert not circles, "import circles (each module imports, directly or through others, one that imports " \
        "it back):\n" + "\n".join(" -> ".join(c) for c in circles)


def test_runtime_sits_below_export():
    """Dependencies run kernels -> layers -> runtime -> export -> optimization: runtime/ never imports export/,
    and neither imports optimization, serve or the command line."""
    graph = import_graph()
    above = {"runtime": ("fastdeeplab.export", "fastdeeplab.optimization", "fastdeeplab.cli", "fastdeeplab.serve"),
             "export": ("fastdeeplab.optimization", "fastdeeplab.serve")}
    for layer, forbidden in above.items():
        for name, deps in graph.items():
            if name.startswith(f"fastdeeplab.{layer}.") or name == f"fastdeeplab.{layer}":
                bad = sorted(d for d in deps if d.startswith(forbidden))
                assert not bad, f"{name} imports {bad}, which sit above {layer}/"


@pytest.mark.parametrize("source, circle", [
    ({"a": "from . import b", "b": "def f():\n    from .a import x"}, ["pkg.a", "pkg.b", "pkg.a"]),
    ({"a": "import pkg.b", "b": "from pkg import c", "c": "if TYPE_CHECKING:\n    from .a import A"},
     ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]),
    ({"a": "from .b import x", "b": "from .c import y", "c": "import os"}, None),
])
def test_import_circles_are_found(tmp_path, monkeypatch, source, circle):
    """The checker itself: function-level and TYPE_CHECKING imports count; a chain without a loop passes."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, code in source.items():
        (package / f"{name}.py").write_text(code + "\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "SOURCE_TREES", (("pkg", "pkg"),))
    circles = import_circles(import_graph())
    assert circles == ([circle] if circle else [])


def ast_docstring(path: Path) -> str | None:
    import ast

    return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))


def test_ruff_is_clean():
    """The lint settings in pyproject.toml hold for the whole tree (ruff is in the dev extra)."""
    import subprocess

    pytest.importorskip("ruff", reason="ruff is in the dev extra: pip install -e '.[dev]'")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--quiet", str(ROOT)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
