"""Deployment: checked ONNX export, TensorRT engines, int8 quantization, and TensorRT op-support checks.

* :func:`export_onnx` / :func:`onnx_model_proto` / :func:`ort_session` — :mod:`fastdeeplab.export.onnx`
* :func:`openvino_compiled_model` — :mod:`fastdeeplab.export.openvino`
* :func:`build_tensorrt_engine` / :class:`TensorRTModel` — :mod:`fastdeeplab.export.tensorrt`
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
    "ort_session": "onnx",
    "openvino_compiled_model": "openvino",
    "TensorRTModel": "tensorrt",
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
        value = getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
