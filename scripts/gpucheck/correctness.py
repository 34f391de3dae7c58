"""Stage 1, correctness: the kernels compiled for this GPU against their float64 twins, then the whole
optimized model against eager PyTorch at OS16 and OS8.

* **Kernels.** A fixed subset of the interpreter suite's shapes (``tests/test_kernel_conv.py``,
  ``tests/test_kernel_aspp.py``: rates 1–36, maps smaller than the rate, odd sizes, channel counts off the
  block sizes, a 1×1 map), plus on the GPU a few more and DeepLab-sized problems that fill whole tiles.
  Each in fp32 with TF32 off, fp16 and bf16, at the suite's tolerances (``tests/_assert.py``), output
  poisoned with NaN first (an unwritten element fails). Each case runs one of the GPU autotune configs,
  taken in turn, so every config is checked on some shapes at the cost of one compile per case rather than
  one per config (the dry run runs those GPU tilings under the interpreter). The residual epilogue and the
  grouped launch of ASPP's four branches are checked too where the kernels have them.
* **Whole model.** ``optimize(model, backend="triton", dtype=float32)`` (the kernels forced everywhere when
  ``optimize`` has per-layer dispatch) against the eager fastdeeplab model, TF32 off on both sides, at
  OS16 and OS8, on odd-sized photographs: max error relative to the logit scale < 1e-4 (the test suite's
  bound) and the class maps.
"""

from __future__ import annotations

import inspect
import time

import torch

from fastdeeplab.metrics import max_rel_error, pixel_agreement

from .common import Plan, RowWriter, error_text, gpu_configs, optimize_options, synchronize
from .models import input_batch, load_weights, model_pair

__all__ = ["run"]

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
DTYPE_IDS = ("fp32-ieee", "fp16", "bf16")
MODEL_TOLERANCE = 1e-4  # tests/test_optimize.py


def _tolerances() -> dict[str, tuple[torch.dtype, bool | None, float, float]]:
    """``{id: (dtype, allow_tf32, atol, rtol)}`` from the kernel tests' one table."""
    from tests._assert import KERNEL_DTYPES

    return {p.id: tuple(p.values) for p in KERNEL_DTYPES if p.id in DTYPE_IDS}


def _config_label(config) -> str | None:
    if config is None:
        return None
    kw = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{kw},w{config.num_warps},s{config.num_stages}"


def _check(rows: RowWriter, kernel: str, case: str, dtype_id: str, config, got: torch.Tensor,
           expected: torch.Tensor, atol: float, rtol: float, seconds: float) -> None:
    from tests._assert import assert_close_verbose

    message = None
    try:
        assert_close_verbose(got, expected, atol=atol, rtol=rtol, dims="NCHW")
    except AssertionError as exc:
        message = str(exc)[:800]
    rows.row(kind="kernel", kernel=kernel, case=case, dtype=dtype_id, config=_config_label(config),
             max_rel_error=max_rel_error(got, expected), atol=atol, rtol=rtol, ok=message is None,
             message=message, seconds=round(seconds, 3))


def _eligible(conv_kernels, configs: list, x: torch.Tensor, stride: int, channels: tuple[int, ...]) -> list:
    """The configs the autotuner itself would consider here: TMA tilings need sm_90, stride 1 and 16-byte
    aligned rows (``kernels.conv.tma_eligible``, where the kernels have TMA configs)."""
    keep = getattr(conv_kernels, "tma_eligible", None)
    if keep is None:
        return configs
    device = x.device.index if x.device.type == "cuda" and x.device.index is not None else -1
    return keep(configs, {"x_ptr": x, "DEVICE_KEY": device}, stride=(stride, stride), channels=channels)


def _conv_cases(plan: Plan, rows: RowWriter, tolerances: dict) -> None:
    import fastdeeplab.kernels.conv as conv_kernels
    from fastdeeplab.kernels import conv_bn_relu_packed, conv_bn_relu_reference, pack_weight

    configs = gpu_configs(conv_kernels)
    has_residual = "residual" in inspect.signature(conv_bn_relu_packed).parameters
    cases = CONV_CASES + ([] if plan.dry_run else GPU_CONV_CASES)
    dev = plan.device
    turn = 0
    for i, (n, cin, h, w, cout, k, stride, dil, relu) in enumerate(cases):
        pad = dil * (k // 2)
        # the residual epilogue on every other case, where the launcher has one
        residual_on = has_residual and i % 2 == 1
        cid = (f"N{n}-C{cin}-H{h}-W{w}-O{cout}-k{k}-s{stride}-d{dil}-p{pad}-{'relu' if relu else 'linear'}"
               + ("-residual" if residual_on else ""))
        for dtype_id in DTYPE_IDS:
            if plan.left() < 5:
                rows.row(kind="kernel", kernel="conv_bn_relu", case=cid, dtype=dtype_id, skipped="stage time limit")
                continue
            dtype, allow_tf32, atol, rtol = tolerances[dtype_id]
            config = None
            start = time.perf_counter()
            try:
                x = torch.randn(n, cin, h, w, device=dev).to(dtype).contiguous(memory_format=torch.channels_last)
                eligible = _eligible(conv_kernels, configs, x, stride, (cin, cout))
                config = eligible[turn % len(eligible)]
                turn += 1
                weight = (torch.randn(cout, cin, k, k, device=dev) / (cin * k * k) ** 0.5).to(dtype)
                bias = 0.5 * torch.randn(cout, device=dev)
                oh, ow = (h + 2 * pad - dil * (k - 1) - 1) // stride + 1, (w + 2 * pad - dil * (k - 1) - 1) // stride + 1
                residual = (torch.randn(n, cout, oh, ow, device=dev).to(dtype)
                            .contiguous(memory_format=torch.channels_last) if residual_on else None)
                out = torch.full((n, cout, oh, ow), float("nan"), device=dev, dtype=dtype)
                out = out.contiguous(memory_format=torch.channels_last)
                extra = {"residual": residual} if residual_on else {}
                got = conv_bn_relu_packed(x, pack_weight(weight), bias, kernel_size=k, stride=stride, padding=pad,
                                          dilation=dil, relu=relu, allow_tf32=allow_tf32, out=out, config=config,
                                          **extra)
                synchronize(dev)
                expected = conv_bn_relu_reference(x.double(), weight.double(), bias.double(), stride=stride,
                                                  padding=pad, dilation=dil, relu=False)
                if residual is not None:
                    expected = expected + residual.double()
                expected = expected.relu() if relu else expected
                _check(rows, "conv_bn_relu", cid, dtype_id, config, got, expected, atol, rtol,
                       time.perf_counter() - start)
            except Exception as exc:  # noqa: BLE001 (a failing launch is a result)
                rows.row(kind="kernel", kernel="conv_bn_relu", case=cid, dtype=dtype_id,
                         config=_config_label(config), ok=False, message=error_text(exc))


def _aspp_cases(plan: Plan, rows: RowWriter, tolerances: dict) -> None:
    import fastdeeplab.kernels.aspp as aspp_kernels
    from fastdeeplab.kernels import aspp_project_packed, aspp_project_reference, pack_aspp_weight

    configs = gpu_configs(aspp_kernels)
    dev = plan.device
    turn = 0
    for n, cb, h, w, cout, relu in ASPP_CASES + ([] if plan.dry_run else GPU_ASPP_CASES):
        cid = f"N{n}-Cb{cb}-H{h}-W{w}-O{cout}-{'relu' if relu else 'linear'}"
        for dtype_id in DTYPE_IDS:
            if plan.left() < 5:
                rows.row(kind="kernel", kernel="aspp_project", case=cid, dtype=dtype_id, skipped="stage time limit")
                continue
            dtype, allow_tf32, atol, rtol = tolerances[dtype_id]
            config = configs[turn % len(configs)]
            turn += 1
            start = time.perf_counter()
            try:
                branches = [torch.randn(n, cb, h, w, device=dev).to(dtype).contiguous(memory_format=torch.channels_last)
                            for _ in range(4)]
                pooled = torch.randn(n, cb, device=dev).to(dtype)
                weight = (torch.randn(cout, 5 * cb, 1, 1, device=dev) / (5 * cb) ** 0.5).to(dtype)
                bias = 0.5 * torch.randn(cout, device=dev)
                out = torch.full((n, cout, h, w), float("nan"), device=dev, dtype=dtype)
                out = out.contiguous(memory_format=torch.channels_last)
                got = aspp_project_packed(branches, pooled, pack_aspp_weight(weight), bias, relu=relu,
                                          allow_tf32=allow_tf32, out=out, config=config)
                synchronize(dev)
                expected = aspp_project_reference([b.double() for b in branches], pooled.double(), weight.double(),
                                                  bias.double(), relu=relu)
                _check(rows, "aspp_project", cid, dtype_id, config, got, expected, atol, rtol,
                       time.perf_counter() - start)
            except Exception as exc:  # noqa: BLE001
                rows.row(kind="kernel", kernel="aspp_project", case=cid, dtype=dtype_id,
                         config=_config_label(config), ok=False, message=error_text(exc))


def _branch_cases(plan: Plan, rows: RowWriter, tolerances: dict) -> None:
    import fastdeeplab.kernels.aspp as aspp_kernels
    import fastdeeplab.kernels.reference as reference

    if not hasattr(aspp_kernels, "aspp_branches_packed") or not hasattr(reference, "aspp_branches_reference"):
        rows.row(kind="kernel", kernel="aspp_branches", skipped="no grouped ASPP launch in this checkout")
        return
    import fastdeeplab.kernels.conv as conv_kernels

    configs = gpu_configs(conv_kernels)  # the grouped launch takes conv configs
    dev = plan.device
    turn = 0
    for n, cin, h, w, cb, rates in BRANCH_CASES + ([] if plan.dry_run else GPU_BRANCH_CASES):
        cid = f"N{n}-C{cin}-H{h}-W{w}-Cb{cb}-r{'/'.join(map(str, rates))}"
        for dtype_id in DTYPE_IDS:
            if plan.left() < 5:
                rows.row(kind="kernel", kernel="aspp_branches", case=cid, dtype=dtype_id, skipped="stage time limit")
                continue
            dtype, allow_tf32, atol, rtol = tolerances[dtype_id]
            config = None
            start = time.perf_counter()
            try:
                x = torch.randn(n, cin, h, w, device=dev).to(dtype).contiguous(memory_format=torch.channels_last)
                eligible = _eligible(conv_kernels, configs, x, 1, (cin, cb))
                config = eligible[turn % len(eligible)]
                turn += 1
                weights = [(torch.randn(cb, cin, k, k, device=dev) / (cin * k * k) ** 0.5).to(dtype)
                           for k in (1, 3, 3, 3)]
                biases = [0.5 * torch.randn(cb, device=dev) for _ in range(4)]
                out = torch.full((4 * n, cb, h, w), float("nan"), device=dev, dtype=dtype)
                out = out.contiguous(memory_format=torch.channels_last)
                got = aspp_kernels.aspp_branches_packed(x, aspp_kernels.pack_aspp_branch_weights(weights),
                                                        torch.cat(biases), rates, allow_tf32=allow_tf32, out=out,
                                                        config=config)
                synchronize(dev)
                expected = torch.cat(reference.aspp_branches_reference(
                    x.double(), [wt.double() for wt in weights], [b.double() for b in biases], rates))
                _check(rows, "aspp_branches", cid, dtype_id, config, got, expected, atol, rtol,
                       time.perf_counter() - start)
            except Exception as exc:  # noqa: BLE001
                rows.row(kind="kernel", kernel="aspp_branches", case=cid, dtype=dtype_id,
                         config=_config_label(config), ok=False, message=error_text(exc))


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
            rows.row(**label, ok=False, message=error_text(exc))


def run(plan: Plan, rows: RowWriter) -> None:
    torch.manual_seed(0)
    torch.backends.cudnn.allow_tf32 = False  # fp32 means IEEE fp32 here, for the kernels and the references
    torch.backends.cuda.matmul.allow_tf32 = False
    tolerances = _tolerances()
    _conv_cases(plan, rows, tolerances)
    _aspp_cases(plan, rows, tolerances)
    _branch_cases(plan, rows, tolerances)
    _whole_model(plan, rows)
    print(f"correctness: done, {plan.left():.0f} s left", flush=True)
