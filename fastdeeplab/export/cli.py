"""``fastdeeplab export``: a checked ONNX graph (fp32, fp16 or int8 QDQ) or a TensorRT engine.

Examples::

    fastdeeplab export --model deeplabv3_resnet50 --output-stride 16 --out deeplabv3_os16.onnx
    fastdeeplab export --precision fp16 --keep-fp32 classifier.4 --out deeplabv3_fp16.onnx   # fp16, fp32 I/O
    fastdeeplab export --model deeplabv3_resnet101 --weights ckpt.pth --num-classes 19 --output-stride 8 \\
        --format tensorrt --precision int8 --calibration-images calib/ --out deeplabv3_os8.engine \\
        --profile 1x3x513x513 --profile 1x3x1024x2048
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["configure_parser", "run"]


DEFAULT_WORKSPACE_GB = 4.0
# Flags that only a TensorRT build reads: refused by name with --format onnx instead of silently ignored.
TENSORRT_ONLY = {"timing_cache": "--timing-cache", "workspace_gb": "--workspace-gb", "profile": "--profile",
                 "min_shape": "--min-shape", "opt_shape": "--opt-shape", "max_shape": "--max-shape",
                 "calibration_cache": "--calibration-cache"}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from ..cli import MODEL_NAMES, add_weights_argument, float_in

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("Examples::", 1)[1]
    parser.add_argument("--model", default="deeplabv3_resnet50", choices=MODEL_NAMES, help="model name")
    add_weights_argument(parser)
    parser.add_argument("--num-classes", type=int, default=None,
                        help="number of classes (default: the weights', else 21)")
    parser.add_argument("--aux", action="store_true", help="export the auxiliary head's output 'aux' too")
    parser.add_argument("--output-stride", type=int, default=16, choices=(8, 16, 32), help="default: 16")
    parser.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx", help="default: onnx")
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8"), default=None,
                        help="default: fp32 for onnx, fp16 for tensorrt. Precision lives in the graph: fp16 is an "
                             "fp16 graph with fp32 I/O, int8 a Q/DQ graph (see --int8-flavour)")
    parser.add_argument("--keep-fp32", nargs="*", default=[], metavar="LAYER",
                        help="fp16: layers kept in fp32, by module path (e.g. classifier.4) or ONNX node name")
    parser.add_argument("--int8-flavour", choices=("cpu", "tensorrt"), default=None,
                        help="onnx int8: 'cpu' (uint8 activations, ONNX Runtime's fast kernels; default) or "
                             "'tensorrt' (symmetric, zero points 0); tensorrt builds always use 'tensorrt'")
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
    parser.add_argument("--calibration-cache", type=Path, default=None,
                        help="tensorrt int8: the calibrated Q/DQ graph, reused when it exists")
    parser.add_argument("--timing-cache", type=Path, default=None, help="tensorrt: timing cache file")
    parser.add_argument("--workspace-gb", type=float_in(0.0), default=None,
                        help=f"tensorrt: workspace limit in GiB, > 0 (default: {DEFAULT_WORKSPACE_GB:g})")
    parser.add_argument("--profile", action="append", default=None, metavar="NxCxHxW",
                        help="tensorrt: one optimization profile per flag, its opt and max shape (min: batch 1 at "
                             "half the size), e.g. --profile 1x3x513x513 --profile 1x3x1024x2048")
    parser.add_argument("--min-shape", default=None, help="tensorrt profile, e.g. 1x3x257x257")
    parser.add_argument("--opt-shape", default=None, help="tensorrt profile (default: 1x3xHxW of --input-size)")
    parser.add_argument("--max-shape", default=None, help="tensorrt profile, e.g. 4x3x1025x1025")


def _intermediate(args: argparse.Namespace) -> Path:
    """The fp32 ONNX file a TensorRT or int8 export goes through, checked: never ``--out`` or an input, and by
    default (beside ``--out``) never a file that fastdeeplab did not write."""
    from .._io import check_not_input, check_output_path

    onnx_path = args.onnx_out or _sibling(args.out, ".fp32.onnx" if args.format == "onnx" else ".onnx")
    if onnx_path.resolve() == args.out.resolve():
        raise ValueError(f"the intermediate ONNX file would overwrite --out {args.out}; pass --onnx-out")
    check_output_path(onnx_path, what="intermediate ONNX")
    check_not_input(onnx_path, _inputs(args), what="intermediate ONNX")
    if args.onnx_out is None and onnx_path.is_file() and not _written_by_fastdeeplab(onnx_path):
        raise FileExistsError(f"the intermediate ONNX file {onnx_path} exists and was not written by fastdeeplab; "
                              "refusing to replace it: pass --onnx-out")
    return onnx_path


def _written_by_fastdeeplab(path: Path) -> bool:
    """Whether the ONNX file ``path`` names fastdeeplab as its producer (field 2, serialised at the start)."""
    try:
        with open(path, "rb") as f:
            return b"fastdeeplab" in f.read(64)
    except OSError:
        return False


def _sibling(out: Path, suffix: str) -> Path:
    return out.with_name(out.name.removesuffix(out.suffix) + suffix)


def check_flags(args: argparse.Namespace) -> str:
    """Refuse, before any work and naming the flag, every flag that does not apply to ``--format`` and
    ``--precision`` (a TensorRT-only flag with ``--format onnx`` was silently ignored) and every output that
    would replace an input of the command; returns the precision."""
    from .._io import check_not_input, check_output_path

    precision = args.precision or ("fp16" if args.format == "tensorrt" else "fp32")
    if args.format != "tensorrt":
        given = [flag for key, flag in TENSORRT_ONLY.items() if getattr(args, key, None) not in (None, [])]
        if given:
            one = len(given) == 1
            raise ValueError(f"{', '.join(given)} {'applies' if one else 'apply'} to --format tensorrt only; "
                             f"drop {'it' if one else 'them'} or add --format tensorrt")
    if precision != "int8" and args.calibration_images is not None:
        raise ValueError("--calibration-images applies to --precision int8 only")
    if args.onnx_out is not None and args.format == "onnx" and precision != "int8":
        raise ValueError("--onnx-out applies to --format tensorrt or --precision int8 (the intermediate fp32 graph)")
    if args.keep_fp32 and precision != "fp16":
        raise ValueError("--keep-fp32 applies to --precision fp16")
    if args.int8_flavour is not None and (precision != "int8" or args.format != "onnx"):
        raise ValueError("--int8-flavour applies to --format onnx --precision int8")
    if args.profile and any(v is not None for v in (args.min_shape, args.opt_shape, args.max_shape)):
        raise ValueError("pass --profile or --min-shape/--opt-shape/--max-shape, not both")
    check_output_path(args.out, what="--out")  # flags first, then paths: bad paths fail before any work
    check_not_input(args.out, _inputs(args), what="--out")
    if args.onnx_out is not None:
        check_output_path(args.onnx_out, what="--onnx-out")
        check_not_input(args.onnx_out, {**_inputs(args), "--out": args.out}, what="--onnx-out")
    if args.format == "tensorrt" or precision == "int8":
        _intermediate(args)
    for flag, cache in (("--timing-cache", args.timing_cache), ("--calibration-cache", args.calibration_cache)):
        if cache is not None:  # read when it exists, and written by the build
            check_output_path(cache, what=flag)
            check_not_input(cache, {"--weights": _inputs(args)["--weights"], "--out": args.out}, what=flag)
    return precision


def _inputs(args: argparse.Namespace) -> dict[str, Path | None]:
    """The files the command reads (``--weights`` when it names a file, not a torchvision name)."""
    weights = Path(args.weights) if args.weights is not None and Path(args.weights).exists() else None
    return {"--weights": weights, "--calibration-cache": args.calibration_cache, "--timing-cache": args.timing_cache}


def run(args: argparse.Namespace) -> int:
    from ..weights import build_model
    from .onnx import export_onnx

    precision = check_flags(args)
    if precision == "int8" and args.calibration_images is not None and not args.calibration_images.is_dir():
        raise FileNotFoundError(f"calibration image folder not found: {args.calibration_images}")
    if args.format == "tensorrt":
        from ..runtime.tensorrt import require_tensorrt

        require_tensorrt()  # fail before a long export
        if precision == "int8" and args.calibration_images is None and not (
                args.calibration_cache is not None and args.calibration_cache.is_file()):
            raise ValueError("--precision int8 needs --calibration-images (or an existing --calibration-cache)")
    calibration = args.calibration_images
    if args.format == "onnx" and precision == "int8":  # read and check the images before the long fp32 export
        from .quantize import calibration_tensor

        calibration = calibration_tensor(args.calibration_images, tuple(args.input_size))
    model = build_model(args.model, args.weights, num_classes=args.num_classes, aux_loss=args.aux,
                      output_stride=args.output_stride)
    outputs = ("out", "aux") if args.aux else ("out",)
    h, w = args.input_size
    common = dict(input_size=(h, w), output_stride=args.output_stride, dynamic=not args.static, opset=args.opset,
                  outputs=outputs, argmax=args.argmax, check=not args.no_check)

    if args.format == "onnx" and precision != "int8":
        print(export_onnx(model, args.out, precision=precision, keep_fp32=args.keep_fp32, **common))
        return 0

    onnx_path = _intermediate(args)
    created = not onnx_path.exists()
    try:
        print(export_onnx(model, onnx_path, **common))
        if args.format == "onnx":  # int8 QDQ
            from .quantize import compare_quantized, quantize_onnx

            trt = args.int8_flavour == "tensorrt"
            quantize_onnx(onnx_path, args.out, calibration, input_size=(h, w), tensorrt_compatible=trt)
            print(f"int8 QDQ graph ({'TensorRT' if trt else 'CPU'} flavour): {args.out}")
            print(compare_quantized(onnx_path, args.out, calibration, size=(h, w), runs=3))
            return 0
        return _build_engine(args, precision, onnx_path, h, w)
    except BaseException:
        if created and args.onnx_out is None:  # an intermediate this run made: nothing left behind
            onnx_path.unlink(missing_ok=True)
        raise


def _build_engine(args: argparse.Namespace, precision: str, onnx_path: Path, h: int, w: int) -> int:
    import json

    from .engine_report import report_paths
    from .tensorrt import DEFAULT_MAX_SHAPE, DEFAULT_MIN_SHAPE, build_tensorrt_engine

    if args.profile:
        shapes = {"profiles": list(args.profile)}
    elif args.static:
        shapes = {"profiles": [((1, 3, h, w),) * 3]}
    else:
        shapes = {"min_shape": args.min_shape or (1, 3, min(DEFAULT_MIN_SHAPE[2], h), min(DEFAULT_MIN_SHAPE[3], w)),
                  "opt_shape": args.opt_shape or (1, 3, h, w),
                  "max_shape": args.max_shape or (DEFAULT_MAX_SHAPE[0], 3, max(DEFAULT_MAX_SHAPE[2], h),
                                                  max(DEFAULT_MAX_SHAPE[3], w))}
    engine = build_tensorrt_engine(onnx_path, args.out, precision=precision, keep_fp32=args.keep_fp32,
                                   workspace_gb=args.workspace_gb or DEFAULT_WORKSPACE_GB,
                                   calibration_images=args.calibration_images,
                                   calibration_cache=args.calibration_cache, timing_cache=args.timing_cache,
                                   check=not args.no_check, **shapes)
    print(f"TensorRT {precision} engine: {engine} ({engine.stat().st_size / 2**20:.1f} MiB), from {onnx_path}")
    build = report_paths(engine)["build"]
    if build.is_file():
        print(json.dumps(json.loads(build.read_text()), indent=1))
    return 0
