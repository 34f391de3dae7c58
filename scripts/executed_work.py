"""Executed-work table: CTAs launched and MMA work executed by the Triton convs, before and after issue 12.

For every convolution of DeepLabv3-ResNet-50 on a 513×513 input at output stride 16 and 8, batch 1 and 8,
this counts, with the kernels' own work model (:mod:`fastdeeplab.kernels.work`, which the tests check against
the tap counts the kernel reports):

* **before**: the spatial-tile kernel as it was (8×8-pixel × 128-channel × 32 tiles, config 0; the old
  autotuner could only choose other spatial tiles), every conv on Triton, the four ASPP branches as four
  launches;
* **after**: the stem on cuDNN (dense work, by definition 1.00×), 1×1 convs on raster (GEMM) tiles, 3×3 convs
  on the leanest tile the autotuner's early prune keeps (raster or spatial), the four ASPP branches as one
  grouped launch. Where several tiles are within the prune's slack the autotuner times them on the GPU;
  the table shows the leanest, so "after" is the best the prune allows, not a measured choice.

``work ×`` is executed MMA multiply-adds / cuDNN's dense ``N·OH·OW·KH·KW·Cin·Cout`` (below 1 where dead taps
are skipped); ``CTAs`` is programs per launch against the 132 SMs of an H100 SXM. Counted, not timed.

    python scripts/executed_work.py                 # markdown table on stdout
    python scripts/executed_work.py --batch 1 --output-stride 16
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

SMS = 132
BEFORE = dict(block_m=64, block_n=128, block_k=32, block_ow=8, raster=False)  # old config 0


def _work():
    from fastdeeplab.kernels import work

    return work


def _after_tilings(k: int):
    """The new autotune list as Tilings (kernels/conv.get_autotune_configs' tiles, copied so that no triton
    is needed; the TMA configs' tiles are the last two spatial ones)."""
    work = _work()
    spatial = [(8, 8, 128, 32), (8, 8, 64, 64), (8, 16, 64, 32), (4, 16, 128, 64), (8, 16, 128, 32), (8, 8, 128, 64)]
    raster = [(1, 64, 128, 32), (1, 64, 64, 64), (1, 128, 64, 32), (1, 128, 128, 32)]
    tiles = [work.Tiling(oh * ow, n, kk, block_ow=ow, raster=True) for oh, ow, n, kk in raster]
    if k > 1:
        tiles += [work.Tiling(oh * ow, n, kk, block_ow=ow, raster=False) for oh, ow, n, kk in spatial]
    return tiles


def model_convs(output_stride: int, size: int = 513):
    """``[(name, ConvGeometry)]`` for every conv of DeepLabv3-ResNet-50 (batch 1), from a meta-device pass."""
    import fastdeeplab

    work = _work()
    model = fastdeeplab.deeplabv3_resnet50(num_classes=21, output_stride=output_stride).eval().to("meta")
    found = []

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0]
            found.append((name, work.ConvGeometry(n=1, cin=x.shape[1], h=x.shape[2], w=x.shape[3],
                                                  cout=module.out_channels, k=module.kernel_size[0],
                                                  stride=module.stride[0], dilation=module.dilation[0],
                                                  padding=module.padding[0])))
        return fn

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and name != "classifier.0.convs.4.1":  # the pooled branch: a GEMV
            m.register_forward_hook(hook(name))
    with torch.no_grad():
        model(torch.empty(1, 3, size, size, device="meta"))
    return found


def rows(output_stride: int, batch: int) -> list[dict]:
    work = _work()
    groups: OrderedDict = OrderedDict()
    aspp = []
    for name, g in model_convs(output_stride):
        g = work.ConvGeometry(n=batch, cin=g.cin, h=g.h, w=g.w, cout=g.cout, k=g.k, stride=g.stride,
                              dilation=g.dilation, padding=g.padding)
        if name.startswith("classifier.0.convs."):
            aspp.append((name, g))
            continue
        groups.setdefault(g, []).append(name)
    out = []
    before_t = work.Tiling(**BEFORE)
    for g, names in groups.items():
        before = (work.ctas(g, before_t), work.executed_macs(g, before_t))
        if g.cin <= 4:
            after, label = (None, g.dense_macs), "cuDNN (stem)"
        else:
            best = min(_after_tilings(g.k), key=lambda t: (work.executed_macs(g, t), -work.ctas(g, t)))
            after, label = (work.ctas(g, best), work.executed_macs(g, best)), _label(best)
        out.append(_row(names, g, before, after, label))
    # ASPP branches: four launches before, one grouped launch after
    geoms = [g for _, g in aspp]
    before = (sum(work.ctas(g, before_t) for g in geoms), sum(work.executed_macs(g, before_t) for g in geoms))
    tilings = _after_tilings(3)
    best = min(tilings, key=lambda t: (sum(work.executed_macs(g, t) for g in geoms), -work.ctas(geoms[0], t)))
    after = (sum(work.ctas(g, best) for g in geoms), sum(work.executed_macs(g, best) for g in geoms))
    dense = sum(g.dense_macs for g in geoms)
    rates = "/".join(str(g.dilation) for g in geoms[1:])
    g0 = geoms[0]
    out.append({"layers": f"ASPP 1×1 + 3×3 rates {rates} (4 launches → 1 grouped)", "count": 1,
                "shape": f"{g0.cin}→4×{g0.cout} @{g0.h}×{g0.w}", "dense": dense, "before_ctas": before[0],
                "before_work": before[1], "after_ctas": after[0], "after_work": after[1],
                "after_tile": _label(best) + " grouped"})
    return out


def _label(t) -> str:
    kind = "raster" if t.raster else f"{t.block_oh}×{t.block_ow}px"
    return f"{t.block_m}×{t.block_n}×{t.block_k} {kind}"


def _row(names, g, before, after, label) -> dict:
    short = names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} alike)"
    return {"layers": short, "count": len(names),
            "shape": f"{g.k}×{g.k} s{g.stride} d{g.dilation} {g.cin}→{g.cout} @{g.h}×{g.w}", "dense": g.dense_macs,
            "before_ctas": before[0], "before_work": before[1], "after_ctas": after[0], "after_work": after[1],
            "after_tile": label}


def table(output_stride: int, batch: int) -> str:
    rs = rows(output_stride, batch)
    head = ("| layer | × | conv @ input | before: CTAs (/132 SMs) | before: work × dense | after: tile | "
            "after: CTAs (/132) | after: work × dense |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    tot_dense = tot_before = tot_after = 0
    for r in rs:
        c = r["count"]
        tot_dense += c * r["dense"]
        tot_before += c * r["before_work"]
        tot_after += c * r["after_work"]
        after_ctas = "-" if r["after_ctas"] is None else f"{r['after_ctas']} ({r['after_ctas'] / SMS:.2f})"
        lines.append(f"| {r['layers']} | {c} | {r['shape']} | {r['before_ctas']} ({r['before_ctas'] / SMS:.2f}) | "
                     f"{r['before_work'] / r['dense']:.2f} | {r['after_tile']} | {after_ctas} | "
                     f"{r['after_work'] / r['dense']:.2f} |")
    lines.append(f"| **whole model** | | {tot_dense / 1e9:.1f} GMAC dense | | **{tot_before / tot_dense:.2f}** | | | "
                 f"**{tot_after / tot_dense:.2f}** |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-stride", type=int, nargs="+", default=[16, 8], choices=[8, 16])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    args = p.parse_args(argv)
    for os_ in args.output_stride:
        for n in args.batch:
            print(f"\n**OS{os_}, batch {n}, 513×513**\n")
            print(table(os_, n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
