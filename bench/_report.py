"""The suite's outputs: the plain-text summary table, ``latest.json`` (plus a timestamped copy) and
``latest.png`` (latency against pixel agreement). Every file is written atomically.

Column definitions (also stored under ``"columns"`` in the JSON):
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastdeeplab._io import atomic_path

__all__ = ["COLUMNS", "ROW_KEYS", "add_kernel_speedups", "add_speedups", "format_kernel_table", "format_table", "write_json", "write_plot"]

# Keys of every row, in order; rows that did not run keep None in the measured ones.
ROW_KEYS = (
    "implementation", "description", "output_stride", "resolution", "batch", "device", "dtype", "status",
    "reason", "latency_ms_median", "latency_ms_iqr", "latency_ms_q1", "latency_ms_q3", "latency_ms_min",
    "rounds", "throughput_ips", "gflop", "gflops", "peak_mem_mb", "speedup_vs_reference",
    "speedup_vs_torchvision_same_os", "max_rel_logit_error", "pixel_agreement", "miou_vs_reference",
    "pixel_agreement_same_os", "accuracy_images", "val_miou", "val_images", "build_s", "notes",
)

COLUMNS: dict[str, str] = {
    "latency_ms_median": "median wall time of one forward of `batch` images over the timed rounds, after "
                         "warmup (input already on the device; CUDA synchronised)",
    "latency_ms_iqr": "interquartile range (q3 - q1) of the timed rounds",
    "throughput_ips": "images per second = batch / median latency",
    "gflop": "GFLOP per image (FlopCounterMode on the torchvision reference: convs as 2*MAC; BN, ReLU, "
             "pooling and upsampling not counted); the same model work for every implementation",
    "gflops": "achieved GFLOP/s = gflop * batch / median latency",
    "peak_mem_mb": "CUDA: torch.cuda.max_memory_allocated over one call (weights included); CPU: rise of the "
                   "process peak RSS over the implementation's first call, after malloc_trim (weights excluded)",
    "speedup_vs_reference": "torchvision OS8 latency / row latency (the model torchvision ships, as shipped)",
    "speedup_vs_torchvision_same_os": "torchvision latency at the row's output stride / row latency",
    "max_rel_logit_error": "max|out - ref| / max|ref|, ref = torchvision float32 at the row's output stride, "
                           "same weights and photographs",
    "pixel_agreement": "fraction of pixels whose argmax equals the torchvision float32 OS8 argmax (the "
                       "ground truth for every row, so OS16's accuracy loss shows here)",
    "miou_vs_reference": "mIoU of the argmax with the torchvision float32 OS8 argmax as ground truth",
    "pixel_agreement_same_os": "argmax agreement with torchvision float32 at the row's own output stride",
    "val_miou": "mIoU on the VOC val split (--data, real weights; first --max-images images, each at its own "
                "size, single scale, 255 ignored) via fastdeeplab.evaluate",
}
__doc__ = (__doc__ or "") + "\n" + "\n".join(f"* ``{k}``: {v}" for k, v in COLUMNS.items())


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Fill ``speedup_vs_reference`` and ``speedup_vs_torchvision_same_os`` in place (None without a
    torchvision row to compare with)."""
    tv = {r["output_stride"]: r["latency_ms_median"] for r in rows
          if r["implementation"] == "torchvision" and r.get("latency_ms_median")}
    for r in rows:
        lat = r.get("latency_ms_median")
        if not lat:
            continue
        r["speedup_vs_reference"] = tv[8] / lat if 8 in tv else None
        same = tv.get(r["output_stride"])
        r["speedup_vs_torchvision_same_os"] = same / lat if same else None


def add_kernel_speedups(rows: list[dict[str, Any]]) -> None:
    """Fill ``speedup_vs_cudnn`` (cuDNN time / row time) on kernel rows whose case and dtype have a cuDNN row."""
    cudnn = {(r["case"], r["dtype"]): r.get("time_us_median") for r in rows if r.get("provider") == "cudnn"}
    for r in rows:
        base = cudnn.get((r["case"], r["dtype"]))
        if base and r.get("time_us_median"):
            r["speedup_vs_cudnn"] = base / r["time_us_median"]


def _f(value: Any, fmt: str, none: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, fmt)


def _err(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return "inf" if math.isinf(value) else f"{value:.1e}"


def _load_note(load: dict[str, Any] | None) -> str:
    if not load or not load.get("at_start"):
        return ""
    end = load.get("at_end") or load["at_start"]
    return f" | load average (1 min) {load['at_start'][0]:.1f} at start, {end[0]:.1f} at end"


def format_table(meta: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """The plain-text summary: a header naming model, machine, weights and images, then one line per row."""
    s = meta["settings"]
    m = meta["machine"]
    v = meta["versions"]
    where = m["gpu"] or f"{m['cpu']} ({m['cpu_cores']} cores, {m['torch_threads']} torch threads)"
    libs = ", ".join(f"{k} {val}" for k, val in v.items() if val and k not in ("pytest-benchmark",))
    lines = [
        f"DeepLabv3-{s['backbone']} | {s['resolution']}x{s['resolution']} | batch {s['batch']} | "
        f"{s['device']} {s['dtype']} | {meta['created']}",
        f"machine: {where}" + _load_note(m.get("load_average"))
        + (f" | OMP_WAIT_POLICY={m['omp_wait_policy']}" if m.get("omp_wait_policy") else ""),
        f"versions: {libs}",
        f"weights: {meta['weights']['description']}",
        f"images: {meta['images']['description']}",
        "latency: median (IQR) over timed rounds; x ref = torchvision OS8 latency / row; x tv = torchvision at "
        "the same OS / row; err = max|out-ref|/max|ref| vs torchvision fp32 at the same OS; agree/mIoU vs "
        "torchvision fp32 OS8 argmax",
    ]
    has_val = any(r.get("val_miou") is not None for r in rows)
    header = (f"{'implementation':<21}{'OS':>3} {'median ms':>10} {'IQR':>7} {'img/s':>6} {'GFLOP':>6} "
              f"{'GFLOP/s':>8} {'mem MB':>7} {'x ref':>6} {'x tv':>5} {'max err':>8} {'agree':>6} {'mIoU':>6}"
              + (f" {'val mIoU':>8}" if has_val else "") + "  status")
    lines += ["", header, "-" * len(header)]
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason') or ''}"
        lines.append(
            f"{r['implementation']:<21}{r['output_stride']:>3} {_f(r['latency_ms_median'], '10.1f'):>10} "
            f"{_f(r['latency_ms_iqr'], '7.1f'):>7} {_f(r['throughput_ips'], '6.2f'):>6} "
            f"{_f(r['gflop'], '6.1f'):>6} {_f(r['gflops'], '8.1f'):>8} {_f(r['peak_mem_mb'], '7.0f'):>7} "
            f"{_f(r['speedup_vs_reference'], '5.2f') + ('x' if r['speedup_vs_reference'] else ''):>6} "
            f"{_f(r['speedup_vs_torchvision_same_os'], '4.2f') + ('x' if r['speedup_vs_torchvision_same_os'] else ''):>5} "
            f"{_err(r['max_rel_logit_error']):>8} {_f(r['pixel_agreement'], '6.4f'):>6} "
            f"{_f(r['miou_vs_reference'], '6.4f'):>6}"
            + (f" {_f(r.get('val_miou'), '8.4f'):>8}" if has_val else "") + f"  {status}")
    return "\n".join(lines)


def format_kernel_table(rows: Sequence[dict[str, Any]]) -> str:
    """Kernel micro-benchmark rows: shape, dtype, provider, time, TFLOP/s, % of the device's peak."""
    gpu = next((r["gpu"] for r in rows if r.get("gpu")), None)
    header = (f"{'case':<34}{'dtype':>9} {'provider':>9} {'median us':>10} {'TFLOP/s':>8} {'% peak':>7} "
              f"{'x cuDNN':>8}  status")
    peak = next((r["peak_tflops"] for r in rows if r.get("peak_tflops")), None)
    lines = [f"GPU: {gpu}; dense fp16/bf16 peak {_f(peak, '.0f', 'unknown')} TFLOP/s" if gpu else "", header,
             "-" * len(header)]
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason') or ''}"
        lines.append(f"{r['case']:<34}{r['dtype']:>9} {r['provider']:>9} {_f(r.get('time_us_median'), '10.1f'):>10} "
                     f"{_f(r.get('tflops'), '8.1f'):>8} {_f(r.get('percent_of_peak'), '7.1f'):>7} "
                     f"{_f(r.get('speedup_vs_cudnn'), '7.2f') + ('x' if r.get('speedup_vs_cudnn') else ''):>8}  {status}")
    if not gpu:
        lines = lines[1:]
    return "\n".join(lines)


def write_json(directory: Path, payload: dict[str, Any], stamp: str) -> tuple[Path, Path]:
    """Write ``latest.json`` and the timestamped copy ``<stamp>.json`` in ``directory``."""
    latest = directory / "latest.json"
    with atomic_path(latest, suffix=".json") as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str, allow_nan=True) + "\n")
    stamped = directory / f"{stamp}.json"
    with atomic_path(stamped, suffix=".json") as tmp:
        shutil.copyfile(latest, tmp)
    return latest, stamped


def write_plot(path: Path, meta: dict[str, Any], rows: Sequence[dict[str, Any]]) -> Path | None:
    """Latency (log scale) against pixel agreement with the OS8 reference, one labelled point per
    implementation and output stride. Returns None when no row has both numbers."""
    points = [r for r in rows if r.get("latency_ms_median") and r.get("pixel_agreement") is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6), dpi=110)
    names = sorted({r["implementation"] for r in points}, key=[r["implementation"] for r in rows].index)
    colours = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    markers = {16: "o", 8: "s", 32: "^"}
    xs = [r["latency_ms_median"] for r in points]
    ys = [r["pixel_agreement"] for r in points]
    xlim = (min(xs) / 1.25, max(xs) * 1.9)  # room on the right for the labels
    ypad = 0.15 * max(max(ys) - min(ys), 0.05)
    ylim = (min(ys) - ypad, max(ys) + ypad)
    log_span = math.log10(xlim[1] / xlim[0])
    offsets = (4, -12, 16, -24, 28, -36)
    placed: list[tuple[float, float]] = []
    for r, x, y in zip(points, xs, ys, strict=True):
        ax.scatter(x, y, s=60, color=colours[r["implementation"]], marker=markers.get(r["output_stride"], "D"),
                   edgecolors="black", linewidths=0.5, zorder=3)
        # points whose labels would collide get their labels stacked above and below
        near = sum(1 for px, py in placed if abs(math.log10(px / x)) < 0.2 * log_span
                   and abs(py - y) < 0.06 * (ylim[1] - ylim[0]))
        placed.append((x, y))
        ax.annotate(f"{r['implementation']} OS{r['output_stride']}", (x, y), textcoords="offset points",
                    xytext=(7, offsets[near % len(offsets)]), fontsize=8)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("latency per forward, median (ms, log scale)")
    ax.set_ylabel("pixel agreement with torchvision OS8 (float32)")
    s = meta["settings"]
    ax.set_title(f"DeepLabv3-{s['backbone']} {s['resolution']}x{s['resolution']} batch {s['batch']}, "
                 f"{s['device']} {s['dtype']}\nweights: {meta['weights']['description']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    handles = [plt.Line2D([], [], linestyle="", marker="o", color=colours[n], label=n) for n in names]
    handles += [plt.Line2D([], [], linestyle="", marker=m, color="grey", label=f"OS{o}")
                for o, m in markers.items() if any(r["output_stride"] == o for r in points)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
