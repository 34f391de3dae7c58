"""``fastdeeplab deploy``: a Triton Inference Server model repository (:func:`fastdeeplab.deploy`).

Examples::

    fastdeeplab deploy --out model_repository                          # ONNX Runtime on the CPU, uint8 in/out
    fastdeeplab deploy --out repo && fastdeeplab serve repo             # and serve it here with tritonserver
    fastdeeplab deploy --model deeplabv3_resnet101 --weights ckpt.pth --num-classes 19 --output-stride 8 \\
        --device gpu --tensorrt --precision fp16 --out model_repository
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from ..cli import MODEL_NAMES, add_weights_argument, input_dir, input_file, int_at_least, output_dir

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("Examples::", 1)[1]
    parser.add_argument("--model", default="deeplabv3_resnet50", choices=MODEL_NAMES, help="model name")
    add_weights_argument(parser)
    parser.add_argument("--num-classes", type=int, default=None,
                        help="number of classes (default: the weights', else 21)")
    parser.add_argument("--output-stride", type=int, default=16, choices=(8, 16, 32), help="default: 16")
    parser.add_argument("--out", required=True, type=output_dir, help="the model repository directory")
    parser.add_argument("--name", default="deeplabv3", help="model name in Triton (default: deeplabv3)")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=(513, 513),
                        help="size traced and checked (default: 513 513)")
    parser.add_argument("--float-input", action="store_true",
                        help="take normalised float32 input instead of raw uint8 RGB")
    parser.add_argument("--labels-dtype", choices=("uint8", "int32"), default="uint8", help="default: uint8")
    parser.add_argument("--logits", action="store_true", help="also return the 'out' logits")
    parser.add_argument("--class-names", type=input_file, default=None, help="text file, one class name per line")
    parser.add_argument("--max-batch-size", type=int_at_least(0), default=8, help="default: 8")
    parser.add_argument("--preferred-batch-sizes", type=int_at_least(1), nargs="*", default=[4, 8], help="default: 4 8")
    parser.add_argument("--max-queue-delay-us", type=int_at_least(0), default=100, help="default: 100")
    parser.add_argument("--instances", type=int_at_least(1), default=1, help="ONNX Runtime instances (default: 1)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="ONNX Runtime instances' device")
    parser.add_argument("--backends", nargs="+", choices=("python", "onnxruntime", "tensorrt"),
                        default=["python", "onnxruntime"],
                        help="models to write (default: python onnxruntime): python = model.py over ONNX Runtime, "
                             "serves in any Triton incl. `fastdeeplab serve`; onnxruntime = NVIDIA's images; "
                             "tensorrt = same as --tensorrt")
    parser.add_argument("--max-image-pixels", type=int_at_least(1), default=4096 * 4096,
                        help="the python model refuses larger images, H*W (default 4096*4096)")
    parser.add_argument("--tensorrt", action="store_true", help="also build a TensorRT model.plan (GPU)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp16",
                        help="TensorRT precision (default: fp16)")
    parser.add_argument("--calibration-images", type=input_dir, default=None, help="TensorRT int8: image folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    parser.add_argument("--no-check", action="store_true", help="skip the export's checks (not recommended)")


def check_inputs(args: argparse.Namespace) -> None:
    """Before any work: a valid ``--name``, and no input (``--weights``, ``--class-names``,
    ``--calibration-images``) inside what the command writes or replaces: ``README.md`` and the model folders."""
    from .._io import check_not_input
    from .deploy import _check_readme, check_model_name

    try:
        check_model_name(args.name)
    except ValueError as exc:
        raise ValueError(f"--name: {exc}") from None
    _check_readme(Path(args.out) / "README.md", args.overwrite)
    backends = getattr(args, "backends", None) or ["onnxruntime"]
    dirs = ([f"{args.name}_python"] if "python" in backends else []) \
        + ([args.name] if "onnxruntime" in backends else []) \
        + ([f"{args.name}_tensorrt"] if args.tensorrt or "tensorrt" in backends else [])
    inputs = {"--weights": args.weights if args.weights and Path(args.weights).exists() else None,
              "--class-names": args.class_names, "--calibration-images": args.calibration_images}
    check_not_input(Path(args.out) / "README.md", inputs, what="--out README.md")
    for flag, path in inputs.items():
        if path is None:
            continue
        real = Path(os.path.realpath(path))
        for folder in dirs:
            inside = Path(os.path.realpath(Path(args.out) / folder))
            if real == inside or inside in real.parents:
                raise ValueError(f"{flag} {path} lies inside {Path(args.out) / folder}, which this command "
                                 "replaces; move it out of the model repository first")


def run(args: argparse.Namespace) -> int:
    from ..weights import build_model
    from .deploy import deploy

    check_inputs(args)
    names = None
    if args.class_names is not None:
        from .._io import read_regular_file

        text = read_regular_file(args.class_names, max_bytes=2**20, what="--class-names file")
        names = [line.strip() for line in text.splitlines() if line.strip()]
        if args.num_classes is not None and len(names) != args.num_classes:
            raise ValueError(f"--class-names {args.class_names} has {len(names)} names but the model has "
                             f"{args.num_classes} classes (--num-classes); give one name per class")
    model = build_model(args.model, args.weights, num_classes=args.num_classes,
                      output_stride=args.output_stride)
    report = deploy(model, args.out, name=args.name, input_size=tuple(args.input_size),
                    output_stride=args.output_stride, uint8_input=not args.float_input,
                    labels_dtype=args.labels_dtype, logits=args.logits, class_names=names,
                    max_batch_size=args.max_batch_size, preferred_batch_sizes=args.preferred_batch_sizes,
                    max_queue_delay_us=args.max_queue_delay_us, instances=args.instances, device=args.device,
                    backends=args.backends, max_image_pixels=args.max_image_pixels,
                    tensorrt=args.tensorrt, precision=args.precision, calibration_images=args.calibration_images,
                    overwrite=args.overwrite, check=not args.no_check)
    print(report)
    return 0
