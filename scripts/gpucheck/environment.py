"""What the run ran on: library versions, the GPU (name, capability, SMs, memory, L2) and its clocks, power and
temperature as ``nvidia-smi`` reports them at the start (read only: nothing is ever set)."""

from __future__ import annotations

import platform
import shutil
import subprocess
from typing import Any

import torch

from fastdeeplab.timing import load_average

from .common import peak_tflops

__all__ = ["collect_environment", "nvidia_smi"]

SMI_FIELDS = ("name", "driver_version", "pstate", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
              "power.draw", "power.limit", "temperature.gpu", "utilization.gpu", "memory.used", "memory.total")


def nvidia_smi() -> dict[str, Any]:
    """``nvidia-smi --query-gpu`` of the fields above for GPU 0, or why there is none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"available": False, "reason": "nvidia-smi is not on PATH"}
    try:
        out = subprocess.run([exe, f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    if out.returncode != 0 or not out.stdout.strip():
        return {"available": False, "reason": (out.stderr or out.stdout).strip()[:300]}
    values = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
    return {"available": True, **dict(zip(SMI_FIELDS, values))}


def _versions() -> dict[str, str | None]:
    try:
        from bench._measure import library_versions

        versions = library_versions()
    except Exception:  # noqa: BLE001 (the bench helpers are optional here)
        versions = {}
    versions.update(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                    cudnn=str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None)
    for name in ("triton", "torchvision", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions


def collect_environment() -> dict[str, Any]:
    env: dict[str, Any] = {"versions": _versions(), "platform": platform.platform(), "load": load_average(),
                           "nvidia_smi": nvidia_smi(), "gpu": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        name = torch.cuda.get_device_name(0)
        env["gpu"] = {
            "name": name,
            "count": torch.cuda.device_count(),
            "capability": f"sm_{props.major}{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
            "peak_fp16_tflops_nominal": peak_tflops(name),
        }
    return env
