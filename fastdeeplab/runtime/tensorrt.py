"""Run a TensorRT engine behind the runtime contract: :class:`TensorRTModel`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..export.tensorrt import _Logger, _require_tensorrt

__all__ = ["TensorRTModel"]


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT8: torch.int8,
             trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool}
    for name, torch_dtype in (("INT64", torch.int64), ("BF16", torch.bfloat16), ("UINT8", torch.uint8)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = torch_dtype
    if dtype not in table:
        raise TypeError(f"TensorRT tensor type {dtype} has no torch equivalent")
    return table[dtype]


def _check_in_profile(shape: Sequence[int], lo: Sequence[int], hi: Sequence[int]) -> None:
    if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi, strict=True)):
        raise ValueError(f"input shape {tuple(shape)} is outside the engine's profile: min {tuple(lo)}, "
                         f"max {tuple(hi)}; rebuild the engine with a wider min_shape/max_shape")


class TensorRTModel(nn.Module):
    """Run a TensorRT engine like the PyTorch model: ``model(x)`` with ``x`` ``[N, 3, H, W]`` (normalised RGB)
    returns ``{"out": [N, K, H, W] float32}``, plus ``"aux"`` and ``"labels"`` (int64 ``[N, H, W]``) when the
    engine has them. Inputs on the CPU are copied to ``device``; outputs stay on ``device``.

    The engine runs on torch's current CUDA stream, so it orders correctly with surrounding torch work.
    """

    def __init__(self, engine_path: str | os.PathLike, device: str | torch.device = "cuda") -> None:
        super().__init__()
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise FileNotFoundError(f"TensorRT engine not found: {engine_path}")
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"TensorRT runs on CUDA devices, got device {str(self.device)!r}")
        trt = _require_tensorrt()
        if not torch.cuda.is_available():
            raise RuntimeError("running a TensorRT engine needs a CUDA GPU; none is visible to torch")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.engine_path = engine_path
        self._trt = trt
        with torch.cuda.device(self.device):
            self._logger = _Logger.create(trt)  # TensorRT keeps a raw pointer: keep the object alive
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
            if self._engine is None:
                raise RuntimeError(f"{engine_path} is not a TensorRT engine for this TensorRT version and GPU")
            self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        mode = self._engine.get_tensor_mode
        self.input_names = [n for n in names if mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if mode(n) == trt.TensorIOMode.OUTPUT]
        if len(self.input_names) != 1:
            raise ValueError(f"expected an engine with one input, got {self.input_names}")
        self.dtypes = {n: _torch_dtype(trt, self._engine.get_tensor_dtype(n)) for n in names}
        lo, _, hi = self._engine.get_tensor_profile_shape(self.input_names[0], 0)
        self.profile = (tuple(lo), tuple(hi))

    def extra_repr(self) -> str:
        return (f"engine={str(self.engine_path)!r}, device={self.device}, inputs={self.input_names}, "
                f"outputs={self.output_names}, profile min {self.profile[0]} max {self.profile[1]}")

    @torch.no_grad()
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected a [N, 3, H, W] tensor, got {shape}")
        _check_in_profile(tuple(x.shape), *self.profile)
        name = self.input_names[0]
        x = x.to(self.device, self.dtypes[name]).contiguous()
        context = self._context
        context.set_input_shape(name, tuple(x.shape))
        context.set_tensor_address(name, x.data_ptr())
        results: dict[str, Tensor] = {}
        for out in self.output_names:
            shape = tuple(context.get_tensor_shape(out))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"TensorRT could not infer the shape of output {out!r}: {shape}")
            results[out] = torch.empty(shape, dtype=self.dtypes[out], device=self.device)
            context.set_tensor_address(out, results[out].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (execute_async_v3 returned False)")
        for key, value in results.items():
            if key == "labels":
                results[key] = value.long()
            elif value.is_floating_point() and value.dtype != torch.float32:
                results[key] = value.float()
        return results
