"""Python host time per fused-layer call with the GPU launch stubbed (a benchmark, not a test).

Measures what a Triton-backend layer costs the CPU before the GPU sees anything: argument checks, the dispatch
decision, the custom-op machinery, the autotuner's cache lookup and the launch arguments. The launch itself
(``triton.runtime.jit.JITFunction.run``) and Triton's benchmark (``Autotuner._bench``) are replaced by stubs,
so this runs on any machine without a GPU, and without ``TRITON_INTERPRET`` (the compiled-kernel code path):

* **op path**: a :class:`fastdeeplab.layers.FusedConvBNReLU` / :class:`~fastdeeplab.layers.FusedASPP` on the
  ``triton`` backend calls the ``torch.ops.fastdeeplab`` custom ops, as an optimized model does;
* **direct path**: the public launchers (``conv_bn_relu_packed``, ``aspp_branches_packed``,
  ``aspp_project_packed``) called directly, as benchmarks and users do.

The tensors are CPU tensors standing in for CUDA ones (the device checks are relaxed, the ops' CPU kernel is
the launcher, as their CUDA kernel is; ASPP's image-pooling reduction, real CPU work here, is precomputed).
Each figure is the mean host time of ``--calls`` calls in µs, median and minimum over ``--rounds`` rounds
(on a shared machine the minimum is the least disturbed), after a warm-up that tunes each problem once;
``benches`` counts the stubbed autotune benchmarks during the timed calls (0: nothing re-tuned), ``launches``
the stubbed kernel launches per timed call (1 per conv, 2 per ASPP: nothing skipped, nothing repeated).

    python scripts/host_overhead.py [--calls 300] [--rounds 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the compiled-kernel path; must happen before triton is imported

COUNTS = {"launches": 0, "benches": 0}


def stub_gpu() -> None:
    """Replace the GPU launch and Triton's autotune benchmark by counters, and let CPU tensors through the
    launchers' device checks; the custom ops' CPU kernel becomes the launcher (as on CUDA)."""
    import torch
    from torch._library.triton import set_wrap_triton_enabled
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def run(self, *args, grid, warmup, **kwargs):
        COUNTS["launches"] += 1

    def bench(self, *args, config, **meta):
        COUNTS["benches"] += 1
        return [1.0 + (hash(str(config)) % 97) / 100.0] * 3

    JITFunction.run = run
    Autotuner._bench = bench
    Autotuner.check_disk_cache = lambda self, key, configs, bench_fn: bench_fn() and False  # no driver here

    from fastdeeplab.kernels import _utils, aspp, conv, ops

    def launchable(device: torch.device) -> bool:
        return True

    if hasattr(_utils, "launchable"):
        _utils.launchable = launchable
    else:  # older layout: one check_device per launcher module
        original = _utils.check_device

        def check_device(x, others):
            for t in others.values():
                if t is not None and t.device != x.device:
                    return original(x, others)

        for module in (_utils, conv, aspp):
            module.check_device = check_device
    ops._use_kernels = lambda x: True
    ops._interpreter_config = lambda x, raster=False: None
    for op_name, kernel, reference in [("conv2d_act", ops._conv2d_act_kernel, ops._conv2d_act_reference),
                                    ("aspp_branches", ops._aspp_branches_kernel, ops._aspp_branches_reference),
                                    ("aspp_project", ops._aspp_project_kernel, ops._aspp_project_reference)]:
        impl = ops._dispatching(kernel, reference)

        def cpu_kernel(*args, _impl=impl):  # what triton_op's CUDA kernel does: no wrap_triton HOP in eager
            with set_wrap_triton_enabled(False):
                return _impl(*args)

        getattr(ops, op_name).register_kernel("cpu", cpu_kernel)


def per_call_us(fn, calls: int, rounds: int) -> tuple[float, float, int, float]:
    """(median, min) over rounds of the mean µs per call, the autotune benchmarks during timing, and the
    (stubbed) kernel launches per timed call."""
    fn()
    fn()
    fn()  # the fused ASPP records its launch plan on its second call, and replays it from the third
    benches, launches = COUNTS["benches"], COUNTS["launches"]
    means = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - t0) / calls * 1e6)
    return (statistics.median(means), min(means), COUNTS["benches"] - benches,
            (COUNTS["launches"] - launches) / (calls * rounds))


def cases(dtype):
    import torch
    from fastdeeplab.kernels.aspp import aspp_branches_packed, aspp_project_packed
    from fastdeeplab.kernels.conv import conv_bn_relu_packed
    from fastdeeplab.kernels.dispatch import Dispatcher
    from torch import nn

    from fastdeeplab.layers import FusedASPP, FusedConvBNReLU
    from fastdeeplab.model import ASPP

    cl = torch.channels_last
    dispatcher = Dispatcher("triton", cache_path=None)

    def fused(cin, cout, k, dilation=1):
        conv = nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False)
        m = FusedConvBNReLU(conv, nn.BatchNorm2d(cout).eval(), relu=True, backend="triton").to(dtype)
        m.dispatcher, m.dispatch_name = dispatcher, f"conv{k}x{k}"
        return m

    x512 = torch.randn(1, 512, 33, 33, dtype=dtype).to(memory_format=cl)
    x2048 = torch.randn(1, 2048, 33, 33, dtype=dtype).to(memory_format=cl)
    res = torch.randn(1, 1024, 33, 33, dtype=dtype).to(memory_format=cl)
    c3, c1 = fused(512, 512, 3, dilation=2), fused(256, 1024, 1)
    x256 = torch.randn(1, 256, 33, 33, dtype=dtype).to(memory_format=cl)
    head = FusedASPP(ASPP(2048, [6, 12, 18]).eval(), backend="triton").to(dtype).eval()
    head.dispatcher, head.dispatch_name = dispatcher, "aspp"
    pooled_result = torch.randn(1, 256, dtype=dtype)
    head.pooled = lambda x: pooled_result  # a torch reduction that would run on the CPU here: precomputed
    for b in head.branches:
        b.dispatcher = dispatcher
    branches = torch.empty(4, 256, 33, 33, dtype=dtype).to(memory_format=cl).chunk(4)
    pooled = torch.randn(1, 256, dtype=dtype)

    def aspp_direct():
        aspp_branches_packed(x2048, head._branch_packed, head._branch_bias32, [6, 12, 18])
        return aspp_project_packed(list(branches), pooled, head._packed, head._bias32)

    with torch.inference_mode():
        yield "conv 3x3 512->512 d2, x[1,512,33,33]", "op", lambda: c3(x512)
        yield "conv 3x3 512->512 d2, x[1,512,33,33]", "direct", lambda: conv_bn_relu_packed(
            x512, c3._packed, c3._bias32, kernel_size=3, padding=2, dilation=2)
        yield "conv 1x1 256->1024 + residual", "op", lambda: c1(x256, res)
        yield "conv 1x1 256->1024 + residual", "direct", lambda: conv_bn_relu_packed(
            x256, c1._packed, c1._bias32, kernel_size=1, residual=res)
        yield "ASPP branches + projection (2 launches)", "op", lambda: head(x2048)
        yield "ASPP branches + projection (2 launches)", "direct", aspp_direct


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50, help="calls per timed round (default 50)")
    parser.add_argument("--rounds", type=int, default=30,
                        help="timed rounds per case (default 30; the minimum is the least disturbed figure)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    import torch
    import triton

    torch.set_num_threads(1)
    stub_gpu()
    rows = []
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"]
    print(f"torch {torch.__version__}, triton {triton.__version__}, Python {sys.version.split()[0]}, "
          f"load average {' '.join(load)}")
    print(f"{'case':<42} {'path':<7} {'median µs':>10} {'min µs':>8} {'benches':>8} {'launches':>9}")
    for name, path, fn in cases(torch.float16):
        med, low, benches, launches = per_call_us(fn, args.calls, args.rounds)
        rows.append({"case": name, "path": path, "median_us": round(med, 1), "min_us": round(low, 1),
                     "benches_while_timed": benches, "launches_per_call": launches})
        print(f"{name:<42} {path:<7} {med:>10.1f} {low:>8.1f} {benches:>8} {launches:>9.2f}")
    if args.json:
        from fastdeeplab._io import atomic_path

        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps({"torch": torch.__version__, "triton": triton.__version__, "load": load,
                                       "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
