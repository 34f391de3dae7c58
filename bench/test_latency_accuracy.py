"""Latency and accuracy of every implementation at output stride 16 and 8, against torchvision.

One test per (output stride, implementation); the work is done once per output stride, by the first test of
that stride (:meth:`bench._session.BenchSession.setting`):

1. every selected implementation is built from the shared torchvision reference (same state dict for every
   row), one progress line each;
2. each runs once on the timing input (peak memory), then on the accuracy inputs: its logits are compared
   with the float32 torchvision model (logit error and agreement at the same output stride; agreement and
   mIoU against the OS8 prediction; with ``--weights synthetic`` mIoU against the held-out scenes' labels);
3. all of them are timed round-robin (:func:`fastdeeplab.timing.interleaved`): one call each per round, the
   order rotated every round; speed-ups over torchvision are per-round ratios (median and IQR);
4. with ``--data`` and real weights, mIoU on the VOC val split with ``fastdeeplab.evaluate``.

Each test then reports its row: skipped with the reason when the implementation cannot run here, failed when
a float32 implementation's logits drift beyond the tolerance (a wrong implementation must not pass as a fast
one). The timed samples also go to pytest-benchmark (``--benchmark-json``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ._impls import IMPLEMENTATIONS
from ._session import BenchSession

# Largest acceptable max_rel_logit_error against float32 torchvision at the same output stride, float32 only:
# a bug detector. CUDA float32 convolutions run in TF32 by default (the reference is computed with TF32 off).
# float16/bfloat16/int8 rows are reported, not judged: their error depends on the weights (seeded random
# weights have noise-like logits with tiny margins, so bfloat16 torchvision itself lands near 0.6).
TOLERANCE = {
    ("cpu", "float32"): 5e-3,
    ("cuda", "float32"): 2e-2,
}


def _feed_pytest_benchmark(benchmark: Any, row: dict[str, Any]) -> None:
    """Hand the interleaved samples to pytest-benchmark, so ``--benchmark-json`` holds them (no re-timing)."""
    samples = row.get("samples_ms") or []
    try:
        benchmark._mode = "interleaved (bench/_session.py)"  # used, just not through benchmark(...)
        stats = benchmark._make_stats(1)
        for ms in samples:
            stats.update(ms / 1e3)
    except AttributeError:  # pytest-benchmark's internals changed, or it is disabled: the suite's JSON has them
        return
    benchmark.extra_info.update({k: v for k, v in row.items()
                                 if v is not None and k not in ("notes", "samples_ms")})


def test_deeplab(benchmark: Any, bench: BenchSession, impl: str, output_stride: int) -> None:
    """One row of the table: ``impl`` at ``output_stride`` (parametrised by bench/conftest.py)."""
    cfg = bench.cfg
    benchmark.group = f"OS{output_stride} {cfg.resolution}px batch {cfg.batch}"
    row = bench.setting(output_stride).rows[impl]
    if row["status"] == "skipped":
        pytest.skip(row["reason"])
    if row["status"] == "failed":
        pytest.fail(f"{impl} at OS{output_stride}: {row['reason']}", pytrace=False)
    _feed_pytest_benchmark(benchmark, row)

    precision = IMPLEMENTATIONS[impl].precision
    tol = TOLERANCE.get((cfg.device, cfg.dtype)) if precision is None else None
    err = row["max_rel_logit_error"]
    if tol is None:
        row["notes"].append(f"{row['dtype']}: logit error reported, not checked against a tolerance")
    elif not err <= tol:
        row.update(status="failed", reason=f"max_rel_logit_error {err:.2e} > tolerance {tol:.0e}")
        pytest.fail(f"{impl} at OS{output_stride}: logits differ from torchvision's by {err:.2e} of their "
                    f"scale (tolerance {tol:.0e} for {cfg.device} {cfg.dtype}); pixel agreement with the "
                    f"same-OS reference {row['pixel_agreement_same_os']:.4f}", pytrace=False)
    assert row["latency_ms_median"] is not None and row["latency_ms_median"] > 0
    assert torch.isfinite(torch.tensor(row["latency_ms_median"]))
