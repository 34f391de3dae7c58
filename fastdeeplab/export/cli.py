"""``fastdeeplab export``: a checked ONNX graph (fp32, fp16 or int8 QDQ) or a TensorRT engine.

Examples::

    fastdeeplab export --model deeplabv3_resnet50 --output-stride 16 --out deeplabv3_os16.onnx
    fastdeeplab export --model deeplabv3_resnet101 --weights ckpt.pth --num-classes 19 --output-stride 8 \\
        --format tensorrt --precision int8 --calibration-images calib/ --out deeplabv3_os8.engine
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from ..hub import list_models

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("Examples::", 1)[1]
    parser.add_argument("--model", default="deeplabv3_resnet50", choices=list_models(), help="model name")
    parser.add_argument("--weights", default=None,
                        help="checkpoint path or torchvision weights name (default: random initialisation)")
    parser.add_argument("--num-classes", type=int, default=21, help="number of classes (default: 21)")
    parser.add_argument("--aux", action="store_true", help="export the auxiliary head's output 'aux' too")
    parser.add_argument("--output-stride", type=int, default=16, choices=(8, 16, 32), help="default: 16")
    parser.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx", help="default: onnx")
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8"), default=None,
                        help="default: fp32 for onnx, fp16 for tensorrt. onnx int8 is a QDQ graph for ONNX "
                             "Runtime's CPU kernels")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=(513, 513),
                        help="size traced and checked (default: 513 513); TensorRT's opt shape")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 13 (default: 17)")
    parser.add_argument("--argmax", action="store_true", help="add an int32 'labels' output (in-graph ArgMax)")
    parser.add_argument("--static", action="store_true", help="fixed [1, 3, H, W] input instead of dynamic")
    parser.add_argument("--no-check", action="store_true", help="skip the post-export checks (not recommended)")
    parser.add_argument("--out", required=True, type=Path, help="output file (.onnx, or .engine for tensorrt)")
    parser.add_argument("--onnx-out", type=Path, default=None,
                        help="tensorrt and int8: where the intermediate fp32 ONNX goes (default: next to --out)")
    parser.add_argument("--calibration-images", type=Path, default=None,
                        help="int8: folder of representative images (default for onnx: scikit-image's photos)")
    parser.add_argument("--calibration-cache", type=Path, default=None, help="tensorrt int8: calibration table")
    parser.add_argument("--timing-cache", type=Path, default=None, help="tensorrt: timing cache file")
    parser.add_argument("--workspace-gb", type=float, default=4.0, help="tensorrt: workspace limit (GiB)")
    parser.add_argument("--min-shape", default=None, help="tensorrt profile, e.g. 1x3x257x257")
    parser.add_argument("--opt-shape", default=None, help="tensorrt profile (default: 1x3xHxW of --input-size)")
    parser.add_argument("--max-shape", default=None, help="tensorrt profile, e.g. 4x3x1025x1025")


def _sibling(out: Path, suffix: str) -> Path:
    return out.with_name(out.name.removesuffix(out.suffix) + suffix)


def run(args: argparse.Namespace) -> int:
    from ..hub import get_model
    from .onnx import export_onnx

    precision = args.precision or ("fp16" if args.format == "tensorrt" else "fp32")
    if args.format == "tensorrt":
        from .tensorrt import _require_tensorrt

        _require_tensorrt()  # fail before a long export
    model = get_model(args.model, weights=args.weights, num_classes=args.num_classes, aux_loss=args.aux,
                      output_stride=args.output_stride)
    outputs = ("out", "aux") if args.aux else ("out",)
    h, w = args.input_size
    common = dict(input_size=(h, w), output_stride=args.output_stride, dynamic=not args.static, opset=args.opset,
                  outputs=outputs, argmax=args.argmax, check=not args.no_check)

    if args.format == "onnx" and precision != "int8":
        print(export_onnx(model, args.out, half=precision == "fp16", **common))
        return 0

    onnx_path = args.onnx_out or _sibling(args.out, ".fp32.onnx" if args.format == "onnx" else ".onnx")
    if onnx_path.resolve() == args.out.resolve():
        raise ValueError(f"the intermediate ONNX file would overwrite --out {args.out}; pass --onnx-out")
    print(export_onnx(model, onnx_path, **common))

    if args.format == "onnx":  # int8 QDQ for ONNX Runtime
        from .quantize import compare_quantized, quantize_onnx

        quantize_onnx(onnx_path, args.out, args.calibration_images, input_size=(h, w))
        print(f"int8 QDQ graph: {args.out}")
        print(compare_quantized(onnx_path, args.out, args.calibration_images, size=(h, w), runs=3))
        return 0

    from .tensorrt import DEFAULT_MAX_SHAPE, DEFAULT_MIN_SHAPE, build_tensorrt_engine

    opt = args.opt_shape or (1, 3, h, w)
    lo = args.min_shape or (1, 3, min(DEFAULT_MIN_SHAPE[2], h), min(DEFAULT_MIN_SHAPE[3], w))
    hi = args.max_shape or (DEFAULT_MAX_SHAPE[0], 3, max(DEFAULT_MAX_SHAPE[2], h), max(DEFAULT_MAX_SHAPE[3], w))
    if args.static:
        lo = opt = hi = (1, 3, h, w)
    engine = build_tensorrt_engine(onnx_path, args.out, precision=precision, min_shape=lo, opt_shape=opt,
                                   max_shape=hi, workspace_gb=args.workspace_gb,
                                   calibration_images=args.calibration_images,
                                   calibration_cache=args.calibration_cache, timing_cache=args.timing_cache)
    print(f"TensorRT {precision} engine: {engine} ({engine.stat().st_size / 2**20:.1f} MiB), from {onnx_path}")
    return 0
