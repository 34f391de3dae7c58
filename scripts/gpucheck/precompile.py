"""Stage 0, precompile: every Triton build the later stages need, compiled in parallel before they start.

The plan (``gpucheck.plan.build_plan``) lists each distinct build — kernel, config, dtype and the argument
specialisation Triton derives from the launch — with the key Triton's ``compile`` files it under. This stage
builds them on all host cores (a process pool; each worker runs :func:`gpucheck.launches.compile_variant`,
the same source, options and cache key ``JITFunction.run`` would use) into ``TRITON_CACHE_DIR``, the cache
every later stage shares. Their first launch of a variant then loads it (milliseconds) instead of building
it (0.5–1 s of CPU each, one at a time, inside the stage's time limit). Targets the GPU's own architecture
(``sm_<cc>`` from ``nvidia-smi``, as the driver recorded it); never touches CUDA itself.

One row per build, written as it finishes (``kind="build"``: kernel, dtype, config, seconds, ok), then a
summary row. A failed build is a row, not the end of the stage: the autotuner would meet the same error and
the dispatcher fall back to cuDNN; the correctness stage shows it too.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys
import time
from typing import Any

from .common import Plan, RowWriter, error_text

__all__ = ["run"]


def _build(job: dict[str, Any]) -> dict[str, Any]:
    from .launches import Launch, compile_variant, config_of

    start = time.perf_counter()
    try:
        launch = Launch(**{k: tuple(v) if k == "rates" else v for k, v in job["launch"].items()})
        launch_forced = launch if launch.config is not None else launch.forced_id(job["config"])
        compile_variant(launch, config_of(launch_forced), job["arch"])
        return {"ok": True, "seconds": time.perf_counter() - start}
    except Exception as exc:  # noqa: BLE001 (reported as a row)
        return {"ok": False, "seconds": time.perf_counter() - start, "message": f"{type(exc).__name__}: {exc}"[:600]}


def run(plan: Plan, rows: RowWriter, jobs: list[dict[str, Any]], arch: int, workers: int | None = None) -> None:
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    cache = os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache (Triton's default)")
    print(f"precompile: {len(jobs)} builds for sm_{arch} on {workers} processes into {cache}", flush=True)
    rows.row(kind="info", stage="precompile", builds=len(jobs), workers=workers, arch=f"sm_{arch}", cache=cache)
    start = time.perf_counter()
    done = failed = 0
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(_build, dict(job, arch=arch)): job for job in jobs}
        try:
            for future in concurrent.futures.as_completed(futures, timeout=max(plan.left() - 3, 1)):
                job = futures[future]
                try:
                    result = future.result()
                except Exception as exc:  # noqa: BLE001 (a worker that died)
                    result = {"ok": False, "seconds": None, "message": error_text(exc)}
                done += 1
                failed += not result["ok"]
                launch = job["launch"]
                rows.row(kind="build", kernel=launch["kernel"], dtype=launch["dtype"], config=job["config"],
                         variant=job["variant"][:16], seconds=round(result["seconds"] or 0, 3), ok=result["ok"],
                         message=result.get("message"))
        except concurrent.futures.TimeoutError:
            for future in futures:
                future.cancel()
            rows.row(kind="build", kernel="(rest)", skipped=f"stage time limit: {len(jobs) - done} builds left to "
                                                            "the stages' first launches")
    rows.row(kind="info", stage="precompile", built=done - failed, failed=failed, seconds=round(time.perf_counter()
                                                                                                  - start, 1))
