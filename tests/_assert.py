"""A verbose closeness check for kernel tests: says how many elements mismatch, where, and by how much."""

from __future__ import annotations

import pytest
import torch
from fastdeeplab.kernels._utils import kernel_tolerance
from torch import Tensor

__all__ = ["KERNEL_DTYPES", "assert_close_verbose"]

# (dtype, allow_tf32, atol, rtol) for kernel-vs-float64-reference checks, from the project's one table
# (fastdeeplab.kernels._utils.KERNEL_TOLERANCES, which the dispatcher's first-call check uses too).
KERNEL_DTYPES = [
    pytest.param(torch.float32, False, *kernel_tolerance(torch.float32, False), id="fp32-ieee"),
    pytest.param(torch.float32, True, *kernel_tolerance(torch.float32, True), id="fp32-tf32"),
    pytest.param(torch.float16, None, *kernel_tolerance(torch.float16), id="fp16"),
    pytest.param(torch.bfloat16, None, *kernel_tolerance(torch.bfloat16), id="bf16"),
]


def _where(mask: Tensor, limit: int) -> list[tuple[int, ...]]:
    return [tuple(int(i) for i in idx) for idx in mask.nonzero()[:limit]]


def assert_close_verbose(actual: Tensor, expected: Tensor, *, atol: float, rtol: float, name: str = "output",
                         dims: str = "", max_report: int = 8) -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise, compared in float64.

    NaN must sit exactly where ``expected`` has NaN, and ±inf exactly where it has the same infinity; a NaN in
    ``actual`` where none is expected (an unwritten, NaN-poisoned output for instance) is a mismatch that is
    reported as such. ``dims`` names the axes in the report, e.g. ``"NCHW"``.
    """
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    label = f" [{','.join(dims)}]" if dims else ""
    problems = []

    a_nan, e_nan = torch.isnan(a), torch.isnan(e)
    if not torch.equal(a_nan, e_nan):
        extra, missing = a_nan & ~e_nan, e_nan & ~a_nan
        if extra.any():
            problems.append(f"{int(extra.sum())} unexpected NaN in {name}, first at{label} {_where(extra, max_report)}")
        if missing.any():
            problems.append(f"{int(missing.sum())} expected NaN missing from {name}, first at{label} "
                            f"{_where(missing, max_report)}")
    a_inf, e_inf = torch.isinf(a), torch.isinf(e)
    inf_bad = (a_inf | e_inf) & ~((a_inf & e_inf) & (torch.sign(a) == torch.sign(e)))
    if inf_bad.any():
        problems.append(f"{int(inf_bad.sum())} elements disagree on ±inf, first at{label} {_where(inf_bad, max_report)}")

    finite = torch.isfinite(a) & torch.isfinite(e)
    diff = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    bad = finite & (diff > atol + rtol * e.abs())
    if bad.any():
        n_bad, total = int(bad.sum()), a.numel()
        worst = tuple(int(i) for i in torch.unravel_index(torch.argmax(diff), diff.shape))
        rel = diff / e.abs().clamp_min(1e-30)
        lines = [f"{n_bad}/{total} elements ({100.0 * n_bad / total:.2f}%) of {name} exceed "
                 f"atol={atol:g} + rtol={rtol:g}*|expected|;",
                 f"max abs err {float(diff.max()):.3e} at{label} {worst} "
                 f"(actual {float(a[worst]):.6g}, expected {float(e[worst]):.6g}); "
                 f"max rel err {float(rel[bad].max()):.3e}"]
        for idx in _where(bad, max_report):
            lines.append(f"  at{label} {idx}: actual {float(a[idx]):.6g}, expected {float(e[idx]):.6g}, "
                         f"diff {float(diff[idx]):.3e}")
        if a.dim() >= 2:  # which slices along each axis are hit: spots a wrong channel tile or image
            for d in range(a.dim()):
                hit = bad.transpose(0, d).reshape(bad.shape[d], -1).any(1).nonzero().flatten().tolist()
                axis = dims[d] if d < len(dims) else str(d)
                lines.append(f"  axis {axis}: mismatches at {len(hit)}/{bad.shape[d]} indices "
                             f"{hit[:16]}{' ...' if len(hit) > 16 else ''}")
        problems.append("\n".join(lines))
    if problems:
        raise AssertionError("\n".join(problems))
