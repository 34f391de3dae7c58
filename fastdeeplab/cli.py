"""The ``fastdeeplab`` command line: ``bench``, ``demo``, ``export``, ``eval``, ``train``, ``predict``.

Each subcommand lives beside the code it drives: a module that defines ``configure_parser(parser)`` and
``run(args) -> int``. They are imported only when their subcommand is used, so ``fastdeeplab --help`` is fast
and works without the optional extras. ``python -m fastdeeplab`` is the same command.

User errors are one line on stderr that names the flag and what it accepts: exit code 2 for a bad argument
(caught while parsing, before any work: the argument types below), 1 for an error found while running.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from importlib import import_module
from pathlib import Path

__all__ = ["device_arg", "float_in", "input_dir", "input_file", "int_at_least", "main", "output_dir",
           "output_file"]


# --------------------------------------------------------------------------------------------------
# Argument types shared by the subcommands: each refuses a bad value while parsing, with the allowed values.
# --------------------------------------------------------------------------------------------------
def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int ``>= minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    parse.__name__ = f"int>={minimum}"
    return parse


def float_in(low: float = 0.0, high: float = math.inf, *, low_open: bool = True) -> Callable[[str], float]:
    """An argparse type: a finite float in ``(low, high]`` (``[low, high]`` with ``low_open=False``)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if math.isinf(high) else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            raise argparse.ArgumentTypeError(f"expected a finite number in {interval}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


def device_arg(text: str) -> str:
    """An argparse type: ``cpu``, ``cuda`` or ``cuda:N`` that exists on this machine."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU is visible to torch here; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA "
                                             f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return text


def input_file(text: str) -> Path:
    """An argparse type: an existing file (a folder is refused as "Is a directory")."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: Is a directory; expected a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: No such file")
    return path


def input_dir(text: str) -> Path:
    """An argparse type: an existing folder (a file is refused as "Not a directory")."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: Not a directory; expected a folder")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: No such directory")
    return path


def output_file(text: str) -> Path:
    """An argparse type: a file that can be written (:func:`fastdeeplab._io.check_output_path`): not a folder
    ("Is a directory"), a device, a read-only file or under an unwritable folder. Nothing is created."""
    from ._io import check_output_path

    try:
        check_output_path(text, what="output")
    except (OSError, ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return Path(text)


def output_dir(text: str) -> Path:
    """An argparse type: a folder to write into, created later if missing (an existing file is refused as
    "Not a directory"; so is a place where nothing can be created). Nothing is created here."""
    from ._io import check_writable_dir

    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: Not a directory; expected a folder")
    try:
        check_writable_dir(path / "x", what="files in")
    except OSError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return path


class _Parser(argparse.ArgumentParser):
    """An argument error is one line: ``fastdeeplab eval: error: argument --device: ... (see --help)``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

# name -> (module defining configure_parser/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("fastdeeplab.bench_cli", "benchmark latency and accuracy at OS16 and OS8 against torchvision"),
    "demo": ("fastdeeplab.demo", "run a real photograph through the model at OS16 and OS8"),
    "export": ("fastdeeplab.export.cli", "export to ONNX (checked) or build a TensorRT engine"),
    "deploy": ("fastdeeplab.export.deploy_cli", "write a Triton Inference Server model repository"),
    "eval": ("fastdeeplab.evaluation", "mIoU on PASCAL VOC or Cityscapes, single- or multi-scale + flip"),
    "train": ("fastdeeplab.training.cli", "train with the paper's protocol (two stages, poly LR), torchrun-ready"),
    "predict": ("fastdeeplab.predict", "segment images and write class-map and overlay PNGs"),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="fastdeeplab", description="A fast, drop-in DeepLabv3 for PyTorch.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"fastdeeplab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
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
        message = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in message:
            message = f"{exc.filename}: {message}"
        print(f"fastdeeplab {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fastdeeplab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
