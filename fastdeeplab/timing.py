"""The one home for timing: a CPU timer, a CUDA timer, and interleaved round-robin comparison.

* :func:`time_call` — one call of ``fn``, in seconds, with the device synchronised before and after (CUDA:
  CUDA events on the current stream; CPU: ``time.perf_counter``).
* :func:`time_cuda` — a CUDA kernel's time with an L2 flush before every run: ``triton.testing.do_bench``
  where triton imports, else CUDA events around each call after zeroing a 256 MiB buffer.
* :func:`interleaved` — several implementations timed *round-robin*: one call each per round, the order
  rotated every round, so load from other processes falls on all of them alike. Ratios are computed per
  round (:meth:`Timings.ratio`), and their median and IQR reported; on a shared machine those hold where
  per-implementation blocks do not.
* :func:`load_average` — the 1-minute load average and the core count, to say how busy the machine was;
  :func:`cpu_snapshot` and :func:`others_busy_cores` — how many cores other processes kept busy meanwhile.

>>> import torch
>>> t = interleaved({"a": lambda: torch.ones(8).sum(), "b": lambda: torch.ones(8).sum()}, rounds=3)
>>> sorted(t.samples), len(t.samples["a"])
(['a', 'b'], 3)
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["CpuSnapshot", "Spread", "Timings", "cpu_snapshot", "interleaved", "load_average", "others_busy_cores",
           "spread", "time_call", "time_cuda"]


@dataclass(frozen=True)
class Spread:
    """Median and inter-quartile range of a sample (same unit as the sample)."""

    median: float
    q1: float
    q3: float
    n: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "q1": self.q1, "q3": self.q3, "n": self.n}


def spread(values: Sequence[float]) -> Spread:
    """Median and quartiles (``statistics.quantiles``, inclusive method) of ``values``."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values to summarise: time at least one run")
    if len(values) == 1:
        return Spread(values[0], values[0], values[0], 1)
    q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return Spread(med, q1, q3, len(values))


def _synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device | str | None = None) -> float:
    """Seconds one call of ``fn`` takes. On CUDA, timed with CUDA events on the current stream after a
    synchronisation; on the CPU with ``time.perf_counter``."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_s = time.perf_counter()
    fn()
    return time.perf_counter() - start_s


def time_cuda(fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 100) -> Spread:
    """A CUDA call's time in **milliseconds** (median and quartiles), with the L2 cache flushed before each
    run. ``triton.testing.do_bench`` does it where triton imports; otherwise CUDA events around each call,
    after zeroing a 256 MiB buffer (larger than any GPU's L2)."""
    if not torch.cuda.is_available():
        raise RuntimeError("time_cuda needs a CUDA GPU; use time_call or interleaved on the CPU")
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        q1, med, q3 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.25, 0.5, 0.75])
        return Spread(float(med), float(q1), float(q3), 0)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    one = max(time_call(fn, "cuda") * 1e3, 1e-3)
    for _ in range(max(1, int(warmup_ms / one))):
        fn()
    times = []
    for _ in range(max(5, int(rep_ms / one))):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return spread(times)


def load_average() -> dict[str, float | int | None]:
    """``{"load1": 1-minute load average or None, "cores": usable cores}``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load1 = os.getloadavg()[0]
    except (OSError, AttributeError):
        load1 = None
    return {"load1": load1, "cores": cores}


@dataclass
class Timings:
    """Per-round seconds of each implementation, from :func:`interleaved`."""

    samples: dict[str, list[float]] = field(default_factory=dict)

    def spread(self, name: str) -> Spread:
        return spread(self.samples[name])

    def ratio(self, numerator: str, denominator: str) -> Spread:
        """``numerator / denominator`` per round (e.g. reference / candidate = speed-up), summarised."""
        a, b = self.samples[numerator], self.samples[denominator]
        return spread([x / y for x, y in zip(a, b) if y > 0])


def interleaved(fns: Mapping[str, Callable[[], object]], *, rounds: int = 5, warmup: int = 1,
                device: torch.device | str | None = None,
                progress: Callable[[int, str, float], None] | None = None) -> Timings:
    """Time every ``fns[name]()`` round-robin: ``warmup`` untimed calls each, then ``rounds`` rounds of one
    timed call each, the starting implementation rotated every round. ``progress(round, name, seconds)`` is
    called after each timed call."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    names = list(fns)
    if not names:
        raise ValueError("nothing to time: pass at least one implementation")
    device = torch.device(device) if device is not None else None
    for name in names:
        for _ in range(warmup):
            fns[name]()
        _synchronize(device)
    result = Timings({name: [] for name in names})
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            seconds = time_call(fns[name], device)
            result.samples[name].append(seconds)
            if progress is not None:
                progress(r, name, seconds)
    return result


@dataclass(frozen=True)
class CpuSnapshot:
    """Machine-wide busy CPU seconds (``/proc/stat``) and this process's own CPU seconds, at one instant."""

    wall: float
    machine_busy_s: float | None
    own_s: float


def cpu_snapshot() -> CpuSnapshot:
    """A :class:`CpuSnapshot` now (``machine_busy_s`` is None where ``/proc/stat`` cannot be read)."""
    busy = None
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...: everything but idle and iowait is busy
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        busy = None
    t = os.times()
    return CpuSnapshot(time.perf_counter(), busy, t.user + t.system)


def others_busy_cores(before: CpuSnapshot, after: CpuSnapshot) -> float | None:
    """How many cores *other* processes kept busy, on average, between two snapshots: the machine's busy
    CPU time minus this process's, over the wall time. None where ``/proc/stat`` is unavailable."""
    if before.machine_busy_s is None or after.machine_busy_s is None or after.wall <= before.wall:
        return None
    others = (after.machine_busy_s - before.machine_busy_s) - (after.own_s - before.own_s)
    return max(0.0, others / (after.wall - before.wall))
