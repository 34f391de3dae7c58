"""The suite's outputs: the plain-text summary table, ``latest.json`` (plus a timestamped copy) and
``latest.png`` (latency against pixel agreement). Every file is written atomically.

Column definitions (also stored under ``"columns"`` in the JSON):
"""

from __future__ import annotations

import math
import shutil
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastdeeplab._io import atomic_path, json_text

__all__ = ["COLUMNS", "ROW_KEYS", "add_kernel_speedups", "add_speedups", "format_kernel_table", "format_table", "write_json", "write_plot"]

# Keys of every row, in order; rows that did not run keep None in the measured ones.
ROW_KEYS = (
    "implementation", "description", "output_stride", "resolution", "batch", "device", "dtype", "peer", "status",
    "reason", "latency_ms_median", "latency_ms_iqr", "latency_ms_q1", "latency_ms_q3", "latency_ms_min",
    "rounds", "samples_ms", "throughput_ips", "gflop", "gflops", "peak_mem_mb", "speedup_vs_reference",
    "speedup_vs_torchvision_same_os", "speedup_same_os_q1", "speedup_same_os_q3", "max_rel_logit_error",
    "pixel_agreement", "miou_vs_reference", "pixel_agreement_same_os", "miou_ground_truth", "accuracy_note",
    "accuracy_images", "val_miou", "val_images", "build_s", "notes",
)

COLUMNS: dict[str, str] = {
    "latency_ms_median": "median wall time of one forward of `batch` images over the interleaved timed rounds "
                         "(input already on the device; CUDA timed with events)",
    "latency_ms_iqr": "interquartile range (q3 - q1) of the timed rounds",
    "samples_ms": "every timed round, in order",
    "throughput_ips": "images per second = batch / median latency",
    "gflop": "GFLOP per image (FlopCounterMode on the torchvision reference: convs as 2*MAC; BN, ReLU, "
             "pooling and upsampling not counted); the same model work for every implementation",
    "gflops": "achieved GFLOP/s = gflop * batch / median latency",
    "peak_mem_mb": "CUDA: torch.cuda.max_memory_allocated over one call (weights included); CPU: rise of the "
                   "process peak RSS over the implementation's first call, after malloc_trim (weights excluded)",
    "speedup_vs_reference": "torchvision OS8 median latency / row median latency (ratio of medians; across "
                            "output strides these come from different interleaved settings)",
    "speedup_vs_torchvision_same_os": "median over rounds of (torchvision latency / row latency) in the same "
                                      "round, at the row's output stride",
    "speedup_same_os_q1": "first quartile of those per-round ratios",
    "speedup_same_os_q3": "third quartile of those per-round ratios",
    "max_rel_logit_error": "max|out - ref| / max|ref|, ref = torchvision float32 at the row's output stride, "
                           "same weights and inputs",
    "pixel_agreement": "fraction of pixels whose argmax equals the torchvision float32 OS8 argmax (the "
                       "ground truth for every row, so OS16's accuracy loss shows here); null for OS16 rows "
                       "with random weights (no meaning)",
    "miou_vs_reference": "mIoU of the argmax with the torchvision float32 OS8 argmax as ground truth; null "
                         "for OS16 rows with random weights",
    "pixel_agreement_same_os": "argmax agreement with torchvision float32 at the row's own output stride (for "
                               "bfloat16/int8 rows: agreement with float32)",
    "miou_ground_truth": "--weights synthetic only: mIoU against the true labels of held-out synthetic scenes",
    "val_miou": "mIoU on the VOC val split (--data, real weights; first --max-images images, each at its own "
                "size, single scale, 255 ignored) via fastdeeplab.evaluate",
}
__doc__ = (__doc__ or "") + "\n" + "\n".join(f"* ``{k}``: {v}" for k, v in COLUMNS.items())


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Fill ``speedup_vs_reference`` (torchvision OS8 median / row median) in place, and
    ``speedup_vs_torchvision_same_os`` from medians where the per-round ratio was not measured (None
    without a torchvision row to compare with)."""
    tv = {r["output_stride"]: r["latency_ms_median"] for r in rows
          if r["implementation"] == "torchvision" and r.get("latency_ms_median")}
    for r in rows:
        lat = r.get("latency_ms_median")
        if not lat:
            continue
        r["speedup_vs_reference"] = tv[8] / lat if 8 in tv else None
        if r.get("speedup_vs_torchvision_same_os") is None:
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
    note = f" | load average (1 min) {load['at_start'][0]:.1f} at start, {end[0]:.1f} at end"
    per = load.get("per_output_stride") or {}
    for key, v in per.items():
        others = v.get("others_busy_cores")
        note += (f"; {key.upper()}: {v.get('load1_before') or 0:.1f} -> {v.get('load1_after') or 0:.1f}"
                 + (f", others busy {others:.1f} cores" if others is not None else ""))
    return note


def _ratio(r: dict[str, Any]) -> str:
    med = r.get("speedup_vs_torchvision_same_os")
    if med is None:
        return "-"
    q1, q3 = r.get("speedup_same_os_q1"), r.get("speedup_same_os_q3")
    return f"{med:.2f}x" + (f" [{q1:.2f}-{q3:.2f}]" if q1 is not None and q3 is not None else "")


def _accuracy_kind(meta: dict[str, Any]) -> str:
    w = meta.get("weights") or {}
    return w.get("kind") or ("random" if str(w.get("description", "")).startswith("random") else "unknown")


def format_table(meta: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """The plain-text summary: a header naming model, machine, load, weights and inputs, then one line per row."""
    s = meta["settings"]
    m = meta["machine"]
    v = meta["versions"]
    kind = _accuracy_kind(meta)
    where = m["gpu"] or f"{m['cpu']} ({m['cpu_cores']} cores, {m['torch_threads']} torch threads)"
    libs = ", ".join(f"{k} {val}" for k, val in v.items() if val and k not in ("pytest-benchmark",))
    lines = [
        f"DeepLabv3-{s['backbone']} | {s['resolution']}x{s['resolution']} | batch {s['batch']} | "
        f"{s['device']} {s['dtype']} | {meta['created']}",
        f"machine: {where}" + _load_note(m.get("load_average"))
        + (f" | OMP_WAIT_POLICY={m['omp_wait_policy']}" if m.get("omp_wait_policy") else ""),
    ]
    if meta.get("noisy"):
        lines += ["!" * 100,
                  "!! NOISY RUN: " + "; ".join(meta.get("noisy_reasons") or []),
                  "!! Latencies are inflated and less repeatable; the per-round ratios hold better. Rerun on a "
                  "quieter machine, or with --threads 1.",
                  "!" * 100]
    lines += [f"versions: {libs}", f"weights: {meta['weights']['description']}"]
    lines.append(f"images: {meta['images']['description']}")
    timing = meta.get("timing") or {}
    rounds = ", ".join(f"{n} at {k.upper()}" for k, n in (timing.get("rounds") or {}).items())
    lines.append("latency: median (IQR) over interleaved rounds (every implementation once per round, order "
                 f"rotated{'; ' + rounds + ' rounds' if rounds else ''}); x tv = torchvision / row at the same OS, "
                 "per-round ratio median [q1-q3]; x ref = torchvision OS8 median / row median")
    if s.get("device") == "cuda":
        lines.append(f"cuDNN: torch.backends.cudnn.benchmark = {timing.get('cudnn_benchmark', True)} "
                     "(fastest algorithm per shape)")
    accuracy = ("err = max|out-ref|/max|ref| and agree = argmax agreement, both vs torchvision fp32 at the same "
                "OS (bf16/int8 rows: vs fp32); agree8 = vs torchvision fp32 OS8")
    if kind == "synthetic":
        accuracy += "; mIoU = against the true labels of the held-out synthetic scenes (synthetic, not VOC)"
    elif kind == "random":
        accuracy += ("; mIoU vs torchvision fp32 OS8 argmax. RANDOM WEIGHTS: OS16-vs-OS8 agree8/mIoU are n/a "
                     "(no meaning); err and agree stay meaningful")
    else:
        accuracy += "; mIoU vs torchvision fp32 OS8 argmax"
    lines.append("accuracy: " + accuracy)
    gflop = {r["output_stride"]: r["gflop"] for r in rows if r.get("gflop")}
    if gflop:
        lines.append("work: " + ", ".join(f"OS{k} {g:.1f} GFLOP/image" for k, g in sorted(gflop.items())))
    has_val = any(r.get("val_miou") is not None for r in rows)
    miou_key = "miou_ground_truth" if kind == "synthetic" else "miou_vs_reference"
    header = (f"{'implementation':<26}{'OS':>3} {'dtype':>8} {'median ms':>10} {'IQR':>7} {'x tv [q1-q3]':>19} "
              f"{'x ref':>6} {'GFLOP/s':>8} {'mem MB':>7} {'max err':>8} {'agree':>6} {'agree8':>6} {'mIoU':>6}"
              + (f" {'val mIoU':>8}" if has_val else "") + "  status")
    lines += ["", header, "-" * len(header)]
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason') or ''}"
        na = "n/a" if r.get("accuracy_note") else "-"
        lines.append(
            f"{r['implementation']:<26}{r['output_stride']:>3} {str(r.get('dtype') or '')[:8]:>8} "
            f"{_f(r['latency_ms_median'], '10.1f'):>10} {_f(r['latency_ms_iqr'], '7.1f'):>7} {_ratio(r):>19} "
            f"{_f(r['speedup_vs_reference'], '5.2f') + ('x' if r['speedup_vs_reference'] else ''):>6} "
            f"{_f(r['gflops'], '8.1f'):>8} {_f(r['peak_mem_mb'], '7.0f'):>7} "
            f"{_err(r['max_rel_logit_error']):>8} {_f(r.get('pixel_agreement_same_os'), '6.4f'):>6} "
            f"{_f(r['pixel_agreement'], '6.4f', na):>6} {_f(r.get(miou_key), '6.4f', na):>6}"
            + (f" {_f(r.get('val_miou'), '8.4f'):>8}" if has_val else "") + f"  {status}")
    described = {r["implementation"]: r.get("description") for r in rows if r.get("description")}
    if described:  # the README's table names its rows with these words
        width = max(len(n) for n in described)
        lines += ["", "rows:"] + [f"  {n:<{width}}  {d}" for n, d in described.items()]
    if any(r.get("accuracy_note") for r in rows):
        lines.append("n/a (random weights): OS16-vs-OS8 agreement and mIoU carry no meaning with random weights; "
                     "use torchvision weights (--weights COCO_WITH_VOC_LABELS_V1) or --weights synthetic "
                     "for them")
    if meta.get("noisy"):
        lines.append("!! NOISY RUN (see the header): " + (meta.get("advice") or ""))
    return "\n".join(lines)


def format_kernel_table(rows: Sequence[dict[str, Any]]) -> str:
    """Kernel micro-benchmark rows: shape, dtype, provider, time, TFLOP/s, % of the device's peak."""
    gpu = next((r["gpu"] for r in rows if r.get("gpu")), None)
    header = (f"{'case':<34}{'dtype':>9} {'provider':>9} {'median us':>10} {'TFLOP/s':>8} {'% peak':>7} "
              f"{'x cuDNN':>8}  status")
    peak = next((r["peak_tflops"] for r in rows if r.get("peak_tflops")), None)
    timer = next((r["timer"] for r in rows if r.get("timer")), "?")
    cudnn = next((r["cudnn_benchmark"] for r in rows if r.get("cudnn_benchmark") is not None), None)
    lines = [f"GPU: {gpu}; dense fp16/bf16 peak {_f(peak, '.0f', 'unknown')} TFLOP/s; timed with {timer}; "
             f"cuDNN rows with torch.backends.cudnn.benchmark = {cudnn}" if gpu else "", header,
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
        tmp.write_text(json_text(payload, indent=2, default=str) + "\n")  # strict: NaN as null
    stamped = directory / f"{stamp}.json"
    with atomic_path(stamped, suffix=".json") as tmp:
        shutil.copyfile(latest, tmp)
    return latest, stamped


def _plot_axis(meta: dict[str, Any]) -> tuple[str, str, bool]:
    """(row key, axis label, whether it is an accuracy) for the plot's y axis."""
    kind = _accuracy_kind(meta)
    if kind == "synthetic":
        return "miou_ground_truth", "mIoU on held-out synthetic scenes (synthetic, not VOC)", True
    if kind == "random":
        return ("speedup_vs_torchvision_same_os",
                "speed-up over torchvision eager, same OS (per-round ratio; accuracy n/a: random weights)", False)
    return "pixel_agreement", "pixel agreement with torchvision fp32 OS8", True


# A fixed colour and marker per implementation (never assigned by row order, so a row looks the same in every
# run): Okabe-Ito's colour-blind-safe hues plus black and grey; rows that share a hue differ in marker shape,
# never in shade alone.
_STYLES: dict[str, tuple[str, str]] = {
    "torchvision": ("#000000", "o"),
    "fastdeeplab": ("#999999", "o"),
    "optimize_torch": ("#D55E00", "s"),
    "optimize_onnxruntime": ("#0072B2", "s"),
    "optimize_openvino": ("#009E73", "s"),
    "openvino": ("#009E73", "P"),
    "onnxruntime_torchvision": ("#0072B2", "^"),
    "openvino_torchvision": ("#009E73", "^"),
    "optimize_bf16": ("#CC79A7", "D"),
    "openvino_torchvision_bf16": ("#CC79A7", "v"),
    "onnxruntime_int8": ("#E69F00", "X"),
    "triton": ("#56B4E9", "*"),
    "tensorrt": ("#F0E442", "h"),
    "torch_compile": ("#D55E00", "p"),
}


def plot_style(implementation: str) -> tuple[str, str]:
    """(colour, marker) of an implementation in the plot: fixed per name (unknown names: grey diamonds)."""
    return _STYLES.get(implementation, ("#666666", "d"))


def write_plot(path: Path, meta: dict[str, Any], rows: Sequence[dict[str, Any]]) -> Path | None:
    """Latency (median, IQR error bars, log scale) against accuracy, or against the per-round speed-up when
    accuracy has no meaning (random weights); one panel per output stride, a legend beside each (fixed colour
    and marker per implementation, :func:`plot_style`). Returns None when no row has both numbers."""
    key, ylabel, is_accuracy = _plot_axis(meta)
    if not any(r.get(key) is not None for r in rows):  # e.g. rows from an older run
        key, ylabel, is_accuracy = "pixel_agreement", "pixel agreement with torchvision fp32 OS8", True
    points = [r for r in rows if r.get("latency_ms_median") and r.get(key) is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    strides = sorted({r["output_stride"] for r in points}, reverse=True)
    fig, axes = plt.subplots(len(strides), 1, figsize=(12.5, 4.2 * len(strides) + 0.8), dpi=110, squeeze=False)
    for ax, stride in zip(axes[:, 0], strides, strict=True):
        pts = [r for r in points if r["output_stride"] == stride]
        xs = [r["latency_ms_median"] for r in pts]
        ys = [r[key] for r in pts]
        for r, x, y in zip(pts, xs, ys, strict=True):
            q1, q3 = r.get("latency_ms_q1"), r.get("latency_ms_q3")
            xerr = [[x - q1], [q3 - x]] if q1 is not None and q3 is not None else None
            yerr = None
            if not is_accuracy and r.get("speedup_same_os_q1") is not None:
                yerr = [[y - r["speedup_same_os_q1"]], [r["speedup_same_os_q3"] - y]]
            colour, marker = plot_style(r["implementation"])
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=marker, color=colour, markeredgecolor="black",
                        markeredgewidth=0.5, markersize=8, capsize=3, zorder=3,
                        label=textwrap.shorten(f"{r['implementation']}: {r.get('description') or ''}", 64,
                                              placeholder=" ..."))
        xs_all = xs + [r[k] for r in pts for k in ("latency_ms_q1", "latency_ms_q3") if r.get(k)]
        xlim = (min(xs_all) / 1.15, max(xs_all) * 1.15)
        extent = list(ys)  # the error bars stay inside the panel
        if not is_accuracy:
            extent += [r[k] for r in pts for k in ("speedup_same_os_q1", "speedup_same_os_q3") if r.get(k) is not None]
        span = max(extent) - min(extent)
        pad = 0.12 * max(span, 0.02 if is_accuracy else 0.1)
        ylim = (min(extent) - pad, max(extent) + pad)
        ax.set_xscale("log")
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xlabel("latency per forward, median with IQR (ms, log scale)")
        ax.set_ylabel(ylabel if len(ylabel) < 45 else ylabel.split(" (")[0], fontsize=9)
        ax.set_title(f"output stride {stride}", fontsize=10, loc="left")
    s = meta["settings"]
    noisy = " | NOISY RUN" if meta.get("noisy") else ""
    fig.suptitle(f"DeepLabv3-{s['backbone']} {s['resolution']}x{s['resolution']} batch {s['batch']}, "
                 f"{s['device']} {s['dtype']}{noisy}\nweights: {str(meta['weights'].get('description', '')).split(':')[0][:110]}",
                 fontsize=9)
    if not is_accuracy:
        fig.text(0.01, 0.005, ylabel, fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 0.6, 0.97))
    # one legend for both panels, right of them: no labels among the points, so no line runs through a label
    legend: dict[str, Any] = {}
    for ax in axes[:, 0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="center left", bbox_to_anchor=(0.605, 0.5),
               fontsize=8, frameon=False, labelspacing=0.9)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
