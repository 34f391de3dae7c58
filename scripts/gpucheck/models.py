"""The models and inputs the stages run: one set of weights, a (torchvision, fastdeeplab) pair per output stride.

On the GPU: torchvision's ``deeplabv3_resnet50`` and ``deeplabv3_mobilenet_v3_large`` (21 classes), with
torchvision's COCO-VOC weights when they are in the torch hub cache, else the bench suite's seeded random
weights whose BatchNorm statistics come from photographs (``bench._impls.resolve_weights``: finite, O(1)
logits, so fp16 does not overflow), and ``fastdeeplab.from_torchvision`` of it. MobileNetV3-Large is the real
model in the dry run too (its only Triton layers there are the depthwise convs and the head, cheap enough for
the interpreter at 17 px). In the dry run: a *tiny* DeepLabv3 with the same structure (stem,
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

__all__ = ["MOBILENET", "ModelWeights", "conv_layers", "depthwise_layers", "input_batch", "load_weights",
           "mobilenet_pointwise_layers", "model_launches", "model_pair", "pointwise_on_triton"]

NUM_CLASSES = 21
MOBILENET = "mobilenet_v3_large"  # fastdeeplab.weights.BACKBONES name of deeplabv3_mobilenet_v3_large
TINY_WIDTHS = (8, 16, 32, 64)  # bottleneck planes per stage (outputs 4x): ResNet-50 has 64, 128, 256, 512
TINY_UNITS = (1, 1, 1, 2)  # ResNet-50: 3, 4, 6, 3 (two units in layer4: a dilated unit at OS16)


@dataclass
class ModelWeights:
    spec: str  # "resnet50" | "mobilenet_v3_large" | "tiny"
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
    if spec not in ("resnet50", MOBILENET):
        raise ValueError(f"unknown model {spec!r}")
    from bench._impls import resolve_weights

    weights = resolve_weights(None, spec, seed, lambda: input_batch(129, 6, seed)[0])
    name = "DeepLabv3-ResNet-50" if spec == "resnet50" else "DeepLabv3-MobileNetV3-Large"
    return ModelWeights(spec, weights.state_dict, f"{name}, {weights.description}")


def model_pair(weights: ModelWeights, output_stride: int) -> tuple[nn.Module, nn.Module]:
    """``(torchvision DeepLabV3, fastdeeplab DeepLabV3)`` at ``output_stride``, float32, eval, on the CPU,
    with the same weights."""
    import fastdeeplab

    if weights.spec == "tiny":
        ours = _tiny_fastdeeplab(output_stride)
        ours.load_state_dict(weights.state_dict, strict=True)
        return _tiny_torchvision(ours), ours
    from bench._impls import torchvision_reference

    tv = torchvision_reference(50 if weights.spec == "resnet50" else weights.spec, NUM_CLASSES, output_stride,
                               weights.state_dict)
    ours = fastdeeplab.from_torchvision(tv).eval()
    if ours.output_stride != output_stride:
        raise RuntimeError(f"from_torchvision gave output stride {ours.output_stride}, expected {output_stride}")
    return tv, ours


@functools.lru_cache(maxsize=4)
def _meta_model(spec: str, output_stride: int) -> nn.Module:
    with torch.device("meta"):
        if spec == "tiny":
            return _tiny_fastdeeplab(output_stride)
        import fastdeeplab

        if spec == MOBILENET:
            return fastdeeplab.deeplabv3_mobilenet_v3_large(num_classes=NUM_CLASSES,
                                                            output_stride=output_stride).eval()
        return fastdeeplab.deeplabv3_resnet50(num_classes=NUM_CLASSES, output_stride=output_stride).eval()


def conv_layers(spec: str, output_stride: int, resolution: int | tuple[int, int]) -> list[dict]:
    """Every convolution of the fastdeeplab model at ``output_stride`` on a ``resolution²`` (or ``(h, w)``)
    input, in order: ``{"name", "cin", "cout", "h", "w", "k", "stride", "padding", "dilation", "groups"}``
    (input map ``h × w``). Runs on the meta device: no memory, no arithmetic."""
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
                      "dilation": module.dilation[0], "groups": module.groups})

    handles = [m.register_forward_pre_hook(lambda mod, args, name=n: hook(mod, args, name))
               for n, m in ours.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            ours(torch.empty(1, 3, h_in, w_in, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return tuple(found)


def depthwise_layers(spec: str, output_stride: int, resolution: int | tuple[int, int]) -> list[dict]:
    """The depthwise convolutions of MobileNetV3-Large (``spec`` ``"mobilenet_v3_large"``) at ``output_stride``,
    in order, each as :func:`conv_layers` gives it plus what its block fuses into the kernel's epilogue:
    ``"activation"`` (``"relu"`` or ``"hardswish"``, the module after its BatchNorm) and ``"se"`` (the block has
    a squeeze-excitation: the Triton backend runs the SE pooling pass, then the conv with the scale)."""
    from torchvision.ops.misc import SqueezeExcitation

    model = _meta_model(spec, output_stride)
    by_name = {c["name"]: c for c in conv_layers(spec, output_stride, resolution)}
    out = []
    for name, block in model.backbone.named_children():
        inner = getattr(block, "block", None)
        if inner is None:
            continue
        se = any(isinstance(m, SqueezeExcitation) for m in inner)
        for i, unit in enumerate(inner):
            conv = unit[0] if isinstance(unit, nn.Sequential) and len(unit) else None
            if isinstance(conv, nn.Conv2d) and conv.groups > 1 and conv.groups == conv.in_channels:
                act = unit[2] if len(unit) > 2 else None
                activation = ("hardswish" if isinstance(act, nn.Hardswish) else "relu" if isinstance(act, nn.ReLU)
                              else "none")
                out.append(dict(by_name[f"backbone.{name}.block.{i}.0"], activation=activation, se=se))
    return out


def mobilenet_pointwise_layers(output_stride: int, resolution: int | tuple[int, int]) -> list[dict]:
    """MobileNetV3-Large's 1×1 convs (the blocks' expand and project convs and ``features[16]``), in order, as
    :func:`conv_layers` gives them plus ``"activation"`` (the module after the BatchNorm: ``"relu"``,
    ``"hardswish"`` or ``"none"``) and ``"residual"`` (the block's input is added after the conv: the project
    conv of a block with ``use_res_connect``)."""
    from torchvision.models.mobilenetv3 import InvertedResidual

    model = _meta_model(MOBILENET, output_stride)
    by_name = {c["name"]: c for c in conv_layers(MOBILENET, output_stride, resolution)}
    out = []
    for name, block in model.backbone.named_children():
        units = list(block.block) if isinstance(block, InvertedResidual) else [block]
        prefix = f"backbone.{name}.block." if isinstance(block, InvertedResidual) else f"backbone.{name}"
        for i, unit in enumerate(units):
            conv = unit[0] if isinstance(unit, nn.Sequential) and len(unit) else None
            if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (1, 1) or conv.groups != 1:
                continue
            act = unit[2] if len(unit) > 2 else None
            activation = ("hardswish" if isinstance(act, nn.Hardswish) else "relu" if isinstance(act, nn.ReLU)
                          else "none")
            conv_name = f"{prefix}{i}.0" if isinstance(block, InvertedResidual) else f"{prefix}.0"
            residual = (isinstance(block, InvertedResidual) and block.use_res_connect and i == len(units) - 1)
            out.append(dict(by_name[conv_name], activation=activation, residual=residual))
    return out


@functools.lru_cache(maxsize=1)
def pointwise_on_triton() -> bool:
    """Whether ``optimize(backend="triton")`` runs MobileNetV3's 1×1 convs on the Triton conv kernel in this
    checkout: a fused 1×1 + hardswish layer with a forced-Triton dispatcher is run on a small CPU tensor, and
    the dispatcher's report (public: ``dispatch_report()``) is asked whether the layer went through it as a
    conv problem. Nothing is compiled; on the CPU the op runs its twin."""
    try:
        from fastdeeplab.kernels.dispatch import Dispatcher

        import fastdeeplab.layers_mobilenet as layers_mobilenet

        layer = layers_mobilenet.FusedConvBNAct(nn.Conv2d(16, 32, 1), None, activation="hardswish", backend="triton")
        layer.dispatcher, layer.dispatch_name = Dispatcher("triton"), "probe"
        with torch.no_grad():
            layer(torch.randn(1, 16, 3, 3).contiguous(memory_format=torch.channels_last))
        rows = getattr(layer.dispatcher.report(), "rows", None) or []
        return any(str(r.get("key", "")).startswith("conv1x1") for r in rows)
    except Exception:  # noqa: BLE001 (a checkout without the kernels or the layer: cuDNN)
        return False


def model_launches(spec: str, output_stride: int, size: int | tuple[int, int], batch: int, dtype: str,
                   tf32: bool = False) -> list:
    """The Triton launches one forward of ``optimize(model, backend="triton")`` makes when every layer runs
    its kernel (:class:`gpucheck.launches.Launch`, autotuned), in order: the stem stays on cuDNN
    (``fastdeeplab.layers.STEM_MAX_CIN``), the bottleneck's last conv takes the residual, the projection
    shortcut and the classifier's last conv have no ReLU, ASPP's four branches are one grouped launch, its
    image-pooling branch is a matrix-vector product (torch) and its projection the fused kernel.

    MobileNetV3-Large: its depthwise convs run the depthwise kernel (a block with a squeeze-excitation as two
    launches: the pooling pass, then the conv with the scale), its 1×1 convs the conv kernel with their
    activation (hardswish included) and residual where :func:`pointwise_on_triton` says ``optimize`` runs them
    there (else cuDNN), its stem cuDNN, the head as above."""
    from fastdeeplab.layers import STEM_MAX_CIN

    from .launches import Launch

    layers = conv_layers(spec, output_stride, size)
    out = []
    if spec == MOBILENET:
        depthwise = {c["name"]: c for c in depthwise_layers(spec, output_stride, size)}
        pointwise = ({c["name"]: c for c in mobilenet_pointwise_layers(output_stride, size)}
                     if pointwise_on_triton() else {})
        for c in layers:  # in forward order
            if c["name"] in depthwise:
                c = depthwise[c["name"]]
                base = Launch("depthwise", dtype, batch, c["cin"], c["cout"], c["h"], c["w"], k=c["k"],
                              stride=c["stride"], padding=c["padding"], dilation=c["dilation"],
                              activation=c["activation"])
                out += base.se_launches() if c["se"] else [base]
            elif c["name"] in pointwise:
                c = pointwise[c["name"]]
                out.append(Launch("conv", dtype, batch, c["cin"], c["cout"], c["h"], c["w"], k=1,
                                  residual=c["residual"], relu=c["activation"] == "relu",
                                  activation=c["activation"], tf32=tf32))
        layers = [c for c in layers if c["name"].startswith("classifier.")]
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
