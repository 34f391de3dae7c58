"""Stage 2, kernels: every distinct convolution of DeepLabv3-ResNet-50 and every depthwise convolution of
DeepLabv3-MobileNetV3-Large at 513×513, Triton against cuDNN.

The shapes are read off the model itself (forward pre-hooks on the meta device, OS16 and OS8), deduplicated
(the stem, layer1 and layer2 are the same at both strides), and run in this order, so that the ones that
matter come first should the stage run out of time: the ASPP branches (the grouped launch of all four against
cuDNN's four convolutions first, then each branch), layer4 and layer3 3×3, the ASPP projection (the fused
:func:`~fastdeeplab.kernels.aspp_project` against the literal concatenation + 1×1 that torchvision runs),
layer3/layer4 1×1, MobileNetV3-Large's depthwise convs (most memory traffic first), the head, then the stem,
layer1 and layer2. The stage runs the first ``kernel_cases`` cases that the plan (``gpucheck.plan``)
estimates fit its limit, and prints that count at its start.

**Depthwise** (``kernels/depthwise.py``, what ``optimize(backend="triton")`` runs through the ops
``fastdeeplab::depthwise_conv_act(_mean)``): the model's own problems at OS16 and OS8 (read off the model
by :func:`gpucheck.models.depthwise_layers`), each with its block's epilogue: bias + ReLU or hardswish, and
where the block has a squeeze-excitation the whole SE as the Triton backend runs it (the pooling launch, the
two small FC layers, the launch with the scale) against cuDNN's depthwise conv + activation, the mean, the
same FC layers and the in-place scale (``FusedConvBNAct``'s cuDNN form). The conv is memory-bound: the rows
also give GB/s of the fused op's minimal traffic (input read once, output written once) for both sides;
tensor-core peak shares do not apply and are left empty.

**1×1 + hardswish** (the conv kernel's hardswish epilogue, where this checkout's kernel has it): the largest
of MobileNetV3-Large's 1×1 hardswish convs (expand 112→672 and 160→960, which ``features[16]`` shares), two
per output stride, against cuDNN's conv + ``F.hardswish``; they run right after the depthwise cases.

Each shape at batch 1 and 8, in fp16, then all again in bf16: the two outputs are compared (max error relative to the scale:
< 2e-2 fp16, < 5e-2 bf16, the bench suite's bounds), then each is timed by :func:`fastdeeplab.timing.time_cuda`
(``triton.testing.do_bench``, L2 flushed before every run, median). cuDNN runs with ``cudnn.benchmark`` on,
channels-last, as ``conv2d + bias`` then ReLU (the plain-PyTorch twin,
:func:`~fastdeeplab.kernels.conv_bn_relu_reference`). TFLOP/s count the dense convolution
(``2·N·OH·OW·Cout·Cin·K²``, taps over zero padding included, the same for both), next to the GPU's nominal
dense fp16/bf16 peak. Triton's first call (autotuning) is timed apart as ``first_call_s``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from fastdeeplab.metrics import max_rel_error

from .common import (
    DTYPE_NAMES,
    Plan,
    RowWriter,
    error_text,
    gpu_configs,
    measure_ms,
    peak_tflops,
    raise_if_fatal,
    synchronize,
)
from .models import MOBILENET, conv_layers, depthwise_layers, mobilenet_pointwise_layers

__all__ = ["cases", "depthwise_shapes", "launches_of", "pointwise_shapes", "run", "shapes"]

TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 5e-2}
GROUPED = "ASPP branches (grouped)"
DEPTHWISE_PRIORITY = 2.5  # after ResNet's ASPP, layer3/4 3x3 and projection; before its 1x1, head and stem


def _category(name: str, k: int) -> tuple[int, str]:
    """(priority, label) of a conv from its module name."""
    if ".project." in name:
        return 2, "ASPP projection"
    if ".convs." in name:
        return 0, f"ASPP {k}x{k}"
    if name.startswith("classifier"):
        return 4, f"head {k}x{k}"
    for stage in ("layer4", "layer3"):
        if f".{stage}." in name:
            return (1 if k == 3 else 3), f"{stage} {k}x{k}"
    stage = next((s for s in ("layer1", "layer2") if f".{s}." in name), "stem")
    return 5, f"{stage} {k}x{k}"


def shapes(plan: Plan) -> list[dict[str, Any]]:
    """The distinct conv problems of the model at both output strides, in the order they are run."""
    found: dict[tuple, dict[str, Any]] = {}
    for output_stride in plan.output_strides:
        for layer in conv_layers(plan.model, output_stride, plan.kernel_resolution):
            if ".convs.4." in layer["name"]:  # image pooling: a 1x1 conv of a 1x1 map (a GEMV)
                continue
            key = tuple(layer[k] for k in ("cin", "cout", "h", "w", "k", "stride", "padding", "dilation"))
            priority, label = _category(layer["name"], layer["k"])
            entry = found.setdefault(key, dict(layer, label=label, priority=priority, names=[], strides=set()))
            entry["names"].append(layer["name"])
            entry["strides"].add(output_stride)
    _add_grouped_branches(found)

    def cost(e: dict) -> int:
        return e["cin"] * e["k"] ** 2 * e["cout"] * e["h"] * e["w"]

    ordered = sorted(found.values(), key=lambda e: (e["priority"], e["label"] != GROUPED, -cost(e)))
    for e in ordered:
        e["strides"] = sorted(e["strides"], reverse=True)
    if plan.kernel_max_shapes:  # the dry run: the cheapest 3x3, 1x1, projection and grouped-branch problems
        kinds: dict = {}
        for e in sorted(ordered, key=cost):
            kinds.setdefault(e["label"] if e["label"] in ("ASPP projection", GROUPED) else e["k"], e)
        ordered = list(kinds.values())[: plan.kernel_max_shapes]
    mobilenet = depthwise_shapes(plan) + pointwise_shapes(plan)
    at = next((i for i, e in enumerate(ordered) if e["priority"] > DEPTHWISE_PRIORITY), len(ordered))
    return ordered[:at] + mobilenet + ordered[at:]


POINTWISE_PER_STRIDE = 2  # the largest 1x1 hardswish problems of each output stride


def _conv_has_hardswish() -> bool:
    import inspect

    import fastdeeplab.kernels.conv as conv_kernels

    return "activation" in inspect.signature(conv_kernels.conv_bn_relu_packed).parameters


def pointwise_shapes(plan: Plan) -> list[dict[str, Any]]:
    """The largest MobileNetV3-Large 1×1 + hardswish problems (``POINTWISE_PER_STRIDE`` per output stride, by
    FLOPs), where the conv kernel has the hardswish epilogue; the dry run takes the smallest one."""
    if not _conv_has_hardswish():
        return []
    found: dict[tuple, dict[str, Any]] = {}
    for output_stride in plan.output_strides:
        layers = [c for c in mobilenet_pointwise_layers(output_stride, plan.kernel_resolution)
                  if c["activation"] == "hardswish"]
        for layer in layers:
            key = (layer["cin"], layer["cout"], layer["h"], layer["w"])
            entry = found.setdefault(key, dict(layer, label="MobileNetV3 1x1 hardswish", kind="pointwise",
                                               priority=DEPTHWISE_PRIORITY, names=[], strides=set()))
            entry["names"].append(layer["name"])
            entry["strides"].add(output_stride)
    ordered = sorted(found.values(), key=lambda e: -e["cin"] * e["cout"] * e["h"] * e["w"])
    if plan.kernel_max_shapes:
        return [dict(ordered[-1], strides=sorted(ordered[-1]["strides"], reverse=True))] if ordered else []
    picked, per_stride = [], dict.fromkeys(plan.output_strides, 0)
    for e in ordered:
        first = max(e["strides"])  # counted for the largest stride it appears at
        if per_stride[first] < POINTWISE_PER_STRIDE:
            per_stride[first] += 1
            picked.append(dict(e, strides=sorted(e["strides"], reverse=True)))
    return picked


def _dw_bytes(e: dict) -> int:
    """Elements the fused depthwise op must move at batch 1: its input once, its output once (the SE's pooling
    launch reads the input a second time; not counted, so the GB/s of both sides compare the same work)."""
    return e["c"] * (e["h"] * e["w"] + e["oh"] * e["ow"])


def depthwise_shapes(plan: Plan) -> list[dict[str, Any]]:
    """The distinct depthwise problems of MobileNetV3-Large at both output strides, most memory traffic first
    (the layers that dominate the model's depthwise time). The dry run: the cheapest one without and the
    cheapest one with a squeeze-excitation."""
    found: dict[tuple, dict[str, Any]] = {}
    for output_stride in plan.output_strides:
        for layer in depthwise_layers(MOBILENET, output_stride, plan.kernel_resolution):
            k, s, p, d = layer["k"], layer["stride"], layer["padding"], layer["dilation"]
            oh = (layer["h"] + 2 * p - d * (k - 1) - 1) // s + 1
            ow = (layer["w"] + 2 * p - d * (k - 1) - 1) // s + 1
            key = (layer["cin"], layer["h"], layer["w"], k, s, p, d, layer["activation"], layer["se"])
            label = f"MobileNetV3 dw{k}x{k} {layer['activation']}" + ("+SE" if layer["se"] else "")
            entry = found.setdefault(key, dict(layer, c=layer["cin"], oh=oh, ow=ow, label=label, kind="depthwise",
                                               priority=DEPTHWISE_PRIORITY, names=[], strides=set()))
            entry["names"].append(layer["name"])
            entry["strides"].add(output_stride)
    ordered = sorted(found.values(), key=lambda e: -_dw_bytes(e) * (2 if e["se"] else 1))
    for e in ordered:
        e["strides"] = sorted(e["strides"], reverse=True)
    if plan.kernel_max_shapes:
        picked: dict = {}
        for e in sorted(ordered, key=_dw_bytes):
            picked.setdefault(e["se"], e)
        ordered = [picked[se] for se in (False, True) if se in picked]
    return ordered


def _add_grouped_branches(found: dict) -> None:
    """Where the kernels have the grouped ASPP launch (its four branches in one kernel), one more problem per
    output stride: that launch against cuDNN's four convolutions."""
    import fastdeeplab.kernels.aspp as aspp_kernels

    if not hasattr(aspp_kernels, "aspp_branches_packed"):
        return
    atrous = [e for e in found.values() if e["label"] == "ASPP 3x3"]
    for one in [e for e in found.values() if e["label"] == "ASPP 1x1"]:
        rates = sorted(e["dilation"] for e in atrous if (e["h"], e["w"], e["cin"]) == (one["h"], one["w"], one["cin"]))
        if len(rates) != 3:
            continue
        key = ("grouped", one["cin"], one["cout"], one["h"], one["w"], *rates)
        found[key] = dict(one, label=GROUPED, priority=0, k=3, padding=0, dilation=0,
                          rates=tuple(rates), names=["classifier.0.convs.0-3"], strides=set(one["strides"]))


def launches_of(entry: dict, batch: int, dtype: torch.dtype, config=None) -> list:
    """The Triton launches of one case (:class:`gpucheck.launches.Launch`; two for a depthwise conv with a
    squeeze-excitation): what the plan counts and stage 0 compiles. ``config``: the forced config (the dry
    run), else autotuned."""
    from .launches import Launch, config_id

    name = DTYPE_NAMES[dtype]
    forced = config_id(config) if config is not None else None
    if entry.get("kind") == "depthwise":
        base = Launch("depthwise", name, batch, entry["c"], entry["c"], entry["h"], entry["w"], k=entry["k"],
                      stride=entry["stride"], padding=entry["padding"], dilation=entry["dilation"],
                      activation=entry["activation"], config=forced)
        return base.se_launches() if entry["se"] else [base]
    if entry["label"] == GROUPED:
        return [Launch("aspp_branches", name, batch, entry["cin"], entry["cout"], entry["h"], entry["w"], k=3,
                       rates=tuple(entry["rates"]), config=forced)]
    if entry["label"] == "ASPP projection":
        return [Launch("aspp_project", name, batch, entry["cin"] // 5, entry["cout"], entry["h"], entry["w"],
                       config=forced)]
    if entry.get("kind") == "pointwise":
        return [Launch("conv", name, batch, entry["cin"], entry["cout"], entry["h"], entry["w"], k=1, relu=False,
                       activation="hardswish", config=forced)]
    return [Launch("conv", name, batch, entry["cin"], entry["cout"], entry["h"], entry["w"], k=entry["k"],
                   stride=entry["stride"], padding=entry["padding"], dilation=entry["dilation"], config=forced)]


def cases(plan: Plan) -> list[tuple[torch.dtype, dict, int]]:
    """``(dtype, shape entry, batch)`` in run order: every problem in fp16 (batch 1 and 8) before any in
    bf16, so a limit cuts bf16 first. In bf16 (the second dtype) MobileNetV3's problems at batch 1 come right
    after ResNet's ASPP (bf16 is new for the depthwise kernel, while ResNet's other bf16 layers repeat their
    fp16 kernels) and its batch-8 problems last: the limit cuts ResNet's bf16 layers and MobileNetV3's bf16
    batch 8 first."""
    todo = shapes(plan)
    out = []
    for i, dtype in enumerate(plan.kernel_dtypes):
        ranked = []
        for entry in todo:
            for batch in plan.kernel_batches:
                rank = entry["priority"]
                if i > 0 and entry.get("kind") in ("depthwise", "pointwise"):
                    rank = 0.5 if batch == 1 else 99
                ranked.append((rank, len(ranked), entry, batch))
        out += [(dtype, entry, batch) for _, _, entry, batch in sorted(ranked, key=lambda r: r[:2])]
    return out


def _make(entry: dict, batch: int, dtype: torch.dtype, plan: Plan):
    """(triton call, cuDNN call, dense FLOPs) for one problem on seeded channels-last inputs. The Triton
    launchers autotune on the GPU; in the dry run they take the first GPU config (under the interpreter)."""
    import fastdeeplab.kernels.aspp as aspp_kernels
    import fastdeeplab.kernels.conv as conv_kernels

    from fastdeeplab import kernels

    device = plan.device
    g = torch.Generator(device=device).manual_seed(0)  # on the device: batch-8 inputs are 10^8 numbers

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    cl = torch.channels_last
    if entry.get("kind") == "depthwise":
        return _make_depthwise(entry, batch, dtype, plan, rand)
    cin, cout, h, w, k = entry["cin"], entry["cout"], entry["h"], entry["w"], entry["k"]
    if entry["label"] == GROUPED:
        from fastdeeplab.kernels.reference import aspp_branches_reference

        x = rand(batch, cin, h, w).contiguous(memory_format=cl)
        weights = [rand(cout, cin, kk, kk, scale=(2.0 / (kk * kk * cin)) ** 0.5) for kk in (1, 3, 3, 3)]
        biases = [rand(cout, scale=0.1) for _ in range(4)]
        packed = aspp_kernels.pack_aspp_branch_weights(weights)
        bias = torch.cat(biases).float()
        rates = entry["rates"]
        config = {"config": gpu_configs(conv_kernels)[0]} if plan.dry_run else {}
        flop = 2.0 * batch * h * w * cout * cin * 28
        return (lambda: aspp_kernels.aspp_branches_packed(x, packed, bias, rates, **config),
                lambda: torch.cat(aspp_branches_reference(x, weights, biases, rates)), flop)
    if entry["label"] == "ASPP projection":
        cb = cin // 5
        branches = [rand(batch, cb, h, w).relu().contiguous(memory_format=cl) for _ in range(4)]
        pooled = rand(batch, cb).relu()
        weight = rand(cout, cin, 1, 1, scale=(2.0 / cin) ** 0.5)
        bias = rand(cout, scale=0.1).float()
        packed = kernels.pack_aspp_weight(weight)
        flop = 2.0 * batch * h * w * cout * cin
        config = {"config": gpu_configs(aspp_kernels)[0]} if plan.dry_run else {}
        return (lambda: kernels.aspp_project_packed(branches, pooled, packed, bias, relu=True, **config),
                lambda: kernels.aspp_project_reference(branches, pooled, weight, bias.to(dtype), relu=True), flop)
    x = rand(batch, cin, h, w).contiguous(memory_format=cl)
    weight = rand(cout, cin, k, k, scale=(2.0 / (k * k * cin)) ** 0.5)
    bias = rand(cout, scale=0.1).float()
    packed = kernels.pack_weight(weight)
    geometry = dict(stride=entry["stride"], padding=entry["padding"], dilation=entry["dilation"])
    oh = (h + 2 * entry["padding"] - entry["dilation"] * (k - 1) - 1) // entry["stride"] + 1
    ow = (w + 2 * entry["padding"] - entry["dilation"] * (k - 1) - 1) // entry["stride"] + 1
    flop = 2.0 * batch * oh * ow * cout * cin * k * k
    bias_t = bias.to(dtype)
    config = {"config": gpu_configs(conv_kernels)[0]} if plan.dry_run else {}
    if entry.get("kind") == "pointwise":  # the hardswish epilogue
        return (lambda: kernels.conv_bn_relu_packed(x, packed, bias, kernel_size=k, activation="hardswish",
                                                    **geometry, **config),
                lambda: kernels.conv_bn_relu_reference(x, weight, bias_t, activation="hardswish", **geometry), flop)
    return (lambda: kernels.conv_bn_relu_packed(x, packed, bias, kernel_size=k, relu=True, **geometry, **config),
            lambda: kernels.conv_bn_relu_reference(x, weight, bias_t, relu=True, **geometry), flop)


def _make_depthwise(entry: dict, batch: int, dtype: torch.dtype, plan: Plan, rand):
    """(triton call, cuDNN call, dense FLOPs) of one MobileNetV3 depthwise problem with its block's epilogue
    (see the module docstring); the squeeze-excitation's FC layers are the same on both sides."""
    import fastdeeplab.kernels.depthwise as dw
    import torch.nn.functional as F
    from torchvision.models._utils import _make_divisible

    c, h, w, k = entry["c"], entry["h"], entry["w"], entry["k"]
    geometry = dict(stride=entry["stride"], padding=entry["padding"], dilation=entry["dilation"])
    activation = entry["activation"]
    x = rand(batch, c, h, w).contiguous(memory_format=torch.channels_last)
    weight = rand(c, 1, k, k, scale=1.0 / k)
    bias = rand(c, scale=0.1).float()
    bias_t = bias.to(dtype)
    packed = dw.pack_depthwise_weight(weight)
    config = {"config": gpu_configs(dw)[0]} if plan.dry_run else {}
    act = {"none": lambda y: y, "relu": F.relu, "hardswish": F.hardswish}[activation]
    flop = 2.0 * batch * entry["oh"] * entry["ow"] * c * k * k

    def cudnn_conv() -> torch.Tensor:
        return act(F.conv2d(x, weight, bias_t, groups=c, **geometry))

    def triton_conv(**extra) -> torch.Tensor:
        return dw.depthwise_conv_act_packed(x, packed, bias, kernel_size=k, activation=activation, **geometry,
                                            **extra, **config)

    if not entry["se"]:
        return triton_conv, cudnn_conv, flop
    squeeze = _make_divisible(c // 4, 8)  # torchvision's SqueezeExcitation width in MobileNetV3
    fc1, b1 = rand(squeeze, c, scale=c ** -0.5), rand(squeeze, scale=0.1)
    fc2, b2 = rand(c, squeeze, scale=squeeze ** -0.5), rand(c, scale=0.1)

    def excite(mean: torch.Tensor) -> torch.Tensor:  # FusedSqueezeExcitation.excite
        return F.hardsigmoid(F.linear(F.relu(F.linear(mean.to(dtype), fc1, b1)), fc2, b2))

    pixels = entry["oh"] * entry["ow"]

    def triton_se() -> torch.Tensor:
        sums = torch.empty(batch, c, device=x.device, dtype=torch.float32)
        triton_conv(channel_sums=sums, write_output=False)
        return triton_conv(se_scale=excite(sums / pixels))

    def cudnn_se() -> torch.Tensor:
        y = cudnn_conv()
        return y.mul_(excite(y.mean((2, 3)))[:, :, None, None])

    return triton_se, cudnn_se, flop


def _shape_text(entry: dict, batch: int) -> str:
    if entry.get("kind") == "depthwise":
        s = f"{batch}x{entry['c']}x{entry['h']}x{entry['w']} dw{entry['k']}"
        return s + (f" s{entry['stride']}" if entry["stride"] != 1 else "") + (
            f" d{entry['dilation']}" if entry["dilation"] != 1 else "")
    s = f"{batch}x{entry['cin']}x{entry['h']}x{entry['w']}->{entry['cout']} k{entry['k']}"
    if "rates" in entry:
        return f"{batch}x{entry['cin']}x{entry['h']}x{entry['w']}->4x{entry['cout']} 1x1+3x3 r{'/'.join(map(str, entry['rates']))}"
    if entry["stride"] != 1:
        s += f" s{entry['stride']}"
    if entry["dilation"] != 1:
        s += f" d{entry['dilation']}"
    return s


def run(plan: Plan, rows: RowWriter, reach: int | None = None) -> None:
    """``reach``: how many cases (in :func:`cases` order) to run; the rest are recorded as skipped."""
    torch.backends.cudnn.benchmark = True
    gpu = torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else None
    peak = peak_tflops(gpu)
    todo = cases(plan)
    reach = len(todo) if reach is None else min(reach, len(todo))
    print(f"kernels: {len(shapes(plan))} distinct conv problems x batches {plan.kernel_batches} x "
          f"{[DTYPE_NAMES[d] for d in plan.kernel_dtypes]} = {len(todo)} cases; will reach {reach} of them "
          f"(the plan's count for this stage's limit); nominal peak {peak} TFLOP/s ({gpu})", flush=True)
    rows.row(kind="info", stage="kernels", cases=len(todo), will_reach=reach,
             order="fp16: ASPP branches (grouped, then each), layer4/layer3 3x3, projection, MobileNetV3 depthwise "
                   "and 1x1 hardswish, ResNet 1x1, head, stem/layer1/2, batch 1 and 8; then bf16: ASPP, MobileNetV3 "
                   "at batch 1, the ResNet rest, MobileNetV3 at batch 8")
    for index, (dtype, entry, batch) in enumerate(todo):
        label = dict(kind="conv", model=MOBILENET if entry.get("kind") in ("depthwise", "pointwise") else plan.model,
                     layer=entry["label"], shape=_shape_text(entry, batch), batch=batch,
                     dtype=DTYPE_NAMES[dtype], output_strides=entry["strides"], layers=len(entry["names"]),
                     names=entry["names"][:6])
        if index >= reach:
            rows.row(**label, skipped="beyond the plan's case count for this stage's limit")
            continue
        if plan.left() < 6:
            rows.row(**label, skipped="stage time limit")
            continue
        if dtype == torch.bfloat16 and plan.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            rows.row(**label, skipped="no bfloat16 on this GPU")
            continue
        try:
            triton_call, cudnn_call, flop = _make(entry, batch, dtype, plan)
            start = time.perf_counter()
            got = triton_call()
            synchronize(plan.device)
            first_call_s = time.perf_counter() - start
            err = max_rel_error(got, cudnn_call())
            t_ms = measure_ms(triton_call, plan)  # after the first call: never times autotuning
            c_ms = measure_ms(cudnn_call, plan)
        except Exception as exc:  # noqa: BLE001 (a failing shape is a result; the next one runs)
            raise_if_fatal(exc)
            rows.row(**label, ok=False, message=error_text(exc))
            continue
        t_tflops = flop / (t_ms.median * 1e-3) / 1e12
        c_tflops = flop / (c_ms.median * 1e-3) / 1e12
        memory = {}
        tensor_peak = peak
        if entry.get("kind") == "depthwise":  # memory-bound, no tensor cores: GB/s, no share of the MMA peak
            gbytes = batch * _dw_bytes(entry) * torch.finfo(dtype).bits / 8 / 1e9
            memory = dict(gbytes=gbytes, triton_gbps=gbytes / (t_ms.median * 1e-3),
                          cudnn_gbps=gbytes / (c_ms.median * 1e-3))
            tensor_peak = None
        rows.row(**label, gflop=flop / 1e9, triton_ms=t_ms.median, triton_iqr_ms=t_ms.iqr,
                 cudnn_ms=c_ms.median, cudnn_iqr_ms=c_ms.iqr, triton_tflops=t_tflops, cudnn_tflops=c_tflops,
                 triton_peak=t_tflops / tensor_peak if tensor_peak else None,
                 cudnn_peak=c_tflops / tensor_peak if tensor_peak else None, **memory,
                 speedup=c_ms.median / t_ms.median, faster="triton" if t_ms.median < c_ms.median else "cudnn",
                 max_rel_error=err, tolerance=TOLERANCE[dtype], ok=err <= TOLERANCE[dtype],
                 first_call_s=round(first_call_s, 3), peak_tflops_nominal=peak)
