"""Class names and colour palettes (PASCAL VOC, Cityscapes), and helpers that turn class maps into images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_PALETTE",
    "IGNORE_INDEX",
    "VOC_CLASSES",
    "colorize",
    "overlay",
    "voc_palette",
]

from ..metrics import IGNORE_INDEX  # noqa: E402  (the one home of the ignore label)

"""Label value of pixels that are not scored (object boundaries in VOC, void classes in Cityscapes)."""

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)

CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
"""RGB colour of each Cityscapes train id (0–18), as in the official ``cityscapesScripts``."""


def voc_palette(num_colors: int = 256) -> list[int]:
    """The PASCAL VOC colour map as a flat ``[r0, g0, b0, r1, …]`` list of ``3 * num_colors`` ints.

    Colour ``i`` spreads the bits of ``i`` over the high bits of R, G and B (VOC devkit's ``labelcolormap``):
    0 is black (background), 1 dark red (aeroplane), …, 255 is (224, 224, 192), the boundary colour.

    >>> voc_palette()[3:6]
    [128, 0, 0]
    """
    palette: list[int] = []
    for i in range(num_colors):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def _flat_palette(palette: Sequence[int] | Sequence[Sequence[int]] | None) -> list[int]:
    if palette is None:
        return voc_palette()
    flat = [int(v) for rgb in palette for v in rgb] if palette and isinstance(palette[0], Sequence) else \
        [int(v) for v in palette]  # type: ignore[arg-type]
    if len(flat) % 3 or len(flat) > 768:
        raise ValueError(f"a palette holds at most 256 RGB triples; got {len(flat)} values")
    return flat + [0] * (768 - len(flat))


def colorize(mask: np.ndarray, palette: Sequence[int] | Sequence[Sequence[int]] | None = None) -> Image.Image:
    """Class map ``[H, W]`` (ints in 0–255) → palette image (mode ``"P"``) that stores the class indices.

    The file keeps the class ids (``np.array(Image.open(f))`` gives ``mask`` back) and displays in colour.
    ``palette`` defaults to VOC's; pass :data:`CITYSCAPES_PALETTE` for Cityscapes.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a class map [H, W], got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"class ids must lie in 0..255 to be stored in a palette PNG; got {mask.min()}..{mask.max()}")
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(_flat_palette(palette))
    return image


def overlay(image: Image.Image, mask: np.ndarray, palette: Sequence[int] | Sequence[Sequence[int]] | None = None,
            alpha: float = 0.5, skip: Sequence[int] = (0, IGNORE_INDEX)) -> Image.Image:
    """Blend the coloured class map over the photograph (RGB, same size as ``mask``).

    Pixels whose class is in ``skip`` (VOC's background and the ignore label by default) keep the
    photograph's colour; the others are ``(1 - alpha) * photo + alpha * class colour``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    mask = np.asarray(mask)
    photo = np.asarray(image.convert("RGB"), dtype=np.float32)
    if photo.shape[:2] != mask.shape:
        raise ValueError(f"image size {photo.shape[1]}x{photo.shape[0]} differs from mask size "
                         f"{mask.shape[1]}x{mask.shape[0]}")
    colours = np.asarray(_flat_palette(palette), dtype=np.float32).reshape(256, 3)[mask.astype(np.int64)]
    blended = (1.0 - alpha) * photo + alpha * colours
    keep = np.isin(mask, np.asarray(list(skip), dtype=mask.dtype)) if len(skip) else np.zeros(mask.shape, bool)
    blended[keep] = photo[keep]
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8), mode="RGB")
