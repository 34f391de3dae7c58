"""ASPP projection without the concatenation: ``relu(Σ_i W_i · b_i + c(n))`` in one Triton kernel.

DeepLabv3's ASPP concatenates five branches (a 1×1 conv, three 3×3 atrous convs and an image-pooling
branch broadcast over the map) into ``5·Cb`` channels and projects them with a 1×1 conv + BN + ReLU. Split the
projection weight by branch, ``W = [W_0 | W_1 | W_2 | W_3 | W_pool]``; then

    out[n, :, h, w] = relu(Σ_{i<4} W_i · b_i[n, :, h, w] + c(n)),     c(n) = W_pool · pooled[n] + bias.

The kernel is one GEMM with ``M = N·H·W`` (tiles never straddle two images), ``N = Cout`` and
``K = 4·Cb`` read straight from the four branch tensors, so the ``[N, 5·Cb, H, W]`` concatenation and the
spatially broadcast pooled branch are never materialised. Each program first forms its image's bias
``c(n)`` for its ``BLOCK_N`` output channels (a ``Cb``-long dot product per channel, ~1/(4·BLOCK_M) of the
program's work), then walks the four branches (branch outer, channel blocks inner) in one flattened,
software-pipelined K loop into one float32 accumulator; the epilogue adds ``c(n)``, applies ReLU and casts.

>>> import torch
>>> from fastdeeplab.kernels import aspp_project
>>> cl = dict(device="cuda", memory_format=torch.channels_last)  # doctest: +SKIP
>>> branches = [torch.randn(2, 256, 33, 33, **cl) for _ in range(4)]  # doctest: +SKIP
>>> pooled = torch.randn(2, 256, device="cuda")  # doctest: +SKIP
>>> w, b = torch.randn(256, 5 * 256, 1, 1, device="cuda"), torch.randn(256, device="cuda")  # doctest: +SKIP
>>> y = aspp_project(branches, pooled, w, b)  # [2, 256, 33, 33], channels-last  # doctest: +SKIP

The file is one concern (hence its length): the two ASPP kernels (the projection and the grouped spatial
branches), their launchers, and :class:`AsppLaunchPlan`, which replays both launches of a forward with the
launchers' recorded arguments: a kernel's arguments change in all three together.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import (
    INT32_MAX,
    autotune_cache_kwargs,
    check_device,
    check_float_dtype,
    check_out,
    check_tensor,
    device_key,
    dot_in_fp32,
    interpreting,
    launch_guard,
    m_bucket,
    pair,
    resolve_input_precision,
    tracing,
    wrap_kernel,
)
from .conv import (
    _LAUNCH_PLANS,
    WORK_SLACK,
    _LaunchPlan,
    _remember,
    conv_tile,
    ensure_tma_allocator,
    grouped_tile,
    num_m_tiles,
    tma_eligible,
)
from .conv import get_autotune_configs as get_branch_configs
from .work import ConvGeometry, executed_macs, tiling_of

__all__ = ["NUM_BRANCHES", "AsppLaunchPlan", "aspp_branches_packed", "aspp_project", "aspp_project_packed", "get_autotune_configs",
           "get_interpreter_config", "pack_aspp_branch_weights", "pack_aspp_weight", "recording_launch_plans"]

NUM_BRANCHES = 4  # spatial branches: the 1×1 conv and three atrous 3×3 convs


def get_autotune_configs(*, for_interpreter: bool | None = None) -> list[triton.Config]:
    """The tilings the autotuner chooses from; one interpreter config under ``TRITON_INTERPRET=1``.

    Every GPU config compiles with zero spills and uses tensor cores on sm_80 and sm_90
    (``python -m fastdeeplab.kernels.aot --kernel aspp_project``).
    """
    if for_interpreter is None:
        for_interpreter = interpreting()
    if for_interpreter:
        return [get_interpreter_config()]
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    tilings = [
        (64, 128, 32, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 64, 64, 4, 3),
        (128, 128, 32, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in tilings
    ]


def get_interpreter_config() -> triton.Config:
    """The single config used under ``TRITON_INTERPRET=1``: small blocks, so CPU tests cover several pixel
    tiles per image, partial tiles, several output-channel tiles and several channel blocks."""
    return triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4, num_stages=1)


@triton.jit(do_not_specialize=["N", "HW", "W", "M_BUCKET", "DEVICE_KEY"])
def _aspp_project_kernel(
    b0_ptr, b1_ptr, b2_ptr, b3_ptr,  # *T the 4 spatial branches [N, CB, H, W] channels-last, identical strides
    pooled_ptr,  # *T pooled branch [N, CB]: (n, c) at n*stride_pn + c
    w_ptr,  # *T packed weight [5*CB, C_OUT] row-major: rows i*CB.. for branch i, rows 4*CB.. for the pooled one
    bias_ptr,  # *fp32 [C_OUT] folded BatchNorm shift; not read unless HAS_BIAS
    out_ptr,  # *T output [N, C_OUT, H, W] channels-last
    N, HW, W, CB, C_OUT,  # problem size: HW = H*W pixels per image, CB channels per branch
    M_BUCKET, DEVICE_KEY,  # autotune keys only (bucketed N*H*W, device index); unused in the body
    stride_bn, stride_bh, stride_bw,  # branch strides in elements (channel stride is 1)
    stride_pn,  # pooled row stride in elements (channel stride is 1)
    stride_on, stride_oh, stride_ow,  # output strides in elements (channel stride is 1)
    HAS_BIAS: tl.constexpr,  # add bias_ptr[co] to the per-image bias
    APPLY_RELU: tl.constexpr,  # clamp at zero in the epilogue
    INPUT_PRECISION: tl.constexpr,  # tl.dot input precision for float32 inputs: "ieee" or "tf32"
    DOT_IN_FP32: tl.constexpr,  # interpreter only: upcast bf16 operands before tl.dot
    # Meta-parameters
    BLOCK_M: tl.constexpr,  # pixels per program (all from one image)
    BLOCK_N: tl.constexpr,  # output channels per program
    BLOCK_K: tl.constexpr,  # branch channels per K step
    GROUP_M: tl.constexpr,  # M tiles per L2 swizzle group
):
    # ---- program -> (image, pixel tile, channel tile), grouped along M for L2 reuse of the weight
    pid = tl.program_id(0)
    tiles_img = tl.cdiv(HW, BLOCK_M)
    pid_m, pid_n = grouped_tile(pid, N * tiles_img, tl.cdiv(C_OUT, BLOCK_N), GROUP_M)
    img = pid_m // tiles_img
    p = (pid_m % tiles_img) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = p < HW
    h = p // W
    w = p % W
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < C_OUT
    rk = tl.arange(0, BLOCK_K)

    # ---- per-image bias c(n) = W_pool · pooled[n] (+ bias), float32, for this program's channels
    pooled_row = pooled_ptr + img.to(tl.int64) * stride_pn
    w_pool = w_ptr + 4 * CB * C_OUT
    POOL_K: tl.constexpr = 16  # channels per GEMV step: keeps the [POOL_K, BLOCK_N] product small
    rp = tl.arange(0, POOL_K)
    img_bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, CB, POOL_K):
        c = c0 + rp
        c_ok = c < CB
        pv = tl.load(pooled_row + c, mask=c_ok, other=0.0).to(tl.float32)
        wv = tl.load(w_pool + c[:, None] * C_OUT + rn[None, :], mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        img_bias += tl.sum(pv[:, None] * wv.to(tl.float32), axis=0)
    if HAS_BIAS:
        img_bias += tl.load(bias_ptr + rn, mask=n_ok, other=0.0)

    # ---- the four branch GEMMs as one flattened, software-pipelined K loop: branch outer, channels inner
    img_off = img.to(tl.int64) * stride_bn
    rows = h * stride_bh + w * stride_bw
    n_cb = tl.cdiv(CB, BLOCK_K)
    w_cols = w_ptr + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(0, 4 * n_cb):
        br = it // n_cb
        c = (it - br * n_cb) * BLOCK_K + rk
        c_ok = c < CB
        b_ptr = tl.where(br == 0, b0_ptr, tl.where(br == 1, b1_ptr, tl.where(br == 2, b2_ptr, b3_ptr)))
        a = tl.load(b_ptr + img_off + rows[:, None] + c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(w_cols + (br * CB + c)[:, None] * C_OUT, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    # ---- fused epilogue: + c(n), ReLU, cast, store
    acc += img_bias[None, :]
    if APPLY_RELU:
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    out_img = out_ptr + img.to(tl.int64) * stride_on
    out_rows = h * stride_oh + w * stride_ow
    tl.store(out_img + out_rows[:, None] + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


_aspp_project_autotuned = triton.autotune(configs=get_autotune_configs(),
                                          key=["CB", "C_OUT", "M_BUCKET", "DEVICE_KEY"],
                                          **autotune_cache_kwargs())(_aspp_project_kernel)


def pack_aspp_weight(weight: Tensor) -> Tensor:
    """Pack the projection weight ``[Cout, 5*Cb, 1, 1]`` (or ``[Cout, 5*Cb]``) into ``[5*Cb, Cout]``, contiguous."""
    check_tensor(weight, "weight")
    if weight.dim() == 4:
        if weight.shape[2:] != (1, 1):
            raise ValueError(f"the ASPP projection is a 1x1 conv; weight has shape {tuple(weight.shape)}")
        weight = weight.reshape(weight.shape[0], weight.shape[1])
    if weight.dim() != 2:
        raise ValueError(f"weight must be [Cout, 5*Cb, 1, 1], got shape {tuple(weight.shape)}")
    if weight.shape[1] % (NUM_BRANCHES + 1):
        raise ValueError(f"weight has {weight.shape[1]} input channels, not a multiple of "
                         f"{NUM_BRANCHES + 1} branches")
    return weight.detach().t().contiguous()


def aspp_project(branches: Sequence[Tensor], pooled: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                 relu: bool = True, allow_tf32: bool | None = None, out: Tensor | None = None) -> Tensor:
    """``relu(conv1x1(cat([*branches, broadcast(pooled)]), weight) + bias)`` without the concatenation.

    Args:
        branches: the 4 spatial ASPP branch outputs, each ``[N, Cb, H, W]`` (channels-last is the fast
            path; others are copied to channels-last), all of one dtype (float32 / float16 / bfloat16).
        pooled: ``[N, Cb]``, the image-pooling branch after its conv + BN + ReLU (before upsampling).
        weight: ``[Cout, 5*Cb, 1, 1]``, the projection weight with BatchNorm folded, PyTorch layout (the
            pooled branch's ``Cb`` input channels last), same dtype as the branches.
        bias: ``[Cout]`` folded BatchNorm shift, or ``None``.
        relu: apply ReLU in the epilogue.
        allow_tf32: float32 only, as in :func:`fastdeeplab.kernels.conv_bn_relu`.
        out: optional preallocated channels-last ``[N, Cout, H, W]`` output.
    Returns:
        ``[N, Cout, H, W]`` channels-last in the branches' dtype.
    """
    check_tensor(weight, "weight")
    check_float_dtype(weight, "weight")
    if len(branches) and isinstance(branches[0], Tensor) and weight.device != branches[0].device:
        raise ValueError(f"weight is on {weight.device} but the branches are on {branches[0].device}")
    return aspp_project_packed(branches, pooled, pack_aspp_weight(weight), bias, relu=relu, allow_tf32=allow_tf32,
                               out=out)


def aspp_project_packed(branches: Sequence[Tensor], pooled: Tensor, packed_weight: Tensor,
                        bias: Tensor | None = None, *, relu: bool = True, allow_tf32: bool | None = None,
                        out: Tensor | None = None, config: triton.Config | None = None) -> Tensor:
    """Like :func:`aspp_project` with the weight packed once by :func:`pack_aspp_weight` (``[5*Cb, Cout]``).

    ``config`` runs that ``triton.Config`` instead of autotuning (tests).
    """
    sig = None
    if out is None and isinstance(branches, (list, tuple)) and len(branches) == NUM_BRANCHES:
        sig = _signature("aspp_project", [*branches, pooled, packed_weight], bias, relu, allow_tf32, config)
        plan = _LAUNCH_PLANS.get(sig) if sig is not None else None
        if plan is not None and not tracing():
            b0, b1, b2, b3 = (b.contiguous(memory_format=torch.channels_last) for b in branches)
            out = plan.new_out()
            plan.run(b0, b1, b2, b3, pooled.contiguous(), packed_weight.contiguous(),
                     out if bias is None else _bias32(bias), out)
            if _recorders:
                _note("aspp_project", plan)
            return out
    if not isinstance(branches, (list, tuple)) or len(branches) != NUM_BRANCHES:
        raise ValueError(f"branches must be a list or tuple of {NUM_BRANCHES} tensors "
                         f"(the 1x1 branch and three atrous branches), got {type(branches).__name__} of "
                         f"{len(branches) if isinstance(branches, (list, tuple)) else '?'}")
    for i, b in enumerate(branches):
        check_tensor(b, f"branches[{i}]")
    x = branches[0]
    if x.dim() != 4:
        raise ValueError(f"branches[0] must be [N, Cb, H, W], got shape {tuple(x.shape)}")
    check_float_dtype(x, "branches[0]")
    for i, b in enumerate(branches[1:], start=1):
        if b.shape != x.shape:
            raise ValueError(f"branches[{i}] has shape {tuple(b.shape)}, branches[0] has {tuple(x.shape)}")
        if b.dtype != x.dtype:
            raise TypeError(f"branches[{i}] has dtype {b.dtype}, branches[0] has {x.dtype}")
    n, cb, h, w = x.shape
    check_tensor(pooled, "pooled")
    if tuple(pooled.shape) != (n, cb):
        raise ValueError(f"pooled must be [N, Cb] = [{n}, {cb}], got shape {tuple(pooled.shape)}")
    if pooled.dtype != x.dtype:
        raise TypeError(f"pooled has dtype {pooled.dtype}, the branches have {x.dtype}")
    check_tensor(packed_weight, "packed_weight")
    if packed_weight.dim() != 2 or packed_weight.shape[0] != (NUM_BRANCHES + 1) * cb:
        raise ValueError(f"packed weight must be [5*Cb, Cout] = [{(NUM_BRANCHES + 1) * cb}, Cout] for Cb={cb}, "
                         f"got shape {tuple(packed_weight.shape)}")
    if packed_weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {packed_weight.dtype} does not match the branches' dtype {x.dtype}")
    cout = packed_weight.shape[1]
    if bias is not None:
        check_tensor(bias, "bias")
        if tuple(bias.shape) != (cout,):
            raise ValueError(f"bias must be [Cout] = [{cout}], got shape {tuple(bias.shape)}")
    check_device(x, {**{f"branches[{i}]": b for i, b in enumerate(branches)}, "pooled": pooled,
                     "weight": packed_weight, "bias": bias, "out": out})
    if cb < 1 or cout < 1:
        raise ValueError(f"need at least one channel, got Cb={cb}, Cout={cout}")

    # Same shape + channels-last contiguous => same strides wherever a size is > 1, so b0's strides serve all.
    branches = [b.contiguous(memory_format=torch.channels_last) for b in branches]
    pooled = pooled.contiguous()
    packed_weight = packed_weight.contiguous()
    out = check_out(out, (n, cout, h, w), x)
    if max(h * w * cb, h * w * cout, packed_weight.numel()) > INT32_MAX:
        raise ValueError("one image (or the weight) has more than 2**31-1 elements; offsets are int32")
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.detach().to(torch.float32).contiguous()
    if n == 0 or h * w == 0:
        return out

    def grid(meta):
        return (n * triton.cdiv(h * w, meta["BLOCK_M"]) * triton.cdiv(cout, meta["BLOCK_N"]),)

    if config is not None:
        kernel = _aspp_project_kernel
        meta = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        kernel = _aspp_project_autotuned
        meta = {}
    b0, b1, b2, b3 = branches
    scalars = (n, h * w, w, cb, cout, m_bucket(n * h * w), device_key(x),
               b0.stride(0), b0.stride(2), b0.stride(3),
               pooled.stride(0),
               out.stride(0), out.stride(2), out.stride(3))
    consts = dict(HAS_BIAS=bias is not None, APPLY_RELU=bool(relu),
                  INPUT_PRECISION=resolve_input_precision(x.dtype, allow_tf32), DOT_IN_FP32=dot_in_fp32(x.dtype),
                  **meta)
    launcher = wrap_kernel(kernel, x)
    with launch_guard(x):
        launcher[grid](b0, b1, b2, b3, pooled, packed_weight, bias if bias is not None else out, out, *scalars,
                       **consts)
    if sig is not None and launcher is kernel:  # an eager launch: remember everything but the data
        plan = _LaunchPlan(kernel, consts, grid, scalars, (n, cout, h, w), x.dtype, x.device)
        _remember(sig, plan)
        if _recorders:
            _note("aspp_project", plan)
    return out


# --------------------------------------------------------------------------------------------------
# The four spatial branches in one grouped launch
# --------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["N", "H", "W", "M_BUCKET", "DEVICE_KEY", "stride_ob"])
def _aspp_branches_kernel(
    x_ptr,  # *T input [N, C_IN, H, W] channels-last, shared by the four branches
    w_ptr,  # *T packed weights [28*C_IN, CB]: rows 0.. the 1×1 branch, C_IN + (i-1)*9*C_IN.. atrous branch i
    bias_ptr,  # *fp32 [4*CB] folded BatchNorm shifts, branch-major; not read unless HAS_BIAS
    out_ptr,  # *T output [4*N, CB, H, W] channels-last: branch i's [N, CB, H, W] at i*stride_ob
    N, H, W, C_IN, CB,  # problem size (every branch keeps the map size: stride 1, "same" padding)
    M_BUCKET, DEVICE_KEY,  # autotune keys only (bucketed N*H*W, device index); unused in the body
    stride_xn, stride_xh, stride_xw,  # input strides in elements (channel stride is 1)
    stride_on, stride_oh, stride_ow,  # output strides in elements (channel stride is 1)
    stride_ob,  # elements between two branches' outputs (N * stride_on)
    RATE1, RATE2, RATE3,  # atrous rates of branches 1-3 (dilation = padding = rate)
    HAS_BIAS: tl.constexpr, APPLY_RELU: tl.constexpr,  # epilogue flags
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,  # as in the conv kernel
    # Meta-parameters (the conv kernel's)
    BLOCK_OH: tl.constexpr, BLOCK_OW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, RASTER: tl.constexpr, USE_TMA: tl.constexpr,
):
    # Grid axis 1 is the branch. Blocks are issued in linear order, so the heaviest branch (the smallest
    # rate, fewest dead taps) goes first and the 1×1 branch (1/9 of a 3×3's work) last.
    g = tl.program_id(1)
    branch = (g + 1) % 4
    is_1x1 = branch == 0
    rate = tl.where(branch == 1, RATE1, tl.where(branch == 2, RATE2, RATE3))
    dil = tl.where(is_1x1, 1, rate)
    pad = tl.where(is_1x1, 0, rate)
    ks = tl.where(is_1x1, 1, 3)
    w_row0 = tl.where(is_1x1, 0, C_IN + (branch - 1) * 9 * C_IN)
    num_pid_m = num_m_tiles(N, H, W, RASTER, BLOCK_OH, BLOCK_OW)
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_pid_m, tl.cdiv(CB, BLOCK_N), GROUP_M)
    conv_tile(x_ptr, w_ptr + w_row0.to(tl.int64) * CB, bias_ptr + branch * CB, out_ptr,
              out_ptr + branch.to(tl.int64) * stride_ob, out_ptr, pid_m, pid_n,
              N, H, W, C_IN, CB, H, W,
              stride_xn, stride_xh, stride_xw, 0, 0, 0, stride_on, stride_oh, stride_ow,
              1, 1, pad, pad, dil, dil, ks, ks, 3, 3,
              HAS_BIAS, False, APPLY_RELU, False, INPUT_PRECISION, DOT_IN_FP32,
              RASTER, BLOCK_OH, BLOCK_OW, BLOCK_N, BLOCK_K, USE_TMA)


def _branch_geometries(a: dict) -> list[ConvGeometry]:
    base = dict(n=a["N"], cin=a["C_IN"], h=a["H"], w=a["W"], cout=a["CB"])
    return [ConvGeometry(**base, k=1), *(ConvGeometry(**base, k=3, dilation=a[f"RATE{i}"]) for i in (1, 2, 3))]


def prune_branches_by_executed_work(configs: list, named_args: dict, **kwargs) -> list:
    """Like :func:`fastdeeplab.kernels.conv.prune_by_executed_work`, summed over the four branches."""
    if len(configs) <= 1:
        return configs
    a = {**named_args, **kwargs}
    configs = tma_eligible(configs, a, stride=(1, 1), channels=(a["C_IN"], a["CB"]))
    geoms = _branch_geometries(a)
    work = [sum(executed_macs(g, tiling_of(c.kwargs)) for g in geoms) for c in configs]
    best = min(work)
    return [c for c, w in zip(configs, work) if w <= WORK_SLACK * best]


_aspp_branches_autotuned = triton.autotune(
    configs=get_branch_configs(), key=["C_IN", "CB", "RATE1", "RATE2", "RATE3", "M_BUCKET", "DEVICE_KEY"],
    prune_configs_by={"early_config_prune": prune_branches_by_executed_work}, **autotune_cache_kwargs(),
)(_aspp_branches_kernel)


def pack_aspp_branch_weights(weights: Sequence[Tensor]) -> Tensor:
    """Pack the four branch weights (``[Cb, Cin, 1, 1]`` then three ``[Cb, Cin, 3, 3]``, BatchNorm folded) into
    the grouped kernel's ``[28*Cin, Cb]``: the 1×1 branch's ``Cin`` rows, then each atrous branch's
    ``9*Cin`` rows in :func:`fastdeeplab.kernels.conv.pack_weight` order."""
    if not isinstance(weights, (list, tuple)) or len(weights) != NUM_BRANCHES:
        raise ValueError(f"weights must be {NUM_BRANCHES} tensors (the 1x1 branch, then three 3x3 branches)")
    shapes = [tuple(check_tensor(w, f"weights[{i}]").shape) for i, w in enumerate(weights)]
    cb, cin = shapes[0][:2]
    expected = [(cb, cin, 1, 1)] + [(cb, cin, 3, 3)] * 3
    if shapes != expected:
        raise ValueError(f"branch weights must have shapes {expected}, got {shapes}")
    return torch.cat([w.detach().permute(2, 3, 1, 0).reshape(-1, cb) for w in weights]).contiguous()


def aspp_branches_packed(x: Tensor, packed_weight: Tensor, bias: Tensor | None, rates: Sequence[int], *,
                         relu: bool = True, allow_tf32: bool | None = None, out: Tensor | None = None,
                         config: triton.Config | None = None) -> Tensor:
    """ASPP's four spatial branches (a 1×1 conv and three 3×3 atrous convs, each + bias + ReLU) in one launch.

    Args:
        x: ``[N, Cin, H, W]`` (channels-last is the fast path), float32 / float16 / bfloat16.
        packed_weight: ``[28*Cin, Cb]`` from :func:`pack_aspp_branch_weights`, ``x``'s dtype.
        bias: ``[4*Cb]`` (branch-major) or ``None``.
        rates: the three atrous rates (dilation = padding = rate).
        out: optional channels-last ``[4*N, Cb, H, W]``.
        config: run this ``triton.Config`` (a conv config) instead of autotuning.
    Returns:
        ``[4*N, Cb, H, W]`` channels-last: branch ``i`` is ``out[i*N:(i+1)*N]`` (views with equal strides, what
        :func:`aspp_project_packed` takes).
    """
    sig = None
    if out is None:
        sig = _signature("aspp_branches", [x, packed_weight], bias, tuple(rates) if isinstance(rates, list)
                         else rates, relu, allow_tf32, config)
        plan = _LAUNCH_PLANS.get(sig) if sig is not None else None
        if plan is not None and not tracing():
            x = x.contiguous(memory_format=torch.channels_last)
            out = plan.new_out()
            plan.run(x, packed_weight.contiguous(), out if bias is None else _bias32(bias), out)
            if _recorders:
                _note("aspp_branches", plan)
            return out
    check_tensor(x, "x")
    check_tensor(packed_weight, "packed_weight")
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    check_float_dtype(x, "x")
    n, cin, h, w = x.shape
    if packed_weight.dim() != 2 or packed_weight.shape[0] != 28 * cin:
        raise ValueError(f"packed_weight must be [28*Cin, Cb] = [{28 * cin}, Cb] for x with {cin} channels, got "
                         f"{tuple(packed_weight.shape)} (see pack_aspp_branch_weights)")
    if packed_weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {packed_weight.dtype} does not match x dtype {x.dtype}")
    cb = packed_weight.shape[1]
    rates = [pair(r, f"rates[{i}]")[0] for i, r in enumerate(rates)]
    if len(rates) != 3 or min(rates) < 1:
        raise ValueError(f"rates must be three atrous rates >= 1, got {rates}")
    if bias is not None:
        check_tensor(bias, "bias")
        if tuple(bias.shape) != (4 * cb,):
            raise ValueError(f"bias must be [4*Cb] = [{4 * cb}], got shape {tuple(bias.shape)}")
        if bias.dtype != torch.float32 or not bias.is_contiguous():
            bias = bias.detach().to(torch.float32).contiguous()
    check_device(x, {"weight": packed_weight, "bias": bias, "out": out})
    if max(h * w * cin, h * w * cb, packed_weight.numel()) > INT32_MAX:
        raise ValueError("one image (or the weight) has more than 2**31-1 elements; offsets are int32")
    x = x.contiguous(memory_format=torch.channels_last)
    packed_weight = packed_weight.contiguous()
    out = check_out(out, (4 * n, cb, h, w), x)
    if n == 0 or h * w == 0:
        return out

    def grid(meta):
        block_m = meta["BLOCK_OH"] * meta["BLOCK_OW"]
        tiles_m = (triton.cdiv(n * h * w, block_m) if meta.get("RASTER", False)
                   else n * triton.cdiv(h, meta["BLOCK_OH"]) * triton.cdiv(w, meta["BLOCK_OW"]))
        return (tiles_m * triton.cdiv(cb, meta["BLOCK_N"]), NUM_BRANCHES)

    if config is not None:
        kernel = _aspp_branches_kernel
        meta = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        meta.setdefault("RASTER", False)
        meta.setdefault("USE_TMA", False)
    else:
        kernel, meta = _aspp_branches_autotuned, {}
    ensure_tma_allocator(x, config is None or meta["USE_TMA"])
    scalars = (n, h, w, cin, cb, m_bucket(n * h * w), device_key(x),
               x.stride(0), x.stride(2), x.stride(3),
               out.stride(0), out.stride(2), out.stride(3), n * out.stride(0),
               rates[0], rates[1], rates[2])
    consts = dict(HAS_BIAS=bias is not None, APPLY_RELU=bool(relu),
                  INPUT_PRECISION=resolve_input_precision(x.dtype, allow_tf32), DOT_IN_FP32=dot_in_fp32(x.dtype),
                  **meta)
    launcher = wrap_kernel(kernel, x)
    with launch_guard(x):
        launcher[grid](x, packed_weight, bias if bias is not None else out, out, *scalars, **consts)
    if sig is not None and launcher is kernel:  # an eager launch: remember everything but the data
        plan = _LaunchPlan(kernel, consts, grid, scalars, (4 * n, cb, h, w), x.dtype, x.device)
        _remember(sig, plan)
        if _recorders:
            _note("aspp_branches", plan)
    return out


def _bias32(bias: Tensor) -> Tensor:
    return bias if bias.dtype == torch.float32 and bias.is_contiguous() else bias.detach().to(torch.float32).contiguous()


def _signature(name: str, tensors: list, bias, *rest) -> tuple | None:
    """Everything but the data a launch depends on (see :func:`fastdeeplab.kernels.conv._launch_signature`);
    ``None`` when an argument is not a plain tensor or not hashable (the checked path then runs)."""
    if any(type(t) is not Tensor for t in tensors):
        return None
    tf32 = bool(torch.backends.cudnn.allow_tf32)
    sig = (name, *((t.shape, t.stride(), t.dtype, t.device) for t in tensors),
           None if bias is None else (type(bias), bias.shape, bias.dtype, bias.device, bias.is_contiguous()),
           tf32, *rest)
    try:
        hash(sig)
    except TypeError:
        return None
    return sig


# --------------------------------------------------------------------------------------------------
# One ASPP forward as one replayed plan: both launches, checked once
# --------------------------------------------------------------------------------------------------
class _Recording(threading.local):
    plans: list | None = None  # a class default: a missing thread-local attribute would cost an exception


_RECORDING = _Recording()
_recorders = 0  # recordings open in any thread: the launchers look no further while it is 0
_recorders_lock = threading.Lock()


@contextlib.contextmanager
def recording_launch_plans() -> Iterator[list]:
    """``with recording_launch_plans() as plans:`` collects ``(launcher name, launch plan)`` for every checked
    or replayed launch of :func:`aspp_branches_packed` and :func:`aspp_project_packed` in this thread (none
    while torch traces: those launches are not replayable). The fused ASPP module builds its
    :class:`AsppLaunchPlan` from the two a forward recorded."""
    global _recorders
    plans: list = []
    outer = _RECORDING.plans
    _RECORDING.plans = plans
    with _recorders_lock:
        _recorders += 1
    try:
        yield plans
    finally:
        _RECORDING.plans = outer
        with _recorders_lock:
            _recorders -= 1


def _note(name: str, plan: _LaunchPlan) -> None:
    plans = _RECORDING.plans
    if plans is not None:
        plans.append((name, plan))


class AsppLaunchPlan:
    """A whole ASPP forward's launches (the grouped branches, then the projection) replayed as one plan.

    Built by :meth:`from_recording` from what one checked forward recorded (:func:`recording_launch_plans`)
    and the packed weights and float32 biases that forward passed, which the plan keeps. ``plan(x, pooled)``
    then costs two allocations, four views and two launches: no argument checks, signatures, autotuner or
    config lookups. Its caller guarantees what the checks and signatures would have: ``x`` has the recorded
    forward's shape, strides, dtype and device, ``pooled`` is ``[N, Cb]`` in ``x``'s dtype, the packs are
    unchanged objects, and the TF32 mode is the recorded one (:class:`fastdeeplab.layers.FusedASPP` keys its
    plans on all of these and drops them when a parameter changes).
    """

    __slots__ = ("branch_bias", "branch_weight", "branches", "bias", "device", "project", "stacked_shape",
                 "stacked_strides", "out_shape", "out_strides", "dtype", "tma", "weight")

    def __init__(self, branches: _LaunchPlan, project: _LaunchPlan, branch_weight: Tensor,
                 branch_bias: Tensor | None, weight: Tensor, bias: Tensor | None) -> None:
        if bool(branches.consts.get("HAS_BIAS")) != (branch_bias is not None) or \
                bool(project.consts.get("HAS_BIAS")) != (bias is not None):
            raise ValueError("the biases do not match the recorded launches (one has a bias, the other none)")
        self.branches, self.project = branches, project
        self.branch_weight, self.branch_bias, self.weight, self.bias = branch_weight, branch_bias, weight, bias
        self.dtype, self.device = project.dtype, project.device
        cl = dict(dtype=self.dtype, device="meta", memory_format=torch.channels_last)
        self.stacked_shape, self.out_shape = branches.out_shape, project.out_shape
        self.stacked_strides = torch.empty(self.stacked_shape, **cl).stride()
        self.out_strides = torch.empty(self.out_shape, **cl).stride()
        self.tma = branches.tma or project.tma

    @classmethod
    def from_recording(cls, recorded: list, branch_weight: Tensor, branch_bias: Tensor | None, weight: Tensor,
                       bias: Tensor | None) -> AsppLaunchPlan | None:
        """The plan of a forward that recorded exactly one branches launch then one projection launch;
        ``None`` for anything else (a traced launch, the cuDNN form of either half, extra launches)."""
        names = [name for name, _ in recorded]
        if names != ["aspp_branches", "aspp_project"]:
            return None
        return cls(recorded[0][1], recorded[1][1], branch_weight, branch_bias, weight, bias)

    def __call__(self, x: Tensor, pooled: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        stacked = torch.empty_strided(self.stacked_shape, self.stacked_strides, dtype=self.dtype, device=self.device)
        out = torch.empty_strided(self.out_shape, self.out_strides, dtype=self.dtype, device=self.device)
        b0, b1, b2, b3 = stacked.chunk(NUM_BRANCHES)  # branch i is images [i*N, (i+1)*N), equal strides
        bp, pp = self.branches, self.project
        if self.tma:
            ensure_tma_allocator(x, True)
        with launch_guard(x):
            bp.fn.run(x, self.branch_weight, stacked if self.branch_bias is None else self.branch_bias, stacked,
                      *bp.scalars, grid=bp.grid, warmup=False, **bp.consts)
            pp.fn.run(b0, b1, b2, b3, pooled.contiguous(), self.weight, out if self.bias is None else self.bias,
                      out, *pp.scalars, grid=pp.grid, warmup=False, **pp.consts)
        return out
