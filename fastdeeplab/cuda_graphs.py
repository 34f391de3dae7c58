"""Whole-forward CUDA graphs for batch-1 latency: ``optimize(model, cuda_graph=True)``.

At batch 1 an optimized DeepLabv3 launches about 60 convolutions whose host-side cost (Python, argument
checks, the Triton launcher) is comparable to their GPU time, so the GPU idles between kernels. A CUDA graph
records every launch of one forward once and replays them with a single call.

:class:`CUDAGraphModel` wraps an optimized model. For each new input (shape, dtype, device) it

1. warms up ``warmup`` times on a side stream: Triton autotuning and the per-layer dispatch timing
   (``dispatch="auto"``) happen here, never inside a capture;
2. captures one forward into a ``torch.cuda.CUDAGraph`` with static input and output buffers;
3. replays it on every later call: copies the input in, replays, returns *clones* of the outputs (so a
   caller's result is never overwritten by the next call).

At most ``max_graphs`` graphs are kept (least recently used dropped first); ``set_output_stride`` drops them
all. CPU inputs, and graph-tracing contexts, run the wrapped model eagerly.

The recipe, done by hand (what this class automates)::

    fast = fastdeeplab.optimize(model.cuda(), backend="triton")
    x = torch.randn(1, 3, 513, 513, device="cuda")
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fast(x)                                   # autotune + dispatch decisions, outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fast(x)
    x.copy_(next_image); g.replay(); logits = out["out"].clone()
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .model import capturing_graph

__all__ = ["CUDAGraphModel"]


@dataclass
class _Captured:
    graph: object  # torch.cuda.CUDAGraph (or a test double with .replay())
    static_input: Tensor
    static_output: dict[str, Tensor]


class CUDAGraphModel(nn.Module):
    """Replays one captured CUDA graph per input shape (see the module docstring).

    Args:
        model: an optimized model (``forward(x) -> dict of tensors``), already on CUDA.
        warmup: eager calls before each capture (autotuning, dispatch timing), at least 1.
        max_graphs: graphs kept at once; each holds its static input and output buffers in GPU memory.
    """

    def __init__(self, model: nn.Module, *, warmup: int = 3, max_graphs: int = 4,
                 capture: Callable[[nn.Module, Tensor, int], _Captured] | None = None) -> None:
        super().__init__()
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (autotuning must not run inside a capture), got {warmup}")
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.model = model
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._capture_fn = capture or _capture
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()

    @property
    def backend(self) -> str:
        return getattr(self.model, "backend", "torch")

    @property
    def output_stride(self) -> int:
        return self.model.output_stride

    def set_output_stride(self, output_stride: int) -> CUDAGraphModel:
        self.model.set_output_stride(output_stride)
        self._graphs.clear()  # the captured launches hold the old dilations
        return self

    def dispatch_report(self):
        return self.model.dispatch_report()

    def train(self, mode: bool = True) -> CUDAGraphModel:
        self.model.train(mode)  # the optimized model refuses training itself
        return super().train(False)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if not isinstance(x, Tensor) or x.device.type != "cuda" or capturing_graph():
            return self.model(x)
        key = (tuple(x.shape), tuple(x.stride()), x.dtype, x.device)
        entry = self._graphs.get(key)
        if entry is None:
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            entry = self._graphs[key] = self._capture_fn(self.model, x, self.warmup)
        self._graphs.move_to_end(key)
        entry.static_input.copy_(x)
        entry.graph.replay()
        return {k: v.clone() for k, v in entry.static_output.items()}


def _capture(model: nn.Module, x: Tensor, warmup: int) -> _Captured:
    static_input = x.clone()
    with torch.cuda.device(x.device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                model(static_input)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = model(static_input)
    return _Captured(graph, static_input, static_output)
