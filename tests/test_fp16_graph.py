"""Precision in the graph: the fp16 ONNX graph with fp32 I/O (what a strongly typed TensorRT build runs in
fp16), its checks, and its accuracy on the CPU against fp32 PyTorch (ONNX Runtime and OpenVINO)."""

from __future__ import annotations

import importlib.util
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from _models import randomize_bn
from onnx import TensorProto
from test_export_onnx import TinySeg

from fastdeeplab.export.checks import check_fp16_graph, check_tensorrt
from fastdeeplab.export.onnx import ExportCheckError, export_onnx, onnx_model_proto, ort_session
from fastdeeplab.export.passes import convert_float16, module_scopes, tensor_types
from fastdeeplab.export.tensorrt import graph_precision
from fastdeeplab.metrics import max_rel_error, pixel_agreement

SIZE = (33, 47)
FP16_TOL = 2e-2  # max |fp16 graph - fp32 torch| <= FP16_TOL * max |torch|


@pytest.fixture(scope="module")
def tiny() -> TinySeg:
    torch.manual_seed(0)
    return randomize_bn(TinySeg()).eval()


@pytest.fixture(scope="module")
def fp16(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("fp16") / "fp16.onnx"
    report = export_onnx(tiny, path, input_size=SIZE, precision="fp16", argmax=True)
    return path, report


@pytest.fixture(scope="module")
def fp16_kept(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("fp16") / "kept.onnx"
    report = export_onnx(tiny, path, input_size=SIZE, precision="fp16", keep_fp32=["head.1"])
    return path, report


def conv_types(proto: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """``{conv node: (input elem_type, weight elem_type)}``, from ONNX's own shape inference."""
    types = tensor_types(proto)
    return {n.name: (types[n.input[0]], types[n.input[1]]) for n in proto.graph.node if n.op_type == "Conv"}


def test_every_conv_runs_in_fp16_with_fp32_io(fp16):
    path, report = fp16
    proto = onnx.load(str(path))
    assert report.precision == "fp16" and report.passed and report.checks["fp16_graph"].passed
    assert report.dtypes == {"input": "float32", "out": "float32", "labels": "int32"}
    types = conv_types(proto)
    assert len(types) == 9 and set(types.values()) == {(TensorProto.FLOAT16, TensorProto.FLOAT16)}, types
    floats = Counter(t.data_type for t in proto.graph.initializer if t.data_type in (TensorProto.FLOAT,
                                                                                    TensorProto.FLOAT16))
    assert floats[TensorProto.FLOAT] == 0 and floats[TensorProto.FLOAT16] > 0, floats
    # a Cast at each float boundary: into fp16 after the input, back to fp32 before `out`
    casts = {n.output[0]: n for n in proto.graph.node if n.op_type == "Cast"}
    assert casts["out"].input[0].endswith("__fp16")
    assert any(n.input == ["input"] for n in casts.values())
    assert graph_precision(proto) == "fp16" and check_tensorrt(proto).ok


def test_kept_layer_stays_fp32_behind_casts(fp16_kept):
    path, report = fp16_kept
    proto = onnx.load(str(path))
    scopes_kept = report.kept_fp32
    assert len(scopes_kept) == 1 and report.checks["fp16_graph"].passed, str(report)
    types = conv_types(proto)
    assert types.pop(scopes_kept[0]) == (TensorProto.FLOAT, TensorProto.FLOAT)
    assert set(types.values()) == {(TensorProto.FLOAT16, TensorProto.FLOAT16)}
    kept = next(n for n in proto.graph.node if n.name == scopes_kept[0])
    producer = next(n for n in proto.graph.node if kept.input[0] in n.output)
    assert producer.op_type == "Cast"  # fp16 activations cast up into the kept conv
    assert "kept in fp32" in str(report)


def test_fp16_graph_check_fails_where_it_should(fp16, tiny, tmp_path):
    path, _ = fp16
    proto = onnx.load(str(path))
    # claiming a Conv is kept in fp32 when it runs in fp16 is caught, by node
    conv = next(n.name for n in proto.graph.node if n.op_type == "Conv")
    found = check_fp16_graph(proto, kept=[conv])
    assert not found.ok and conv in found.nodes and "expected FLOAT" in str(found)
    # an fp32 graph is not an fp16 graph
    fp32 = onnx_model_proto(tiny, input_size=SIZE)
    found = check_fp16_graph(fp32)
    assert not found.ok and "expected FLOAT16" in str(found)
    # a whole-fp16 graph (half=True) has fp16 I/O: refused as an fp16-with-fp32-I/O graph
    half = onnx_model_proto(tiny, input_size=SIZE, half=True)
    assert any("graph input 'input' is fp16" in p for p in check_fp16_graph(half).problems)


@torch.no_grad()
def test_fp16_graph_accuracy_on_onnx_runtime(fp16, tiny):
    """The exporter's own check measured it; here again, independently, at a new size and batch."""
    path, report = fp16
    x = torch.randn(2, 3, 41, 29)
    got = ort_session(path).run(["out", "labels"], {"input": x.numpy()})
    expected = tiny(x)["out"]
    error = max_rel_error(got[0], expected)
    agree = pixel_agreement(got[1], expected.argmax(1), ignore_index=None)
    assert got[0].dtype == np.float32 and error <= FP16_TOL and agree > 0.99, (error, agree)
    assert 0 < error  # it is an fp16 graph: not bit-identical to fp32
    for key, rel in report.errors.items():
        assert rel["out"][1] <= FP16_TOL and report.agreement[key] > 0.99


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed: "
                    "pip install 'fastdeeplab[openvino]'")
@torch.no_grad()
def test_fp16_graph_accuracy_on_openvino(fp16, tiny):
    from fastdeeplab.runtime.openvino import openvino_compiled_model

    path, _ = fp16
    x = torch.randn(1, 3, *SIZE)
    got = openvino_compiled_model(path, threads=1).create_infer_request().infer({0: x.numpy()})
    out = np.asarray(got["out"])
    expected = tiny(x)["out"]
    assert out.dtype == np.float32 and max_rel_error(out, expected) <= FP16_TOL
    assert pixel_agreement(np.asarray(got["labels"]), expected.argmax(1), ignore_index=None) > 0.99


def test_module_scopes_and_unknown_layer(tiny):
    import torch.onnx

    proto = onnx_model_proto(tiny, input_size=SIZE)  # metadata stripped: scopes come from a raw export
    assert module_scopes(proto) == {}
    with pytest.raises(ValueError, match="keep_fp32 entry 'classifier.9' matches no node"):
        convert_float16(proto, keep_fp32=["classifier.9"])
    from fastdeeplab.export.onnx import _ExportWrapper

    raw = torch.onnx.export(_ExportWrapper(tiny, ("out",), False).eval(), (torch.randn(1, 3, *SIZE),), None,
                            dynamo=True, input_names=["input"], output_names=["out"], verbose=False).model_proto
    scopes = module_scopes(raw)
    assert "head.1" in scopes.values() and any(s.startswith("stem.") for s in scopes.values())


def test_precision_arguments(tiny, tmp_path):
    with pytest.raises(ValueError, match="precision must be one of"):
        export_onnx(tiny, tmp_path / "m.onnx", precision="int8")
    with pytest.raises(ValueError, match="keep_fp32 names layers to keep in fp32"):
        export_onnx(tiny, tmp_path / "m.onnx", keep_fp32=["head.1"])
    with pytest.raises(ValueError, match="half=True"):
        export_onnx(tiny, tmp_path / "m.onnx", half=True, precision="fp32")
    with pytest.raises(ValueError, match="matches no node"):
        export_onnx(tiny, tmp_path / "m.onnx", input_size=SIZE, precision="fp16", keep_fp32=["nope"])
    with pytest.raises(ValueError, match="labels_dtype applies"):
        export_onnx(tiny, tmp_path / "m.onnx", labels_dtype="uint8")
    assert not any(tmp_path.iterdir())
    assert issubclass(ExportCheckError, RuntimeError)
