"""Inference runtimes behind one contract (:mod:`fastdeeplab.runtime.base`): ONNX Runtime, OpenVINO and
TensorRT. Each module imports its runtime package only when used; a missing one names the extra to install.

* :class:`RuntimeModel` — :mod:`fastdeeplab.runtime.base`
* :func:`ort_session`, :class:`OnnxRuntimeDeepLabV3` — :mod:`fastdeeplab.runtime.onnxruntime`
* :func:`openvino_compiled_model`, :class:`OpenVINODeepLabV3` — :mod:`fastdeeplab.runtime.openvino`
* :class:`TensorRTModel` — :mod:`fastdeeplab.runtime.tensorrt`
* :func:`load_onnx`, :func:`check_onnx_file` — :mod:`fastdeeplab.runtime.onnx_files`, the one reader of ONNX
  files (every error one line naming the file)

``runtime/`` sits below ``export/``: it never imports it (``optimize`` hands the exported runtimes their
exporter).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .base import LABELS_DTYPE as LABELS_DTYPE
from .base import RuntimeModel as RuntimeModel

_LAZY = {
    "ExportedDeepLabV3": "exported",
    "OnnxRuntimeDeepLabV3": "onnxruntime",
    "ort_session": "onnxruntime",
    "physical_cores": "onnxruntime",
    "OpenVINODeepLabV3": "openvino",
    "openvino_compiled_model": "openvino",
    "TensorRTModel": "tensorrt",
    "check_onnx_file": "onnx_files",
    "load_onnx": "onnx_files",
}

__all__ = sorted(["LABELS_DTYPE", "RuntimeModel", *_LAZY])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
