"""Export to ONNX, checked: a graph of standard ops that TensorRT, ONNX Runtime and OpenVINO all read.

The graph takes ``input`` ``[batch, 3, height, width]`` (normalised RGB, NCHW; all three dims dynamic by
default) and returns the model's outputs by name: ``out`` ``[batch, K, height, width]`` logits, ``aux`` when
asked for, and ``labels`` ``[batch, height, width]`` **int32** class indices when ``argmax=True`` (an in-graph
``ArgMax``; int32 because TensorRT computes indices in int32 and would cast an int64 output down anyway, and
it halves the output's size).

What the exported graph looks like, and why:

* **Exporter.** ``torch.onnx.export(..., dynamo=True)``: the ``torch.export``-based exporter, the default
  since PyTorch 2.9 (the TorchScript one warns that it will be removed). It emits opset 18; lower opsets
  (13–17) are produced with ONNX's version converter after the rewrites below.
* **BatchNorm folded.** Conv→BN pairs are folded into the conv's weight and bias (in float64) on a deep
  copy before export; the exporter's optimizer folds any it finds too, and a check fails on any
  ``BatchNormalization`` left in the graph.
* **Pooled ASPP branch** is ``GlobalAveragePool → Conv → Relu → Expand``: ``torch.export`` lowers the
  adaptive pool to ``ReduceMean``, which is rewritten to ``GlobalAveragePool``. torchvision models are
  converted with :func:`fastdeeplab.from_torchvision` first, so the branch is broadcast, never a ``Resize``
  of a 1×1 map.
* **Final upsample** is ``Resize(mode="linear", coordinate_transformation_mode="half_pixel")`` with output
  ``sizes`` taken from the input's shape: ``F.interpolate(..., align_corners=False)`` exactly, in a mode
  TensorRT, ONNX Runtime and OpenVINO all implement (the checks compare ORT with PyTorch at odd sizes).

>>> import fastdeeplab
>>> model = fastdeeplab.deeplabv3_resnet50(num_classes=21)                       # doctest: +SKIP
>>> report = fastdeeplab.export_onnx(model, "deeplabv3.onnx", output_stride=16)  # doctest: +SKIP
>>> print(report)                                                                # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from .._io import atomic_path, check_writable_dir
from ..runtime.onnxruntime import ort_session, physical_cores, require_onnxruntime

if TYPE_CHECKING:
    import onnx
    import onnxruntime

__all__ = [
    "INPUT_NAME",
    "LABELS_NAME",
    "CheckResult",
    "ExportCheckError",
    "ExportReport",
    "export_onnx",
    "fold_batchnorm_",
    "onnx_model_proto",
    "ort_session",
    "physical_cores",
]

INPUT_NAME = "input"
LABELS_NAME = "labels"
_MODEL_OUTPUTS = ("out", "aux")
_EXPORT_OPSET = 18  # what the torch.export-based exporter emits natively
_MIN_OPSET = 13
# Tolerance of the ONNX Runtime check: max |ort - torch| <= tol * max |torch|, per output.
TOLERANCES = {torch.float32: 1e-4, torch.float16: 2e-2}
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
# Report and errors
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckResult:
    """One post-export check: ``passed`` and a one-line ``message`` (the measured figure or the problem)."""

    passed: bool
    message: str


class ExportCheckError(RuntimeError):
    """A post-export check failed; nothing was written. ``check`` names the check, ``node`` the ONNX node
    at fault (``None`` when the failure is not about one node), ``report`` holds what was measured so far."""

    def __init__(self, check: str, message: str, *, node: str | None = None,
                 report: ExportReport | None = None) -> None:
        self.check, self.node, self.report = check, node, report
        where = f" (node {node!r})" if node else ""
        super().__init__(f"ONNX export check {check!r} failed{where}: {message}")


Dims = tuple[int | str, ...]


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and what its checks measured.

    ``errors["97x131 b2"]["out"] = (max_abs, max_abs / max|torch|)`` for every checked size and output.
    """

    path: Path
    opset: int
    op_counts: Counter[str]
    inputs: dict[str, Dims]
    outputs: dict[str, Dims]
    dtypes: dict[str, str] = field(default_factory=dict)
    output_stride: int | None = None
    precision: str = "fp32"
    errors: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    checks: dict[str, CheckResult] = field(default_factory=dict)
    file_size: int = 0
    export_seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks.values())

    def __str__(self) -> str:
        size = f"{self.file_size / 2**20:.1f} MiB"
        stride = f", output stride {self.output_stride}" if self.output_stride else ""
        lines = [f"ONNX export: {self.path} ({size}, opset {self.opset}, {self.precision}{stride}, "
                 f"exported in {self.export_seconds:.1f} s)"]
        for kind, tensors in (("input ", self.inputs), ("output", self.outputs)):
            for name, dims in tensors.items():
                lines.append(f"  {kind} {name:<7} [{', '.join(map(str, dims))}] {self.dtypes.get(name, '')}")
        lines.append(f"  {sum(self.op_counts.values())} nodes: "
                     + ", ".join(f"{op} {n}" for op, n in self.op_counts.most_common()))
        if self.checks:
            lines.append("  checks:")
            width = max(len(k) for k in self.checks)
            for name, result in self.checks.items():
                lines.append(f"    {'PASS' if result.passed else 'FAIL'}  {name:<{width}}  {result.message}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Preparing the model: torchvision conversion, output stride, BN folding
# --------------------------------------------------------------------------------------------------
def _is_torchvision_deeplab(model: nn.Module) -> bool:
    try:
        from torchvision.models.segmentation.deeplabv3 import DeepLabV3 as TvDeepLabV3
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return False
    return isinstance(model, TvDeepLabV3)


def _as_exportable(model: nn.Module) -> nn.Module:
    """A torchvision ``DeepLabV3`` becomes a fastdeeplab model (pooled branch: Expand, not Resize)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if _is_torchvision_deeplab(model):
        from ..hub import from_torchvision

        return from_torchvision(model)
    return model


@contextlib.contextmanager
def _inference_state(model: nn.Module, output_stride: int | None) -> Iterator[int | None]:
    """Eval mode and the requested output stride for the duration; both restored afterwards."""
    was_training = model.training
    old_stride = getattr(model, "output_stride", None)
    switch = output_stride is not None and output_stride != old_stride
    if switch and not hasattr(model, "set_output_stride"):
        raise ValueError(f"cannot export at output stride {output_stride}: {type(model).__name__} has no "
                         f"set_output_stride() (its stride is {old_stride}); switch it before optimizing")
    model.eval()
    try:
        if switch:
            model.set_output_stride(output_stride)
        yield output_stride if output_stride is not None else old_stride
    finally:
        if switch:
            model.set_output_stride(old_stride)
        model.train(was_training)


@torch.no_grad()
def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> bool:
    if (type(conv) is not nn.Conv2d or not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None
            or bn.running_var is None or conv.out_channels != bn.num_features):
        return False
    scale = (bn.weight.double() if bn.affine else torch.ones_like(bn.running_var, dtype=torch.float64))
    scale = scale / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = bn.bias.double() if bn.affine else torch.zeros_like(scale)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    dtype = conv.weight.dtype
    conv.weight = nn.Parameter((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(dtype), requires_grad=False)
    conv.bias = nn.Parameter(((bias - bn.running_mean.double()) * scale + shift).to(dtype), requires_grad=False)
    return True


def _sequential_children(module: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """Children of a container whose forward runs them in order, else ``None``."""
    from ..model import ASPPPooling, Backbone

    if type(module).forward is nn.Sequential.forward or isinstance(module, (ASPPPooling, Backbone)):
        return list(module.named_children())
    return None


def fold_batchnorm_(model: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d into the conv, in place; returns the count.

    Folded BNs become ``nn.Identity``. Pairs are found in containers that run their children in order
    (``nn.Sequential``, the ASPP pooling branch, the backbone) and in torchvision ResNet blocks
    (``conv1/bn1`` … ``conv3/bn3``). The model must be in eval mode: running statistics are used.
    """
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if model.training:
        raise ValueError("fold_batchnorm_ needs a model in eval mode (it uses the running statistics)")
    folded = 0
    for module in list(model.modules()):
        children = _sequential_children(module)
        if children is not None:
            for (_, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and _fold_pair(conv, bn):
                    setattr(module, bn_name, nn.Identity())
                    folded += 1
        if isinstance(module, (BasicBlock, Bottleneck)):
            for i in (1, 2, 3):
                conv, bn = getattr(module, f"conv{i}", None), getattr(module, f"bn{i}", None)
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and _fold_pair(conv, bn):
                    setattr(module, f"bn{i}", nn.Identity())
                    folded += 1
    return folded


class _ExportWrapper(nn.Module):
    """Turns the model's ``{"out": ..., "aux": ...}`` into a tuple in output-name order, plus labels."""

    def __init__(self, model: nn.Module, outputs: Sequence[str], argmax: bool) -> None:
        super().__init__()
        self.model = model
        self.outputs = tuple(outputs)
        self.argmax = argmax

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        result = self.model(x)
        if isinstance(result, Tensor):
            result = {"out": result}
        values = [result[name] for name in self.outputs]
        if self.argmax:
            values.append(result["out"].argmax(dim=1).to(torch.int32))
        return tuple(values)


def _check_outputs(model: nn.Module, outputs: Sequence[str], argmax: bool) -> tuple[str, ...]:
    outputs = tuple(outputs)
    unknown = [o for o in outputs if o not in _MODEL_OUTPUTS]
    if unknown:
        raise ValueError(f"unknown output(s) {unknown}; the model's outputs are {_MODEL_OUTPUTS}")
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"duplicate output names in {outputs}")
    if not outputs and not argmax:
        raise ValueError("nothing to export: outputs is empty and argmax is False")
    if "aux" in outputs and getattr(model, "aux_classifier", True) is None:
        raise ValueError("outputs asks for 'aux' but the model has no auxiliary head (build it with aux_loss=True)")
    return outputs


def _check_size(size: Sequence[int], stride: int | None, what: str = "input_size") -> tuple[int, int]:
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) for s in size):
        raise ValueError(f"{what} must be (height, width) integers, got {size!r}")
    h, w = int(size[0]), int(size[1])
    least = stride or 1
    if h < least or w < least:
        raise ValueError(f"{what} {h}x{w} is smaller than the output stride {least}")
    return h, w


# --------------------------------------------------------------------------------------------------
# Graph rewrites
# --------------------------------------------------------------------------------------------------
def _reduce_axes(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> list[int] | None:
    import onnx

    for attr in node.attribute:
        if attr.name == "axes":
            return list(onnx.helper.get_attribute_value(attr))
    if len(node.input) > 1 and node.input[1] in constants:
        return [int(a) for a in constants[node.input[1]].ravel()]
    return None


def _rewrite_global_pool(proto: onnx.ModelProto, ranks: dict[str, int]) -> int:
    """``ReduceMean(x, axes=[2, 3] or [-2, -1], keepdims=1)`` on a 4-D ``x`` → ``GlobalAveragePool(x)``."""
    import onnx
    from onnx import numpy_helper

    constants = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    rewritten = 0
    nodes = []
    for node in proto.graph.node:
        if node.op_type == "ReduceMean" and node.domain in ("", "ai.onnx"):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            axes = _reduce_axes(node, constants)
            if (ranks.get(node.input[0]) == 4 and attrs.get("keepdims", 1) == 1 and axes is not None
                    and sorted(a % 4 for a in axes) == [2, 3]):
                nodes.append(onnx.helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output),
                                                   name=node.name.replace("mean", "global_average_pool")
                                                   or None))
                rewritten += 1
                continue
        nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return rewritten


# Data-movement ops whose result is exact: folded when every input is an initializer.
_FOLDABLE = ("Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Transpose", "Slice", "Cast")


def _fold_constant_layout_ops(proto: onnx.ModelProto) -> int:
    """Replace layout ops on initializers (``weight[:, :, None, None]`` → ``Unsqueeze(weight)``) by their
    result, so a Conv's weight is an initializer as TensorRT requires; returns how many were folded."""
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    initializers = {t.name: t for t in proto.graph.initializer}
    graph_outputs = {o.name for o in proto.graph.output}
    folded, kept = 0, []
    for node in proto.graph.node:
        inputs = [i for i in node.input if i]
        if (node.op_type in _FOLDABLE and node.domain in ("", "ai.onnx") and inputs
                and all(i in initializers for i in inputs) and not set(node.output) & graph_outputs):
            outputs = [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output]
            single = onnx.helper.make_model(
                onnx.helper.make_graph([node], "fold", [], outputs, initializer=[initializers[i] for i in inputs]),
                opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
            for name, value in zip(node.output, ReferenceEvaluator(single).run(None, {}), strict=True):
                initializers[name] = numpy_helper.from_array(np.asarray(value), name)
                proto.graph.initializer.append(initializers[name])
            folded += 1
            continue
        kept.append(node)
    if folded:
        del proto.graph.node[:]
        proto.graph.node.extend(kept)
    return folded


def _drop_unused_initializers(proto: onnx.ModelProto) -> None:
    used = {name for node in proto.graph.node for name in node.input}
    used |= {o.name for o in proto.graph.output}
    for node in proto.graph.node:  # names captured by subgraphs
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                used |= {name for n in sub.node for name in n.input}
    kept = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)


def _lower_shape_slices(proto: onnx.ModelProto) -> None:
    """``Shape(x, start, end)`` (opset 15) → ``Slice(Shape(x), start, end)`` so opsets 13–14 can be emitted."""
    import onnx
    from onnx import numpy_helper

    nodes = []
    for index, node in enumerate(proto.graph.node):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Shape" or not ({"start", "end"} & set(attrs)):
            nodes.append(node)
            continue
        full, prefix = f"{node.output[0]}__full", f"{node.name or 'shape'}_{index}"
        bounds = {"starts": attrs.get("start", 0), "ends": attrs.get("end", np.iinfo(np.int64).max), "axes": 0}
        for key, value in bounds.items():
            proto.graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), f"{prefix}_{key}"))
        nodes.append(onnx.helper.make_node("Shape", [node.input[0]], [full], name=node.name))
        nodes.append(onnx.helper.make_node("Slice", [full] + [f"{prefix}_{k}" for k in bounds], list(node.output),
                                           name=f"{prefix}_slice"))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def _io_signature(schema: Any) -> tuple:
    return [(i.name, i.option) for i in schema.inputs], [(o.name, o.option) for o in schema.outputs]


def _drop_newer_attributes(node: onnx.NodeProto, old: Any, new: Any, target: int) -> None:
    """Remove attributes that ``old`` (the schema at ``target``) lacks and that hold ``new``'s default."""
    import onnx

    kept = []
    for attr in node.attribute:
        if attr.name not in old.attributes:
            spec = new.attributes.get(attr.name)
            default = None if spec is None or spec.default_value.type == 0 else spec.default_value
            if default is None or onnx.helper.get_attribute_value(default) != onnx.helper.get_attribute_value(attr):
                raise ValueError(f"node {node.name!r} ({node.op_type}) uses attribute {attr.name!r}, "
                                 f"which opset {target} lacks")
            continue
        kept.append(attr)
    if len(kept) != len(node.attribute):
        del node.attribute[:]
        node.attribute.extend(kept)


def _lower_opset(proto: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Convert the exporter's graph (opset 18+) down to ``target`` (13 or more).

    ONNX's version converter does most of it, with three gaps filled here: ``Shape(start, end)`` is
    rewritten as ``Shape`` + ``Slice`` below 15; the converter keeps attributes the older op lacks
    (``ReduceMean``'s ``noop_with_empty_axes``), dropped when they hold their default; and it has no
    adapter below 15 for ``Shape`` nor below 14 for ``Relu``/``Add``, whose newer versions only widen the
    types or add defaulted attributes, so those opsets are declared once every node is checked to have the
    same inputs and outputs there. The full checker then confirms every type and attribute is legal.
    """
    import onnx

    source = _default_opset(proto)
    if target >= source:
        return proto
    if target < 15:
        _lower_shape_slices(proto)
    proto = onnx.version_converter.convert_version(proto, max(target, 15))
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            old = onnx.defs.get_schema(node.op_type, target)
        except onnx.defs.SchemaError:
            raise ValueError(f"node {node.name!r} ({node.op_type}) does not exist at opset {target}") from None
        converted = onnx.defs.get_schema(node.op_type, max(target, 15))
        if old.since_version != converted.since_version and _io_signature(old) != _io_signature(converted):
            raise ValueError(f"node {node.name!r} ({node.op_type}) changed inputs between opset {target} and 15")
        _drop_newer_attributes(node, old, onnx.defs.get_schema(node.op_type, source), target)
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = target
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _tensor_ranks(proto: onnx.ModelProto) -> dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto)
    ranks = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info):
        if vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    return ranks


def _dims(value_info: onnx.ValueInfoProto) -> Dims:
    return tuple(d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim)


def _default_opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


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


def _export_proto(source: nn.Module, *, size: tuple[int, int], stride: int | None, dynamic: bool, opset: int,
                  outputs: tuple[str, ...], argmax: bool, half: bool) -> onnx.ModelProto:
    """Deep-copy ``source`` (already in eval mode at the wanted stride), fold BN, export, rewrite."""
    onnx = _require_onnx()
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter builds the graph with it)
    except ImportError as exc:
        raise ImportError(f"ONNX export needs onnxscript: {_INSTALL_HINT}") from exc
    if not _MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(f"opset must be between {_MIN_OPSET} and {onnx.defs.onnx_opset_version()}, got {opset}")

    # contiguous (NCHW) weights: channels-last ones trace into as_strided/Gather nodes
    model = copy.deepcopy(source).cpu().float().to(memory_format=torch.contiguous_format).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    fold_batchnorm_(model)
    dtype = torch.float16 if half else torch.float32
    model = model.to(dtype)
    wrapper = _ExportWrapper(model, outputs, argmax).eval()
    names = list(outputs) + ([LABELS_NAME] if argmax else [])
    batch = 2 if dynamic else 1
    example = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0)).to(dtype)
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

    _fold_constant_layout_ops(proto)
    _rewrite_global_pool(proto, _tensor_ranks(proto))
    for node in proto.graph.node:
        del node.metadata_props[:]  # stack traces with local paths: noise in a deployment artifact
    _drop_unused_initializers(proto)
    if opset < _default_opset(proto):
        try:
            proto = _lower_opset(proto, opset)
        except Exception as exc:
            raise RuntimeError(f"could not convert the exported graph (opset {_default_opset(proto)}) to opset "
                               f"{opset}: {exc}. Export with opset={_EXPORT_OPSET} instead.") from exc
    proto.producer_name = "fastdeeplab"
    from .. import __version__

    proto.producer_version = __version__
    proto.graph.name = type(source).__name__
    meta = {"fastdeeplab.output_stride": str(stride), "fastdeeplab.precision": "fp16" if half else "fp32",
            "fastdeeplab.input": "RGB normalised with ImageNet mean/std, NCHW",
            "fastdeeplab.labels": "int32 argmax over classes" if argmax else ""}
    del proto.metadata_props[:]
    for key, value in meta.items():
        if value:
            proto.metadata_props.add(key=key, value=value)
    return proto


def onnx_model_proto(model: nn.Module, *, input_size: Sequence[int] = (513, 513), output_stride: int | None = None,
                     dynamic: bool = True, opset: int = 17, outputs: Sequence[str] = ("out",),
                     argmax: bool = False, half: bool = False) -> onnx.ModelProto:
    """Export ``model`` to an in-memory ``onnx.ModelProto`` without writing or checking anything.

    Same graph as :func:`export_onnx` (BN folded, GlobalAveragePool + Expand, half-pixel Resize). The model
    is not modified: its stride and training mode are restored, the export runs on a deep copy.
    """
    source = _as_exportable(model)
    outputs = _check_outputs(source, outputs, argmax)
    with _inference_state(source, output_stride) as stride:
        size = _check_size(input_size, stride)
        return _export_proto(source, size=size, stride=stride, dynamic=dynamic, opset=opset, outputs=outputs,
                             argmax=argmax, half=half)


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------
def _second_size(h: int, w: int, stride: int | None) -> tuple[int, int]:
    """A different, odd, non-square size for the dynamic-shape check."""
    s = stride or 8
    h2 = max(2 * s + 1, (3 * h) // 4) | 1
    w2 = max(2 * s + 3, (5 * w) // 8) | 1
    if h2 == w2:
        w2 += 2
    return (h2, w2) if (h2, w2) != (h, w) else (h + 2 * s + 1, w + 2 * s + 3)


def _pooled_branch(proto: onnx.ModelProto) -> tuple[bool, str, str | None]:
    """Follow each GlobalAveragePool forward through per-pixel ops; a Resize of that 1×1 map fails."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    paths = []
    for node in proto.graph.node:
        if node.op_type != "GlobalAveragePool":
            continue
        chain, frontier = [node.op_type], [node]
        while frontier:
            nxt = [c for n in frontier for out in n.output for c in consumers.get(out, [])]
            resize = next((c for c in nxt if c.op_type in ("Resize", "Upsample")), None)
            if resize is not None:
                return False, f"{' -> '.join(chain)} -> {resize.op_type}: a resize of a 1x1 pooled map", resize.name
            frontier = [c for c in nxt if c.op_type in ("Conv", "Relu", "BatchNormalization", "Identity", "Cast",
                                                        "Clip")]
            if frontier:
                chain.append(frontier[0].op_type)
            elif nxt:
                chain.append(nxt[0].op_type)
        paths.append(" -> ".join(chain))
    if not paths:
        return True, "no GlobalAveragePool in the graph", None
    return True, "; ".join(sorted(set(paths))), None


def _top2_margin(logits: np.ndarray) -> np.ndarray:
    top2 = np.partition(logits, -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def _run_checks(report: ExportReport, proto: onnx.ModelProto, path: Path, reference: nn.Module, *,
                sizes: Sequence[tuple[int, int]], dynamic: bool, outputs: tuple[str, ...], argmax: bool,
                half: bool, threads: int | None) -> None:
    """Run every check in order, record it in ``report``; the first failure raises ExportCheckError."""
    import onnx

    from .checks import check_tensorrt

    def record(name: str, passed: bool, message: str, node: str | None = None) -> None:
        report.checks[name] = CheckResult(passed, message)
        if not passed:
            raise ExportCheckError(name, message, node=node, report=report)

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        record("onnx_checker", False, str(exc).splitlines()[0])
    record("onnx_checker", True, "onnx.checker.check_model(full_check=True) passed")
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        record("shape_inference", False, str(exc).splitlines()[0])
    inferred_outputs = {o.name: _dims(o) for o in inferred.graph.output}
    record("shape_inference", True, "strict: " + ", ".join(f"{k} [{', '.join(map(str, v))}]"
                                                           for k, v in inferred_outputs.items()))

    record("opset", report.opset >= _MIN_OPSET, f"opset {report.opset} (>= {_MIN_OPSET} required)")
    bn = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    record("no_batchnorm", not bn, "BatchNormalization folded into Conv" if not bn
           else f"{len(bn)} BatchNormalization node(s) left unfolded, first {bn[0].name!r}",
           node=bn[0].name if bn else None)
    ok, message, node = _pooled_branch(proto)
    record("pooled_branch", ok, message, node)
    if dynamic:
        fixed = {n: d for n, d in report.inputs.items() if not all(isinstance(x, str) for x in (d[0], d[2], d[3]))}
        record("dynamic_axes", not fixed, "batch, height, width dynamic" if not fixed
               else f"input dims not dynamic: {fixed}")
    trt = check_tensorrt(proto)
    first = trt.issues[0] if trt.issues else None
    record("tensorrt_ops", trt.ok,
           f"{trt.nodes} nodes supported by TensorRT's ONNX parser" if trt.ok
           else "; ".join(str(i) for i in trt.issues[:10]), node=first.node if first else None)

    session = ort_session(path, threads=threads)
    dtype = torch.float16 if half else torch.float32
    tolerance = TOLERANCES[dtype]
    names = list(outputs) + ([LABELS_NAME] if argmax else [])
    generator = torch.Generator().manual_seed(1234)
    device = next((p.device for p in reference.parameters()), torch.device("cpu"))
    ref_dtype = next((p.dtype for p in reference.parameters() if p.is_floating_point()), torch.float32)
    for i, (h, w) in enumerate(sizes):
        batch = 2 if dynamic and i > 0 else 1
        key = f"{h}x{w} b{batch}"
        x = torch.randn(batch, 3, h, w, generator=generator)
        with torch.inference_mode():
            ref = reference(x.to(device=device, dtype=ref_dtype))
        ref = {"out": ref} if isinstance(ref, Tensor) else ref
        got = dict(zip(names, session.run(names, {INPUT_NAME: x.to(dtype).numpy()}), strict=True))
        errors: dict[str, tuple[float, float]] = {}
        for name in outputs:
            expected = ref[name].double().cpu().numpy()
            actual = got[name].astype(np.float64)
            if actual.shape != expected.shape:
                report.errors[key] = errors
                record(f"ort@{key}", False, f"{name}: ONNX Runtime gives shape {actual.shape}, "
                                            f"PyTorch {expected.shape}")
            max_abs = float(np.abs(actual - expected).max())
            errors[name] = (max_abs, max_abs / max(float(np.abs(expected).max()), 1e-12))
        report.errors[key] = errors
        worst = max(errors.values(), key=lambda e: e[1]) if errors else (0.0, 0.0)
        record(f"ort@{key}", worst[1] <= tolerance,
               ", ".join(f"{n}: max abs {e[0]:.2e}, rel {e[1]:.2e}" for n, e in errors.items())
               + f" (tol {tolerance:g} x max|torch|)")
        if argmax:
            logits = ref["out"].double().cpu().numpy()
            expected_labels = logits.argmax(axis=1)
            labels = got[LABELS_NAME]
            mismatch = labels != expected_labels
            # A flip is only excused where PyTorch's top two logits are closer than the measured error.
            slack = 2 * errors.get("out", (float(tolerance * np.abs(logits).max()), 0.0))[0]
            bad = int((mismatch & (_top2_margin(logits) > slack)).sum())
            record(f"labels@{key}", labels.dtype == np.int32 and bad == 0,
                   f"{labels.dtype} labels, {100 * (1 - mismatch.mean()):.3f}% equal torch argmax "
                   f"({int(mismatch.sum())} differ, {bad} outside near-ties)")


def export_onnx(model: nn.Module, path: str | os.PathLike, *, input_size: Sequence[int] = (513, 513),
                output_stride: int | None = None, dynamic: bool = True, opset: int = 17, half: bool = False,
                outputs: Sequence[str] = ("out",), argmax: bool = False, check: bool = True,
                check_sizes: Sequence[Sequence[int]] | None = None, threads: int | None = None) -> ExportReport:
    """Export ``model`` to ONNX at ``path``, check the graph, and return an :class:`ExportReport`.

    Args:
        model: a fastdeeplab ``DeepLabV3`` (optimized or not), a torchvision ``DeepLabV3`` (converted with
            :func:`fastdeeplab.from_torchvision`), or any module mapping ``[N, 3, H, W]`` to ``{"out": ...}``.
            It is not modified: the export runs on a deep copy, its stride and mode are restored.
        path: where to write the ``.onnx`` file. Written atomically, and only if every check passes.
        input_size: ``(H, W)`` traced, and the first size checked.
        output_stride: export at this stride (8, 16 or 32) instead of the model's.
        dynamic: batch, height and width dynamic (``[batch, 3, height, width]``); else ``[1, 3, H, W]``.
        opset: ONNX opset, 13 or higher (the exporter emits 18; lower ones are converted).
        half: float16 weights, input and outputs.
        outputs: model outputs to export, ``"out"`` and optionally ``"aux"``.
        argmax: add ``labels`` ``[N, H, W]`` int32: the class index per pixel, computed in the graph.
        check: run the checks below; a failure raises :class:`ExportCheckError` naming the check and node,
            and nothing is written.
        check_sizes: ``(H, W)`` sizes at which ONNX Runtime is compared with PyTorch; default ``input_size``
            (batch 1) and a second, odd, non-square size (batch 2, through the dynamic axes).
        threads: ONNX Runtime threads for the check (default: physical cores).

    Checks: ``onnx.checker`` (full) and strict shape inference; opset >= 13; no ``BatchNormalization``; the
    pooled ASPP branch is not resized; dynamic axes; every node against TensorRT's op list
    (:func:`fastdeeplab.export.checks.check_tensorrt`); ONNX Runtime matches PyTorch within
    ``1e-4 * max|torch|`` (fp32; ``2e-2`` for fp16) at each size; in-graph labels equal PyTorch's argmax.
    """
    onnx = _require_onnx()
    if check:
        require_onnxruntime()
    check_writable_dir(path)  # fail before a long export
    source = _as_exportable(model)
    outputs = _check_outputs(source, outputs, argmax)
    start = time.perf_counter()
    with _inference_state(source, output_stride) as stride:
        size = _check_size(input_size, stride)
        if check_sizes is None:
            sizes = [size, _second_size(*size, stride)] if dynamic else [size]
        else:
            sizes = [_check_size(s, stride, "check_sizes entry") for s in check_sizes]
            if not dynamic and any(s != size for s in sizes):
                raise ValueError(f"a static export ({size[0]}x{size[1]}) can only be checked at its own size")
        proto = _export_proto(source, size=size, stride=stride, dynamic=dynamic, opset=opset, outputs=outputs,
                              argmax=argmax, half=half)
        elapsed = time.perf_counter() - start
        inputs = {i.name: _dims(i) for i in proto.graph.input}
        outs = {o.name: _dims(o) for o in proto.graph.output}
        dtypes = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
                  for v in list(proto.graph.input) + list(proto.graph.output)}
        report = ExportReport(path=Path(path), opset=_default_opset(proto),
                              op_counts=Counter(n.op_type for n in proto.graph.node), inputs=inputs, outputs=outs,
                              dtypes=dtypes, output_stride=stride, precision="fp16" if half else "fp32",
                              export_seconds=elapsed)
        with atomic_path(path) as tmp:
            onnx.save_model(proto, tmp)
            if check:
                _run_checks(report, proto, tmp, source, sizes=sizes, dynamic=dynamic, outputs=outputs,
                            argmax=argmax, half=half, threads=threads)
    report.file_size = Path(path).stat().st_size
    return report
