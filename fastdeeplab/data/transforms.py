"""Joint image/label transforms: the paper's training augmentation and the evaluation transform.

Every transform is called as ``t(image, label, generator=None)`` and returns the pair. The first one,
:class:`ToTensors`, turns a PIL image and a ``[H, W]`` class map into ``(image [3, H, W] float32 normalised
with ImageNet statistics, label [H, W] int64)``; the others work on those tensors. Random draws come from
``generator`` (a ``torch.Generator``) when given, else from torch's global RNG, so a training sample's
augmentation can be reproduced exactly from one seed.

The paper's training pipeline (§4): random scale in [0.5, 2.0] → pad to the crop size (image with the
mean colour, which is 0 after normalisation; label with 255 = ignore) → random 513×513 crop → random
horizontal flip. Images are resized bilinearly, labels with nearest neighbour.

>>> t = train_transform(crop_size=65)
>>> from PIL import Image; import numpy as np
>>> image, label = t(Image.new("RGB", (40, 30)), np.zeros((30, 40), np.uint8))
>>> tuple(image.shape), tuple(label.shape), label.dtype
((3, 65, 65), (65, 65), torch.int64)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..images import normalize
from .palette import IGNORE_INDEX

__all__ = [
    "Compose",
    "PadToSize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomScale",
    "ToTensors",
    "eval_transform",
    "to_tensors",
    "train_transform",
]


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in ``[0, high]`` (inclusive)."""
    return int(torch.randint(high + 1, (), generator=generator))


def to_tensors(image: Image.Image | np.ndarray, label: np.ndarray) -> tuple[Tensor, Tensor]:
    """RGB image + ``[H, W]`` class map → ``(image [3, H, W] float32 normalised, label [H, W] int64)``."""
    label_t = torch.from_numpy(np.ascontiguousarray(label)).long()
    return normalize(image), label_t


class ToTensors:
    """PIL image + numpy class map → normalised ``[3, H, W]`` float32 image and ``[H, W]`` int64 label."""

    def __call__(self, image: Image.Image | np.ndarray, label: np.ndarray,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        return to_tensors(image, label)


class RandomScale:
    """Resize image and label by a factor drawn uniformly from ``[min_scale, max_scale]``.

    ``step`` (e.g. 0.25, as TensorFlow DeepLab's ``scale_factor_step_size``) restricts the factor to
    ``min_scale + k * step``. The image is resized bilinearly, the label with nearest neighbour.
    """

    def __init__(self, min_scale: float = 0.5, max_scale: float = 2.0, step: float = 0.0) -> None:
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.min_scale, self.max_scale, self.step = float(min_scale), float(max_scale), float(step)

    def draw(self, generator: torch.Generator | None = None) -> float:
        if self.step > 0:
            steps = int(round((self.max_scale - self.min_scale) / self.step))
            return self.min_scale + self.step * _randint(steps, generator)
        return _uniform(self.min_scale, self.max_scale, generator)

    def __call__(self, image: Tensor, label: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        scale = self.draw(generator)
        h, w = label.shape[-2:]
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        if size == (h, w):
            return image, label
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
        return image, label


class PadToSize:
    """Pad on the bottom and right up to ``size``: the image with 0 (the mean colour once normalised),
    the label with ``ignore_index`` so padding is never scored or learned."""

    def __init__(self, size: int | tuple[int, int], ignore_index: int = IGNORE_INDEX) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.ignore_index = ignore_index

    def __call__(self, image: Tensor, label: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        h, w = label.shape[-2:]
        pad_h, pad_w = max(0, self.size[0] - h), max(0, self.size[1] - w)
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            label = F.pad(label, (0, pad_w, 0, pad_h), value=self.ignore_index)
        return image, label


class RandomCrop:
    """Crop a random ``size`` window (after padding smaller inputs with :class:`PadToSize`)."""

    def __init__(self, size: int | tuple[int, int], ignore_index: int = IGNORE_INDEX) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.pad = PadToSize(self.size, ignore_index)

    def __call__(self, image: Tensor, label: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        image, label = self.pad(image, label)
        h, w = label.shape[-2:]
        top = _randint(h - self.size[0], generator)
        left = _randint(w - self.size[1], generator)
        window = (slice(top, top + self.size[0]), slice(left, left + self.size[1]))
        return image[(..., *window)], label[window]


class RandomHorizontalFlip:
    """Mirror image and label left–right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: Tensor, label: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        if float(torch.rand((), generator=generator)) < self.p:
            return image.flip(-1), label.flip(-1)
        return image, label


class Compose:
    """Chain joint transforms; the same ``generator`` feeds every random draw, in order."""

    def __init__(self, transforms: Sequence[object]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: object, label: object, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        for t in self.transforms:
            image, label = t(image, label, generator=generator)  # type: ignore[operator]
        return image, label  # type: ignore[return-value]

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(type(t).__name__ for t in self.transforms) + ")"


def train_transform(crop_size: int | tuple[int, int] = 513, scale_range: tuple[float, float] = (0.5, 2.0),
                    flip: bool = True, scale_step: float = 0.0, ignore_index: int = IGNORE_INDEX) -> Compose:
    """The paper's augmentation: random scale, pad + random crop to ``crop_size``, random flip, normalise.

    Output: ``(image [3, crop, crop] float32, label [crop, crop] int64)``.
    """
    steps: list[object] = [ToTensors()]
    if tuple(scale_range) != (1.0, 1.0):
        steps.append(RandomScale(*scale_range, step=scale_step))
    steps.append(RandomCrop(crop_size, ignore_index))
    if flip:
        steps.append(RandomHorizontalFlip())
    return Compose(steps)


def eval_transform() -> Compose:
    """Evaluation: normalise only; the image keeps its size. Output ``([3, H, W], [H, W] int64)``."""
    return Compose([ToTensors()])
