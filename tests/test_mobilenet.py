"""DeepLabV3-MobileNetV3-Large: drop-in for torchvision's builder, output stride 8/16/32 on the same weights,
optimize() on every CPU backend, export."""

from __future__ import annotations

import pytest
import torch
from _models import randomize_bn, rel_err
from torchvision.models import mobilenet_v3_large as tv_mobilenet_v3_large
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large as tv_builder

import fastdeeplab
from fastdeeplab.mobilenet import MOBILENET_ASPP_RATES, depthwise_conv, mobilenet_atrous_plan


def _tv(aux: bool, classes: int = 21, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(tv_builder(weights=None, weights_backbone=None, num_classes=classes, aux_loss=aux)).eval()


def _photos(size) -> torch.Tensor:
    """Real photographs (scikit-image's) when installed, else a random batch."""
    try:
        from fastdeeplab.images import sample_images

        return sample_images(size, count=2)[1]
    except ImportError:
        return torch.randn(2, 3, *size)


@pytest.mark.parametrize("aux, classes, size", [(True, 21, (129, 161)), (False, 19, (97, 131))])
@torch.no_grad()
def test_same_outputs_as_torchvision(aux, classes, size):
    tv = _tv(aux, classes)
    ours = fastdeeplab.deeplabv3_mobilenet_v3_large(num_classes=classes, aux_loss=aux).eval()
    ours.load_state_dict(tv.state_dict(), strict=True)  # same names: torchvision's checkpoint loads strictly
    converted = fastdeeplab.from_torchvision(tv)
    assert not converted.training and converted.aux_classifier is not None if aux else True
    x = _photos(size)
    expected = tv(x)
    assert set(ours(x)) == set(expected) == ({"out", "aux"} if aux else {"out"})
    for model in (ours, converted):
        got = model(x)
        for key in expected:
            assert got[key].shape == expected[key].shape
            assert rel_err(got[key], expected[key]) < 1e-4, key
    assert ours.output_stride == 16 and ours.aspp.rates == MOBILENET_ASPP_RATES


def test_parameters_and_names_match_torchvision():
    ours = fastdeeplab.deeplabv3_mobilenet_v3_large(aux_loss=True)
    tv = tv_builder(weights=None, weights_backbone=None, aux_loss=True)
    assert list(ours.state_dict()) == list(tv.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == 11_029_328  # torchvision's meta["num_params"]
    # aux off: torchvision's COCO checkpoint (aux weights included) still loads, its aux keys dropped
    no_aux = fastdeeplab.deeplabv3_mobilenet_v3_large()
    fastdeeplab.load_checkpoint(no_aux, tv.state_dict())


def test_weights_names_and_registry(tmp_path):
    from torchvision.models.segmentation import DeepLabV3_MobileNet_V3_Large_Weights as W

    from fastdeeplab.hub import _mobilenet_weights_enums, _torchvision_weights

    enums = _mobilenet_weights_enums("model")
    assert _torchvision_weights("COCO_WITH_VOC_LABELS_V1", enums) is W.COCO_WITH_VOC_LABELS_V1
    assert _torchvision_weights("DeepLabV3_MobileNet_V3_Large_Weights.DEFAULT", enums) is W.DEFAULT
    assert _torchvision_weights(W.DEFAULT, enums) is W.DEFAULT
    with pytest.raises(ValueError, match="COCO_WITH_VOC_LABELS_V1"):
        fastdeeplab.deeplabv3_mobilenet_v3_large(weights="NOT_A_WEIGHT")
    assert "deeplabv3_mobilenet_v3_large" in fastdeeplab.list_models()
    model = fastdeeplab.get_model("deeplabv3_mobilenet_v3_large", num_classes=5, output_stride=8)
    assert model.output_stride == 8 and model.classifier[-1].out_channels == 5
    # a checkpoint path loads strictly
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    again = fastdeeplab.get_model("deeplabv3_mobilenet_v3_large", weights=str(path), num_classes=5)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    # the ImageNet backbone from a file with torchvision's classifier names
    backbone = tmp_path / "mnv3.pt"
    torch.save(tv_mobilenet_v3_large(weights=None).state_dict(), backbone)
    fastdeeplab.deeplabv3_mobilenet_v3_large(weights_backbone=str(backbone))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(output_stride=4), ValueError, "output stride"),
    (dict(output_stride=16.0), TypeError, "output_stride"),
    (dict(multi_grid=(1, 2, 4)), ValueError, "multi_grid"),
    (dict(head="cascade"), ValueError, "head"),
    (dict(aspp_rates=(0, 1, 2)), ValueError, "aspp_rates"),
    (dict(aux_loss="yes"), TypeError, "aux_loss"),
])
def test_bad_arguments_are_refused_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastdeeplab.deeplabv3_mobilenet_v3_large(**kwargs)


def test_from_torchvision_refuses_other_backbones():
    tv = _tv(False)
    tv.backbone["16"] = torch.nn.Identity()
    with pytest.raises(TypeError, match="MobileNetV3-Large"):
        fastdeeplab.from_torchvision(tv)


# --------------------------------------------------------------------------------------------------
# Output stride
# --------------------------------------------------------------------------------------------------
NOMINAL = (1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1)


@pytest.mark.parametrize("os_, strided, dilations", [
    (32, {"2", "4", "7", "13"}, {}),
    (16, {"2", "4", "7"}, {"13": 2, "14": 2, "15": 2}),
    (8, {"2", "4"}, {**{str(i): 2 for i in range(7, 13)}, "13": 4, "14": 4, "15": 4}),
])
def test_plan(os_, strided, dilations):
    plan = mobilenet_atrous_plan(os_, NOMINAL)
    for name, (stride, (dilation,)) in plan.stages.items():
        assert stride == (2 if name in strided else 1), name
        assert dilation == dilations.get(name, 1), name
    assert plan.aspp_rates == MOBILENET_ASPP_RATES  # torchvision's head: fixed rates
    follow = mobilenet_atrous_plan(os_, NOMINAL, (6, 12, 18), aspp_follows_stride=True).aspp_rates
    assert follow == tuple(round(r * 16 / os_) for r in (6, 12, 18))


@torch.no_grad()
def test_output_stride_switch_on_the_same_weights():
    model = randomize_bn(fastdeeplab.deeplabv3_mobilenet_v3_large(aux_loss=True)).eval()
    x = torch.randn(1, 3, 96, 128)
    ref = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for os_ in (8, 32, 16):
        model.set_output_stride(os_)
        feats = model.backbone(x)
        assert feats["out"].shape[-2:] == (96 // os_, 128 // os_)
        assert feats["aux"].shape[-2:] == (12, 16)  # C2 stays at OS8
        out = model(x)
        assert out["out"].shape == ref["out"].shape and torch.isfinite(out["out"]).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    back = model(x)  # back at 16: torchvision's geometry, bit for bit the same outputs
    assert all(torch.equal(back[k], ref[k]) for k in ref)


@torch.no_grad()
def test_output_stride_32_is_the_undilated_imagenet_network():
    model = randomize_bn(fastdeeplab.deeplabv3_mobilenet_v3_large(output_stride=32)).eval()
    features = tv_mobilenet_v3_large(weights=None).features.eval()
    features.load_state_dict({k: v for k, v in model.backbone.state_dict().items()}, strict=True)
    x = torch.randn(1, 3, 96, 96)
    assert rel_err(model.backbone(x)["out"], features(x)) < 1e-5
    # and OS16 is torchvision's dilated network
    model.set_output_stride(16)
    dilated = tv_mobilenet_v3_large(weights=None, dilated=True).features.eval()
    dilated.load_state_dict(model.backbone.state_dict(), strict=True)
    assert rel_err(model.backbone(x)["out"], dilated(x)) < 1e-5
    for i in range(1, 16):
        a, b = depthwise_conv(model.backbone[str(i)]), depthwise_conv(dilated[i])
        assert (a.stride, a.dilation, a.padding) == (b.stride, b.dilation, b.padding)


def test_paper_head_rates_follow_the_stride():
    model = fastdeeplab.deeplabv3_mobilenet_v3_large(head="paper", output_stride=16)
    assert model.aspp.rates == (6, 12, 18) and len(model.classifier) == 2
    assert model.set_output_stride(8).aspp.rates == (12, 24, 36)
    assert model.set_output_stride(32).aspp.rates == (3, 6, 9)
    tv_head = fastdeeplab.deeplabv3_mobilenet_v3_large(output_stride=8)
    assert tv_head.aspp.rates == MOBILENET_ASPP_RATES


# --------------------------------------------------------------------------------------------------
# optimize(): every CPU backend against eager
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eager():
    return randomize_bn(fastdeeplab.deeplabv3_mobilenet_v3_large(aux_loss=True)).eval()


def test_optimize_fuses_every_layer(eager):
    from fastdeeplab.layers import FusedASPP
    from fastdeeplab.layers_mobilenet import FusedConvBNAct, FusedInvertedResidual, FusedSqueezeExcitation
    from fastdeeplab.optimization import fused_module_counts

    fast = fastdeeplab.optimize(eager, backend="torch")
    counts = fused_module_counts(fast)
    assert counts.get("BatchNorm2d", 0) == 0 and counts.get("Conv2d", 0) == 0, counts
    blocks = [m for m in fast.modules() if isinstance(m, FusedInvertedResidual)]
    assert len(blocks) == 15 and all(b.depthwise.depthwise for b in blocks)
    assert sum(isinstance(m, FusedSqueezeExcitation) for m in fast.modules()) == 8
    acts = [m.activation for m in fast.modules() if isinstance(m, FusedConvBNAct)]
    assert acts.count("hardswish") > 0 and acts.count("relu") > 0 and acts.count("none") == 15
    assert isinstance(fast.classifier[0], FusedASPP)


@pytest.mark.parametrize("backend, dtype, tol", [
    ("torch", torch.float32, 1e-4),
    ("torch", torch.bfloat16, 5e-2),
    ("onnxruntime", torch.float32, 1e-4),
    ("openvino", torch.float32, 1e-4),
])
@torch.no_grad()
def test_optimize_matches_eager_on_every_cpu_backend(eager, backend, dtype, tol):
    pytest.importorskip({"onnxruntime": "onnxruntime", "openvino": "openvino"}.get(backend, "torch"))
    fast = fastdeeplab.optimize(eager, backend=backend, dtype=dtype)
    x = torch.randn(2, 3, 65, 81)
    # the exported runtimes rebuild their graph on a stride switch (tested with the ResNets): one stride here
    for os_ in (16, 8) if backend == "torch" else (16,):
        eager.set_output_stride(os_)
        fast.set_output_stride(os_)
        ref, got = eager(x), fast(x)
        assert set(got) == set(ref)
        for key in ref:
            assert got[key].dtype == torch.float32 and got[key].shape == ref[key].shape
            assert rel_err(got[key], ref[key]) < tol, (os_, key)
    eager.set_output_stride(16)


@torch.no_grad()
def test_fused_depthwise_module_against_conv():
    """Every depthwise geometry of the network (3×3, 5×5, stride 1/2, dilation 1/2/4), each activation."""
    from torch import nn

    from fastdeeplab.layers_mobilenet import FusedConvBNAct

    torch.manual_seed(0)
    for k, stride, dilation, act in [(3, 1, 1, "relu"), (3, 2, 1, "hardswish"), (5, 2, 1, "relu"),
                                     (5, 1, 2, "hardswish"), (5, 1, 4, "none"), (3, 1, 2, "hardswish"),
                                     (5, 1, 4, "hardswish"), (3, 1, 8, "relu")]:  # dilation > 2: phases
        conv = nn.Conv2d(24, 24, k, stride, (k - 1) // 2 * dilation, dilation, groups=24, bias=False)
        bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(24))).eval()[0]
        ref_act = {"relu": nn.ReLU(), "hardswish": nn.Hardswish(), "none": nn.Identity()}[act]
        x = torch.randn(1, 24, 17, 13).contiguous(memory_format=torch.channels_last)
        expected = ref_act(bn(conv(x)))
        fused = FusedConvBNAct(conv, bn, activation=act)
        assert rel_err(fused(x), expected) < 1e-5, (k, stride, dilation, act)
        residual = torch.randn_like(expected)
        assert rel_err(fused(x, residual), ref_act(bn(conv(x)) + residual)) < 1e-5


# --------------------------------------------------------------------------------------------------
# Export and deploy
# --------------------------------------------------------------------------------------------------
def test_onnx_export_fp32_fp16_int8(eager, tmp_path):
    """The fp32 export passes every check (ONNX Runtime against PyTorch at two sizes, in-graph labels,
    TensorRT's op table: HardSwish, HardSigmoid), the fp16 graph too, and the int8 Q/DQ graph runs."""
    pytest.importorskip("onnxruntime")
    from fastdeeplab.export.quantize import quantize_onnx

    report = fastdeeplab.export_onnx(eager, tmp_path / "m.onnx", input_size=(65, 65), outputs=("out", "aux"),
                                     argmax=True)
    ops = report.op_counts
    assert ops["HardSwish"] > 0 and ops["HardSigmoid"] == 8 and "BatchNormalization" not in ops
    fp16 = fastdeeplab.export_onnx(fastdeeplab.optimize(eager, backend="torch"), tmp_path / "m16.onnx",
                                   input_size=(65, 65), precision="fp16")
    assert fp16.precision == "fp16" and min(fp16.agreement.values()) > 0.9
    int8 = quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", torch.randn(2, 3, 65, 65),
                         input_size=(65, 65), tensorrt_compatible=True)
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(int8))
    assert sum(n.op_type == "QuantizeLinear" for n in graph.graph.node) > 50
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: torch.randn(1, 3, 65, 65).numpy()})[0]
    assert out.shape == (1, 21, 65, 65)


def test_deploy_command(tmp_path):
    pytest.importorskip("onnxruntime")
    from fastdeeplab.cli import main

    repo = tmp_path / "repo"
    code = main(["deploy", "--model", "deeplabv3_mobilenet_v3_large", "--num-classes", "5", "--out", str(repo),
                 "--input-size", "65", "65", "--backends", "onnxruntime"])
    assert code in (0, None)
    assert (repo / "deeplabv3" / "config.pbtxt").is_file() and any((repo / "deeplabv3").glob("*/model.onnx"))


# --------------------------------------------------------------------------------------------------
# Triton backend: the depthwise kernel (and the SE scale in its epilogue) behind the dispatcher
# --------------------------------------------------------------------------------------------------
needs_triton = pytest.mark.skipif(__import__("importlib").util.find_spec("triton") is None,
                                  reason="triton not installed: pip install 'fastdeeplab[triton]'")


@needs_triton
@pytest.mark.parametrize("cfg, dispatch", [
    ((8, 5, 16, 8, True, "HS", 1, 2), "triton"),    # 5×5 dilated, SE in the epilogue, hardswish, residual
    ((8, 3, 16, 16, False, "RE", 2, 1), "triton"),  # 3×3 stride 2, ReLU, no SE
    ((8, 5, 16, 8, True, "RE", 1, 4), "auto"),      # auto on the CPU: checked against cuDNN's form, kept
])
@torch.no_grad()
def test_triton_depthwise_block_matches_eager(cfg, dispatch):
    from functools import partial

    from fastdeeplab.kernels._utils import interpreting
    from fastdeeplab.kernels.dispatch import Dispatcher
    from torch import nn
    from torchvision.models.mobilenetv3 import InvertedResidual, InvertedResidualConfig

    from fastdeeplab.layers_mobilenet import FusedConvBNAct, FusedInvertedResidual

    if not interpreting():
        pytest.skip("CPU tensors run the kernels only under TRITON_INTERPRET=1")
    block = randomize_bn(InvertedResidual(InvertedResidualConfig(*cfg, 1.0),
                                          partial(nn.BatchNorm2d, eps=0.001))).eval()
    x = torch.randn(1, 8, 9, 7).contiguous(memory_format=torch.channels_last)
    fused = FusedInvertedResidual(block, backend="triton")
    dispatcher = Dispatcher(dispatch, cache_path=None)
    for m in fused.modules():
        if isinstance(m, FusedConvBNAct):
            m.dispatcher, m.dispatch_name = dispatcher, "block"
    with torch.inference_mode():
        assert rel_err(fused(x), block(x)) < 1e-5
    rows = dispatcher.report().rows
    # expand (1×1 → 16, activation), depthwise, project (1×1, linear, + the residual when stride 1 and 8 → 8)
    act = "hardswish" if cfg[5] == "HS" else "relu1"
    assert [r["key"].split(" |")[0] for r in rows] == [
        f"conv1x1 s1x1 p0x0 d1x1 8->16 res0 {act}",
        rows[1]["key"].split(" |")[0],
        f"conv1x1 s1x1 p0x0 d1x1 16->{cfg[3]} res{int(cfg[6] == 1 and cfg[3] == 8)} relu0",
    ] and rows[1]["key"].startswith("dwconv"), rows
    assert all(r["choice"] == "triton" for r in rows), rows


@needs_triton
def test_optimize_triton_shares_the_dispatcher_with_depthwise_layers(eager):
    from fastdeeplab.kernels._utils import interpreting

    from fastdeeplab.layers_mobilenet import FusedConvBNAct

    if not interpreting():
        pytest.skip("backend='triton' on the CPU needs TRITON_INTERPRET=1")
    fast = fastdeeplab.optimize(eager, backend="triton", dtype=torch.float32)
    depthwise = [m for m in fast.modules() if isinstance(m, FusedConvBNAct) and m.depthwise]
    assert len(depthwise) == 15 and all(m.dispatcher is fast.dispatcher and m._packed is not None
                                        for m in depthwise)
    # the groups=1 convs: 14 expands, 15 projects and features[16] on the conv kernel; the RGB stem on cuDNN
    convs = {name: m for name, m in fast.named_modules() if isinstance(m, FusedConvBNAct) and m.groups == 1}
    on_kernel = [name for name, m in convs.items() if m._triton_conv]
    assert len(convs) == 31 and len(on_kernel) == 30, sorted(convs)
    assert [name for name in convs if name not in on_kernel] == ["backbone.0"]
    assert all(convs[name].dispatcher is fast.dispatcher and convs[name]._packed.shape[1] == convs[name].out_channels
               for name in on_kernel)
    assert convs["backbone.16"].activation == "hardswish" and convs["backbone.16"]._triton_conv


def _conv_bn(cin, cout, k, stride=1, groups=1):
    conv = torch.nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
    return conv, randomize_bn(torch.nn.Sequential(torch.nn.BatchNorm2d(cout))).eval()[0]


@needs_triton
@pytest.mark.parametrize("activation, residual", [("hardswish", False), ("none", True), ("relu", True)])
@torch.no_grad()
def test_triton_1x1_convs_launch_the_conv_kernel(monkeypatch, activation, residual):
    """groups=1 convs on the Triton backend run fastdeeplab::conv2d_act (launches counted) with the activation
    and residual in the epilogue, match the torch backend, and rebuild the packed weight after
    load_state_dict; the RGB stem (3 input channels) stays on cuDNN."""
    from fastdeeplab.kernels import ops
    from fastdeeplab.kernels._utils import interpreting
    from fastdeeplab.kernels.dispatch import Dispatcher

    from fastdeeplab.layers_mobilenet import FusedConvBNAct

    if not interpreting():
        pytest.skip("CPU tensors run the kernels only under TRITON_INTERPRET=1")
    launches = []
    eager_op = ops.EAGER["conv2d_act"]
    monkeypatch.setitem(ops.EAGER, "conv2d_act", lambda *a: launches.append(a[-1]) or eager_op(*a))
    conv, bn = _conv_bn(24, 40, 1)
    fast = FusedConvBNAct(conv, bn, activation=activation, backend="triton")
    ref = FusedConvBNAct(conv, bn, activation=activation, backend="torch")
    fast.dispatcher, fast.dispatch_name = Dispatcher("auto", cache_path=None), "features.16"
    x = torch.randn(1, 24, 5, 7).contiguous(memory_format=torch.channels_last) * 3
    res = torch.randn(1, 40, 5, 7).contiguous(memory_format=torch.channels_last) if residual else None
    assert rel_err(fast(x, res), ref(x, res)) < 1e-5
    assert rel_err(fast(x, res), ref(x, res)) < 1e-5  # the second call replays the plan
    # one launch per call: the dispatcher's first-call check (Triton against cuDNN) returns its Triton output
    assert launches == [activation, activation], launches
    (row,) = fast.dispatcher.report().rows
    assert row["choice"] == "triton" and row["key"].startswith(f"conv1x1 s1x1 p0x0 d1x1 24->40 res{int(residual)}")
    # new weights: the packed copy is rebuilt, the output follows
    other_conv, other_bn = _conv_bn(24, 40, 1)
    other = FusedConvBNAct(other_conv, other_bn, activation=activation, backend="torch")
    fast.load_state_dict(other.state_dict())
    assert rel_err(fast(x, res), other(x, res)) < 1e-5 and len(launches) == 3
    # a changed epilogue attribute is a new plan: the kernel runs the new activation, not the recorded one
    fast.activation = other.activation = "relu" if activation != "relu" else "hardswish"
    assert rel_err(fast(x, res), other(x, res)) < 1e-5 and launches[-1] == fast.activation
    # the stem: 3 input channels, 3×3 stride 2 (a K of 27 pads the MMA tile away): cuDNN, no dispatch row
    stem = FusedConvBNAct(*_conv_bn(3, 16, 3, stride=2), activation="hardswish", backend="triton")
    stem.dispatcher = Dispatcher("auto", cache_path=None)
    xs = torch.randn(1, 3, 9, 9)
    assert stem._packed is None and rel_err(stem(xs), stem._forward_plain(xs, None)) < 1e-5
    assert not stem.dispatcher.report().rows and len(launches) == 4


@needs_triton
@torch.no_grad()
def test_load_state_dict_rebuilds_every_backend_cache():
    """oneDNN's reordered weight and the depthwise kernel's packed weight follow load_state_dict too."""
    from fastdeeplab.kernels._utils import interpreting

    from fastdeeplab.layers_mobilenet import FusedConvBNAct

    conv, bn = _conv_bn(16, 16, 3, groups=16)
    other = FusedConvBNAct(*_conv_bn(16, 16, 3, groups=16), activation="hardswish")
    x = torch.randn(1, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    backends = ["torch", "triton"] if interpreting() else ["torch"]
    for backend in backends:
        m = FusedConvBNAct(conv, bn, activation="hardswish", backend=backend)
        m(x)  # builds the backend's derived weight
        m.load_state_dict(other.state_dict())
        assert rel_err(m(x), other._forward_plain(x, None)) < 1e-5, backend


def test_train_predict_configs_build_it(tmp_path):
    """A training config and the predict/eval builder know the model (multi_grid (1, 1, 1): ResNet-only)."""
    from fastdeeplab.evaluation import build_inference_model
    from fastdeeplab.training.config import TrainConfig
    from fastdeeplab.training.loop import _build_model

    cfg = TrainConfig(model="deeplabv3_mobilenet_v3_large", multi_grid=(1, 1, 1), data_root=str(tmp_path))
    model = _build_model(cfg, num_classes=4)
    assert model.classifier[-1].out_channels == 4 and model.output_stride == cfg.stages[0].output_stride
    with pytest.raises(ValueError, match=r"multi_grid: \[1, 1, 1\]"):
        _build_model(TrainConfig(model="deeplabv3_mobilenet_v3_large", data_root=str(tmp_path)), num_classes=4)
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    again = build_inference_model("deeplabv3_mobilenet_v3_large", weights=str(path), num_classes=4,
                                  output_stride=8)
    assert again.output_stride == 8 and not again.training
