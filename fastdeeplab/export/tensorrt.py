"""TensorRT engines from the exported ONNX graph, built strongly typed: the precision is the graph's.

``build_tensorrt_engine`` parses the ONNX file with TensorRT's parser (errors name the ONNX node) into a
strongly typed network (:func:`fastdeeplab.runtime.tensorrt.network_flags`: ``STRONGLY_TYPED`` on 10.x,
always on in 11.x), adds one optimization profile per entry of ``profiles`` and writes the serialized engine
atomically. No builder precision flag nor int8 calibrator is used (TensorRT 11 removed them):

* **fp32**: the fp32 graph, TF32 off;
* **fp16**: an fp16 graph with fp32 I/O (``export_onnx(precision="fp16")``); given an fp32 graph and
  ``precision="fp16"``, the build writes that graph itself beside the engine (``<engine>.fp16.onnx``, with
  ``keep_fp32`` layers kept in fp32);
* **int8**: an explicit Q/DQ graph (``quantize_onnx(..., tensorrt_compatible=True)``: symmetric, zero points
  0, int8 weights); given an fp32 graph, ``precision="int8"`` and ``calibration_images``, the build
  calibrates and writes it beside the engine (``<engine>.int8.onnx``, or ``calibration_cache``: reused when
  it exists).

Where TensorRT and a GPU are present the build then checks its own engine
(:mod:`fastdeeplab.export.engine_report`): it runs the engine against ONNX Runtime on the calibration or
sample images at each profile's ``opt`` shape (max error, pixel agreement) and saves, beside the engine,
``<engine>.build.json`` (the report), ``<engine>.layers.json`` (the engine inspector's layer list) and
``<engine>.profile.json`` (per-layer times).

Arguments, profiles, the graph's precision and calibration data are checked before TensorRT is imported, and
are tested without it.

>>> build_tensorrt_engine("deeplabv3.onnx", "deeplabv3.engine", precision="fp16",            # doctest: +SKIP
...                       profiles=[(1, 513, 513), (1, 1024, 2048)])
>>> model = TensorRTModel("deeplabv3.engine")                                                # doctest: +SKIP
>>> model(torch.rand(1, 3, 513, 513, device="cuda"))["out"].shape                            # doctest: +SKIP
torch.Size([1, 21, 513, 513])
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._io import atomic_path, check_output_path
from ..runtime.onnx_files import check_onnx_file, load_onnx
from ..runtime.tensorrt import (
    Profile,
    check_profile,
    create_logger,
    describe_profiles,
    make_profiles,
    network_flags,
    parse_shape,
    require_tensorrt,
)
from .calibration import CalibrationBatches

__all__ = [
    "DEFAULT_MAX_SHAPE",
    "DEFAULT_MIN_SHAPE",
    "DEFAULT_OPT_SHAPE",
    "PRECISIONS",
    "CalibrationBatches",
    "Profile",
    "build_tensorrt_engine",
    "check_profile",
    "graph_precision",
    "make_profiles",
    "parse_shape",
]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
# The profile used when neither ``profiles`` nor min/opt/max shapes are given: 257² to 1025², batch 1 to 4,
# tuned for the common 513² single image.
DEFAULT_MIN_SHAPE = (1, 3, 257, 257)
DEFAULT_OPT_SHAPE = (1, 3, 513, 513)
DEFAULT_MAX_SHAPE = (4, 3, 1025, 1025)


# --------------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------------
def _onnx_input(onnx_path: Path) -> tuple[str, list[int | str], int] | None:
    """The ONNX graph's single input (name, dims, elem_type) without the weights; ``None`` without onnx."""
    if importlib.util.find_spec("onnx") is None:
        check_onnx_file(onnx_path)
        return None
    model = load_onnx(onnx_path, load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"{onnx_path} has {len(inputs)} inputs; expected one image batch [N, 3, H, W]")
    dims = [d.dim_param or d.dim_value or "?" for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, dims, inputs[0].type.tensor_type.elem_type


def graph_precision(model: Any) -> str:
    """``"int8"`` (Q/DQ nodes), ``"fp16"`` (fp16 Conv weights) or ``"fp32"``: what a strongly typed build of
    ``model`` (an ``onnx.ModelProto`` or a path) runs in."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = load_onnx(model)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        return "int8"
    weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1}
    types = {t.name: t.data_type for t in model.graph.initializer if t.name in weights}
    return "fp16" if onnx.TensorProto.FLOAT16 in types.values() else "fp32"


# --------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------
def _parser_errors(parser: Any, onnx_path: Path) -> str:
    """Every parser error with the ONNX node's index, name and op (looked up in the graph when needed)."""
    nodes = None
    try:

        nodes = load_onnx(onnx_path, load_external_data=False).graph.node
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


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name.removesuffix(path.suffix) + suffix)


def _graph_for(precision: str | None, onnx_path: Path, engine_path: Path, *, keep_fp32: Sequence[str],
               calibration_images: Any, calibration_cache: Path | None, opt: Sequence[int],
               max_calibration_images: int | None) -> tuple[str, Path, Any]:
    """The precision, the graph to build, and a function writing that graph (``None`` when it exists)."""
    have = graph_precision(onnx_path)
    precision = precision or have
    if precision == have:
        if keep_fp32:
            raise ValueError("keep_fp32 applies when the build writes the fp16 graph from an fp32 one; this graph "
                             f"is already {have}: export it with export_onnx(precision='fp16', keep_fp32=...)")
        return precision, onnx_path, None
    if have != "fp32":
        raise ValueError(f"precision={precision!r} but {onnx_path} is a {have} graph; a strongly typed build runs "
                         "the graph's precision: pass precision=None or the fp32 graph")
    if precision == "fp16":
        target = _sibling(engine_path, ".fp16.onnx")

        def write() -> None:
            import onnx

            from .checks import check_fp16_graph
            from .passes import convert_float16

            proto = load_onnx(onnx_path)
            kept = convert_float16(proto, keep_fp32=keep_fp32)
            found = check_fp16_graph(proto, kept=kept)
            if not found.ok:
                raise RuntimeError(f"the fp16 graph written from {onnx_path} fails its check: {found}")
            with atomic_path(target) as tmp:
                onnx.save_model(proto, tmp)

        return precision, target, write
    if keep_fp32:
        raise ValueError("keep_fp32 names layers of an fp16 build")
    target = calibration_cache or _sibling(engine_path, ".int8.onnx")
    if calibration_cache is not None and calibration_cache.is_file():
        if graph_precision(calibration_cache) != "int8":
            raise ValueError(f"calibration_cache {calibration_cache} is not a Q/DQ graph (TensorRT 10/11 int8 is "
                             "explicit quantization: the cache is the calibrated Q/DQ ONNX graph)")
        return precision, target, None
    if calibration_images is None:
        raise ValueError("precision='int8' needs calibration_images (a folder of representative images) to write "
                         "the Q/DQ graph, an existing calibration_cache (a Q/DQ graph), or a Q/DQ-quantized ONNX "
                         "graph (quantize_onnx(..., tensorrt_compatible=True))")
    if isinstance(calibration_images, (str, os.PathLike)) and not Path(calibration_images).is_dir():
        raise FileNotFoundError(f"calibration image folder not found: {calibration_images}")

    def quantize() -> None:
        from .quantize import quantize_onnx

        quantize_onnx(onnx_path, target, calibration_images, input_size=(opt[2], opt[3]),
                      max_images=max_calibration_images, tensorrt_compatible=True)

    return precision, target, quantize


def build_tensorrt_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *,
                          precision: str | None = None, profiles: Sequence[Any] | None = None,
                          min_shape: str | Sequence[int] | None = None, opt_shape: str | Sequence[int] | None = None,
                          max_shape: str | Sequence[int] | None = None, workspace_gb: float = 4.0,
                          keep_fp32: Sequence[str] = (),
                          calibration_images: str | os.PathLike | Tensor | None = None,
                          calibration_cache: str | os.PathLike | None = None,
                          timing_cache: str | os.PathLike | None = None,
                          max_calibration_images: int | None = 500, check: bool = True,
                          check_images: str | os.PathLike | Tensor | None = None) -> Path:
    """Build a strongly typed TensorRT engine from an ONNX file exported by :func:`fastdeeplab.export_onnx`.

    Args:
        onnx_path: the ONNX graph (input ``[N, 3, H, W]``).
        engine_path: where to write the serialized engine (atomically: nothing is left on failure).
        precision: ``None`` (the graph's: :func:`graph_precision`), ``"fp32"``, ``"fp16"`` or ``"int8"``.
            Asking for fp16 or int8 with an fp32 graph writes that graph first (module docstring); asking for
            another precision than a reduced-precision graph's raises.
        profiles: optimization profiles, see :func:`fastdeeplab.runtime.tensorrt.make_profiles`, e.g.
            ``[(1, 513, 513), (1, 1024, 2048)]``. Default: one profile from ``min_shape``/``opt_shape``/
            ``max_shape`` (each ``(N, 3, H, W)`` or ``"1x3x513x513"``; 257² to 1025² for batch 1 to 4).
        workspace_gb: builder workspace memory pool limit in GiB.
        keep_fp32: fp16 from an fp32 graph: layers kept in fp32 (module paths or node names).
        calibration_images: int8 from an fp32 graph: a folder of images or a ``[M, 3, H, W]`` normalised tensor.
        calibration_cache: int8: where the calibrated Q/DQ graph goes; reused when it exists.
        timing_cache: TensorRT timing cache file, read if present and written after the build.
        max_calibration_images: cap on the calibration images.
        check: run the engine against ONNX Runtime and save the layer list and per-layer times (GPU).
        check_images: images for that check (default: the calibration images, else scikit-image's photos).

    Returns the engine's path. Raises ``ImportError`` without TensorRT, ``ValueError`` for bad arguments and
    ``RuntimeError`` naming the ONNX node when parsing fails.
    """
    # Everything that can be checked without TensorRT comes first.
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (or None: the graph's), got {precision!r}")
    if not workspace_gb > 0:
        raise ValueError(f"workspace_gb must be > 0, got {workspace_gb}")
    onnx_path = check_onnx_file(onnx_path)
    engine_path = Path(engine_path)
    if engine_path.expanduser().resolve() == onnx_path.resolve():
        raise ValueError(f"engine_path would overwrite the ONNX model {onnx_path}")
    check_output_path(engine_path, what="engine")
    info = _onnx_input(onnx_path)
    input_name = info[0] if info else "input"
    if profiles is None:
        profiles = [(min_shape or DEFAULT_MIN_SHAPE, opt_shape or DEFAULT_OPT_SHAPE, max_shape or DEFAULT_MAX_SHAPE)]
    elif min_shape is not None or opt_shape is not None or max_shape is not None:
        raise ValueError("pass either profiles or min_shape/opt_shape/max_shape, not both")
    built_profiles = make_profiles(profiles, onnx_dims=info[1] if info else None)
    calibration_cache = Path(calibration_cache) if calibration_cache is not None else None
    if calibration_cache is not None:
        check_output_path(calibration_cache, what="calibration cache")
    precision, graph_path, write_graph = _graph_for(
        precision, onnx_path, engine_path, keep_fp32=keep_fp32, calibration_images=calibration_images,
        calibration_cache=calibration_cache, opt=built_profiles[0].opt, max_calibration_images=max_calibration_images)
    timing_cache = Path(timing_cache) if timing_cache is not None else None

    trt = require_tensorrt()
    if not torch.cuda.is_available():
        raise RuntimeError("building a TensorRT engine needs a CUDA GPU; none is visible to torch")
    if write_graph is not None:
        write_graph()
    start = time.perf_counter()
    logger = create_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph_path)):
        raise RuntimeError(f"TensorRT could not parse {graph_path}:\n  {_parser_errors(parser, graph_path)}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for p in built_profiles:
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, p.min, p.opt, p.max)
        config.add_optimization_profile(profile)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 rounds the inputs to 10 bits
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer names for the inspector and profiler
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            log.warning("timing cache %s does not match this GPU/TensorRT; starting a new one", timing_cache)
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=True)

    log.info("building a strongly typed %s TensorRT %s engine from %s (profiles %s)", precision, trt.__version__,
             graph_path, describe_profiles(built_profiles))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {graph_path}; set logging to DEBUG for "
                           "the builder's messages (logging.getLogger('fastdeeplab.tensorrt'))")
    with atomic_path(engine_path) as tmp:
        with open(tmp, "wb") as f:
            f.write(memoryview(serialized))
    if timing_cache is not None:
        with atomic_path(timing_cache) as tmp:
            tmp.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    build_seconds = time.perf_counter() - start

    from .engine_report import write_engine_report

    write_engine_report(engine_path, reference=onnx_path, graph=graph_path, precision=precision,
                        profiles=built_profiles, build_seconds=build_seconds, check=check,
                        images=check_images if check_images is not None else calibration_images,
                        tensorrt_version=trt.__version__)
    return engine_path


def __getattr__(name: str) -> Any:  # TensorRTModel lives in fastdeeplab.runtime.tensorrt (the runtime contract)
    if name == "TensorRTModel":
        from ..runtime.tensorrt import TensorRTModel

        return TensorRTModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
