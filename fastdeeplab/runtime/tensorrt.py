"""TensorRT behind the runtime contract: :class:`TensorRTModel`, plus what the engine build shares with it —
the one place that detects the TensorRT version (:func:`require_tensorrt`), the network flags of a strongly
typed build (:func:`network_flags`), and optimization profiles (:class:`Profile`, :func:`make_profiles`,
:func:`select_profile`).

Supported: TensorRT 10.x (every 10 release has ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``) and 11.x
(strongly typed always). Precision lives in the ONNX graph (fp16 casts, int8 Q/DQ); no builder precision
flag nor calibrator is used, so nothing here touches the APIs 11.x removed.

TensorRT is imported only inside the functions that need it: this module imports anywhere, and profile
selection runs (and is tested) without TensorRT.

>>> profiles = make_profiles([(1, 513, 513), (1, 1024, 2048)])
>>> select_profile(profiles, (1, 3, 1024, 2048))
1
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..model import check_input
from .base import RuntimeModel, finish_outputs

__all__ = [
    "INSTALL_HINT",
    "SUPPORTED",
    "Profile",
    "TensorRTModel",
    "check_tensorrt_version",
    "make_profiles",
    "network_flags",
    "parse_shape",
    "require_tensorrt",
    "select_profile",
]

log = logging.getLogger("fastdeeplab.tensorrt")

# The one statement of what is supported; pyproject.toml's `tensorrt` extra pins the same range.
SUPPORTED = ((10, 0), (12, 0))  # from 10.0 (strongly typed networks) up to, not including, 12.0
INSTALL_HINT = ("TensorRT engines need the tensorrt package, TensorRT 10.0 to 11.x, on a machine with an NVIDIA "
                "GPU: pip install 'fastdeeplab[tensorrt]'")

Shape = tuple[int, int, int, int]


# --------------------------------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------------------------------
def check_tensorrt_version(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a TensorRT version string, or a ``RuntimeError`` when it is outside
    :data:`SUPPORTED`."""
    match = re.match(r"(\d+)\.(\d+)", str(version))
    if not match:
        raise RuntimeError(f"cannot read the TensorRT version {version!r}")
    found = int(match.group(1)), int(match.group(2))
    lo, hi = SUPPORTED
    if not lo <= found < hi:
        raise RuntimeError(f"TensorRT {version} is not supported: fastdeeplab builds strongly typed networks on "
                           f"TensorRT {lo[0]}.{lo[1]} to {hi[0] - 1}.x (pip install 'fastdeeplab[tensorrt]')")
    return found


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, checked to be a supported version; ``ImportError`` naming the extra."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    check_tensorrt_version(getattr(trt, "__version__", "0.0"))
    return trt


def network_flags(trt: Any) -> int:
    """Creation flags of a strongly typed network: ``STRONGLY_TYPED`` on 10.x (where it is opt-in); 11.x
    networks are always strongly typed and accept the flag without effect, so it is set where it exists."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    major = check_tensorrt_version(trt.__version__)[0]
    if flag is None and major < 11:
        raise RuntimeError(f"TensorRT {trt.__version__} has no STRONGLY_TYPED network flag")
    return 0 if flag is None else 1 << int(flag)


def create_logger(trt: Any) -> Any:
    """A TensorRT logger that forwards to Python logging (``fastdeeplab.tensorrt``)."""

    class PyLogger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            level = {trt.ILogger.INTERNAL_ERROR: logging.CRITICAL, trt.ILogger.ERROR: logging.ERROR,
                     trt.ILogger.WARNING: logging.WARNING}.get(severity, logging.DEBUG)
            log.log(level, "TensorRT: %s", msg)

    return PyLogger()


# --------------------------------------------------------------------------------------------------
# Optimization profiles
# --------------------------------------------------------------------------------------------------
def parse_shape(value: str | Sequence[int]) -> Shape:
    """``"1x3x513x513"``, ``"1,3,513,513"`` or a 4-sequence → ``(N, C, H, W)`` of positive ints."""
    if isinstance(value, str):
        parts = value.lower().replace("x", ",").replace(" ", "").split(",")
        try:
            dims = [int(p) for p in parts if p]
        except ValueError:
            raise ValueError(f"cannot parse shape {value!r}: expected N,C,H,W such as 1x3x513x513") from None
    else:
        dims = [int(d) for d in value]
    if len(dims) != 4 or any(d < 1 for d in dims):
        raise ValueError(f"a shape must be 4 positive integers (N, C, H, W), got {value!r}")
    return dims[0], dims[1], dims[2], dims[3]


@dataclass(frozen=True)
class Profile:
    """One optimization profile of the image input: TensorRT accepts any shape between ``min`` and ``max``
    (per dimension) and tunes its kernels for ``opt``."""

    min: Shape
    opt: Shape
    max: Shape

    def contains(self, shape: Sequence[int]) -> bool:
        return len(shape) == 4 and all(a <= s <= b for s, a, b in zip(shape, self.min, self.max))

    def __str__(self) -> str:
        def fmt(s: Shape) -> str:
            return "x".join(map(str, s))

        return f"min {fmt(self.min)} opt {fmt(self.opt)} max {fmt(self.max)}"

    def as_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def check_profile(min_shape: str | Sequence[int], opt_shape: str | Sequence[int], max_shape: str | Sequence[int],
                  *, onnx_dims: Sequence[int | str] | None = None) -> tuple[Shape, Shape, Shape]:
    """Parse and check an optimization profile: ``min <= opt <= max`` per dim, 3 channels, and, given the
    ONNX input's dims (``int`` = fixed, ``str`` = dynamic), fixed dims equal in all three shapes."""
    lo, opt, hi = parse_shape(min_shape), parse_shape(opt_shape), parse_shape(max_shape)
    for i, name in enumerate("NCHW"):
        if not lo[i] <= opt[i] <= hi[i]:
            raise ValueError(f"profile dim {name}: need min <= opt <= max, got {lo[i]}, {opt[i]}, {hi[i]} "
                             f"(min {lo}, opt {opt}, max {hi})")
    if lo[1] != 3 or hi[1] != 3:
        raise ValueError(f"the input has 3 channels (RGB); the profile asks for {lo[1]} to {hi[1]}")
    if onnx_dims is not None:
        if len(onnx_dims) != 4:
            raise ValueError(f"the ONNX input has {len(onnx_dims)} dims, expected 4 (N, C, H, W)")
        for i, dim in enumerate(onnx_dims):
            if isinstance(dim, int) and dim > 0 and not lo[i] == opt[i] == hi[i] == dim:
                raise ValueError(f"the ONNX input's dim {'NCHW'[i]} is fixed at {dim} but the profile spans "
                                 f"{lo[i]} to {hi[i]}; export with dynamic=True or use {dim}")
    return lo, opt, hi


def _profile_of(entry: Any, onnx_dims: Sequence[int | str] | None) -> Profile:
    if isinstance(entry, Profile):
        return Profile(*check_profile(entry.min, entry.opt, entry.max, onnx_dims=onnx_dims))
    if isinstance(entry, (tuple, list)) and len(entry) == 3 and all(
            isinstance(e, (str, tuple, list)) for e in entry):  # (min, opt, max)
        return Profile(*check_profile(*entry, onnx_dims=onnx_dims))
    if isinstance(entry, str) or (isinstance(entry, (tuple, list)) and len(entry) in (3, 4)):
        dims = parse_shape(entry) if isinstance(entry, str) or len(entry) == 4 else parse_shape(
            (entry[0], 3, entry[1], entry[2]))
        n, c, h, w = dims
        lo = (1, c, -(-h // 2), -(-w // 2))
        if onnx_dims is not None and len(onnx_dims) == 4:  # fixed dims stay fixed
            lo = tuple(d if isinstance(d, int) and d > 0 else v for d, v in zip(onnx_dims, lo))
        return Profile(*check_profile(lo, dims, dims, onnx_dims=onnx_dims))
    raise ValueError(f"a profile is (N, H, W), (N, 3, H, W), 'NxCxHxW', (min, opt, max) or a Profile; got {entry!r}")


def make_profiles(entries: Sequence[Any], *, onnx_dims: Sequence[int | str] | None = None) -> list[Profile]:
    """Optimization profiles from ``entries``; each one is

    * a shape ``(N, H, W)``, ``(N, 3, H, W)`` or ``"1x3x513x513"``: the profile's ``opt`` and ``max``, with
      ``min`` batch 1 at half the height and width (rounded up): ``(1, 513, 513)`` accepts 1x3x257x257 to
      1x3x513x513;
    * a ``(min, opt, max)`` triple of shapes, or a :class:`Profile`.

    Each is checked (``min <= opt <= max``, 3 channels, fixed ONNX dims respected).
    """
    if isinstance(entries, (str, Profile)) or not isinstance(entries, Sequence) or not entries:
        raise ValueError(f"profiles must be a non-empty list, e.g. [(1, 513, 513), (1, 1024, 2048)]; got {entries!r}")
    return [_profile_of(e, onnx_dims) for e in entries]


def describe_profiles(profiles: Sequence[Profile]) -> str:
    return "; ".join(f"#{i} {p}" for i, p in enumerate(profiles))


def select_profile(profiles: Sequence[Profile], shape: Sequence[int]) -> int:
    """Index of the profile that runs ``shape``: of those containing it, the one with the smallest ``max``
    (the tightest tuning), the first on a tie. Outside every profile: a ``ValueError`` naming them all."""
    shape = tuple(int(s) for s in shape)
    fits = [i for i, p in enumerate(profiles) if p.contains(shape)]
    if not fits:
        raise ValueError(f"input shape {'x'.join(map(str, shape))} is outside the engine's profiles "
                         f"({describe_profiles(profiles)}); rebuild the engine with a profile that covers it, "
                         "e.g. build_tensorrt_engine(..., profiles=[(1, 513, 513), (1, 1024, 2048)])")

    def volume(p: Profile) -> int:
        n, c, h, w = p.max
        return n * c * h * w

    return min(fits, key=lambda i: (volume(profiles[i]), i))


def _check_in_profile(shape: Sequence[int], lo: Sequence[int], hi: Sequence[int]) -> None:
    """One profile from ``lo`` to ``hi``: raise unless ``shape`` is inside it."""
    select_profile([Profile(tuple(lo), tuple(lo), tuple(hi))], shape)


# --------------------------------------------------------------------------------------------------
# The runtime
# --------------------------------------------------------------------------------------------------
def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT8: torch.int8,
             trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool}
    for name, torch_dtype in (("INT64", torch.int64), ("BF16", torch.bfloat16), ("UINT8", torch.uint8)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = torch_dtype
    if dtype not in table:
        raise TypeError(f"TensorRT tensor type {dtype} has no torch equivalent")
    return table[dtype]


class _Session:
    """A deserialized engine and one execution context per optimization profile (made on first use)."""

    def __init__(self, trt: Any, path: Path, device: torch.device) -> None:
        self.trt = trt
        self.logger = create_logger(trt)  # TensorRT keeps a raw pointer: keep the object alive
        with torch.cuda.device(device):
            self.runtime = trt.Runtime(self.logger)
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{path} is not a TensorRT engine for this TensorRT version and GPU")
        self.contexts: dict[int, Any] = {}

    def context(self, profile: int, stream: int) -> Any:
        if profile not in self.contexts:
            context = self.engine.create_execution_context()
            if profile:
                context.set_optimization_profile_async(profile, stream)
            self.contexts[profile] = context
        return self.contexts[profile]


def run_engine(session: _Session, profile: int, inputs: dict[str, Tensor], output_names: Sequence[str],
               dtypes: dict[str, torch.dtype], device: torch.device, profiler: Any = None) -> dict[str, Tensor]:
    """Run the engine on CUDA tensors ``inputs`` with ``profile``'s context on torch's current stream."""
    stream = torch.cuda.current_stream(device)
    context = session.context(profile, stream.cuda_stream)
    if profiler is not None:
        context.profiler = profiler
    for name, x in inputs.items():
        context.set_input_shape(name, tuple(x.shape))
        context.set_tensor_address(name, x.data_ptr())
    results: dict[str, Tensor] = {}
    for out in output_names:
        shape = tuple(context.get_tensor_shape(out))
        if any(d < 0 for d in shape):
            raise RuntimeError(f"TensorRT could not infer the shape of output {out!r}: {shape}")
        results[out] = torch.empty(shape, dtype=dtypes[out], device=device)
        context.set_tensor_address(out, results[out].data_ptr())
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT execution failed (execute_async_v3 returned False)")
    if profiler is not None:
        stream.synchronize()  # the profiler reports once the enqueued work has finished
    return results


class TensorRTModel(RuntimeModel):
    """A TensorRT engine behind the runtime contract: ``model(x)`` with ``x`` ``[N, 3, H, W]`` (normalised RGB,
    float32 or float16, on ``device``) returns ``{"out": [N, K, H, W]}`` in ``x``'s dtype, plus ``"aux"`` and
    ``"labels"`` (int64 ``[N, H, W]``, as every runtime) when the engine has them. Engines built from a
    ``uint8_input`` graph take ``uint8`` pixels instead and return float32 logits.

    Several optimization profiles: each input runs in the tightest profile that contains its shape
    (:func:`select_profile`); an input outside every profile gets a ``ValueError`` naming them. An input on
    another device is refused by name. The engine is deserialized on construction (to read its tensors and
    profiles), dropped when the model is pickled, and deserialized again on the next call. It runs on torch's
    current CUDA stream, so it orders correctly with surrounding torch work.
    """

    backend = "tensorrt"
    packages = ("tensorrt",)
    dtypes = (torch.float32, torch.float16)
    device_type = "cuda"

    def __init__(self, engine_path: str | os.PathLike, device: str | torch.device = "cuda") -> None:
        super().__init__()
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise FileNotFoundError(f"TensorRT engine not found: {engine_path}")
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"TensorRT runs on CUDA devices, got device {str(device)!r}")
        trt = require_tensorrt()
        if not torch.cuda.is_available():
            raise RuntimeError("running a TensorRT engine needs a CUDA GPU; none is visible to torch")
        self.device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        self.engine_path = engine_path
        session = self._build(None)
        engine = session.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        mode = engine.get_tensor_mode
        self.input_names = [n for n in names if mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if mode(n) == trt.TensorIOMode.OUTPUT]
        if len(self.input_names) != 1:
            raise ValueError(f"expected an engine with one input, got {self.input_names}")
        self.tensor_dtypes = {n: _torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        self.input_dtype = self.tensor_dtypes[self.input_names[0]]
        self.profiles = [Profile(*(tuple(s) for s in engine.get_tensor_profile_shape(self.input_names[0], i)))
                         for i in range(engine.num_optimization_profiles)]
        self._session = session

    @property
    def output_stride(self) -> int:
        return 1  # the profiles bound the input size: select_profile names them when an input falls outside

    def extra_repr(self) -> str:
        return (f"engine={str(self.engine_path)!r}, device={self.device}, inputs={self.input_names}, "
                f"outputs={self.output_names}, profiles: {describe_profiles(self.profiles)}")

    def check_device(self, x: Tensor) -> None:
        super().check_device(x)
        if x.device != self.device:
            raise ValueError(f"the engine is on {self.device}; got an input on {x.device}")

    def _build(self, x: Tensor | None) -> _Session:
        return _Session(require_tensorrt(), self.engine_path, self.device)

    def _run(self, session: _Session, x: Tensor) -> dict[str, Tensor]:
        profile = select_profile(self.profiles, tuple(x.shape))
        name = self.input_names[0]
        x = x.to(self.tensor_dtypes[name]).contiguous()
        with torch.cuda.device(self.device):  # the engine's GPU and its current stream, whatever is current
            return run_engine(session, profile, {name: x}, self.output_names, self.tensor_dtypes, self.device)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if self.input_dtype != torch.uint8:
            return super().forward(x)
        if not isinstance(x, Tensor) or x.dtype != torch.uint8:
            raise TypeError(f"this engine takes raw uint8 RGB pixels [N, 3, H, W]; got "
                            f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
        check_input(torch.empty(x.shape, device="meta"), self.output_stride)
        self.check_device(x)
        with torch.no_grad():
            outputs = self._run(self.session(x), x)
        return finish_outputs(outputs, torch.float32)
