"""What :func:`fastdeeplab.export.onnx.export_onnx` names and reports: the graph's input and output names,
the check tolerances, :class:`ExportReport`, :class:`CheckResult` and :class:`ExportCheckError`.

Its own module, below :mod:`~fastdeeplab.export.onnx` (the export) and :mod:`~fastdeeplab.export.verify` (the
checks that fill the report), so that neither imports the other back.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["INPUT_NAME", "LABELS_NAME", "MIN_OPSET", "TOLERANCES", "CheckResult", "Dims", "ExportCheckError",
           "ExportReport"]

INPUT_NAME = "input"
LABELS_NAME = "labels"
MIN_OPSET = 13
# Tolerance of the ONNX Runtime check: max |ort - torch| <= tol * max |torch|, per output.
TOLERANCES = {torch.float32: 1e-4, torch.float16: 2e-2}


@dataclass(frozen=True)
class CheckResult:
    """One post-export check: ``passed`` and a one-line ``message`` (the measured figure or the problem)."""

    passed: bool
    message: str


class ExportCheckError(RuntimeError):
    """A post-export check failed; nothing was written. ``check`` names the check, ``node`` the ONNX node
    at fault (``None`` when the failure is not about one node), ``report`` holds what was measured so far."""

    def __init__(self, check: str, message: str, *, node: str | None = None,
                 report: ExportReport | None = None) -> None:
        self.check, self.node, self.report = check, node, report
        where = f" (node {node!r})" if node else ""
        super().__init__(f"ONNX export check {check!r} failed{where}: {message}")


Dims = tuple[int | str, ...]


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and what its checks measured.

    ``errors["97x131 b2"]["out"] = (max_abs, max_abs / max|torch|)`` for every checked size and output;
    ``agreement["97x131 b2"]`` the fraction of pixels whose class (argmax of ``out``) equals PyTorch's.
    """

    path: Path
    opset: int
    op_counts: Counter[str]
    inputs: dict[str, Dims]
    outputs: dict[str, Dims]
    dtypes: dict[str, str] = field(default_factory=dict)
    output_stride: int | None = None
    precision: str = "fp32"
    errors: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    checks: dict[str, CheckResult] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)
    kept_fp32: list[str] = field(default_factory=list)
    file_size: int = 0
    export_seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks.values())

    def __str__(self) -> str:
        size = f"{self.file_size / 2**20:.1f} MiB"
        stride = f", output stride {self.output_stride}" if self.output_stride else ""
        lines = [f"ONNX export: {self.path} ({size}, opset {self.opset}, {self.precision}{stride}, "
                 f"exported in {self.export_seconds:.1f} s)"]
        for kind, tensors in (("input ", self.inputs), ("output", self.outputs)):
            for name, dims in tensors.items():
                lines.append(f"  {kind} {name:<7} [{', '.join(map(str, dims))}] {self.dtypes.get(name, '')}")
        if self.kept_fp32:
            lines.append(f"  kept in fp32: {', '.join(self.kept_fp32)}")
        lines.append(f"  {sum(self.op_counts.values())} nodes: "
                     + ", ".join(f"{op} {n}" for op, n in self.op_counts.most_common()))
        if self.checks:
            lines.append("  checks:")
            width = max(len(k) for k in self.checks)
            for name, result in self.checks.items():
                lines.append(f"    {'PASS' if result.passed else 'FAIL'}  {name:<{width}}  {result.message}")
        return "\n".join(lines)
