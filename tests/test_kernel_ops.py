"""The new kernel variants against their float64 twins: the residual epilogue, raster (GEMM-shaped) M tiles,
the grouped ASPP launch; the executed-work model against the kernel's own tap counts; the custom ops.

Runs under TRITON_INTERPRET=1 on CPU when there is no GPU (conftest.py), so maps stay small: DeepLab's
33×33 (OS16) map with rates 6-36 at a few channels, and 65×65 scaled down to 17×19/21×23. Every output buffer
is NaN-poisoned first: an element a kernel forgets to write is reported as an "unexpected NaN".
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from _assert import KERNEL_DTYPES, assert_close_verbose  # noqa: E402
from fastdeeplab.kernels import ops  # noqa: E402
from fastdeeplab.kernels.aspp import (  # noqa: E402
    aspp_branches_packed,
    pack_aspp_branch_weights,
    prune_branches_by_executed_work,
)
from fastdeeplab.kernels.conv import (  # noqa: E402
    conv_bn_relu,
    conv_bn_relu_packed,
    get_autotune_configs,
    get_interpreter_config,
    pack_weight,
    prune_by_executed_work,
)
from fastdeeplab.kernels.reference import aspp_branches_reference, conv_bn_relu_reference  # noqa: E402
from fastdeeplab.kernels.work import ConvGeometry, Tiling, executed_macs, tile_taps  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")
SPATIAL, RASTER = get_interpreter_config(raster=False), get_interpreter_config(raster=True)
TILINGS = [pytest.param(SPATIAL, id="spatial4x8"), pytest.param(RASTER, id="raster32")]


def _cl(t):
    return t.to(DEV).contiguous(memory_format=torch.channels_last)


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), device=DEV, dtype=dtype).contiguous(memory_format=torch.channels_last)


def _conv_inputs(n, cin, h, w, cout, k, dtype, oh=None, ow=None):
    x = _cl(torch.randn(n, cin, h, w).to(dtype))
    weight = (torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5).to(dtype).to(DEV)
    bias = (0.5 * torch.randn(cout)).to(DEV)
    residual = _cl(torch.randn(n, cout, oh or h, ow or w).to(dtype))
    return x, weight, bias, residual


def _skip_bf16(dtype):
    if dtype == torch.bfloat16 and ON_GPU and not torch.cuda.is_bf16_supported():
        pytest.skip("bfloat16 needs sm_80+")


# ---------------------------------------------------------------------------------------------------
# Residual epilogue: relu(conv + bias + residual), spatial and raster tiles
# ---------------------------------------------------------------------------------------------------
RESIDUAL_CASES = [
    pytest.param(2, 20, 9, 11, 24, 3, 1, 2, True, id="N2-C20-H9-W11-O24-k3-d2-relu"),
    pytest.param(1, 16, 13, 7, 40, 1, 1, 1, True, id="N1-C16-H13-W7-O40-k1-relu"),
    pytest.param(2, 12, 11, 9, 17, 1, 2, 1, False, id="N2-C12-H11-W9-O17-k1-s2-linear"),
    pytest.param(1, 9, 15, 13, 33, 3, 1, 6, True, id="N1-C9-H15-W13-O33-k3-d6-relu"),
]


@pytest.mark.parametrize("config", TILINGS)
@pytest.mark.parametrize("dtype, allow_tf32, atol, rtol", KERNEL_DTYPES)
@pytest.mark.parametrize("n, cin, h, w, cout, k, stride, dilation, relu", RESIDUAL_CASES)
def test_residual_epilogue_matches_reference(n, cin, h, w, cout, k, stride, dilation, relu, dtype, allow_tf32, atol,
                                             rtol, config):
    _skip_bf16(dtype)
    pad = dilation * (k // 2)
    oh, ow = (h + 2 * pad - dilation * (k - 1) - 1) // stride + 1, (w + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    x, weight, bias, residual = _conv_inputs(n, cin, h, w, cout, k, dtype, oh, ow)
    expected = conv_bn_relu_reference(x.double(), weight.double(), bias.double(), stride=stride, padding=pad,
                                      dilation=dilation, relu=relu, residual=residual.double())
    out = _poisoned(expected.shape, dtype)
    y = conv_bn_relu_packed(x, pack_weight(weight), bias, kernel_size=k, stride=stride, padding=pad,
                            dilation=dilation, relu=relu, residual=residual, allow_tf32=allow_tf32, out=out,
                            config=config)
    assert y is out
    assert_close_verbose(y, expected, atol=atol, rtol=rtol, dims="NCHW")
    if not relu:
        assert (y < 0).any(), "a linear epilogue keeps negative sums"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("config", TILINGS)
def test_residual_nan_and_inf_propagate_like_pytorch(config):
    x, weight, bias, residual = _conv_inputs(2, 8, 7, 9, 12, 3, torch.float32)
    residual[0, 3, 2, 4] = float("nan")
    residual[1, 0, 6, 8] = float("-inf")  # ReLU turns -inf into 0, like torch.relu
    residual[1, 5, 0, 0] = float("inf")
    x[1, 2, 3, 3] = float("nan")  # spreads to every output that reads it
    expected = conv_bn_relu_reference(x.double(), weight.double(), bias.double(), padding=1,
                                      residual=residual.double())
    y = conv_bn_relu(x, weight, bias, padding=1, residual=residual, allow_tf32=False,
                     out=_poisoned(expected.shape, torch.float32))
    assert torch.isnan(expected).any() and torch.isinf(expected).any() and (expected == 0).any()
    del config  # conv_bn_relu autotunes: the interpreter config; the raster build is covered below
    assert_close_verbose(y, expected, atol=1e-4, rtol=1e-4, dims="NCHW")
    y2 = conv_bn_relu_packed(x, pack_weight(weight), bias, kernel_size=3, padding=1, residual=residual,
                             allow_tf32=False, out=_poisoned(expected.shape, torch.float32), config=RASTER)
    assert_close_verbose(y2, expected, atol=1e-4, rtol=1e-4, dims="NCHW", name="raster")


def test_residual_is_checked():
    x, weight, bias, residual = _conv_inputs(1, 4, 6, 6, 8, 3, torch.float32)
    with pytest.raises(ValueError, match=r"residual must be the output's shape"):
        conv_bn_relu(x, weight, bias, padding=1, residual=residual[:, :4])
    with pytest.raises(TypeError, match="residual has dtype"):
        conv_bn_relu(x, weight, bias, padding=1, residual=residual.double())


# ---------------------------------------------------------------------------------------------------
# Raster M tiles (small maps at batch 1 and the 1×1 GEMM tiling)
# ---------------------------------------------------------------------------------------------------
SMALL_MAPS = [  # (n, cin, h, w, cout, dilation): DeepLab's 33×33 at every ASPP rate, odd sizes, batch > 1
    pytest.param(1, 8, 33, 33, 8, 6, id="N1-H33-W33-d6"),
    pytest.param(1, 8, 33, 33, 8, 12, id="N1-H33-W33-d12"),
    pytest.param(1, 8, 33, 33, 8, 18, id="N1-H33-W33-d18"),
    pytest.param(1, 8, 33, 33, 8, 36, id="N1-H33-W33-d36"),
    pytest.param(2, 8, 17, 19, 12, 24, id="N2-H17-W19-d24"),
    pytest.param(3, 5, 9, 7, 9, 1, id="N3-H9-W7-d1-images-straddle-tiles"),
]


@pytest.mark.parametrize("n, cin, h, w, cout, dilation", SMALL_MAPS)
def test_raster_tiles_match_reference_and_work_model(n, cin, h, w, cout, dilation):
    """Raster tiles give the reference's result, and execute exactly the taps kernels/work.py predicts."""
    x, weight, bias, _ = _conv_inputs(n, cin, h, w, cout, 3, torch.float32)
    expected = conv_bn_relu_reference(x.double(), weight.double(), bias.double(), padding=dilation, dilation=dilation)
    y, taps = conv_bn_relu_packed(x, pack_weight(weight), bias, kernel_size=3, padding=dilation, dilation=dilation,
                                  allow_tf32=False, out=_poisoned(expected.shape, torch.float32), config=RASTER,
                                  return_tap_counts=True)
    assert_close_verbose(y, expected, atol=1e-4, rtol=1e-4, dims="NCHW")
    assert taps.raster and taps.counts.dim() == 2
    predicted = tile_taps(ConvGeometry(n=n, cin=cin, h=h, w=w, cout=cout, k=3, dilation=dilation),
                          Tiling(block_m=32, block_n=32, block_k=16, raster=True))
    got = taps.counts.cpu()
    assert torch.equal(got, torch.tensor(predicted, dtype=torch.int32)[:, None].expand_as(got)), (got, predicted)
    if dilation >= max(h, w):
        assert (got == 1).all(), "rate >= map size: the centre tap alone"


@pytest.mark.parametrize("dtype, allow_tf32, atol, rtol", KERNEL_DTYPES)
@pytest.mark.parametrize("n, h, w, stride", [(1, 9, 13, 1), (3, 7, 5, 1), (2, 11, 9, 2)],
                         ids=["N1-H9-W13", "N3-H7-W5", "N2-H11-W9-s2"])
def test_1x1_gemm_tiling(n, h, w, stride, dtype, allow_tf32, atol, rtol):
    """1×1 convs autotune over raster tiles only: a plain GEMM over N·OH·OW rows."""
    _skip_bf16(dtype)
    x, weight, bias, _ = _conv_inputs(n, 24, h, w, 40, 1, dtype)
    expected = conv_bn_relu_reference(x.double(), weight.double(), bias.double(), stride=stride)
    y = conv_bn_relu(x, weight, bias, stride=stride, allow_tf32=allow_tf32, out=_poisoned(expected.shape, dtype))
    assert_close_verbose(y, expected, atol=atol, rtol=rtol, dims="NCHW")
    from fastdeeplab.kernels.conv import _conv1x1_autotuned

    assert all(c.kwargs["RASTER"] for c in _conv1x1_autotuned.configs)


def test_prune_keeps_the_leanest_tilings():
    """At 33×33 batch 1 rate 6, 8×16 spatial tiles pad to 40×48 (1.76× the rows): pruned; raster tiles stay."""
    configs = get_autotune_configs(for_interpreter=False)
    args = dict(N=1, C_IN=256, H=33, W=33, C_OUT=256, KH=3, KW=3, STRIDE_H=1, STRIDE_W=1, DIL_H=6, DIL_W=6,
                PAD_H=6, PAD_W=6)
    kept = prune_by_executed_work(configs, args)
    assert kept and all(c.kwargs["RASTER"] for c in kept)
    g = ConvGeometry(n=1, cin=256, h=33, w=33, cout=256, k=3, dilation=6)
    assert executed_macs(g, Tiling(64, 128, 32, block_ow=8, raster=False)) / g.dense_macs == pytest.approx(1.28, abs=0.01)
    # rate 36 on a 65×65 map (OS8): spatial tiles skip far more dead taps than raster rows do, and are kept
    args.update(H=65, W=65, DIL_H=36, DIL_W=36, PAD_H=36, PAD_W=36)
    assert any(not c.kwargs["RASTER"] for c in prune_by_executed_work(configs, args))
    branches = dict(N=1, C_IN=2048, H=33, W=33, CB=256, RATE1=6, RATE2=12, RATE3=18)
    assert prune_branches_by_executed_work(configs, branches)


# ---------------------------------------------------------------------------------------------------
# The grouped ASPP launch
# ---------------------------------------------------------------------------------------------------
def _branch_inputs(n, cin, h, w, cb, dtype):
    x = _cl(torch.randn(n, cin, h, w).to(dtype))
    weights = [(torch.randn(cb, cin, 1, 1) / cin ** 0.5).to(dtype).to(DEV)]
    weights += [(torch.randn(cb, cin, 3, 3) / (9 * cin) ** 0.5).to(dtype).to(DEV) for _ in range(3)]
    biases = [(0.5 * torch.randn(cb)).to(DEV) for _ in range(4)]
    return x, weights, biases


GROUPED_CASES = [
    pytest.param(1, 8, 33, 33, 8, (6, 12, 18), id="N1-H33-W33-rates6-12-18"),
    pytest.param(1, 6, 33, 33, 8, (12, 24, 36), id="N1-H33-W33-rates12-24-36"),
    pytest.param(2, 12, 13, 11, 20, (2, 5, 12), id="N2-H13-W11-rates2-5-12"),
]


@pytest.mark.parametrize("config", TILINGS)
@pytest.mark.parametrize("n, cin, h, w, cb, rates", GROUPED_CASES)
def test_grouped_aspp_branches_fp32(n, cin, h, w, cb, rates, config):
    x, weights, biases = _branch_inputs(n, cin, h, w, cb, torch.float32)
    expected = aspp_branches_reference(x.double(), [wt.double() for wt in weights], [b.double() for b in biases],
                                       rates)
    out = _poisoned((4 * n, cb, h, w), torch.float32)
    y = aspp_branches_packed(x, pack_aspp_branch_weights(weights), torch.cat(biases), rates, allow_tf32=False,
                             out=out, config=config)
    assert y is out
    for i, (got, exp) in enumerate(zip(y.chunk(4), expected)):
        assert_close_verbose(got, exp, atol=1e-4, rtol=1e-4, dims="NCHW", name=f"branch {i}")


@pytest.mark.parametrize("dtype, allow_tf32, atol, rtol", KERNEL_DTYPES[1:])
def test_grouped_aspp_branches_low_precision(dtype, allow_tf32, atol, rtol):
    _skip_bf16(dtype)
    x, weights, biases = _branch_inputs(2, 16, 9, 11, 24, dtype)
    rates = (3, 6, 9)
    expected = aspp_branches_reference(x.double(), [wt.double() for wt in weights], [b.double() for b in biases],
                                       rates)
    y = aspp_branches_packed(x, pack_aspp_branch_weights(weights), torch.cat(biases), rates, allow_tf32=allow_tf32,
                             out=_poisoned((8, 24, 9, 11), dtype), config=RASTER)
    for i, (got, exp) in enumerate(zip(y.chunk(4), expected)):
        assert_close_verbose(got, exp, atol=atol, rtol=rtol, dims="NCHW", name=f"branch {i}")


def test_grouped_aspp_branches_bad_inputs():
    x, weights, biases = _branch_inputs(1, 4, 5, 5, 8, torch.float32)
    with pytest.raises(ValueError, match="branch weights must have shapes"):
        pack_aspp_branch_weights([weights[1], *weights[1:]])
    packed = pack_aspp_branch_weights(weights)
    with pytest.raises(ValueError, match=r"\[28\*Cin, Cb\]"):
        aspp_branches_packed(x[:, :3], packed, None, (1, 2, 3))
    with pytest.raises(ValueError, match="three atrous rates"):
        aspp_branches_packed(x, packed, None, (1, 2))
    with pytest.raises(ValueError, match=r"bias must be \[4\*Cb\]"):
        aspp_branches_packed(x, packed, biases[0], (1, 2, 3))


# ---------------------------------------------------------------------------------------------------
# The custom ops: registered, and equal to the launchers and the reference twins
# ---------------------------------------------------------------------------------------------------
def test_custom_ops_are_registered_and_match_the_reference():
    x, weight, bias, residual = _conv_inputs(2, 16, 9, 7, 24, 3, torch.float32)
    packed = pack_weight(weight)
    y = torch.ops.fastdeeplab.conv2d_act(x, packed, bias, residual, [3, 3], [1, 1], [2, 2], [2, 2], True)
    expected = conv_bn_relu_reference(x, weight, bias, padding=2, dilation=2, residual=residual)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close_verbose(y, expected, atol=1e-4, rtol=1e-4)
    assert_close_verbose(ops._conv2d_act_reference(x, packed, bias, residual, [3, 3], [1, 1], [2, 2], [2, 2], True),
                         expected, atol=1e-5, rtol=1e-5, name="reference twin")
    xb, weights, biases = _branch_inputs(1, 16, 9, 7, 16, torch.float32)
    pb = pack_aspp_branch_weights(weights)
    stacked = torch.ops.fastdeeplab.aspp_branches(xb, pb, torch.cat(biases), [2, 4, 6])
    twin = ops._aspp_branches_reference(xb, pb, torch.cat(biases), [2, 4, 6])
    assert_close_verbose(stacked, twin, atol=1e-4, rtol=1e-4, name="aspp_branches vs twin")
    fake = ops._conv2d_act_fake(x, packed, bias, residual, [3, 3], [2, 2], [2, 2], [2, 2], True)
    assert tuple(fake.shape) == (2, 24, 5, 4)
    with torch.no_grad():
        assert tuple(F.conv2d(x, weight, stride=2, padding=2, dilation=2).shape) == tuple(fake.shape)


# ---------------------------------------------------------------------------------------------------
# Hopper TMA configs (tensor descriptors; out-of-bounds boxes read zeros instead of masked loads)
# ---------------------------------------------------------------------------------------------------
TMA = pytest.param(type(SPATIAL)({**SPATIAL.kwargs, "USE_TMA": True}, num_warps=4, num_stages=1), id="tma4x8")
needs_tma = pytest.mark.skipif(
    not __import__("fastdeeplab.kernels.conv", fromlist=["tma_available"]).tma_available()
    or (ON_GPU and torch.cuda.get_device_capability()[0] < 9),
    reason="TMA descriptors need triton with tl.make_tensor_descriptor (and sm_90+ on a GPU)")


@needs_tma
@pytest.mark.parametrize("config", [TMA])
@pytest.mark.parametrize("dtype, allow_tf32, atol, rtol", KERNEL_DTYPES)
@pytest.mark.parametrize("n, cin, h, w, cout, dilation, residual", [
    pytest.param(2, 16, 9, 11, 24, 2, True, id="N2-C16-H9-W11-d2-residual"),
    pytest.param(1, 24, 13, 13, 40, 6, False, id="N1-C24-H13-W13-d6"),
    pytest.param(1, 8, 33, 33, 8, 24, True, id="N1-C8-H33-W33-d24-residual"),
])
def test_tma_config_matches_reference(n, cin, h, w, cout, dilation, residual, dtype, allow_tf32, atol, rtol, config):
    _skip_bf16(dtype)
    x, weight, bias, res = _conv_inputs(n, cin, h, w, cout, 3, dtype)
    res = res if residual else None
    expected = conv_bn_relu_reference(x.double(), weight.double(), bias.double(), padding=dilation,
                                      dilation=dilation, residual=None if res is None else res.double())
    y = conv_bn_relu_packed(x, pack_weight(weight), bias, kernel_size=3, padding=dilation, dilation=dilation,
                            residual=res, allow_tf32=allow_tf32, out=_poisoned(expected.shape, dtype), config=config)
    assert_close_verbose(y, expected, atol=atol, rtol=rtol, dims="NCHW")


@needs_tma
def test_tma_grouped_branches_and_eligibility():
    x, weights, biases = _branch_inputs(1, 16, 11, 9, 16, torch.float32)
    rates = (2, 4, 8)
    expected = aspp_branches_reference(x.double(), [wt.double() for wt in weights], [b.double() for b in biases],
                                       rates)
    y = aspp_branches_packed(x, pack_aspp_branch_weights(weights), torch.cat(biases), rates, allow_tf32=False,
                             out=_poisoned((4, 16, 11, 9), torch.float32), config=TMA.values[0])
    for i, (got, exp) in enumerate(zip(y.chunk(4), expected)):
        assert_close_verbose(got, exp, atol=1e-4, rtol=1e-4, name=f"TMA branch {i}")
    from fastdeeplab.kernels.conv import tma_eligible

    configs = get_autotune_configs(for_interpreter=False)
    assert any(c.kwargs["USE_TMA"] for c in configs)
    args = {"DEVICE_KEY": -1}  # no GPU: never TMA
    assert not any(c.kwargs["USE_TMA"] for c in tma_eligible(configs, args, stride=(1, 1), channels=(64, 64)))
    with pytest.raises(ValueError, match="stride-1"):
        conv_bn_relu_packed(x, pack_weight(weights[1]), biases[1], kernel_size=3, stride=2, padding=1,
                            config=TMA.values[0])


def test_ops_are_triton_ops_outside_the_interpreter():
    """Without TRITON_INTERPRET the ops are torch.library.triton_ops (where torch has them) whose CPU kernel is
    the reference twin; torch.export keeps them as one node each."""
    import os
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from fastdeeplab.kernels import ops\n"
        "from fastdeeplab.kernels.conv import pack_weight\n"
        "from fastdeeplab.kernels.reference import conv_bn_relu_reference\n"
        "assert ops.TRITON_OPS == hasattr(torch.library, 'triton_op'), ops.TRITON_OPS\n"
        "x, w, b = torch.randn(1, 8, 6, 7), torch.randn(16, 8, 3, 3), torch.randn(16)\n"
        "r = torch.randn(1, 16, 6, 7)\n"
        "y = ops.conv2d_act(x, pack_weight(w), b, r, [3, 3], [1, 1], [1, 1], [1, 1], True)\n"
        "assert torch.allclose(y, conv_bn_relu_reference(x, w, b, padding=1, residual=r), atol=1e-5)\n"
        "class M(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return ops.conv2d_act(x, pack_weight(w), b, None, [3, 3], [1, 1], [1, 1], [1, 1], True)\n"
        "ep = torch.export.export(M(), (x,))\n"
        "assert any('fastdeeplab.conv2d_act' in str(n.target) for n in ep.graph.nodes), ep.graph\n"
        "print('ok', ops.TRITON_OPS)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stderr[-3000:]


def test_tma_allocator_is_set_in_every_launching_thread():
    """Triton keeps its allocator in a ContextVar (per thread): a launch from a second thread sets it there."""
    import threading
    from types import SimpleNamespace

    from fastdeeplab.kernels import conv
    from triton.runtime._allocation import _allocator

    if not conv.tma_available():
        pytest.skip("this triton has no device-side tensor descriptors")
    cuda_x = SimpleNamespace(device=torch.device("cuda", 0))  # ensure_tma_allocator only reads .device
    seen = {}

    def launch(name):
        seen[name + " before"] = _allocator.get()
        conv.ensure_tma_allocator(cuda_x, True)
        seen[name + " after"] = _allocator.get()

    import contextvars

    contextvars.copy_context().run(launch, "main")  # a copy: the test process's own context stays untouched
    worker = threading.Thread(target=launch, args=("worker",))
    worker.start()
    worker.join()
    assert seen["main after"] is conv._tma_alloc
    assert seen["worker before"] is not conv._tma_alloc, "a new thread starts without the allocator"
    assert seen["worker after"] is conv._tma_alloc
    # an allocator the caller set is kept; no TMA config or a CPU tensor: nothing is touched
    def own(size, alignment, stream):
        return None

    def keep():
        import triton

        triton.set_allocator(own)
        conv.ensure_tma_allocator(cuda_x, True)
        seen["own"] = _allocator.get()
        conv.ensure_tma_allocator(SimpleNamespace(device=torch.device("cpu")), True)

    t = threading.Thread(target=keep)
    t.start()
    t.join()
    assert seen["own"] is own


def test_aspp_launchers_replay_a_checked_launch_with_new_data():
    """The second call of a signature replays the first call's checked launch; new data, same results."""
    from fastdeeplab.kernels import conv as conv_module

    conv_module._LAUNCH_PLANS.clear()
    n, cin, h, w, cb, rates = 1, 8, 9, 10, 8, [2, 3, 5]
    for trial in range(2):
        x, weights, biases = _branch_inputs(n, cin, h, w, cb, torch.float32)
        expected = aspp_branches_reference(x.double(), [wt.double() for wt in weights],
                                           [b.double() for b in biases], rates)
        y = aspp_branches_packed(x, pack_aspp_branch_weights(weights), torch.cat(biases), rates, allow_tf32=False)
        for i, (got, exp) in enumerate(zip(y.chunk(4), expected)):
            assert_close_verbose(got, exp, atol=1e-4, rtol=1e-4, name=f"trial {trial} branch {i}")
        branches = list(y.chunk(4))  # views of one tensor, as the fused ASPP passes them
        pooled = torch.randn(n, cb, device=DEV)
        weight = torch.randn(6, 5 * cb, 1, 1, device=DEV) / (5 * cb) ** 0.5
        bias = torch.randn(6, device=DEV)
        from fastdeeplab.kernels.aspp import aspp_project_packed, pack_aspp_weight
        from fastdeeplab.kernels.reference import aspp_project_reference

        got = aspp_project_packed(branches, pooled, pack_aspp_weight(weight), bias, allow_tf32=False)
        want = aspp_project_reference([b.double() for b in branches], pooled.double(), weight.double(),
                                      bias.double())
        assert_close_verbose(got, want, atol=1e-4, rtol=1e-4, name=f"trial {trial} projection")
    assert len(conv_module._LAUNCH_PLANS) == 2, "one plan per launcher signature, replayed on the second trial"


# ---------------------------------------------------------------------------------------------------
# Activation epilogue: none / ReLU / hardswish after bias and residual (MobileNetV3's 1×1 expands, projects)
# ---------------------------------------------------------------------------------------------------
ACT_CASES = [  # (k, stride, activation, residual, tiling): 1×1 raster GEMMs and 3×3 spatial tiles, both
    pytest.param(1, 1, "hardswish", False, RASTER, id="k1-hardswish"),
    pytest.param(1, 1, "hardswish", True, RASTER, id="k1-hardswish-residual"),
    pytest.param(1, 1, "none", True, RASTER, id="k1-none-residual"),
    pytest.param(3, 2, "none", False, SPATIAL, id="k3-s2-none"),
    pytest.param(3, 1, "relu", True, SPATIAL, id="k3-relu-residual"),
    pytest.param(1, 1, "relu", False, RASTER, id="k1-relu"),
]


def _act_inputs(k, stride, dtype, residual):
    n, cin, h, w, cout = 2, 20, 7, 9, 36
    oh, ow = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
    x, weight, bias, res = _conv_inputs(n, cin, h, w, cout, k, dtype, oh, ow)
    weight = (3 * weight.float()).to(dtype)  # sums of about ±3σ = ±9: both hardswish clamps and its curve
    return x, weight, 2 * bias, (res if residual else None)


@pytest.mark.parametrize("dtype, allow_tf32, atol, rtol", KERNEL_DTYPES)
@pytest.mark.parametrize("k, stride, activation, residual, config", ACT_CASES)
def test_activation_epilogue_matches_reference(k, stride, activation, residual, config, dtype, allow_tf32, atol,
                                               rtol):
    _skip_bf16(dtype)
    x, weight, bias, res = _act_inputs(k, stride, dtype, residual)
    expected = conv_bn_relu_reference(x.double(), weight.double(), bias.double(), stride=stride, padding=k // 2,
                                      residual=None if res is None else res.double(), activation=activation)
    pre = conv_bn_relu_reference(x.double(), weight.double(), bias.double(), stride=stride, padding=k // 2,
                                 residual=None if res is None else res.double(), activation="none")
    assert (pre < -3).any() and (pre > 3).any() and ((pre > -3) & (pre < 0)).any(), "cover every branch"
    out = _poisoned(expected.shape, dtype)
    y = conv_bn_relu_packed(x, pack_weight(weight), bias, kernel_size=k, stride=stride, padding=k // 2,
                            residual=res, allow_tf32=allow_tf32, out=out, config=config, activation=activation)
    assert y is out
    assert_close_verbose(y, expected, atol=atol, rtol=rtol, dims="NCHW")
    if activation == "none":
        assert (y < -3).any()
    elif activation == "hardswish":
        assert (y >= -0.375 - atol).all() and (y < 0).any(), "hardswish's minimum is -3/8 at x = -1.5"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
def test_hardswish_propagates_nan_and_inf_like_pytorch():
    x, weight, bias, residual = _conv_inputs(2, 8, 5, 6, 12, 1, torch.float32)
    residual[0, 3, 2, 4] = float("nan")
    residual[1, 0, 1, 5] = float("-inf")  # -inf · 0 = NaN in torch's formula (F.hardswish(-inf) is NaN)
    residual[1, 5, 0, 0] = float("inf")
    x[1, 2, 3, 3] = float("nan")  # every output channel of that pixel
    expected = conv_bn_relu_reference(x.double(), weight.double(), bias.double(), residual=residual.double(),
                                      activation="hardswish")
    assert torch.isnan(expected).sum() == 2 + 12 and torch.isinf(expected).sum() == 1
    y = conv_bn_relu_packed(x, pack_weight(weight), bias, kernel_size=1, residual=residual, allow_tf32=False,
                            out=_poisoned(expected.shape, torch.float32), config=RASTER, activation="hardswish")
    assert_close_verbose(y, expected, atol=1e-4, rtol=1e-4, dims="NCHW")


def test_relu_and_activation_arguments_are_checked_in_one_line():
    x, weight, bias, _ = _conv_inputs(1, 4, 5, 5, 8, 1, torch.float32)
    packed = pack_weight(weight)
    bad = [dict(relu=True, activation="hardswish"), dict(relu=True, activation="none"),
           dict(relu=False, activation="relu"), dict(activation="gelu"), dict(activation=2)]
    for kwargs in bad:
        for call in (lambda kw: conv_bn_relu(x, weight, bias, **kw),
                     lambda kw: conv_bn_relu_packed(x, packed, bias, kernel_size=1, **kw),
                     lambda kw: conv_bn_relu_reference(x, weight, bias, **kw)):
            with pytest.raises(ValueError, match="activation") as err:
                call(kwargs)
            assert "\n" not in str(err.value), str(err.value)
    with pytest.raises(ValueError, match="contradicts"):
        torch.ops.fastdeeplab.conv2d_act(x, packed, bias, None, [1, 1], [1, 1], [0, 0], [1, 1], True, "hardswish")
    # consistent pairs are accepted; relu=False with an activation other than ReLU is consistent
    expected = conv_bn_relu_reference(x, weight, bias, activation="hardswish")
    assert torch.equal(expected, conv_bn_relu_reference(x, weight, bias, relu=False, activation="hardswish"))
    assert torch.equal(conv_bn_relu_reference(x, weight, bias),
                       conv_bn_relu_reference(x, weight, bias, relu=True, activation="relu"))


def test_conv2d_act_op_hardswish_and_launch_signature():
    """The custom op's activation argument (the 9-argument form still means relu/none), its fake, and the
    launch-signature cache: the same problem with another activation is a new launch, not a replay."""
    from fastdeeplab.kernels import conv as conv_module

    x, weight, bias, residual = _conv_inputs(1, 16, 6, 5, 24, 1, torch.float32)
    weight = 3 * weight
    packed = pack_weight(weight)
    args = ([1, 1], [1, 1], [0, 0], [1, 1])
    for activation in ("relu", "hardswish", "none"):
        expected = conv_bn_relu_reference(x.double(), weight.double(), bias.double(), residual=residual.double(),
                                          activation=activation)
        y = torch.ops.fastdeeplab.conv2d_act(x, packed, bias, residual, *args, activation == "relu", activation)
        assert_close_verbose(y, expected, atol=1e-4, rtol=1e-4, name=f"op {activation}")
        twin = ops._conv2d_act_reference(x, packed, bias, residual, *args, False, activation) if activation != \
            "relu" else ops._conv2d_act_reference(x, packed, bias, residual, *args, True)
        assert_close_verbose(twin, expected, atol=1e-5, rtol=1e-5, name=f"twin {activation}")
    old = torch.ops.fastdeeplab.conv2d_act(x, packed, bias, residual, *args, False)  # the 9-argument call
    assert_close_verbose(old, conv_bn_relu_reference(x.double(), weight.double(), bias.double(),
                                                     residual=residual.double(), relu=False), atol=1e-4, rtol=1e-4)
    fake = ops._conv2d_act_fake(x, packed, bias, residual, *args, False, "hardswish")
    assert tuple(fake.shape) == (1, 24, 6, 5)
    with pytest.raises(ValueError, match="contradicts"):
        ops._conv2d_act_fake(x, packed, bias, residual, *args, True, "none")
    # direct launcher calls with the same tensors: one checked launch per activation, then replays
    conv_module._LAUNCH_PLANS.clear()
    for activation in ("relu", "hardswish", "hardswish", "relu"):
        y = conv_bn_relu_packed(x, packed, bias, kernel_size=1, residual=residual, allow_tf32=False,
                                activation=activation)
        expected = conv_bn_relu_reference(x.double(), weight.double(), bias.double(), residual=residual.double(),
                                          activation=activation)
        assert_close_verbose(y, expected, atol=1e-4, rtol=1e-4, name=f"launcher {activation}")
    assert len(conv_module._LAUNCH_PLANS) == 2
