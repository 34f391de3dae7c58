"""Fused inference modules and their backend dispatch.

* :class:`FusedConvBNReLU` — ``conv → BN (folded) → [+ residual] → [ReLU]`` with weights folded once.
* :class:`FusedBottleneck` — a ResNet bottleneck made of three of them, the residual add fused into the
  last conv's epilogue.
* :class:`FusedASPP` — ASPP whose projection never materialises the 5·256-channel concatenation and
  treats the image-pooling branch as what it is: one bias vector per image.

Backends, chosen per module at construction (``backend=``):

* ``"triton"`` — the Triton kernels of :mod:`fastdeeplab.kernels` (CUDA; CPU tensors run them only under
  ``TRITON_INTERPRET=1``, for testing).
* ``"torch"`` — plain PyTorch. On CPU, float32/bfloat16 convolutions call oneDNN's fused
  convolution + bias + (residual add) + ReLU primitive (``torch.ops.mkldnn._convolution_pointwise``), one
  pass over memory instead of three; elsewhere ``F.conv2d`` then in-place epilogue ops.

While exporting to ONNX or tracing, every module runs its plain ``F.conv2d`` form, so graphs hold only
standard ops (Conv, Relu, Add, GlobalAveragePool, Concat).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels.reference import fold_bn
from .model import capturing_graph

__all__ = ["BACKENDS", "FusedASPP", "FusedBottleneck", "FusedConvBNReLU"]

BACKENDS = ("torch", "triton")


def _onednn_fused_conv_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


_ONEDNN = _onednn_fused_conv_available()


def _interpreter_config(x: Tensor, *, spatial: bool = True):
    """On CPU tensors (only possible under ``TRITON_INTERPRET=1``) whole models run with large tiles: the
    interpreter's cost is per block iteration, and ResNet's 2048-channel layers would otherwise take minutes.
    The kernel tests cover the small, partial tiles. On CUDA: ``None``, i.e. autotune."""
    if x.device.type != "cpu":
        return None
    import triton

    tile = {"BLOCK_OH": 8, "BLOCK_OW": 8} if spatial else {"BLOCK_M": 64}
    return triton.Config({**tile, "BLOCK_N": 256, "BLOCK_K": 256, "GROUP_M": 8}, num_warps=4, num_stages=1)


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown layer backend {backend!r}; expected one of {BACKENDS}")
    return backend


class FusedConvBNReLU(nn.Module):
    """Inference-only ``conv2d → BatchNorm (folded) → [+ residual] → [ReLU]``, ``groups=1``.

    The weight ``[Cout, Cin, KH, KW]`` and bias ``[Cout]`` are folded once at construction and kept as
    buffers (nothing to train). ``stride``, ``padding`` and ``dilation`` stay plain attributes, so a model's
    ``set_output_stride`` can still change them.

    Args:
        conv: the convolution (its bias, if any, is folded too).
        bn: the BatchNorm that follows it, or ``None``.
        relu: apply ReLU last.
        backend: ``"torch"`` or ``"triton"`` (see the module docstring).

    ``forward(x, residual=None)``: ``x`` is ``[N, Cin, H, W]`` (channels-last is the fast layout),
    ``residual`` an optional ``[N, Cout, OH, OW]`` tensor added before the ReLU.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, *, relu: bool = True,
                 backend: str = "torch") -> None:
        super().__init__()
        if conv.groups != 1:
            raise ValueError(f"grouped convolutions are not supported (groups={conv.groups})")
        if bn is not None:
            weight, bias = fold_bn(conv, bn)
        else:
            weight = conv.weight.detach().clone()
            bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(weight.shape[0],
                                                                                        dtype=weight.dtype,
                                                                                        device=weight.device)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.stride = tuple(conv.stride)
        self.padding = tuple(conv.padding)
        self.dilation = tuple(conv.dilation)
        self.relu = relu
        self.backend = _check_backend(backend)
        self._packed: Tensor | None = None  # the Triton kernel's [KH*KW*Cin, Cout] weight, packed once
        self._onednn_packed: Tensor | None = None  # oneDNN's blocked weight for the last problem shape
        self._onednn_key: tuple | None = None

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (self.weight.shape[2], self.weight.shape[3])

    def _apply(self, fn, recurse: bool = True):  # .to()/.half()/.cuda(): repack lazily
        self._packed = self._onednn_packed = self._onednn_key = None
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if capturing_graph():
            return self._forward_plain(x, residual)
        if self.backend == "triton":
            return self._forward_triton(x, residual)
        if _ONEDNN and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
            return self._forward_onednn(x, residual)
        return self._forward_plain(x, residual)

    def _forward_plain(self, x: Tensor, residual: Tensor | None) -> Tensor:
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        if residual is not None:
            y = y + residual
        return F.relu(y) if self.relu else y

    def _onednn_weight(self, x: Tensor) -> Tensor:
        """The weight reordered once into oneDNN's blocked layout for this problem (4–17% faster per call
        than reordering inside every call); re-packed when the shape, stride or dilation changes."""
        key = (tuple(x.shape), x.dtype, self.padding, self.stride, self.dilation)
        if self._onednn_key != key:
            weight = self.weight.to(x.dtype).to_mkldnn()
            self._onednn_packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight, list(self.padding), list(self.stride), list(self.dilation), 1, list(x.shape))
            self._onednn_key = key
        return self._onednn_packed

    def _forward_onednn(self, x: Tensor, residual: Tensor | None) -> Tensor:
        args = (list(self.padding), list(self.stride), list(self.dilation), 1)
        unary = "relu" if self.relu else "none"
        weight = self._onednn_weight(x)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, *args, unary, [None], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, weight, self.bias, *args, "add",
                                                              1.0, unary, [None], "")

    def __getstate__(self) -> dict:  # copies and pickles never carry backend caches
        state = dict(self.__dict__)
        state.update(_packed=None, _onednn_packed=None, _onednn_key=None)
        return state

    def _forward_triton(self, x: Tensor, residual: Tensor | None) -> Tensor:
        from .kernels.conv import conv_bn_relu_packed, pack_weight

        if self._packed is None:
            self._packed = pack_weight(self.weight)
        fuse_relu = self.relu and residual is None
        y = conv_bn_relu_packed(x, self._packed, self.bias, kernel_size=self.kernel_size, stride=self.stride,
                                padding=self.padding, dilation=self.dilation, relu=fuse_relu,
                                config=_interpreter_config(x))
        if residual is not None:
            y = y.add_(residual)
            if self.relu:
                y = y.relu_()
        return y

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        s = f"{self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw}), stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        return s + f", relu={self.relu}, backend={self.backend!r}, dtype={self.weight.dtype}"


class FusedBottleneck(nn.Module):
    """A torchvision ResNet ``Bottleneck`` with folded BN: ``conv1 → conv2 → conv3 (+ shortcut) → ReLU``.

    Keeps the attribute names ``conv2`` and ``downsample`` so :meth:`Backbone.apply_plan` can change the
    stride and dilation in place.
    """

    def __init__(self, unit: nn.Module, *, backend: str = "torch") -> None:
        super().__init__()
        self.conv1 = FusedConvBNReLU(unit.conv1, unit.bn1, relu=True, backend=backend)
        self.conv2 = FusedConvBNReLU(unit.conv2, unit.bn2, relu=True, backend=backend)
        self.conv3 = FusedConvBNReLU(unit.conv3, unit.bn3, relu=True, backend=backend)
        ds = unit.downsample
        self.downsample = None if ds is None else FusedConvBNReLU(ds[0], ds[1], relu=False, backend=backend)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.conv3(self.conv2(self.conv1(x)), residual=identity)


class FusedASPP(nn.Module):
    """ASPP with its projection fused: ``ReLU(Σᵢ Wᵢ·bᵢ + c(n))``, ``c(n) = W_pool·pool(n) + shift``.

    The four spatial branches are :class:`FusedConvBNReLU`. The image-pooling branch is spatially constant,
    so its share of the projection is one bias vector per image; it is never upsampled nor pushed through
    the per-pixel GEMM. With ``backend="triton"`` the four per-branch GEMMs and that bias run in one kernel
    (:func:`fastdeeplab.kernels.aspp_project`), and the 1280-channel concatenation is never written.

    ``forward(x)``: ``[N, Cin, H, W]`` → ``[N, Cout, H, W]``.
    """

    def __init__(self, aspp: nn.Module, *, backend: str = "torch") -> None:
        super().__init__()
        convs = list(aspp.convs)
        if len(convs) != 5:
            raise ValueError(f"FusedASPP expects 4 spatial branches and image pooling, got {len(convs)} branches")
        self.backend = _check_backend(backend)
        self.branches = nn.ModuleList(FusedConvBNReLU(m[0], m[1], relu=True, backend=backend) for m in convs[:4])
        pool = convs[4]
        pool_w, pool_b = fold_bn(pool[1], pool[2])
        self.register_buffer("pool_weight", pool_w.flatten(1))  # [Cb, Cin]
        self.register_buffer("pool_bias", pool_b)  # [Cb]
        proj_w, proj_b = fold_bn(aspp.project[0], aspp.project[1])
        cb = pool_w.shape[0]
        self.register_buffer("spatial_weight", proj_w[:, : 4 * cb].contiguous())  # [Cout, 4*Cb, 1, 1]
        self.register_buffer("pooled_weight", proj_w[:, 4 * cb:].flatten(1).contiguous())  # [Cout, Cb]
        self.register_buffer("bias", proj_b)  # [Cout]
        self.relu = any(isinstance(m, nn.ReLU) for m in aspp.project)
        self._packed: Tensor | None = None

    def _apply(self, fn, recurse: bool = True):
        self._packed = None
        return super()._apply(fn, recurse)

    @property
    def weight(self) -> Tensor:
        """The whole projection ``[Cout, 5*Cb, 1, 1]``, the pooled branch's ``Cb`` inputs last."""
        return torch.cat([self.spatial_weight, self.pooled_weight[:, :, None, None]], dim=1)

    @property
    def rates(self) -> tuple[int, ...]:
        return tuple(b.dilation[0] for b in self.branches[1:])

    def set_rates(self, rates: Sequence[int]) -> None:
        if len(rates) != len(self.branches) - 1:
            raise ValueError(f"ASPP has {len(self.branches) - 1} atrous branches, got {len(rates)} rates")
        for branch, r in zip(self.branches[1:], rates):
            branch.dilation = (int(r), int(r))
            branch.padding = (int(r), int(r))

    def pooled(self, x: Tensor) -> Tensor:
        """The image-pooling branch before broadcasting: ``[N, Cb]``."""
        return F.relu(F.linear(x.mean(dim=(2, 3)), self.pool_weight, self.pool_bias))

    def forward(self, x: Tensor) -> Tensor:
        branches = [branch(x) for branch in self.branches]
        if capturing_graph():
            # GlobalAveragePool → Conv → Relu → Conv, broadcast-added: no Resize of a 1×1 map.
            pooled = F.relu(F.conv2d(F.adaptive_avg_pool2d(x, 1), self.pool_weight[:, :, None, None],
                                     self.pool_bias))
            per_image = F.conv2d(pooled, self.pooled_weight[:, :, None, None], self.bias)
            y = F.conv2d(torch.cat(branches, dim=1), self.spatial_weight) + per_image
            return F.relu(y) if self.relu else y
        pooled = self.pooled(x)
        if self.backend == "triton":
            from .kernels.aspp import aspp_project_packed, pack_aspp_weight

            if self._packed is None:
                self._packed = pack_aspp_weight(self.weight)
            return aspp_project_packed(branches, pooled, self._packed, self.bias, relu=self.relu,
                                       config=_interpreter_config(x, spatial=False))
        per_image = F.linear(pooled, self.pooled_weight, self.bias)  # [N, Cout]: c(n)
        y = F.conv2d(torch.cat(branches, dim=1), self.spatial_weight)
        y = y.add_(per_image[:, :, None, None])
        return y.relu_() if self.relu else y

    def extra_repr(self) -> str:
        cout, cin = self.weight.shape[:2]
        return (f"{self.branches[0].in_channels}, {cout}, rates={self.rates}, projection={cin}->{cout} "
                f"(pooled branch as per-image bias), backend={self.backend!r}")
