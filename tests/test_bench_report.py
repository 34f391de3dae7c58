"""The benchmark's outputs: speedups, the summary table, latest.json (+ timestamped copy) and latest.png."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a source-checkout package, not installed with fastdeeplab
    sys.path.insert(0, str(ROOT))

from bench._report import ROW_KEYS, add_speedups, format_table, write_json, write_plot  # noqa: E402


def _row(impl: str, os_: int, latency: float | None, agreement: float | None, status: str = "ok",
         reason: str | None = None) -> dict:
    row = dict.fromkeys(ROW_KEYS)
    row.update(implementation=impl, output_stride=os_, resolution=513, batch=1, device="cpu", dtype="float32",
               status=status, reason=reason, latency_ms_median=latency, pixel_agreement=agreement, notes=[])
    return row


def _meta() -> dict:
    return {
        "created": "2026-01-01T00:00:00+00:00",
        "settings": {"backbone": "resnet50", "resolution": 513, "batch": 1, "device": "cpu", "dtype": "float32"},
        "machine": {"gpu": None, "cpu": "Test CPU", "cpu_cores": 2, "torch_threads": 2,
                    "load_average": {"at_start": [1.0, 1.0, 1.0], "at_end": [2.0, 1.0, 1.0]}},
        "versions": {"torch": "2.x"},
        "weights": {"description": "random (seed 0)"},
        "images": {"description": "3 photographs"},
    }


@pytest.fixture
def rows() -> list[dict]:
    return [
        _row("torchvision", 16, 800.0, 0.95),
        _row("onnxruntime_like", 16, 400.0, 0.95),
        _row("torchvision", 8, 2400.0, 1.0),
        _row("triton", 8, None, None, status="skipped", reason="Triton kernels need CUDA (device is cpu)"),
    ]


def test_speedups(rows: list[dict]) -> None:
    add_speedups(rows)
    assert rows[0]["speedup_vs_reference"] == pytest.approx(3.0)  # torchvision OS8 / torchvision OS16
    assert rows[1]["speedup_vs_reference"] == pytest.approx(6.0)
    assert rows[1]["speedup_vs_torchvision_same_os"] == pytest.approx(2.0)
    assert rows[2]["speedup_vs_reference"] == pytest.approx(1.0)
    assert rows[3]["speedup_vs_reference"] is None


def test_table_shows_every_row_and_skip_reason(rows: list[dict]) -> None:
    add_speedups(rows)
    table = format_table(_meta(), rows)
    assert "weights: random (seed 0)" in table and "load average (1 min) 1.0 at start" in table
    assert "skipped: Triton kernels need CUDA (device is cpu)" in table
    assert sum(line.startswith(("torchvision", "onnxruntime_like", "triton")) for line in table.splitlines()) == 4


def test_json_and_plot_are_written(tmp_path: Path, rows: list[dict]) -> None:
    pytest.importorskip("matplotlib")
    add_speedups(rows)
    latest, stamped = write_json(tmp_path / "results", {**_meta(), "rows": rows}, "20260101T000000")
    assert stamped.name == "20260101T000000.json"
    data = json.loads(latest.read_text())
    assert [r["implementation"] for r in data["rows"]] == [r["implementation"] for r in rows]
    assert stamped.read_text() == latest.read_text()
    png = write_plot(tmp_path / "results" / "latest.png", _meta(), rows)
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (tmp_path / "results").iterdir() if p.name.endswith(".tmp")]  # atomic writes
