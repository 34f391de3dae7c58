"""The foundation: fastdeeplab's DeepLabV3 is a drop-in replacement for torchvision's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _models import randomize_bn, rel_err
from torch import nn
from torchvision.models import resnet50, resnet101
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation import deeplabv3_resnet50 as tv_deeplabv3_resnet50
from torchvision.models.segmentation import deeplabv3_resnet101 as tv_deeplabv3_resnet101
from torchvision.models.segmentation.deeplabv3 import DeepLabHead as TvDeepLabHead
from torchvision.models.segmentation.deeplabv3 import DeepLabV3 as TvDeepLabV3

import fastdeeplab
from fastdeeplab.analysis import live_offsets, valid_tap_fraction, valid_weight_distribution
from fastdeeplab.model import atrous_plan

TV_BUILDERS = {50: tv_deeplabv3_resnet50, 101: tv_deeplabv3_resnet101}
OURS = {50: fastdeeplab.deeplabv3_resnet50, 101: fastdeeplab.deeplabv3_resnet101}


@pytest.mark.parametrize(
    "depth, aux, classes, size",
    [
        pytest.param(50, True, 21, (513, 513), id="r50-aux-21c-513"),
        pytest.param(50, False, 19, (97, 131), id="r50-noaux-19c-97x131"),
        pytest.param(101, True, 19, (97, 131), id="r101-aux-19c-97x131"),
        pytest.param(101, False, 21, (65, 81), id="r101-noaux-21c-65x81"),
    ],
)
@torch.no_grad()
def test_same_outputs_as_torchvision(depth, aux, classes, size):
    tv = TV_BUILDERS[depth](weights=None, weights_backbone=None, num_classes=classes, aux_loss=aux)
    randomize_bn(tv).eval()
    ours = OURS[depth](num_classes=classes, aux_loss=aux).eval()
    ours.load_state_dict(tv.state_dict(), strict=True)  # same names: a torchvision checkpoint loads strictly
    x = torch.randn(1, 3, *size)
    expected, got = tv(x), ours(x)
    assert set(got) == set(expected) == ({"out", "aux"} if aux else {"out"})
    for key in expected:
        assert got[key].shape == expected[key].shape == (1, classes, *size)
        assert rel_err(got[key], expected[key]) < 1e-4, key


@torch.no_grad()
def test_from_torchvision_converts_with_same_outputs():
    tv = randomize_bn(tv_deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=5,
                                            aux_loss=True)).eval()
    ours = fastdeeplab.from_torchvision(tv)
    assert isinstance(ours, fastdeeplab.DeepLabV3) and not ours.training
    assert ours.output_stride == 8 and ours.aspp.rates == (12, 24, 36)
    x = torch.randn(2, 3, 75, 99)
    for key in ("out", "aux"):
        assert rel_err(ours(x)[key], tv(x)[key]) < 1e-4
    with pytest.raises(TypeError, match="torchvision DeepLabV3"):
        fastdeeplab.from_torchvision(nn.Conv2d(3, 3, 1))


def torchvision_os16(depth: int = 50, classes: int = 21) -> TvDeepLabV3:
    """A genuine torchvision DeepLabV3 rebuilt at output stride 16 with ASPP rates (6, 12, 18)."""
    builder = resnet50 if depth == 50 else resnet101
    backbone = IntermediateLayerGetter(builder(weights=None, replace_stride_with_dilation=[False, False, True]),
                                       {"layer4": "out"})
    return TvDeepLabV3(backbone, TvDeepLabHead(2048, classes, atrous_rates=(6, 12, 18)), None)


@torch.no_grad()
def test_output_stride_16_matches_torchvision_rebuilt_at_os16():
    tv = randomize_bn(torchvision_os16()).eval()
    ours = fastdeeplab.deeplabv3_resnet50(output_stride=16).eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    assert ours.aspp.rates == (6, 12, 18)
    x = torch.randn(1, 3, 129, 97)
    assert rel_err(ours(x)["out"], tv(x)["out"]) < 1e-4
    converted = fastdeeplab.from_torchvision(tv)
    assert converted.output_stride == 16 and converted.aspp.rates == (6, 12, 18)


@torch.no_grad()
def test_set_output_stride_round_trip_is_exact():
    model = randomize_bn(fastdeeplab.deeplabv3_resnet50(num_classes=7, aux_loss=True)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 97, 97)
    at8 = model(x)["out"]
    at16 = model.set_output_stride(16)(x)["out"]
    assert not torch.equal(at8, at16)  # the stride really changed
    assert model.aspp.rates == (6, 12, 18)
    at32 = model.set_output_stride(32)(x)["out"]
    assert model.aspp.rates == (3, 6, 9) and at32.shape == at8.shape
    assert torch.equal(model.set_output_stride(8)(x)["out"], at8)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "parameters or buffers changed"


def test_output_stride_sets_strides_and_dilations_like_the_paper():
    model = fastdeeplab.deeplabv3_resnet50(output_stride=8)
    layer3, layer4 = model.backbone.layer3, model.backbone.layer4
    assert layer3[0].conv2.stride == (1, 1) and layer3[0].downsample[0].stride == (1, 1)
    assert [u.conv2.dilation[0] for u in layer3] == [1, 2, 2, 2, 2, 2]  # torchvision's convention
    assert [u.conv2.dilation[0] for u in layer4] == [2, 4, 4]
    model.set_output_stride(32)
    assert all(u.conv2.dilation == (1, 1) for u in layer4) and layer4[0].conv2.stride == (2, 2)
    assert layer4[0].downsample[0].stride == (2, 2)


@pytest.mark.parametrize("os_, grid, expected", [
    pytest.param(16, (1, 2, 4), (2, 4, 8), id="os16-grid124"),  # the paper's example, §3.2
    pytest.param(8, (1, 2, 4), (4, 8, 16), id="os8-grid124"),
    pytest.param(16, (2, 2, 2), (4, 4, 4), id="os16-grid222"),
    pytest.param(32, (1, 2, 1), (1, 2, 1), id="os32-grid121"),
])
def test_multi_grid_sets_block4_dilations(os_, grid, expected):
    model = fastdeeplab.deeplabv3_resnet50(output_stride=os_, multi_grid=grid)
    assert tuple(u.conv2.dilation[0] for u in model.backbone.layer4) == expected
    assert all(u.conv2.padding == u.conv2.dilation for u in model.backbone.layer4)
    model.set_output_stride(8 if os_ != 8 else 16)  # multi-grid survives a stride switch
    rate = 4 if os_ != 8 else 2
    assert tuple(u.conv2.dilation[0] for u in model.backbone.layer4) == tuple(rate * g for g in grid)


def test_multi_grid_must_match_units():
    with pytest.raises(ValueError, match="multi_grid"):
        fastdeeplab.deeplabv3_resnet50(multi_grid=(1, 2))


def test_train_mode_forward_and_backward():
    model = fastdeeplab.deeplabv3_resnet50(num_classes=4, aux_loss=True, output_stride=16).train()
    x = torch.randn(2, 3, 65, 65)
    target = torch.randint(0, 4, (2, 65, 65))
    out = model(x)
    loss = F.cross_entropy(out["out"], target) + 0.5 * F.cross_entropy(out["aux"], target)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@torch.no_grad()
def test_cascaded_model_runs_at_os16_and_os8():
    model = fastdeeplab.deeplabv3_cascade_resnet50(num_classes=5).eval()
    assert model.aspp is None and model.multi_grid == (1, 2, 1)
    names = model.backbone.stage_names
    assert names == [f"layer{i}" for i in range(1, 8)]
    # rates double block by block: block4..7 at OS16 have unit rates 2, 4, 8, 16 times (1, 2, 1)
    dil = {n: tuple(u.conv2.dilation[0] for u in model.backbone[n]) for n in names[3:]}
    assert dil == {"layer4": (2, 4, 2), "layer5": (4, 8, 4), "layer6": (8, 16, 8), "layer7": (16, 32, 16)}
    x = torch.randn(1, 3, 65, 65)
    assert model(x)["out"].shape == (1, 5, 65, 65)
    model.set_output_stride(8)
    assert tuple(u.conv2.dilation[0] for u in model.backbone.layer7) == (32, 64, 32)
    assert model(x)["out"].shape == (1, 5, 65, 65)
    assert "deeplabv3_cascade_resnet101" in fastdeeplab.list_models()


def test_paper_head_structure():
    model = fastdeeplab.deeplabv3_resnet50(head="paper", num_classes=3)
    head = model.classifier
    assert len(head) == 2 and isinstance(head[1], nn.Conv2d) and head[1].kernel_size == (1, 1)
    project = head[0].project
    assert [type(m) for m in project] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]  # no dropout, no 3×3
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in list(head)[1:])
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 33, 33))["out"].shape == (1, 3, 33, 33)


def test_registry():
    assert fastdeeplab.list_models() == sorted(fastdeeplab.list_models())
    model = fastdeeplab.get_model("deeplabv3_resnet50", num_classes=3, output_stride=16)
    assert model.output_stride == 16
    with pytest.raises(ValueError, match="unknown model"):
        fastdeeplab.get_model("deeplabv3_vgg")
    with pytest.raises(ValueError, match="already registered"):
        fastdeeplab.hub.register_model(fastdeeplab.deeplabv3_resnet50)


def test_atrous_plan_rates():
    assert atrous_plan(16, (3, 4, 6, 3)).aspp_rates == (6, 12, 18)
    assert atrous_plan(8, (3, 4, 6, 3)).aspp_rates == (12, 24, 36)
    assert atrous_plan(32, (3, 4, 6, 3)).aspp_rates == (3, 6, 9)


# ------------------------------------------------------------------------------------------------
# The boundary effect (paper Figure 3)
# ------------------------------------------------------------------------------------------------
def direct_valid_tap_count(rate: int, size: int, k: int) -> tuple[float, dict[int, float]]:
    """Count valid taps by brute force: a conv of a ones-image with a ones-filter, zero padded."""
    ones = torch.ones(1, 1, size, size, dtype=torch.float64)
    counts = F.conv2d(ones, torch.ones(1, 1, k, k, dtype=torch.float64), padding=rate * (k // 2), dilation=rate)
    values, freq = counts.round().long().unique(return_counts=True)
    dist = {int(v): int(f) / size**2 for v, f in zip(values, freq)}
    return counts.sum().item() / (size * size * k * k), dist


@pytest.mark.parametrize("rate, size, k", [(1, 65, 3), (6, 33, 3), (12, 65, 3), (36, 65, 3), (24, 33, 3),
                                           (64, 65, 3), (100, 33, 3), (5, 17, 5), (3, 7, 1)])
def test_valid_tap_fraction_matches_direct_count(rate, size, k):
    fraction, dist = direct_valid_tap_count(rate, size, k)
    assert valid_tap_fraction(rate, size, k) == pytest.approx(fraction, abs=1e-12)
    got = valid_weight_distribution(rate, size, k)
    assert got.keys() == dist.keys() and all(got[c] == pytest.approx(dist[c]) for c in dist)


def test_valid_tap_fraction_limits_and_errors():
    assert valid_tap_fraction(1, 65) == pytest.approx((1 - 2 / (3 * 65)) ** 2)
    assert valid_tap_fraction(65, 65) == pytest.approx(1 / 9)  # only the centre tap survives
    assert live_offsets(100, 33) == [1]
    with pytest.raises(ValueError, match="rate"):
        valid_tap_fraction(0, 33)
    with pytest.raises(ValueError, match="odd"):
        valid_tap_fraction(2, 33, kernel_size=4)
