"""``fastdeeplab demo``: one real photograph through DeepLabv3 at output stride 16 and 8.

Same weights at both strides (atrous convolution changes resolution, not parameters): it prints the
latency of each and how far the two predictions agree.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from .cli import MODEL_NAMES, device_arg, input_file, int_at_least

    parser.add_argument("--image", type=input_file, help="a photograph (default: scikit-image's astronaut)")
    parser.add_argument("--model", default="deeplabv3_resnet50", choices=MODEL_NAMES, help="builder name")
    parser.add_argument("--weights", help="checkpoint path or torchvision weights name, e.g. "
                        "COCO_WITH_VOC_LABELS_V1 (default: random, seeded)")
    parser.add_argument("--resolution", type=int_at_least(16), default=513,
                        help="square input side, >= 16 (default 513)")
    parser.add_argument("--runs", type=int_at_least(1), default=3,
                        help="timed runs per output stride, >= 1 (median reported)")
    parser.add_argument("--device", type=device_arg, default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    import torch

    import fastdeeplab
    from fastdeeplab.timing import interleaved
    from fastdeeplab.images import load_image, normalize, skimage_photo_paths

    if args.runs < 1:
        raise ValueError(f"--runs must be >= 1, got {args.runs}")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = args.image or skimage_photo_paths()[0]
    x = normalize(load_image(path), args.resolution)[None].to(args.device)
    torch.manual_seed(0)
    model = fastdeeplab.get_model(args.model, weights=args.weights).eval().to(args.device)
    print(f"{args.model} on {Path(path).name} at {args.resolution}x{args.resolution}, "
          f"{args.device}, weights: {args.weights or 'random (seed 0)'}")
    models = {16: copy.deepcopy(model).set_output_stride(16), 8: model.set_output_stride(8)}  # same weights
    preds = {}
    with torch.inference_mode():
        for os_, m in models.items():
            preds[os_] = m(x)["out"].argmax(1)  # also the warm-up
        # interleaved: one run of each per round, so load from other processes hits both alike
        timings = interleaved({f"OS{os_}": (lambda m=m: m(x)) for os_, m in models.items()}, rounds=args.runs,
                              warmup=0, device=x.device)
    for os_ in models:
        t = timings.spread(f"OS{os_}")
        print(f"  OS{os_:>2}: {1000 * t.median:8.1f} ms (median of {args.runs}, IQR {1000 * t.iqr:.1f} ms)")
    agree = (preds[16] == preds[8]).float().mean().item()
    note = "" if args.weights else " (random weights: this agreement carries no meaning)"
    print(f"  OS16 and OS8 predictions agree on {100 * agree:.2f}% of pixels{note}")
    return 0
