"""Deployment: checked ONNX export (precision in the graph: fp32, fp16, int8 Q/DQ), strongly typed TensorRT
engines, Triton Inference Server repositories.

* :func:`export_onnx` / :func:`onnx_model_proto` — :mod:`fastdeeplab.export.onnx` (export and report); graph
  rewrites in :mod:`fastdeeplab.export.passes`, the checks that run the graph in :mod:`fastdeeplab.export.verify`
* :func:`build_tensorrt_engine` — :mod:`fastdeeplab.export.tensorrt` (its self-check:
  :mod:`fastdeeplab.export.engine_report`)
* :func:`fastdeeplab.deploy` — :mod:`fastdeeplab.export.deploy` (the module; the function is top-level)
* re-exported from :mod:`fastdeeplab.runtime`: :func:`ort_session`, :func:`openvino_compiled_model`,
  :class:`TensorRTModel`
* :func:`quantize_onnx` / :func:`compare_quantized` — :mod:`fastdeeplab.export.quantize`
* :func:`check_tensorrt`, :func:`check_fp16_graph`, :func:`check_qdq_graph` — :mod:`fastdeeplab.export.checks`

Names are imported on first use; onnx, onnxruntime, openvino and tensorrt only when a function needs them
(``pip install 'fastdeeplab[onnx]'``, ``'fastdeeplab[openvino]'``, ``'fastdeeplab[tensorrt]'``).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "ExportCheckError": "onnx",
    "ExportReport": "onnx",
    "export_onnx": "onnx",
    "onnx_model_proto": "onnx",
    "ort_session": "..runtime.onnxruntime",
    "openvino_compiled_model": "..runtime.openvino",
    "TensorRTModel": "..runtime.tensorrt",
    "build_tensorrt_engine": "tensorrt",
    "graph_precision": "tensorrt",
    "DeployReport": "deploy",
    "load_model_config": "deploy",
    "QuantizationReport": "quantize",
    "compare_quantized": "quantize",
    "quantize_onnx": "quantize",
    "TensorRTCompatibilityError": "checks",
    "check_tensorrt": "checks",
    "check_fp16_graph": "checks",
    "check_qdq_graph": "checks",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        target = _LAZY[name]
        module = import_module(target, __package__) if target.startswith(".") else import_module(f"{__name__}.{target}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
