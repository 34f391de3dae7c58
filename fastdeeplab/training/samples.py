"""What the loop trains on: bootstrapped sample indices, per-sample seeded augmentation, and the label check.

* :func:`bootstrap_indices` is the paper's hard-class bootstrapping: images that contain any of the given
  classes appear ``factor`` times per epoch.
* :class:`AugmentedSamples` loads sample ``i`` and augments it with a generator seeded from the batch
  sampler (:class:`fastdeeplab.training.distributed.ResumableBatchSampler`), so augmentation does not depend
  on the process or the data-loading worker.
* :func:`out_of_range_labels` finds class ids a batch holds that the model cannot predict, so that the loop
  stops with one line naming them and ``num_classes`` instead of a traceback from the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..metrics import IGNORE_INDEX

__all__ = ["AugmentedSamples", "bootstrap_indices", "out_of_range_labels"]


class AugmentedSamples(Dataset):
    """``dataset.load(indices[i])`` → ``transform(image, label, generator seeded with seed)``.

    With ``num_classes``, a label holding class ids outside ``0 .. num_classes - 1`` (other than the ignore
    value) raises a ``ValueError`` naming its file (``dataset.label_path``), before the loss sees it."""

    def __init__(self, dataset: Any, indices: Sequence[int], transform: Any, num_classes: int | None = None) -> None:
        self.dataset, self.indices, self.transform = dataset, list(indices), transform
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, Tensor]:
        i, seed = item
        image, label = self.dataset.load(self.indices[i])
        if self.num_classes is not None:
            bad = out_of_range_labels(torch.from_numpy(np.asarray(label)), self.num_classes)
            if bad:
                where = getattr(self.dataset, "label_path", None)
                name = where(self.indices[i]) if callable(where) else f"sample {self.indices[i]}"
                raise ValueError(f"label {name} holds class ids {bad} outside 0..{self.num_classes - 1} "
                                 f"(num_classes={self.num_classes}; {IGNORE_INDEX} marks ignored pixels): set "
                                 "num_classes (--num-classes) to cover them, or map the labels to train ids")
        return self.transform(image, label, generator=torch.Generator().manual_seed(seed))


def bootstrap_indices(dataset: Any, classes: Sequence[int], factor: int = 2, *, progress: bool = False) -> list[int]:
    """Sample indices in which every image containing any of ``classes`` appears ``factor`` times.

    The paper's hard-example bootstrapping (§4.1): duplicating images with rare, hard classes. Reads each
    label once (``dataset.load_label(i)``, a ``[H, W]`` class map).
    """
    indices = list(range(len(dataset)))
    if not classes or factor == 1:
        return indices
    from tqdm.auto import tqdm

    wanted = np.asarray(sorted(set(classes)))
    extra: list[int] = []
    for i in tqdm(indices, desc="bootstrap scan", disable=not progress, unit="label"):
        if np.isin(wanted, dataset.load_label(i)).any():
            extra += [i] * (factor - 1)
    return indices + extra


def out_of_range_labels(labels: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX,
                        limit: int = 10) -> list[int]:
    """Up to ``limit`` distinct class ids in ``labels`` outside ``0 .. num_classes - 1`` other than
    ``ignore_index`` (sorted); empty when every label is usable."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if not bool(bad.any()):
        return []
    return [int(v) for v in labels[bad].unique()[:limit].tolist()]
