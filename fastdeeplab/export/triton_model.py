"""The python-backend model that ``fastdeeplab deploy`` writes as ``<name>_python/1/model.py``.

It runs the ``model.onnx`` beside it with ONNX Runtime, so the repository serves in any Triton Inference Server
that has the python backend (the one ``fastdeeplab serve`` runs, and NGC's images). The file is self-contained:
it needs numpy (< 2, see :func:`check_numpy`) and onnxruntime in the backend stub's Python, not fastdeeplab.

* Names, types and dims come from the model config (``args["model_config"]``), never from constants here.
* ``execute`` gets the requests the dynamic batcher gathered; requests whose images have the same size run as one
  ONNX Runtime batch and the answers are split back per request, in order.
* A bad request (type, rank, empty batch, image too large or too small, non-finite floats) gets an error response
  naming the problem (``TritonError`` INVALID_ARG); the other requests of the same batch are still answered, and
  an exception in ONNX Runtime fails only the requests it touched. Nothing here ends the stub.

Model parameters (``parameters`` in ``config.pbtxt``, all optional): ``max_image_pixels`` (H*W per image,
default 4096*4096), ``min_image_size`` (default 8), ``intra_op_threads`` (ONNX Runtime threads, default 0 =
its own choice), ``device`` (``gpu``: the CUDA execution provider where onnxruntime has it, else the CPU).

This module imports outside Triton too (``triton_python_backend_utils`` is loaded lazily), so the request checks
can be read and tested on their own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

try:  # present only inside Triton's python backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised inside the server
    pb_utils = None

__all__ = ["RequestError", "TritonPythonModel", "check_image_batch", "check_numpy", "group_by_shape"]

NUMPY_TYPES = {"TYPE_UINT8": np.uint8, "TYPE_INT32": np.int32, "TYPE_INT64": np.int64, "TYPE_FP32": np.float32,
               "TYPE_FP16": np.float16}
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MIN_SIZE = 8


class RequestError(ValueError):
    """A request this model refuses; the message goes back to the client as the error response."""


def check_numpy(version: str) -> None:
    """Refuse numpy >= 2: the python backend stub of Triton 2.51 then answers with empty outputs and no error."""
    if int(version.split(".")[0]) >= 2:
        raise RuntimeError(f"numpy {version} in the python backend's environment: Triton's python backend stub "
                           "returns empty outputs with numpy 2; install numpy<2 there (`fastdeeplab serve` builds "
                           "such an environment and passes it as EXECUTION_ENV_PATH)")


def check_image_batch(name: str, array: np.ndarray, dtype: type, dims: Sequence[int], *, max_pixels: int,
                      min_size: int) -> None:
    """Check one request's input ``[N, *dims]`` (``-1`` dims free) before it joins a batch; raise
    :class:`RequestError` naming the input and the problem."""
    if array.dtype != np.dtype(dtype):
        raise RequestError(f"input {name!r} has data type {array.dtype}, expected {np.dtype(dtype)}")
    if array.ndim != len(dims) + 1:
        raise RequestError(f"input {name!r} has shape {list(array.shape)} (rank {array.ndim}); expected rank "
                           f"{len(dims) + 1}, [N, {', '.join('H' if i == 1 else 'W' if i == 2 else str(d) for i, d in enumerate(dims))}]")
    if array.shape[0] == 0:
        raise RequestError(f"input {name!r} has batch size 0; send at least one image")
    for axis, (want, got) in enumerate(zip(dims, array.shape[1:]), start=1):
        if want > 0 and want != got:
            raise RequestError(f"input {name!r} has {got} in dimension {axis} (shape {list(array.shape)}); "
                               f"expected {want}")
    if array.ndim >= 3:
        h, w = array.shape[-2:]
        if h * w > max_pixels:
            raise RequestError(f"input {name!r}: image {h}x{w} is too large ({h * w} pixels; this model takes at "
                               f"most {max_pixels}, parameter max_image_pixels)")
        if min(h, w) < min_size:
            raise RequestError(f"input {name!r}: image {h}x{w} is too small (each side must be >= {min_size})")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise RequestError(f"input {name!r} contains NaN or infinite values")


def group_by_shape(shapes: Sequence[tuple[int, ...]]) -> list[list[int]]:
    """Indexes of the requests whose per-image shapes (batch dimension left out) are equal, in arrival order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, shape in enumerate(shapes):
        groups.setdefault(tuple(shape[1:]), []).append(index)
    return list(groups.values())


def _parameter(config: dict, key: str, default: str) -> str:
    return str(config.get("parameters", {}).get(key, {}).get("string_value", default))


class TritonPythonModel:
    """Triton's python-backend entry point: ``initialize`` once per instance, ``execute`` per gathered batch."""

    def initialize(self, args: dict) -> None:
        check_numpy(np.__version__)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeError(f"onnxruntime is not installed in the python backend's environment ({exc}); "
                               "pip install onnxruntime there") from exc
        config = json.loads(args["model_config"])
        self.name = config["name"]
        self.inputs = [(t["name"], NUMPY_TYPES[t["data_type"]], [int(d) for d in t["dims"]]) for t in config["input"]]
        self.outputs = [(t["name"], NUMPY_TYPES[t["data_type"]]) for t in config["output"]]
        self.max_pixels = int(_parameter(config, "max_image_pixels", str(DEFAULT_MAX_PIXELS)))
        self.min_size = int(_parameter(config, "min_image_size", str(DEFAULT_MIN_SIZE)))
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(_parameter(config, "intra_op_threads", "0"))
        providers = ["CPUExecutionProvider"]
        if _parameter(config, "device", "cpu") == "gpu" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=providers)
        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n, *_ in self.inputs if n not in graph_inputs] + [n for n, _ in self.outputs
                                                                            if n not in graph_outputs]
        if missing:
            raise RuntimeError(f"{path} has no tensor named {', '.join(map(repr, missing))} that config.pbtxt "
                               f"declares (graph inputs {sorted(graph_inputs)}, outputs {sorted(graph_outputs)})")

    def _read(self, request) -> dict[str, np.ndarray]:
        arrays = {}
        for name, dtype, dims in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise RequestError(f"input {name!r} is missing from the request")
            array = tensor.as_numpy()
            check_image_batch(name, array, dtype, dims, max_pixels=self.max_pixels, min_size=self.min_size)
            arrays[name] = array
        shapes = {a.shape[0] for a in arrays.values()}
        if len(shapes) > 1:
            raise RequestError(f"the inputs have different batch sizes {sorted(shapes)}")
        return arrays

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.session.run([n for n, _ in self.outputs], feeds)
        return [np.ascontiguousarray(r, dtype=dtype) for r, (_, dtype) in zip(results, self.outputs)]

    def _error(self, message: str):
        try:
            error = pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
        except (AttributeError, TypeError):  # older backends: no error codes
            error = pb_utils.TritonError(message)
        return pb_utils.InferenceResponse(output_tensors=[], error=error)

    def _answer(self, outputs: list[np.ndarray]):
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, array)
                                                          for (name, _), array in zip(self.outputs, outputs)])

    def execute(self, requests):
        responses = [None] * len(requests)
        arrays: dict[int, dict[str, np.ndarray]] = {}
        for index, request in enumerate(requests):
            try:
                arrays[index] = self._read(request)
            except RequestError as exc:
                responses[index] = self._error(f"{self.name}: {exc}")
            except Exception as exc:  # noqa: BLE001 - a request must never end the stub
                responses[index] = self._error(f"{self.name}: unreadable request: {type(exc).__name__}: {exc}")
        first = self.inputs[0][0]
        order = sorted(arrays)
        for group in group_by_shape([arrays[i][first].shape for i in order]):
            members = [order[g] for g in group]
            feeds = {name: np.concatenate([arrays[i][name] for i in members]) if len(members) > 1
                     else arrays[members[0]][name] for name, *_ in self.inputs}
            try:
                outputs = self._run(feeds)
            except Exception as exc:  # noqa: BLE001
                if len(members) > 1:  # find the culprit: run each request alone
                    for i in members:
                        try:
                            responses[i] = self._answer(self._run(arrays[i]))
                        except Exception as alone:  # noqa: BLE001
                            responses[i] = self._error(f"{self.name}: inference failed: {alone}")
                    continue
                responses[members[0]] = self._error(f"{self.name}: inference failed: {exc}")
                continue
            start = 0
            for i in members:
                n = arrays[i][first].shape[0]
                responses[i] = self._answer([o[start:start + n] for o in outputs])
                start += n
        return responses

    def finalize(self) -> None:
        self.session = None
