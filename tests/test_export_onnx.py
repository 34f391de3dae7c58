"""ONNX export: a clean, TensorRT-ready graph that ONNX Runtime runs exactly like PyTorch.

Every DeepLab case is exported once (module-scoped fixture) and then checked *independently* of the
exporter's own checks: a fresh ONNX Runtime session against the PyTorch model at two sizes (the second
through the dynamic batch, height and width), the node histogram, and TensorRT's op list.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from _models import randomize_bn
from onnx import helper
from torch import nn
from torchvision.models.segmentation import deeplabv3_resnet50 as tv_deeplabv3_resnet50

import fastdeeplab
from fastdeeplab.export.checks import check_tensorrt
from fastdeeplab.export.onnx import (
    ExportCheckError,
    ExportReport,
    export_onnx,
    fold_batchnorm_,
    onnx_model_proto,
    ort_session,
    physical_cores,
)
from fastdeeplab.model import ASPP

SIZES = ((65, 65), (97, 131))  # export size, then an odd, non-square size checked with batch 2
FP32_TOL = 1e-4  # max |ort - torch| <= FP32_TOL * max |torch|


def assert_close_to_scale(actual: np.ndarray, expected: np.ndarray, tol: float, what: str) -> None:
    """max |actual - expected| <= tol * max |expected|, with a message that says where and how much."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.isfinite(actual).all(), f"{what}: {int((~np.isfinite(actual)).sum())} non-finite values"
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    scale = float(np.abs(expected).max())
    bad = diff > tol * scale
    where = np.unravel_index(int(diff.argmax()), diff.shape)
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{diff.size} elements off by more than {tol:g} x {scale:.3g}; "
                           f"worst {diff.max():.3g} at {where}")


class TinySeg(nn.Module):
    """A 2-conv stem and a real (small) ASPP head with a bilinear upsample: every export feature in seconds."""

    output_stride = 4

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Sequential(ASPP(16, (1, 2, 3), out_channels=8), nn.Conv2d(8, classes, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.head(self.stem(x))
        return {"out": F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)}


# --------------------------------------------------------------------------------------------------
# DeepLab cases: each axis (depth, stride, aux, fastdeeplab vs torchvision) covered, each exported once
# --------------------------------------------------------------------------------------------------
CASES = [
    pytest.param((50, 16, True, "fastdeeplab"), id="r50-os16-aux"),
    pytest.param((50, 8, False, "torchvision"), id="r50-os8-torchvision"),
    pytest.param((101, 8, True, "fastdeeplab"), id="r101-os8-aux"),
    pytest.param((101, 16, False, "fastdeeplab"), id="r101-os16"),
]
CLASSES = 3


@pytest.fixture(scope="module", params=CASES)
def exported(request, tmp_path_factory):
    depth, stride, aux, source = request.param
    torch.manual_seed(depth + stride)
    if source == "torchvision":  # torchvision's DeepLabV3 is output stride 8
        model = tv_deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=CLASSES, aux_loss=aux)
        export_stride = None
    else:
        builder = fastdeeplab.deeplabv3_resnet50 if depth == 50 else fastdeeplab.deeplabv3_resnet101
        # Built at the other stride: the export switches it, and must switch it back.
        model = builder(num_classes=CLASSES, aux_loss=aux, output_stride=24 - stride)
        export_stride = stride
    randomize_bn(model, seed=depth).train()
    path = tmp_path_factory.mktemp("onnx") / f"r{depth}-os{stride}.onnx"
    outputs = ("out", "aux") if aux else ("out",)
    report = export_onnx(model, path, input_size=SIZES[0], output_stride=export_stride, outputs=outputs,
                         argmax=True, check_sizes=SIZES)
    return model, path, report, stride, outputs


def test_report_records_every_check(exported):
    _, path, report, stride, outputs = exported
    assert isinstance(report, ExportReport) and report.passed
    assert report.path == path and report.file_size == path.stat().st_size > 0
    assert report.output_stride == stride and report.opset == 17
    for name in ("onnx_checker", "shape_inference", "opset", "no_batchnorm", "pooled_branch", "dynamic_axes",
                 "tensorrt_ops", "ort@65x65 b1", "ort@97x131 b2", "labels@65x65 b1", "labels@97x131 b2"):
        assert report.checks[name].passed, name
    for key in ("65x65 b1", "97x131 b2"):
        assert set(report.errors[key]) == set(outputs)
        assert all(rel <= FP32_TOL for _, rel in report.errors[key].values())
    text = str(report)
    assert "GlobalAveragePool -> Conv -> Relu -> Expand" in text and "FAIL" not in text


def test_model_state_restored(exported):
    model, _, _, stride, _ = exported
    assert model.training  # it was in train mode before the export
    if hasattr(model, "set_output_stride"):
        assert model.output_stride == 24 - stride


def test_onnx_runtime_matches_pytorch_in_a_fresh_session(exported):
    """Independent of the exporter's checks (which covered SIZES): a third size, batch 2, a new session."""
    model, path, _, stride, outputs = exported
    session = ort_session(path)
    model.eval()
    if hasattr(model, "set_output_stride"):
        model.set_output_stride(stride)
    try:
        for batch, (h, w) in ((2, (41, 57)),):
            x = torch.randn(batch, 3, h, w)
            with torch.no_grad():
                expected = model(x)
            got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x.numpy()}),
                           strict=True))
            for name in outputs:
                assert_close_to_scale(got[name], expected[name].numpy(), FP32_TOL, f"{name} at {batch}x{h}x{w}")
            assert got["labels"].dtype == np.int32 and got["labels"].shape == (batch, h, w)
            np.testing.assert_array_equal(got["labels"], expected["out"].argmax(1).numpy())
    finally:
        model.train()
        if hasattr(model, "set_output_stride"):
            model.set_output_stride(24 - stride)


def test_graph_is_clean_and_tensorrt_ready(exported):
    _, path, _, _, outputs = exported
    proto = onnx.load(str(path))
    ops = Counter(n.op_type for n in proto.graph.node)
    assert proto.opset_import[0].version >= 13
    assert "BatchNormalization" not in ops and "Identity" not in ops and "ReduceMean" not in ops
    assert ops["GlobalAveragePool"] == 1 and ops["Expand"] == 1 and ops["ArgMax"] == 1
    assert ops["Resize"] == len(outputs)  # the final upsample(s) only: the pooled branch is not resized
    for node in proto.graph.node:
        if node.op_type == "Resize":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["mode"] == b"linear" and attrs["coordinate_transformation_mode"] == b"half_pixel"
    result = check_tensorrt(proto)
    assert result.ok, str(result)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(proto.graph.input) + list(proto.graph.output)}
    assert dims["input"] == ["batch", 3, "height", "width"]
    assert dims["out"] == ["batch", CLASSES, "height", "width"]
    assert dims["labels"] == ["batch", "height", "width"]


# --------------------------------------------------------------------------------------------------
# Small models: opsets, fp16, static shapes, folding, in-memory export, sessions
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny() -> TinySeg:
    return randomize_bn(TinySeg()).eval()


@pytest.mark.parametrize("opset", [13, 15, 17, 18], ids=lambda o: f"opset{o}")
def test_opsets(tiny, tmp_path, opset):
    report = export_onnx(tiny, tmp_path / "m.onnx", input_size=(33, 47), opset=opset, argmax=True)
    assert report.opset == opset and report.passed
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert proto.opset_import[0].version == opset
    assert Counter(n.op_type for n in proto.graph.node)["GlobalAveragePool"] == 1


def test_half_exports_fp16_weights_and_io(tiny, tmp_path):
    report = export_onnx(tiny, tmp_path / "h.onnx", input_size=(33, 47), half=True)
    assert report.dtypes == {"input": "float16", "out": "float16"} and report.precision == "fp16"
    proto = onnx.load(str(tmp_path / "h.onnx"))
    float_weights = [t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert not float_weights, f"fp32 initializers left in an fp16 export: {float_weights[:5]}"
    # ONNX Runtime runs it on the CPU: compared with the fp32 PyTorch model within the fp16 tolerance.
    x = torch.randn(2, 3, 41, 29)
    got = ort_session(tmp_path / "h.onnx").run(["out"], {"input": x.half().numpy()})[0]
    with torch.no_grad():
        expected = tiny(x)["out"].numpy()
    assert got.dtype == np.float16
    assert_close_to_scale(got, expected, 2e-2, "fp16 out")


def test_static_export(tiny, tmp_path):
    report = export_onnx(tiny, tmp_path / "s.onnx", input_size=(33, 47), dynamic=False)
    assert report.inputs == {"input": (1, 3, 33, 47)} and "dynamic_axes" not in report.checks
    with pytest.raises(ValueError, match="static export"):
        export_onnx(tiny, tmp_path / "s2.onnx", input_size=(33, 47), dynamic=False, check_sizes=[(33, 47), (9, 9)])


def test_onnx_model_proto_in_memory(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proto = onnx_model_proto(tiny, input_size=(33, 47))
    assert isinstance(proto, onnx.ModelProto) and not any(tmp_path.iterdir())
    onnx.checker.check_model(proto, full_check=True)
    x = torch.randn(1, 3, 21, 37)
    got = ort_session(proto).run(["out"], {"input": x.numpy()})[0]
    with torch.no_grad():
        assert_close_to_scale(got, tiny(x)["out"].numpy(), FP32_TOL, "in-memory export")


def test_fold_batchnorm_matches_unfolded(tiny):
    x = torch.randn(2, 3, 31, 23)
    with torch.no_grad():
        before = tiny(x)["out"]
        folded = fold_batchnorm_(tiny)
        after = tiny(x)["out"]
    assert folded == 2 + 5 + 1  # stem, ASPP branches (1x1, three atrous, pooled), projection
    assert not any(isinstance(m, nn.BatchNorm2d) for m in tiny.modules())
    assert_close_to_scale(after.numpy(), before.numpy(), 1e-5, "folded")
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm_(TinySeg().train())


def test_ort_session_settings(tiny, tmp_path):
    path = tmp_path / "m.onnx"
    export_onnx(tiny, path, input_size=(33, 47), check=False)
    session = ort_session(path, threads=1, optimization_level="basic")
    options = session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    spinning = ort_session(path, spinning=True).get_session_options()
    assert spinning.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert ort_session(path.read_bytes()).get_session_options().intra_op_num_threads == physical_cores()
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)
    with pytest.raises(ValueError, match="optimization_level"):
        ort_session(path, optimization_level="max")
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        ort_session(tmp_path / "missing.onnx")


class ReshapedWeight(nn.Module):
    """A conv weight kept 2-D and reshaped in forward (as fused modules do): must still be an initializer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.randn(4, 3))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": F.conv2d(x, self.w[:, :, None, None])}


def test_layout_ops_on_weights_are_folded(tmp_path):
    report = export_onnx(ReshapedWeight().eval(), tmp_path / "m.onnx", input_size=(9, 11))
    assert report.checks["tensorrt_ops"].passed and dict(report.op_counts) == {"Conv": 1}
    conv = onnx.load(str(tmp_path / "m.onnx")).graph
    assert conv.node[0].input[1] in {t.name for t in conv.initializer}


def test_optimized_model_exports(tmp_path):
    """optimize()'s fused modules export as standard ops and match the unoptimized model."""
    model = randomize_bn(fastdeeplab.deeplabv3_resnet50(num_classes=CLASSES, output_stride=16)).eval()
    fast = fastdeeplab.optimize(model, backend="torch")
    report = export_onnx(fast, tmp_path / "fast.onnx", input_size=(33, 49), argmax=True)
    assert report.passed and "BatchNormalization" not in report.op_counts
    x = torch.randn(1, 3, 41, 57)
    got = ort_session(tmp_path / "fast.onnx").run(["out"], {"input": x.numpy()})[0]
    with torch.no_grad():
        assert_close_to_scale(got, model(x)["out"].numpy(), FP32_TOL, "optimized export vs eager model")


# --------------------------------------------------------------------------------------------------
# Failures: named, and nothing left behind
# --------------------------------------------------------------------------------------------------
class Bicubic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": F.interpolate(self.conv(x), scale_factor=2, mode="bicubic", align_corners=False)}


class ComputedWeight(nn.Module):
    """A conv whose weight depends on the input: TensorRT needs Conv weights as initializers."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": F.conv2d(x, self.weight * x.mean(), padding=1)}


class WithLayerNorm(nn.Module):
    """LayerNormalization is marked N (unsupported) in the TensorRT op list."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 4, 1), nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)}


class LoneBatchNorm(nn.Module):
    """A BatchNorm with no conv before it cannot be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.bn(x * 2)}


@pytest.mark.parametrize(
    "module, check, node_fragment, message",
    [
        pytest.param(Bicubic, "tensorrt_ops", "bicubic", "mode 'cubic' is not supported", id="resize-cubic"),
        pytest.param(ComputedWeight, "tensorrt_ops", "Conv", "must be an initializer", id="conv-computed-weight"),
        pytest.param(WithLayerNorm, "tensorrt_ops", "layer_norm", "marked unsupported (N)", id="layernorm-N"),
        pytest.param(LoneBatchNorm, "no_batchnorm", "batch_norm", "BatchNormalization", id="unfoldable-bn"),
    ],
)
def test_failed_check_names_the_node_and_writes_nothing(tmp_path, module, check, node_fragment, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"previous export")  # an existing file survives a failed export untouched
    with pytest.raises(ExportCheckError) as info:
        export_onnx(module().eval(), path, input_size=(9, 11))
    error = info.value
    assert error.check == check and node_fragment in (error.node or "")
    assert message in str(error) and error.node in str(error)
    assert error.report is not None and not error.report.checks[check].passed
    assert path.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]  # no temporary file left


def test_unwritable_path_fails_before_export(tmp_path, tiny):
    blocker = tmp_path / "afile"
    blocker.write_text("a regular file, not a directory")
    with pytest.raises(OSError, match="cannot create output directory|is not a directory"):
        export_onnx(tiny, blocker / "x.onnx", input_size=(33, 47))
    with pytest.raises(OSError):
        export_onnx(tiny, "/proc/fastdeeplab-test/x.onnx", input_size=(33, 47))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_argument_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="no auxiliary head"):
        export_onnx(fastdeeplab.deeplabv3_resnet50(num_classes=2), tmp_path / "m.onnx", outputs=("out", "aux"))
    with pytest.raises(ValueError, match="unknown output"):
        export_onnx(tiny, tmp_path / "m.onnx", outputs=("logits",))
    with pytest.raises(ValueError, match="smaller than the output stride"):
        export_onnx(fastdeeplab.deeplabv3_resnet50(num_classes=2), tmp_path / "m.onnx", input_size=(15, 64),
                    output_stride=16)
    with pytest.raises(ValueError, match="set_output_stride"):
        export_onnx(tiny, tmp_path / "m.onnx", output_stride=8)
    with pytest.raises(ValueError, match="opset"):
        onnx_model_proto(tiny, input_size=(33, 47), opset=11)
    with pytest.raises(TypeError, match="nn.Module"):
        export_onnx(lambda x: x, tmp_path / "m.onnx")
    assert not any(tmp_path.iterdir())


def test_missing_onnx_names_the_extra(monkeypatch, tiny, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # what `import onnx` does when it is not installed
    with pytest.raises(ImportError, match=r"pip install 'fastdeeplab\[onnx\]'"):
        export_onnx(tiny, tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install 'fastdeeplab\[onnx\]'"):
        ort_session(Path("whatever.onnx"))


def test_cli_exports_a_checked_graph(tmp_path, capsys):
    from fastdeeplab.cli import main

    out = tmp_path / "cli.onnx"
    code = main(["export", "--model", "deeplabv3_resnet50", "--num-classes", "2", "--output-stride", "16",
                 "--input-size", "33", "49", "--argmax", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and out.is_file(), printed
    assert "PASS  tensorrt_ops" in printed and "FAIL" not in printed
    assert {o.name for o in onnx.load(str(out)).graph.output} == {"out", "labels"}


@pytest.mark.parametrize(
    "extra, message",
    [
        pytest.param(["--keep-fp32", "classifier.4"], "--keep-fp32 applies to --precision fp16", id="keep-fp32-fp32"),
        pytest.param(["--int8-flavour", "tensorrt"], "--int8-flavour applies", id="flavour-without-int8"),
        pytest.param(["--precision", "int8", "--calibration-images", "{tmp}/nope"], "calibration image folder not "
                     "found", id="missing-calibration-folder"),
        pytest.param(["--format", "tensorrt", "--profile", "1x3x65x65", "--min-shape", "1x3x33x33"],
                     "--profile or --min-shape", id="profile-and-min-shape"),
    ],
)
def test_cli_refuses_before_exporting(tmp_path, capsys, extra, message):
    from fastdeeplab.cli import main

    out = tmp_path / "m.onnx"
    code = main(["export", "--num-classes", "2", "--input-size", "33", "33", "--out", str(out)]
                + [e.replace("{tmp}", str(tmp_path)) for e in extra])
    assert code == 1 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing exported
