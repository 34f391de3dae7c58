"""Shared state of a benchmark session: the options after defaults (:class:`BenchConfig`) and what every
row uses (:class:`BenchSession`: weights, torchvision references, photographs, ground truth, result rows).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from fastdeeplab.bench_cli import IMPLEMENTATIONS as IMPL_NAMES

from ._impls import Weights, count_gflop, resolve_weights, torchvision_reference
from ._measure import library_versions, machine_info
from ._report import COLUMNS, ROW_KEYS

__all__ = ["BENCH_DIR", "BenchConfig", "BenchSession", "DTYPES", "SESSION_KEY", "session_of"]

BENCH_DIR = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class BenchConfig:
    """The suite's options after defaults, --quick and validation."""

    resolution: int
    batch: int
    backbone: str
    device: str
    dtype: str
    impls: list[str]
    explicit_impls: bool
    output_strides: list[int]
    weights: str | None
    data: str | None
    max_images: int | None
    images: str | None
    accuracy_images: int
    quick: bool
    rounds: int | None
    warmup: int
    time_budget: float
    min_rounds: int
    max_rounds: int
    seed: int
    threads: int | None
    results_dir: Path

    @classmethod
    def from_pytest(cls, config: pytest.Config) -> BenchConfig:
        opt = config.getoption
        quick = bool(opt("quick"))
        impls: list[str] = []
        for item in opt("impl") or ():
            impls += [n.strip() for n in str(item).split(",") if n.strip()]
        unknown = sorted(set(impls) - set(IMPL_NAMES))
        if unknown:
            raise pytest.UsageError(f"unknown --impl {', '.join(unknown)}; choose from {', '.join(IMPL_NAMES)}")
        strides = [int(s) for s in str(opt("output_strides")).split(",") if s.strip()]
        if not strides or any(s not in (8, 16) for s in strides):
            raise pytest.UsageError(f"--output-strides takes 16 and/or 8, got {opt('output_strides')!r}")
        device = opt("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise pytest.UsageError("--device cuda, but CUDA is not available on this machine")
        resolution = opt("resolution") or (129 if quick else 513)
        if resolution < 33:
            raise pytest.UsageError(f"--resolution must be at least 33, got {resolution}")
        if opt("batch") < 1:
            raise pytest.UsageError("--batch must be >= 1")
        if opt("threads") is not None and opt("threads") < 1:
            raise pytest.UsageError("--threads must be >= 1")
        if opt("data") and not Path(opt("data")).is_dir():
            raise pytest.UsageError(f"--data {opt('data')} is not a directory")
        if opt("images") and not Path(opt("images")).is_dir():
            raise pytest.UsageError(f"--images {opt('images')} is not a directory")
        return cls(
            resolution=resolution, batch=opt("batch"), backbone=opt("backbone"), device=device,
            dtype=opt("dtype"), impls=[n for n in IMPL_NAMES if n in impls] or list(IMPL_NAMES), explicit_impls=bool(impls),
            output_strides=list(dict.fromkeys(strides)), weights=opt("weights"), data=opt("data"),
            max_images=opt("max_images"), images=opt("images"),
            accuracy_images=max(1, opt("accuracy_images") or (2 if quick else 3)), quick=quick,
            rounds=opt("rounds"), warmup=max(0, opt("warmup")),
            time_budget=opt("time_budget") if opt("time_budget") is not None else (1.0 if quick else 10.0),
            min_rounds=3 if quick else 5, max_rounds=10 if quick else 50, seed=opt("seed"), threads=opt("threads"),
            results_dir=Path(opt("results_dir")) if opt("results_dir") else BENCH_DIR / "results")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class BenchSession:
    """State shared by every row: weights, reference models, photographs, ground truth, results."""

    cfg: BenchConfig
    workdir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    kernel_rows: list[dict[str, Any]] = field(default_factory=list)
    _weights: Weights | None = None
    _references: dict[int, torch.nn.Module] = field(default_factory=dict)
    _ground_truth: dict[int, list[Tensor]] = field(default_factory=dict)
    _eager: dict[int, torch.nn.Module] = field(default_factory=dict)
    _gflop: dict[int, float] = field(default_factory=dict)
    _batches: list[Tensor] | None = None
    image_names: list[str] = field(default_factory=list)
    load_at_start: tuple[float, float, float] | None = None
    omp_wait_policy: str = ""

    # -- shared inputs -------------------------------------------------------------------------
    @property
    def weights(self) -> Weights:
        if self._weights is None:
            from fastdeeplab.images import sample_images

            def calibration() -> Tensor:
                return sample_images(129, count=6, folder=self.cfg.images)[1]

            self._weights = resolve_weights(self.cfg.weights, self.cfg.backbone, self.cfg.seed, calibration)
        return self._weights

    @property
    def batches(self) -> list[Tensor]:
        """The accuracy photographs, ``[batch, 3, R, R]`` float32 on the CPU, enough to hold
        ``accuracy_images`` (rounded up to whole batches)."""
        if self._batches is None:
            from fastdeeplab.images import sample_images

            b = self.cfg.batch
            count = math.ceil(self.cfg.accuracy_images / b) * b
            names, images = sample_images(self.cfg.resolution, count=count, folder=self.cfg.images)
            self.image_names = names
            self._batches = list(images.split(b))
        return self._batches

    def reference(self, output_stride: int) -> torch.nn.Module:
        """The float32 torchvision model at ``output_stride`` on the device, shared weights loaded."""
        if output_stride not in self._references:
            w = self.weights
            model = torchvision_reference(w.depth, w.num_classes, output_stride, w.state_dict)
            self._references[output_stride] = model.to(self.cfg.torch_device)
        return self._references[output_stride]

    def fastdeeplab_model(self, output_stride: int) -> torch.nn.Module:
        """``fastdeeplab.from_torchvision`` of the reference, once per output stride (CPU, float32, eval);
        implementations copy it rather than rebuild it."""
        if output_stride not in self._eager:
            import fastdeeplab

            self._eager[output_stride] = fastdeeplab.from_torchvision(self.reference(output_stride)).cpu().eval()
        return self._eager[output_stride]

    def ground_truth(self, output_stride: int) -> list[Tensor]:
        """float32 reference logits per accuracy batch (TF32 off on CUDA), on the device."""
        if output_stride not in self._ground_truth:
            model = self.reference(output_stride)
            dev = self.cfg.torch_device
            flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            try:
                with torch.inference_mode():
                    self._ground_truth[output_stride] = [model(b.to(dev))["out"].float() for b in self.batches]
            finally:
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
        return self._ground_truth[output_stride]

    def gflop(self, output_stride: int) -> float:
        if output_stride not in self._gflop:
            w = self.weights
            self._gflop[output_stride] = count_gflop(w.depth, w.num_classes, output_stride, self.cfg.resolution)
        return self._gflop[output_stride]

    # -- results -------------------------------------------------------------------------------
    def new_row(self, implementation: str, description: str, output_stride: int) -> dict[str, Any]:
        row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
        row.update(implementation=implementation, description=description, output_stride=output_stride,
                   resolution=self.cfg.resolution, batch=self.cfg.batch, device=self.cfg.device,
                   dtype=self.cfg.dtype, status="running", notes=[])
        self.rows.append(row)
        return row

    def metadata(self, config: pytest.Config) -> dict[str, Any]:
        weights = self._weights.as_json() if self._weights is not None else {
            "kind": None, "description": "(not loaded: no model row ran)"}
        where = f"folder {self.cfg.images}" if self.cfg.images else "scikit-image's bundled photographs"
        images = {"names": self.image_names, "folder": self.cfg.images,
                  "description": f"{len(self.image_names)} photographs from {where}: {', '.join(self.image_names)}"}
        settings = asdict(self.cfg)
        load = {"at_start": self.load_at_start, "at_end": _loadavg(),
                "note": "1/5/15-minute load averages; above the core count, timings are inflated"}
        settings["results_dir"] = str(self.cfg.results_dir)
        return {
            "schema": 1,
            "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": "pytest " + " ".join(config.invocation_params.args),
            "argv": list(sys.argv),
            "settings": settings,
            "machine": {**machine_info(self.cfg.torch_device), "load_average": load,
                        "omp_wait_policy": self.omp_wait_policy},
            "versions": library_versions(),
            "weights": weights,
            "images": images,
            "columns": COLUMNS,
        }


SESSION_KEY = pytest.StashKey[BenchSession]()


def session_of(config: pytest.Config) -> BenchSession:
    """The benchmark session that bench/conftest.py stored on ``config`` at configure time."""
    return config.stash[SESSION_KEY]


def _loadavg() -> tuple[float, float, float] | None:
    try:
        return tuple(round(v, 2) for v in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return None
