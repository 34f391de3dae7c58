"""Would Winograd make DeepLab's dilated 3x3 convolutions faster on this CPU? Measures it, shape by shape.

    python scripts/winograd_cpu.py [--rounds 7] [--tiles 2 4 6]

At OS8 the optimized model runs its convolutions near the CPU's FMA limit, so only fewer multiplications
could make it faster while keeping fp32's outputs. Winograd F(m, 3) does a 3x3 convolution with
(m+2)^2 / (9 m^2) of the direct method's multiplications. A dilated convolution is d^2 ordinary ones on the
phase sub-images (space-to-batch). This script implements that in PyTorch:

- input transform: gather the (m+2)x(m+2) tiles of every phase, multiply by kron(Bt, Bt);
- (m+2)^2 GEMMs: oneDNN's linear, with weights pre-transformed and prepacked;
- output transform: kron(At, At), then bias and ReLU, then scatter back.

It times this against oneDNN's direct fused convolution (what ``optimize(backend="torch")`` calls) and checks
the result against a float64 convolution. The transform matrices come from Toom-Cook with the points
0, ±1, ±2, ±1/2.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads

import argparse  # noqa: E402
import math  # noqa: E402
from fractions import Fraction  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastdeeplab.metrics import max_rel_error  # noqa: E402
from fastdeeplab.timing import interleaved, load_average  # noqa: E402

# (name, Cin, Cout, map side, dilation): DeepLabv3-ResNet-50 at 513x513
SHAPES = [("layer4.conv2 OS8", 512, 512, 65, 4), ("layer3.conv2 OS8", 256, 256, 65, 2),
          ("ASPP rate 12 OS8", 2048, 256, 65, 12), ("ASPP rate 24 OS8", 2048, 256, 65, 24),
          ("layer4.conv2 OS16", 512, 512, 33, 2), ("ASPP rate 6 OS16", 2048, 256, 33, 6)]


def toom_cook(m: int, r: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact ``(At, G, Bt)`` for F(m, r): ``y = At [(G g) * (Bt d)]`` is the correlation of d with g."""
    n = m + r - 1
    points = [Fraction(p) for p in ("0", "1", "-1", "2", "-2", "1/2", "-1/2")][: n - 1]

    def times(p: list[Fraction], q: list[Fraction]) -> list[Fraction]:
        out = [Fraction(0)] * (len(p) + len(q) - 1)
        for i, a in enumerate(p):
            for j, b in enumerate(q):
                out[i + j] += a * b
        return out

    at = [[p**i for p in points] + [Fraction(int(i == m - 1))] for i in range(m)]
    g, bt, full = [], [], [Fraction(1)]
    for j, a in enumerate(points):
        scale, poly = Fraction(1), [Fraction(1)]
        for k, b in enumerate(points):
            if k != j:
                scale *= a - b
                poly = times(poly, [-b, Fraction(1)])
        g.append([a**k / scale for k in range(r)])
        bt.append(poly + [Fraction(0)] * (n - len(poly)))
        full = times(full, [-a, Fraction(1)])
    g.append([Fraction(int(k == r - 1)) for k in range(r)])
    bt.append(full)
    as_tensor = lambda rows: torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)  # noqa: E731
    return as_tensor(at), as_tensor(g), as_tensor(bt)


class WinogradConv:
    """``relu(conv2d(x, w, b, padding=d, dilation=d))`` for channels-last ``x`` by Winograd F(m, 3)."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor, *, dilation: int, m: int, side: int) -> None:
        at, g, bt = toom_cook(m)
        self.m, self.d, self.a = m, dilation, m + 2
        cout, cin = w.shape[:2]
        u = (torch.kron(g, g) @ w.double().reshape(cout * cin, 9).T).view(self.a**2, cout, cin).float()
        tiles = dilation**2 * math.ceil(side / (dilation * m)) ** 2  # tiles per image, all phases
        self.u = [torch.ops.mkldnn._reorder_linear_weight(u[k].contiguous(), tiles) for k in range(self.a**2)]
        self.bt, self.at = torch.kron(bt, bt).float(), torch.kron(at, at).float()
        self.bias = b.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m, d, a = self.m, self.d, self.a
        n, c, h, w = x.shape
        th, tw = math.ceil(h / (d * m)), math.ceil(w / (d * m))  # tiles per phase sub-image
        ph, pw = th * m + 2, tw * m + 2  # padded phase sub-image
        padded = x.new_zeros(n, ph * d, pw * d, c)
        padded[:, d:d + h, d:d + w] = x.permute(0, 2, 3, 1)
        row, col = d * pw * d * c, d * c
        tiles = padded.as_strided((a, a, n, d, d, th, tw, c),
                                  (row, col, ph * row, pw * d * c, c, m * row, m * col, 1)).reshape(a * a, -1)
        v = (self.bt @ tiles).view(a * a, -1, c)
        mm = torch.stack([torch.ops.mkldnn._linear_pointwise(v[k], self.u[k], None, "none", [None], "")
                          for k in range(a * a)])
        cout = mm.shape[-1]
        y = (self.at @ mm.view(a * a, -1)).view(m, m, n, d, d, th, tw, cout).add_(self.bias).relu_()
        y = y.permute(2, 5, 0, 3, 6, 1, 4, 7).reshape(n, th * m * d, tw * m * d, cout)
        out = torch.empty(n, cout, h, w, memory_format=torch.channels_last)
        out.permute(0, 2, 3, 1).copy_(y[:, :h, :w])
        return out


def onednn_direct(w: torch.Tensor, b: torch.Tensor, d: int, shape: list[int]):
    packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), [d, d], [1, 1], [d, d], 1, shape)
    return lambda x: torch.ops.mkldnn._convolution_pointwise(x, packed, b, [d, d], [1, 1], [d, d], 1, "relu",
                                                            [None], "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tiles", type=int, nargs="+", default=[2, 4, 6], help="Winograd output tile sizes m")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch 1, medians of {args.rounds} "
          f"interleaved rounds, load average {load_average()['load1']:.2f}")
    print("| conv (Cin→Cout, map, dilation) | oneDNN direct ms | " +
          " | ".join(f"F({m},3) ms (max rel. err)" for m in args.tiles) + " |")
    print("|---|---|" + "---|" * len(args.tiles))
    with torch.inference_mode():
        for name, cin, cout, side, d in SHAPES:
            x = torch.randn(1, cin, side, side).contiguous(memory_format=torch.channels_last)
            w, b = torch.randn(cout, cin, 3, 3) / (3 * cin**0.5), torch.randn(cout)
            ref = F.relu(F.conv2d(x.double(), w.double(), b.double(), 1, d, d))
            convs = {"direct": onednn_direct(w, b, d, list(x.shape))}
            errors = {}
            for m in args.tiles:
                convs[f"F({m},3)"] = conv = WinogradConv(w, b, dilation=d, m=m, side=side)
                errors[f"F({m},3)"] = max_rel_error(conv(x), ref)
            # interleaved, order rotated per round: load from other processes hits every variant alike
            t = interleaved({k: (lambda c=c, x=x: c(x)) for k, c in convs.items()}, rounds=args.rounds, warmup=1)
            cells = [f"{1000 * t.spread('direct').median:.1f}"]
            cells += [f"{1000 * t.spread(k).median:.1f} ({errors[k]:.0e})" for k in errors]
            print(f"| {name} ({cin}→{cout}, {side}², d={d}) | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
