"""fastdeeplab.runtime.openvino: OpenVINO compiles the project's ONNX export and matches PyTorch."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from _models import randomize_bn, rel_err

import fastdeeplab

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "openvino")),
    reason="openvino not installed: pip install 'fastdeeplab[openvino]'")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(3)
    model = randomize_bn(fastdeeplab.deeplabv3_resnet50(num_classes=4, output_stride=16)).eval()
    path = tmp_path_factory.mktemp("ov") / "deeplab.onnx"
    fastdeeplab.export_onnx(model, path, input_size=(65, 65), output_stride=16, dynamic=True)
    return model, path


@pytest.mark.parametrize("source", ["path", "bytes", "proto"])
@torch.no_grad()
def test_compiled_model_matches_pytorch(exported, source):
    import onnx

    from fastdeeplab.export import openvino_compiled_model

    model, path = exported
    arg = {"path": path, "bytes": path.read_bytes(), "proto": onnx.load(str(path))}[source]
    compiled = openvino_compiled_model(arg, threads=1)
    x = torch.randn(1, 3, 49, 81)  # not the export size: dynamic axes
    got = compiled.create_infer_request().infer({0: x.numpy()})[0]
    expected = model(x)["out"]
    assert got.shape == tuple(expected.shape)
    assert rel_err(torch.from_numpy(np.array(got)), expected) < 1e-4


def test_bad_arguments_are_named(exported, tmp_path):
    from fastdeeplab.export import openvino_compiled_model

    _, path = exported
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        openvino_compiled_model(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="precision must be one of"):
        openvino_compiled_model(path, precision="f64")
    with pytest.raises(ValueError, match="threads must be >= 1"):
        openvino_compiled_model(path, threads=0)
    with pytest.raises(TypeError, match="onnx.ModelProto, bytes or a path"):
        openvino_compiled_model(42)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not an onnx model")
    with pytest.raises(ValueError, match="corrupt.onnx is not an ONNX model: it looks like text"):
        openvino_compiled_model(corrupt)
    corrupt.write_bytes(path.read_bytes()[:5000])  # truncated: the reason comes from the one ONNX reader
    with pytest.raises(ValueError, match="corrupt.onnx is not a readable ONNX model .truncated or corrupt"):
        openvino_compiled_model(corrupt)
    with pytest.raises(ValueError, match=r"OpenVINO could not read ONNX model \(the given 4 bytes\)"):
        openvino_compiled_model(b"\x08\x07\x12\x00")


def _conv_relu_onnx():
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["out"])],
                              "conv_relu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 4, 4])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("keep_nan", [True, False])
def test_relu_keeps_nan_as_pytorch(keep_nan):
    """OpenVINO's Relu maps NaN to 0; compiled with keep_nan (the default) it passes NaN on, as PyTorch and ONNX
    Runtime do, and stays ReLU on finite values (slope 1e-30 on the negative side)."""
    from fastdeeplab.runtime.openvino import openvino_compiled_model

    x = np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32)
    x[0, :, 1, 2] = np.nan
    got = openvino_compiled_model(_conv_relu_onnx(), keep_nan=keep_nan).create_infer_request().infer({0: x})[0]
    want = torch.relu(torch.from_numpy(x).sum(1, keepdim=True).expand(1, 2, 4, 4)).numpy()
    finite = np.isfinite(want)
    assert np.allclose(got[finite], want[finite], atol=1e-6)
    assert np.isnan(got[~finite]).all() == keep_nan and (got[~finite] == 0).all() != keep_nan


def test_exported_runtime_follows_its_parameters():
    """parameter_state changes on load_state_dict and in-place writes, not on reads: what triggers a rebuild."""
    from fastdeeplab.runtime.exported import parameter_state

    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    before = parameter_state(module)
    module(torch.randn(2, 3, 4, 4))  # train mode: the BatchNorm's running stats are written in place
    assert parameter_state(module) != before
    module.eval()
    state = parameter_state(module)
    module(torch.randn(2, 3, 4, 4))
    assert parameter_state(module) == state
    module.load_state_dict({k: v.clone() for k, v in module.state_dict().items()})
    assert parameter_state(module) != state
