"""Training with the paper's protocol (DeepLabv3 §4), resumable and ready for ``torchrun``.

``fastdeeplab.train`` (:func:`fastdeeplab.training.loop.train`) is the function; the package is a few small
modules, each owning one thing:

* :mod:`~fastdeeplab.training.config` — :class:`TrainConfig`, :class:`Stage`, YAML loading and the validation
  of every field;
* :mod:`~fastdeeplab.training.distributed` — the process group, :class:`SyncBatchNorm` (on any device),
  the resumable sharded :class:`ResumableBatchSampler`, RNG state;
* :mod:`~fastdeeplab.training.samples` — bootstrapped indices, per-sample seeded augmentation, label check;
* :mod:`~fastdeeplab.training.checkpoint` — checkpoint contents, atomic writes, resume checks;
* :mod:`~fastdeeplab.training.loop` — the loss, one step, one stage, :func:`train`;
* :mod:`~fastdeeplab.training.recipes` — :func:`overfit_demo`;
* :mod:`~fastdeeplab.training.cli` — ``fastdeeplab train``.

>>> import fastdeeplab
>>> result = fastdeeplab.train("configs/voc_resnet50_paper.yaml", data_root="VOCdevkit")   # doctest: +SKIP
"""

from __future__ import annotations

from .cli import configure_parser, run
from .config import PAPER_STAGES, Stage, TrainConfig, load_config
from .distributed import ResumableBatchSampler, SyncBatchNorm, convert_sync_batchnorm
from .loop import TrainResult, freeze_batchnorm, segmentation_loss, train, train_step
from .recipes import OVERFIT_STAGES, overfit_demo
from .samples import bootstrap_indices

__all__ = [
    "OVERFIT_STAGES",
    "PAPER_STAGES",
    "ResumableBatchSampler",
    "Stage",
    "SyncBatchNorm",
    "TrainConfig",
    "TrainResult",
    "bootstrap_indices",
    "configure_parser",
    "convert_sync_batchnorm",
    "freeze_batchnorm",
    "load_config",
    "overfit_demo",
    "run",
    "segmentation_loss",
    "train",
    "train_step",
]
