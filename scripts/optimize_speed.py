"""optimize() against torchvision's eager DeepLabV3 on this machine: same weights, same process, interleaved.

    python scripts/optimize_speed.py [--resolution 513] [--rounds 9] [--backends auto torch onnxruntime openvino]
                                     [--dtypes float32 bfloat16]

Every implementation runs once per round, the order rotated every round (``fastdeeplab.timing.interleaved``),
so a load spike from another tenant hits all of them alike; the table gives medians and each one's speed-up
over torchvision eager at output stride 8 as the median of per-round ratios with their IQR, plus the largest
logit error relative to the output's scale, and the share of pixels whose argmax agrees, against the eager
reference at the same output stride.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads must not spin

import argparse  # noqa: E402
import platform  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402
from torchvision.models.segmentation import deeplabv3_resnet50  # noqa: E402

import fastdeeplab  # noqa: E402
from fastdeeplab.images import sample_images  # noqa: E402
from fastdeeplab.metrics import max_rel_error, pixel_agreement  # noqa: E402
from fastdeeplab.timing import interleaved, load_average  # noqa: E402


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "not installed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=513)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--backends", nargs="+", default=["auto", "torch", "onnxruntime", "openvino"])
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                        help="compute dtypes to time (bfloat16 rows run only on backends that accept it)")
    args = parser.parse_args()

    torch.manual_seed(0)
    reference8 = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21).eval()
    model = fastdeeplab.from_torchvision(reference8)  # same weights
    x = sample_images(args.resolution, count=1)[1]

    runs: dict[str, Callable[[], torch.Tensor]] = {"torchvision eager OS8": lambda: reference8(x)["out"]}
    expected: dict[str, torch.Tensor] = {}
    for os_ in (16, 8):
        eager = fastdeeplab.from_torchvision(reference8).set_output_stride(os_)
        with torch.inference_mode():
            expected[f"OS{os_}"] = eager(x)["out"]
        if os_ == 16:
            runs["fastdeeplab eager OS16"] = lambda m=eager: m(x)["out"]
        for backend in args.backends:
            for dtype_name in args.dtypes:
                dtype = getattr(torch, dtype_name)
                try:
                    fast = fastdeeplab.optimize(model.set_output_stride(os_), backend=backend, dtype=dtype)
                except ValueError as exc:  # a dtype this backend does not run
                    print(f"skipped optimize({backend!r}, {dtype_name}): {exc}")
                    continue
                label = f"optimize({backend!r}{'' if dtype_name == 'float32' else ', ' + dtype_name}) OS{os_}"
                if backend == "auto":
                    label += f" [{type(fast).__name__}]"
                runs[label] = lambda m=fast: m(x)["out"]

    errors: dict[str, float] = {}
    agreement: dict[str, float] = {}
    load_before = load_average()["load1"]
    with torch.inference_mode():
        for name, fn in runs.items():  # warm-up; ONNX Runtime sessions are built here
            out = fn()
            ref = expected["OS8" if "OS8" in name else "OS16"]
            errors[name] = max_rel_error(out, ref)
            agreement[name] = pixel_agreement(out.argmax(1), ref.argmax(1), ignore_index=None)
        # one call of each per round, order rotated: load from other processes hits all alike
        timings = interleaved(runs, rounds=args.rounds, warmup=0)
    load = load_average()

    base = "torchvision eager OS8"
    print(f"{platform.processor() or platform.machine()}, {load['cores']} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.resolution}x{args.resolution}, batch 1, "
          f"{args.rounds} interleaved rounds, load average {load_before:.2f} before, {load['load1']:.2f} after, "
          + ", ".join(f"{m} {_version(m)}" for m in ("onnxruntime", "openvino")))
    print("| implementation | median ms | IQR ms | speed-up vs torchvision OS8 (per-round median [q1-q3]) | "
          "max rel. error | pixels agreeing |")
    print("|---|---|---|---|---|---|")
    for name in runs:
        t, r = timings.spread(name), timings.ratio(base, name)
        print(f"| {name} | {1000 * t.median:.0f} | {1000 * t.iqr:.0f} | {r.median:.2f}x [{r.q1:.2f}-{r.q3:.2f}] | "
              f"{errors[name]:.1e} | {100 * agreement[name]:.2f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
