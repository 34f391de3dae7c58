"""Real photographs for demos, benchmarks and calibration, and the ImageNet normalisation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SKIMAGE_PHOTOS", "image_size", "load_image", "normalize", "sample_images",
           "skimage_photo_paths", "to_8bit"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Colour photographs that scikit-image ships inside its wheel (no download needed).
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg",
                  "motorcycle_right.png")
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp"}


_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # one channel, wider than 8 bits


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image file from its header, without decoding the pixels (so a huge image
    can be refused before it fills the memory); errors name the file."""
    path = _image_file(path)
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # only the header is read here; load_image keeps PIL's limit
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read image {path}: {' '.join(str(exc).split())}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = before


def _image_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"image {path}: Is a directory; give an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return path


def to_8bit(array: np.ndarray) -> np.ndarray:
    """A one-channel image of any depth as uint8, scaled by its real range, never clipped.

    Integers already in 0..255 stay as they are; floats in [0, 1] are fractions (x 255); anything else
    (16-bit, 32-bit, float images in other units) maps its minimum to 0 and its maximum to 255. NaN and
    infinities become 0; a constant image keeps its value, clipped to 0..255.
    """
    values = array.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(array.shape, np.uint8)
    lo, hi = float(values[finite].min()), float(values[finite].max())
    if np.issubdtype(array.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        out = values * 255.0
    elif not np.issubdtype(array.dtype, np.floating) and lo >= 0 and hi <= 255:
        out = values
    elif hi > lo:
        out = (values - lo) * (255.0 / (hi - lo))
    else:
        out = np.full(values.shape, min(max(lo, 0.0), 255.0))
    out[~finite] = 0.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image as 8-bit RGB, the one loader of the package; errors name the file.

    Every mode PIL reads is converted as a person would expect to see it: grayscale becomes grey RGB,
    palette images their colours, alpha is dropped, and one-channel images deeper than 8 bits (16-bit PNG
    and TIFF, 32-bit integer and float TIFF) are scaled by their real range (:func:`to_8bit`), not clipped
    at 255 as ``Image.convert("RGB")`` does. Images beyond PIL's decompression-bomb limit are refused.
    """
    path = _image_file(path)
    try:
        with Image.open(path) as im:
            if im.mode in _HIGH_DEPTH_MODES:
                return Image.fromarray(to_8bit(np.asarray(im)), mode="L").convert("RGB")
            return im.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image {path} is too large to load safely ({' '.join(str(exc).split())}); "
                         "resize it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read image {path}: {' '.join(str(exc).split())}") from None


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


