"""A/B of the torch backend's ReLU after oneDNN's fused convolution (DeepLabv3-ResNet-50, 513x513, batch 1).

Three forms of ``FusedConvBNReLU._forward_onednn``, timed in interleaved rounds in one process:

* ``separate_relu_`` (what the package runs): conv + bias (+ residual add) in oneDNN, then ``torch.relu_``;
  keeps NaN, as the eager model does;
* ``leaky_postop``: oneDNN's leaky-ReLU post-op with slope 1e-30 where there is no residual (it keeps NaN;
  oneDNN fuses only a plain ReLU after a residual add, so those layers use ``relu_``);
* ``relu_postop``: oneDNN's ReLU post-op (``max(x, 0)``: maps NaN to 0, the form replaced for that reason).

    python scripts/relu_nan_ab.py [--output-stride 16] [--rounds 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastdeeplab
from fastdeeplab import layers


def _postop(unary: str, scalars: list):
    def forward(self, x, residual):
        args = (list(self.padding), list(self.stride), list(self.dilation), 1)
        weight = self._onednn_weight(x)
        if residual is None:
            attr, sc = (unary, scalars) if self.relu else ("none", [None])
            return torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, *args, attr, sc, "")
        fused = unary == "relu" and self.relu
        y = torch.ops.mkldnn._convolution_pointwise.binary(x, residual, weight, self.bias, *args, "add", 1.0,
                                                           "relu" if fused else None, [None] if fused else [], "")
        return y if fused or not self.relu else torch.relu_(y)
    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-stride", type=int, default=16, choices=(8, 16))
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = fastdeeplab.deeplabv3_resnet50(weights=None, num_classes=21, aux_loss=False,
                                           output_stride=args.output_stride).eval()
    fast = fastdeeplab.optimize(model, backend="torch")
    x = torch.randn(1, 3, 513, 513)
    impls = {"separate_relu_": layers.FusedConvBNReLU._forward_onednn,
             "leaky_postop": _postop("leaky_relu", [1e-30]),
             "relu_postop": _postop("relu", [None])}
    times: dict[str, list[float]] = {k: [] for k in impls}
    try:
        with torch.inference_mode():
            for impl in impls.values():  # warm-up: weights packed once per problem
                layers.FusedConvBNReLU._forward_onednn = impl
                fast(x)
            order = list(impls.items())
            for r in range(args.rounds):
                for name, impl in order[r % 3:] + order[:r % 3]:
                    layers.FusedConvBNReLU._forward_onednn = impl
                    start = time.perf_counter()
                    fast(x)
                    times[name].append(time.perf_counter() - start)
    finally:
        layers.FusedConvBNReLU._forward_onednn = impls["separate_relu_"]
    base = times["relu_postop"]
    for name, values in times.items():
        per_round = statistics.median(v / b for v, b in zip(values, base))  # same round: same machine load
        print(f"{name:15s} median {statistics.median(values) * 1e3:7.0f} ms   "
              f"{per_round:.3f}x relu_postop (median of per-round ratios)")


if __name__ == "__main__":
    main()
