"""Depthwise dilated convolution + bias + activation [+ squeeze-excitation scale] in one Triton kernel.

MobileNetV3's inverted residual (torchvision ``InvertedResidual``) runs, per block,
``1×1 expand → depthwise KxK conv → BN → act → [SE] → 1×1 project``. This kernel is the middle part:

    out[n, c, oh, ow] = act(Σ_{kh,kw} x[n, c, oh·s - p + kh·d, ow·s - p + kw·d] · W[c, kh, kw] + bias[c])
                        · se_scale[n, c]

with ``groups = C`` (one input channel per filter, channel multiplier 1), zero padding, BatchNorm folded into
``W`` and ``bias`` (:func:`fastdeeplab.kernels.fold_bn`), ``act`` one of none / ReLU / hardswish
(``x · relu6(x + 3) / 6``, as ``torch.nn.functional.hardswish``) and ``se_scale`` an optional ``[N, C]``
tensor multiplied in *after* the activation. That is the squeeze-excitation's output ``input · scale``, whose
``scale = hardsigmoid(fc2(relu(fc1(mean_hw(input)))))`` comes from the activated depthwise output itself,
so the scale must be known before the launch that applies it. :func:`depthwise_conv_act_packed` can also
produce the SE's pooled input without writing the map (``channel_sums=``, ``write_output=False``): a first
launch sums ``act(conv + bias)`` per (image, channel), the small SE layers turn the means into the scale, and
a second launch recomputes the conv and writes ``act(...) · scale``. The depthwise conv is cheap (KH·KW MACs
per output), so recomputing it costs less than writing, re-reading and re-writing the expanded map.

**Tiling.** Channels-last input: one program owns ``BLOCK_P`` consecutive output pixels of one image (the
row-major ``OH·OW`` list, so only an image's last tile is partial) × ``BLOCK_C`` channels, which are
contiguous in memory, so every tap is one coalesced ``[BLOCK_P, BLOCK_C]`` load. The kernel rows are
looped over, the ``KW`` taps of a row unrolled; a tap whose input pixel falls in the zero padding is masked, never loaded.
Programs are numbered channel tile fastest, so neighbouring programs read neighbouring memory. There is no
reduction over channels, so no tensor cores: the kernel is memory-bound and its work is the loads.

**Precision and bounds.** Products and sums are float32 whatever the input dtype (fp32, fp16, bf16); the
bias is added in float32, the SE scale is read in its own dtype and converted to float32, and the result is
cast once to the output dtype. Offsets within one image are int32 (the launcher checks that an image, its
zero-padded extent and the weight fit), the image base is int64.

**Autotuning** is keyed on channels, kernel, stride, dilation, a bucketed ``N·OH·OW`` and the device, never
on raw H and W; an early prune drops tilings that would pad away over 1.25× the work of the leanest one.

>>> import torch
>>> from fastdeeplab.kernels import depthwise_conv_act
>>> x = torch.randn(2, 96, 33, 33, device="cuda").to(memory_format=torch.channels_last)  # doctest: +SKIP
>>> w, b = torch.randn(96, 1, 5, 5, device="cuda"), torch.randn(96, device="cuda")  # doctest: +SKIP
>>> y = depthwise_conv_act(x, w, b, padding=4, dilation=2, activation="hardswish")  # doctest: +SKIP
"""

from __future__ import annotations

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
    interpreting,
    launch_guard,
    m_bucket,
    pair,
    patch_interpreter_indices,
    wrap_kernel,
)
from .conv import activate

patch_interpreter_indices()  # triton 3.6's interpreter + NumPy 2 (a no-op on GPUs and on triton 3.8)

__all__ = [
    "ACTIVATIONS",
    "depthwise_conv_act",
    "depthwise_conv_act_packed",
    "get_autotune_configs",
    "get_interpreter_config",
    "pack_depthwise_weight",
    "prune_by_padding",
]

# Activation name -> the kernel's ACTIVATION code: none 0, relu 1, hardswish 2 (kernels/_utils.py, shared).
ACTIVATIONS = ACTIVATION_CODES
MAX_KERNEL = 7  # taps are unrolled: KH, KW <= 7 (MobileNet and EfficientNet use 3, 5 and 7)
# Keep configs within this factor of the leanest config's padded work (pixels × channels it computes).
PAD_SLACK = 1.25


def get_autotune_configs(*, for_interpreter: bool | None = None) -> list[triton.Config]:
    """The tilings the autotuner chooses from: ``BLOCK_P`` pixels × ``BLOCK_C`` channels, num_warps.

    Wide channel tiles for the expanded layers (240 to 960 channels), narrow ones for the 16- to 72-channel
    early layers at large maps. No loop is pipelined (the taps are unrolled), so ``num_stages`` is 1. Every
    config compiles with zero spills on sm_80 and sm_90 (``python -m fastdeeplab.kernels.aot --kernel
    depthwise3x3 depthwise5x5``). Under the interpreter: the single :func:`get_interpreter_config`.
    """
    if for_interpreter is None:
        for_interpreter = interpreting()
    if for_interpreter:
        return [get_interpreter_config()]
    # (BLOCK_P, BLOCK_C, num_warps)
    tilings = [
        (128, 16, 4),   # 16-channel maps (first block): 32-byte fp16 rows, many pixels per program
        (128, 32, 4),
        (64, 64, 4),
        (32, 128, 4),   # 128 fp16 channels = 256 contiguous bytes per pixel
        (16, 256, 8),   # 8 warps: with 4, fp32 5x5 spills on sm_90
        (64, 128, 8),
        (32, 256, 8),
    ]
    return [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w, num_stages=1) for p, c, w in tilings]


def get_interpreter_config() -> triton.Config:
    """The config used under ``TRITON_INTERPRET=1``: small tiles (16 pixels × 8 channels), so CPU tests
    cover several pixel tiles per image, partial tiles and several channel tiles."""
    return triton.Config({"BLOCK_P": 16, "BLOCK_C": 8}, num_warps=4, num_stages=1)


def prune_by_padding(configs: list, named_args: dict, **kwargs) -> list:
    """Autotune early prune: keep the configs whose padded work (``ceil(OH·OW / BLOCK_P)·BLOCK_P`` ×
    ``ceil(C / BLOCK_C)·BLOCK_C`` per image) is within ``PAD_SLACK`` of the leanest one, so a 24-channel
    layer is not timed with 256-channel tiles that compute 90% padding."""
    if len(configs) <= 1:
        return configs
    a = {**named_args, **kwargs}
    pixels, channels = a["OH"] * a["OW"], a["C"]
    work = [triton.cdiv(pixels, c.kwargs["BLOCK_P"]) * c.kwargs["BLOCK_P"]
            * triton.cdiv(channels, c.kwargs["BLOCK_C"]) * c.kwargs["BLOCK_C"] for c in configs]
    best = min(work)
    return [c for c, w in zip(configs, work) if w <= PAD_SLACK * best]


# Sizes that change with the image or batch are never specialised (no recompiles per size).
_NOT_SPECIALISED = ["N", "H", "W", "OH", "OW", "P_BUCKET", "DEVICE_KEY"]


@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def _depthwise_conv_act_kernel(
    x_ptr,  # *T input [N, C, H, W] channels-last: (n, c, h, w) at n*stride_xn + h*stride_xh + w*stride_xw + c
    w_ptr,  # *T packed weight [KH*KW, C] row-major: row kh*KW + kw holds tap (kh, kw) of every channel
    bias_ptr,  # *fp32 [C] folded BatchNorm shift; not read unless HAS_BIAS
    se_ptr,  # *fp32|T SE scale [N, C]: (n, c) at n*stride_sn + c; not read unless HAS_SE
    sum_ptr,  # *fp32 [N, C] channel sums: (n, c) at n*C + c, atomically added to; only when CHANNEL_SUMS
    out_ptr,  # *T output [N, C, OH, OW] channels-last; not written unless WRITE_OUTPUT
    N, H, W, C, OH, OW,  # problem size
    P_BUCKET, DEVICE_KEY,  # autotune keys only (bucketed N*OH*OW, device index); unused in the body
    stride_xn, stride_xh, stride_xw,  # input strides in elements (channel stride is 1)
    stride_sn,  # SE scale row stride in elements (channel stride is 1)
    stride_on, stride_oh, stride_ow,  # output strides in elements (channel stride is 1)
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,  # convolution geometry
    KH: tl.constexpr, KW: tl.constexpr,  # kernel size (taps unrolled)
    HAS_BIAS: tl.constexpr,  # add bias_ptr[c] before the activation
    ACTIVATION: tl.constexpr,  # 0 none, 1 ReLU, 2 hardswish
    HAS_SE: tl.constexpr,  # multiply by se_ptr[n, c] after the activation
    CHANNEL_SUMS: tl.constexpr,  # add Σ_pixels of the epilogue's result to sum_ptr[n, c]
    WRITE_OUTPUT: tl.constexpr,  # store the map (False: only the channel sums)
    # Meta-parameters
    BLOCK_P: tl.constexpr,  # output pixels per program (consecutive in one image's row-major OH*OW list)
    BLOCK_C: tl.constexpr,  # channels per program
):
    # ---- program -> (image, pixel tile, channel tile), channel tile fastest
    pid = tl.program_id(0)
    ohw = OH * OW
    tiles_c = tl.cdiv(C, BLOCK_C)
    tiles_p = tl.cdiv(ohw, BLOCK_P)
    pid_c = pid % tiles_c
    rest = pid // tiles_c
    pid_p = rest % tiles_p
    img = rest // tiles_p

    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < ohw
    p = tl.where(p_ok, p, 0)  # rows past the image read pixel 0's address (masked): offsets stay in range
    oh = p // OW
    ow = p % OW
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    x_img = x_ptr + img.to(tl.int64) * stride_xn  # 64-bit image base, int32 offsets inside the image

    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for kh in range(KH):  # a loop, not unrolled: unrolling all KH*KW taps hoists their loads and spills on sm_90
        ih = ih0 + kh * DIL_H
        row_ok = p_ok & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = iw0 + kw * DIL_W
            ok = row_ok & (iw >= 0) & (iw < W)
            pix = ih * stride_xh + iw * stride_xw  # within the padded extent: int32-safe (launcher)
            xv = tl.load(x_img + pix[:, None] + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
            wv = tl.load(w_ptr + (kh * KW + kw) * C + c, mask=c_ok, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]

    # ---- epilogue: bias -> activation -> SE scale -> cast
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=c_ok, other=0.0)[None, :]
    acc = activate(acc, ACTIVATION)  # the conv kernel's epilogue activation (NaN stays NaN, like torch)
    if HAS_SE:
        scale = tl.load(se_ptr + img.to(tl.int64) * stride_sn + c, mask=c_ok, other=0.0)
        acc = acc * scale.to(tl.float32)[None, :]
    mask = p_ok[:, None] & c_ok[None, :]
    if CHANNEL_SUMS:
        part = tl.sum(tl.where(mask, acc, 0.0), axis=0)
        tl.atomic_add(sum_ptr + img.to(tl.int64) * C + c, part, mask=c_ok)
    if WRITE_OUTPUT:
        out_img = out_ptr + img.to(tl.int64) * stride_on
        opix = oh * stride_oh + ow * stride_ow
        tl.store(out_img + opix[:, None] + c[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# The pass kind is part of the key: SE's pooling pass (channel sums, no map written) and its scaled pass (map
# written, scale read) move different bytes, so one must not reuse the config tuned for the other.
AUTOTUNE_KEY = ["C", "KH", "KW", "STRIDE_H", "STRIDE_W", "DIL_H", "DIL_W", "P_BUCKET", "DEVICE_KEY",
                "HAS_SE", "CHANNEL_SUMS", "WRITE_OUTPUT"]
_depthwise_autotuned = triton.autotune(configs=get_autotune_configs(), key=AUTOTUNE_KEY,
                                       prune_configs_by={"early_config_prune": prune_by_padding},
                                       reset_to_zero=["sum_ptr"],
                                       **autotune_cache_kwargs())(_depthwise_conv_act_kernel)


def pack_depthwise_weight(weight: Tensor) -> Tensor:
    """Pack a depthwise conv weight ``[C, 1, KH, KW]`` into the kernel's ``[KH*KW, C]`` (contiguous).

    Row ``kh*KW + kw`` holds tap ``(kh, kw)`` of every channel, so a tap's weights for a channel tile are
    one contiguous load. Modules call this once.
    """
    check_tensor(weight, "weight")
    if weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(f"weight must be [C, 1, KH, KW] (one filter per channel), got shape {tuple(weight.shape)}")
    c, _, kh, kw = weight.shape
    return weight.detach().reshape(c, kh * kw).t().contiguous()


def depthwise_conv_act(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                       stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                       dilation: int | tuple[int, int] = 1, activation: str = "none",
                       se_scale: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """``act(conv2d(x, weight, groups=C) + bias) * se_scale[n, c]`` in one kernel (see the module docstring).

    Args:
        x: ``[N, C, H, W]`` float32 / float16 / bfloat16. Channels-last is the fast path; any other layout
            is first copied to channels-last.
        weight: ``[C, 1, KH, KW]`` (PyTorch's depthwise layout, BatchNorm folded in), ``1 <= KH, KW <= 7``,
            same dtype as ``x``. Packed on every call: modules should use :func:`depthwise_conv_act_packed`.
        bias: ``[C]`` folded BatchNorm shift, or ``None``. Added in float32.
        stride, padding, dilation: ints or ``(h, w)`` pairs, as in ``F.conv2d``.
        activation: ``"none"``, ``"relu"`` or ``"hardswish"``, applied after the bias.
        se_scale: ``[N, C]`` squeeze-excitation scale (float32 or ``x``'s dtype) multiplied in after the
            activation, or ``None``.
        out: optional preallocated dense channels-last ``[N, C, OH, OW]`` output in ``x``'s dtype.
    Returns:
        ``[N, C, OH, OW]`` channels-last in ``x``'s dtype; accumulation is float32. Inference only: the result
        carries no autograd history.
    Raises:
        TypeError: non-tensor arguments, unsupported or mismatched dtypes, non-int geometry.
        ValueError: wrong ranks or shapes (a weight that is not one filter per channel), kernel sizes out of
            range, bad stride/padding/dilation, an unknown activation, an empty output, tensors on different
            devices, CPU tensors without ``TRITON_INTERPRET=1``.
    """
    check_tensor(x, "x")
    check_tensor(weight, "weight")
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be [C, 1, KH, KW], got shape {tuple(weight.shape)}")
    if weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight must be [C, 1, KH, KW] = [{x.shape[1]}, 1, KH, KW] for x with {x.shape[1]} "
                         f"channels (depthwise: groups = C, one filter per channel), got {tuple(weight.shape)}")
    check_float_dtype(x, "x")
    check_float_dtype(weight, "weight")
    check_device(x, {"weight": weight})
    return depthwise_conv_act_packed(x, pack_depthwise_weight(weight), bias,
                                     kernel_size=(weight.shape[2], weight.shape[3]), stride=stride,
                                     padding=padding, dilation=dilation, activation=activation,
                                     se_scale=se_scale, out=out)


def depthwise_conv_act_packed(x: Tensor, packed_weight: Tensor, bias: Tensor | None = None, *,
                              kernel_size: int | tuple[int, int], stride: int | tuple[int, int] = 1,
                              padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1,
                              activation: str = "none", se_scale: Tensor | None = None, out: Tensor | None = None,
                              channel_sums: Tensor | None = None, write_output: bool = True,
                              config: triton.Config | None = None) -> Tensor | None:
    """Like :func:`depthwise_conv_act`, with the weight packed by :func:`pack_depthwise_weight` (what modules
    call), plus the squeeze-excitation's pooling pass.

    Args:
        x: ``[N, C, H, W]``, see :func:`depthwise_conv_act`.
        packed_weight: ``[KH*KW, C]``, same dtype as ``x``.
        bias: ``[C]`` or ``None``; converted to contiguous float32 unless it already is.
        kernel_size: ``(KH, KW)``, each in ``[1, 7]``.
        se_scale: ``[N, C]`` multiplied in after the activation, or ``None``.
        channel_sums: a float32 ``[N, C]`` contiguous tensor, overwritten with
            ``Σ_{oh,ow} result[n, c, oh, ow]`` (the epilogue's float32 values before the cast: divide by
            ``OH·OW`` for the SE's mean). Programs add their partial sums atomically, so the float32
            summation order, and the last bits, can vary between runs.
        write_output: ``False`` skips storing the map (with ``channel_sums``: the SE pooling pass) and returns
            ``None``; ``out`` must then be ``None``.
        config: run this ``triton.Config`` instead of autotuning (tests, the interpreter).
    Returns:
        ``out`` (``[N, C, OH, OW]`` channels-last), or ``None`` when ``write_output=False``.
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
    if not (1 <= kh <= MAX_KERNEL and 1 <= kw <= MAX_KERNEL):
        raise ValueError(f"kernel_size must be in [1, {MAX_KERNEL}] (taps are unrolled), got {(kh, kw)}")
    if sh < 1 or sw < 1:
        raise ValueError(f"stride must be >= 1, got {(sh, sw)}")
    if dh < 1 or dw < 1:
        raise ValueError(f"dilation must be >= 1, got {(dh, dw)}")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be >= 0, got {(ph, pw)}")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    n, c, h, w = x.shape
    if packed_weight.dim() != 2 or tuple(packed_weight.shape) != (kh * kw, c):
        raise ValueError(f"packed_weight must be [KH*KW, C] = [{kh * kw}, {c}] for x with {c} channels and a "
                         f"{kh}x{kw} kernel, got shape {tuple(packed_weight.shape)}")
    if bias is not None:
        check_tensor(bias, "bias")
        if tuple(bias.shape) != (c,):
            raise ValueError(f"bias must be [C] = [{c}], got shape {tuple(bias.shape)}")
    if se_scale is not None:
        check_tensor(se_scale, "se_scale")
        if tuple(se_scale.shape) != (n, c):
            raise ValueError(f"se_scale must be [N, C] = [{n}, {c}], got shape {tuple(se_scale.shape)}")
        if se_scale.dtype not in (torch.float32, x.dtype):
            raise TypeError(f"se_scale has dtype {se_scale.dtype}; expected float32 or {x.dtype} (x's dtype)")
    if channel_sums is not None:
        check_tensor(channel_sums, "channel_sums")
        if tuple(channel_sums.shape) != (n, c) or channel_sums.dtype != torch.float32 \
                or not channel_sums.is_contiguous():
            raise ValueError(f"channel_sums must be a contiguous float32 [N, C] = [{n}, {c}] tensor, got "
                             f"{channel_sums.dtype} {tuple(channel_sums.shape)}")
    if not write_output and out is not None:
        raise ValueError("out must be None when write_output=False (nothing is written to it)")
    if not write_output and channel_sums is None:
        raise ValueError("write_output=False without channel_sums computes nothing; pass channel_sums=")
    check_device(x, {"weight": packed_weight, "bias": bias, "se_scale": se_scale, "out": out,
                     "channel_sums": channel_sums})
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"output would be empty: input {h}x{w}, kernel {kh}x{kw}, padding {(ph, pw)}, "
                         f"dilation {(dh, dw)}, stride {(sh, sw)} give {oh}x{ow}")
    if c < 1:
        raise ValueError(f"x needs at least one channel, got shape {tuple(x.shape)}")
    # int32 offsets inside one image: the zero-padded input extent (taps reach at most `padding` past an edge),
    # the output image and the weight must fit
    if max((h + 2 * ph) * (w + 2 * pw) * c, oh * ow * c, packed_weight.numel()) > INT32_MAX:
        raise ValueError("one (zero-padded) image has more than 2**31-1 elements; offsets are int32")

    x = x.contiguous(memory_format=torch.channels_last)
    packed_weight = packed_weight.contiguous()
    if write_output:
        out = check_out(out, (n, c, oh, ow), x)
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.detach().to(torch.float32).contiguous()
    if se_scale is not None:
        se_scale = se_scale.detach().contiguous()
    if n == 0:
        return out

    def grid(meta):
        return (n * triton.cdiv(oh * ow, meta["BLOCK_P"]) * triton.cdiv(c, meta["BLOCK_C"]),)

    if config is not None:
        kernel, meta, candidates = _depthwise_conv_act_kernel, dict(config.kwargs, num_warps=config.num_warps,
                                                                    num_stages=config.num_stages), [config]
    else:
        kernel, meta, candidates = _depthwise_autotuned, {}, get_autotune_configs()
    if max(grid(cfg.kwargs)[0] for cfg in candidates) > INT32_MAX:
        raise ValueError("too many programs for one launch (more than 2**31-1): split the batch")
    dummy = out if out is not None else x  # stands in for the pointers a flag switches off (never accessed)
    if channel_sums is not None:
        channel_sums.zero_()
    # the autotuner zeroes sum_ptr before each timing run: never hand it a tensor that holds data
    sums = channel_sums if channel_sums is not None else torch.empty(1, device=x.device, dtype=torch.float32)
    with launch_guard(x):
        wrap_kernel(kernel, x)[grid](
            x, packed_weight, bias if bias is not None else dummy, se_scale if se_scale is not None else dummy,
            sums, dummy,
            n, h, w, c, oh, ow, m_bucket(n * oh * ow), device_key(x),
            x.stride(0), x.stride(2), x.stride(3),
            se_scale.stride(0) if se_scale is not None else 0,
            dummy.stride(0), dummy.stride(2), dummy.stride(3),
            sh, sw, ph, pw, dh, dw,
            KH=kh, KW=kw, HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS[activation],
            HAS_SE=se_scale is not None, CHANNEL_SUMS=channel_sums is not None, WRITE_OUTPUT=bool(write_output),
            **meta,
        )
    return out if write_output else None

