"""One benchmark setting end to end, small: implementations built first, timed round-robin, per-round ratio
intervals, load recorded, accuracy marked n/a where random weights make it meaningless; and the noisy rule."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a source-checkout package, not installed with fastdeeplab
    sys.path.insert(0, str(ROOT))

from bench._session import BenchConfig, BenchSession, is_noisy, rounds_for  # noqa: E402
from fastdeeplab.timing import CpuSnapshot, cpu_snapshot, others_busy_cores  # noqa: E402

pytest.importorskip("skimage", reason="the accuracy columns are measured on scikit-image's photographs")


def _config(tmp_path: Path, **kw: object) -> BenchConfig:
    base = dict(resolution=33, batch=1, backbone="resnet50", device="cpu", dtype="float32",
                impls=["torchvision", "fastdeeplab", "optimize_torch", "triton"], explicit_impls=True,
                output_strides=[16, 8], weights="random", download_weights=False, data=None, max_images=None,
                images=None, accuracy_images=1, quick=True, rounds=3, warmup=1, time_budget=1.0, min_rounds=3,
                max_rounds=10, seed=0, threads=None, results_dir=tmp_path / "results")
    base.update(kw)
    return BenchConfig(**base)  # type: ignore[arg-type]


def test_rounds_follow_the_budget(tmp_path: Path) -> None:
    cfg = _config(tmp_path, rounds=None, time_budget=10.0, min_rounds=3, max_rounds=10)
    assert rounds_for(cfg, 2.0) == 5
    assert rounds_for(cfg, 100.0) == 3 and rounds_for(cfg, 0.01) == 10
    assert rounds_for(_config(tmp_path, rounds=7), 100.0) == 7


def test_noisy_rule() -> None:
    assert is_noisy({"cores": 2, "load1_before": 1.2, "load1_after": 2.1, "others_busy_cores": 0.1}) == []
    reasons = is_noisy({"cores": 2, "load1_before": 3.5, "load1_after": 1.0, "others_busy_cores": None})
    assert reasons == ["load average 3.50 before > 2 cores"]
    assert "other processes" in is_noisy({"cores": 2, "load1_before": 1.0, "load1_after": 1.0,
                                          "others_busy_cores": 0.9})[0]


def test_others_busy_cores_arithmetic() -> None:
    before = CpuSnapshot(wall=0.0, machine_busy_s=100.0, own_s=10.0)
    after = CpuSnapshot(wall=2.0, machine_busy_s=103.0, own_s=11.0)  # 3 core-seconds busy, 1 of them ours
    assert others_busy_cores(before, after) == pytest.approx(1.0)
    assert others_busy_cores(before, CpuSnapshot(2.0, None, 11.0)) is None


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="needs /proc/stat")
def test_a_busy_process_is_seen() -> None:
    """A CPU-bound child process for ~1.5 s shows up as at least half a core used by others."""
    before = cpu_snapshot()
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"])
    child.wait(timeout=60)
    time.sleep(0.05)
    assert others_busy_cores(before, cpu_snapshot()) >= 0.5


def test_one_setting_interleaved(tmp_path: Path) -> None:
    lines: list[str] = []
    bench = BenchSession(_config(tmp_path), tmp_path / "work", progress=lines.append)
    (tmp_path / "work").mkdir()
    for stride in (16, 8):
        result = bench.setting(stride)
        assert bench.setting(stride) is result  # once per output stride
        rows = result.rows
        assert rows["triton"]["status"] == "skipped" and "CUDA" in rows["triton"]["reason"]
        for name in ("torchvision", "fastdeeplab", "optimize_torch"):
            row = rows[name]
            assert row["status"] == "ok", row
            assert len(row["samples_ms"]) == result.rounds == 3
            assert row["speedup_same_os_q1"] <= row["speedup_vs_torchvision_same_os"] <= row["speedup_same_os_q3"]
            assert row["max_rel_logit_error"] < 5e-3 and row["pixel_agreement_same_os"] > 0.99
        assert rows["torchvision"]["speedup_vs_torchvision_same_os"] == pytest.approx(1.0)
        assert {"load1_before", "load1_after", "others_busy_cores", "noisy"} <= set(result.load)
    # random weights: OS16-vs-OS8 columns are n/a, OS8 rows keep theirs
    assert bench.settings[16].rows["optimize_torch"]["pixel_agreement"] is None
    assert "random weights" in bench.settings[16].rows["optimize_torch"]["accuracy_note"]
    assert bench.settings[8].rows["optimize_torch"]["pixel_agreement"] > 0.99
    # progress: one line per implementation built, per round timed
    assert any("OS16 optimize_torch: built in" in line for line in lines)
    assert any("OS8: round 3/3 done" in line for line in lines)
    meta = bench.metadata(SimpleNamespace(invocation_params=SimpleNamespace(args=("bench", "--quick"))))
    assert meta["weights"]["kind"] == "random" and meta["weights"]["accuracy_meaningful"] is False
    assert isinstance(meta["noisy"], bool) and meta["timing"]["rounds"] == {"os16": 3, "os8": 3}
    assert set(meta["machine"]["load_average"]["per_output_stride"]) == {"os16", "os8"}


def test_mobilenet_setting(tmp_path: Path) -> None:
    """--backbone mobilenet_v3_large: torchvision's deeplabv3_mobilenet_v3_large eager, fastdeeplab's rows
    (optimize() on the torch and OpenVINO backends) and the peers on torchvision's own export, interleaved,
    at OS16 and OS8, same weights, logits within the float32 tolerance; a fraction of ResNet-50's work."""
    from bench._impls import count_gflop
    from fastdeeplab.mobilenet import depthwise_conv

    impls = ["torchvision", "fastdeeplab", "optimize_torch", "optimize_openvino", "onnxruntime_torchvision",
             "openvino_torchvision"]
    cfg = _config(tmp_path, backbone="mobilenet_v3_large", resolution=65, impls=impls, rounds=2, min_rounds=2)
    bench = BenchSession(cfg, tmp_path / "work", progress=lambda line: None)
    (tmp_path / "work").mkdir()
    assert bench.weights.backbone == "mobilenet_v3_large"
    for stride in (16, 8):
        reference = bench.reference(stride)
        assert type(reference).__module__.startswith("torchvision.")
        assert depthwise_conv(reference.backbone["13"]).dilation == ((2, 2) if stride == 16 else (4, 4))
        assert bench.fastdeeplab_model(stride).output_stride == stride
        rows = bench.setting(stride).rows
        for name in impls:
            row = rows[name]
            if row["status"] == "skipped":  # onnxruntime / openvino not installed: the reason says so
                assert "pip install" in row["reason"], row
                continue
            assert row["status"] == "ok", row
            assert len(row["samples_ms"]) == 2
            assert row["max_rel_logit_error"] < 5e-3 and row["pixel_agreement_same_os"] > 0.99
        assert rows["optimize_torch"]["status"] == "ok"
        assert bench.gflop(stride) < 0.3 * count_gflop("resnet50", 21, stride, cfg.resolution)  # 0.21 at 65 px
    meta = bench.metadata(SimpleNamespace(invocation_params=SimpleNamespace(args=("bench",))))
    assert meta["settings"]["backbone"] == "mobilenet_v3_large" and meta["weights"]["backbone"] == "mobilenet_v3_large"
