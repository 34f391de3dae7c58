"""``fastdeeplab predict``: segment photographs and write a class-map PNG and an overlay PNG for each.

For ``photo.jpg`` it writes, atomically, into ``--out``:

* ``photo_mask.png``: the class map as a palette image (mode ``"P"``, VOC colours by default): pixel values
  are class ids, so ``np.array(Image.open("photo_mask.png"))`` gives the ``[H, W]`` map back;
* ``photo_overlay.png``: the class colours blended over the photograph (RGB, background left as is).

>>> from fastdeeplab.predict import predict_mask
>>> mask = predict_mask(model, load_image("photo.jpg"), scales=(0.75, 1.0, 1.25), flip=True)   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ._io import atomic_path
from .data.palette import CITYSCAPES_PALETTE, colorize, overlay, voc_palette
from .evaluation import _device, as_device, build_inference_model, segment
from .images import load_image, normalize

__all__ = ["PALETTES", "check_outputs", "configure_parser", "predict_mask", "run", "write_prediction"]

PALETTES = {"voc": voc_palette(), "cityscapes": CITYSCAPES_PALETTE}


def predict_mask(model: nn.Module, image: Image.Image, *, scales: Sequence[float] = (1.0,), flip: bool = False,
                 device: str | torch.device | None = None) -> np.ndarray:
    """Class map ``[H, W]`` (uint8 when there are at most 256 classes) of an RGB photograph.

    The image keeps its size; see :func:`fastdeeplab.evaluate.segment` for ``scales`` and ``flip``.
    The model should be in eval mode.
    """
    param = next(iter(model.parameters()), None)
    run_device = as_device(device) if device is not None else (param.device if param is not None else "cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = normalize(image)[None].to(run_device, dtype)
    classes = segment(model, x, scales=scales, flip=flip).argmax(1)[0].cpu().numpy()
    return classes.astype(np.uint8) if classes.max(initial=0) < 256 else classes


def write_prediction(out_dir: str | os.PathLike, stem: str, image: Image.Image, mask: np.ndarray,
                     palette: Sequence[int] | Sequence[Sequence[int]] | None = None,
                     alpha: float = 0.5) -> tuple[Path, Path]:
    """Write ``<stem>_mask.png`` (mode ``"P"``) and ``<stem>_overlay.png`` (RGB) atomically; return both paths."""
    out = Path(out_dir)
    mask_path, overlay_path = out / f"{stem}_mask.png", out / f"{stem}_overlay.png"
    with atomic_path(mask_path, suffix=".png", what="mask") as tmp:
        colorize(mask, palette).save(tmp, format="PNG")
    with atomic_path(overlay_path, suffix=".png", what="overlay") as tmp:
        overlay(image, mask, palette, alpha=alpha).save(tmp, format="PNG")
    return mask_path, overlay_path


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fastdeeplab predict``: declared in :func:`fastdeeplab.cli.configure_predict`, which
    imports no torch, so ``fastdeeplab predict --help`` is fast."""
    from .cli import configure_predict

    configure_predict(parser)


def check_outputs(out_dir: str | os.PathLike, stems: Sequence[str]) -> list[Path]:
    """Validate, before any work, every file ``predict`` will write under ``out_dir`` (which may not exist yet:
    it is created with the first write); nothing is created here."""
    from ._io import check_output_path

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: Not a directory; give a folder for the PNGs")
    return [check_output_path(out / f"{stem}_{kind}.png", what="--out")
            for stem in stems for kind in ("mask", "overlay")]


def run(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.images]
    stems: dict[str, Path] = {}
    for p in paths:
        if p.stem in stems:
            raise ValueError(f"{stems[p.stem]} and {p} would both write {p.stem}_mask.png; rename one")
        stems[p.stem] = p
        if p.is_dir():
            raise IsADirectoryError(f"image {p}: Is a directory; give image files")
        if not p.is_file():
            raise FileNotFoundError(f"image not found: {p}")
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    check_outputs(args.out, list(stems))
    if args.weights is None:
        print("fastdeeplab predict: warning: no --weights given, the model is randomly initialised",
              file=sys.stderr)
    device = _device(args.device)
    model = build_inference_model(args.model, weights=args.weights, num_classes=args.num_classes,
                                  output_stride=args.output_stride, multi_grid=args.multi_grid,
                                  head=args.head).to(device)
    for path in paths:
        image = load_image(path)
        try:
            mask = predict_mask(model, image, scales=args.scales, flip=args.flip, device=device)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        mask_path, overlay_path = write_prediction(args.out, path.stem, image, mask, PALETTES[args.palette],
                                                   alpha=args.alpha)
        print(f"{path} -> {mask_path}, {overlay_path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from .cli import main

    raise SystemExit(main(["predict", *sys.argv[1:]]))
