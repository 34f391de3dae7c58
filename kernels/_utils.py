"""Small helpers shared by the kernel launchers (no triton import at module level)."""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

TRITON_EXTRA_HINT = "pip install 'fastdeeplab[triton]'"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT32_MAX = 2**31 - 1

# (atol, rtol) of a kernel's output against a float64 reference computed from the same dtype-rounded inputs:
# what remains is float32 accumulation order (and TF32 rounding of float32 inputs) plus the final rounding to
# the output dtype. The kernel tests and the dispatcher's first-call check (kernels/dispatch.py) share it.
KERNEL_TOLERANCES = {
    (torch.float32, False): (1e-4, 1e-4),  # IEEE products
    (torch.float32, True): (1e-2, 1e-2),  # TF32 products
    (torch.float16, False): (2e-3, 2e-3),
    (torch.bfloat16, False): (1.6e-2, 1.6e-2),
}


# The epilogue activations of the kernels (conv, grouped ASPP, depthwise), in the order of their ``ACTIVATION``
# constexpr codes: 0 none, 1 ReLU, 2 hardswish (``x · min(max(x + 3, 0), 6) / 6``, as ``F.hardswish``).
ACTIVATIONS = ("none", "relu", "hardswish")
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}


def resolve_activation(relu: object = None, activation: object = None) -> str:
    """The epilogue activation from a launcher's ``relu=`` / ``activation=`` pair (one home for the rule).

    ``activation`` (``"none"``, ``"relu"`` or ``"hardswish"``) names it; ``relu`` is the older flag, ``True``
    for ReLU and ``False`` for none. Neither given: ReLU (the launchers' historical default). Both given: they
    must agree, ``relu`` being whether the activation is ReLU (``relu=False, activation="hardswish"`` is
    fine, ``relu=True, activation="hardswish"`` is a one-line ``ValueError``).
    """
    if activation is None:
        return "none" if relu is not None and not relu else "relu"
    if not isinstance(activation, str) or activation not in ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if relu is not None and bool(relu) != (activation == "relu"):
        raise ValueError(f"relu={relu!r} contradicts activation={activation!r}: pass activation= alone "
                         "(relu= is the older flag, True only with activation='relu')")
    return activation


def kernel_tolerance(dtype: torch.dtype, tf32: bool = False) -> tuple[float, float]:
    """``(atol, rtol)`` for a kernel output of ``dtype`` (``tf32``: float32 computed with TF32 products)."""
    return KERNEL_TOLERANCES[(dtype, bool(tf32) and dtype == torch.float32)]


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None or has no spec
        return False


def require_triton() -> None:
    """Raise an ImportError that names the extra to install when triton is missing."""
    if not triton_available():
        raise ImportError(f"fastdeeplab's Triton kernels need the 'triton' package: {TRITON_EXTRA_HINT}")


def interpreting() -> bool:
    """Whether Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    """``3 -> (3, 3)``; ``(3, 5) -> (3, 5)``; anything else is a TypeError."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return int(value[0]), int(value[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def check_tensor(t: object, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float_dtype(t: Tensor, name: str) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")


def check_device(x: Tensor, others: dict[str, Tensor | None]) -> None:
    """Every tensor on ``x``'s device, and a device Triton can run on."""
    for name, t in others.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(f"Triton kernels need CUDA tensors, got x on {x.device} "
                         "(set TRITON_INTERPRET=1 before importing triton to run them on CPU for debugging)")


def resolve_input_precision(dtype: torch.dtype, allow_tf32: bool | None) -> str:
    """``tl.dot``'s ``input_precision``: "ieee" or "tf32" for float32 inputs, "tf32" (ignored) otherwise.

    ``allow_tf32=None`` follows ``torch.backends.cudnn.allow_tf32``, which is what ``F.conv2d`` uses.
    """
    if dtype != torch.float32:
        return "tf32"
    if allow_tf32 is None:
        allow_tf32 = bool(torch.backends.cudnn.allow_tf32)
    return "tf32" if allow_tf32 else "ieee"


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether kernels must upcast ``tl.dot`` operands to float32: only bfloat16 under the interpreter.

    Triton's CPU interpreter stores bfloat16 as uint16 and its ``tl.dot`` multiplies the raw bit patterns
    (triton-lang/triton#11584; its debugging guide says to cast bfloat16 to float32). bf16×bf16 products
    are exact in float32 and accumulation is float32 either way, so the upcast does not change the maths.
    Compiled GPU kernels never take this path.
    """
    return dtype == torch.bfloat16 and interpreting()


def check_out(out: Tensor | None, shape: tuple[int, ...], x: Tensor) -> Tensor:
    """Validate a caller-provided output, or allocate a channels-last one."""
    if out is None:
        return torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    check_tensor(out, "out")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.dtype != x.dtype:
        raise TypeError(f"out has dtype {out.dtype}, expected {x.dtype} (the input dtype)")
    if out.device != x.device:
        raise ValueError(f"out is on {out.device} but x is on {x.device}")
    if out.stride(1) != 1 and shape[1] > 1:
        raise ValueError("out must be channels-last (stride 1 along C): "
                         "torch.empty(..., memory_format=torch.channels_last)")
    if not out.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("out must be a dense channels-last tensor (no gaps between pixels or images): "
                         "torch.empty(..., memory_format=torch.channels_last)")
    return out


def launch_guard(t: Tensor):
    """``with launch_guard(x):`` makes ``x``'s GPU current for a launch (Triton launches on the current device
    and its stream); a no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else _NO_GUARD


_NO_GUARD = contextlib.nullcontext()  # reusable: nullcontext keeps no state


def device_key(t: Tensor) -> int:
    """An autotune-key integer for ``t``'s device: the CUDA index, -1 on CPU."""
    return t.device.index if t.device.type == "cuda" and t.device.index is not None else -1


def m_bucket(m: int) -> int:
    """The autotune key's bucket of ``M = N·OH·OW``: the next power of two (at least 256), so tuning runs once
    per bucket, not once per image size, and batch 1 and batch 8 tune separately."""
    return max(256, 1 << max(int(m) - 1, 0).bit_length())


AUTOTUNE_MS_ENV = "FASTDEEPLAB_AUTOTUNE_MS"


def autotune_timing() -> tuple[float, float] | None:
    """``(warmup_ms, rep_ms)`` from ``$FASTDEEPLAB_AUTOTUNE_MS="warmup,rep"`` (e.g. ``"5,20"``), or ``None``
    when unset (Triton's default benchmark: 25 ms warm-up, 100 ms of repeats). Read at every tuning, so it
    can be set after import. A malformed value is a one-line ``ValueError`` naming the variable."""
    raw = os.environ.get(AUTOTUNE_MS_ENV, "").strip()
    if not raw:
        return None
    try:
        warmup, rep = (float(v) for v in raw.split(","))
    except ValueError:
        raise ValueError(f"{AUTOTUNE_MS_ENV}={raw!r}: expected 'warmup_ms,rep_ms', e.g. '5,20'") from None
    if not (warmup >= 0 and rep > 0):
        raise ValueError(f"{AUTOTUNE_MS_ENV}={raw!r}: warm-up must be >= 0 ms and repeat > 0 ms")
    return warmup, rep


def autotune_do_bench(kernel_call, quantiles):
    """The autotuners' benchmark: ``triton.testing.do_bench`` with :func:`autotune_timing`'s warm-up and
    repeat when ``$FASTDEEPLAB_AUTOTUNE_MS`` is set, else the driver's default benchmarker (unchanged)."""
    timing = autotune_timing()
    if timing is None:
        from triton.runtime.driver import driver

        return driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=timing[0], rep=timing[1], quantiles=quantiles)


def autotune_cache_kwargs() -> dict:
    """The kernels' extra ``triton.autotune`` arguments: ``do_bench=autotune_do_bench`` (the
    ``$FASTDEEPLAB_AUTOTUNE_MS`` knob) and, where the installed ``triton.autotune`` can cache tuning results on
    disk across processes (triton >= 3.4), ``cache_results=True``."""
    import inspect

    import triton

    params = inspect.signature(triton.autotune).parameters
    kwargs = {"cache_results": True} if "cache_results" in params else {}
    if "do_bench" in params:
        kwargs["do_bench"] = autotune_do_bench
    return kwargs


def wrap_kernel(kernel, like: Tensor | None = None):
    """The kernel to launch: ``torch.library.wrap_triton(kernel)`` while torch traces (``torch.compile``,
    ``torch.export``, a ``triton_op``'s fake or functional pass: ``like``, the launch's input, is then not a
    plain tensor, or a dispatch mode is active), so the launch enters the graph; the kernel itself for eager
    launches and under the interpreter, whose kernels torch cannot trace.

    Eager matters: outside a ``triton_op``, ``wrap_triton`` rebuilds an autotuner with no cache on every call
    of a kernel that has an ``early_config_prune`` (torch's ``triton_kernel_wrap``), so each direct call of a
    launcher would re-tune its problem. Launching the autotuned kernel itself tunes each problem once.
    ``like=None`` (callers that do not pass their input) keeps the wrapping whenever torch allows it.
    """
    wrap = getattr(torch.library, "wrap_triton", None)
    if wrap is None or interpreting():
        return kernel
    if like is not None and type(like) is Tensor and not tracing():
        return kernel
    return wrap(kernel)


def tracing() -> bool:
    """Whether torch is compiling, exporting or running a Python dispatch mode (make_fx, fake tensors)."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def patch_interpreter_indices() -> bool:
    """Triton < 3.7's interpreter turns a scalar tensor into a Python index with ``int(array)``, but its
    scalars are 1-element arrays, which NumPy 2 refuses (the kernels' ``range(0, n_iters)`` fails); Triton
    3.8 squeezes first. Under ``TRITON_INTERPRET=1`` the kernel modules apply the same squeeze on import.
    Compiled kernels are unaffected. Returns whether it patched anything."""
    if not interpreting():
        return False
    import inspect

    import triton.runtime.interpreter as interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_fastdeeplab_squeeze", False) or "squeeze" in inspect.getsource(original):
        return False

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._fastdeeplab_squeeze = True
    interpreter._patch_lang_tensor = patched
    return True
