"""fastdeeplab: a fast, drop-in DeepLabv3 for PyTorch, at output stride 16 or 8.

>>> import fastdeeplab
>>> model = fastdeeplab.deeplabv3_resnet50(output_stride=16)          # same names as torchvision's
>>> fast = fastdeeplab.optimize(model.eval())                         # folded BN, fused ASPP, best backend

Heavy or optional dependencies (triton, onnx, onnxruntime, openvino, tensorrt) are imported lazily:
``import fastdeeplab`` needs only torch, torchvision and numpy.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from . import analysis

# Functions named like their modules are bound eagerly: a later `import fastdeeplab.train` finds the
# module already loaded and leaves the package attribute (the function) alone.
from .evaluation import evaluate
from .hub import (
    deeplabv3_cascade_resnet50,
    deeplabv3_cascade_resnet101,
    deeplabv3_resnet50,
    deeplabv3_resnet101,
    from_torchvision,
    get_model,
    list_models,
    load_checkpoint,
)
from .model import DeepLabV3, atrous_plan
from .optimization import optimize
from .training import train

__version__ = "0.1.0"

# Public names that live in modules with optional or heavy dependencies, imported on first use.
_LAZY = {
    "export_onnx": "fastdeeplab.export.onnx",
    "ExportReport": "fastdeeplab.export.onnx",
    "build_tensorrt_engine": "fastdeeplab.export.tensorrt",
    "deploy": "fastdeeplab.export.deploy",
    "TensorRTModel": "fastdeeplab.runtime.tensorrt",
}

__all__ = [
    "DeepLabV3",
    "analysis",
    "atrous_plan",
    "deeplabv3_cascade_resnet50",
    "deeplabv3_cascade_resnet101",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "from_torchvision",
    "get_model",
    "list_models",
    "load_checkpoint",
    "evaluate",
    "optimize",
    "train",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastdeeplab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
