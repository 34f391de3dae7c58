"""The README works as copied: its "Use" snippet and every command line of its code blocks that can run
offline are executed, in a fresh folder, exactly as written; the set-up commands are the ones CI runs.

Left out, with the reason: lines that need the network (``pip install``), a GPU with TensorRT, or data the
reader brings (``VOCdevkit/``, ``ckpt.pt``). Lines that take more than about 2 minutes on 2 shared cores (the
benchmark, training) run only with ``FASTDEEPLAB_README_ALL=1``; ``predict --weights synthetic`` runs when
the synthetic model is cached (it is trained once, about 5 minutes on 2 quiet cores).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def use_snippet() -> str:
    """The first ``python`` block of the README's ``## Use`` section, exactly as written."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Use\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the Use section has no python block"
    return match.group(1)


def command_lines() -> list[str]:
    """Every command of the README's ``bash`` blocks as written (a line ``a && b`` gives ``a`` and ``b``, except
    the set-up lines, kept whole)."""
    text = README.read_text(encoding="utf-8")
    lines = [line.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [part.strip() for line in lines
            for part in ([line] if "pip install" in line else line.split("#", 1)[0].split("&&"))]


def _why_not(line: str) -> str | None:
    """Why a README line cannot run offline here (None: it can)."""
    if "pip install" in line:
        return "installs from the network (the set-up commands; test_setup_commands_are_what_ci_runs)"
    if line.startswith(("fastdeeplab serve", "fastdeeplab client")):
        return "a tritonserver in the foreground (fetched from PyPI on first use) and its client: tests/test_serve.py"
    if "tensorrt" in line:
        return "needs TensorRT and an NVIDIA GPU"
    if "VOCdevkit" in line or "ckpt.pt" in line:
        return "needs the reader's dataset or checkpoint"
    return None


def _over_two_minutes(line: str) -> str | None:
    if line.startswith("fastdeeplab bench"):
        return "the benchmark takes several minutes on 2 shared cores"
    if "train --overfit-demo" in line:
        return "training takes several minutes on 2 shared cores"
    if "--weights synthetic" in line:
        from fastdeeplab.weights import cache_path

        if not cache_path(50).is_file():
            return f"the synthetic model is not cached yet ({cache_path(50)}): training it takes over 2 minutes"
    return None


LINES = command_lines()
RUNNABLE = [line for line in LINES if _why_not(line) is None]


def test_readme_has_the_commands_this_test_expects():
    assert any(line.startswith("fastdeeplab predict") and "--weights synthetic" in line for line in RUNNABLE)
    assert any(line.startswith("fastdeeplab demo") for line in RUNNABLE)
    assert "this workplace" not in README.read_text(encoding="utf-8")


def test_setup_commands_are_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    tests_cmd = next(line for line in LINES if ".venv/bin/pytest tests" in line)
    assert tests_cmd.replace('pip install -e', 'pip install -q -e') in ci, tests_cmd
    main_cmd = next(line for line in LINES if "fastdeeplab bench" in line and "pip install" in line)
    assert main_cmd == 'python3 -m venv .venv && .venv/bin/pip install -e ".[bench]" && .venv/bin/fastdeeplab bench'


def _argv(line: str) -> list[str]:
    words = shlex.split(line, comments=True)
    if words[0] == "fastdeeplab":
        return [sys.executable, "-m", "fastdeeplab", *words[1:]]
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    raise AssertionError(f"unexpected README command {line!r}")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_command_lines_run_as_copied(tmp_path):
    """All runnable lines, in order, in one empty folder (a later line uses what an earlier one wrote)."""
    ran, skipped = [], []
    for line in RUNNABLE:
        slow = _over_two_minutes(line)
        if slow and not os.environ.get("FASTDEEPLAB_README_ALL"):
            skipped.append(f"{line}: {slow}")
            continue
        result = subprocess.run(_argv(line), cwd=tmp_path, capture_output=True, text=True, timeout=1500)
        assert result.returncode == 0, f"{line}\n{result.stdout[-1500:]}\n{result.stderr[-2500:]}"
        ran.append(line)
        if line.startswith("fastdeeplab demo"):
            assert (tmp_path / "demo_overlay.png").is_file()
            assert re.search(r"OS16 .* ms .*min .* max", result.stdout) and re.search(r"OS8 ", result.stdout)
        if line.startswith("python -m fastdeeplab.weights --scene"):
            assert (tmp_path / "scene.png").is_file()
        if line.startswith("fastdeeplab predict"):
            assert (tmp_path / "masks" / "scene_overlay.png").is_file()
        if line.startswith("fastdeeplab export"):
            assert (tmp_path / "deeplab.onnx").is_file()
        if line.startswith("fastdeeplab deploy"):
            assert (tmp_path / "model_repository").is_dir()
    assert ran, "no README command ran"
    print("\n".join(["ran:", *ran, "left out:", *skipped]))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_use_snippet_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)  # the snippet writes deeplab.onnx into the current folder
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(use_snippet(), str(README), "exec"), namespace)  # noqa: S102
    assert tuple(namespace["logits"].shape) == (1, 21, 513, 513)
    assert (tmp_path / "deeplab.onnx").is_file()
    assert "deeplab.onnx" in capsys.readouterr().out or namespace["report"] is not None
