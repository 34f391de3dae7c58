"""Image batches at a fixed shape, for the TensorRT build's engine check (:mod:`fastdeeplab.export.engine_report`)
and its callers (:mod:`fastdeeplab.export.tensorrt` re-exports :class:`CalibrationBatches`)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..runtime.tensorrt import parse_shape

__all__ = ["CalibrationBatches"]


class CalibrationBatches:
    """Image batches ``[N, 3, H, W]`` float32 at a fixed shape, loaded lazily: what the build's engine check
    runs at each profile's ``opt`` shape (int8 calibration reads its images with
    :func:`fastdeeplab.export.quantize.calibration_tensor`).

    ``source`` is a folder of images (each resized to ``H×W`` and normalised with ImageNet mean/std) or a
    tensor ``[M, 3, H, W]`` already normalised. A last, partial batch is filled by repeating the first
    images, so every batch has the profile's ``opt`` shape.
    ``max_images`` caps how many images are used.
    """

    def __init__(self, source: str | os.PathLike | Tensor, shape: Sequence[int], *,
                 max_images: int | None = None) -> None:
        self.shape = parse_shape(shape)
        n, c, h, w = self.shape
        if c != 3:
            raise ValueError(f"calibration batches have 3 channels, got shape {self.shape}")
        self._files: list[Path] = []
        self._tensor: Tensor | None = None
        if isinstance(source, Tensor):
            if source.dim() != 4 or source.shape[1] != 3 or source.shape[0] == 0:
                raise ValueError(f"calibration tensor must be [M, 3, H, W] with M >= 1, got {tuple(source.shape)}")
            tensor = source.detach().float().cpu()
            if tuple(tensor.shape[-2:]) != (h, w):
                tensor = torch.nn.functional.interpolate(tensor, size=(h, w), mode="bilinear", align_corners=False)
            self._tensor = tensor[:max_images]
            count = self._tensor.shape[0]
        else:
            from ..images import _IMAGE_SUFFIXES

            folder = Path(source)
            if not folder.is_dir():
                raise FileNotFoundError(f"calibration image folder not found: {folder}")
            self._files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)[:max_images]
            if not self._files:
                raise FileNotFoundError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in {folder}")
            count = len(self._files)
        self.num_images = count
        self.num_batches = -(-count // n)

    def __len__(self) -> int:
        return self.num_batches

    def _image(self, index: int) -> Tensor:
        index %= self.num_images
        if self._tensor is not None:
            return self._tensor[index]
        from ..images import load_image, normalize

        return normalize(load_image(self._files[index]), (self.shape[2], self.shape[3]))

    def __iter__(self) -> Iterator[Tensor]:
        n = self.shape[0]
        for b in range(self.num_batches):
            yield torch.stack([self._image(b * n + i) for i in range(n)]).contiguous()
