"""Preparing a model for ONNX export: torchvision models converted, the output stride switched for the
duration, BatchNorm folded into the convolutions (:func:`fastdeeplab.kernels.reference.fold_bn` does the
arithmetic), and the wrapper that turns the output dict into the graph's outputs (plus the in-graph
normalisation of uint8 pixels and the in-graph argmax).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["fold_batchnorm_"]

_MODEL_OUTPUTS = ("out", "aux")


def _is_torchvision_deeplab(model: nn.Module) -> bool:
    try:
        from torchvision.models.segmentation.deeplabv3 import DeepLabV3 as TvDeepLabV3
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return False
    return isinstance(model, TvDeepLabV3)


def _as_exportable(model: nn.Module) -> nn.Module:
    """The PyTorch model the graph is exported from and checked against.

    A torchvision ``DeepLabV3`` becomes a fastdeeplab model (pooled branch: Expand, not Resize). An optimized
    model exports the fused model it runs: an ONNX Runtime or OpenVINO model its float32 fused model, a
    CUDA-graph model the model it replays; a TensorRT engine cannot be exported back. A model whose weights
    are not float32 (``optimize(dtype=torch.bfloat16)``, ``.half()``) is exported and checked as a float32 copy:
    the graph's precision is ``precision=``'s, not the module's.
    """
    from ..cuda_graphs import CUDAGraphModel
    from ..runtime.base import RuntimeModel

    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    while isinstance(model, (RuntimeModel, CUDAGraphModel)):
        inner = getattr(model, "model", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"cannot export a {type(model).__name__} to ONNX: it runs a compiled "
                            f"{getattr(model, 'backend', 'runtime')} engine, not PyTorch modules; export the model "
                            "it was built from")
        model = inner
    if _is_torchvision_deeplab(model):
        from ..hub import from_torchvision

        return from_torchvision(model)
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in [*model.parameters(), *model.buffers()]):
        import copy

        model = copy.deepcopy(model).float()
    return model


@contextlib.contextmanager
def _without_autocast() -> Iterator[None]:
    """Autocast off for the export and its checks: the graph's precision is ``precision=``'s. Under
    ``torch.autocast`` the exporter would trace bfloat16/float16 casts into an fp32 graph, and the checks would
    compare it with a reduced-precision reference. Inference mode off too: an export called under
    ``torch.inference_mode`` (an exported runtime's first call) would make the model's copy of inference
    tensors, which have no version counter for the fused layers' rebuild-on-change tokens."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device_type=device, enabled=False))
        yield


@contextlib.contextmanager
def _inference_state(model: nn.Module, output_stride: int | None) -> Iterator[int | None]:
    """Eval mode and the requested output stride for the duration; both restored afterwards."""
    was_training = model.training
    old_stride = getattr(model, "output_stride", None)
    switch = output_stride is not None and output_stride != old_stride
    if switch and not hasattr(model, "set_output_stride"):
        raise ValueError(f"cannot export at output stride {output_stride}: {type(model).__name__} has no "
                         f"set_output_stride() (its stride is {old_stride}); switch it before optimizing")
    model.eval()
    try:
        if switch:
            model.set_output_stride(output_stride)
        yield output_stride if output_stride is not None else old_stride
    finally:
        if switch:
            model.set_output_stride(old_stride)
        model.train(was_training)


@torch.no_grad()
def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> bool:
    """Fold ``bn`` into ``conv`` in place with :func:`fastdeeplab.kernels.reference.fold_bn` (the one home of
    the arithmetic); ``False`` when the pair cannot be folded."""
    from ..kernels.reference import fold_bn

    if (type(conv) is not nn.Conv2d or not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None
            or bn.running_var is None or conv.out_channels != bn.num_features):
        return False
    weight, bias = fold_bn(conv, bn)
    conv.weight = nn.Parameter(weight, requires_grad=False)
    conv.bias = nn.Parameter(bias, requires_grad=False)
    return True


def _sequential_children(module: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """Children of a container whose forward runs them in order, else ``None``."""
    from ..model import ASPPPooling, Backbone

    if type(module).forward is nn.Sequential.forward or isinstance(module, (ASPPPooling, Backbone)):
        return list(module.named_children())
    return None


def fold_batchnorm_(model: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d into the conv, in place; returns the count.

    Folded BNs become ``nn.Identity``. Pairs are found in containers that run their children in order
    (``nn.Sequential``, the ASPP pooling branch, the backbone) and in torchvision ResNet blocks
    (``conv1/bn1`` … ``conv3/bn3``). The model must be in eval mode: running statistics are used.
    """
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if model.training:
        raise ValueError("fold_batchnorm_ needs a model in eval mode (it uses the running statistics)")
    folded = 0
    for module in list(model.modules()):
        children = _sequential_children(module)
        if children is not None:
            for (_, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and _fold_pair(conv, bn):
                    setattr(module, bn_name, nn.Identity())
                    folded += 1
        if isinstance(module, (BasicBlock, Bottleneck)):
            for i in (1, 2, 3):
                conv, bn = getattr(module, f"conv{i}", None), getattr(module, f"bn{i}", None)
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and _fold_pair(conv, bn):
                    setattr(module, f"bn{i}", nn.Identity())
                    folded += 1
    return folded


class _ExportWrapper(nn.Module):
    """Turns the model's ``{"out": ..., "aux": ...}`` into a tuple in output-name order, plus labels.

    ``uint8_input``: the graph takes raw ``uint8`` RGB ``[N, 3, H, W]`` and normalises it in the graph
    (ImageNet mean and std folded into one multiply-add per channel). ``labels_dtype``: int32, or uint8
    (through float32: TensorRT casts to uint8 only from a float type).
    """

    def __init__(self, model: nn.Module, outputs: Sequence[str], argmax: bool, *, uint8_input: bool = False,
                 labels_dtype: torch.dtype = torch.int32) -> None:
        super().__init__()
        from ..images import IMAGENET_MEAN, IMAGENET_STD

        self.model = model
        self.outputs = tuple(outputs)
        self.argmax = argmax
        self.uint8_input = uint8_input
        self.labels_dtype = labels_dtype
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
        self.register_buffer("scale", (1.0 / (255.0 * std)).float(), persistent=False)
        self.register_buffer("shift", (-mean / std).float(), persistent=False)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if self.uint8_input:
            x = x.to(self.scale.dtype) * self.scale + self.shift
        result = self.model(x)
        if isinstance(result, Tensor):
            result = {"out": result}
        values = [result[name] for name in self.outputs]
        if self.argmax:
            labels = result["out"].argmax(dim=1)
            if self.labels_dtype == torch.uint8:
                labels = labels.to(torch.float32)
            values.append(labels.to(self.labels_dtype))
        return tuple(values)


def _check_outputs(model: nn.Module, outputs: Sequence[str], argmax: bool) -> tuple[str, ...]:
    outputs = tuple(outputs)
    unknown = [o for o in outputs if o not in _MODEL_OUTPUTS]
    if unknown:
        raise ValueError(f"unknown output(s) {unknown}; the model's outputs are {_MODEL_OUTPUTS}")
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"duplicate output names in {outputs}")
    if not outputs and not argmax:
        raise ValueError("nothing to export: outputs is empty and argmax is False")
    if "aux" in outputs and getattr(model, "aux_classifier", True) is None:
        raise ValueError("outputs asks for 'aux' but the model has no auxiliary head (build it with aux_loss=True)")
    return outputs


def _check_size(size: Sequence[int], stride: int | None, what: str = "input_size") -> tuple[int, int]:
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) for s in size):
        raise ValueError(f"{what} must be (height, width) integers, got {size!r}")
    h, w = int(size[0]), int(size[1])
    least = stride or 1
    if h < least or w < least:
        raise ValueError(f"{what} {h}x{w} is smaller than the output stride {least}")
    return h, w
