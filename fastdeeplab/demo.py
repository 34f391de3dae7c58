"""``fastdeeplab demo``: one photograph through DeepLabv3 at output stride 16 and 8.

Same weights at both strides (atrous convolution changes resolution, not parameters): it prints the latency
of each (median, min and max of ``--runs`` interleaved runs) and how far the two predictions agree, and writes
the OS8 prediction over the photograph, with a legend of the classes present, to ``--out``
(default ``demo_overlay.png`` in the current folder).
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from .cli import MODEL_NAMES, add_weights_argument, device_arg, input_file, int_at_least, output_file

    parser.add_argument("--image", type=input_file,
                        help="a photograph (default: scikit-image's astronaut; with --weights synthetic, a "
                             "held-out synthetic scene)")
    parser.add_argument("--model", default="deeplabv3_resnet50", choices=MODEL_NAMES, help="builder name")
    add_weights_argument(parser, default_text="random, seeded")
    parser.add_argument("--resolution", type=int_at_least(16), default=513,
                        help="square input side, >= 16 (default 513)")
    parser.add_argument("--runs", type=int_at_least(1), default=5,
                        help="timed runs per output stride, >= 1 (default 5; median, min and max reported)")
    parser.add_argument("--device", type=device_arg, default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--out", type=output_file, default=Path("demo_overlay.png"), metavar="FILE",
                        help="the OS8 prediction over the photograph, with a legend (default demo_overlay.png)")


def run(args: argparse.Namespace) -> int:
    import copy
    import tempfile

    import torch

    from ._io import atomic_path, check_not_input
    from .data.palette import overlay
    from .images import load_image, normalize, skimage_photo_paths
    from .predict import add_legend, class_names_for, palette_for
    from .timing import interleaved
    from .weights import build_model, write_synthetic_scene

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    synthetic = isinstance(args.weights, str) and args.weights.strip().lower() == "synthetic"
    if args.image is not None:
        path = Path(args.image)
    elif synthetic:  # the synthetic model knows only its scenes: show it a held-out one
        path = write_synthetic_scene(Path(tempfile.mkdtemp(prefix="fastdeeplab-demo-")) / "synthetic_scene.png")
    else:
        path = Path(skimage_photo_paths()[0])
    check_not_input(args.out, {"--image": path}, what="--out")
    image = load_image(path).resize((args.resolution, args.resolution))
    x = normalize(image)[None].to(device)
    torch.manual_seed(0)
    model = build_model(args.model, args.weights, progress=print).eval().to(device)
    print(f"{args.model} on {path.name} at {args.resolution}x{args.resolution}, {device}, "
          f"weights: {args.weights or 'random (seed 0)'}")
    models = {16: copy.deepcopy(model).set_output_stride(16), 8: model.set_output_stride(8)}  # same weights
    preds = {}
    with torch.inference_mode():
        for os_, m in models.items():
            preds[os_] = m(x)["out"].argmax(1)  # also the warm-up
        # interleaved: one run of each per round, so load from other processes hits both alike
        timings = interleaved({f"OS{os_}": (lambda m=m: m(x)) for os_, m in models.items()}, rounds=args.runs,
                              warmup=0, device=x.device)
    for os_ in models:
        samples = [1000 * t for t in timings.samples[f"OS{os_}"]]
        t = timings.spread(f"OS{os_}")
        print(f"  OS{os_:<2}  {1000 * t.median:8.1f} ms  median of {len(samples)} runs "
              f"(min {min(samples):.1f}, max {max(samples):.1f} ms)")
    agree = (preds[16] == preds[8]).float().mean().item()
    note = "" if args.weights and args.weights.strip().lower() != "random" else \
        " (random weights: this agreement carries no meaning)"
    print(f"  OS16 and OS8 predictions agree on {100 * agree:.2f}% of pixels{note}")
    mask = preds[8][0].to(torch.uint8).cpu().numpy()
    palette = palette_for("voc", args.weights)
    picture = add_legend(overlay(image, mask, palette), mask, palette, class_names_for("voc", args.weights))
    with atomic_path(args.out, suffix=".png", what="--out") as tmp:
        picture.save(tmp, format="PNG")
    print(f"  overlay (OS8 prediction, legend of the classes present): {Path(args.out).resolve()}")
    return 0
