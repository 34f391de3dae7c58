"""The models and inputs the stages run: one set of weights, a (torchvision, fastdeeplab) pair per output stride.

On the GPU: torchvision's ``deeplabv3_resnet50`` (21 classes), with torchvision's COCO-VOC weights when they
are in the torch hub cache, else the bench suite's seeded random weights whose BatchNorm statistics come from
photographs (``bench._impls.resolve_weights``: finite, O(1) logits, so fp16 does not overflow), and
``fastdeeplab.from_torchvision`` of it. In the dry run: a *tiny* DeepLabv3 with the same structure (stem,
four bottleneck stages, ASPP with image pooling, the torchvision head) but narrow stages, so the Triton
interpreter runs a whole model in seconds (3×3 stem, planes 8–64 instead of 64–512, 1/1/1/2 units); its torchvision twin is torchvision's ``DeepLabV3`` and
``DeepLabHead`` around the same modules, loaded from the same state dict (strict).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ModelWeights", "conv_layers", "input_batch", "load_weights", "model_launches", "model_pair"]

NUM_CLASSES = 21
TINY_WIDTHS = (8, 16, 32, 64)  # bottleneck planes per stage (outputs 4x): ResNet-50 has 64, 128, 256, 512
TINY_UNITS = (1, 1, 1, 2)  # ResNet-50: 3, 4, 6, 3 (two units in layer4: a dilated unit at OS16)


@dataclass
class ModelWeights:
    spec: str  # "resnet50" | "tiny"
    state_dict: dict[str, Tensor]
    description: str


def input_batch(size: int, count: int, seed: int = 0) -> tuple[Tensor, str]:
    """``[count, 3, size, size]`` float32 on the CPU: scikit-image's photographs (ImageNet-normalised) when
    installed, else seeded Gaussian noise; and which of the two it is."""
    try:
        from fastdeeplab.images import sample_images

        names, batch = sample_images(size, count=count)
        return batch, f"photographs ({', '.join(sorted(set(names)))})"
    except (ImportError, FileNotFoundError):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(count, 3, size, size, generator=g), "Gaussian noise (scikit-image is not installed)"


# --------------------------------------------------------------------------------------------------
# The tiny model of the dry run
# --------------------------------------------------------------------------------------------------
def _tiny_fastdeeplab(output_stride: int) -> nn.Module:
    from torchvision.models.resnet import Bottleneck

    from fastdeeplab.model import Backbone, DeepLabHead, DeepLabV3

    stem = 16  # a 3x3 stem, not ResNet's 7x7: the interpreter's time goes by taps x tiles, and 49 taps dominated
    layers: dict[str, nn.Module] = {"conv1": nn.Conv2d(3, stem, 3, 2, 1, bias=False), "bn1": nn.BatchNorm2d(stem),
                                    "relu": nn.ReLU(inplace=True), "maxpool": nn.MaxPool2d(3, 2, 1)}
    inplanes = stem
    for i, (planes, units) in enumerate(zip(TINY_WIDTHS, TINY_UNITS), start=1):
        blocks = []
        for j in range(units):
            downsample = None
            if j == 0:  # a projection shortcut, as every ResNet stage's first unit has
                downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4))
            blocks.append(Bottleneck(inplanes, planes, downsample=downsample))
            inplanes = planes * 4
        layers[f"layer{i}"] = nn.Sequential(*blocks)
    backbone = Backbone.from_modules(layers, depth=50, return_aux=False)
    return DeepLabV3(backbone, DeepLabHead(inplanes, NUM_CLASSES), output_stride=output_stride).eval()


@torch.no_grad()
def _calibrate_bn(model: nn.Module, images: Tensor, seed: int) -> None:
    """Random BN affine, then running statistics from ``images`` (one train-mode pass), as the bench suite
    does for its random weights: non-trivial folding, finite O(1) logits."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    model(images)
    model.eval()


def _tiny_torchvision(ours: nn.Module) -> nn.Module:
    """torchvision's ``DeepLabV3`` + ``DeepLabHead`` around copies of ``ours``'s backbone, same weights."""
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3

    backbone = IntermediateLayerGetter(copy.deepcopy(ours.backbone), return_layers={"layer4": "out"})
    in_channels = ours.classifier[0].convs[0][0].in_channels
    tv = DeepLabV3(backbone, DeepLabHead(in_channels, NUM_CLASSES, atrous_rates=ours.aspp.rates))
    tv.load_state_dict(ours.state_dict(), strict=True)
    return tv.eval()


# --------------------------------------------------------------------------------------------------
# Public
# --------------------------------------------------------------------------------------------------
def load_weights(spec: str, seed: int = 0) -> ModelWeights:
    """The one state dict (torchvision names, no aux head) that every row of a stage uses."""
    if spec == "tiny":
        torch.manual_seed(seed)
        model = _tiny_fastdeeplab(8)
        images, source = input_batch(65, 4, seed)
        _calibrate_bn(model, images, seed)
        return ModelWeights("tiny", model.state_dict(),
                            f"tiny DeepLabv3 (stages {TINY_UNITS} units, planes {TINY_WIDTHS}), random, "
                            f"BN statistics from {source}")
    if spec != "resnet50":
        raise ValueError(f"unknown model {spec!r}")
    from bench._impls import resolve_weights

    weights = resolve_weights(None, "resnet50", seed, lambda: input_batch(129, 6, seed)[0])
    return ModelWeights("resnet50", weights.state_dict, f"DeepLabv3-ResNet-50, {weights.description}")


def model_pair(weights: ModelWeights, output_stride: int) -> tuple[nn.Module, nn.Module]:
    """``(torchvision DeepLabV3, fastdeeplab DeepLabV3)`` at ``output_stride``, float32, eval, on the CPU,
    with the same weights."""
    import fastdeeplab

    if weights.spec == "tiny":
        ours = _tiny_fastdeeplab(output_stride)
        ours.load_state_dict(weights.state_dict, strict=True)
        return _tiny_torchvision(ours), ours
    from bench._impls import torchvision_reference

    tv = torchvision_reference(50, NUM_CLASSES, output_stride, weights.state_dict)
    return tv, fastdeeplab.from_torchvision(tv).eval()


@functools.lru_cache(maxsize=4)
def _meta_model(spec: str, output_stride: int) -> nn.Module:
    with torch.device("meta"):
        if spec == "tiny":
            return _tiny_fastdeeplab(output_stride)
        import fastdeeplab

        return fastdeeplab.deeplabv3_resnet50(num_classes=NUM_CLASSES, output_stride=output_stride).eval()


def conv_layers(spec: str, output_stride: int, resolution: int | tuple[int, int]) -> list[dict]:
    """Every convolution of the fastdeeplab model at ``output_stride`` on a ``resolution²`` (or ``(h, w)``)
    input, in order: ``{"name", "cin", "cout", "h", "w", "k", "stride", "padding", "dilation"}`` (input map
    ``h × w``). Runs on the meta device: no memory, no arithmetic."""
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    return [dict(layer) for layer in _conv_layers(spec, output_stride, size)]


@functools.lru_cache(maxsize=16)
def _conv_layers(spec: str, output_stride: int, size: tuple[int, int]) -> tuple[dict, ...]:
    h_in, w_in = size
    ours = _meta_model(spec, output_stride)
    found: list[dict] = []

    def hook(module: nn.Conv2d, args: tuple, name: str) -> None:
        _, cin, h, w = args[0].shape
        found.append({"name": name, "cin": cin, "cout": module.out_channels, "h": h, "w": w,
                      "k": module.kernel_size[0], "stride": module.stride[0], "padding": module.padding[0],
                      "dilation": module.dilation[0]})

    handles = [m.register_forward_pre_hook(lambda mod, args, name=n: hook(mod, args, name))
               for n, m in ours.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            ours(torch.empty(1, 3, h_in, w_in, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return tuple(found)


def model_launches(spec: str, output_stride: int, size: int | tuple[int, int], batch: int, dtype: str,
                   tf32: bool = False) -> list:
    """The Triton launches one forward of ``optimize(model, backend="triton")`` makes when every layer runs
    its kernel (:class:`gpucheck.launches.Launch`, autotuned), in order: the stem stays on cuDNN
    (``fastdeeplab.layers.STEM_MAX_CIN``), the bottleneck's last conv takes the residual, the projection
    shortcut and the classifier's last conv have no ReLU, ASPP's four branches are one grouped launch, its
    image-pooling branch is a matrix-vector product (torch) and its projection the fused kernel."""
    from fastdeeplab.layers import STEM_MAX_CIN

    from .launches import Launch

    layers = conv_layers(spec, output_stride, size)
    out = []
    branches = [c for c in layers if ".convs." in c["name"] and ".convs.4." not in c["name"]]
    last = layers[-1]["name"]
    for c in layers:
        name = c["name"]
        if c["cin"] <= STEM_MAX_CIN or ".convs.4." in name:
            continue
        if ".convs." in name:
            if name == branches[0]["name"]:
                rates = tuple(b["dilation"] for b in branches[1:])
                out.append(Launch("aspp_branches", dtype, batch, c["cin"], c["cout"], c["h"], c["w"], k=3,
                                  rates=rates, tf32=tf32))
            continue
        if ".project." in name:
            out.append(Launch("aspp_project", dtype, batch, c["cin"] // 5, c["cout"], c["h"], c["w"], tf32=tf32))
            continue
        relu = not (name.endswith("downsample.0") or name == last)
        out.append(Launch("conv", dtype, batch, c["cin"], c["cout"], c["h"], c["w"], k=c["k"], stride=c["stride"],
                          padding=c["padding"], dilation=c["dilation"], residual=name.endswith(".conv3"),
                          relu=relu, tf32=tf32))
    return out
