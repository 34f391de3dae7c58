"""The README's "Use" snippet runs as copied: extracted verbatim from README.md and executed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def use_snippet() -> str:
    """The first ``python`` block of the README's ``## Use`` section, exactly as written."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Use\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the Use section has no python block"
    return match.group(1)


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
