"""``fastdeeplab bench``: run the benchmark suite (``pytest bench/``) with the same options.

The suite itself lives in the source checkout's ``bench/`` directory (it is not part of the installed
package). The option table :data:`OPTIONS` is the one place where the suite's options are declared: the
suite's ``bench/conftest.py`` registers them with pytest and this module registers them with argparse, so
``fastdeeplab bench --quick`` and ``pytest bench/ --quick`` mean the same thing.

>>> from fastdeeplab.cli import main
>>> main(["bench", "--quick"])          # doctest: +SKIP
0
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from .cli import float_in, input_dir, int_at_least, output_dir

__all__ = ["OPTIONS", "BACKBONES", "IMPLEMENTATIONS", "find_bench_dir", "pytest_arguments", "configure_parser", "run"]

# Every implementation the suite knows, in table order. ``torchvision`` is the reference; the
# ``*_torchvision`` rows are the peers (what a user would run without fastdeeplab); ``*_bf16`` and ``*_int8``
# are the CPU precision rows, scored against float32.
IMPLEMENTATIONS = ("torchvision", "fastdeeplab", "optimize_torch", "optimize_onnxruntime", "optimize_openvino",
                   "openvino", "onnxruntime_torchvision", "openvino_torchvision", "optimize_bf16",
                   "openvino_torchvision_bf16", "onnxruntime_int8", "triton", "tensorrt", "torch_compile")
# The --backbone names: the keys of fastdeeplab.weights.BACKBONES (not imported here, so that --help stays
# fast without torch; tests/test_bench_cli.py checks that the two agree).
BACKBONES = ("resnet50", "resnet101", "mobilenet_v3_large")

def _names(allowed: tuple[str, ...], what: str) -> Any:
    """An argparse type: a comma list of ``allowed`` names, returned unchanged (pytest parses it again)."""
    def parse(text: str) -> str:
        bad = [n for n in text.split(",") if n.strip() not in allowed]
        if bad or not text.strip():
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad) or repr(text)}; expected a comma "
                                             f"list of: {', '.join(allowed)}")
        return text
    parse.__name__ = what
    return parse


# (flag, keyword arguments accepted by both argparse's add_argument and pytest's parser.addoption)
OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--resolution", dict(type=int_at_least(33), default=None, metavar="PX",
                          help="square input side in pixels (default 513; 129 with --quick)")),
    ("--batch", dict(type=int_at_least(1), default=1, metavar="N", help="images per forward (default 1)")),
    ("--backbone", dict(choices=BACKBONES, default="resnet50",
                        help="DeepLabv3 backbone: torchvision's deeplabv3_<backbone> and fastdeeplab's "
                             "(default resnet50)")),
    ("--device", dict(choices=("cpu", "cuda"), default=None,
                      help="where to run (default cuda if available, else cpu)")),
    ("--dtype", dict(choices=("float32", "float16", "bfloat16"), default="float32",
                     help="compute dtype of every implementation; the accuracy reference stays float32")),
    ("--impl", dict(action="append", type=_names(IMPLEMENTATIONS, "implementation"), default=None, metavar="NAME[,NAME]",
                    help=f"implementations to run (repeatable or comma list) of: {', '.join(IMPLEMENTATIONS)}; "
                         "default: all (torch_compile only on CUDA; --quick leaves out optimize_onnxruntime "
                         "and openvino)")),
    ("--output-strides", dict(type=_names(("8", "16"), "output stride"), default="16,8", metavar="OS[,OS]", help="output strides to run (default 16,8)")),
    ("--weights", dict(default=None, metavar="NAME|PATH",
                       help="weights every implementation shares: 'random' (seeded; accuracy across output "
                            "strides n/a), 'synthetic' (trained on synthetic scenes, or loaded from "
                            "~/.cache/fastdeeplab; mIoU on held-out scenes), a torchvision weights name "
                            "(COCO_WITH_VOC_LABELS_V1, DEFAULT, ...; from the torch hub cache), or a checkpoint "
                            "path; default: torchvision's COCO-VOC weights if cached, else random")),
    ("--download-weights", dict(action="store_true", default=False,
                                help="allow downloading torchvision weights named by --weights (else cache only)")),
    ("--data", dict(type=input_dir, default=None, metavar="DIR",
                    help="PASCAL VOC root (ImageSets/Segmentation/val.txt, JPEGImages, SegmentationClass): "
                         "adds real val mIoU per row (fastdeeplab.evaluate, single scale) when the weights are real")),
    ("--max-images", dict(type=int_at_least(1), default=100, metavar="N",
                          help="cap on --data val images per row (default 100)")),
    ("--images", dict(type=input_dir, default=None, metavar="DIR",
                      help="folder of photographs for the accuracy columns (default: scikit-image's)")),
    ("--accuracy-images", dict(type=int_at_least(1), default=None, metavar="N",
                               help="photographs compared against the reference per row (default 3; 2 with --quick)")),
    ("--quick", dict(action="store_true", default=False,
                     help="CI smoke test: resolution 129, short time budget, few rounds")),
    ("--rounds", dict(type=int_at_least(1), default=None, metavar="N",
                      help="interleaved timing rounds per output stride, one call of every implementation each "
                           "(default: as many as fit --time-budget, 5 to 50; 5 to 15 with --quick)")),
    ("--warmup", dict(type=int_at_least(0), default=1, metavar="N",
                      help="untimed calls before timing; the first one also measures peak memory (default 1)")),
    ("--time-budget", dict(type=float_in(0.0), default=None, metavar="S",
                           help="seconds of interleaved timed rounds per output stride when --rounds is not "
                                "given (default 60; 8 with --quick)")),
    ("--threads", dict(type=int_at_least(1), default=None, metavar="N",
                       help="CPU threads for PyTorch, ONNX Runtime and OpenVINO (default: each library's own, "
                            "all cores); 1 resists a busy shared machine far better")),
    ("--seed", dict(type=int, default=0, help="seed of the random weights (default 0)")),
    ("--results-dir", dict(type=output_dir, default=None, metavar="DIR",
                           help="where latest.json, latest.png and timestamped copies go (default bench/results)")),
)


def find_bench_dir() -> Path:
    """The source checkout's ``bench/`` directory, next to the package (editable install) or under the
    current directory. Raises ``FileNotFoundError`` when fastdeeplab was installed from a wheel."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "bench", Path.cwd() / "bench"):
        if (candidate / "conftest.py").is_file() and (candidate / "test_latency_accuracy.py").is_file():
            return candidate
    raise FileNotFoundError(
        "the benchmark suite (bench/) ships with the source checkout, not with the installed package: "
        "clone the repository, `pip install -e '.[bench]'`, and run `fastdeeplab bench` (or `pytest bench/`) "
        "from the checkout")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the suite's options (see :data:`OPTIONS`) and a passthrough for extra pytest arguments."""
    for flag, kwargs in OPTIONS:
        parser.add_argument(flag, **kwargs)
    parser.add_argument("pytest_args", nargs="*", metavar="-- PYTEST_ARGS",
                        help="extra arguments for pytest after `--`, e.g. `-- -k onnxruntime -x`")


def pytest_arguments(args: argparse.Namespace) -> list[str]:
    """Translate parsed ``fastdeeplab bench`` options into the equivalent ``pytest bench/`` options."""
    out: list[str] = []
    for flag, kwargs in OPTIONS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), kwargs.get("default"))
        if kwargs.get("action") == "store_true":
            if value:
                out.append(flag)
        elif kwargs.get("action") == "append":
            for item in value or ():
                out += [flag, str(item)]
        elif value is not None and value != kwargs.get("default"):
            out += [flag, str(value)]
    return out


def run(args: argparse.Namespace) -> int:
    """Run ``python -m pytest <checkout>/bench <translated options> <extra pytest args>`` in a fresh process
    (so that the suite sets up threading before torch loads); returns pytest's exit code."""
    import importlib.util

    for module, name in (("pytest", "pytest"), ("pytest_benchmark", "pytest-benchmark")):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"the benchmark suite needs {name}: pip install 'fastdeeplab[bench]'")
    bench = find_bench_dir()
    extra = list(args.pytest_args or [])
    # pytest-benchmark's own tables (seconds, ~210 columns) would push the project's table off screen; its
    # JSON stays available (`-- --benchmark-json out.json`), and `-- --benchmark-verbose` brings them back.
    quiet = [] if any(a.startswith("--benchmark-verbose") for a in extra) else ["--benchmark-quiet"]
    argv = [str(bench), "--rootdir", str(bench.parent), *quiet, *pytest_arguments(args), *extra]
    print(f"fastdeeplab bench: pytest {' '.join(argv)}", file=sys.stderr, flush=True)
    return subprocess.run([sys.executable, "-m", "pytest", *argv], cwd=bench.parent).returncode
