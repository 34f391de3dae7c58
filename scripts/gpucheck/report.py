"""``gpucheck.md``: the run's JSON as tables, one section per stage (rows grouped by their ``kind``)."""

from __future__ import annotations

from typing import Any

__all__ = ["render_markdown", "render_summary"]


def _fmt(value: Any, spec: str) -> str:
    if value is None or value == "":
        return ""
    if spec == "pct":
        return f"{100 * value:.1f}%"
    if spec == "sci":
        return f"{value:.1e}"
    if isinstance(value, float):
        return format(value, spec)
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value).replace("|", "/").replace("\n", " ")


# kind -> [(header, key, format)]; the last column of every table says what went wrong or why it was skipped
COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    "stage_error": [("stage", "stage", ""), ("CUDA error", "cuda_error", ""), ("error", "message", "")],
    "build": [("kernel", "kernel", ""), ("dtype", "dtype", ""), ("config", "config", ""),
              ("variant", "variant", ""), ("seconds", "seconds", ".2f"), ("ok", "ok", "")],
    "kernel": [("kernel", "kernel", ""), ("case", "case", ""), ("dtype", "dtype", ""), ("config", "config", ""),
               ("TMA", "tma", ""), ("sweep", "sweep", ""),
               ("max rel err", "max_rel_error", "sci"), ("atol/rtol", "atol", "sci"), ("ok", "ok", "")],
    "model_check": [("OS", "output_stride", ""), ("dtype", "dtype", ""), ("input", "input", ""),
                    ("max rel err", "max_rel_error", "sci"), ("tolerance", "tolerance", "sci"),
                    ("pixels agree", "pixel_agreement", "pct"), ("ok", "ok", ""), ("seconds", "seconds", ".1f")],
    "conv": [("model", "model", ""), ("layer", "layer", ""), ("shape", "shape", ""), ("dtype", "dtype", ""),
             ("OS", "output_strides", ""),
             ("×", "layers", ""), ("Triton ms", "triton_ms", ".4f"), ("cuDNN ms", "cudnn_ms", ".4f"),
             ("Triton TFLOP/s", "triton_tflops", ".3g"), ("% peak", "triton_peak", "pct"),
             ("cuDNN TFLOP/s", "cudnn_tflops", ".3g"), ("% peak", "cudnn_peak", "pct"),
             ("Triton GB/s", "triton_gbps", ".0f"), ("cuDNN GB/s", "cudnn_gbps", ".0f"),
             ("cuDNN/Triton", "speedup", ".2f"), ("faster", "faster", ""), ("rel err", "max_rel_error", "sci"),
             ("1st call s", "first_call_s", ".2f")],
    "model": [("model", "model", ""), ("OS", "output_stride", ""), ("batch", "batch", ""), ("impl", "impl", ""), ("dtype", "dtype", ""),
              ("median ms", "median_ms", ".2f"), ("IQR ms", "iqr", ".2f"), ("img/s", "images_per_s", ".1f"),
              ("vs torchvision eager", "speedup", ".2f"), ("max rel err", "max_rel_error", "sci"),
              ("tolerance", "tolerance", "sci"), ("pixels agree", "pixel_agreement", "pct"),
              ("1st call s", "first_call_s", ".1f")],
    "model_first": [("model", "model", ""), ("OS", "output_stride", ""), ("batch", "batch", ""), ("impl", "impl", ""), ("dtype", "dtype", ""),
                    ("1st call s", "first_call_s", ".2f"), ("max rel err", "max_rel_error", "sci")],
    "dispatch": [("model", "model", ""), ("OS", "output_stride", ""), ("layer", "layer", ""), ("problem", "key", ""),
                 ("Triton µs", "triton_us", ".1f"), ("cuDNN µs", "cudnn_us", ".1f"), ("choice", "choice", ""),
                 ("reason", "reason", "")],
}
TITLES = {"stage_error": "The error that ended the stage",
          "build": "Builds (stage 0, in parallel, into the shared Triton cache)",
          "model_first": "Whole model, first calls (written before the timing loop: autotuning, dispatch, compile)",
          "kernel": "Kernels against their float64 twins",
          "model_check": "optimize(backend='triton') against the eager model, float32",
          "conv": "Triton against cuDNN, per conv problem",
          "model": "Whole model (accuracy against torchvision fp32, TF32 off)",
          "dispatch": "Per-layer dispatch decisions (optimize triton, dispatch='auto')"}


def _note(row: dict[str, Any]) -> str:
    parts = []
    if row.get("kind") == "stage_error":
        return _fmt(row.get("note"), "")
    if row.get("skipped"):
        parts.append(f"skipped: {row['skipped']}")
    if row.get("ok") is False and row.get("kind") != "build":
        parts.append("**FAIL**" + (f": {row['message']}" if row.get("message") else ""))
    elif row.get("ok") is False:
        parts.append(f"**FAIL**: {row.get('message')}")
    if row.get("note"):
        parts.append(row["note"])
    return _fmt("; ".join(parts)[:300], "")


def _table(kind: str, rows: list[dict[str, Any]]) -> list[str]:
    cols = COLUMNS[kind]
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " | note |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        if kind == "model" and r.get("q1_ms") is not None:
            r = dict(r, iqr=r["q3_ms"] - r["q1_ms"])
        lines.append("| " + " | ".join(_fmt(r.get(k), f) for _, k, f in cols) + f" | {_note(r)} |")
    return lines


def _dispatch_summary(rows: list[dict[str, Any]]) -> list[str]:
    counts: dict[tuple, int] = {}
    for r in rows:
        if r.get("choice"):
            key = (str(r.get("model") or ""), r.get("output_stride"), r["choice"])
            counts[key] = counts.get(key, 0) + 1
    return [f"- {model + ' ' if model else ''}OS{os_}: {n} problems run on {choice}"
            for (model, os_, choice), n in sorted(counts.items())]


def render_summary(result: dict[str, Any]) -> str:
    """What the driver prints last (a console keeps the end of the output): the header, the stage table,
    the failures, the dispatch counts and the whole-model table."""
    full = render_markdown(result, kinds=("model",))
    failures = [f"- {name}: {r.get('kernel') or r.get('layer') or r.get('impl') or r.get('kind')} "
                f"{r.get('case') or r.get('shape') or ''} {r.get('dtype') or ''}: {_note(r)}"
                for name, stage in result.get("stages", {}).items() for r in stage.get("rows", [])
                if r.get("ok") is False]
    dispatch = [r for stage in result.get("stages", {}).values() for r in stage.get("rows", [])
                if r.get("kind") == "dispatch"]
    extra = (["", "Failed checks:", *failures[:20]] if failures else []) + (
        ["", "Dispatch:", *_dispatch_summary(dispatch)] if dispatch else [])
    return full + "\n".join(extra) + ("\n" if extra else "")


def render_markdown(result: dict[str, Any], kinds: tuple[str, ...] | None = None) -> str:
    """The whole report; ``kinds`` limits the tables to those row kinds."""
    env = result.get("environment") or {}
    versions = env.get("versions") or {}
    gpu = env.get("gpu") or {}
    smi = env.get("nvidia_smi") or {}
    out = [f"# GPU check ({result.get('mode')})", "",
           f"- started {result.get('started')}, finished {result.get('finished') or '(running)'}, "
           f"{result.get('seconds')} s in all; `{result.get('command')}`",
           f"- package: {result.get('import_mode')}; python {versions.get('python')}, torch {versions.get('torch')} "
           f"(CUDA {versions.get('cuda')}, cuDNN {versions.get('cudnn')}), triton {versions.get('triton')}, "
           f"torchvision {versions.get('torchvision')}"]
    if gpu:
        out.append(f"- GPU: {gpu.get('name')} ({gpu.get('capability')}, {gpu.get('sm_count')} SMs, "
                   f"{gpu.get('memory_gib')} GiB, L2 {gpu.get('l2_mib')} MiB); nominal dense fp16/bf16 peak "
                   f"{gpu.get('peak_fp16_tflops_nominal')} TFLOP/s (datasheet)")
    else:
        out.append("- GPU: none (CPU; the Triton interpreter runs the kernels)")
    if smi.get("available"):
        out.append(f"- nvidia-smi at start: driver {smi.get('driver_version')}, {smi.get('pstate')}, SM clock "
                   f"{smi.get('clocks.sm')} (max {smi.get('clocks.max.sm')}), memory clock {smi.get('clocks.mem')}, "
                   f"power {smi.get('power.draw')} / {smi.get('power.limit')}, {smi.get('temperature.gpu')} °C, "
                   f"utilization {smi.get('utilization.gpu')}, memory used {smi.get('memory.used')}")
    else:
        out.append(f"- nvidia-smi: {smi.get('reason', 'not run')}")
    if result.get("autotune"):
        out.append(f"- kernels' autotuning during the check: {result['autotune']}")
    plan = result.get("plan")
    if plan:
        out.append(f"- plan (sm_90 assumed, `--plan`): estimated {plan.get('total_estimated_s')} s of "
                   f"{plan.get('total_limit_s')} s at the limits; per stage (estimate / limit): "
                   + ", ".join(f"{n} {s.get('estimated_s')}/{s.get('limit_s')} s"
                               for n, s in (plan.get("stages") or {}).items()))
    planned = (plan or {}).get("stages") or {}
    out += ["", "| stage | status | seconds | estimate s | limit s | rows |", "|---|---|---|---|---|---|"]
    for name, stage in result.get("stages", {}).items():
        out.append(f"| {name} | {stage['status']} | {stage.get('seconds')} | "
                   f"{(planned.get(name) or {}).get('estimated_s', '')} | {stage.get('limit_s')} | "
                   f"{len(stage.get('rows', []))} |")
    for name, stage in result.get("stages", {}).items():
        rows = stage.get("rows", [])
        out += ["", f"## Stage {name}: {stage['status']}", ""]
        for r in rows:
            if r.get("kind") == "info":
                out.append("- " + ", ".join(f"{k}: {v}" for k, v in r.items() if k != "kind"))
        for kind in COLUMNS:
            if kinds is not None and kind not in kinds:
                continue
            chosen = [r for r in rows if r.get("kind") == kind]
            if not chosen:
                continue
            out += ["", f"### {TITLES[kind]}", ""]
            if kind == "dispatch":
                out += _dispatch_summary(chosen) + [""]
            out += _table(kind, chosen)
        other = [r for r in rows if r.get("kind") not in COLUMNS and r.get("kind") != "info" and kinds is None]
        for r in other:
            out.append(f"- {r}")
    return "\n".join(out) + "\n"
