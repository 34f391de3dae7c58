"""optimize(): the fused inference model equals the original in eval mode, on every backend that runs here."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from _models import randomize_bn, rel_err
from fastdeeplab.kernels.reference import conv_bn_relu_module_reference
from torch import nn
from torchvision.models.segmentation import deeplabv3_resnet50 as tv_deeplabv3_resnet50

import fastdeeplab
from fastdeeplab.layers import FusedASPP, FusedConvBNReLU
from fastdeeplab.model import ASPP
from fastdeeplab.optimization import OptimizedDeepLabV3, fused_module_counts

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))
HAS_ORT = HAS_ONNX and importlib.util.find_spec("onnxruntime") is not None
HAS_OV = HAS_ONNX and importlib.util.find_spec("openvino") is not None
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_bn(fastdeeplab.deeplabv3_resnet50(num_classes=7, aux_loss=True)).eval()


@pytest.fixture(scope="module")
def tv_model():
    torch.manual_seed(1)
    return randomize_bn(tv_deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=5)).eval()


# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------
def random_bn(c: int) -> nn.BatchNorm2d:
    return randomize_bn(nn.Sequential(nn.BatchNorm2d(c)), seed=c)[0].eval()


@pytest.mark.parametrize("k, stride, dilation, residual, relu", [
    pytest.param(3, 1, 1, False, True, id="k3-s1-d1"),
    pytest.param(3, 2, 1, False, True, id="k3-s2"),
    pytest.param(3, 1, 6, False, True, id="k3-d6"),
    pytest.param(3, 1, 18, False, False, id="k3-d18-norelu"),
    pytest.param(1, 1, 1, True, True, id="k1-residual-relu"),
    pytest.param(1, 2, 1, False, False, id="k1-s2-shortcut"),
])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@torch.no_grad()
def test_fused_conv_bn_relu_matches_unfused_chain(k, stride, dilation, residual, relu, channels_last):
    conv = nn.Conv2d(12, 20, k, stride=stride, padding=dilation * (k // 2), dilation=dilation, bias=False)
    bn = random_bn(20)
    fused = FusedConvBNReLU(conv, bn, relu=relu)
    x = torch.randn(2, 12, 23, 19)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = conv_bn_relu_module_reference(x, conv, bn, relu=False)
    res = torch.randn_like(expected) if residual else None
    if res is not None:
        expected = expected + res
    expected = expected.relu() if relu else expected
    got = fused(x, residual=res)
    assert rel_err(got, expected) < 1e-5
    assert "kernel_size=" in repr(fused) and f"relu={relu}" in repr(fused)


@torch.no_grad()
def test_fused_aspp_matches_aspp():
    aspp = randomize_bn(ASPP(32, (2, 4, 6), out_channels=16)).eval()
    fused = FusedASPP(aspp)
    x = torch.randn(3, 32, 9, 11)
    assert rel_err(fused(x), aspp(x)) < 1e-5
    assert fused.rates == (2, 4, 6)
    fused.set_rates((1, 2, 3))
    aspp.set_rates((1, 2, 3))
    assert rel_err(fused(x), aspp(x)) < 1e-5
    assert "pooled branch as per-image bias" in repr(fused)


# ------------------------------------------------------------------------------------------------
# optimize(): torch backend
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("os_", [16, 8])
@torch.no_grad()
def test_torch_backend_equals_original(model, os_):
    model.set_output_stride(os_)
    fast = fastdeeplab.optimize(model, backend="torch")
    assert isinstance(fast, OptimizedDeepLabV3) and fast.output_stride == os_
    counts = fused_module_counts(fast)
    assert "BatchNorm2d" not in counts and "Conv2d" not in counts, counts
    assert counts["FusedASPP"] == 1 and counts["FusedBottleneck"] == 16
    x = torch.randn(2, 3, 97, 83)
    expected, got = model(x), fast(x)
    assert set(got) == {"out", "aux"}
    for key in expected:
        assert got[key].shape == expected[key].shape and got[key].dtype == torch.float32
        assert rel_err(got[key], expected[key]) < 1e-4, key


@torch.no_grad()
def test_torchvision_model_is_accepted_and_equal(tv_model):
    fast = fastdeeplab.optimize(tv_model, backend="torch")
    x = torch.randn(1, 3, 65, 65)
    assert rel_err(fast(x)["out"], tv_model(x)["out"]) < 1e-4


@torch.no_grad()
def test_set_output_stride_on_the_optimized_model(model):
    model.set_output_stride(8)
    fast = fastdeeplab.optimize(model, backend="torch")
    x = torch.randn(1, 3, 65, 65)
    fast.set_output_stride(16)
    model.set_output_stride(16)
    assert fast.aspp.rates == (6, 12, 18)
    assert rel_err(fast(x)["out"], model(x)["out"]) < 1e-4
    model.set_output_stride(8)


def test_optimized_model_refuses_training(model):
    fast = fastdeeplab.optimize(model, backend="torch")
    with pytest.raises(RuntimeError, match="inference only"):
        fast.train()
    assert not fast.training and fast.eval() is fast
    assert not any(True for _ in fast.parameters()), "optimized models have no trainable parameters"
    with pytest.raises(TypeError, match="already optimized"):
        fastdeeplab.optimize(fast)


def test_optimize_leaves_the_original_untouched(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fastdeeplab.optimize(model, backend="torch")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_fused_layers_convert_under_inference_mode():
    """.to(dtype) of a fused layer under torch.inference_mode makes normal tensors (inference tensors have no
    version counter for the rebuild-on-change tokens: it raised), and the layer still runs and tracks edits."""
    from fastdeeplab.layers_mobilenet import FusedConvBNAct

    torch.manual_seed(0)
    layers = [FusedConvBNReLU(nn.Conv2d(8, 8, 3, padding=1), random_bn(8).eval()),
              FusedConvBNAct(nn.Conv2d(8, 8, 1), random_bn(8).eval(), activation="hardswish"),
              FusedASPP(randomize_bn(ASPP(8, [1, 2, 3], out_channels=8)).eval())]
    x = torch.randn(1, 8, 5, 5, dtype=torch.bfloat16)
    for layer in layers:
        with torch.inference_mode():
            layer.to(torch.bfloat16)
            y = layer(x)
        assert y.dtype == torch.bfloat16 and not any(b.is_inference() for b in layer.buffers()), layer
        with torch.no_grad():
            layer.bias.add_(1)
        assert not torch.equal(layer(x), y), layer


def test_optimize_under_inference_mode(model):
    """optimize() called under torch.inference_mode builds normal tensors: the fused layers' rebuild-on-change
    tokens read version counters, which inference tensors lack (it raised "Inference tensors do not track
    version counter"); an in-place edit afterwards is still seen."""
    x = torch.randn(1, 3, 33, 33)
    with torch.inference_mode():
        fast = fastdeeplab.optimize(model, backend="torch")
        y = fast(x)["out"]
    assert rel_err(y, fastdeeplab.optimize(model, backend="torch")(x)["out"]) < 1e-5
    conv = next(m for m in fast.modules() if isinstance(m, FusedConvBNReLU) and m.in_channels > 4)
    with torch.no_grad():
        conv.weight.mul_(2)
    assert conv._derived_from != conv._state_token()


@pytest.mark.parametrize("backend", ["torch", pytest.param("openvino", marks=pytest.mark.skipif(
    not HAS_OV, reason="openvino not installed: pip install 'fastdeeplab[openvino]'"))])
@torch.no_grad()
def test_bfloat16_on_cpu_runs_close(model, backend):
    fast = fastdeeplab.optimize(model, backend=backend, dtype=torch.bfloat16)
    assert "bfloat16" in repr(fast)
    x = torch.randn(1, 3, 65, 65)
    got, expected = fast(x)["out"], model(x)["out"]
    assert got.dtype == torch.float32  # returned in the input's dtype
    assert rel_err(got, expected) < 0.1


@torch.no_grad()
def test_channels_first_option(model):
    fast = fastdeeplab.optimize(model, backend="torch", channels_last=False)
    x = torch.randn(1, 3, 33, 47)
    assert rel_err(fast(x)["out"], model(x)["out"]) < 1e-4


def test_optimize_errors(model, monkeypatch):
    with pytest.raises(ValueError, match="unknown backend"):
        fastdeeplab.optimize(model, backend="tpu")
    with pytest.raises(TypeError, match="DeepLabV3"):
        fastdeeplab.optimize(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="float16 needs CUDA"):
        fastdeeplab.optimize(model, backend="torch", dtype=torch.float16)
    with pytest.raises(TypeError, match="floating-point"):
        fastdeeplab.optimize(model, backend="torch", dtype=torch.int8)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA model"):
        fastdeeplab.optimize(model, backend="triton")
    fast = fastdeeplab.optimize(model, backend="torch")
    with pytest.raises(ValueError, match="3 input channels"):
        fast(torch.randn(1, 1, 33, 33))


def test_auto_backend_on_cpu(model):
    from fastdeeplab.optimization import OnnxRuntimeDeepLabV3, OpenVINODeepLabV3, resolve_backend

    expected = "openvino" if HAS_OV else "onnxruntime" if HAS_ORT else "torch"
    assert resolve_backend("auto", torch.device("cpu")) == expected
    expected_bf16 = "openvino" if HAS_OV else "torch"
    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == expected_bf16
    fast = fastdeeplab.optimize(model)
    kind = {"openvino": OpenVINODeepLabV3, "onnxruntime": OnnxRuntimeDeepLabV3}.get(expected, OptimizedDeepLabV3)
    assert type(fast) is kind and fast.backend == expected
    assert fastdeeplab.optimize(model, dtype=torch.bfloat16).backend == expected_bf16


def test_auto_backend_falls_back_when_runtimes_are_missing(monkeypatch):
    import importlib

    opt = importlib.import_module("fastdeeplab.optimization")

    cpu = torch.device("cpu")
    monkeypatch.setattr(opt, "_importable", lambda *modules: "openvino" not in modules)
    assert opt.resolve_backend("auto", cpu) == "onnxruntime"
    monkeypatch.setattr(opt, "_importable", lambda *modules: False)
    assert opt.resolve_backend("auto", cpu) == "torch"


def test_exported_backends_refuse_what_they_cannot_run(model):
    with pytest.raises(ValueError, match="the onnxruntime backend runs torch.float32, not torch.bfloat16"):
        fastdeeplab.optimize(model, backend="onnxruntime", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float16 needs CUDA"):
        fastdeeplab.optimize(model, backend="openvino", dtype=torch.float16)


def test_missing_openvino_names_the_extra(model, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)  # blocked: `import openvino` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'fastdeeplab\[openvino\]'"):
        fastdeeplab.optimize(model, backend="openvino")


# ------------------------------------------------------------------------------------------------
# optimize(): onnxruntime and triton backends
# ------------------------------------------------------------------------------------------------
_RUNTIMES = [
    pytest.param("onnxruntime", marks=pytest.mark.skipif(
        not HAS_ORT, reason="onnxruntime not installed: pip install 'fastdeeplab[onnx]'")),
    pytest.param("openvino", marks=pytest.mark.skipif(
        not HAS_OV, reason="openvino not installed: pip install 'fastdeeplab[openvino]'")),
]


@pytest.mark.parametrize("backend", _RUNTIMES)
def test_exported_backend_refuses_non_cpu_inputs(model, backend):
    with pytest.raises(ValueError, match=f"the {backend} backend runs on the CPU; got an input on meta"):
        fastdeeplab.optimize(model, backend=backend)(torch.empty(1, 3, 33, 33, device="meta"))


@pytest.mark.parametrize("backend", _RUNTIMES)
@pytest.mark.parametrize("source", ["fastdeeplab", "torchvision"])
@torch.no_grad()
def test_exported_backend_equals_original(model, tv_model, source, backend):
    """ONNX Runtime and OpenVINO run the fused export: same outputs as the original at OS16 and OS8, at two
    input sizes through one session (dynamic axes), rebuilt when the output stride changes."""
    original = model if source == "fastdeeplab" else fastdeeplab.from_torchvision(tv_model)
    original.set_output_stride(16)
    fast = fastdeeplab.optimize(original if source == "fastdeeplab" else tv_model, backend=backend)
    assert fast.backend == backend and backend in repr(fast)
    fast.set_output_stride(16)
    for size in [(65, 65), (49, 81)]:  # a second size runs through the same session (dynamic axes)
        x = torch.randn(2, 3, *size)
        expected, got = original(x), fast(x)
        assert set(got) == set(expected)
        for key in expected:
            assert got[key].shape == expected[key].shape
            assert rel_err(got[key], expected[key]) < 1e-4, (key, size)
    session = fast._session
    fast.set_output_stride(8)
    original.set_output_stride(8)
    x = torch.randn(1, 3, 65, 65)
    first = fast(x)["out"]
    assert rel_err(first, original(x)["out"]) < 1e-4
    assert fast._session is not session, "the session is rebuilt when the output stride changes"
    second = fast(x + 1)["out"]
    assert not torch.equal(first, second), "outputs are the caller's own, not a buffer the next call reuses"
    with pytest.raises(RuntimeError, match="inference only"):
        fast.train()
    with pytest.raises(ValueError, match="3 input channels"):
        fast(torch.randn(1, 1, 33, 33))


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed: pip install 'fastdeeplab[triton]'")
@pytest.mark.parametrize("os_", [16, 8])
@torch.no_grad()
def test_triton_backend_equals_original(model, os_):
    """Under TRITON_INTERPRET=1 on CPU (tiny input: the interpreter is slow), or on CUDA when present."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    original = model.to(device).set_output_stride(os_)
    fast = fastdeeplab.optimize(original, backend="triton", dtype=torch.float32)
    assert fast.backend == "triton"
    x = torch.randn(1, 3, 17, 19, device=device)
    expected, got = original(x), fast(x)
    for key in expected:
        assert rel_err(got[key], expected[key]) < 1e-4, key
    model.cpu()


# ------------------------------------------------------------------------------------------------
# State stays true, NaN stays NaN, torch.compile, the meta device
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_load_state_dict_rebuilds_what_the_torch_backend_derived(model):
    """oneDNN's packed weights are rebuilt after load_state_dict (and after in-place changes)."""
    torch.manual_seed(3)
    other = randomize_bn(fastdeeplab.deeplabv3_resnet50(num_classes=7, aux_loss=True), seed=5).eval()
    x = torch.randn(1, 3, 33, 33)
    fast = fastdeeplab.optimize(model, backend="torch")
    before = fast(x)["out"]  # packs oneDNN weights for this shape
    target = fastdeeplab.optimize(other, backend="torch")
    expected = target(x)["out"]
    assert rel_err(before, expected) > 1e-2, "the two models must differ for this test to mean anything"
    fast.load_state_dict(target.state_dict())
    assert rel_err(fast(x)["out"], expected) < 1e-6
    # an in-place change of one layer's folded weight is seen too
    layer = fast.backbone.layer1[0].conv2
    layer.weight.mul_(0.5)
    twin = FusedConvBNReLU(nn.Conv2d(layer.in_channels, layer.out_channels, 3, padding=1, bias=True), None,
                           relu=True, backend="torch")
    twin.weight.copy_(layer.weight)
    twin.bias.copy_(layer.bias)
    h = torch.randn(1, layer.in_channels, 9, 9).contiguous(memory_format=torch.channels_last)
    assert rel_err(layer(h), twin(h)) < 1e-6


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@torch.no_grad()
def test_load_state_dict_rebuilds_the_triton_packed_weights():
    """Triton layers (interpreter): _packed/_bias32 and the ASPP packs follow load_state_dict, in place."""
    torch.manual_seed(0)

    def head(seed):
        torch.manual_seed(seed)
        aspp = randomize_bn(ASPP(16, [1, 2, 3], out_channels=8), seed=seed).eval()
        return FusedASPP(aspp, backend="triton")

    a, b = head(0), head(1)
    x = torch.randn(1, 16, 5, 6).contiguous(memory_format=torch.channels_last)
    a(x)
    packed, branch_packed = a._packed, a._branch_packed
    a.load_state_dict(b.state_dict())
    assert a._packed is packed and a._branch_packed is branch_packed, "refilled in place (CUDA graphs hold them)"
    assert torch.equal(a._packed, b._packed) and torch.equal(a._branch_packed, b._branch_packed)
    assert rel_err(a(x), b(x)) < 1e-5


@torch.no_grad()
def test_overflow_and_nan_inputs_give_nan_like_eager(model):
    """oneDNN's fused ReLU maps NaN to 0; the torch backend must not: overflow inside gives NaN out."""
    fast = fastdeeplab.optimize(model, backend="torch")
    huge = torch.full((1, 3, 65, 65), 3e38)
    eager = model(huge)["out"]
    assert eager.isnan().any()
    out = fast(huge)["out"]
    assert bool(out.isnan().all()) == bool(eager.isnan().all()) and out.isnan().any(), \
        "confident labels from an overflowing input"
    x = torch.randn(1, 3, 33, 33)
    x[0, 1, 5, 7] = float("nan")
    assert fast(x)["out"].isnan().any() and model(x)["out"].isnan().any()


def test_optimize_refuses_a_meta_model():
    with torch.device("meta"):
        meta = fastdeeplab.deeplabv3_resnet50(num_classes=3)
    with pytest.raises(ValueError, match="meta device") as info:
        fastdeeplab.optimize(meta, backend="torch")
    assert "\n" not in str(info.value)


@torch.no_grad()
def test_torch_compile_of_a_bfloat16_optimized_model(model):
    """torch.compile(optimize(...)) converts the input's dtype and layout as the eager model does."""
    fast = fastdeeplab.optimize(model, backend="torch", dtype=torch.bfloat16)
    compiled = torch.compile(fast, backend="aot_eager")
    x = torch.randn(1, 3, 65, 65)  # float32 into a bfloat16 model
    got, expected = compiled(x), fast(x)
    assert got["out"].dtype == torch.float32 and set(got) == set(expected)
    assert rel_err(got["out"], expected["out"]) < 3e-2
    assert compiled(x.to(torch.bfloat16))["out"].dtype == torch.bfloat16
