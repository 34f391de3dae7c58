"""fastdeeplab: a fast, drop-in DeepLabv3 for PyTorch, at output stride 16 or 8.

>>> import fastdeeplab
>>> model = fastdeeplab.deeplabv3_resnet50(output_stride=16)          # same names as torchvision's
>>> fast = fastdeeplab.optimize(model.eval())                         # folded BN, fused ASPP, best backend

Every public name and every submodule (``fastdeeplab.data``, ``fastdeeplab.export``, ...) is imported on first
use: ``import fastdeeplab`` imports neither torch nor any optional package (triton, onnx, onnxruntime,
openvino, tensorrt), so ``fastdeeplab --help`` is fast; the first attribute that needs torch imports it.
"""

from __future__ import annotations

from importlib import import_module
from importlib.util import find_spec
from typing import Any

from ._version import __version__ as __version__

# Public name -> the module that defines it, imported on first use.
_LAZY = {
    "DeepLabV3": "fastdeeplab.model",
    "atrous_plan": "fastdeeplab.model",
    "deeplabv3_cascade_resnet50": "fastdeeplab.hub",
    "deeplabv3_cascade_resnet101": "fastdeeplab.hub",
    "deeplabv3_mobilenet_v3_large": "fastdeeplab.hub",
    "deeplabv3_resnet50": "fastdeeplab.hub",
    "deeplabv3_resnet101": "fastdeeplab.hub",
    "from_torchvision": "fastdeeplab.hub",
    "get_model": "fastdeeplab.hub",
    "list_models": "fastdeeplab.hub",
    "load_checkpoint": "fastdeeplab.hub",
    "evaluate": "fastdeeplab.evaluation",
    "optimize": "fastdeeplab.optimization",
    "train": "fastdeeplab.training",
    "export_onnx": "fastdeeplab.export.onnx",
    "ExportReport": "fastdeeplab.export.onnx",
    "build_tensorrt_engine": "fastdeeplab.export.tensorrt",
    "deploy": "fastdeeplab.export.deploy",
    "TensorRTModel": "fastdeeplab.runtime.tensorrt",
}

__all__ = ["analysis", *_LAZY]


def __getattr__(name: str) -> Any:
    """``fastdeeplab.<public name>`` imports its module; ``fastdeeplab.<submodule>`` (``data``, ``export``,
    ``runtime``, ``kernels``, ...) imports the submodule, as an eager ``import`` used to."""
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and find_spec(f"{__name__}.{name}") is not None:
        return import_module(f"{__name__}.{name}")  # the import binds the attribute on the package too
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
