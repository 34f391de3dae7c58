"""Per-layer dispatch that cannot lose: time the Triton kernel against cuDNN once per problem, keep the faster.

A :class:`Dispatcher` decides, for each ``(layer geometry, input shape, dtype, device)`` key, whether a fused
module runs its Triton op or its cuDNN form (``F.conv2d`` + the same bias, residual and ReLU). In mode
``"auto"`` the first CUDA call of a key times both with :func:`fastdeeplab.timing.time_cuda`
(``triton.testing.do_bench``, L2 flushed before every run) and keeps the faster; ``"triton"`` and ``"cudnn"``
force one side. Decisions persist in a JSON file, one section per environment (GPU name, driver, torch and
triton versions), so a second process decides nothing again:

* the file is ``$FASTDEEPLAB_CACHE_DIR/dispatch.json``, else ``$XDG_CACHE_HOME/fastdeeplab/dispatch.json``,
  else ``~/.cache/fastdeeplab/dispatch.json``;
* a corrupt or unreadable file is ignored with a warning and rewritten; writes are atomic
  (:func:`fastdeeplab._io.atomic_path`).

The timer is injectable (``Dispatcher(timer=...)``), which is how the decision logic is tested on a CPU.
Off CUDA (the interpreter) ``"auto"`` runs Triton without timing unless a timer was injected.

>>> d = Dispatcher("auto", timer=lambda fn: fn(), cache_path=None)
>>> d.choose("layer1.0.conv2", "k3 s1", lambda: 20.0, lambda: 30.0, device_type="cuda")
'triton'
>>> d.report().rows[0]["choice"]
'triton'
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CACHE_ENV", "DISPATCH_MODES", "DispatchReport", "Dispatcher", "default_cache_path", "environment_key"]

DISPATCH_MODES = ("auto", "triton", "cudnn")
CACHE_ENV = "FASTDEEPLAB_CACHE_DIR"
_FORMAT = 1


def default_cache_path() -> Path:
    """Where decisions persist (see the module docstring)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "dispatch.json"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fastdeeplab" / "dispatch.json"


def environment_key(device=None) -> str:
    """``"<GPU name> | driver <v> | torch <v> | triton <v>"``: decisions hold only for this combination."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    if device is not None and getattr(device, "type", "cpu") == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        driver = _driver_version()
    else:
        name, driver = "cpu", "none"
    return f"{name} | driver {driver} | torch {torch.__version__} | triton {triton_version}"


def _driver_version() -> str:
    try:
        import torch

        return str(torch._C._cuda_getDriverVersion())  # e.g. 12080 for 12.8
    except Exception:  # noqa: BLE001 - private API; the key only needs to change when the driver does
        return "unknown"


@dataclass
class DispatchReport:
    """One row per layer and problem: ``layer, key, triton_us, cudnn_us, choice`` (µs are None if untimed)."""

    rows: list[dict] = field(default_factory=list)

    def table(self) -> str:
        head = ["layer", "problem", "triton µs", "cuDNN µs", "choice"]
        body = [[r["layer"], r["key"], _fmt(r["triton_us"]), _fmt(r["cudnn_us"]), r["choice"]] for r in self.rows]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        return "\n".join([fmt.format(*head), *(fmt.format(*row) for row in body)])

    def __str__(self) -> str:
        return self.table()


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


class Dispatcher:
    """Chooses Triton or cuDNN per problem; shared by every fused module of one optimized model.

    Args:
        mode: ``"auto"`` (time once, keep the faster), ``"triton"`` or ``"cudnn"``.
        timer: ``timer(fn) -> µs`` for one call of ``fn``; default :func:`fastdeeplab.timing.time_cuda`'s median.
        cache_path: the JSON file (default :func:`default_cache_path`); ``None`` keeps decisions in memory.
    """

    def __init__(self, mode: str = "auto", *, timer: Callable[[Callable[[], object]], float] | None = None,
                 cache_path: str | os.PathLike | None | object = "default") -> None:
        if mode not in DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {mode!r}")
        self.mode = mode
        self.timer = timer
        self.cache_path = default_cache_path() if cache_path == "default" else (
            None if cache_path is None else Path(cache_path))
        self._decisions: dict[str, dict] = {}  # key -> {"triton_us", "cudnn_us", "choice"}
        self._layers: dict[tuple[str, str], None] = {}  # (layer, key) in first-call order
        self._loaded_env: str | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["timer"] = None
        return state

    # -- persistence -------------------------------------------------------------------------------
    def _read_file(self) -> dict:
        if self.cache_path is None or not self.cache_path.exists():
            return {}
        try:
            data = json.loads(self.cache_path.read_text())
            if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("envs"), dict):
                raise ValueError("not a fastdeeplab dispatch cache")
            return data
        except (OSError, ValueError) as exc:
            warnings.warn(f"ignoring the unreadable dispatch cache {self.cache_path} ({exc}); it will be rebuilt",
                          RuntimeWarning, stacklevel=3)
            return {}

    def _load(self, env: str) -> None:
        if self._loaded_env == env:
            return
        self._loaded_env = env
        section = self._read_file().get("envs", {}).get(env, {})
        for key, value in section.items():
            if isinstance(value, dict) and value.get("choice") in ("triton", "cudnn"):
                self._decisions.setdefault(key, value)

    def _save(self, env: str) -> None:
        if self.cache_path is None:
            return
        from fastdeeplab._io import atomic_path

        data = self._read_file() or {"format": _FORMAT, "envs": {}}
        section = data["envs"].setdefault(env, {})
        section.update(self._decisions)
        try:
            with atomic_path(self.cache_path) as tmp:
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        except OSError as exc:
            warnings.warn(f"could not write the dispatch cache {self.cache_path}: {exc}", RuntimeWarning,
                          stacklevel=3)

    # -- decisions ---------------------------------------------------------------------------------
    def choose(self, layer: str, key: str, run_triton: Callable[[], object], run_cudnn: Callable[[], object], *,
               device_type: str = "cuda", device=None) -> str:
        """``"triton"`` or ``"cudnn"`` for this problem; in ``"auto"`` mode the first call times both."""
        self._layers.setdefault((layer, key), None)
        if self.mode != "auto":
            return self.mode
        if key in self._decisions:
            return self._decisions[key]["choice"]
        if device_type != "cuda" and self.timer is None:
            return "triton"  # the interpreter: nothing meaningful to time
        env = environment_key(device)
        self._load(env)
        if key in self._decisions:
            return self._decisions[key]["choice"]
        timer = self.timer or _time_cuda_us
        triton_us, cudnn_us = float(timer(run_triton)), float(timer(run_cudnn))
        choice = "triton" if triton_us <= cudnn_us else "cudnn"
        self._decisions[key] = {"triton_us": triton_us, "cudnn_us": cudnn_us, "choice": choice}
        self._save(env)
        return choice

    def decided(self, key: str) -> str | None:
        """The forced or cached choice for ``key`` without timing anything (``None``: not decided yet)."""
        if self.mode != "auto":
            return self.mode
        d = self._decisions.get(key)
        return None if d is None else d["choice"]

    def report(self) -> DispatchReport:
        """One row per (layer, problem) this dispatcher has seen, in first-call order."""
        rows = []
        for layer, key in self._layers:
            d = self._decisions.get(key, {})
            rows.append({"layer": layer, "key": key, "triton_us": d.get("triton_us"), "cudnn_us": d.get("cudnn_us"),
                         "choice": d.get("choice", self.mode if self.mode != "auto" else "triton")})
        return DispatchReport(rows)


def _time_cuda_us(fn: Callable[[], object]) -> float:
    from fastdeeplab.timing import time_cuda

    return time_cuda(fn, warmup_ms=10, rep_ms=40).median * 1e3
