"""The weights every implementation of a benchmark run shares, and what kind they are.

``--weights`` takes:

* nothing: torchvision's COCO-with-VOC-labels weights when they are already in the torch hub cache, else
  seeded random weights;
* ``random``: seeded random weights (BN statistics measured on photographs, so logits stay well scaled).
  Their predictions mean nothing: only same-stride comparisons (logit error, agreement at the same output
  stride) are reported as meaningful;
* a torchvision weights name: ``COCO_WITH_VOC_LABELS_V1``, ``DEFAULT`` or the full
  ``DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1`` (case-insensitive). Taken from the torch hub cache;
  downloaded only with ``--download-weights``;
* ``synthetic``: a model trained on synthetic scenes (:mod:`bench._synthetic`), cached in
  ``~/.cache/fastdeeplab``; accuracy is then mIoU against the scenes' true labels on a held-out set;
* a checkpoint path (torchvision names).

:class:`Weights` carries the state dict and its ``kind``: ``random``, ``torchvision``, ``checkpoint`` or
``synthetic``; the table header and the JSON name it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

__all__ = [
    "DEPTHS",
    "WEIGHT_KINDS",
    "Weights",
    "cached_torchvision_weights",
    "random_state_dict",
    "resolve_weights",
    "torchvision_reference",
    "torchvision_weights_enum",
]

DEPTHS = {"resnet50": 50, "resnet101": 101}
WEIGHT_KINDS = ("random", "torchvision", "checkpoint", "synthetic")


@dataclass
class Weights:
    """One state dict (torchvision names, no aux head) shared by every implementation."""

    state_dict: dict[str, Tensor]
    depth: int
    num_classes: int
    kind: str  # one of WEIGHT_KINDS
    description: str
    source: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # synthetic: how the model was trained

    @property
    def real(self) -> bool:
        """Trained weights (predictions mean something), as opposed to seeded random ones."""
        return self.kind != "random"

    @property
    def cross_stride_meaningful(self) -> bool:
        """Whether comparing OS16's prediction with OS8's says anything (not with random weights)."""
        return self.real

    def as_json(self) -> dict[str, Any]:
        out = {"kind": self.kind, "description": self.description, "source": self.source,
               "backbone": f"resnet{self.depth}", "num_classes": self.num_classes,
               "accuracy_meaningful": self.real}
        if self.info:
            out["info"] = self.info
        return out


def _weights_enum_class(depth: int) -> Any:
    from torchvision.models.segmentation import DeepLabV3_ResNet50_Weights, DeepLabV3_ResNet101_Weights

    return {50: DeepLabV3_ResNet50_Weights, 101: DeepLabV3_ResNet101_Weights}[depth]


def torchvision_weights_enum(name: str, depth: int) -> Any:
    """torchvision's DeepLabv3 weights enum member for ``name``: a member name (``COCO_WITH_VOC_LABELS_V1``,
    ``DEFAULT``) or ``<EnumClass>.<member>``, case-insensitive. ``ValueError`` lists the valid names."""
    enum = _weights_enum_class(depth)
    members = list(enum.__members__)  # includes the DEFAULT alias
    short = name.strip()
    if "." in short:
        cls, _, short = short.rpartition(".")
        if cls.lower() != enum.__name__.lower():
            raise ValueError(f"--weights {name!r}: {cls} is not the weights class of resnet{depth} "
                             f"({enum.__name__}); valid names: {', '.join(members)} "
                             f"(or {enum.__name__}.<name>), random, synthetic, or a checkpoint path")
    for member in members:
        if member.lower() == short.lower():
            return enum[member]
    raise ValueError(f"--weights {name!r} is not a checkpoint file, 'random', 'synthetic' or a torchvision "
                     f"weights name; valid torchvision names for resnet{depth}: {', '.join(members)} "
                     f"(or {enum.__name__}.<name>)")


def _hub_file(member: Any) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(member.url).path)


def cached_torchvision_weights(depth: int) -> Path | None:
    """Path of torchvision's COCO-with-VOC-labels DeepLabv3 weights if already in the torch hub cache.

    Only the cache is looked at; nothing is ever downloaded.
    """
    path = _hub_file(_weights_enum_class(depth).COCO_WITH_VOC_LABELS_V1)
    return path if path.is_file() else None


def _drop_aux(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}


def torchvision_reference(depth: int, num_classes: int, output_stride: int,
                          state_dict: Mapping[str, Tensor] | None = None) -> nn.Module:
    """A genuine torchvision ``DeepLabV3`` (no aux head) at output stride 8 (as shipped) or 16 (rebuilt
    with ``replace_stride_with_dilation=[False, False, True]`` and ASPP rates 6/12/18), in eval mode."""
    from torchvision.models import resnet50, resnet101
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation import deeplabv3_resnet50, deeplabv3_resnet101
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3

    if output_stride == 8:
        build = deeplabv3_resnet50 if depth == 50 else deeplabv3_resnet101
        model = build(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    elif output_stride == 16:
        resnet = (resnet50 if depth == 50 else resnet101)(weights=None,
                                                           replace_stride_with_dilation=[False, False, True])
        model = DeepLabV3(IntermediateLayerGetter(resnet, return_layers={"layer4": "out"}),
                          DeepLabHead(2048, num_classes, atrous_rates=(6, 12, 18)))
    else:
        raise ValueError(f"the torchvision reference exists at output stride 8 or 16, not {output_stride}")
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model.eval()


@torch.no_grad()
def random_state_dict(depth: int, num_classes: int, seed: int, calibration: Tensor) -> dict[str, Tensor]:
    """Seeded random weights whose activations stay well scaled through 50/101 layers.

    torchvision's own initialisation for the convolutions; every BatchNorm gets a random affine
    (``weight ~ U(0.5, 1.5)``, ``bias ~ N(0, 0.2)``) and then running statistics measured on the
    ``calibration`` photographs ``[N, 3, H, W]`` (one train-mode pass, dropout off). The statistics are
    thus non-trivial (BN folding is really exercised) yet consistent with the weights, so logits are
    finite and O(1) rather than exploding as with mean 0 / var 1.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision_reference(depth, num_classes, output_stride=8)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.reset_running_stats()
                m.momentum = None  # cumulative average: one pass gives the batch statistics exactly
        model.train()
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.eval()
        model(calibration)
        model.eval()
    return model.state_dict()


def _from_torchvision_cache(member: Any, depth: int, download: bool) -> Weights:
    path = _hub_file(member)
    if not path.is_file():
        if not download:
            raise FileNotFoundError(
                f"--weights {member}: not in the torch hub cache ({path}). Pass --download-weights to download "
                f"it (about 160 MB from download.pytorch.org), or put the file there yourself.")
        member.get_state_dict(progress=True, check_hash=True)  # downloads into the hub cache
    state = _drop_aux(torch.load(path, map_location="cpu", weights_only=True))
    return Weights(state, depth, int(state["classifier.4.weight"].shape[0]), "torchvision",
                   f"torchvision {type(member).__name__}.{member.name} ({path.name}, "
                   f"{'downloaded' if download else 'from the torch hub cache'})", str(path))


def _looks_like_path(spec: str) -> bool:
    return os.path.sep in spec or Path(spec).suffix.lower() in {".pt", ".pth", ".ckpt", ".bin", ".tar"} \
        or Path(spec).exists()


def resolve_weights(spec: str | None, backbone: str, seed: int, calibration: Callable[[], Tensor], *,
                    download: bool = False, progress: Callable[[str], None] | None = None) -> Weights:
    """The weights every implementation uses (see the module docstring for ``spec``).

    ``calibration()`` returns the photographs used to set the random weights' BN statistics (called only
    when needed); ``progress`` receives one line per step of synthetic training.
    """
    depth = DEPTHS[backbone]
    if spec is None:
        cached = cached_torchvision_weights(depth)
        if cached is not None:
            return _from_torchvision_cache(_weights_enum_class(depth).COCO_WITH_VOC_LABELS_V1, depth, False)
    elif spec == "synthetic":
        from ._synthetic import load_or_train

        state, info, path = load_or_train(depth, progress=progress)
        s = info["spec"]
        return Weights(state, depth, s["num_classes"], "synthetic",
                       f"synthetic: DeepLabv3 trained on synthetic scenes ({s['num_classes']} classes, "
                       f"{s['size']}x{s['size']} px, thin bars; {s['iterations_os16']} OS16 + "
                       f"{s['iterations_os8']} OS8 iterations) from {path.name}; not VOC", str(path), info)
    elif spec != "random":
        if _looks_like_path(spec):
            from fastdeeplab.hub import _read_state_dict

            state = _drop_aux(_read_state_dict(spec))
            key = "classifier.4.weight"
            if key not in state:
                raise ValueError(f"{spec} has no {key}: not a torchvision-style DeepLabv3 checkpoint")
            ckpt_depth = 101 if any(k.startswith("backbone.layer3.22.") for k in state) else 50
            if ckpt_depth != depth:
                raise ValueError(f"{spec} holds a ResNet-{ckpt_depth} DeepLabv3 but --backbone is {backbone}")
            return Weights(state, depth, int(state[key].shape[0]), "checkpoint", f"checkpoint {spec}", str(spec))
        return _from_torchvision_cache(torchvision_weights_enum(spec, depth), depth, download)
    images = calibration()
    state = random_state_dict(depth, 21, seed, images)
    return Weights(state, depth, 21, "random",
                   f"random (seed {seed}; BN affine randomised, BN statistics from {len(images)} photographs): "
                   "predictions carry no meaning, so OS16-vs-OS8 agreement and mIoU are n/a",
                   None)
