"""Graph rewrites on the exported ONNX graph: each takes a ``ModelProto`` and edits it in place (or returns a
new one), knowing nothing of PyTorch.

* :func:`rewrite_global_pool` — ``ReduceMean`` over H, W → ``GlobalAveragePool`` (the pooled ASPP branch).
* :func:`fold_constant_layout_ops` — layout ops on initializers replaced by their result (TensorRT wants a
  Conv's weight to be an initializer).
* :func:`drop_unused_initializers`, :func:`lower_opset` (18 → 13..17).
* :func:`convert_float16` — the fp16 graph with fp32 inputs and outputs: float initializers and activations
  in fp16, ``Cast`` at the boundaries, named layers kept in fp32 (``Cast`` around them). This is how
  precision lives in the graph for TensorRT's strongly typed networks (TensorRT 10 with ``STRONGLY_TYPED``,
  11 always).

Helpers: :func:`tensor_ranks`, :func:`tensor_types`, :func:`dims`, :func:`default_opset`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

__all__ = [
    "convert_float16",
    "default_opset",
    "dims",
    "drop_unused_initializers",
    "fold_constant_layout_ops",
    "lower_opset",
    "module_scopes",
    "rewrite_global_pool",
    "tensor_ranks",
    "tensor_types",
]

Dims = tuple[int | str, ...]
_DEFAULT_DOMAINS = ("", "ai.onnx")


def _reduce_axes(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> list[int] | None:
    import onnx

    for attr in node.attribute:
        if attr.name == "axes":
            return list(onnx.helper.get_attribute_value(attr))
    if len(node.input) > 1 and node.input[1] in constants:
        return [int(a) for a in constants[node.input[1]].ravel()]
    return None


def rewrite_global_pool(proto: onnx.ModelProto, ranks: dict[str, int]) -> int:
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


def fold_constant_layout_ops(proto: onnx.ModelProto) -> int:
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


def drop_unused_initializers(proto: onnx.ModelProto) -> None:
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


def lower_opset(proto: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Convert the exporter's graph (opset 18+) down to ``target`` (13 or more).

    ONNX's version converter does most of it, with three gaps filled here: ``Shape(start, end)`` is
    rewritten as ``Shape`` + ``Slice`` below 15; the converter keeps attributes the older op lacks
    (``ReduceMean``'s ``noop_with_empty_axes``), dropped when they hold their default; and it has no
    adapter below 15 for ``Shape`` nor below 14 for ``Relu``/``Add``, whose newer versions only widen the
    types or add defaulted attributes, so those opsets are declared once every node is checked to have the
    same inputs and outputs there. The full checker then confirms every type and attribute is legal.
    """
    import onnx

    source = default_opset(proto)
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


def tensor_ranks(proto: onnx.ModelProto) -> dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto)
    ranks = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info):
        if vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    return ranks


def dims(value_info: onnx.ValueInfoProto) -> Dims:
    return tuple(d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim)


def default_opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))



def tensor_types(proto: onnx.ModelProto) -> dict[str, int]:
    """``{tensor name: ONNX elem_type}`` for every typed tensor (inputs, outputs, initializers, values)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    types = {t.name: t.data_type for t in inferred.graph.initializer}
    for vi in list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info):
        if vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def module_scopes(proto: onnx.ModelProto, prefix: str = "model.") -> dict[str, str]:
    """``{node name: module path}`` from the torch exporter's ``pkg.torch.onnx.name_scopes`` metadata: the
    innermost module a node came from, without the export wrapper's ``prefix`` (``classifier.4``,
    ``backbone.layer4.2.conv3``). Nodes without the metadata are left out."""
    import ast

    scopes = {}
    for node in proto.graph.node:
        for prop in node.metadata_props:
            if prop.key != "pkg.torch.onnx.name_scopes":
                continue
            try:
                names = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                continue
            modules = [n for n in names[:-1] if n.startswith(prefix)]  # the last entry is the op itself
            if modules:
                scopes[node.name] = modules[-1][len(prefix):]
    return scopes


def _fixed_float_input(node: onnx.NodeProto, index: int, opset: int) -> bool:
    """True where the op's schema fixes input ``index`` to float32 (``Resize``'s ``scales``)."""
    import onnx

    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except onnx.defs.SchemaError:
        return False
    if not schema.inputs:
        return False
    formal = schema.inputs[min(index, len(schema.inputs) - 1)]
    return formal.type_str == "tensor(float)"


def _casts_to(node: onnx.NodeProto, elem_type: int) -> bool:
    return node.op_type == "Cast" and any(a.name == "to" and a.i == elem_type for a in node.attribute)


def convert_float16(proto: onnx.ModelProto, *, keep_fp32: Iterable[str] = (),
                    scopes: Mapping[str, str] | None = None) -> list[str]:
    """Turn an fp32 graph into an fp16 graph with fp32 inputs and outputs, in place; returns the names of the
    nodes kept in fp32.

    * every float32 initializer and ``Constant`` becomes float16, except those only fp32 nodes read (an
      initializer read by both is duplicated) and inputs the op fixes to float32 (``Resize``'s ``scales``);
    * ``Cast(to=FLOAT)`` inside the fp16 part casts to FLOAT16 instead;
    * a ``Cast`` to fp16 follows every float32 graph input, a ``Cast`` to fp32 precedes every float output;
    * ``keep_fp32``: nodes that stay in fp32, by ONNX node name or by module path (``classifier.4`` keeps
      every node exported from that module and its children; ``scopes`` maps node names to module paths,
      see :func:`module_scopes`). ``Cast`` nodes convert their float inputs and outputs at the border.

    A name in ``keep_fp32`` that matches no node raises ``ValueError`` listing the module paths there are.
    """
    from onnx import TensorProto, helper, numpy_helper

    F, H = TensorProto.FLOAT, TensorProto.FLOAT16
    graph = proto.graph
    opset = default_opset(proto)
    scopes = dict(scopes or {})
    types = tensor_types(proto)
    keep_fp32 = list(keep_fp32)
    kept: set[str] = set()
    for entry in keep_fp32:
        hits = {n.name for n in graph.node if n.name == entry or scopes.get(n.name, "\0") == entry
                or scopes.get(n.name, "").startswith(entry + ".")}
        if not hits:
            known = sorted({s for s in scopes.values()})
            raise ValueError(f"keep_fp32 entry {entry!r} matches no node name nor module path; module paths in "
                             f"this graph include {known[:12]}{' ...' if len(known) > 12 else ''}")
        kept |= hits

    def is_float(name: str) -> bool:
        return bool(name) and types.get(name) == F

    # Who reads what, and in which precision.
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name:
                readers.setdefault(name, []).append((node, i))

    def wants_fp32(node: onnx.NodeProto, index: int) -> bool:
        return node.name in kept or _fixed_float_input(node, index, opset)

    # 1. Initializers and Constant nodes.
    new_inits = []
    for init in graph.initializer:
        if init.data_type != F:
            continue
        uses = readers.get(init.name, [])
        fp16_uses = [(n, i) for n, i in uses if not wants_fp32(n, i)]
        if not fp16_uses:
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name)
        if len(fp16_uses) == len(uses):
            init.CopyFrom(half)
        else:  # read by fp32 and fp16 nodes: an fp16 copy for the latter
            half.name = f"{init.name}__fp16"
            new_inits.append(half)
            for node, i in fp16_uses:
                node.input[i] = half.name
    graph.initializer.extend(new_inits)
    for node in graph.node:
        if node.op_type in ("Constant", "ConstantOfShape") and node.name not in kept:
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == F and is_float(node.output[0]) and not any(
                        wants_fp32(n, i) for n, i in readers.get(node.output[0], [])):
                    attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16),
                                                            attr.t.name))
        if node.op_type == "Cast" and node.name not in kept:
            target = next(a for a in node.attribute if a.name == "to")
            if target.i == F and not any(wants_fp32(n, i) for n, i in readers.get(node.output[0], [])):
                target.i = H

    # 2. Boundaries: graph inputs and outputs, and around the fp32 nodes.
    produced_by = {out: node for node in graph.node for out in node.output if out}
    casts_before: list[onnx.NodeProto] = []
    renamed: dict[str, str] = {}  # fp32 tensor -> its fp16 copy
    for value in graph.input:
        if value.type.tensor_type.elem_type == F:
            half = f"{value.name}__fp16"
            casts_before.append(helper.make_node("Cast", [value.name], [half], name=f"cast_{value.name}_fp16", to=H))
            renamed[value.name] = half
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.name in kept:
            for i, name in enumerate(node.input):
                producer = produced_by.get(name)
                if is_float(name) and producer is not None and producer.name not in kept \
                        and not _casts_to(producer, F):
                    full = f"{name}__fp32"
                    if full not in produced_by:
                        nodes.append(helper.make_node("Cast", [name], [full], name=f"cast_{name}_fp32", to=F))
                        produced_by[full] = nodes[-1]
                    node.input[i] = full
            nodes.append(node)
            for name in node.output:
                if is_float(name) and any(r.name not in kept for r, _ in readers.get(name, [])):
                    half = f"{name}__fp16"
                    nodes.append(helper.make_node("Cast", [name], [half], name=f"cast_{name}_fp16", to=H))
                    for reader, i in readers.get(name, []):
                        if reader.name not in kept and not _fixed_float_input(reader, i, opset):
                            reader.input[i] = half
            continue
        for i, name in enumerate(node.input):
            if name in renamed and not _fixed_float_input(node, i, opset):
                node.input[i] = renamed[name]
        nodes.append(node)
    outputs = {o.name for o in graph.output if o.type.tensor_type.elem_type == F}
    casts_after = []
    for node in nodes:
        if node.name in kept or _casts_to(node, F):
            continue
        for j, name in enumerate(node.output):
            if name in outputs:
                half = f"{name}__fp16"
                node.output[j] = half
                for reader, i in readers.get(name, []):
                    reader.input[i] = half
                casts_after.append(helper.make_node("Cast", [half], [name], name=f"cast_{name}_fp32", to=F))
    del graph.node[:]
    graph.node.extend(casts_before + nodes + casts_after)
    del graph.value_info[:]
    return sorted(kept)


def reroute_uint8_shapes(proto: onnx.ModelProto) -> int:
    """``Shape`` of a uint8 graph input → ``Shape`` of its float ``Cast``: TensorRT takes uint8 tensors only
    into a cast, so the shape arithmetic reads the cast's output (same shape). Returns how many moved."""
    from onnx import TensorProto

    uint8_inputs = {v.name for v in proto.graph.input if v.type.tensor_type.elem_type == TensorProto.UINT8}
    casts = {node.input[0]: node.output[0] for node in proto.graph.node
             if node.op_type == "Cast" and node.input and node.input[0] in uint8_inputs}
    moved = 0
    for node in proto.graph.node:
        if node.op_type == "Shape" and node.input[0] in casts:
            node.input[0] = casts[node.input[0]]
            moved += 1
    if moved:  # the casts read only graph inputs: first in the graph, so every Shape comes after them
        first = [n for n in proto.graph.node if n.op_type == "Cast" and n.input and n.input[0] in casts]
        rest = [n for n in proto.graph.node if not (n.op_type == "Cast" and n.input and n.input[0] in casts)]
        del proto.graph.node[:]
        proto.graph.node.extend(first + rest)
    return moved
