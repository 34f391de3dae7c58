"""Recipes built on :func:`fastdeeplab.train`: the overfit demo, proof that the loop learns.

:func:`overfit_demo` writes a few synthetic images in VOC layout, trains a ResNet-50 DeepLabv3 on them from
scratch with the paper's two stages (:data:`OVERFIT_STAGES`) and scores it on the same images;
``fastdeeplab train --overfit-demo`` runs it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_path, json_text
from ..timing import time_call
from .config import Stage, parse_stages
from .loop import TrainResult, train

__all__ = ["OVERFIT_STAGES", "overfit_demo"]


OVERFIT_STAGES = (
    Stage(iterations=100, lr=0.02, output_stride=16, freeze_bn=False),
    Stage(iterations=60, lr=0.005, output_stride=8, freeze_bn=True),
)


def overfit_demo(out_dir: str | os.PathLike = "runs/overfit_demo", *, num_images: int = 8, image_size: int = 64,
                 num_classes: int = 3, stages: Sequence[Stage | Mapping[str, Any]] = OVERFIT_STAGES,
                 batch_size: int = 8, bn_momentum: float = 0.1, device: str | None = None, seed: int = 0,
                 progress: bool = True) -> dict[str, Any]:
    """Train a ResNet-50 DeepLabv3 from scratch on ``num_images`` synthetic images, then score it on them.

    Writes the images in VOC layout under ``out_dir/data`` (:func:`fastdeeplab.data.write_voc_dataset`),
    runs the paper's two-stage protocol on them through :func:`train` (stage 1 at output stride 16 with
    batch norm trained, stage 2 at output stride 8 with batch norm frozen; crop = image size, no scale
    jitter, random flips) and evaluates with :func:`fastdeeplab.evaluate` in eval mode at the last stage's
    output stride. ``stages`` replaces the schedule (:data:`OVERFIT_STAGES`).
    ``bn_momentum`` is 0.1 rather than the paper's 0.0003: running statistics must catch up within a
    hundred iterations, not thirty thousand. Returns (and writes to ``out_dir/overfit.json``) the mIoU,
    the loss curve's endpoints and timings.
    """
    import platform

    from ..data import VOCSegmentation, write_voc_dataset
    from ..evaluation import evaluate

    out = Path(out_dir)
    data_root = write_voc_dataset(out / "data", num_images, (image_size, image_size), num_classes, seed=seed)
    stages = parse_stages(stages)
    run = partial(train, dataset="voc", data_root=str(data_root), train_split="train", num_classes=num_classes,
                  crop_size=image_size, scale_range=(1.0, 1.0), batch_size=batch_size, num_workers=0,
                  stages=stages, bn_momentum=bn_momentum, out_dir=str(out / "run"), checkpoint_every=0,
                  resume=False, seed=seed, device=device, progress=progress, log_every=10)
    results: list[TrainResult] = []
    train_seconds = time_call(lambda: results.append(run()), device)
    result = results[0]
    result.model.set_output_stride(stages[-1].output_stride)
    scores = evaluate(result.model, VOCSegmentation(data_root, "val"), progress=False)
    losses = result.history["loss"]
    summary = {
        "mIoU": scores["mIoU"],
        "per_class_iou": scores["per_class_iou"],
        "pixel_accuracy": scores["pixel_accuracy"],
        "eval_output_stride": stages[-1].output_stride,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_first5_mean": sum(losses[:5]) / len(losses[:5]),
        "loss_last5_mean": sum(losses[-5:]) / len(losses[-5:]),
        "iterations": [s.iterations for s in stages],
        "lr": [s.lr for s in stages],
        "num_images": num_images, "image_size": image_size, "num_classes": num_classes,
        "batch_size": batch_size, "train_seconds": train_seconds, "eval_seconds": scores["seconds"],
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "device": str(next(result.model.parameters()).device)},
    }
    with atomic_path(out / "overfit.json") as tmp:
        tmp.write_text(json_text(summary, indent=2) + "\n")
    return summary
