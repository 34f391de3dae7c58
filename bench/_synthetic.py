"""``--weights synthetic``: a DeepLabv3 trained on synthetic scenes, so accuracy numbers mean something with no
network and no dataset.

The scenes come from :func:`fastdeeplab.data.synthetic.synthetic_sample`: coloured discs and rectangles on a
textured background plus thin bars 1–3 px wide (what a coarse output stride loses), 4 classes (background +
3), 64×64 px, a 1-px ignore band around the shapes. Training draws fresh scenes every iteration (seed 0,
indices 0, 1, 2, …), so the held-out set (seed 1) is never seen.

Training is a plain PyTorch loop on the CPU, the paper's two stages in miniature: :data:`SPEC` iterations at
output stride 16 with BatchNorm trained, then at output stride 8 with BatchNorm frozen; SGD with momentum
0.9, weight decay 1e-4, poly learning rate, batch 8, random flips. ResNet-50 from scratch, about 5 minutes on
2 quiet cores. The state dict (torchvision names, no aux head) is cached in ``~/.cache/fastdeeplab`` (or
``$FASTDEEPLAB_CACHE``) with how it was made and its held-out mIoU, and loaded from there next time.

Everything this module produces is called "synthetic": it is not PASCAL VOC, and its mIoU says how the
implementations compare on one toy task, not how DeepLabv3 segments photographs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastdeeplab.metrics import IGNORE_INDEX, ConfusionMatrix

__all__ = ["SPEC", "SyntheticSpec", "cache_path", "held_out_set", "load_or_train", "scenes", "train_synthetic"]

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

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


SPEC = SyntheticSpec()


def cache_dir() -> Path:
    return Path(os.environ.get("FASTDEEPLAB_CACHE") or Path.home() / ".cache" / "fastdeeplab")


def cache_path(depth: int, spec: SyntheticSpec = SPEC) -> Path:
    return cache_dir() / f"synthetic-deeplabv3_resnet{depth}-{spec.digest()}.pt"


def scenes(indices: range | list[int], spec: SyntheticSpec = SPEC, *, seed: int) -> tuple[Tensor, Tensor]:
    """Synthetic scenes ``(images [N, 3, S, S] float32 normalised like ImageNet, labels [N, S, S] int64)``."""
    from fastdeeplab.data.synthetic import synthetic_sample
    from fastdeeplab.images import normalize

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


def train_synthetic(depth: int = 50, spec: SyntheticSpec = SPEC, progress: Progress | None = None
                    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Train a DeepLabv3-ResNet-``depth`` from scratch on synthetic scenes (see the module docstring).

    Returns the state dict (torchvision names, no aux head) and a record of how it was made: the spec,
    seconds, threads, the loss at the start and end of each stage, and the held-out mIoU at OS16 and OS8.
    """
    import fastdeeplab

    say = progress or (lambda _: None)
    build = fastdeeplab.deeplabv3_resnet50 if depth == 50 else fastdeeplab.deeplabv3_resnet101
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.train_seed)
        model = build(num_classes=spec.num_classes, aux_loss=False, output_stride=16)
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
        "depth": depth,
        "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "loss": {k: {"first10": mean(v[:10]), "last10": mean(v[-10:])} for k, v in losses.items()},
        "held_out_miou_eager": miou,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("aux_classifier.")}
    return state, info


def load_or_train(depth: int = 50, spec: SyntheticSpec = SPEC, progress: Progress | None = None,
                  ) -> tuple[dict[str, Tensor], dict[str, Any], Path]:
    """The synthetic model's state dict and record, from the cache if there, else trained and cached."""
    from fastdeeplab._io import atomic_path

    say = progress or (lambda _: None)
    path = cache_path(depth, spec)
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        say(f"synthetic weights: loaded {path}")
        return blob["state_dict"], json.loads(blob["info"]), path
    say(f"synthetic weights: not in the cache ({path}); training a DeepLabv3-ResNet-{depth} on synthetic "
        f"scenes ({spec.iterations_os16} + {spec.iterations_os8} iterations, about 5 min on 2 quiet cores)")
    state, info = train_synthetic(depth, spec, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save({"state_dict": state, "info": json.dumps(info)}, tmp)
    say(f"synthetic weights: trained in {info['train_seconds']:.0f} s, held-out mIoU OS16 "
        f"{info['held_out_miou_eager']['os16']:.3f}, OS8 {info['held_out_miou_eager']['os8']:.3f}; cached in {path}")
    return state, info, path


if __name__ == "__main__":  # OMP_WAIT_POLICY=PASSIVE python -m bench._synthetic: train (or load), print the record
    _, record, where = load_or_train(progress=lambda line: print(line, flush=True))
    print(where)
    print(json.dumps(record, indent=2))
