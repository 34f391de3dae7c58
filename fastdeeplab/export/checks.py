"""Checks on an exported graph alone (no runtime): will TensorRT's ONNX parser take it, and is its precision
what it claims.

* :func:`check_tensorrt` — every node against TensorRT's op list (below);
* :func:`check_fp16_graph` — an fp16 graph: every Conv's input and weight in fp16 (kept layers in fp32),
  fp32 inputs and outputs;
* :func:`check_qdq_graph` — an int8 Q/DQ graph: every Conv's input and weight dequantized, int8 weights,
  int8 zero points of 0 (what TensorRT's explicit quantization takes);

One concern in one file (a little over 500 lines): what can be said of a graph without running it. The checks
that run it against PyTorch are in :mod:`fastdeeplab.export.verify`.

The list ships with the package (``tensorrt_onnx_ops.tsv``: op, supported ``Y``/``N``, data types,
restriction), a conservative baseline taken from onnx-tensorrt's ``docs/operators.md`` (TensorRT 8.5,
opsets up to 17): newer TensorRT releases accept at least these. Each node is checked for

* an op in the default ONNX domain that the list has and does not mark ``N`` (``QLinearConv``,
  ``ConvInteger``, ``DynamicQuantizeLinear`` … are ``N``: quantize in QDQ format instead);
* a data type the list allows for that op (INT64 and DOUBLE count as INT32 and FP32: TensorRT casts them
  down);
* the restrictions that are cheap to check from the graph alone: inputs that must be initializers or
  constants (``Conv``'s ``W``, ``Slice``/``Squeeze``'s ``axes``, ``TopK``'s ``K`` …; a
  ``DequantizeLinear`` of a constant counts as a constant, so QDQ graphs pass), zero points that must be
  zero, 2-D/3-D-only convolutions and pools, ``Resize`` modes and coordinate transformation modes,
  ``MaxPool`` indices, ``Einsum`` ellipses, input ranks, and casts to or from uint8 only with FP32/FP16
  (TensorRT 10's rule for uint8 network inputs and outputs; the one row newer than 8.5).

Restrictions that need more than the graph (``If`` branch shapes …) are listed as unchecked, not passed.

>>> import onnx                                                      # doctest: +SKIP
>>> result = check_tensorrt(onnx.load("deeplabv3.onnx"))             # doctest: +SKIP
>>> result.raise_if_failed()                                         # doctest: +SKIP
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

__all__ = [
    "MIN_OPSET",
    "GraphCheck",
    "OpSupport",
    "TensorRTCheck",
    "TensorRTCompatibilityError",
    "TensorRTIssue",
    "check_fp16_graph",
    "check_qdq_graph",
    "check_tensorrt",
    "load_op_table",
]

MIN_OPSET = 13
_TABLE_FILE = "tensorrt_onnx_ops.tsv"
_DEFAULT_DOMAINS = ("", "ai.onnx")
# Which input carries the data whose type the list restricts (default: input 0).
_DATA_INPUT = {"Where": 1}
# Ops through which a constant stays a constant for TensorRT (QDQ weights: DequantizeLinear(initializer)).
_CONSTANT_PASS_THROUGH = ("DequantizeLinear", "Identity")
_SPATIAL_OPS_KERNEL_FROM_WEIGHT = ("Conv", "ConvTranspose")


@dataclass(frozen=True)
class OpSupport:
    """One row of the op list: ``types`` uses TensorRT's names (``FP32``, ``FP16``, ``INT32``, ``INT8``,
    ``BOOL``); an empty set means "not restricted by the list"."""

    op: str
    supported: bool
    types: frozenset[str]
    restriction: str


@dataclass(frozen=True)
class TensorRTIssue:
    """A node TensorRT's parser would reject: ``index`` is its position in the graph (``-1`` for the model)."""

    node: str
    op_type: str
    index: int
    message: str

    def __str__(self) -> str:
        if self.index < 0:
            return f"model: {self.message}"
        return f"node {self.index} {self.node!r} ({self.op_type}): {self.message}"


class TensorRTCompatibilityError(ValueError):
    """Raised by :meth:`TensorRTCheck.raise_if_failed`; ``issues`` lists every offending node."""

    def __init__(self, issues: list[TensorRTIssue]) -> None:
        self.issues = list(issues)
        shown = "\n  ".join(str(i) for i in self.issues[:20])
        more = f"\n  ... ({len(self.issues)} issues in all)" if len(self.issues) > 20 else ""
        super().__init__(f"{len(self.issues)} node(s) TensorRT's ONNX parser does not support:\n  {shown}{more}")


@dataclass
class TensorRTCheck:
    """What :func:`check_tensorrt` found: ``issues`` (fatal) and ``unchecked`` restrictions (informative)."""

    issues: list[TensorRTIssue] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    nodes: int = 0

    @property
    def ok(self) -> bool:
        return not self.issues

    def raise_if_failed(self) -> None:
        if self.issues:
            raise TensorRTCompatibilityError(self.issues)

    def __str__(self) -> str:
        head = f"{self.nodes} nodes checked against TensorRT's op list: "
        head += "all supported" if self.ok else f"{len(self.issues)} issue(s)"
        lines = [head] + [f"  {i}" for i in self.issues] + [f"  unchecked: {u}" for u in self.unchecked]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The op list
# --------------------------------------------------------------------------------------------------
def load_op_table(path: str | os.PathLike | None = None) -> dict[str, OpSupport]:
    """Read the op list (the packaged one by default) into ``{op: OpSupport}``.

    A malformed row raises a ``ValueError`` naming the file and the line.
    """
    if path is None:
        return dict(_packaged_table())
    return _parse_table(Path(path).read_text(encoding="utf-8"), str(path))


@functools.lru_cache(maxsize=1)
def _packaged_table() -> Mapping[str, OpSupport]:
    text = resources.files("fastdeeplab.export").joinpath(_TABLE_FILE).read_text(encoding="utf-8")
    return _parse_table(text, _TABLE_FILE)


def _parse_table(text: str, source: str) -> dict[str, OpSupport]:
    table: dict[str, OpSupport] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        cols = line.split("\t")
        if cols[0] == "op":  # header
            continue
        if len(cols) < 2 or cols[1] not in ("Y", "N"):
            raise ValueError(f"{source}:{lineno}: expected 'op<TAB>Y|N<TAB>types<TAB>restriction', got {line!r}")
        types = frozenset(t.strip() for t in (cols[2] if len(cols) > 2 else "").split(",") if t.strip())
        restriction = cols[3].strip() if len(cols) > 3 else ""
        table[cols[0]] = OpSupport(cols[0], cols[1] == "Y", types, restriction)
    if not table:
        raise ValueError(f"{source}: no ops listed")
    return table


# --------------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------------
def _trt_type_name(elem_type: int) -> str:
    from onnx import TensorProto

    names = {
        TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.INT8: "INT8",
        TensorProto.INT32: "INT32", TensorProto.BOOL: "BOOL",
        TensorProto.INT64: "INT32", TensorProto.DOUBLE: "FP32",  # cast down by the parser
    }
    return names.get(elem_type, TensorProto.DataType.Name(elem_type))


class _Graph:
    """Lookups over one (sub)graph: constants, producers, tensor types and ranks."""

    def __init__(self, graph: onnx.GraphProto, types: Mapping[str, tuple[int, int | None]],
                 outer_constants: frozenset[str] = frozenset()) -> None:
        from onnx import numpy_helper

        inputs = {i.name for i in graph.input}
        self.initializers = {t.name: t for t in graph.initializer if t.name not in inputs}
        self.producers = {out: node for node in graph.node for out in node.output if out}
        self.types = types
        self._numpy = numpy_helper.to_array
        self._outer = outer_constants

    def is_constant(self, name: str, _depth: int = 0) -> bool:
        if name in self.initializers or name in self._outer:
            return True
        node = self.producers.get(name)
        if node is None or _depth > 8:
            return False
        if node.op_type == "Constant":
            return True
        if node.op_type in _CONSTANT_PASS_THROUGH:
            return all(self.is_constant(i, _depth + 1) for i in node.input if i)
        return False

    def constant_value(self, name: str):  # -> numpy array or None
        if name in self.initializers:
            return self._numpy(self.initializers[name])
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return self._numpy(attr.t)
        return None

    def rank(self, name: str) -> int | None:
        if name in self.initializers:
            return len(self.initializers[name].dims)
        return self.types.get(name, (0, None))[1]


def _tensor_types(model: onnx.ModelProto) -> dict[str, tuple[int, int | None]]:
    """``{tensor name: (elem_type, rank or None)}`` from shape inference (best effort)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # a graph shape inference chokes on is still checked op by op
        inferred = model
    found: dict[str, tuple[int, int | None]] = {}

    def collect(graph: onnx.GraphProto) -> None:
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            tt = vi.type.tensor_type
            if tt.elem_type:
                found[vi.name] = (tt.elem_type, len(tt.shape.dim) if tt.HasField("shape") else None)
        for t in graph.initializer:
            found[t.name] = (t.data_type, len(t.dims))
        for node in graph.node:
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    collect(sub)

    collect(inferred.graph)
    return found


_CONST_RE = re.compile(r"(\w+(?: and \w+)*) must be (?:an initializer|initializers|a constant tensor)")
_ZERO_RE = re.compile(r"(\w+) must be (?:zero|0)\b")
_SPATIAL_RE = re.compile(r"(\d)D or (\d)D only")
_RANK_RE = re.compile(r"rank (\d+) to (\d+)")
_COORD_RE = re.compile(r"coordinate modes ([\w, ]+)")
_MODES_RE = re.compile(r"(?:^|; )modes ([\w, ]+)")
# (the table's phrase, the string attribute it restricts, the attribute's ONNX default)
_STRING_RULES = ((_COORD_RE, "coordinate_transformation_mode", b"half_pixel"), (_MODES_RE, "mode", b"nearest"))


def _input_index(op: str, formal: str, opset: int) -> int | None:
    import onnx

    try:
        schema = onnx.defs.get_schema(op, opset)
    except onnx.defs.SchemaError:
        return None
    names = [i.name for i in schema.inputs]
    return names.index(formal) if formal in names else None


def _restriction_issues(node: onnx.NodeProto, support: OpSupport, g: _Graph, opset: int) -> Iterator[str]:
    """Yield a message per broken restriction; ``"?"``-prefixed messages are restrictions not checked."""
    import onnx

    text = support.restriction
    if not text:
        return
    understood = False
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    for match in _CONST_RE.finditer(text):
        understood = True
        for formal in match.group(1).split(" and "):
            index = _input_index(node.op_type, formal, opset)
            if index is None or index >= len(node.input) or not node.input[index]:
                continue
            if not g.is_constant(node.input[index]):
                yield (f"input {formal} ({node.input[index]!r}) must be an initializer or constant, "
                       f"but it is computed in the graph")
    for match in _ZERO_RE.finditer(text):
        understood = True
        formal = match.group(1)
        index = _input_index(node.op_type, formal, opset)
        if index is None or index >= len(node.input) or not node.input[index]:
            continue
        value = g.constant_value(node.input[index])
        if value is None:
            yield f"input {formal} ({node.input[index]!r}) must be a constant zero, but it is not a constant"
        elif value.any():
            yield f"input {formal} must be zero (symmetric quantization), got {value.ravel()[:4].tolist()}"
    match = _SPATIAL_RE.search(text)
    if match:
        understood = True
        allowed = {int(match.group(1)), int(match.group(2))}
        if node.op_type in _SPATIAL_OPS_KERNEL_FROM_WEIGHT and len(node.input) > 1:
            rank = g.rank(node.input[1])
            spatial = None if rank is None else rank - 2
        else:
            kernel = attrs.get("kernel_shape")
            spatial = None if kernel is None else len(kernel)
        if spatial is not None and spatial not in allowed:
            yield f"{spatial}-D {node.op_type} is not supported (only {' or '.join(map(str, sorted(allowed)))}-D)"
    if "UINT8 only from or to FP32 or FP16" in text:  # Cast: TensorRT's cast layer limits uint8
        understood = True
        from onnx import TensorProto

        floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
        source = g.types.get(node.input[0], (0, None))[0] if node.input else 0
        target = attrs.get("to", 0)
        if (source == TensorProto.UINT8 and target not in floats) or (target == TensorProto.UINT8
                                                                    and source and source not in floats):
            yield (f"a cast from {TensorProto.DataType.Name(source)} to {TensorProto.DataType.Name(target)}: "
                   "TensorRT casts uint8 only from or to FP32 or FP16")
    if "Indices output unsupported" in text:
        understood = True
        if len(node.output) > 1 and node.output[1]:
            yield "the Indices output is not supported"
    match = _RANK_RE.search(text)
    if match:
        understood = True
        lo, hi = int(match.group(1)), int(match.group(2))
        rank = g.rank(node.input[0]) if node.input else None
        if rank is not None and not lo <= rank <= hi:
            yield f"input rank {rank} is outside {lo} to {hi}"
    if "no ellipsis" in text:
        understood = True
        if "..." in str(attrs.get("equation", b""), "utf-8"):
            yield "an ellipsis in the equation is not supported"
    for pattern, attribute, default in _STRING_RULES:  # "<attribute> <value> is not supported" rules
        match = pattern.search(text)
        if match:
            understood = True
            allowed = {m.strip() for m in match.group(1).split(",")}
            value = _text(attrs.get(attribute, default))
            if value not in allowed:
                yield f"{attribute} {value!r} is not supported (allowed: {', '.join(sorted(allowed))})"
    if not understood:
        yield f"?{node.op_type}: {text}"


def _text(value: object) -> str:
    """A string attribute as text (ONNX stores them as bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_graph(graph: onnx.GraphProto, table: Mapping[str, OpSupport], types: Mapping[str, tuple[int, int | None]],
                 opset: int, result: TensorRTCheck, prefix: str = "",
                 outer: frozenset[str] = frozenset()) -> None:
    g = _Graph(graph, types, outer)
    unchecked = set(result.unchecked)
    for index, node in enumerate(graph.node):
        result.nodes += 1
        name = prefix + (node.name or f"{node.op_type}_{index}")

        def issue(message: str, node: onnx.NodeProto = node, index: int = index, name: str = name) -> None:
            result.issues.append(TensorRTIssue(name, node.op_type, index, message))

        if node.domain not in _DEFAULT_DOMAINS:
            issue(f"custom domain {node.domain!r}: TensorRT needs a plugin for it")
            continue
        support = table.get(node.op_type)
        if support is None:
            issue("op is not in TensorRT's ONNX op list")
            continue
        if not support.supported:
            note = f" ({support.restriction.strip('()')})" if support.restriction else ""
            hint = " Quantize in QDQ format (QuantizeLinear/DequantizeLinear) instead." if "Integer" in node.op_type \
                or node.op_type.startswith(("QLinear", "DynamicQuantize")) else ""
            issue(f"op is marked unsupported (N) in TensorRT's ONNX op list{note}.{hint}")
            continue
        data_index = _DATA_INPUT.get(node.op_type, 0)
        if support.types and data_index < len(node.input) and node.input[data_index] in types:
            type_name = _trt_type_name(types[node.input[data_index]][0])
            if type_name not in support.types:
                issue(f"input type {type_name} is not supported (allowed: {', '.join(sorted(support.types))})")
        for message in _restriction_issues(node, support, g, opset):
            if message.startswith("?"):
                unchecked.add(message[1:])
            else:
                issue(message)
        for attr in node.attribute:  # If/Loop/Scan bodies
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _check_graph(sub, table, types, opset, result, prefix=f"{name}/{attr.name}/",
                             outer=frozenset(g.initializers) | outer)
    result.unchecked = sorted(unchecked)


def check_tensorrt(model: onnx.ModelProto | str | os.PathLike, *, table: Mapping[str, OpSupport] | None = None,
                   min_opset: int = MIN_OPSET) -> TensorRTCheck:
    """Check every node of ``model`` (a ``ModelProto`` or a path) against TensorRT's op list.

    Returns a :class:`TensorRTCheck`; call ``.raise_if_failed()`` to turn issues into a
    :class:`TensorRTCompatibilityError` that names each node.
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        from ..runtime.onnx_files import load_onnx

        model = load_onnx(model)
    table = _packaged_table() if table is None else table
    result = TensorRTCheck()
    opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 0)
    if opset < min_opset:
        result.issues.append(TensorRTIssue("", "", -1, f"opset {opset} is below {min_opset}"))
    for fn in model.functions:
        result.issues.append(TensorRTIssue(fn.name, fn.name, -1,
                                           f"model-local function {fn.domain}::{fn.name} (inline it before export)"))
    _check_graph(model.graph, table, _tensor_types(model), opset, result)
    return result


# --------------------------------------------------------------------------------------------------
# Precision in the graph, and the pooled branch
# --------------------------------------------------------------------------------------------------
_MATMUL_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class GraphCheck:
    """What a graph check found: ``problems`` (empty when it passed), the ``nodes`` at fault, a ``summary``."""

    problems: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    summary: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        return self.summary if self.ok else "; ".join(self.problems)


def _type_name(elem_type: int | None) -> str:
    from onnx import TensorProto

    return TensorProto.DataType.Name(elem_type) if elem_type else "unknown"


def check_fp16_graph(model: onnx.ModelProto, *, kept: Sequence[str] = ()) -> GraphCheck:
    """Check an fp16 graph with fp32 I/O: every Conv (Gemm, MatMul) reads an fp16 input and an fp16 weight,
    except the nodes in ``kept``, which read fp32; float graph inputs and outputs are fp32."""
    from onnx import TensorProto

    from .passes import tensor_types

    types = tensor_types(model)
    result = GraphCheck()
    kept = set(kept)
    for value in list(model.graph.input) + list(model.graph.output):
        elem = value.type.tensor_type.elem_type
        if elem == TensorProto.FLOAT16:
            result.problems.append(f"graph {'input' if value in model.graph.input else 'output'} {value.name!r} "
                                   "is fp16; an fp16 graph keeps fp32 inputs and outputs")
    convs = kept_convs = 0
    for node in model.graph.node:
        if node.op_type not in _MATMUL_OPS:
            continue
        want = TensorProto.FLOAT if node.name in kept else TensorProto.FLOAT16
        for role, name in zip(("input", "weight"), node.input[:2]):
            if types.get(name) != want:
                result.problems.append(f"{node.op_type} {node.name!r}: {role} {name!r} is "
                                       f"{_type_name(types.get(name))}, expected {_type_name(want)}")
                result.nodes.append(node.name)
        convs += 1
        kept_convs += node.name in kept
    missing = kept - {n.name for n in model.graph.node}
    if missing:
        result.problems.append(f"layers said to be kept in fp32 are not in the graph: {sorted(missing)}")
    io = ", ".join(f"{v.name} {_type_name(v.type.tensor_type.elem_type)}"
                   for v in list(model.graph.input) + list(model.graph.output))
    result.summary = (f"{convs - kept_convs} Conv/Gemm with fp16 input and weight, {kept_convs} kept in fp32 "
                      f"({len(kept)} nodes kept); I/O: {io}")
    return result


def check_qdq_graph(model: onnx.ModelProto) -> GraphCheck:
    """Check an explicit-quantization (Q/DQ) graph the way TensorRT needs it: every Conv's input and weight
    come from ``DequantizeLinear``; the weights are int8 initializers; every zero point is int8 and 0."""
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output if out}
    result = GraphCheck()
    convs = qdq = 0
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            qdq += 1
            zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if zero is None or zero not in inits:
                result.problems.append(f"{node.op_type} {node.name!r} has no constant zero point (the default is "
                                       "uint8): TensorRT needs an int8 zero point of 0")
                result.nodes.append(node.name)
                continue
            value = numpy_helper.to_array(inits[zero])
            if inits[zero].data_type != TensorProto.INT8 or value.any():
                result.problems.append(f"{node.op_type} {node.name!r}: zero point {_type_name(inits[zero].data_type)} "
                                       f"{value.ravel()[:4].tolist()}, expected int8 0")
                result.nodes.append(node.name)
        if node.op_type != "Conv":
            continue
        convs += 1
        for role, name in zip(("input", "weight"), node.input[:2]):
            producer = producers.get(name)
            if producer is None or producer.op_type != "DequantizeLinear":
                result.problems.append(f"Conv {node.name!r}: {role} {name!r} is not dequantized "
                                       f"(comes from {producer.op_type if producer else 'an initializer or input'})")
                result.nodes.append(node.name)
            elif role == "weight":
                source = inits.get(producer.input[0])
                if source is None or source.data_type != TensorProto.INT8:
                    result.problems.append(f"Conv {node.name!r}: weight {producer.input[0]!r} is not an int8 "
                                           "initializer")
                    result.nodes.append(node.name)
    if not convs:
        result.problems.append("no Conv in the graph")
    result.summary = (f"{convs} Conv with dequantized int8 input and int8 weight, {qdq} Q/DQ nodes, "
                      "every zero point int8 0")
    return result
