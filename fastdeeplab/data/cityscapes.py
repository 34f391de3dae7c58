"""Cityscapes fine annotations, mapped to the 19 training classes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .base import JointTransform, SegmentationDataset, _check_dir
from .palette import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, IGNORE_INDEX

__all__ = ["CITYSCAPES_LABEL_TO_TRAIN_ID", "CityscapesSegmentation"]

CITYSCAPES_LABEL_TO_TRAIN_ID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
    27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
"""Official ``labelId → trainId`` table (cityscapesScripts ``labels.py``); every other id is ignored."""


def _label_lut() -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    return lut


class CityscapesSegmentation(SegmentationDataset):
    """Cityscapes with fine annotations: 19 classes, everything else 255 (ignore).

    Layout::

        leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
        gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

    Label ids are mapped to train ids with :data:`CITYSCAPES_LABEL_TO_TRAIN_ID`. Items are
    ``(image [3, H, W] float32, label [H, W] int64)``; an image without its label raises naming both.
    """

    num_classes = len(CITYSCAPES_CLASSES)
    class_names = CITYSCAPES_CLASSES
    palette = CITYSCAPES_PALETTE

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: JointTransform | None = None) -> None:
        self.root = Path(root).expanduser()
        self.split = split
        image_root = _check_dir(self.root / "leftImg8bit" / split, f"Cityscapes images for split {split!r}")
        label_root = _check_dir(self.root / "gtFine" / split, f"Cityscapes fine labels for split {split!r}")
        samples: list[tuple[Path, Path]] = []
        for image in sorted(image_root.glob("*/*_leftImg8bit.png")):
            stem = image.name.removesuffix("_leftImg8bit.png")
            label = label_root / image.parent.name / f"{stem}_gtFine_labelIds.png"
            if not label.is_file():
                raise FileNotFoundError(f"label {label} for image {image} not found")
            samples.append((image, label))
        if not samples:
            raise FileNotFoundError(f"no *_leftImg8bit.png images in {image_root}/<city>/")
        super().__init__(samples, transform, label_map=_label_lut())
