#!/usr/bin/env python3
"""The GPU check (issues 13, 19, 22): one short window on a bare GPU machine records every GPU figure the project claims.

    bash scripts/gpu_check.sh OUTDIR              # on a GPU: ~7 min expected, < 8 min at the limits
    bash scripts/gpu_check.sh --plan OUTDIR       # anywhere, no GPU: the per-stage counts and time estimates
    bash scripts/gpu_check.sh --dry-run OUTDIR    # on a CPU: tiny shapes under TRITON_INTERPRET=1

This file is the driver. It makes the package importable (an installed fastdeeplab, else this checkout
mapped by a path shim: ``kernels/`` becomes ``fastdeeplab.kernels`` as ``pyproject.toml`` maps it), records
the machine (versions, GPU name, SMs, memory, clocks from ``nvidia-smi``), computes the plan
(``gpucheck/plan.py``: what every stage compiles, autotunes and times, counted from the real prune functions,
and the case count that fits each limit; ``OUTDIR/gpucheck.plan.json``), then runs four stages, each in its
own subprocess under its own time limit, so a hang or a crash is recorded and the next stage still runs:

===============  ======  ========================================================================================
stage            limit   what (modules in ``scripts/gpucheck/``)
===============  ======  ========================================================================================
``precompile``   60 s    every Triton build the later stages need, on all host cores, into the shared
                         ``TRITON_CACHE_DIR`` (``precompile.py``)
``correctness``  45 s    kernels vs their float64 twins (fp32 with TF32 off and on, fp16, bf16; the depthwise
                         kernel with and without its SE passes), every config the autotuner may pick (TMA
                         included) in fp16 and bf16; ``optimize(backend="triton")`` vs eager at OS16 and OS8
                         (``correctness.py``)
``kernels``      85 s    DeepLab-ResNet-50's conv shapes, MobileNetV3-Large's depthwise ones and its largest 1×1
                         hardswish ones, batch 1 and 8, fp16 then bf16, most important first: Triton vs cuDNN,
                         TFLOP/s and share of the nominal peak (GB/s for the memory-bound depthwise conv)
                         (``kernel_bench.py``)
``model``        235 s   513×513: MobileNetV3-Large at batch 1, then ResNet-50 at batch 1 and 8, OS16 and OS8:
                         torchvision eager, ``optimize`` (triton, with and without CUDA graphs; torch),
                         ``torch.compile`` of torchvision and of ``optimize(model)`` (ResNet-50);
                         accuracy vs fp32 (``whole_model.py``)
===============  ======  ========================================================================================

Every stage shares one fresh ``TRITON_CACHE_DIR`` (builds and autotune results carry over) and runs the
kernels' autotuner with a short benchmark, ``FASTDEEPLAB_AUTOTUNE_MS=5,20`` (5 ms warm-up, 20 ms repeat per
config instead of Triton's 25 + 100; a value already in the environment is kept), stated in the output.
With setup (35 s allowed) and a 5 s kill grace after each stage the limits sum to 480 s; the plan's estimates
(``--plan``) sit inside each limit. Each stage also watches its own deadline and records what it had no time
for as skipped rows, writes every row the moment it is measured (``gpucheck.jsonl`` per stage, JSON lines),
and ends on a CUDA error with an explicit ``stage_error`` row (the context is unusable after one), after
which the next stage starts in a fresh process.

Outputs, rewritten (atomically) as each stage ends: ``OUTDIR/gpucheck.json`` (``environment``, ``plan``, then
one entry per stage: ``status``, ``seconds``, ``limit_s``, ``rows``), ``OUTDIR/gpucheck.md`` (the same as
tables), ``OUTDIR/gpucheck.plan.json`` and ``OUTDIR/gpucheck.log`` (everything the stages printed). The exit
status is 0 when every stage ended ``ok``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.abc
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("precompile", "correctness", "kernels", "model")
STAGE_MODULES = {"precompile": "precompile", "correctness": "correctness", "kernels": "kernel_bench",
                 "model": "whole_model"}
# the plan's limits (scripts/gpucheck/plan.py): with setup and the kill graces they sum to 480 s
LIMITS_S = {"precompile": 60, "correctness": 45, "kernels": 85, "model": 235}
DRY_RUN_LIMITS_S = {"precompile": 120, "correctness": 200, "kernels": 150, "model": 200}  # a loaded 2-core CPU
GRACE_S = 5  # after a stage's limit, before it is killed (it stops starting work at its limit)
STAGE_ERROR_RC = 3  # a stage that ended on an error it recorded as a row (a CUDA error ends the process)


# --------------------------------------------------------------------------------------------------
# Making the package importable
# --------------------------------------------------------------------------------------------------
class _SourceKernels(importlib.abc.MetaPathFinder):
    """Maps ``fastdeeplab.kernels`` to this checkout's ``kernels/`` when nothing else provides it (the
    mapping ``[tool.setuptools.package-dir]`` makes in an install). Appended last to ``sys.meta_path``, so an
    installed package, editable or not, always wins."""

    used = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "fastdeeplab.kernels":
            return None
        init = ROOT / "kernels" / "__init__.py"
        _SourceKernels.used = True
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(init.parent)])


def bootstrap() -> str:
    """Make ``fastdeeplab`` (with its kernels), ``bench`` and ``gpucheck`` importable; returns how the package
    was found: ``"installed"`` or ``"source checkout (path shim)"``."""
    installed = importlib.util.find_spec("fastdeeplab") is not None
    for path in (ROOT / "scripts", ROOT):  # gpucheck/, then bench/, tests/ and a source fastdeeplab
        if str(path) not in sys.path:
            sys.path.append(str(path))
    sys.meta_path.append(_SourceKernels())
    import fastdeeplab.kernels  # noqa: F401  (fails here, with its reason, rather than inside a stage)

    return "installed" if installed and not _SourceKernels.used else "source checkout (path shim)"


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------
def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Driver:
    def __init__(self, outdir: Path, dry_run: bool, stages: list[str], import_mode: str) -> None:
        self.outdir, self.dry_run, self.stages = outdir, dry_run, stages
        self.start = time.monotonic()
        self.log = open(outdir / "gpucheck.log", "a", buffering=1)  # noqa: SIM115 (closed in run)
        limits = DRY_RUN_LIMITS_S if dry_run else LIMITS_S
        self.result = {
            "schema": 1,
            "mode": "dry-run (CPU, TRITON_INTERPRET=1, tiny shapes)" if dry_run else "gpu",
            "command": " ".join(["bash scripts/gpu_check.sh", *(["--dry-run"] if dry_run else []), str(outdir)]),
            "started": _now(),
            "finished": None,
            "seconds": None,
            "import_mode": import_mode,
            "environment": {},
            "stages": {name: {"status": "pending", "seconds": None, "limit_s": limits[name], "rows": []}
                       for name in stages},
        }

    def say(self, message: str) -> None:
        line = f"[gpu_check {time.monotonic() - self.start:6.1f}s] {message}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def write(self) -> None:
        from gpucheck.report import render_markdown

        from fastdeeplab._io import atomic_path

        self.result["seconds"] = round(time.monotonic() - self.start, 1)
        with atomic_path(self.outdir / "gpucheck.json") as tmp:
            tmp.write_text(json.dumps(self.result, indent=1, default=str) + "\n")
        with atomic_path(self.outdir / "gpucheck.md") as tmp:
            tmp.write_text(render_markdown(self.result))

    def stage_env(self, workdir: Path) -> dict[str, str]:
        """The stages' environment: one Triton cache for all of them (stage 0's builds and every autotune
        result carry over), fresh per-layer dispatch decisions, the short autotune benchmark."""
        from gpucheck.common import AUTOTUNE_ENV, CHECK_AUTOTUNE_MS

        env = dict(os.environ, PYTHONUNBUFFERED="1", FASTDEEPLAB_CACHE_DIR=str(workdir / "fastdeeplab-cache"),
                   TRITON_CACHE_DIR=str(workdir / "triton-cache"))
        env.setdefault(AUTOTUNE_ENV, ",".join(map(str, CHECK_AUTOTUNE_MS)))
        return env

    def make_plan(self, workdir: Path) -> None:
        """The GPU plan (counts, estimates, stage 0's builds, the kernel stage's case count) into
        ``gpucheck.plan.json``; the dry run's stage 0 makes its own small job list."""
        from gpucheck.common import autotune_ms

        env = self.stage_env(workdir)
        warmup, rep = autotune_ms(env)
        self.result["autotune"] = f"FASTDEEPLAB_AUTOTUNE_MS={warmup:g},{rep:g} (autotune benchmark: {warmup:g} ms " \
                                  f"warm-up, {rep:g} ms repeat per config)"
        self.say(self.result["autotune"])
        if self.dry_run:
            return
        from gpucheck.plan import build_plan, format_table

        start = time.monotonic()
        plan = build_plan(environ=env)
        capability = (self.result["environment"].get("gpu") or {}).get("capability") or "sm_90"
        plan["target_arch"] = int(capability.removeprefix("sm_"))
        _write_plan(self.outdir, plan)
        self.result["plan"] = {k: v for k, v in plan.items() if k not in ("precompile_jobs", "stages")}
        self.result["plan"]["stages"] = {n: {k: v for k, v in st.items() if k != "tuned"}
                                         for n, st in plan["stages"].items()}
        self.say(f"plan ({time.monotonic() - start:.1f} s):\n{format_table(plan)}")

    def run_stage(self, name: str, workdir: Path) -> None:
        entry = self.result["stages"][name]
        rows_path = workdir / f"{name}.jsonl"
        limit = entry["limit_s"]
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--rows", str(rows_path),
               "--deadline", str(time.time() + limit), *(["--dry-run"] if self.dry_run else []), str(self.outdir)]
        env = self.stage_env(workdir)
        if self.dry_run and name != "precompile":
            env["TRITON_INTERPRET"] = "1"
        else:  # stage 0 builds real GPU code, also in the dry run (for sm_90, on the CPU)
            env.pop("TRITON_INTERPRET", None)
        self.say(f"stage {name}: started (limit {limit} s)")
        entry["status"] = "running"
        self.write()
        self.log.write(f"----- stage {name} -----\n")
        self.log.flush()
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)  # its own process group: a kill takes its workers too
        try:
            rc = proc.wait(timeout=limit + GRACE_S)
            status = ("ok" if rc == 0 else "ended by an error (see its stage_error row)" if rc == STAGE_ERROR_RC
                      else f"crashed (exit status {rc})")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timeout (killed after {limit + GRACE_S} s)"
        entry["seconds"] = round(time.monotonic() - start, 1)
        rows = []
        if rows_path.exists():
            for line in rows_path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # the last line of a killed stage may be cut short
                    rows.append({"kind": "error", "error": f"unreadable row: {line[:200]}"})
        entry["rows"] = rows
        failed = [r for r in rows if r.get("ok") is False]
        if status == "ok" and failed:
            status = f"failed ({len(failed)} of {sum('ok' in r for r in rows)} checks)"
        entry["status"] = status
        self.say(f"stage {name}: {status} in {entry['seconds']} s, {len(rows)} rows")
        self.write()

    def run(self) -> int:
        from gpucheck.environment import collect_environment

        self.say(f"{self.result['mode']}; stages {', '.join(self.stages)}; package: {self.result['import_mode']}")
        self.result["environment"] = collect_environment()
        gpu = self.result["environment"].get("gpu") or {}
        self.say(f"device: {gpu.get('name') or 'no GPU'}; torch {self.result['environment']['versions'].get('torch')}")
        self.write()
        with tempfile.TemporaryDirectory(prefix="gpucheck-") as workdir:
            try:
                self.make_plan(Path(workdir))
            except Exception as exc:  # noqa: BLE001 (the stages still run, on their own deadlines)
                self.say(f"plan failed, the stages run without it: {type(exc).__name__}: {exc}")
            self.write()
            for name in self.stages:
                self.run_stage(name, Path(workdir))
        self.result["finished"] = _now()
        self.write()
        self.say(f"done in {self.result['seconds']} s: {self.outdir / 'gpucheck.md'} has every table")
        from gpucheck.report import render_summary

        print(render_summary(self.result))
        self.log.close()
        return 0 if all(s["status"] == "ok" for s in self.result["stages"].values()) else 1


def _write_plan(outdir: Path, plan: dict) -> None:
    from fastdeeplab._io import atomic_path

    with atomic_path(outdir / "gpucheck.plan.json") as tmp:
        tmp.write_text(json.dumps(plan, indent=1, default=str) + "\n")


def _read_plan(outdir: Path) -> dict | None:
    path = outdir / "gpucheck.plan.json"
    if not path.exists():
        return None
    from fastdeeplab._io import read_regular_file

    return json.loads(read_regular_file(path, max_bytes=64 * 2**20, what="the GPU check's plan"))


def run_one_stage(name: str, plan, rows, outdir: Path) -> int:
    """Run one stage into ``rows``; an exception (a CUDA error above all: it leaves the context unusable)
    ends the stage with a ``stage_error`` row and exit status ``STAGE_ERROR_RC``."""
    from gpucheck.common import error_text, is_cuda_error

    stage = importlib.import_module(f"gpucheck.{STAGE_MODULES[name]}")
    saved = None if plan.dry_run else _read_plan(outdir)
    try:
        if name == "precompile":
            if plan.dry_run:
                from gpucheck.plan import dry_jobs

                stage.run(plan, rows, dry_jobs(plan), arch=90, workers=2)
            elif saved is None:
                rows.row(kind="build", kernel="(all)", skipped="no plan (gpucheck.plan.json): the stages build "
                                                               "what they launch, inside their own limits")
            else:
                stage.run(plan, rows, saved["precompile_jobs"], arch=saved.get("target_arch", 90))
        elif name == "kernels":
            stage.run(plan, rows, reach=saved["stages"]["kernels"]["cases"] if saved else None)
        else:
            stage.run(plan, rows)
    except Exception as exc:  # noqa: BLE001 (recorded, then the next stage runs in a new process)
        cuda = is_cuda_error(exc)
        rows.row(kind="stage_error", stage=name, cuda_error=cuda, ok=False, message=error_text(exc),
                 note="a CUDA error leaves the context unusable: the stage ends here, the next stage runs in a "
                      "new process" if cuda else "the stage ended on this error")
        return STAGE_ERROR_RC
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", type=Path, help="where gpucheck.json, gpucheck.md and gpucheck.log go")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU: every stage on tiny shapes under TRITON_INTERPRET=1 (proves the plumbing)")
    parser.add_argument("--plan", action="store_true",
                        help="no GPU needed: write OUTDIR/gpucheck.plan.json and print the per-stage counts and "
                             "estimates (sm_90 assumed)")
    parser.add_argument("--measure-compile", action="store_true",
                        help="with --plan: measure one Triton build on this machine instead of the recorded figure")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: run one stage
    parser.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plan and args.dry_run:
        parser.error("--plan and --dry-run are separate modes: give one")
    if args.measure_compile and not args.plan:
        parser.error("--measure-compile goes with --plan")
    if args.dry_run and args.stage != "precompile":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    if args.plan:
        os.environ.pop("TRITON_INTERPRET", None)  # the plan needs the compiled kernels' binder
    import_mode = bootstrap()

    if args.plan:
        from gpucheck.plan import build_plan, format_table, measure_compile_s

        args.outdir.mkdir(parents=True, exist_ok=True)
        compile_s = measure_compile_s() if args.measure_compile else None
        plan = build_plan(compile_s=compile_s)
        _write_plan(args.outdir, plan)
        print(format_table(plan))
        print(f"wrote {args.outdir / 'gpucheck.plan.json'} ({len(plan['precompile_jobs'])} builds listed for stage 0; "
              f"planned in {plan['seconds_to_plan']} s)")
        within = all(s["estimated_s"] <= s["limit_s"] for s in plan["stages"].values())
        return 0 if within and plan["total_limit_s"] <= plan["window_s"] else 1

    if args.stage:
        from fastdeeplab.kernels._utils import patch_interpreter_indices
        from gpucheck.common import Plan, RowWriter

        if args.dry_run and args.stage != "precompile" and patch_interpreter_indices():
            print("dry run: patched triton's interpreter to squeeze scalar indices, as triton 3.8 does", flush=True)
        with RowWriter(args.rows) as rows:
            return run_one_stage(args.stage, Plan.make(args.dry_run, args.deadline), rows, args.outdir)

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; expected a subset of {list(STAGES)}")
    args.outdir.mkdir(parents=True, exist_ok=True)
    return Driver(args.outdir.resolve(), args.dry_run, stages, import_mode).run()


if __name__ == "__main__":
    sys.exit(main())
