"""Triton kernels for fastdeeplab, imported as ``fastdeeplab.kernels``.

Every kernel has a plain-PyTorch twin in :mod:`fastdeeplab.kernels.reference`; tests, benchmarks and the
export path all use that one copy. Triton itself is imported lazily, so this package imports on machines
without it: the kernel names below resolve on first access, and where triton is missing they resolve to
stubs that raise ``ImportError`` (naming ``pip install 'fastdeeplab[triton]'``) when called.

>>> from fastdeeplab.kernels import fold_bn, conv_bn_relu_reference   # torch only
>>> from fastdeeplab.kernels import conv_bn_relu, aspp_project          # Triton kernels (lazy)

Submodules: ``conv`` (implicit-GEMM conv + bias + residual + ReLU, spatial/raster/TMA tilings), ``aspp``
(grouped ASPP branches, fused projection), ``depthwise`` (depthwise conv + bias + ReLU/hardswish + SE scale),
``ops`` (the torch custom ops), ``dispatch`` (per-layer
Triton-vs-cuDNN choice), ``work`` (the executed-work model), ``reference`` (the PyTorch twins), ``aot``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._utils import TRITON_EXTRA_HINT, triton_available

if TYPE_CHECKING:  # pragma: no cover
    from .aspp import (
        aspp_branches_packed,
        aspp_project,
        aspp_project_packed,
        pack_aspp_branch_weights,
        pack_aspp_weight,
    )
    from .conv import TapCounts, conv_bn_relu, conv_bn_relu_packed, pack_weight
    from .depthwise import depthwise_conv_act, depthwise_conv_act_packed, pack_depthwise_weight
    from .reference import (
        aspp_branches_reference,
        aspp_project_reference,
        conv_bn_relu_module_reference,
        conv_bn_relu_reference,
        depthwise_conv_act_reference,
        fold_bn,
    )

_REFERENCE = ("fold_bn", "conv_bn_relu_reference", "conv_bn_relu_module_reference", "aspp_project_reference",
              "aspp_branches_reference", "depthwise_conv_act_reference")
_TRITON = {
    "conv_bn_relu": "conv",
    "conv_bn_relu_packed": "conv",
    "pack_weight": "conv",
    "TapCounts": "conv",
    "aspp_project": "aspp",
    "aspp_branches_packed": "aspp",
    "pack_aspp_branch_weights": "aspp",
    "aspp_project_packed": "aspp",
    "pack_aspp_weight": "aspp",
    "depthwise_conv_act": "depthwise",
    "depthwise_conv_act_packed": "depthwise",
    "pack_depthwise_weight": "depthwise",
}

__all__ = [
    "TapCounts",
    "aspp_branches_packed",
    "aspp_branches_reference",
    "aspp_project",
    "aspp_project_packed",
    "aspp_project_reference",
    "conv_bn_relu",
    "conv_bn_relu_module_reference",
    "conv_bn_relu_packed",
    "conv_bn_relu_reference",
    "depthwise_conv_act",
    "depthwise_conv_act_packed",
    "depthwise_conv_act_reference",
    "fold_bn",
    "pack_aspp_branch_weights",
    "pack_aspp_weight",
    "pack_depthwise_weight",
    "pack_weight",
    "triton_available",
]
assert set(__all__) == {*_REFERENCE, *_TRITON, "triton_available"}


def _missing_triton(name: str) -> Any:
    def stub(*args: Any, **kwargs: Any) -> Any:
        raise ImportError(f"fastdeeplab.kernels.{name} needs the 'triton' package: {TRITON_EXTRA_HINT}")

    stub.__name__ = stub.__qualname__ = name
    stub.__doc__ = f"Unavailable: triton is not installed ({TRITON_EXTRA_HINT})."
    return stub


def __getattr__(name: str) -> Any:
    if name in _REFERENCE:
        value = getattr(importlib.import_module(".reference", __name__), name)
    elif name in _TRITON:
        if not triton_available():
            return _missing_triton(name)  # not cached: installing triton later takes effect
        value = getattr(importlib.import_module(f".{_TRITON[name]}", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
