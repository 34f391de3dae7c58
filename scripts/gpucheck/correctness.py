"""Stage 1, correctness: the kernels compiled for this GPU against their float64 twins, then the whole
optimized model against eager PyTorch at OS16 and OS8.

* **Kernels.** A fixed subset of the interpreter suite's shapes (``tests/test_kernel_conv.py``,
  ``tests/test_kernel_aspp.py``: rates 1–36, maps smaller than the rate, odd sizes, channel counts off the
  block sizes, a 1×1 map), plus on the GPU a few more and DeepLab-sized problems that fill whole tiles.
  Each in fp32 with TF32 off and with TF32 on (the default user path, which the interpreter cannot show: it
  ignores ``input_precision``; checked against the TF32 tolerance), fp16 and bf16, at the suite's tolerances
  (``tests/_assert.py``), output poisoned with NaN first (an unwritten element fails). Each case runs one of
  the GPU autotune configs, taken in turn (the dry run runs those GPU tilings under the interpreter). The
  residual epilogue and the grouped launch of ASPP's four branches are checked too.
* **Depthwise** (``kernels/depthwise.py``): MobileNetV3's depthwise conv + bias + ReLU/hardswish, with and
  without the squeeze-excitation's scale, on the tests' shapes (stride 2, a map smaller than the rate) and on
  the model's own (960 channels at 33×33, rate 2) in fp32, fp16 and bf16 (no TF32: the kernel has no dot); a
  case with an SE also runs the SE pooling launch (channel sums, no map) and checks the means.
* **Every config the autotuner may pick.** Then a sweep forces each config of each kernel — the 3×3 conv's
  spatial, raster and TMA tilings, the 1×1 conv's raster ones, the grouped ASPP launch's (TMA included), the
  projection's and the depthwise kernel's — in fp16 and in bf16, on TMA-eligible shapes, so a config that
  only the autotuner would reach on some layer is never first run by a user. Rows say ``tma`` and ``sweep``.
* **Whole model.** ``optimize(model, backend="triton", dtype=float32)`` (the kernels forced everywhere when
  ``optimize`` has per-layer dispatch) against the eager fastdeeplab model, TF32 off on both sides, at
  OS16 and OS8, on odd-sized photographs: max error relative to the logit scale < 1e-4 (the test suite's
  bound) and the class maps.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any

import torch

from fastdeeplab.metrics import max_rel_error, pixel_agreement

from .common import Plan, RowWriter, error_text, gpu_configs, optimize_options, raise_if_fatal, synchronize
from .models import input_batch, load_weights, model_pair

__all__ = ["KernelCase", "kernel_cases", "model_check_launches", "run"]

# (n, cin, h, w, cout, k, stride, dilation, relu): tests/test_kernel_conv.py's ids, a fixed subset.
CONV_CASES = [
    (1, 24, 13, 11, 20, 3, 1, 24, False),
    (1, 40, 9, 7, 35, 3, 1, 36, True),     # map smaller than the rate: only the centre tap is live
    (2, 19, 13, 17, 21, 3, 2, 1, True),    # stride 2
    (2, 33, 11, 13, 17, 1, 1, 1, True),    # 1x1
    (1, 8, 1, 1, 8, 3, 1, 6, True),        # 1x1 map
]
GPU_CONV_CASES = [  # GPU only: the interpreter takes seconds for each of these
    (2, 24, 9, 11, 40, 3, 1, 1, True),
    (2, 16, 19, 20, 36, 3, 1, 12, True),
    (2, 256, 33, 33, 256, 3, 1, 2, True),   # DeepLab-sized: whole tiles, long K loops
    (1, 2048, 33, 33, 256, 3, 1, 18, True),
    (1, 1024, 65, 65, 256, 1, 1, 1, False),
]
# (n, cb, h, w, cout, relu): tests/test_kernel_aspp.py's ids
ASPP_CASES = [(2, 24, 7, 9, 40, True), (1, 33, 11, 13, 17, True), (2, 8, 1, 1, 8, True)]
GPU_ASPP_CASES = [(2, 256, 33, 33, 256, True)]
# (n, cin, h, w, cb, rates): the grouped launch of ASPP's four branches, where the kernels have it
BRANCH_CASES = [(1, 20, 9, 11, 24, (6, 12, 18)), (1, 16, 5, 7, 16, (12, 24, 36))]
GPU_BRANCH_CASES = [(2, 512, 33, 33, 256, (6, 12, 18))]
# (n, c, h, w, k, stride, dilation, activation, se): the depthwise kernel (tests/test_kernel_depthwise.py's
# kinds), "same" padding dilation * (k // 2) as MobileNetV3's blocks have
DW_CASES = [(1, 24, 13, 11, 3, 2, 1, "relu", False),        # stride 2, odd sizes
            (2, 40, 9, 7, 5, 1, 4, "hardswish", True),       # map smaller than the rate, SE
            (1, 20, 6, 5, 3, 1, 2, "none", False)]
GPU_DW_CASES = [(2, 960, 33, 33, 5, 1, 2, "hardswish", True),   # MobileNetV3's C4 blocks at OS16
                (1, 72, 129, 129, 5, 2, 1, "relu", True),       # features[4] at 513x513
                (2, 16, 257, 257, 3, 1, 1, "relu", False)]      # features[1]: 16 channels, a large map
DW_DTYPE_IDS = ("fp32-ieee", "fp16", "bf16")
DTYPE_IDS = ("fp32-ieee", "fp32-tf32", "fp16", "bf16")
TOLERANCE_DTYPES = {"fp32-ieee": torch.float32, "fp32-tf32": torch.float32, "fp16": torch.float16,
                    "bf16": torch.bfloat16}
# The every-config sweep's shapes: stride 1, channels multiples of 8 (TMA-eligible in fp16/bf16), several
# tiles and channel blocks, odd sizes. conv: (n, cin, h, w, cout, k, stride, dilation, relu); aspp_project:
# (n, cb, h, w, cout, relu); aspp_branches: (n, cin, h, w, cb, rates).
SWEEP = {"conv3x3": (2, 64, 19, 21, 72, 3, 1, 2, True), "conv1x1": (2, 96, 17, 23, 80, 1, 1, 1, True),
         "aspp_project": (2, 40, 13, 17, 56, True), "aspp_branches": (1, 64, 17, 19, 48, (2, 4, 6)),
         "depthwise": (2, 264, 19, 21, 5, 1, 2, "hardswish", True)}  # several channel tiles of every tiling
DRY_SWEEP = {"conv3x3": (1, 16, 9, 11, 24, 3, 1, 2, True), "conv1x1": (1, 32, 7, 9, 16, 1, 1, 1, True),
             "aspp_project": (1, 16, 5, 7, 24, True), "aspp_branches": (1, 16, 7, 9, 16, (1, 2, 3)),
             "depthwise": (1, 24, 9, 11, 3, 1, 2, "hardswish", True)}
MODEL_TOLERANCE = 1e-4  # tests/test_optimize.py


def _tolerances() -> dict[str, tuple[torch.dtype, bool | None, float, float]]:
    """``{id: (dtype, allow_tf32, atol, rtol)}`` from the kernel tests' one table (TF32: its own, looser pair)."""
    from tests._assert import KERNEL_DTYPES

    return {p.id: tuple(p.values) for p in KERNEL_DTYPES if p.id in DTYPE_IDS}


def _config_label(config) -> str | None:
    if config is None:
        return None
    kw = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{kw},w{config.num_warps},s{config.num_stages}"


def _eligible(configs: list, dtype: torch.dtype, stride: int, channels: tuple[int, ...], device: int) -> list:
    """The configs the autotuner itself would consider here: TMA tilings need sm_90, stride 1 and 16-byte
    aligned rows (``kernels.conv.tma_eligible``)."""
    import fastdeeplab.kernels.conv as conv_kernels

    keep = getattr(conv_kernels, "tma_eligible", None)
    if keep is None:
        return configs
    return keep(configs, {"x_ptr": torch.empty(1, dtype=dtype), "DEVICE_KEY": device}, stride=(stride, stride),
                channels=channels)


@dataclass(frozen=True)
class KernelCase:
    """One forced-config launch checked against its float64 twin."""

    kernel: str  # "conv_bn_relu" | "aspp_project" | "aspp_branches" | "depthwise"
    params: tuple  # a row of CONV_CASES / ASPP_CASES / BRANCH_CASES / DW_CASES (or a sweep shape)
    dtype_id: str  # a DTYPE_IDS entry
    config: Any  # the triton.Config it runs
    residual: bool = False
    sweep: bool = False  # part of the every-config sweep

    @property
    def case_id(self) -> str:
        p = self.params
        if self.kernel == "conv_bn_relu":
            n, cin, h, w, cout, k, stride, dil, relu = p
            return (f"N{n}-C{cin}-H{h}-W{w}-O{cout}-k{k}-s{stride}-d{dil}-p{dil * (k // 2)}-"
                    f"{'relu' if relu else 'linear'}" + ("-residual" if self.residual else ""))
        if self.kernel == "aspp_project":
            n, cb, h, w, cout, relu = p
            return f"N{n}-Cb{cb}-H{h}-W{w}-O{cout}-{'relu' if relu else 'linear'}"
        if self.kernel == "depthwise":
            n, c, h, w, k, stride, dil, activation, se = p
            return f"N{n}-C{c}-H{h}-W{w}-k{k}-s{stride}-d{dil}-{activation}" + ("-se" if se else "")
        n, cin, h, w, cb, rates = p
        return f"N{n}-C{cin}-H{h}-W{w}-Cb{cb}-r{'/'.join(map(str, rates))}"

    def launches(self) -> list:
        """The :class:`gpucheck.launches.Launch` es the case makes (what the plan counts and stage 0 compiles):
        one, or for a depthwise case with a squeeze-excitation the pooling launch and the scaled one."""
        from .launches import Launch, config_id

        if self.kernel == "depthwise":
            n, c, h, w, k, stride, dil, activation, se = self.params
            dtype = {"fp32-ieee": "fp32", "fp16": "fp16", "bf16": "bf16"}[self.dtype_id]
            base = Launch("depthwise", dtype, n, c, c, h, w, k=k, stride=stride, padding=dil * (k // 2),
                          dilation=dil, activation=activation, config=config_id(self.config))
            return base.se_launches() if se else [base]
        return [self.launch()]

    def launch(self):
        """The :class:`gpucheck.launches.Launch` of a conv or ASPP case."""
        from .launches import Launch, config_id

        dtype, tf32 = {"fp32-ieee": ("fp32", False), "fp32-tf32": ("fp32", True), "fp16": ("fp16", False),
                       "bf16": ("bf16", False)}[self.dtype_id]
        p = self.params
        if self.kernel == "conv_bn_relu":
            n, cin, h, w, cout, k, stride, dil, relu = p
            return Launch("conv", dtype, n, cin, cout, h, w, k=k, stride=stride, padding=dil * (k // 2), dilation=dil,
                          residual=self.residual, relu=relu, tf32=tf32, config=config_id(self.config))
        if self.kernel == "aspp_project":
            n, cb, h, w, cout, relu = p
            return Launch("aspp_project", dtype, n, cb, cout, h, w, relu=relu, tf32=tf32, config=config_id(self.config))
        n, cin, h, w, cb, rates = p
        return Launch("aspp_branches", dtype, n, cin, cb, h, w, k=3, rates=tuple(rates), tf32=tf32,
                      config=config_id(self.config))


def kernel_cases(plan: Plan, device: int | None = None) -> list[KernelCase]:
    """Every kernel case of the stage, in run order, with the config each one runs. ``device``: the CUDA index
    whose capability decides TMA eligibility (default: the plan's device; -1 on a CPU).

    The fixed cases take the eligible configs in turn, in fp32 (TF32 off and on), fp16 and bf16. Then the
    sweep: every config the autotuner may pick for each kernel (the 3×3 conv's spatial, raster and TMA
    tilings, the 1×1 conv's raster ones, the grouped ASPP launch's, TMA included, and the projection's), each
    in fp16 and bf16, on a shape where TMA is eligible (stride 1, channels a multiple of 8). The dry run
    sweeps one config of each kernel in bf16 (the interpreter runs the GPU tilings, seconds each)."""
    import fastdeeplab.kernels.aspp as aspp_kernels
    import fastdeeplab.kernels.conv as conv_kernels
    import fastdeeplab.kernels.depthwise as dw_kernels

    if device is None:
        device = (plan.device.index or 0) if plan.device.type == "cuda" else -1
    conv_configs = gpu_configs(conv_kernels)
    dw_configs = gpu_configs(dw_kernels)
    project_configs = gpu_configs(aspp_kernels)
    has_residual = "residual" in inspect.signature(conv_kernels.conv_bn_relu_packed).parameters
    has_branches = hasattr(aspp_kernels, "aspp_branches_packed")
    out: list[KernelCase] = []
    turn = 0
    for i, params in enumerate(CONV_CASES + ([] if plan.dry_run else GPU_CONV_CASES)):
        n, cin, h, w, cout, k, stride, dil, relu = params
        for dtype_id in DTYPE_IDS:
            eligible = _eligible(conv_configs, TOLERANCE_DTYPES[dtype_id], stride, (cin, cout), device)
            out.append(KernelCase("conv_bn_relu", params, dtype_id, eligible[turn % len(eligible)],
                                  residual=has_residual and i % 2 == 1))
            turn += 1
    turn = 0
    for params in ASPP_CASES + ([] if plan.dry_run else GPU_ASPP_CASES):
        for dtype_id in DTYPE_IDS:
            out.append(KernelCase("aspp_project", params, dtype_id, project_configs[turn % len(project_configs)]))
            turn += 1
    turn = 0
    for params in (BRANCH_CASES + ([] if plan.dry_run else GPU_BRANCH_CASES)) if has_branches else []:
        n, cin, h, w, cb, rates = params
        for dtype_id in DTYPE_IDS:
            eligible = _eligible(conv_configs, TOLERANCE_DTYPES[dtype_id], 1, (cin, cb), device)
            out.append(KernelCase("aspp_branches", params, dtype_id, eligible[turn % len(eligible)]))
            turn += 1
    turn = 0
    for params in DW_CASES + ([] if plan.dry_run else GPU_DW_CASES):
        for dtype_id in DW_DTYPE_IDS:
            out.append(KernelCase("depthwise", params, dtype_id, dw_configs[turn % len(dw_configs)]))
            turn += 1
    # the sweep: every config the autotuner may pick, fp16 and bf16
    sweep_dtypes = ("bf16",) if plan.dry_run else ("fp16", "bf16")
    shapes = DRY_SWEEP if plan.dry_run else SWEEP
    raster = [c for c in conv_configs if c.kwargs.get("RASTER")]
    kinds = [("conv_bn_relu", shapes["conv3x3"], conv_configs), ("conv_bn_relu", shapes["conv1x1"], raster),
             ("aspp_project", shapes["aspp_project"], project_configs)]
    if has_branches:
        kinds.append(("aspp_branches", shapes["aspp_branches"], conv_configs))
    kinds.append(("depthwise", shapes["depthwise"], dw_configs))
    for kernel, params, configs in kinds:
        for dtype_id in sweep_dtypes:
            if kernel == "conv_bn_relu":
                stride, channels = params[6], (params[1], params[4])
            else:
                stride, channels = 1, (params[1], params[4])
            eligible = (_eligible(configs, TOLERANCE_DTYPES[dtype_id], stride, channels, device)
                        if kernel not in ("aspp_project", "depthwise") else configs)
            for config in (eligible[:1] if plan.dry_run else eligible):
                out.append(KernelCase(kernel, params, dtype_id, config, sweep=True))
    return out


def _run_case(plan: Plan, case: KernelCase, tolerances: dict, rows: RowWriter) -> None:
    import fastdeeplab.kernels.aspp as aspp_kernels
    import fastdeeplab.kernels.reference as reference
    from fastdeeplab.kernels import (
        aspp_project_packed,
        aspp_project_reference,
        conv_bn_relu_packed,
        conv_bn_relu_reference,
        pack_aspp_weight,
        pack_weight,
    )

    dtype, allow_tf32, atol, rtol = tolerances[case.dtype_id]
    dev = plan.device
    cl = torch.channels_last
    config = case.config
    start = time.perf_counter()
    if case.kernel == "depthwise":
        got, expected, extra = _depthwise_case(case, dtype, dev)
        _check(rows, case, config, got, expected, atol, rtol, time.perf_counter() - start, **extra)
        return
    if case.kernel == "conv_bn_relu":
        n, cin, h, w, cout, k, stride, dil, relu = case.params
        pad = dil * (k // 2)
        x = torch.randn(n, cin, h, w, device=dev).to(dtype).contiguous(memory_format=cl)
        weight = (torch.randn(cout, cin, k, k, device=dev) / (cin * k * k) ** 0.5).to(dtype)
        bias = 0.5 * torch.randn(cout, device=dev)
        oh, ow = (h + 2 * pad - dil * (k - 1) - 1) // stride + 1, (w + 2 * pad - dil * (k - 1) - 1) // stride + 1
        residual = (torch.randn(n, cout, oh, ow, device=dev).to(dtype).contiguous(memory_format=cl)
                    if case.residual else None)
        out = torch.full((n, cout, oh, ow), float("nan"), device=dev, dtype=dtype).contiguous(memory_format=cl)
        extra = {"residual": residual} if case.residual else {}
        got = conv_bn_relu_packed(x, pack_weight(weight), bias, kernel_size=k, stride=stride, padding=pad,
                                  dilation=dil, relu=relu, allow_tf32=allow_tf32, out=out, config=config, **extra)
        synchronize(dev)
        expected = conv_bn_relu_reference(x.double(), weight.double(), bias.double(), stride=stride, padding=pad,
                                          dilation=dil, relu=False)
        if residual is not None:
            expected = expected + residual.double()
        expected = expected.relu() if relu else expected
    elif case.kernel == "aspp_project":
        n, cb, h, w, cout, relu = case.params
        branches = [torch.randn(n, cb, h, w, device=dev).to(dtype).contiguous(memory_format=cl) for _ in range(4)]
        pooled = torch.randn(n, cb, device=dev).to(dtype)
        weight = (torch.randn(cout, 5 * cb, 1, 1, device=dev) / (5 * cb) ** 0.5).to(dtype)
        bias = 0.5 * torch.randn(cout, device=dev)
        out = torch.full((n, cout, h, w), float("nan"), device=dev, dtype=dtype).contiguous(memory_format=cl)
        got = aspp_project_packed(branches, pooled, pack_aspp_weight(weight), bias, relu=relu,
                                  allow_tf32=allow_tf32, out=out, config=config)
        synchronize(dev)
        expected = aspp_project_reference([b.double() for b in branches], pooled.double(), weight.double(),
                                          bias.double(), relu=relu)
    else:
        n, cin, h, w, cb, rates = case.params
        x = torch.randn(n, cin, h, w, device=dev).to(dtype).contiguous(memory_format=cl)
        weights = [(torch.randn(cb, cin, k, k, device=dev) / (cin * k * k) ** 0.5).to(dtype) for k in (1, 3, 3, 3)]
        biases = [0.5 * torch.randn(cb, device=dev) for _ in range(4)]
        out = torch.full((4 * n, cb, h, w), float("nan"), device=dev, dtype=dtype).contiguous(memory_format=cl)
        got = aspp_kernels.aspp_branches_packed(x, aspp_kernels.pack_aspp_branch_weights(weights), torch.cat(biases),
                                                rates, allow_tf32=allow_tf32, out=out, config=config)
        synchronize(dev)
        expected = torch.cat(reference.aspp_branches_reference(
            x.double(), [wt.double() for wt in weights], [b.double() for b in biases], rates))
    _check(rows, case, config, got, expected, atol, rtol, time.perf_counter() - start)


def _depthwise_case(case: KernelCase, dtype: torch.dtype, dev: torch.device):
    """One forced-config depthwise case: ``(output, float64 expected, extra _check arguments)``. With an SE,
    first the pooling launch (its means against the float64 ones: they are the SE's input), then the conv
    with a random ``[N, C]`` scale in ``[0, 1]`` (a hardsigmoid's range) in the epilogue."""
    from fastdeeplab.kernels.depthwise import depthwise_conv_act_packed, pack_depthwise_weight
    from fastdeeplab.kernels.reference import depthwise_conv_act_reference

    n, c, h, w, k, stride, dil, activation, se = case.params
    pad = dil * (k // 2)
    x = torch.randn(n, c, h, w, device=dev).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c, 1, k, k, device=dev) / k).to(dtype)
    bias = 0.5 * torch.randn(c, device=dev)
    geometry = dict(kernel_size=k, stride=stride, padding=pad, dilation=dil, activation=activation)
    packed = pack_depthwise_weight(weight)
    reference = dict(stride=stride, padding=pad, dilation=dil, activation=activation)
    extra: dict = {}
    scale = None
    if se:
        sums = torch.full((n, c), float("nan"), device=dev)  # overwritten, not added to
        depthwise_conv_act_packed(x, packed, bias, channel_sums=sums, write_output=False, config=case.config,
                                  **geometry)
        synchronize(dev)
        act = depthwise_conv_act_reference(x.double(), weight.double(), bias.double(), **reference)
        extra["means"] = (sums.double() / (act.shape[2] * act.shape[3]), act.mean((2, 3)))
        scale = torch.rand(n, c, device=dev).to(dtype)
    oh, ow = (h + 2 * pad - dil * (k - 1) - 1) // stride + 1, (w + 2 * pad - dil * (k - 1) - 1) // stride + 1
    out = torch.full((n, c, oh, ow), float("nan"), device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
    got = depthwise_conv_act_packed(x, packed, bias, se_scale=scale, out=out, config=case.config, **geometry)
    synchronize(dev)
    expected = depthwise_conv_act_reference(x.double(), weight.double(), bias.double(),
                                            se_scale=None if scale is None else scale.double(), **reference)
    return got, expected, extra


MEANS_TOLERANCE = (1e-4, 1e-4)  # float32 sums of float32 epilogue values (tests/test_kernel_depthwise.py)


def _check(rows: RowWriter, case: KernelCase, config, got: torch.Tensor, expected: torch.Tensor, atol: float,
           rtol: float, seconds: float, means: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    from tests._assert import assert_close_verbose

    message = None
    try:
        if means is not None:
            assert_close_verbose(means[0], means[1], atol=MEANS_TOLERANCE[0], rtol=MEANS_TOLERANCE[1],
                                 name="SE pooling launch: channel means")
        assert_close_verbose(got, expected, atol=atol, rtol=rtol, dims="NCHW")
    except AssertionError as exc:
        message = str(exc)[:800]
    rows.row(kind="kernel", kernel=case.kernel, case=case.case_id, dtype=case.dtype_id, config=_config_label(config),
             tma=bool(config.kwargs.get("USE_TMA", False)), sweep=case.sweep,
             max_rel_error=max_rel_error(got, expected), atol=atol, rtol=rtol, ok=message is None,
             means_max_abs_error=None if means is None else float((means[0] - means[1]).abs().max()),
             message=message, seconds=round(seconds, 3))


def _kernel_cases(plan: Plan, rows: RowWriter, tolerances: dict) -> None:
    todo = kernel_cases(plan)
    print(f"correctness: {len(todo)} kernel cases ({sum(c.sweep for c in todo)} in the every-config sweep, "
          f"{sum(bool(c.config.kwargs.get('USE_TMA')) for c in todo)} on TMA configs)", flush=True)
    for case in todo:
        if plan.left() < 5:
            rows.row(kind="kernel", kernel=case.kernel, case=case.case_id, dtype=case.dtype_id,
                     config=_config_label(case.config), sweep=case.sweep, skipped="stage time limit")
            continue
        try:
            _run_case(plan, case, tolerances, rows)
        except Exception as exc:  # noqa: BLE001 (a failing launch is a result)
            raise_if_fatal(exc)
            rows.row(kind="kernel", kernel=case.kernel, case=case.case_id, dtype=case.dtype_id,
                     config=_config_label(case.config), sweep=case.sweep, ok=False, message=error_text(exc))


def model_check_launches(plan: Plan) -> list:
    """The Triton launches of the whole-model checks (what the plan counts): float32 with TF32 off, every
    layer on its kernel, autotuned, at both strides."""
    from .models import model_launches

    n, _, h, w = plan.check_input
    return [launch for output_stride in plan.output_strides
            for launch in model_launches(plan.model, output_stride, (h, w), n, "fp32", tf32=False)]


@torch.no_grad()
def _whole_model(plan: Plan, rows: RowWriter) -> None:
    import fastdeeplab

    kwargs, notes = optimize_options(dispatch="triton")
    weights = load_weights(plan.model)
    n, _, h, w = plan.check_input
    x, source = input_batch(max(h, w), n)
    x = x[:, :, :h, :w].contiguous().to(plan.device)
    for output_stride in plan.output_strides:
        label = dict(kind="model_check", output_stride=output_stride, dtype="fp32 (TF32 off)",
                     input=f"{n}x3x{h}x{w} {source}", optimize=f"backend='triton' {kwargs or ''}".strip())
        if plan.left() < 10:
            rows.row(**label, skipped="stage time limit")
            continue
        start = time.perf_counter()
        try:
            _, ours = model_pair(weights, output_stride)
            ours = ours.to(plan.device)
            expected = ours(x)["out"]
            fast = fastdeeplab.optimize(ours, backend="triton", dtype=torch.float32, **kwargs)
            got = fast(x)["out"]
            synchronize(plan.device)
            err = max_rel_error(got, expected)
            rows.row(**label, max_rel_error=err, pixel_agreement=pixel_agreement(got.argmax(1), expected.argmax(1)),
                     tolerance=MODEL_TOLERANCE, ok=err < MODEL_TOLERANCE, seconds=round(time.perf_counter() - start, 2),
                     weights=weights.description, note="; ".join(notes) or None)
        except Exception as exc:  # noqa: BLE001
            raise_if_fatal(exc)
            rows.row(**label, ok=False, message=error_text(exc))


def run(plan: Plan, rows: RowWriter) -> None:
    torch.manual_seed(0)
    torch.backends.cudnn.allow_tf32 = False  # fp32 means IEEE fp32 here, for the kernels and the references
    torch.backends.cuda.matmul.allow_tf32 = False
    tolerances = _tolerances()
    _kernel_cases(plan, rows, tolerances)
    _whole_model(plan, rows)
    print(f"correctness: done, {plan.left():.0f} s left", flush=True)
