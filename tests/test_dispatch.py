"""Per-layer dispatch (kernels/dispatch.py) with an injected timer, the fused residual on the Triton backend,
and the custom ops under torch.export / torch._dynamo (CPU, TRITON_INTERPRET=1 from conftest.py)."""

from __future__ import annotations

import json

import pytest
import torch
from _models import randomize_bn, rel_err
from fastdeeplab.kernels.dispatch import CACHE_ENV, Dispatcher, default_cache_path, environment_key
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastdeeplab

HAS_TRITON = pytest.importorskip is not None and __import__("importlib").util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed: pip install 'fastdeeplab[triton]'")


class FakeTimer:
    """``timer(fn) -> µs``: runs fn once and answers from a script, recording the calls."""

    def __init__(self, *answers: float) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self, fn) -> float:
        fn()
        self.calls += 1
        return self.answers.pop(0)


# ---------------------------------------------------------------------------------------------------
# The decision logic and its cache file
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("triton_us, cudnn_us, choice", [(10.0, 20.0, "triton"), (30.0, 20.0, "cudnn"),
                                                         (20.0, 20.0, "triton")])
def test_auto_keeps_the_faster_and_persists(tmp_path, triton_us, cudnn_us, choice):
    path = tmp_path / "dispatch.json"
    ran = []
    d = Dispatcher("auto", timer=FakeTimer(triton_us, cudnn_us), cache_path=path)
    got = d.choose("layer1.0.conv2", "k3 | x[1,64,33,33]", lambda: ran.append("t"), lambda: ran.append("c"),
                   device_type="cuda")
    assert got == choice and ran == ["t", "c", "t", "c"]  # checked against each other once, then timed
    assert d.choose("layer1.1.conv2", "k3 | x[1,64,33,33]", None, None, device_type="cuda") == choice  # no timing
    data = json.loads(path.read_text())
    (env, section), = data["envs"].items()
    assert env == environment_key(None) and section["k3 | x[1,64,33,33]"]["choice"] == choice
    # a new process (a new Dispatcher) reads the decision instead of timing
    timer = FakeTimer()
    d2 = Dispatcher("auto", timer=timer, cache_path=path)
    assert d2.choose("layer1.0.conv2", "k3 | x[1,64,33,33]", None, None, device_type="cuda") == choice
    assert timer.calls == 0
    rows = d.report().rows
    assert [r["layer"] for r in rows] == ["layer1.0.conv2", "layer1.1.conv2"]
    assert rows[0]["triton_us"] == triton_us and rows[0]["cudnn_us"] == cudnn_us and rows[0]["choice"] == choice
    table = d.report().table()
    assert "triton µs" in table and "layer1.1.conv2" in table and choice in table


def test_corrupt_cache_is_ignored_with_a_warning_and_rebuilt(tmp_path):
    path = tmp_path / "dispatch.json"
    path.write_text("{not json")
    d = Dispatcher("auto", timer=FakeTimer(1.0, 2.0), cache_path=path)
    with pytest.warns(RuntimeWarning, match="unreadable dispatch cache"):
        assert d.choose("l", "key", lambda: None, lambda: None, device_type="cuda") == "triton"
    assert json.loads(path.read_text())["envs"][environment_key(None)]["key"]["choice"] == "triton"


def test_forced_modes_and_errors(tmp_path):
    for mode in ("triton", "cudnn"):
        d = Dispatcher(mode, timer=FakeTimer(), cache_path=tmp_path / "x.json")
        assert d.choose("l", "k", None, None, device_type="cuda") == mode and d.decided("k") == mode
        assert not (tmp_path / "x.json").exists()
    with pytest.raises(ValueError, match="dispatch must be one of"):
        Dispatcher("fastest")
    # CPU (the interpreter) without an injected timer: checked, not timed, nothing written
    d = Dispatcher("auto", cache_path=tmp_path / "y.json")
    one = torch.ones(3)
    assert d.choose("l", "k", lambda: one, lambda: one, device_type="cpu") == "triton" and d.decided("k") == "triton"
    assert d.report().rows[0]["reason"] == "untimed" and not (tmp_path / "y.json").exists()


def _boom():
    raise RuntimeError("out of resource: shared memory, Required: 232448, Hardware limit: 232448")


@pytest.mark.parametrize("device_type, timer", [("cpu", None), ("cuda", "fake")], ids=["cpu-untimed", "cuda-timed"])
def test_a_raising_triton_side_falls_back_to_cudnn_with_one_warning(tmp_path, device_type, timer):
    path = tmp_path / "dispatch.json"
    timer = FakeTimer(1.0, 2.0) if timer else None
    d = Dispatcher("auto", timer=timer, cache_path=path)
    y = torch.ones(2, 3)
    with pytest.warns(RuntimeWarning) as record:
        assert d.choose("backbone.layer4.0.conv2", "conv3x3 | x[1,512,33,33]", _boom, lambda: y,
                        device_type=device_type) == "cudnn"
        assert d.choose("backbone.layer4.1.conv2", "conv3x3 | x[1,512,33,33]", _boom, lambda: y,
                        device_type=device_type) == "cudnn"  # decided: no second run, no second warning
    assert len(record) == 1, [str(w.message) for w in record]
    message = str(record[0].message)
    assert "backbone.layer4.0.conv2" in message and "conv3x3 | x[1,512,33,33]" in message
    assert "RuntimeError" in message and "out of resource" in message and "\n" not in message
    row = d.report().rows[0]
    assert row["choice"] == "cudnn" and "raised RuntimeError" in row["reason"]
    assert "reason" in d.report().table().splitlines()[0]
    if timer is not None:
        assert timer.calls == 0, "nothing is timed once the Triton side failed"
        saved = json.loads(path.read_text())["envs"][environment_key(None)]["conv3x3 | x[1,512,33,33]"]
        assert saved["choice"] == "cudnn" and "out of resource" in saved["reason"]
        d2 = Dispatcher("auto", timer=FakeTimer(), cache_path=path)  # a new process: no retry, no warning
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert d2.choose("l", "conv3x3 | x[1,512,33,33]", _boom, None, device_type="cuda") == "cudnn"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_wrong_triton_output_falls_back_to_cudnn_whatever_the_timing(tmp_path, dtype):
    ref = torch.randn(2, 8, 5, 5).to(dtype)
    wrong = ref.clone()
    wrong[1, 3, 2, 2] += 0.5 * float(ref.abs().max()) + 1.0  # one element off
    timer = FakeTimer(1.0, 100.0)  # Triton "faster" by 100x
    d = Dispatcher("auto", timer=timer, cache_path=tmp_path / "d.json")
    with pytest.warns(RuntimeWarning, match=r"layer aspp.*disagrees with cuDNN \(1/400 elements"):
        assert d.choose("aspp", "aspp_project | x[2,8,5,5]", lambda: wrong, lambda: ref, device_type="cuda") == "cudnn"
    assert timer.calls == 0
    # within the tolerance (rounding-level differences), lists of tensors, NaN where the reference has NaN
    close = ref.double() * (1 + 0.25 * __import__("fastdeeplab.kernels._utils", fromlist=["x"]).kernel_tolerance(dtype)[1])
    with_nan = ref.clone()
    with_nan[0, 0, 0, 0] = float("nan")
    d = Dispatcher("auto", timer=FakeTimer(1.0, 2.0), cache_path=None)
    assert d.choose("a", "k", lambda: [close.to(dtype), with_nan], lambda: [ref, with_nan.clone()],
                    device_type="cuda") == "triton"
    assert d.report().rows[0]["reason"] == "faster"


def test_outputs_mismatch_names_the_difference():
    from fastdeeplab.kernels.dispatch import outputs_mismatch

    a = torch.zeros(2, 3)
    assert outputs_mismatch(a, a.clone()) == "" and outputs_mismatch([a, a], (a, a)) == ""
    assert "shape [2, 3] against [3, 2]" in outputs_mismatch(a, torch.zeros(3, 2))
    assert "dtype" in outputs_mismatch(a, a.half())
    assert "2 outputs against 1" in outputs_mismatch([a, a], a)
    nan = a.clone()
    nan[0, 0] = float("nan")
    assert "NaN at 1 elements" in outputs_mismatch(nan, a) and outputs_mismatch(nan, nan.clone()) == ""
    inf = a.clone()
    inf[1, 1] = float("inf")
    assert "inf" in outputs_mismatch(-inf, inf) and outputs_mismatch(inf, inf.clone()) == ""
    assert "against NoneType" in outputs_mismatch(a, None)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "list-section", "list-envs", "directory"])
def test_an_unsafe_cache_file_is_a_warning_and_a_rebuild_never_a_hang(tmp_path, kind):
    import os

    path = tmp_path / "dispatch.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "list-section":
        path.write_text(json.dumps({"format": 1, "envs": {environment_key(None): [1, 2]}}))
    elif kind == "list-envs":
        path.write_text(json.dumps({"format": 1, "envs": []}))
    else:
        path.mkdir()
    y = torch.ones(2)
    d = Dispatcher("auto", timer=FakeTimer(1.0, 2.0), cache_path=path)
    with pytest.warns(RuntimeWarning, match="dispatch cache"):
        assert d.choose("l", "key", lambda: y, lambda: y, device_type="cuda") == "triton"
    assert d.decided("key") == "triton"
    if kind in ("list-section", "list-envs"):  # replaced by a good file
        assert json.loads(path.read_text())["envs"][environment_key(None)]["key"]["choice"] == "triton"
    else:  # never replaced by a write either (atomic_path refuses): the decision stays in memory
        assert not path.is_file()


def test_concurrent_writers_lose_no_decision(tmp_path):
    """Four processes decide 8 keys each into one cache file at once: all 32 decisions are there."""
    import subprocess
    import sys

    path = tmp_path / "dispatch.json"
    code = (
        "import sys, torch\n"
        "from fastdeeplab.kernels.dispatch import Dispatcher\n"
        "y = torch.ones(1)\n"
        "for i in range(8):\n"
        "    d = Dispatcher('auto', timer=lambda fn: 1.0, cache_path=sys.argv[1])\n"
        "    d.choose('l', f'p{sys.argv[2]} k{i}', lambda: y, lambda: y, device_type='cuda')\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(p)]) for p in range(4)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    section = json.loads(path.read_text())["envs"][environment_key(None)]
    assert sorted(section) == sorted(f"p{p} k{i}" for p in range(4) for i in range(8))


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere"))
    assert default_cache_path() == tmp_path / "elsewhere" / "dispatch.json"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_path() == tmp_path / "xdg" / "fastdeeplab" / "dispatch.json"


# ---------------------------------------------------------------------------------------------------
# Fused modules on the Triton backend
# ---------------------------------------------------------------------------------------------------
class OpLog(TorchDispatchMode):
    """Top-level ops a forward issues (a custom op's own implementation runs below the mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _bottleneck(cin=16, width=8, stride=1):
    from torchvision.models.resnet import Bottleneck

    down = None
    if stride != 1 or cin != width * 4:
        down = nn.Sequential(nn.Conv2d(cin, width * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(width * 4))
    return randomize_bn(Bottleneck(cin, width, stride=stride, downsample=down)).eval()


@needs_triton
@pytest.mark.parametrize("cin, stride", [(32, 1), (16, 2)], ids=["identity", "downsample-s2"])
@torch.no_grad()
def test_bottleneck_residual_runs_in_the_epilogue(cin, stride):
    """No separate add/ReLU pass: a bottleneck issues only fastdeeplab ops, and equals the unfused unit."""
    from fastdeeplab.layers import FusedBottleneck

    unit = _bottleneck(cin, 8, stride)
    fused = FusedBottleneck(unit, backend="triton")
    x = torch.randn(2, cin, 9, 11).contiguous(memory_format=torch.channels_last)
    fused(x)  # the first call packs the weights once
    with OpLog() as log:
        y = fused(x)
    assert rel_err(y, unit(x)) < 1e-4
    assert all(op.startswith("fastdeeplab.conv2d_act") for op in log.ops), log.ops
    assert len(log.ops) == 3 + (unit.downsample is not None)


@needs_triton
@torch.no_grad()
def test_dispatch_sends_a_layer_to_cudnn_with_identical_semantics(tmp_path):
    """A timer that says cuDNN is faster: the layer runs F.conv2d + bias + residual + ReLU, same result."""
    from fastdeeplab.layers import FusedConvBNReLU

    conv, bn = nn.Conv2d(12, 20, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(20)
    randomize_bn(nn.Sequential(bn))
    x = torch.randn(1, 12, 9, 10).contiguous(memory_format=torch.channels_last)
    res = torch.randn(1, 20, 9, 10).contiguous(memory_format=torch.channels_last)
    outs = {}
    for choice, answers in (("triton", (1.0, 2.0)), ("cudnn", (2.0, 1.0))):
        layer = FusedConvBNReLU(conv, bn.eval(), relu=True, backend="triton")
        layer.dispatcher = Dispatcher("auto", timer=FakeTimer(*answers), cache_path=tmp_path / f"{choice}.json")
        layer.dispatch_name = "layer"
        with OpLog() as log:
            outs[choice] = layer(x, residual=res)
        assert layer.dispatcher.report().rows[0]["choice"] == choice
        kernel_calls = sum(op.startswith("fastdeeplab.conv2d_act") for op in log.ops)
        assert kernel_calls == 2  # the checked call (its output is reused when Triton wins) + the timed one
        assert any("convolution" in op for op in log.ops)
    assert rel_err(outs["triton"], outs["cudnn"]) < 1e-5


def _layer(dispatch, tmp_path=None):
    from fastdeeplab.layers import FusedConvBNReLU

    conv, bn = nn.Conv2d(12, 20, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(20)
    randomize_bn(nn.Sequential(bn))
    layer = FusedConvBNReLU(conv, bn.eval(), relu=True, backend="triton")
    layer.dispatcher = Dispatcher(dispatch, cache_path=None)
    layer.dispatch_name = "backbone.layer3.0.conv2"
    return layer


@needs_triton
@pytest.mark.parametrize("fault", ["raises", "wrong-values"])
@torch.no_grad()
def test_a_faulty_kernel_in_a_layer_falls_back_to_cudnn(fault):
    """Under the interpreter (no timing): a kernel that raises, or returns wrong values, is replaced by cuDNN
    on the first call with one warning, and the layer's output is the right one."""
    layer = _layer("auto")
    x = torch.randn(1, 12, 9, 10).contiguous(memory_format=torch.channels_last)
    expected = layer._forward_plain(x, None)
    if fault == "raises":
        layer._packed = torch.zeros(5, 20)  # the launcher refuses it
    else:
        layer._packed.mul_(-1)  # a kernel computing the wrong thing
    with pytest.warns(RuntimeWarning, match="layer backbone.layer3.0.conv2 runs cuDNN") as record:
        y = layer(x)
        y2 = layer(x)
    assert len(record) == 1
    assert torch.equal(y, expected) and torch.equal(y2, expected)
    row = layer.dispatcher.report().rows[0]
    assert row["choice"] == "cudnn"
    assert ("raised ValueError" if fault == "raises" else "disagrees with cuDNN") in row["reason"]


@needs_triton
@torch.no_grad()
def test_forced_triton_raises_naming_the_layer():
    layer = _layer("triton")
    layer._packed = torch.zeros(5, 20)
    x = torch.randn(1, 12, 9, 10).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match=r"layer backbone.layer3.0.conv2: the Triton kernel failed .*"
                                           r"dispatch='auto' would fall back to cuDNN"):
        layer(x)
    assert layer.dispatcher.report().rows[0]["reason"] == "forced"


@needs_triton
def test_stem_always_runs_on_cudnn():
    from fastdeeplab.layers import FusedConvBNReLU

    layer = FusedConvBNReLU(nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False), None, backend="triton")
    with OpLog() as log, torch.no_grad():
        layer(torch.randn(1, 3, 17, 17))
    assert not any(op.startswith("fastdeeplab") for op in log.ops)


# ---------------------------------------------------------------------------------------------------
# optimize(dispatch=...), the report, torch.export and torch._dynamo
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_bn(fastdeeplab.deeplabv3_resnet50(num_classes=3, output_stride=16)).eval()


@needs_triton
def test_optimize_dispatch_argument(model):
    with pytest.raises(ValueError, match="dispatch must be one of"):
        fastdeeplab.optimize(model, backend="triton", dtype=torch.float32, dispatch="fast")
    fast = fastdeeplab.optimize(model, backend="triton", dtype=torch.float32, dispatch="cudnn")
    assert fast.dispatcher.mode == "cudnn"
    from fastdeeplab.layers import FusedASPP, FusedConvBNReLU

    fused = [m for m in fast.modules() if isinstance(m, (FusedConvBNReLU, FusedASPP))]
    assert all(m.dispatcher is fast.dispatcher for m in fused)
    names = {m.dispatch_name for m in fused}
    assert "backbone.layer1.0.conv1" in names and "classifier.0" in names
    with pytest.raises(ValueError, match="dispatch reports exist on the triton backend"):
        fastdeeplab.optimize(model, backend="torch").dispatch_report()


@needs_triton
@torch.no_grad()
def test_report_after_a_forward_pass(model, tmp_path):
    """dispatch="cudnn" runs every layer in its cuDNN form (fast on the interpreter) and still equals the
    original; the report has a row per fused layer and problem."""
    fast = fastdeeplab.optimize(model, backend="triton", dtype=torch.float32, dispatch="cudnn")
    x = torch.randn(1, 3, 33, 35)
    assert rel_err(fast(x)["out"], model(x)["out"]) < 1e-4
    rows = fast.dispatch_report().rows
    layers = [r["layer"] for r in rows]
    assert "backbone.layer4.2.conv3" in layers and "classifier.0" in layers
    assert any(r["key"].startswith("aspp_branches") for r in rows) and all(r["choice"] == "cudnn" for r in rows)
    assert "backbone.conv1" not in layers, "the stem never dispatches"
    assert "cuDNN µs" in str(fast.dispatch_report())


@needs_triton
def test_export_and_dynamo_keep_the_fastdeeplab_ops(model):
    """torch.export gives a graph holding the fastdeeplab ops (no F.conv2d detour), and dynamo finds no break."""
    fast = fastdeeplab.optimize(model, backend="triton", dtype=torch.float32)
    x = torch.randn(1, 3, 33, 33).contiguous(memory_format=torch.channels_last)
    program = torch.export.export(fast, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    ours = [t for t in targets if t.startswith("fastdeeplab.")]
    assert sum(t.startswith("fastdeeplab.conv2d_act") for t in ours) >= 50, ours
    assert any(t.startswith("fastdeeplab.aspp_branches") for t in ours)
    assert any(t.startswith("fastdeeplab.aspp_project") for t in ours)
    plain = [t for t in targets if "conv" in t and not t.startswith("fastdeeplab.")]
    assert len(plain) == 1, f"only the stem is a plain convolution: {plain}"
    assert not any(t.startswith("aten.cat") for t in targets), "no concatenation of ASPP branches"
    explanation = torch._dynamo.explain(fast)(torch.randn(1, 3, 17, 17))
    assert explanation.graph_break_count == 0, explanation.break_reasons


# ---------------------------------------------------------------------------------------------------
# CUDA graphs: the bookkeeping, with a stand-in capture on the CPU
# ---------------------------------------------------------------------------------------------------
def test_cuda_graph_model_bookkeeping(monkeypatch):
    from fastdeeplab.cuda_graphs import CUDAGraphModel, _Captured

    class Doubler(nn.Module):
        output_stride = 16

        def forward(self, x):
            return {"out": x * 2}

        def set_output_stride(self, os_):
            self.output_stride = os_

    captures = []

    class FakeGraph:
        def __init__(self, inp, out):
            self.inp, self.out = inp, out

        def replay(self):
            self.out["out"].copy_(self.inp * 2)

    def capture(model, x, warmup):
        static_in = x.clone()
        captures.append(tuple(x.shape))
        out = model(static_in)
        return _Captured(FakeGraph(static_in, out), static_in, out)

    m = CUDAGraphModel(Doubler(), max_graphs=2, capture=capture)
    x = torch.randn(1, 3, 4, 4)
    assert torch.equal(m(x)["out"], 2 * x) and m.num_graphs == 0, "CPU inputs run eagerly"
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)), raising=False)
    a, b, c = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 5, 5), torch.randn(1, 3, 6, 6)
    ya = m(a)["out"]
    ya2 = m(a + 1)["out"]
    assert torch.equal(ya, 2 * a) and torch.equal(ya2, 2 * (a + 1)), "the first result is the caller's own"
    m(b)
    m(a)
    m(c)  # evicts b, the least recently used
    assert captures == [(1, 3, 4, 4), (1, 3, 5, 5), (1, 3, 6, 6)] and m.num_graphs == 2
    m.set_output_stride(8)
    assert m.num_graphs == 0 and m.output_stride == 8
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        CUDAGraphModel(Doubler(), warmup=0)


def test_cuda_graph_flag_needs_cuda(model):
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA model"):
        fastdeeplab.optimize(model, backend="torch", cuda_graph=True)


@needs_triton
@torch.no_grad()
def test_a_changed_relu_flag_is_a_new_plan():
    """The plan records the kernel's arguments: after ``layer.relu`` changes, the kernel runs the new epilogue
    (a negative-heavy output tells ReLU from none), not the recorded one."""
    from fastdeeplab.kernels._utils import interpreting

    if not interpreting():
        pytest.skip("CPU tensors run the kernels only under TRITON_INTERPRET=1")
    layer = _layer("triton")
    x = torch.randn(1, 12, 9, 10).contiguous(memory_format=torch.channels_last)
    assert rel_err(layer(x), layer._forward_plain(x, None)) < 1e-5
    layer.relu = False
    out = layer(x)
    assert (out < 0).any() and rel_err(out, layer._forward_plain(x, None)) < 1e-5
