"""TensorRT: the op-support checker, and everything about engines that runs without TensorRT.

The checker is tested on hand-built ONNX graphs, one restriction at a time. Engine building and running
need TensorRT and a GPU: those tests skip with the reason where either is missing (never mocked), and the
ImportError a user sees without TensorRT is tested where it is missing.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from torch import nn

import fastdeeplab.export.tensorrt as trt_module  # importable without tensorrt
from fastdeeplab.export.checks import (
    TensorRTCompatibilityError,
    check_tensorrt,
    load_op_table,
)
from fastdeeplab.export.tensorrt import (
    CalibrationBatches,
    build_tensorrt_engine,
    check_profile,
    parse_shape,
)
from fastdeeplab.images import normalize
from fastdeeplab.runtime.tensorrt import TensorRTModel, _check_in_profile

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_tensorrt = pytest.mark.skipif(not HAS_TENSORRT, reason="tensorrt is not installed (pip install "
                                    "'fastdeeplab[tensorrt]' on a machine with an NVIDIA GPU)")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT needs a CUDA GPU; none is visible")


# --------------------------------------------------------------------------------------------------
# Hand-built graphs for the checker
# --------------------------------------------------------------------------------------------------
def graph(nodes, initializers=(), *, opset=17, inputs=None, outputs=None) -> onnx.ModelProto:
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])]
    outputs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    g = helper.make_graph(nodes, "g", inputs, outputs,
                          initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in initializers])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


W = ("w", np.ones((4, 3, 3, 3), np.float32))


def issues(model: onnx.ModelProto) -> list[str]:
    return [str(i) for i in check_tensorrt(model).issues]


def test_conv_with_initializer_weight_passes():
    model = graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], [W])
    result = check_tensorrt(model)
    assert result.ok and result.nodes == 1, str(result)
    result.raise_if_failed()


def test_conv_weight_from_graph_input_is_rejected_by_name():
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
              helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3])]
    model = graph([helper.make_node("Conv", ["x", "w"], ["y"], name="my_conv")], inputs=inputs)
    found = issues(model)
    assert len(found) == 1 and "'my_conv' (Conv)" in found[0] and "input W ('w') must be an initializer" in found[0]
    with pytest.raises(TensorRTCompatibilityError, match="my_conv") as info:
        check_tensorrt(model).raise_if_failed()
    assert info.value.issues[0].node == "my_conv"


def test_qdq_graph_passes_and_qoperator_graph_does_not():
    qdq = graph([
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="dq_w", axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv"),
    ], [("s", np.float32(0.1)), ("z", np.int8(0)), ("wq", np.ones((4, 3, 3, 3), np.int8)),
        ("ws", np.full(4, 0.01, np.float32)), ("wz", np.zeros(4, np.int8))])
    assert check_tensorrt(qdq).ok, str(check_tensorrt(qdq))

    qop = graph([helper.make_node("QLinearConv", ["x", "s", "z", "wq", "ws", "wz", "s", "z"], ["y"], name="qconv")],
                [("s", np.float32(0.1)), ("z", np.uint8(0)), ("wq", np.ones((4, 3, 3, 3), np.int8)),
                 ("ws", np.float32(0.01)), ("wz", np.int8(0))])
    found = issues(qop)
    assert len(found) == 1 and "'qconv' (QLinearConv)" in found[0] and "QDQ format" in found[0]


@pytest.mark.parametrize(
    "zero_point, dtype, message",
    [
        pytest.param(np.int8(3), TensorProto.INT8, "must be zero", id="int8-nonzero-zero-point"),
        pytest.param(np.uint8(0), TensorProto.UINT8, "input type UINT8 is not supported", id="uint8"),
    ],
)
def test_quantization_must_be_symmetric_int8(zero_point, dtype, message):
    model = graph([
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["y"], name="dq"),
    ], [("s", np.float32(0.1)), ("z", zero_point)])
    found = issues(model)
    assert found and all(message in f or "must be 0" in f or "must be zero" in f for f in found)
    assert any("'dq' (DequantizeLinear)" in f and message in f for f in found)


@pytest.mark.parametrize(
    "attrs, ok, message",
    [
        pytest.param(dict(mode="linear", coordinate_transformation_mode="half_pixel"), True, "", id="linear-half_pixel"),
        pytest.param(dict(mode="nearest", coordinate_transformation_mode="asymmetric"), True, "", id="nearest-asym"),
        pytest.param(dict(mode="cubic"), False, "mode 'cubic'", id="cubic"),
        pytest.param(dict(mode="linear", coordinate_transformation_mode="tf_crop_and_resize"), False,
                     "coordinate_transformation_mode 'tf_crop_and_resize'", id="tf_crop_and_resize"),
    ],
)
def test_resize_modes(attrs, ok, message):
    model = graph([helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", **attrs)],
                  [("scales", np.array([1, 1, 2, 2], np.float32))])
    found = issues(model)
    assert (not found) == ok, found
    if not ok:
        assert "'up' (Resize)" in found[0] and message in found[0]


def test_other_restrictions():
    one_d = graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv1d")], [("w", np.ones((4, 3, 3), np.float32))],
                  inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8])])
    assert "1-D Conv is not supported" in issues(one_d)[0]
    pool = graph([helper.make_node("MaxPool", ["x"], ["y", "idx"], name="pool", kernel_shape=[2, 2])])
    assert "Indices output" in issues(pool)[0]
    computed_axes = graph([helper.make_node("Shape", ["x"], ["s"], name="shape"),
                           helper.make_node("Slice", ["x", "st", "en", "s"], ["y"], name="slice")],
                          [("st", np.array([0], np.int64)), ("en", np.array([1], np.int64))])
    assert any("'slice' (Slice): input axes ('s') must be an initializer" in f for f in issues(computed_axes))
    custom = graph([helper.make_node("MyOp", ["x"], ["y"], name="mine", domain="com.example")])
    assert "custom domain 'com.example'" in issues(custom)[0]
    unknown = graph([helper.make_node("GridSample", ["x", "x"], ["y"], name="grid")], opset=17)
    assert "not in TensorRT's ONNX op list" in issues(unknown)[0]
    old = graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], opset=12)
    assert "opset 12 is below 13" in issues(old)[0]


def test_unchecked_restrictions_are_reported_not_passed():
    then = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    model = graph([helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then, else_branch=other)],
                  [("c", np.array(True))])
    result = check_tensorrt(model)
    assert result.ok and result.nodes == 3  # the If and one node in each branch
    assert any(u.startswith("If:") for u in result.unchecked)


def test_op_table_file():
    table = load_op_table()
    assert table["Conv"].supported and "FP16" in table["Conv"].types
    assert not table["QLinearConv"].supported and not table["LayerNormalization"].supported
    assert "half_pixel" in table["Resize"].restriction


def test_malformed_op_table_names_the_line(tmp_path):
    bad = tmp_path / "ops.tsv"
    bad.write_text("op\tsupported\ttypes\trestriction\nConv\tmaybe\tFP32\t\n")
    with pytest.raises(ValueError, match=r"ops.tsv:2"):
        load_op_table(bad)


# --------------------------------------------------------------------------------------------------
# Engine arguments, profiles and calibration data: all without TensorRT
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [("1x3x513x513", (1, 3, 513, 513)), ("4,3,1025,1025", (4, 3, 1025, 1025)), ((2, 3, 65, 97), (2, 3, 65, 97))],
)
def test_parse_shape(text, expected):
    assert parse_shape(text) == expected


@pytest.mark.parametrize("bad", ["1x3x513", "1x3xAx5", (1, 3, 0, 5), "1x3x5x5x5"])
def test_parse_shape_rejects(bad):
    with pytest.raises(ValueError, match="shape"):
        parse_shape(bad)


def test_check_profile():
    dynamic = ["batch", 3, "height", "width"]
    assert check_profile("1x3x257x257", "1x3x513x513", "4x3x1025x1025", onnx_dims=dynamic)[1] == (1, 3, 513, 513)
    with pytest.raises(ValueError, match="dim H: need min <= opt <= max"):
        check_profile((1, 3, 600, 600), (1, 3, 513, 513), (1, 3, 1025, 1025))
    with pytest.raises(ValueError, match="3 channels"):
        check_profile((1, 1, 64, 64), (1, 1, 64, 64), (1, 1, 64, 64))
    with pytest.raises(ValueError, match="fixed at 65"):
        check_profile((1, 3, 33, 33), (1, 3, 65, 65), (1, 3, 65, 65), onnx_dims=[1, 3, 65, 65])
    with pytest.raises(ValueError, match="outside the engine's profile"):
        _check_in_profile((8, 3, 513, 513), (1, 3, 257, 257), (4, 3, 1025, 1025))
    _check_in_profile((4, 3, 1025, 257), (1, 3, 257, 257), (4, 3, 1025, 1025))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """A small dynamic fp32 graph from the real exporter."""
    from fastdeeplab.export.onnx import export_onnx
    from fastdeeplab.model import ASPP

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
            self.head = nn.Sequential(ASPP(8, (1, 2, 3), out_channels=8), nn.Conv2d(8, 3, 1))

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"out": F.interpolate(self.head(self.stem(x)), size=x.shape[-2:], mode="bilinear",
                                         align_corners=False)}

    torch.manual_seed(0)
    model = Tiny().eval()
    folder = tmp_path_factory.mktemp("tiny")
    export_onnx(model, folder / "tiny.onnx", input_size=(33, 33), argmax=True)
    export_onnx(model, folder / "static.onnx", input_size=(33, 33), dynamic=False)
    return model, folder / "tiny.onnx", folder / "static.onnx"


def test_build_arguments_are_checked_before_tensorrt(tiny_onnx, tmp_path):
    _, onnx_path, static_path = tiny_onnx
    engine = tmp_path / "m.engine"
    with pytest.raises(ValueError, match="precision must be one of"):
        build_tensorrt_engine(onnx_path, engine, precision="bf16")
    with pytest.raises(ValueError, match="workspace_gb"):
        build_tensorrt_engine(onnx_path, engine, workspace_gb=0)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        build_tensorrt_engine(tmp_path / "missing.onnx", engine)
    with pytest.raises(ValueError, match="overwrite the ONNX model"):
        build_tensorrt_engine(onnx_path, onnx_path)
    with pytest.raises(ValueError, match="needs calibration_images"):
        build_tensorrt_engine(onnx_path, engine, precision="int8")
    with pytest.raises(ValueError, match="dim H is fixed at 33"):
        build_tensorrt_engine(static_path, engine, min_shape=(1, 3, 17, 33), opt_shape=(1, 3, 33, 33),
                              max_shape=(1, 3, 65, 33))
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="cannot create output directory|is not a directory"):
        build_tensorrt_engine(onnx_path, blocker / "m.engine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.fixture
def photo_folder(tmp_path):
    """Five small RGB images of different sizes, plus a file that is not an image."""
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 60), (64, 64), (50, 30), (33, 47), (80, 20)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_calibration_batches_from_a_folder(photo_folder):
    batches = CalibrationBatches(photo_folder, (2, 3, 32, 48))
    assert len(batches) == 3 and batches.num_images == 5
    got = list(batches)
    assert [tuple(b.shape) for b in got] == [(2, 3, 32, 48)] * 3 and all(b.dtype == torch.float32 for b in got)
    expected = normalize(Image.open(photo_folder / "img2.png"), (32, 48))  # resized, ImageNet-normalised
    torch.testing.assert_close(got[1][0], expected)
    first = normalize(Image.open(photo_folder / "img0.png"), (32, 48))
    torch.testing.assert_close(got[2][1], first)  # the last batch is filled by repeating the first image
    assert len(CalibrationBatches(photo_folder, (2, 3, 32, 48), max_images=2)) == 1


def test_calibration_batches_from_a_tensor_and_errors(tmp_path):
    images = torch.randn(3, 3, 20, 30)
    got = list(CalibrationBatches(images, "1x3x20x30"))
    assert len(got) == 3 and torch.equal(got[2][0], images[2])
    resized = list(CalibrationBatches(images, (3, 3, 10, 15)))[0]
    assert resized.shape == (3, 3, 10, 15)
    with pytest.raises(FileNotFoundError, match="no images"):
        CalibrationBatches(tmp_path, (1, 3, 8, 8))
    with pytest.raises(FileNotFoundError, match="not found"):
        CalibrationBatches(tmp_path / "nope", (1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[M, 3, H, W\]"):
        CalibrationBatches(torch.randn(3, 20, 30), (1, 3, 8, 8))


def test_runner_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="engine not found"):
        TensorRTModel(tmp_path / "missing.engine")
    (tmp_path / "m.engine").write_bytes(b"not read before the device check")
    with pytest.raises(ValueError, match="CUDA devices"):
        TensorRTModel(tmp_path / "m.engine", device="cpu")


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed: the missing-package message cannot show")
def test_missing_tensorrt_names_the_extra(tiny_onnx, tmp_path):
    _, onnx_path, _ = tiny_onnx
    with pytest.raises(ImportError, match=r"pip install 'fastdeeplab\[tensorrt\]'"):
        build_tensorrt_engine(onnx_path, tmp_path / "m.engine", min_shape=(1, 3, 17, 17),
                              opt_shape=(1, 3, 33, 33), max_shape=(2, 3, 65, 65))
    (tmp_path / "fake.engine").write_bytes(b"x")
    with pytest.raises(ImportError, match=r"pip install 'fastdeeplab\[tensorrt\]'"):
        TensorRTModel(tmp_path / "fake.engine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.engine"]  # no engine half-written
    assert trt_module.__name__ == "fastdeeplab.export.tensorrt"  # and the module itself imported fine


# --------------------------------------------------------------------------------------------------
# Real engines (TensorRT + GPU)
# --------------------------------------------------------------------------------------------------
@needs_gpu
@needs_tensorrt
@pytest.mark.parametrize("precision, tol", [("fp32", 1e-3), ("fp16", 2e-2)])
def test_engine_matches_pytorch(tiny_onnx, tmp_path, precision, tol):
    model, onnx_path, _ = tiny_onnx
    cache = tmp_path / "timing.cache"
    engine = build_tensorrt_engine(onnx_path, tmp_path / "m.engine", precision=precision,
                                   min_shape=(1, 3, 17, 17), opt_shape=(1, 3, 33, 33), max_shape=(2, 3, 65, 65),
                                   workspace_gb=1, timing_cache=cache)
    assert engine.is_file() and cache.is_file()
    runner = TensorRTModel(engine)
    x = torch.randn(2, 3, 41, 57)
    got = runner(x.cuda())
    with torch.no_grad():
        expected = model(x)["out"]
    assert set(got) == {"out", "labels"} and got["out"].dtype == torch.float32
    scale = expected.abs().max()
    assert (got["out"].cpu() - expected).abs().max() <= tol * scale
    agree = (got["labels"].cpu() == expected.argmax(1)).float().mean()
    assert got["labels"].dtype == torch.int64 and agree > 0.99
    with pytest.raises(ValueError, match="outside the engine's profile"):
        runner(torch.randn(4, 3, 33, 33, device="cuda"))


@needs_gpu
@needs_tensorrt
def test_int8_engine_with_calibration(tiny_onnx, tmp_path, photo_folder):
    _, onnx_path, _ = tiny_onnx
    table = tmp_path / "calib.cache"
    engine = build_tensorrt_engine(onnx_path, tmp_path / "m8.engine", precision="int8",
                                   min_shape=(1, 3, 17, 17), opt_shape=(1, 3, 33, 33), max_shape=(2, 3, 65, 65),
                                   workspace_gb=1, calibration_images=photo_folder, calibration_cache=table)
    assert engine.is_file() and table.is_file()
    out = TensorRTModel(engine)(torch.randn(1, 3, 33, 33, device="cuda"))["out"]
    assert out.shape == (1, 3, 33, 33) and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------
# Versions, strongly typed builds, several profiles: the logic that runs without TensorRT
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "version, ok",
    [("10.0.1", True), ("10.14.1.48", True), ("11.4.1", True), ("9.3.0", False), ("8.6.1", False),
     ("12.0.0", False)],
)
def test_supported_tensorrt_versions(version, ok):
    from fastdeeplab.runtime.tensorrt import check_tensorrt_version

    if ok:
        assert check_tensorrt_version(version)[0] in (10, 11)
    else:
        with pytest.raises(RuntimeError, match=r"TensorRT 10.0 to 11.x"):
            check_tensorrt_version(version)


def test_install_hint_is_the_readme_text():
    from pathlib import Path

    from fastdeeplab.runtime.tensorrt import INSTALL_HINT

    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().replace("`", "").split())
    assert "pip install 'fastdeeplab[tensorrt]'" in INSTALL_HINT and "TensorRT 10.0 to 11.x" in INSTALL_HINT
    assert INSTALL_HINT in readme  # the message a user sees is the README's sentence, word for word
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"tensorrt>=10.0,<12"' in pyproject  # the range SUPPORTED states


def test_profiles_and_selection():
    from fastdeeplab.runtime.tensorrt import Profile, make_profiles, select_profile

    profiles = make_profiles([(1, 513, 513), (1, 1024, 2048)])
    assert profiles[0] == Profile((1, 3, 257, 257), (1, 3, 513, 513), (1, 3, 513, 513))
    assert profiles[1] == Profile((1, 3, 512, 1024), (1, 3, 1024, 2048), (1, 3, 1024, 2048))
    assert select_profile(profiles, (1, 3, 513, 513)) == 0
    assert select_profile(profiles, (1, 3, 1024, 2048)) == 1  # a full Cityscapes frame
    assert select_profile(profiles, (1, 3, 700, 1500)) == 1
    with pytest.raises(ValueError) as info:
        select_profile(profiles, (1, 3, 600, 600))
    message = str(info.value)
    assert "1x3x600x600 is outside the engine's profiles" in message
    assert "#0 min 1x3x257x257 opt 1x3x513x513 max 1x3x513x513" in message
    assert "#1 min 1x3x512x1024 opt 1x3x1024x2048 max 1x3x1024x2048" in message
    with pytest.raises(ValueError, match="outside the engine's profiles"):
        select_profile(profiles, (2, 3, 513, 513))  # batch 2 is in neither
    # overlapping profiles: the tightest one that fits wins, the first on a tie
    wide = make_profiles([((1, 3, 64, 64), (4, 3, 512, 512), (4, 3, 1024, 1024)), "1x3x512x512", "1x3x512x512"])
    assert select_profile(wide, (1, 3, 300, 400)) == 1 and select_profile(wide, (2, 3, 300, 400)) == 0
    # explicit (min, opt, max) triples are checked like any profile
    with pytest.raises(ValueError, match="dim W: need min <= opt <= max"):
        make_profiles([((1, 3, 64, 64), (1, 3, 64, 32), (1, 3, 64, 64))])
    with pytest.raises(ValueError, match="non-empty list"):
        make_profiles((1, 3, 513, 513).__class__())
    with pytest.raises(ValueError, match="a profile is"):
        make_profiles([(1, 2)])
    # fixed ONNX dims stay fixed in a profile made from one shape
    (static,) = make_profiles([(1, 33, 33)], onnx_dims=[1, 3, 33, 33])
    assert static.min == static.opt == static.max == (1, 3, 33, 33)


def test_graph_precision(tiny_onnx, tmp_path):
    from fastdeeplab.export.tensorrt import graph_precision

    _, onnx_path, _ = tiny_onnx
    assert graph_precision(onnx_path) == "fp32"
    proto = onnx.load(str(onnx_path))
    from fastdeeplab.export.passes import convert_float16

    convert_float16(proto)
    assert graph_precision(proto) == "fp16"


def test_precision_is_the_graphs(tiny_onnx, tmp_path):
    """A strongly typed build runs the graph's precision: contradictions fail before TensorRT is needed."""
    from fastdeeplab.export.passes import convert_float16

    _, onnx_path, _ = tiny_onnx
    proto = onnx.load(str(onnx_path))
    convert_float16(proto)
    fp16_path = tmp_path / "fp16.onnx"
    onnx.save(proto, str(fp16_path))
    engine = tmp_path / "m.engine"
    with pytest.raises(ValueError, match="is a fp16 graph"):
        build_tensorrt_engine(fp16_path, engine, precision="fp32")
    with pytest.raises(ValueError, match="keep_fp32 applies"):
        build_tensorrt_engine(fp16_path, engine, keep_fp32=["head.1"])
    with pytest.raises(FileNotFoundError, match="calibration image folder not found"):
        build_tensorrt_engine(onnx_path, engine, precision="int8", calibration_images=tmp_path / "nope")
    cache = tmp_path / "not_qdq.onnx"
    cache.write_bytes(onnx_path.read_bytes())
    with pytest.raises(ValueError, match="is not a Q/DQ graph"):
        build_tensorrt_engine(onnx_path, engine, precision="int8", calibration_cache=cache)
    with pytest.raises(ValueError, match="outside|either profiles or min_shape"):
        build_tensorrt_engine(onnx_path, engine, profiles=[(1, 33, 33)], min_shape=(1, 3, 17, 17))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp16.onnx", "not_qdq.onnx"]


@needs_gpu
@needs_tensorrt
def test_engine_with_two_profiles_and_its_report(tiny_onnx, tmp_path):
    import json

    model, onnx_path, _ = tiny_onnx
    engine = build_tensorrt_engine(onnx_path, tmp_path / "p.engine", precision="fp16",
                                   profiles=[(1, 33, 33), (2, 65, 97)], workspace_gb=1)
    report = json.loads((tmp_path / "p.build.json").read_text())
    assert report["strongly_typed"] and report["precision"] == "fp16" and len(report["profiles"]) == 2
    assert all(row["max_rel_error"] < 2e-2 and row["pixel_agreement"] > 0.99 for row in report["accuracy"])
    assert json.loads((tmp_path / "p.layers.json").read_text())
    assert json.loads((tmp_path / "p.profile.json").read_text())["layers"]
    runner = TensorRTModel(engine)
    assert len(runner.profiles) == 2
    for shape in ((1, 3, 33, 33), (2, 3, 65, 97), (1, 3, 40, 60)):
        x = torch.randn(*shape)
        got = runner(x.cuda())
        assert got["out"].shape == (shape[0], 3, *shape[2:]) and got["labels"].dtype == torch.int64
    with pytest.raises(ValueError, match=r"outside the engine's profiles \(#0 min 1x3x17x17"):
        runner(torch.randn(1, 3, 100, 100, device="cuda"))
    with pytest.raises(ValueError, match="runs on a CUDA GPU"):
        runner(torch.randn(1, 3, 33, 33))


@pytest.mark.parametrize(
    "source, target, ok",
    [
        pytest.param(TensorProto.UINT8, TensorProto.FLOAT, True, id="uint8-to-fp32"),
        pytest.param(TensorProto.UINT8, TensorProto.FLOAT16, True, id="uint8-to-fp16"),
        pytest.param(TensorProto.FLOAT, TensorProto.UINT8, True, id="fp32-to-uint8"),
        pytest.param(TensorProto.INT64, TensorProto.UINT8, False, id="int64-to-uint8"),
        pytest.param(TensorProto.UINT8, TensorProto.INT32, False, id="uint8-to-int32"),
    ],
)
def test_uint8_casts(source, target, ok):
    model = graph([helper.make_node("Cast", ["x"], ["y"], name="cast", to=target)],
                  inputs=[helper.make_tensor_value_info("x", source, [1, 3, 8, 8])],
                  outputs=[helper.make_tensor_value_info("y", target, [1, 3, 8, 8])])
    found = issues(model)
    assert (not found) == ok, found
    if not ok:
        assert "'cast' (Cast)" in found[0] and "uint8 only from or to FP32 or FP16" in found[0]


def test_build_report_without_a_gpu_check(tmp_path):
    """The report beside the engine (its measured parts need TensorRT and a GPU; check=False leaves them out)."""
    import json

    from fastdeeplab.export.engine_report import report_paths, write_engine_report
    from fastdeeplab.runtime.tensorrt import make_profiles

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\0" * 64)  # only its size is read without check
    paths = report_paths(engine)
    assert {k: p.name for k, p in paths.items()} == {"build": "m.build.json", "layers": "m.layers.json",
                                                      "profile": "m.profile.json"}
    report = write_engine_report(engine, reference=tmp_path / "m.onnx", graph=tmp_path / "m.fp16.onnx",
                                 precision="fp16", profiles=make_profiles([(1, 65, 65), (2, 129, 257)]),
                                 build_seconds=1.234, check=False, images=None, tensorrt_version="10.8.0")
    saved = json.loads(paths["build"].read_text())
    assert saved == json.loads(json.dumps(report)) and saved["strongly_typed"] and saved["engine_bytes"] == 64
    assert saved["profiles"][1] == {"min": [1, 3, 65, 129], "opt": [2, 3, 129, 257], "max": [2, 3, 129, 257]}
    assert saved["accuracy"] == [] and not paths["layers"].exists() and not paths["profile"].exists()
