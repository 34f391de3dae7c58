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


def _ratio_row(impl: str, os_: int, latency: float, ratio: tuple[float, float, float], **kw: object) -> dict:
    row = _row(impl, os_, latency, kw.pop("agreement", None))
    row.update(latency_ms_q1=latency * 0.9, latency_ms_q3=latency * 1.1, speedup_same_os_q1=ratio[0],
               speedup_vs_torchvision_same_os=ratio[1], speedup_same_os_q3=ratio[2], **kw)
    return row


def test_table_shows_ratio_intervals_noise_and_na(rows: list[dict]) -> None:
    meta = {**_meta(), "weights": {"kind": "random", "description": "random (seed 0)"}, "noisy": True,
            "noisy_reasons": ["OS8: load average 3.10 before > 2 cores"],
            "advice": "rerun on a quieter machine, or with --threads 1"}
    table_rows = [
        _ratio_row("torchvision", 16, 300.0, (1.0, 1.0, 1.0), pixel_agreement_same_os=1.0),
        _ratio_row("optimize_openvino", 16, 100.0, (2.8, 3.0, 3.3), pixel_agreement_same_os=0.9999,
                   accuracy_note="n/a (random weights)"),
        _ratio_row("torchvision", 8, 900.0, (1.0, 1.0, 1.0), agreement=1.0),
    ]
    add_speedups(table_rows)
    table = format_table(meta, table_rows)
    assert "3.00x [2.80-3.30]" in table  # the per-round ratio with its interval, not the ratio of medians
    assert "NOISY RUN" in table and "--threads 1" in table and "load average 3.10 before" in table
    line = next(x for x in table.splitlines() if x.startswith("optimize_openvino"))
    assert line.count("n/a") == 2  # agree8 and mIoU; the same-OS agreement stays
    assert "0.9999" in line
    quiet = format_table({**meta, "noisy": False}, table_rows)
    assert "NOISY" not in quiet


def test_synthetic_header_says_synthetic() -> None:
    meta = {**_meta(), "weights": {"kind": "synthetic", "description": "synthetic: DeepLabv3 trained on synthetic scenes"}}
    row = _ratio_row("torchvision", 8, 100.0, (1.0, 1.0, 1.0), miou_ground_truth=0.6458)
    table = format_table(meta, [row])
    assert "weights: synthetic" in table and "held-out synthetic scenes" in table
    assert "0.6458" in table


def test_plot_uses_speedup_for_random_weights(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bench._report import _plot_axis

    meta = {**_meta(), "weights": {"kind": "random", "description": "random (seed 0)"}}
    assert _plot_axis(meta)[0] == "speedup_vs_torchvision_same_os"
    assert _plot_axis({**meta, "weights": {"kind": "synthetic"}})[0] == "miou_ground_truth"
    rows = [_ratio_row(f"impl{i}", os_, 100.0 + i, (1.0 + i / 100, 1.0 + i / 50, 1.0 + i / 25))
            for os_ in (16, 8) for i in range(12)]
    png = write_plot(tmp_path / "p.png", meta, rows)
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_styles_are_fixed_per_implementation_and_distinct() -> None:
    """A row's colour and marker depend on its name only (not on row order), and no two implementations
    share both: rows of one hue differ in marker shape, never in shade alone."""
    from bench._report import plot_style
    from fastdeeplab.bench_cli import IMPLEMENTATIONS

    styles = [plot_style(name) for name in IMPLEMENTATIONS]
    assert len(set(styles)) == len(styles)
    assert plot_style("optimize_torch") == plot_style("optimize_torch")
    hues = {colour for colour, _ in styles}
    assert all(len(h) == 7 and h.startswith("#") for h in hues)


def test_table_names_its_rows_in_the_readmes_words() -> None:
    """The suite's row names appear, with the README's words for them, under the table."""
    from bench._impls import IMPLEMENTATIONS as BUILT

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for name in ("torchvision", "optimize_torch", "optimize_onnxruntime", "optimize_openvino",
                 "onnxruntime_torchvision", "openvino_torchvision", "optimize_bf16", "openvino_torchvision_bf16",
                 "onnxruntime_int8"):
        row = next(line for line in readme.splitlines() if f"(`{name}`" in line or f"`{name}`;" in line)
        words = BUILT[name].description.replace("peer: ", "").split(" (")[0]
        assert words.lower()[:20] in row.replace("`", "").lower(), (name, words, row)
