"""Int8 QDQ graphs on ONNX Runtime's fused integer kernels against the same graphs run op by op, per seed.

On x86 CPUs without VNNI the fused u8s8 kernels add pairs of products in a saturating int16
(:mod:`fastdeeplab.export.quantize`); this prints, for a small random DeepLab-like model (the one
``tests/test_quantize.py`` uses) and the photographs scikit-image ships at 48x64, the pixel agreement with the
fp32 graph of: the CPU flavour with 8-bit weights fused / op by op, with 7-bit weights fused, and the TensorRT
flavour (8-bit) fused / op by op, plus the TensorRT flavour's max relative error against PyTorch op by op.

    python scripts/int8_saturation.py --seeds 10
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 (default 10)")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from torch import nn

    from fastdeeplab.export.onnx import export_onnx
    from fastdeeplab.export.quantize import calibration_tensor, cpu_saturates_u8s8, quantize_onnx
    from fastdeeplab.metrics import max_rel_error
    from fastdeeplab.model import ASPP
    from fastdeeplab.runtime.onnxruntime import ort_session

    class SmallSeg(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16),
                                      nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
                                      nn.BatchNorm2d(32), nn.ReLU())
            self.head = nn.Sequential(ASPP(32, (1, 2, 3), out_channels=16), nn.Conv2d(16, 4, 1))

        def forward(self, x):
            return {"out": F.interpolate(self.head(self.stem(x)), size=x.shape[-2:], mode="bilinear",
                                         align_corners=False)}

    size = (48, 64)
    photos = calibration_tensor(None, size)
    x = {"input": photos.numpy()}
    print(f"x86 without VNNI (saturating u8s8 kernels): {cpu_saturates_u8s8()}; {photos.shape[0]} photographs, "
          f"{size[0]}x{size[1]}\n")
    print("| seed | largest class share | CPU 8-bit fused | CPU 8-bit op by op | CPU 7-bit fused "
          "| TensorRT fused | TensorRT op by op | TensorRT error op by op |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = SmallSeg().eval()
            with torch.no_grad():
                model.head[1].bias.zero_()
                expected = model(photos)["out"]
            fp32 = work / f"{seed}.onnx"
            export_onnx(model, fp32, input_size=size)
            labels = ort_session(fp32, threads=1).run(["out"], x)[0].argmax(1)
            share = max((labels == c).mean() for c in range(4))

            def run(path, level):
                return ort_session(path, threads=1, optimization_level=level).run(["out"], x)[0]

            c8 = quantize_onnx(fp32, work / f"{seed}c8.onnx", photos, input_size=size, reduce_range=False)
            c7 = quantize_onnx(fp32, work / f"{seed}c7.onnx", photos, input_size=size, reduce_range=True)
            t8 = quantize_onnx(fp32, work / f"{seed}t8.onnx", photos, input_size=size, tensorrt_compatible=True)
            outs = [run(c8, "all"), run(c8, "disable"), run(c7, "all"), run(t8, "all"), run(t8, "disable")]
            cells = [f"{(o.argmax(1) == labels).mean():.4f}" for o in outs]
            print(f"| {seed} | {share:.2f} | " + " | ".join(cells) + f" | {max_rel_error(outs[-1], expected):.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
