"""Training across processes: the process group, batch norm synchronised on any device, and the data order.

* :func:`setup_processes` reads ``torchrun``'s environment (``WORLD_SIZE``, ``LOCAL_RANK``), picks the device
  and starts the process group (NCCL on GPUs, Gloo on CPUs) when there is more than one process;
  :class:`ProcessContext` is what the loop knows of it (rank, world size, device, ``barrier()``,
  ``any_true()``).
* :class:`SyncBatchNorm` is batch norm synchronised across processes on any device (PyTorch's runs on GPUs
  only); :func:`convert_sync_batchnorm` swaps it in.
* :class:`ResumableBatchSampler` is the sharded, resumable order of samples: a function of
  ``(seed, stage, epoch)`` only, with each sample's augmentation seed derived from its position, so
  restarts and data-loading workers do not change the stream. :func:`derive_seed` makes those seeds.
* The RNG state of a process, saved in and restored from checkpoints (:func:`rng_state`,
  :func:`set_rng_state`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DistributedSampler, Sampler

__all__ = [
    "ProcessContext",
    "ResumableBatchSampler",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "derive_seed",
    "rng_state",
    "set_rng_state",
    "setup_processes",
    "unwrap",
]


# --------------------------------------------------------------------------------------------------
# Batch norm synchronised across processes, on any device
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


# --------------------------------------------------------------------------------------------------
# The order of samples: sharded, resumable, seeded per sample
# --------------------------------------------------------------------------------------------------
def derive_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer ``keys`` (``numpy.random.SeedSequence``): same keys, same seed."""
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
        order_seed = derive_seed(self.seed, self.stream) % (2**31)
        while True:
            shard = DistributedSampler(range(self.num_samples), num_replicas=self.world_size, rank=self.rank,  # type: ignore[arg-type]
                                       shuffle=True, seed=order_seed, drop_last=True)
            shard.set_epoch(epoch)
            indices = list(shard)
            for b in range(offset, self.batches_per_epoch):
                batch = indices[b * self.batch_size:(b + 1) * self.batch_size]
                yield [(i, derive_seed(self.seed, self.stream, epoch, self.rank, b * self.batch_size + j))
                       for j, i in enumerate(batch)]
            offset, epoch = 0, epoch + 1


# --------------------------------------------------------------------------------------------------
# Processes and random state
# --------------------------------------------------------------------------------------------------
@dataclass
class ProcessContext:
    """This process's place in the run: ``rank`` of ``world_size`` processes, on ``device``.

    ``owns_group`` is true when :func:`setup_processes` started the process group (and so ends it).
    """

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def any_true(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process (one all-reduce when distributed), so that every process
        takes the same branch, e.g. all raise together instead of leaving the others waiting."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value)
        return bool(value.item() > 0)

    def mean(self, value: Tensor) -> float:
        """The mean of a scalar tensor over all processes, as a Python float."""
        value = value.detach().clone()
        if self.world_size > 1:
            dist.all_reduce(value)
            value /= self.world_size
        return float(value)


def setup_processes(device: str | None) -> ProcessContext:
    """Device and process group from ``torchrun``'s environment; one process when ``WORLD_SIZE`` is unset.

    ``device=None`` takes ``cuda:LOCAL_RANK`` where CUDA is available, else the CPU. A CUDA device asked
    for where CUDA is not available raises a ``ValueError`` before any work.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use device cpu")
        if dev.type == "cuda" and dev.index is None and world_size > 1:
            dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size == 1 and not dist.is_initialized():
        return ProcessContext(0, 1, dev, False)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(hours=2))
        owns = True
    return ProcessContext(dist.get_rank(), dist.get_world_size(), dev, owns)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def rng_state(device: torch.device) -> dict[str, Tensor]:
    """This process's RNG state: the CPU generator, and the CUDA one of ``device`` on CUDA."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Tensor], device: torch.device) -> None:
    """Restore a state saved by :func:`rng_state`."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
