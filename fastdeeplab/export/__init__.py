"""Deployment: checked ONNX export, TensorRT engines, int8 quantization, and TensorRT op-support checks.

* :func:`export_onnx` / :func:`onnx_model_proto` — :mod:`fastdeeplab.export.onnx`
* :func:`build_tensorrt_engine` — :mod:`fastdeeplab.export.tensorrt`
* re-exported from :mod:`fastdeeplab.runtime`: :func:`ort_session`, :func:`openvino_compiled_model`,
  :class:`TensorRTModel`
* :func:`quantize_onnx` / :func:`compare_quantized` — :mod:`fastdeeplab.export.quantize`
* :func:`check_tensorrt` — :mod:`fastdeeplab.export.checks`

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
    "QuantizationReport": "quantize",
    "compare_quantized": "quantize",
    "quantize_onnx": "quantize",
    "TensorRTCompatibilityError": "checks",
    "check_tensorrt": "checks",
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
