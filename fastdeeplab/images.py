"""Real photographs for demos, benchmarks and calibration, and the ImageNet normalisation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "load_image", "normalize", "sample_images", "skimage_photo_paths", "SKIMAGE_PHOTOS"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Colour photographs that scikit-image ships inside its wheel (no download needed).
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg",
                  "motorcycle_right.png")
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp"}


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB; a missing or unreadable file raises an error that names it."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"image {path}: Is a directory; give an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc


def normalize(image: Image.Image | np.ndarray, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """RGB image (PIL or ``[H, W, 3]`` uint8) → ``[3, H, W]`` float32 normalised with ImageNet statistics.

    ``size`` (``(H, W)`` or a side) resizes with bilinear filtering first.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
        image = image.resize((w, h), Image.BILINEAR)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()) / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (array.permute(2, 0, 1) - mean) / std


def skimage_photo_paths() -> list[Path]:
    """Paths of the colour photographs in scikit-image's wheel (astronaut, cat, coffee, motorcycle, rocket)."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise ImportError("sample photographs need scikit-image: pip install 'fastdeeplab[bench]'")
    root = Path(spec.origin).parent / "data"
    paths = [root / name for name in SKIMAGE_PHOTOS if (root / name).is_file()]
    if not paths:
        raise FileNotFoundError(f"scikit-image's sample photographs are missing from {root}")
    return paths


def sample_images(size: int | tuple[int, int] = 513, count: int | None = None,
                  folder: str | os.PathLike | None = None) -> tuple[list[str], torch.Tensor]:
    """Real photographs as a normalised batch ``[count, 3, H, W]`` plus their names.

    From ``folder`` (every image file in it, sorted) when given, else from the photographs that
    scikit-image ships (``pip install 'fastdeeplab[bench]'``).
    """
    names: list[str] = []
    images: list[Image.Image] = []
    if folder is not None:
        if Path(folder).exists() and not Path(folder).is_dir():
            raise NotADirectoryError(f"image folder {folder}: Not a directory")
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"image folder not found: {folder}")
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) found in {folder}")
        for p in files[:count]:
            names.append(p.name)
            images.append(load_image(p))
    else:
        for path in skimage_photo_paths()[:count]:
            names.append(path.stem)
            images.append(load_image(path))
    if count is not None and len(images) < count:  # repeat to reach the requested count
        reps = -(-count // len(images))
        names, images = (names * reps)[:count], (images * reps)[:count]
    return names, torch.stack([normalize(im, size) for im in images])


