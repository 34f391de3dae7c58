"""``fastdeeplab train``: the command line over :func:`fastdeeplab.train` (``configure_parser`` and ``run``).

Options given on the command line override the ``--config`` file; ``--set KEY=VALUE`` reaches any other
field. Flags are checked by argparse (exit code 2, the flag and the allowed values named); config values,
data and checkpoints by :func:`fastdeeplab.train`, whose ``ValueError``/``TypeError``/``OSError``/
``RuntimeError`` the ``fastdeeplab`` command prints as one line (exit code 1).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from .._io import json_text
from .loop import logger, train
from .recipes import overfit_demo

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fastdeeplab train``: declared in :func:`fastdeeplab.cli.configure_train`, which imports
    no torch, so ``fastdeeplab train --help`` is fast; options given override the ``--config`` file."""
    from ..cli import configure_train

    configure_train(parser)


def _parse_value(text: str) -> Any:
    try:
        import yaml
    except ImportError:
        import ast

        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"--set value {text!r} is not valid YAML: {' '.join(str(exc).split())}") from None


class _TqdmLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def _configure_logging() -> None:
    if not logger.handlers:
        handler = _TqdmLogHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


_FLAG_FIELDS = ("data_root", "dataset", "train_split", "out_dir", "batch_size", "crop_size", "num_workers",
                "num_classes", "weights_backbone", "device", "seed", "resume", "stop_after", "progress")


def run(args: argparse.Namespace) -> int:
    """Run ``fastdeeplab train``; prints a one-line JSON summary (rank 0) and returns the exit code."""
    _configure_logging()
    if args.overfit_demo:
        summary = overfit_demo(args.out_dir or "runs/overfit_demo", device=args.device,
                               progress=args.progress is not False)
        print(json_text(summary, indent=2))
        return 0 if summary["mIoU"] >= 0.9 else 1
    overrides: dict[str, Any] = {key: getattr(args, key) for key in _FLAG_FIELDS if getattr(args, key) is not None}
    for item in args.set_values:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = _parse_value(text)
    result = train(args.config, **overrides)
    if int(os.environ.get("RANK", "0")) == 0:
        losses = result.history["loss"]
        print(json_text({"iteration": result.iteration, "finished": result.finished,
                          "loss_last": losses[-1] if losses else None, "evaluations": result.evaluations,
                          "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                          "final_weights": str(result.final_weights) if result.final_weights else None}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    from ..cli import main

    raise SystemExit(main(["train", *sys.argv[1:]]))
