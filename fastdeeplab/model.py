"""DeepLabv3 (Chen et al., 2017) as a drop-in replacement for torchvision's ``DeepLabV3``.

Module names match torchvision's (``backbone``, ``classifier``, ``aux_classifier``, ``ASPP.convs``,
``ASPP.project``), so a torchvision checkpoint loads with ``strict=True`` and gives the same outputs.
What torchvision lacks is added on top:

* output stride 8, 16 or 32, switchable at run time with :meth:`DeepLabV3.set_output_stride` (atrous
  convolution changes resolution without changing parameters: the paper trains at OS16, infers at OS8);
* the paper's multi-grid rates in block4 (§3.2);
* the paper's cascaded variant (block5–7, §3.2, Figure 3);
* the paper's ASPP head (``head="paper"``, §3.3).

Every stride, dilation and ASPP rate is derived in one place: :func:`atrous_plan`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

__all__ = [
    "ASPP",
    "ASPPConv",
    "ASPPPooling",
    "AtrousPlan",
    "Backbone",
    "DeepLabHead",
    "DeepLabV3",
    "FCNHead",
    "PaperHead",
    "atrous_plan",
    "capturing_graph",
    "check_input",
    "check_input_matches",
    "check_int",
    "check_ints",
    "nonfinite_to_nan",
]

OUTPUT_STRIDES = (8, 16, 32)
ASPP_RATES_AT_OS16 = (6, 12, 18)
_STEM_STRIDE = 4  # conv1 (stride 2) + maxpool (stride 2)


# --------------------------------------------------------------------------------------------------
# Argument types: checked when the model is built, so 16.0, "124" or 2.5 never reach the layers.
# --------------------------------------------------------------------------------------------------
def check_int(name: str, value: object, *, choices: Sequence[int] | None = None, minimum: int | None = None) -> int:
    """``value`` as an ``int``, or a ``TypeError``/``ValueError`` naming ``name`` and what it accepts.

    ``bool``, floats (even ``16.0``) and strings are refused: an int-valued float is as likely a bug as a
    truncated one. numpy integers are accepted.
    """
    allowed = (f"one of {tuple(choices)}" if choices is not None
               else f"an int >= {minimum}" if minimum is not None else "an int")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {allowed}; got {value!r} ({type(value).__name__})")
    value = int(value)
    if choices is not None and value not in choices:
        raise ValueError(f"unknown {name.replace('_', ' ')} {value}; expected one of {tuple(choices)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


def check_ints(name: str, values: object, *, minimum: int = 1) -> tuple[int, ...]:
    """A non-empty list or tuple of ints ``>= minimum`` as a tuple, or an error naming ``name``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise TypeError(f"{name} must be a non-empty list or tuple of ints >= {minimum}, e.g. (1, 2, 4); "
                        f"got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must hold ints >= {minimum}; got {v!r} ({type(v).__name__}) in {values!r}")
        if v < minimum:
            raise ValueError(f"{name} must hold ints >= {minimum}; got {v} in {tuple(values)!r}")
        out.append(int(v))
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# The one place where strides, dilations and rates are derived.
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AtrousPlan:
    """Strides and dilations for every residual stage and the ASPP rates, for one output stride.

    ``stages[name] = (stride, dilations)``: the stride of the stage's first unit and the dilation of the
    3×3 conv of each of its units.
    """

    output_stride: int
    stages: dict[str, tuple[int, tuple[int, ...]]]
    aspp_rates: tuple[int, ...]


def atrous_plan(output_stride: int, units: Sequence[int], multi_grid: Sequence[int] = (1, 1, 1),
                aspp_rates_at_os16: Sequence[int] = ASPP_RATES_AT_OS16) -> AtrousPlan:
    """Derive strides, dilations and ASPP rates for a ResNet with ``units[i]`` units in stage ``i + 1``.

    Stages are ``layer1`` … ``layerK`` (``K = 4`` for DeepLabv3, ``7`` for the cascaded model). Each stage
    after ``layer1`` nominally halves the resolution. Once the running stride reaches ``output_stride``, a
    stage keeps stride 1 and doubles the atrous rate instead (paper §3.1).

    Dilations inside a stage:

    * ``multi_grid == (1, 1, 1)`` on ``layer2``–``layer4``: torchvision's convention, where the first unit
      of a dilated stage keeps the previous rate (``replace_stride_with_dilation``). This is what makes the
      defaults reproduce torchvision exactly.
    * Otherwise, from ``layer4`` on, the paper's multi-grid rule (§3.2): unit ``i`` has dilation
      ``rate * multi_grid[i]``, so OS16 with ``(1, 2, 4)`` gives ``(2, 4, 8)``. The cascaded stages
      ``layer5``+ always use this rule.

    ASPP rates scale with the stride: ``(6, 12, 18)`` at 16, doubled at 8, halved at 32.

    >>> atrous_plan(16, (3, 4, 6, 3), multi_grid=(1, 2, 4)).stages["layer4"]
    (1, (2, 4, 8))
    """
    output_stride = check_int("output_stride", output_stride, choices=OUTPUT_STRIDES)
    multi_grid = check_ints("multi_grid", multi_grid)
    stages: dict[str, tuple[int, tuple[int, ...]]] = {}
    current, rate = _STEM_STRIDE, 1
    for index, n in enumerate(units, start=1):
        name = f"layer{index}"
        previous_rate = rate
        if index == 1:
            stride = 1
        elif current * 2 <= output_stride:
            stride, current = 2, current * 2
        else:
            stride, rate = 1, rate * 2
        if index >= 4 and (index > 4 or multi_grid != (1, 1, 1)):
            if len(multi_grid) != n:
                raise ValueError(f"multi_grid {multi_grid} has {len(multi_grid)} rates but {name} has {n} units")
            dilations = tuple(rate * r for r in multi_grid)
        else:
            dilations = (previous_rate,) + (rate,) * (n - 1)
        stages[name] = (stride, dilations)
    scale = 16 / output_stride
    rates = tuple(max(1, round(r * scale)) for r in aspp_rates_at_os16)
    return AtrousPlan(output_stride, stages, rates)


# --------------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------------
_RESNET_UNITS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def _copy_of_block4(block4: nn.Sequential, norm_layer: type[nn.Module]) -> nn.Sequential:
    """A fresh stage with block4's structure whose input is block4's output (2048 channels).

    The first unit keeps a projection shortcut (1×1 conv + BN), as block4's does, so the stage can take a
    stride of 2 when the output stride allows it.
    """
    channels = block4[-1].conv3.out_channels
    planes = block4[-1].conv1.out_channels
    units = []
    for i in range(len(block4)):
        downsample = None
        if i == 0:
            downsample = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), norm_layer(channels))
        units.append(tv_resnet.Bottleneck(channels, planes, downsample=downsample, norm_layer=norm_layer))
    return nn.Sequential(*units)


class Backbone(nn.ModuleDict):
    """A ResNet without its classifier: ``conv1, bn1, relu, maxpool, layer1 … layerK``.

    Like torchvision's ``IntermediateLayerGetter``, it returns ``{"out": last stage, "aux": layer3}``
    (``"aux"`` only when asked for), so parameter names are ``backbone.layer4.0.conv2.weight`` etc.
    """

    def __init__(self, depth: int, *, extra_stages: int = 0, return_aux: bool = False,
                 norm_layer: type[nn.Module] | None = None) -> None:
        if depth not in _RESNET_UNITS:
            raise ValueError(f"unsupported ResNet depth {depth}; expected one of {sorted(_RESNET_UNITS)}")
        builder = tv_resnet.resnet50 if depth == 50 else tv_resnet.resnet101
        net = builder(weights=None, norm_layer=norm_layer)
        layers: dict[str, nn.Module] = {}
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            layers[name] = getattr(net, name)
        for i in range(extra_stages):  # the cascaded model: block4 copied as block5, block6, ...
            layers[f"layer{5 + i}"] = _copy_of_block4(net.layer4, norm_layer or nn.BatchNorm2d)
        super().__init__(layers)
        self.depth = depth
        self.return_aux = return_aux

    @classmethod
    def from_modules(cls, layers: dict[str, nn.Module], *, depth: int, return_aux: bool) -> Backbone:
        """A backbone over existing modules (the fused copies that ``optimize`` builds)."""
        backbone = cls.__new__(cls)
        nn.ModuleDict.__init__(backbone, layers)
        backbone.depth, backbone.return_aux = depth, return_aux
        return backbone

    # Python-side helpers, not part of the scripted forward (TorchScript compiles properties by default).
    __jit_unused_properties__ = ["stage_names", "units"]

    @property
    def stage_names(self) -> list[str]:
        return [k for k in self.keys() if k.startswith("layer")]

    @property
    def units(self) -> tuple[int, ...]:
        return tuple(len(self[k]) for k in self.stage_names)

    def apply_plan(self, plan: AtrousPlan) -> None:
        """Set every stride, dilation and padding from ``plan``; parameters and buffers are untouched."""
        for name in self.stage_names:
            stride, dilations = plan.stages[name]
            for i, unit in enumerate(self[name]):
                s = stride if i == 0 else 1
                unit.conv2.stride = (s, s)
                unit.conv2.dilation = (dilations[i], dilations[i])
                unit.conv2.padding = (dilations[i], dilations[i])
                if unit.downsample is not None:  # a Sequential(conv, bn), or a fused conv
                    ds = unit.downsample
                    (ds[0] if isinstance(ds, nn.Sequential) else ds).stride = (s, s)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, module in self.items():
            x = module(x)
            if name == "layer3" and self.return_aux:
                out["aux"] = x
        out["out"] = x
        return out


# --------------------------------------------------------------------------------------------------
# Heads (same structure and parameter names as torchvision's)
# --------------------------------------------------------------------------------------------------
class ASPPConv(nn.Sequential):
    """3×3 atrous conv → BN → ReLU (one ASPP branch)."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )

    def set_rate(self, rate: int) -> None:
        self[0].dilation = (rate, rate)
        self[0].padding = (rate, rate)


class ASPPPooling(nn.Sequential):
    """Image-level features: global average pool → 1×1 conv → BN → ReLU, broadcast back to ``H×W``.

    torchvision upsamples the 1×1 map bilinearly, which is a constant; broadcasting (``expand``) gives the
    same values, exports as ONNX ``Expand`` instead of a ``Resize`` of a 1×1 map, and costs nothing.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        y = x
        for module in self:
            y = module(y)
        return y.expand(-1, -1, x.shape[-2], x.shape[-1])


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling (paper §3.3): a 1×1 conv, three 3×3 atrous convs and image pooling,
    concatenated and projected by a 1×1 conv → BN → ReLU (→ Dropout in torchvision's head)."""

    def __init__(self, in_channels: int, atrous_rates: Sequence[int], out_channels: int = 256,
                 dropout: float = 0.5) -> None:
        super().__init__()
        modules: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
                          nn.ReLU())
        ]
        modules += [ASPPConv(in_channels, out_channels, int(r)) for r in atrous_rates]
        modules.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(modules)
        project: list[nn.Module] = [
            nn.Conv2d(len(self.convs) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        ]
        if dropout > 0:
            project.append(nn.Dropout(dropout))
        self.project = nn.Sequential(*project)

    __jit_unused_properties__ = ["rates"]

    @property
    def rates(self) -> tuple[int, ...]:
        return tuple(m[0].dilation[0] for m in self.convs if isinstance(m, ASPPConv))

    def set_rates(self, rates: Sequence[int]) -> None:
        branches = [m for m in self.convs if isinstance(m, ASPPConv)]
        if len(branches) != len(rates):
            raise ValueError(f"ASPP has {len(branches)} atrous branches, got {len(rates)} rates")
        for m, r in zip(branches, rates):
            m.set_rate(int(r))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class DeepLabHead(nn.Sequential):
    """torchvision's head: ASPP → 3×3 conv → BN → ReLU → 1×1 conv to logits."""

    def __init__(self, in_channels: int, num_classes: int, atrous_rates: Sequence[int] = (12, 24, 36)) -> None:
        super().__init__(
            ASPP(in_channels, atrous_rates),
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(),
            nn.Conv2d(256, num_classes, 1),
        )


class PaperHead(nn.Sequential):
    """The paper's head (§3.3): ASPP concat → 1×1 conv (256) + BN → 1×1 conv to logits. No 3×3, no dropout."""

    def __init__(self, in_channels: int, num_classes: int, atrous_rates: Sequence[int] = (12, 24, 36)) -> None:
        super().__init__(ASPP(in_channels, atrous_rates, dropout=0.0), nn.Conv2d(256, num_classes, 1))


class CascadeHead(nn.Sequential):
    """Head of the cascaded model (paper §3.2): block7's features straight to logits by a 1×1 conv."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(nn.Conv2d(in_channels, num_classes, 1))


class FCNHead(nn.Sequential):
    """torchvision's auxiliary head on layer3: 3×3 conv → BN → ReLU → Dropout → 1×1 conv."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        inter = in_channels // 4
        super().__init__(
            nn.Conv2d(in_channels, inter, 3, padding=1, bias=False),
            nn.BatchNorm2d(inter),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Conv2d(inter, num_classes, 1),
        )


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
def capturing_graph() -> bool:
    """Whether the forward pass is being traced, scripted, compiled or exported to ONNX rather than run:
    input checks, layout conversions and backend-specific kernels then step aside for plain ops."""
    return (torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.jit.is_scripting()
            or torch.compiler.is_compiling())


def check_input(x: Tensor, output_stride: int, in_channels: int = 3) -> None:
    """Raise a ``ValueError``/``TypeError`` that names the problem with an input batch ``[N, 3, H, W]``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided or x.is_nested:
        kind = "nested" if x.is_nested else str(x.layout).removeprefix("torch.")
        raise TypeError(f"expected a dense input tensor, got a {kind} one; convert it first (x.to_dense())")
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D input [N, C, H, W], got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point input (normalised image), got dtype {x.dtype}")
    n, c, h, w = x.shape
    if c != in_channels:
        raise ValueError(f"expected {in_channels} input channels (RGB), got {c} in shape {tuple(x.shape)}")
    if n == 0:
        raise ValueError("empty batch: the input has batch size 0")
    if h < output_stride or w < output_stride:
        raise ValueError(f"input size {h}x{w} is smaller than the output stride {output_stride}; "
                         f"each side must be at least {output_stride} pixels")


def check_train_batch(model: nn.Module, x: Tensor) -> None:
    """A model in training mode cannot run one image: the BatchNorm after ASPP's image pooling would see one
    value per channel (torch's "Expected more than 1 value per channel when training"). Say so first. A
    synchronised BatchNorm (``process_group`` attribute: torch's and :mod:`fastdeeplab.training`'s) with
    more than one process sees every process's image, so one image per process is fine there."""
    if model.training and x.shape[0] == 1 and any(
            isinstance(m, ASPPPooling) and any(_sees_one_value(b) for b in m.modules())
            for m in model.modules()):
        raise ValueError("the model is in training mode and the batch holds one image: BatchNorm after ASPP's "
                         "image pooling needs more than one value per channel; call model.eval() for inference, "
                         "or train with a batch size > 1")


def _sees_one_value(module: nn.Module) -> bool:
    """Whether ``module`` is a training BatchNorm whose statistics come from this process's batch alone."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or not module.training:
        return False
    if hasattr(module, "process_group") and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(module.process_group) <= 1
    return True


def check_input_matches(x: Tensor, weight: Tensor) -> None:
    """Refuse an input whose dtype or device differs from the model's weights, in the model's own words
    (torch's own errors name neither). Under ``torch.autocast`` the dtype is autocast's business."""
    if x.device != weight.device:
        raise ValueError(f"the input is on {x.device} but the model is on {weight.device}; move one of them "
                         f"(x.to({str(weight.device)!r}) or model.to({str(x.device)!r}))")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"the input is {x.dtype} but the model's weights are {weight.dtype}; convert the input "
                        f"(x.to({weight.dtype})) or the model (model.to({x.dtype}))")


def nonfinite_to_nan(x: Tensor, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """The non-finite input policy, the same on every backend: **NaN in, NaN out**.

    An image ``x[n]`` holding any NaN or ±inf gets NaN logits everywhere (``"out"``, ``"aux"``) and label
    ``-1`` (``"labels"``, where a graph computes them); the other images of the batch are untouched. This is
    what the eager model gives by itself (ASPP's image-pooling branch averages the NaN into every pixel), but
    fused ReLUs (oneDNN, OpenVINO) map NaN to 0 and would return confident labels, so every backend applies
    this after its forward. Cost: one ``isfinite`` pass over the input; on the CPU the outputs are touched
    only when a non-finite value is present.
    """
    bad = ~torch.isfinite(x).reshape(x.shape[0], -1).all(1)
    if x.device.type == "cpu" and not bool(bad.any()):
        return outputs
    result: dict[str, Tensor] = {}
    for name, value in outputs.items():
        mask = bad.to(value.device).view((-1,) + (1,) * (value.dim() - 1))
        if value.is_floating_point():
            result[name] = value.masked_fill(mask, float("nan"))
        elif name == "labels":
            result[name] = value.masked_fill(mask, -1)
        else:
            result[name] = value
    return result


class DeepLabV3(nn.Module):
    """DeepLabv3 with an atrous ResNet backbone.

    ``forward(x)`` takes ``[N, 3, H, W]`` normalised images and returns ``{"out": [N, K, H, W]}`` logits at
    the input resolution, plus ``"aux"`` when the auxiliary head is on — exactly torchvision's contract.

    >>> import fastdeeplab, torch
    >>> model = fastdeeplab.deeplabv3_resnet50(output_stride=16).eval()
    >>> model(torch.rand(1, 3, 65, 65))["out"].shape
    torch.Size([1, 21, 65, 65])
    """

    __jit_unused_properties__ = ["aspp", "plan"]

    def __init__(self, backbone: Backbone, classifier: nn.Module, aux_classifier: nn.Module | None = None, *,
                 output_stride: int = 8, multi_grid: Sequence[int] = (1, 1, 1),
                 aspp_rates_at_os16: Sequence[int] = ASPP_RATES_AT_OS16) -> None:
        output_stride = check_int("output_stride", output_stride, choices=OUTPUT_STRIDES)
        multi_grid = check_ints("multi_grid", multi_grid)
        aspp_rates_at_os16 = check_ints("aspp_rates", aspp_rates_at_os16)
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier
        self.multi_grid = tuple(multi_grid)
        self.aspp_rates_at_os16 = tuple(aspp_rates_at_os16)
        self.output_stride = output_stride
        self.set_output_stride(output_stride)

    @property
    def aspp(self) -> nn.Module | None:
        """The ASPP module (plain or fused: anything with ``rates``/``set_rates``), or ``None``."""
        head = self.classifier
        first = head[0] if isinstance(head, nn.Sequential) else None
        return first if hasattr(first, "set_rates") else None

    @property
    def plan(self) -> AtrousPlan:
        return self._atrous_plan(self.output_stride)

    def _atrous_plan(self, output_stride: int) -> AtrousPlan:
        """The backbone's own plan when it has one (MobileNetV3: ``backbone.atrous_plan``), else the ResNet's."""
        own = getattr(self.backbone, "atrous_plan", None)
        if own is not None:
            return own(output_stride, self.multi_grid, self.aspp_rates_at_os16)
        return atrous_plan(output_stride, self.backbone.units, self.multi_grid, self.aspp_rates_at_os16)

    def set_output_stride(self, output_stride: int) -> DeepLabV3:
        """Switch to output stride 8, 16 or 32 in place: strides, dilations (multi-grid included) and ASPP
        rates change, parameters and buffers do not. Returns ``self``."""
        plan = self._atrous_plan(output_stride)
        self.backbone.apply_plan(plan)
        if self.aspp is not None:
            self.aspp.set_rates(plan.aspp_rates)
        self.output_stride = output_stride
        return self

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``[N, 3, H, W]`` normalised images → ``{"out": [N, K, H, W]}`` logits (+ ``"aux"``).

        Refused with a message that names the problem: a non-tensor, wrong rank, channels, integer dtype,
        empty batch, sides below the output stride, and a dtype or device other than the model's. An image
        with NaN or inf gets NaN logits everywhere (:func:`nonfinite_to_nan`), as on every backend.
        """
        checked = False
        if not torch.jit.is_scripting():
            if not capturing_graph():
                check_input(x, self.output_stride)
                check_train_batch(self, x)
                stem = getattr(self.backbone, "stem", None)  # MobileNetV3's features[0][0]; a ResNet's conv1
                check_input_matches(x, (self.backbone["conv1"] if stem is None else stem).weight)
                checked = True
        size = x.shape[-2:]
        features = self.backbone(x)
        result: dict[str, Tensor] = {}
        out = self.classifier(features["out"])
        result["out"] = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        if self.aux_classifier is not None:
            aux = self.aux_classifier(features["aux"])
            result["aux"] = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
        if not torch.jit.is_scripting():
            if checked:
                result = nonfinite_to_nan(x, result)
        return result

    def extra_repr(self) -> str:
        return f"output_stride={self.output_stride}, multi_grid={self.multi_grid}"
