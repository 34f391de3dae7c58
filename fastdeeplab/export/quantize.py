"""Int8 ONNX for the CPU (and TensorRT's explicit quantization): static QDQ quantization with ONNX Runtime.

:func:`quantize_onnx` calibrates an fp32 graph from :func:`fastdeeplab.export_onnx` on real photographs and
writes a QDQ graph: ``QuantizeLinear``/``DequantizeLinear`` pairs around convolutions and int8 per-channel
symmetric weights, in one of two flavours:

* ``tensorrt_compatible=False`` (default, for ONNX Runtime on the CPU): uint8 asymmetric activations and
  int32 biases, which ONNX Runtime fuses into ``QLinearConv`` (u8s8) kernels: about 2x faster than fp32 on
  AVX2 CPUs.
* ``tensorrt_compatible=True``: int8 activations with zero point 0 and float biases, the format TensorRT
  takes for explicit quantization (checked with :func:`fastdeeplab.export.checks.check_tensorrt` and
  :func:`fastdeeplab.export.checks.check_qdq_graph`: every Conv's input and weight dequantized, int8 weights,
  int8 zero points of 0). TensorRT 10/11 strongly typed builds run this graph in int8 as written.
  ONNX Runtime cannot fuse float-bias convolutions, so this flavour is *slower* than fp32 on the CPU.

Weights are 8-bit, or 7-bit with ``reduce_range``. ONNX Runtime fuses a QDQ ``Conv`` into an integer kernel; on
x86 CPUs without VNNI (AVX2 only) that kernel multiplies with ``vpmaddubsw``, which adds pairs of u8 x s8
products into a *saturating* int16: two 8-bit products reach 2 * 255 * 127 = 64770 > 32767, so the fused graph
no longer computes what the QDQ graph says (on a 6-photo test model: 95.0% of pixels agree with fp32 instead
of 98.4%; 88.8% for the s8s8 TensorRT flavour, which saturates too, so its activations run as uint8:
s8 x s8 pairs alone stay within 2 * 128 * 127 = 32512).
7-bit weights keep every pair within 2 * 255 * 64 = 32640. ``reduce_range=None`` (default) picks 7-bit
weights for the CPU flavour when the CPU doing the quantization is x86 without VNNI (:func:`cpu_saturates_u8s8`,
ONNX Runtime's own advice); pass ``reduce_range=True`` for a graph that will run on such a CPU elsewhere. The
TensorRT flavour keeps 8-bit weights by default: TensorRT accumulates in int32. To measure a TensorRT graph's
own accuracy on the CPU, run it with ``ort_session(path, optimization_level="disable")``: each
``DequantizeLinear``/float op/``QuantizeLinear`` as written, without the integer kernels.

Either way the graph stays QDQ: ``QLinearConv``/``ConvInteger`` graphs (QOperator format) are what TensorRT
does not take.

:func:`compare_quantized` measures what quantization costs and buys: the fraction of pixels whose class
(argmax of ``out``) agrees with the fp32 graph, and the median latency of both on ONNX Runtime.

>>> from fastdeeplab.export.quantize import quantize_onnx, compare_quantized          # doctest: +SKIP
>>> quantize_onnx("deeplabv3.onnx", "deeplabv3.int8.onnx", "calibration/")            # doctest: +SKIP
>>> print(compare_quantized("deeplabv3.onnx", "deeplabv3.int8.onnx", "val-images/"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._io import atomic_path, check_output_path

__all__ = [
    "CALIBRATION_METHODS",
    "QuantizationReport",
    "calibration_tensor",
    "compare_quantized",
    "cpu_saturates_u8s8",
    "image_input",
    "pixel_agreement",
    "quantize_onnx",
    "to_pixels",
]

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# Ops quantized: the convolutions and what sits between them. The final Resize/ArgMax stay in float.
_QUANTIZED_OPS = ("Conv", "Add", "Concat", "MaxPool", "GlobalAveragePool")

CalibrationSource = str | os.PathLike | Tensor | Sequence[Tensor] | None


def calibration_tensor(source: CalibrationSource, size: Sequence[int] = (513, 513), *,
                       max_images: int | None = None) -> Tensor:
    """Normalised calibration images ``[M, 3, H, W]`` float32.

    ``source``: a folder of images, a ``[M, 3, H, W]`` tensor, a sequence of ``[3, H, W]``/``[1, 3, H, W]``
    tensors, or ``None`` for the photographs scikit-image ships (:func:`fastdeeplab.images.sample_images`).
    Tensors are taken as already normalised; images from files are resized to ``size`` and normalised with
    ImageNet statistics.
    """
    from ..images import sample_images

    h, w = int(size[0]), int(size[1])
    if source is None or isinstance(source, (str, os.PathLike)):
        if source is not None and not Path(source).is_dir():
            raise FileNotFoundError(f"calibration image folder not found: {source}")
        _, batch = sample_images((h, w), count=None, folder=source)
        return _finite(batch[:max_images], source)
    if isinstance(source, Tensor):
        tensors = [source] if source.dim() == 4 else [source.unsqueeze(0)]
    else:
        tensors = [t if t.dim() == 4 else t.unsqueeze(0) for t in source]
    if not tensors or any(t.dim() != 4 or t.shape[1] != 3 for t in tensors):
        raise ValueError("calibration tensors must be [M, 3, H, W] or [3, H, W] normalised images")
    batch = torch.cat([t.detach().float().cpu() for t in tensors])
    if batch.shape[0] == 0:
        raise ValueError("no calibration images")
    return _finite(batch[:max_images], None)


def _finite(batch: Tensor, source: CalibrationSource) -> Tensor:
    """``batch``, refused when an image holds NaN or inf: calibration would turn them into NaN scales."""
    bad = (~torch.isfinite(batch)).flatten(1).any(1)
    if bad.any():
        first = int(bad.nonzero()[0, 0])
        where = f" from {source}" if source is not None else ""
        raise ValueError(f"calibration images{where}: {int(bad.sum())} of {batch.shape[0]} hold NaN or inf values "
                         f"(the first is image {first}); give finite, normalised images")
    return batch


def quantize_onnx(fp32_path: str | os.PathLike, out_path: str | os.PathLike,
                  calibration_images_or_tensors: CalibrationSource = None, *, per_channel: bool = True,
                  method: str = "minmax", input_size: Sequence[int] = (513, 513), max_images: int | None = 64,
                  tensorrt_compatible: bool = False, reduce_range: bool | None = None) -> Path:
    """Quantize an fp32 ONNX graph to int8 QDQ, calibrated on real photographs; returns ``out_path``.

    Args:
        fp32_path: an fp32 graph from :func:`fastdeeplab.export_onnx` (input ``[N, 3, H, W]``).
        out_path: where to write the QDQ graph (atomically).
        calibration_images_or_tensors: see :func:`calibration_tensor`; images are resized to ``input_size``.
        per_channel: per-output-channel weight scales (recommended: BN folding spreads weight ranges).
        method: ``"minmax"``, ``"entropy"`` or ``"percentile"`` activation calibration.
        max_images: cap on calibration images.
        tensorrt_compatible: int8 activations with zero point 0 and float biases, what TensorRT requires
            (slow on ONNX Runtime's CPU kernels). ``False``: uint8 activations and int32 biases, the fast
            ONNX Runtime CPU form, which TensorRT rejects.
        reduce_range: 7-bit weights, so that ONNX Runtime's int8 kernels on x86 CPUs without VNNI do not
            saturate (see the module docstring). ``None``: ``True`` for the CPU flavour when this CPU is such
            a CPU (:func:`cpu_saturates_u8s8`), else ``False``.
    """
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
    except ImportError as exc:
        raise ImportError("quantization needs onnxruntime: pip install 'fastdeeplab[onnx]'") from exc
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method must be one of {CALIBRATION_METHODS}, got {method!r}")
    if reduce_range is None:
        reduce_range = not tensorrt_compatible and cpu_saturates_u8s8()
    fp32_path = Path(fp32_path)
    input_name, takes_pixels = image_input(fp32_path)
    check_output_path(out_path, what="quantized ONNX")
    if Path(out_path).expanduser().resolve() == fp32_path.resolve():
        raise ValueError(f"out_path would overwrite the fp32 graph {fp32_path}")
    images = calibration_tensor(calibration_images_or_tensors, input_size, max_images=max_images)
    if takes_pixels:  # a graph that normalises uint8 pixels itself (export_onnx(uint8_input=True))
        images = to_pixels(images)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._next = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._next >= images.shape[0]:
                return None
            self._next += 1
            return {input_name: images[self._next - 1: self._next].numpy()}

    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    # MinMax keeps only per-tensor minima and maxima per image; entropy and percentile keep whole activations
    # (large at OS8: cap max_images). ORT's CalibMaxIntermediateOutputs would discard data, so it is not used.
    # TensorRT takes float biases (it folds them itself): an int32 bias DequantizeLinear fails its parser.
    extra = {"WeightSymmetric": True, "ActivationSymmetric": tensorrt_compatible,
             "QuantizeBias": not tensorrt_compatible}
    root = logging.getLogger()
    level = root.level
    with atomic_path(out_path) as tmp:
        root.setLevel(max(level, logging.ERROR))  # ORT's "consider pre-processing" advice is noise here
        try:
            quantize_static(str(fp32_path), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(_QUANTIZED_OPS), per_channel=per_channel,
                            reduce_range=bool(reduce_range),
                            activation_type=QuantType.QInt8 if tensorrt_compatible else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=calibrate, extra_options=extra)
        finally:
            root.setLevel(level)
        if tensorrt_compatible:
            from ..runtime.onnx_files import load_onnx
            from .checks import check_qdq_graph, check_tensorrt

            check_tensorrt(str(tmp)).raise_if_failed()
            qdq = check_qdq_graph(load_onnx(tmp, what="quantized ONNX"))
            if not qdq.ok:
                raise ValueError(f"the Q/DQ graph is not what TensorRT's explicit quantization takes: {qdq}")
    return Path(out_path)


def cpu_saturates_u8s8(cpuinfo: str | None = None) -> bool:
    """Whether ONNX Runtime's int8 convolution kernels on this CPU add u8 x s8 products in saturating int16
    pairs: an x86 CPU without VNNI (neither ``avx512_vnni`` nor ``avx_vnni``). Read from ``/proc/cpuinfo``
    (or the text ``cpuinfo``), else from NumPy's CPU feature table; an x86 CPU whose features cannot be read
    counts as saturating (7-bit weights cost little accuracy; saturation can cost much). Other CPUs: ``False``.
    """
    import platform

    if cpuinfo is None:
        if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
            return False
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.split(":", 1)[0].strip() == "flags"), None)
    if flags is not None:
        return not {"avx512_vnni", "avx_vnni"} & set(flags)
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        return True
    return not features.get("AVX512VNNI", False)


def to_pixels(images: Tensor) -> Tensor:
    """ImageNet-normalised RGB ``[M, 3, H, W]`` back to the uint8 pixels a ``uint8_input`` graph takes."""
    from ..images import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((images * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


def image_input(path: str | os.PathLike) -> tuple[str, bool]:
    """The name of the fp32 graph's one image input ``[N, 3, H, W]`` and whether it takes uint8 pixels; a file
    that is not such a graph is refused in one line naming it (before any calibration work)."""
    import onnx

    from ..runtime.onnx_files import load_onnx

    graph = load_onnx(path, what="fp32 ONNX model", load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise ValueError(f"fp32 ONNX model {path} has {len(inputs)} inputs "
                         f"({', '.join(i.name for i in inputs) or 'none'}); quantization takes a graph with one "
                         "image input [N, 3, H, W]")
    tensor = inputs[0].type.tensor_type
    dims = [d.dim_value or d.dim_param for d in tensor.shape.dim]
    if len(dims) != 4 or dims[1] not in (3, "3"):
        raise ValueError(f"fp32 ONNX model {path}: its input {inputs[0].name!r} has shape {dims}; quantization "
                         "takes an image batch [N, 3, H, W]")
    if tensor.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8):
        name = onnx.TensorProto.DataType.Name(tensor.elem_type)
        raise ValueError(f"fp32 ONNX model {path}: its input {inputs[0].name!r} is {name}; quantization takes "
                         "a float32 (or uint8 pixel) graph")
    return inputs[0].name, tensor.elem_type == onnx.TensorProto.UINT8


@dataclass
class QuantizationReport:
    """Pixel agreement of int8 with fp32 (argmax of ``out``) and median ONNX Runtime latencies (ms)."""

    images: int
    size: tuple[int, int]
    pixel_agreement: float
    fp32_ms: float
    int8_ms: float
    threads: int

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.int8_ms

    def __str__(self) -> str:
        return (f"int8 vs fp32 on {self.images} image(s) at {self.size[0]}x{self.size[1]}: "
                f"{100 * self.pixel_agreement:.2f}% of pixels agree; ONNX Runtime ({self.threads} threads) "
                f"median {self.fp32_ms:.0f} ms fp32, {self.int8_ms:.0f} ms int8 ({self.speedup:.2f}x)")


def compare_quantized(fp32_path: str | os.PathLike, int8_path: str | os.PathLike,
                      images: CalibrationSource = None, *, size: Sequence[int] = (513, 513), runs: int = 5,
                      threads: int | None = None) -> QuantizationReport:
    """Agreement of the int8 graph's per-pixel classes with the fp32 graph's, and both graphs' median
    latency over ``runs`` rounds (after one warm-up; timed round-robin by :func:`fastdeeplab.timing.interleaved`)
    on the first image, batch 1."""
    from ..runtime.onnxruntime import ort_session, physical_cores
    from ..timing import interleaved

    batch = calibration_tensor(images, size)
    sessions = [ort_session(p, threads=threads) for p in (fp32_path, int8_path)]
    if sessions[0].get_inputs()[0].type == "tensor(uint8)":
        batch = to_pixels(batch)
    agreement = pixel_agreement(*sessions, batch)
    xs = [{s.get_inputs()[0].name: batch[:1].numpy()} for s in sessions]
    timings = interleaved({"fp32": lambda: sessions[0].run(["out"], xs[0]),
                           "int8": lambda: sessions[1].run(["out"], xs[1])}, rounds=runs, warmup=1)
    medians = [1e3 * timings.spread(name).median for name in ("fp32", "int8")]
    return QuantizationReport(batch.shape[0], (int(batch.shape[2]), int(batch.shape[3])), agreement,
                              medians[0], medians[1], threads or physical_cores())


def pixel_agreement(reference: Any, candidate: Any, images: Tensor) -> float:
    """Fraction of pixels whose class (argmax of ``out``) is the same from two ONNX Runtime sessions (or
    paths), over ``images`` ``[M, 3, H, W]`` run one at a time (the counting is
    :func:`fastdeeplab.metrics.pixel_agreement`)."""
    from .. import metrics
    from ..runtime.onnxruntime import ort_session

    sessions = [s if hasattr(s, "run") else ort_session(s) for s in (reference, candidate)]
    names = [s.get_inputs()[0].name for s in sessions]
    a, b = [], []
    for i in range(images.shape[0]):
        x = images[i: i + 1].numpy()
        a.append(torch.from_numpy(sessions[0].run(["out"], {names[0]: x})[0].argmax(axis=1)))
        b.append(torch.from_numpy(sessions[1].run(["out"], {names[1]: x})[0].argmax(axis=1)))
    return metrics.pixel_agreement(torch.cat(b), torch.cat(a), ignore_index=None)
