"""Synthetic segmentation data: coloured shapes on a textured background, with exact labels.

One generator serves the tests and the overfit demo (``fastdeeplab train --overfit-demo``). Writers lay the
samples out on disk exactly as PASCAL VOC or Cityscapes do, so the real dataset classes read them.

Class 0 is the background (a smooth colour gradient with noise and stripes); class ``c >= 1`` is a filled
rectangle or disc of the class's own colour, jittered per object. With ``thin_structures=n`` each image also
gets ``n`` thin bars (1–3 px wide, like poles and wires) of an object class: they vanish in a coarse feature
map, so a model's output stride shows in its accuracy on them. A band of ``ignore_border`` pixels on each
side of every boundary is labelled 255, like VOC's object outlines.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .cityscapes import CITYSCAPES_LABEL_TO_TRAIN_ID
from .palette import IGNORE_INDEX, colorize

__all__ = ["synthetic_sample", "write_cityscapes_dataset", "write_voc_dataset"]

# Well separated object colours; class c >= 1 uses _COLOURS[(c - 1) % len(_COLOURS)].
_COLOURS = np.array([(220, 40, 40), (40, 200, 60), (50, 70, 230), (240, 220, 40), (200, 50, 220),
                     (40, 220, 230), (250, 140, 20), (120, 60, 20), (255, 255, 255)], dtype=np.float32)

Size = tuple[int, int]


def synthetic_sample(index: int, size: Size = (64, 64), num_classes: int = 3, *, seed: int = 0,
                     max_objects: int = 3, ignore_border: int = 1,
                     thin_structures: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``index`` of a synthetic dataset: ``(image [H, W, 3] uint8, label [H, W] uint8)``.

    Deterministic in ``(seed, index)``. Every image holds 1 to ``max_objects`` objects; sample ``index``
    always contains class ``1 + index % (num_classes - 1)``, so ``num_classes - 1`` consecutive samples
    cover every class. Labels are 0 (background), 1 … ``num_classes - 1`` and 255 (boundary band).
    ``thin_structures`` bars of width 1–3 px are drawn over the objects (labelled with their class; the
    boundary band is not applied to them, so they keep their pixels). With ``thin_structures=0`` (the
    default) the samples are exactly those of earlier versions.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + one object class), got {num_classes}")
    h, w = size
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    # Background: a random grey-ish gradient, stripes and pixel noise.
    base = rng.uniform(60, 140, size=3)
    slope = rng.uniform(-40, 40, size=(2, 3))
    image = base + slope[0] * (yy[..., None] / max(h, 1)) + slope[1] * (xx[..., None] / max(w, 1))
    period = rng.uniform(4, 10)
    image += 12 * np.sin(2 * np.pi * (xx + yy * rng.uniform(-1, 1)) / period)[..., None]
    label = np.zeros((h, w), dtype=np.uint8)

    n_objects = int(rng.integers(1, max_objects + 1))
    classes = [1 + index % (num_classes - 1)] + [int(c) for c in rng.integers(1, num_classes, n_objects - 1)]
    for cls in classes:
        extent = rng.uniform(0.25, 0.45) * min(h, w)
        cy, cx = rng.uniform(extent / 2, h - extent / 2), rng.uniform(extent / 2, w - extent / 2)
        if rng.random() < 0.5:
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= (extent / 2) ** 2
        else:
            ry, rx = extent / 2 * rng.uniform(0.6, 1.0), extent / 2 * rng.uniform(0.6, 1.0)
            inside = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        colour = _COLOURS[(cls - 1) % len(_COLOURS)] + rng.uniform(-20, 20, size=3)
        image[inside] = colour
        label[inside] = cls
    image += rng.normal(0, 6, size=image.shape)

    thin = np.zeros((h, w), dtype=bool)
    thin_label = np.zeros((h, w), dtype=np.uint8)
    if thin_structures > 0:  # drawn after the noise so the bars stay crisp; their own random stream
        thin_rng = np.random.default_rng([seed, index, 1])
        for _ in range(thin_structures):
            cls = int(thin_rng.integers(1, num_classes))
            width = float(thin_rng.uniform(1.0, 3.0))
            angle = thin_rng.uniform(0, np.pi)
            cy, cx = thin_rng.uniform(0, h), thin_rng.uniform(0, w)
            length = thin_rng.uniform(0.5, 1.0) * max(h, w)
            dy, dx = np.sin(angle), np.cos(angle)
            along = (yy - cy) * dy + (xx - cx) * dx
            across = -(yy - cy) * dx + (xx - cx) * dy
            bar = (np.abs(across) <= width / 2) & (np.abs(along) <= length / 2)
            image[bar] = _COLOURS[(cls - 1) % len(_COLOURS)] + thin_rng.uniform(-10, 10, size=3)
            thin |= bar
            thin_label[bar] = cls

    if ignore_border > 0:
        edge = np.zeros((h, w), dtype=bool)
        padded = np.pad(label, ignore_border, mode="edge")
        for dy in range(-ignore_border, ignore_border + 1):
            for dx in range(-ignore_border, ignore_border + 1):
                shifted = padded[ignore_border + dy: ignore_border + dy + h, ignore_border + dx: ignore_border + dx + w]
                edge |= shifted != label
        label = label.copy()
        label[edge] = IGNORE_INDEX
    if thin.any():
        label = label.copy()
        label[thin] = thin_label[thin]
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), label


def _sizes(size: Size | Sequence[Size], n: int) -> list[Size]:
    if len(size) == 2 and all(isinstance(s, int) for s in size):
        return [tuple(size)] * n  # type: ignore[list-item]
    sizes = [tuple(s) for s in size]  # type: ignore[union-attr]
    return [sizes[i % len(sizes)] for i in range(n)]  # type: ignore[misc]


def write_voc_dataset(root: str | os.PathLike, num_images: int = 8, size: Size | Sequence[Size] = (64, 64),
                      num_classes: int = 3, *, seed: int = 0, splits: Mapping[str, Sequence[int]] | None = None,
                      train_aug: bool = False, **sample_kwargs: int) -> Path:
    """Write ``num_images`` synthetic samples in PASCAL VOC layout under ``root``; return ``root``.

    ``size`` is one ``(H, W)`` or a list cycled over the images (for datasets of mixed sizes). ``splits``
    maps split names to image indices (default: ``train`` and ``val`` both list every image).
    ``train_aug=True`` also writes ``SegmentationClassAug/`` (grey PNGs) and ``train_aug.txt``.
    Images are JPEG (quality 95), labels palette PNGs, as in VOC. The image ids are ``synth_0000`` …
    """
    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if train_aug:
        (root / "SegmentationClassAug").mkdir(exist_ok=True)
    ids = [f"synth_{i:04d}" for i in range(num_images)]
    for i, (image_id, hw) in enumerate(zip(ids, _sizes(size, num_images), strict=True)):
        image, label = synthetic_sample(i, hw, num_classes, seed=seed, **sample_kwargs)
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        colorize(label).save(root / "SegmentationClass" / f"{image_id}.png")
        if train_aug:
            Image.fromarray(label, mode="L").save(root / "SegmentationClassAug" / f"{image_id}.png")
    if splits is None:
        splits = {"train": range(num_images), "val": range(num_images)}
    if train_aug:
        splits = {**splits, "train_aug": splits.get("train", range(num_images))}
    for name, indices in splits.items():
        (root / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("".join(f"{ids[i]}\n" for i in indices))
    return root


def write_cityscapes_dataset(root: str | os.PathLike, split: str = "val", num_images: int = 2,
                             size: Size = (32, 64), num_classes: int = 19, *, city: str = "synthcity",
                             seed: int = 0) -> Path:
    """Write synthetic samples in Cityscapes layout (``leftImg8bit/``, ``gtFine/*_labelIds.png``); return ``root``.

    Train id ``t`` is stored as its official label id; the boundary band is stored as label id 0
    ("unlabeled"), which the dataset maps back to 255.
    """
    root = Path(root)
    image_dir = root / "leftImg8bit" / split / city
    label_dir = root / "gtFine" / split / city
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    to_label_id = np.zeros(256, dtype=np.uint8)  # 255 (boundary) -> 0 "unlabeled"
    for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN_ID.items():
        to_label_id[train_id] = label_id
    for i in range(num_images):
        image, label = synthetic_sample(i, size, num_classes, seed=seed)
        stem = f"{city}_{i:06d}_000019"
        Image.fromarray(image).save(image_dir / f"{stem}_leftImg8bit.png")
        Image.fromarray(to_label_id[label], mode="L").save(label_dir / f"{stem}_gtFine_labelIds.png")
    return root
