"""Shared state of a benchmark session: the options after defaults (:class:`BenchConfig`), what every row
uses (:class:`BenchSession`: weights, torchvision references, inputs, ground truth), and the run of one
*setting* (one output stride): every implementation built first, then timed round-robin.

How a setting runs (:meth:`BenchSession.setting`, once per output stride, on its first test):

1. build every selected implementation, one progress line each (name, OS, seconds);
2. call each once on the timing input (peak memory), then on every accuracy batch (its outputs are kept);
3. time them with :func:`fastdeeplab.timing.interleaved`: one call each per round, the order rotated every
   round, so that load from other processes falls on all of them alike; ratios to torchvision are taken per
   round and summarised by their median and inter-quartile range;
4. record the load average before and after, and how many cores other processes kept busy meanwhile.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from fastdeeplab.bench_cli import IMPLEMENTATIONS as IMPL_NAMES
from fastdeeplab.timing import cpu_snapshot, interleaved, load_average, others_busy_cores, time_call

from ._impls import IMPLEMENTATIONS, Built, Setting, Unavailable, count_gflop, torchvision_reference
from ._measure import library_versions, machine_info, peak_memory
from ._metrics import accuracy_columns
from ._report import COLUMNS, ROW_KEYS
from ._weights import Weights, _looks_like_path, check_synthetic, resolve_weights, torchvision_weights_enum

__all__ = ["BENCH_DIR", "BenchConfig", "BenchSession", "DTYPES", "SESSION_KEY", "SettingResult", "session_of"]

BENCH_DIR = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Left out of --quick unless named with --impl: each costs an ONNX export per output stride (~10-20 s on 2
# cores) and repeats a path another row already covers (optimize_openvino's graph; the ONNX Runtime runtime).
QUICK_SKIPS = ("optimize_onnxruntime", "openvino")
# The 1-minute load average counts this process's own busy threads (about one per core while timing): a
# run on an otherwise idle machine ends near the core count, so the load rule allows this share on top.
LOAD_MARGIN = 0.25
# Other processes keeping this many cores busy (on average, over a setting) make a run noisy.
OTHERS_NOISY_CORES = 0.5


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
    download_weights: bool
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
        weights = opt("weights")
        if weights is not None and weights.strip().lower() == "synthetic":
            try:
                check_synthetic(opt("backbone"))
            except ValueError as exc:
                raise pytest.UsageError(str(exc)) from None
        if weights not in (None, "random", "synthetic") and not _looks_like_path(weights):
            try:  # a torchvision weights name: check it now, with the valid names, not in every test
                torchvision_weights_enum(weights, opt("backbone"))
            except ValueError as exc:
                raise pytest.UsageError(str(exc)) from None
        return cls(
            resolution=resolution, batch=opt("batch"), backbone=opt("backbone"), device=device,
            dtype=opt("dtype"),
            impls=[n for n in IMPL_NAMES if n in impls] or [n for n in IMPL_NAMES if not (quick and n in QUICK_SKIPS)],
            explicit_impls=bool(impls), output_strides=list(dict.fromkeys(strides)), weights=opt("weights"),
            download_weights=bool(opt("download_weights")), data=opt("data"),
            max_images=opt("max_images"), images=opt("images"),
            accuracy_images=max(1, opt("accuracy_images") or (2 if quick else 3)), quick=quick,
            rounds=opt("rounds"), warmup=max(0, opt("warmup")),
            time_budget=opt("time_budget") if opt("time_budget") is not None else (8.0 if quick else 60.0),
            min_rounds=5, max_rounds=15 if quick else 50, seed=opt("seed"), threads=opt("threads"),
            results_dir=Path(opt("results_dir")) if opt("results_dir") else BENCH_DIR / "results")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class SettingResult:
    """One output stride's rows (by implementation) and how the machine was while it ran."""

    output_stride: int
    rows: dict[str, dict[str, Any]]
    rounds: int
    load: dict[str, Any]
    seconds: float


def rounds_for(cfg: BenchConfig, round_s: float) -> int:
    """Timed rounds of a setting: ``--rounds``, else as many as fit ``--time-budget`` seconds, clamped."""
    if cfg.rounds is not None:
        return max(1, cfg.rounds)
    return int(min(cfg.max_rounds, max(cfg.min_rounds, math.ceil(cfg.time_budget / max(round_s, 1e-6)))))


def is_noisy(load: dict[str, Any]) -> list[str]:
    """Why a setting's timings are suspect (empty when they are not): a 1-minute load average above the
    core count (plus ``LOAD_MARGIN`` of it: the suite's own threads alone bring the load to about the core
    count) before or after it, or other processes keeping ``OTHERS_NOISY_CORES`` or more busy."""
    reasons = []
    cores = load.get("cores") or 1
    for when in ("before", "after"):
        value = load.get(f"load1_{when}")
        if value is not None and value > cores * (1 + LOAD_MARGIN):
            reasons.append(f"load average {value:.2f} {when} > {cores} cores")
    others = load.get("others_busy_cores")
    if others is not None and others >= OTHERS_NOISY_CORES:
        reasons.append(f"other processes kept {others:.1f} of {cores} cores busy")
    return reasons


@dataclass
class BenchSession:
    """State shared by every row: weights, reference models, inputs, ground truth, results."""

    cfg: BenchConfig
    workdir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    kernel_rows: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[int, SettingResult] = field(default_factory=dict)
    selected: set[tuple[int, str]] | None = None  # (output stride, impl) of the collected tests
    progress: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr, flush=True))
    _weights: Weights | None = None
    _references: dict[int, torch.nn.Module] = field(default_factory=dict)
    _ground_truth: dict[int, list[Tensor]] = field(default_factory=dict)
    _eager: dict[int, torch.nn.Module] = field(default_factory=dict)
    _gflop: dict[int, float] = field(default_factory=dict)
    _batches: list[Tensor] | None = None
    _labels: list[Tensor] | None = None
    _timing_input: Tensor | None = None
    image_names: list[str] = field(default_factory=list)
    load_at_start: tuple[float, float, float] | None = None
    omp_wait_policy: str = ""
    started: float = field(default_factory=time.perf_counter)

    def say(self, line: str) -> None:
        self.progress(f"[{time.perf_counter() - self.started:6.1f} s] {line}")

    # -- shared inputs -------------------------------------------------------------------------
    @property
    def weights(self) -> Weights:
        if self._weights is None:
            from fastdeeplab.images import sample_images

            def calibration() -> Tensor:
                return sample_images(129, count=6, folder=self.cfg.images)[1]

            self.say(f"weights: resolving {self.cfg.weights or 'the default (torchvision cache, else random)'}")
            self._weights = resolve_weights(self.cfg.weights, self.cfg.backbone, self.cfg.seed, calibration,
                                            download=self.cfg.download_weights, progress=self.say)
            self.say(f"weights: {self._weights.description}")
        return self._weights

    @property
    def synthetic(self) -> bool:
        return self.weights.kind == "synthetic"

    def _load_accuracy_set(self) -> None:
        b = self.cfg.batch
        if self.synthetic:
            from ._synthetic import SyntheticSpec, held_out_set

            spec = SyntheticSpec(**self.weights.info["spec"])
            images, labels = held_out_set(spec)
            self.image_names = [f"synthetic held-out {i}" for i in range(images.shape[0])]
            self._batches, self._labels = list(images.split(b)), list(labels.split(b))
            return
        from fastdeeplab.images import sample_images

        count = math.ceil(self.cfg.accuracy_images / b) * b
        names, images = sample_images(self.cfg.resolution, count=count, folder=self.cfg.images)
        self.image_names = names
        self._batches, self._labels = list(images.split(b)), None

    @property
    def batches(self) -> list[Tensor]:
        """The accuracy inputs, ``[batch, 3, H, W]`` float32 on the CPU: photographs at ``--resolution``
        (``accuracy_images`` of them, rounded up to whole batches), or with ``--weights synthetic`` the
        held-out synthetic scenes at their own size."""
        if self._batches is None:
            self._load_accuracy_set()
        return self._batches  # type: ignore[return-value]

    @property
    def labels(self) -> list[Tensor] | None:
        """True labels of the accuracy batches (synthetic scenes only), else None."""
        if self._batches is None:
            self._load_accuracy_set()
        return self._labels

    @property
    def timing_input(self) -> Tensor:
        """The one input every timed call gets: the first photograph(s) at ``--resolution``, ``[batch, 3, R, R]``."""
        if self._timing_input is None:
            if not self.synthetic:
                self._timing_input = self.batches[0]
            else:
                from fastdeeplab.images import sample_images

                self._timing_input = sample_images(self.cfg.resolution, count=self.cfg.batch,
                                                   folder=self.cfg.images)[1]
        return self._timing_input

    def calibration_images(self) -> Tensor:
        """int8 calibration images that are never scored: photographs after the accuracy ones (all of them if
        there are no others), or synthetic training scenes."""
        if self.synthetic:
            from ._synthetic import SyntheticSpec, scenes

            spec = SyntheticSpec(**self.weights.info["spec"])
            return scenes(range(16), spec, seed=spec.train_seed)[0]
        from fastdeeplab.images import sample_images

        names, images = sample_images(self.cfg.resolution, folder=self.cfg.images)
        unscored = [i for i, n in enumerate(names) if n not in set(self.image_names)]
        return images[unscored] if unscored else images

    def reference(self, output_stride: int) -> torch.nn.Module:
        """The float32 torchvision model at ``output_stride`` on the device, shared weights loaded."""
        if output_stride not in self._references:
            w = self.weights
            model = torchvision_reference(w.backbone, w.num_classes, output_stride, w.state_dict)
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
            self._gflop[output_stride] = count_gflop(w.backbone, w.num_classes, output_stride,
                                                     self.cfg.resolution)
        return self._gflop[output_stride]

    # -- one setting -----------------------------------------------------------------------------
    def new_row(self, implementation: str, description: str, output_stride: int) -> dict[str, Any]:
        impl = IMPLEMENTATIONS.get(implementation)
        row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
        row.update(implementation=implementation, description=description, output_stride=output_stride,
                   resolution=self.cfg.resolution, batch=self.cfg.batch, device=self.cfg.device,
                   dtype=(impl.precision if impl and impl.precision else self.cfg.dtype),
                   peer=bool(impl and impl.peer), status="running", notes=[])
        self.rows.append(row)
        return row

    def impls_at(self, output_stride: int) -> list[str]:
        names = [n for n in self.cfg.impls if n in IMPLEMENTATIONS]
        if self.selected is not None:
            names = [n for n in names if (output_stride, n) in self.selected]
        return names

    def setting(self, output_stride: int) -> SettingResult:
        """Build, score and time every selected implementation at ``output_stride`` (once; cached)."""
        if output_stride not in self.settings:
            self.settings[output_stride] = self._run_setting(output_stride)
        return self.settings[output_stride]

    def _build_all(self, output_stride: int, rows: dict[str, dict[str, Any]]) -> dict[str, Built]:
        cfg = self.cfg
        reference = self.reference(output_stride)
        setting = Setting(output_stride=output_stride, device=cfg.torch_device, dtype=cfg.torch_dtype,
                          resolution=cfg.resolution, batch=cfg.batch, workdir=self.workdir,
                          static_shape=not cfg.data, threads=cfg.threads,
                          eager=self.fastdeeplab_model(output_stride), calibration=self.calibration_images)
        built: dict[str, Built] = {}
        for name, row in rows.items():
            setting.explicit = cfg.explicit_impls and name in cfg.impls
            start = time.perf_counter()
            try:
                b = IMPLEMENTATIONS[name].build(reference, setting)
            except Unavailable as exc:
                row.update(status="skipped", reason=str(exc))
                self.say(f"OS{output_stride} {name}: skipped ({exc})")
                continue
            except ImportError as exc:
                row.update(status="skipped", reason=f"import failed: {exc}")
                self.say(f"OS{output_stride} {name}: skipped (import failed: {exc})")
                continue
            except Exception as exc:  # a broken implementation is a failed row, not a broken suite
                row.update(status="failed", reason=f"build: {type(exc).__name__}: {exc}")
                self.say(f"OS{output_stride} {name}: build FAILED ({type(exc).__name__}: {exc})")
                continue
            row["build_s"] = b.build_s or (time.perf_counter() - start)
            row["notes"] += b.notes
            built[name] = b
            self.say(f"OS{output_stride} {name}: built in {time.perf_counter() - start:.1f} s")
        return built

    def _score(self, output_stride: int, name: str, b: Built, row: dict[str, Any]) -> Callable[[], Any]:
        """First call (peak memory), accuracy columns; returns the timed call."""
        cfg = self.cfg
        device = cfg.torch_device
        x = self.timing_input.to(device, b.input_dtype)
        start = time.perf_counter()
        with peak_memory(device) as mem:
            b.fn(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        row["peak_mem_mb"] = mem.mb
        outputs = [b.fn(batch.to(device, b.input_dtype)).to(torch.float32, copy=True) for batch in self.batches]
        row.update(accuracy_columns(outputs, self.ground_truth(output_stride), self.ground_truth(8),
                                    self.weights.num_classes))
        if self.labels is not None:
            from fastdeeplab.metrics import ConfusionMatrix

            meter = ConfusionMatrix(self.weights.num_classes)
            for out, y in zip(outputs, self.labels, strict=True):
                meter.update(out.argmax(1).cpu(), y)
            row["miou_ground_truth"] = meter.compute()["mIoU"]
        if not self.weights.cross_stride_meaningful and output_stride != 8:
            row["pixel_agreement"] = row["miou_vs_reference"] = None
            row["accuracy_note"] = "n/a (random weights): OS16-vs-OS8 agreement and mIoU carry no meaning"
        row["accuracy_images"] = len(self.image_names)
        self.say(f"OS{output_stride} {name}: first call + accuracy on {len(self.image_names)} images in "
                 f"{time.perf_counter() - start:.1f} s")
        return lambda: b.fn(x)

    def _run_setting(self, output_stride: int) -> SettingResult:
        cfg = self.cfg
        start = time.perf_counter()
        load_before = load_average()
        snap_before = cpu_snapshot()
        names = self.impls_at(output_stride)
        self.say(f"OS{output_stride}: building {len(names)} implementations ({', '.join(names)}); load average "
                 f"{load_before['load1']:.2f} on {load_before['cores']} cores")
        rows = {n: self.new_row(n, IMPLEMENTATIONS[n].description, output_stride) for n in names}
        built = self._build_all(output_stride, rows)
        calls: dict[str, Callable[[], Any]] = {}
        for name, b in built.items():
            try:
                calls[name] = self._score(output_stride, name, b, rows[name])
            except Exception as exc:
                rows[name].update(status="failed", reason=f"first call: {type(exc).__name__}: {exc}")
                self.say(f"OS{output_stride} {name}: FAILED on its first call ({type(exc).__name__}: {exc})")
        estimate = {name: time_call(fn, cfg.torch_device) for name, fn in calls.items()}  # also a warmup
        rounds = rounds_for(cfg, sum(estimate.values()))
        if calls:
            self.say(f"OS{output_stride}: timing {len(calls)} implementations round-robin, {rounds} rounds of "
                     f"~{sum(estimate.values()):.1f} s")
        done = {"calls": 0}
        per_round = len(calls)  # not the dict itself: it is deleted below, the closure may outlive it

        def progress(r: int, name: str, seconds: float) -> None:
            done["calls"] += 1
            if done["calls"] % per_round == 0:
                self.say(f"OS{output_stride}: round {r + 1}/{rounds} done")

        timings = interleaved(calls, rounds=rounds, warmup=max(0, cfg.warmup - 1), device=cfg.torch_device,
                              progress=progress) if calls else None
        gflop = self.gflop(output_stride)
        for name in calls:
            row = rows[name]
            lat = timings.spread(name)
            row.update(latency_ms_median=lat.median * 1e3, latency_ms_iqr=lat.iqr * 1e3, latency_ms_q1=lat.q1 * 1e3,
                       latency_ms_q3=lat.q3 * 1e3, latency_ms_min=min(timings.samples[name]) * 1e3,
                       rounds=lat.n, throughput_ips=cfg.batch / lat.median, gflop=gflop,
                       gflops=gflop * cfg.batch / lat.median, samples_ms=[t * 1e3 for t in timings.samples[name]])
            if "torchvision" in calls:
                ratio = timings.ratio("torchvision", name)
                row.update(speedup_vs_torchvision_same_os=ratio.median, speedup_same_os_q1=ratio.q1,
                           speedup_same_os_q3=ratio.q3)
            if cfg.data:
                if self.weights.real:
                    from ._val import val_miou

                    row["val_miou"], row["val_images"] = val_miou(
                        built[name], output_stride, data=cfg.data, max_images=cfg.max_images,
                        device=cfg.torch_device, num_classes=self.weights.num_classes)
                else:
                    row["notes"].append("val mIoU not measured: random weights (pass --weights)")
            row["status"] = "ok"
        snap_after = cpu_snapshot()
        load_after = load_average()
        load = {"cores": load_before["cores"], "load1_before": load_before["load1"],
                "load1_after": load_after["load1"], "others_busy_cores": others_busy_cores(snap_before, snap_after)}
        load["noisy_reasons"] = is_noisy(load)
        load["noisy"] = bool(load["noisy_reasons"])
        seconds = time.perf_counter() - start
        self.say(f"OS{output_stride}: done in {seconds:.0f} s; load average {load['load1_after']:.2f}"
                 + (f"; NOISY: {'; '.join(load['noisy_reasons'])}" if load["noisy"] else ""))
        del built, calls
        return SettingResult(output_stride, rows, rounds, load, seconds)

    # -- metadata ------------------------------------------------------------------------------
    def noisy(self) -> tuple[bool, list[str]]:
        reasons = [f"OS{os_}: {r}" for os_, s in self.settings.items() for r in s.load["noisy_reasons"]]
        return bool(reasons), reasons

    def metadata(self, config: pytest.Config) -> dict[str, Any]:
        weights = self._weights.as_json() if self._weights is not None else {
            "kind": None, "description": "(not loaded: no model row ran)", "accuracy_meaningful": None}
        if self._weights is not None and self.synthetic:
            images = {"names": [], "folder": None, "synthetic": True,
                      "description": f"{len(self.image_names)} held-out synthetic scenes (not photographs; "
                                     f"never seen in training), scored against their true labels"}
        else:
            where = f"folder {self.cfg.images}" if self.cfg.images else "scikit-image's bundled photographs"
            images = {"names": self.image_names, "folder": self.cfg.images, "synthetic": False,
                      "description": f"{len(self.image_names)} photographs from {where}: {', '.join(self.image_names)}"}
        settings = asdict(self.cfg)
        settings["results_dir"] = str(self.cfg.results_dir)
        noisy, reasons = self.noisy()
        load = {"at_start": self.load_at_start, "at_end": _loadavg(),
                "per_output_stride": {f"os{k}": v.load for k, v in self.settings.items()},
                "note": "1/5/15-minute load averages; above the core count, timings are inflated"}
        return {
            "schema": 2,
            "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": "pytest " + " ".join(config.invocation_params.args),
            "argv": list(sys.argv),
            "settings": settings,
            "timing": {"method": "interleaved round-robin (fastdeeplab.timing.interleaved): every implementation "
                                 "of an output stride built first, then one call each per round, order rotated; "
                                 "speed-ups are per-round ratios (median, q1, q3)",
                       "rounds": {f"os{k}": v.rounds for k, v in self.settings.items()},
                       "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)},
            "noisy": noisy,
            "noisy_reasons": reasons,
            "advice": ("timings were taken on a busy machine: rerun on a quieter machine, or with --threads 1"
                       if noisy else None),
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
