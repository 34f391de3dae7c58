"""What the benchmark compares: the shared weights, the torchvision reference, and every implementation.

All implementations are derived from one state dict, loaded into a genuine torchvision ``DeepLabV3``:
at output stride 8 it is ``torchvision.models.segmentation.deeplabv3_resnet50`` as shipped; at 16 it is
rebuilt the torchvision way (``replace_stride_with_dilation=[False, False, True]``, ASPP rates 6/12/18).
Every other implementation starts from that reference module (``fastdeeplab.from_torchvision``), so all
rows share the same weights.

An implementation's ``build(reference, setting)`` returns a :class:`Built` (a callable from an input batch
``[N, 3, H, W]`` to logits ``[N, K, H, W]``) or raises :class:`Unavailable` with the reason it cannot run
here; the suite turns that into a skip whose reason lands in the summary table.
"""

from __future__ import annotations

import copy
import importlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from torch import Tensor, nn

from fastdeeplab.metrics import logits_of

__all__ = [
    "Built",
    "IMPLEMENTATIONS",
    "Implementation",
    "Setting",
    "Unavailable",
    "Weights",
    "cached_torchvision_weights",
    "count_gflop",
    "random_state_dict",
    "resolve_weights",
    "torchvision_reference",
]

DEPTHS = {"resnet50": 50, "resnet101": 101}
# Compile time of torch.compile (inductor) for DeepLabv3-ResNet-50 at 513x513 on the 2-core development
# machine (measured once; it scales with the graph, not the resolution).
CPU_COMPILE_SECONDS = 35


class Unavailable(RuntimeError):
    """An implementation cannot run in this environment; ``str(exc)`` says why (becomes the skip reason)."""


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------
@dataclass
class Weights:
    """One state dict (torchvision names, no aux head) shared by every implementation."""

    state_dict: dict[str, Tensor]
    depth: int
    num_classes: int
    kind: str  # "random" | "torchvision-cache" | "checkpoint"
    description: str
    source: str | None = None

    @property
    def real(self) -> bool:
        """Trained weights (predictions mean something), as opposed to seeded random ones."""
        return self.kind != "random"

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "description": self.description, "source": self.source,
                "backbone": f"resnet{self.depth}", "num_classes": self.num_classes}


def cached_torchvision_weights(depth: int) -> Path | None:
    """Path of torchvision's COCO-with-VOC-labels DeepLabv3 weights if already in the torch hub cache.

    Only the cache is looked at; nothing is ever downloaded.
    """
    from torchvision.models.segmentation import DeepLabV3_ResNet50_Weights, DeepLabV3_ResNet101_Weights

    enum = {50: DeepLabV3_ResNet50_Weights, 101: DeepLabV3_ResNet101_Weights}[depth].COCO_WITH_VOC_LABELS_V1
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(enum.url).path)
    return path if path.is_file() else None


def _drop_aux(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}


@torch.no_grad()
def random_state_dict(depth: int, num_classes: int, seed: int, calibration: Tensor) -> dict[str, Tensor]:
    """Seeded random weights whose activations stay well scaled through 50/101 layers.

    torchvision's own initialisation for the convolutions; every BatchNorm gets a random affine
    (``weight ~ U(0.5, 1.5)``, ``bias ~ N(0, 0.2)``) and then running statistics measured on the
    ``calibration`` photographs ``[N, 3, H, W]`` (one train-mode pass, dropout off). The statistics are
    thus non-trivial (BN folding is really exercised) yet consistent with the weights, so logits are
    finite and O(1) rather than exploding as with mean 0 / var 1.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision_reference(depth, num_classes, output_stride=8)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.reset_running_stats()
                m.momentum = None  # cumulative average: one pass gives the batch statistics exactly
        model.train()
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.eval()
        model(calibration)
        model.eval()
    return model.state_dict()


def resolve_weights(spec: str | None, backbone: str, seed: int,
                    calibration: Callable[[], Tensor]) -> Weights:
    """The weights every implementation uses.

    ``spec``: a checkpoint path; ``"random"`` for seeded random weights; ``None`` for torchvision's
    COCO-VOC weights when they are in the local hub cache, else random. ``calibration()`` returns the
    photographs used to set the random weights' BN statistics (called only when needed).
    """
    depth = DEPTHS[backbone]
    if spec not in (None, "random"):
        from fastdeeplab.hub import _read_state_dict

        state = _drop_aux(_read_state_dict(spec))
        key = "classifier.4.weight"
        if key not in state:
            raise ValueError(f"{spec} has no {key}: not a torchvision-style DeepLabv3 checkpoint")
        ckpt_depth = 101 if any(k.startswith("backbone.layer3.22.") for k in state) else 50
        if ckpt_depth != depth:
            raise ValueError(f"{spec} holds a ResNet-{ckpt_depth} DeepLabv3 but --backbone is {backbone}")
        return Weights(state, depth, int(state[key].shape[0]), "checkpoint", f"checkpoint {spec}", str(spec))
    if spec is None:
        cached = cached_torchvision_weights(depth)
        if cached is not None:
            state = _drop_aux(torch.load(cached, map_location="cpu", weights_only=True))
            return Weights(state, depth, int(state["classifier.4.weight"].shape[0]), "torchvision-cache",
                           f"torchvision COCO_WITH_VOC_LABELS_V1 ({cached.name}, from the torch hub cache)",
                           str(cached))
    images = calibration()
    state = random_state_dict(depth, 21, seed, images)
    return Weights(state, depth, 21, "random",
                   f"random (seed {seed}; BN affine randomised, BN statistics from {len(images)} photographs)",
                   None)


def torchvision_reference(depth: int, num_classes: int, output_stride: int,
                          state_dict: Mapping[str, Tensor] | None = None) -> nn.Module:
    """A genuine torchvision ``DeepLabV3`` (no aux head) at output stride 8 (as shipped) or 16 (rebuilt
    with ``replace_stride_with_dilation=[False, False, True]`` and ASPP rates 6/12/18), in eval mode."""
    from torchvision.models import resnet50, resnet101
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation import deeplabv3_resnet50, deeplabv3_resnet101
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3

    if output_stride == 8:
        build = deeplabv3_resnet50 if depth == 50 else deeplabv3_resnet101
        model = build(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    elif output_stride == 16:
        resnet = (resnet50 if depth == 50 else resnet101)(weights=None,
                                                           replace_stride_with_dilation=[False, False, True])
        model = DeepLabV3(IntermediateLayerGetter(resnet, return_layers={"layer4": "out"}),
                          DeepLabHead(2048, num_classes, atrous_rates=(6, 12, 18)))
    else:
        raise ValueError(f"the torchvision reference exists at output stride 8 or 16, not {output_stride}")
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model.eval()


def count_gflop(depth: int, num_classes: int, output_stride: int, resolution: int) -> float:
    """GFLOP of one forward of one image (``FlopCounterMode`` on the reference, on the meta device: convs
    and matmuls as 2·MAC; BN, ReLU, pooling and the final upsampling are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = torchvision_reference(depth, num_classes, output_stride)
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


@dataclass
class Built:
    """A ready-to-time implementation: ``fn(x [N, 3, H, W] in input_dtype) -> logits [N, K, H, W]``."""

    fn: Callable[[Tensor], Tensor]
    input_dtype: torch.dtype
    build_s: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Implementation:
    name: str
    description: str
    build: Callable[[nn.Module, Setting], Built]


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


def _build_optimize(backend: str) -> Callable[[nn.Module, Setting], Built]:
    def build(reference: nn.Module, s: Setting) -> Built:
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
            fast = optimize(model, backend=backend, dtype=s.dtype, channels_last=True)
        except (NotImplementedError, ValueError) as exc:  # refused settings, e.g. a dtype the backend lacks
            raise Unavailable(f"optimize(backend={backend!r}): {exc}") from exc
        notes = [f"fastdeeplab.optimize(backend={backend!r}, channels_last=True)"]
        if exported:
            if s.threads is not None and hasattr(fast, "threads"):
                fast.threads = s.threads
            # The ONNX export and the session are made on the first call (dynamic axes): do it now, on a
            # small input, so that neither lands in the latency or in the first call's peak memory.
            side = 4 * s.output_stride + 1
            _module_fn(fast)(torch.zeros(1, 3, side, side, dtype=s.dtype))
            notes.append(f"session built at build time (export + {backend} compile)")
        return Built(_module_fn(fast), s.dtype, time.perf_counter() - start, notes)
    return build


def _export(reference: nn.Module, s: Setting, name: str) -> Path:
    """The ONNX graph of the fastdeeplab model (dynamic batch/height/width). The exporter's own checks
    (ONNX Runtime vs PyTorch at two sizes) are skipped: the row's accuracy columns check the result."""
    export_onnx = importlib.import_module("fastdeeplab.export.onnx").export_onnx
    path = s.workdir / f"{name}-os{s.output_stride}-{s.resolution}.onnx"
    export_onnx(_fastdeeplab_model(reference, s).cpu(), path, input_size=(s.resolution, s.resolution),
                output_stride=s.output_stride, dynamic=True, check=False)
    return path


_OV_PRECISION = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


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
    core = ov.Core()
    graph = core.read_model(str(path))
    if s.static_shape:  # the shape every timed call uses: lets OpenVINO plan memory and kernels once
        graph.reshape([s.batch, 3, s.resolution, s.resolution])
    # OpenVINO's CPU plugin runs bf16 by default where the CPU supports it: pin the precision to --dtype.
    properties = {"INFERENCE_PRECISION_HINT": _OV_PRECISION[s.dtype], "PERFORMANCE_HINT": "LATENCY"}
    if s.threads is not None:
        properties["INFERENCE_NUM_THREADS"] = str(s.threads)
    compiled = core.compile_model(graph, "CPU", properties)
    request = compiled.create_infer_request()

    def fn(x: Tensor) -> Tensor:
        request.infer({0: x.numpy()})
        return torch.from_numpy(request.get_output_tensor(0).data)  # a view: reused by the next call

    return Built(fn, torch.float32, time.perf_counter() - start,
                 [f"OpenVINO {ov.get_version().split('-')[0]} on the exported ONNX graph "
                  f"({'static' if s.static_shape else 'dynamic'} shape), "
                  f"INFERENCE_PRECISION_HINT={_OV_PRECISION[s.dtype]}"])


_TRT_PRECISION = {torch.float32: "fp32", torch.float16: "fp16"}


def _build_tensorrt(reference: nn.Module, s: Setting) -> Built:
    if s.device.type != "cuda":
        raise Unavailable("TensorRT needs CUDA (device is cpu)")
    if s.dtype not in _TRT_PRECISION:
        raise Unavailable(f"build_tensorrt_engine offers {'/'.join(_TRT_PRECISION.values())}, not {s.dtype}")
    _require("tensorrt", "tensorrt")
    try:
        trt = importlib.import_module("fastdeeplab.export.tensorrt")
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
    model = trt.TensorRTModel(engine, device=s.device)
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
    Implementation("torchvision", "torchvision eager (the reference)", _build_torchvision),
    Implementation("fastdeeplab", "fastdeeplab eager (from_torchvision)", _build_fastdeeplab),
    Implementation("optimize_torch", "optimize(backend='torch')", _build_optimize("torch")),
    Implementation("optimize_onnxruntime", "optimize(backend='onnxruntime')", _build_optimize("onnxruntime")),
    Implementation("optimize_openvino", "optimize(backend='openvino')", _build_optimize("openvino")),
    Implementation("openvino", "OpenVINO on the exported ONNX graph", _build_openvino),
    Implementation("triton", "optimize(backend='triton')", _build_optimize("triton")),
    Implementation("tensorrt", "TensorRT engine from the exported ONNX graph", _build_tensorrt),
    Implementation("torch_compile", "torch.compile of fastdeeplab eager", _build_torch_compile),
)}
