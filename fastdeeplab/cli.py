"""The ``fastdeeplab`` command line: ``bench``, ``demo``, ``export``, ``eval``, ``train``, ``predict``.

Each subcommand lives beside the code it drives: a module that defines ``configure_parser(parser)`` and
``run(args) -> int``. They are imported only when their subcommand is used, so ``fastdeeplab --help`` is fast
and works without the optional extras.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import import_module

__all__ = ["main"]

# name -> (module defining configure_parser/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("fastdeeplab.bench_cli", "benchmark latency and accuracy at OS16 and OS8 against torchvision"),
    "demo": ("fastdeeplab.demo", "run a real photograph through the model at OS16 and OS8"),
    "export": ("fastdeeplab.export.cli", "export to ONNX (checked) or build a TensorRT engine"),
    "eval": ("fastdeeplab.evaluation", "mIoU on PASCAL VOC or Cityscapes, single- or multi-scale + flip"),
    "train": ("fastdeeplab.training.core", "train with the paper's protocol (two stages, poly LR), torchrun-ready"),
    "predict": ("fastdeeplab.predict", "segment images and write class-map and overlay PNGs"),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdeeplab", description="A fast, drop-in DeepLabv3 for PyTorch.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"fastdeeplab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None if argv is None else next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if wanted == name:  # configure only the subcommand in use: its module may need an optional extra
            import_module(module).configure_parser(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(import_module(COMMANDS[args.command][0]).run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, ImportError, RuntimeError, OSError) as exc:
        print(f"fastdeeplab {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
