"""Per-layer dispatch that cannot lose: check the Triton kernel against cuDNN once per problem, keep the faster.

A :class:`Dispatcher` decides, for each ``(layer geometry, input shape, dtype, device)`` key, whether a fused
module runs its Triton op or its cuDNN form (``F.conv2d`` + the same bias, residual and ReLU). In mode
``"auto"`` the first call of a key:

1. runs the Triton side; any exception (compile, launch, out of resources, ...) means cuDNN for the key;
2. runs the cuDNN side and compares the two outputs (a tensor or a list of tensors) with the project's
   per-dtype kernel tolerances (:data:`fastdeeplab.kernels._utils.KERNEL_TOLERANCES`, the absolute part scaled
   by the output's largest magnitude; NaN and ±inf must sit in the same places): a mismatch means cuDNN,
   whatever the timing;
3. on CUDA (or with an injected timer) times both with :func:`fastdeeplab.timing.time_cuda`
   (``triton.testing.do_bench``, L2 flushed before every run; 10 ms warm-up and 40 ms of repeats, or
   ``$FASTDEEPLAB_AUTOTUNE_MS``'s ``"warmup,rep"``) and keeps the faster.

A fallback to cuDNN warns once (``RuntimeWarning``) naming the layer, the problem and the reason; every
report row carries its ``reason``. ``"triton"`` and ``"cudnn"`` force one side (a failing Triton kernel then
raises, naming the layer). Off CUDA (the interpreter) steps 1 and 2 still run, so the check is testable on a
CPU; step 3 needs a timer.

Decisions persist in a JSON file, one section per environment (GPU name, driver, torch and triton
versions), so a second process decides nothing again:

* the file is ``dispatch.json`` in the package's cache folder (:func:`fastdeeplab._io.cache_dir`:
  ``$FASTDEEPLAB_CACHE_DIR`` or ``$FASTDEEPLAB_CACHE``, else ``$XDG_CACHE_HOME/fastdeeplab``, else
  ``~/.cache/fastdeeplab``);
* it is read with :func:`fastdeeplab._io.read_regular_file` (regular files only, at most 16 MiB: a fifo or a
  device never blocks); a corrupt, unreadable or malformed file (a section that is not a mapping, say) is
  ignored with a warning and rebuilt;
* writes merge with what is on disk under an exclusive lock (``fcntl.flock`` on ``dispatch.json.lock``), so
  concurrent processes lose no decision, and are atomic (:func:`fastdeeplab._io.atomic_path`).

The timer is injectable (``Dispatcher(timer=...)``), which is how the decision logic is tested on a CPU.

>>> import torch
>>> def triton_side(): return torch.ones(4)
>>> def cudnn_side(): return torch.ones(4)
>>> timer = lambda fn: 20.0 if fn is triton_side else 30.0  # µs
>>> d = Dispatcher("auto", timer=timer, cache_path=None)
>>> d.choose("layer1.0.conv2", "k3 s1", triton_side, cudnn_side, device_type="cuda")
'triton'
>>> d.report().rows[0]["choice"], d.report().rows[0]["reason"]
('triton', 'faster')
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["CACHE_ENV", "DISPATCH_MODES", "DispatchReport", "Dispatcher", "default_cache_path", "environment_key",
           "outputs_mismatch"]

DISPATCH_MODES = ("auto", "triton", "cudnn")
CACHE_ENV = "FASTDEEPLAB_CACHE_DIR"
_FORMAT = 1
MAX_CACHE_BYTES = 16 * 2**20
_CHOICES = ("triton", "cudnn")


def default_cache_path() -> Path:
    """Where decisions persist (see the module docstring)."""
    from fastdeeplab._io import cache_dir

    return cache_dir() / "dispatch.json"


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
    """One row per layer and problem: ``layer, key, triton_us, cudnn_us, choice, reason`` (µs are None if
    untimed; ``reason`` says why: ``"faster"``, ``"slower"``, ``"forced"``, ``"untimed"``, or the failure or
    mismatch that sent the problem to cuDNN)."""

    rows: list[dict] = field(default_factory=list)

    def table(self) -> str:
        head = ["layer", "problem", "triton µs", "cuDNN µs", "choice", "reason"]
        body = [[r["layer"], r["key"], _fmt(r["triton_us"]), _fmt(r["cudnn_us"]), r["choice"], r["reason"]]
                for r in self.rows]
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
        mode: ``"auto"`` (check once, time once, keep the faster), ``"triton"`` or ``"cudnn"``.
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
        self._decisions: dict[str, dict] = {}  # key -> {"triton_us", "cudnn_us", "choice", "reason"}
        self._layers: dict[tuple[str, str], None] = {}  # (layer, key) in first-call order
        self._loaded_env: str | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["timer"] = None
        return state

    # -- persistence -------------------------------------------------------------------------------
    def _read_file(self) -> dict:
        """The cache file's contents, ``{}`` (with one warning) when it is missing, unreadable or malformed."""
        if self.cache_path is None or not os.path.lexists(self.cache_path):
            return {}
        from fastdeeplab._io import read_regular_file

        try:
            data = json.loads(read_regular_file(self.cache_path, max_bytes=MAX_CACHE_BYTES, what="dispatch cache"))
            if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("envs"), dict):
                raise ValueError("not a fastdeeplab dispatch cache")
            bad = [env for env, section in data["envs"].items() if not isinstance(section, dict)]
            if bad:
                raise ValueError(f"the section {bad[0]!r} is a {type(data['envs'][bad[0]]).__name__}, not a mapping")
            return data
        except (OSError, ValueError) as exc:
            warnings.warn(f"ignoring the unreadable dispatch cache {self.cache_path} ({exc}); it will be rebuilt",
                          RuntimeWarning, stacklevel=4)
            return {}

    def _load(self, env: str) -> None:
        if self._loaded_env == env:
            return
        self._loaded_env = env
        section = self._read_file().get("envs", {}).get(env, {})
        for key, value in section.items():
            if isinstance(value, dict) and value.get("choice") in _CHOICES:
                self._decisions.setdefault(key, value)

    @contextlib.contextmanager
    def _locked(self):
        """An exclusive lock on ``<cache>.lock`` (POSIX ``flock``; a no-op where it is unavailable)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: atomic writes only
            yield
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.cache_path.with_name(self.cache_path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _save(self, env: str) -> None:
        """Merge this dispatcher's decisions into the file under the lock: other processes' decisions stay."""
        if self.cache_path is None:
            return
        from fastdeeplab._io import atomic_path, json_text

        try:
            with self._locked():
                data = self._read_file() or {"format": _FORMAT, "envs": {}}
                section = data["envs"].setdefault(env, {})
                section.update(self._decisions)
                with atomic_path(self.cache_path) as tmp:
                    tmp.write_text(json_text(data, indent=1, sort_keys=True))
        except (OSError, ValueError) as exc:  # ValueError: atomic_path refuses to replace a fifo, device, ...
            warnings.warn(f"could not write the dispatch cache {self.cache_path}: {exc}; decisions are kept in "
                          "memory", RuntimeWarning, stacklevel=3)

    # -- decisions ---------------------------------------------------------------------------------
    def choose(self, layer: str, key: str, run_triton: Callable[[], object], run_cudnn: Callable[[], object], *,
               device_type: str = "cuda", device=None) -> str:
        """``"triton"`` or ``"cudnn"`` for this problem; in ``"auto"`` mode the first call checks (and, on CUDA,
        times) both sides, see the module docstring."""
        if (layer, key) not in self._layers:
            self._layers[(layer, key)] = None
        if self.mode != "auto":
            return self.mode
        decision = self._decisions.get(key)
        if decision is not None:
            return decision["choice"]
        timed = device_type == "cuda" or self.timer is not None
        env = environment_key(device) if timed else None
        if timed:
            self._load(env)
            if key in self._decisions:
                return self._decisions[key]["choice"]
        decision = self._decide(layer, key, run_triton, run_cudnn, timed)
        self._decisions[key] = decision
        if decision["choice"] == "cudnn" and decision["reason"] not in ("faster", "slower"):
            warnings.warn(f"dispatch: layer {layer} runs cuDNN instead of its Triton kernel for {key}: "
                          f"{decision['reason']}", RuntimeWarning, stacklevel=3)
        if timed:
            self._save(env)
        return decision["choice"]

    def _decide(self, layer: str, key: str, run_triton, run_cudnn, timed: bool) -> dict:
        def cudnn(reason: str) -> dict:
            return {"triton_us": None, "cudnn_us": None, "choice": "cudnn", "reason": reason}

        try:
            got = run_triton()
        except Exception as exc:  # noqa: BLE001 - any failure of the Triton side means cuDNN for this key
            return cudnn(f"the Triton kernel raised {type(exc).__name__}: {_one_line(exc)}")
        expected = run_cudnn()
        mismatch = outputs_mismatch(got, expected)
        if mismatch:
            return cudnn(f"the Triton kernel disagrees with cuDNN ({mismatch})")
        if not timed:
            return {"triton_us": None, "cudnn_us": None, "choice": "triton", "reason": "untimed"}
        timer = self.timer or _time_cuda_us
        try:
            triton_us = float(timer(run_triton))
        except Exception as exc:  # noqa: BLE001 - e.g. a launch that fails only when repeated
            return cudnn(f"the Triton kernel raised {type(exc).__name__} while timed: {_one_line(exc)}")
        cudnn_us = float(timer(run_cudnn))
        choice = "triton" if triton_us <= cudnn_us else "cudnn"
        return {"triton_us": triton_us, "cudnn_us": cudnn_us, "choice": choice,
                "reason": "faster" if choice == "triton" else "slower"}

    def decided(self, key: str) -> str | None:
        """The forced or cached choice for ``key`` without running anything (``None``: not decided yet)."""
        if self.mode != "auto":
            return self.mode
        d = self._decisions.get(key)
        return None if d is None else d["choice"]

    def report(self) -> DispatchReport:
        """One row per (layer, problem) this dispatcher has seen, in first-call order."""
        rows = []
        for layer, key in self._layers:
            d = self._decisions.get(key, {})
            forced = self.mode != "auto"
            rows.append({"layer": layer, "key": key, "triton_us": d.get("triton_us"), "cudnn_us": d.get("cudnn_us"),
                         "choice": self.mode if forced else d.get("choice", "triton"),
                         "reason": "forced" if forced else d.get("reason", "untimed")})
        return DispatchReport(rows)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_list(out: object) -> list:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def outputs_mismatch(actual: object, expected: object) -> str:
    """``""`` when ``actual`` (a tensor or list of tensors) matches ``expected`` within the project's kernel
    tolerances for their dtype (module docstring), else a one-line description of the first difference."""
    from ._utils import KERNEL_TOLERANCES, kernel_tolerance

    a_list, e_list = _as_list(actual), _as_list(expected)
    if len(a_list) != len(e_list):
        return f"{len(a_list)} outputs against {len(e_list)}"
    for i, (a, e) in enumerate(zip(a_list, e_list)):
        where = f"output {i}: " if len(e_list) > 1 else ""
        if not isinstance(a, torch.Tensor) or not isinstance(e, torch.Tensor):
            if isinstance(a, torch.Tensor) or isinstance(e, torch.Tensor) or a != e:
                return f"{where}{type(a).__name__} {a!r:.40} against {type(e).__name__} {e!r:.40}"
            continue
        if a.shape != e.shape:
            return f"{where}shape {list(a.shape)} against {list(e.shape)}"
        if a.dtype != e.dtype:
            return f"{where}dtype {a.dtype} against {e.dtype}"
        tf32 = e.dtype == torch.float32 and e.is_cuda and bool(torch.backends.cudnn.allow_tf32)
        atol, rtol = kernel_tolerance(e.dtype, tf32) if (e.dtype, False) in KERNEL_TOLERANCES else (0.0, 0.0)
        a64, e64 = a.detach().double(), e.detach().double()
        a_nan, e_nan = torch.isnan(a64), torch.isnan(e64)
        if not torch.equal(a_nan, e_nan):
            return f"{where}NaN at {int((a_nan ^ e_nan).sum())} elements where the other side has none"
        a_inf, e_inf = torch.isinf(a64), torch.isinf(e64)
        if not torch.equal(a_inf, e_inf) or not torch.equal(a64[a_inf], e64[e_inf]):
            return f"{where}±inf at different elements"
        finite = ~(e_nan | e_inf)
        if not finite.any():
            continue
        a_f, e_f = a64[finite], e64[finite]
        scale = max(1.0, float(e_f.abs().max()))
        diff = (a_f - e_f).abs()
        bad = diff > atol * scale + rtol * e_f.abs()
        if bool(bad.any()):
            return (f"{where}{int(bad.sum())}/{e_f.numel()} elements off by up to {float(diff.max()):.3g} "
                    f"(atol {atol:g}·{scale:.3g}, rtol {rtol:g}, {str(e.dtype).replace('torch.', '')})")
    return ""


def _time_cuda_us(fn: Callable[[], object]) -> float:
    from fastdeeplab.timing import time_cuda

    from ._utils import autotune_timing

    warmup_ms, rep_ms = autotune_timing() or (10, 40)  # $FASTDEEPLAB_AUTOTUNE_MS shortens it, as for tuning
    return time_cuda(fn, warmup_ms=warmup_ms, rep_ms=rep_ms).median * 1e3
