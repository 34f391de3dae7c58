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
