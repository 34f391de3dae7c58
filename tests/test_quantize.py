"""Int8 QDQ quantization with ONNX Runtime: the graph format, both flavours, and agreement with fp32."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from PIL import Image
from torch import nn

from fastdeeplab.export.checks import check_tensorrt
from fastdeeplab.export.onnx import export_onnx, ort_session
from fastdeeplab.export.quantize import (
    QuantizationReport,
    calibration_tensor,
    compare_quantized,
    cpu_saturates_u8s8,
    quantize_onnx,
)
from fastdeeplab.model import ASPP

SIZE = (48, 64)


class SmallSeg(nn.Module):
    """Conv-BN-ReLU stem and an ASPP head: DeepLab's op mix (Conv, Relu, Concat, GlobalAveragePool, Resize)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Sequential(ASPP(32, (1, 2, 3), out_channels=16), nn.Conv2d(16, classes, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": F.interpolate(self.head(self.stem(x)), size=x.shape[-2:], mode="bilinear",
                                     align_corners=False)}


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    pytest.importorskip("skimage", reason="sample photographs come from scikit-image (fastdeeplab[bench])")
    return calibration_tensor(None, SIZE)


@pytest.fixture(scope="module")
def fp32_path(tmp_path_factory):
    torch.manual_seed(0)
    model = SmallSeg().eval()
    with torch.no_grad():
        model.head[1].bias.zero_()  # a random bias alone would pick one class everywhere: agreement trivial
    path = tmp_path_factory.mktemp("q") / "fp32.onnx"
    export_onnx(model, path, input_size=SIZE)
    return path


def _zero_points(model: onnx.ModelProto) -> list[np.ndarray]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [inits[n.input[2]] for n in model.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits]


@pytest.mark.parametrize("tensorrt_compatible", [False, True], ids=["cpu-u8s8", "tensorrt-s8s8"])
def test_qdq_graph(fp32_path, photos, tmp_path, tensorrt_compatible):
    out = quantize_onnx(fp32_path, tmp_path / "int8.onnx", photos, input_size=SIZE,
                        tensorrt_compatible=tensorrt_compatible)
    model = onnx.load(str(out))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    assert ops["Conv"] == Counter(n.op_type for n in onnx.load(str(fp32_path)).graph.node)["Conv"]
    assert not {"QLinearConv", "ConvInteger", "DynamicQuantizeLinear"} & set(ops)  # QDQ, not QOperator
    zero_points = _zero_points(model)
    if tensorrt_compatible:  # int8, zero point 0, float biases: what TensorRT's parser takes
        assert all(z.dtype == np.int8 and not z.any() for z in zero_points)
        result = check_tensorrt(model)
        assert result.ok, str(result)
        assert max(int(np.abs(w.astype(np.int32)).max()) for w in _int8_weights(model)) == 127  # 8-bit on any CPU
    else:  # uint8 activations: ONNX Runtime's fast CPU path, which TensorRT rejects
        assert any(z.dtype == np.uint8 for z in zero_points)
        assert any("UINT8" in i.message for i in check_tensorrt(model).issues)
    x = photos[:2].numpy()
    assert ort_session(out).run(["out"], {"input": x})[0].shape == (2, 4, *SIZE)


def test_int8_agrees_with_fp32_on_photographs(fp32_path, photos, tmp_path):
    out = quantize_onnx(fp32_path, tmp_path / "int8.onnx", photos, input_size=SIZE)
    report = compare_quantized(fp32_path, out, photos, size=SIZE, runs=2, threads=1)
    assert isinstance(report, QuantizationReport)
    assert report.images == photos.shape[0] and report.size == SIZE and report.threads == 1
    labels = ort_session(fp32_path).run(["out"], {"input": photos.numpy()})[0].argmax(1)
    shares = np.bincount(labels.ravel(), minlength=4) / labels.size
    assert shares.max() < 0.9, f"fp32 predicts one class almost everywhere ({shares}): the test would be trivial"
    assert report.pixel_agreement > 0.95, str(report)
    assert report.fp32_ms > 0 and report.int8_ms > 0 and "pixels agree" in str(report)


def _int8_weights(model: onnx.ModelProto) -> list[np.ndarray]:
    return [numpy_helper.to_array(t) for t in model.graph.initializer
            if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]


def test_integer_kernels_compute_what_the_qdq_graph_says(fp32_path, photos, tmp_path):
    """ONNX Runtime's fused int8 kernels (all optimizations) against the QDQ graph run op by op (none): equal up
    to a rounding step of the output's scale. On x86 without VNNI, 8-bit weights make the kernels' int16 pair
    sums saturate (relative error 0.26-0.43, 87-95% of pixels agreeing, on this model with seeds 0-2), which the
    default ``reduce_range`` (7-bit weights on such CPUs) avoids."""
    from fastdeeplab.metrics import max_rel_error

    out = quantize_onnx(fp32_path, tmp_path / "int8.onnx", photos, input_size=SIZE)
    weights = _int8_weights(onnx.load(str(out)))
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) == (64 if cpu_saturates_u8s8() else 127)
    x = {"input": photos.numpy()}
    fused = ort_session(out, threads=1).run(["out"], x)[0]
    reference = ort_session(out, threads=1, optimization_level="disable").run(["out"], x)[0]
    assert max_rel_error(fused, reference) < 0.02 and (fused.argmax(1) == reference.argmax(1)).mean() > 0.995


@pytest.mark.parametrize("reduce_range, bound", [(True, 64), (False, 127)], ids=["7-bit", "8-bit"])
def test_reduce_range_explicit(fp32_path, photos, tmp_path, reduce_range, bound):
    for trt in (False, True):
        out = quantize_onnx(fp32_path, tmp_path / f"q{trt}.onnx", photos, input_size=SIZE,
                            tensorrt_compatible=trt, reduce_range=reduce_range)
        assert max(int(np.abs(w.astype(np.int32)).max()) for w in _int8_weights(onnx.load(str(out)))) == bound


def test_cpu_saturates_u8s8():
    assert cpu_saturates_u8s8("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    assert not cpu_saturates_u8s8("flags\t\t: avx avx2 avx512f avx512_vnni\n")
    assert not cpu_saturates_u8s8("flags\t\t: avx avx2 avx_vnni\n")
    assert isinstance(cpu_saturates_u8s8(), bool)


def test_calibration_sources(tmp_path):
    batch = torch.randn(3, 3, 8, 8)
    assert torch.equal(calibration_tensor(batch), batch)
    assert calibration_tensor([batch[0], batch[1:]]).shape == (3, 3, 8, 8)
    assert calibration_tensor(batch, max_images=2).shape[0] == 2
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(tmp_path / "a.png")
    assert calibration_tensor(tmp_path, (16, 24)).shape == (1, 3, 16, 24)
    with pytest.raises(FileNotFoundError, match="not found"):
        calibration_tensor(tmp_path / "nope")
    with pytest.raises(ValueError, match="calibration tensors"):
        calibration_tensor(torch.randn(2, 1, 8, 8))


def test_quantize_argument_errors(fp32_path, tmp_path):
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_onnx(fp32_path, tmp_path / "q.onnx", torch.randn(1, 3, *SIZE), method="kl")
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        quantize_onnx(tmp_path / "missing.onnx", tmp_path / "q.onnx", torch.randn(1, 3, *SIZE))
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="cannot create output directory|is not a directory"):
        quantize_onnx(fp32_path, blocker / "q.onnx", torch.randn(1, 3, *SIZE))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


# --------------------------------------------------------------------------------------------------
# The TensorRT flavour as TensorRT's explicit quantization needs it, and its accuracy against PyTorch
# --------------------------------------------------------------------------------------------------
def test_qdq_graph_check(fp32_path, photos, tmp_path):
    from fastdeeplab.export.checks import check_qdq_graph

    trt = onnx.load(str(quantize_onnx(fp32_path, tmp_path / "trt.onnx", photos, input_size=SIZE,
                                      tensorrt_compatible=True)))
    found = check_qdq_graph(trt)
    assert found.ok, str(found)
    convs = sum(n.op_type == "Conv" for n in trt.graph.node)
    assert f"{convs} Conv with dequantized int8 input and int8 weight" in str(found)
    inits = {t.name: t for t in trt.graph.initializer}
    producers = {o: n for n in trt.graph.node for o in n.output}
    for node in (n for n in trt.graph.node if n.op_type == "Conv"):  # the placement, independently
        data, weight = (producers[i] for i in node.input[:2])
        assert data.op_type == weight.op_type == "DequantizeLinear"
        assert inits[weight.input[0]].data_type == onnx.TensorProto.INT8
    cpu = onnx.load(str(quantize_onnx(fp32_path, tmp_path / "cpu.onnx", photos, input_size=SIZE)))
    found = check_qdq_graph(cpu)  # uint8 activations with non-zero zero points: not for TensorRT
    assert not found.ok and "expected int8 0" in str(found) and found.nodes
    assert not check_qdq_graph(onnx.load(str(fp32_path))).ok  # fp32: no Conv is dequantized


@torch.no_grad()
def test_tensorrt_int8_accuracy_against_pytorch(photos, tmp_path):
    """The int8 Q/DQ graph (TensorRT flavour) on ONNX Runtime against the fp32 PyTorch model it came from."""
    from fastdeeplab.metrics import max_rel_error, pixel_agreement

    torch.manual_seed(0)
    model = SmallSeg().eval()
    with torch.no_grad():
        model.head[1].bias.zero_()
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(model, fp32, input_size=SIZE)
    int8 = quantize_onnx(fp32, tmp_path / "int8.onnx", photos, input_size=SIZE, tensorrt_compatible=True)
    # Op by op, as written: what TensorRT computes (int32 accumulation), not ONNX Runtime's fused CPU kernels,
    # whose int16 pair sums saturate with 8-bit weights on x86 without VNNI (error 0.34 here, seed 0).
    got = ort_session(int8, optimization_level="disable").run(["out"], {"input": photos.numpy()})[0]
    expected = model(photos)["out"]
    error = max_rel_error(got, expected)
    agree = pixel_agreement(got.argmax(1), expected.argmax(1), ignore_index=None)
    assert 0 < error < 0.15 and agree > 0.95, (error, agree)


def test_uint8_input_graph_quantizes_for_tensorrt(photos, tmp_path):
    """The deploy graph (raw uint8 pixels in, uint8 labels out) calibrates on pixels and stays TensorRT-ready."""
    from fastdeeplab.export.checks import check_qdq_graph
    from fastdeeplab.export.quantize import to_pixels

    torch.manual_seed(0)
    model = SmallSeg().eval()
    with torch.no_grad():
        model.head[1].bias.zero_()
    fp32 = tmp_path / "u8.onnx"
    export_onnx(model, fp32, input_size=SIZE, uint8_input=True, argmax=True, labels_dtype="uint8")
    int8 = onnx.load(str(quantize_onnx(fp32, tmp_path / "u8.int8.onnx", photos, input_size=SIZE,
                                       tensorrt_compatible=True)))
    assert check_qdq_graph(int8).ok and check_tensorrt(int8).ok, str(check_tensorrt(int8))
    pixels = to_pixels(photos).numpy()
    assert pixels.dtype == np.uint8
    ours = ort_session(int8, optimization_level="disable").run(["labels"], {"input": pixels})[0]  # see above
    reference = ort_session(fp32).run(["labels"], {"input": pixels})[0]
    assert ours.dtype == np.uint8 and (ours == reference).mean() > 0.9
