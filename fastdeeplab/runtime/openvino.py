"""OpenVINO on the project's ONNX export (CPU): :func:`openvino_compiled_model` and :class:`OpenVINODeepLabV3`.

OpenVINO reads the ONNX graph that :func:`fastdeeplab.export.onnx.onnx_model_proto` makes (BatchNorm folded,
ASPP pooling as one bias per image) and compiles it for the CPU. On this project's reference CPU it was the
fastest runtime for the fused graph (``bench/RESULTS.md``), which is why ``optimize(backend="auto")`` picks it
there when it is installed (``pip install 'fastdeeplab[openvino]'``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .exported import ExportedDeepLabV3

__all__ = ["PRECISIONS", "OpenVINODeepLabV3", "openvino_compiled_model", "require_openvino"]

_INSTALL_HINT = "pip install 'fastdeeplab[openvino]'"
PRECISIONS = ("f32", "bf16", "f16")


def require_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise ImportError(f"the OpenVINO runtime needs the openvino package: {_INSTALL_HINT}") from exc
    return openvino


def openvino_compiled_model(model: Any, *, threads: int | None = None, precision: str = "f32",
                            device: str = "CPU") -> Any:
    """Compile an ONNX model (``onnx.ModelProto``, serialized bytes or a path) with OpenVINO.

    ``precision`` is pinned (``INFERENCE_PRECISION_HINT``): OpenVINO's CPU plugin otherwise runs bfloat16 on
    CPUs that support it, which does not give float32's outputs. ``threads`` defaults to OpenVINO's choice
    (the physical cores); the performance hint is ``LATENCY`` (one stream, batch 1 first).
    """
    ov = require_openvino()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        source: Any = str(path)
        what = str(path)
    elif isinstance(model, bytes):
        source, what = model, "the given bytes"
    elif hasattr(model, "SerializeToString"):
        source, what = model.SerializeToString(), "the given ModelProto"
    else:
        raise TypeError(f"expected an onnx.ModelProto, bytes or a path, got {type(model).__name__}")
    core = ov.Core()
    properties = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if threads is not None:
        properties["INFERENCE_NUM_THREADS"] = int(threads)
    try:
        graph = core.read_model(source)
    except RuntimeError as exc:  # OpenVINO reports unreadable or corrupt models as RuntimeError
        raise ValueError(f"OpenVINO could not read an ONNX model from {what}: {exc}") from exc
    return core.compile_model(graph, device, properties)


class OpenVINODeepLabV3(ExportedDeepLabV3):
    """An OpenVINO CPU model over the fused model's export, behind the DeepLabV3 interface; it runs in
    ``dtype`` (float32, or bfloat16 on CPUs with AVX512-BF16 or AMX), pinned so that OpenVINO never picks a
    lower precision by itself."""

    backend = "openvino"
    packages = ("onnx", "onnxscript", "openvino")
    dtypes = (torch.float32, torch.bfloat16)
    _PRECISION = {torch.float32: "f32", torch.bfloat16: "bf16"}  # OpenVINO's names for ``dtypes``
    extra = "openvino"

    def _compile(self, proto: Any) -> Any:
        compiled = openvino_compiled_model(proto, threads=self.threads, precision=self._PRECISION[self.dtype])
        return compiled.create_infer_request()

    def _run_numpy(self, session: Any, x: Any) -> list[Any]:
        results = session.infer({0: x}, share_inputs=True, share_outputs=False)  # outputs: fresh copies
        return [results[name] for name in self._outputs]
