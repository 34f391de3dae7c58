"""Kernel micro-benchmarks: each fused Triton kernel against its plain-PyTorch twin (cuDNN, channels-last)
on DeepLab's real shapes, as TFLOP/s and % of the GPU's dense fp16/bf16 tensor-core peak. CUDA only.

Shapes, derived from ``--resolution`` (513: 33×33 at OS16, 65×65 at OS8) and ``--batch``:

* layer3's 3×3 conv (256→256) and layer4's 3×3 conv (512→512) at OS16 and OS8, with the dilations those
  strides give (layer3: 1 / 2; layer4: 2 / 4);
* the ASPP 3×3 branches (2048→256) at rates 6/12/18 on the OS16 map and 12/24/36 on the OS8 map;
* the ASPP projection (4×256 + pooled 256 → 256, 1×1) on both maps.

FLOPs are the useful work of the literal computation (2·MAC of the convolution, the projection counted on
the full 5×256 concatenation), the same for both providers. Each provider's first call (autotuning, cuDNN's algorithm search)
is run untimed and reported as ``first_call_s``; its output is checked against the reference
(``max_rel_logit_error``), then the provider is timed with :func:`fastdeeplab.timing.time_cuda`
(``triton.testing.do_bench`` with an L2 flush before every run; CUDA events where triton is missing); cuDNN
runs with ``torch.backends.cudnn.benchmark`` on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

from fastdeeplab.timing import time_cuda

from ._metrics import max_rel_logit_error
from ._session import BenchSession, session_of

# Dense (no sparsity) fp16/bf16 tensor-core peaks in TFLOP/s, by a substring of torch.cuda.get_device_name().
# Checked in order: the more specific names first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
)
TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 5e-2}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
PROVIDERS = ("triton", "cudnn")


def peak_tflops(gpu_name: str) -> float | None:
    """The dense fp16/bf16 peak of a GPU from :data:`PEAK_TFLOPS`, or None if it is not listed."""
    for key, value in PEAK_TFLOPS:
        if key in gpu_name:
            return value
    return None


def feature_size(resolution: int, output_stride: int) -> int:
    """Side of the backbone's output map for a square input: conv1 and maxpool, then the strided stages."""
    side = resolution
    for _ in range({8: 3, 16: 4}[output_stride]):  # conv1, maxpool, layer2 (and layer3 at OS16), 3x3 s2 p1
        side = (side - 1) // 2 + 1
    return side


@dataclass(frozen=True)
class Case:
    """One kernel call: a 3×3 conv (+BN+ReLU) or the ASPP projection."""

    name: str
    kind: str  # "conv" | "aspp_project"
    cin: int
    cout: int
    side: int
    dilation: int = 1

    def flop(self, batch: int) -> float:
        taps = 9 if self.kind == "conv" else 1
        return 2.0 * batch * self.side * self.side * self.cout * self.cin * taps


def cases(resolution: int) -> list[Case]:
    s16, s8 = feature_size(resolution, 16), feature_size(resolution, 8)
    out = [
        Case(f"layer3 3x3 d1 OS16 {s16}px", "conv", 256, 256, s16, 1),
        Case(f"layer3 3x3 d2 OS8 {s8}px", "conv", 256, 256, s8, 2),
        Case(f"layer4 3x3 d2 OS16 {s16}px", "conv", 512, 512, s16, 2),
        Case(f"layer4 3x3 d4 OS8 {s8}px", "conv", 512, 512, s8, 4),
    ]
    out += [Case(f"ASPP 3x3 r{r} {s16}px", "conv", 2048, 256, s16, r) for r in (6, 12, 18)]
    out += [Case(f"ASPP 3x3 r{r} {s8}px", "conv", 2048, 256, s8, r) for r in (12, 24, 36)]
    out += [Case(f"ASPP project {s16}px", "aspp_project", 5 * 256, 256, s16),
            Case(f"ASPP project {s8}px", "aspp_project", 5 * 256, 256, s8)]
    return out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    bench = session_of(metafunc.config)
    if bench.cfg.device != "cuda":
        metafunc.parametrize("case,dtype,provider", [pytest.param(None, None, None, id="cuda-only")])
        return
    grid = [(c, d, p) for c in cases(bench.cfg.resolution) for d in DTYPES for p in PROVIDERS]
    metafunc.parametrize("case,dtype,provider", grid,
                         ids=[f"{c.name.replace(' ', '-')}-{d}-{p}" for c, d, p in grid])


def _make_call(case: Case, dtype: torch.dtype, provider: str, batch: int,
               device: torch.device) -> tuple[Callable[[], Tensor], Callable[[], Tensor]]:
    """``(call of the provider, call of the reference twin)`` on random channels-last inputs."""
    from fastdeeplab import kernels

    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    cl = torch.channels_last
    if case.kind == "conv":
        x = rand(batch, case.cin, case.side, case.side).contiguous(memory_format=cl)
        w = rand(case.cout, case.cin, 3, 3, scale=(2.0 / (9 * case.cin)) ** 0.5)
        b = rand(case.cout, scale=0.1)
        geometry = dict(stride=1, padding=case.dilation, dilation=case.dilation)

        def reference() -> Tensor:
            return kernels.conv_bn_relu_reference(x, w, b, relu=True, **geometry)

        if provider == "cudnn":
            return reference, reference
        packed = kernels.pack_weight(w)
        return (lambda: kernels.conv_bn_relu_packed(x, packed, b, kernel_size=(3, 3), relu=True, **geometry),
                reference)
    cb = case.cin // 5
    branches = [rand(batch, cb, case.side, case.side).relu().contiguous(memory_format=cl) for _ in range(4)]
    pooled = rand(batch, cb).relu()
    w = rand(case.cout, case.cin, 1, 1, scale=(2.0 / case.cin) ** 0.5)
    b = rand(case.cout, scale=0.1)

    def reference_project() -> Tensor:
        return kernels.aspp_project_reference(branches, pooled, w, b, relu=True)

    if provider == "cudnn":
        return reference_project, reference_project
    packed = kernels.pack_aspp_weight(w)
    return lambda: kernels.aspp_project_packed(branches, pooled, packed, b, relu=True), reference_project


def test_kernel(benchmark: Any, bench: BenchSession, case: Case | None, dtype: str | None,
                provider: str | None) -> None:
    """One kernel row: ``provider`` on ``case`` in ``dtype``, checked against the twin, then timed."""
    row: dict[str, Any] = {"case": case.name if case else "all kernel micro-benchmarks", "dtype": dtype or "-",
                           "provider": provider or "-", "status": "running", "reason": None}
    bench.kernel_rows.append(row)
    try:
        _run_kernel(benchmark, bench, case, dtype, provider, row)
    except pytest.skip.Exception as exc:
        row.update(status="skipped", reason=str(exc.msg))
        raise
    except Exception as exc:
        row.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
        raise


def _run_kernel(benchmark: Any, bench: BenchSession, case: Case | None, dtype_name: str | None,
                provider: str | None, row: dict[str, Any]) -> None:
    cfg = bench.cfg
    if case is None or dtype_name is None or provider is None:
        pytest.skip(f"CUDA only: kernel micro-benchmarks need a GPU (device is {cfg.device})")
    device = cfg.torch_device
    dtype = DTYPES[dtype_name]
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name(device)} has no bfloat16 support")
    if provider == "triton":
        from fastdeeplab.kernels import triton_available

        if not triton_available():
            pytest.skip("triton is not installed: pip install 'fastdeeplab[triton]'")
    call, reference = _make_call(case, dtype, provider, cfg.batch, device)
    # The first call autotunes (Triton) or picks an algorithm (cuDNN with cudnn.benchmark): done here,
    # untimed, and reported apart. The launchers tune each problem once, also when called directly (outside
    # the custom ops), so the timed calls below reuse that choice and never time a re-tune.
    start = time.perf_counter()
    first = call()
    torch.cuda.synchronize(device)
    row["first_call_s"] = time.perf_counter() - start
    err = max_rel_logit_error(first, reference())
    row["max_rel_error"] = err
    if not err <= TOLERANCE[dtype]:
        pytest.fail(f"{provider} {case.name} {dtype_name}: max rel error {err:.2e} > {TOLERANCE[dtype]:.0e}")

    # CUDA time with the L2 flushed before every run (triton.testing.do_bench, or CUDA events), cuDNN with
    # cudnn.benchmark on (set by bench/conftest.py on CUDA): the fair comparison of issue 13.
    benchmark.group = f"kernel {case.name} {dtype_name}"
    t = time_cuda(call, rep_ms=25 if cfg.quick else 100)
    flop = case.flop(cfg.batch)
    gpu = torch.cuda.get_device_name(device)
    peak = peak_tflops(gpu)
    tflops = flop / (t.median / 1e3) / 1e12
    row.update(gpu=gpu, tflop=flop / 1e12, peak_tflops=peak, status="ok", time_us_median=t.median * 1e3,
               time_us_iqr=t.iqr * 1e3, tflops=tflops, percent_of_peak=100.0 * tflops / peak if peak else None,
               timer="triton.testing.do_bench (L2 flushed)" if t.n == 0 else "CUDA events (L2 flushed)",
               cudnn_benchmark=bool(torch.backends.cudnn.benchmark))
    benchmark.extra_info.update({k: v for k, v in row.items() if v is not None})
