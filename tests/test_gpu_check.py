"""scripts/gpu_check.sh (issue 13): the dry run proves the GPU check's plumbing on a CPU.

``bash scripts/gpu_check.sh --dry-run OUTDIR`` runs every stage in its own subprocess on tiny shapes under
TRITON_INTERPRET=1 and must write the same files a GPU run writes. About a minute on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
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
    assert list(stages) == ["correctness", "kernels", "model"]
    for name, stage in stages.items():
        assert stage["status"] == "ok", (name, stage["status"], log[-4000:])
        assert stage["seconds"] > 0 and stage["rows"], name
        assert not [r for r in stage["rows"] if r.get("ok") is False], name

    kinds = {r["kind"] for r in stages["correctness"]["rows"]}
    assert {"kernel", "model_check"} <= kinds
    checks = [r for r in stages["correctness"]["rows"] if r["kind"] == "model_check"]
    assert sorted(r["output_stride"] for r in checks) == [8, 16] and all(r["ok"] for r in checks)

    convs = [r for r in stages["kernels"]["rows"] if r["kind"] == "conv"]
    assert convs and all(r["triton_ms"] > 0 and r["cudnn_ms"] > 0 for r in convs)
    assert any(r["layer"] == "ASPP projection" for r in convs)

    rows = [r for r in stages["model"]["rows"] if r["kind"] == "model"]
    timed = {(r["output_stride"], r["impl"]) for r in rows if r.get("median_ms")}
    for output_stride in (16, 8):
        for impl in ("torchvision fp32", "torchvision bf16", "optimize triton", "optimize torch"):
            assert (output_stride, impl) in timed, (output_stride, impl)
    graph = [r for r in rows if r["impl"] == "optimize triton + graph"]
    assert graph and all("GPU" in r["skipped"] for r in graph)  # CUDA graphs: recorded as skipped on a CPU
    assert any(r["impl"].startswith("torch.compile") and r.get("median_ms") for r in rows)

    md = (out / "gpucheck.md").read_text()
    for heading in ("## Stage correctness: ok", "## Stage kernels: ok", "## Stage model: ok"):
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
