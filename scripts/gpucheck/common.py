"""What the three stages share: the plan (what to run on a GPU, or tiny in a dry run), the row writer,
timing, and feature detection of what ``optimize`` and the kernels offer in this checkout."""

from __future__ import annotations

import inspect
import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastdeeplab.timing import Spread, spread, time_call, time_cuda

__all__ = ["AUTOTUNE_ENV", "CHECK_AUTOTUNE_MS", "DTYPE_NAMES", "CudaFatal", "Plan", "RowWriter", "autotune_ms",
           "error_text", "find_method", "gpu_configs", "is_cuda_error", "measure_ms", "optimize_options",
           "peak_tflops", "raise_if_fatal", "synchronize"]

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# The kernels' autotune benchmark timing, "warmup_ms,rep_ms" (read by fastdeeplab.kernels when imported);
# Triton's own default is 25 ms + 100 ms per config. The check runs a short one and says so in its output.
AUTOTUNE_ENV = "FASTDEEPLAB_AUTOTUNE_MS"
CHECK_AUTOTUNE_MS = (5, 20)
TRITON_DEFAULT_AUTOTUNE_MS = (25, 100)


def autotune_ms(environ: dict | None = None) -> tuple[float, float]:
    """``(warmup_ms, rep_ms)`` of one autotune benchmark under ``environ`` (default ``os.environ``)."""
    import os

    text = (environ if environ is not None else os.environ).get(AUTOTUNE_ENV, "").strip()
    if not text:
        return TRITON_DEFAULT_AUTOTUNE_MS
    try:
        warmup, rep = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{AUTOTUNE_ENV}={text!r}: expected 'warmup_ms,rep_ms', e.g. '5,20'") from None
    return warmup, rep


# Messages of errors after which the CUDA context is unusable: every later call in the process fails too.
_FATAL_MARKERS = ("CUDA error", "illegal memory access", "unspecified launch failure", "device-side assert",
                  "misaligned address", "illegal instruction", "CUDA driver error", "an illegal")


def is_cuda_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a CUDA (context-corrupting) error rather than a failure of one case."""
    if isinstance(exc, CudaFatal):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    text = f"{type(exc).__name__}: {exc}"
    return any(marker in text for marker in _FATAL_MARKERS)


class CudaFatal(RuntimeError):
    """A CUDA error ended the stage (its row is written); the driver runs the next stage in a new process."""


def raise_if_fatal(exc: BaseException) -> None:
    """Inside a case's ``except``: re-raise a CUDA error (the stage ends with an explicit row) instead of
    recording it as one failed case and going on with a broken context."""
    if is_cuda_error(exc):
        raise CudaFatal(f"{type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class Plan:
    """Sizes and counts of one run: the GPU plan, or the dry run's tiny one (same code, same files)."""

    dry_run: bool
    deadline: float  # time.time() after which a stage starts no new work
    device: torch.device
    # correctness: whole-model input [N, 3, H, W] (odd sizes on purpose)
    check_input: tuple[int, int, int, int]
    # kernels
    kernel_resolution: int
    kernel_batches: tuple[int, ...]
    kernel_dtypes: tuple[torch.dtype, ...]
    kernel_max_shapes: int | None  # None: every shape (the deadline still applies); else the cheapest few
    warmup_ms: float
    rep_ms: float
    # whole model
    model: str  # "resnet50", or "tiny" (a narrow ResNet with DeepLab's structure) in the dry run
    resolution: int
    batches: tuple[int, ...]
    output_strides: tuple[int, ...]
    dtype: torch.dtype  # of the fast rows; the reference is float32 with TF32 off
    rounds: int
    compile_backend: str  # torch.compile backend: "inductor" on the GPU, "eager" in the dry run (seconds)
    compile_mode: str | None
    compile_s: float  # what one torch.compile is given: it is skipped when less time is left
    compile_batches: tuple[int, ...]  # batch sizes compiled for (each new one is a recompile)
    compile_strides: tuple[int, ...] = (16, 8)  # output strides whose models are compiled
    # DeepLabv3-MobileNetV3-Large in the model stage (before the ResNet settings): batches, output strides
    mobilenet_batches: tuple[int, ...] = (1,)
    mobilenet_strides: tuple[int, ...] = (16, 8)

    @classmethod
    def make(cls, dry_run: bool, deadline: float | None) -> Plan:
        deadline = deadline if deadline is not None else time.time() + 3600
        if dry_run:
            return cls(dry_run=True, deadline=deadline, device=torch.device("cpu"), check_input=(1, 3, 17, 19),
                       kernel_resolution=33, kernel_batches=(1,), kernel_dtypes=(torch.bfloat16,),
                       kernel_max_shapes=4, warmup_ms=0, rep_ms=0, model="tiny", resolution=17, batches=(1,),
                       output_strides=(16, 8), dtype=torch.bfloat16, rounds=1, compile_backend="eager",
                       compile_mode=None, compile_s=30, compile_batches=(1,), compile_strides=(16,))
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA GPU here: run with --dry-run on a CPU")
        return cls.gpu(deadline)

    @classmethod
    def gpu(cls, deadline: float | None = None, device: str = "cuda") -> Plan:
        """The GPU run's sizes (``device="cpu"``: the same plan, for counting it on a machine without a GPU)."""
        deadline = deadline if deadline is not None else time.time() + 3600
        return cls(dry_run=False, deadline=deadline, device=torch.device(device), check_input=(2, 3, 97, 129),
                   kernel_resolution=513, kernel_batches=(1, 8), kernel_dtypes=(torch.float16, torch.bfloat16),
                   kernel_max_shapes=None, warmup_ms=5, rep_ms=25, model="resnet50", resolution=513,
                   batches=(1, 8), output_strides=(16, 8), dtype=torch.float16, rounds=15,
                   compile_backend="inductor", compile_mode="default", compile_s=60, compile_batches=(8,),
                   compile_strides=(16,))

    def left(self) -> float:
        """Seconds until the stage's deadline."""
        return self.deadline - time.time()


class RowWriter:
    """Appends one JSON object per line to the stage's rows file, flushed at once, so the rows of a stage
    that is killed at its time limit are kept; prints a short line for the log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0

    def __enter__(self) -> RowWriter:
        self.file = open(self.path, "a", buffering=1)  # noqa: SIM115
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def row(self, **fields: Any) -> dict[str, Any]:
        self.file.write(json.dumps(fields, default=str) + "\n")
        self.file.flush()
        self.count += 1
        brief = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items()
                 if k not in ("message", "names", "traceback") and v is not None}
        print(f"[row {self.count}] {brief}", flush=True)
        return fields


def error_text(exc: BaseException, limit: int = 600) -> str:
    """``Type: message`` of an exception, cut to ``limit`` characters; the traceback goes to the log."""
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stdout)
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ms(fn: Callable[[], object], plan: Plan) -> Spread:
    """A kernel's time in milliseconds: ``time_cuda`` (``triton.testing.do_bench``, L2 flushed before every
    run) on the GPU; in the dry run one plain call (the plumbing, not a measurement)."""
    if plan.device.type == "cuda":
        return time_cuda(fn, warmup_ms=plan.warmup_ms, rep_ms=plan.rep_ms)
    return spread([time_call(fn) * 1e3])


def gpu_configs(module) -> list:
    """A kernel module's GPU autotune configs, also under the interpreter (where the autotuner itself only
    has the small interpreter config): the dry run then runs the GPU tilings' index arithmetic on the CPU."""
    try:
        return module.get_autotune_configs(for_interpreter=False)
    except TypeError:
        return module.get_autotune_configs()


def peak_tflops(gpu_name: str | None) -> float | None:
    """The GPU's nominal dense fp16/bf16 tensor-core peak (datasheet, TFLOP/s) from the bench suite's table,
    or None when the name is not listed (or there is no GPU)."""
    if not gpu_name:
        return None
    for module in ("bench._measure", "bench.test_kernels"):
        try:
            lookup = getattr(__import__(module, fromlist=["peak_tflops"]), "peak_tflops", None)
        except Exception:  # noqa: BLE001 (the bench suite's optional imports)
            lookup = None
        if lookup is not None:
            return lookup(gpu_name)
    return None


def find_method(obj: object, *names: str) -> str | None:
    """The first of ``names`` that ``obj`` has as a callable attribute."""
    return next((n for n in names if callable(getattr(obj, n, None))), None)


def optimize_options(*, dispatch: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """Keyword arguments for ``fastdeeplab.optimize`` that this checkout supports, and notes on what it lacks.

    ``dispatch``: the per-layer Triton/cuDNN choice (``"triton"`` forces the kernels everywhere, ``"auto"``
    measures each layer against cuDNN once).
    """
    import fastdeeplab

    params = inspect.signature(fastdeeplab.optimize).parameters
    kwargs: dict[str, Any] = {}
    notes: list[str] = []
    if dispatch is not None:
        if "dispatch" in params:
            kwargs["dispatch"] = dispatch
        else:
            notes.append("per-layer dispatch: not available in this checkout (Triton everywhere)")
    return kwargs, notes
