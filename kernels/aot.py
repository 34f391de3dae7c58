"""Ahead-of-time compile check: every autotune config of every kernel, for sm_80 and sm_90, without a GPU.

For each kernel × config × dtype × architecture this builds the kernel with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))``, runs the
PTX through the ``ptxas -v`` that ships with Triton, and reports registers per thread, spill bytes, Triton's
shared-memory allocation, which tensor-core instruction the PTX uses (``mma.sync`` or ``wgmma``) and whether
it loads through TMA (``cp.async.bulk.tensor``, required of the ``USE_TMA`` configs on sm_90).

    python -m fastdeeplab.kernels.aot                    # all kernels, sm_80 and sm_90, fp16 / bf16 / tf32
    python -m fastdeeplab.kernels.aot --arch 90 --kernel aspp_project --markdown

The exit status is non-zero if any build fails to compile, spills, exceeds the architecture's shared memory,
or lacks tensor-core instructions (``mma.sync`` on sm_80, ``wgmma`` on sm_90) where the kernel reduces over
channels (the depthwise kernels do not, so they use no MMA by design and the table says so). Signatures use the
specialisation the JIT picks for typical DeepLab shapes: 16-byte-aligned pointers and channel counts and
strides divisible by 16; the spatial sizes and the convolution geometry stay runtime integers.

Under ``TRITON_INTERPRET=1`` ``@triton.jit`` returns interpreter objects that cannot be compiled, so
:func:`compile_reports` then runs the compilation in a child process with the variable removed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib
import importlib.util
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

__all__ = ["ARCHS", "DTYPES", "KERNELS", "CompileJob", "compile_report", "compile_reports", "format_table",
           "ptxas_path", "ptxas_version"]

ARCHS = (80, 90)
DTYPES = ("fp16", "bf16", "fp32-tf32")
# Largest dynamic shared memory one block may opt into (CUDA occupancy tables): A100 and H100.
SMEM_LIMIT = {80: 166912, 90: 232448}
TENSOR_CORE_OP = {80: "mma.sync", 90: "wgmma"}
_TRITON_TYPE = {"fp16": "fp16", "bf16": "bf16", "fp32-tf32": "fp32"}


@dataclass(frozen=True)
class KernelSpec:
    """How to build one kernel's signature: which args are pointers, plain ints and constexpr flags."""

    module: str  # fastdeeplab.kernels submodule
    fn: str  # the un-autotuned @triton.jit function in it
    data_ptrs: tuple[str, ...]  # pointers to the data dtype
    fp32_ptrs: tuple[str, ...]
    i32_ptrs: tuple[str, ...]
    aligned_ints: tuple[str, ...]  # ints specialised as divisible by 16
    flags: tuple[tuple[str, object], ...]  # constexpr flags other than the meta-parameters
    configs_fn: str = "get_autotune_configs"  # the module's config builder
    configs_kind: str | None = None  # its ``kind=`` argument, if any
    mma: bool = True  # whether the kernel must use tensor cores (False: no channel reduction, e.g. depthwise)


# Sizes the JIT does not specialise (do_not_specialize) stay plain i32 here: N, H, W, OH, OW.
_CONV_COMMON = dict(
    module="conv", fn="_conv_bn_relu_kernel",
    data_ptrs=("x_ptr", "w_ptr", "res_ptr", "out_ptr"), fp32_ptrs=("bias_ptr",), i32_ptrs=("taps_ptr",),
    aligned_ints=("C_IN", "C_OUT", "stride_xn", "stride_xh", "stride_xw", "stride_rn", "stride_rh", "stride_rw",
                  "stride_on", "stride_oh", "stride_ow"),
)
# ACTIVATION: 1 ReLU (ResNet, heads), 2 hardswish (MobileNetV3's 1×1 expands and features[16])
_CONV_FLAGS = (("HAS_BIAS", True), ("COUNT_TAPS", False), ("DOT_IN_FP32", False))

_DEPTHWISE_COMMON = dict(
    module="depthwise", fn="_depthwise_conv_act_kernel", data_ptrs=("x_ptr", "w_ptr", "out_ptr"),
    fp32_ptrs=("bias_ptr", "se_ptr", "sum_ptr"), i32_ptrs=(),
    aligned_ints=("C", "stride_xn", "stride_xh", "stride_xw", "stride_sn", "stride_on", "stride_oh", "stride_ow"),
    mma=False,
)
_DEPTHWISE_APPLY = (("HAS_BIAS", True), ("ACTIVATION", 2), ("HAS_SE", True), ("CHANNEL_SUMS", False),
                    ("WRITE_OUTPUT", True))
_DEPTHWISE_POOL = (("HAS_BIAS", True), ("ACTIVATION", 2), ("HAS_SE", False), ("CHANNEL_SUMS", True),
                   ("WRITE_OUTPUT", False))

KERNELS: dict[str, KernelSpec] = {
    # 3×3: spatial and raster tiles (the autotuner sees both)
    "conv3x3": KernelSpec(**_CONV_COMMON, flags=(("KH", 3), ("KW", 3), ("HAS_RESIDUAL", False), ("ACTIVATION", 1),
                                                 *_CONV_FLAGS)),
    # 1×1: the GEMM-shaped raster tiles; with the bottleneck's residual in the epilogue
    "conv1x1": KernelSpec(**_CONV_COMMON, configs_kind="raster",
                          flags=(("KH", 1), ("KW", 1), ("HAS_RESIDUAL", False), ("ACTIVATION", 1), *_CONV_FLAGS)),
    "conv1x1_residual": KernelSpec(**_CONV_COMMON, configs_kind="raster",
                                   flags=(("KH", 1), ("KW", 1), ("HAS_RESIDUAL", True), ("ACTIVATION", 1),
                                          *_CONV_FLAGS)),
    # MobileNetV3: the hardswish epilogue (1×1 expands, features[16]); the linear projection with the residual
    "conv1x1_hardswish": KernelSpec(**_CONV_COMMON, configs_kind="raster",
                                    flags=(("KH", 1), ("KW", 1), ("HAS_RESIDUAL", False), ("ACTIVATION", 2),
                                           *_CONV_FLAGS)),
    "conv1x1_residual_linear": KernelSpec(**_CONV_COMMON, configs_kind="raster",
                                          flags=(("KH", 1), ("KW", 1), ("HAS_RESIDUAL", True), ("ACTIVATION", 0),
                                                 *_CONV_FLAGS)),
    "aspp_branches": KernelSpec(
        module="aspp", fn="_aspp_branches_kernel", data_ptrs=("x_ptr", "w_ptr", "out_ptr"), fp32_ptrs=("bias_ptr",),
        i32_ptrs=(), aligned_ints=("C_IN", "CB", "stride_xn", "stride_xh", "stride_xw", "stride_on", "stride_oh",
                                   "stride_ow"),
        flags=(("HAS_BIAS", True), ("APPLY_RELU", True), ("DOT_IN_FP32", False)), configs_fn="get_branch_configs",
    ),
    "aspp_project": KernelSpec(
        module="aspp", fn="_aspp_project_kernel",
        data_ptrs=("b0_ptr", "b1_ptr", "b2_ptr", "b3_ptr", "pooled_ptr", "w_ptr", "out_ptr"),
        fp32_ptrs=("bias_ptr",), i32_ptrs=(),
        aligned_ints=("CB", "C_OUT", "stride_bn", "stride_bh", "stride_bw", "stride_pn", "stride_on", "stride_oh",
                      "stride_ow"),
        flags=(("HAS_BIAS", True), ("APPLY_RELU", True), ("DOT_IN_FP32", False)),
    ),
    # Depthwise (groups = C): no reduction over channels, so no MMA by design. MobileNetV3's 3×3 and 5×5
    # blocks with bias + hardswish + SE scale, and the SE pooling pass (channel sums, no map written).
    **{f"depthwise{k}x{k}": KernelSpec(**_DEPTHWISE_COMMON, flags=(("KH", k), ("KW", k), *_DEPTHWISE_APPLY))
       for k in (3, 5)},
    "depthwise5x5_pool": KernelSpec(**_DEPTHWISE_COMMON, flags=(("KH", 5), ("KW", 5), *_DEPTHWISE_POOL)),
}


@dataclass(frozen=True)
class CompileJob:
    kernel: str  # a key of KERNELS
    config: int  # index into the kernel module's get_autotune_configs(for_interpreter=False)
    arch: int  # 80 or 90
    dtype: str = "fp16"  # one of DTYPES
    custom: dict | None = None  # instead of ``config``: meta-parameters plus num_warps / num_stages


def ptxas_path() -> str | None:
    """The ``ptxas`` bundled with Triton's NVIDIA backend (or ``$TRITON_PTXAS_PATH``), if present."""
    env = os.environ.get("TRITON_PTXAS_PATH")
    if env and os.path.isfile(env):
        return env
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.isfile(path) else None


def _configs(spec: KernelSpec) -> list:
    mod = importlib.import_module(f"fastdeeplab.kernels.{spec.module}")
    kind = {} if spec.configs_kind is None else {"kind": spec.configs_kind}
    return getattr(mod, spec.configs_fn)(for_interpreter=False, **kind)


def ptxas_version() -> str:
    """``ptxas --version``'s release string, e.g. ``"V12.9.86"`` (``"unknown"`` when it cannot be run)."""
    path = ptxas_path()
    if path is None:
        return "unknown"
    res = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"V\d+\.\d+\.\d+", res.stdout)
    return match.group(0) if match else "unknown"


def _config_label(cfg) -> str:
    kw = cfg.kwargs
    if "BLOCK_OH" in kw:
        shape = "raster" if kw.get("RASTER") else f"{kw['BLOCK_OH']}x{kw['BLOCK_OW']} px"
        shape += ", TMA" if kw.get("USE_TMA") else ""
        tile = f"{kw['BLOCK_OH'] * kw['BLOCK_OW']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} ({shape})"
    elif "BLOCK_C" in kw:  # depthwise: pixels x channels, no K
        tile = f"{kw['BLOCK_P']} px x {kw['BLOCK_C']} ch"
    else:
        tile = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}"
    return f"{tile} w{cfg.num_warps} s{cfg.num_stages}"


def _parse_ptxas(text: str) -> dict:
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_stores": int(spill.group(1)) if spill else None,
        "spill_loads": int(spill.group(2)) if spill else None,
        "stack_bytes": int(stack.group(1)) if stack else None,
    }


def _compile_in_process(job: CompileJob) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    spec = KERNELS[job.kernel]
    if job.custom is not None:
        import triton

        meta = dict(job.custom)
        cfg = triton.Config(meta, num_warps=meta.pop("num_warps", 4), num_stages=meta.pop("num_stages", 3))
    else:
        cfg = _configs(spec)[job.config]
    row = {**asdict(job), "config_label": _config_label(cfg), "ok": False, "error": None, "registers": None,
           "spill_stores": None, "spill_loads": None, "stack_bytes": None, "smem_bytes": None,
           "smem_limit": SMEM_LIMIT[job.arch], "tensor_cores": "none", "tma": False, "mma_expected": spec.mma}
    try:
        fn = getattr(importlib.import_module(f"fastdeeplab.kernels.{spec.module}"), spec.fn)
        if not isinstance(fn, JITFunction):
            raise RuntimeError(f"{spec.fn} is {type(fn).__name__}, not a JITFunction: unset TRITON_INTERPRET")
        ty = _TRITON_TYPE[job.dtype]
        constexprs = dict(spec.flags)
        if "INPUT_PRECISION" in fn.arg_names:
            constexprs["INPUT_PRECISION"] = "tf32"
        constexprs.update(cfg.kwargs)
        for name in ("RASTER", "USE_TMA"):  # tiling flags a custom config may leave out: spatial, cp.async
            if name in fn.arg_names:
                constexprs.setdefault(name, False)
        signature, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in constexprs:
                signature[name] = "constexpr"
                continue
            if name in spec.data_ptrs:
                signature[name] = f"*{ty}"
            elif name in spec.fp32_ptrs:
                signature[name] = "*fp32"
            elif name in spec.i32_ptrs:
                signature[name] = "*i32"
            else:
                signature[name] = "i32"
            if signature[name].startswith("*") or name in spec.aligned_ints:
                attrs[(i,)] = [["tt.divisibility", 16]]
        missing = [k for k in constexprs if k not in fn.arg_names]
        if missing:
            raise RuntimeError(f"constexprs {missing} are not arguments of {spec.fn}")
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32),
                                  options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        ptx = compiled.asm["ptx"]
        row["smem_bytes"] = int(compiled.metadata.shared)
        row["tensor_cores"] = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
        row["tma"] = "cp.async.bulk.tensor" in ptx
        ptxas = ptxas_path()
        if ptxas is None:
            raise RuntimeError("ptxas not found (it ships with triton's NVIDIA backend)")
        arch_name = f"sm_{job.arch}a" if job.arch >= 90 else f"sm_{job.arch}"
        with tempfile.TemporaryDirectory() as tmp:
            ptx_file = os.path.join(tmp, "kernel.ptx")
            with open(ptx_file, "w") as f:
                f.write(ptx)
            res = subprocess.run([ptxas, "-v", f"--gpu-name={arch_name}", ptx_file, "-o", os.devnull],
                                 capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"ptxas failed: {res.stderr.strip()[-500:]}")
        row.update(_parse_ptxas(res.stdout + res.stderr))
        problems = []
        if row["registers"] is None or row["spill_stores"] is None:
            problems.append("could not parse ptxas -v output")
        elif row["spill_stores"] or row["spill_loads"]:
            problems.append(f"spills {row['spill_stores']}+{row['spill_loads']} bytes")
        if row["smem_bytes"] > row["smem_limit"]:
            problems.append(f"shared memory {row['smem_bytes']} > {row['smem_limit']}")
        if spec.mma and row["tensor_cores"] != TENSOR_CORE_OP[job.arch]:
            problems.append(f"expected {TENSOR_CORE_OP[job.arch]} in the PTX, found {row['tensor_cores']}")
        if cfg.kwargs.get("USE_TMA") and job.arch >= 90 and not row["tma"]:
            problems.append("a TMA config without cp.async.bulk.tensor in the PTX")
        row["ok"] = not problems
        row["error"] = "; ".join(problems) or None
    except Exception as e:  # noqa: BLE001 - report every failure as a row
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    return row


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def compile_reports(jobs: Iterable[CompileJob], *, workers: int | None = None) -> list[dict]:
    """Compile each job and return one row per job (dicts, see :func:`compile_report`), in order.

    Runs in a child process when ``TRITON_INTERPRET`` is set in this one; uses ``workers`` processes.
    """
    jobs = list(jobs)
    if not jobs:
        return []
    if _interpreted():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        payload = json.dumps([asdict(j) for j in jobs])
        cmd = [sys.executable, "-m", "fastdeeplab.kernels.aot", "--jobs-json", payload, "--json"]
        if workers:
            cmd += ["--workers", str(workers)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if not res.stdout.strip():
            raise RuntimeError(f"AOT child process failed (rc={res.returncode}): {res.stderr[-2000:]}")
        return json.loads(res.stdout)
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        return [_compile_in_process(j) for j in jobs]
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(_compile_in_process, jobs))


def compile_report(kernel: str, config: int, arch: int, dtype: str = "fp16") -> dict:
    """Compile one config of one kernel for ``sm_<arch>`` and return its row.

    Keys: ``kernel, config, arch, dtype, config_label, ok, error, registers, spill_stores, spill_loads,
    stack_bytes, smem_bytes, smem_limit, tensor_cores`` (``"wgmma"``, ``"mma.sync"`` or ``"none"``).
    """
    return compile_reports([CompileJob(kernel, config, arch, dtype)], workers=1)[0]


def all_jobs(kernels: Sequence[str], archs: Sequence[int], dtypes: Sequence[str]) -> list[CompileJob]:
    jobs = []
    for name in kernels:
        n_cfg = len(_configs(KERNELS[name]))
        jobs += [CompileJob(name, c, a, d) for c in range(n_cfg) for d in dtypes for a in archs]
    return jobs


def format_table(rows: Sequence[dict], *, markdown: bool = False) -> str:
    head = ["kernel", "#", "config (MxNxK, warps, stages)", "dtype", "arch", "regs", "spills (st+ld B)",
            "smem B", "tensor cores", "TMA", "status"]
    body = []
    for r in rows:
        spills = "-" if r["spill_stores"] is None else f"{r['spill_stores']}+{r['spill_loads']}"
        dtype = r["dtype"] if r.get("mma_expected", True) else r["dtype"].replace("-tf32", "")  # no dot: no TF32
        body.append([r["kernel"], str(r["config"]), r["config_label"], dtype, f"sm_{r['arch']}",
                     "-" if r["registers"] is None else str(r["registers"]), spills,
                     "-" if r["smem_bytes"] is None else str(r["smem_bytes"]),
                     r["tensor_cores"] if r.get("mma_expected", True) else f"{r['tensor_cores']} (no MMA by design)",
                     "cp.async.bulk.tensor" if r.get("tma") else "-", "ok" if r["ok"] else f"FAIL: {r['error']}"])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), *(fmt.format(*row) for row in body)])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastdeeplab.kernels.aot", description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--kernel", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--markdown", action="store_true", help="print a markdown table with a provenance line")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU count)")
    p.add_argument("--jobs-json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.jobs_json is not None:
        jobs = [CompileJob(**j) for j in json.loads(args.jobs_json)]
    else:
        jobs = all_jobs(args.kernel, args.arch, args.dtype)
    rows = compile_reports(jobs, workers=args.workers)
    if args.json:
        print(json.dumps(rows))
    else:
        import triton

        if args.markdown:
            print(f"`python -m fastdeeplab.kernels.aot --markdown` — triton {triton.__version__}, ptxas "
                  f"{ptxas_version()} (bundled with triton), no GPU needed, {datetime.date.today().isoformat()}\n")
        print(format_table(rows, markdown=args.markdown))
        bad = [r for r in rows if not r["ok"]]
        no_mma = sum(not r.get("mma_expected", True) for r in rows)
        print(f"\n{len(rows) - len(bad)}/{len(rows)} builds compile with 0 spills, fit in shared memory and "
              "use tensor cores" + (f" (except {no_mma} builds of kernels without MMA by design: depthwise)"
                                    if no_mma else "") + ("" if not bad else f"; {len(bad)} FAILED")
              + f"; {sum(bool(r.get('tma')) for r in rows)} load through TMA (cp.async.bulk.tensor)")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
