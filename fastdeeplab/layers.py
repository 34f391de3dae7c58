"""Fused inference modules and their backend dispatch.

* :class:`FusedConvBNReLU` — ``conv → BN (folded) → [+ residual] → [ReLU]`` with weights folded once.
* :class:`FusedBottleneck` — a ResNet bottleneck made of three of them, the residual add and the last ReLU
  fused into the last conv's epilogue (one pass over memory, on every backend).
* :class:`FusedASPP` — ASPP whose projection never materialises the 5·256-channel concatenation and
  treats the image-pooling branch as what it is: one bias vector per image.

Backends, chosen per module at construction (``backend=``):

* ``"triton"`` — the Triton kernels of :mod:`fastdeeplab.kernels`, called as the torch custom ops of
  :mod:`fastdeeplab.kernels.ops` (so ``torch.compile``/``torch.export`` keep them in the graph). Per problem
  a :class:`~fastdeeplab.kernels.dispatch.Dispatcher` (``module.dispatcher``, shared by a whole optimized
  model) may send a layer to its cuDNN form instead (``F.conv2d`` with the same bias, residual and ReLU)
  when that measured faster. The stem (RGB input) always runs on cuDNN. CPU tensors run the kernels only
  under ``TRITON_INTERPRET=1``, for testing.
* ``"torch"`` — plain PyTorch. On CPU, float32/bfloat16 convolutions call oneDNN's fused
  convolution + bias + (residual add) + ReLU primitive (``torch.ops.mkldnn._convolution_pointwise``), one
  pass over memory instead of three; elsewhere ``F.conv2d`` then epilogue ops.

While exporting to ONNX or running TorchScript, every module runs its plain ``F.conv2d`` form, so those
graphs hold only standard ops (Conv, Relu, Add, GlobalAveragePool, Concat). ``torch.compile`` and
``torch.export`` of the torch backend see the same plain form.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels.reference import fold_bn
from .model import capturing_graph

__all__ = ["BACKENDS", "FusedASPP", "FusedBottleneck", "FusedConvBNReLU", "STEM_MAX_CIN"]

BACKENDS = ("torch", "triton")
# Convs with at most this many input channels (the RGB stem) always run on cuDNN: a K of 3·49 = 147 pads
# to a multiple of the MMA tile and the implicit GEMM executes over 10× the dense work.
STEM_MAX_CIN = 4


def _standard_ops_only() -> bool:
    """ONNX export and TorchScript: graphs of standard ops. (torch.compile and torch.export keep the ops.)"""
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.jit.is_scripting()


def _onednn_fused_conv_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


_ONEDNN = _onednn_fused_conv_available()


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
        self.dispatcher = None  # a kernels.dispatch.Dispatcher shared by an optimized model; None: always Triton
        self.dispatch_name = ""  # the module's name in the model, for the dispatch report
        self._onednn_packed: Tensor | None = None  # oneDNN's blocked weight for the last problem shape
        self._onednn_key: tuple | None = None
        # Triton backend: the kernel's [KH*KW*Cin, Cout] weight and float32 bias, prepared once (and again
        # after .to()/.half()/.cuda()); non-persistent buffers, so torch.export sees them as constants
        self.register_buffer("_packed", None, persistent=False)
        self.register_buffer("_bias32", None, persistent=False)
        self._prepare_triton()

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (self.weight.shape[2], self.weight.shape[3])

    def _apply(self, fn, recurse: bool = True):  # .to()/.half()/.cuda(): repack
        self._onednn_packed = self._onednn_key = None
        module = super()._apply(fn, recurse)
        self._prepare_triton()
        return module

    def _prepare_triton(self) -> None:
        if self.backend == "triton" and self.in_channels > STEM_MAX_CIN:
            from .kernels.conv import pack_weight

            self._packed = pack_weight(self.weight)
            self._bias32 = self.bias.detach().to(torch.float32).contiguous()

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if self.backend == "triton" and not _standard_ops_only():
            return self._forward_triton(x, residual)
        if capturing_graph():
            return self._forward_plain(x, residual)
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
        state.update(_onednn_packed=None, _onednn_key=None)
        return state

    def dispatch_key(self, x: Tensor, residual: Tensor | None) -> str:
        """The problem a dispatch decision holds for: geometry, epilogue, input shape, dtype, device."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (f"conv{kh}x{kw} s{sh}x{sw} p{ph}x{pw} d{dh}x{dw} {self.in_channels}->{self.out_channels}"
                f" res{int(residual is not None)} relu{int(self.relu)} | x{list(x.shape)} {x.dtype} {x.device}")

    def _triton_weights(self) -> tuple[Tensor, Tensor]:
        if self._packed is None:
            self._prepare_triton()
        return self._packed, self._bias32

    def _forward_kernel(self, x: Tensor, residual: Tensor | None) -> Tensor:
        """The Triton op: conv + bias + residual + ReLU in one kernel."""
        from .kernels import ops

        packed, bias = self._triton_weights()
        return ops.conv2d_act(x, packed, bias, residual, list(self.kernel_size), list(self.stride),
                              list(self.padding), list(self.dilation), self.relu)

    def _forward_triton(self, x: Tensor, residual: Tensor | None) -> Tensor:
        if self.in_channels <= STEM_MAX_CIN:
            return self._forward_plain(x, residual)  # the stem: always cuDNN
        if _choose(self, self.dispatch_key(x, residual), x, lambda: self._forward_kernel(x, residual),
                   lambda: self._forward_plain(x, residual)) == "cudnn":
            return self._forward_plain(x, residual)
        return self._forward_kernel(x, residual)

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        s = f"{self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw}), stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        return s + f", relu={self.relu}, backend={self.backend!r}, dtype={self.weight.dtype}"


def _choose(module: nn.Module, key: str, x: Tensor, run_triton, run_cudnn) -> str:
    """The module's dispatcher's choice for ``key`` (always "triton" without one); never times anything while
    torch.compile or torch.export trace the model (they take the cached decision, else Triton)."""
    dispatcher = module.dispatcher
    if dispatcher is None:
        return "triton"
    if torch.compiler.is_compiling():
        return dispatcher.decided(key) or "triton"
    return dispatcher.choose(module.dispatch_name or type(module).__name__, key, run_triton, run_cudnn,
                             device_type=x.device.type, device=x.device)


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
    the per-pixel GEMM. With ``backend="triton"`` the four spatial branches run as one grouped launch
    (``fastdeeplab::aspp_branches``, the branch index in the grid), and the four per-branch GEMMs of the
    projection and that bias run in one kernel (``fastdeeplab::aspp_project``): the 1280-channel
    concatenation is never written. Each of the two is dispatched against its cuDNN form like a conv.

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
        self.dispatcher = None  # see FusedConvBNReLU
        self.dispatch_name = ""
        # Triton backend: projection [5*Cb, Cout] and the four branches [28*Cin, Cb], packed once (see
        # FusedConvBNReLU), float32 biases
        for name in ("_packed", "_bias32", "_branch_packed", "_branch_bias32"):
            self.register_buffer(name, None, persistent=False)
        self._prepare_triton()

    def _apply(self, fn, recurse: bool = True):
        module = super()._apply(fn, recurse)
        self._prepare_triton()
        return module

    def _prepare_triton(self) -> None:
        if self.backend != "triton":
            return
        from .kernels.aspp import pack_aspp_branch_weights, pack_aspp_weight

        self._packed = pack_aspp_weight(self.weight)
        self._bias32 = self.bias.detach().to(torch.float32).contiguous()
        if self._groupable():
            self._branch_packed = pack_aspp_branch_weights([b.weight for b in self.branches])
            self._branch_bias32 = torch.cat([b.bias for b in self.branches]).to(torch.float32).contiguous()

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

    def _groupable(self) -> bool:
        """Whether the branches are the standard 1×1 + three "same"-padded 3×3 atrous convs (grouped launch)."""
        first, rest = self.branches[0], self.branches[1:]
        return (first.kernel_size == (1, 1) and first.stride == (1, 1) and first.padding == (0, 0)
                and all(b.kernel_size == (3, 3) and b.stride == (1, 1) and b.padding == b.dilation
                        and b.dilation[0] == b.dilation[1] for b in rest)
                and all(b.relu for b in self.branches) and first.in_channels > STEM_MAX_CIN)

    def _branches_kernel(self, x: Tensor) -> list[Tensor]:
        from .kernels import ops

        if self._branch_packed is None:
            self._prepare_triton()
        stacked = ops.aspp_branches(x, self._branch_packed, self._branch_bias32, list(self.rates))
        return list(stacked.chunk(4))  # branch i is images [i*N, (i+1)*N): views with equal strides

    def _project_kernel(self, branches: list[Tensor], pooled: Tensor) -> Tensor:
        from .kernels import ops

        if self._packed is None:
            self._prepare_triton()
        return ops.aspp_project(branches, pooled, self._packed, self._bias32, self.relu)

    def _project_plain(self, branches: list[Tensor], pooled: Tensor) -> Tensor:
        per_image = F.linear(pooled, self.pooled_weight, self.bias)  # [N, Cout]: c(n)
        y = F.conv2d(torch.cat(branches, dim=1), self.spatial_weight)
        y = y + per_image[:, :, None, None]
        return F.relu(y) if self.relu else y

    def _forward_triton(self, x: Tensor) -> Tensor:
        if self._groupable():
            key = f"aspp_branches {self.branches[0].in_channels}->4x{self.branches[0].out_channels} " \
                  f"rates{list(self.rates)} | x{list(x.shape)} {x.dtype} {x.device}"
            plain = lambda: [b._forward_plain(x, None) for b in self.branches]  # noqa: E731
            grouped = lambda: self._branches_kernel(x)  # noqa: E731
            branches = grouped() if _choose(self, key, x, grouped, plain) == "triton" else plain()
        else:
            branches = [branch(x) for branch in self.branches]
        pooled = self.pooled(x)
        cout, cb = self.pooled_weight.shape
        key = (f"aspp_project {5 * cb}->{cout} relu{int(self.relu)} "
               f"| x{list(branches[0].shape)} {x.dtype} {x.device}")
        if _choose(self, key, x, lambda: self._project_kernel(branches, pooled),
                   lambda: self._project_plain(branches, pooled)) == "triton":
            return self._project_kernel(branches, pooled)
        return self._project_plain(branches, pooled)

    def forward(self, x: Tensor) -> Tensor:
        if self.backend == "triton" and not _standard_ops_only():
            return self._forward_triton(x)
        branches = [branch(x) for branch in self.branches]
        if capturing_graph():
            # GlobalAveragePool → Conv → Relu → Conv, broadcast-added: no Resize of a 1×1 map.
            pooled = F.relu(F.conv2d(F.adaptive_avg_pool2d(x, 1), self.pool_weight[:, :, None, None],
                                     self.pool_bias))
            per_image = F.conv2d(pooled, self.pooled_weight[:, :, None, None], self.bias)
            y = F.conv2d(torch.cat(branches, dim=1), self.spatial_weight) + per_image
            return F.relu(y) if self.relu else y
        pooled = self.pooled(x)
        per_image = F.linear(pooled, self.pooled_weight, self.bias)  # [N, Cout]: c(n)
        y = F.conv2d(torch.cat(branches, dim=1), self.spatial_weight)
        y = y.add_(per_image[:, :, None, None])
        return y.relu_() if self.relu else y

    def extra_repr(self) -> str:
        cout, cin = self.weight.shape[:2]
        return (f"{self.branches[0].in_channels}, {cout}, rates={self.rates}, projection={cin}->{cout} "
                f"(pooled branch as per-image bias), backend={self.backend!r}")
