"""What every segmentation dataset shares: a list of (image, label) files, checked reading, transforms."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from ..images import load_image

__all__ = ["JointTransform", "SegmentationDataset", "one_line_worker_errors", "read_label"]

JointTransform = Callable[..., tuple[Tensor, Tensor]]
"""``transform(image: PIL.Image, label: np.ndarray [H, W], generator=None) -> (image [3, h, w], label [h, w])``."""


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read a label image as an ``[H, W]`` uint8 array of class ids; errors name the file.

    Palette PNGs (VOC's ``SegmentationClass``, mode ``"P"``) give their indices, not their colours;
    grey-level PNGs (``SegmentationClassAug``, Cityscapes ``*_labelIds.png``) give their values. A colour
    (RGB) label is refused: it would need a colour → class table.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label not found: {path}")
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise ValueError(f"cannot read label {path}: expected a single-channel class-index image "
                                 f"(mode P or L), got mode {im.mode}")
            array = np.array(im)
    except Image.DecompressionBombError as exc:
        raise ValueError(f"label {path} is too large to load safely ({' '.join(str(exc).split())})") from None
    except ValueError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read label {path}: {' '.join(str(exc).split())}") from None
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"cannot read label {path}: class ids must lie in 0..255, got {array.min()}..{array.max()}")
        array = array.astype(np.uint8)
    return array


class SegmentationDataset(Dataset):
    """Pairs of (image file, label file) → ``(image [3, H, W] float32, label [H, W] int64)``.

    Subclasses fill :attr:`samples` and may remap raw label values with :attr:`label_map` (a 256-entry
    lookup table). ``transform`` is a joint transform (see :mod:`fastdeeplab.data.transforms`); when it is
    ``None`` the image is only normalised (the evaluation transform) and keeps its size.

    :meth:`load` gives the raw pair (PIL image, ``[H, W]`` uint8 class ids) for callers that run their own
    transform, such as the training loop, which seeds every sample's augmentation itself.
    """

    num_classes: int = 0
    class_names: Sequence[str] = ()
    palette: Sequence[Any] | None = None

    def __init__(self, samples: Sequence[tuple[Path, Path]], transform: JointTransform | None = None,
                 label_map: np.ndarray | None = None) -> None:
        self.samples = [(Path(i), Path(t)) for i, t in samples]
        self.transform = transform
        self.label_map = label_map

    def __len__(self) -> int:
        return len(self.samples)

    def image_path(self, index: int) -> Path:
        return self.samples[index][0]

    def label_path(self, index: int) -> Path:
        return self.samples[index][1]

    def load_label(self, index: int) -> np.ndarray:
        """``[H, W]`` uint8 train ids of sample ``index`` (``255`` = ignore)."""
        label = read_label(self.samples[index][1])
        return label if self.label_map is None else self.label_map[label]

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The raw sample: RGB image and ``[H, W]`` uint8 label of the same size (checked)."""
        image_path, label_path = self.samples[index]
        image = load_image(image_path)
        label = self.load_label(index)
        if label.shape != (image.height, image.width):
            raise ValueError(f"label {label_path} is {label.shape[1]}x{label.shape[0]} but image {image_path} "
                             f"is {image.width}x{image.height}")
        return image, label

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, label = self.load(index)
        if self.transform is None:
            from .transforms import to_tensors

            return to_tensors(image, label)
        return self.transform(image, label)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} samples, {self.num_classes} classes)"


def _check_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def one_line_worker_errors(batches):
    """Iterate ``batches`` (a DataLoader, possibly in a tqdm bar); an error raised in a data-loading worker
    comes back as the same exception type with its own one-line message, not the worker's whole traceback
    (``Caught ValueError in DataLoader worker process 0. Original Traceback ...``)."""
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as exc:
            message = str(exc)
            if "Original Traceback" not in message:
                raise
            last = next((line for line in reversed(message.strip().splitlines()) if line.strip()), message)
            prefix = f"{type(exc).__name__}: "
            last = last[len(prefix):] if last.startswith(prefix) else last
            try:
                new = type(exc)(last)
            except Exception:  # noqa: BLE001  (an exception type with an unusual constructor)
                new = RuntimeError(last)
            raise new from None
        yield batch
