"""fastdeeplab.kernels.conv_bn_relu against its float64 PyTorch twin, plus dead-tap telemetry and bad inputs.

On a machine without a GPU the kernel runs under TRITON_INTERPRET=1 (set in conftest.py) on CPU tensors, so
shapes stay tiny. Every output buffer is poisoned with NaN before the launch: an element the kernel forgets
to write shows up as an "unexpected NaN" in the report.
"""

from __future__ import annotations

import copy
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from _assert import KERNEL_DTYPES, assert_close_verbose  # noqa: E402
from fastdeeplab.kernels import conv_bn_relu, conv_bn_relu_packed, fold_bn, pack_weight  # noqa: E402
from fastdeeplab.kernels.conv import get_autotune_configs  # noqa: E402
from fastdeeplab.kernels.reference import conv_bn_relu_module_reference, conv_bn_relu_reference  # noqa: E402

from fastdeeplab.analysis import tile_live_taps, tile_tap_fraction, valid_tap_fraction  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")

DTYPES = KERNEL_DTYPES  # tolerances per dtype, against a float64 reference (see tests/_assert.py)


def _case(n, cin, h, w, cout, k=3, stride=1, dilation=1, padding=None, relu=True):
    padding = dilation * (k // 2) if padding is None else padding
    cid = f"N{n}-C{cin}-H{h}-W{w}-O{cout}-k{k}-s{stride}-d{dilation}-p{padding}-{'relu' if relu else 'linear'}"
    return pytest.param(n, cin, h, w, cout, k, stride, dilation, padding, relu, id=cid)


# Awkward on purpose: odd H and W, channel counts that are not multiples of the blocks (the interpreter config
# has BLOCK_K=16, BLOCK_N=32, 4x8 pixel tiles), every ASPP rate, maps smaller than the rate.
CASES = [
    _case(2, 24, 9, 11, 40, dilation=1),
    _case(1, 20, 11, 9, 33, dilation=2, relu=False),
    _case(2, 17, 15, 13, 24, dilation=4),
    _case(1, 12, 20, 19, 12, dilation=6, relu=False),
    _case(2, 16, 19, 20, 36, dilation=12),
    _case(1, 9, 17, 15, 40, dilation=18),
    _case(1, 24, 13, 11, 20, dilation=24, relu=False),
    _case(1, 40, 9, 7, 35, dilation=36),            # map smaller than the rate: only the centre tap is live
    _case(2, 19, 13, 17, 21, stride=2, dilation=1),
    _case(1, 16, 15, 18, 33, stride=2, dilation=2, relu=False),
    _case(2, 33, 11, 13, 17, k=1, padding=0),       # 1x1 conv
    _case(1, 10, 9, 12, 16, k=5, dilation=3, padding=4),  # 5x5, asymmetric-looking padding
    _case(1, 8, 1, 1, 8, dilation=6),               # 1x1 map
]


def _inputs(n, cin, h, w, cout, k, dtype):
    x = torch.randn(n, cin, h, w, device=DEV).to(dtype).to(memory_format=torch.channels_last)
    weight = (torch.randn(cout, cin, k, k, device=DEV) / (cin * k * k) ** 0.5).to(dtype)
    bias = 0.5 * torch.randn(cout, device=DEV)
    return x, weight, bias


def _poisoned(n, cout, oh, ow, dtype):
    return torch.full((n, cout, oh, ow), float("nan"), device=DEV, dtype=dtype).to(memory_format=torch.channels_last)


def _reference64(x, weight, bias, stride, padding, dilation, relu):
    return conv_bn_relu_reference(x.double(), weight.double(), bias.double(), stride=stride, padding=padding,
                                  dilation=dilation, relu=relu)


@pytest.mark.parametrize("dtype, allow_tf32, atol, rtol", DTYPES)
@pytest.mark.parametrize("n, cin, h, w, cout, k, stride, dilation, padding, relu", CASES)
def test_conv_bn_relu_matches_reference(n, cin, h, w, cout, k, stride, dilation, padding, relu, dtype, allow_tf32,
                                        atol, rtol):
    if dtype == torch.bfloat16 and ON_GPU and not torch.cuda.is_bf16_supported():
        pytest.skip("bfloat16 needs sm_80+")
    x, weight, bias = _inputs(n, cin, h, w, cout, k, dtype)
    expected = _reference64(x, weight, bias, stride, padding, dilation, relu)
    out = _poisoned(*expected.shape, dtype)
    y = conv_bn_relu(x, weight, bias, stride=stride, padding=padding, dilation=dilation, relu=relu,
                     allow_tf32=allow_tf32, out=out)
    assert y is out
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert_close_verbose(y, expected, atol=atol, rtol=rtol, dims="NCHW")
    if relu:
        assert (y >= 0).all()


@pytest.mark.parametrize("rate, size", [(6, 5), (12, 9), (18, 17), (24, 13), (36, 20)],
                         ids=lambda v: str(v))
def test_map_smaller_than_rate_collapses_to_centre_tap(rate, size):
    """DeepLabv3 §3.3: once the rate reaches the map size a 3x3 atrous conv *is* a 1x1 conv with the centre
    tap; the kernel executes exactly that one tap per tile (valid_tap_fraction == 1/9)."""
    x, weight, bias = _inputs(2, 12, size, size - 2, 20, 3, torch.float32)
    out = _poisoned(2, 20, size, size - 2, torch.float32)
    y, taps = conv_bn_relu_packed(x, pack_weight(weight), bias, kernel_size=3, padding=rate, dilation=rate,
                                  allow_tf32=False, out=out, return_tap_counts=True)
    expected = _reference64(x, weight, bias, 1, rate, rate, True)
    centre_only = F.relu(F.conv2d(x.double(), weight[:, :, 1:2, 1:2].double(), bias.double()))
    assert_close_verbose(expected, centre_only, atol=1e-12, rtol=1e-12, name="reference vs 1x1 centre tap")
    assert_close_verbose(y, centre_only, atol=1e-4, rtol=1e-4, dims="NCHW")
    assert (taps.counts == 1).all(), taps.counts
    assert valid_tap_fraction(rate, size) == pytest.approx(1 / 9)


def _executed_fraction(taps, oh, ow):
    """Σ_tiles executed taps × real pixels in the tile / (9 · pixels), from the kernel's own counts."""
    c = taps.counts[..., 0].double()  # all channel tiles of a pixel tile run the same taps (checked elsewhere)
    rows = torch.tensor([min(taps.block_oh, oh - i * taps.block_oh) for i in range(c.shape[1])]).double()
    cols = torch.tensor([min(taps.block_ow, ow - j * taps.block_ow) for j in range(c.shape[2])]).double()
    return float((c * rows[:, None] * cols[None, :]).sum() / (9 * oh * ow * c.shape[0]))


TAP_GEOMETRIES = [
    # (n, cin, h, w, cout, k, stride, dilation, padding)
    pytest.param(2, 8, 13, 13, 40, 3, 1, 4, 4, id="N2-H13-W13-d4"),
    pytest.param(1, 8, 17, 20, 8, 3, 1, 12, 12, id="N1-H17-W20-d12"),
    pytest.param(1, 8, 20, 19, 8, 3, 1, 18, 18, id="N1-H20-W19-d18"),
    pytest.param(1, 8, 19, 15, 8, 3, 2, 6, 6, id="N1-H19-W15-s2-d6"),
    pytest.param(1, 8, 12, 14, 8, 3, 1, 2, 9, id="N1-H12-W14-d2-p9"),  # padding beyond the taps' reach
    pytest.param(1, 8, 16, 18, 8, 5, 1, 5, 10, id="N1-H16-W18-k5-d5"),
]


@pytest.mark.parametrize("n, cin, h, w, cout, k, stride, dilation, padding", TAP_GEOMETRIES)
def test_tap_counts_match_analysis(n, cin, h, w, cout, k, stride, dilation, padding):
    """Executed taps per tile equal fastdeeplab.analysis.tile_live_taps, in every image and channel tile."""
    x, weight, bias = _inputs(n, cin, h, w, cout, k, torch.float32)
    expected_y = _reference64(x, weight, bias, stride, padding, dilation, True)
    y, taps = conv_bn_relu_packed(x, pack_weight(weight), bias, kernel_size=k, stride=stride, padding=padding,
                                  dilation=dilation, allow_tf32=False, return_tap_counts=True,
                                  out=_poisoned(*expected_y.shape, torch.float32))
    assert_close_verbose(y, expected_y, atol=1e-4, rtol=1e-4)
    predicted = torch.tensor(tile_live_taps(dilation, (h, w), (taps.block_oh, taps.block_ow), k, stride=stride,
                                            padding=padding), dtype=torch.int32)
    got = taps.counts.cpu()
    assert got.shape[:3] == (n, *predicted.shape)
    assert (got >= 0).all(), "some program never wrote its tap count"
    expected = predicted[None, :, :, None].expand_as(got)
    assert torch.equal(got, expected), f"executed taps per tile\n{got[..., 0]}\npredicted\n{predicted}"
    assert (got < k * k).any(), "each geometry here is chosen to have dead taps"


@pytest.mark.parametrize("rate, size, tile, relation", [
    pytest.param(6, 5, None, "equal", id="rate6-size5-all-dead-outer-taps"),
    pytest.param(8, 16, (8, 8), "equal", id="rate8-size16-tile8x8-aligned"),
    pytest.param(8, 16, None, "equal", id="rate8-size16-tile4x8-aligned"),
    pytest.param(4, 13, None, "greater", id="rate4-size13-coarser-tiles"),
    pytest.param(12, 20, None, "greater", id="rate12-size20"),
])
def test_executed_fraction_vs_valid_tap_fraction(rate, size, tile, relation):
    """Summed over tiles, the kernel executes at least the fraction of MACs that touch real pixels, and
    exactly that fraction when tile edges line up with the dead bands (or every outer tap is dead)."""
    config = None
    if tile is not None:
        base = get_autotune_configs()[0]
        config = type(base)({**base.kwargs, "BLOCK_OH": tile[0], "BLOCK_OW": tile[1]}, num_warps=base.num_warps,
                            num_stages=base.num_stages)
    x, weight, bias = _inputs(1, 8, size, size, 8, 3, torch.float32)
    y, taps = conv_bn_relu_packed(x, pack_weight(weight), bias, kernel_size=3, padding=rate, dilation=rate,
                                  allow_tf32=False, config=config, return_tap_counts=True,
                                  out=_poisoned(1, 8, size, size, torch.float32))
    assert_close_verbose(y, _reference64(x, weight, bias, 1, rate, rate, True), atol=1e-4, rtol=1e-4)
    measured = _executed_fraction(taps, size, size)
    assert measured == pytest.approx(tile_tap_fraction(rate, size, (taps.block_oh, taps.block_ow)), abs=1e-12)
    valid = valid_tap_fraction(rate, size)
    if relation == "equal":
        assert measured == pytest.approx(valid, abs=1e-12)
    else:
        assert measured > valid + 1e-6
    if rate >= size:
        assert measured == pytest.approx(1 / 9, abs=1e-12)


@pytest.mark.parametrize("config_index", range(len(get_autotune_configs(for_interpreter=False))),
                         ids=lambda i: f"cfg{i}")
def test_every_gpu_autotune_config_is_correct(config_index):
    """Each tiling the GPU autotuner may pick (bigger tiles, GROUP_M=8 with a partial last group)."""
    config = get_autotune_configs(for_interpreter=False)[config_index]
    x, weight, bias = _inputs(1, 24, 19, 20, 40, 3, torch.float16)
    expected = _reference64(x, weight, bias, 1, 2, 2, True)
    out = _poisoned(*expected.shape, torch.float16)
    conv_bn_relu_packed(x, pack_weight(weight), bias, kernel_size=3, padding=2, dilation=2, out=out, config=config)
    assert_close_verbose(out, expected, atol=2e-3, rtol=2e-3, dims="NCHW")


def test_random_shapes_seeded():
    """60 random tiny geometries; odd-numbered ones also run the telemetry build and check the tap counts."""
    rng = random.Random(1234)
    dtypes = [(torch.float32, 1e-4), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)]
    done = 0
    while done < 60:
        n, cin, cout = rng.randint(1, 2), rng.randint(1, 20), rng.randint(1, 20)
        h, w = rng.randint(1, 12), rng.randint(1, 12)
        k = rng.choice([1, 3, 3, 3, 5])
        stride = rng.choice([1, 1, 2])
        dh, dw = rng.randint(1, 9), rng.randint(1, 9)
        ph, pw = rng.randint(0, dh * (k // 2) + 1), rng.randint(0, dw * (k // 2) + 1)
        oh = (h + 2 * ph - dh * (k - 1) - 1) // stride + 1
        ow = (w + 2 * pw - dw * (k - 1) - 1) // stride + 1
        if oh < 1 or ow < 1:
            continue
        relu = rng.random() < 0.5
        dtype, tol = dtypes[done % 3]
        desc = f"#{done} N{n}-C{cin}-H{h}-W{w}-O{cout}-k{k}-s{stride}-d{(dh, dw)}-p{(ph, pw)}-{dtype}-relu{relu}"
        x, weight, bias = _inputs(n, cin, h, w, cout, k, dtype)
        expected = conv_bn_relu_reference(x.double(), weight.double(), bias.double(), stride=stride,
                                          padding=(ph, pw), dilation=(dh, dw), relu=relu)
        out = _poisoned(n, cout, oh, ow, dtype)
        kw = dict(stride=stride, padding=(ph, pw), dilation=(dh, dw), relu=relu, allow_tf32=False, out=out)
        if done % 2 == 0:
            conv_bn_relu(x, weight, bias, **kw)
        else:
            _, taps = conv_bn_relu_packed(x, pack_weight(weight), bias, kernel_size=k, return_tap_counts=True, **kw)
            predicted = torch.tensor(tile_live_taps((dh, dw), (h, w), (taps.block_oh, taps.block_ow), k,
                                                    stride=stride, padding=(ph, pw)), dtype=torch.int32)
            assert torch.equal(taps.counts.cpu(), predicted[None, :, :, None].expand_as(taps.counts)), desc
        assert_close_verbose(out, expected, atol=tol, rtol=tol, name=desc, dims="NCHW")
        done += 1


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
def test_nan_and_inf_propagate_like_pytorch():
    x, weight, bias = _inputs(1, 8, 9, 11, 12, 3, torch.float32)
    x[0, 3, 4, 5] = float("nan")
    x[0, 1, 0, 0] = float("inf")
    expected = _reference64(x, weight.abs(), bias, 1, 2, 2, True)
    y = conv_bn_relu(x, weight.abs(), bias, padding=2, dilation=2, allow_tf32=False,
                     out=_poisoned(1, 12, 9, 11, torch.float32))
    assert torch.isnan(expected).any() and torch.isinf(expected).any()
    assert_close_verbose(y, expected, atol=1e-4, rtol=1e-4, dims="NCHW")


@pytest.mark.parametrize("conv_bias", [True, False], ids=["conv-bias", "conv-nobias"])
def test_fold_bn_and_fused_kernel_match_the_unfused_module(conv_bias):
    conv = torch.nn.Conv2d(12, 20, 3, padding=6, dilation=6, bias=conv_bias).to(DEV)
    bn = torch.nn.BatchNorm2d(20).to(DEV).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 12, 11, 13, device=DEV).to(memory_format=torch.channels_last)
    expected = conv_bn_relu_module_reference(x.double(), copy.deepcopy(conv).double(), copy.deepcopy(bn).double())
    w, b = fold_bn(conv, bn)
    assert w.shape == conv.weight.shape and b.shape == (20,) and w.dtype == b.dtype == torch.float32
    assert_close_verbose(conv_bn_relu_reference(x.double(), w.double(), b.double(), padding=6, dilation=6),
                         expected, atol=1e-5, rtol=1e-5, name="folded reference")
    y = conv_bn_relu(x, w, b, padding=6, dilation=6, allow_tf32=False, out=_poisoned(2, 20, 11, 13, torch.float32))
    assert_close_verbose(y, expected, atol=1e-4, rtol=1e-4, dims="NCHW")


def test_contiguous_nchw_input_is_accepted():
    x, weight, bias = _inputs(1, 8, 7, 9, 8, 3, torch.float32)
    x = x.contiguous()  # NCHW
    y = conv_bn_relu(x, weight, bias, padding=1, allow_tf32=False, out=_poisoned(1, 8, 7, 9, torch.float32))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close_verbose(y, _reference64(x, weight, bias, 1, 1, 1, True), atol=1e-4, rtol=1e-4)


def _bad(**overrides):
    x = torch.randn(1, 4, 6, 6, device=DEV).to(memory_format=torch.channels_last)
    args = dict(x=x, weight=torch.randn(8, 4, 3, 3, device=DEV), bias=torch.randn(8, device=DEV), padding=1)
    args.update(overrides)
    return args


BAD_INPUTS = [
    pytest.param(_bad(x=torch.randn(4, 6, 6)), ValueError, r"\[N, C, H, W\]", id="x-rank3"),
    pytest.param(_bad(weight=torch.randn(8, 4, 3)), ValueError, r"\[Cout, Cin, KH, KW\]", id="weight-rank3"),
    pytest.param(_bad(weight=torch.randn(8, 5, 3, 3)), ValueError, "channel mismatch", id="channel-mismatch"),
    pytest.param(_bad(weight=torch.randn(8, 2, 3, 3)), ValueError, "groups=2", id="grouped"),
    pytest.param(_bad(weight=torch.randn(8, 4, 2, 2)), ValueError, "odd", id="even-kernel"),
    pytest.param(_bad(x=torch.randn(1, 4, 6, 6).double(), weight=torch.randn(8, 4, 3, 3).double()), TypeError,
                 "float64", id="dtype-float64"),
    pytest.param(_bad(x=torch.randn(1, 4, 6, 6).half()), TypeError, "does not match", id="dtype-mismatch"),
    pytest.param(_bad(weight=torch.randn(8, 4, 3, 3, device="meta")), ValueError, "meta", id="device-mismatch"),
    pytest.param(_bad(bias=torch.randn(7)), ValueError, r"bias must be \[Cout\]", id="bias-shape"),
    pytest.param(_bad(stride=0), ValueError, "stride", id="stride-0"),
    pytest.param(_bad(padding=-1), ValueError, "padding", id="padding-negative"),
    pytest.param(_bad(dilation=(1, 0)), ValueError, "dilation", id="dilation-0"),
    pytest.param(_bad(padding=0, dilation=4), ValueError, "empty", id="output-empty"),
    pytest.param(_bad(x=[[1.0]]), TypeError, "torch.Tensor", id="x-not-tensor"),
    pytest.param(_bad(out=torch.empty(1, 8, 5, 5)), ValueError, "out has shape", id="out-shape"),
    pytest.param(_bad(stride=1.5), TypeError, "stride", id="stride-float"),
]


@pytest.mark.parametrize("kwargs, exc, match", BAD_INPUTS)
def test_bad_inputs_are_rejected(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        conv_bn_relu(**kwargs)


def test_packed_weight_shape_is_checked():
    x = torch.randn(1, 4, 6, 6, device=DEV).to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"\[KH\*KW\*Cin, Cout\]"):
        conv_bn_relu_packed(x, pack_weight(torch.randn(8, 4, 3, 3, device=DEV)), kernel_size=1)


def test_package_imports_without_triton():
    """`import fastdeeplab.kernels` and the references work without triton; kernels name the extra."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import fastdeeplab.kernels as K\n"
        "from fastdeeplab.kernels.reference import fold_bn, conv_bn_relu_reference, aspp_project_reference\n"
        "from fastdeeplab.kernels import conv_bn_relu, aspp_project\n"
        "assert not K.triton_available()\n"
        "for f in (conv_bn_relu, aspp_project):\n"
        "    try:\n"
        "        f()\n"
        "    except ImportError as e:\n"
        "        assert \"pip install 'fastdeeplab[triton]'\" in str(e), e\n"
        "    else:\n"
        "        raise AssertionError('no ImportError')\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_repeated_calls_replay_a_checked_launch_with_new_data():
    """The second call of a signature replays the first call's checked launch (nothing rebuilt): new data,
    bias or no bias, residual or not, NCHW input; every result still equals the reference."""
    from fastdeeplab.kernels import conv as conv_module

    conv_module._LAUNCH_PLANS.clear()
    cin, cout = 12, 20
    for trial in range(3):
        x = torch.randn(2, cin, 7, 9, device=DEV)
        if trial != 2:
            x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(cout, cin, 3, 3, device=DEV)
        b = torch.randn(cout, device=DEV)
        r = torch.randn(2, cout, 7, 9, device=DEV).contiguous(memory_format=torch.channels_last)
        for bias, residual in ((b, None), (None, r), (b.double().float(), r)):
            got = conv_bn_relu_packed(x, pack_weight(w), bias, kernel_size=3, padding=2, dilation=2,
                                      residual=residual, allow_tf32=False)
            want = conv_bn_relu_reference(x.double(), w.double(), None if bias is None else bias.double(),
                                          padding=2, dilation=2, residual=None if residual is None else residual.double())
            assert_close_verbose(got, want, atol=1e-4, rtol=1e-4, name=f"trial {trial}")
    # one plan per signature: 3 (bias, residual) kinds x 2 layouts (channels-last, NCHW) of x
    assert len(conv_module._LAUNCH_PLANS) == 6, len(conv_module._LAUNCH_PLANS)
    with pytest.raises(ValueError, match="residual must be the output's shape"):  # still checked: a new signature
        conv_bn_relu_packed(x, pack_weight(w), b, kernel_size=3, padding=2, dilation=2, residual=r[:, :, :5])
