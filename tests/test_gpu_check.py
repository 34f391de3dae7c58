"""scripts/gpu_check.sh (issues 13, 19, 22): the plan, the dry run and the failure paths of the GPU check, on a CPU.

* ``--plan`` (no GPU): its counts agree with the kernels' real prune functions called directly, every stage's
  estimate is within its limit and the limits within 480 s;
* stage 0's builds are what the launchers launch (their arguments recorded under the interpreter);
* a stage killed mid-way keeps the rows it wrote; a CUDA error ends its stage with a ``stage_error`` row;
* ``--dry-run`` runs every stage (stage 0 building real sm_90 code) on tiny shapes under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _driver_module():
    spec = importlib.util.spec_from_file_location("gpu_check_driver", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_writes_every_stage(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself for --dry-run
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True, env=env,
                          timeout=900)
    log = (out / "gpucheck.log").read_text() if (out / "gpucheck.log").exists() else ""
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{log[-4000:]}"

    result = json.loads((out / "gpucheck.json").read_text())
    assert result["mode"].startswith("dry-run") and result["finished"]
    assert result["environment"]["versions"]["torch"]
    stages = result["stages"]
    assert list(stages) == ["precompile", "correctness", "kernels", "model"]
    assert "FASTDEEPLAB_AUTOTUNE_MS=5,20" in result["autotune"]
    for name, stage in stages.items():
        assert stage["status"] == "ok", (name, stage["status"], log[-4000:])
        assert stage["seconds"] > 0 and stage["rows"], name
        assert not [r for r in stage["rows"] if r.get("ok") is False], name

    builds = [r for r in stages["precompile"]["rows"] if r["kind"] == "build"]
    assert builds and all(r["ok"] for r in builds), builds  # real sm_90 builds, TMA one included
    assert any("USE_TMA=1" in r["config"] for r in builds)

    kinds = {r["kind"] for r in stages["correctness"]["rows"]}
    assert {"kernel", "model_check"} <= kinds
    kernel_rows = [r for r in stages["correctness"]["rows"] if r["kind"] == "kernel"]
    assert {"fp32-ieee", "fp32-tf32", "fp16", "bf16"} <= {r["dtype"] for r in kernel_rows}
    swept = {r["kernel"] for r in kernel_rows if r.get("sweep")}
    assert swept == {"conv_bn_relu", "aspp_project", "aspp_branches", "depthwise"}
    depthwise = [r for r in kernel_rows if r["kernel"] == "depthwise"]  # fp32, fp16, bf16; with and without SE
    assert {"fp32-ieee", "fp16", "bf16"} <= {r["dtype"] for r in depthwise}
    assert any(r["means_max_abs_error"] is not None for r in depthwise)
    assert any(r["means_max_abs_error"] is None for r in depthwise)
    checks = [r for r in stages["correctness"]["rows"] if r["kind"] == "model_check"]
    assert sorted(r["output_stride"] for r in checks) == [8, 16] and all(r["ok"] for r in checks)

    convs = [r for r in stages["kernels"]["rows"] if r["kind"] == "conv"]
    assert convs and all(r["triton_ms"] > 0 and r["cudnn_ms"] > 0 for r in convs)
    assert any(r["layer"] == "ASPP projection" for r in convs)
    dw = [r for r in convs if r["layer"].startswith("MobileNetV3 dw")]  # the depthwise kernel, with and without SE
    assert {r["layer"].endswith("+SE") for r in dw} == {True, False} and {r["model"] for r in dw} == {
        "mobilenet_v3_large"}
    assert all(r["triton_gbps"] > 0 and r["cudnn_gbps"] > 0 and r["triton_peak"] is None for r in dw)
    pointwise = [r for r in convs if r["layer"] == "MobileNetV3 1x1 hardswish"]  # the conv kernel's hardswish
    assert len(pointwise) == 1 and pointwise[0]["ok"]

    rows = [r for r in stages["model"]["rows"] if r["kind"] == "model"]
    timed = {(r["model"], r["output_stride"], r["impl"]) for r in rows if r.get("median_ms")}
    for model in ("tiny", "mobilenet_v3_large"):
        for output_stride in (16, 8):
            for impl in ("torchvision fp32", "torchvision bf16", "optimize triton", "optimize torch"):
                assert (model, output_stride, impl) in timed, (model, output_stride, impl)
    mobilenet = [r for r in rows if r["model"] == "mobilenet_v3_large" and r.get("median_ms")]
    assert all(r["ok"] for r in mobilenet if "ok" in r) and all(r["pixel_agreement"] > 0.9 for r in mobilenet)
    compiled = [r for r in rows if r["model"] == "mobilenet_v3_large" and r["impl"].startswith("torch.compile")]
    assert compiled and all("not planned" in r["skipped"] for r in compiled)
    graph = [r for r in rows if r["impl"] == "optimize triton + graph"]
    assert graph and all("GPU" in r["skipped"] for r in graph)  # CUDA graphs: recorded as skipped on a CPU
    assert any(r["impl"].startswith("torch.compile(eager") and r.get("median_ms") for r in rows)
    assert any(r["impl"] == "torch.compile(optimize triton)" and r.get("median_ms") for r in rows)
    dispatch = [r for r in stages["model"]["rows"] if r["kind"] == "dispatch"]
    assert dispatch and not [r for r in dispatch if "raised" in (r.get("reason") or "")], dispatch  # no fallback
    assert any(r["model"] == "mobilenet_v3_large" and "dwconv" in (r.get("key") or "") for r in dispatch)
    firsts = [r for r in stages["model"]["rows"] if r["kind"] == "model_first"]
    assert any(r["impl"] == "torch.compile(optimize triton)" for r in firsts)  # written before the timing

    md = (out / "gpucheck.md").read_text()
    for heading in ("## Stage precompile: ok", "## Stage correctness: ok", "## Stage kernels: ok",
                    "## Stage model: ok"):
        assert heading in md
    assert "----- stage model -----" in log


def test_a_stage_past_its_limit_is_killed_and_recorded(tmp_path):
    """A stage that outlives its limit is killed (its whole process group) and the next stage still runs;
    the JSON and the report say so."""
    gpu_check = _driver_module()
    gpu_check.bootstrap()
    gpu_check.GRACE_S = 0
    driver = gpu_check.Driver(tmp_path, True, ["correctness", "kernels"], "test")
    driver.result["stages"]["correctness"]["limit_s"] = 0.5  # python + torch cannot even start in that time
    driver.result["stages"]["kernels"]["limit_s"] = 0.5
    driver.result["environment"] = {"versions": {}}
    try:
        for name in ("correctness", "kernels"):
            driver.run_stage(name, tmp_path)
    finally:
        driver.log.close()
    result = json.loads((tmp_path / "gpucheck.json").read_text())
    for name in ("correctness", "kernels"):
        assert result["stages"][name]["status"].startswith("timeout"), result["stages"][name]
    assert "| correctness | timeout" in (tmp_path / "gpucheck.md").read_text()


def test_source_checkout_is_importable_without_an_install():
    """What a bare GPU machine has: this checkout and no install. The driver maps kernels/ into the package
    itself. Simulated with ``python -S`` (no site: no editable-install finder) and site-packages on the path."""
    paths = os.pathsep.join(dict.fromkeys(p for p in (sysconfig.get_paths()["purelib"],
                                                      sysconfig.get_paths()["platlib"]) if p))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import gpu_check; mode = gpu_check.bootstrap(); "
            "import fastdeeplab.kernels.conv as c; print(mode); print(c.__file__)")
    proc = subprocess.run([sys.executable, "-S", "-c", code, str(ROOT / "scripts")], capture_output=True,
                          text=True, timeout=300, cwd="/", env=dict(os.environ, PYTHONPATH=paths))
    assert proc.returncode == 0, proc.stderr[-3000:]
    mode, path = proc.stdout.strip().splitlines()[-2:]
    assert mode == "source checkout (path shim)"
    assert Path(path).resolve() == ROOT / "kernels" / "conv.py"


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------
def _no_interpreter_env() -> dict[str, str]:
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    """``bash scripts/gpu_check.sh --plan`` run once (a subprocess: the plan needs compiled, not interpreted,
    kernels, and this process imported them under the interpreter)."""
    out = tmp_path_factory.mktemp("plan")
    proc = subprocess.run(["bash", str(SCRIPT), "--plan", str(out)], capture_output=True, text=True,
                          env=_no_interpreter_env(), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| kernels |" in proc.stdout and "compile_s" in proc.stdout  # the table and the unit costs
    return json.loads((out / "gpucheck.plan.json").read_text())


def _prune_directly(launch: dict) -> int:
    """The configs the kernels' own early prune keeps for ``launch`` on an sm_90 GPU, with the named arguments
    built here from the geometry (not by gpucheck.launches), in a subprocess without the interpreter."""
    code = r"""
import json, sys
from unittest import mock
import torch
import fastdeeplab.kernels.aspp as aspp
import fastdeeplab.kernels.conv as conv
import fastdeeplab.kernels.depthwise as dw
L = json.loads(sys.argv[1])
x = torch.empty(1, dtype={"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[L["dtype"]])
n, h, w = L["n"], L["h"], L["w"]
if L["kernel"] == "conv":
    k, s, p, d = L["k"], L["stride"], L["padding"], L["dilation"]
    oh, ow = (h + 2 * p - d * (k - 1) - 1) // s + 1, (w + 2 * p - d * (k - 1) - 1) // s + 1
    tuner = conv._conv1x1_autotuned if k == 1 else conv._conv_autotuned
    args = dict(x_ptr=x, N=n, H=h, W=w, C_IN=L["cin"], C_OUT=L["cout"], OH=oh, OW=ow, KH=k, KW=k, STRIDE_H=s,
                STRIDE_W=s, PAD_H=p, PAD_W=p, DIL_H=d, DIL_W=d, DEVICE_KEY=0)
elif L["kernel"] == "depthwise":
    k, s, p, d = L["k"], L["stride"], L["padding"], L["dilation"]
    oh, ow = (h + 2 * p - d * (k - 1) - 1) // s + 1, (w + 2 * p - d * (k - 1) - 1) // s + 1
    tuner = dw._depthwise_autotuned
    args = dict(x_ptr=x, N=n, H=h, W=w, C=L["cin"], OH=oh, OW=ow, KH=k, KW=k, DEVICE_KEY=0)
elif L["kernel"] == "aspp_branches":
    tuner = aspp._aspp_branches_autotuned
    r1, r2, r3 = L["rates"]
    args = dict(x_ptr=x, N=n, H=h, W=w, C_IN=L["cin"], CB=L["cout"], RATE1=r1, RATE2=r2, RATE3=r3, DEVICE_KEY=0)
else:
    tuner = aspp._aspp_project_autotuned
    args = {}
prune = getattr(tuner, "early_config_prune", None)
with mock.patch.object(torch.cuda, "is_available", lambda: True), \
        mock.patch.object(torch.cuda, "get_device_capability", lambda device=None: (9, 0)):
    kept = prune(list(tuner.configs), args) if prune else tuner.configs
print(len(kept))
"""
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(launch)], capture_output=True, text=True,
                          env=_no_interpreter_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_plan_counts_agree_with_the_prune_functions_and_fit(plan):
    stages = plan["stages"]
    assert list(stages) == ["precompile", "correctness", "kernels", "model"]
    for name, stage in stages.items():
        for column in ("cases", "autotune_keys", "config_benchmarks", "compiles", "estimated_s", "limit_s"):
            assert column in stage, (name, column)
        assert 0 < stage["estimated_s"] <= stage["limit_s"], (name, stage["estimated_s"], stage["limit_s"])
        tuned = stage.get("tuned", [])
        assert len(tuned) == stage["autotune_keys"]
        assert sum(t["configs"] for t in tuned) == stage["config_benchmarks"]
    assert plan["total_limit_s"] <= 480 and plan["total_estimated_s"] <= plan["total_limit_s"]
    assert _driver_module().LIMITS_S == {name: s["limit_s"] for name, s in stages.items()}  # the driver's own
    assert plan["setup"]["limit_s"] + sum(s["limit_s"] + plan["grace_s"] for s in stages.values()) \
        == plan["total_limit_s"]
    costs = plan["unit_costs"]
    assert costs["compile_s"]["value"] > 0 and "measured" in costs["compile_s"]["source"]
    assert costs["autotune_bench_s"]["value"] == pytest.approx(0.025 + costs["autotune_bench_overhead_s"]["value"])
    # every build of every stage is listed for stage 0, once
    jobs = plan["precompile_jobs"]
    assert len(jobs) == stages["precompile"]["compiles"] == len({j["variant"] for j in jobs})
    assert any("USE_TMA=1" in j["config"] for j in jobs)
    # the kernel stage: its first cases are the ASPP branches (grouped first), fp16 batch 1 then 8
    kernels = stages["kernels"]
    assert kernels["cases"] <= kernels["cases_total"]
    first = kernels["tuned"][0]["launch"]
    assert (first["kernel"], first["dtype"], first["n"]) == ("aspp_branches", "fp16", 1)
    assert kernels["tuned"][1]["launch"]["n"] == 8
    # MobileNetV3-Large: its depthwise problems at OS16 and OS8 in the kernel stage (fp16 all reached, bf16
    # after them), the pooling and scaled launches of its SE blocks built by stage 0, its model settings planned
    tuned_dw = [t["launch"] for t in kernels["tuned"] if t["launch"]["kernel"] == "depthwise"]
    assert {(t["dtype"], t["n"]) for t in tuned_dw} >= {("fp16", 1), ("fp16", 8), ("bf16", 1)}
    assert {(t["k"], t["dilation"]) for t in tuned_dw} >= {(3, 1), (5, 2), (5, 4)}  # OS16's rate 2, OS8's 4
    dw_jobs = [j["launch"] for j in jobs if j["launch"]["kernel"] == "depthwise"]
    assert {(j["se"], j["sums"]) for j in dw_jobs} == {(False, False), (False, True), (True, False)}
    assert {j["activation"] for j in dw_jobs} >= {"relu", "hardswish"}
    assert stages["correctness"]["kernel_cases"] > 0 and stages["model"]["settings"] == 6
    assert set(stages["model"]["estimated_s_per_model"]) == {"resnet50", "mobilenet_v3_large"}
    # the counts are the prune functions' own: recomputed directly for one launch of each kind
    picked: dict = {}
    for stage in ("kernels", "correctness"):
        for t in stages[stage]["tuned"]:
            launch = t["launch"]
            picked.setdefault((launch["kernel"], launch["k"]), t)
    assert {("conv", 1), ("conv", 3), ("aspp_branches", 3), ("aspp_project", 1), ("depthwise", 3),
            ("depthwise", 5)} <= set(picked)
    for t in picked.values():
        assert _prune_directly(t["launch"]) == t["configs"], t


def test_stage0_builds_what_the_launchers_launch(monkeypatch):
    """The arguments gpucheck.launches gives Triton's binder (hence the compile-cache key stage 0 fills) are
    the ones the real launchers pass: recorded here from the launchers under the interpreter."""
    import torch

    sys.path[:0] = [str(ROOT / "scripts")]
    try:
        import gpucheck.launches as launches
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    import fastdeeplab.kernels.aspp as aspp
    import fastdeeplab.kernels.conv as conv
    import fastdeeplab.kernels.depthwise as dw
    from triton.runtime.interpreter import InterpretedFunction

    recorded = []

    def record(self, *args, **kwargs):
        recorded.append((self, args, kwargs))

    monkeypatch.setattr(InterpretedFunction, "run", record)
    cl = torch.channels_last
    config = conv.get_interpreter_config()
    dt = torch.float16
    x = torch.randn(2, 16, 9, 11).to(dt).contiguous(memory_format=cl)
    cases = []
    for k, s, d, residual, relu in ((3, 1, 2, False, True), (1, 1, 1, True, True), (3, 2, 1, False, False)):
        p = d * (k // 2)
        oh, ow = (9 + 2 * p - d * (k - 1) - 1) // s + 1, (11 + 2 * p - d * (k - 1) - 1) // s + 1
        res = torch.randn(2, 24, oh, ow).to(dt).contiguous(memory_format=cl) if residual else None
        conv.conv_bn_relu_packed(x, conv.pack_weight(torch.randn(24, 16, k, k).to(dt)), torch.randn(24), kernel_size=k,
                                 stride=s, padding=p, dilation=d, relu=relu, residual=res, config=config)
        cases.append(launches.Launch("conv", "fp16", 2, 16, 24, 9, 11, k=k, stride=s, padding=p, dilation=d,
                                     residual=residual, relu=relu))
    # the hardswish epilogue (MobileNetV3's 1x1 expands and features[16])
    conv.conv_bn_relu_packed(x, conv.pack_weight(torch.randn(24, 16, 1, 1).to(dt)), torch.randn(24), kernel_size=1,
                             activation="hardswish", config=config)
    cases.append(launches.Launch("conv", "fp16", 2, 16, 24, 9, 11, k=1, relu=False, activation="hardswish"))
    aspp.aspp_branches_packed(x, aspp.pack_aspp_branch_weights(
        [torch.randn(8, 16, kk, kk).to(dt) for kk in (1, 3, 3, 3)]), torch.randn(32), (2, 4, 6), config=config)
    cases.append(launches.Launch("aspp_branches", "fp16", 2, 16, 8, 9, 11, k=3, rates=(2, 4, 6)))
    branches = [torch.randn(2, 8, 9, 11).to(dt).contiguous(memory_format=cl) for _ in range(4)]
    aspp.aspp_project_packed(branches, torch.randn(2, 8).to(dt), aspp.pack_aspp_weight(torch.randn(12, 40, 1, 1).to(dt)),
                             torch.randn(12), relu=True, config=aspp.get_interpreter_config())
    cases.append(launches.Launch("aspp_project", "fp16", 2, 8, 12, 9, 11))
    # depthwise: plain (stride 2), then a squeeze-excitation block's pooling launch and scaled launch
    packed = dw.pack_depthwise_weight(torch.randn(16, 1, 5, 5).to(dt))
    dw_config = dw.get_interpreter_config()
    dw.depthwise_conv_act_packed(x, packed, torch.randn(16), kernel_size=5, stride=2, padding=2, activation="relu",
                                 config=dw_config)
    cases.append(launches.Launch("depthwise", "fp16", 2, 16, 16, 9, 11, k=5, stride=2, padding=2,
                                 activation="relu"))
    geometry = dict(kernel_size=5, padding=4, dilation=2, activation="hardswish", config=dw_config)
    dw.depthwise_conv_act_packed(x, packed, torch.randn(16), channel_sums=torch.empty(2, 16), write_output=False,
                                 **geometry)
    dw.depthwise_conv_act_packed(x, packed, torch.randn(16), se_scale=torch.rand(2, 16).to(dt), **geometry)
    cases += launches.Launch("depthwise", "fp16", 2, 16, 16, 9, 11, k=5, padding=4, dilation=2,
                             activation="hardswish").se_launches()
    assert len(recorded) == len(cases)
    for (fn, args, kwargs), launch in zip(recorded, cases):
        got = {**dict(zip(fn.arg_names, args)), **kwargs}
        want_args, want_kwargs = launches.kernel_call(launch)
        want = {**dict(zip(fn.arg_names, want_args)), **want_kwargs}
        for name, value in want.items():
            if name == "DEVICE_KEY":  # -1 for the CPU tensors here, 0 for cuda:0 in the plan
                continue
            if isinstance(value, torch.Tensor):
                assert got[name].dtype == value.dtype, (launch, name)
            else:
                assert got[name] == value, (launch, name, got[name], value)


def test_mobilenet_launches_are_what_optimize_runs():
    """The plan's MobileNetV3-Large launches (one forward of optimize(backend="triton") at OS16): 15 depthwise
    convs, the 8 with a squeeze-excitation as a pooling launch plus a scaled one, and the 30 groups=1 1x1 convs
    on the conv kernel with their activations and the 10 residual adds (this checkout's optimize runs them
    there, as pointwise_on_triton finds), then the head."""
    sys.path[:0] = [str(ROOT / "scripts")]
    try:
        import gpucheck.models as models
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    launches = models.model_launches("mobilenet_v3_large", 16, 513, 1, "fp16")
    dw = [launch for launch in launches if launch.kernel == "depthwise"]
    assert sum(not launch.sums for launch in dw) == 15 and sum(launch.sums for launch in dw) == 8
    assert [(launch.k, launch.dilation, launch.activation) for launch in dw][-1] == (5, 2, "hardswish")
    assert models.pointwise_on_triton()
    pointwise = [launch for launch in launches if launch.kernel == "conv" and launch.cin != 256]  # not the head
    assert len(pointwise) == 30 and all(launch.k == 1 for launch in pointwise)
    assert {launch.activation for launch in pointwise} == {"none", "relu", "hardswish"}
    assert sum(launch.residual for launch in pointwise) == 10
    assert [launch.kernel for launch in launches[-4:]] == ["aspp_branches", "aspp_project", "conv", "conv"]


# --------------------------------------------------------------------------------------------------
# Rows survive a kill; a CUDA error ends its stage with a row
# --------------------------------------------------------------------------------------------------
def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_a_killed_stage_keeps_the_rows_it_wrote(tmp_path):
    rows_path = tmp_path / "kernels.jsonl"
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_CACHE_DIR=str(tmp_path / "triton"))
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--stage", "kernels", "--rows", str(rows_path),
           "--deadline", str(time.time() + 600), "--dry-run", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not any(r.get("kind") == "conv" for r in _rows(rows_path)):
            assert proc.poll() is None, f"the stage ended (exit {proc.returncode}) before its first measured row"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    rows = _rows(rows_path)  # every line is whole JSON: written and flushed one row at a time
    assert rows[0]["kind"] == "info" and rows[0]["will_reach"] >= 1
    measured = [r for r in rows if r.get("kind") == "conv"]
    assert measured and measured[0]["triton_ms"] > 0 and measured[0]["cudnn_ms"] > 0


def test_a_cuda_error_ends_the_stage_with_a_row(tmp_path, monkeypatch):
    gpu_check = _driver_module()
    gpu_check.bootstrap()
    import gpucheck.kernel_bench as kernel_bench
    from gpucheck.common import Plan, RowWriter

    calls = []

    def failing(entry, batch, dtype, plan):
        calls.append(entry["label"])
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(kernel_bench, "_make", failing)
    with RowWriter(tmp_path / "rows.jsonl") as rows:
        rc = gpu_check.run_one_stage("kernels", Plan.make(True, None), rows, tmp_path)
    assert rc == gpu_check.STAGE_ERROR_RC and len(calls) == 1  # nothing more ran on the broken context
    rows = _rows(tmp_path / "rows.jsonl")
    assert [r["kind"] for r in rows] == ["info", "stage_error"]
    assert rows[-1]["cuda_error"] is True and rows[-1]["ok"] is False and "illegal memory" in rows[-1]["message"]

    # an ordinary failure is one failed case, and the stage goes on
    def wrong(entry, batch, dtype, plan):
        raise ValueError("a bad shape")

    monkeypatch.setattr(kernel_bench, "_make", wrong)
    with RowWriter(tmp_path / "rows2.jsonl") as rows:
        rc = gpu_check.run_one_stage("kernels", Plan.make(True, None), rows, tmp_path)
    assert rc == 0
    failed = [r for r in _rows(tmp_path / "rows2.jsonl") if r.get("ok") is False]
    assert len(failed) == len(kernel_bench.cases(Plan.make(True, None))) and "bad shape" in failed[0]["message"]
