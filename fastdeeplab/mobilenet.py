"""DeepLabV3 with a MobileNetV3-Large backbone: torchvision's ``deeplabv3_mobilenet_v3_large``, drop-in.

Module names match torchvision's (``backbone.0`` … ``backbone.16``, ``classifier``, ``aux_classifier``), so
its checkpoints load with ``strict=True`` and give the same outputs. torchvision's model runs at output
stride 16 only (``features[13]``, the C4 block, at stride 1 and dilation 2, ``features[14:16]`` dilated 2);
this one also runs at 8 (C3 = ``features[7:13]`` dilated 2, C4 dilated 4) and 32 (no dilation), switchable at
run time on the same weights with :meth:`~fastdeeplab.model.DeepLabV3.set_output_stride`. The stride plan
is derived in one place, :func:`mobilenet_atrous_plan`.

ASPP rates: torchvision's head uses ``(12, 24, 36)`` at every stride, and that stays the default for
parity. ``head="paper"`` gives the paper's head (§3.3: ASPP, 1×1 projection, 1×1 classifier) with rates that
follow the stride, ``(6, 12, 18)`` at OS16.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import mobilenetv3 as tv_mobilenetv3

from .model import (
    ASPP_RATES_AT_OS16,
    OUTPUT_STRIDES,
    AtrousPlan,
    DeepLabHead,
    DeepLabV3,
    FCNHead,
    PaperHead,
    check_int,
    check_ints,
)

__all__ = [
    "MOBILENET_ASPP_RATES",
    "MobileNetV3Backbone",
    "deeplabv3_mobilenet_v3_large",
    "depthwise_conv",
    "from_torchvision_mobilenet",
    "mobilenet_atrous_plan",
]

MOBILENET_ASPP_RATES = (12, 24, 36)  # torchvision's DeepLabHead, used unchanged at OS16
_OUT_KEY, _AUX_KEY = "16", "4"  # C5 (the 1×1 conv to 960 channels) and C2 (40 channels, OS8)
_STEM_STRIDE = 2


def depthwise_conv(block: nn.Module) -> nn.Module:
    """The module holding ``stride``, ``dilation`` and ``padding`` of an inverted-residual block's depthwise
    conv: a fused block's ``depthwise``, or the grouped ``nn.Conv2d`` inside torchvision's ``block``."""
    fused = getattr(block, "depthwise", None)
    if fused is not None:
        return fused
    for m in block.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            return m
    raise TypeError(f"{type(block).__name__} has no depthwise convolution")


def mobilenet_atrous_plan(output_stride: int, nominal_strides: Sequence[int],
                          aspp_rates: Sequence[int] = MOBILENET_ASPP_RATES, *,
                          aspp_follows_stride: bool = False) -> AtrousPlan:
    """Strides and dilations of the inverted-residual blocks ``features[1:16]`` and the ASPP rates.

    ``nominal_strides[i]`` is block ``i + 1``'s stride in the ImageNet network. Once the running stride reaches
    ``output_stride``, a strided block keeps stride 1 and doubles the rate instead; as in torchvision, that
    block's own depthwise conv already takes the new rate. ``stages["13"] = (stride, (dilation,))``.

    ASPP rates: ``aspp_rates`` unchanged (torchvision's head), or, with ``aspp_follows_stride``, taken as the
    rates at OS16 and scaled (doubled at 8, halved at 32).

    >>> plan = mobilenet_atrous_plan(16, (1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1))
    >>> plan.stages["13"], plan.stages["15"], plan.aspp_rates
    ((1, (2,)), (1, (2,)), (12, 24, 36))
    """
    output_stride = check_int("output_stride", output_stride, choices=OUTPUT_STRIDES)
    aspp_rates = check_ints("aspp_rates", aspp_rates)
    stages: dict[str, tuple[int, tuple[int, ...]]] = {}
    current, rate = _STEM_STRIDE, 1
    for index, nominal in enumerate(nominal_strides, start=1):
        stride = 1
        if nominal == 2:
            if current * 2 <= output_stride:
                stride, current = 2, current * 2
            else:
                rate *= 2
        stages[str(index)] = (stride, (rate,))
    rates = aspp_rates
    if aspp_follows_stride:
        rates = tuple(max(1, round(r * 16 / output_stride)) for r in aspp_rates)
    return AtrousPlan(output_stride, stages, tuple(rates))


class MobileNetV3Backbone(nn.ModuleDict):
    """MobileNetV3-Large's ``features`` (``"0"`` … ``"16"``) with torchvision's module names.

    Like torchvision's ``IntermediateLayerGetter`` it returns ``{"out": features[16], "aux": features[4]}``
    (``"aux"`` only when asked for). Strides and dilations come from :func:`mobilenet_atrous_plan` through
    :meth:`atrous_plan`/:meth:`apply_plan`, which :class:`~fastdeeplab.model.DeepLabV3` calls.
    """

    __jit_unused_properties__ = ["stem", "units"]

    def __init__(self, *, return_aux: bool = False, aspp_follows_stride: bool = False) -> None:
        features = tv_mobilenetv3.mobilenet_v3_large(weights=None, dilated=False).features
        super().__init__({str(i): m for i, m in enumerate(features)})
        self.return_aux = return_aux
        self.aspp_follows_stride = aspp_follows_stride
        self.nominal_strides = tuple(depthwise_conv(features[i]).stride[0] for i in range(1, len(features) - 1))

    @classmethod
    def from_modules(cls, layers: dict[str, nn.Module], *, like: MobileNetV3Backbone) -> MobileNetV3Backbone:
        """A backbone over existing modules (the fused copies that ``optimize`` builds), configured as ``like``."""
        backbone = cls.__new__(cls)
        nn.ModuleDict.__init__(backbone, layers)
        backbone.return_aux = like.return_aux
        backbone.aspp_follows_stride = like.aspp_follows_stride
        backbone.nominal_strides = like.nominal_strides
        return backbone

    @property
    def stem(self) -> nn.Module:
        """The first convolution (its ``weight`` gives the model's dtype and device)."""
        first = self["0"]
        return first[0] if isinstance(first, nn.Sequential) else first

    @property
    def units(self) -> tuple[int, ...]:
        return (len(self.nominal_strides),)

    def atrous_plan(self, output_stride: int, multi_grid: Sequence[int] = (1, 1, 1),
                    aspp_rates: Sequence[int] = MOBILENET_ASPP_RATES) -> AtrousPlan:
        if tuple(multi_grid) != (1, 1, 1):
            raise ValueError(f"multi_grid applies to ResNet backbones; MobileNetV3 takes (1, 1, 1), got {multi_grid}")
        return mobilenet_atrous_plan(output_stride, self.nominal_strides, aspp_rates,
                                     aspp_follows_stride=self.aspp_follows_stride)

    def apply_plan(self, plan: AtrousPlan) -> None:
        """Set every depthwise conv's stride, dilation and padding from ``plan``; parameters are untouched."""
        for name, (stride, (dilation,)) in plan.stages.items():
            conv = depthwise_conv(self[name])
            k = conv.kernel_size[0]
            conv.stride = (stride, stride)
            conv.dilation = (dilation, dilation)
            conv.padding = ((k - 1) // 2 * dilation,) * 2

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, module in self.items():
            x = module(x)
            if name == _AUX_KEY and self.return_aux:
                out["aux"] = x
        out["out"] = x
        return out


# --------------------------------------------------------------------------------------------------
# Builder and conversion
# --------------------------------------------------------------------------------------------------
def _weights_enums(kind: str) -> list[Any]:
    from torchvision.models import MobileNet_V3_Large_Weights
    from torchvision.models.segmentation import DeepLabV3_MobileNet_V3_Large_Weights

    return [MobileNet_V3_Large_Weights if kind == "backbone" else DeepLabV3_MobileNet_V3_Large_Weights]


def _load_backbone_weights(backbone: MobileNetV3Backbone, weights_backbone: Any) -> None:
    from .hub import _looks_like_path, _read_state_dict, _torchvision_weights

    if weights_backbone is None:
        return
    if _looks_like_path(weights_backbone):
        state = _read_state_dict(weights_backbone)
    else:
        state = _torchvision_weights(weights_backbone, _weights_enums("backbone")).get_state_dict(
            progress=True, check_hash=True)
    state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ValueError(f"backbone weights lack {len(missing)} keys, e.g. {missing[:5]}")
    backbone.load_state_dict({k: state[k] for k in own}, strict=True)


def deeplabv3_mobilenet_v3_large(*, weights: Any = None, weights_backbone: Any = None,
                                 num_classes: int | None = 21, aux_loss: bool | None = False,
                                 output_stride: int = 16, head: str = "torchvision",
                                 aspp_rates: Sequence[int] | None = None,
                                 multi_grid: Sequence[int] = (1, 1, 1)) -> DeepLabV3:
    """DeepLabv3 with a MobileNetV3-Large backbone; the defaults reproduce torchvision's
    ``deeplabv3_mobilenet_v3_large`` (output stride 16, ASPP rates (12, 24, 36)).

    Args:
        weights: a torchvision weights enum or its name, full
            (``"DeepLabV3_MobileNet_V3_Large_Weights.DEFAULT"``) or short (``"COCO_WITH_VOC_LABELS_V1"``,
            ``"DEFAULT"``), downloaded through torchvision or read from its cache; or a checkpoint path.
        weights_backbone: ImageNet weights for MobileNetV3-Large (enum, name or path), for training.
        num_classes: number of output classes.
        aux_loss: add torchvision's auxiliary FCN head on ``features[4]`` (C2, 40 channels).
        output_stride: 8, 16 or 32; changeable later with ``model.set_output_stride``.
        head: ``"torchvision"`` (ASPP + 3×3 conv; rates fixed at every stride) or ``"paper"`` (ASPP + 1×1
            conv; rates follow the stride).
        aspp_rates: ASPP rates; default (12, 24, 36) for torchvision's head, (6, 12, 18) at OS16 for the paper's.
        multi_grid: accepted for a uniform builder signature (training configs pass it); only ``(1, 1, 1)``:
            multi-grid is a ResNet block4 scheme.
    """
    from .hub import _HEADS, _check_checkpoint_path, _load_weights, _looks_like_path, _torchvision_weights

    if head not in _HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {_HEADS}")
    paper = head == "paper"
    if aspp_rates is None:
        aspp_rates = ASPP_RATES_AT_OS16 if paper else MOBILENET_ASPP_RATES
    mobilenet_atrous_plan(output_stride, (), aspp_rates)  # types and ranges checked before any work
    if check_ints("multi_grid", multi_grid) != (1, 1, 1):
        raise ValueError(f"multi_grid {tuple(multi_grid)} applies to ResNet backbones; "
                         "deeplabv3_mobilenet_v3_large takes multi_grid (1, 1, 1) (in a training config: multi_grid: [1, 1, 1])")
    num_classes = 21 if num_classes is None else check_int("num_classes", num_classes, minimum=1)
    if aux_loss is not None and not isinstance(aux_loss, bool):
        raise TypeError(f"aux_loss must be True, False or None; got {aux_loss!r}")
    enums = _weights_enums("model")
    for given in (weights, weights_backbone):  # a bad path or unknown name fails before the model is built
        if given is not None and _looks_like_path(given):
            _check_checkpoint_path(Path(given))
    if weights is not None and not _looks_like_path(weights):
        _torchvision_weights(weights, enums)
    if weights_backbone is not None and not _looks_like_path(weights_backbone):
        _torchvision_weights(weights_backbone, _weights_enums("backbone"))
    aux = bool(aux_loss)
    backbone = MobileNetV3Backbone(return_aux=aux, aspp_follows_stride=paper)
    channels = backbone[_OUT_KEY].out_channels
    classifier = (PaperHead if paper else DeepLabHead)(channels, num_classes)
    aux_classifier = FCNHead(backbone[_AUX_KEY].out_channels, num_classes) if aux else None
    model = DeepLabV3(backbone, classifier, aux_classifier, output_stride=output_stride,
                      aspp_rates_at_os16=aspp_rates)
    _load_backbone_weights(backbone, weights_backbone)
    _load_weights(model, weights, enums)
    return model


def _is_mobilenet_v3_large(features: nn.Module) -> bool:
    blocks = list(features.children()) if isinstance(features, nn.Module) else []
    return (len(blocks) == 17 and all(isinstance(b, tv_mobilenetv3.InvertedResidual) for b in blocks[1:16])
            and getattr(blocks[16], "out_channels", None) == 960)


def from_torchvision_mobilenet(model: nn.Module) -> DeepLabV3:
    """Convert torchvision's ``deeplabv3_mobilenet_v3_large`` (any classes, aux head or not) into a
    fastdeeplab model with the same weights and the same outputs; ``model`` is not modified."""
    from torchvision.models.segmentation.deeplabv3 import ASPP as TvASPP

    from .hub import load_checkpoint

    backbone = model.backbone
    if not _is_mobilenet_v3_large(backbone):
        raise TypeError("the backbone is not torchvision's MobileNetV3-Large features (17 blocks, 960 channels)")
    aspp = model.classifier[0]
    if not isinstance(aspp, TvASPP) or len(model.classifier) != 5:
        raise TypeError("the classifier is not torchvision's DeepLabHead")
    rates = tuple(m[0].dilation[0] for m in aspp.convs[1:-1])
    stride = _STEM_STRIDE
    for i in range(1, 16):
        stride *= depthwise_conv(backbone[str(i)]).stride[0]
    ours = deeplabv3_mobilenet_v3_large(num_classes=model.classifier[-1].out_channels,
                                        aux_loss=model.aux_classifier is not None, output_stride=stride,
                                        aspp_rates=rates)
    for i in range(1, 16):
        a, b = depthwise_conv(backbone[str(i)]), depthwise_conv(ours.backbone[str(i)])
        if (a.stride, a.dilation, a.padding) != (b.stride, b.dilation, b.padding):
            raise ValueError(f"features[{i}] has a stride/dilation this converter does not reproduce")
    load_checkpoint(ours, model.state_dict())
    ours.train(model.training)
    return ours
