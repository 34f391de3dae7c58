"""What the benchmark compares: the shared weights, the torchvision reference, and every implementation.

All implementations are derived from one state dict, loaded into a genuine torchvision ``DeepLabV3`` of the
``--backbone`` (:func:`fastdeeplab.weights.torchvision_reference`): for a ResNet, at output stride 8
``torchvision.models.segmentation.deeplabv3_resnet50`` as shipped and at 16 rebuilt the torchvision way
(``replace_stride_with_dilation=[False, False, True]``, ASPP rates 6/12/18); for MobileNetV3-Large,
``deeplabv3_mobilenet_v3_large`` as shipped at 16 and at 8 with fastdeeplab's strides and dilations.
Every other implementation starts from that reference module (``fastdeeplab.from_torchvision``), so all
rows share the same weights.

An implementation's ``build(reference, setting)`` returns a :class:`Built` (a callable from an input batch
``[N, 3, H, W]`` to logits ``[N, K, H, W]``) or raises :class:`Unavailable` with the reason it cannot run
here; the suite turns that into a skip whose reason lands in the summary table.
"""

from __future__ import annotations

import copy
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastdeeplab.metrics import logits_of

from ._weights import (  # noqa: F401  (re-exported: tests and older code import them from here)
    DEPTHS,
    Weights,
    cached_torchvision_weights,
    random_state_dict,
    resolve_weights,
    torchvision_reference,
)

__all__ = [
    "Built",
    "IMPLEMENTATIONS",
    "Implementation",
    "Setting",
    "Unavailable",
    "Weights",
    "cached_torchvision_weights",
    "count_gflop",
    "cpu_bf16_supported",
    "random_state_dict",
    "resolve_weights",
    "torchvision_reference",
]

# Compile time of torch.compile (inductor) for DeepLabv3-ResNet-50 at 513x513 on the 2-core development
# machine (measured once; it scales with the graph, not the resolution).
CPU_COMPILE_SECONDS = 35


class Unavailable(RuntimeError):
    """An implementation cannot run in this environment; ``str(exc)`` says why (becomes the skip reason)."""


def count_gflop(backbone: str | int, num_classes: int, output_stride: int, resolution: int) -> float:
    """GFLOP of one forward of one image (``FlopCounterMode`` on the reference, on the meta device: convs
    and matmuls as 2·MAC; BN, ReLU, pooling and the final upsampling are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = torchvision_reference(backbone, num_classes, output_stride)
        x = torch.empty(1, 3, resolution, resolution)
        with FlopCounterMode(display=False) as counter:
            model(x)
    return counter.get_total_flops() / 1e9


# --------------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------------
@dataclass
class Setting:
    """What a row runs at."""

    output_stride: int
    device: torch.device
    dtype: torch.dtype
    resolution: int
    batch: int
    workdir: Path  # scratch space for exported graphs and engines
    explicit: bool = False  # the implementation was asked for with --impl
    static_shape: bool = True  # only [batch, 3, resolution, resolution] inputs (False with --data)
    threads: int | None = None  # CPU threads for ONNX Runtime / OpenVINO (None: the library's default)
    eager: nn.Module | None = None  # from_torchvision(reference), made once per output stride (CPU, fp32)
    calibration: Callable[[], Tensor] | None = None  # int8 calibration images [M, 3, H, W] (not scored ones)
    shared: dict[str, Any] = field(default_factory=dict)  # artefacts shared by the rows of one setting

    def shared_artifact(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()`` once per setting (e.g. one ONNX export of torchvision for the two peer runtimes)."""
        if key not in self.shared:
            self.shared[key] = make()
        return self.shared[key]


@dataclass
class Built:
    """A ready-to-time implementation: ``fn(x [N, 3, H, W] in input_dtype) -> logits [N, K, H, W]``."""

    fn: Callable[[Tensor], Tensor]
    input_dtype: torch.dtype
    build_s: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Implementation:
    """One row of the table. ``precision`` overrides ``--dtype`` for the CPU precision rows
    (``"bfloat16"``, ``"int8"``); ``peer`` marks what a user would run without fastdeeplab."""

    name: str
    description: str
    build: Callable[[nn.Module, Setting], Built]
    precision: str | None = None
    peer: bool = False


def _require(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Unavailable(f"{module} is not importable ({exc}); pip install 'fastdeeplab[{extra}]'") from exc


def _fastdeeplab_api(name: str) -> Any:
    """``fastdeeplab.<name>``, or :class:`Unavailable` naming the import failure."""
    import fastdeeplab

    try:
        return getattr(fastdeeplab, name)
    except (ImportError, AttributeError) as exc:
        raise Unavailable(f"fastdeeplab.{name} is not available: {type(exc).__name__}: {exc}") from exc


def cpu_bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 natively (AVX512-BF16 / AMX), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _cpu_precision_row(s: Setting, precision: str) -> None:
    """bfloat16 and int8 rows are CPU rows next to a float32 run; refuse them elsewhere, with the reason."""
    if s.device.type != "cpu":
        raise Unavailable(f"the {precision} rows are CPU rows (device is {s.device.type}); use --dtype on CUDA")
    if s.dtype != torch.float32:
        raise Unavailable(f"the {precision} rows run next to a float32 run (--dtype is {str(s.dtype)[6:]})")
    if precision == "bfloat16" and not cpu_bf16_supported():
        raise Unavailable("this CPU has no native bfloat16 (AVX512-BF16/AMX): bf16 would be emulated")


def _module_fn(module: nn.Module) -> Callable[[Tensor], Tensor]:
    def fn(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return logits_of(module(x))
    return fn


def _fastdeeplab_model(reference: nn.Module, s: Setting) -> nn.Module:
    """A private copy of ``fastdeeplab.from_torchvision(reference)`` (CPU, float32, eval)."""
    import fastdeeplab

    model = copy.deepcopy(s.eager) if s.eager is not None else fastdeeplab.from_torchvision(reference)
    if model.output_stride != s.output_stride:
        raise RuntimeError(f"from_torchvision gave output stride {model.output_stride}, expected {s.output_stride}")
    return model.eval()


def _build_torchvision(reference: nn.Module, s: Setting) -> Built:
    model = reference if s.dtype == torch.float32 else copy.deepcopy(reference).to(s.dtype)
    return Built(_module_fn(model), s.dtype, notes=["torchvision eager, as shipped (NCHW)"])


def _build_fastdeeplab(reference: nn.Module, s: Setting) -> Built:
    model = _fastdeeplab_model(reference, s).to(s.device, s.dtype)
    return Built(_module_fn(model), s.dtype, notes=["fastdeeplab.from_torchvision, eager"])


def _build_optimize(backend: str, dtype: torch.dtype | None = None) -> Callable[[nn.Module, Setting], Built]:
    def build(reference: nn.Module, s: Setting) -> Built:
        run_dtype = dtype or s.dtype
        if dtype is not None:
            _cpu_precision_row(s, "bfloat16")
        exported = backend in ("onnxruntime", "openvino")  # a session over the ONNX export (CPU)
        if exported:
            if s.device.type != "cpu":
                raise Unavailable(f"optimize(backend={backend!r}) runs on the CPU; use --device cpu to include it")
            _require("onnx", "onnx")
            _require(backend, "onnx" if backend == "onnxruntime" else "openvino")
        if backend == "triton":
            if s.device.type != "cuda":
                raise Unavailable("Triton kernels need CUDA (device is cpu)")
            _require("triton", "triton")
        optimize = _fastdeeplab_api("optimize")
        model = _fastdeeplab_model(reference, s)
        if not exported:
            model = model.to(s.device)  # optimize() works on the device the model is on
        start = time.perf_counter()
        try:
            fast = optimize(model, backend=backend, dtype=run_dtype, channels_last=True)
        except (NotImplementedError, ValueError) as exc:  # refused settings, e.g. a dtype the backend lacks
            raise Unavailable(f"optimize(backend={backend!r}): {exc}") from exc
        kind = type(fast).__name__
        notes = [f"fastdeeplab.optimize(backend={backend!r}, dtype={str(run_dtype)[6:]}, channels_last=True)"
                 f" -> {kind}"]
        if hasattr(fast, "session"):  # an exported runtime (ONNX Runtime, OpenVINO)
            if s.threads is not None and hasattr(fast, "threads"):
                fast.threads = s.threads
            # The ONNX export and the session are made on the first call (dynamic axes): do it now, on a
            # small input, so that neither lands in the latency or in the first call's peak memory.
            side = 4 * s.output_stride + 1
            _module_fn(fast)(torch.zeros(1, 3, side, side, dtype=torch.float32))
            notes.append("session built at build time (export + compile)")
        in_dtype = torch.float32 if run_dtype == torch.bfloat16 else run_dtype  # bf16 rows take fp32 input
        return Built(_module_fn(fast), in_dtype, time.perf_counter() - start, notes)
    return build


def _export(reference: nn.Module, s: Setting, name: str) -> Path:
    """The ONNX graph of the fastdeeplab model (dynamic batch/height/width), once per setting. The exporter's
    own checks (ONNX Runtime vs PyTorch at two sizes) are skipped: the row's accuracy columns check it."""
    def make() -> Path:
        export_onnx = importlib.import_module("fastdeeplab.export.onnx").export_onnx
        path = s.workdir / f"fastdeeplab-os{s.output_stride}-{s.resolution}.onnx"
        export_onnx(_fastdeeplab_model(reference, s).cpu(), path, input_size=(s.resolution, s.resolution),
                    output_stride=s.output_stride, dynamic=True, check=False)
        return path
    return s.shared_artifact("fastdeeplab.onnx", make)


class _TorchvisionOut(nn.Module):
    """torchvision's model with its ``{"out": logits}`` dict unwrapped, for ``torch.onnx.export``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)["out"]


def _export_torchvision(reference: nn.Module, s: Setting) -> Path:
    """What a user without fastdeeplab does: ``torch.onnx.export`` of torchvision's own model (BatchNorm
    left to the runtime to fold, dynamic batch/height/width), once per setting. The TorchScript exporter
    (``dynamo=False``, 2-3x faster to export here) where this torch still has it, else the dynamo one."""
    def make() -> Path:
        import warnings

        _require("onnx", "onnx")
        path = s.workdir / f"torchvision-os{s.output_stride}-{s.resolution}.onnx"
        model = _TorchvisionOut(copy.deepcopy(reference).cpu().float()).eval()
        x = torch.zeros(1, 3, s.resolution, s.resolution)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["input"], output_names=["out"],
                                  dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"},
                                                "out": {0: "batch", 2: "height", 3: "width"}}, opset_version=17)
            except Exception:  # no TorchScript exporter in this torch: the dynamo one
                from torch.export import Dim

                _require("onnxscript", "onnx")
                dims = {0: Dim("batch", min=1, max=64), 2: Dim("height", min=33, max=4096),
                        3: Dim("width", min=33, max=4096)}
                torch.onnx.export(model, (torch.zeros(2, 3, s.resolution, s.resolution),), str(path), dynamo=True,
                                  input_names=["input"], output_names=["out"], dynamic_shapes=(dims,),
                                  external_data=False, verbose=False)
        return path
    return s.shared_artifact("torchvision.onnx", make)


def _ort_fn(session: Any) -> Callable[[Tensor], Tensor]:
    name = session.get_inputs()[0].name

    def fn(x: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    return fn


_OV_PRECISION = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def _openvino_fn(path: Path, s: Setting, precision: str) -> Callable[[Tensor], Tensor]:
    """OpenVINO on an ONNX file; compiled for each input shape it meets (statically shaped, so OpenVINO
    plans memory and kernels once) unless ``--data`` asks for dynamic shapes."""
    ov = _require("openvino", "openvino")
    core = ov.Core()
    properties: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if s.threads is not None:
        properties["INFERENCE_NUM_THREADS"] = str(s.threads)
    requests: dict[tuple[int, ...] | None, Any] = {}

    def request_for(shape: tuple[int, ...]) -> Any:
        key = shape if s.static_shape else None
        if key not in requests:
            graph = core.read_model(str(path))
            if key is not None:
                graph.reshape(list(key))
            requests[key] = core.compile_model(graph, "CPU", properties).create_infer_request()
        return requests[key]

    def fn(x: Tensor) -> Tensor:
        request = request_for(tuple(x.shape))
        request.infer({0: x.numpy()})
        return torch.from_numpy(request.get_output_tensor(0).data)  # a view: reused by the next call

    request_for((s.batch, 3, s.resolution, s.resolution))  # compile now: not in the first timed call
    return fn


def _build_openvino(reference: nn.Module, s: Setting) -> Built:
    if s.device.type != "cpu":
        raise Unavailable("OpenVINO runs on the CPU here; use --device cpu to include it")
    ov = _require("openvino", "openvino")
    try:
        importlib.import_module("fastdeeplab.export.onnx")
    except ImportError as exc:
        raise Unavailable(f"fastdeeplab.export.onnx is not importable: {exc}") from exc
    start = time.perf_counter()
    path = _export(reference, s, "openvino")
    fn = _openvino_fn(path, s, _OV_PRECISION[s.dtype])
    return Built(fn, torch.float32, time.perf_counter() - start,
                 [f"OpenVINO {ov.get_version().split('-')[0]} on fastdeeplab's ONNX export "
                  f"({'static' if s.static_shape else 'dynamic'} shape), "
                  f"INFERENCE_PRECISION_HINT={_OV_PRECISION[s.dtype]}"])


def _build_onnxruntime_torchvision(reference: nn.Module, s: Setting) -> Built:
    if s.device.type != "cpu":
        raise Unavailable("ONNX Runtime runs on the CPU here; use --device cpu to include it")
    if s.dtype != torch.float32:
        raise Unavailable(f"the peer rows run float32 graphs (--dtype is {str(s.dtype)[6:]})")
    _require("onnxruntime", "onnx")
    from fastdeeplab.runtime.onnxruntime import ort_session

    start = time.perf_counter()
    session = ort_session(_export_torchvision(reference, s), threads=s.threads)
    return Built(_ort_fn(session), torch.float32, time.perf_counter() - start,
                 ["ONNX Runtime (all graph optimizations, no spinning) on torch.onnx.export of torchvision's model"])


def _build_openvino_torchvision(precision: str) -> Callable[[nn.Module, Setting], Built]:
    def build(reference: nn.Module, s: Setting) -> Built:
        if s.device.type != "cpu":
            raise Unavailable("OpenVINO runs on the CPU here; use --device cpu to include it")
        if precision == "bf16":
            _cpu_precision_row(s, "bfloat16")
        elif s.dtype != torch.float32:
            raise Unavailable(f"the peer rows run float32 graphs (--dtype is {str(s.dtype)[6:]})")
        ov = _require("openvino", "openvino")
        start = time.perf_counter()
        fn = _openvino_fn(_export_torchvision(reference, s), s, precision)
        return Built(fn, torch.float32, time.perf_counter() - start,
                     [f"OpenVINO {ov.get_version().split('-')[0]} on torch.onnx.export of torchvision's model, "
                      f"INFERENCE_PRECISION_HINT={precision}"])
    return build


def _build_onnxruntime_int8(reference: nn.Module, s: Setting) -> Built:
    _cpu_precision_row(s, "int8")
    _require("onnxruntime", "onnx")
    try:
        quantize_onnx = importlib.import_module("fastdeeplab.export.quantize").quantize_onnx
    except (ImportError, AttributeError) as exc:
        raise Unavailable(f"fastdeeplab.export.quantize is not importable: {exc}") from exc
    from fastdeeplab.runtime.onnxruntime import ort_session

    if s.calibration is None:
        raise Unavailable("no calibration images for int8")
    start = time.perf_counter()
    fp32 = _export(reference, s, "int8")
    images = s.calibration()
    int8 = s.workdir / f"fastdeeplab-os{s.output_stride}-{s.resolution}.int8.onnx"
    quantize_onnx(fp32, int8, images, input_size=tuple(images.shape[-2:]))
    session = ort_session(int8, threads=s.threads)
    return Built(_ort_fn(session), torch.float32, time.perf_counter() - start,
                 [f"fastdeeplab.export.quantize.quantize_onnx (QDQ, u8 activations, s8 per-channel weights, MinMax "
                  f"on {images.shape[0]} calibration images not scored) on ONNX Runtime"])


_TRT_PRECISION = {torch.float32: "fp32", torch.float16: "fp16"}


def _build_tensorrt(reference: nn.Module, s: Setting) -> Built:
    if s.device.type != "cuda":
        raise Unavailable("TensorRT needs CUDA (device is cpu)")
    if s.dtype not in _TRT_PRECISION:
        raise Unavailable(f"build_tensorrt_engine offers {'/'.join(_TRT_PRECISION.values())}, not {s.dtype}")
    _require("tensorrt", "tensorrt")
    try:
        trt = importlib.import_module("fastdeeplab.export.tensorrt")
        runtime = importlib.import_module("fastdeeplab.runtime")
    except ImportError as exc:
        raise Unavailable(f"fastdeeplab.export.tensorrt is not importable: {exc}") from exc
    start = time.perf_counter()
    onnx_path = _export(reference, s, "tensorrt")
    precision = _TRT_PRECISION[s.dtype]
    engine = s.workdir / f"tensorrt-os{s.output_stride}-{s.resolution}-{precision}.engine"
    shape = (s.batch, 3, s.resolution, s.resolution)
    if s.static_shape:  # the one shape timed: TensorRT tunes for exactly it
        profile = {"min_shape": shape, "opt_shape": shape, "max_shape": shape}
    else:  # --data: every image at its own size (VOC images are at most 500 px)
        side = max(s.resolution, 513)
        profile = {"min_shape": (1, 3, 4 * s.output_stride + 1, 4 * s.output_stride + 1), "opt_shape": shape,
                   "max_shape": (s.batch, 3, side, side)}
    trt.build_tensorrt_engine(onnx_path, engine, precision=precision, timing_cache=s.workdir / "tensorrt.cache",
                              **profile)
    model = runtime.TensorRTModel(engine, device=s.device)
    return Built(_module_fn(model), torch.float32, time.perf_counter() - start,
                 [f"TensorRT engine ({precision}) from the exported ONNX graph, profile {profile['opt_shape']}"])


def _build_torch_compile(reference: nn.Module, s: Setting) -> Built:
    if s.device.type == "cpu" and not s.explicit:
        raise Unavailable(f"--impl torch_compile to enable; compile takes ~{CPU_COMPILE_SECONDS} s on CPU")
    model = _fastdeeplab_model(reference, s).to(s.device, s.dtype).to(memory_format=torch.channels_last)
    mode = "max-autotune" if s.device.type == "cuda" else None
    compiled = torch.compile(model, mode=mode)
    fn = _module_fn(compiled)
    start = time.perf_counter()
    x = torch.zeros(s.batch, 3, s.resolution, s.resolution, device=s.device, dtype=s.dtype)
    fn(x)  # compile now, so that compilation is neither timed nor counted as peak memory
    if s.device.type == "cuda":
        torch.cuda.synchronize()
    return Built(fn, s.dtype, time.perf_counter() - start,
                 [f"torch.compile(fastdeeplab eager, channels_last, mode={mode!r})"])


IMPLEMENTATIONS: dict[str, Implementation] = {impl.name: impl for impl in (
    Implementation("torchvision", "torchvision deeplabv3, eager (the reference)", _build_torchvision, peer=True),
    Implementation("fastdeeplab", "fastdeeplab eager (from_torchvision), not optimized", _build_fastdeeplab),
    Implementation("optimize_torch", 'optimize(model, backend="torch")', _build_optimize("torch")),
    Implementation("optimize_onnxruntime", 'optimize(model, backend="onnxruntime")', _build_optimize("onnxruntime")),
    Implementation("optimize_openvino", 'optimize(model, backend="openvino")', _build_optimize("openvino")),
    Implementation("openvino", "OpenVINO on fastdeeplab's own ONNX export (no optimize())", _build_openvino),
    Implementation("onnxruntime_torchvision", "peer: ONNX Runtime on torchvision's own ONNX export",
                   _build_onnxruntime_torchvision, peer=True),
    Implementation("openvino_torchvision", "peer: OpenVINO on torchvision's own ONNX export",
                   _build_openvino_torchvision("f32"), peer=True),
    Implementation("optimize_bf16", "optimize(model, dtype=torch.bfloat16)",
                   _build_optimize("auto", torch.bfloat16), precision="bfloat16"),
    Implementation("openvino_torchvision_bf16", "peer: OpenVINO bf16 on torchvision's export",
                   _build_openvino_torchvision("bf16"), precision="bfloat16", peer=True),
    Implementation("onnxruntime_int8", "int8 Q/DQ (fastdeeplab.export.quantize) on ONNX Runtime",
                   _build_onnxruntime_int8, precision="int8"),
    Implementation("triton", 'optimize(model, backend="triton")', _build_optimize("triton")),
    Implementation("tensorrt", "TensorRT engine from the exported ONNX graph", _build_tensorrt),
    Implementation("torch_compile", "torch.compile of fastdeeplab eager", _build_torch_compile),
)}
