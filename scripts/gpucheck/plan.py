"""The GPU check's plan: what each stage will compile, autotune and time, counted from the real code, and
what that costs, so the check fits its window before it starts (``bash scripts/gpu_check.sh --plan OUTDIR``).

Counts come from the stages' own case lists (``kernel_bench.cases``, ``correctness.kernel_cases``,
``correctness.model_check_launches``, ``whole_model.model_stage_launches``) turned into launches
(:mod:`gpucheck.launches`), with the real early prunes run on them as Triton runs them, on an assumed sm_90
GPU:

* ``autotune_keys`` — launches whose Triton autotune key no earlier stage tuned (the kernels cache tuning
  results on disk, ``cache_results``, in the ``TRITON_CACHE_DIR`` every stage shares);
* ``config_benchmarks`` — the configs the autotuner times for those keys (after the prune; Triton times
  even a lone survivor);
* ``compiles`` — distinct builds (Triton's compile-cache key for sm_90, :func:`gpucheck.launches.variant`)
  the stage needs; stage 0 builds all of them in parallel, so the later stages only load them
  (``cache_loads``);
* ``estimated_s`` — from the unit costs below; ``limit_s`` — the stage's limit in the driver.

Unit costs (``UNIT_COSTS``) say where each comes from: *measured* on this project's CPU, *configured* (the
check's own settings), or *estimate* (no GPU has run this project yet) with how it was reached.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from typing import Any

from .common import AUTOTUNE_ENV, CHECK_AUTOTUNE_MS, Plan, autotune_ms

__all__ = ["HOST_CORES", "LIMITS_S", "SETUP_LIMIT_S", "UNIT_COSTS", "build_plan", "dry_jobs", "format_table",
           "measure_compile_s"]

HOST_CORES = 16  # the GPU machine's host (H100/H200 lent with 16 cores)
# Stage limits (seconds); with the setup allowance and the kill grace after each stage they sum to 480 s.
LIMITS_S = {"precompile": 60, "correctness": 45, "kernels": 85, "model": 235}
SETUP_LIMIT_S = 35  # Python start-up and imports, nvidia-smi (10 s at most), the plan (~21 s estimated)
GRACE_S = 5
WINDOW_S = 480
PLAN_S = 12.0  # computing the plan on the GPU host (see "setup" in build_plan)

# seconds; (value, source)
UNIT_COSTS: dict[str, tuple[float, str]] = {
    "compile_s": (0.85, "measured: CPU seconds (process + ptxas) of one sm_90 build, median of 3 distinct 3x3 conv "
                        "builds into an empty TRITON_CACHE_DIR (`--plan --measure-compile`): 0.63 s with triton 3.6 "
                        "(the GPU machine's), 0.85 s with triton 3.8, on the project's 2-core AMD EPYC CPU at load "
                        "19-22; the larger is used"),
    "cache_load_s": (0.01, "measured 0.003 s on the CPU to find and read a built variant in TRITON_CACHE_DIR "
                           "(compile_variant a second time); estimate +0.007 s for loading the module on the GPU"),
    "startup_s": (7.0, "measured: `python -c 'import torch, torchvision, triton'` takes 6.8 s of CPU (17 s wall on "
                       "2 cores at load 4.4); a stage subprocess pays it once"),
    "compile_parallel_efficiency": (0.6, "estimate: 16 build processes on 16 cores do not scale perfectly (Python "
                                         "start-up per worker, LLVM's memory traffic)"),
    "autotune_bench_overhead_s": (0.005, "estimate: triton.testing.do_bench's first call and ~5 timing calls before "
                                         "its warm-up and repeat windows, and a sync"),
    "cudnn_first_s": (0.1, "estimate: cudnn.benchmark tries its algorithms once per new convolution shape and "
                           "dtype"),
    "case_setup_s": (0.03, "estimate: seeded inputs on the GPU, the comparison, the row"),
    "correctness_case_s": (0.05, "estimate: one small forced-config launch, its float64 twin on the GPU, the check"),
    "model_build_s": (4.0, "estimate: from_torchvision + optimize (BN folding, weight packing) of ResNet-50 and "
                           "moving three models to the GPU, per output stride"),
    "weights_s": (3.0, "estimate: the bench suite's seeded weights, BN statistics from one train-mode pass on the "
                       "CPU over six 129x129 photographs (~2 s measured on the 2-core CPU)"),
    "torch_compile_s": (60.0, "estimate: Inductor (default mode) of DeepLabv3-ResNet-50 for CUDA; ~35 s for the CPU "
                              "graph on the project's 2-core CPU (bench/_impls.py), 16 compile workers on the GPU "
                              "host; the stage gives each compile Plan.compile_s = 60 s or skips it"),
    "graph_capture_s": (1.0, "estimate: CUDA-graph warm-up calls and capture"),
    "forward_floor_s": (0.005, "estimate: the least one whole forward takes, launch-bound (MobileNetV3 at batch 1: "
                               "~200 kernel launches at ~10-25 us of host time each in eager PyTorch)"),
    "tflops_fp16": (150.0, "estimate: effective dense TFLOP/s of a whole fp16 forward on an H100 (15% of the "
                           "989 TFLOP/s datasheet peak), for the timing loop's length"),
    "tflops_fp32": (25.0, "estimate: effective TFLOP/s of the fp32 reference with TF32 off on an H100 (67 "
                          "TFLOP/s datasheet)"),
}


def unit(name: str) -> float:
    return UNIT_COSTS[name][0]


def _dispatch_timing_ms(environ: dict) -> tuple[float, float]:
    """The dispatcher's ``time_cuda`` warm-up and repeat (ms) per side: ``$FASTDEEPLAB_AUTOTUNE_MS`` when it
    follows that setting, else its own default, both read from kernels/dispatch.py."""
    import inspect
    import re

    import fastdeeplab.kernels.dispatch as dispatch

    text = inspect.getsource(dispatch)
    number = r"(\d+(?:\.\d+)?)"
    follows = re.search(rf"autotune_timing\(\) or \({number}, {number}\)", text)
    if follows:
        return autotune_ms(environ) if environ.get(AUTOTUNE_ENV) else (float(follows[1]), float(follows[2]))
    fixed = re.search(rf"time_cuda\(fn, warmup_ms={number}, rep_ms={number}\)", text)
    return (float(fixed[1]), float(fixed[2])) if fixed else (25.0, 100.0)


def measure_compile_s(samples: int = 3) -> float:
    """Median CPU seconds (the process and ptxas) of one sm_90 build (three 3×3 conv configs: distinct builds)
    into an empty, temporary
    ``TRITON_CACHE_DIR``, in a child process (the measurement needs a clean cache and no interpreter)."""
    import json
    import subprocess
    import sys
    import tempfile

    code = (
        "import json, os, sys, time\n"
        "sys.path[:0] = sys.argv[1:3]\n"
        "from gpucheck.launches import Launch, compile_variant, config_of, gpu_configs\n"
        "times = []\n"
        "base = Launch('conv', 'fp16', 1, 256, 256, 33, 33, k=3, padding=2, dilation=2)\n"
        f"for config in gpu_configs(base)[:{samples}]:\n"
        "    l = base.forced(config)\n"
        "    times.append(compile_variant(l, config_of(l))['cpu_seconds'])\n"
        "print(json.dumps(times))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = cache
        res = subprocess.run([sys.executable, "-c", code, os.path.join(root, "scripts"), root], env=env,
                             capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"measuring a compile failed: {res.stderr[-800:]}")
    times = sorted(json.loads(res.stdout.strip().splitlines()[-1]))
    return times[len(times) // 2]


class _Counter:
    """Accumulates one stage's launches against what earlier stages already tuned and built."""

    def __init__(self, tuned: set, built: set) -> None:
        self.tuned, self.built = tuned, built
        self.keys: set = set()
        self.benchmarks = 0
        self.variants: set = set()
        self.new_builds: set = set()
        self.tuned_list: list[dict[str, Any]] = []  # each new key's launch and its benchmarked config count

    def add(self, launches: Iterable) -> dict[str, int]:
        """Count launches; returns what they added (keys, benchmarks, builds) for per-case costing."""
        from .launches import autotune_key, candidates, variant

        added = {"keys": 0, "benchmarks": 0, "builds": 0}
        for launch in launches:
            configs = candidates(launch)
            for config in configs:
                v = variant(launch, config)
                if v not in self.variants:
                    self.variants.add(v)
                    added["builds"] += 1
                if v not in self.built:
                    self.new_builds.add(v)
            if launch.config is None:
                key = autotune_key(launch)
                if key not in self.tuned and key not in self.keys:
                    self.keys.add(key)
                    self.benchmarks += len(configs)
                    self.tuned_list.append({"launch": launch.as_dict(), "configs": len(configs)})
                    added["keys"] += 1
                    added["benchmarks"] += len(configs)
        return added

    def close(self) -> None:
        self.tuned |= self.keys
        self.built |= self.variants


def build_plan(*, compile_s: float | None = None, environ: dict | None = None, workers: int = HOST_CORES,
               with_variants: bool = True) -> dict[str, Any]:
    """The plan as a JSON-ready dict: per-stage counts and estimates, unit costs, totals, and (for stage 0)
    the launches and configs to build. ``environ``: where ``FASTDEEPLAB_AUTOTUNE_MS`` is read (default: the
    check's own setting, 5,20)."""
    from . import correctness, kernel_bench, whole_model
    from .launches import assume_sm90, candidates, config_id

    start = time.perf_counter()
    environ = environ if environ is not None else {AUTOTUNE_ENV: ",".join(map(str, CHECK_AUTOTUNE_MS))}
    warmup_ms, rep_ms = autotune_ms(environ)
    plan = Plan.gpu(device="cpu")
    costs = {name: {"value": value, "source": source} for name, (value, source) in UNIT_COSTS.items()}
    if compile_s is not None:
        costs["compile_s"] = {"value": compile_s, "source": "measured now by --measure-compile: median CPU seconds "
                                                            "(process + ptxas) of 3 distinct sm_90 builds into an "
                                                            "empty cache on this machine"}
    compile_one = costs["compile_s"]["value"]
    bench_s = (warmup_ms + rep_ms) / 1e3 + unit("autotune_bench_overhead_s")
    costs["autotune_bench_s"] = {"value": round(bench_s, 4), "source": (
        f"configured: {AUTOTUNE_ENV}={warmup_ms:g},{rep_ms:g} (do_bench warm-up + repeat, ms) + the overhead above; "
        "Triton's default would be 25+100 ms")}
    time_s = (plan.warmup_ms + plan.rep_ms) / 1e3 + unit("autotune_bench_overhead_s")
    costs["time_cuda_s"] = {"value": round(time_s, 4), "source": (
        f"configured: the kernel stage times each side with time_cuda({plan.warmup_ms:g} ms warm-up, "
        f"{plan.rep_ms:g} ms repeat) + overhead")}
    d_warm, d_rep = _dispatch_timing_ms(environ)
    dispatch_s = 2 * ((d_warm + d_rep) / 1e3 + unit("autotune_bench_overhead_s")) + unit("case_setup_s")
    costs["dispatch_key_s"] = {"value": round(dispatch_s, 4), "source": (
        f"configured: the dispatcher times each side with time_cuda({d_warm:g} ms, {d_rep:g} ms) "
        "(kernels/dispatch.py, following the autotune setting), plus the output comparison")}
    load_s = unit("cache_load_s")

    tuned: set = set()
    built: set = set()
    stages: dict[str, dict[str, Any]] = {}
    with assume_sm90():
        # ---- stage 1: correctness (forced configs, then the fp32 whole-model checks, autotuned)
        kcases = correctness.kernel_cases(plan, device=0)
        c1 = _Counter(tuned, built)
        c1.add(launch for case in kcases for launch in case.launches())
        model_checks = correctness.model_check_launches(plan)
        c1.add(model_checks)
        est1 = (unit("startup_s") + sum(len(c.launches()) for c in kcases) * (unit("correctness_case_s") + load_s)
                + unit("weights_s")
                + len(plan.output_strides) * unit("model_build_s") + c1.benchmarks * bench_s
                + len(c1.variants) * load_s)
        stages["correctness"] = dict(cases=len(kcases) + len(plan.output_strides), kernel_cases=len(kcases),
                                     sweep_cases=sum(c.sweep for c in kcases),
                                     tma_cases=sum(bool(c.config.kwargs.get("USE_TMA")) for c in kcases),
                                     autotune_keys=len(c1.keys), config_benchmarks=c1.benchmarks, compiles=0,
                                     cache_loads=len(c1.variants), estimated_s=est1, tuned=c1.tuned_list)
        c1.close()

        # ---- stage 2: kernels (autotuned, one launch per case; per-case cost decides how many fit)
        kcases2 = kernel_bench.cases(plan)
        c2 = _Counter(tuned, built)
        limit2 = LIMITS_S["kernels"] - 6  # the stage stops starting cases 6 s before its limit
        elapsed = unit("startup_s")
        reach = 0
        for dtype, entry, batch in kcases2:
            added = c2.add(kernel_bench.launches_of(entry, batch, dtype))
            cost = (added["benchmarks"] * bench_s + added["builds"] * load_s + unit("cudnn_first_s")
                    + 2 * time_s + unit("case_setup_s"))
            if elapsed + cost > limit2:
                break
            elapsed += cost
            reach += 1
        # the cases past `reach` are not run: count only what was reached
        c2 = _Counter(tuned, built)
        c2.add(launch for d, e, b in kcases2[:reach] for launch in kernel_bench.launches_of(e, b, d))
        stages["kernels"] = dict(cases=reach, cases_total=len(kcases2), autotune_keys=len(c2.keys),
                                 config_benchmarks=c2.benchmarks, compiles=0, cache_loads=len(c2.variants),
                                 estimated_s=elapsed, tuned=c2.tuned_list)
        c2.close()

        # ---- stage 3: whole model (dispatch "auto": each new key timed against cuDNN; torch.compile rows)
        from .models import conv_layers

        settings = whole_model.model_stage_launches(plan)
        c3 = _Counter(tuned, built)
        dispatch_keys = 0
        timing_s = 0.0
        first_calls = 0.0
        per_model: dict[str, float] = {}
        for (spec, output_stride, batch), launches in settings.items():
            before = c3.benchmarks * bench_s + len(c3.variants) * load_s
            c3.add(launches)
            keys = len({launch for launch in launches if not launch.sums})  # an SE layer: one decision, 2 launches
            dispatch_keys += keys
            convs = conv_layers(spec, output_stride, plan.resolution)
            flop = batch * sum(_conv_flop(c) for c in convs)
            # the fp32 reference and five fp16 rows per round, each at least a launch-bound forward
            per_round = (max(flop / (unit("tflops_fp32") * 1e12), unit("forward_floor_s"))
                         + 5 * max(flop / (unit("tflops_fp16") * 1e12), unit("forward_floor_s")))
            timing_s += plan.rounds * per_round
            # cuDNN's first call of each conv shape of the model, in fp32 (the reference) and fp16 (eager,
            # optimize torch and the dispatcher's cuDNN side share the fp16 shapes), and the CUDA graph's capture
            shapes = {tuple(c[k] for k in ("cin", "cout", "h", "w", "k", "stride", "padding", "dilation", "groups"))
                      for c in convs}
            first = 2 * len(shapes) * unit("cudnn_first_s") + unit("graph_capture_s")
            first_calls += first
            per_model[spec] = (per_model.get(spec, 0.0) + c3.benchmarks * bench_s + len(c3.variants) * load_s
                               - before + keys * dispatch_s + first + plan.rounds * per_round)
        model_settings = whole_model.model_settings(plan)
        compiles = 2 * len(plan.compile_strides) * sum(1 for b in plan.batches if b in plan.compile_batches)
        per_model[plan.model] += compiles * unit("torch_compile_s")
        for spec in per_model:
            per_model[spec] += unit("weights_s") + sum(unit("model_build_s") for m, _, _ in model_settings if m == spec)
        est3 = (unit("startup_s") + len({m for m, _, _ in model_settings}) * unit("weights_s")
                + len(model_settings) * unit("model_build_s")
                + c3.benchmarks * bench_s + len(c3.variants) * load_s + dispatch_keys * dispatch_s + first_calls
                + timing_s + compiles * unit("torch_compile_s"))
        stages["model"] = dict(cases=len(settings) * 7, settings=len(settings), autotune_keys=len(c3.keys),
                               config_benchmarks=c3.benchmarks, dispatch_keys=dispatch_keys, torch_compiles=compiles,
                               compiles=0, cache_loads=len(c3.variants), estimated_s=est3,
                               estimated_s_per_model={k: round(v, 1) for k, v in per_model.items()},
                               tuned=c3.tuned_list)
        c3.close()

        # ---- stage 0: every build the three stages need, in parallel
        jobs: list[dict[str, Any]] = []
        seen: set = set()
        if with_variants:
            from .launches import variant

            every = ([launch for c in kcases for launch in c.launches()] + model_checks
                     + [launch for d, e, b in kcases2[:reach] for launch in kernel_bench.launches_of(e, b, d)]
                     + [launch for launches in settings.values() for launch in launches])
            for launch in every:
                for config in candidates(launch):
                    v = variant(launch, config)
                    if v not in seen:
                        seen.add(v)
                        jobs.append({"launch": launch.as_dict(), "config": config_id(config), "variant": v})
        n_builds = len(jobs) if with_variants else len(built)
        waves = math.ceil(n_builds / max(workers, 1))
        est0 = (unit("startup_s") + waves * compile_one / unit("compile_parallel_efficiency")
                + 2.0)  # workers' own start-up (forked: imports are shared) and the pool's teardown
    stage0 = dict(cases=n_builds, autotune_keys=0, config_benchmarks=0, compiles=n_builds, cache_loads=0,
                  workers=workers, estimated_s=est0)
    ordered = {"precompile": stage0, **stages}
    for name, stage in ordered.items():
        stage["estimated_s"] = round(stage["estimated_s"], 1)
        stage["limit_s"] = LIMITS_S[name]
    setup_est = unit("startup_s") + 2.0 + PLAN_S
    total_est = setup_est + sum(s["estimated_s"] for s in ordered.values())
    total_limit = SETUP_LIMIT_S + sum(LIMITS_S.values()) + GRACE_S * len(LIMITS_S)
    return {
        "schema": 1,
        "assumed": {"gpu": f"sm_{90} (H100/H200)", "host_cores": workers, "resolution": plan.resolution,
                    "output_strides": list(plan.output_strides), "kernel_batches": list(plan.kernel_batches),
                    "model_batches": list(plan.batches), "check_input": list(plan.check_input)},
        "autotune_ms": {"warmup": warmup_ms, "rep": rep_ms, "env": f"{AUTOTUNE_ENV}={warmup_ms:g},{rep_ms:g}"},
        "unit_costs": costs,
        "setup": {"estimated_s": setup_est, "limit_s": SETUP_LIMIT_S,
                  "source": f"estimate: Python start-up and imports ({unit('startup_s'):g} s, measured), nvidia-smi "
                            f"and the environment (2 s), computing this plan ({PLAN_S:g} s: 35 s measured on the "
                            "project's 2-core CPU at load 12, ~3x less on a free 16-core host)"},
        "grace_s": GRACE_S,
        "stages": ordered,
        "total_estimated_s": round(total_est, 1),
        "total_limit_s": total_limit,
        "window_s": WINDOW_S,
        "precompile_jobs": jobs,
        "seconds_to_plan": round(time.perf_counter() - start, 1),
    }


def _conv_flop(c: dict) -> float:
    """Dense FLOPs of one conv of :func:`gpucheck.models.conv_layers` at batch 1 (groups counted)."""
    oh = (c["h"] + 2 * c["padding"] - c["dilation"] * (c["k"] - 1) - 1) // c["stride"] + 1
    ow = (c["w"] + 2 * c["padding"] - c["dilation"] * (c["k"] - 1) - 1) // c["stride"] + 1
    return 2.0 * oh * ow * c["cout"] * c["cin"] // c["groups"] * c["k"] ** 2


COLUMNS = ("cases", "autotune_keys", "config_benchmarks", "compiles", "cache_loads", "estimated_s", "limit_s")


def format_table(plan: dict[str, Any]) -> str:
    """The per-stage table and the unit costs, as markdown."""
    lines = ["| stage | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    setup = plan["setup"]
    lines.append("| setup | | | | | | " + f"{setup['estimated_s']} | {setup['limit_s']} |")
    for name, stage in plan["stages"].items():
        lines.append(f"| {name} | " + " | ".join(str(stage.get(c, "")) for c in COLUMNS) + " |")
    lines.append(f"| kill grace | | | | | | | {plan['grace_s']} x {len(plan['stages'])} |")
    lines.append(f"| **total** | | | | | | **{plan['total_estimated_s']}** | **{plan['total_limit_s']}** "
                 f"(window {plan['window_s']}) |")
    s = plan["stages"]
    notes = [
        "",
        f"Assumed: {plan['assumed']['gpu']}, {plan['assumed']['host_cores']} host cores; autotune timing "
        f"{plan['autotune_ms']['env']}.",
        f"- precompile: {s['precompile']['compiles']} builds on {s['precompile']['workers']} processes.",
        f"- correctness: {s['correctness']['kernel_cases']} forced-config kernel cases ({s['correctness']['sweep_cases']} "
        f"in the every-config sweep, {s['correctness']['tma_cases']} on TMA configs) + the fp32 whole-model checks.",
        f"- kernels: reaches {s['kernels']['cases']} of {s['kernels']['cases_total']} cases "
        f"({s['kernels']['config_benchmarks'] / max(s['kernels']['autotune_keys'], 1):.1f} configs benchmarked per "
        "new autotune key).",
        f"- model: {s['model']['settings']} settings, {s['model']['dispatch_keys']} dispatch decisions, "
        f"{s['model']['torch_compiles']} torch.compile runs; estimated per model: "
        + ", ".join(f"{k} {v} s" for k, v in s["model"].get("estimated_s_per_model", {}).items()) + ".",
        "",
        "| unit cost | seconds | where from |",
        "|---|---:|---|",
    ]
    for name, cost in plan["unit_costs"].items():
        notes.append(f"| {name} | {cost['value']:g} | {cost['source']} |")
    return "\n".join(lines + notes) + "\n"


def dry_jobs(plan: Plan) -> list[dict[str, Any]]:
    """Stage 0's job list in the dry run: the dry kernel stage's launches with the configs it forces, plus
    one TMA build of its first 3×3 problem, built for sm_90 on the CPU (the mechanism, on a few builds)."""
    import fastdeeplab.kernels.aspp as aspp_kernels
    import fastdeeplab.kernels.conv as conv_kernels

    from . import kernel_bench
    from .launches import config_id, variant

    conv_configs = conv_kernels.get_autotune_configs(for_interpreter=False)
    project_config = aspp_kernels.get_autotune_configs(for_interpreter=False)[0]
    import fastdeeplab.kernels.depthwise as dw_kernels

    dw_config = dw_kernels.get_autotune_configs(for_interpreter=False)[0]
    launches = []
    for dtype, entry, batch in kernel_bench.cases(plan):
        config = (project_config if entry["label"] == "ASPP projection"
                  else dw_config if entry.get("kind") == "depthwise" else conv_configs[0])
        launches += kernel_bench.launches_of(entry, batch, dtype, config=config)
    tma = [c for c in conv_configs if c.kwargs.get("USE_TMA")]
    three = [launch for launch in launches if launch.kernel == "conv" and launch.k == 3 and launch.stride == 1]
    if tma and three:
        launches.append(three[0].forced(tma[0]))
    jobs, seen = [], set()
    for launch in launches:
        from .launches import config_of

        config = config_of(launch)
        v = variant(launch, config)
        if v not in seen:
            seen.add(v)
            jobs.append({"launch": launch.as_dict(), "config": config_id(config), "variant": v})
    return jobs
