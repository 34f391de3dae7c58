"""Datasets (PASCAL VOC, Cityscapes), the paper's joint transforms, palettes and synthetic data.

>>> from fastdeeplab.data import VOCSegmentation, train_transform
>>> ds = VOCSegmentation("data/VOCdevkit", "train_aug", transform=train_transform(513))   # doctest: +SKIP
"""

from __future__ import annotations

from .base import JointTransform, SegmentationDataset, read_label
from .cityscapes import CITYSCAPES_LABEL_TO_TRAIN_ID, CityscapesSegmentation
from .palette import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    IGNORE_INDEX,
    VOC_CLASSES,
    colorize,
    overlay,
    voc_palette,
)
from .synthetic import synthetic_sample, write_cityscapes_dataset, write_voc_dataset
from .transforms import eval_transform, train_transform
from .voc import VOCSegmentation, find_voc_root

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_LABEL_TO_TRAIN_ID",
    "CITYSCAPES_PALETTE",
    "IGNORE_INDEX",
    "VOC_CLASSES",
    "CityscapesSegmentation",
    "JointTransform",
    "SegmentationDataset",
    "VOCSegmentation",
    "build_dataset",
    "colorize",
    "eval_transform",
    "find_voc_root",
    "overlay",
    "read_label",
    "synthetic_sample",
    "train_transform",
    "voc_palette",
    "write_cityscapes_dataset",
    "write_voc_dataset",
]

DATASETS = {"voc": VOCSegmentation, "cityscapes": CityscapesSegmentation}


def build_dataset(name: str, root: str, split: str, transform: JointTransform | None = None) -> SegmentationDataset:
    """``build_dataset("voc" | "cityscapes", root, split, transform)``; unknown names list the known ones."""
    try:
        cls = DATASETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}") from None
    return cls(root, split, transform)
