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

__all__ = ["OPTIONS", "IMPLEMENTATIONS", "find_bench_dir", "pytest_arguments", "configure_parser", "run"]

# Every implementation the suite knows, in table order. ``torchvision`` is the reference.
IMPLEMENTATIONS = ("torchvision", "fastdeeplab", "optimize_torch", "optimize_onnxruntime", "optimize_openvino",
                   "openvino", "triton", "tensorrt", "torch_compile")

# (flag, keyword arguments accepted by both argparse's add_argument and pytest's parser.addoption)
OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--resolution", dict(type=int, default=None, metavar="PX",
                          help="square input side in pixels (default 513; 129 with --quick)")),
    ("--batch", dict(type=int, default=1, metavar="N", help="images per forward (default 1)")),
    ("--backbone", dict(choices=("resnet50", "resnet101"), default="resnet50", help="ResNet depth")),
    ("--device", dict(choices=("cpu", "cuda"), default=None,
                      help="where to run (default cuda if available, else cpu)")),
    ("--dtype", dict(choices=("float32", "float16", "bfloat16"), default="float32",
                     help="compute dtype of every implementation; the accuracy reference stays float32")),
    ("--impl", dict(action="append", default=None, metavar="NAME[,NAME]",
                    help=f"implementations to run (repeatable or comma list) of: {', '.join(IMPLEMENTATIONS)}; "
                         "default: all (torch_compile only on CUDA)")),
    ("--output-strides", dict(default="16,8", metavar="OS[,OS]", help="output strides to run (default 16,8)")),
    ("--weights", dict(default=None, metavar="PATH|random",
                       help="checkpoint for every implementation (torchvision names); 'random' forces seeded "
                            "random weights; default: torchvision's COCO-VOC weights if in the local torch "
                            "hub cache (never downloaded), else random")),
    ("--data", dict(default=None, metavar="DIR",
                    help="PASCAL VOC root (ImageSets/Segmentation/val.txt, JPEGImages, SegmentationClass): "
                         "adds real val mIoU per row (fastdeeplab.evaluate, single scale) when the weights are real")),
    ("--max-images", dict(type=int, default=100, metavar="N",
                          help="cap on --data val images per row (default 100)")),
    ("--images", dict(default=None, metavar="DIR",
                      help="folder of photographs for the accuracy columns (default: scikit-image's)")),
    ("--accuracy-images", dict(type=int, default=None, metavar="N",
                               help="photographs compared against the reference per row (default 3; 2 with --quick)")),
    ("--quick", dict(action="store_true", default=False,
                     help="CI smoke test: resolution 129, short time budget, few rounds")),
    ("--rounds", dict(type=int, default=None, metavar="N",
                      help="timed rounds per row (default: as many as fit --time-budget, at least 5; 3 with --quick)")),
    ("--warmup", dict(type=int, default=1, metavar="N",
                      help="untimed calls before timing; the first one also measures peak memory (default 1)")),
    ("--time-budget", dict(type=float, default=None, metavar="S",
                           help="seconds of timed rounds per row when --rounds is not given (default 10; 1 with --quick)")),
    ("--threads", dict(type=int, default=None, metavar="N",
                       help="CPU threads for PyTorch, ONNX Runtime and OpenVINO (default: each library's own, "
                            "all cores); 1 resists a busy shared machine far better")),
    ("--seed", dict(type=int, default=0, help="seed of the random weights (default 0)")),
    ("--results-dir", dict(default=None, metavar="DIR",
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
    argv = [str(bench), "--rootdir", str(bench.parent), *pytest_arguments(args), *(args.pytest_args or [])]
    print(f"fastdeeplab bench: pytest {' '.join(argv)}", file=sys.stderr, flush=True)
    return subprocess.run([sys.executable, "-m", "pytest", *argv], cwd=bench.parent).returncode
