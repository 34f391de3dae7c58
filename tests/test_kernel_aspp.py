"""fastdeeplab.kernels.aspp_project against the literal cat + broadcast + 1x1 conv twin, in float64.

Runs under TRITON_INTERPRET=1 on CPU when there is no GPU (conftest.py). Outputs are NaN-poisoned first.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from _assert import KERNEL_DTYPES, assert_close_verbose  # noqa: E402
from fastdeeplab.kernels import aspp_project, aspp_project_packed, pack_aspp_weight  # noqa: E402
from fastdeeplab.kernels.aspp import get_autotune_configs  # noqa: E402
from fastdeeplab.kernels.reference import aspp_project_reference  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")

DTYPES = KERNEL_DTYPES

# Interpreter config: BLOCK_M=32 pixels, BLOCK_N=32, BLOCK_K=16. H*W, Cb and Cout are chosen off those.
CASES = [
    pytest.param(2, 24, 7, 9, 40, True, id="N2-Cb24-H7-W9-O40-relu"),
    pytest.param(3, 20, 5, 3, 33, False, id="N3-Cb20-H5-W3-O33-linear"),
    pytest.param(1, 33, 11, 13, 17, True, id="N1-Cb33-H11-W13-O17-relu"),
    pytest.param(2, 8, 1, 1, 8, True, id="N2-Cb8-H1-W1-O8-relu"),
]


def _inputs(n, cb, h, w, cout, dtype):
    branches = [torch.randn(n, cb, h, w, device=DEV).to(dtype).to(memory_format=torch.channels_last)
                for _ in range(4)]
    pooled = torch.randn(n, cb, device=DEV).to(dtype)  # a different pooled vector for every image
    weight = (torch.randn(cout, 5 * cb, 1, 1, device=DEV) / (5 * cb) ** 0.5).to(dtype)
    bias = 0.5 * torch.randn(cout, device=DEV)
    return branches, pooled, weight, bias


def _reference64(branches, pooled, weight, bias, relu):
    return aspp_project_reference([b.double() for b in branches], pooled.double(), weight.double(), bias.double(),
                                  relu=relu)


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), device=DEV, dtype=dtype).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype, allow_tf32, atol, rtol", DTYPES)
@pytest.mark.parametrize("n, cb, h, w, cout, relu", CASES)
def test_aspp_project_matches_reference(n, cb, h, w, cout, relu, dtype, allow_tf32, atol, rtol):
    if dtype == torch.bfloat16 and ON_GPU and not torch.cuda.is_bf16_supported():
        pytest.skip("bfloat16 needs sm_80+")
    branches, pooled, weight, bias = _inputs(n, cb, h, w, cout, dtype)
    expected = _reference64(branches, pooled, weight, bias, relu)
    out = _poisoned(expected.shape, dtype)
    y = aspp_project(branches, pooled, weight, bias, relu=relu, allow_tf32=allow_tf32, out=out)
    assert y is out and y.dtype == dtype
    assert_close_verbose(y, expected, atol=atol, rtol=rtol, dims="NCHW")


def test_pooled_branch_is_per_image():
    """Same spatial branches in every image, different pooled vectors: images must differ by exactly the
    per-image bias, and swapping the pooled rows swaps the outputs."""
    branches, pooled, weight, bias = _inputs(1, 16, 6, 7, 24, torch.float32)
    branches = [b.expand(3, -1, -1, -1).contiguous(memory_format=torch.channels_last) for b in branches]
    pooled = torch.randn(3, 16, device=DEV)
    y = aspp_project_packed(branches, pooled, pack_aspp_weight(weight), bias, relu=False, allow_tf32=False,
                            out=_poisoned((3, 24, 6, 7), torch.float32))
    y_swapped = aspp_project_packed(branches, pooled.flip(0), pack_aspp_weight(weight), bias, relu=False,
                                    allow_tf32=False, out=_poisoned((3, 24, 6, 7), torch.float32))
    assert_close_verbose(y, _reference64(branches, pooled, weight, bias, False), atol=1e-4, rtol=1e-4)
    assert_close_verbose(y_swapped, y.flip(0), atol=1e-5, rtol=1e-5, name="swapped pooled rows")
    w_pool = weight[:, 64:, 0, 0].double()
    delta = (pooled[1] - pooled[0]).double() @ w_pool.T  # [Cout]
    assert_close_verbose(y[1] - y[0], delta[:, None, None].expand(24, 6, 7), atol=1e-4, rtol=1e-4,
                         name="image 1 - image 0")
    assert delta.abs().max() > 0.1


@pytest.mark.parametrize("config_index", range(len(get_autotune_configs(for_interpreter=False))),
                         ids=lambda i: f"cfg{i}")
def test_every_gpu_autotune_config_is_correct(config_index):
    config = get_autotune_configs(for_interpreter=False)[config_index]
    branches, pooled, weight, bias = _inputs(2, 40, 11, 13, 40, torch.float16)
    expected = _reference64(branches, pooled, weight, bias, True)
    out = _poisoned(expected.shape, torch.float16)
    aspp_project_packed(branches, pooled, pack_aspp_weight(weight), bias, out=out, config=config)
    assert_close_verbose(out, expected, atol=2e-3, rtol=2e-3, dims="NCHW")


def test_no_bias_and_nchw_branches():
    branches, pooled, weight, _ = _inputs(2, 12, 5, 6, 20, torch.float32)
    branches = [b.contiguous() for b in branches]  # NCHW: copied to channels-last by the launcher
    y = aspp_project(tuple(branches), pooled, weight, None, allow_tf32=False,
                     out=_poisoned((2, 20, 5, 6), torch.float32))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close_verbose(y, aspp_project_reference([b.double() for b in branches], pooled.double(),
                                                   weight.double(), None), atol=1e-4, rtol=1e-4)


def _bad(**overrides):
    branches, pooled, weight, bias = _inputs(1, 4, 3, 3, 8, torch.float32)
    args = dict(branches=branches, pooled=pooled, weight=weight, bias=bias)
    args.update(overrides)
    return args


_B = [torch.randn(1, 4, 3, 3) for _ in range(4)]

BAD_INPUTS = [
    pytest.param(_bad(branches=_B[:3]), ValueError, "4 tensors", id="three-branches"),
    pytest.param(_bad(branches=[*_B[:3], torch.randn(1, 4, 3, 4)]), ValueError, r"branches\[3\] has shape",
                 id="branch-shape"),
    pytest.param(_bad(branches=[*_B[:3], torch.randn(1, 4, 3, 3).half()]), TypeError, "dtype", id="branch-dtype"),
    pytest.param(_bad(branches=[torch.randn(4, 3, 3)] * 4), ValueError, r"\[N, Cb, H, W\]", id="branch-rank"),
    pytest.param(_bad(pooled=torch.randn(1, 4, 1, 1)), ValueError, r"pooled must be \[N, Cb\]", id="pooled-4d"),
    pytest.param(_bad(pooled=torch.randn(2, 4)), ValueError, r"pooled must be", id="pooled-batch"),
    pytest.param(_bad(weight=torch.randn(8, 16, 1, 1)), ValueError, "multiple of 5", id="weight-not-5-branches"),
    pytest.param(_bad(weight=torch.randn(8, 25, 1, 1)), ValueError, r"\[5\*Cb, Cout\]", id="weight-wrong-cb"),
    pytest.param(_bad(weight=torch.randn(8, 20, 3, 3)), ValueError, "1x1", id="weight-3x3"),
    pytest.param(_bad(weight=torch.randn(8, 20, 1, 1).half()), TypeError, "does not match", id="weight-dtype"),
    pytest.param(_bad(bias=torch.randn(9)), ValueError, r"bias must be \[Cout\]", id="bias-shape"),
    pytest.param(_bad(weight=torch.randn(8, 20, 1, 1, device="meta")), ValueError, "meta", id="device-mismatch"),
]


@pytest.mark.parametrize("kwargs, exc, match", BAD_INPUTS)
def test_bad_inputs_are_rejected(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        aspp_project(**kwargs)
