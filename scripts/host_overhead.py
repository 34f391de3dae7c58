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
(on a shared machine the minimum is the least disturbed), and the median of the same rounds in this thread's
CPU time (``time.thread_time``: time the process spent preempted is not in it), after a warm-up of three
calls per problem. ``benches`` counts the stubbed autotune benchmarks during the timed calls (0: nothing
re-tuned), ``launches`` the stubbed kernel launches per timed call (1 per conv, 2 per ASPP: nothing skipped,
nothing repeated).

``--baseline REV`` times the package as it was at git revision ``REV`` in the same process, interleaved with
the working tree's, round by round and case by case (the order alternating every round): ``git archive`` of
its ``fastdeeplab/`` and ``kernels/`` is loaded as a second package, ``fastdeeplab_baseline``, whose custom ops
are registered under that namespace instead of ``fastdeeplab`` (the one line of its ``kernels/ops.py`` that
names it is rewritten; its few absolute ``fastdeeplab.`` imports, of ``_io`` and ``timing``, get the working
tree's).

    python scripts/host_overhead.py [--calls 20] [--rounds 100] [--baseline REV] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the compiled-kernel path; must happen before triton is imported

COUNTS = {"launches": 0, "benches": 0}
ROOT = Path(__file__).resolve().parents[1]
BASELINE = "fastdeeplab_baseline"


def stub_gpu(package: str = "fastdeeplab") -> None:
    """Replace the GPU launch and Triton's autotune benchmark by counters, and let CPU tensors through the
    launchers' device checks; the custom ops' CPU kernel becomes the launcher (as on CUDA). ``package``: the
    package whose kernels are stubbed (call once per package; the Triton stubs are shared)."""
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

    _utils, aspp, conv, ops = (importlib.import_module(f"{package}.kernels.{m}")
                               for m in ("_utils", "aspp", "conv", "ops"))

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


def cases(dtype, package: str = "fastdeeplab") -> list:
    """``(case, path, fn)`` for each timed call, built from ``package``'s modules."""
    import torch
    from torch import nn

    aspp = importlib.import_module(f"{package}.kernels.aspp")
    conv_bn_relu_packed = importlib.import_module(f"{package}.kernels.conv").conv_bn_relu_packed
    Dispatcher = importlib.import_module(f"{package}.kernels.dispatch").Dispatcher
    layers = importlib.import_module(f"{package}.layers")
    ASPP = importlib.import_module(f"{package}.model").ASPP

    cl = torch.channels_last
    dispatcher = Dispatcher("triton", cache_path=None)
    torch.manual_seed(0)

    def fused(cin, cout, k, dilation=1):
        conv = nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False)
        m = layers.FusedConvBNReLU(conv, nn.BatchNorm2d(cout).eval(), relu=True, backend="triton").to(dtype)
        m.dispatcher, m.dispatch_name = dispatcher, f"conv{k}x{k}"
        return m

    x512 = torch.randn(1, 512, 33, 33, dtype=dtype).to(memory_format=cl)
    x2048 = torch.randn(1, 2048, 33, 33, dtype=dtype).to(memory_format=cl)
    res = torch.randn(1, 1024, 33, 33, dtype=dtype).to(memory_format=cl)
    c3, c1 = fused(512, 512, 3, dilation=2), fused(256, 1024, 1)
    x256 = torch.randn(1, 256, 33, 33, dtype=dtype).to(memory_format=cl)
    head = layers.FusedASPP(ASPP(2048, [6, 12, 18]).eval(), backend="triton").to(dtype).eval()
    head.dispatcher, head.dispatch_name = dispatcher, "aspp"
    pooled_result = torch.randn(1, 256, dtype=dtype)
    head.pooled = lambda x: pooled_result  # a torch reduction that would run on the CPU here: precomputed
    for b in head.branches:
        b.dispatcher = dispatcher
    branches = torch.empty(4, 256, 33, 33, dtype=dtype).to(memory_format=cl).chunk(4)
    pooled = torch.randn(1, 256, dtype=dtype)

    def aspp_direct():
        aspp.aspp_branches_packed(x2048, head._branch_packed, head._branch_bias32, [6, 12, 18])
        return aspp.aspp_project_packed(list(branches), pooled, head._packed, head._bias32)

    return [
        ("conv 3x3 512->512 d2, x[1,512,33,33]", "op", lambda: c3(x512)),
        ("conv 3x3 512->512 d2, x[1,512,33,33]", "direct", lambda: conv_bn_relu_packed(
            x512, c3._packed, c3._bias32, kernel_size=3, padding=2, dilation=2)),
        ("conv 1x1 256->1024 + residual", "op", lambda: c1(x256, res)),
        ("conv 1x1 256->1024 + residual", "direct", lambda: conv_bn_relu_packed(
            x256, c1._packed, c1._bias32, kernel_size=1, residual=res)),
        ("ASPP branches + projection (2 launches)", "op", lambda: head(x2048)),
        ("ASPP branches + projection (2 launches)", "direct", aspp_direct),
    ]


def load_baseline(rev: str, into: Path) -> str:
    """Extract ``fastdeeplab/`` and ``kernels/`` of git revision ``rev`` into ``into`` as the package
    ``fastdeeplab_baseline`` (its ops under that namespace), importable from there; returns the package name."""
    archive = into / "baseline.tar"
    try:
        with archive.open("wb") as f:
            subprocess.run(["git", "-C", str(ROOT), "archive", rev, "fastdeeplab", "kernels"], stdout=f, check=True,
                           stderr=subprocess.PIPE)
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"--baseline {rev}: git archive failed: {exc.stderr.decode().strip()}") from None
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    package = into / BASELINE
    (into / "fastdeeplab").rename(package)
    (into / "kernels").rename(package / "kernels")
    ops = package / "kernels" / "ops.py"
    text = ops.read_text(encoding="utf-8")
    line = 'NAMESPACE = "fastdeeplab"'
    if text.count(line) != 1:
        raise SystemExit(f"--baseline {rev}: its kernels/ops.py does not name its op namespace as {line!r}")
    ops.write_text(text.replace(line, f'NAMESPACE = "{BASELINE}"'), encoding="utf-8")
    sys.path.insert(0, str(into))
    return BASELINE


def measure(variants: dict, calls: int, rounds: int) -> list[dict]:
    """Rows per case and variant: wall-clock median and minimum and thread-CPU median of the per-round means
    (µs per call), benchmarks during the timed calls, launches per timed call. Rounds run every case of every
    variant in turn, the variants' order alternating each round."""
    import torch

    names = list(variants)
    n_cases = len(next(iter(variants.values())))
    wall = {(v, i): [] for v in names for i in range(n_cases)}
    cpu = {(v, i): [] for v in names for i in range(n_cases)}
    counts = {(v, i): [0, 0] for v in names for i in range(n_cases)}
    with torch.inference_mode():
        for v in names:
            for _, _, fn in variants[v]:
                for _ in range(3):  # the fused ASPP records its launch plan on its first decided call
                    fn()
        for r in range(rounds):
            for i in range(n_cases):
                for v in (names if r % 2 == 0 else names[::-1]):
                    fn = variants[v][i][2]
                    benches, launches = COUNTS["benches"], COUNTS["launches"]
                    c0, t0 = time.thread_time(), time.perf_counter()
                    for _ in range(calls):
                        fn()
                    t1, c1 = time.perf_counter(), time.thread_time()
                    wall[(v, i)].append((t1 - t0) / calls * 1e6)
                    cpu[(v, i)].append((c1 - c0) / calls * 1e6)
                    counts[(v, i)][0] += COUNTS["benches"] - benches
                    counts[(v, i)][1] += COUNTS["launches"] - launches
    rows = []
    for i in range(n_cases):
        for v in names:
            case, path, _ = variants[v][i]
            w = wall[(v, i)]
            rows.append({"case": case, "path": path, "variant": v, "median_us": round(statistics.median(w), 1),
                         "min_us": round(min(w), 1), "cpu_median_us": round(statistics.median(cpu[(v, i)]), 1),
                         "benches_while_timed": counts[(v, i)][0],
                         "launches_per_call": counts[(v, i)][1] / (calls * rounds)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20, help="calls per timed round (default 20)")
    parser.add_argument("--rounds", type=int, default=100,
                        help="timed rounds per case (default 100; the minimum is the least disturbed figure)")
    parser.add_argument("--baseline", metavar="REV",
                        help="also time the package at this git revision, interleaved in this process")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.rounds < 1:
        parser.error("--calls and --rounds must be >= 1")
    if args.json:
        from fastdeeplab._io import check_output_path

        try:
            check_output_path(args.json, what="--json")
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
    import torch
    import triton

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="host_overhead.") as tmp:
        packages = {"working tree": "fastdeeplab"}
        if args.baseline:
            packages = {args.baseline: load_baseline(args.baseline, Path(tmp)), **packages}
        for package in packages.values():
            stub_gpu(package)
        load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"]
        rows = measure({v: cases(torch.float16, p) for v, p in packages.items()}, args.calls, args.rounds)
        load_end = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"]
    print(f"torch {torch.__version__}, triton {triton.__version__}, Python {sys.version.split()[0]}, "
          f"load average {' '.join(load)} (start), {' '.join(load_end)} (end); {args.rounds} rounds of "
          f"{args.calls} calls")
    width = max(len(v) for v in packages)
    print(f"{'case':<42} {'path':<7} {'code':<{width}} {'median µs':>10} {'min µs':>8} {'cpu µs':>7} "
          f"{'benches':>8} {'launches':>9}")
    for r in rows:
        print(f"{r['case']:<42} {r['path']:<7} {r['variant']:<{width}} {r['median_us']:>10.1f} {r['min_us']:>8.1f} "
              f"{r['cpu_median_us']:>7.1f} {r['benches_while_timed']:>8} {r['launches_per_call']:>9.2f}")
    if args.json:
        from fastdeeplab._io import atomic_path

        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps({"torch": torch.__version__, "triton": triton.__version__, "load": load,
                                       "load_end": load_end, "calls": args.calls, "rounds": args.rounds,
                                       "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
