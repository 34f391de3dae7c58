"""The training loop: :func:`train`, one stage (:func:`run_stage`), one step (:func:`train_step`), the loss.

The recipe (DeepLabv3 §4), all set by :class:`~fastdeeplab.training.config.TrainConfig`:

* SGD, momentum 0.9, "poly" learning rate ``lr * (1 - it / max_it) ** 0.9`` restarted at every stage;
* weight decay [1e-4] on convolution weights only (biases and BN parameters are not decayed, as in the
  paper's TensorFlow code). The paper's code base defaults to 4e-5, tuned for its Xception and MobileNet
  backbones; its ResNet argument scope and torchvision's reference scripts use 1e-4 for ResNet;
* cross-entropy on the logits upsampled to the crop (``ignore_index=255``), plus ``aux_weight`` [0.5] times
  the same loss on torchvision's auxiliary head when ``aux_loss`` is on (:func:`segmentation_loss`);
* the paper's augmentation: random scale in [0.5, 2.0], pad and random 513×513 crop, random flip;
* two stages [paper]: 30K iterations at output stride 16, lr 0.007, batch norm trained with decay 0.9997
  (``bn_momentum = 1 - 0.9997`` in PyTorch's convention); then 30K iterations at output stride 8,
  lr 0.001, batch norm frozen (:func:`freeze_batchnorm`: BN layers in eval mode, their affine parameters
  not trained, running statistics unchanged);
* hard-class bootstrapping: images that contain any of ``bootstrap_classes`` appear ``bootstrap_factor``
  times per epoch (the paper duplicates images with bicycle, chair, table, potted plant and sofa);
* multi-grid (1, 2, 4) in block4, the paper's best setting.

Checkpoints (``out_dir/checkpoint.pt``, see :mod:`fastdeeplab.training.checkpoint`) are written every
``checkpoint_every`` iterations, at the end of every stage and when the run stops, and hold the model,
optimizer, scheduler, iteration, stage, the RNG state of every process and the loss history. A new run with
the same ``out_dir`` resumes exactly where the last one stopped: the order of samples is a function of
``(seed, stage, epoch)`` and each sample's augmentation is drawn from its own generator, so data-loading
workers and restarts do not change the stream. ``out_dir/model_final.pt`` holds the trained weights and the
model's build arguments.

Bad runs stop with one line, never a traceback from deep inside torch: labels the model cannot predict
(``ValueError`` naming the values and ``num_classes``), a non-finite loss or non-finite weights
(``RuntimeError``; no checkpoint is written from them).

Distributed: under ``torchrun --nproc_per_node=N`` each process trains on its shard with ``batch_size``
images, under ``DistributedDataParallel``, with batch norm synchronised across processes
(:mod:`fastdeeplab.training.distributed`). Progress bars, logs and checkpoints come from rank 0.

>>> import fastdeeplab
>>> result = fastdeeplab.train("configs/voc_resnet50_paper.yaml", data_root="VOCdevkit")   # doctest: +SKIP
>>> result.history["loss"][-1]                                                              # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from .._io import json_text
from ..data.base import one_line_worker_errors
from ..metrics import IGNORE_INDEX
from ..timing import time_call
from . import checkpoint as ckpt
from .config import TrainConfig, check_runnable, load_config
from .distributed import (
    ProcessContext,
    ResumableBatchSampler,
    convert_sync_batchnorm,
    derive_seed,
    rng_state,
    set_rng_state,
    setup_processes,
    unwrap,
)
from .samples import AugmentedSamples, bootstrap_indices, out_of_range_labels

__all__ = ["RunState", "TrainResult", "freeze_batchnorm", "run_stage", "save_checkpoint", "segmentation_loss", "train",
           "train_step"]

logger = logging.getLogger("fastdeeplab.training")


# --------------------------------------------------------------------------------------------------
# Loss, optimiser, batch norm
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
# One run: its state, one step, one stage
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What :func:`train` returns on every process.

    ``history`` holds one entry per iteration since the start of training (resumed runs included):
    ``iteration`` (1-based), ``stage``, ``loss`` (averaged over processes), ``lr`` (used for that step)
    and ``seconds`` (wall time of the step, data loading included).
    """

    model: nn.Module
    config: TrainConfig
    iteration: int
    finished: bool
    history: dict[str, list[float]]
    evaluations: list[dict[str, Any]]
    checkpoint: Path | None
    final_weights: Path | None


@dataclass
class RunState:
    """What a run carries from stage to stage: its config, processes, model (the bare one, never wrapped in
    ``DistributedDataParallel``), datasets by split, history, evaluations and iteration counts."""

    cfg: TrainConfig
    ctx: ProcessContext
    model: nn.Module
    num_classes: int
    checkpoint_path: Path | None
    datasets: dict[str, Any]
    history: dict[str, list[float]] = field(
        default_factory=lambda: {"iteration": [], "stage": [], "loss": [], "lr": [], "seconds": []})
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    iteration: int = 0
    ran: int = 0  # iterations done by this call of train()

    def dataset(self, split: str) -> Any:
        if split not in self.datasets:
            from ..data import build_dataset

            self.datasets[split] = build_dataset(self.cfg.dataset, self.cfg.data_root, split)  # type: ignore[arg-type]
        return self.datasets[split]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, images: Tensor, labels: Tensor,
               *, aux_weight: float, ctx: ProcessContext, iteration: int | None = None) -> float:
    """One SGD step on a batch (``images`` ``[N, 3, H, W]``, ``labels`` ``[N, H, W]``, on ``ctx.device``).

    Returns the loss averaged over processes. A non-finite loss raises ``RuntimeError`` on every process
    before the weights are touched (``iteration``, 1-based, only names the step in the message).
    """
    loss = segmentation_loss(model(images), labels, aux_weight=aux_weight)
    value = ctx.mean(loss)
    if not math.isfinite(value):
        at = f" at iteration {iteration}" if iteration is not None else ""
        raise RuntimeError(f"training diverged: the loss is {value}{at}; the weights were not updated with it; "
                           "lower the learning rate (stages[i].lr) or check the data, then start afresh "
                           "(--no-resume or another --out)")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return value


def _check_labels(run: RunState, labels: Tensor, split: str) -> None:
    bad = out_of_range_labels(labels, run.num_classes)
    if run.ctx.any_true(bool(bad)):
        found = f"class ids {bad}" if bad else "class ids (found by another process)"
        raise ValueError(f"training labels of split {split!r} hold {found} outside 0..{run.num_classes - 1} "
                         f"(num_classes={run.num_classes}; {IGNORE_INDEX} marks ignored pixels): set num_classes "
                         "(--num-classes) to cover them, or map the labels to train ids")


def _fetch_and_step(run: RunState, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    batches: Iterator[tuple[Tensor, Tensor]], split: str, losses: list[float]) -> None:
    """Next batch from ``batches``, its labels checked, one :func:`train_step`; the loss goes to ``losses``."""
    images, labels = next(batches)
    _check_labels(run, labels, split)
    images = images.to(run.ctx.device, non_blocking=True)
    labels = labels.to(run.ctx.device, non_blocking=True)
    losses.append(train_step(model, optimizer, scheduler, images, labels, aux_weight=run.cfg.aux_weight,
                             ctx=run.ctx, iteration=run.iteration + 1))


def save_checkpoint(run: RunState, stage_index: int, in_stage: int, optimizer: Any, scheduler: Any) -> None:
    """Write ``checkpoint.pt`` (rank 0), with the RNG state of every process; refuse non-finite weights."""
    if run.checkpoint_path is None:
        return
    ckpt.check_finite_weights(run.model, iteration=run.iteration, path=run.checkpoint_path)
    rng = [rng_state(run.ctx.device)]
    if run.ctx.world_size > 1:
        gathered: list[Any] = [None] * run.ctx.world_size
        dist.all_gather_object(gathered, {k: v.cpu() for k, v in rng[0].items()})
        rng = gathered
    if run.ctx.is_main:
        ckpt.write_state(run.checkpoint_path, {
            "format": ckpt.FORMAT,
            "model": run.model.state_dict(),
            "model_config": ckpt.model_config(run.cfg, run.num_classes),
            "optimizer": optimizer.state_dict() if optimizer is not None else {},
            "scheduler": scheduler.state_dict() if scheduler is not None else {},
            "iteration": run.iteration, "stage": stage_index, "stage_iteration": in_stage,
            "finished": run.iteration == run.cfg.total_iterations,
            "rng": rng, "world_size": run.ctx.world_size,
            "data_sizes": {split: len(ds) for split, ds in run.datasets.items()},
            "config": run.cfg.to_dict(), "history": run.history, "evaluations": run.evaluations,
        })
    run.ctx.barrier()


def _loader(run: RunState, stage_index: int, split: str, first: int) -> DataLoader:
    from ..data import train_transform

    cfg, ctx = run.cfg, run.ctx
    base = run.dataset(split)
    indices = bootstrap_indices(base, cfg.bootstrap_classes, cfg.bootstrap_factor,
                                progress=cfg.progress and ctx.is_main)
    samples = AugmentedSamples(base, indices, train_transform(cfg.crop_size, cfg.scale_range, cfg.flip,
                                                              cfg.scale_step), num_classes=run.num_classes)
    sampler = ResumableBatchSampler(len(samples), cfg.batch_size, rank=ctx.rank, world_size=ctx.world_size,
                                    seed=cfg.seed, stream=stage_index, start_iteration=first)
    return DataLoader(samples, batch_sampler=sampler, num_workers=cfg.num_workers,
                      pin_memory=ctx.device.type == "cuda", generator=torch.Generator())


def run_stage(run: RunState, stage_index: int, first: int = 0, resumed: Mapping[str, Any] | None = None) -> bool:
    """Train stage ``stage_index`` from its step ``first`` (``resumed``: the checkpoint to continue from).

    Evaluates on ``val_split`` at the end and writes the stage-boundary checkpoint. Returns whether the run
    stopped early (``stop_after``), in which case a checkpoint was written where it stopped.
    """
    from tqdm.auto import tqdm

    cfg, ctx, net = run.cfg, run.ctx, run.model
    stage = cfg.stages[stage_index]
    if hasattr(net, "set_output_stride"):
        net.set_output_stride(stage.output_stride)
    freeze_batchnorm(net, stage.freeze_bn)
    optimizer = torch.optim.SGD(_param_groups(net, cfg.weight_decay), lr=stage.lr, momentum=cfg.momentum)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=stage.iterations, power=cfg.poly_power)
    if resumed is not None and first > 0:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
    model: nn.Module = net
    if ctx.world_size > 1:
        ddp_kwargs: dict[str, Any] = {"broadcast_buffers": False}  # SyncBatchNorm keeps buffers in step
        if ctx.device.type == "cuda":
            ddp_kwargs["device_ids"] = [ctx.device.index]
        model = nn.parallel.DistributedDataParallel(net, **ddp_kwargs)
    split = stage.split or cfg.train_split
    loader = _loader(run, stage_index, split, first)
    if resumed is not None:
        states = resumed["rng"]
        if len(states) == ctx.world_size:
            set_rng_state(states[ctx.rank], ctx.device)
        elif ctx.is_main:
            logger.warning("checkpoint was written by %d processes, this run has %d: random streams restart",
                           len(states), ctx.world_size)
    model.train()
    freeze_batchnorm(net, stage.freeze_bn)
    if ctx.is_main:
        logger.info("stage %d/%d: %d iterations at output stride %d, lr %g, batch norm %s, split %s, "
                    "%d samples x %d process(es)", stage_index + 1, len(cfg.stages), stage.iterations,
                    stage.output_stride, stage.lr, "frozen" if stage.freeze_bn else "trained", split,
                    len(loader.dataset), ctx.world_size)  # type: ignore[arg-type]
    bar = tqdm(total=stage.iterations, initial=first, desc=f"stage {stage_index + 1}/{len(cfg.stages)}",
               disable=not (cfg.progress and ctx.is_main), dynamic_ncols=True, unit="it")
    batches = one_line_worker_errors(loader)  # a worker's error is its one line, not its traceback
    stopped = False
    for in_stage in range(first, stage.iterations):
        lr = optimizer.param_groups[0]["lr"]
        losses: list[float] = []
        seconds = time_call(partial(_fetch_and_step, run, model, optimizer, scheduler, batches, split, losses),
                            ctx.device)
        run.iteration += 1
        run.ran += 1
        for key, v in (("iteration", run.iteration), ("stage", stage_index), ("loss", losses[0]), ("lr", lr),
                       ("seconds", seconds)):
            run.history[key].append(v)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[0]:.4f}", lr=f"{lr:.2e}")
        if ctx.is_main and cfg.log_every and (in_stage + 1) % cfg.log_every == 0:
            recent = run.history["loss"][-cfg.log_every:]
            logger.info("it %d/%d (stage %d, %d/%d) loss %.4f (mean of last %d %.4f) lr %.3e %.3f s/it",
                        run.iteration, cfg.total_iterations, stage_index + 1, in_stage + 1, stage.iterations,
                        losses[0], len(recent), sum(recent) / len(recent), lr, seconds)
        if in_stage + 1 == stage.iterations:
            break
        stopped = cfg.stop_after is not None and run.ran >= cfg.stop_after
        if stopped or (cfg.checkpoint_every and run.iteration % cfg.checkpoint_every == 0):
            save_checkpoint(run, stage_index, in_stage + 1, optimizer, scheduler)
        if stopped:
            break
    bar.close()
    del batches
    if stopped:
        return True
    if cfg.val_split and ctx.is_main:
        from ..evaluation import evaluate

        scores = evaluate(net, run.dataset(cfg.val_split), device=ctx.device, progress=cfg.progress)
        run.evaluations.append({"stage": stage_index, "iteration": run.iteration, "split": cfg.val_split,
                                "output_stride": stage.output_stride, "mIoU": scores["mIoU"],
                                "pixel_accuracy": scores["pixel_accuracy"]})
        logger.info("stage %d: %s mIoU %.4f at output stride %d", stage_index + 1, cfg.val_split,
                    scores["mIoU"], stage.output_stride)
    save_checkpoint(run, stage_index + 1, 0, None, None)  # stage boundary: the next stage builds a new optimizer
    return cfg.stop_after is not None and run.ran >= cfg.stop_after and stage_index + 1 < len(cfg.stages)


# --------------------------------------------------------------------------------------------------
# A whole run
# --------------------------------------------------------------------------------------------------
def _build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    from ..hub import get_model

    return get_model(cfg.model, num_classes=num_classes, aux_loss=cfg.aux_loss, multi_grid=cfg.multi_grid,
                     output_stride=cfg.stages[0].output_stride, weights=cfg.weights,
                     weights_backbone=cfg.weights_backbone, **cfg.model_kwargs)


def _load_resumed(model: nn.Module, state: Mapping[str, Tensor], path: Path) -> None:
    from ..hub import load_checkpoint

    try:
        load_checkpoint(model, state, drop_aux=False)
    except ValueError as exc:
        reason = " ".join(str(exc).split())
        raise ValueError(f"cannot resume from {path}: {reason}; use the checkpoint's model settings, or start "
                         "afresh with another --out (out_dir) or --no-resume (resume=False)") from None


def train(config: TrainConfig | Mapping[str, Any] | str | os.PathLike | None = None, /,
          **overrides: Any) -> TrainResult:
    """Train a DeepLabv3 with the paper's protocol; see the module docstring and :class:`TrainConfig`.

    ``config`` is a :class:`TrainConfig`, a mapping or a YAML file; keyword ``overrides`` replace its
    fields. Run it as is for one process, or under ``torchrun`` for data-parallel training. With
    ``out_dir`` set and ``resume`` true, an existing ``out_dir/checkpoint.pt`` is resumed exactly.
    ``stop_after=N`` stops after ``N`` iterations of this run (with a checkpoint), e.g. to fit a job into
    a time slot; the next run resumes.

    Raises ``TypeError``/``ValueError`` for a bad config, labels outside ``num_classes`` or a checkpoint
    that does not match, ``OSError`` for unusable paths, and ``RuntimeError`` when training diverges.

    >>> result = train(data_root="data/voc", num_classes=21, out_dir="runs/voc")      # doctest: +SKIP
    """
    cfg = load_config(config, **overrides)
    if cfg.data_root is None:
        raise ValueError("data_root is not set: give the dataset's root folder (--data on the command line)")
    inputs = {"weights": cfg.weights, "weights_backbone": cfg.weights_backbone,
              "config": config if isinstance(config, (str, os.PathLike)) else None}
    ctx = setup_processes(cfg.device)
    try:
        return _train(cfg, ctx, inputs)
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


def _start(cfg: TrainConfig, ctx: ProcessContext,
           inputs: Mapping[str, Any] | None = None) -> tuple[RunState, dict[str, Any] | None]:
    """Read the data and any checkpoint, check they fit the config, then build the model."""
    from ..data import build_dataset

    check_runnable(cfg, ctx.world_size, ctx.device)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    checkpoint_path = out_dir / ckpt.CHECKPOINT_NAME if out_dir else None
    # Every split the run will read, and the output folder, are checked now, not after a stage.
    splits = dict.fromkeys([*(s.split or cfg.train_split for s in cfg.stages)]
                           + ([cfg.val_split] if cfg.val_split else []))
    datasets = {split: build_dataset(cfg.dataset, cfg.data_root, split) for split in splits}  # type: ignore[arg-type]
    if out_dir is not None:
        ckpt.output_paths(out_dir, inputs)
    num_classes = cfg.num_classes or datasets[cfg.stages[0].split or cfg.train_split].num_classes
    resumed = None
    if checkpoint_path is not None and cfg.resume and checkpoint_path.is_file():
        resumed = ckpt.read_checkpoint(checkpoint_path)
        warnings = ckpt.check_resumable(resumed, cfg, num_classes, checkpoint_path)
        for split, size in dict(resumed.get("data_sizes") or {}).items():
            if split in datasets and len(datasets[split]) != size:
                warnings.append(f"split {split!r} now has {len(datasets[split])} samples; the checkpoint's run had "
                                f"{size}: the order of samples from here on is not the one it would have had")
        for warning in warnings:
            if ctx.is_main:
                logger.warning("warning: %s", warning)
    torch.manual_seed(cfg.seed)  # identical initialisation on every process
    model = _build_model(cfg, num_classes)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.momentum = cfg.bn_momentum
    if ctx.world_size > 1:
        model = convert_sync_batchnorm(model, device=ctx.device)
    model.to(ctx.device)
    torch.manual_seed(derive_seed(cfg.seed, 1, ctx.rank))  # dropout etc. differ across processes
    run = RunState(cfg, ctx, model, num_classes, checkpoint_path, datasets)
    if resumed is not None:
        _load_resumed(model, resumed["model"], checkpoint_path)  # type: ignore[arg-type]
        run.iteration = int(resumed["iteration"])
        run.history = {k: list(v) for k, v in resumed["history"].items()}
        run.evaluations = list(resumed.get("evaluations", []))
        if ctx.is_main:
            logger.info("resuming from %s at iteration %d (stage %d, step %d)", checkpoint_path, run.iteration,
                        int(resumed["stage"]) + 1, int(resumed["stage_iteration"]))
    return run, resumed


def _train(cfg: TrainConfig, ctx: ProcessContext, inputs: Mapping[str, Any] | None = None) -> TrainResult:
    run, resumed = _start(cfg, ctx, inputs)
    start_stage = int(resumed["stage"]) if resumed is not None else 0
    for stage_index in range(start_stage, len(cfg.stages)):
        first = int(resumed["stage_iteration"]) if resumed is not None and stage_index == start_stage else 0
        if run_stage(run, stage_index, first, resumed if stage_index == start_stage else None):
            break

    finished = run.iteration == cfg.total_iterations
    final_path = None
    out_dir = run.checkpoint_path.parent if run.checkpoint_path is not None else None
    if out_dir is not None:
        ckpt.check_finite_weights(run.model, iteration=run.iteration, path=out_dir / ckpt.FINAL_WEIGHTS_NAME)
    if out_dir is not None and ctx.is_main:
        if finished:
            final_path = out_dir / ckpt.FINAL_WEIGHTS_NAME
            ckpt.write_state(final_path, {"model": run.model.state_dict(),
                                          "model_config": ckpt.model_config(cfg, run.num_classes)})
        text = json_text({"history": run.history, "evaluations": run.evaluations}) + "\n"
        ckpt.write_file(out_dir / "history.json", lambda tmp: tmp.write_text(text))
    ctx.barrier()
    if ctx.is_main:
        logger.info("%s at iteration %d/%d", "finished" if finished else "stopped", run.iteration,
                    cfg.total_iterations)
    return TrainResult(model=unwrap(run.model), config=cfg, iteration=run.iteration, finished=finished,
                       history=run.history, evaluations=run.evaluations, checkpoint=run.checkpoint_path,
                       final_weights=final_path)
