"""``fastdeeplab.optimize`` (this module is ``fastdeeplab.optimization``): one call that turns a DeepLabv3 into the fastest inference model for its device.

>>> import fastdeeplab, torch
>>> model = fastdeeplab.deeplabv3_resnet50(num_classes=21).eval()
>>> fast = fastdeeplab.optimize(model, backend="torch")
>>> fast(torch.randn(1, 3, 65, 65))["out"].shape
torch.Size([1, 21, 65, 65])

What it does, in order: converts a torchvision ``DeepLabV3`` (``from_torchvision``), folds every BatchNorm
into its convolution, swaps each Conv→BN→ReLU chain for a :class:`~fastdeeplab.layers.FusedConvBNReLU`
(residual adds fused into the epilogue), fuses the ASPP projection (:class:`~fastdeeplab.layers.FusedASPP`),
converts to channels-last and picks a backend.

Backends (``backend=``):

* ``"triton"`` — the Triton kernels (CUDA), as torch custom ops (``torch.compile``/``torch.export`` keep
  them), each layer dispatched per input shape to the Triton kernel or cuDNN, whichever measured faster
  (``dispatch=``, ``fast.dispatch_report()``).
* ``"torch"`` — plain PyTorch, anywhere; on CPU it calls oneDNN's fused conv + bias + add + ReLU.
* ``"onnxruntime"`` — CPU: an ONNX Runtime session built from the project's ONNX export of the fused model
  (dynamic height, width and batch: built once, rebuilt only when the output stride changes).
* ``"openvino"`` — CPU: the same export compiled by OpenVINO (float32 or bfloat16, pinned), built and rebuilt
  the same way.
* ``"auto"`` — CUDA: ``"triton"`` when triton imports, else ``"torch"`` (cuDNN). CPU, float32, per the
  model's output stride at ``optimize`` time (a later ``set_output_stride`` keeps the backend): at OS16
  ``"torch"``; at OS8 (and 32) the first of ``"openvino"``, ``"onnxruntime"``, ``"torch"`` whose packages
  import. Why (``bench/RESULTS.md``, the README's table: fresh-venv ``fastdeeplab bench``, 2026-12-02, 2
  AVX-512 cores, 513×513, batch 1, rows interleaved in one process): at OS16 the torch backend was 1.30×
  torchvision against OpenVINO's 1.18× (1.37× against 1.21× in a later fresh-venv run of the same command);
  at OS8 OpenVINO led with 1.39× against ONNX Runtime's 1.36× and torch's 1.30×. All three run the
  convolutions near the CPU's FMA limit, so the margins are small. CPU bfloat16: ``"openvino"`` when
  installed, else ``"torch"`` (oneDNN's AVX-512 BF16 kernels); OpenVINO measured 286 ms against 299 ms at OS8.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .kernels._utils import interpreting, triton_available
from .layers import FusedASPP, FusedBottleneck, FusedConvBNReLU
from .layers_mobilenet import FusedConvBNAct, fuse_mobilenet_backbone
from .mobilenet import MobileNetV3Backbone
from .model import ASPP, Backbone, DeepLabV3, capturing_graph, check_input
from .runtime.base import TRAIN_ERROR, RuntimeModel
from .runtime.exported import ExportedDeepLabV3
from .runtime.onnxruntime import OnnxRuntimeDeepLabV3
from .runtime.openvino import OpenVINODeepLabV3

__all__ = ["OnnxRuntimeDeepLabV3", "OpenVINODeepLabV3", "OptimizedDeepLabV3", "optimize", "resolve_backend"]

BACKENDS = ("auto", "torch", "triton", "onnxruntime", "openvino")


def _importable(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None,
                    output_stride: int | None = None) -> str:
    """The concrete backend ``optimize`` uses for ``backend`` on ``device`` (see the module docstring):
    ``auto`` on the CPU in float32 depends on the model's ``output_stride`` (16: ``torch``)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if triton_available() else "torch"
        if (dtype or torch.float32) == torch.float32 and output_stride == 16:
            return "torch"  # measured faster than the exported runtimes at OS16 (module docstring)
        for name, runtime in _RUNTIMES.items():  # in auto's order of preference (defined below the classes)
            if (dtype or torch.float32) in runtime.dtypes and _importable(*runtime.packages):
                return name
        return "torch"
    if backend == "triton":
        if device.type != "cuda" and not interpreting():
            raise ValueError("backend='triton' needs a CUDA model (move it with .cuda() first); on CPU use "
                             "backend='torch', 'onnxruntime' or 'openvino' (Triton runs on CPU only under "
                             "TRITON_INTERPRET=1)")
        if not triton_available():
            raise ImportError("backend='triton' needs triton: pip install 'fastdeeplab[triton]'")
    if backend in _RUNTIMES and device.type != "cpu":
        raise ValueError(f"backend={backend!r} runs on the CPU; move the model with .cpu() first")
    return backend


# --------------------------------------------------------------------------------------------------
# Module swaps
# --------------------------------------------------------------------------------------------------
def _fuse_sequence(modules: list[nn.Module], backend: str) -> list[nn.Module]:
    """Replace each ``Conv2d [→ BatchNorm2d] [→ ReLU]`` run with one fused module; pad with ``Identity`` so
    indices (and the container's length) stay as they were. Dropout becomes ``Identity`` (eval)."""
    out: list[nn.Module] = []
    i = 0
    while i < len(modules):
        m = modules[i]
        if isinstance(m, nn.Conv2d):
            bn = modules[i + 1] if i + 1 < len(modules) and isinstance(modules[i + 1], nn.BatchNorm2d) else None
            j = i + 1 + (bn is not None)
            relu = j < len(modules) and isinstance(modules[j], nn.ReLU)
            out.append(FusedConvBNReLU(m, bn, relu=relu, backend=backend))
            out.extend(nn.Identity() for _ in range(j + relu - i - 1))
            i = j + relu
        elif isinstance(m, ASPP):
            out.append(FusedASPP(m, backend=backend))
            i += 1
        elif isinstance(m, nn.Dropout):
            out.append(nn.Identity())
            i += 1
        elif isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            raise ValueError(f"a {type(m).__name__} without a convolution before it cannot be folded")
        else:
            out.append(m)
            i += 1
    return out


def _fuse_backbone(backbone: Backbone | MobileNetV3Backbone, backend: str) -> Backbone | MobileNetV3Backbone:
    if isinstance(backbone, MobileNetV3Backbone):
        return fuse_mobilenet_backbone(backbone, backend)
    stem_names = [n for n in backbone if not n.startswith("layer")]
    layers = dict(zip(stem_names, _fuse_sequence([backbone[n] for n in stem_names], backend)))
    for name in backbone.stage_names:
        layers[name] = nn.Sequential(*(FusedBottleneck(unit, backend=backend) for unit in backbone[name]))
    return Backbone.from_modules(layers, depth=backbone.depth, return_aux=backbone.return_aux)


def _fuse_head(head: nn.Module | None, backend: str) -> nn.Module | None:
    if head is None:
        return None
    if not isinstance(head, nn.Sequential):
        raise TypeError(f"cannot fuse a head of type {type(head).__name__}; expected an nn.Sequential")
    return nn.Sequential(*_fuse_sequence(list(head), backend))


class OptimizedDeepLabV3(DeepLabV3):
    """The inference model ``optimize`` returns: same call signature and output dict as :class:`DeepLabV3`,
    ``set_output_stride`` still works, training raises.

    ``forward(x)`` takes ``[N, 3, H, W]`` in any float dtype and layout; it runs in ``self.dtype`` and
    channels-last (when enabled) and returns logits in ``x``'s dtype.
    """

    def __init__(self, model: DeepLabV3, *, backend: str, dtype: torch.dtype, channels_last: bool,
                 dispatch: str = "auto") -> None:
        backbone = _fuse_backbone(model.backbone, backend)
        classifier = _fuse_head(model.classifier, backend)
        aux = _fuse_head(model.aux_classifier, backend)
        super().__init__(backbone, classifier, aux, output_stride=model.output_stride,
                         multi_grid=model.multi_grid, aspp_rates_at_os16=model.aspp_rates_at_os16)
        self.backend = backend
        self.channels_last = channels_last
        nn.Module.train(self, False)
        self.to(dtype=dtype)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self.dispatcher = None
        if backend == "triton":  # one Dispatcher shared by every fused module (kernels/dispatch.py)
            from .kernels.dispatch import Dispatcher

            self.dispatcher = Dispatcher(dispatch)
            for name, m in self.named_modules():
                if isinstance(m, (FusedConvBNReLU, FusedASPP, FusedConvBNAct)):
                    m.dispatcher, m.dispatch_name = self.dispatcher, name

    def dispatch_report(self):
        """Triton backend: one row per layer and input shape seen so far, with the Triton and cuDNN times (µs,
        timed on the first CUDA call in ``dispatch="auto"`` mode) and the choice; ``print()`` it for a table.
        See :class:`fastdeeplab.kernels.dispatch.DispatchReport`."""
        if self.dispatcher is None:
            raise ValueError(f"dispatch reports exist on the triton backend; this model runs {self.backend!r}")
        return self.dispatcher.report()

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.buffers())).dtype

    def train(self, mode: bool = True) -> OptimizedDeepLabV3:
        if mode:
            raise RuntimeError(TRAIN_ERROR)
        return super().train(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if torch.compiler.is_compiling():  # torch.compile/torch.export: the same conversions, traced
            in_dtype = x.dtype
            x = x.to(self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return {k: v.to(in_dtype) for k, v in super().forward(x).items()}
        if capturing_graph():
            return super().forward(x)  # ONNX and TorchScript graphs carry no layout or dtype conversions
        check_input(x, self.output_stride)
        in_dtype = x.dtype
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            out = super().forward(x)
        return {k: v.to(in_dtype) for k, v in out.items()}

    def __prepare_scriptable__(self) -> OptimizedDeepLabV3:  # called by torch.jit.script
        raise RuntimeError("torch.jit.script cannot compile an optimized model (its fused layers dispatch to "
                           "oneDNN or Triton at run time): trace it instead, torch.jit.trace(fast, example_input), "
                           "or script the eager model, torch.jit.script(model)")

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, backend={self.backend!r}, dtype={self.dtype}, "
                f"channels_last={self.channels_last}")


# The backends that run the ONNX export on the CPU, in auto's order of preference (module docstring).
_RUNTIMES: dict[str, type[ExportedDeepLabV3]] = {
    "openvino": OpenVINODeepLabV3,
    "onnxruntime": OnnxRuntimeDeepLabV3,
}


# Inference mode off while building: called under torch.inference_mode, the copy would hold inference tensors,
# which have no version counter for the fused layers' rebuild-on-change tokens.
@torch.inference_mode(False)
def optimize(model: nn.Module, *, backend: str = "auto", dtype: torch.dtype | None = None,
             channels_last: bool = True, dispatch: str = "auto", cuda_graph: bool = False) -> nn.Module:
    """Return an eval-only copy of ``model`` that is as fast as this device allows; ``model`` is untouched.

    Args:
        model: a fastdeeplab :class:`DeepLabV3` or a torchvision ``DeepLabV3`` (ResNet or MobileNetV3-Large
            backbone).
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"onnxruntime"`` or ``"openvino"`` (see the module
            docstring).
        dtype: compute dtype; default float32 on CPU, float16 on CUDA with Triton. bfloat16 runs on CPUs
            with the torch and openvino backends; float16 needs CUDA.
        channels_last: run in channels-last memory format (the fast layout for every backend here).
        dispatch: triton backend only, per layer and input shape: ``"auto"`` times the Triton kernel against
            cuDNN on the first CUDA call and keeps the faster (decisions cached on disk, see
            :mod:`fastdeeplab.kernels.dispatch`; ``fast.dispatch_report()`` lists them), ``"triton"`` or
            ``"cudnn"`` force one side. The RGB stem always runs on cuDNN.
        cuda_graph: CUDA only (triton or torch backend): capture the whole forward in a CUDA graph per input
            shape after warm-up and replay it, for batch-1 latency (:class:`fastdeeplab.cuda_graphs.CUDAGraphModel`).

    Returns:
        A module with the same ``forward(x) -> {"out", ["aux"]}`` contract and ``set_output_stride``.
        Calling ``.train()`` on it raises ``RuntimeError``. Its weights stay its own state:
        ``load_state_dict`` (``assign=True`` included), replacing a buffer, and in-place edits under
        ``torch.no_grad()`` rebuild the packed forms on the next call. Edits through ``tensor.data`` bypass
        the version counter that detects them and are not seen: edit the tensor itself.
    """
    from torchvision.models.segmentation.deeplabv3 import DeepLabV3 as TvDeepLabV3

    from .hub import from_torchvision

    if isinstance(model, (OptimizedDeepLabV3, RuntimeModel)):
        raise TypeError("this model is already optimized; optimize the original model instead")
    if isinstance(model, TvDeepLabV3):
        model = from_torchvision(model)
    if not isinstance(model, DeepLabV3):
        raise TypeError(f"optimize() takes a fastdeeplab or torchvision DeepLabV3, got {type(model).__name__}")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ValueError("optimize() needs real weights, but this model has tensors on the meta device: "
                         "materialise it first (model.to_empty(device='cpu'), then load_state_dict(...))")
    concrete = resolve_backend(backend, device, dtype, getattr(model, "output_stride", None))
    if dtype is None:
        dtype = torch.float16 if (concrete == "triton" and device.type == "cuda") else torch.float32
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    if dtype == torch.float16 and device.type == "cpu" and concrete != "triton":
        raise ValueError("float16 needs CUDA; on CPU use float32 or bfloat16")
    from .kernels.dispatch import DISPATCH_MODES

    if dispatch not in DISPATCH_MODES:
        raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {dispatch!r}")
    runtime = _RUNTIMES.get(concrete)
    if cuda_graph and (device.type != "cuda" or runtime is not None):
        raise ValueError("cuda_graph=True needs a CUDA model on the triton or torch backend (move it with "
                         ".cuda() first)")
    if runtime is not None and dtype not in runtime.dtypes:  # refuse before the deep copy and the fusion
        raise ValueError(f"the {concrete} backend runs {' or '.join(map(str, runtime.dtypes))}, not "
                         f"{dtype}; use backend='torch'")
    source = copy.deepcopy(model).eval()
    layer_backend = "triton" if concrete == "triton" else "torch"
    # A runtime gets the float32 fused model (its graph is exported in float32) and runs it in ``dtype``.
    fused = OptimizedDeepLabV3(source, backend=layer_backend, dtype=torch.float32 if runtime else dtype,
                               channels_last=channels_last, dispatch=dispatch)
    if cuda_graph:
        from .cuda_graphs import CUDAGraphModel

        return CUDAGraphModel(fused)
    if runtime is None:
        return fused
    from .export.onnx import onnx_model_proto  # export sits above runtime: the runtime gets the exporter

    return runtime(fused, graph=onnx_model_proto, dtype=dtype)


def fused_module_counts(model: nn.Module) -> Mapping[str, int]:
    """How many modules of each fused kind ``model`` holds (for reports and tests)."""
    counts: dict[str, int] = {}
    for m in model.modules():
        name = type(m).__name__
        if name.startswith("Fused") or isinstance(m, (nn.BatchNorm2d, nn.Conv2d)):
            counts[name] = counts.get(name, 0) + 1
    return counts
