"""Measurements that are not time: peak memory of one call, and a description of the machine.

Peak memory:

* CUDA: ``torch.cuda.max_memory_allocated()`` over the call, after ``reset_peak_memory_stats`` — tensors
  allocated through PyTorch's caching allocator, weights included (ONNX Runtime or TensorRT allocations
  made outside PyTorch are not seen).
* CPU: the rise of the process's peak resident set size over the call: free heap memory is first handed
  back to the OS (``malloc_trim``), the kernel's high-water mark is reset (``/proc/self/clear_refs``) and
  ``VmHWM`` after the call is compared with ``VmRSS`` before it. Weights already resident are excluded;
  activations, workspaces and any allocator arenas the call grows are included. The measured call is the
  implementation's first one, so arenas grown once (ONNX Runtime, OpenVINO) are counted. An approximation:
  other threads of the process count too. ``None`` where ``/proc`` cannot be used.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import importlib.metadata
import os
import platform
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["PeakMemory", "library_versions", "machine_info", "peak_memory"]


class PeakMemory:
    """Result holder of :func:`peak_memory`: ``mb`` is set when the block exits (``None`` if unknown)."""

    mb: float | None = None
    method: str = ""


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def peak_memory(device: torch.device, synchronize: Callable[[], None] | None = None) -> Iterator[PeakMemory]:
    """Measure the peak memory of the enclosed call (see the module docstring for what is counted)."""
    result = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.mb = torch.cuda.max_memory_allocated(device) / 2**20
        result.method = "torch.cuda.max_memory_allocated (weights included)"
        return
    gc.collect()
    _malloc_trim()
    ok = _reset_rss_peak()
    before = _status_kb("VmRSS")
    yield result
    after = _status_kb("VmHWM")
    if ok and before is not None and after is not None:
        result.mb = max(0, after - before) / 1024
        result.method = "rise of the process peak RSS over the first call (weights excluded)"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, threads, GPU name (when on CUDA) and OS, for the JSON and the table header."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "device": str(device),
        "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


_LIBRARIES = ("fastdeeplab", "torch", "torchvision", "numpy", "onnx", "onnxruntime", "openvino", "triton",
              "tensorrt", "pytest-benchmark")


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries the suite can use (``None`` = not installed)."""
    out: dict[str, str | None] = {}
    for name in _LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out
