"""Fused dilated convolution + folded BatchNorm + ReLU: a channels-last implicit GEMM in Triton.

The GEMM view of a ``KH×KW`` convolution with ``groups=1``:

* ``M = N·OH·OW`` output pixels, tiled *spatially*: one program owns a ``BLOCK_OH × BLOCK_OW`` patch of one
  image (``BLOCK_M = BLOCK_OH·BLOCK_OW`` rows) and ``BLOCK_N`` output channels;
* ``N = Cout`` output channels, read from a weight packed once as ``[KH·KW·Cin, Cout]`` (:func:`pack_weight`);
* ``K = KH·KW·Cin``, walked taps-outer, channel-blocks-inner, so every A tile is ``BLOCK_K`` contiguous
  channels of ``BLOCK_M`` NHWC pixels. Taps and channel blocks are flattened into one software-pipelined loop.

**Dead-tap skipping.** Along each axis the taps that read at least one real pixel for the tile's outputs form
a contiguous window ``[k_lo, k_hi)`` (the tap's input-row range grows monotonically with ``k``). The K loop
only visits taps inside both windows: a tap whose input rows, or input columns, all fall in the zero padding
is never loaded nor multiplied. This changes nothing in the result (such a tap only adds zeros). At
DeepLab's large rates on small maps (DeepLabv3 §3.3) most outer taps are dead, and once the rate reaches the
map size every tile runs the centre tap alone. :func:`fastdeeplab.analysis.tile_live_taps` predicts the
count per tile; ``return_tap_counts=True`` makes the kernel report what it actually executed.

The epilogue adds the folded-BN bias, applies ReLU (both ``tl.constexpr`` flags) and casts to the output
dtype. Accumulation is always float32; float32 inputs use exact IEEE products or TF32 (``allow_tf32``).

>>> import torch
>>> from fastdeeplab.kernels import conv_bn_relu
>>> x = torch.randn(2, 16, 9, 9, device="cuda").to(memory_format=torch.channels_last)  # doctest: +SKIP
>>> w, b = torch.randn(32, 16, 3, 3, device="cuda"), torch.randn(32, device="cuda")  # doctest: +SKIP
>>> y = conv_bn_relu(x, w, b, padding=6, dilation=6)  # [2, 32, 9, 9], channels-last  # doctest: +SKIP
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import (
    INT32_MAX,
    check_device,
    check_float_dtype,
    check_out,
    check_tensor,
    dot_in_fp32,
    interpreting,
    pair,
    resolve_input_precision,
)

__all__ = [
    "TapCounts",
    "conv_bn_relu",
    "conv_bn_relu_packed",
    "get_autotune_configs",
    "get_interpreter_config",
    "pack_weight",
]


def get_autotune_configs(*, for_interpreter: bool | None = None) -> list[triton.Config]:
    """The tilings the autotuner chooses from, one ``triton.Config`` each.

    Every GPU config compiles with zero register spills and uses tensor cores (``mma.sync`` on sm_80,
    ``wgmma`` on sm_90) for float16, bfloat16 and TF32; ``python -m fastdeeplab.kernels.aot`` checks it.
    Under the Triton interpreter (``for_interpreter``, default: whether ``TRITON_INTERPRET`` is set) the list
    holds the single :func:`get_interpreter_config`, so no time goes into "benchmarking" on the CPU.
    """
    if for_interpreter is None:
        for_interpreter = interpreting()
    if for_interpreter:
        return [get_interpreter_config()]
    # (BLOCK_OH, BLOCK_OW, BLOCK_N, BLOCK_K, num_warps, num_stages)
    tilings = [
        (8, 8, 128, 32, 4, 4),    # 64×128×32: the shape that compiled spill-free in earlier measurements
        (8, 8, 64, 64, 4, 3),     # 64×64×64: for small Cout (e.g. the 21-class classifier) and 1×1 convs
        (8, 16, 64, 32, 4, 4),    # 128×64×32
        (4, 16, 128, 64, 4, 3),   # 64×128×64 on wide, short maps
        (8, 16, 128, 32, 8, 3),   # 128×128×32 with 8 warps: 64 fp32 accumulators per thread
    ]
    return [
        triton.Config({"BLOCK_OH": oh, "BLOCK_OW": ow, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                      num_warps=w, num_stages=s)
        for oh, ow, bn, bk, w, s in tilings
    ]


def get_interpreter_config() -> triton.Config:
    """The one config used under ``TRITON_INTERPRET=1``: small and non-square, so CPU tests cover partial
    tiles in both spatial directions, several output-channel tiles and several channel blocks."""
    return triton.Config({"BLOCK_OH": 4, "BLOCK_OW": 8, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2},
                         num_warps=4, num_stages=1)


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program id → (M tile, N tile), walking GROUP_M M-tiles down each N column before moving right, so a
    group of programs shares its weight tiles in L2 (the ordering of Triton's matmul tutorial)."""
    pids_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_in_group) % group_size_m
    pid_n = (pid % pids_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _conv_bn_relu_kernel(
    x_ptr,  # *T input [N, C_IN, H, W] channels-last: (n, c, h, w) at n*stride_xn + h*stride_xh + w*stride_xw + c
    w_ptr,  # *T packed weight [KH*KW*C_IN, C_OUT] row-major: row (kh*KW + kw)*C_IN + c, see pack_weight
    bias_ptr,  # *fp32 [C_OUT] folded BatchNorm shift; not read unless HAS_BIAS
    out_ptr,  # *T output [N, C_OUT, OH, OW] channels-last: (n, co, oh, ow) at n*stride_on + oh*stride_oh + ...
    taps_ptr,  # *i32 [num_pid_m * num_pid_n] executed taps per program; only written when COUNT_TAPS
    N, H, W, C_IN, C_OUT, OH, OW,  # problem size (input and output spatial sizes, channels)
    stride_xn, stride_xh, stride_xw,  # input strides in elements (channel stride is 1)
    stride_on, stride_oh, stride_ow,  # output strides in elements (channel stride is 1)
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,  # convolution geometry
    KH: tl.constexpr, KW: tl.constexpr,  # kernel size (odd)
    HAS_BIAS: tl.constexpr,  # add bias_ptr[co] in the epilogue
    APPLY_RELU: tl.constexpr,  # clamp at zero in the epilogue
    COUNT_TAPS: tl.constexpr,  # telemetry: write the number of executed taps to taps_ptr
    INPUT_PRECISION: tl.constexpr,  # tl.dot input precision for float32 inputs: "ieee" or "tf32"
    DOT_IN_FP32: tl.constexpr,  # interpreter only: upcast bf16 operands before tl.dot (see dot_in_fp32)
    # Meta-parameters
    BLOCK_OH: tl.constexpr, BLOCK_OW: tl.constexpr,  # spatial output tile; BLOCK_M = BLOCK_OH * BLOCK_OW
    BLOCK_N: tl.constexpr,  # output channels per program
    BLOCK_K: tl.constexpr,  # input channels per K step
    GROUP_M: tl.constexpr,  # M tiles per L2 swizzle group
):
    BLOCK_M: tl.constexpr = BLOCK_OH * BLOCK_OW

    # ---- program -> (image, spatial tile, channel tile), grouped along M for L2 reuse of weights/halos
    pid = tl.program_id(0)
    tiles_oh = tl.cdiv(OH, BLOCK_OH)
    tiles_ow = tl.cdiv(OW, BLOCK_OW)
    tiles_img = tiles_oh * tiles_ow
    num_pid_n = tl.cdiv(C_OUT, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, N * tiles_img, num_pid_n, GROUP_M)

    img = pid_m // tiles_img
    t = pid_m % tiles_img
    oh0 = (t // tiles_ow) * BLOCK_OH
    ow0 = (t % tiles_ow) * BLOCK_OW
    oh1 = tl.minimum(oh0 + BLOCK_OH, OH) - 1  # last real output row / column of the tile
    ow1 = tl.minimum(ow0 + BLOCK_OW, OW) - 1

    # ---- live tap window per axis: tap k reads rows [oh0*S - P + k*D, oh1*S - P + k*D]; it is dead when
    # that range ends above row 0 or starts below row H-1. Both bounds grow with k, so live taps are
    # the contiguous window [kh_lo, kh_hi).
    ih_first = oh0 * STRIDE_H - PAD_H
    ih_last = oh1 * STRIDE_H - PAD_H
    iw_first = ow0 * STRIDE_W - PAD_W
    iw_last = ow1 * STRIDE_W - PAD_W
    kh_lo = 0
    kh_hi = KH
    for k in tl.static_range(KH):
        kh_lo += (ih_last + k * DIL_H < 0).to(tl.int32)
        kh_hi -= (ih_first + k * DIL_H >= H).to(tl.int32)
    kw_lo = 0
    kw_hi = KW
    for k in tl.static_range(KW):
        kw_lo += (iw_last + k * DIL_W < 0).to(tl.int32)
        kw_hi -= (iw_first + k * DIL_W >= W).to(tl.int32)
    n_kh = tl.maximum(kh_hi - kh_lo, 0)
    n_kw = tl.maximum(kw_hi - kw_lo, 0)
    n_cb = tl.cdiv(C_IN, BLOCK_K)
    n_iters = n_kh * n_kw * n_cb

    # ---- per-row addressing, computed once outside the K loop (int32 within one image)
    rm = tl.arange(0, BLOCK_M)
    oh = oh0 + rm // BLOCK_OW
    ow = ow0 + rm % BLOCK_OW
    ih0 = oh * STRIDE_H - PAD_H + kh_lo * DIL_H  # input row of the first live tap
    iw0 = ow * STRIDE_W - PAD_W + kw_lo * DIL_W
    x_rows = ih0 * stride_xh + iw0 * stride_xw
    x_img = x_ptr + img.to(tl.int64) * stride_xn
    rk = tl.arange(0, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < C_OUT
    w_cols = w_ptr + rn[None, :]
    tap_step_h = DIL_H * stride_xh
    tap_step_w = DIL_W * stride_xw

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    taps = 0
    for it in range(0, n_iters):
        tap = it // n_cb
        c0 = (it - tap * n_cb) * BLOCK_K
        dkh = tap // n_kw
        dkw = tap - dkh * n_kw
        ih = ih0 + dkh * DIL_H
        iw = iw0 + dkw * DIL_W
        row_ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        c = c0 + rk
        c_ok = c < C_IN
        a = tl.load(x_img + (x_rows + (dkh * tap_step_h + dkw * tap_step_w))[:, None] + c[None, :],
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        w_rows = ((kh_lo + dkh) * KW + (kw_lo + dkw)) * C_IN + c
        b = tl.load(w_cols + w_rows[:, None] * C_OUT, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if COUNT_TAPS:
            taps += (c0 == 0).to(tl.int32)

    # ---- fused epilogue: + bias, ReLU, cast, store
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    if APPLY_RELU:
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    out_rows = oh * stride_oh + ow * stride_ow
    out_mask = ((oh < OH) & (ow < OW))[:, None] & n_ok[None, :]
    out_img = out_ptr + img.to(tl.int64) * stride_on
    tl.store(out_img + out_rows[:, None] + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    if COUNT_TAPS:
        tl.store(taps_ptr + pid_m * num_pid_n + pid_n, taps)


_conv_bn_relu_autotuned = triton.autotune(
    configs=get_autotune_configs(),
    key=["C_IN", "C_OUT", "H", "W", "KH", "STRIDE_H", "DIL_H", "DIL_W"],
)(_conv_bn_relu_kernel)


class TapCounts(NamedTuple):
    """Executed taps per program, from ``return_tap_counts=True``.

    ``counts`` is int32 ``[N, tiles_oh, tiles_ow, tiles_n]``: tile ``(th, tw)`` of image ``n`` covers output
    rows ``[th*block_oh, (th+1)*block_oh)`` and columns ``[tw*block_ow, (tw+1)*block_ow)``; the last axis
    is the output-channel tile (all of them run the same taps).
    """

    counts: Tensor
    block_oh: int
    block_ow: int


def pack_weight(weight: Tensor) -> Tensor:
    """Pack a PyTorch conv weight ``[Cout, Cin, KH, KW]`` into the kernel's ``[KH*KW*Cin, Cout]`` (contiguous).

    Row ``(kh*KW + kw)*Cin + c`` holds tap ``(kh, kw)``, input channel ``c``. Modules call this once.
    """
    check_tensor(weight, "weight")
    if weight.dim() != 4:
        raise ValueError(f"weight must be [Cout, Cin, KH, KW], got shape {tuple(weight.shape)}")
    cout, cin, kh, kw = weight.shape
    return weight.detach().permute(2, 3, 1, 0).reshape(kh * kw * cin, cout).contiguous()


def conv_bn_relu(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, stride: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1, relu: bool = True,
                 allow_tf32: bool | None = None, out: Tensor | None = None) -> Tensor:
    """``relu(conv2d(x, weight, stride, padding, dilation) + bias)`` in one kernel; ``groups=1``.

    Args:
        x: ``[N, Cin, H, W]`` float32 / float16 / bfloat16. Channels-last is the fast path; any other
            layout is first copied to channels-last (``x.contiguous(memory_format=torch.channels_last)``).
        weight: ``[Cout, Cin, KH, KW]`` (PyTorch layout, BatchNorm folded in, see ``fold_bn``), odd KH, KW,
            same dtype as ``x``. Packed on every call: modules should use :func:`conv_bn_relu_packed`.
        bias: ``[Cout]`` folded BatchNorm shift, or ``None``. Added in float32.
        stride, padding, dilation: ints or ``(h, w)`` pairs, as in ``F.conv2d``.
        relu: apply ReLU in the epilogue.
        allow_tf32: float32 only: TF32 tensor cores (``True``) or exact IEEE products (``False``);
            ``None`` follows ``torch.backends.cudnn.allow_tf32`` like ``F.conv2d``.
        out: optional preallocated channels-last ``[N, Cout, OH, OW]`` output in ``x``'s dtype.
    Returns:
        ``[N, Cout, OH, OW]`` channels-last, in ``x``'s dtype; accumulation is float32. Inference only: the
        result carries no autograd history.
    Raises:
        TypeError: non-tensor arguments, dtypes other than float32/float16/bfloat16, mismatched dtypes.
        ValueError: wrong ranks or shapes, groups != 1, even kernel sizes, bad stride/padding/dilation, an
            empty output, tensors on different devices, CPU tensors without ``TRITON_INTERPRET=1``.
    """
    check_tensor(x, "x")
    check_tensor(weight, "weight")
    if weight.dim() != 4:
        raise ValueError(f"weight must be [Cout, Cin, KH, KW], got shape {tuple(weight.shape)}")
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if weight.shape[1] != x.shape[1]:
        if weight.shape[1] > 0 and x.shape[1] % weight.shape[1] == 0:
            raise ValueError(f"weight has {weight.shape[1]} input channels but x has {x.shape[1]}: grouped "
                             f"convolution (groups={x.shape[1] // weight.shape[1]}) is not supported, groups=1 only")
        raise ValueError(f"channel mismatch: x has {x.shape[1]} channels, weight expects {weight.shape[1]}")
    check_float_dtype(x, "x")
    check_float_dtype(weight, "weight")
    check_device(x, {"weight": weight})
    return conv_bn_relu_packed(x, pack_weight(weight), bias, kernel_size=(weight.shape[2], weight.shape[3]),
                               stride=stride, padding=padding, dilation=dilation, relu=relu, allow_tf32=allow_tf32,
                               out=out)


def conv_bn_relu_packed(x: Tensor, packed_weight: Tensor, bias: Tensor | None = None, *,
                        kernel_size: int | tuple[int, int], stride: int | tuple[int, int] = 1,
                        padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1, relu: bool = True,
                        allow_tf32: bool | None = None, out: Tensor | None = None,
                        config: triton.Config | None = None, return_tap_counts: bool = False,
                        ) -> Tensor | tuple[Tensor, TapCounts]:
    """Like :func:`conv_bn_relu`, with the weight already packed by :func:`pack_weight` (what modules call).

    Args:
        x: ``[N, Cin, H, W]``, see :func:`conv_bn_relu`.
        packed_weight: ``[KH*KW*Cin, Cout]`` contiguous, same dtype as ``x``.
        bias: ``[Cout]`` or ``None``; converted to contiguous float32 if it is not already.
        kernel_size: ``(KH, KW)``, odd.
        config: run this ``triton.Config`` instead of autotuning (tests, telemetry).
        return_tap_counts: also return :class:`TapCounts`, the taps each program executed. Runs the
            telemetry build of the kernel with ``config`` (default: the first autotune config).
    Returns:
        ``out`` (``[N, Cout, OH, OW]`` channels-last), or ``(out, TapCounts)``.
    """
    check_tensor(x, "x")
    check_tensor(packed_weight, "packed_weight")
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    check_float_dtype(x, "x")
    if packed_weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {packed_weight.dtype} does not match x dtype {x.dtype}")
    kh, kw = pair(kernel_size, "kernel_size")
    sh, sw = pair(stride, "stride")
    ph, pw = pair(padding, "padding")
    dh, dw = pair(dilation, "dilation")
    if kh < 1 or kw < 1 or kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel size must be odd (1, 3, 5, ...), got {(kh, kw)}")
    if sh < 1 or sw < 1:
        raise ValueError(f"stride must be >= 1, got {(sh, sw)}")
    if dh < 1 or dw < 1:
        raise ValueError(f"dilation must be >= 1, got {(dh, dw)}")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be >= 0, got {(ph, pw)}")
    n, cin, h, w = x.shape
    if packed_weight.dim() != 2 or packed_weight.shape[0] != kh * kw * cin:
        raise ValueError(f"packed_weight must be [KH*KW*Cin, Cout] = [{kh * kw * cin}, Cout] for x with {cin} "
                         f"channels and a {kh}x{kw} kernel, got shape {tuple(packed_weight.shape)}")
    cout = packed_weight.shape[1]
    if bias is not None:
        check_tensor(bias, "bias")
        if tuple(bias.shape) != (cout,):
            raise ValueError(f"bias must be [Cout] = [{cout}], got shape {tuple(bias.shape)}")
    check_device(x, {"weight": packed_weight, "bias": bias, "out": out})
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"output would be empty: input {h}x{w}, kernel {kh}x{kw}, padding {(ph, pw)}, "
                         f"dilation {(dh, dw)}, stride {(sh, sw)} give {oh}x{ow}")
    if cin < 1 or cout < 1:
        raise ValueError(f"need at least one input and one output channel, got Cin={cin}, Cout={cout}")

    x = x.contiguous(memory_format=torch.channels_last)
    packed_weight = packed_weight.contiguous()
    out = check_out(out, (n, cout, oh, ow), x)
    if max(h * w * cin, oh * ow * cout, packed_weight.numel()) > INT32_MAX:
        raise ValueError("one image (or the weight) has more than 2**31-1 elements; offsets are int32")
    if bias is not None:
        bias = bias.detach().to(torch.float32).contiguous()

    counts = None
    if return_tap_counts:
        config = config or get_autotune_configs()[0]
    if n == 0:
        return (out, TapCounts(torch.zeros(0, 0, 0, 0, dtype=torch.int32), 1, 1)) if return_tap_counts else out

    def grid(meta):
        return (n * triton.cdiv(oh, meta["BLOCK_OH"]) * triton.cdiv(ow, meta["BLOCK_OW"])
                * triton.cdiv(cout, meta["BLOCK_N"]),)

    if config is not None:
        geometry = (triton.cdiv(oh, config.kwargs["BLOCK_OH"]), triton.cdiv(ow, config.kwargs["BLOCK_OW"]),
                    triton.cdiv(cout, config.kwargs["BLOCK_N"]))
        if return_tap_counts:
            counts = torch.full((n, *geometry), -1, dtype=torch.int32, device=x.device)
        kernel = _conv_bn_relu_kernel
        meta = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        kernel = _conv_bn_relu_autotuned
        meta = {}
    kernel[grid](
        x, packed_weight, bias if bias is not None else out, out, counts if counts is not None else out,
        n, h, w, cin, cout, oh, ow,
        x.stride(0), x.stride(2), x.stride(3),
        out.stride(0), out.stride(2), out.stride(3),
        sh, sw, ph, pw, dh, dw,
        KH=kh, KW=kw, HAS_BIAS=bias is not None, APPLY_RELU=bool(relu), COUNT_TAPS=counts is not None,
        INPUT_PRECISION=resolve_input_precision(x.dtype, allow_tf32), DOT_IN_FP32=dot_in_fp32(x.dtype),
        **meta,
    )
    if return_tap_counts:
        return out, TapCounts(counts, config.kwargs["BLOCK_OH"], config.kwargs["BLOCK_OW"])
    return out
