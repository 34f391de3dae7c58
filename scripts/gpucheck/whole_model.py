"""Stage 3, whole model: DeepLabv3-MobileNetV3-Large at 513×513, batch 1, OS16 and OS8, then DeepLabv3-ResNet-50
at batch 1 and 8, OS16 and OS8, every way this project runs them on a GPU, each model from one set of weights.

MobileNetV3 runs first: its settings are cheap (tens of seconds) and would otherwise wait behind the
uncertain ``torch.compile`` runs of the ResNet; it has no ``torch.compile`` rows (each would be another
Inductor compile of ~a minute; they are recorded as skipped). Its Triton layers are the depthwise kernel (with
the squeeze-excitation's pooling launch) and the head; its 1×1 convs run cuDNN.

Rows, per output stride and batch:

* ``torchvision fp32`` — torchvision eager in float32 with TF32 off: the **reference** every row's accuracy is
  measured against (max error relative to the logit scale, :func:`~fastdeeplab.metrics.max_rel_error`, and
  the share of pixels whose class agrees, :func:`~fastdeeplab.metrics.pixel_agreement`); timed too;
* ``torchvision fp16`` — torchvision eager, float16, channels-last, ``cudnn.benchmark`` on: the baseline
  (the dry run runs bfloat16 wherever this says float16: the CPU has no float16 convolutions to fuse);
* ``optimize triton`` — ``fastdeeplab.optimize(model, backend="triton", dtype=float16)`` (per-layer dispatch
  ``"auto"`` where ``optimize`` has it; its report becomes the ``dispatch`` rows);
* ``optimize triton + graph`` — the same model replayed from a CUDA graph: wrapped in
  ``fastdeeplab.cuda_graphs.CUDAGraphModel``, as ``optimize(..., cuda_graph=True)`` returns it (else captured
  here with ``torch.cuda.graph`` after two warm-up calls on a side stream);
* ``optimize torch`` — ``optimize(model, backend="torch", dtype=float16)`` (cuDNN, folded BN, fused ASPP);
* ``torch.compile`` — of the torchvision fp16 model, default mode (max-autotune alone can outlast the
  stage), at batch 8 and OS16 only (``Plan.compile_batches``, ``Plan.compile_strides``: each other setting
  would be a recompile): started only while more than ``Plan.compile_s`` seconds are left, else skipped;
* ``torch.compile(optimize triton)`` — ``torch.compile`` of the optimized Triton model itself (its kernels
  are triton ops that Inductor keeps in the graph; the dispatch decisions of its eager first call are
  reused), same settings and rule.

Each fast row passes when its max relative error against the fp32 reference is at most ``ERROR_FACTOR`` (4)
times torchvision eager's in the same dtype, plus 1e-3: the kernels may round differently, not worse.

Every implementation's first call (autotuning, dispatch timing, compilation, capture) is untimed, and
written at once as a ``model_first`` row (``first_call_s``, error against the reference), so a stage killed
during the timing keeps what it learnt. Then all rows of a setting are timed **interleaved**
(:func:`fastdeeplab.timing.interleaved`: one call each per round, the order rotated every round, CUDA
events), and the speed-up against ``torchvision fp16`` is the median of the per-round ratios.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch import Tensor

from fastdeeplab.metrics import logits_of, max_rel_error, pixel_agreement
from fastdeeplab.timing import interleaved

from .common import (
    DTYPE_NAMES,
    Plan,
    RowWriter,
    error_text,
    find_method,
    optimize_options,
    raise_if_fatal,
    synchronize,
)
from .models import input_batch, load_weights, model_pair

__all__ = ["COMPILED_OPTIMIZED", "model_stage_launches", "run"]

REFERENCE = "torchvision fp32"
ERROR_FACTOR = 4  # a row passes when its error against fp32 is at most 4x eager's in the same dtype (+1e-3)
COMPILED_OPTIMIZED = "torch.compile(optimize triton)"


def model_settings(plan: Plan) -> list[tuple[str, int, tuple[int, ...]]]:
    """``(model, output stride, batches)`` in run order: MobileNetV3-Large first, then the ResNet."""
    from .models import MOBILENET

    return ([(MOBILENET, s, plan.mobilenet_batches) for s in plan.mobilenet_strides]
            + [(plan.model, s, plan.batches) for s in plan.output_strides])


def model_stage_launches(plan: Plan) -> dict[tuple[str, int, int], list]:
    """``{(model, output stride, batch): the Triton launches of one forward of the optimized model}`` in run
    order (what the plan counts; the dispatcher may send some layers to cuDNN after timing both)."""
    from .models import model_launches

    return {(spec, s, b): model_launches(spec, s, plan.resolution, b, DTYPE_NAMES[plan.dtype])
            for spec, s, batches in model_settings(plan) for b in batches}


def baseline(plan: Plan) -> str:
    """The row the speed-ups are taken against: torchvision eager in the plan's dtype (fp16 on the GPU)."""
    return f"torchvision {DTYPE_NAMES[plan.dtype]}"


def _graph_wrapper() -> tuple[type | None, list[str]]:
    """The project's CUDA-graph wrapper (what ``optimize(..., cuda_graph=True)`` returns around the optimized
    model), applied here to the already optimized model so that its dispatch decisions are not timed twice."""
    try:
        from fastdeeplab.cuda_graphs import CUDAGraphModel
    except ImportError:
        return None, ["no fastdeeplab.cuda_graphs here: captured with torch.cuda.graph by the check"]
    return CUDAGraphModel, ["CUDAGraphModel(optimize(...)), as optimize(cuda_graph=True) builds it"]


def _captured(model: torch.nn.Module, x: Tensor) -> Callable[[], Tensor]:
    """``model(x)["out"]`` replayed from a CUDA graph (static input and output buffers)."""
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):  # autotuning, dispatch timing and weight packing happen here, not in the capture
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = logits_of(model(static_x))

    def replay() -> Tensor:
        graph.replay()
        return static_out

    return replay


class Setting:
    """The implementations of one output stride; :meth:`calls` binds them to one input batch."""

    def __init__(self, plan: Plan, weights, output_stride: int, rows: RowWriter) -> None:
        import fastdeeplab

        self.plan, self.output_stride, self.rows = plan, output_stride, rows
        self.model = weights.spec
        self.compiles = weights.spec == plan.model  # torch.compile rows: the ResNet only
        dev, dtype = plan.device, plan.dtype
        tv, ours = model_pair(weights, output_stride)
        self.tv32 = tv.to(dev)
        self.tv_fast = copy.deepcopy(tv).to(dev, dtype).to(memory_format=torch.channels_last)
        ours = ours.to(dev)
        self.notes: dict[str, list[str]] = {}
        self.errors: dict[str, str] = {}
        kwargs, self.notes["optimize triton"] = optimize_options(dispatch="auto")
        self.triton = self._build("optimize triton",
                                  lambda: fastdeeplab.optimize(ours, backend="triton", dtype=dtype, **kwargs))
        self.graph_wrapper, self.notes["optimize triton + graph"] = _graph_wrapper()
        self.triton_graph = None
        if self.graph_wrapper is not None and self.triton is not None and dev.type == "cuda":
            self.triton_graph = self._build("optimize triton + graph", lambda: self.graph_wrapper(self.triton))
        self.torch = self._build("optimize torch", lambda: fastdeeplab.optimize(ours, backend="torch", dtype=dtype))
        self.compiled = None
        self.compiled_optimized = None
        self.compile_label = (f"torch.compile({plan.compile_backend}"
                              + (f", mode={plan.compile_mode!r}" if plan.compile_mode else "") + ")")

    def _build(self, name: str, make: Callable[[], torch.nn.Module]):
        try:
            return make()
        except Exception as exc:  # noqa: BLE001 (an implementation that cannot be built is a row)
            self.errors[name] = error_text(exc)
            return None

    def calls(self, x32: Tensor, x: Tensor) -> dict[str, Callable[[], Tensor] | str]:
        """``{row: zero-argument call returning logits, or the reason it does not run}``."""
        plan = self.plan
        out: dict[str, Callable[[], Tensor] | str] = {
            REFERENCE: lambda: self.tv32(x32)["out"],
            baseline(plan): lambda: self.tv_fast(x)["out"],
        }
        for name, model in (("optimize triton", self.triton), ("optimize torch", self.torch)):
            out[name] = self.errors.get(name) or (lambda m=model: m(x)["out"])
        graph = "optimize triton + graph"
        if plan.device.type != "cuda":
            out[graph] = "skipped: CUDA graphs need a GPU"
        elif self.triton is None:
            out[graph] = f"skipped: {self.errors['optimize triton']}"
        elif self.graph_wrapper is not None:
            out[graph] = self.errors.get(graph) or (lambda: self.triton_graph(x)["out"])
        else:
            out[graph] = lambda: _captured(self.triton, x)  # resolved by the first call (the capture)
        needed = plan.compile_s
        for label in (self.compile_label, COMPILED_OPTIMIZED):
            if not self.compiles:
                out[label] = (f"skipped: not planned for this model (another Inductor compile, ~{needed:.0f} s; "
                              "the ResNet rows have it)")
            elif x.shape[0] not in plan.compile_batches or self.output_stride not in plan.compile_strides:
                out[label] = (f"skipped: compiled at batch {'/'.join(map(str, plan.compile_batches))}, OS"
                              f"{'/'.join(map(str, plan.compile_strides))} only (another setting is a recompile, "
                              f"~{needed:.0f} s)")
            elif label == COMPILED_OPTIMIZED and self.triton is None:
                out[label] = f"skipped: {self.errors['optimize triton']}"
            elif plan.left() < needed:
                out[label] = f"skipped: {plan.left():.0f} s left in the stage, a compile is given {needed:.0f} s"
            elif label == COMPILED_OPTIMIZED:
                if self.compiled_optimized is None:
                    self.compiled_optimized = torch.compile(self.triton, backend=plan.compile_backend,
                                                            mode=plan.compile_mode)
                out[label] = lambda: self.compiled_optimized(x)["out"]
            else:
                if self.compiled is None:
                    self.compiled = torch.compile(self.tv_fast, backend=plan.compile_backend, mode=plan.compile_mode)
                out[label] = lambda: self.compiled(x)["out"]
        return out


def _one_setting(setting: Setting, batch: int, images: Tensor, rows: RowWriter) -> None:
    plan = setting.plan
    dev = plan.device
    x32 = images[:batch].to(dev)
    x = x32.to(plan.dtype).contiguous(memory_format=torch.channels_last)
    common = dict(kind="model", model=setting.model, output_stride=setting.output_stride, batch=batch,
                  input=f"{batch}x3x{plan.resolution}x{plan.resolution}")
    with torch.no_grad():
        reference = setting.tv32(x32)["out"].float()
        synchronize(dev)
        ref_labels = reference.argmax(1)
        ready: dict[str, Callable[[], Tensor]] = {}
        info_of: dict[str, dict] = {}
        first_s: dict[str, float] = {}
        last: dict[str, Tensor] = {}
        # On the GPU each call's first run (autotuning, dispatch timing, compilation, capture) is untimed; the
        # dry run has one round and no separate first run (each interpreted forward costs seconds).
        warm_first = dev.type == "cuda"
        for name, call in setting.calls(x32, x).items():
            dtype = "fp32 (TF32 off)" if name == REFERENCE else DTYPE_NAMES[plan.dtype]
            info = dict(common, impl=name, dtype=dtype, note="; ".join(setting.notes.get(name, [])) or None)
            if isinstance(call, str):
                if call.startswith("skipped: "):
                    rows.row(**info, skipped=call[len("skipped: "):])
                else:
                    rows.row(**info, ok=False, message=call)
                continue
            if plan.left() < 10:
                rows.row(**info, skipped="stage time limit")
                continue
            try:
                if warm_first or name in (setting.compile_label, COMPILED_OPTIMIZED):
                    start = time.perf_counter()
                    result = call()
                    if callable(result):  # the CUDA graph: the first call captured it; replay it once
                        call = result
                        result = call()
                    synchronize(dev)
                    first_s[name] = time.perf_counter() - start
                    last[name] = result
                    # written now: a stage killed during the timing below keeps its first calls
                    rows.row(**dict(info, kind="model_first"), first_call_s=round(first_s[name], 3),
                             max_rel_error=max_rel_error(result.float(), reference))
                ready[name], info_of[name] = call, info
            except Exception as exc:  # noqa: BLE001
                raise_if_fatal(exc)
                rows.row(**info, ok=False, message=error_text(exc))
        if not ready:
            return

        def keeping(name: str, call: Callable[[], Tensor]) -> Callable[[], None]:
            def run() -> None:
                last[name] = call()
            return run

        try:
            timings = interleaved({n: keeping(n, c) for n, c in ready.items()}, rounds=plan.rounds, warmup=0,
                                  device=dev)
        except Exception as exc:  # noqa: BLE001 (e.g. out of memory at batch 8: the setting's rows say so)
            raise_if_fatal(exc)
            message = error_text(exc)
            for name in ready:
                rows.row(**info_of[name], ok=False, message=f"while timing: {message}")
            return
    base = baseline(plan)
    errors = {name: max_rel_error(last[name].float(), reference) for name in ready}
    for name in ready:
        s = timings.spread(name)
        logits = last[name].float()
        check = {}
        if base in errors and name not in (base, REFERENCE):  # as close to fp32 as eager in the same dtype
            tolerance = ERROR_FACTOR * errors[base] + 1e-3
            check = dict(tolerance=tolerance, ok=errors[name] <= tolerance)
        rows.row(**info_of[name], first_call_s=round(first_s.get(name, timings.samples[name][0]), 3),
                 max_rel_error=errors[name], **check,
                 pixel_agreement=pixel_agreement(logits.argmax(1), ref_labels),
                 median_ms=s.median * 1e3, q1_ms=s.q1 * 1e3, q3_ms=s.q3 * 1e3, rounds=s.n,
                 images_per_s=batch / s.median, speedup=timings.ratio(base, name).median if base in ready else None)


def _dispatch_rows(setting: Setting, rows: RowWriter) -> None:
    model = setting.triton
    method = find_method(model, "dispatch_report") if model is not None else None
    if method is None:
        rows.row(kind="dispatch", model=setting.model, output_stride=setting.output_stride,
                 skipped="no per-layer dispatch report here")
        return
    try:
        report = getattr(model, method)()
        for r in getattr(report, "rows", None) or []:
            rows.row(kind="dispatch", model=setting.model, output_stride=setting.output_stride, **r)
    except Exception as exc:  # noqa: BLE001
        rows.row(kind="dispatch", model=setting.model, output_stride=setting.output_stride, ok=False,
                 message=error_text(exc))


def run(plan: Plan, rows: RowWriter) -> None:
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False  # the fp32 reference is IEEE fp32; the fp16 rows are unaffected
    torch.backends.cuda.matmul.allow_tf32 = False
    settings = model_settings(plan)
    images, source = input_batch(plan.resolution, max(b for _, _, batches in settings for b in batches))
    loaded: dict = {}
    for spec, output_stride, batches in settings:
        if plan.left() < 20:
            for batch in batches:
                rows.row(kind="model", model=spec, output_stride=output_stride, batch=batch, impl="all",
                         skipped="stage time limit")
            continue
        if spec not in loaded:
            loaded.clear()  # one model's weights at a time
            try:
                loaded[spec] = load_weights(spec)
            except Exception as exc:  # noqa: BLE001 (the other model's rows still run)
                raise_if_fatal(exc)
                rows.row(kind="model", model=spec, output_stride=output_stride, impl="all", ok=False,
                         message=f"weights: {error_text(exc)}")
                continue
            rows.row(kind="info", model=spec, weights=loaded[spec].description, inputs=source,
                     dtype=DTYPE_NAMES[plan.dtype], rounds=plan.rounds,
                     compile=f"backend={plan.compile_backend}, mode={plan.compile_mode}")
        setting = Setting(plan, loaded[spec], output_stride, rows)
        for batch in batches:
            _one_setting(setting, batch, images, rows)
        _dispatch_rows(setting, rows)
        del setting
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"model: done, {plan.left():.0f} s left", flush=True)
