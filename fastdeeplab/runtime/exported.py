"""Runtimes over the project's ONNX export of a fused model (ONNX Runtime, OpenVINO): export on the first
call, rebuild when ``set_output_stride`` changes the graph."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import RuntimeModel

__all__ = ["ExportedDeepLabV3"]


class ExportedDeepLabV3(RuntimeModel):
    """A runtime session over the ONNX export of ``fused`` (an ``OptimizedDeepLabV3`` in float32), behind the
    :class:`~fastdeeplab.DeepLabV3` interface, on the CPU. The graph has dynamic batch, height and width: it is
    exported and compiled on the first call and rebuilt only when ``set_output_stride`` changes it.
    Subclasses say how to compile the proto (``_compile``) and run it on a float32 numpy array
    (``_run_numpy``)."""

    def __init__(self, fused: nn.Module, *, threads: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model = fused  # float32: the graph is exported in float32; the runtime runs it in ``dtype``
        self.threads = threads
        self.dtype = dtype
        self._outputs: list[str] = []

    @property
    def output_stride(self) -> int:
        return self.model.output_stride

    @property
    def aux_classifier(self) -> nn.Module | None:
        return self.model.aux_classifier

    def set_output_stride(self, output_stride: int) -> ExportedDeepLabV3:
        self.model.set_output_stride(output_stride)
        self.reset_session()
        return self

    def _build(self, x: Tensor) -> Any:
        from ..export.onnx import onnx_model_proto

        outputs = ("out", "aux") if self.model.aux_classifier is not None else ("out",)
        proto = onnx_model_proto(self.model, input_size=tuple(x.shape[-2:]), dynamic=True, outputs=outputs)
        self._outputs = list(outputs)
        return self._compile(proto)

    def _compile(self, proto: Any) -> Any:
        raise NotImplementedError

    def _run_numpy(self, session: Any, x: Any) -> list[Any]:
        """Run ``session`` on the float32 NCHW numpy array ``x``; one numpy array per name in ``_outputs``,
        owned by the caller."""
        raise NotImplementedError

    def _run(self, session: Any, x: Tensor) -> dict[str, Tensor]:
        results = self._run_numpy(session, x.detach().float().contiguous().numpy())
        return {name: torch.from_numpy(r) for name, r in zip(self._outputs, results)}

    def extra_repr(self) -> str:
        return (f"output_stride={self.output_stride}, backend={self.backend!r}, dtype={self.dtype}, "
                f"threads={self.threads}")
