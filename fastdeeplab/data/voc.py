"""PASCAL VOC 2012 segmentation, with the SBD-augmented ``train_aug`` split used by DeepLab."""

from __future__ import annotations

import os
from pathlib import Path

from .._io import read_regular_file
from .base import JointTransform, SegmentationDataset, _check_dir
from .palette import VOC_CLASSES, voc_palette

__all__ = ["VOCSegmentation", "find_voc_root"]


def find_voc_root(root: str | os.PathLike) -> Path:
    """The folder holding ``JPEGImages/``: ``root`` itself, ``root/VOC2012`` or ``root/VOCdevkit/VOC2012``."""
    root = Path(root).expanduser()
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise FileNotFoundError(f"no PASCAL VOC dataset under {root}: expected {root / 'JPEGImages'} "
                            f"(or VOC2012/ or VOCdevkit/VOC2012/ inside it)")


class VOCSegmentation(SegmentationDataset):
    """PASCAL VOC 2012 segmentation: 21 classes, 255 = ignore (object boundaries).

    Layout (``root`` may also be the folder above ``VOC2012/`` or ``VOCdevkit/``)::

        JPEGImages/<id>.jpg
        SegmentationClass/<id>.png               palette PNGs: pixel value = class id
        SegmentationClassAug/<id>.png            SBD-augmented labels (grey PNGs), split "train_aug"
        ImageSets/Segmentation/<split>.txt       one id per line ("train", "val", "trainval", "train_aug")

    ``train_aug`` (the 10,582 images of Hariharan et al.'s SBD added to VOC train, as in DeepLab) reads
    ``SegmentationClassAug/``; every other split reads ``SegmentationClass/``. ``label_dir`` overrides this.
    A list line may also hold two paths, ``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` (DeepLab's list
    format), relative to the root.

    Items are ``(image [3, H, W] float32, label [H, W] int64)`` after ``transform`` (normalisation only
    when ``transform`` is None). Unreadable images or labels raise an error that names the file.

    >>> ds = VOCSegmentation("data/VOCdevkit", "val")                          # doctest: +SKIP
    >>> image, label = ds[0]                                                     # doctest: +SKIP
    """

    num_classes = len(VOC_CLASSES)
    class_names = VOC_CLASSES
    palette = voc_palette()

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: JointTransform | None = None, *,
                 label_dir: str | None = None) -> None:
        self.root = find_voc_root(root)
        self.split = split
        lists = self.root / "ImageSets" / "Segmentation"
        list_file = lists / f"{split}.txt"
        if not list_file.is_file():
            available = sorted(p.stem for p in lists.glob("*.txt")) if lists.is_dir() else []
            raise FileNotFoundError(f"split list not found: {list_file}; available splits: "
                                    f"{', '.join(available) or 'none'}")
        if label_dir is None:
            label_dir = "SegmentationClassAug" if split == "train_aug" else "SegmentationClass"
        image_root = _check_dir(self.root / "JPEGImages", "image folder")
        label_root = _check_dir(self.root / label_dir, "label folder")
        samples: list[tuple[Path, Path]] = []
        self.list_file = list_file
        # read safely (a regular file of bounded size, never a fifo), UTF-8 with or without a BOM
        text = read_regular_file(list_file, max_bytes=64 * 2**20, what="split list")
        for number, line in enumerate(text.splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) == 1:
                samples.append((image_root / f"{fields[0]}.jpg", label_root / f"{fields[0]}.png"))
            elif len(fields) == 2:
                samples.append((self.root / fields[0].lstrip("/"), self.root / fields[1].lstrip("/")))
            else:
                raise ValueError(f"{list_file}:{number}: expected an image id or two paths, got {line!r}")
        if not samples:
            raise ValueError(f"split list {list_file} is empty")
        super().__init__(samples, transform)
