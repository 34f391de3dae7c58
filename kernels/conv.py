"""Fused dilated convolution + folded BatchNorm + [residual] + activation: a channels-last implicit GEMM in Triton.

One concern in one file (hence its length): the conv kernel, its two tilings (spatial and raster), its
autotune configs and pruning, and the launcher that validates arguments for it all change together.

The GEMM view of a ``KH×KW`` convolution with ``groups=1``: ``M = N·OH·OW`` output pixels, ``N = Cout``
output channels read from a weight packed once as ``[KH·KW·Cin, Cout]`` (:func:`pack_weight`), and
``K = KH·KW·Cin`` walked taps-outer, channel-blocks-inner in one software-pipelined loop, so every A tile is
``BLOCK_K`` contiguous channels of ``BLOCK_M`` NHWC pixels. One program owns ``BLOCK_M`` pixels and
``BLOCK_N`` output channels; the pixels are tiled in one of two ways (the ``RASTER`` meta-parameter):

* **spatial** (``RASTER=False``): a ``BLOCK_OH × BLOCK_OW`` patch of one image. Good for dead-tap skipping
  on large maps, but a power-of-two patch pads a 33×33 map to 40×40 (8×8 tiles): 47% of the MMA rows wasted.
* **raster** (``RASTER=True``): ``BLOCK_M = BLOCK_OH·BLOCK_OW`` consecutive rows of the row-major
  ``[N·OH·OW]`` pixel list, across image boundaries. Only the last tile is partial (33×33 at batch 1 and
  ``BLOCK_M=64``: 1152 rows for 1089 pixels, 6% padding), and a 1×1 conv becomes a plain GEMM. Every 1×1
  conv uses it (``_conv1x1_autotuned``); 3×3 convs autotune over both kinds.

**Dead-tap skipping.** Along each axis the taps that read at least one real pixel for the tile's outputs form
a contiguous window ``[k_lo, k_hi)``: the tap's input range grows monotonically with ``k``. The K loop only
visits taps inside both windows; a tap whose input rows, or columns, all fall in the zero padding is never
loaded nor multiplied, which changes nothing in the result (it only adds zeros). A raster tile's window is
taken over its row range (and over its column range when it sits in one output row), so at DeepLab's large
rates on small maps (DeepLabv3 §3.3) it still collapses to the centre tap once the rate reaches the map
size. :func:`fastdeeplab.analysis.tile_live_taps` predicts spatial tiles' counts; ``return_tap_counts=True``
makes the kernel report what it executed.

The epilogue adds the folded-BN bias (float32), then the residual (``HAS_RESIDUAL``: a bottleneck's shortcut,
read once), applies the activation (``ACTIVATION``: none, ReLU or hardswish, :func:`activate`, NaN-propagating
like ``torch.relu`` and ``F.hardswish``) and casts to the output dtype: ``add → act`` costs no extra pass
over memory. MobileNetV3's 1×1 expand (hardswish) and project (linear, + residual) convs run it this way. Accumulation is always float32; float32 inputs use exact IEEE products or
TF32 (``allow_tf32``).

**Autotuning.** Keyed on channels, kernel, stride, dilation, the tensors' dtypes, a bucketed ``N·OH·OW``
(:func:`m_bucket`) and the device index, never on raw H and W, so a new image size in the same bucket reuses
the tuned tiling. Sizes are not specialised (``do_not_specialize``) and, where the installed Triton can,
tuning results are cached on disk across processes (``cache_results``). An early prune drops every config
that would execute over 1.25× the MMA work of the leanest one for the layer (:func:`executed_rows`).
Each surviving config is benchmarked with Triton's default timing (25 ms warm-up, 100 ms of repeats);
``FASTDEEPLAB_AUTOTUNE_MS="warmup,rep"`` (milliseconds, e.g. ``"5,20"``, read at each tuning) shortens it, as
the GPU check does (:func:`fastdeeplab.kernels._utils.autotune_do_bench`; the dispatcher's Triton-vs-cuDNN
timing follows it too). Launches outside a traced graph call the autotuned kernel itself, so a problem is
tuned once per process whether the launcher is called directly or through the custom op.

**Hopper.** Configs with ``USE_TMA`` load A (a ``[1, BLOCK_OH, BLOCK_OW, BLOCK_K]`` box of the NHWC input)
and B through TMA tensor descriptors (``tl.make_tensor_descriptor``); out-of-bounds boxes read zeros, which
replaces the dead-pixel masks. They sit in the autotune list beside the ``cp.async`` configs; the prune drops
them off sm_90+ and for strided convs (:func:`tma_eligible`).

This file is longer than the project's ~500-line guide because it holds one kernel body
(:func:`conv_tile`) that both the conv kernel and the grouped ASPP kernel (:mod:`.aspp`) run, with its
config lists, prune and launcher next to it; splitting them would separate the tile maths from the
tilings it must agree with.

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
    ACTIVATION_CODES,
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
    patch_interpreter_indices,
    resolve_activation,
    resolve_input_precision,
    tracing,
    wrap_kernel,
)
from .work import ConvGeometry, executed_macs, tiling_of

patch_interpreter_indices()  # triton 3.6's interpreter + NumPy 2 (a no-op on GPUs and on triton 3.8)

__all__ = [
    "TapCounts",
    "activate",
    "conv_bn_relu",
    "conv_bn_relu_packed",
    "get_autotune_configs",
    "get_interpreter_config",
    "pack_weight",
    "prune_by_executed_work",
]

# Keep configs within this factor of the leanest config's executed MMA work (kernels/work.py).
WORK_SLACK = 1.25


def _config(oh: int, ow: int, bn: int, bk: int, warps: int, stages: int, raster: bool,
            tma: bool = False) -> triton.Config:
    return triton.Config({"BLOCK_OH": oh, "BLOCK_OW": ow, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
                          "RASTER": raster, "USE_TMA": tma}, num_warps=warps, num_stages=stages)


def tma_available() -> bool:
    """Whether the installed Triton has device-side TMA tensor descriptors (``tl.make_tensor_descriptor``)."""
    return hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")


def get_autotune_configs(*, for_interpreter: bool | None = None, kind: str = "all") -> list[triton.Config]:
    """The tilings the autotuner chooses from, one ``triton.Config`` each.

    ``kind``: ``"spatial"``, ``"raster"``, ``"tma"`` or ``"all"`` (spatial first, so index 0 stays the 8×8×128
    tile; ``"all"`` ends with the TMA configs where :func:`tma_available`; the prune drops them off Hopper).
    Every GPU config compiles with zero register spills and uses tensor cores (``mma.sync`` on sm_80,
    ``wgmma`` on sm_90) for float16, bfloat16 and TF32; ``python -m fastdeeplab.kernels.aot`` checks it.
    Under the Triton interpreter (``for_interpreter``, default: whether ``TRITON_INTERPRET`` is set) the list
    holds the single :func:`get_interpreter_config`, so no time goes into "benchmarking" on the CPU.
    """
    if kind not in ("all", "spatial", "raster", "tma"):
        raise ValueError(f"kind must be 'all', 'spatial', 'raster' or 'tma', got {kind!r}")
    if for_interpreter is None:
        for_interpreter = interpreting()
    if for_interpreter:
        return [get_interpreter_config(raster=kind == "raster")]
    # (BLOCK_OH, BLOCK_OW, BLOCK_N, BLOCK_K, num_warps, num_stages)
    spatial = [
        (8, 8, 128, 32, 4, 4),    # 64×128×32: the shape that compiled spill-free in earlier measurements
        (8, 8, 64, 64, 4, 3),     # 64×64×64: for small Cout (e.g. the 21-class classifier)
        (8, 16, 64, 32, 4, 4),    # 128×64×32
        (4, 16, 128, 64, 4, 3),   # 64×128×64 on wide, short maps
        (8, 16, 128, 32, 8, 3),   # 128×128×32 with 8 warps: 64 fp32 accumulators per thread
    ]
    # Raster tiles: BLOCK_M consecutive pixels (BLOCK_OH=1). 64-row tiles keep batch-1 small maps busy.
    raster = [
        (1, 64, 128, 32, 4, 4),   # 64×128×32
        (1, 64, 64, 64, 4, 3),    # 64×64×64: most CTAs on 33×33 at batch 1 (18×4 per 256-channel conv)
        (1, 128, 64, 32, 8, 4),   # 128×64×32 (8 warps: 4 spill on sm_80 with the raster addressing)
        (1, 128, 128, 32, 8, 3),  # 128×128×32, 8 warps: the big-GEMM tile for 1×1 convs at batch 8
    ]
    out = []
    if kind in ("all", "spatial"):
        out += [_config(*t, raster=False) for t in spatial]
    if kind in ("all", "raster"):
        out += [_config(*t, raster=True) for t in raster]
    # Hopper TMA: spatial tiles whose A box is [1, BLOCK_OH, BLOCK_OW, BLOCK_K] of the NHWC input
    tma = [(8, 8, 128, 64, 4, 3), (8, 16, 128, 32, 8, 3)]
    if kind in ("all", "tma") and tma_available():
        out += [_config(*t, raster=False, tma=True) for t in tma]
    return out


def get_interpreter_config(*, raster: bool = False) -> triton.Config:
    """The config used under ``TRITON_INTERPRET=1``: small and non-square (spatial 4×8, raster 32 rows), so
    CPU tests cover partial tiles, several output-channel tiles and several channel blocks."""
    return triton.Config({"BLOCK_OH": 1 if raster else 4, "BLOCK_OW": 32 if raster else 8, "BLOCK_N": 32,
                          "BLOCK_K": 16, "GROUP_M": 2, "RASTER": raster, "USE_TMA": False}, num_warps=4,
                         num_stages=1)


def prune_by_executed_work(configs: list, named_args: dict, **kwargs) -> list:
    """Autotune early prune: keep the configs whose executed MMA work (:mod:`fastdeeplab.kernels.work`) is
    within ``WORK_SLACK`` of the leanest one for this layer, so the autotuner times only tilings that do not
    pad away the work (a 33×33 map in 8×16 tiles executes 1.76× the rows it needs)."""
    if len(configs) <= 1:
        return configs
    a = {**named_args, **kwargs}
    configs = tma_eligible(configs, a, stride=(a["STRIDE_H"], a["STRIDE_W"]), channels=(a["C_IN"], a["C_OUT"]))
    g = ConvGeometry(n=a["N"], cin=a["C_IN"], h=a["H"], w=a["W"], cout=a["C_OUT"], k=a["KH"],
                     stride=a["STRIDE_H"], dilation=a["DIL_H"], padding=a["PAD_H"])
    if a["KH"] != a["KW"] or a["STRIDE_H"] != a["STRIDE_W"] or a["DIL_H"] != a["DIL_W"] or a["PAD_H"] != a["PAD_W"]:
        return configs  # the work model covers square geometry; time everything otherwise
    work = [executed_macs(g, tiling_of(c.kwargs)) for c in configs]
    best = min(work)
    return [c for c, w in zip(configs, work) if w <= WORK_SLACK * best]


def tma_eligible(configs: list, args: dict, *, stride: tuple[int, int], channels: tuple[int, ...]) -> list:
    """Drop the TMA configs unless the device is sm_90+, the conv has stride 1 and every row of the NHWC
    input and packed weight is 16-byte aligned (TMA's stride rule)."""
    x = args.get("x_ptr")
    elem = x.element_size() if hasattr(x, "element_size") else 2
    device = args.get("DEVICE_KEY", -1)
    ok = (stride == (1, 1) and all(c * elem % 16 == 0 for c in channels) and device >= 0
          and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 9)
    kept = [c for c in configs if ok or not c.kwargs.get("USE_TMA", False)]
    return kept or configs[:1]


def ensure_tma_allocator(x: Tensor, config_may_use_tma: bool) -> None:
    """Device-side tensor descriptors need a global scratch allocator (``triton.set_allocator``). Triton keeps
    it in a ``ContextVar``, i.e. per thread (and per asyncio context), so it is checked at every launch that
    may use TMA, in the launching thread, and set there when that context has none (an allocator the caller
    set is kept)."""
    if not config_may_use_tma or x.device.type != "cuda" or not tma_available():
        return
    current = _current_allocator()
    if current is _tma_alloc or (current is not None and not _is_null_allocator(current)):
        return
    triton.set_allocator(_tma_alloc)


def _tma_alloc(size: int, alignment: int, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _current_allocator():
    """This context's Triton allocator, ``None`` where Triton does not expose it (then it is set each time)."""
    try:
        from triton.runtime._allocation import _allocator
    except ImportError:
        return None
    return _allocator.get()


def _is_null_allocator(allocator) -> bool:
    return type(allocator).__name__ == "NullAllocator"


@triton.jit
def activate(acc, ACTIVATION: tl.constexpr):
    """The kernels' epilogue activation, the one home of its formulas (conv, grouped ASPP and depthwise
    kernels call it): ``ACTIVATION`` 0 none, 1 ReLU, 2 hardswish ``x · min(max(x + 3, 0), 6) / 6``
    (``F.hardswish``'s formula: ±inf behave as in torch, -inf → NaN). NaN stays NaN in both, as in torch
    (``ACTIVATION`` may also be a bool: ``False`` none, ``True`` ReLU)."""
    if ACTIVATION == 1:
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACTIVATION == 2:
        acc = acc * tl.minimum(tl.maximum(acc + 3.0, 0.0), 6.0) / 6.0  # a NaN acc multiplies: NaN out
    return acc


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
def num_m_tiles(N, OH, OW, RASTER: tl.constexpr, BLOCK_OH: tl.constexpr, BLOCK_OW: tl.constexpr):
    """M tiles of one launch: raster tiles over ``N·OH·OW`` pixels, or per-image spatial patches."""
    if RASTER:
        return tl.cdiv(N * OH * OW, BLOCK_OH * BLOCK_OW)
    else:
        return N * tl.cdiv(OH, BLOCK_OH) * tl.cdiv(OW, BLOCK_OW)


@triton.jit
def conv_tile(
    x_ptr,  # *T input [N, C_IN, H, W] channels-last: (n, c, h, w) at n*stride_xn + h*stride_xh + w*stride_xw + c
    w_ptr,  # *T this conv's packed weight [KS_H*KS_W*C_IN, C_OUT] row-major, row (kh*KS_W + kw)*C_IN + c
    bias_ptr,  # *fp32 [C_OUT] folded BatchNorm shift; not read unless HAS_BIAS
    res_ptr,  # *T residual [N, C_OUT, OH, OW] channels-last; not read unless HAS_RESIDUAL
    out_ptr,  # *T output [N, C_OUT, OH, OW] channels-last
    taps_ptr,  # *i32 executed taps of this program; only written when COUNT_TAPS
    pid_m, pid_n,  # this program's M tile and output-channel tile
    N, H, W, C_IN, C_OUT, OH, OW,  # problem size
    stride_xn, stride_xh, stride_xw,  # input strides in elements (channel stride is 1)
    stride_rn, stride_rh, stride_rw,  # residual strides in elements (channel stride is 1)
    stride_on, stride_oh, stride_ow,  # output strides in elements (channel stride is 1)
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,  # convolution geometry
    KS_H, KS_W,  # kernel size, <= KMAX_H / KMAX_W (runtime: the grouped ASPP launch mixes 1×1 and 3×3)
    KMAX_H: tl.constexpr, KMAX_W: tl.constexpr,  # largest kernel size this build handles
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, COUNT_TAPS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    RASTER: tl.constexpr, BLOCK_OH: tl.constexpr, BLOCK_OW: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr,
):
    """One program's ``BLOCK_M × BLOCK_N`` output tile: the K loop over live taps and channel blocks, then
    the epilogue (bias, residual, activation, cast, store). Shared by the conv and grouped-ASPP kernels."""
    BLOCK_M: tl.constexpr = BLOCK_OH * BLOCK_OW
    rm = tl.arange(0, BLOCK_M)
    if RASTER:
        # ---- raster tile: BLOCK_M consecutive pixels of the row-major [N*OH*OW] list, across images
        ohw = OH * OW
        m_total = N * ohw
        m0 = pid_m * BLOCK_M
        m = m0 + rm
        m_ok = m < m_total
        img = m // ohw  # per row
        p = m % ohw
        oh = p // OW
        ow = p % OW
        m1 = tl.minimum(m0 + BLOCK_M, m_total) - 1
        img0 = m0 // ohw
        same_img = img0 == (m1 // ohw)
        p0 = m0 % ohw
        p1 = m1 % ohw
        oh_first = tl.where(same_img, p0 // OW, 0)
        oh_last = tl.where(same_img, p1 // OW, OH - 1)
        one_row = same_img & (oh_first == oh_last)
        ow_first = tl.where(one_row, p0 % OW, 0)
        ow_last = tl.where(one_row, p1 % OW, OW - 1)
        # 64-bit base of the tile's first image, int32 offsets within the tile (it spans < BLOCK_M images)
        x_tile = x_ptr + img0.to(tl.int64) * stride_xn
        x_img_off = (img - img0) * stride_xn
        # output and residual are dense channels-last (the launchers check): pixel m sits at m*C_OUT, so the
        # epilogue needs no per-row (image, row, column) decomposition kept alive across the K loop
        r_tile = res_ptr + m0.to(tl.int64) * C_OUT
        o_tile = out_ptr + m0.to(tl.int64) * C_OUT
    else:
        # ---- spatial tile: a BLOCK_OH × BLOCK_OW patch of one image
        tiles_ow = tl.cdiv(OW, BLOCK_OW)
        tiles_img = tl.cdiv(OH, BLOCK_OH) * tiles_ow
        img = pid_m // tiles_img
        t = pid_m % tiles_img
        oh_first = (t // tiles_ow) * BLOCK_OH
        ow_first = (t % tiles_ow) * BLOCK_OW
        oh_last = tl.minimum(oh_first + BLOCK_OH, OH) - 1
        ow_last = tl.minimum(ow_first + BLOCK_OW, OW) - 1
        oh = oh_first + rm // BLOCK_OW
        ow = ow_first + rm % BLOCK_OW
        m_ok = (oh < OH) & (ow < OW)
        x_tile = x_ptr + img.to(tl.int64) * stride_xn
        r_tile = res_ptr + img.to(tl.int64) * stride_rn
        o_tile = out_ptr + img.to(tl.int64) * stride_on
        x_img_off = 0

    # ---- live tap window per axis: tap k reads rows [oh_first*S - P + k*D, oh_last*S - P + k*D]; it is
    # dead when that range ends above row 0 or starts below row H-1. Both bounds grow with k, so the live
    # taps are the contiguous window [kh_lo, kh_hi).
    ih_first = oh_first * STRIDE_H - PAD_H
    ih_last = oh_last * STRIDE_H - PAD_H
    iw_first = ow_first * STRIDE_W - PAD_W
    iw_last = ow_last * STRIDE_W - PAD_W
    kh_lo = 0
    kh_hi = KS_H
    for k in tl.static_range(KMAX_H):
        kh_lo += ((ih_last + k * DIL_H < 0) & (k < KS_H)).to(tl.int32)
        kh_hi -= ((ih_first + k * DIL_H >= H) & (k < KS_H)).to(tl.int32)
    kw_lo = 0
    kw_hi = KS_W
    for k in tl.static_range(KMAX_W):
        kw_lo += ((iw_last + k * DIL_W < 0) & (k < KS_W)).to(tl.int32)
        kw_hi -= ((iw_first + k * DIL_W >= W) & (k < KS_W)).to(tl.int32)
    n_kh = tl.maximum(kh_hi - kh_lo, 0)
    n_kw = tl.maximum(kw_hi - kw_lo, 0)
    n_cb = tl.cdiv(C_IN, BLOCK_K)
    n_iters = n_kh * n_kw * n_cb

    # ---- per-row addressing, computed once outside the K loop
    ih0 = oh * STRIDE_H - PAD_H + kh_lo * DIL_H  # input row of the first live tap
    iw0 = ow * STRIDE_W - PAD_W + kw_lo * DIL_W
    x_rows = x_img_off + ih0 * stride_xh + iw0 * stride_xw  # int32 offsets from x_tile
    rk = tl.arange(0, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < C_OUT
    w_cols = w_ptr + rn[None, :]
    tap_step_h = DIL_H * stride_xh
    tap_step_w = DIL_W * stride_xw

    if USE_TMA:
        # Hopper: A and B tiles through TMA tensor descriptors (stride-1 spatial tiles only; see
        # prune_by_executed_work). A box that reaches past the map reads zeros, which replaces the masks of
        # dead pixels; channels past C_IN read zeros too, so the B rows they meet (the next tap's) add nothing.
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[N, H, W, C_IN], strides=[stride_xn, stride_xh, stride_xw, 1],
                                           block_shape=[1, BLOCK_OH, BLOCK_OW, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[KS_H * KS_W * C_IN, C_OUT], strides=[C_OUT, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    taps = 0
    for it in range(0, n_iters):
        tap = it // n_cb
        c0 = (it - tap * n_cb) * BLOCK_K
        dkh = tap // n_kw
        dkw = tap - dkh * n_kw
        ih = ih0 + dkh * DIL_H
        iw = iw0 + dkw * DIL_W
        row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        c = c0 + rk
        c_ok = c < C_IN
        if USE_TMA:
            a = x_desc.load([img, oh_first - PAD_H + (kh_lo + dkh) * DIL_H, ow_first - PAD_W + (kw_lo + dkw) * DIL_W,
                             c0]).reshape(BLOCK_M, BLOCK_K)
            b = w_desc.load([((kh_lo + dkh) * KS_W + (kw_lo + dkw)) * C_IN + c0, pid_n * BLOCK_N])
        else:
            a = tl.load(x_tile + (x_rows + (dkh * tap_step_h + dkw * tap_step_w))[:, None] + c[None, :],
                        mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            w_rows = ((kh_lo + dkh) * KS_W + (kw_lo + dkw)) * C_IN + c
            b = tl.load(w_cols + w_rows[:, None] * C_OUT, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if COUNT_TAPS:
            taps += (c0 == 0).to(tl.int32)

    # ---- fused epilogue: + bias, + residual, activation, cast, store
    if RASTER:
        m_ok = pid_m * BLOCK_M + rm < N * OH * OW
        r_rows = rm * C_OUT
        o_rows = rm * C_OUT
    else:
        r_rows = oh * stride_rh + ow * stride_rw
        o_rows = oh * stride_oh + ow * stride_ow
    out_mask = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(r_tile + r_rows[:, None] + rn[None, :], mask=out_mask, other=0.0).to(tl.float32)
    acc = activate(acc, ACTIVATION)
    tl.store(o_tile + o_rows[:, None] + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    if COUNT_TAPS:
        tl.store(taps_ptr, taps)


# Sizes that change with the image or batch are never specialised (no recompiles per size); strides keep
# their divisibility-by-16 specialisation: they are multiples of the channel count, which the key holds.
_NOT_SPECIALISED = ["N", "H", "W", "OH", "OW", "M_BUCKET", "DEVICE_KEY"]


@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def _conv_bn_relu_kernel(
    x_ptr,  # *T input [N, C_IN, H, W] channels-last
    w_ptr,  # *T packed weight [KH*KW*C_IN, C_OUT] row-major, see pack_weight
    bias_ptr,  # *fp32 [C_OUT]; not read unless HAS_BIAS
    res_ptr,  # *T residual [N, C_OUT, OH, OW] channels-last; not read unless HAS_RESIDUAL
    out_ptr,  # *T output [N, C_OUT, OH, OW] channels-last
    taps_ptr,  # *i32 [num M tiles * num N tiles] executed taps per program; only written when COUNT_TAPS
    N, H, W, C_IN, C_OUT, OH, OW,  # problem size
    M_BUCKET, DEVICE_KEY,  # autotune keys only (bucketed N*OH*OW, device index); unused in the body
    stride_xn, stride_xh, stride_xw,  # input strides in elements (channel stride is 1)
    stride_rn, stride_rh, stride_rw,  # residual strides in elements (channel stride is 1)
    stride_on, stride_oh, stride_ow,  # output strides in elements (channel stride is 1)
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,  # convolution geometry
    KH: tl.constexpr, KW: tl.constexpr,  # kernel size (odd)
    HAS_BIAS: tl.constexpr,  # add bias_ptr[co] in the epilogue
    HAS_RESIDUAL: tl.constexpr,  # add res_ptr[n, co, oh, ow] in the epilogue, before the activation
    ACTIVATION: tl.constexpr,  # epilogue activation (activate): 0 none, 1 ReLU, 2 hardswish
    COUNT_TAPS: tl.constexpr,  # telemetry: write the number of executed taps to taps_ptr
    INPUT_PRECISION: tl.constexpr,  # tl.dot input precision for float32 inputs: "ieee" or "tf32"
    DOT_IN_FP32: tl.constexpr,  # interpreter only: upcast bf16 operands before tl.dot (see dot_in_fp32)
    # Meta-parameters
    BLOCK_OH: tl.constexpr, BLOCK_OW: tl.constexpr,  # BLOCK_M = BLOCK_OH * BLOCK_OW output pixels
    BLOCK_N: tl.constexpr,  # output channels per program
    BLOCK_K: tl.constexpr,  # input channels per K step
    GROUP_M: tl.constexpr,  # M tiles per L2 swizzle group
    RASTER: tl.constexpr,  # raster-order M tiles (True) or BLOCK_OH × BLOCK_OW spatial patches (False)
    USE_TMA: tl.constexpr,  # load A and B through TMA tensor descriptors (sm_90+, stride 1, spatial tiles)
):
    pid = tl.program_id(0)
    num_pid_m = num_m_tiles(N, OH, OW, RASTER, BLOCK_OH, BLOCK_OW)
    num_pid_n = tl.cdiv(C_OUT, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)
    conv_tile(x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, taps_ptr + pid_m * num_pid_n + pid_n, pid_m, pid_n,
              N, H, W, C_IN, C_OUT, OH, OW,
              stride_xn, stride_xh, stride_xw, stride_rn, stride_rh, stride_rw, stride_on, stride_oh, stride_ow,
              STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W, KH, KW, KH, KW,
              HAS_BIAS, HAS_RESIDUAL, ACTIVATION, COUNT_TAPS, INPUT_PRECISION, DOT_IN_FP32,
              RASTER, BLOCK_OH, BLOCK_OW, BLOCK_N, BLOCK_K, USE_TMA)


AUTOTUNE_KEY = ["C_IN", "C_OUT", "KH", "KW", "STRIDE_H", "STRIDE_W", "DIL_H", "DIL_W", "M_BUCKET", "DEVICE_KEY"]
# 3×3 (and larger) convs tune over spatial and raster tiles; 1×1 convs are plain GEMMs: raster tiles only.
_conv_autotuned = triton.autotune(configs=get_autotune_configs(), key=AUTOTUNE_KEY,
                                  prune_configs_by={"early_config_prune": prune_by_executed_work},
                                  **autotune_cache_kwargs())(_conv_bn_relu_kernel)
_conv1x1_autotuned = triton.autotune(configs=get_autotune_configs(kind="raster"), key=AUTOTUNE_KEY,
                                     **autotune_cache_kwargs())(_conv_bn_relu_kernel)


class TapCounts(NamedTuple):
    """Executed taps per program, from ``return_tap_counts=True``.

    Spatial tiles: ``counts`` is int32 ``[N, tiles_oh, tiles_ow, tiles_n]``; tile ``(th, tw)`` of image ``n``
    covers output rows ``[th*block_oh, (th+1)*block_oh)`` and columns ``[tw*block_ow, (tw+1)*block_ow)``; the
    last axis is the output-channel tile (all of them run the same taps). Raster tiles (``raster=True``):
    ``[tiles_m, tiles_n]``, tile ``i`` covering pixels ``[i*block_oh*block_ow, (i+1)*block_oh*block_ow)`` of
    the row-major ``N·OH·OW`` list.
    """

    counts: Tensor
    block_oh: int
    block_ow: int
    raster: bool = False


_LAUNCH_PLANS: dict[tuple, _LaunchPlan] = {}
_MAX_PLANS = 4096


def _launch_signature(x, packed_weight, bias, residual, kernel_size, stride, padding, dilation, relu, activation,
                      allow_tf32, config) -> tuple | None:
    """Everything but the data that a launch depends on (shapes, strides, dtypes, devices, geometry, the
    activation as passed, TF32 mode, config): two calls with one signature take the same checks and the same launch arguments. ``None`` when
    an argument is not hashable (lists, odd types: the checked path then runs)."""
    if type(x) is not Tensor or type(packed_weight) is not Tensor:
        return None
    tf32 = bool(torch.backends.cudnn.allow_tf32) if allow_tf32 is None else allow_tf32
    sig = (x.shape, x.stride(), x.dtype, x.device, packed_weight.shape, packed_weight.stride(), packed_weight.dtype,
           packed_weight.device,
           None if bias is None else (type(bias), bias.shape, bias.dtype, bias.device, bias.is_contiguous()),
           None if residual is None else (type(residual), residual.shape, residual.stride(), residual.dtype,
                                          residual.device),
           kernel_size, stride, padding, dilation, relu, activation, tf32, config)
    try:
        hash(sig)
    except TypeError:
        return None
    return sig


def _remember(sig: tuple, plan: _LaunchPlan) -> None:
    if len(_LAUNCH_PLANS) >= _MAX_PLANS:
        _LAUNCH_PLANS.clear()
    _LAUNCH_PLANS[sig] = plan


class _LaunchPlan:
    """A checked launch, replayable for any call with the same signature: the kernel (the autotuned one's
    chosen config, read after its first launch), constexprs, grid and scalar arguments, built once."""

    __slots__ = ("consts", "device", "dtype", "fn", "grid", "out_shape", "scalars", "tma")

    def __init__(self, kernel, consts: dict, grid, scalars: tuple, out_shape: tuple, dtype, device) -> None:
        if isinstance(kernel, triton.runtime.Autotuner):
            config = kernel.best_config  # what the launch above ran (tuned, or from the tuning cache)
            consts = {**consts, **config.all_kwargs()}
            kernel = kernel.fn
        self.fn, self.consts, self.scalars = kernel, consts, scalars
        self.grid = grid(consts)
        self.out_shape, self.dtype, self.device = out_shape, dtype, device
        self.tma = bool(consts.get("USE_TMA", False))

    def launch(self, x: Tensor, packed_weight: Tensor, bias: Tensor | None, residual: Tensor | None) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        packed_weight = packed_weight.contiguous()
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
            bias = bias.detach().to(torch.float32).contiguous()
        out = self.new_out()
        res = out if residual is None else residual.contiguous(memory_format=torch.channels_last)
        self.run(x, packed_weight, out if bias is None else bias, res, out, out)
        return out

    def new_out(self) -> Tensor:
        return torch.empty(self.out_shape, device=self.device, dtype=self.dtype, memory_format=torch.channels_last)

    def run(self, x: Tensor, *tensors: Tensor) -> None:
        """Launch with the tensor arguments ``(x, *tensors)`` followed by the remembered scalars."""
        if self.tma:
            ensure_tma_allocator(x, True)
        with launch_guard(x):
            self.fn.run(x, *tensors, *self.scalars, grid=self.grid, warmup=False, **self.consts)


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
                 padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1, relu: bool | None = None,
                 residual: Tensor | None = None, allow_tf32: bool | None = None, out: Tensor | None = None,
                 activation: str | None = None) -> Tensor:
    """``act(conv2d(x, weight, stride, padding, dilation) + bias [+ residual])`` in one kernel; ``groups=1``.

    Args:
        x: ``[N, Cin, H, W]`` float32 / float16 / bfloat16. Channels-last is the fast path; any other
            layout is first copied to channels-last (``x.contiguous(memory_format=torch.channels_last)``).
        weight: ``[Cout, Cin, KH, KW]`` (PyTorch layout, BatchNorm folded in, see ``fold_bn``), odd KH, KW,
            same dtype as ``x``. Packed on every call: modules should use :func:`conv_bn_relu_packed`.
        bias: ``[Cout]`` folded BatchNorm shift, or ``None``. Added in float32.
        stride, padding, dilation: ints or ``(h, w)`` pairs, as in ``F.conv2d``.
        relu: the older spelling of ``activation``: ``True`` ReLU, ``False`` none.
        residual: optional ``[N, Cout, OH, OW]`` tensor in ``x``'s dtype, added in the epilogue before the
            activation.
        allow_tf32: float32 only: TF32 tensor cores (``True``) or exact IEEE products (``False``);
            ``None`` follows ``torch.backends.cudnn.allow_tf32`` like ``F.conv2d``.
        out: optional preallocated channels-last ``[N, Cout, OH, OW]`` output in ``x``'s dtype.
        activation: ``"none"``, ``"relu"`` or ``"hardswish"``, applied last (after bias and residual). Neither
            ``relu`` nor ``activation`` given: ReLU. Both given: they must agree (``relu`` says whether it is
            ReLU), else a ``ValueError``.
    Returns:
        ``[N, Cout, OH, OW]`` channels-last, in ``x``'s dtype; accumulation is float32. Inference only: the
        result carries no autograd history.
    Raises:
        TypeError: non-tensor arguments, dtypes other than float32/float16/bfloat16, mismatched dtypes.
        ValueError: wrong ranks or shapes, groups != 1, even kernel sizes, bad stride/padding/dilation, an
            empty output, tensors on different devices, CPU tensors without ``TRITON_INTERPRET=1``, an unknown
            activation or one that contradicts ``relu``.
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
                               stride=stride, padding=padding, dilation=dilation, relu=relu, residual=residual,
                               allow_tf32=allow_tf32, out=out, activation=activation)


def conv_bn_relu_packed(x: Tensor, packed_weight: Tensor, bias: Tensor | None = None, *,
                        kernel_size: int | tuple[int, int], stride: int | tuple[int, int] = 1,
                        padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1,
                        relu: bool | None = None, residual: Tensor | None = None, allow_tf32: bool | None = None,
                        out: Tensor | None = None, config: triton.Config | None = None,
                        return_tap_counts: bool = False, activation: str | None = None,
                        ) -> Tensor | tuple[Tensor, TapCounts]:
    """Like :func:`conv_bn_relu`, with the weight already packed by :func:`pack_weight` (what modules call).

    Args:
        x: ``[N, Cin, H, W]``, see :func:`conv_bn_relu`.
        packed_weight: ``[KH*KW*Cin, Cout]`` contiguous, same dtype as ``x``.
        bias: ``[Cout]`` or ``None``; converted to contiguous float32 unless it already is (modules keep a
            float32 copy so this costs nothing per call).
        kernel_size: ``(KH, KW)``, odd.
        residual: ``[N, Cout, OH, OW]`` in ``x``'s dtype, added before the activation, or ``None``.
        relu, activation: the epilogue activation, see :func:`conv_bn_relu`.
        config: run this ``triton.Config`` instead of autotuning (tests, telemetry).
        return_tap_counts: also return :class:`TapCounts`, the taps each program executed. Runs the
            telemetry build of the kernel with ``config`` (default: the first autotune config).
    Returns:
        ``out`` (``[N, Cout, OH, OW]`` channels-last), or ``(out, TapCounts)``.
    """
    sig = None
    if out is None and not return_tap_counts:
        sig = _launch_signature(x, packed_weight, bias, residual, kernel_size, stride, padding, dilation, relu,
                                activation, allow_tf32, config)
        plan = _LAUNCH_PLANS.get(sig) if sig is not None else None
        if plan is not None and not tracing():
            return plan.launch(x, packed_weight, bias, residual)
    activation = resolve_activation(relu, activation)
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
    check_device(x, {"weight": packed_weight, "bias": bias, "out": out, "residual": residual})
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"output would be empty: input {h}x{w}, kernel {kh}x{kw}, padding {(ph, pw)}, "
                         f"dilation {(dh, dw)}, stride {(sh, sw)} give {oh}x{ow}")
    if cin < 1 or cout < 1:
        raise ValueError(f"need at least one input and one output channel, got Cin={cin}, Cout={cout}")
    if residual is not None:
        check_tensor(residual, "residual")
        if tuple(residual.shape) != (n, cout, oh, ow):
            raise ValueError(f"residual must be the output's shape [N, Cout, OH, OW] = {[n, cout, oh, ow]}, "
                             f"got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual has dtype {residual.dtype}, expected {x.dtype} (the input dtype)")
        residual = residual.contiguous(memory_format=torch.channels_last)

    x = x.contiguous(memory_format=torch.channels_last)
    packed_weight = packed_weight.contiguous()
    out = check_out(out, (n, cout, oh, ow), x)
    if max(h * w * cin, oh * ow * cout, packed_weight.numel()) > INT32_MAX:
        raise ValueError("one image (or the weight) has more than 2**31-1 elements; offsets are int32")
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.detach().to(torch.float32).contiguous()

    if return_tap_counts:
        config = config or get_autotune_configs()[0]
    if n == 0:
        return (out, TapCounts(torch.zeros(0, 0, 0, 0, dtype=torch.int32), 1, 1)) if return_tap_counts else out

    def grid(meta):
        block_m = meta["BLOCK_OH"] * meta["BLOCK_OW"]
        tiles_m = (triton.cdiv(n * oh * ow, block_m) if meta.get("RASTER", False)
                   else n * triton.cdiv(oh, meta["BLOCK_OH"]) * triton.cdiv(ow, meta["BLOCK_OW"]))
        return (tiles_m * triton.cdiv(cout, meta["BLOCK_N"]),)

    counts = None
    if config is not None:
        meta = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        meta.setdefault("RASTER", False)
        meta.setdefault("USE_TMA", False)
        if meta["USE_TMA"] and (sh, sw) != (1, 1):
            raise ValueError("TMA configs run stride-1 convolutions only")
        if return_tap_counts:
            counts = torch.full(grid(meta), -1, dtype=torch.int32, device=x.device)
        kernel = _conv_bn_relu_kernel
    else:
        kernel = _conv1x1_autotuned if (kh, kw) == (1, 1) else _conv_autotuned
        meta = {}
    res = residual if residual is not None else out
    ensure_tma_allocator(x, config is None or meta["USE_TMA"])
    scalars = (n, h, w, cin, cout, oh, ow, m_bucket(n * oh * ow), device_key(x),
               x.stride(0), x.stride(2), x.stride(3),
               res.stride(0), res.stride(2), res.stride(3),
               out.stride(0), out.stride(2), out.stride(3),
               sh, sw, ph, pw, dh, dw)
    consts = dict(KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                  ACTIVATION=ACTIVATION_CODES[activation],
                  COUNT_TAPS=counts is not None, INPUT_PRECISION=resolve_input_precision(x.dtype, allow_tf32),
                  DOT_IN_FP32=dot_in_fp32(x.dtype), **meta)
    launcher = wrap_kernel(kernel, x)
    with launch_guard(x):
        launcher[grid](x, packed_weight, bias if bias is not None else out, res, out,
                       counts if counts is not None else out, *scalars, **consts)
    if sig is not None and launcher is kernel:  # an eager launch: remember everything but the data
        _remember(sig, _LaunchPlan(kernel, consts, grid, scalars, (n, cout, oh, ow), x.dtype, x.device))
    if return_tap_counts:
        bo, bw, raster = meta["BLOCK_OH"], meta["BLOCK_OW"], bool(meta["RASTER"])
        tiles_n = triton.cdiv(cout, meta["BLOCK_N"])
        shape = (-1, tiles_n) if raster else (n, triton.cdiv(oh, bo), triton.cdiv(ow, bw), tiles_n)
        return out, TapCounts(counts.view(*shape), bo, bw, raster)
    return out
