"""The Triton launches the GPU check makes, described without a GPU: their arguments, autotune keys, the
configs the real early prunes keep on sm_90, and the compile variant (Triton's on-disk cache key) of each.

A :class:`Launch` is one call of a public launcher (``conv_bn_relu_packed``, ``aspp_branches_packed``,
``aspp_project_packed``, ``depthwise_conv_act_packed``) on one problem. :func:`kernel_call` rebuilds the positional arguments and constexpr
keywords those launchers pass to the kernel (the same order, the same strides of dense channels-last tensors,
the same ``bias if bias is not None else out`` substitutions), with tiny CPU tensors standing in for the
device buffers: Triton's binder only reads their dtype and the alignment of their address. From that:

* :func:`candidates` — the configs the autotuner benchmarks for the launch: the kernel's real
  ``early_config_prune`` (:func:`fastdeeplab.kernels.conv.prune_by_executed_work`, ...) called the way
  Triton calls it, with ``torch.cuda`` answering as an sm_90 GPU (:func:`assume_sm90`) so the TMA configs
  are kept where a Hopper GPU keeps them;
* :func:`autotune_key` — Triton's autotune cache key (the kernel's ``key`` arguments plus every tensor's dtype);
* :func:`variant` — the key Triton's ``compile`` stores the built kernel under: the same binder
  (``create_function_from_signature``), argument packing (``JITFunction._pack_args``) and
  ``get_cache_key`` that ``JITFunction.run`` uses, for ``GPUTarget("cuda", 90, 32)``;
* :func:`compile_variant` — that compile itself (stage 0 runs it, 16 at a time, into the cache the later
  stages read), returning the cache key, so a stage's first launch of the variant is a cache load.

Needs compiled (not interpreted) kernels: run it without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any
from unittest import mock

import torch

__all__ = ["ASSUMED_ARCH", "Launch", "assume_sm90", "autotune_key", "autotuner", "candidates", "compile_variant",
           "config_id", "config_of", "kernel_call", "target", "variant"]

ASSUMED_ARCH = 90  # H100 / H200
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
KERNELS = ("conv", "aspp_branches", "aspp_project", "depthwise")


@dataclass(frozen=True)
class Launch:
    """One launcher call. ``config``: a config id (:func:`config_id`) forced with ``config=``, else autotuned."""

    kernel: str  # "conv" (conv_bn_relu_packed) | "aspp_branches" | "aspp_project" | "depthwise"
    dtype: str  # "fp16" | "bf16" | "fp32"
    n: int
    cin: int  # conv, aspp_branches: input channels; aspp_project: Cb (per branch); depthwise: C (= cout)
    cout: int
    h: int
    w: int
    k: int = 1
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    rates: tuple[int, ...] = ()
    residual: bool = False
    relu: bool = True
    tf32: bool = False  # fp32 only: INPUT_PRECISION "tf32" instead of "ieee"
    config: str | None = None
    # the epilogue's activation (depthwise; conv: hardswish, else ``relu`` decides), and, depthwise only, the
    # squeeze-excitation scale and the SE pooling pass (channel sums, no map written: depthwise_conv_act_mean)
    activation: str = "none"
    se: bool = False
    sums: bool = False

    @property
    def oh(self) -> int:
        return (self.h + 2 * self.padding - self.dilation * (self.k - 1) - 1) // self.stride + 1

    @property
    def ow(self) -> int:
        return (self.w + 2 * self.padding - self.dilation * (self.k - 1) - 1) // self.stride + 1

    def forced(self, config: Any) -> Launch:
        return replace(self, config=config_id(config))

    def forced_id(self, config: str) -> Launch:
        return replace(self, config=config)

    def se_launches(self) -> list[Launch]:
        """Depthwise with a squeeze-excitation, as the Triton backend runs it: the pooling pass (channel sums,
        no map: ``depthwise_conv_act_mean``), then the conv with the SE scale in its epilogue."""
        return [replace(self, se=False, sums=True), replace(self, se=True, sums=False)]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _modules():
    import fastdeeplab.kernels.aspp as aspp
    import fastdeeplab.kernels.conv as conv

    return conv, aspp


def _depthwise():
    import fastdeeplab.kernels.depthwise as depthwise

    return depthwise


def autotuner(launch: Launch):
    """The ``triton.autotune`` object the launcher runs when no config is given."""
    conv, aspp = _modules()
    if launch.kernel == "depthwise":
        return _depthwise()._depthwise_autotuned
    if launch.kernel == "conv":
        return conv._conv1x1_autotuned if launch.k == 1 else conv._conv_autotuned
    if launch.kernel == "aspp_branches":
        return aspp._aspp_branches_autotuned
    if launch.kernel == "aspp_project":
        return aspp._aspp_project_autotuned
    raise ValueError(f"unknown kernel {launch.kernel!r}")


def jit_function(launch: Launch):
    from triton.runtime.autotuner import Autotuner, Heuristics

    fn = autotuner(launch)
    while isinstance(fn, (Autotuner, Heuristics)):
        fn = fn.fn
    return fn


def gpu_configs(launch: Launch) -> list:
    """Every GPU config the launch may run forced (the autotuner's list, or the conv list for the grouped
    launch), as the GPU builds them (not the interpreter's single config)."""
    conv, aspp = _modules()
    if launch.kernel == "depthwise":
        return _depthwise().get_autotune_configs(for_interpreter=False)
    if launch.kernel == "aspp_project":
        return aspp.get_autotune_configs(for_interpreter=False)
    if launch.kernel == "conv" and launch.k == 1 and launch.config is None:
        return conv.get_autotune_configs(for_interpreter=False, kind="raster")
    return conv.get_autotune_configs(for_interpreter=False)


def config_id(config: Any) -> str:
    """A stable text id of a ``triton.Config``: its meta-parameters, warps and stages."""
    kw = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(config.kwargs.items()))
    return f"{kw},w{config.num_warps},s{config.num_stages}"


def config_of(launch: Launch) -> Any:
    """The ``triton.Config`` a forced launch names."""
    others = gpu_configs(replace(launch, k=3)) if launch.kernel != "depthwise" else []
    for config in gpu_configs(launch) + others:
        if config_id(config) == launch.config:
            return config
    raise KeyError(f"no GPU config {launch.config!r} for {launch.kernel}")


def _m_bucket(m: int) -> int:
    from fastdeeplab.kernels._utils import m_bucket

    return m_bucket(m)


def _activation_code(name: str) -> int:
    from fastdeeplab.kernels._utils import ACTIVATION_CODES

    return ACTIVATION_CODES[name]


def _conv_activation(launch: Launch) -> dict[str, Any]:
    """The conv kernel's activation constexpr: ``ACTIVATION`` (0 none, 1 ReLU, 2 hardswish) where the kernel
    has the hardswish epilogue, else the older ``APPLY_RELU`` flag. A conv launch's activation is
    ``launch.activation`` when set, else ReLU or none from ``launch.relu``."""
    name = launch.activation if launch.activation != "none" else ("relu" if launch.relu else "none")
    if "ACTIVATION" in jit_function(launch).arg_names:
        return {"ACTIVATION": _activation_code(name)}
    if name == "hardswish":
        raise ValueError("this checkout's conv kernel has no hardswish epilogue (APPLY_RELU only)")
    return {"APPLY_RELU": name == "relu"}


def kernel_call(launch: Launch, tensor=None) -> tuple[list[Any], dict[str, Any]]:
    """``(positional args, constexpr keywords)`` exactly as the launcher passes them to the kernel (config
    keywords excluded). ``tensor(dtype)`` makes a stand-in buffer (default: a one-element CPU tensor)."""
    from fastdeeplab.kernels._utils import resolve_input_precision

    if tensor is None:
        def tensor(dtype):
            return torch.empty(1, dtype=dtype)
    dt = DTYPES[launch.dtype]
    precision = resolve_input_precision(dt, launch.tf32)
    dev = 0  # device_key of cuda:0
    n, h, w = launch.n, launch.h, launch.w
    if launch.kernel == "conv":
        cin, cout, oh, ow = launch.cin, launch.cout, launch.oh, launch.ow
        x, wt, out = tensor(dt), tensor(dt), tensor(dt)
        res = tensor(dt) if launch.residual else out
        args = [x, wt, tensor(torch.float32), res, out, out,
                n, h, w, cin, cout, oh, ow, _m_bucket(n * oh * ow), dev,
                h * w * cin, w * cin, cin,
                oh * ow * cout, ow * cout, cout,
                oh * ow * cout, ow * cout, cout,
                launch.stride, launch.stride, launch.padding, launch.padding, launch.dilation, launch.dilation]
        kwargs = dict(KH=launch.k, KW=launch.k, HAS_BIAS=True, HAS_RESIDUAL=launch.residual,
                      **_conv_activation(launch), COUNT_TAPS=False, INPUT_PRECISION=precision, DOT_IN_FP32=False)
        return args, kwargs
    if launch.kernel == "aspp_branches":
        cin, cb = launch.cin, launch.cout
        out = tensor(dt)
        args = [tensor(dt), tensor(dt), tensor(torch.float32), out,
                n, h, w, cin, cb, _m_bucket(n * h * w), dev,
                h * w * cin, w * cin, cin,
                h * w * cb, w * cb, cb, n * h * w * cb,
                *launch.rates]
        kwargs = dict(HAS_BIAS=True, APPLY_RELU=True, INPUT_PRECISION=precision, DOT_IN_FP32=False)
        return args, kwargs
    if launch.kernel == "aspp_project":
        cb, cout = launch.cin, launch.cout
        out = tensor(dt)
        args = [tensor(dt), tensor(dt), tensor(dt), tensor(dt), tensor(dt), tensor(dt), tensor(torch.float32), out,
                n, h * w, w, cb, cout, _m_bucket(n * h * w), dev,
                h * w * cb, w * cb, cb,
                cb,
                h * w * cout, w * cout, cout]
        kwargs = dict(HAS_BIAS=True, APPLY_RELU=launch.relu, INPUT_PRECISION=precision, DOT_IN_FP32=False)
        return args, kwargs
    if launch.kernel == "depthwise":
        c, oh, ow = launch.cin, launch.oh, launch.ow
        x = tensor(dt)
        # what the launcher passes where a flag switches a pointer off: the output, or x when no map is written
        write = not launch.sums
        dummy_strides = (oh * ow * c, ow * c, c) if write else (h * w * c, w * c, c)
        args = [x, tensor(dt), tensor(torch.float32), tensor(dt), tensor(torch.float32), tensor(dt),
                n, h, w, c, oh, ow, _m_bucket(n * oh * ow), dev,
                h * w * c, w * c, c,
                c if launch.se else 0,
                *dummy_strides,
                launch.stride, launch.stride, launch.padding, launch.padding, launch.dilation, launch.dilation]
        kwargs = dict(KH=launch.k, KW=launch.k, HAS_BIAS=True,
                      ACTIVATION=_activation_code(launch.activation), HAS_SE=launch.se,
                      CHANNEL_SUMS=launch.sums, WRITE_OUTPUT=write)
        return args, kwargs
    raise ValueError(f"unknown kernel {launch.kernel!r}")


def named_args(launch: Launch) -> dict[str, Any]:
    args, kwargs = kernel_call(launch)
    return {**dict(zip(jit_function(launch).arg_names, args)), **kwargs}


@contextlib.contextmanager
def assume_sm90() -> Iterator[None]:
    """``torch.cuda`` answers as one sm_90 GPU (what the prunes' TMA test asks), nothing else changes."""
    with mock.patch.object(torch.cuda, "is_available", lambda: True), \
            mock.patch.object(torch.cuda, "get_device_capability", lambda device=None: (ASSUMED_ARCH // 10, 0)):
        yield


@functools.cache
def candidates(launch: Launch) -> list:
    """The configs one launch compiles and (autotuned) benchmarks: the forced one, or what the autotuner's
    early prune keeps on sm_90 (all its configs when it has no prune; Triton benchmarks even a single one).
    Call it inside :func:`assume_sm90` (the results are memoised per launch)."""
    if launch.config is not None:
        return [config_of(launch)]
    tuner = autotuner(launch)
    configs = list(tuner.configs)
    prune = getattr(tuner, "early_config_prune", None)
    if prune is None or len(configs) <= 1:
        return configs
    args, kwargs = kernel_call(launch)
    nargs = dict(zip(tuner.arg_names, args))
    with assume_sm90():
        return list(prune(configs, nargs, **kwargs))


def autotune_key(launch: Launch) -> tuple:
    """Triton's autotune cache key of the launch (``Autotuner.run``): key arguments, then tensor dtypes."""
    tuner = autotuner(launch)
    named = named_args(launch)
    key: list[Any] = [launch.kernel if launch.k != 1 or launch.kernel != "conv" else "conv1x1"]
    key += [named[k] for k in tuner.keys if k in named]
    key += [str(v.dtype) for k, v in named.items() if k in tuner.arg_names and hasattr(v, "dtype")]
    return tuple(key)


def target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", ASSUMED_ARCH, 32)


_BINDERS: dict = {}


def _compile_parts(launch: Launch, config: Any, tgt=None):
    """``(jit function, ASTSource, backend, options)`` as ``JITFunction.run`` builds them for this launch."""
    from triton import knobs
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = jit_function(launch)
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{fn!r} is not a compiled JITFunction: run without TRITON_INTERPRET")
    tgt = tgt or target()
    cache_key = (fn, tgt.arch)
    if cache_key not in _BINDERS:  # what JITFunction.create_binder builds once per device
        backend = make_backend(tgt)
        _BINDERS[cache_key] = (backend, create_function_from_signature(fn.signature, fn.params, backend))
    backend, binder = _BINDERS[cache_key]
    args, kwargs = kernel_call(launch)
    kwargs = dict(kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    if launch.config is None:  # the autotuner passes every field of the config
        kwargs = dict(kwargs, **config.all_kwargs())
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return fn, ASTSource(fn, signature, constexprs, attrs), backend, options


def variant(launch: Launch, config: Any) -> str:
    """The hash Triton's ``compile`` files this build under in ``TRITON_CACHE_DIR`` (sm_90)."""
    key = (launch, config_id(config))
    if key not in _VARIANTS:
        _VARIANTS[key] = _variant(launch, config)
    return _VARIANTS[key]


_VARIANTS: dict[tuple[Launch, str], str] = {}


def _variant(launch: Launch, config: Any) -> str:
    from triton.compiler.compiler import get_cache_invalidating_env_vars
    from triton.runtime.cache import get_cache_key
    _, src, backend, options = _compile_parts(launch, config)
    options = backend.parse_options(dict(options.__dict__, **src.parse_options()))
    key = get_cache_key(src, backend, options, get_cache_invalidating_env_vars())
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def compile_variant(launch: Launch, config: Any, arch: int = ASSUMED_ARCH) -> dict[str, Any]:
    """Build one variant for ``sm_<arch>`` into ``TRITON_CACHE_DIR`` (what the JIT would build at the first
    launch); returns ``{"seconds", "cpu_seconds"}`` (wall, and CPU of this process and ptxas)."""
    import time

    import triton
    from triton.backends.compiler import GPUTarget

    def cpu() -> float:  # this process and its finished children (ptxas)
        import resource

        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    start, start_cpu = time.perf_counter(), cpu()
    _, src, backend, options = _compile_parts(launch, config, GPUTarget("cuda", arch, 32))
    triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": cpu() - start_cpu}
