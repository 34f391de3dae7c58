"""Training with the paper's protocol (DeepLabv3 §4), resumable and ready for ``torchrun``.

The recipe, all set by :class:`TrainConfig` (defaults in brackets):

* SGD, momentum 0.9, "poly" learning rate ``lr * (1 - it / max_it) ** 0.9`` restarted at every stage;
* weight decay [1e-4] on convolution weights only (biases and BN parameters are not decayed, as in the
  paper's TensorFlow code). The paper's code base defaults to 4e-5, tuned for its Xception and MobileNet
  backbones; its ResNet argument scope and torchvision's reference scripts use 1e-4 for ResNet;
* cross-entropy on the logits upsampled to the crop (``ignore_index=255``), plus ``aux_weight`` [0.5] times
  the same loss on torchvision's auxiliary head when ``aux_loss`` is on;
* the paper's augmentation: random scale in [0.5, 2.0], pad and random 513×513 crop, random flip;
* two stages [paper]: 30K iterations at output stride 16, lr 0.007, batch norm trained with decay 0.9997
  (``bn_momentum = 1 - 0.9997`` in PyTorch's convention); then 30K iterations at output stride 8,
  lr 0.001, batch norm frozen (BN layers in eval mode, their affine parameters not trained, running
  statistics unchanged);
* hard-class bootstrapping: images that contain any of ``bootstrap_classes`` appear ``bootstrap_factor``
  times per epoch (the paper duplicates images with bicycle, chair, table, potted plant and sofa);
* multi-grid (1, 2, 4) in block4, the paper's best setting.

Checkpoints (``out_dir/checkpoint.pt``, written atomically every ``checkpoint_every`` iterations, at the end
of every stage and when the run stops) hold the model, optimizer, scheduler, iteration, stage, the RNG
state of every process and the loss history: only tensors, numbers, strings, lists and dicts, so they load
with ``torch.load(..., weights_only=True)``. A new run with the same ``out_dir`` resumes exactly where the
last one stopped. Exactness holds because nothing random depends on the process: the order of samples is
a function of ``(seed, stage, epoch)`` and each sample's augmentation is drawn from its own generator,
seeded from ``(seed, stage, epoch, rank, position)``, so data-loading workers and restarts do not change
the stream. ``out_dir/model_final.pt`` holds the trained weights and the model's build arguments.

Distributed: under ``torchrun --nproc_per_node=N`` each process trains on its shard
(``DistributedSampler``, ``drop_last``) with ``batch_size`` images, under ``DistributedDataParallel``
(NCCL on GPUs, Gloo on CPUs); batch norm is synchronised across processes (``torch.nn.SyncBatchNorm`` on
GPUs, :class:`SyncBatchNorm` on CPUs, where PyTorch's does not run). Progress bars, logs and checkpoints come from rank 0.

>>> import fastdeeplab
>>> result = fastdeeplab.train("configs/voc_resnet50_paper.yaml", data_root="VOCdevkit")   # doctest: +SKIP
>>> result.history["loss"][-1]                                                              # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .._io import atomic_path
from ..data.palette import IGNORE_INDEX

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
]

logger = logging.getLogger("fastdeeplab.training")

CHECKPOINT_NAME = "checkpoint.pt"
FINAL_WEIGHTS_NAME = "model_final.pt"
_CHECKPOINT_FORMAT = 1


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class Stage:
    """One stage of the schedule: ``iterations`` at ``output_stride``, poly LR starting at ``lr``.

    ``freeze_bn`` puts every BN layer in eval mode and stops training its affine parameters, so running
    statistics stay as they are. ``split`` overrides :attr:`TrainConfig.train_split` for this stage (the
    paper fine-tunes its test-set model on VOC ``trainval`` in stage 2).
    """

    iterations: int
    lr: float
    output_stride: int = 16
    freeze_bn: bool = False
    split: str | None = None


PAPER_STAGES = (
    Stage(iterations=30_000, lr=0.007, output_stride=16, freeze_bn=False),
    Stage(iterations=30_000, lr=0.001, output_stride=8, freeze_bn=True),
)


@dataclass
class TrainConfig:
    """Everything a run needs; every field can be set from YAML (see ``configs/``) or as a keyword.

    ``batch_size`` is per process: ``torchrun --nproc_per_node=2`` with ``batch_size: 8`` reproduces the
    paper's batch of 16.
    """

    # data
    dataset: str = "voc"
    data_root: str | None = None
    train_split: str = "train_aug"
    val_split: str | None = None
    crop_size: int = 513
    scale_range: tuple[float, float] = (0.5, 2.0)
    scale_step: float = 0.0
    flip: bool = True
    batch_size: int = 16
    num_workers: int = 4
    bootstrap_classes: tuple[int, ...] = ()
    bootstrap_factor: int = 2
    # model
    model: str = "deeplabv3_resnet50"
    num_classes: int | None = None
    aux_loss: bool = False
    aux_weight: float = 0.5
    multi_grid: tuple[int, ...] = (1, 2, 4)
    weights: str | None = None
    weights_backbone: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # optimisation
    stages: list[Stage] = field(default_factory=lambda: [dataclasses.replace(s) for s in PAPER_STAGES])
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    bn_momentum: float = 1 - 0.9997
    # run
    out_dir: str | None = "runs/deeplabv3"
    checkpoint_every: int = 1000
    resume: bool = True
    stop_after: int | None = None
    seed: int = 0
    device: str | None = None
    log_every: int = 20
    progress: bool = True

    def __post_init__(self) -> None:
        self.stages = [s if isinstance(s, Stage) else Stage(**_known(Stage, s, "stage")) for s in self.stages]
        self.scale_range = tuple(float(s) for s in self.scale_range)  # type: ignore[assignment]
        self.multi_grid = tuple(int(r) for r in self.multi_grid)
        self.bootstrap_classes = tuple(int(c) for c in self.bootstrap_classes)
        self.model_kwargs = dict(self.model_kwargs)
        if not self.stages:
            raise ValueError("the schedule needs at least one stage")
        for i, s in enumerate(self.stages):
            if s.iterations < 1 or s.lr <= 0:
                raise ValueError(f"stage {i}: iterations must be >= 1 and lr > 0, got {s.iterations}, {s.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range must be (min, max) with 0 < min <= max, got {self.scale_range}")
        if self.bootstrap_factor < 1:
            raise ValueError(f"bootstrap_factor must be >= 1, got {self.bootstrap_factor}")

    @property
    def total_iterations(self) -> int:
        return sum(s.iterations for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists, dicts, numbers, strings): storable in a ``weights_only`` checkpoint."""
        def plain(v: Any) -> Any:
            if dataclasses.is_dataclass(v):
                return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {str(k): plain(x) for k, x in v.items()}
            return v
        return plain(self)


def _known(cls: type, values: Mapping[str, Any], what: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {what} option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(names))}")
    return dict(values)


def load_config(config: TrainConfig | Mapping[str, Any] | str | os.PathLike | None = None,
                **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a config object, a mapping or a YAML file, with ``overrides`` on top.

    Unknown keys raise a ``ValueError`` that lists the valid ones.
    """
    if config is None:
        values: dict[str, Any] = {}
    elif isinstance(config, TrainConfig):
        values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    elif isinstance(config, Mapping):
        values = dict(config)
    else:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            import yaml
        except ImportError:
            raise ImportError("YAML configs need PyYAML: pip install 'fastdeeplab[train]'") from None
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ValueError(f"cannot parse config {path}: {exc}") from exc
        if loaded is not None and not isinstance(loaded, Mapping):
            raise ValueError(f"config {path} must hold a mapping of options, got {type(loaded).__name__}")
        values = dict(loaded or {})
    values.update(overrides)
    return TrainConfig(**_known(TrainConfig, values, "training"))


# --------------------------------------------------------------------------------------------------
# Batch norm: synchronised (on any device), frozen
# --------------------------------------------------------------------------------------------------
class _AllReduceSum(torch.autograd.Function):
    """``all_reduce(SUM)`` with a gradient: the backward pass sums the incoming gradients of every rank."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _world_size(group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group or dist.group.WORLD)


class SyncBatchNorm(_BatchNorm):
    """Batch norm synchronised across processes, on any device (used on CPU, with Gloo).

    ``torch.nn.SyncBatchNorm`` runs on GPUs only (and ``DistributedDataParallel`` refuses it on CPU), so
    :func:`convert_sync_batchnorm` uses PyTorch's class on CUDA and this one elsewhere. In training mode with
    more than one process, the batch statistics come from per-channel sums all-reduced across processes
    (one collective per layer, differentiable, shifted by the running mean for accuracy): every process
    normalises with the statistics of the global batch, and running statistics stay identical everywhere.
    Otherwise it is a plain ``BatchNorm``. Parameter and buffer names are those of ``BatchNorm2d``, so
    checkpoints are interchangeable.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or _world_size(self.process_group) == 1:
            return super().forward(input)
        self._check_input_dim(input)
        return self._forward_sync(input)

    def _forward_sync(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shift = (self.running_mean if self.running_mean is not None else x.new_zeros(c)).detach()
        shape = [1, c] + [1] * (x.dim() - 2)
        centred = x - shift.view(shape)
        local = torch.cat([centred.sum(dims), (centred * centred).sum(dims), x.new_full((1,), x.numel() // c)])
        total = _AllReduceSum.apply(local, self.process_group or dist.group.WORLD)
        n = total[-1]
        mean_shifted = total[:c] / n
        var = (total[c:2 * c] / n - mean_shifted * mean_shifted).clamp_min(0)
        mean = shift + mean_shifted
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1  # type: ignore[operator]
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        y = (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None,
                           device: torch.device | str | None = None) -> nn.Module:
    """Replace every BN layer by a synchronised one sharing its parameters and buffers.

    On CUDA (``device``), PyTorch's ``torch.nn.SyncBatchNorm``; elsewhere :class:`SyncBatchNorm`.
    """
    if device is not None and torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm)):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group)
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out


def freeze_batchnorm(model: nn.Module, frozen: bool = True) -> int:
    """Freeze (or unfreeze) every BN layer: eval mode and ``requires_grad=False`` on its affine parameters.

    Frozen layers normalise with their running statistics and never update them. ``model.train()`` puts
    them back in training mode, so call this after it. Returns the number of BN layers.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            count += 1
            if frozen:
                module.eval()
            for p in module.parameters(recurse=False):
                p.requires_grad_(not frozen)
    return count


# --------------------------------------------------------------------------------------------------
# Data: resumable sharded order, per-sample seeded augmentation, bootstrapping
# --------------------------------------------------------------------------------------------------
def _derive_seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless batches of ``(sample index, augmentation seed)`` for one process, from ``start_iteration``.

    Each epoch is ``DistributedSampler(shuffle=True, drop_last=True, seed=…)`` with ``set_epoch(epoch)``
    (so processes see disjoint shards), cut into batches of ``batch_size``; the last incomplete batch is
    dropped. Batch ``k`` of the stream is the same whether the stream starts at 0 or at ``k`` — resuming
    does not replay or skip data. ``stream`` (the stage index) gives each stage its own order.
    """

    def __init__(self, num_samples: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 stream: int = 0, start_iteration: int = 0) -> None:
        per_process = num_samples // world_size
        if per_process < batch_size:
            raise ValueError(f"{num_samples} training samples cannot fill a batch of {batch_size} on each of "
                             f"{world_size} process(es); lower batch_size or add data")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.stream, self.start_iteration = seed, stream, start_iteration
        self.batches_per_epoch = per_process // batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, offset = divmod(self.start_iteration, self.batches_per_epoch)
        order_seed = _derive_seed(self.seed, self.stream) % (2**31)
        while True:
            shard = DistributedSampler(range(self.num_samples), num_replicas=self.world_size, rank=self.rank,  # type: ignore[arg-type]
                                       shuffle=True, seed=order_seed, drop_last=True)
            shard.set_epoch(epoch)
            indices = list(shard)
            for b in range(offset, self.batches_per_epoch):
                batch = indices[b * self.batch_size:(b + 1) * self.batch_size]
                yield [(i, _derive_seed(self.seed, self.stream, epoch, self.rank, b * self.batch_size + j))
                       for j, i in enumerate(batch)]
            offset, epoch = 0, epoch + 1


class _AugmentedSamples(Dataset):
    """``dataset.load(indices[i])`` → ``transform(image, label, generator seeded with seed)``."""

    def __init__(self, dataset: Any, indices: Sequence[int], transform: Any) -> None:
        self.dataset, self.indices, self.transform = dataset, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, Tensor]:
        i, seed = item
        image, label = self.dataset.load(self.indices[i])
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


# --------------------------------------------------------------------------------------------------
# Loss, optimiser
# --------------------------------------------------------------------------------------------------
def _cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    if not bool((labels != ignore_index).any()):
        return logits.sum() * 0.0  # every pixel ignored: zero loss, but every parameter still gets a gradient
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)


def segmentation_loss(outputs: Mapping[str, Tensor], labels: Tensor, *, aux_weight: float = 0.5,
                      ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Pixel-wise cross-entropy of ``outputs["out"]`` (``[N, K, H, W]``, upsampled to the labels' size if
    needed) against ``labels`` (``[N, H, W]`` int64), averaged over non-ignored pixels, plus
    ``aux_weight`` times the same loss of ``outputs["aux"]`` when present."""
    loss = _cross_entropy(outputs["out"], labels, ignore_index)
    if "aux" in outputs and aux_weight:
        loss = loss + aux_weight * _cross_entropy(outputs["aux"], labels, ignore_index)
    return loss


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                (no_decay if isinstance(module, _BatchNorm) or p.dim() <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------
@dataclass
class _Context:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _setup_processes(device: str | None) -> _Context:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None and world_size > 1:
            dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size == 1 and not dist.is_initialized():
        return _Context(0, 1, dev, False)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(hours=2))
        owns = True
    return _Context(dist.get_rank(), dist.get_world_size(), dev, owns)


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What :func:`train` returns on every process.

    ``history`` holds one entry per iteration since the start of training (resumed runs included):
    ``iteration`` (1-based), ``stage``, ``loss`` (averaged over processes), ``lr`` (used for that step)
    and ``seconds`` (wall time of the step).
    """

    model: nn.Module
    config: TrainConfig
    iteration: int
    finished: bool
    history: dict[str, list[float]]
    evaluations: list[dict[str, Any]]
    checkpoint: Path | None
    final_weights: Path | None


def _model_config(cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    kwargs = {"num_classes": num_classes, "aux_loss": cfg.aux_loss, "multi_grid": list(cfg.multi_grid),
              **cfg.model_kwargs}
    return {"name": cfg.model, "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}


def _build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    from ..hub import get_model

    return get_model(cfg.model, num_classes=num_classes, aux_loss=cfg.aux_loss, multi_grid=cfg.multi_grid,
                     output_stride=cfg.stages[0].output_stride, weights=cfg.weights,
                     weights_backbone=cfg.weights_backbone, **cfg.model_kwargs)


def _save(path: Path, state: Mapping[str, Any]) -> None:
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(dict(state), tmp)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot resume from {path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"cannot resume from {path}: not a fastdeeplab training checkpoint")
    return state


def train(config: TrainConfig | Mapping[str, Any] | str | os.PathLike | None = None, /,
          **overrides: Any) -> TrainResult:
    """Train a DeepLabv3 with the paper's protocol; see the module docstring and :class:`TrainConfig`.

    ``config`` is a :class:`TrainConfig`, a mapping or a YAML file; keyword ``overrides`` replace its
    fields. Run it as is for one process, or under ``torchrun`` for data-parallel training. With
    ``out_dir`` set and ``resume`` true, an existing ``out_dir/checkpoint.pt`` is resumed exactly.
    ``stop_after=N`` stops after ``N`` iterations of this run (with a checkpoint), e.g. to fit a job into
    a time slot; the next run resumes.

    >>> result = train(data_root="data/voc", num_classes=21, out_dir="runs/voc")      # doctest: +SKIP
    """
    cfg = load_config(config, **overrides)
    ctx = _setup_processes(cfg.device)
    try:
        return _train(cfg, ctx)
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, ctx: _Context) -> TrainResult:
    from tqdm.auto import tqdm

    from ..data import build_dataset, train_transform
    from ..evaluation import evaluate

    if cfg.data_root is None:
        raise ValueError("data_root is not set: give the dataset's root folder (--data on the command line)")
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    checkpoint_path = out_dir / CHECKPOINT_NAME if out_dir else None
    datasets: dict[str, Any] = {}

    def dataset(split: str) -> Any:
        if split not in datasets:
            datasets[split] = build_dataset(cfg.dataset, cfg.data_root, split)  # type: ignore[arg-type]
        return datasets[split]

    num_classes = cfg.num_classes or dataset(cfg.train_split).num_classes
    torch.manual_seed(cfg.seed)  # identical initialisation on every process
    model = _build_model(cfg, num_classes)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.momentum = cfg.bn_momentum
    if ctx.world_size > 1:
        model = convert_sync_batchnorm(model, device=ctx.device)
    model.to(ctx.device)
    torch.manual_seed(_derive_seed(cfg.seed, 1, ctx.rank))  # dropout etc. differ across processes

    history: dict[str, list[float]] = {"iteration": [], "stage": [], "loss": [], "lr": [], "seconds": []}
    evaluations: list[dict[str, Any]] = []
    start_stage, start_in_stage, iteration = 0, 0, 0
    resumed: dict[str, Any] | None = None
    if checkpoint_path is not None and cfg.resume and checkpoint_path.is_file():
        resumed = _load_checkpoint(checkpoint_path)
        saved_stages = resumed["config"]["stages"]
        if saved_stages != cfg.to_dict()["stages"]:
            raise ValueError(f"cannot resume from {checkpoint_path}: its schedule {saved_stages} differs from this "
                             f"config's {cfg.to_dict()['stages']}; use another out_dir or resume=False")
        model.load_state_dict(resumed["model"])
        start_stage, start_in_stage = int(resumed["stage"]), int(resumed["stage_iteration"])
        iteration = int(resumed["iteration"])
        history = {k: list(v) for k, v in resumed["history"].items()}
        evaluations = list(resumed.get("evaluations", []))
        if ctx.is_main:
            logger.info("resuming from %s at iteration %d (stage %d, step %d)", checkpoint_path, iteration,
                        start_stage + 1, start_in_stage)

    def checkpoint(stage_index: int, in_stage: int, optimizer: Any, scheduler: Any) -> None:
        if checkpoint_path is None:
            return
        rng = [_rng_state(ctx.device)]
        if ctx.world_size > 1:
            gathered: list[Any] = [None] * ctx.world_size
            dist.all_gather_object(gathered, {k: v.cpu() for k, v in rng[0].items()})
            rng = gathered
        if ctx.is_main:
            _save(checkpoint_path, {
                "format": _CHECKPOINT_FORMAT,
                "model": _unwrap(model).state_dict(),
                "model_config": _model_config(cfg, num_classes),
                "optimizer": optimizer.state_dict() if optimizer is not None else {},
                "scheduler": scheduler.state_dict() if scheduler is not None else {},
                "iteration": iteration, "stage": stage_index, "stage_iteration": in_stage,
                "finished": iteration == cfg.total_iterations,
                "rng": rng, "world_size": ctx.world_size,
                "config": cfg.to_dict(), "history": history, "evaluations": evaluations,
            })
        ctx.barrier()

    ran = 0
    stopped = False
    for stage_index in range(start_stage, len(cfg.stages)):
        stage = cfg.stages[stage_index]
        first = start_in_stage if stage_index == start_stage else 0
        net = _unwrap(model)
        if hasattr(net, "set_output_stride"):
            net.set_output_stride(stage.output_stride)
        freeze_batchnorm(net, stage.freeze_bn)
        optimizer = torch.optim.SGD(_param_groups(net, cfg.weight_decay), lr=stage.lr, momentum=cfg.momentum)
        scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=stage.iterations,
                                                          power=cfg.poly_power)
        if resumed is not None and stage_index == start_stage and first > 0:
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["scheduler"])
        if ctx.world_size > 1:
            ddp_kwargs: dict[str, Any] = {"broadcast_buffers": False}  # SyncBatchNorm keeps buffers in step
            if ctx.device.type == "cuda":
                ddp_kwargs["device_ids"] = [ctx.device.index]
            model = nn.parallel.DistributedDataParallel(net, **ddp_kwargs)
        else:
            model = net
        split = stage.split or cfg.train_split
        base = dataset(split)
        indices = bootstrap_indices(base, cfg.bootstrap_classes, cfg.bootstrap_factor,
                                    progress=cfg.progress and ctx.is_main)
        samples = _AugmentedSamples(base, indices, train_transform(cfg.crop_size, cfg.scale_range, cfg.flip,
                                                                   cfg.scale_step))
        sampler = ResumableBatchSampler(len(samples), cfg.batch_size, rank=ctx.rank, world_size=ctx.world_size,
                                        seed=cfg.seed, stream=stage_index, start_iteration=first)
        loader = DataLoader(samples, batch_sampler=sampler, num_workers=cfg.num_workers,
                            pin_memory=ctx.device.type == "cuda", generator=torch.Generator())
        if resumed is not None and stage_index == start_stage:
            states = resumed["rng"]
            if len(states) == ctx.world_size:
                _set_rng_state(states[ctx.rank], ctx.device)
            elif ctx.is_main:
                logger.warning("checkpoint was written by %d processes, this run has %d: random streams restart",
                               len(states), ctx.world_size)
        model.train()
        freeze_batchnorm(net, stage.freeze_bn)
        if ctx.is_main:
            logger.info("stage %d/%d: %d iterations at output stride %d, lr %g, batch norm %s, split %s, "
                        "%d samples x %d process(es)", stage_index + 1, len(cfg.stages), stage.iterations,
                        stage.output_stride, stage.lr, "frozen" if stage.freeze_bn else "trained", split,
                        len(samples), ctx.world_size)
        bar = tqdm(total=stage.iterations, initial=first, desc=f"stage {stage_index + 1}/{len(cfg.stages)}",
                   disable=not (cfg.progress and ctx.is_main), dynamic_ncols=True, unit="it")
        batches = iter(loader)
        for in_stage in range(first, stage.iterations):
            tick = time.perf_counter()
            images, labels = next(batches)
            images = images.to(ctx.device, non_blocking=True)
            labels = labels.to(ctx.device, non_blocking=True)
            lr = optimizer.param_groups[0]["lr"]
            loss = segmentation_loss(model(images), labels, aux_weight=cfg.aux_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            value = loss.detach().clone()
            if ctx.world_size > 1:
                dist.all_reduce(value)
                value /= ctx.world_size
            loss_value = float(value)
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at iteration {iteration + 1}; lower the learning rate")
            iteration += 1
            ran += 1
            seconds = time.perf_counter() - tick
            for key, v in (("iteration", iteration), ("stage", stage_index), ("loss", loss_value), ("lr", lr),
                           ("seconds", seconds)):
                history[key].append(v)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if ctx.is_main and cfg.log_every and (in_stage + 1) % cfg.log_every == 0:
                recent = history["loss"][-cfg.log_every:]
                logger.info("it %d/%d (stage %d, %d/%d) loss %.4f (mean of last %d %.4f) lr %.3e %.3f s/it",
                            iteration, cfg.total_iterations, stage_index + 1, in_stage + 1, stage.iterations,
                            loss_value, len(recent), sum(recent) / len(recent), lr, seconds)
            done_stage = in_stage + 1 == stage.iterations
            stopped = cfg.stop_after is not None and ran >= cfg.stop_after and not done_stage
            if done_stage:
                break
            if stopped or (cfg.checkpoint_every and iteration % cfg.checkpoint_every == 0):
                checkpoint(stage_index, in_stage + 1, optimizer, scheduler)
            if stopped:
                break
        bar.close()
        del batches
        if stopped:
            break
        if cfg.val_split and ctx.is_main:
            scores = evaluate(net, dataset(cfg.val_split), device=ctx.device, progress=cfg.progress)
            evaluations.append({"stage": stage_index, "iteration": iteration, "split": cfg.val_split,
                                "output_stride": stage.output_stride, "mIoU": scores["mIoU"],
                                "pixel_accuracy": scores["pixel_accuracy"]})
            logger.info("stage %d: %s mIoU %.4f at output stride %d", stage_index + 1, cfg.val_split,
                        scores["mIoU"], stage.output_stride)
        checkpoint(stage_index + 1, 0, None, None)  # stage boundary: the next stage builds a new optimizer
        if cfg.stop_after is not None and ran >= cfg.stop_after and stage_index + 1 < len(cfg.stages):
            stopped = True
            break

    net = _unwrap(model)
    finished = iteration == cfg.total_iterations
    final_path = None
    if out_dir is not None and ctx.is_main:
        if finished:
            final_path = out_dir / FINAL_WEIGHTS_NAME
            _save(final_path, {"model": net.state_dict(), "model_config": _model_config(cfg, num_classes)})
        with atomic_path(out_dir / "history.json") as tmp:
            tmp.write_text(json.dumps({"history": history, "evaluations": evaluations}) + "\n")
    ctx.barrier()
    if ctx.is_main:
        logger.info("%s at iteration %d/%d", "finished" if finished else "stopped", iteration, cfg.total_iterations)
    return TrainResult(model=net, config=cfg, iteration=iteration, finished=finished, history=history,
                       evaluations=evaluations, checkpoint=checkpoint_path, final_weights=final_path)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# --------------------------------------------------------------------------------------------------
# The overfit demo: proof that the loop learns
# --------------------------------------------------------------------------------------------------
OVERFIT_STAGES = (
    Stage(iterations=100, lr=0.02, output_stride=16, freeze_bn=False),
    Stage(iterations=60, lr=0.005, output_stride=8, freeze_bn=True),
)


def overfit_demo(out_dir: str | os.PathLike = "runs/overfit_demo", *, num_images: int = 8, image_size: int = 64,
                 num_classes: int = 3, stages: Sequence[Stage | Mapping[str, Any]] = OVERFIT_STAGES,
                 batch_size: int = 8, bn_momentum: float = 0.1, device: str | None = None, seed: int = 0,
                 progress: bool = True) -> dict[str, Any]:
    """Train a ResNet-50 DeepLabv3 from scratch on ``num_images`` synthetic images, then score it on them.

    Writes the images in VOC layout under ``out_dir/data`` (:func:`fastdeeplab.data.write_voc_dataset`),
    runs the paper's two-stage protocol on them through :func:`train` (stage 1 at output stride 16 with
    batch norm trained, stage 2 at output stride 8 with batch norm frozen; crop = image size, no scale
    jitter, random flips) and evaluates with :func:`fastdeeplab.evaluate` in eval mode at the last stage's
    output stride. ``stages`` replaces the schedule (:data:`OVERFIT_STAGES`).
    ``bn_momentum`` is 0.1 rather than the paper's 0.0003: running statistics must catch up within a
    hundred iterations, not thirty thousand. Returns (and writes to ``out_dir/overfit.json``) the mIoU,
    the loss curve's endpoints and timings.
    """
    import platform

    from ..data import VOCSegmentation, write_voc_dataset
    from ..evaluation import evaluate

    out = Path(out_dir)
    data_root = write_voc_dataset(out / "data", num_images, (image_size, image_size), num_classes, seed=seed)
    stages = [dataclasses.replace(s) if isinstance(s, Stage) else Stage(**s) for s in stages]
    start = time.perf_counter()
    result = train(dataset="voc", data_root=str(data_root), train_split="train", num_classes=num_classes,
                   crop_size=image_size, scale_range=(1.0, 1.0), batch_size=batch_size, num_workers=0,
                   stages=stages, bn_momentum=bn_momentum, out_dir=str(out / "run"), checkpoint_every=0,
                   resume=False, seed=seed, device=device, progress=progress, log_every=10)
    train_seconds = time.perf_counter() - start
    result.model.set_output_stride(stages[-1].output_stride)
    scores = evaluate(result.model, VOCSegmentation(data_root, "val"), progress=False)
    losses = result.history["loss"]
    summary = {
        "mIoU": scores["mIoU"],
        "per_class_iou": scores["per_class_iou"],
        "pixel_accuracy": scores["pixel_accuracy"],
        "eval_output_stride": stages[-1].output_stride,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_first5_mean": sum(losses[:5]) / len(losses[:5]),
        "loss_last5_mean": sum(losses[-5:]) / len(losses[-5:]),
        "iterations": [s.iterations for s in stages],
        "lr": [s.lr for s in stages],
        "num_images": num_images, "image_size": image_size, "num_classes": num_classes,
        "batch_size": batch_size, "train_seconds": train_seconds, "eval_seconds": scores["seconds"],
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "device": str(next(result.model.parameters()).device)},
    }
    with atomic_path(out / "overfit.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# --------------------------------------------------------------------------------------------------
# Command line: fastdeeplab train
# --------------------------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fastdeeplab train``; options given override the ``--config`` file."""
    parser.add_argument("--config", metavar="FILE", help="YAML config (see configs/); options below override it")
    parser.add_argument("--data", dest="data_root", metavar="ROOT", help="dataset root folder")
    parser.add_argument("--dataset", choices=("voc", "cityscapes"), default=None)
    parser.add_argument("--out", dest="out_dir", metavar="DIR", help="checkpoints and logs (resumed if present)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per process and iteration")
    parser.add_argument("--crop-size", type=int, default=None)
    parser.add_argument("--workers", dest="num_workers", type=int, default=None, help="data loading processes")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--weights-backbone", default=None,
                        help="ImageNet backbone weights: torchvision name (ResNet50_Weights.IMAGENET1K_V1) or file")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-resume", dest="resume", action="store_false", default=None,
                        help="start afresh even if OUT holds a checkpoint")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="stop (with a checkpoint) after N iterations of this run")
    parser.add_argument("--set", dest="set_values", action="append", default=[], metavar="KEY=VALUE",
                        help="any config field, value in YAML syntax, e.g. --set 'bootstrap_classes=[2, 9]'")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    parser.add_argument("--overfit-demo", action="store_true",
                        help="train on 8 synthetic images and report the mIoU on them (writes to --out)")


def _parse_value(text: str) -> Any:
    try:
        import yaml

        return yaml.safe_load(text)
    except ImportError:
        import ast

        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text


class _TqdmLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def _configure_logging() -> None:
    if not logger.handlers:
        handler = _TqdmLogHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def run(args: argparse.Namespace) -> int:
    _configure_logging()
    if args.overfit_demo:
        summary = overfit_demo(args.out_dir or "runs/overfit_demo", device=args.device,
                               progress=args.progress is not False)
        print(json.dumps(summary, indent=2))
        return 0 if summary["mIoU"] >= 0.9 else 1
    overrides: dict[str, Any] = {}
    for key in ("data_root", "dataset", "out_dir", "batch_size", "crop_size", "num_workers", "num_classes",
                "weights_backbone", "device", "seed", "resume", "stop_after", "progress"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    for item in args.set_values:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = _parse_value(text)
    result = train(args.config, **overrides)
    if int(os.environ.get("RANK", "0")) == 0:
        losses = result.history["loss"]
        print(json.dumps({"iteration": result.iteration, "finished": result.finished,
                          "loss_last": losses[-1] if losses else None, "evaluations": result.evaluations,
                          "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                          "final_weights": str(result.final_weights) if result.final_weights else None}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    from ..cli import main

    raise SystemExit(main(["train", *sys.argv[1:]]))
