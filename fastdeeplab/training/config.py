"""What a training run is told: :class:`Stage`, :class:`TrainConfig`, :func:`load_config` (YAML, mappings,
keyword overrides) and the validation of every field at load time.

Every field is checked when the config is built, before any data is read or any model is built: a wrong
type, a non-finite number (YAML's ``.nan`` and ``.inf``), a non-number or a value out of range raises a
``TypeError`` or ``ValueError`` that names the field (``stages[1].lr``) and what it accepts. Integer fields
take integers only (``iterations: 2.5`` is refused, not truncated). Float fields also take numeric strings,
because YAML 1.1 (PyYAML) reads ``1e-4`` without a dot as the string ``"1e-4"``.

>>> cfg = load_config({"num_classes": 21, "stages": [{"iterations": 10, "lr": 0.01}]}, batch_size=4)
>>> cfg.total_iterations, cfg.stages[0].output_stride
(10, 16)
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PAPER_STAGES", "Stage", "TrainConfig", "check_runnable", "load_config", "parse_stages"]

OUTPUT_STRIDES = (8, 16, 32)


# --------------------------------------------------------------------------------------------------
# Field checks: each returns the value in its canonical type or raises naming the field
# --------------------------------------------------------------------------------------------------
def _type_name(value: Any) -> str:
    return type(value).__name__


def _int(name: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({_type_name(value)})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _optional_int(name: str, value: Any, minimum: int | None = None) -> int | None:
    return None if value is None else _int(name, value, minimum)


def _float(name: str, value: Any, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> float:
    """A finite number in ``[low, high]`` (``(low`` / ``high)`` when open); numeric strings are read."""
    allowed = _range_text(low, high, low_open, high_open)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise TypeError(f"{name} must be a number{allowed}, got {value!r} (str)") from None
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number{allowed}, got {value!r} ({_type_name(value)})")
    else:
        number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number{allowed}, got {number}")
    if (low is not None and (number < low or (low_open and number == low))) or \
            (high is not None and (number > high or (high_open and number == high))):
        raise ValueError(f"{name} must be a number{allowed}, got {number}")
    return number


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ""


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {value!r} ({_type_name(value)})")
    return value


def _str(name: str, value: Any, *, optional: bool = False, paths: bool = False) -> str | None:
    if value is None and optional:
        return None
    if paths and isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise TypeError(f"{name} must be a non-empty string{' or null' if optional else ''}, "
                        f"got {value!r} ({_type_name(value)})")
    return value


def _weights(name: str, value: Any) -> str | None:
    """Weights as text (a torchvision weights name or a file), so that configs stay plain data."""
    if isinstance(value, enum.Enum):  # a torchvision WeightsEnum member: stored by its name
        return f"{type(value).__name__}.{value.name}"
    return _str(name, value, optional=True, paths=True)


def _int_tuple(name: str, value: Any, minimum: int) -> tuple[int, ...]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of integers, got {value!r} ({_type_name(value)})")
    return tuple(_int(f"{name}[{i}]", v, minimum) for i, v in enumerate(value))


def _device(value: Any) -> str | None:
    if value is None:
        return None
    import torch

    text = _str("device", value)
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"device must be cpu, cuda, cuda:N or another torch device, got {text!r}") from None
    return text


# --------------------------------------------------------------------------------------------------
# The configuration
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

    def __post_init__(self) -> None:
        self.iterations = _int("iterations", self.iterations, 1)
        self.lr = _float("lr", self.lr, low=0.0, low_open=True)
        self.output_stride = _int("output_stride", self.output_stride)
        if self.output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {', '.join(map(str, OUTPUT_STRIDES))}, "
                             f"got {self.output_stride}")
        self.freeze_bn = _bool("freeze_bn", self.freeze_bn)
        self.split = _str("split", self.split, optional=True)


PAPER_STAGES = (
    Stage(iterations=30_000, lr=0.007, output_stride=16, freeze_bn=False),
    Stage(iterations=30_000, lr=0.001, output_stride=8, freeze_bn=True),
)


@dataclass
class TrainConfig:
    """Everything a run needs; every field can be set from YAML (see ``configs/``) or as a keyword.

    ``batch_size`` is per process: ``torchrun --nproc_per_node=2`` with ``batch_size: 8`` reproduces the
    paper's batch of 16. Every field is validated on construction (see the module docstring).
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
        self.stages = parse_stages(self.stages)
        # data
        from ..data import DATASETS

        self.dataset = _str("dataset", self.dataset)  # type: ignore[assignment]
        if self.dataset.lower() not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        self.data_root = _str("data_root", self.data_root, optional=True, paths=True)
        self.train_split = _str("train_split", self.train_split)  # type: ignore[assignment]
        self.val_split = _str("val_split", self.val_split, optional=True)
        self.crop_size = _int("crop_size", self.crop_size, 1)
        if isinstance(self.scale_range, (str, bytes, Mapping)) or not isinstance(self.scale_range, Sequence) \
                or len(self.scale_range) != 2:
            raise TypeError(f"scale_range must be a pair [min, max], got {self.scale_range!r}")
        low, high = (_float(f"scale_range[{i}]", s, low=0.0, low_open=True) for i, s in enumerate(self.scale_range))
        if low > high:
            raise ValueError(f"scale_range must be [min, max] with min <= max, got [{low}, {high}]")
        self.scale_range = (low, high)
        self.scale_step = _float("scale_step", self.scale_step, low=0.0)
        self.flip = _bool("flip", self.flip)
        self.batch_size = _int("batch_size", self.batch_size, 1)
        self.num_workers = _int("num_workers", self.num_workers, 0)
        self.bootstrap_classes = _int_tuple("bootstrap_classes", self.bootstrap_classes, 0)
        self.bootstrap_factor = _int("bootstrap_factor", self.bootstrap_factor, 1)
        # model
        self.model = _str("model", self.model)  # type: ignore[assignment]
        self.num_classes = _optional_int("num_classes", self.num_classes, 1)
        self.aux_loss = _bool("aux_loss", self.aux_loss)
        self.aux_weight = _float("aux_weight", self.aux_weight, low=0.0)
        self.multi_grid = _int_tuple("multi_grid", self.multi_grid, 1)
        self.weights = _weights("weights", self.weights)
        self.weights_backbone = _weights("weights_backbone", self.weights_backbone)
        if not isinstance(self.model_kwargs, Mapping) or not all(isinstance(k, str) for k in self.model_kwargs):
            raise TypeError(f"model_kwargs must be a mapping of option names to values, got {self.model_kwargs!r}")
        self.model_kwargs = dict(self.model_kwargs)
        # optimisation
        self.momentum = _float("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        self.weight_decay = _float("weight_decay", self.weight_decay, low=0.0)
        self.poly_power = _float("poly_power", self.poly_power, low=0.0)
        self.bn_momentum = _float("bn_momentum", self.bn_momentum, low=0.0, high=1.0)
        # run
        self.out_dir = _str("out_dir", self.out_dir, optional=True, paths=True)
        self.checkpoint_every = _int("checkpoint_every", self.checkpoint_every, 0)
        self.resume = _bool("resume", self.resume)
        self.stop_after = _optional_int("stop_after", self.stop_after, 1)
        self.seed = _int("seed", self.seed, 0)
        self.device = _device(self.device)
        self.log_every = _int("log_every", self.log_every, 0)
        self.progress = _bool("progress", self.progress)

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


def parse_stages(stages: Any) -> list[Stage]:
    """A list of :class:`Stage` from stages or mappings; errors name the stage (``stages[1].lr ...``)."""
    if isinstance(stages, (str, bytes, Mapping)) or not isinstance(stages, Sequence):
        raise TypeError(f"stages must be a list of stages ({{iterations, lr, output_stride, freeze_bn, split}}), "
                        f"got {stages!r}")
    if not stages:
        raise ValueError("the schedule needs at least one stage: stages is empty")
    out = []
    for i, s in enumerate(stages):
        if isinstance(s, Stage):
            s = {f.name: getattr(s, f.name) for f in dataclasses.fields(Stage)}
        if not isinstance(s, Mapping):
            raise TypeError(f"stages[{i}] must be a mapping such as {{iterations: 1000, lr: 0.007}}, got {s!r}")
        values = _known(Stage, s, "stage", where=f" in stages[{i}]")
        missing = [name for name in ("iterations", "lr") if name not in values]
        if missing:
            raise ValueError(f"stages[{i}] needs {' and '.join(missing)}")
        try:
            out.append(Stage(**values))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"stages[{i}].{exc}") from None
    return out


def _known(cls: type, values: Mapping[str, Any], what: str, where: str = "") -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(values) - names)
    if unknown:
        raise ValueError(f"unknown {what} option(s) {', '.join(unknown)}{where}; "
                         f"valid options: {', '.join(sorted(names))}")
    return dict(values)


def load_config(config: TrainConfig | Mapping[str, Any] | str | os.PathLike | None = None,
                **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a config object, a mapping or a YAML file, with ``overrides`` on top.

    Unknown keys raise a ``ValueError`` that lists the valid ones; invalid values raise a ``TypeError`` or
    ``ValueError`` naming the field (and the file, for YAML).
    """
    source = ""
    if config is None:
        values: dict[str, Any] = {}
    elif isinstance(config, TrainConfig):
        values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    elif isinstance(config, Mapping):
        values = dict(config)
    elif isinstance(config, (str, os.PathLike)):
        values = _read_yaml(Path(config))
        source = f" (config {config})"
    else:
        raise TypeError(f"config must be a TrainConfig, a mapping or a YAML file path, got {_type_name(config)}")
    values.update(overrides)
    try:
        return TrainConfig(**_known(TrainConfig, values, "training"))
    except (TypeError, ValueError) as exc:
        if not source:
            raise
        raise type(exc)(f"{exc}{source}") from None


MAX_CONFIG_BYTES = 1 << 20
"""A config is at most 1 MiB: a larger file (or an endless stream such as ``/dev/zero``) is refused."""


def read_config_text(path: Path) -> str:
    """The text of a YAML config, read safely: a regular file of at most :data:`MAX_CONFIG_BYTES`, or a pipe
    the user named (``--config <(...)``, ``--config /dev/stdin``), read to its end, at most as many bytes.
    A folder, a missing file, a device other than a pipe, too many bytes or text that is not UTF-8 is a
    one-line error naming the path."""
    import stat

    from .._io import read_regular_file

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except OSError as exc:
        raise OSError(f"cannot read config {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"config path {path} is a directory; give a YAML file")
    if not (stat.S_ISFIFO(mode) or (stat.S_ISCHR(mode) and _is_stdin(path))):
        return read_regular_file(path, max_bytes=MAX_CONFIG_BYTES, what="config")
    try:  # a pipe (or a terminal on stdin): blocking, as `cat` reads it, and bounded
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise OSError(f"cannot read config {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"config {path} is more than the {MAX_CONFIG_BYTES} bytes allowed")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"config {path} is not UTF-8 text (byte {exc.start})") from None


def _is_stdin(path: Path) -> bool:
    """Whether ``path`` is this process's standard input (``/dev/stdin``, ``/proc/self/fd/0``)."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(0))
    except (OSError, ValueError):
        return False


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:
        raise ImportError("YAML configs need PyYAML: pip install 'fastdeeplab[train]'") from None
    text = read_config_text(path)
    try:
        loaded = yaml.safe_load(text)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())
        raise ValueError(f"cannot parse config {path}: {reason}") from None
    if loaded is not None and not isinstance(loaded, Mapping):
        raise ValueError(f"config {path} must hold a mapping of options, got {type(loaded).__name__}")
    return {str(k): v for k, v in (loaded or {}).items()}


def check_runnable(cfg: TrainConfig, world_size: int, device: Any) -> None:
    """Refuse, before any data is read, a recipe that cannot train in ``world_size`` processes on ``device``:
    a batch that cannot train batch norm, or a crop and batch whose step cannot fit in free memory."""
    _check_batch_norm_batch(cfg, world_size)
    _check_training_memory(cfg, device)


def _check_batch_norm_batch(cfg: TrainConfig, world_size: int) -> None:
    """Batch norm in training mode needs more than one value per channel; ASPP's image-pooling branch has one
    per image, so a batch of one image in all (``batch_size`` x processes) cannot train it."""
    trained = [i for i, s in enumerate(cfg.stages) if not s.freeze_bn]
    if cfg.batch_size * world_size < 2 and trained:
        raise ValueError(f"batch_size {cfg.batch_size} (--batch-size) cannot train batch norm (stage "
                         f"{trained[0] + 1}): ASPP's image-pooling branch then has one value per channel; use "
                         "--batch-size 2 or more, more processes, or freeze_bn: true in every stage")


# Peak bytes per crop pixel of one training step (forward and backward, batch norm trained), measured with
# ru_maxrss on CPU (fp32, ResNet-50, 321-pixel crops, batch 2): 2820 at output stride 16, 5597 at 8; rounded
# down, so that only runs that certainly cannot fit are refused.
_TRAIN_BYTES_PER_PIXEL = {8: 5000, 16: 2500, 32: 2000}


def _check_training_memory(cfg: TrainConfig, device: Any) -> None:
    """Refuse, before any data is read, a crop size and batch whose training step cannot fit in the free
    memory of the device (instead of the allocator's message after the first batch)."""
    from ..evaluation import available_memory

    free = available_memory(device)
    if free is None:
        return
    for i, stage in enumerate(cfg.stages):
        need = cfg.batch_size * cfg.crop_size ** 2 * _TRAIN_BYTES_PER_PIXEL.get(stage.output_stride, 5000)
        if need > free:
            raise ValueError(f"crop_size {cfg.crop_size} (--crop-size) with batch_size {cfg.batch_size} "
                             f"(--batch-size) needs about {need / 2**30:.1f} GiB per step at output stride "
                             f"{stage.output_stride} (stage {i + 1}), but {device.type} has "
                             f"{free / 2**30:.1f} GiB free; use smaller crops or batches (or more processes)")
