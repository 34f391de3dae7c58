"""Direct calls of the public launchers tune each problem once (compiled-kernel path, launch stubbed).

Runs in a subprocess without ``TRITON_INTERPRET`` (the interpreter has one config and never tunes): the GPU
launch (``JITFunction.run``) and Triton's benchmark (``Autotuner._bench``) are counters
(``scripts/host_overhead.py``'s ``stub_gpu``), and CPU tensors stand in for CUDA ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton")

CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import host_overhead as h
h.stub_gpu()
import torch
from fastdeeplab.kernels.aspp import aspp_branches_packed, aspp_project_packed
from fastdeeplab.kernels.conv import conv_bn_relu, conv_bn_relu_packed, pack_weight
from fastdeeplab.kernels.depthwise import depthwise_conv_act_packed, pack_depthwise_weight

cl = torch.channels_last
def t(*shape):
    return torch.randn(*shape, dtype=torch.float16).to(memory_format=cl) if len(shape) == 4 else torch.randn(*shape, dtype=torch.float16)
x, x2 = t(1, 256, 33, 33), t(8, 256, 33, 33)
w3 = torch.randn(256, 256, 3, 3, dtype=torch.float16)
p3, p1 = pack_weight(w3), pack_weight(torch.randn(512, 256, 1, 1, dtype=torch.float16))
bias = torch.randn(256)
pb, pbias = torch.randn(28 * 256, 64, dtype=torch.float16), torch.randn(4 * 64)
branches = [t(1, 64, 33, 33) for _ in range(4)]
pp, pbias2 = torch.randn(5 * 64, 128, dtype=torch.float16), torch.randn(128)
pooled = torch.randn(1, 64, dtype=torch.float16)
xd, pd, bd = t(1, 96, 33, 33), pack_depthwise_weight(torch.randn(96, 1, 5, 5, dtype=torch.float16)), torch.randn(96)
sums, scale = torch.zeros(1, 96), torch.rand(1, 96, dtype=torch.float16)
cases = {
    "conv_bn_relu 3x3": lambda: conv_bn_relu(x, w3, bias, padding=2, dilation=2),
    "conv_bn_relu_packed 3x3": lambda: conv_bn_relu_packed(x, p3, bias, kernel_size=3, padding=6, dilation=6),
    "conv_bn_relu_packed 3x3 batch 8": lambda: conv_bn_relu_packed(x2, p3, bias, kernel_size=3, padding=6, dilation=6),
    "conv_bn_relu_packed 1x1": lambda: conv_bn_relu_packed(x, p1, None, kernel_size=1),
    "aspp_branches_packed": lambda: aspp_branches_packed(x, pb, pbias, [6, 12, 18]),
    "aspp_project_packed": lambda: aspp_project_packed(branches, pooled, pp, pbias2),
    # SE's two passes over one problem: the pooling pass (sums only) and the scaled pass tune separately
    "depthwise pooling pass": lambda: depthwise_conv_act_packed(xd, pd, bd, kernel_size=5, padding=4, dilation=2,
        activation="hardswish", channel_sums=sums, write_output=False),
    "depthwise scaled pass": lambda: depthwise_conv_act_packed(xd, pd, bd, kernel_size=5, padding=4, dilation=2,
        activation="hardswish", se_scale=scale),
}
out = {}
for name, fn in cases.items():
    counts = []
    for _ in range(5):
        fn()
        counts.append(dict(h.COUNTS))
    out[name] = counts
# eager launches get the autotuned kernel itself; traced ones (fake tensors, torch.compile) the wrap_triton form
from torch._subclasses.fake_tensor import FakeTensorMode
from fastdeeplab.kernels._utils import wrap_kernel
from fastdeeplab.kernels.conv import _conv_autotuned
assert wrap_kernel(_conv_autotuned, x) is _conv_autotuned
with FakeTensorMode():
    fake = torch.empty(2)
assert type(wrap_kernel(_conv_autotuned, fake)).__name__ == "TraceableTritonKernelWrapper"
print(json.dumps(out))
"""


def test_direct_launcher_calls_tune_each_problem_once():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "scripts")], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    before = {"benches": 0, "launches": 0}
    tuned = {}
    for name, counts in results.items():
        benches = [c["benches"] - before["benches"] for c in counts]
        launches = [c["launches"] - before["launches"] for c in counts]
        assert launches == [1, 2, 3, 4, 5], f"{name}: one launch per call, got {launches}"
        assert benches[1:] == [benches[0]] * 4, f"{name}: benchmarked again on a tuned problem: {benches}"
        tuned[name] = benches[0]
        before = counts[-1]
    # a problem with several configs left after the prune is benchmarked once, on its first call; a new
    # batch size (another M bucket) is another problem
    assert tuned["conv_bn_relu 3x3"] > 1 and tuned["conv_bn_relu_packed 3x3 batch 8"] > 1, tuned
    assert tuned["aspp_project_packed"] > 1, tuned
    assert tuned["depthwise pooling pass"] > 1 and tuned["depthwise scaled pass"] > 1, tuned


def test_autotune_timing_knob(monkeypatch):
    """FASTDEEPLAB_AUTOTUNE_MS="warmup,rep" sets the autotuners' benchmark; unset keeps Triton's default."""
    import triton.testing
    from fastdeeplab.kernels import _utils
    from fastdeeplab.kernels.aspp import _aspp_branches_autotuned, _aspp_project_autotuned
    from fastdeeplab.kernels.conv import _conv1x1_autotuned, _conv_autotuned

    for kernel in (_conv_autotuned, _conv1x1_autotuned, _aspp_branches_autotuned, _aspp_project_autotuned):
        assert kernel._do_bench is _utils.autotune_do_bench
    monkeypatch.delenv(_utils.AUTOTUNE_MS_ENV, raising=False)
    assert _utils.autotune_timing() is None
    calls = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep, quantiles: calls.append((warmup, rep)) or [1.0])
    monkeypatch.setenv(_utils.AUTOTUNE_MS_ENV, "5,20")
    assert _utils.autotune_timing() == (5.0, 20.0)
    assert _utils.autotune_do_bench(lambda: None, quantiles=(0.5, 0.2, 0.8)) == [1.0] and calls == [(5.0, 20.0)]
    for bad in ("5", "a,b", "5,0", "-1,20"):
        monkeypatch.setenv(_utils.AUTOTUNE_MS_ENV, bad)
        with pytest.raises(ValueError, match="FASTDEEPLAB_AUTOTUNE_MS="):
            _utils.autotune_timing()
