"""Plain-PyTorch twins of the Triton kernels (torch only, no triton).

Tests, benchmarks and the export path import these functions; none of them keeps its own copy. They are
written for clarity, not speed: every function is the textbook composition of ``F.conv2d`` and friends.

>>> import torch
>>> conv, bn = torch.nn.Conv2d(4, 8, 3, padding=2, dilation=2), torch.nn.BatchNorm2d(8).eval()
>>> x = torch.randn(1, 4, 9, 9)
>>> w, b = fold_bn(conv, bn)
>>> torch.allclose(conv_bn_relu_reference(x, w, b, padding=2, dilation=2),
...                conv_bn_relu_module_reference(x, conv, bn), atol=1e-5)
True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import ACTIVATIONS, resolve_activation

__all__ = [
    "activation_reference",
    "aspp_branches_reference",
    "aspp_project_reference",
    "conv_bn_relu_module_reference",
    "conv_bn_relu_reference",
    "depthwise_conv_act_reference",
    "fold_bn",
]

IntPair = int | tuple[int, int]


def conv_bn_relu_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, stride: IntPair = 1,
                           padding: IntPair = 0, dilation: IntPair = 1, relu: bool | None = None,
                           residual: Tensor | None = None, activation: str | None = None) -> Tensor:
    """``act(conv2d(x, weight) + bias [+ residual])``: the twin of :func:`fastdeeplab.kernels.conv_bn_relu`.

    Args:
        x: ``[N, Cin, H, W]``, any memory format.
        weight: ``[Cout, Cin, KH, KW]`` with BatchNorm already folded in (see :func:`fold_bn`).
        bias: ``[Cout]``, the folded BatchNorm shift, or ``None``.
        relu, activation: the epilogue activation, ``"none"``, ``"relu"`` (the default) or ``"hardswish"``;
            ``relu=True/False`` is the older spelling of ``"relu"``/``"none"`` (see
            :func:`fastdeeplab.kernels._utils.resolve_activation`).
        residual: ``[N, Cout, OH, OW]`` added before the activation, or ``None``.
    Returns:
        ``[N, Cout, OH, OW]`` in ``x``'s dtype.
    """
    activation = resolve_activation(relu, activation)
    y = F.conv2d(x, weight, None if bias is None else bias.to(x.dtype), stride=stride, padding=padding,
                 dilation=dilation)
    if residual is not None:
        y = y + residual
    return activation_reference(y, activation)


def activation_reference(y: Tensor, activation: str) -> Tensor:
    """The kernels' epilogue activations in PyTorch: ``F.relu``, ``F.hardswish`` or nothing."""
    if activation == "relu":
        return F.relu(y)
    if activation == "hardswish":
        return F.hardswish(y)
    if activation != "none":
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return y


DEPTHWISE_ACTIVATIONS = ACTIVATIONS  # the older name (kernels/_utils.py holds the list)


def depthwise_conv_act_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, stride: IntPair = 1,
                                 padding: IntPair = 0, dilation: IntPair = 1, activation: str = "none",
                                 se_scale: Tensor | None = None) -> Tensor:
    """``act(depthwise_conv2d(x, weight) + bias) * se_scale[n, c]``: the twin of
    :func:`fastdeeplab.kernels.depthwise_conv_act`.

    The order is MobileNetV3's inverted residual (torchvision ``InvertedResidual``): depthwise conv → BN
    (folded into ``weight``/``bias``) → activation → squeeze-excitation, whose output is the activated map
    times a per-(image, channel) scale; ``se_scale`` is that scale, already computed.

    Args:
        x: ``[N, C, H, W]``, any memory format; float64 works (tests use it as the exact reference).
        weight: ``[C, 1, KH, KW]``, one filter per channel (``groups=C``).
        bias: ``[C]`` or ``None``.
        activation: ``"none"``, ``"relu"`` or ``"hardswish"``.
        se_scale: ``[N, C]`` multiplied in after the activation, or ``None``.
    Returns:
        ``[N, C, OH, OW]`` in ``x``'s dtype.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    y = F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), stride=stride,
                 padding=padding, dilation=dilation, groups=x.shape[1])
    y = activation_reference(y, activation)
    if se_scale is not None:
        y = y * se_scale.to(x.dtype)[:, :, None, None]
    return y


def aspp_branches_reference(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None],
                            rates: Sequence[int], *, relu: bool = True) -> list[Tensor]:
    """ASPP's four spatial branches: ``weights[0]`` a 1×1 conv, ``weights[1:]`` 3×3 convs at ``rates`` ("same"
    padding), each + bias (+ ReLU). The twin of :func:`fastdeeplab.kernels.aspp.aspp_branches_packed`."""
    pads = [0, *rates]
    return [conv_bn_relu_reference(x, w, b, padding=p, dilation=max(p, 1), relu=relu)
            for w, b, p in zip(weights, biases, pads, strict=True)]


def conv_bn_relu_module_reference(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, *, relu: bool = True) -> Tensor:
    """The unfolded chain ``conv → batch_norm(eval statistics) → relu``, as an un-optimised model runs it."""
    y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, momentum=0.0,
                     eps=bn.eps)
    return F.relu(y) if relu else y


@torch.no_grad()
def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm into the convolution before it.

    ``bn(conv(x)) == conv2d(x, weight) + bias`` with ``weight = conv.weight * s`` per output channel,
    ``bias = (conv.bias - running_mean) * s + bn.bias`` and ``s = bn.weight / sqrt(running_var + eps)``.
    The arithmetic runs in float64 and the results are cast back to ``conv.weight``'s dtype; they are new,
    detached tensors on ``conv.weight``'s device.

    Returns:
        ``(weight [Cout, Cin/groups, KH, KW], bias [Cout])``.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_bn needs a BatchNorm with running statistics (track_running_stats=True)")
    cout = conv.weight.shape[0]
    if bn.num_features != cout:
        raise ValueError(f"BatchNorm has {bn.num_features} features but the conv has {cout} output channels")
    f64 = torch.float64
    scale = torch.rsqrt(bn.running_var.to(f64) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(f64)
    shift = -bn.running_mean.to(f64)
    if conv.bias is not None:
        shift = shift + conv.bias.to(f64)
    bias = shift * scale
    if bn.bias is not None:
        bias = bias + bn.bias.to(f64)
    weight = conv.weight.to(f64) * scale.view(-1, 1, 1, 1)
    dtype = conv.weight.dtype
    return weight.to(dtype).detach(), bias.to(dtype).detach()


def aspp_project_reference(branches: Sequence[Tensor], pooled: Tensor, weight: Tensor, bias: Tensor | None = None,
                           *, relu: bool = True) -> Tensor:
    """ASPP's projection done the literal way: broadcast the pooled branch, concatenate, 1×1 conv, ReLU.

    Args:
        branches: the spatial branch outputs, each ``[N, Cb, H, W]``.
        pooled: ``[N, Cb]``, the image-pooling branch after its own conv + BN + ReLU.
        weight: ``[Cout, (len(branches) + 1) * Cb, 1, 1]``, BatchNorm folded; the pooled branch's slice last.
        bias: ``[Cout]`` or ``None``.
    Returns:
        ``[N, Cout, H, W]``.
    """
    n, _, h, w = branches[0].shape
    pool = pooled[:, :, None, None].expand(n, pooled.shape[1], h, w)
    y = F.conv2d(torch.cat([*branches, pool], dim=1), weight, bias)
    return F.relu(y) if relu else y
