"""Export to ONNX, checked: a graph of standard ops that TensorRT, ONNX Runtime and OpenVINO all read.

The graph takes ``input`` ``[batch, 3, height, width]`` (normalised RGB, NCHW; all three dims dynamic by
default) and returns the model's outputs by name: ``out`` ``[batch, K, height, width]`` logits, ``aux`` when
asked for, and ``labels`` ``[batch, height, width]`` **int32** class indices when ``argmax=True`` (an in-graph
``ArgMax``; int32 because TensorRT computes indices in int32 and would cast an int64 output down anyway, and
it halves the output's size; ``labels_dtype="uint8"`` quarters it). ``uint8_input=True`` takes raw uint8 RGB
and normalises it in the graph.

This module exports and writes the report. Preparing the model (torchvision conversion, stride, BN folding,
the output wrapper) lives in :mod:`fastdeeplab.export.prepare`, the graph rewrites in
:mod:`fastdeeplab.export.passes`, the checks in :mod:`fastdeeplab.export.checks` (the graph alone) and
:mod:`fastdeeplab.export.verify` (running it against PyTorch).

What the exported graph looks like, and why:

* **Exporter.** ``torch.onnx.export(..., dynamo=True)``: the ``torch.export``-based exporter, the default
  since PyTorch 2.9 (the TorchScript one warns that it will be removed). It emits opset 18; lower opsets
  (13–17) are produced with ONNX's version converter after the rewrites below.
* **BatchNorm folded.** Conv→BN pairs are folded into the conv's weight and bias (in float64, by
  :func:`fastdeeplab.kernels.reference.fold_bn`) on a deep copy before export; the exporter's optimizer folds any it finds too, and a check fails on any
  ``BatchNormalization`` left in the graph.
* **Pooled ASPP branch** is ``GlobalAveragePool → Conv → Relu → Expand``: ``torch.export`` lowers the
  adaptive pool to ``ReduceMean``, which is rewritten to ``GlobalAveragePool``. torchvision models are
  converted with :func:`fastdeeplab.from_torchvision` first, so the branch is broadcast, never a ``Resize``
  of a 1×1 map.
* **Final upsample** is ``Resize(mode="linear", coordinate_transformation_mode="half_pixel")`` with output
  ``sizes`` taken from the input's shape: ``F.interpolate(..., align_corners=False)`` exactly, in a mode
  TensorRT, ONNX Runtime and OpenVINO all implement (the checks compare ORT with PyTorch at odd sizes).
* **Precision in the graph.** ``precision="fp16"`` writes fp16 weights and activations with fp32 inputs and
  outputs (:func:`fastdeeplab.export.passes.convert_float16`), optionally keeping named layers in fp32;
  int8 is the explicit Q/DQ graph of :func:`fastdeeplab.export.quantize.quantize_onnx`. TensorRT 10/11
  strongly typed networks build exactly what the graph says.

>>> import fastdeeplab
>>> model = fastdeeplab.deeplabv3_resnet50(num_classes=21)                       # doctest: +SKIP
>>> report = fastdeeplab.export_onnx(model, "deeplabv3.onnx", output_stride=16)  # doctest: +SKIP
>>> print(report)                                                                # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._io import atomic_path, check_output_path
from ..runtime.onnxruntime import ort_session, physical_cores, require_onnxruntime
from . import passes
from .passes import default_opset as _default_opset
from .passes import dims as _dims
from .prepare import (
    _as_exportable,
    _check_outputs,
    _check_size,
    _ExportWrapper,
    _inference_state,
    _without_autocast,
    fold_batchnorm_,
)
from .report import (
    INPUT_NAME,
    LABELS_NAME,
    MIN_OPSET,
    TOLERANCES,
    CheckResult,
    ExportCheckError,
    ExportReport,
)

if TYPE_CHECKING:
    import onnx

__all__ = [
    "INPUT_NAME",
    "LABELS_NAME",
    "TOLERANCES",
    "CheckResult",
    "ExportCheckError",
    "ExportReport",
    "export_onnx",
    "fold_batchnorm_",
    "onnx_model_proto",
    "ort_session",
    "physical_cores",
]

_MODEL_OUTPUTS = ("out", "aux")
_EXPORT_OPSET = 18  # what the torch.export-based exporter emits natively
_INSTALL_HINT = "pip install 'fastdeeplab[onnx]'"


# --------------------------------------------------------------------------------------------------
# Optional dependencies
# --------------------------------------------------------------------------------------------------
def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise ImportError(f"ONNX export needs the onnx package: {_INSTALL_HINT}") from exc
    return onnx


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------
def _exporter_summary(exc: BaseException) -> str:
    """The useful lines of a torch.onnx exporter error (its 'Exception summary'), not the advice around it."""
    text = str(exc)
    if "## Exception summary" in text:
        lines = [ln.strip() for ln in text.split("## Exception summary", 1)[1].splitlines()]
        lines = [ln for ln in lines if ln.startswith("<class")]
        if lines:
            return " <- ".join(lines[:2])
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


PRECISIONS = ("fp32", "fp16")
LABEL_DTYPES = {"int32": torch.int32, "uint8": torch.uint8}


def _check_graph_options(precision: str, half: bool, keep_fp32: Sequence[str], labels_dtype: str,
                         uint8_input: bool, argmax: bool) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (int8: quantize_onnx on the fp32 export), "
                         f"got {precision!r}")
    if half and precision != "fp16":
        raise ValueError("half=True (fp16 inputs and outputs) is an fp16 export: leave precision at 'fp16'")
    if keep_fp32 and precision != "fp16":
        raise ValueError("keep_fp32 names layers to keep in fp32 in an fp16 graph: pass precision='fp16'")
    if isinstance(keep_fp32, str):
        raise TypeError("keep_fp32 is a list of layer names, e.g. ['classifier.4']")
    if labels_dtype not in LABEL_DTYPES:
        raise ValueError(f"labels_dtype must be one of {tuple(LABEL_DTYPES)}, got {labels_dtype!r}")
    if labels_dtype != "int32" and not argmax:
        raise ValueError("labels_dtype applies to the in-graph labels: pass argmax=True")
    if uint8_input and half:
        raise ValueError("uint8_input takes raw uint8 pixels: half=True (fp16 input) contradicts it")
    return precision


def _export_proto(source: nn.Module, *, size: tuple[int, int], stride: int | None, dynamic: bool, opset: int,
                  outputs: tuple[str, ...], argmax: bool, half: bool, precision: str = "fp32",
                  keep_fp32: Sequence[str] = (), uint8_input: bool = False,
                  labels_dtype: str = "int32") -> tuple[onnx.ModelProto, list[str]]:
    """Deep-copy ``source`` (already in eval mode at the wanted stride), fold BN, export, rewrite; returns
    the graph and the nodes kept in fp32 (fp16 graphs)."""
    onnx = _require_onnx()
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter builds the graph with it)
    except ImportError as exc:
        raise ImportError(f"ONNX export needs onnxscript: {_INSTALL_HINT}") from exc
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(f"opset must be between {MIN_OPSET} and {onnx.defs.onnx_opset_version()}, got {opset}")

    # contiguous (NCHW) weights: channels-last ones trace into as_strided/Gather nodes
    model = copy.deepcopy(source).cpu().float().to(memory_format=torch.contiguous_format).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    fold_batchnorm_(model)
    dtype = torch.float16 if half else torch.float32
    model = model.to(dtype)
    wrapper = _ExportWrapper(model, outputs, argmax, uint8_input=uint8_input,
                             labels_dtype=LABEL_DTYPES[labels_dtype]).to(dtype).eval()
    names = list(outputs) + ([LABELS_NAME] if argmax else [])
    batch = 2 if dynamic else 1
    example = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0)).to(dtype)
    if uint8_input:
        example = torch.randint(0, 256, (batch, 3, *size), generator=torch.Generator().manual_seed(0),
                                dtype=torch.uint8)
    dynamic_shapes = None
    if dynamic:
        from torch.export import Dim

        least = max(2, stride or 1)
        dynamic_shapes = ({0: Dim("batch", min=1, max=4096), 2: Dim("height", min=least, max=16384),
                           3: Dim("width", min=least, max=16384)},)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(training mode|torch.export|Dynamo|TracerWarning).*")
        try:
            program = torch.onnx.export(wrapper, (example,), None, dynamo=True,
                                        opset_version=max(opset, _EXPORT_OPSET), input_names=[INPUT_NAME],
                                        output_names=names, dynamic_shapes=dynamic_shapes, optimize=True,
                                        verbose=False, external_data=False)
        except Exception as exc:
            raise RuntimeError(f"torch.onnx.export could not export {type(source).__name__}: "
                               f"{_exporter_summary(exc)}") from exc
    proto = program.model_proto

    passes.fold_constant_layout_ops(proto)
    passes.rewrite_global_pool(proto, passes.tensor_ranks(proto))
    passes.drop_unused_initializers(proto)
    if uint8_input:
        passes.reroute_uint8_shapes(proto)
    kept: list[str] = []
    if precision == "fp16" and not half:
        kept = passes.convert_float16(proto, keep_fp32=keep_fp32, scopes=passes.module_scopes(proto))
    for node in proto.graph.node:
        del node.metadata_props[:]  # stack traces with local paths: noise in a deployment artifact
    if opset < _default_opset(proto):
        try:
            proto = passes.lower_opset(proto, opset)
        except Exception as exc:
            raise RuntimeError(f"could not convert the exported graph (opset {_default_opset(proto)}) to opset "
                               f"{opset}: {exc}. Export with opset={_EXPORT_OPSET} instead.") from exc
    proto.producer_name = "fastdeeplab"
    from .._version import __version__

    proto.producer_version = __version__
    proto.graph.name = type(source).__name__
    io = "fp16 inputs and outputs" if half else "fp32 inputs and outputs"
    meta = {"fastdeeplab.output_stride": str(stride),
            "fastdeeplab.precision": f"{precision}, {io}" + (f", kept in fp32: {', '.join(keep_fp32)}"
                                                               if keep_fp32 else ""),
            "fastdeeplab.input": ("uint8 RGB 0-255, NCHW, normalised in the graph" if uint8_input
                                  else "RGB normalised with ImageNet mean/std, NCHW"),
            "fastdeeplab.labels": f"{labels_dtype} argmax over classes" if argmax else ""}
    del proto.metadata_props[:]
    for key, value in meta.items():
        if value:
            proto.metadata_props.add(key=key, value=value)
    return proto, kept


def onnx_model_proto(model: nn.Module, *, input_size: Sequence[int] = (513, 513), output_stride: int | None = None,
                     dynamic: bool = True, opset: int = 17, outputs: Sequence[str] = ("out",),
                     argmax: bool = False, half: bool = False, precision: str | None = None,
                     keep_fp32: Sequence[str] = (), uint8_input: bool = False,
                     labels_dtype: str = "int32") -> onnx.ModelProto:
    """Export ``model`` to an in-memory ``onnx.ModelProto`` without writing or checking anything.

    Same graph and options as :func:`export_onnx` (BN folded, GlobalAveragePool + Expand, half-pixel
    Resize). The model is not modified: its stride and training mode are restored, the export runs on a
    deep copy.
    """
    precision = _check_graph_options(precision or ("fp16" if half else "fp32"), half, keep_fp32, labels_dtype,
                                     uint8_input, argmax)
    source = _as_exportable(model)
    outputs = _check_outputs(source, outputs, argmax)
    with _without_autocast(), _inference_state(source, output_stride) as stride:
        size = _check_size(input_size, stride)
        proto, _ = _export_proto(source, size=size, stride=stride, dynamic=dynamic, opset=opset, outputs=outputs,
                                 argmax=argmax, half=half, precision=precision, keep_fp32=keep_fp32,
                                 uint8_input=uint8_input, labels_dtype=labels_dtype)
        return proto


# --------------------------------------------------------------------------------------------------
# Export, checked (the checks run in fastdeeplab.export.verify)
# --------------------------------------------------------------------------------------------------
def export_onnx(model: nn.Module, path: str | os.PathLike, *, input_size: Sequence[int] = (513, 513),
                output_stride: int | None = None, dynamic: bool = True, opset: int = 17, half: bool = False,
                outputs: Sequence[str] = ("out",), argmax: bool = False, check: bool = True,
                check_sizes: Sequence[Sequence[int]] | None = None, threads: int | None = None,
                precision: str | None = None, keep_fp32: Sequence[str] = (), uint8_input: bool = False,
                labels_dtype: str = "int32") -> ExportReport:
    """Export ``model`` to ONNX at ``path``, check the graph, and return an :class:`ExportReport`.

    Args:
        model: a fastdeeplab ``DeepLabV3`` (optimized or not: an ONNX Runtime or OpenVINO model exports the
            fused model it runs, a bfloat16 one a float32 copy), a torchvision ``DeepLabV3`` (converted with
            :func:`fastdeeplab.from_torchvision`), or any module mapping ``[N, 3, H, W]`` to ``{"out": ...}``.
            It is not modified: the export runs on a deep copy, its stride and mode are restored. An
            enclosing ``torch.autocast`` does not apply: the graph's precision is ``precision``'s.
        path: where to write the ``.onnx`` file. Written atomically, and only if every check passes.
        input_size: ``(H, W)`` traced, and the first size checked.
        output_stride: export at this stride (8, 16 or 32) instead of the model's.
        dynamic: batch, height and width dynamic (``[batch, 3, height, width]``); else ``[1, 3, H, W]``.
        opset: ONNX opset, 13 or higher (the exporter emits 18; lower ones are converted).
        half: float16 weights, input and outputs (the whole graph in fp16, as PyTorch's ``model.half()``).
        precision: ``"fp32"`` (default) or ``"fp16"``: an fp16 graph with **fp32 inputs and outputs** (a
            ``Cast`` at each boundary), the form TensorRT's strongly typed networks build in fp16. Int8 is a
            Q/DQ graph made from the fp32 export: :func:`fastdeeplab.export.quantize.quantize_onnx`.
        keep_fp32: with ``precision="fp16"``, layers kept in fp32 (``Cast`` around them), by module path
            (``"classifier.4"``: that module and its children) or ONNX node name. Default: none.
        outputs: model outputs to export, ``"out"`` and optionally ``"aux"``.
        argmax: add ``labels`` ``[N, H, W]``: the class index per pixel, computed in the graph.
        labels_dtype: ``"int32"`` (default) or ``"uint8"`` (4x smaller; up to 256 classes).
        uint8_input: the graph takes raw ``uint8`` RGB ``[N, 3, H, W]`` (0-255) and normalises it with the
            ImageNet mean and std itself, so clients send pixels.
        check: run the checks below; a failure raises :class:`ExportCheckError` naming the check and node,
            and nothing is written.
        check_sizes: ``(H, W)`` sizes at which ONNX Runtime is compared with PyTorch; default ``input_size``
            (batch 1) and a second, odd, non-square size (batch 2, through the dynamic axes).
        threads: ONNX Runtime threads for the check (default: physical cores).

    Checks: ``onnx.checker`` (full) and strict shape inference; opset >= 13; no ``BatchNormalization``; the
    pooled ASPP branch is not resized; dynamic axes; for fp16 graphs every Conv's input and weight in fp16
    (kept layers in fp32) and fp32 I/O (:func:`fastdeeplab.export.checks.check_fp16_graph`); every node
    against TensorRT's op list (:func:`fastdeeplab.export.checks.check_tensorrt`); ONNX Runtime matches
    PyTorch (fp32) within ``1e-4 * max|torch|`` (``2e-2`` for fp16) at each size, with the pixel agreement
    of the class maps in ``report.agreement``; in-graph labels equal PyTorch's argmax.
    """
    from .verify import run_checks, second_size

    check_output_path(path, what="ONNX")  # fail before a long export
    onnx = _require_onnx()
    if check:
        require_onnxruntime()
    precision = _check_graph_options(precision or ("fp16" if half else "fp32"), half, keep_fp32, labels_dtype,
                                     uint8_input, argmax)
    source = _as_exportable(model)
    outputs = _check_outputs(source, outputs, argmax)
    start = time.perf_counter()
    with _without_autocast(), _inference_state(source, output_stride) as stride:
        size = _check_size(input_size, stride)
        if check_sizes is None:
            sizes = [size, second_size(*size, stride)] if dynamic else [size]
        else:
            sizes = [_check_size(s, stride, "check_sizes entry") for s in check_sizes]
            if not dynamic and any(s != size for s in sizes):
                raise ValueError(f"a static export ({size[0]}x{size[1]}) can only be checked at its own size")
        proto, kept = _export_proto(source, size=size, stride=stride, dynamic=dynamic, opset=opset,
                                    outputs=outputs, argmax=argmax, half=half, precision=precision,
                                    keep_fp32=keep_fp32, uint8_input=uint8_input, labels_dtype=labels_dtype)
        elapsed = time.perf_counter() - start
        inputs = {i.name: _dims(i) for i in proto.graph.input}
        outs = {o.name: _dims(o) for o in proto.graph.output}
        classes = outs.get("out", (0, 0))[1]
        if labels_dtype == "uint8" and isinstance(classes, int) and classes > 256:
            raise ValueError(f"uint8 labels hold at most 256 classes; the model has {classes}")
        dtypes = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
                  for v in list(proto.graph.input) + list(proto.graph.output)}
        report = ExportReport(path=Path(path), opset=_default_opset(proto),
                              op_counts=Counter(n.op_type for n in proto.graph.node), inputs=inputs, outputs=outs,
                              dtypes=dtypes, output_stride=stride, precision=precision,
                              export_seconds=elapsed, kept_fp32=kept)
        with atomic_path(path) as tmp:
            onnx.save_model(proto, tmp)
            if check:
                run_checks(report, proto, tmp, source, sizes=sizes, dynamic=dynamic, outputs=outputs,
                            argmax=argmax, half=half, threads=threads, kept=kept, uint8_input=uint8_input,
                            labels_dtype=labels_dtype)
    report.file_size = Path(path).stat().st_size
    return report
