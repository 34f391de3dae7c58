"""OpenVINO on the project's ONNX export (CPU): :func:`openvino_compiled_model` and :class:`OpenVINODeepLabV3`.

OpenVINO reads the ONNX graph that :func:`fastdeeplab.export.onnx.onnx_model_proto` makes (BatchNorm folded,
ASPP pooling as one bias per image) and compiles it for the CPU. On this project's reference CPU it was the
fastest runtime for the fused graph (``bench/RESULTS.md``), which is why ``optimize(backend="auto")`` picks it
there when it is installed (``pip install 'fastdeeplab[openvino]'``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .exported import ExportedDeepLabV3
from .onnx_files import check_onnx_file, onnx_load_error

__all__ = ["NAN_KEEPING_SLOPE", "PRECISIONS", "OpenVINODeepLabV3", "keep_nan_relus", "openvino_compiled_model",
           "require_openvino"]

_INSTALL_HINT = "pip install 'fastdeeplab[openvino]'"
PRECISIONS = ("f32", "bf16", "f16")


def require_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise ImportError(f"the OpenVINO runtime needs the openvino package: {_INSTALL_HINT}") from exc
    return openvino


def openvino_compiled_model(model: Any, *, threads: int | None = None, precision: str = "f32",
                            device: str = "CPU", keep_nan: bool = True) -> Any:
    """Compile an ONNX model (``onnx.ModelProto``, serialized bytes or a path) with OpenVINO.

    ``precision`` is pinned (``INFERENCE_PRECISION_HINT``): OpenVINO's CPU plugin otherwise runs bfloat16 on
    CPUs that support it, which does not give float32's outputs. ``threads`` defaults to OpenVINO's choice
    (the physical cores); the performance hint is ``LATENCY`` (one stream, batch 1 first).

    ``keep_nan`` (default): NaN propagates as in PyTorch and ONNX Runtime. OpenVINO's CPU ``Relu`` maps NaN to
    0, so an input whose activations overflow (``torch.full((1, 3, 65, 65), 3e38)``: inf, then inf - inf)
    came out as confident labels where PyTorch gives NaN; each ``Relu`` is compiled as a ``PRelu`` of slope
    :data:`NAN_KEEPING_SLOPE` instead, which is ReLU to float32 precision and keeps NaN (:func:`keep_nan_relus`).
    """
    ov = require_openvino()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if isinstance(model, (str, os.PathLike)):
        source: Any = str(check_onnx_file(model))
    elif isinstance(model, bytes):
        source = model
    elif hasattr(model, "SerializeToString"):
        source = model.SerializeToString()
    else:
        raise TypeError(f"expected an onnx.ModelProto, bytes or a path, got {type(model).__name__}")
    core = ov.Core()
    properties = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if threads is not None:
        properties["INFERENCE_NUM_THREADS"] = int(threads)
    try:
        graph = core.read_model(source)
    except Exception as exc:  # noqa: BLE001  (OpenVINO reports unreadable or corrupt models as RuntimeError)
        raise onnx_load_error(model, exc, runtime="OpenVINO") from None
    if keep_nan:
        keep_nan_relus(graph)
    return core.compile_model(graph, device, properties)


# ReLU's negative side times this is below float32's precision next to any activation that matters (and a
# subnormal or zero for |x| < 1e8), and the slope is not 0, so OpenVINO keeps the PRelu (and NaN) as it is.
NAN_KEEPING_SLOPE = 1e-30


def keep_nan_relus(graph: Any) -> int:
    """Replace every ``Relu`` of the OpenVINO model ``graph`` (in place) by ``PRelu(x, NAN_KEEPING_SLOPE)``,
    which OpenVINO fuses into the convolutions the same way and which passes NaN on; returns how many."""
    import numpy as np
    from openvino import opset13 as ops

    slope = ops.constant(np.array([NAN_KEEPING_SLOPE], dtype=np.float32))
    count = 0
    for op in graph.get_ordered_ops():
        if op.get_type_name() == "Relu":
            prelu = ops.prelu(op.input_value(0), slope)
            prelu.set_friendly_name(op.get_friendly_name())
            op.output(0).replace(prelu.output(0))
            count += 1
    return count


class OpenVINODeepLabV3(ExportedDeepLabV3):
    """An OpenVINO CPU model over the fused model's export, behind the DeepLabV3 interface; it runs in
    ``dtype`` (float32, or bfloat16 on CPUs with AVX512-BF16 or AMX), pinned so that OpenVINO never picks a
    lower precision by itself."""

    backend = "openvino"
    packages = ("onnx", "onnxscript", "openvino")
    dtypes = (torch.float32, torch.bfloat16)
    _PRECISION = {torch.float32: "f32", torch.bfloat16: "bf16"}  # OpenVINO's names for ``dtypes``
    extra = "openvino"

    def _compile(self, proto: Any) -> Any:
        compiled = openvino_compiled_model(proto, threads=self.threads, precision=self._PRECISION[self.dtype])
        return compiled.create_infer_request()

    def _run_numpy(self, session: Any, x: Any) -> list[Any]:
        results = session.infer({0: x}, share_inputs=True, share_outputs=False)  # outputs: fresh copies
        return [results[name] for name in self._outputs]
