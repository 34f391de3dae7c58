"""Builders, the model registry, checkpoint loading and conversion from torchvision."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .mobilenet import AUX_KEY as MOBILENET_AUX_KEY
from .mobilenet import (
    MOBILENET_ASPP_RATES,
    MobileNetV3Backbone,
    depthwise_conv,
    is_mobilenet_v3_large,
    mobilenet_atrous_plan,
)
from .mobilenet import OUT_KEY as MOBILENET_OUT_KEY
from .model import (
    ASPP_RATES_AT_OS16,
    Backbone,
    CascadeHead,
    DeepLabHead,
    DeepLabV3,
    FCNHead,
    PaperHead,
    atrous_plan,
    check_int,
    check_ints,
)

__all__ = [
    "deeplabv3_cascade_resnet50",
    "deeplabv3_cascade_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "from_torchvision",
    "get_model",
    "list_models",
    "load_checkpoint",
    "register_model",
]

_MODELS: dict[str, Callable[..., DeepLabV3]] = {}


def register_model(fn: Callable[..., DeepLabV3]) -> Callable[..., DeepLabV3]:
    """Add a builder to the registry under its function name; duplicate names are refused."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"a model named {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """Names accepted by :func:`get_model`, sorted."""
    return sorted(_MODELS)


def get_model(name: str, **kwargs: Any) -> DeepLabV3:
    """Build a registered model by name: ``get_model("deeplabv3_resnet50", output_stride=16)``."""
    try:
        builder = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None
    return builder(**kwargs)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
_CONFIG_FIELDS = ("name", "kwargs")
_WEIGHT_ARGUMENTS = ("weights", "weights_backbone")  # never taken from a checkpoint: its own tensors are


def check_model_config(config: Any, source: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's ``model_config`` (``{"name": builder, "kwargs": {...}}``, what :func:`fastdeeplab.train`
    stores) checked before anything is built: only those two fields, a registered builder, keyword arguments
    it takes, with values it accepts (the builder itself checks them, on the meta device: nothing is
    allocated). Any problem is one ``ValueError`` naming the checkpoint ``source`` and the field. Returns the
    config with list values as tuples."""
    where = f"checkpoint {os.fspath(source)}: model_config"
    if not isinstance(config, Mapping):
        raise ValueError(f"{where} is a {type(config).__name__}; expected a mapping with {_CONFIG_FIELDS}")
    extra = sorted(str(k) for k in config if k not in _CONFIG_FIELDS)
    if extra:
        raise ValueError(f"{where} has unknown field(s) {extra}; expected only {_CONFIG_FIELDS}")
    name = config.get("name", "deeplabv3_resnet50")
    if not isinstance(name, str) or name not in _MODELS:
        raise ValueError(f"{where} field 'name' is {name!r}, not a registered model ({', '.join(list_models())})")
    kwargs = config.get("kwargs", {})
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{where} field 'kwargs' is a {type(kwargs).__name__}; expected a mapping of arguments")
    builder = _MODELS[name]
    accepted = inspect.signature(builder).parameters
    for key in kwargs:
        if key not in accepted or key in _WEIGHT_ARGUMENTS:
            raise ValueError(f"{where} field 'kwargs.{key}' is not an argument of {name} (it takes "
                             f"{', '.join(k for k in accepted if k not in _WEIGHT_ARGUMENTS)})")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    try:
        with torch.device("meta"):
            builder(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} field 'kwargs' is refused by {name}: {' '.join(str(exc).split())}") from None
    return {"name": name, "kwargs": kwargs}


def _check_checkpoint_path(path: Path) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {path}: Is a directory; give the checkpoint file (e.g. "
                                f"{path / 'model_final.pt'})")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    _check_checkpoint_path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, truncated files: all mean "not a checkpoint"
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_checkpoint(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor], *,
                    drop_aux: bool | None = None) -> nn.Module:
    """Load a state dict or a checkpoint file into ``model`` strictly, with a readable error.

    Checkpoint files are read with ``weights_only=True``; a ``{"model": state_dict, ...}`` training
    checkpoint is accepted too. ``aux_classifier.*`` keys are dropped when the model has no aux head
    (torchvision's COCO weights ship one). Missing, unexpected and wrongly shaped keys are all listed.
    """
    state = dict(source) if isinstance(source, Mapping) else _read_state_dict(source)
    if drop_aux is None:
        drop_aux = getattr(model, "aux_classifier", None) is None
    if drop_aux:
        state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        def listing(title: str, items: list[str]) -> str:
            head = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
            return f"\n  {title} ({len(items)}): {head}" if items else ""
        raise ValueError("checkpoint does not match the model:" + listing("missing keys", missing)
                         + listing("unexpected keys", unexpected) + listing("wrongly shaped keys", shapes))
    model.load_state_dict(state, strict=True)
    return model


def _weights_enums(kind: str, depth: int) -> list[Any]:
    """torchvision's weights enums that fit a model (``kind="model"``) or its backbone (``"backbone"``)."""
    from torchvision.models import ResNet50_Weights, ResNet101_Weights
    from torchvision.models.segmentation import DeepLabV3_ResNet50_Weights, DeepLabV3_ResNet101_Weights

    if kind == "backbone":
        return [ResNet50_Weights if depth == 50 else ResNet101_Weights]
    return [DeepLabV3_ResNet50_Weights if depth == 50 else DeepLabV3_ResNet101_Weights]


def _torchvision_weights(weights: Any, enums: Sequence[Any] = ()) -> Any:
    """Resolve a torchvision weights enum or its name: the full name (``"DeepLabV3_ResNet50_Weights.DEFAULT"``)
    or, for the enums in ``enums`` (those that fit the model being built), the short one
    (``"COCO_WITH_VOC_LABELS_V1"``, ``"DEFAULT"``). An unknown name lists the valid ones."""
    from torchvision.models import get_weight
    from torchvision.models._api import WeightsEnum

    if isinstance(weights, WeightsEnum):
        resolved = weights
    elif not isinstance(weights, str):
        raise TypeError(f"weights must be a torchvision weights enum, its name or a checkpoint path; got "
                        f"{type(weights).__name__}")
    else:
        for enum in enums:
            if weights in enum.__members__:
                return enum[weights]
        try:
            resolved = get_weight(weights)
        except (ValueError, KeyError, AttributeError):
            valid = [f"{e.__name__}.{m} (or {m})" for e in enums for m in e.__members__]
            hint = f"; valid here: {', '.join(valid)}" if valid else ""
            raise ValueError(f"unknown torchvision weights {weights!r}{hint}; or give a checkpoint file "
                             "(.pt, .pth)") from None
    if enums and type(resolved) not in enums:  # another model's weights: refused before any download
        raise ValueError(f"weights {type(resolved).__name__}.{resolved.name} are for another model; this one "
                         f"takes {' or '.join(e.__name__ for e in enums)} (e.g. {enums[0].__name__}.DEFAULT)")
    return resolved


_CHECKPOINT_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".tar"}


def _looks_like_path(weights: Any) -> bool:
    """A path-like object, an existing file, or a string shaped like a file path (not an enum name)."""
    if isinstance(weights, os.PathLike):
        return True
    if not isinstance(weights, str):
        return False
    return os.path.sep in weights or Path(weights).suffix.lower() in _CHECKPOINT_SUFFIXES or Path(weights).exists()


def _load_weights(model: DeepLabV3, weights: Any, enums: Sequence[Any] = ()) -> None:
    if weights is None:
        return
    if _looks_like_path(weights):
        load_checkpoint(model, weights)
        return
    enum = _torchvision_weights(weights, enums)
    try:
        state = enum.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # offline and not cached
        raise RuntimeError(f"could not download or read cached weights {enum}: {exc}. Download them once while "
                           f"online (they are cached under {torch.hub.get_dir()}) or pass a checkpoint path.") from exc
    load_checkpoint(model, state)


def _load_backbone_weights(backbone: Backbone, weights_backbone: Any) -> None:
    if weights_backbone is None:
        return
    if _looks_like_path(weights_backbone):
        state = _read_state_dict(weights_backbone)
    else:
        enum = _torchvision_weights(weights_backbone, _weights_enums("backbone", backbone.depth))
        state = enum.get_state_dict(progress=True, check_hash=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(("layer5", "layer6", "layer7"))]
    if missing:
        raise ValueError(f"backbone weights lack {len(missing)} keys, e.g. {missing[:5]}")
    backbone.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------
_HEADS = ("torchvision", "paper")


def _deeplabv3(depth: int, *, weights: Any, weights_backbone: Any, num_classes: int | None,
               aux_loss: bool | None, output_stride: int, multi_grid: Sequence[int], head: str,
               aspp_rates: Sequence[int], cascade_blocks: int = 0) -> DeepLabV3:
    if head not in _HEADS + ("cascade",):
        raise ValueError(f"unknown head {head!r}; expected one of {_HEADS}")
    # Every argument's type and range is checked before any work (16.0, "124", (1.5, 2, 4), 2.5 are refused).
    atrous_plan(output_stride, (1,), multi_grid=multi_grid if head != "cascade" else (1,))
    check_ints("multi_grid", multi_grid)
    check_ints("aspp_rates", aspp_rates)
    num_classes = 21 if num_classes is None else check_int("num_classes", num_classes, minimum=1)
    check_int("blocks", cascade_blocks, minimum=0)
    if aux_loss is not None and not isinstance(aux_loss, bool):
        raise TypeError(f"aux_loss must be True, False or None; got {aux_loss!r}")
    aux = bool(aux_loss)
    enums = [] if head == "cascade" else _weights_enums("model", depth)
    for given in (weights, weights_backbone):  # a bad path or unknown name fails before the model is built
        if given is not None and _looks_like_path(given):
            _check_checkpoint_path(Path(given))
    if weights is not None and not _looks_like_path(weights):
        _torchvision_weights(weights, enums)
    backbone = Backbone(depth, extra_stages=cascade_blocks, return_aux=aux)
    if head == "cascade":
        classifier: nn.Module = CascadeHead(2048, num_classes)
    elif head == "paper":
        classifier = PaperHead(2048, num_classes)
    else:
        classifier = DeepLabHead(2048, num_classes)
    aux_classifier = FCNHead(1024, num_classes) if aux else None
    model = DeepLabV3(backbone, classifier, aux_classifier, output_stride=output_stride,
                      multi_grid=multi_grid, aspp_rates_at_os16=aspp_rates)
    _load_backbone_weights(backbone, weights_backbone)
    _load_weights(model, weights, enums)
    return model


@register_model
def deeplabv3_resnet50(*, weights: Any = None, weights_backbone: Any = None, num_classes: int | None = 21,
                       aux_loss: bool | None = False, output_stride: int = 8,
                       multi_grid: Sequence[int] = (1, 1, 1), head: str = "torchvision",
                       aspp_rates: Sequence[int] = ASPP_RATES_AT_OS16) -> DeepLabV3:
    """DeepLabv3 with a ResNet-50 backbone; the defaults reproduce torchvision's ``deeplabv3_resnet50``.

    Args:
        weights: a torchvision weights enum or its name, full (``"DeepLabV3_ResNet50_Weights.DEFAULT"``) or
            short (``"COCO_WITH_VOC_LABELS_V1"``, ``"DEFAULT"``), downloaded through torchvision or read from
            its cache; or a checkpoint path (read with ``weights_only=True``).
        weights_backbone: ImageNet weights for the ResNet (enum, name or path), for training.
        num_classes: number of output classes (21 for PASCAL VOC, 19 for Cityscapes).
        aux_loss: add torchvision's auxiliary FCN head on layer3.
        output_stride: 8, 16 or 32; changeable later with ``model.set_output_stride``.
        multi_grid: the paper's multi-grid rates for block4's three units, e.g. ``(1, 2, 4)``.
        head: ``"torchvision"`` (ASPP + 3×3 conv) or ``"paper"`` (ASPP + 1×1 conv to logits).
        aspp_rates: ASPP rates at output stride 16; scaled for other strides.
    """
    return _deeplabv3(50, weights=weights, weights_backbone=weights_backbone, num_classes=num_classes,
                      aux_loss=aux_loss, output_stride=output_stride, multi_grid=multi_grid, head=head,
                      aspp_rates=aspp_rates)


@register_model
def deeplabv3_resnet101(*, weights: Any = None, weights_backbone: Any = None, num_classes: int | None = 21,
                        aux_loss: bool | None = False, output_stride: int = 8,
                        multi_grid: Sequence[int] = (1, 1, 1), head: str = "torchvision",
                        aspp_rates: Sequence[int] = ASPP_RATES_AT_OS16) -> DeepLabV3:
    """DeepLabv3 with a ResNet-101 backbone; arguments as :func:`deeplabv3_resnet50`."""
    return _deeplabv3(101, weights=weights, weights_backbone=weights_backbone, num_classes=num_classes,
                      aux_loss=aux_loss, output_stride=output_stride, multi_grid=multi_grid, head=head,
                      aspp_rates=aspp_rates)


@register_model
def deeplabv3_cascade_resnet50(*, weights: Any = None, weights_backbone: Any = None,
                               num_classes: int | None = 21, aux_loss: bool | None = False,
                               output_stride: int = 16, multi_grid: Sequence[int] = (1, 2, 1),
                               blocks: int = 3) -> DeepLabV3:
    """The paper's cascaded DeepLabv3 (§3.2): block4 copied as block5 … block(4 + ``blocks``), atrous
    rates doubling block by block to keep the output stride, multi-grid ``(1, 2, 1)``, no ASPP."""
    return _deeplabv3(50, weights=weights, weights_backbone=weights_backbone, num_classes=num_classes,
                      aux_loss=aux_loss, output_stride=output_stride, multi_grid=multi_grid, head="cascade",
                      aspp_rates=ASPP_RATES_AT_OS16, cascade_blocks=blocks)


@register_model
def deeplabv3_cascade_resnet101(*, weights: Any = None, weights_backbone: Any = None,
                                num_classes: int | None = 21, aux_loss: bool | None = False,
                                output_stride: int = 16, multi_grid: Sequence[int] = (1, 2, 1),
                                blocks: int = 3) -> DeepLabV3:
    """The cascaded model with a ResNet-101 backbone; arguments as :func:`deeplabv3_cascade_resnet50`."""
    return _deeplabv3(101, weights=weights, weights_backbone=weights_backbone, num_classes=num_classes,
                      aux_loss=aux_loss, output_stride=output_stride, multi_grid=multi_grid, head="cascade",
                      aspp_rates=ASPP_RATES_AT_OS16, cascade_blocks=blocks)


# MobileNetV3-Large (backbone and stride plan in fastdeeplab/mobilenet.py)
def _mobilenet_weights_enums(kind: str) -> list[Any]:
    from torchvision.models import MobileNet_V3_Large_Weights
    from torchvision.models.segmentation import DeepLabV3_MobileNet_V3_Large_Weights

    return [MobileNet_V3_Large_Weights if kind == "backbone" else DeepLabV3_MobileNet_V3_Large_Weights]


def _load_mobilenet_backbone_weights(backbone: MobileNetV3Backbone, weights_backbone: Any) -> None:
    if weights_backbone is None:
        return
    if _looks_like_path(weights_backbone):
        state = _read_state_dict(weights_backbone)
    else:
        state = _torchvision_weights(weights_backbone, _mobilenet_weights_enums("backbone")).get_state_dict(
            progress=True, check_hash=True)
    state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ValueError(f"backbone weights lack {len(missing)} keys, e.g. {missing[:5]}")
    backbone.load_state_dict({k: state[k] for k in own}, strict=True)


@register_model
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
    enums = _mobilenet_weights_enums("model")
    for given in (weights, weights_backbone):  # a bad path or unknown name fails before the model is built
        if given is not None and _looks_like_path(given):
            _check_checkpoint_path(Path(given))
    if weights is not None and not _looks_like_path(weights):
        _torchvision_weights(weights, enums)
    if weights_backbone is not None and not _looks_like_path(weights_backbone):
        _torchvision_weights(weights_backbone, _mobilenet_weights_enums("backbone"))
    aux = bool(aux_loss)
    backbone = MobileNetV3Backbone(return_aux=aux, aspp_follows_stride=paper)
    channels = backbone[MOBILENET_OUT_KEY].out_channels
    classifier = (PaperHead if paper else DeepLabHead)(channels, num_classes)
    aux_classifier = FCNHead(backbone[MOBILENET_AUX_KEY].out_channels, num_classes) if aux else None
    model = DeepLabV3(backbone, classifier, aux_classifier, output_stride=output_stride,
                      aspp_rates_at_os16=aspp_rates)
    _load_mobilenet_backbone_weights(backbone, weights_backbone)
    _load_weights(model, weights, enums)
    return model


def from_torchvision_mobilenet(model: nn.Module) -> DeepLabV3:
    """Convert torchvision's ``deeplabv3_mobilenet_v3_large`` (any classes, aux head or not) into a
    fastdeeplab model with the same weights and the same outputs; ``model`` is not modified."""
    from torchvision.models.segmentation.deeplabv3 import ASPP as TvASPP

    backbone = model.backbone
    if not is_mobilenet_v3_large(backbone):
        raise TypeError("the backbone is not torchvision's MobileNetV3-Large features (17 blocks, 960 channels)")
    aspp = model.classifier[0]
    if not isinstance(aspp, TvASPP) or len(model.classifier) != 5:
        raise TypeError("the classifier is not torchvision's DeepLabHead")
    rates = tuple(m[0].dilation[0] for m in aspp.convs[1:-1])
    stride = 2  # the stem
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


# --------------------------------------------------------------------------------------------------
# Conversion from torchvision
# --------------------------------------------------------------------------------------------------
def _infer_output_stride(backbone: nn.Module) -> int:
    stride = 4
    for name in ("layer2", "layer3", "layer4"):
        stride *= getattr(backbone, name)[0].conv2.stride[0]
    return stride


def from_torchvision(model: nn.Module) -> DeepLabV3:
    """Convert a torchvision ``DeepLabV3`` (ResNet-50, -101 or MobileNetV3-Large, any classes, aux head or not)
    into a fastdeeplab model with the same weights and the same outputs. The torchvision model is not modified.
    """
    from torchvision.models.segmentation.deeplabv3 import ASPP as TvASPP
    from torchvision.models.segmentation.deeplabv3 import DeepLabV3 as TvDeepLabV3

    if not isinstance(model, TvDeepLabV3):
        raise TypeError(f"expected a torchvision DeepLabV3, got {type(model).__name__}")
    backbone = model.backbone
    if not hasattr(backbone, "layer4") and hasattr(backbone, "16"):
        return from_torchvision_mobilenet(model)
    if not hasattr(backbone, "layer4") or not hasattr(backbone["layer4"][0], "conv3"):
        raise TypeError("only ResNet-50/101 and MobileNetV3-Large backbones are supported")
    units = tuple(len(backbone[f"layer{i}"]) for i in range(1, 5))
    depth = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101}.get(units)
    if depth is None:
        raise TypeError(f"unsupported ResNet with stage units {units}")
    aspp = model.classifier[0]
    if not isinstance(aspp, TvASPP) or len(model.classifier) != 5:
        raise TypeError("the classifier is not torchvision's DeepLabHead")
    output_stride = _infer_output_stride(backbone)
    rates = tuple(m[0].dilation[0] for m in aspp.convs[1:-1])
    scale = output_stride / 16
    num_classes = model.classifier[-1].out_channels
    aux = model.aux_classifier is not None
    ours = _deeplabv3(depth, weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux,
                      output_stride=output_stride, multi_grid=(1, 1, 1), head="torchvision",
                      aspp_rates=tuple(round(r * scale) for r in rates))
    # Dilations inside the backbone follow torchvision's convention in both models; check it holds.
    for name in ("layer2", "layer3", "layer4"):
        for a, b in zip(backbone[name], ours.backbone[name]):
            if a.conv2.dilation != b.conv2.dilation or a.conv2.stride != b.conv2.stride:
                raise ValueError(f"{name} has strides/dilations this converter does not reproduce")
    if ours.aspp is not None and ours.aspp.rates != rates:
        raise ValueError(f"ASPP rates {rates} cannot be expressed at output stride {output_stride}")
    load_checkpoint(ours, model.state_dict())
    ours.train(model.training)
    return ours
