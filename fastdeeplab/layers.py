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
  convolution + bias + (residual add) primitive (``torch.ops.mkldnn._convolution_pointwise``) with the
  weight reordered once per problem, then an in-place ``torch.relu_`` (oneDNN's ReLU post-op maps NaN to 0;
  PyTorch's ReLU keeps NaN, so NaN and overflow reach the output as in the eager model); elsewhere
  ``F.conv2d`` then epilogue ops.

While exporting to ONNX or running TorchScript, every module runs its plain ``F.conv2d`` form, so those
graphs hold only standard ops (Conv, Relu, Add, GlobalAveragePool, Concat). ``torch.compile`` and
``torch.export`` of the torch backend see the same plain form.

The file is one concern: the three fused modules and the per-problem state they derive from their weights
(packed forms per backend, dispatch keys and decisions), which must change together when a backend, a
dispatch rule or the rebuild-on-``load_state_dict`` contract does.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter, getitem, is_

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
    """ONNX export and TorchScript: graphs of standard ops. (torch.compile and torch.export keep the ops.)

    Called on every eager forward of a fused module, so it reads the exporters' flags directly:
    ``torch.onnx.is_in_onnx_export()`` imports its two flag modules on each call (a few µs per layer). Under
    ``torch.compile`` it asks the public functions, which dynamo knows how to trace."""
    if torch.compiler.is_compiling():
        return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.jit.is_scripting()
    flags = _onnx_export_flags()
    return (flags[0].in_onnx_export or flags[1]._is_onnx_exporting or torch.jit.is_tracing()
            or torch.jit.is_scripting())


def _onnx_export_flags() -> tuple:
    """The objects ``torch.onnx.is_in_onnx_export()`` reads (the TorchScript and dynamo exporters' flags),
    imported once; falls back to that function where torch lays them out differently."""
    global _ONNX_FLAGS
    if _ONNX_FLAGS is None:
        try:
            from torch.onnx._internal.exporter import _flags
            from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

            _ONNX_FLAGS = (GLOBALS, _flags)
            _ = GLOBALS.in_onnx_export, _flags._is_onnx_exporting  # both attributes exist
        except (ImportError, AttributeError):
            class _Fallback:  # another torch layout: ask the public function each time
                @property
                def in_onnx_export(self) -> bool:
                    return torch.onnx.is_in_onnx_export()

                _is_onnx_exporting = False

            _ONNX_FLAGS = (_Fallback(), _Fallback())
    return _ONNX_FLAGS


_ONNX_FLAGS: tuple | None = None


def _onednn_fused_conv_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


_ONEDNN = _onednn_fused_conv_available()
# oneDNN's bfloat16 convolutions need AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT; without them bf16 runs F.conv2d.
_ONEDNN_DTYPES = (torch.float32,) + ((torch.bfloat16,) if _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                                     else ())


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
        self._plans: dict[tuple, _Plan] = {}  # per input shape: dispatch key, decision, op arguments
        self._derived_from: tuple | None = None  # _state_token() when the derived weights were built
        # Triton backend: the kernel's [KH*KW*Cin, Cout] weight and float32 bias, prepared once (and again
        # after .to()/.half()/.cuda()); non-persistent buffers, so torch.export sees them as constants
        self.register_buffer("_packed", None, persistent=False)
        self.register_buffer("_bias32", None, persistent=False)
        self._prepare_triton()
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (self.weight.shape[2], self.weight.shape[3])

    @torch.inference_mode(False)  # normal tensors: inference tensors have no version counter (tokens)
    def _apply(self, fn, recurse: bool = True):  # .to()/.half()/.cuda(): repack
        self._onednn_packed = self._onednn_key = None
        self._plans = {}
        module = super()._apply(fn, recurse)
        self._prepare_triton()
        return module

    def _state_token(self) -> tuple:
        """Changes whenever ``weight`` or ``bias`` is replaced or modified in place (``load_state_dict``,
        ``copy_``, ...): everything derived from them is rebuilt when it does."""
        buffers = self._buffers  # not self.weight: nn.Module.__getattr__ costs a lookup chain per call
        w, b = buffers["weight"], buffers["bias"]
        return id(w), w._version, id(b), b._version

    def _prepare_triton(self) -> None:
        """(Re)build the Triton weights; in place when their shape is unchanged, so captured CUDA graphs,
        which hold their addresses, see the new values."""
        self._derived_from = self._state_token()
        self._stem = self.in_channels <= STEM_MAX_CIN  # read per call: not through the weight's __getattr__
        if self.backend == "triton" and not self._stem:
            from .kernels.conv import pack_weight

            with torch.no_grad():
                self._packed = _refill(self._packed, pack_weight(self.weight))
                self._bias32 = _refill(self._bias32, self.bias.detach().to(torch.float32).contiguous())

    def _refresh(self) -> None:
        """Rebuild derived weights if the parameters changed since they were built (eager calls only)."""
        if self._derived_from != self._state_token():
            self._onednn_packed = self._onednn_key = None
            self._prepare_triton()


    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if self.backend == "triton" and not _standard_ops_only():
            return self._forward_triton(x, residual)
        if capturing_graph():
            return self._forward_plain(x, residual)
        if _ONEDNN and x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES:
            self._refresh()
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
        """oneDNN's fused conv + bias (+ residual add); the ReLU runs as ``torch.relu_`` because oneDNN's ReLU
        post-op maps NaN to 0 (``max(x, 0)``), which turned overflowing inputs into confident labels: NaN in
        (or overflow inside) must give NaN out, as in the eager model. The separate pass costs about 5% of
        ResNet-50 at OS16 against the NaN-losing post-op (bench/RESULTS.md, "The NaN-keeping ReLU")."""
        args = (list(self.padding), list(self.stride), list(self.dilation), 1)
        weight = self._onednn_weight(x)
        if residual is None:
            y = torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, *args, "none", [None], "")
        else:
            y = torch.ops.mkldnn._convolution_pointwise.binary(x, residual, weight, self.bias, *args, "add", 1.0,
                                                               None, [], "")
        return torch.relu_(y) if self.relu else y

    def __getstate__(self) -> dict:  # copies and pickles never carry backend caches
        state = dict(self.__dict__)
        state.update(_onednn_packed=None, _onednn_key=None, _plans={}, _derived_from=None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_plans", {})
        self.__dict__.setdefault("_derived_from", None)
        if "_stem" not in self.__dict__:  # pickled before the attribute existed
            self._stem = self.in_channels <= STEM_MAX_CIN

    def dispatch_key(self, x: Tensor, residual: Tensor | None) -> str:
        """The problem a dispatch decision holds for: geometry, epilogue, input shape, dtype, device."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (f"conv{kh}x{kw} s{sh}x{sw} p{ph}x{pw} d{dh}x{dw} {self.in_channels}->{self.out_channels}"
                f" res{int(residual is not None)} relu{int(self.relu)} | x{list(x.shape)} {x.dtype} {x.device}")

    def _forward_kernel(self, x: Tensor, residual: Tensor | None) -> Tensor:
        """The Triton op: conv + bias + residual + ReLU in one kernel."""
        from .kernels import ops

        return ops.conv2d_act(x, self._packed, self._bias32, residual, list(self.kernel_size), list(self.stride),
                              list(self.padding), list(self.dilation), self.relu)

    def _forward_triton(self, x: Tensor, residual: Tensor | None) -> Tensor:
        if self._stem:
            return self._forward_plain(x, residual)  # the stem: always cuDNN
        if torch.compiler.is_compiling():  # traced: the cached decision, else Triton; no bookkeeping
            d = self.dispatcher
            if d is not None and d.decided(self.dispatch_key(x, residual)) == "cudnn":
                return self._forward_plain(x, residual)
            return self._forward_kernel(x, residual)
        if self._derived_from != self._state_token():
            self._refresh()
        geometry = (x.shape, x.dtype, x.device, residual is None, self.stride, self.padding, self.dilation,
                    self.relu)  # every attribute the plan's arguments hold
        plan = self._plans.get(geometry)
        if plan is None or plan.dispatcher is not self.dispatcher:
            from .kernels import ops

            args = (list(self.kernel_size), list(self.stride), list(self.padding), list(self.dilation), self.relu)
            plan = self._plans[geometry] = _Plan(self, x, self.dispatch_key(x, residual),
                                                 ops.EAGER["conv2d_act"], args)
        if plan.choice == "triton":
            op = _ops_conv2d_act() if _recording() else plan.op
            if plan.forced:
                return _forced(self, plan, lambda: op(x, self._packed, self._bias32, residual, *plan.args))
            return op(x, self._packed, self._bias32, residual, *plan.args)
        if plan.choice == "cudnn":
            return self._forward_plain(x, residual)
        op = _ops_conv2d_act() if _recording() else plan.op
        return _first_call(self, plan, x, lambda: op(x, self._packed, self._bias32, residual, *plan.args),
                           lambda: self._forward_plain(x, residual))

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        s = f"{self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw}), stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        return s + f", relu={self.relu}, backend={self.backend!r}, dtype={self.weight.dtype}"


def _recording() -> bool:
    """Whether a Python dispatch mode records the ops (make_fx, fake tensors, an op log): the fused layers
    then call the ``torch.ops.fastdeeplab`` ops, which such modes see, instead of what they run."""
    return torch._C._len_torch_dispatch_stack() > 0


def _ops_conv2d_act():
    from .kernels import ops

    return ops.conv2d_act


def _refill(old: Tensor | None, new: Tensor) -> Tensor:
    """``new``'s values in ``old``'s storage when shapes, dtypes and devices agree (addresses held by CUDA
    graphs stay valid), else ``new``."""
    if old is not None and old.shape == new.shape and old.dtype == new.dtype and old.device == new.device:
        return old.copy_(new)
    return new


def _refresh_after_load(module: nn.Module, incompatible_keys) -> None:
    """``load_state_dict`` post-hook (runs after the module's children are loaded): rebuild derived weights
    now, in place, so even a captured CUDA graph replays the loaded values."""
    module._refresh()


class _Plan:
    """What a fused module needs per input geometry: the dispatch key (built once), the decision once made
    (``None`` until then) and the op with its constant arguments, so a steady-state call rebuilds nothing."""

    __slots__ = ("args", "choice", "dispatcher", "forced", "key", "op")

    def __init__(self, module: nn.Module, x: Tensor, key: str, op=None, args: tuple = ()) -> None:
        dispatcher = module.dispatcher
        self.dispatcher, self.key, self.op, self.args = dispatcher, key, op, args
        self.forced = dispatcher is not None and dispatcher.mode == "triton"
        # without a dispatcher, with a forced one, or with a cached decision, the choice is known now (and the
        # dispatcher lists the layer in its report); else the first call decides (_first_call)
        self.choice = "triton" if dispatcher is None else dispatcher.decided(key)
        if self.choice is not None and dispatcher is not None:
            dispatcher.choose(_name(module), key, None, None, device_type=x.device.type, device=x.device)


def _name(module: nn.Module) -> str:
    return module.dispatch_name or type(module).__name__


def _forced(module: nn.Module, plan: _Plan, run_triton):
    """``dispatch="triton"``: run the kernel; a failure names the layer and the way out."""
    try:
        return run_triton()
    except Exception as exc:  # noqa: BLE001 - re-raised with the layer named
        raise RuntimeError(f"layer {_name(module)}: the Triton kernel failed on {plan.key}: {type(exc).__name__}: "
                           f"{exc} (dispatch='triton' forces it; dispatch='auto' would fall back to cuDNN for "
                           "this problem)") from exc


class _Memo:
    """The Triton side of a first call: keeps its output, so the call that follows the check reuses it."""

    __slots__ = ("fn", "out")

    def __init__(self, fn) -> None:
        self.fn, self.out = fn, None

    def __call__(self):
        self.out = self.fn()
        return self.out


def _first_call(module: nn.Module, plan: _Plan, x: Tensor, run_triton, run_cudnn):
    """The first call of a geometry: let the dispatcher decide (it checks the Triton side against cuDNN and,
    on CUDA, times both), remember the decision in ``plan``, and return this call's output."""
    memo = _Memo(run_triton)
    choice = module.dispatcher.choose(_name(module), plan.key, memo, run_cudnn, device_type=x.device.type,
                                      device=x.device)
    plan.choice = choice
    if choice == "cudnn":
        return run_cudnn()
    return memo.out if memo.out is not None else run_triton()


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


_VERSION = attrgetter("_version")
_BRANCH_GEOMETRY = attrgetter("stride", "padding", "dilation", "relu")
_cudnn_allow_tf32 = getattr(torch._C, "_get_cudnn_allow_tf32", lambda: torch.backends.cudnn.allow_tf32)


class _Watch:
    """One check that nothing a module derived state from has changed since: every watched slot
    (``container[name]``: a buffer in a module's ``_buffers``, a child in ``_modules``) still holds the same
    object, and no watched tensor was modified in place. Version counters only grow, so their sum is unchanged
    exactly when each one is: one comparison instead of one per tensor."""

    __slots__ = ("containers", "names", "objects", "tensors", "version")

    def __init__(self, slots: Sequence[tuple[dict, str]], sources: Sequence[tuple[dict, str]]) -> None:
        slots = [*slots, *sources]  # a source replaced is a slot changed; one changed in place, a version
        self.containers = tuple(c for c, _ in slots)
        self.names = tuple(n for _, n in slots)
        self.objects = tuple(map(getitem, self.containers, self.names))
        self.tensors = tuple(c[n] for c, n in sources)
        self.version = sum(map(_VERSION, self.tensors))

    def holds(self) -> bool:
        try:
            return (sum(map(_VERSION, self.tensors)) == self.version
                    and all(map(is_, map(getitem, self.containers, self.names), self.objects)))
        except KeyError:  # a watched buffer or child was deleted
            return False


class _AsppReplay:
    """A fused ASPP's forward for one call key: both launches as one :class:`~fastdeeplab.kernels.aspp.
    AsppLaunchPlan`, the dispatcher whose decisions it follows, and what a forced dispatch names on failure."""

    __slots__ = ("dispatcher", "forced", "key", "plan", "pooled_shape")

    def __init__(self, plan, dispatcher, forced: bool, key: str, pooled_shape: torch.Size) -> None:
        self.plan, self.dispatcher, self.forced, self.key, self.pooled_shape = (plan, dispatcher, forced, key,
                                                                                pooled_shape)


class FusedASPP(nn.Module):
    """ASPP with its projection fused: ``ReLU(Σᵢ Wᵢ·bᵢ + c(n))``, ``c(n) = W_pool·pool(n) + shift``.

    The four spatial branches are :class:`FusedConvBNReLU`. The image-pooling branch is spatially constant,
    so its share of the projection is one bias vector per image; it is never upsampled nor pushed through
    the per-pixel GEMM. With ``backend="triton"`` the four spatial branches run as one grouped launch
    (``fastdeeplab::aspp_branches``, the branch index in the grid), and the four per-branch GEMMs of the
    projection and that bias run in one kernel (``fastdeeplab::aspp_project``): the 1280-channel
    concatenation is never written. Each of the two is dispatched against its cuDNN form like a conv. Once both
    are decided for Triton, an eager call replays their checked launches as one plan per input geometry
    (:class:`~fastdeeplab.kernels.aspp.AsppLaunchPlan`), dropped when a parameter, the rates, the dtype or
    the dispatcher changes.

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
        self._plans: dict[tuple, tuple[_Plan | None, _Plan]] = {}
        self._replays: dict[tuple, _AsppReplay] = {}  # per call key: both launches as one checked plan
        self._watch: _Watch | None = None  # what the packs and replays were derived from (see _prepare_triton)
        self._prepare_triton()
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @torch.inference_mode(False)  # normal tensors: inference tensors have no version counter (tokens)
    def _apply(self, fn, recurse: bool = True):
        self._plans = {}
        module = super()._apply(fn, recurse)
        self._prepare_triton()
        return module

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_plans={}, _replays={}, _watch=None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_plans", {})
        self.__dict__.setdefault("_replays", {})
        self.__dict__.setdefault("_watch", None)
        self.__dict__.pop("_derived_from", None)  # pickled before the watch replaced it

    def _new_watch(self) -> _Watch:
        """What the packs and replays derive from: the projection's and the four branches' folded weights and
        biases (replaced, or changed in place), the branch modules themselves, and the packs (replaced)."""
        branches = self._modules["branches"]
        slots = [(self._modules, "branches"), *((branches._modules, k) for k in branches._modules)]
        sources = [(self._buffers, n) for n in ("spatial_weight", "pooled_weight", "bias")]
        sources += [(b._buffers, n) for b in branches for n in ("weight", "bias")]
        packs = [(self._buffers, n) for n in ("_packed", "_bias32", "_branch_packed", "_branch_bias32")]
        return _Watch(slots + packs, sources)

    def _refresh(self) -> None:
        """Rebuild the packs (and drop the replays) if a parameter changed since they were built."""
        if self._watch is None or not self._watch.holds():
            for b in self.branches:
                b._refresh()
            self._prepare_triton()

    def _prepare_triton(self) -> None:
        self._replays = {}
        self._branch_list = tuple(self.branches)  # read per call: iterating a ModuleList costs µs
        if self.backend != "triton":
            self._watch = self._new_watch()
            return
        from .kernels.aspp import pack_aspp_branch_weights, pack_aspp_weight

        with torch.no_grad():
            self._packed = _refill(self._packed, pack_aspp_weight(self.weight))
            self._bias32 = _refill(self._bias32, self.bias.detach().to(torch.float32).contiguous())
            if self._groupable():
                self._branch_packed = _refill(self._branch_packed,
                                              pack_aspp_branch_weights([b.weight for b in self.branches]))
                self._branch_bias32 = _refill(self._branch_bias32, torch.cat([b.bias for b in self.branches])
                                              .to(torch.float32).contiguous())
        self._watch = self._new_watch()  # last: the packs are watched for replacement

    @property
    def weight(self) -> Tensor:
        """The whole projection ``[Cout, 5*Cb, 1, 1]``, the pooled branch's ``Cb`` inputs last."""
        return torch.cat([self.spatial_weight, self.pooled_weight[:, :, None, None]], dim=1)

    @property
    def rates(self) -> tuple[int, ...]:
        return tuple(b.dilation[0] for b in list(self.branches)[1:])  # slicing a ModuleList builds a new one

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

        op = ops.aspp_branches if torch.compiler.is_compiling() or _recording() else ops.EAGER["aspp_branches"]
        stacked = op(x, self._branch_packed, self._branch_bias32, list(self.rates))
        return list(stacked.chunk(4))  # branch i is images [i*N, (i+1)*N): views with equal strides

    def _project_kernel(self, branches: list[Tensor], pooled: Tensor) -> Tensor:
        from .kernels import ops

        op = ops.aspp_project if torch.compiler.is_compiling() or _recording() else ops.EAGER["aspp_project"]
        return op(branches, pooled, self._packed, self._bias32, self.relu)

    def _project_plain(self, branches: list[Tensor], pooled: Tensor) -> Tensor:
        per_image = F.linear(pooled, self.pooled_weight, self.bias)  # [N, Cout]: c(n)
        y = F.conv2d(torch.cat(branches, dim=1), self.spatial_weight)
        y = y + per_image[:, :, None, None]
        return F.relu(y) if self.relu else y

    def _keys(self, x: Tensor) -> tuple[str | None, str]:
        """The dispatch keys of the grouped branches (``None`` when not groupable) and of the projection."""
        b0 = self.branches[0]
        branches = (f"aspp_branches {b0.in_channels}->4x{b0.out_channels} rates{list(self.rates)} "
                    f"| x{list(x.shape)} {x.dtype} {x.device}") if self._groupable() else None
        cout, cb = self.pooled_weight.shape
        shape = [x.shape[0], cb, x.shape[2], x.shape[3]]
        return branches, f"aspp_project {5 * cb}->{cout} relu{int(self.relu)} | x{shape} {x.dtype} {x.device}"

    def _forward_triton(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():  # traced: the cached decisions, else Triton; no bookkeeping
            branch_key, project_key = self._keys(x)
            d = self.dispatcher
            if branch_key is None:
                branches = [branch(x) for branch in self.branches]
            elif d is not None and d.decided(branch_key) == "cudnn":
                branches = [b._forward_plain(x, None) for b in self.branches]
            else:
                branches = self._branches_kernel(x)
            pooled = self.pooled(x)
            if d is not None and d.decided(project_key) == "cudnn":
                return self._project_plain(branches, pooled)
            return self._project_kernel(branches, pooled)
        watch = self._watch
        if watch is None or not watch.holds():  # one check for every parameter the packs derive from
            self._refresh()
        # everything else a call's launches depend on: the input's geometry, the TF32 mode, the branches'
        # geometry (set_rates) and epilogues
        key = (x.shape, x.stride(), x.dtype, x.device, x.dtype is torch.float32 and _cudnn_allow_tf32(),
               self.relu, *map(_BRANCH_GEOMETRY, self._branch_list))
        replay = self._replays.get(key)
        if replay is not None and replay.dispatcher is self.dispatcher and not _recording():
            pooled = self.pooled(x)
            if pooled.dtype is x.dtype and pooled.shape == replay.pooled_shape:
                if replay.forced:
                    return _forced(self, replay, lambda: replay.plan(x, pooled))
                return replay.plan(x, pooled)
        plans = self._plans.get(key)
        if plans is None or plans[1].dispatcher is not self.dispatcher:
            branch_key, project_key = self._keys(x)
            plans = self._plans[key] = (None if branch_key is None else _Plan(self, x, branch_key),
                                        _Plan(self, x, project_key))
        branch_plan, project_plan = plans
        if branch_plan is not None and branch_plan.choice == project_plan.choice == "triton" and not _recording():
            return self._forward_recorded(x, key, branch_plan, project_plan)
        if branch_plan is None:
            branches = [branch(x) for branch in self.branches]
        else:
            branches = self._run(branch_plan, x, lambda: self._branches_kernel(x),
                                 lambda: [b._forward_plain(x, None) for b in self.branches])
        pooled = self.pooled(x)
        return self._run(project_plan, x, lambda: self._project_kernel(branches, pooled),
                         lambda: self._project_plain(branches, pooled))

    def _forward_recorded(self, x: Tensor, key: tuple, branch_plan: _Plan, project_plan: _Plan) -> Tensor:
        """Both halves decided for Triton: run them checked, recording their launches, and keep the two as
        one replay for ``key`` (what later calls with that key run)."""
        from .kernels.aspp import AsppLaunchPlan, recording_launch_plans

        with recording_launch_plans() as recorded:
            branches = self._run(branch_plan, x, lambda: self._branches_kernel(x), None)
            pooled = self.pooled(x)
            out = self._run(project_plan, x, lambda: self._project_kernel(branches, pooled), None)
        plan = AsppLaunchPlan.from_recording(recorded, self._branch_packed, self._branch_bias32, self._packed,
                                             self._bias32)
        if plan is not None:
            self._replays[key] = _AsppReplay(plan, project_plan.dispatcher, project_plan.forced,
                                             f"{branch_plan.key}; {project_plan.key}", pooled.shape)
        return out

    def _run(self, plan: _Plan, x: Tensor, run_triton, run_cudnn):
        if plan.choice == "triton":
            return _forced(self, plan, run_triton) if plan.forced else run_triton()
        if plan.choice == "cudnn":
            return run_cudnn()
        return _first_call(self, plan, x, run_triton, run_cudnn)

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
