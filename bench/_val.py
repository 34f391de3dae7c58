"""``--data``: real mIoU of one implementation on the PASCAL VOC val split, through ``fastdeeplab.evaluate``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Subset

from ._impls import Built

__all__ = ["val_miou"]


class _AsModule(nn.Module):
    """An implementation as the ``nn.Module`` that :func:`fastdeeplab.evaluation.evaluate` expects."""

    def __init__(self, built: Built, output_stride: int) -> None:
        super().__init__()
        self.built = built
        self.output_stride = output_stride

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"out": self.built.fn(x.to(self.built.input_dtype))}


def val_miou(built: Built, output_stride: int, *, data: str | Path, max_images: int | None,
             device: torch.device, num_classes: int) -> tuple[float, int]:
    """Real mIoU on the VOC val split under ``data`` (first ``max_images``), single scale, each image at its
    own size, through ``fastdeeplab.evaluate`` — the same scoring as ``fastdeeplab eval``."""
    from fastdeeplab.data import VOCSegmentation
    from fastdeeplab.evaluation import evaluate

    dataset = VOCSegmentation(data, "val")
    if max_images is not None and max_images < len(dataset):
        dataset = Subset(dataset, range(max_images))
    scores = evaluate(_AsModule(built, output_stride), dataset, batch_size=1, device=device,
                      num_classes=num_classes, progress=False)
    return float(scores["mIoU"]), int(scores["num_images"])
