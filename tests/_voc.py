"""Tiny datasets on disk for the data, evaluation, training and prediction tests.

The generator itself lives in :mod:`fastdeeplab.data.synthetic` (the overfit demo uses it too); this module
only fixes the small sizes the tests run at and a training config that takes seconds on two CPU cores.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fastdeeplab.data import write_voc_dataset

__all__ = ["NUM_CLASSES", "SIZE", "make_voc", "single_thread", "tiny_train_config"]

NUM_CLASSES = 3
SIZE = 33  # the smallest odd size a ResNet-50 at output stride 16 handles comfortably (3x3 features)


def make_voc(root: Path, num_images: int = 4, size: Any = (SIZE, SIZE), num_classes: int = NUM_CLASSES,
             **kwargs: Any) -> Path:
    """Write a tiny synthetic dataset in PASCAL VOC layout under ``root`` (``train``/``val`` list every image)."""
    return write_voc_dataset(root, num_images, size, num_classes, **kwargs)


def tiny_train_config(data_root: Path, out_dir: Path | None, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for :func:`fastdeeplab.train` at test scale: 33 px crops, batch 2, no workers.

    ``bn_momentum`` is 0.1 (not the paper's 3e-4) so that running statistics move within a few steps.
    """
    config: dict[str, Any] = dict(
        dataset="voc", data_root=str(data_root), train_split="train", num_classes=NUM_CLASSES,
        crop_size=SIZE, scale_range=(0.75, 1.25), batch_size=2, num_workers=0, bn_momentum=0.1,
        stages=[{"iterations": 2, "lr": 0.01, "output_stride": 16}],
        out_dir=str(out_dir) if out_dir is not None else None, checkpoint_every=0, progress=False, log_every=0,
    )
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """Run a test module with one intra-op thread, then restore the previous count.

    A ResNet-50 on 33-pixel inputs has too little work per layer to split across threads; on a shared
    two-core machine the OpenMP threads of several busy processes spin against each other and one thread
    measured up to ten times faster than two.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
