"""ONNX Runtime: :func:`ort_session` (good CPU settings) and :class:`OnnxRuntimeDeepLabV3`, the
``optimize(backend="onnxruntime")`` model (``pip install 'fastdeeplab[onnx]'``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .exported import ExportedDeepLabV3
from .onnx_files import check_onnx_file, onnx_load_error

if TYPE_CHECKING:
    import onnx
    import onnxruntime

__all__ = ["OnnxRuntimeDeepLabV3", "ort_session", "physical_cores", "require_onnxruntime"]

INSTALL_HINT = "pip install 'fastdeeplab[onnx]'"


def require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError(f"running ONNX models needs onnxruntime: {INSTALL_HINT}") from exc
    return onnxruntime


def physical_cores() -> int:
    """Physical CPU cores this process may use (hyper-threads not counted): the best intra-op thread count."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    physical = None
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        try:
            cores, current = set(), {}
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    key = key.strip()
                    if key in ("physical id", "core id"):
                        current[key] = value.strip()
                    elif not key:
                        if current:
                            cores.add((current.get("physical id"), current.get("core id")))
                        current = {}
            if current:
                cores.add((current.get("physical id"), current.get("core id")))
            physical = len(cores) or None
        except OSError:
            physical = None
    return max(1, min(available, physical or available))


_OPT_LEVELS = ("disable", "basic", "extended", "all")


def ort_session(model: onnx.ModelProto | str | os.PathLike | bytes, *, threads: int | None = None,
                optimization_level: str = "all", spinning: bool = False,
                providers: Sequence[str] | None = None) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session with good CPU settings.

    ``threads`` intra-op threads (default: physical cores), one inter-op thread, sequential execution, graph
    optimizations ``optimization_level`` (``"disable"``, ``"basic"``, ``"extended"`` or ``"all"``),
    ``providers`` (default CPU). ``model`` is a ``ModelProto``, a path or serialized bytes.

    ``spinning=False`` (default) lets idle worker threads sleep instead of busy-waiting for the next run:
    spinning threads steal the cores from whatever runs next in the process (PyTorch, pre-processing) and
    from other processes. On a 2-core machine a spinning session made the next eager PyTorch call up to
    80x slower and was itself slower under contention; turn it on only for a dedicated inference loop.
    """
    ort = require_onnxruntime()
    if optimization_level not in _OPT_LEVELS:
        raise ValueError(f"optimization_level must be one of {_OPT_LEVELS}, got {optimization_level!r}")
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads) if threads else physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization_level]
    options.log_severity_level = 3  # errors only: unused-initializer notes are noise
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if isinstance(model, bytes):
        source: bytes | str = model
    elif isinstance(model, (str, os.PathLike)):
        source = str(check_onnx_file(model))
    elif hasattr(model, "SerializeToString"):
        source = model.SerializeToString()
    else:
        raise TypeError(f"expected an onnx.ModelProto, bytes or a path, got {type(model).__name__}")
    try:
        return ort.InferenceSession(source, sess_options=options,
                                    providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:  # noqa: BLE001  (ONNX Runtime's InvalidProtobuf, InvalidGraph, Fail, ...)
        raise onnx_load_error(model, exc, runtime="ONNX Runtime") from None



class OnnxRuntimeDeepLabV3(ExportedDeepLabV3):
    """An ONNX Runtime session (:func:`ort_session`) over the fused model's export, behind the DeepLabV3
    interface (CPU, float32)."""

    backend = "onnxruntime"
    packages = ("onnx", "onnxscript", "onnxruntime")
    extra = "onnx"

    def _compile(self, proto: Any) -> Any:
        return ort_session(proto, threads=self.threads)

    def _run_numpy(self, session: Any, x: Any) -> list[Any]:
        return session.run(self._outputs, {session.get_inputs()[0].name: x})
