"""Latency and accuracy of every implementation at output stride 16 and 8, against torchvision.

One test per (output stride, implementation). Each one:

1. builds the implementation from the shared torchvision reference (same state dict for every row);
2. runs it once on the first photograph batch, measuring peak memory (that call is the first warmup);
3. after ``--warmup`` - 1 more untimed calls, times ``--rounds`` rounds (default: as many as fit
   ``--time-budget``, at least 5; 3 with ``--quick``) with pytest-benchmark's pedantic mode, cycling through
   the accuracy photographs; each round is one forward of ``--batch`` images;
4. compares the outputs on those photographs with the float32 torchvision model: logit error at the same
   output stride, argmax agreement and mIoU against the OS8 prediction (see ``bench/_metrics.py``);
5. with ``--data`` and real weights, measures mIoU on the VOC val split with ``fastdeeplab.evaluate``.

An implementation that cannot run here is skipped with the reason; a float32 implementation whose logits
drift beyond the tolerance fails (a wrong implementation must not pass as a fast one).
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import Subset

from ._impls import IMPLEMENTATIONS, Built, Setting, Unavailable
from ._measure import peak_memory
from ._metrics import accuracy_columns
from ._session import BenchSession

# Largest acceptable max_rel_logit_error against float32 torchvision at the same output stride, float32 only:
# a bug detector. CUDA float32 convolutions run in TF32 by default (the reference is computed with TF32 off).
# float16/bfloat16 rows are reported, not judged: their error depends on the weights (seeded random weights
# have noise-like logits with tiny margins, so bfloat16 torchvision itself lands near 0.6).
TOLERANCE = {
    ("cpu", "float32"): 5e-3,
    ("cuda", "float32"): 2e-2,
}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rounds(bench: BenchSession, first_call_s: float) -> int:
    cfg = bench.cfg
    if cfg.rounds is not None:
        return max(1, cfg.rounds)
    return int(min(cfg.max_rounds, max(cfg.min_rounds, math.ceil(cfg.time_budget / max(first_call_s, 1e-6)))))


def _time_and_collect(benchmark: Any, bench: BenchSession, built: Built, row: dict[str, Any]) -> list[Tensor]:
    """Peak memory on the first call, then the timed rounds; returns float32 outputs per accuracy batch."""
    cfg = bench.cfg
    device = cfg.torch_device
    inputs = [b.to(device, built.input_dtype) for b in bench.batches]
    outputs: dict[int, Tensor] = {}

    start = time.perf_counter()
    with peak_memory(device) as mem:
        out = built.fn(inputs[0])
        _synchronize(device)
    first_call_s = time.perf_counter() - start
    outputs[0] = out.to(torch.float32, copy=True)
    del out
    row["peak_mem_mb"] = mem.mb

    state: dict[str, Any] = {"next": 1, "index": 0, "last": None}

    def setup() -> tuple[tuple[Tensor], dict[str, Any]]:
        state["index"] = state["next"] % len(inputs)
        state["next"] += 1
        return (inputs[state["index"]],), {}

    def target(x: Tensor) -> None:
        state["last"] = built.fn(x)
        _synchronize(device)

    def teardown(x: Tensor) -> None:  # untimed: keep the first output of each batch (a copy: buffers get reused)
        if state["index"] not in outputs:
            outputs[state["index"]] = state["last"].to(torch.float32, copy=True)
        state["last"] = None

    rounds = _rounds(bench, first_call_s)
    benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=rounds,
                       warmup_rounds=max(0, cfg.warmup - 1), iterations=1)
    stats = benchmark.stats.stats if benchmark.stats is not None else None
    if stats is not None:
        row.update(latency_ms_median=stats.median * 1e3, latency_ms_iqr=stats.iqr * 1e3,
                   latency_ms_q1=stats.q1 * 1e3, latency_ms_q3=stats.q3 * 1e3, latency_ms_min=stats.min * 1e3,
                   rounds=stats.rounds, throughput_ips=cfg.batch / stats.median)
    else:
        row["notes"].append("pytest-benchmark is disabled: no latency")
    for i, x in enumerate(inputs):  # batches the timed rounds did not reach
        if i not in outputs:
            outputs[i] = built.fn(x).to(torch.float32, copy=True)
    return [outputs[i] for i in range(len(inputs))]


class _AsModule(nn.Module):
    """An implementation as the ``nn.Module`` that :func:`fastdeeplab.evaluate.evaluate` expects."""

    def __init__(self, built: Built, output_stride: int) -> None:
        super().__init__()
        self.built = built
        self.output_stride = output_stride

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"out": self.built.fn(x.to(self.built.input_dtype))}


def _val_miou(bench: BenchSession, built: Built, output_stride: int) -> tuple[float, int]:
    """Real mIoU on the VOC val split (first ``--max-images``), single scale, each image at its own size,
    through ``fastdeeplab.evaluate`` — the same scoring as ``fastdeeplab eval``."""
    from fastdeeplab.data import VOCSegmentation
    from fastdeeplab.evaluation import evaluate

    cfg = bench.cfg
    dataset = VOCSegmentation(cfg.data, "val")
    if cfg.max_images is not None and cfg.max_images < len(dataset):
        dataset = Subset(dataset, range(cfg.max_images))
    scores = evaluate(_AsModule(built, output_stride), dataset, batch_size=1, device=cfg.torch_device,
                      num_classes=bench.weights.num_classes, progress=False)
    return float(scores["mIoU"]), int(scores["num_images"])


def _run_row(benchmark: Any, bench: BenchSession, impl: str, output_stride: int, row: dict[str, Any]) -> None:
    cfg = bench.cfg
    setting = Setting(output_stride=output_stride, device=cfg.torch_device, dtype=cfg.torch_dtype,
                      resolution=cfg.resolution, batch=cfg.batch, workdir=bench.workdir,
                      explicit=cfg.explicit_impls and impl in cfg.impls, static_shape=not cfg.data,
                      threads=cfg.threads)
    reference = bench.reference(output_stride)
    setting.eager = bench.fastdeeplab_model(output_stride)
    try:
        built = IMPLEMENTATIONS[impl].build(reference, setting)
    except Unavailable as exc:
        pytest.skip(str(exc))
    except ImportError as exc:
        pytest.skip(f"import failed: {exc}")
    row["build_s"] = built.build_s
    row["notes"] += built.notes
    row["gflop"] = bench.gflop(output_stride)

    outputs = _time_and_collect(benchmark, bench, built, row)
    if row["latency_ms_median"]:
        row["gflops"] = row["gflop"] * cfg.batch / (row["latency_ms_median"] / 1e3)
    row.update(accuracy_columns(outputs, bench.ground_truth(output_stride), bench.ground_truth(8),
                                bench.weights.num_classes))
    row["accuracy_images"] = len(bench.image_names)
    del outputs

    if cfg.data:
        if bench.weights.real:
            row["val_miou"], row["val_images"] = _val_miou(bench, built, output_stride)
        else:
            row["notes"].append("val mIoU not measured: random weights (pass --weights)")
    benchmark.extra_info.update({k: v for k, v in row.items() if v is not None and k != "notes"})
    row["status"] = "ok"

    tol = TOLERANCE.get((cfg.device, cfg.dtype))
    err = row["max_rel_logit_error"]
    if tol is None:
        row["notes"].append(f"{cfg.dtype}: logit error reported, not checked against a tolerance")
    elif not err <= tol:
        row.update(status="failed", reason=f"max_rel_logit_error {err:.2e} > tolerance {tol:.0e}")
        pytest.fail(f"{impl} at OS{output_stride}: logits differ from torchvision's by {err:.2e} of their "
                    f"scale (tolerance {tol:.0e} for {cfg.device} {cfg.dtype}); pixel agreement with the "
                    f"same-OS reference {row['pixel_agreement_same_os']:.4f}", pytrace=False)


def test_deeplab(benchmark: Any, bench: BenchSession, impl: str, output_stride: int) -> None:
    """One row of the table: ``impl`` at ``output_stride`` (parametrised by bench/conftest.py)."""
    benchmark.group = f"OS{output_stride} {bench.cfg.resolution}px batch {bench.cfg.batch}"
    row = bench.new_row(impl, IMPLEMENTATIONS[impl].description, output_stride)
    try:
        _run_row(benchmark, bench, impl, output_stride, row)
    except pytest.skip.Exception as exc:
        row.update(status="skipped", reason=str(exc.msg))
        raise
    except pytest.fail.Exception:
        raise
    except Exception as exc:
        row.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
        raise
