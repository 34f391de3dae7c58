"""TensorRT engines from the exported ONNX graph, and a runner that behaves like the PyTorch model.

``build_tensorrt_engine`` parses the ONNX file with TensorRT's parser (errors name the ONNX node), adds one
optimization profile for the dynamic ``input`` (``min``/``opt``/``max`` shapes), builds in fp32, fp16 or
int8 and writes the serialized engine atomically. Int8 comes two ways:

* **explicit quantization** (the TensorRT 10 way): an ONNX graph with QuantizeLinear/DequantizeLinear nodes,
  such as :func:`fastdeeplab.export.quantize.quantize_onnx` writes; no calibrator is needed;
* **implicit calibration**: an fp32 graph plus ``calibration_images`` (a folder of photographs or a tensor),
  fed through ``IInt8EntropyCalibrator2`` at the profile's ``opt`` shape, normalised with ImageNet
  statistics; the calibration table is cached in ``calibration_cache``.

``TensorRTModel`` runs an engine on torch CUDA tensors (device pointers and the current torch stream, no
pycuda) and returns ``{"out": float32 [N, K, H, W]}`` like the PyTorch model, plus ``"aux"`` and ``"labels"``
(int64 ``[N, H, W]``) when the engine has them.

TensorRT is imported only inside the functions that need it, so this module imports anywhere; argument
checks, shape parsing and calibration-batch loading run (and are tested) without it.

>>> engine = build_tensorrt_engine("deeplabv3.onnx", "deeplabv3.engine", precision="fp16")  # doctest: +SKIP
>>> model = TensorRTModel(engine)                                                           # doctest: +SKIP
>>> model(torch.rand(1, 3, 513, 513, device="cuda"))["out"].shape                           # doctest: +SKIP
torch.Size([1, 21, 513, 513])
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._io import atomic_path, check_writable_dir

__all__ = [
    "DEFAULT_MAX_SHAPE",
    "DEFAULT_MIN_SHAPE",
    "DEFAULT_OPT_SHAPE",
    "PRECISIONS",
    "CalibrationBatches",
    "TensorRTModel",
    "build_tensorrt_engine",
    "check_profile",
    "parse_shape",
]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
# One profile covering 257² to 1025² (batch 1 to 4), tuned for the common 513² single image.
DEFAULT_MIN_SHAPE = (1, 3, 257, 257)
DEFAULT_OPT_SHAPE = (1, 3, 513, 513)
DEFAULT_MAX_SHAPE = (4, 3, 1025, 1025)
_INSTALL_HINT = "pip install 'fastdeeplab[tensorrt]'"

Shape = tuple[int, int, int, int]


def _require_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ImportError("TensorRT engines need the tensorrt package (NVIDIA GPU, TensorRT 10 or newer): "
                          f"{_INSTALL_HINT}") from exc
    return trt


# --------------------------------------------------------------------------------------------------
# Shapes
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


def _onnx_input(onnx_path: Path) -> tuple[str, list[int | str]] | None:
    """The ONNX graph's single input (name, dims) without loading the weights; ``None`` without onnx."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"{onnx_path} has {len(inputs)} inputs; expected one image batch [N, 3, H, W]")
    dims = [d.dim_param or d.dim_value or "?" for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, dims


def _has_qdq(onnx_path: Path) -> bool:
    try:
        import onnx
    except ImportError:
        return False
    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


# --------------------------------------------------------------------------------------------------
# Calibration data
# --------------------------------------------------------------------------------------------------
class CalibrationBatches:
    """Calibration batches ``[N, 3, H, W]`` float32 at a fixed shape, loaded lazily.

    ``source`` is a folder of images (each resized to ``H×W`` and normalised with ImageNet mean/std) or a
    tensor ``[M, 3, H, W]`` already normalised. A last, partial batch is filled by repeating the first
    images, so every batch has the profile's ``opt`` shape that TensorRT calibrates at.
    ``max_images`` caps how many images are used.
    """

    def __init__(self, source: str | os.PathLike | Tensor, shape: Sequence[int], *,
                 max_images: int | None = None) -> None:
        self.shape = parse_shape(shape)
        n, c, h, w = self.shape
        if c != 3:
            raise ValueError(f"calibration batches have 3 channels, got shape {self.shape}")
        self._files: list[Path] = []
        self._tensor: Tensor | None = None
        if isinstance(source, Tensor):
            if source.dim() != 4 or source.shape[1] != 3 or source.shape[0] == 0:
                raise ValueError(f"calibration tensor must be [M, 3, H, W] with M >= 1, got {tuple(source.shape)}")
            tensor = source.detach().float().cpu()
            if tuple(tensor.shape[-2:]) != (h, w):
                tensor = torch.nn.functional.interpolate(tensor, size=(h, w), mode="bilinear", align_corners=False)
            self._tensor = tensor[:max_images]
            count = self._tensor.shape[0]
        else:
            from ..images import _IMAGE_SUFFIXES

            folder = Path(source)
            if not folder.is_dir():
                raise FileNotFoundError(f"calibration image folder not found: {folder}")
            self._files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)[:max_images]
            if not self._files:
                raise FileNotFoundError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in {folder}")
            count = len(self._files)
        self.num_images = count
        self.num_batches = -(-count // n)

    def __len__(self) -> int:
        return self.num_batches

    def _image(self, index: int) -> Tensor:
        index %= self.num_images
        if self._tensor is not None:
            return self._tensor[index]
        from ..images import load_image, normalize

        return normalize(load_image(self._files[index]), (self.shape[2], self.shape[3]))

    def __iter__(self) -> Iterator[Tensor]:
        n = self.shape[0]
        for b in range(self.num_batches):
            yield torch.stack([self._image(b * n + i) for i in range(n)]).contiguous()


def _make_calibrator(trt: Any, batches: CalibrationBatches | None, cache: Path | None, device: torch.device) -> Any:
    """An ``IInt8EntropyCalibrator2`` feeding ``batches`` from CUDA memory; the cache is read and written."""

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._iter = iter(batches) if batches is not None else iter(())
            self._current: Tensor | None = None  # kept alive while TensorRT reads it
            self.batches_used = 0

        def get_batch_size(self) -> int:
            return batches.shape[0] if batches is not None else 1

        def get_batch(self, names: list[str]) -> list[int] | None:
            try:
                batch = next(self._iter)
            except StopIteration:
                return None
            self._current = batch.to(device, non_blocking=False).contiguous()
            self.batches_used += 1
            log.info("calibration batch %d/%d", self.batches_used, len(batches) if batches else 0)
            return [int(self._current.data_ptr())] * len(names)

        def read_calibration_cache(self) -> bytes | None:
            if cache is not None and cache.is_file():
                log.info("reading calibration cache %s", cache)
                return cache.read_bytes()
            return None

        def write_calibration_cache(self, data: Any) -> None:
            if cache is None:
                return
            with atomic_path(cache) as tmp:
                tmp.write_bytes(bytes(data))
            log.info("wrote calibration cache %s", cache)

    return EntropyCalibrator()


# --------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------
class _Logger:
    """A TensorRT logger that forwards to Python logging (created lazily, needs trt)."""

    @staticmethod
    def create(trt: Any) -> Any:
        class PyLogger(trt.ILogger):  # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                level = {trt.ILogger.INTERNAL_ERROR: logging.CRITICAL, trt.ILogger.ERROR: logging.ERROR,
                         trt.ILogger.WARNING: logging.WARNING, trt.ILogger.INFO: logging.DEBUG}.get(severity,
                                                                                                    logging.DEBUG)
                log.log(level, "TensorRT: %s", msg)

        return PyLogger()


def _parser_errors(parser: Any, onnx_path: Path) -> str:
    """Every parser error with the ONNX node's index, name and op (looked up in the graph when needed)."""
    nodes = None
    try:
        import onnx

        nodes = onnx.load(str(onnx_path), load_external_data=False).graph.node
    except Exception:  # the error message is still useful without the names
        nodes = None
    lines = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        index = int(error.node()) if hasattr(error, "node") else -1
        name = error.node_name() if hasattr(error, "node_name") else ""
        op = error.node_operator() if hasattr(error, "node_operator") else ""
        if nodes is not None and 0 <= index < len(nodes):
            name = name or nodes[index].name
            op = op or nodes[index].op_type
        where = f"node {index} {name!r} ({op})" if index >= 0 else "graph"
        lines.append(f"{where}: {error.desc()}")
    return "\n  ".join(lines) or "unknown parser error"


def build_tensorrt_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, precision: str = "fp16",
                          min_shape: str | Sequence[int] = DEFAULT_MIN_SHAPE,
                          opt_shape: str | Sequence[int] = DEFAULT_OPT_SHAPE,
                          max_shape: str | Sequence[int] = DEFAULT_MAX_SHAPE, workspace_gb: float = 4.0,
                          calibration_images: str | os.PathLike | Tensor | None = None,
                          calibration_cache: str | os.PathLike | None = None,
                          timing_cache: str | os.PathLike | None = None,
                          max_calibration_images: int | None = 500) -> Path:
    """Build a TensorRT engine from an ONNX file exported by :func:`fastdeeplab.export_onnx`.

    Args:
        onnx_path: the ONNX graph (input ``[N, 3, H, W]``).
        engine_path: where to write the serialized engine (atomically: nothing is left on failure).
        precision: ``"fp32"`` (TF32 off), ``"fp16"`` or ``"int8"`` (fp16 allowed as a fallback). Int8 needs a
            QDQ graph (explicit quantization) or ``calibration_images`` / an existing ``calibration_cache``.
        min_shape, opt_shape, max_shape: the optimization profile for the input, ``(N, 3, H, W)`` or
            ``"1x3x513x513"``. TensorRT tunes kernels for ``opt_shape`` and accepts anything in between.
        workspace_gb: builder workspace memory pool limit in GiB.
        calibration_images: a folder of images, or a ``[M, 3, H, W]`` normalised tensor, for int8.
        calibration_cache: calibration table file, read if present and written after calibration.
        timing_cache: TensorRT timing cache file, read if present and written after the build (rebuilds
            are much faster with it).
        max_calibration_images: cap on the images used from the folder.

    Returns the engine's path. Raises ``ImportError`` without TensorRT, ``ValueError`` for bad arguments and
    ``RuntimeError`` naming the ONNX node when parsing fails.
    """
    # Everything that can be checked without TensorRT comes first.
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not workspace_gb > 0:
        raise ValueError(f"workspace_gb must be > 0, got {workspace_gb}")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {onnx_path}")
    engine_path = Path(engine_path)
    if engine_path.resolve() == onnx_path.resolve():
        raise ValueError(f"engine_path would overwrite the ONNX model {onnx_path}")
    check_writable_dir(engine_path)
    info = _onnx_input(onnx_path)
    input_name = info[0] if info else "input"
    lo, opt, hi = check_profile(min_shape, opt_shape, max_shape, onnx_dims=info[1] if info else None)
    calibration_cache = Path(calibration_cache) if calibration_cache is not None else None
    explicit = precision == "int8" and _has_qdq(onnx_path)
    batches = None
    if precision == "int8" and not explicit:
        if calibration_images is not None:
            batches = CalibrationBatches(calibration_images, opt, max_images=max_calibration_images)
        elif calibration_cache is None or not calibration_cache.is_file():
            raise ValueError("precision='int8' needs calibration_images (a folder of representative images), an "
                             "existing calibration_cache, or a QDQ-quantized ONNX graph (quantize_onnx)")
    timing_cache = Path(timing_cache) if timing_cache is not None else None

    trt = _require_tensorrt()
    if not torch.cuda.is_available():
        raise RuntimeError("building a TensorRT engine needs a CUDA GPU; none is visible to torch")
    logger = _Logger.create(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n  {_parser_errors(parser, onnx_path)}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, lo, opt, hi)
    config.add_optimization_profile(profile)
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    calibrator = None
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        if not explicit:
            calibrator = _make_calibrator(trt, batches, calibration_cache, torch.device("cuda"))
            config.int8_calibrator = calibrator
            config.set_calibration_profile(profile)
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            log.warning("timing cache %s does not match this GPU/TensorRT; starting a new one", timing_cache)
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=True)

    log.info("building %s TensorRT engine from %s (profile min %s, opt %s, max %s)", precision, onnx_path,
             lo, opt, hi)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}; set logging to DEBUG for "
                           "the builder's messages (logging.getLogger('fastdeeplab.export.tensorrt'))")

    with atomic_path(engine_path) as tmp:
        with open(tmp, "wb") as f:
            f.write(memoryview(serialized))
    if timing_cache is not None:
        with atomic_path(timing_cache) as tmp:
            tmp.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    return engine_path


def __getattr__(name: str) -> Any:  # TensorRTModel lives in fastdeeplab.runtime.tensorrt (the runtime contract)
    if name == "TensorRTModel":
        from ..runtime.tensorrt import TensorRTModel

        return TensorRTModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
