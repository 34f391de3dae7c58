"""The ``fastdeeplab`` command line: ``bench``, ``demo``, ``export``, ``deploy``, ``eval``, ``train``, ``predict``.

:data:`COMMANDS` is the table of subcommands. Each names the module whose ``run(args) -> int`` does the work,
and the function that declares its arguments: ``configure_parser`` in that module when the module imports
nothing heavy at its top, else a ``configure_*`` function here (eval, train, predict: their modules import
torch). Nothing imports torch before the arguments are parsed, so every ``--help`` is fast and works without
the optional extras; a subcommand's module is imported only when it runs. ``python -m fastdeeplab`` is the
same command. To add a subcommand, add a row to :data:`COMMANDS`.

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
from typing import NamedTuple

__all__ = ["COMMANDS", "MODEL_NAMES", "Command", "add_model_arguments", "add_weights_argument", "device_arg",
           "float_in", "input_dir", "input_file", "int_at_least", "main", "output_dir", "output_file"]

# The registered builders (fastdeeplab.hub.list_models(), which imports torch), for --model choices at parse
# time; tests/test_cli_help.py checks that the two agree.
MODEL_NAMES = ("deeplabv3_cascade_resnet101", "deeplabv3_cascade_resnet50", "deeplabv3_mobilenet_v3_large",
               "deeplabv3_resnet101", "deeplabv3_resnet50")


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


# --------------------------------------------------------------------------------------------------
# Arguments shared by several subcommands, and those of the subcommands whose modules import torch.
# --------------------------------------------------------------------------------------------------
WEIGHTS_HELP = ("'synthetic' (a small model trained on synthetic scenes, offline: built once and cached in "
                "~/.cache/fastdeeplab), 'random' (seeded), a torchvision weights name, full or short "
                "(COCO_WITH_VOC_LABELS_V1, from the torch hub cache or downloaded), or a checkpoint file (e.g. a training run's model_final.pt)")


def add_weights_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *,
                         default_text: str = "random initialisation") -> None:
    """``--weights NAME|PATH``, resolved by :func:`fastdeeplab.hub.resolve_weights` (the bench's names too)."""
    parser.add_argument("--weights", default=None, metavar="NAME|PATH",
                        help=f"{WEIGHTS_HELP} (default: {default_text})")


def add_model_arguments(parser: argparse.ArgumentParser, default_output_stride: int = 16) -> None:
    """The model flags of ``eval`` and ``predict``: builder, weights, output stride, multi-grid, head, scales."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, choices=MODEL_NAMES,
                   help="builder name (default: the checkpoint's, else deeplabv3_resnet50)")
    add_weights_argument(g)
    g.add_argument("--output-stride", type=int, default=default_output_stride, choices=(8, 16, 32),
                   help=f"output stride at inference (default {default_output_stride}; the paper evaluates at 8)")
    g.add_argument("--multi-grid", type=int_at_least(1), nargs="+", default=None, metavar="R",
                   help="block4 multi-grid rates (default: the checkpoint's, else 1 1 1)")
    g.add_argument("--head", choices=("torchvision", "paper"), default=None, help="classifier head")
    g.add_argument("--num-classes", type=int_at_least(1), default=None,
                   help="number of classes (default: the checkpoint's, else the dataset's / 21)")
    g.add_argument("--scales", type=float_in(0.0, 8.0), nargs="+", default=[1.0], metavar="S",
                   help="inference scales in (0, 8], e.g. 0.5 0.75 1 1.25 1.5 1.75 (the paper's); default 1")
    g.add_argument("--flip", action="store_true", help="also average the left-right mirrored input")
    g.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available)")


def configure_eval(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fastdeeplab eval`` (run by :func:`fastdeeplab.evaluation.run`)."""
    parser.add_argument("--data", required=True, type=input_dir, metavar="ROOT",
                        help="dataset root folder (VOC: VOCdevkit/VOC2012 or the folder holding it; Cityscapes: "
                             "the folder with leftImg8bit/ and gtFine/)")
    parser.add_argument("--dataset", choices=("voc", "cityscapes"), default="voc",
                        help="dataset layout and classes: voc (21 classes) or cityscapes (19 train ids); "
                             "default voc")
    parser.add_argument("--split", default="val", metavar="NAME",
                        help="split to score: VOC reads ImageSets/Segmentation/NAME.txt (val, train, trainval, ...),"
                             " Cityscapes the leftImg8bit/NAME/ folder (val, train); default val")
    add_model_arguments(parser, default_output_stride=16)
    parser.add_argument("--batch-size", type=int_at_least(1), default=1,
                        help="images per forward; images of different sizes are grouped, never padded")
    parser.add_argument("--workers", type=int_at_least(0), default=2, help="data loading processes (>= 0)")
    parser.add_argument("--json", type=output_file, default=None, metavar="FILE",
                        help="also write the scores as strict JSON (fractions in [0, 1], as evaluate() returns "
                             "them; null for the IoU of a class absent from truth and prediction)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def configure_predict(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fastdeeplab predict`` (run by :func:`fastdeeplab.predict.run`)."""
    parser.add_argument("images", nargs="+", type=input_file, metavar="IMAGE", help="photographs to segment")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    add_model_arguments(parser, default_output_stride=16)
    parser.add_argument("--palette", choices=("cityscapes", "voc"), default="voc",
                        help="class colours and names (default voc)")
    parser.add_argument("--alpha", type=float_in(0.0, 1.0, low_open=False), default=0.5,
                        help="opacity of the class colours in the overlay, in [0, 1] (default 0.5)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace files in --out that predict did not write (never one of the inputs)")


TRAIN_DESCRIPTION = """\
Train DeepLabv3 with the paper's protocol (Chen et al., 2017, section 4): a poly learning rate and two stages
on the same weights, as --config's `stages` list says (configs/voc_resnet50_paper.yaml, 30K iterations each):
  stage 1: output stride 16, BatchNorm trained, lr 0.007, batch 16 crops of 513 on train_aug;
  stage 2: output stride 8, BatchNorm frozen, lr 0.001.
The flags below override the config, --set KEY=VALUE any other field; a run resumes from OUT when it holds a
checkpoint. Several processes: torchrun --nproc_per_node=N -m fastdeeplab train ... (--batch-size is per
process).
"""


def configure_train(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fastdeeplab train`` (run by :func:`fastdeeplab.training.cli.run`); options given
    override the ``--config`` file."""
    parser.description = TRAIN_DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", metavar="FILE",
                        help="YAML config with the stages (output stride, BN trained or frozen, iterations, "
                             "learning rate) and data settings; see configs/. Options below override it")
    parser.add_argument("--data", dest="data_root", metavar="ROOT", help="dataset root folder")
    parser.add_argument("--dataset", choices=("voc", "cityscapes"), default=None,
                        help="dataset layout (default: the config's)")
    parser.add_argument("--split", dest="train_split", metavar="NAME", default=None,
                        help="training split, e.g. train, train_aug, trainval (default: the config's train_split)")
    parser.add_argument("--out", dest="out_dir", metavar="DIR", help="checkpoints and logs (resumed if present)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=None, metavar="N",
                        help="images per process and iteration (>= 1)")
    parser.add_argument("--crop-size", type=int_at_least(1), default=None, metavar="PIXELS",
                        help="side of the square random training crops, >= 1 (the paper: 513; default: the "
                             "config's)")
    parser.add_argument("--workers", dest="num_workers", type=int_at_least(0), default=None, metavar="N",
                        help="data loading processes (>= 0)")
    parser.add_argument("--num-classes", type=int_at_least(1), default=None, metavar="K",
                        help="number of classes (default: the config's, else the dataset's)")
    parser.add_argument("--weights-backbone", default=None,
                        help="ImageNet backbone weights: torchvision name (ResNet50_Weights.IMAGENET1K_V1) or file")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--seed", type=int_at_least(0), default=None, metavar="N",
                        help="random seed (>= 0) for initialisation, crops and data order (default: the config's)")
    parser.add_argument("--no-resume", dest="resume", action="store_false", default=None,
                        help="start afresh even if OUT holds a checkpoint")
    parser.add_argument("--stop-after", type=int_at_least(1), default=None, metavar="N",
                        help="stop (with a checkpoint) after N >= 1 iterations of this run")
    parser.add_argument("--set", dest="set_values", action="append", default=[], metavar="KEY=VALUE",
                        help="any config field, value in YAML syntax, e.g. --set 'bootstrap_classes=[2, 9]'")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="hide the progress bar (the log lines stay)")
    parser.add_argument("--overfit-demo", action="store_true",
                        help="train on 8 synthetic images and report the mIoU on them (writes to --out)")


# --------------------------------------------------------------------------------------------------
# The table of subcommands
# --------------------------------------------------------------------------------------------------
class Command(NamedTuple):
    module: str            #: defines ``run(args) -> int``, imported only when the subcommand runs
    help: str              #: one line, in ``fastdeeplab --help``
    arguments: str = ""    #: ``"module:function"`` declaring the arguments; default ``<module>:configure_parser``

    def configure(self, parser: argparse.ArgumentParser) -> None:
        module, _, function = (self.arguments or f"{self.module}:configure_parser").partition(":")
        getattr(import_module(module), function)(parser)


COMMANDS: dict[str, Command] = {
    "bench": Command("fastdeeplab.bench_cli", "benchmark latency and accuracy at OS16 and OS8 against torchvision"),
    "demo": Command("fastdeeplab.demo", "run a photograph through the model at OS16 and OS8, write an overlay PNG"),
    "export": Command("fastdeeplab.export.cli", "export to ONNX (checked) or build a TensorRT engine"),
    "deploy": Command("fastdeeplab.export.deploy_cli", "write a Triton Inference Server model repository"),
    "serve": Command("fastdeeplab.serve.cli", "run a real Triton Inference Server on a deploy repository"),
    "client": Command("fastdeeplab.serve.client", "segment photos through a Triton server, write mask/overlay PNGs"),
    "eval": Command("fastdeeplab.evaluation", "mIoU on PASCAL VOC or Cityscapes, single- or multi-scale + flip",
                    "fastdeeplab.cli:configure_eval"),
    "train": Command("fastdeeplab.training.cli",
                     "train with the paper's protocol (OS16 then OS8, poly LR), torchrun-ready",
                     "fastdeeplab.cli:configure_train"),
    "predict": Command("fastdeeplab.predict", "segment images and write class-map and overlay PNGs (with a legend)",
                       "fastdeeplab.cli:configure_predict"),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    from ._version import __version__

    parser = _Parser(prog="fastdeeplab", description="A fast, drop-in DeepLabv3 for PyTorch.")
    parser.add_argument("--version", action="version", version=f"fastdeeplab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    wanted = None if argv is None else next((a for a in argv if not a.startswith("-")), None)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        if wanted == name:  # configure only the subcommand in use: its module may need an optional extra
            command.configure(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(import_module(COMMANDS[args.command].module).run(args) or 0)
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
