"""ONNX Runtime (CPU) latency of the exported DeepLabv3 graph next to eager torchvision, at OS16 and OS8.

For each output stride: build torchvision's ``deeplabv3_resnet50`` (OS8 as shipped; OS16 by undilating
layer3 and halving the ASPP rates, as the paper does), export it with :func:`fastdeeplab.export_onnx`
(checked against PyTorch at the benchmark size), then time, in the same process and interleaved run by run
so that machine noise hits both alike: eager torchvision (``torch.inference_mode``) and ONNX Runtime
(:func:`fastdeeplab.export.onnx.ort_session`), same thread count, batch 1, with
:func:`fastdeeplab.timing.interleaved` (order rotated every round). Medians of ``--runs`` runs after one
warm-up each; speed-ups are medians of per-round ratios. ``--int8`` adds the int8 QDQ graph
(:func:`fastdeeplab.export.quantize.quantize_onnx`,
calibrated on scikit-image's photographs, timed in the same interleaved loop) and the fraction of
pixels whose class agrees with the fp32 graph on those photographs.

    python scripts/ort_latency.py --depth 50 --strides 16 8 --size 513 513 --runs 5 --int8
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import onnxruntime
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import resnet50, resnet101
from torchvision.models.segmentation import deeplabv3 as tv_deeplabv3

import fastdeeplab
from fastdeeplab.export.onnx import export_onnx, ort_session, physical_cores
from fastdeeplab.export.quantize import calibration_tensor, pixel_agreement, quantize_onnx
from fastdeeplab.timing import interleaved, load_average, spread


def torchvision_deeplabv3(depth: int, output_stride: int, num_classes: int = 21) -> nn.Module:
    """torchvision's DeepLabV3 at output stride 8 (as shipped) or 16 (layer3 undilated, ASPP rates halved)."""
    torch.manual_seed(0)  # the same random weights every run (no pretrained weights offline)
    backbone = (resnet50 if depth == 50 else resnet101)(
        weights=None, replace_stride_with_dilation=[False, output_stride == 8, True])
    model = tv_deeplabv3._deeplabv3_resnet(backbone, num_classes, aux=False)
    if output_stride == 16:
        for branch, rate in zip(model.classifier[0].convs[1:4], (6, 12, 18), strict=True):
            branch[0].dilation = branch[0].padding = (rate, rate)
    g = torch.Generator().manual_seed(0)  # non-trivial BN statistics, as a trained model has
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def gflop(model: nn.Module, x: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops() / 1e9


def median_ms(samples: list[float]) -> float:
    return spread(samples).median * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, choices=(50, 101), default=50)
    parser.add_argument("--strides", type=int, nargs="+", default=[16, 8])
    parser.add_argument("--size", type=int, nargs=2, default=(513, 513), metavar=("H", "W"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="default: physical cores")
    parser.add_argument("--int8", action="store_true", help="also the int8 QDQ graph (CPU flavour)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here too")
    args = parser.parse_args()

    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    h, w = args.size
    print(f"# {platform.processor() or platform.machine()}, {threads} threads; torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, onnxruntime {onnxruntime.__version__}; "
          f"deeplabv3_resnet{args.depth}, batch 1, {h}x{w}, medians of {args.runs} runs; "
          f"load average {load_average()['load1']:.2f} (the machine is shared: >~0.5 means other work competed)")
    photos = calibration_tensor(None, (h, w)) if args.int8 else None  # scikit-image's photographs
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stride in args.strides:
            tv = torchvision_deeplabv3(args.depth, stride)
            path = Path(tmp) / f"os{stride}.onnx"
            report = export_onnx(fastdeeplab.from_torchvision(tv), path, input_size=(h, w), threads=threads)
            print(report)
            sessions = {"ort_fp32": ort_session(path, threads=threads)}
            agreement = None
            if args.int8:
                int8 = quantize_onnx(path, Path(tmp) / f"os{stride}.int8.onnx", photos, input_size=(h, w))
                sessions["ort_int8"] = ort_session(int8, threads=threads)
                agreement = pixel_agreement(sessions["ort_fp32"], sessions["ort_int8"], photos)
            x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(stride))
            feed = {"input": x.numpy()}
            flops = gflop(tv, x)
            calls = {"eager": lambda tv=tv, x=x: tv(x),
                     **{k: (lambda s=session, feed=feed: s.run(["out"], feed)) for k, session in sessions.items()}}
            with torch.inference_mode():
                # interleaved, order rotated per round: noise on a shared machine hits all alike
                timings = interleaved(calls, rounds=args.runs, warmup=1)
            times = timings.samples
            speedup = timings.ratio("eager", "ort_fp32")
            row = {"output_stride": stride, "gflop": flops, "torchvision_eager_ms": median_ms(times["eager"]),
                   "ort_fp32_ms": median_ms(times["ort_fp32"]),
                   "speedup": speedup.median, "speedup_q1": speedup.q1, "speedup_q3": speedup.q3,
                   "all_ms": {k: [round(t * 1e3) for t in v] for k, v in times.items()},
                   "ort_max_rel_err": max(e[1] for v in report.errors.values() for e in v.values()),
                   "load_average_1min": load_average()["load1"]}
            if args.int8:
                int8 = timings.ratio("ort_fp32", "ort_int8")
                row.update(int8_ms=median_ms(times["ort_int8"]), int8_speedup=int8.median,
                           int8_pixel_agreement=agreement)
            rows.append(row)
            print(json.dumps(row))

    print("\n| OS | load | GFLOP | torchvision eager (ms) | ORT fp32 (ms) | ORT / eager speed-up | ORT GFLOP/s |"
          + (" ORT int8 (ms) | int8 vs fp32 | pixels agree |" if args.int8 else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|---|" if args.int8 else ""))
    for r in rows:
        line = (f"| {r['output_stride']} | {r['load_average_1min']:.1f} | {r['gflop']:.0f} | {r['torchvision_eager_ms']:.0f} | "
                f"{r['ort_fp32_ms']:.0f} | {r['speedup']:.2f}x | {r['gflop'] / r['ort_fp32_ms'] * 1e3:.0f} |")
        if args.int8:
            line += (f" {r['int8_ms']:.0f} | {r['int8_speedup']:.2f}x | {100 * r['int8_pixel_agreement']:.2f}% |")
        print(line)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
