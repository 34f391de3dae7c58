"""The MobileNetV3-Large backbone of ``deeplabv3_mobilenet_v3_large`` (builder and converter in :mod:`fastdeeplab.hub`).

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

from torch import Tensor, nn
from torchvision.models import mobilenetv3 as tv_mobilenetv3

from .model import OUTPUT_STRIDES, AtrousPlan, check_int, check_ints

__all__ = [
    "AUX_KEY",
    "MOBILENET_ASPP_RATES",
    "OUT_KEY",
    "MobileNetV3Backbone",
    "depthwise_conv",
    "is_mobilenet_v3_large",
    "mobilenet_atrous_plan",
]

MOBILENET_ASPP_RATES = (12, 24, 36)  # torchvision's DeepLabHead, used unchanged at OS16
OUT_KEY, AUX_KEY = "16", "4"  # C5 (the 1×1 conv to 960 channels) and C2 (40 channels, OS8)
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


def is_mobilenet_v3_large(features: nn.Module) -> bool:
    """Whether ``features`` is torchvision's MobileNetV3-Large ``features`` (17 blocks, 960 channels out)."""
    blocks = list(features.children()) if isinstance(features, nn.Module) else []
    return (len(blocks) == 17 and all(isinstance(b, tv_mobilenetv3.InvertedResidual) for b in blocks[1:16])
            and getattr(blocks[16], "out_channels", None) == 960)


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
            if name == AUX_KEY and self.return_aux:
                out["aux"] = x
        out["out"] = x
        return out
