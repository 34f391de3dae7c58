"""Fused inference modules for MobileNetV3 (the backbone of ``deeplabv3_mobilenet_v3_large``).

* :class:`FusedConvBNAct` — ``conv (any groups: depthwise included) → BN (folded) → [+ residual] →
  [ReLU | hardswish]``, weights folded once. On the CPU (float32, bfloat16) it is one oneDNN fused primitive
  (``torch.ops.mkldnn._convolution_pointwise`` with the ``hardswish``/``relu`` post-op and the residual add)
  over a weight reordered once per problem shape; elsewhere ``F.conv2d`` then the epilogue. On the
  ``"triton"`` backend depthwise convs run ``fastdeeplab::depthwise_conv_act`` and the ``groups=1`` convs
  (the 1×1 expands and projects, ``features[16]``) ``fastdeeplab::conv2d_act`` with the activation and the
  residual in its epilogue, each dispatched per problem against cuDNN; the RGB stem stays on cuDNN.
* :class:`FusedSqueezeExcitation` — the SE block as a per-image channel scale ``[N, C]`` (global mean, two
  small matrix products, hardsigmoid), applied in place to the depthwise output: one read-modify-write, no
  broadcast tensor, no extra copy.
* :class:`FusedInvertedResidual` — expand (1×1) → depthwise → [SE] → project (1×1) with the residual add
  fused into the projection's epilogue. The attribute ``depthwise`` carries the stride, dilation and
  padding that ``set_output_stride`` changes.

While exporting to ONNX or running TorchScript every module runs its plain form (Conv, HardSwish, Relu,
HardSigmoid, GlobalAveragePool, Mul, Add): standard ops only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import mobilenetv3 as tv_mobilenetv3
from torchvision.ops.misc import SqueezeExcitation

from .kernels._utils import ACTIVATIONS
from .kernels.reference import fold_bn
from .layers import (
    _ONEDNN,
    STEM_MAX_CIN,
    _check_backend,
    _first_call,
    _forced,
    _ops_conv2d_act,
    _Plan,
    _recording,
    _refill,
    _refresh_after_load,
    _standard_ops_only,
)
from .mobilenet import MobileNetV3Backbone
from .model import capturing_graph

__all__ = ["ACTIVATIONS", "FusedConvBNAct", "FusedInvertedResidual", "FusedSqueezeExcitation",
           "fuse_mobilenet_backbone"]

# oneDNN's bfloat16 convolutions need AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT; without them bf16 runs F.conv2d.
_ONEDNN_DTYPES = (torch.float32,) + ((torch.bfloat16,) if _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                                     else ())


def _activation_of(module: nn.Module | None) -> str:
    if module is None:
        return "none"
    if isinstance(module, nn.Hardswish):
        return "hardswish"
    if isinstance(module, nn.ReLU):
        return "relu"
    raise TypeError(f"cannot fuse the activation {type(module).__name__}; expected ReLU or Hardswish")


def _act(y: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return F.relu(y)
    if activation == "hardswish":
        return F.hardswish(y)
    return y


class FusedConvBNAct(nn.Module):
    """Inference-only ``conv2d (groups ≥ 1) → BatchNorm (folded) → [+ residual] → [activation]``.

    Args:
        conv: the convolution (its bias, if any, is folded too); depthwise when ``groups == channels``.
        bn: the BatchNorm that follows it, or ``None``.
        activation: ``"none"``, ``"relu"`` or ``"hardswish"``.
        backend: ``"torch"`` or ``"triton"``. On ``"triton"`` a depthwise conv runs the Triton kernel
            ``fastdeeplab::depthwise_conv_act`` (bias, activation and an optional SE scale in its epilogue)
            and a ``groups=1`` conv with more than ``STEM_MAX_CIN`` input channels the implicit-GEMM kernel
            ``fastdeeplab::conv2d_act`` (bias, residual and activation in its epilogue), each dispatched per
            problem against its cuDNN form by ``module.dispatcher`` as
            :class:`~fastdeeplab.layers.FusedConvBNReLU` is. The RGB stem and other grouped convs run cuDNN.
            The kernels' weights are packed once, and again after ``.to()``/``load_state_dict``/in-place
            changes of ``weight``/``bias``.

    ``stride``, ``padding`` and ``dilation`` are plain attributes, so ``set_output_stride`` can change them.
    ``forward(x, residual=None)``.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, *, activation: str = "none",
                 backend: str = "torch") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
        if bn is not None:
            weight, bias = fold_bn(conv, bn)
        else:
            weight = conv.weight.detach().clone()
            bias = (conv.bias.detach().clone() if conv.bias is not None
                    else torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.stride = tuple(conv.stride)
        self.padding = tuple(conv.padding)
        self.dilation = tuple(conv.dilation)
        self.groups = conv.groups
        self.activation = activation
        self.backend = _check_backend(backend)
        self._onednn_packed: Tensor | None = None
        self._onednn_key: tuple | None = None
        self.dispatcher = None  # a kernels.dispatch.Dispatcher shared by an optimized model; None: always Triton
        self.dispatch_name = ""
        self._plans: dict[tuple, _Plan] = {}
        self._derived_from: tuple | None = None  # _state_token() when the derived weights were built
        # Triton backend: the kernel's weight (depthwise [KH*KW, C], conv [KH*KW*Cin, Cout]) and float32 bias,
        # packed once; non-persistent buffers, so torch.export sees them as constants
        self.register_buffer("_packed", None, persistent=False)
        self.register_buffer("_bias32", None, persistent=False)
        self._prepare_triton()
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def _state_token(self) -> tuple:
        """Changes whenever ``weight`` or ``bias`` is replaced or modified in place (see
        :meth:`~fastdeeplab.layers.FusedConvBNReLU._state_token`)."""
        buffers = self._buffers
        w, b = buffers["weight"], buffers["bias"]
        return id(w), w._version, id(b), b._version

    def _prepare_triton(self) -> None:
        """(Re)build the Triton weights, in place when their shape is unchanged (CUDA graphs hold addresses),
        and the per-call flags ``_triton_dw`` / ``_triton_conv`` (which kernel this layer runs, if any)."""
        self._derived_from = self._state_token()
        triton = self.backend == "triton"
        self._triton_dw = triton and self.depthwise
        # groups=1 convs, but not the RGB stem (a K of 3·9 pads the MMA tile: cuDNN, as in layers.py)
        self._triton_conv = triton and self.groups == 1 and self.in_channels > STEM_MAX_CIN
        if not (self._triton_dw or self._triton_conv):
            return
        if self._triton_dw:
            from .kernels.depthwise import pack_depthwise_weight as pack
        else:
            from .kernels.conv import pack_weight as pack
        with torch.no_grad():
            self._packed = _refill(self._packed, pack(self.weight))
            self._bias32 = _refill(self._bias32, self.bias.detach().to(torch.float32).contiguous())

    def _refresh(self) -> None:
        """Rebuild derived weights (oneDNN's and the kernels') if the parameters changed since they were built."""
        if self._derived_from != self._state_token():
            self._onednn_packed = self._onednn_key = None
            self._prepare_triton()

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (self.weight.shape[2], self.weight.shape[3])

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.out_channels == self.in_channels

    @torch.inference_mode(False)  # normal tensors: inference tensors have no version counter (tokens)
    def _apply(self, fn, recurse: bool = True):  # .to()/.half(): repack
        self._onednn_packed = self._onednn_key = None
        self._plans = {}
        module = super()._apply(fn, recurse)
        self._prepare_triton()
        return module

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_onednn_packed=None, _onednn_key=None, _plans={}, _derived_from=None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_plans", {})
        self.__dict__.setdefault("_derived_from", None)
        if "_triton_conv" not in self.__dict__:  # pickled before the conv path existed
            self._prepare_triton()

    def _triton_ready(self, residual: Tensor | None) -> bool:
        return self._triton_dw and residual is None and not _standard_ops_only()

    def dispatch_key(self, x: Tensor, variant: bool) -> str:
        """The problem a dispatch decision holds for: geometry, epilogue, input shape, dtype, device.
        ``variant``: depthwise, whether the SE scale is in the epilogue; otherwise, whether a residual is.

        A ``groups=1`` conv with ReLU or no activation gets :meth:`FusedConvBNReLU.dispatch_key
        <fastdeeplab.layers.FusedConvBNReLU.dispatch_key>`'s key (``relu1``/``relu0``): the same problem runs
        the same kernel, so one decision holds for both."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        if self.depthwise:
            return (f"dwconv{kh}x{kw} s{sh}x{sw} p{ph}x{pw} d{dh}x{dw} {self.out_channels} {self.activation}"
                    f" se{int(variant)} | x{list(x.shape)} {x.dtype} {x.device}")
        act = {"relu": "relu1", "none": "relu0"}.get(self.activation, self.activation)
        groups = f" g{self.groups}" if self.groups != 1 else ""
        return (f"conv{kh}x{kw} s{sh}x{sw} p{ph}x{pw} d{dh}x{dw} {self.in_channels}->{self.out_channels}{groups}"
                f" res{int(variant)} {act} | x{list(x.shape)} {x.dtype} {x.device}")

    def _dispatch(self, x: Tensor, variant: bool, run_triton, run_cudnn) -> Tensor:
        """The dispatcher pattern of :class:`~fastdeeplab.layers.FusedConvBNReLU`: one plan per geometry
        (``variant``: see :meth:`dispatch_key`)."""
        key = None
        if torch.compiler.is_compiling():  # traced: the cached decision, else Triton; no bookkeeping
            d = self.dispatcher
            key = self.dispatch_key(x, variant)
            return run_cudnn() if d is not None and d.decided(key) == "cudnn" else run_triton()
        if self._derived_from != self._state_token():
            self._refresh()
        geometry = (x.shape, x.dtype, x.device, variant, self.stride, self.padding, self.dilation,
                    self.activation)
        plan = self._plans.get(geometry)
        if plan is None or plan.dispatcher is not self.dispatcher:
            plan = self._plans[geometry] = _Plan(self, x, key or self.dispatch_key(x, variant))
        if plan.choice == "triton":
            return _forced(self, plan, run_triton) if plan.forced else run_triton()
        if plan.choice == "cudnn":
            return run_cudnn()
        return _first_call(self, plan, x, run_triton, run_cudnn)

    def _kernel_args(self) -> tuple:
        return (list(self.kernel_size), list(self.stride), list(self.padding), list(self.dilation), self.activation)

    def forward_se(self, x: Tensor, se: FusedSqueezeExcitation) -> Tensor:
        """``se(self(x))``. On the Triton backend: the SE's pooled input from one kernel that writes no map
        (``depthwise_conv_act_mean``), then the depthwise kernel with the SE scale in its epilogue, so the
        expanded map is written once and never re-read for the scale."""
        if not self._triton_ready(None):
            return se(self(x))
        from .kernels import ops

        args = self._kernel_args()

        def run_triton() -> Tensor:
            mean = ops.depthwise_conv_act_mean(x, self._packed, self._bias32, *args)
            return ops.depthwise_conv_act(x, self._packed, self._bias32, se.excite(mean), *args)
        return self._dispatch(x, True, run_triton, lambda: se(self._forward_plain(x, None)))

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if self._triton_conv and not _standard_ops_only():
            return self._forward_conv_triton(x, residual)
        if self._triton_ready(residual):
            from .kernels import ops

            return self._dispatch(x, False, lambda: ops.depthwise_conv_act(x, self._packed, self._bias32, None,
                                                                           *self._kernel_args()),
                                  lambda: self._forward_plain(x, None))
        if capturing_graph() or _standard_ops_only():
            return self._forward_plain(x, residual)
        if _ONEDNN and x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES:
            self._refresh()
            return self._forward_onednn(x, residual)
        return self._forward_plain(x, residual)

    def _conv_args(self) -> tuple:
        """``conv2d_act``'s constant arguments after the tensors (the ``relu`` flag, then the activation)."""
        return (list(self.kernel_size), list(self.stride), list(self.padding), list(self.dilation),
                self.activation == "relu", self.activation)

    def _forward_conv_triton(self, x: Tensor, residual: Tensor | None) -> Tensor:
        """A ``groups=1`` conv on the Triton backend: ``fastdeeplab::conv2d_act`` (bias, residual and activation
        in the epilogue) or its cuDNN form, per problem, exactly as :class:`~fastdeeplab.layers.FusedConvBNReLU`
        dispatches (plans hold the key, the decision and the op's arguments, so a steady call builds nothing)."""
        has_res = residual is not None
        if torch.compiler.is_compiling():  # traced: the cached decision, else Triton; no bookkeeping
            d = self.dispatcher
            if d is not None and d.decided(self.dispatch_key(x, has_res)) == "cudnn":
                return self._forward_plain(x, residual)
            return _ops_conv2d_act()(x, self._packed, self._bias32, residual, *self._conv_args())
        if self._derived_from != self._state_token():
            self._refresh()
        geometry = (x.shape, x.dtype, x.device, has_res, self.stride, self.padding, self.dilation,
                    self.activation)
        plan = self._plans.get(geometry)
        if plan is None or plan.dispatcher is not self.dispatcher:
            from .kernels import ops

            plan = self._plans[geometry] = _Plan(self, x, self.dispatch_key(x, has_res), ops.EAGER["conv2d_act"],
                                                 self._conv_args())
        op = _ops_conv2d_act() if _recording() else plan.op

        def run_triton() -> Tensor:
            return op(x, self._packed, self._bias32, residual, *plan.args)

        if plan.choice == "triton":
            return _forced(self, plan, run_triton) if plan.forced else run_triton()
        if plan.choice == "cudnn":
            return self._forward_plain(x, residual)
        return _first_call(self, plan, x, run_triton, lambda: self._forward_plain(x, residual))

    def _forward_plain(self, x: Tensor, residual: Tensor | None) -> Tensor:
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if residual is not None:
            y = y + residual
        return _act(y, self.activation)

    def _onednn_weight(self, x: Tensor) -> Tensor:
        key = (tuple(x.shape), x.dtype, self.padding, self.stride, self.dilation)
        if self._onednn_key != key:
            self._onednn_packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                self.weight.to(x.dtype).to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation),
                self.groups, list(x.shape))
            self._onednn_key = key
        return self._onednn_packed

    def _space_to_batch(self) -> bool:
        """Depthwise, stride 1, "same" padding and dilation > 2: oneDNN has no fast kernel for it (5×5 at
        dilation 4 on 65×65×960 took 3.2 s against 3.4 ms at dilation 2, scripts/mobilenet_speed.py's OS8 row)."""
        (kh, kw), (dh, dw) = self.kernel_size, self.dilation
        return (self.depthwise and self.stride == (1, 1) and dh == dw > 2
                and self.padding == ((kh - 1) // 2 * dh, (kw - 1) // 2 * dw))

    def _forward_space_to_batch(self, x: Tensor) -> Tensor:
        """The atrous conv as an undilated one over the ``d×d`` phase sub-images (exact: every tap that falls
        outside the map reads a zero either way), each in oneDNN's fast depthwise kernel."""
        d = self.dilation[0]
        n, c, h, w = x.shape
        hp, wp = -(-h // d) * d, -(-w // d) * d
        xp = F.pad(x, (0, wp - w, 0, hp - h)) if (hp, wp) != (h, w) else x
        sub = xp.reshape(n, c, hp // d, d, wp // d, d).permute(0, 3, 5, 1, 2, 4).reshape(n * d * d, c, hp // d,
                                                                                          wp // d)
        sub = sub.contiguous(memory_format=torch.channels_last)
        kh, kw = self.kernel_size
        y = torch.ops.mkldnn._convolution_pointwise(sub, self.weight.to(x.dtype), self.bias,
                                                    [(kh - 1) // 2, (kw - 1) // 2], [1, 1], [1, 1], self.groups,
                                                    self.activation, [None], "")
        y = y.reshape(n, d, d, c, hp // d, wp // d).permute(0, 3, 4, 1, 5, 2).reshape(n, c, hp, wp)[:, :, :h, :w]
        return y.contiguous(memory_format=torch.channels_last)

    def _forward_onednn(self, x: Tensor, residual: Tensor | None) -> Tensor:
        if residual is None and self._space_to_batch():
            return self._forward_space_to_batch(x)
        args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        weight = self._onednn_weight(x)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, *args, self.activation, [None], "")
        # oneDNN fuses add → ReLU; no post-op is None here; hardswish after the add runs in place after it
        unary = "relu" if self.activation == "relu" else None
        y = torch.ops.mkldnn._convolution_pointwise.binary(x, residual, weight, self.bias, *args, "add", 1.0,
                                                           unary, [None], "")
        return F.hardswish(y, inplace=True) if self.activation == "hardswish" else y

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        s = f"{self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw}), stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + f", activation={self.activation!r}, backend={self.backend!r}, dtype={self.weight.dtype}"


class FusedSqueezeExcitation(nn.Module):
    """torchvision's ``SqueezeExcitation`` (ReLU, hardsigmoid) as a per-image channel scale.

    :meth:`scale` gives ``[N, C]``: ``hardsigmoid(W2·relu(W1·mean(x) + b1) + b2)``, two small GEMMs instead of
    two 1×1 convolutions on a 1×1 map. ``forward(x)`` returns ``x`` scaled, in place outside autograd.
    """

    def __init__(self, se: SqueezeExcitation) -> None:
        super().__init__()
        if not isinstance(se.activation, nn.ReLU) or not isinstance(se.scale_activation, nn.Hardsigmoid):
            raise TypeError("FusedSqueezeExcitation expects torchvision's ReLU/Hardsigmoid squeeze-excitation")
        self.register_buffer("fc1_weight", se.fc1.weight.detach().flatten(1).clone())
        self.register_buffer("fc1_bias", se.fc1.bias.detach().clone())
        self.register_buffer("fc2_weight", se.fc2.weight.detach().flatten(1).clone())
        self.register_buffer("fc2_bias", se.fc2.bias.detach().clone())

    def excite(self, pooled: Tensor) -> Tensor:
        """``[N, C]`` channel means → ``[N, C]`` scale."""
        s = F.relu(F.linear(pooled.to(self.fc1_weight.dtype), self.fc1_weight, self.fc1_bias))
        return F.hardsigmoid(F.linear(s, self.fc2_weight, self.fc2_bias))

    def scale(self, x: Tensor) -> Tensor:
        return self.excite(x.mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        if capturing_graph() or _standard_ops_only():  # GlobalAveragePool → Conv → Relu → Conv → HardSigmoid
            s = F.relu(F.conv2d(F.adaptive_avg_pool2d(x, 1), self.fc1_weight[:, :, None, None], self.fc1_bias))
            return x * F.hardsigmoid(F.conv2d(s, self.fc2_weight[:, :, None, None], self.fc2_bias))
        s = self.scale(x)[:, :, None, None]
        return x.mul_(s) if torch.is_inference_mode_enabled() or not torch.is_grad_enabled() else x * s


class FusedInvertedResidual(nn.Module):
    """torchvision's ``InvertedResidual`` with folded BN: ``expand → depthwise → [SE] → project (+ x)``."""

    def __init__(self, block: tv_mobilenetv3.InvertedResidual, *, backend: str = "torch") -> None:
        super().__init__()
        self.expand: FusedConvBNAct | None = None
        self.se: FusedSqueezeExcitation | None = None
        project = None
        for m in block.block:
            if isinstance(m, SqueezeExcitation):
                self.se = FusedSqueezeExcitation(m)
                continue
            conv, bn = m[0], m[1]
            fused = FusedConvBNAct(conv, bn, activation=_activation_of(m[2] if len(m) > 2 else None),
                                   backend=backend)
            if conv.groups > 1:
                self.depthwise = fused
            elif not hasattr(self, "depthwise"):
                self.expand = fused
            else:
                project = fused
        if project is None or not hasattr(self, "depthwise"):
            raise TypeError("not a MobileNetV3 inverted-residual block (expand, depthwise, SE, project)")
        self.project = project
        self.use_res_connect = bool(block.use_res_connect)
        self.out_channels = block.out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = x if self.expand is None else self.expand(x)
        y = self.depthwise(y) if self.se is None else self.depthwise.forward_se(y, self.se)
        return self.project(y, residual=x if self.use_res_connect else None)


def _fuse_conv_norm_act(m: nn.Module, backend: str) -> FusedConvBNAct:
    """torchvision's ``Conv2dNormActivation`` (conv, BN, [activation]) as one fused module."""
    return FusedConvBNAct(m[0], m[1], activation=_activation_of(m[2] if len(m) > 2 else None), backend=backend)


def fuse_mobilenet_backbone(backbone: MobileNetV3Backbone, backend: str) -> MobileNetV3Backbone:
    """The fused copy of a MobileNetV3 backbone (same keys ``"0"`` … ``"16"``, same stride plan)."""
    layers: dict[str, nn.Module] = {}
    for name, m in backbone.items():
        if isinstance(m, tv_mobilenetv3.InvertedResidual):
            layers[name] = FusedInvertedResidual(m, backend=backend)
        else:
            layers[name] = _fuse_conv_norm_act(m, backend)
    return MobileNetV3Backbone.from_modules(layers, like=backbone)
