"""The export's checks, run on the written graph: static ones (checker, strict shape inference, opset, no
BatchNorm, the pooled branch, dynamic axes, the fp16 graph, TensorRT's op list) and ONNX Runtime against the
PyTorch model at two sizes (max error, pixel agreement, in-graph labels).

:func:`run_checks` records each in the :class:`~fastdeeplab.export.report.ExportReport` and raises
:class:`~fastdeeplab.export.report.ExportCheckError` at the first failure. The checks that look at the graph alone
live in :mod:`fastdeeplab.export.checks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from ..runtime.onnxruntime import ort_session
from .passes import dims as _dims
from .report import (
    INPUT_NAME,
    LABELS_NAME,
    MIN_OPSET,
    TOLERANCES,
    CheckResult,
    ExportCheckError,
    ExportReport,
)

if TYPE_CHECKING:
    import onnx


__all__ = ["pooled_branch", "run_checks", "second_size"]


def second_size(h: int, w: int, stride: int | None) -> tuple[int, int]:
    """A different, odd, non-square size for the dynamic-shape check."""
    s = stride or 8
    h2 = max(2 * s + 1, (3 * h) // 4) | 1
    w2 = max(2 * s + 3, (5 * w) // 8) | 1
    if h2 == w2:
        w2 += 2
    return (h2, w2) if (h2, w2) != (h, w) else (h + 2 * s + 1, w + 2 * s + 3)


def _top2_margin(logits: np.ndarray) -> np.ndarray:
    top2 = np.partition(logits, -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def run_checks(report: ExportReport, proto: onnx.ModelProto, path: Path, reference: nn.Module, *,
                sizes: Sequence[tuple[int, int]], dynamic: bool, outputs: tuple[str, ...], argmax: bool,
                half: bool, threads: int | None, kept: Sequence[str] = (), uint8_input: bool = False,
                labels_dtype: str = "int32") -> None:
    """Run every check in order, record it in ``report``; the first failure raises ExportCheckError."""
    import onnx

    from ..metrics import max_rel_error, pixel_agreement
    from .checks import check_fp16_graph, check_tensorrt

    def record(name: str, passed: bool, message: str, node: str | None = None) -> None:
        report.checks[name] = CheckResult(passed, message)
        if not passed:
            raise ExportCheckError(name, message, node=node, report=report)

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        record("onnx_checker", False, str(exc).splitlines()[0])
    record("onnx_checker", True, "onnx.checker.check_model(full_check=True) passed")
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        record("shape_inference", False, str(exc).splitlines()[0])
    inferred_outputs = {o.name: _dims(o) for o in inferred.graph.output}
    record("shape_inference", True, "strict: " + ", ".join(f"{k} [{', '.join(map(str, v))}]"
                                                           for k, v in inferred_outputs.items()))

    record("opset", report.opset >= MIN_OPSET, f"opset {report.opset} (>= {MIN_OPSET} required)")
    bn = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    record("no_batchnorm", not bn, "BatchNormalization folded into Conv" if not bn
           else f"{len(bn)} BatchNormalization node(s) left unfolded, first {bn[0].name!r}",
           node=bn[0].name if bn else None)
    ok, message, node = pooled_branch(proto)
    record("pooled_branch", ok, message, node)
    if dynamic:
        fixed = {n: d for n, d in report.inputs.items() if not all(isinstance(x, str) for x in (d[0], d[2], d[3]))}
        record("dynamic_axes", not fixed, "batch, height, width dynamic" if not fixed
               else f"input dims not dynamic: {fixed}")
    if report.precision == "fp16" and not half:
        fp16 = check_fp16_graph(proto, kept=kept)
        record("fp16_graph", fp16.ok, str(fp16) if fp16.ok else "; ".join(fp16.problems[:5]),
               node=fp16.nodes[0] if fp16.nodes else None)
    trt = check_tensorrt(proto)
    first = trt.issues[0] if trt.issues else None
    record("tensorrt_ops", trt.ok,
           f"{trt.nodes} nodes supported by TensorRT's ONNX parser" if trt.ok
           else "; ".join(str(i) for i in trt.issues[:10]), node=first.node if first else None)

    session = ort_session(path, threads=threads)
    tolerance = TOLERANCES[torch.float16 if report.precision == "fp16" else torch.float32]
    names = list(outputs) + ([LABELS_NAME] if argmax else [])
    generator = torch.Generator().manual_seed(1234)
    device = next((p.device for p in reference.parameters()), torch.device("cpu"))
    ref_dtype = next((p.dtype for p in reference.parameters() if p.is_floating_point()), torch.float32)
    for i, (h, w) in enumerate(sizes):
        batch = 2 if dynamic and i > 0 else 1
        key = f"{h}x{w} b{batch}"
        if uint8_input:
            pixels = torch.randint(0, 256, (batch, 3, h, w), generator=generator, dtype=torch.uint8)
            feed = pixels.numpy()
            x = _normalise_uint8(pixels)
        else:
            x = torch.randn(batch, 3, h, w, generator=generator)
            feed = x.to(torch.float16 if half else torch.float32).numpy()
        with torch.inference_mode():
            ref = reference(x.to(device=device, dtype=ref_dtype))
        ref = {"out": ref} if isinstance(ref, Tensor) else ref
        got = dict(zip(names, session.run(names, {INPUT_NAME: feed}), strict=True))
        errors: dict[str, tuple[float, float]] = {}
        for name in outputs:
            expected = ref[name].double().cpu().numpy()
            actual = got[name].astype(np.float64)
            if actual.shape != expected.shape:
                report.errors[key] = errors
                record(f"ort@{key}", False, f"{name}: ONNX Runtime gives shape {actual.shape}, "
                                            f"PyTorch {expected.shape}")
            errors[name] = (float(np.abs(actual - expected).max()), max_rel_error(actual, expected))
        report.errors[key] = errors
        if "out" in got:
            report.agreement[key] = pixel_agreement(got["out"].argmax(axis=1), ref["out"].cpu().argmax(1).numpy(),
                                                    ignore_index=None)
        worst = max(errors.values(), key=lambda e: e[1]) if errors else (0.0, 0.0)
        agree = f", {100 * report.agreement[key]:.3f}% of pixels agree" if key in report.agreement else ""
        if errors:
            record(f"ort@{key}", worst[1] <= tolerance,
                   ", ".join(f"{n}: max abs {e[0]:.2e}, rel {e[1]:.2e}" for n, e in errors.items())
                   + f" (tol {tolerance:g} x max|torch|){agree}")
        if argmax:
            logits = ref["out"].double().cpu().numpy()
            expected_labels = logits.argmax(axis=1)
            labels = got[LABELS_NAME]
            mismatch = labels != expected_labels
            # A flip is only excused where PyTorch's top two logits are closer than the measured error.
            slack = 2 * errors.get("out", (float(tolerance * np.abs(logits).max()), 0.0))[0]
            bad = int((mismatch & (_top2_margin(logits) > slack)).sum())
            record(f"labels@{key}", labels.dtype == np.dtype(labels_dtype) and bad == 0,
                   f"{labels.dtype} labels, {100 * (1 - mismatch.mean()):.3f}% equal torch argmax "
                   f"({int(mismatch.sum())} differ, {bad} outside near-ties)")


def _normalise_uint8(pixels: Tensor) -> Tensor:
    """What the in-graph normalisation computes, in PyTorch: ``(pixels / 255 - mean) / std``."""
    from ..images import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def pooled_branch(proto: onnx.ModelProto) -> tuple[bool, str, str | None]:
    """Follow each GlobalAveragePool forward through per-pixel ops; a Resize of that 1×1 map fails."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    paths = []
    for node in proto.graph.node:
        if node.op_type != "GlobalAveragePool":
            continue
        chain, frontier = [node.op_type], [node]
        while frontier:
            nxt = [c for n in frontier for out in n.output for c in consumers.get(out, [])]
            resize = next((c for c in nxt if c.op_type in ("Resize", "Upsample")), None)
            if resize is not None:
                return False, f"{' -> '.join(chain)} -> {resize.op_type}: a resize of a 1x1 pooled map", resize.name
            frontier = [c for c in nxt if c.op_type in ("Conv", "Relu", "BatchNormalization", "Identity", "Cast",
                                                        "Clip")]
            if frontier:
                chain.append(frontier[0].op_type)
            elif nxt:
                chain.append(nxt[0].op_type)
        paths.append(" -> ".join(chain))
    if not paths:
        return True, "no GlobalAveragePool in the graph", None
    return True, "; ".join(sorted(set(paths))), None
