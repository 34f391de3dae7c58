"""The runtime contract: what every inference runtime behind the :class:`~fastdeeplab.DeepLabV3` interface
does the same way (ONNX Runtime, OpenVINO and TensorRT).

* **Input checks.** :func:`fastdeeplab.model.check_input` (rank, dtype, channels, empty batch, sizes below
  the output stride), then the runtime's device: an input on another device is refused by name.
* **The output dict.** ``{"out": logits}``, plus ``"aux"`` and ``"labels"`` when the graph has them. Logits come
  back in the input's floating dtype; ``labels`` is always :data:`LABELS_DTYPE` (``torch.int64``, what
  ``logits.argmax(1)`` gives), whatever the graph computed them in (int32, uint8).
* **Sessions are caches.** They are built on the first call, dropped when the model is pickled, deep-copied
  or ``torch.save``-d, and rebuilt on the next call. A session derived from the model's parameters (ONNX
  Runtime, OpenVINO) is rebuilt when they change (``load_state_dict``, in-place writes), so the output is
  always the current weights'.
* **Overflow too.** A finite input whose activations overflow gives NaN, as on eager (OpenVINO compiles its
  ``Relu`` to keep NaN: :func:`fastdeeplab.runtime.openvino.keep_nan_relus`).
* **Non-finite input: NaN in, NaN out.** An image holding NaN or inf gets NaN logits everywhere and label
  ``-1``, as the eager model gives NaN (:func:`fastdeeplab.model.nonfinite_to_nan`); runtimes whose fused
  ReLU maps NaN to 0 (OpenVINO) would otherwise return confident labels.
* **Persistence.** Pickle, ``copy.deepcopy`` and ``torch.save`` / ``torch.load(..., weights_only=False)``
  work before and after use (the session is dropped and rebuilt). ``weights_only=False`` is needed because
  the file holds the model's class, not just tensors: load only files you trust.
* **Not scriptable.** ``torch.jit.script`` raises a ``RuntimeError`` saying what to use instead (a session
  is not TorchScript).
* **Inference only.** ``train()`` raises.

A subclass says how to build its session (:meth:`RuntimeModel._build`) and how to run it
(:meth:`RuntimeModel._run`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..model import check_input, nonfinite_to_nan

__all__ = ["LABELS_DTYPE", "TRAIN_ERROR", "RuntimeModel", "finish_outputs"]

LABELS_DTYPE = torch.int64
TRAIN_ERROR = ("this model was built by fastdeeplab.optimize() for inference only: its BatchNorms are folded "
               "into the convolutions and it has no trainable parameters. Train the original model and "
               "optimize it again.")


def finish_outputs(outputs: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """The contract's output dict: floating outputs in ``dtype``, ``labels`` in :data:`LABELS_DTYPE`."""
    result = {}
    for name, value in outputs.items():
        if name == "labels":
            result[name] = value.to(LABELS_DTYPE)
        elif value.is_floating_point():
            result[name] = value.to(dtype)
        else:
            result[name] = value
    return result


class RuntimeModel(nn.Module):
    """Base class of the inference runtimes (see the module docstring).

    Class attributes a subclass sets:

    * ``backend`` — its name, as ``optimize(backend=...)`` takes it;
    * ``packages`` — what must import for it (checked by ``optimize(backend="auto")``);
    * ``dtypes`` — the compute dtypes it can run;
    * ``device_type`` — where its inputs must live (``"cpu"`` or ``"cuda"``).
    """

    backend = ""
    packages: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    device_type = "cpu"

    def __init__(self) -> None:
        super().__init__()
        self._session: Any = None
        self.training = False

    # ---- what a subclass provides
    @property
    def output_stride(self) -> int:
        """The smallest input side the graph accepts (``check_input`` refuses smaller inputs)."""
        raise NotImplementedError

    def _build(self, x: Tensor) -> Any:
        """Build the session for a first input ``x`` (already checked)."""
        raise NotImplementedError

    def _run(self, session: Any, x: Tensor) -> dict[str, Tensor]:
        """Run ``session`` on the checked input; one tensor per output name."""
        raise NotImplementedError

    # ---- the contract
    def check_device(self, x: Tensor) -> None:
        if x.device.type != self.device_type:
            where = "the CPU" if self.device_type == "cpu" else "a CUDA GPU"
            raise ValueError(f"the {self.backend} backend runs on {where}; got an input on {x.device} "
                             f"(move it with .to({self.device_type!r}))")

    def session(self, x: Tensor) -> Any:
        if self._session is None:
            self._session = self._build(x)
        return self._session

    def reset_session(self) -> None:
        """Drop the session; the next call rebuilds it."""
        self._session = None

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        check_input(x, self.output_stride)
        self.check_device(x)
        with torch.no_grad():
            outputs = self._run(self.session(x), x)
        return nonfinite_to_nan(x, finish_outputs(outputs, x.dtype))

    def train(self, mode: bool = True) -> RuntimeModel:
        if mode:
            raise RuntimeError(TRAIN_ERROR)
        return super().train(False)

    def __prepare_scriptable__(self) -> RuntimeModel:  # called by torch.jit.script
        raise RuntimeError(f"torch.jit.script cannot compile this {type(self).__name__}: it holds a "
                           f"session of the {self.backend} backend, not TorchScript. Script the eager model instead "
                           "(torch.jit.script(model)), or deploy the ONNX file of "
                           "fastdeeplab.export_onnx(model, 'model.onnx') with the runtime itself")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_session"] = None  # sessions hold native handles: never pickled, rebuilt on the next call
        return state
