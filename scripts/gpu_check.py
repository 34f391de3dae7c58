#!/usr/bin/env python3
"""The GPU check (issue 13): one short window on a bare GPU machine records every GPU figure the project claims.

    bash scripts/gpu_check.sh OUTDIR              # on a GPU: ~6 min expected, < 8 min at the limits
    bash scripts/gpu_check.sh --dry-run OUTDIR    # on a CPU: tiny shapes under TRITON_INTERPRET=1, ~1 min

This file is the driver. It makes the package importable (an installed fastdeeplab, else this checkout
mapped by a path shim: ``kernels/`` becomes ``fastdeeplab.kernels`` as ``pyproject.toml`` maps it), records
the machine (versions, GPU name, SMs, memory, clocks from ``nvidia-smi``), then runs three stages, each in
its own subprocess under its own time limit, so a hang or a crash is recorded and the next stage still runs:

===============  ======  ========================================================================================
stage            limit   what (modules in ``scripts/gpucheck/``)
===============  ======  ========================================================================================
``correctness``  95 s    kernels compiled for the GPU vs their float64 twins; ``optimize(backend="triton")`` vs
                         eager at OS16 and OS8 (``correctness.py``)
``kernels``      115 s   every DeepLab conv shape, batch 1 and 8, fp16 and bf16: Triton vs cuDNN, TFLOP/s and
                         share of the nominal peak, via ``time_cuda`` (``kernel_bench.py``)
``model``        200 s   513×513, batch 1 and 8, OS16 and OS8: torchvision eager, ``optimize`` (triton, with and
                         without CUDA graphs; torch), ``torch.compile``; accuracy vs fp32 (``whole_model.py``)
===============  ======  ========================================================================================

**Time on an H100-class GPU** (expected / limit): setup ~15 s (imports, ``nvidia-smi``; plus at most a
30 s pip attempt when nothing is installed), correctness ~70 / 95 s, kernels ~115 / 115 s (its bf16 tail is
cut), model ~170 / 200 s: about 6 minutes expected, 7 min 50 s if every stage runs to its limit and is
killed 5 s later. How the estimates were reached is in ``gpucheck/__init__.py``. Each stage also watches
its own deadline and records the work it had no time for as skipped rows, so a slow stage ends with rows
rather than being killed.

Outputs, rewritten (atomically) as each stage ends: ``OUTDIR/gpucheck.json`` (``environment``, then one
entry per stage: ``status``, ``seconds``, ``limit_s``, ``rows``), ``OUTDIR/gpucheck.md`` (the same as
tables) and ``OUTDIR/gpucheck.log`` (everything the stages printed). The exit status is 0 when every stage
ended ``ok``.
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
STAGES = ("correctness", "kernels", "model")
STAGE_MODULES = {"correctness": "correctness", "kernels": "kernel_bench", "model": "whole_model"}
LIMITS_S = {"correctness": 95, "kernels": 115, "model": 200}
DRY_RUN_LIMITS_S = {"correctness": 150, "kernels": 150, "model": 150}  # a loaded 2-core CPU; ~15 s each idle
GRACE_S = 5  # after a stage's limit, before it is killed (it stops starting work at its limit)


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

    def run_stage(self, name: str, workdir: Path) -> None:
        entry = self.result["stages"][name]
        rows_path = workdir / f"{name}.jsonl"
        limit = entry["limit_s"]
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--rows", str(rows_path),
               "--deadline", str(time.time() + limit), *(["--dry-run"] if self.dry_run else []), str(self.outdir)]
        # the per-layer dispatch decisions are measured afresh in this run, not read from an earlier one's cache
        env = dict(os.environ, PYTHONUNBUFFERED="1", FASTDEEPLAB_CACHE_DIR=str(workdir / "fastdeeplab-cache"))
        if self.dry_run:
            env["TRITON_INTERPRET"] = "1"
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
            status = "ok" if rc == 0 else f"crashed (exit status {rc})"
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
            for name in self.stages:
                self.run_stage(name, Path(workdir))
        self.result["finished"] = _now()
        self.write()
        self.say(f"done in {self.result['seconds']} s: {self.outdir / 'gpucheck.md'} has every table")
        from gpucheck.report import render_summary

        print(render_summary(self.result))
        self.log.close()
        return 0 if all(s["status"] == "ok" for s in self.result["stages"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", type=Path, help="where gpucheck.json, gpucheck.md and gpucheck.log go")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU: every stage on tiny shapes under TRITON_INTERPRET=1 (proves the plumbing)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: run one stage
    parser.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    import_mode = bootstrap()

    if args.stage:
        from fastdeeplab.kernels._utils import patch_interpreter_indices
        from gpucheck.common import Plan, RowWriter

        if args.dry_run and patch_interpreter_indices():
            print("dry run: patched triton's interpreter to squeeze scalar indices, as triton 3.8 does", flush=True)
        stage = importlib.import_module(f"gpucheck.{STAGE_MODULES[args.stage]}")
        with RowWriter(args.rows) as rows:
            stage.run(Plan.make(args.dry_run, args.deadline), rows)
        return 0

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; expected a subset of {list(STAGES)}")
    args.outdir.mkdir(parents=True, exist_ok=True)
    return Driver(args.outdir.resolve(), args.dry_run, stages, import_mode).run()


if __name__ == "__main__":
    sys.exit(main())
