"""Accuracy of the reduced-precision graphs on the CPU against fp32 PyTorch: the fp16 graph (fp32 I/O, as
TensorRT builds it strongly typed), the fp16 graph with the classifier kept in fp32, and the int8 Q/DQ graph
(TensorRT flavour, and the CPU flavour for comparison).

For each graph and each held-out photograph: the max error of the logits relative to the largest PyTorch
logit (:func:`fastdeeplab.metrics.max_rel_error`, worst over the images) and the fraction of pixels whose class
equals PyTorch's (:func:`fastdeeplab.metrics.pixel_agreement`, over all images). The int8 graphs are
calibrated on the other photographs. Prints a Markdown table (the one in ``bench/RESULTS.md``).

    python scripts/precision_accuracy.py --size 257 257 --output-stride 16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import fastdeeplab
from fastdeeplab.export.quantize import calibration_tensor, quantize_onnx
from fastdeeplab.metrics import max_rel_error, pixel_agreement
from fastdeeplab.runtime.onnxruntime import ort_session


def seeded_model(depth: int, classes: int, stride: int, seed: int = 0) -> torch.nn.Module:
    """Random weights and non-trivial BN statistics (no pretrained weights can be downloaded here)."""
    torch.manual_seed(seed)
    build = fastdeeplab.deeplabv3_resnet50 if depth == 50 else fastdeeplab.deeplabv3_resnet101
    model = build(num_classes=classes, output_stride=stride)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, choices=(50, 101), default=50)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--output-stride", type=int, choices=(8, 16, 32), default=16)
    parser.add_argument("--size", type=int, nargs=2, default=(257, 257), metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    size = tuple(args.size)
    model = seeded_model(args.depth, args.classes, args.output_stride)
    photos = calibration_tensor(None, size)  # scikit-image's photographs, ImageNet-normalised
    calib, held_out = photos[: len(photos) // 2], photos[len(photos) // 2:]
    with torch.no_grad():
        reference = model(held_out)["out"]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        common = dict(input_size=size, output_stride=args.output_stride, check_sizes=[size], threads=args.threads)
        graphs = {}
        start = time.perf_counter()
        graphs["fp32"] = fastdeeplab.export_onnx(model, work / "fp32.onnx", **common).path
        graphs["fp16"] = fastdeeplab.export_onnx(model, work / "fp16.onnx", precision="fp16", **common).path
        graphs["fp16, classifier.4 in fp32"] = fastdeeplab.export_onnx(
            model, work / "fp16k.onnx", precision="fp16", keep_fp32=["classifier.4"], **common).path
        graphs["int8 Q/DQ, TensorRT flavour"] = quantize_onnx(graphs["fp32"], work / "int8trt.onnx", calib,
                                                              input_size=size, tensorrt_compatible=True)
        graphs["int8 Q/DQ, CPU flavour (uint8 activations)"] = quantize_onnx(graphs["fp32"], work / "int8.onnx",
                                                                             calib, input_size=size)
        print(f"exported and quantized in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        runtimes = {"ONNX Runtime": lambda p: (lambda x: ort_session(p, threads=args.threads).run(
            ["out"], {"input": x})[0])}
        try:
            from fastdeeplab.runtime.openvino import openvino_compiled_model

            def openvino(path: Path):
                request = openvino_compiled_model(path, threads=args.threads).create_infer_request()
                return lambda x: request.infer({0: x})["out"].copy()

            runtimes["OpenVINO"] = openvino
        except ImportError:
            pass
        for name, path in graphs.items():
            for runtime, make in runtimes.items():
                if runtime == "OpenVINO" and "int8" in name:
                    continue  # OpenVINO's int8 path is its own (NNCF); the Q/DQ graphs target TensorRT and ORT
                run = make(path)
                outs = torch.cat([torch.from_numpy(run(held_out[i:i + 1].numpy())) for i in range(len(held_out))])
                error = max(max_rel_error(outs[i], reference[i]) for i in range(len(held_out)))
                agree = pixel_agreement(outs.argmax(1), reference.argmax(1), ignore_index=None)
                rows.append((name, runtime, error, agree))
                print(f"{name:<45} {runtime:<13} max error {error:.2e} x max|logit|, "
                      f"{100 * agree:.3f}% of pixels agree", file=sys.stderr)
    print(f"\nResNet-{args.depth} DeepLabv3, {args.classes} classes, OS{args.output_stride}, "
          f"{size[0]}x{size[1]}, {len(held_out)} held-out photographs (int8 calibrated on {len(calib)} others)\n")
    print("| graph | runtime | max error / max\\|logit\\| | pixels agreeing with fp32 PyTorch |")
    print("|---|---|---|---|")
    for name, runtime, error, agree in rows:
        print(f"| {name} | {runtime} | {error:.2e} | {100 * agree:.3f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
