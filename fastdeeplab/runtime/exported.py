"""Runtimes over the project's ONNX export of a fused model (ONNX Runtime, OpenVINO): export on the first
call, rebuild when the graph would change (``set_output_stride``, or parameters changed by ``load_state_dict``
or in place).

The runtime does not export by itself: ``runtime/`` sits below ``export/``, so the caller
(:func:`fastdeeplab.optimize`) hands it the exporter, :func:`fastdeeplab.export.onnx.onnx_model_proto`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .base import RuntimeModel

__all__ = ["ExportedDeepLabV3", "parameter_state"]


def parameter_state(module: nn.Module) -> tuple[tuple[int, int, int], ...]:
    """What identifies the current values of ``module``'s parameters and buffers, cheaply: each tensor's
    identity, storage and version counter (bumped by every in-place write: ``load_state_dict``, ``copy_``,
    an optimizer step). Equal states mean no tensor was replaced or written since."""
    tensors = [*module.parameters(), *module.buffers()]
    return tuple((id(t), t.data_ptr(), t._version) for t in tensors)


class ExportedDeepLabV3(RuntimeModel):
    """A runtime session over the ONNX export of ``fused`` (an ``OptimizedDeepLabV3`` in float32), behind the
    :class:`~fastdeeplab.DeepLabV3` interface, on the CPU. ``graph(fused, input_size=, dynamic=True,
    outputs=)`` returns the ONNX ``ModelProto`` (:func:`fastdeeplab.export.onnx.onnx_model_proto`). The graph
    has dynamic batch, height and width: it is exported and compiled on the first call and rebuilt only when
    ``set_output_stride`` changes it or the parameters change (``load_state_dict``, in-place writes).
    Subclasses say how to compile the proto (``_compile``) and run it on a float32 numpy array
    (``_run_numpy``)."""

    extra = ""  # the pip extra that installs ``packages``

    def __init__(self, fused: nn.Module, *, graph: Callable[..., Any], threads: int | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        missing = [name for name in self.packages if importlib.util.find_spec(name) is None]
        if missing:  # fail now, naming the extra, not at the first call
            raise ImportError(f"the {self.backend} backend needs {', '.join(missing)}: "
                              f"pip install 'fastdeeplab[{self.extra}]'")
        if not callable(graph):
            raise TypeError(f"graph must be the ONNX exporter (onnx_model_proto), got {type(graph).__name__}")
        self.model = fused  # float32: the graph is exported in float32; the runtime runs it in ``dtype``
        self.graph = graph
        self.threads = threads
        self.dtype = dtype
        self._outputs: list[str] = []
        self._session_state: Any = None

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

    def session(self, x: Tensor) -> Any:
        state = parameter_state(self.model)
        if self._session is not None and state != self._session_state:
            self.reset_session()  # the parameters changed since the graph was exported: export it again
        if self._session is None:
            self._session = self._build(x)
            self._session_state = state
        return self._session

    def reset_session(self) -> None:
        super().reset_session()
        self._session_state = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_session_state"] = None
        return state

    def _build(self, x: Tensor) -> Any:
        outputs = ("out", "aux") if self.model.aux_classifier is not None else ("out",)
        proto = self.graph(self.model, input_size=tuple(x.shape[-2:]), dynamic=True, outputs=outputs)
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
