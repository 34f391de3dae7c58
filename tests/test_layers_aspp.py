"""The fused ASPP layer's replayed launch plan (Triton backend): one checked plan for both launches, replayed
while nothing it depends on changes, and dropped or rebuilt when anything does (parameters loaded, edited in
place or replaced, rates, dtype, the dispatcher, a recording dispatch mode).

Runs under TRITON_INTERPRET=1 on CPU when there is no GPU (conftest.py): tiny maps. The reference is the
layer's own cuDNN form (plain ``F.conv2d`` on the current folded weights, not the packs).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from _models import randomize_bn, rel_err  # noqa: E402
from fastdeeplab.kernels import aspp as aspp_kernels  # noqa: E402
from fastdeeplab.kernels.dispatch import Dispatcher  # noqa: E402

from fastdeeplab.layers import FusedASPP  # noqa: E402
from fastdeeplab.model import ASPP  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _head(seed: int = 0, dispatch: str | None = None) -> FusedASPP:
    torch.manual_seed(seed)
    head = FusedASPP(randomize_bn(ASPP(16, [1, 2, 3], out_channels=8), seed=seed).eval(), backend="triton").to(DEV)
    if dispatch is not None:
        head.dispatcher, head.dispatch_name = Dispatcher(dispatch, cache_path=None), "classifier.0"
    return head


def _x(seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(1, 16, 5, 6, device=DEV, dtype=dtype).contiguous(memory_format=torch.channels_last)


def _plain(head: FusedASPP, x: torch.Tensor) -> torch.Tensor:
    """The layer's cuDNN form: the current folded weights through F.conv2d, never the packs."""
    return head._project_plain([b._forward_plain(x, None) for b in head.branches], head.pooled(x))


class _Spy:
    """Counts calls of AsppLaunchPlan (the replayed forward)."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        original = aspp_kernels.AsppLaunchPlan.__call__

        def call(plan, x, pooled):
            self.calls += 1
            return original(plan, x, pooled)

        monkeypatch.setattr(aspp_kernels.AsppLaunchPlan, "__call__", call)


def _replaying(head: FusedASPP, x: torch.Tensor, spy: _Spy, what: str) -> torch.Tensor:
    """Two calls: the first (after a change) runs checked and records, the second must replay; both must
    equal the cuDNN form of the current weights."""
    before = spy.calls
    first = head(x)
    assert spy.calls == before, f"{what}: the first call after the change replayed a plan made before it"
    second = head(x)
    assert spy.calls == before + 1, f"{what}: the second call did not replay the recorded plan"
    expected = _plain(head, x)
    tol = 1e-4 if x.dtype == torch.float32 else 2e-2
    assert rel_err(first, expected) < tol and rel_err(second, expected) < tol, what
    assert torch.equal(first, second), f"{what}: replayed and checked launches differ"
    return second


@torch.no_grad()
def test_the_replay_runs_both_launches_with_new_data(monkeypatch):
    spy = _Spy(monkeypatch)
    head = _head()
    x = _x()
    _replaying(head, x, spy, "first calls")  # decided for Triton (no dispatcher): the first call records
    assert len(head._replays) == 1
    for seed in (2, 3):  # new data through the replayed plan
        x2 = _x(seed)
        before = spy.calls
        y = head(x2)
        assert spy.calls == before + 1
        assert rel_err(y, _plain(head, x2)) < 1e-4
    # an input in another layout (NCHW) or shape gets its own checked call, then its own replay
    _replaying(head, x.contiguous(), spy, "NCHW input")
    _replaying(head, _x(4)[:, :, :4, :5].contiguous(memory_format=torch.channels_last), spy, "4x5 input")
    assert len(head._replays) == 3
    # float32: the TF32 mode is part of what a replay was checked for
    with torch.backends.cudnn.flags(allow_tf32=not torch.backends.cudnn.allow_tf32):
        _replaying(head, x, spy, "TF32 mode toggled")
    precisions = {r.plan.project.consts["INPUT_PRECISION"] for r in head._replays.values()}
    assert precisions == {"ieee", "tf32"}, precisions


def _edit(name):
    """In-place edits, replacements and reloads of every parameter the packs derive from."""
    def go(head: FusedASPP, other: FusedASPP) -> None:
        if name == "load_state_dict":
            head.load_state_dict(other.state_dict())
        elif name == "load_state_dict-assign":
            head.load_state_dict(other.state_dict(), assign=True)
        elif name.startswith("branch"):  # branch<i>.<weight|bias>[=] : in place, or replaced with "="
            i, attr = int(name[6]), name.split(".")[1].rstrip("=")
            branch = head.branches[i]
            new = getattr(other.branches[i], attr).clone()
            if name.endswith("="):
                setattr(branch, attr, new)
            else:
                getattr(branch, attr).copy_(new)
        elif name.endswith("="):  # projection buffer replaced
            attr = name.rstrip("=")
            setattr(head, attr, getattr(other, attr).clone())
        else:  # projection buffer edited in place
            getattr(head, name).mul_(-0.5)
    return go


EDITS = ["load_state_dict", "load_state_dict-assign", "spatial_weight", "pooled_weight", "bias", "spatial_weight=",
         "bias=", "branch0.weight", "branch1.weight", "branch2.bias", "branch3.weight", "branch3.bias=",
         "branch1.weight="]


@torch.no_grad()
def test_every_parameter_change_drops_the_replay(monkeypatch):
    """Every kind of change the state-token tests cover (load_state_dict, in-place edits, replacements), on
    each parameter the packs derive from, while a replay is live: the next call is checked, uses the new
    values, and records a new replay."""
    spy = _Spy(monkeypatch)
    head, other = _head(0), _head(5)
    x = _x()
    last = _replaying(head, x, spy, "first calls")
    for name in EDITS:
        _edit(name)(head, other)
        y = _replaying(head, x, spy, name)
        assert rel_err(y, last) > 1e-3, f"{name}: the output did not change (the edit must matter)"
        last = y
        other = _head(len(name))  # new values for the next edit


@torch.no_grad()
def test_rates_dtype_and_branch_swaps_drop_the_replay(monkeypatch):
    spy = _Spy(monkeypatch)
    head, x = _head(), _x()
    _replaying(head, x, spy, "first calls")
    head.set_rates((3, 1, 2))
    assert head.rates == (3, 1, 2)
    _replaying(head, x, spy, "set_rates")
    head.branches[2].relu = False  # a branch without ReLU: not groupable, so never replayed
    before = spy.calls
    y = head(x)
    head(x)
    assert spy.calls == before and rel_err(y, _plain(head, x)) < 1e-4
    head.branches[2].relu = True
    _replaying(head, x, spy, "ReLU restored")
    head.branches[1] = _head(7).branches[1]  # a child module swapped
    _replaying(head, x, spy, "branch module swapped")
    head.to(torch.bfloat16)
    _replaying(head, x.to(torch.bfloat16), spy, ".to(bfloat16)")


@torch.no_grad()
def test_dispatcher_and_recording_modes_bypass_the_replay(monkeypatch):
    from test_dispatch import OpLog

    spy = _Spy(monkeypatch)
    head, x = _head(dispatch="triton"), _x()
    _replaying(head, x, spy, "first calls, dispatch='triton'")
    # a Python dispatch mode sees the fastdeeplab ops, not a replay
    log = OpLog()
    before = spy.calls
    with log:
        head(x)
    assert spy.calls == before
    assert any(op.startswith("fastdeeplab.aspp_branches") for op in log.ops), log.ops
    assert any(op.startswith("fastdeeplab.aspp_project") for op in log.ops), log.ops
    # forced Triton: a failing replay names the layer and the way out
    replay = next(iter(head._replays.values()))
    monkeypatch.setattr(aspp_kernels.AsppLaunchPlan, "__call__", lambda plan, x, pooled: 1 / 0)
    with pytest.raises(RuntimeError, match=r"layer classifier\.0: the Triton kernel failed on aspp_branches .*"
                                           r"aspp_project .*ZeroDivisionError.*dispatch='auto' would fall back"):
        head(x)
    assert replay.forced
    # another dispatcher (here: everything on cuDNN) is not served by the old replay
    monkeypatch.undo()
    head.dispatcher = Dispatcher("cudnn", cache_path=None)
    spy = _Spy(monkeypatch)
    y = head(x)
    head(x)
    assert spy.calls == 0 and torch.equal(y, _plain(head, x))


REPLAY_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import host_overhead as h
h.stub_gpu()
import torch
from fastdeeplab.kernels import aspp
from fastdeeplab.layers import FusedASPP
from fastdeeplab.model import ASPP

replayed = [0]
original = aspp.AsppLaunchPlan.__call__
def call(plan, x, pooled):
    replayed[0] += 1
    return original(plan, x, pooled)
aspp.AsppLaunchPlan.__call__ = call
torch.manual_seed(0)
head = FusedASPP(ASPP(64, [2, 3, 5], out_channels=32).eval(), backend="triton").half().eval()
x = torch.randn(1, 64, 9, 9, dtype=torch.float16).to(memory_format=torch.channels_last)
steps, kept = [], []
def step(name):
    head(x)
    kept.extend(head._replays.values())  # alive, so no later object reuses their ids
    steps.append(dict(h.COUNTS, name=name, replayed=replayed[0], replays=[id(r) for r in head._replays.values()]))
for i in range(4):
    step(f"call {i}")
with torch.no_grad():
    head.branches[3].bias.add_(1.0)
step("after an in-place edit")
step("again")
print(json.dumps(steps))
"""


def test_compiled_path_replays_two_launches_and_no_tuning():
    """Compiled-kernel path (no interpreter; launch and Triton's benchmark stubbed as in
    scripts/host_overhead.py): the first call tunes and records, every later call is the replay with exactly
    two launches and no benchmark; an in-place edit records a new replay without re-tuning."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", REPLAY_CHILD, str(root / "scripts")], capture_output=True,
                          text=True, env=env, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads(proc.stdout.strip().splitlines()[-1])
    launches = [s["launches"] for s in steps]
    benches = [s["benches"] for s in steps]
    assert launches == [2, 4, 6, 8, 10, 12], launches
    assert benches[0] > 0 and benches == [benches[0]] * 6, benches  # tuned once, on the first call
    assert [s["replayed"] for s in steps] == [0, 1, 2, 3, 3, 4], steps
    first, edited = steps[3]["replays"], steps[4]["replays"]
    assert len(first) == len(edited) == 1 and first != edited, "the edit must replace the replay"
