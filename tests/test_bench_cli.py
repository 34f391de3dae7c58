"""``fastdeeplab bench`` translates its options into ``pytest bench/`` and the suite accepts them."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastdeeplab import bench_cli

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_cli.configure_parser(parser)
    return parser.parse_args(argv)


def test_defaults_translate_to_nothing() -> None:
    assert bench_cli.pytest_arguments(_parse([])) == []


def test_options_translate() -> None:
    args = _parse(["--quick", "--impl", "torchvision,openvino", "--impl", "fastdeeplab", "--resolution", "257",
                   "--output-strides", "16", "--", "-k", "os16"])
    assert bench_cli.pytest_arguments(args) == [
        "--resolution", "257", "--impl", "torchvision,openvino", "--impl", "fastdeeplab", "--output-strides", "16",
        "--quick"]
    assert args.pytest_args == ["-k", "os16"]


def test_bench_dir_is_found_in_a_checkout() -> None:
    assert bench_cli.find_bench_dir() == ROOT / "bench"


@pytest.mark.skipif(not (ROOT / "bench" / "conftest.py").is_file(), reason="needs the source checkout")
def test_suite_collects_the_grid() -> None:
    """The suite registers the same options and parametrises OS x implementation (collection only)."""
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "bench" / "test_latency_accuracy.py"), "--collect-only", "-q",
           "--quick", "--impl", "torchvision,optimize_onnxruntime", "-p", "no:cacheprovider"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for test_id in ("os16-torchvision", "os16-optimize_onnxruntime", "os8-torchvision", "os8-optimize_onnxruntime"):
        assert f"test_deeplab[{test_id}]" in done.stdout


def test_weights_options_translate() -> None:
    args = _parse(["--weights", "COCO_WITH_VOC_LABELS_V1", "--download-weights"])
    assert bench_cli.pytest_arguments(args) == ["--weights", "COCO_WITH_VOC_LABELS_V1", "--download-weights"]


def test_fastdeeplab_bench_hides_pytest_benchmark_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """`fastdeeplab bench` passes --benchmark-quiet (the project's table comes last), unless asked otherwise."""
    seen: list[list[str]] = []

    def fake_run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bench_cli.subprocess, "run", fake_run)
    assert bench_cli.run(_parse(["--quick"])) == 0
    assert "--benchmark-quiet" in seen[-1] and "--quick" in seen[-1]
    bench_cli.run(_parse(["--quick", "--", "--benchmark-verbose"]))
    assert "--benchmark-quiet" not in seen[-1]


@pytest.mark.skipif(not (ROOT / "bench" / "conftest.py").is_file(), reason="needs the source checkout")
def test_unknown_weights_name_is_a_usage_error_listing_the_valid_ones() -> None:
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "bench" / "test_latency_accuracy.py"), "--collect-only", "-q",
           "--quick", "--weights", "COCO", "-p", "no:cacheprovider"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "COCO_WITH_VOC_LABELS_V1" in done.stderr + done.stdout and "DEFAULT" in done.stderr + done.stdout


def test_backbone_option_is_the_resolver_table() -> None:
    """--backbone offers exactly fastdeeplab.weights.BACKBONES (the names are spelled out in bench_cli so
    that --help does not import torch) and translates like every other option."""
    from fastdeeplab.weights import BACKBONES

    assert bench_cli.BACKBONES == tuple(BACKBONES)
    assert bench_cli.pytest_arguments(_parse(["--backbone", "mobilenet_v3_large", "--quick"])) == [
        "--backbone", "mobilenet_v3_large", "--quick"]
    with pytest.raises(SystemExit):
        _parse(["--backbone", "mobilenet_v3_small"])


@pytest.mark.skipif(not (ROOT / "bench" / "conftest.py").is_file(), reason="needs the source checkout")
def test_synthetic_weights_for_mobilenet_are_accepted_and_not_trained_at_collection(tmp_path: Path) -> None:
    """``--backbone mobilenet_v3_large --weights synthetic`` collects (once refused); the model is trained or
    loaded by the first test that needs it, not at collection (an empty cache stays empty)."""
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "bench" / "test_latency_accuracy.py"), "--collect-only", "-q",
           "--quick", "--backbone", "mobilenet_v3_large", "--weights", "synthetic", "-p", "no:cacheprovider"]
    env = {**os.environ, "FASTDEEPLAB_CACHE": str(tmp_path)}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "test_latency_accuracy" in done.stdout and "offered for" not in done.stdout + done.stderr
    assert not any(tmp_path.glob("synthetic-*"))
