"""DeepLabV3-MobileNetV3-Large on the CPU: torchvision eager, fastdeeplab's optimize() backends and the peers
on torchvision's own export, same weights, same process, interleaved; a ResNet-50 optimize() row for scale.

    python scripts/mobilenet_speed.py [--resolution 513] [--rounds 9] [--output-strides 16 8]
                                      [--impls tv_eager fdl_torch fdl_onnxruntime fdl_openvino
                                               tv_onnxruntime tv_openvino r50_torch]

Every implementation runs once per round, the order rotated every round (``fastdeeplab.timing.interleaved``),
so a load spike from another process hits all of them alike. The table gives the median latency, its IQR,
the speed-up over torchvision eager at the same output stride (median of per-round ratios), the largest
logit error relative to the output's scale and the share of pixels whose class agrees with torchvision eager.
torchvision's model runs at OS16 as shipped; at OS8 its depthwise convs get the same strides and dilations
as fastdeeplab's (``MobileNetV3Backbone.apply_plan``), ASPP rates (12, 24, 36) in both. Weights: random,
BN statistics and affine parameters randomised (seed 0): latency does not depend on them.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads must not spin

import argparse  # noqa: E402
import copy  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large as tv_builder  # noqa: E402

import fastdeeplab  # noqa: E402
from fastdeeplab.images import sample_images  # noqa: E402
from fastdeeplab.metrics import max_rel_error, pixel_agreement  # noqa: E402
from fastdeeplab.mobilenet import MobileNetV3Backbone  # noqa: E402
from fastdeeplab.timing import interleaved, load_average  # noqa: E402
from fastdeeplab.weights import randomize_bn  # noqa: E402

IMPLS = ("tv_eager", "fdl_torch", "fdl_onnxruntime", "fdl_openvino", "tv_onnxruntime", "tv_openvino", "r50_torch")


class _Out(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def _export_torchvision(model: nn.Module, path: Path, resolution: int) -> Path:
    """What a user without fastdeeplab does: torch.onnx.export of torchvision's model, dynamic axes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Out(copy.deepcopy(model)).eval(), (torch.zeros(1, 3, resolution, resolution),), str(path),
                          dynamo=False, input_names=["input"], output_names=["out"], opset_version=17,
                          dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"},
                                        "out": {0: "batch", 2: "height", 3: "width"}})
    return path


def _builders(tv: nn.Module, ours: nn.Module, r50: nn.Module, workdir: Path, os_: int,
              resolution: int) -> dict[str, Callable[[], Callable[[torch.Tensor], torch.Tensor]]]:
    def fdl(backend: str) -> Callable:
        fast = fastdeeplab.optimize(ours, backend=backend)
        return lambda x: fast(x)["out"]

    def tv_ort() -> Callable:
        from fastdeeplab.runtime.onnxruntime import ort_session

        session = ort_session(_export_torchvision(tv, workdir / f"tv-os{os_}.onnx", resolution))
        return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])

    def tv_ov() -> Callable:
        import openvino as ov

        path = workdir / f"tv-os{os_}.onnx"
        if not path.exists():
            _export_torchvision(tv, path, resolution)
        graph = ov.Core().read_model(str(path))
        graph.reshape([1, 3, resolution, resolution])
        request = ov.Core().compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                         "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()

        def run(x: torch.Tensor) -> torch.Tensor:
            request.infer({0: x.numpy()})
            return torch.from_numpy(request.get_output_tensor(0).data.copy())
        return run

    def r50_torch() -> Callable:
        fast = fastdeeplab.optimize(r50, backend="torch")
        return lambda x: fast(x)["out"]

    def tv_eager() -> Callable:
        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return tv(x)["out"]
        return run

    return {"tv_eager": tv_eager, "fdl_torch": lambda: fdl("torch"), "fdl_onnxruntime": lambda: fdl("onnxruntime"),
            "fdl_openvino": lambda: fdl("openvino"), "tv_onnxruntime": tv_ort, "tv_openvino": tv_ov,
            "r50_torch": r50_torch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=513)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--output-strides", type=int, nargs="+", default=[16, 8], choices=(8, 16, 32))
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    args = parser.parse_args()
    torch.manual_seed(0)
    _, photos = sample_images(args.resolution, count=1)
    base = randomize_bn(tv_builder(weights=None, weights_backbone=None, num_classes=21, aux_loss=False)).eval()
    workdir = Path(tempfile.mkdtemp(prefix="mobilenet-speed-"))
    print(f"# {platform.processor() or platform.machine()}, {load_average()}, torch {torch.__version__}, "
          f"input 1x3x{args.resolution}x{args.resolution}, rounds {args.rounds}")
    print("| OS | implementation | median ms | IQR ms | speed-up vs torchvision eager (IQR) | max rel err | "
          "pixel agreement | build s |")
    print("|---|---|---|---|---|---|---|---|")
    for os_ in args.output_strides:
        tv = copy.deepcopy(base)
        ours = fastdeeplab.from_torchvision(tv).set_output_stride(os_).eval()
        plan = ours.plan
        MobileNetV3Backbone.apply_plan(tv.backbone, plan)  # torchvision's modules, fastdeeplab's geometry
        r50 = randomize_bn(fastdeeplab.deeplabv3_resnet50(output_stride=os_)).eval()
        fns, build_s = {}, {}
        for name, make in _builders(tv, ours, r50, workdir, os_, args.resolution).items():
            if name in args.impls:
                start = time.perf_counter()
                fns[name] = make()
                build_s[name] = time.perf_counter() - start
                print(f"  built {name} at OS{os_} in {build_s[name]:.0f} s, load {os.getloadavg()[0]:.1f}",
                      flush=True)
        with torch.inference_mode():
            ref = tv(photos)["out"]
        outputs = {name: fn(photos).float() for name, fn in fns.items()}
        load_before = os.getloadavg()[0]
        timings = interleaved({name: (lambda fn=fn: fn(photos)) for name, fn in fns.items()},
                              rounds=args.rounds, warmup=1)
        load_after = os.getloadavg()[0]
        for name in fns:
            s = timings.spread(name)
            ratio = timings.ratio("tv_eager", name) if "tv_eager" in fns else None
            same_model = name != "r50_torch"
            err = f"{max_rel_error(outputs[name], ref):.1e}" if same_model else "n/a"
            agree = f"{pixel_agreement(outputs[name].argmax(1), ref.argmax(1)):.4f}" if same_model else "n/a"
            sp = f"{ratio.median:.2f}x ({ratio.q1:.2f}-{ratio.q3:.2f})" if ratio else "n/a"
            print(f"| {os_} | {name} | {s.median * 1e3:.1f} | {(s.q3 - s.q1) * 1e3:.1f} | {sp} | {err} | {agree} | "
                  f"{build_s[name]:.0f} |")
        print(f"  (load average {load_before:.1f} before timing, {load_after:.1f} after, "
              f"{load_average()['cores']} cores)", flush=True)


if __name__ == "__main__":
    main()
