"""The kernels as torch custom ops, so ``torch.compile`` and ``torch.export`` keep them in the graph.

==================================  ===========================================================================
``torch.ops.fastdeeplab.conv2d_act``  ``act(conv2d(x, W) + bias [+ residual])``: :func:`conv_bn_relu_packed`
``torch.ops.fastdeeplab.aspp_branches``  ASPP's 1×1 + three atrous 3×3 branches in one launch: ``[4N, Cb, H, W]``
``torch.ops.fastdeeplab.aspp_project``  the fused ASPP projection: :func:`aspp_project_packed`
``torch.ops.fastdeeplab.depthwise_conv_act``  ``act(dwconv(x) + bias) * se_scale``: :func:`depthwise_conv_act_packed`
``torch.ops.fastdeeplab.depthwise_conv_act_mean``  ``mean_hw(act(dwconv(x) + bias))`` ``[N, C]`` float32, no map written
==================================  ===========================================================================

Registration, by what the installed packages allow:

* **CUDA, torch with** ``torch.library.triton_op`` (2.6+) **and triton**: each op is a ``triton_op`` whose
  launches go through ``torch.library.wrap_triton``, so Inductor sees (and can fuse around) the kernels and
  CUDA graphs capture them. The CPU kernel is the plain-PyTorch twin (:mod:`fastdeeplab.kernels.reference`).
* **Otherwise** (no triton, an older torch, or ``TRITON_INTERPRET=1``, whose interpreted kernels torch cannot
  trace): a ``torch.library.custom_op``, opaque to the compiler but still one node in the graph. Its kernel
  runs the Triton launcher under the interpreter (tests) and the reference twin on a CPU without it.

``conv2d_act(x, packed_weight, bias, residual, kernel_size, stride, padding, dilation, relu, activation=None)``:
``activation`` (``"none"``, ``"relu"``, ``"hardswish"``) names the epilogue; left out, ``relu`` picks ReLU or none;
given, ``relu`` must agree with it (``True`` only with ``"relu"``), as in :func:`conv_bn_relu_packed`.

Every op has a ``register_fake`` shape function, so ``torch.export`` and ``torch.compile`` trace the model
without running a kernel. The ONNX export never sees these ops: fused modules export as standard ops.

>>> import torch
>>> from fastdeeplab.kernels import ops
>>> x, w = torch.randn(1, 8, 5, 5), torch.randn(8, 8, 3, 3)
>>> packed = w.permute(2, 3, 1, 0).reshape(72, 8).contiguous()      # pack_weight's layout
>>> y = ops.conv2d_act(x, packed, None, None, [3, 3], [1, 1], [1, 1], [1, 1], True)
>>> tuple(y.shape)
(1, 8, 5, 5)
"""

# No ``from __future__ import annotations``: torch.library infers the op schemas from these annotations.
import functools
from typing import List, Optional

import torch
from torch import Tensor

from ._utils import interpreting, resolve_activation, triton_available
from .reference import aspp_project_reference, conv_bn_relu_reference, depthwise_conv_act_reference

__all__ = ["NAMESPACE", "TRITON_OPS", "aspp_branches", "aspp_project", "conv2d_act", "depthwise_conv_act",
           "depthwise_conv_act_mean"]

NAMESPACE = "fastdeeplab"
# Whether the ops are triton_ops (traceable kernels) rather than opaque custom ops.
TRITON_OPS = hasattr(torch.library, "triton_op") and triton_available() and not interpreting()


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _channels_last_empty(shape: List[int], like: Tensor) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device).contiguous(memory_format=torch.channels_last)


def _unpack(packed: Tensor, cin: int, kh: int, kw: int) -> Tensor:
    """``[KH*KW*Cin, Cout]`` (pack_weight's layout) back to ``[Cout, Cin, KH, KW]``."""
    return packed.reshape(kh, kw, cin, packed.shape[1]).permute(3, 2, 0, 1)


def _interpreter_config(x: Tensor, *, raster: bool = False):
    """Whole models on CPU tensors (only under ``TRITON_INTERPRET=1``) run with large tiles: the interpreter's
    cost is per block iteration. The kernel tests call the launchers with small tiles. CUDA: autotune."""
    if x.device.type != "cpu":
        return None
    import triton

    tile = {"BLOCK_OH": 1, "BLOCK_OW": 64} if raster else {"BLOCK_OH": 8, "BLOCK_OW": 8}
    return triton.Config({**tile, "BLOCK_N": 256, "BLOCK_K": 256, "GROUP_M": 8, "RASTER": raster, "USE_TMA": False},
                         num_warps=4, num_stages=1)


def _use_kernels(x: Tensor) -> bool:
    return x.device.type == "cuda" or (interpreting() and triton_available())


# ---------------------------------------------------------------------------------------------------
# Implementations: the Triton launchers, and the reference twins (CPU without the interpreter)
# ---------------------------------------------------------------------------------------------------
def _conv2d_act_kernel(x: Tensor, packed_weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                       kernel_size: List[int], stride: List[int], padding: List[int], dilation: List[int],
                       relu: bool, activation: Optional[str] = None) -> Tensor:
    from .conv import conv_bn_relu_packed

    return conv_bn_relu_packed(x, packed_weight, bias, kernel_size=tuple(kernel_size), stride=tuple(stride),
                               padding=tuple(padding), dilation=tuple(dilation), relu=relu, residual=residual,
                               config=_interpreter_config(x, raster=tuple(kernel_size) == (1, 1)),
                               activation=activation)


def _conv2d_act_reference(x: Tensor, packed_weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                          kernel_size: List[int], stride: List[int], padding: List[int], dilation: List[int],
                          relu: bool, activation: Optional[str] = None) -> Tensor:
    weight = _unpack(packed_weight, x.shape[1], kernel_size[0], kernel_size[1])
    y = conv_bn_relu_reference(x, weight, bias, stride=stride, padding=padding, dilation=dilation, relu=relu,
                               residual=residual, activation=activation)
    return y.contiguous(memory_format=torch.channels_last)


def _aspp_branches_kernel(x: Tensor, packed_weight: Tensor, bias: Optional[Tensor], rates: List[int]) -> Tensor:
    from .aspp import aspp_branches_packed

    return aspp_branches_packed(x, packed_weight, bias, rates, config=_interpreter_config(x, raster=True))


def _aspp_branches_reference(x: Tensor, packed_weight: Tensor, bias: Optional[Tensor], rates: List[int]) -> Tensor:
    cin, cb = x.shape[1], packed_weight.shape[1]
    weights = [_unpack(packed_weight[:cin], cin, 1, 1)]
    weights += [_unpack(packed_weight[cin + 9 * cin * i: cin + 9 * cin * (i + 1)], cin, 3, 3) for i in range(3)]
    biases = [None] * 4 if bias is None else list(bias.reshape(4, cb))
    pads = [0, *rates]
    ys = [conv_bn_relu_reference(x, w, b, padding=p, dilation=max(p, 1)) for w, b, p in zip(weights, biases, pads)]
    return torch.cat(ys).contiguous(memory_format=torch.channels_last)


def _aspp_project_kernel(branches: List[Tensor], pooled: Tensor, packed_weight: Tensor, bias: Optional[Tensor],
                         relu: bool) -> Tensor:
    from .aspp import aspp_project_packed

    config = None
    if branches[0].device.type == "cpu":
        import triton

        config = triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 256, "GROUP_M": 8}, num_warps=4,
                               num_stages=1)
    return aspp_project_packed(list(branches), pooled, packed_weight, bias, relu=relu, config=config)


def _aspp_project_reference(branches: List[Tensor], pooled: Tensor, packed_weight: Tensor, bias: Optional[Tensor],
                            relu: bool) -> Tensor:
    weight = packed_weight.t()[:, :, None, None]
    y = aspp_project_reference(list(branches), pooled, weight, None if bias is None else bias.to(pooled.dtype),
                               relu=relu)
    return y.contiguous(memory_format=torch.channels_last)


def _depthwise_conv_act_kernel(x: Tensor, packed_weight: Tensor, bias: Optional[Tensor], se_scale: Optional[Tensor],
                               kernel_size: List[int], stride: List[int], padding: List[int], dilation: List[int],
                               activation: str) -> Tensor:
    from .depthwise import depthwise_conv_act_packed

    return depthwise_conv_act_packed(x, packed_weight, bias, kernel_size=tuple(kernel_size), stride=tuple(stride),
                                     padding=tuple(padding), dilation=tuple(dilation), activation=activation,
                                     se_scale=se_scale, config=_depthwise_interpreter_config(x))


def _depthwise_interpreter_config(x: Tensor):
    """CPU tensors (only under ``TRITON_INTERPRET=1``): large tiles, the interpreter's cost is per block
    operation. CUDA: autotune."""
    if x.device.type != "cpu":
        return None
    import triton

    return triton.Config({"BLOCK_P": 64, "BLOCK_C": 256}, num_warps=4, num_stages=1)


def _depthwise_conv_act_mean_kernel(x: Tensor, packed_weight: Tensor, bias: Optional[Tensor], kernel_size: List[int],
                                    stride: List[int], padding: List[int], dilation: List[int],
                                    activation: str) -> Tensor:
    from .depthwise import depthwise_conv_act_packed

    sums = torch.empty(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    depthwise_conv_act_packed(x, packed_weight, bias, kernel_size=tuple(kernel_size), stride=tuple(stride),
                              padding=tuple(padding), dilation=tuple(dilation), activation=activation,
                              channel_sums=sums, write_output=False, config=_depthwise_interpreter_config(x))
    oh = _out_size(x.shape[2], kernel_size[0], stride[0], padding[0], dilation[0])
    ow = _out_size(x.shape[3], kernel_size[1], stride[1], padding[1], dilation[1])
    return sums / (oh * ow)


def _depthwise_conv_act_mean_reference(x: Tensor, packed_weight: Tensor, bias: Optional[Tensor],
                                       kernel_size: List[int], stride: List[int], padding: List[int],
                                       dilation: List[int], activation: str) -> Tensor:
    y = _depthwise_conv_act_reference(x.float(), packed_weight.float(), bias, None, kernel_size, stride, padding,
                                      dilation, activation)
    return y.mean((2, 3))


def _depthwise_conv_act_reference(x: Tensor, packed_weight: Tensor, bias: Optional[Tensor],
                                  se_scale: Optional[Tensor], kernel_size: List[int], stride: List[int],
                                  padding: List[int], dilation: List[int], activation: str) -> Tensor:
    weight = packed_weight.t().reshape(x.shape[1], 1, kernel_size[0], kernel_size[1])  # [KH*KW, C] -> [C,1,KH,KW]
    y = depthwise_conv_act_reference(x, weight, bias, stride=stride, padding=padding, dilation=dilation,
                                     activation=activation, se_scale=se_scale)
    return y.contiguous(memory_format=torch.channels_last)


def _dispatching(kernel, reference):
    @functools.wraps(kernel)  # keeps the annotated signature: torch 2.11's triton_op infers a schema from it
    def impl(*args):
        x = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]
        return kernel(*args) if _use_kernels(x) else reference(*args)

    return impl


# ---------------------------------------------------------------------------------------------------
# Shape functions
# ---------------------------------------------------------------------------------------------------
def _conv2d_act_fake(x: Tensor, packed_weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                     kernel_size: List[int], stride: List[int], padding: List[int], dilation: List[int],
                     relu: bool, activation: Optional[str] = None) -> Tensor:
    resolve_activation(relu, activation)  # a bad pair fails while tracing, not at the first launch
    n, _, h, w = x.shape
    oh = _out_size(h, kernel_size[0], stride[0], padding[0], dilation[0])
    ow = _out_size(w, kernel_size[1], stride[1], padding[1], dilation[1])
    return _channels_last_empty([n, packed_weight.shape[1], oh, ow], x)


def _depthwise_conv_act_fake(x: Tensor, packed_weight: Tensor, bias: Optional[Tensor], se_scale: Optional[Tensor],
                             kernel_size: List[int], stride: List[int], padding: List[int], dilation: List[int],
                             activation: str) -> Tensor:
    n, c, h, w = x.shape
    oh = _out_size(h, kernel_size[0], stride[0], padding[0], dilation[0])
    ow = _out_size(w, kernel_size[1], stride[1], padding[1], dilation[1])
    return _channels_last_empty([n, c, oh, ow], x)


def _depthwise_conv_act_mean_fake(x: Tensor, packed_weight: Tensor, bias: Optional[Tensor], kernel_size: List[int],
                                  stride: List[int], padding: List[int], dilation: List[int],
                                  activation: str) -> Tensor:
    return torch.empty(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)


def _aspp_branches_fake(x: Tensor, packed_weight: Tensor, bias: Optional[Tensor], rates: List[int]) -> Tensor:
    n, _, h, w = x.shape
    return _channels_last_empty([4 * n, packed_weight.shape[1], h, w], x)


def _aspp_project_fake(branches: List[Tensor], pooled: Tensor, packed_weight: Tensor, bias: Optional[Tensor],
                       relu: bool) -> Tensor:
    n, _, h, w = branches[0].shape
    return _channels_last_empty([n, packed_weight.shape[1], h, w], branches[0])


# ---------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------
def _register(name: str, kernel, reference, fake, schema: str):
    qualname = f"{NAMESPACE}::{name}"
    if TRITON_OPS:
        # The body is traced by torch.compile/export (fake CUDA tensors: the wrap_triton launches; CPU: the twin)
        op = torch.library.triton_op(qualname, _dispatching(kernel, reference), mutates_args=(), schema=schema)
        op.register_kernel("cpu", reference)  # the plain-PyTorch twin
    else:
        op = torch.library.custom_op(qualname, _dispatching(kernel, reference), mutates_args=(), schema=schema)
        op.register_fake(fake)
    return op


conv2d_act = _register(
    "conv2d_act", _conv2d_act_kernel, _conv2d_act_reference, _conv2d_act_fake,
    "(Tensor x, Tensor packed_weight, Tensor? bias, Tensor? residual, int[] kernel_size, int[] stride, "
    "int[] padding, int[] dilation, bool relu, str? activation=None) -> Tensor")
aspp_branches = _register(
    "aspp_branches", _aspp_branches_kernel, _aspp_branches_reference, _aspp_branches_fake,
    "(Tensor x, Tensor packed_weight, Tensor? bias, int[] rates) -> Tensor")
aspp_project = _register(
    "aspp_project", _aspp_project_kernel, _aspp_project_reference, _aspp_project_fake,
    "(Tensor[] branches, Tensor pooled, Tensor packed_weight, Tensor? bias, bool relu) -> Tensor")

# What each op runs, callable without the op machinery (torch's dispatcher, the custom-op wrapper: ~0.3 ms of
# host time per call on a loaded CPU, more than the launch itself). The fused layers call these in eager
# mode, where no graph is being recorded, and the ops themselves whenever torch traces (torch.compile,
# torch.export, a dispatch mode), so graphs still hold fastdeeplab ops.
EAGER = {
    "conv2d_act": _dispatching(_conv2d_act_kernel, _conv2d_act_reference),
    "aspp_branches": _dispatching(_aspp_branches_kernel, _aspp_branches_reference),
    "aspp_project": _dispatching(_aspp_project_kernel, _aspp_project_reference),
}
depthwise_conv_act = _register(
    "depthwise_conv_act", _depthwise_conv_act_kernel, _depthwise_conv_act_reference, _depthwise_conv_act_fake,
    "(Tensor x, Tensor packed_weight, Tensor? bias, Tensor? se_scale, int[] kernel_size, int[] stride, "
    "int[] padding, int[] dilation, str activation) -> Tensor")
depthwise_conv_act_mean = _register(
    "depthwise_conv_act_mean", _depthwise_conv_act_mean_kernel, _depthwise_conv_act_mean_reference,
    _depthwise_conv_act_mean_fake,
    "(Tensor x, Tensor packed_weight, Tensor? bias, int[] kernel_size, int[] stride, int[] padding, "
    "int[] dilation, str activation) -> Tensor")
