"""Named weights: the one resolver behind every ``--weights`` of the project (predict, demo, eval, export,
deploy and the bench), and :func:`build_model`, which builds a registered model with them.

``--weights`` takes:

* ``synthetic``: a DeepLabv3 trained on synthetic scenes (coloured discs and rectangles and thin bars on a
  textured background, 4 classes by colour: :data:`SYNTHETIC_CLASSES`), trained once on the CPU
  (the paper's two stages in miniature, a few minutes on 2 quiet cores; each backbone's recipe is
  :func:`synthetic_spec`) and cached in the package cache folder (``~/.cache/fastdeeplab``,
  :func:`fastdeeplab._io.cache_dir`): offline, and its predictions mean something on such scenes
  (:func:`fastdeeplab.data.synthetic.synthetic_sample`, or ``python -m fastdeeplab.data.synthetic out.png``);
* ``random``: seeded random weights (BN statistics measured on photographs, so logits stay well scaled).
  Their predictions mean nothing;
* a torchvision weights name: ``COCO_WITH_VOC_LABELS_V1``, ``DEFAULT`` or the full
  ``DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1`` (case-insensitive);
* a checkpoint path (torchvision names; a training run's ``model_final.pt``).

:func:`resolve_weights` returns :class:`Weights`: the state dict and its ``kind`` (``random``,
``torchvision``, ``checkpoint`` or ``synthetic``) for one of the backbones in :data:`BACKBONES`
(``resnet50``, ``resnet101``, ``mobilenet_v3_large``: the builders ``deeplabv3_resnet50``,
``deeplabv3_resnet101``, ``deeplabv3_mobilenet_v3_large``). Everything backbone-specific (torchvision's
builder, its weights enum, the reference at each output stride) lives in that one table.

>>> from fastdeeplab.weights import build_model
>>> model = build_model("deeplabv3_resnet50", "synthetic", output_stride=8)     # doctest: +SKIP

Everything the synthetic model produces is called "synthetic": it is not PASCAL VOC, and its mIoU says how
implementations compare on one toy task, not how DeepLabv3 segments photographs.

The file is one concern, turning a ``--weights`` name into a state dict for a backbone: the backbone table,
the torchvision names and references, seeded random weights, and the synthetic model's scenes, training and
cache all answer that one question. The synthetic part (from :class:`SyntheticSpec` on) is the natural split
if it grows: it would take the backbone table with it into a module both import.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from torch import Tensor, nn

from .metrics import IGNORE_INDEX, ConfusionMatrix

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "DEPTHS",
    "NAMED_WEIGHTS",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_PALETTE",
    "WEIGHT_KINDS",
    "SPEC",
    "SyntheticSpec",
    "Weights",
    "backbone_spec",
    "build_model",
    "check_synthetic",
    "is_named_weights",
    "cache_path",
    "held_out_set",
    "load_or_train",
    "scenes",
    "synthetic_spec",
    "train_synthetic",
    "cached_torchvision_weights",
    "random_state_dict",
    "randomize_bn",
    "resolve_weights",
    "torchvision_reference",
    "torchvision_weights_enum",
]

DEPTHS = {"resnet50": 50, "resnet101": 101}  # the ResNet backbones by depth (BACKBONES has them all)
WEIGHT_KINDS = ("random", "torchvision", "checkpoint", "synthetic")
NAMED_WEIGHTS = ("synthetic", "random")  # names that are neither a file nor a torchvision weights name
SYNTHETIC_CLASSES = ("background", "red", "green", "blue")  # data.synthetic: class c >= 1 has the c-th colour
# Their colours in masks and overlays: the scenes' own (background black), so "red" is drawn red.
SYNTHETIC_PALETTE = ((0, 0, 0), (220, 40, 40), (40, 200, 60), (50, 70, 230))


def _resnet_reference(depth: int) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int, output_stride: int) -> nn.Module:
        """torchvision's DeepLabV3-ResNet at output stride 8 (as shipped) or 16 (rebuilt the torchvision way,
        ``replace_stride_with_dilation=[False, False, True]``, ASPP rates 6/12/18)."""
        from torchvision.models import resnet50, resnet101
        from torchvision.models._utils import IntermediateLayerGetter
        from torchvision.models.segmentation import deeplabv3_resnet50, deeplabv3_resnet101
        from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3

        if output_stride == 8:
            builder = deeplabv3_resnet50 if depth == 50 else deeplabv3_resnet101
            return builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
        resnet = (resnet50 if depth == 50 else resnet101)(weights=None,
                                                           replace_stride_with_dilation=[False, False, True])
        return DeepLabV3(IntermediateLayerGetter(resnet, return_layers={"layer4": "out"}),
                         DeepLabHead(2048, num_classes, atrous_rates=(6, 12, 18)))
    return build


def _mobilenet_reference(num_classes: int, output_stride: int) -> nn.Module:
    """torchvision's ``deeplabv3_mobilenet_v3_large`` (output stride 16 as shipped); at 8 its depthwise convs
    get fastdeeplab's strides and dilations (:meth:`fastdeeplab.mobilenet.MobileNetV3Backbone.apply_plan`,
    parameters untouched), ASPP rates (12, 24, 36) at both, as torchvision has them."""
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    from .mobilenet import MobileNetV3Backbone

    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes,
                                         aux_loss=False)
    MobileNetV3Backbone.apply_plan(model.backbone, MobileNetV3Backbone().atrous_plan(output_stride))
    return model


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone of ``--backbone``: what the resolver and the bench need to know about it."""

    name: str  # the --backbone value
    model: str  # the builder, in torchvision.models.segmentation and fastdeeplab.get_model alike
    weights_enum: str  # torchvision's weights enum class (in torchvision.models.segmentation)
    reference: Callable[[int, int], nn.Module]  # (num_classes, output_stride) -> torchvision DeepLabV3, OS 8/16
    native_stride: int  # the output stride of torchvision's builder as shipped
    marker: tuple[str, str | None]  # a state-dict key its checkpoints have, and one they lack (or None)
    download_mb: int  # size of torchvision's COCO-VOC weights file
    synthetic: bool = True  # whether ``--weights synthetic`` is offered (train_synthetic works for every entry)
    # The synthetic model's recipe: SyntheticSpec fields that differ from SPEC's (training only: the scenes and
    # the held-out set stay SPEC's, so held-out mIoU compares across backbones), and its rough training time.
    synthetic_recipe: tuple[tuple[str, Any], ...] = ()
    synthetic_minutes: int = 5  # on 2 quiet cores, for the progress line


BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in (
    BackboneSpec("resnet50", "deeplabv3_resnet50", "DeepLabV3_ResNet50_Weights", _resnet_reference(50), 8,
                 ("backbone.layer4.0.conv1.weight", "backbone.layer3.6.conv1.weight"), 161),
    BackboneSpec("resnet101", "deeplabv3_resnet101", "DeepLabV3_ResNet101_Weights", _resnet_reference(101), 8,
                 ("backbone.layer3.22.conv1.weight", None), 233),
    BackboneSpec("mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "DeepLabV3_MobileNet_V3_Large_Weights",
                 _mobilenet_reference, 16, ("backbone.16.0.weight", None), 42,
                 # From scratch its BNs need momentum 0.1 (torchvision's 0.01 leaves the running statistics far
                 # behind the weights: eval mode predicted background only, held-out mIoU 0.20); an iteration
                 # costs a third of ResNet-50's, which pays for a longer schedule (bench/RESULTS.md, 2026-12-07).
                 synthetic_recipe=(("bn_momentum", 0.1), ("lr_os16", 0.05), ("lr_os8", 0.01),
                                   ("iterations_os16", 480), ("iterations_os8", 120)),
                 synthetic_minutes=4),
)}


def backbone_spec(backbone: str | int) -> BackboneSpec:
    """The :data:`BACKBONES` entry for ``backbone``: a name (``resnet50``, ``mobilenet_v3_large``, ...) or a
    ResNet depth (50, 101). ``ValueError`` lists the valid names."""
    name = f"resnet{backbone}" if isinstance(backbone, int) else str(backbone)
    if name not in BACKBONES:
        raise ValueError(f"--backbone {backbone}: expected one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def check_synthetic(backbone: str | int) -> None:
    """``ValueError`` (one line, naming the flag) unless ``--weights synthetic`` is offered for ``backbone``."""
    spec = backbone_spec(backbone)
    if not spec.synthetic:
        offered = " and ".join(b.name for b in BACKBONES.values() if b.synthetic)
        raise ValueError(f"--weights synthetic is offered for {offered}, not --backbone {spec.name}; "
                         f"use --weights random or COCO_WITH_VOC_LABELS_V1")


def synthetic_spec(backbone: str | int) -> SyntheticSpec:
    """The :class:`SyntheticSpec` of ``backbone``'s synthetic model: :data:`SPEC` with its entry's
    ``synthetic_recipe`` (nothing for the ResNets)."""
    return replace(SPEC, **dict(backbone_spec(backbone).synthetic_recipe))


def _checkpoint_backbone(state: Mapping[str, Tensor]) -> str | None:
    """Which backbone a torchvision-style DeepLabv3 state dict belongs to (None if none matches)."""
    for spec in BACKBONES.values():
        has, lacks = spec.marker
        if has in state and (lacks is None or lacks not in state):
            return spec.name
    return None


@dataclass
class Weights:
    """One state dict (torchvision names, no aux head) shared by every implementation."""

    state_dict: dict[str, Tensor]
    backbone: str  # a BACKBONES name
    num_classes: int
    kind: str  # one of WEIGHT_KINDS
    description: str
    source: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # synthetic: how the model was trained

    @property
    def depth(self) -> int | None:
        """The ResNet depth (50, 101), None for another backbone."""
        return DEPTHS.get(self.backbone)

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
               "backbone": self.backbone, "num_classes": self.num_classes,
               "accuracy_meaningful": self.real}
        if self.info:
            out["info"] = self.info
        return out


def _weights_enum_class(backbone: str | int) -> Any:
    from torchvision.models import segmentation

    return getattr(segmentation, backbone_spec(backbone).weights_enum)


def torchvision_weights_enum(name: str, backbone: str | int) -> Any:
    """torchvision's DeepLabv3 weights enum member for ``name``: a member name (``COCO_WITH_VOC_LABELS_V1``,
    ``DEFAULT``) or ``<EnumClass>.<member>``, case-insensitive. ``ValueError`` lists the valid names."""
    enum = _weights_enum_class(backbone)
    bb = backbone_spec(backbone).name
    members = list(enum.__members__)  # includes the DEFAULT alias
    short = name.strip()
    if "." in short:
        cls, _, short = short.rpartition(".")
        if cls.lower() != enum.__name__.lower():
            raise ValueError(f"--weights {name!r}: {cls} is not the weights class of {bb} "
                             f"({enum.__name__}); valid names: {', '.join(members)} "
                             f"(or {enum.__name__}.<name>), random, synthetic, or a checkpoint path")
    for member in members:
        if member.lower() == short.lower():
            return enum[member]
    raise ValueError(f"--weights {name!r} is not a checkpoint file, 'random', 'synthetic' or a torchvision "
                     f"weights name; valid torchvision names for {bb}: {', '.join(members)} "
                     f"(or {enum.__name__}.<name>)")


def _hub_file(member: Any) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(member.url).path)


def cached_torchvision_weights(backbone: str | int) -> Path | None:
    """Path of torchvision's COCO-with-VOC-labels DeepLabv3 weights if already in the torch hub cache.

    Only the cache is looked at; nothing is ever downloaded.
    """
    path = _hub_file(_weights_enum_class(backbone).COCO_WITH_VOC_LABELS_V1)
    return path if path.is_file() else None


def _drop_aux(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}


def torchvision_reference(backbone: str | int, num_classes: int, output_stride: int,
                          state_dict: Mapping[str, Tensor] | None = None) -> nn.Module:
    """A genuine torchvision ``DeepLabV3`` (no aux head) for ``backbone`` (a :data:`BACKBONES` name or a
    ResNet depth) at output stride 8 or 16, in eval mode: see each entry's ``reference``."""
    if output_stride not in (8, 16):
        raise ValueError(f"the torchvision reference exists at output stride 8 or 16, not {output_stride}")
    model = backbone_spec(backbone).reference(num_classes, output_stride)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model.eval()


@torch.no_grad()
def random_state_dict(backbone: str | int, num_classes: int, seed: int, calibration: Tensor) -> dict[str, Tensor]:
    """Seeded random weights whose activations stay well scaled through every layer.

    torchvision's own initialisation for the convolutions; every BatchNorm gets a random affine
    (``weight ~ U(0.5, 1.5)``, ``bias ~ N(0, 0.2)``) and then running statistics measured on the
    ``calibration`` photographs ``[N, 3, H, W]`` (one train-mode pass, dropout off). The statistics are
    thus non-trivial (BN folding is really exercised) yet consistent with the weights, so logits are
    finite and O(1) rather than exploding as with mean 0 / var 1.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision_reference(backbone, num_classes, backbone_spec(backbone).native_stride)
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


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with seeded, non-trivial statistics and affine parameters in every ``BatchNorm2d`` (mean
    ``N(0, 0.2)``, var ``U(0.5, 1.5)``, weight ``U(0.5, 1.5)``, bias ``N(0, 0.1)``), in place: the defaults
    (0 and 1) hide BN-folding bugs. The cheap sibling of :func:`random_state_dict` for any module (tests,
    scripts, layer benchmarks): no photographs, so deep models' logits are not kept well scaled."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def _from_torchvision_cache(member: Any, backbone: str, download: bool) -> Weights:
    path = _hub_file(member)
    if not path.is_file():
        if not download:
            raise FileNotFoundError(
                f"--weights {member}: not in the torch hub cache ({path}). Pass --download-weights to download "
                f"it (about {backbone_spec(backbone).download_mb} MB from download.pytorch.org), or put the file "
                f"there yourself.")
        member.get_state_dict(progress=True, check_hash=True)  # downloads into the hub cache
    state = _drop_aux(torch.load(path, map_location="cpu", weights_only=True))
    return Weights(state, backbone, int(state["classifier.4.weight"].shape[0]), "torchvision",
                   f"torchvision {type(member).__name__}.{member.name} ({path.name}, "
                   f"{'downloaded' if download else 'from the torch hub cache'})", str(path))


def _looks_like_path(spec: str) -> bool:
    return os.path.sep in spec or Path(spec).suffix.lower() in {".pt", ".pth", ".ckpt", ".bin", ".tar"} \
        or Path(spec).exists()


def resolve_weights(spec: str | None, backbone: str = "resnet50", seed: int = 0,
                    calibration: Callable[[], Tensor] | None = None, *, download: bool = False,
                    progress: Callable[[str], None] | None = None) -> Weights:
    """The weights named by ``spec`` (see the module docstring), for a DeepLabv3-``backbone``.

    ``calibration()`` returns the photographs used to set the random weights' BN statistics (called only
    when needed; default: six of scikit-image's photographs at 129 px); ``progress`` receives one line per
    step of synthetic training.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"--weights {spec}: named weights exist for the backbones {', '.join(BACKBONES)}, "
                         f"not {backbone!r}")
    if calibration is None:
        def calibration() -> Tensor:
            from .images import sample_images

            return sample_images(129, count=6)[1]
    if spec is None:
        cached = cached_torchvision_weights(backbone)
        if cached is not None:
            return _from_torchvision_cache(_weights_enum_class(backbone).COCO_WITH_VOC_LABELS_V1, backbone, False)
    elif spec.strip().lower() == "synthetic":
        check_synthetic(backbone)
        state, info, path = load_or_train(backbone, progress=progress)
        s = info["spec"]
        return Weights(state, backbone, s["num_classes"], "synthetic",
                       f"synthetic: DeepLabv3 trained on synthetic scenes ({s['num_classes']} classes, "
                       f"{s['size']}x{s['size']} px, thin bars; {s['iterations_os16']} OS16 + "
                       f"{s['iterations_os8']} OS8 iterations) from {path.name}; not VOC", str(path), info)
    elif spec.strip().lower() != "random":
        if _looks_like_path(spec):
            from .hub import _read_state_dict

            state = _drop_aux(_read_state_dict(spec))
            key = "classifier.4.weight"
            if key not in state:
                raise ValueError(f"{spec} has no {key}: not a torchvision-style DeepLabv3 checkpoint")
            found = _checkpoint_backbone(state)
            if found is None:
                raise ValueError(f"{spec} is not a DeepLabv3 of any of {', '.join(BACKBONES)}")
            if found != backbone:
                raise ValueError(f"{spec} holds a DeepLabv3-{found} but --backbone is {backbone}; "
                                 f"pass --backbone {found}")
            return Weights(state, backbone, int(state[key].shape[0]), "checkpoint", f"checkpoint {spec}", str(spec))
        return _from_torchvision_cache(torchvision_weights_enum(spec, backbone), backbone, download)
    images = calibration()
    state = random_state_dict(backbone, 21, seed, images)
    return Weights(state, backbone, 21, "random",
                   f"random (seed {seed}; BN affine randomised, BN statistics from {len(images)} photographs): "
                   "predictions carry no meaning, so OS16-vs-OS8 agreement and mIoU are n/a",
                   None)



_NAMED_BUILDERS = {spec.model: spec.name for spec in BACKBONES.values()}


def is_named_weights(weights: Any) -> bool:
    """Whether ``weights`` is one of :data:`NAMED_WEIGHTS` (``synthetic``, ``random``), in any case."""
    return isinstance(weights, str) and weights.strip().lower() in NAMED_WEIGHTS


def build_model(name: str = "deeplabv3_resnet50", weights: Any = None, *, num_classes: int | None = None,
                progress: Callable[[str], None] | None = None, **kwargs: Any) -> nn.Module:
    """A registered model (:func:`fastdeeplab.get_model`) with ``weights`` resolved as every ``--weights`` is:
    ``synthetic`` and ``random`` through :func:`resolve_weights` (their number of classes unless
    ``num_classes`` says the same), anything else (a torchvision weights name, a checkpoint path, ``None``)
    by the builder itself. ``kwargs`` go to the builder (``output_stride``, ``head``, ...)."""
    from .hub import get_model, load_checkpoint

    if not is_named_weights(weights):
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return get_model(name, weights=weights, **kwargs)
    spec = weights.strip().lower()
    if name not in _NAMED_BUILDERS:
        raise ValueError(f"--weights {spec} exists for {' and '.join(_NAMED_BUILDERS)}, not --model {name}")
    resolved = resolve_weights(spec, _NAMED_BUILDERS[name], progress=progress)
    if num_classes is not None and num_classes != resolved.num_classes:
        raise ValueError(f"--weights {spec} has {resolved.num_classes} classes, not --num-classes {num_classes}; "
                         f"leave --num-classes out")
    if kwargs.pop("aux_loss", None):
        raise ValueError(f"--weights {spec} has no auxiliary head; leave --aux out")
    model = get_model(name, weights=None, num_classes=resolved.num_classes, **kwargs)
    load_checkpoint(model, resolved.state_dict)
    return model

# --------------------------------------------------------------------------------------------------
# ``synthetic``: a DeepLabv3 trained on synthetic scenes, so accuracy means something with no network or dataset.
# Scenes from fastdeeplab.data.synthetic.synthetic_sample, 64x64 px, a 1-px ignore band around the shapes;
# training draws fresh scenes every iteration (seed 0), the held-out set (seed 1) is never seen. SGD with
# momentum 0.9, weight decay 1e-4, poly learning rate, batch 8, random flips: OS16 with BN trained, then OS8
# with BN frozen. Iterations, learning rates and BN momentum per backbone (BackboneSpec.synthetic_recipe).
# --------------------------------------------------------------------------------------------------
Progress = Callable[[str], None]


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that decides the synthetic model (its hash names the cache file)."""

    num_classes: int = 4
    size: int = 64
    thin_structures: int = 3
    max_objects: int = 3
    batch: int = 8
    iterations_os16: int = 240
    iterations_os8: int = 40
    lr_os16: float = 0.02
    lr_os8: float = 0.005
    weight_decay: float = 1e-4
    train_seed: int = 0
    held_out_seed: int = 1
    held_out_images: int = 32
    version: int = 1
    bn_momentum: float | None = None  # every BatchNorm's momentum while training (None: the builder's own)

    def digest(self) -> str:
        fields = asdict(self)
        for name, default in _LATER_FIELDS.items():  # left out at their default: older cache names still hold
            if fields[name] == default:
                del fields[name]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


# Fields added after the first models were cached, with the default that reproduces those models.
_LATER_FIELDS: dict[str, Any] = {"bn_momentum": None}
SPEC = SyntheticSpec()  # the ResNets' recipe, and every backbone's scenes (see synthetic_spec)


def cache_dir() -> Path:
    """Where the synthetic model is cached: the package's cache folder (:func:`fastdeeplab._io.cache_dir`)."""
    from ._io import cache_dir as package_cache_dir

    return package_cache_dir()


def cache_path(backbone: str | int, spec: SyntheticSpec | None = None) -> Path:
    """The cache file of ``backbone``'s synthetic model trained with ``spec`` (default: its own,
    :func:`synthetic_spec`)."""
    spec = spec or synthetic_spec(backbone)
    return cache_dir() / f"synthetic-{backbone_spec(backbone).model}-{spec.digest()}.pt"


def scenes(indices: range | list[int], spec: SyntheticSpec = SPEC, *, seed: int) -> tuple[Tensor, Tensor]:
    """Synthetic scenes ``(images [N, 3, S, S] float32 normalised like ImageNet, labels [N, S, S] int64)``."""
    from .data.synthetic import synthetic_sample
    from .images import normalize

    images, labels = [], []
    for i in indices:
        image, label = synthetic_sample(int(i), (spec.size, spec.size), spec.num_classes, seed=seed,
                                        max_objects=spec.max_objects, thin_structures=spec.thin_structures)
        images.append(normalize(image))
        labels.append(torch.from_numpy(label.astype(np.int64)))
    return torch.stack(images), torch.stack(labels)


def held_out_set(spec: SyntheticSpec = SPEC) -> tuple[Tensor, Tensor]:
    """The held-out scenes (seed ``held_out_seed``), never drawn in training."""
    return scenes(range(spec.held_out_images), spec, seed=spec.held_out_seed)


def _poly(base: float, step: int, total: int) -> float:
    return base * (1 - step / total) ** 0.9


@torch.no_grad()
def evaluate_miou(model: nn.Module, images: Tensor, labels: Tensor, num_classes: int) -> float:
    """mIoU of ``model`` (eval mode) on ``images``/``labels``, ignore band left out."""
    model.eval()
    meter = ConfusionMatrix(num_classes, IGNORE_INDEX)
    for x, y in zip(images.split(8), labels.split(8), strict=True):
        meter.update(model(x)["out"].argmax(1), y)
    return float(meter.compute()["mIoU"])


def train_synthetic(backbone: str | int = 50, spec: SyntheticSpec | None = None, progress: Progress | None = None
                    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Train a DeepLabv3-``backbone`` (a :data:`BACKBONES` name or a ResNet depth) from scratch on synthetic
    scenes (see the module docstring), with ``spec`` (default: the backbone's own, :func:`synthetic_spec`).

    Returns the state dict (torchvision names, no aux head) and a record of how it was made: the spec,
    seconds, threads, the loss at the start and end of each stage, and the held-out mIoU at OS16 and OS8.
    """
    from . import hub

    say = progress or (lambda _: None)
    bb = backbone_spec(backbone)
    spec = spec or synthetic_spec(backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.train_seed)
        model = hub.get_model(bb.model, num_classes=spec.num_classes, aux_loss=False, output_stride=16)
        if spec.bn_momentum is not None:
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.momentum = spec.bn_momentum
        gen = torch.Generator().manual_seed(spec.train_seed)
        start = time.perf_counter()
        losses: dict[str, list[float]] = {}
        next_index = 0
        stages = (("os16", 16, spec.iterations_os16, spec.lr_os16, True),
                  ("os8", 8, spec.iterations_os8, spec.lr_os8, False))
        for name, stride, iterations, lr, train_bn in stages:
            model.set_output_stride(stride)
            model.train()
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d) and not train_bn:
                    m.eval()
                    m.weight.requires_grad_(False)
                    m.bias.requires_grad_(False)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=spec.weight_decay)
            losses[name] = []
            for it in range(iterations):
                x, y = scenes(range(next_index, next_index + spec.batch), spec, seed=spec.train_seed)
                next_index += spec.batch
                flip = torch.rand(spec.batch, generator=gen) < 0.5
                x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
                for group in optimizer.param_groups:
                    group["lr"] = _poly(lr, it, iterations)
                loss = nn.functional.cross_entropy(model(x)["out"], y, ignore_index=IGNORE_INDEX)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses[name].append(float(loss.detach()))
                if (it + 1) % 10 == 0 or it + 1 == iterations:
                    recent = losses[name][-10:]
                    say(f"synthetic training: OS{stride} iteration {it + 1}/{iterations}, loss "
                        f"{sum(recent) / len(recent):.3f}, {time.perf_counter() - start:.0f} s")
        seconds = time.perf_counter() - start
    images, labels = held_out_set(spec)
    miou = {}
    for stride in (16, 8):
        model.set_output_stride(stride)
        miou[f"os{stride}"] = evaluate_miou(model, images, labels, spec.num_classes)
    model.set_output_stride(8)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else math.nan

    info = {
        "spec": asdict(spec),
        "backbone": bb.name,
        "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "loss": {k: {"first10": mean(v[:10]), "last10": mean(v[-10:])} for k, v in losses.items()},
        "held_out_miou_eager": miou,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("aux_classifier.")}
    return state, info


def load_or_train(backbone: str | int = 50, spec: SyntheticSpec | None = None, progress: Progress | None = None,
                  ) -> tuple[dict[str, Tensor], dict[str, Any], Path]:
    """The synthetic model's state dict and record, from the cache if there, else trained and cached
    (``spec`` defaults to the backbone's own, :func:`synthetic_spec`)."""
    from ._io import atomic_path

    say = progress or (lambda _: None)
    spec = spec or synthetic_spec(backbone)
    path = cache_path(backbone, spec)
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        say(f"synthetic weights: loaded {path}")
        return blob["state_dict"], json.loads(blob["info"]), path
    say(f"synthetic weights: not in the cache ({path}); training a {backbone_spec(backbone).model} on synthetic "
        f"scenes ({spec.iterations_os16} + {spec.iterations_os8} iterations, about "
        f"{backbone_spec(backbone).synthetic_minutes} min on 2 quiet cores)")
    state, info = train_synthetic(backbone, spec, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save({"state_dict": state, "info": json.dumps(info)}, tmp)
    say(f"synthetic weights: trained in {info['train_seconds']:.0f} s, held-out mIoU OS16 "
        f"{info['held_out_miou_eager']['os16']:.3f}, OS8 {info['held_out_miou_eager']['os8']:.3f}; cached in {path}")
    return state, info, path




def write_synthetic_scene(path: str | os.PathLike[str], index: int = 0, spec: SyntheticSpec = SPEC) -> Path:
    """Write held-out synthetic scene ``index`` (never seen in training) as an RGB PNG, for ``--weights
    synthetic``; its true labels go beside it as ``<stem>_truth.png`` (VOC palette). Returns ``path``."""
    from PIL import Image

    from ._io import atomic_path
    from .data.palette import colorize
    from .data.synthetic import synthetic_sample

    path = Path(path)
    image, label = synthetic_sample(index, (spec.size, spec.size), spec.num_classes, seed=spec.held_out_seed,
                                    max_objects=spec.max_objects, thin_structures=spec.thin_structures)
    with atomic_path(path, suffix=".png", what="scene") as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    with atomic_path(path.with_name(f"{path.stem}_truth.png"), suffix=".png", what="scene labels") as tmp:
        colorize(label).save(tmp, format="PNG")
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m fastdeeplab.weights [--scene FILE.png] [--train] [--backbone NAME]``: write a held-out
    synthetic scene, and/or train (or load) a backbone's synthetic model and print how it was made."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastdeeplab.weights", description=main.__doc__)
    parser.add_argument("--scene", metavar="FILE", help="write a held-out synthetic scene PNG (and FILE_truth.png)")
    parser.add_argument("--index", type=int, default=0, help="which held-out scene (default 0)")
    parser.add_argument("--train", action="store_true", help="train (or load from the cache) the synthetic model")
    parser.add_argument("--backbone", default="resnet50", choices=[b.name for b in BACKBONES.values() if b.synthetic],
                        help="whose synthetic model (default resnet50)")
    args = parser.parse_args(argv)
    if args.scene:
        print(write_synthetic_scene(args.scene, args.index))
    if args.train or not args.scene:
        _, record, where = load_or_train(args.backbone, progress=lambda line: print(line, flush=True))
        print(where)
        print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
