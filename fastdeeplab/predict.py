"""``fastdeeplab predict``: segment photographs and write a class-map PNG and an overlay PNG for each.

For ``photo.jpg`` it writes, atomically, into ``--out``:

* ``photo_mask.png``: the class map as a palette image (mode ``"P"``, VOC colours by default): pixel values
  are class ids, so ``np.array(Image.open("photo_mask.png"))`` gives the ``[H, W]`` map back;
* ``photo_overlay.png``: the class colours blended over the photograph (RGB, background left as is).

Nothing else is ever replaced: an output that would be one of the inputs (the photograph ``x_mask.png``
beside ``x.png``, a link to it, the weights) is refused, and so is an existing file that ``predict`` did not
write (its PNGs carry a ``Software: fastdeeplab predict`` chunk) unless ``--overwrite``. Every image's size
is checked against the free memory before the model is built.

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
from .data.palette import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    IGNORE_INDEX,
    VOC_CLASSES,
    colorize,
    overlay,
    voc_palette,
)
from .evaluation import (
    _device,
    as_device,
    build_inference_model,
    check_inference_memory,
    segment,
)
from .images import image_size, load_image, normalize

__all__ = ["CLASS_NAMES", "PALETTES", "SIGNATURE", "add_legend", "check_images", "check_outputs", "class_names_for",
           "configure_parser", "output_names", "palette_for", "predict_mask", "run", "write_prediction",
           "written_by_predict"]

PALETTES = {"voc": voc_palette(), "cityscapes": CITYSCAPES_PALETTE}
CLASS_NAMES = {"voc": VOC_CLASSES, "cityscapes": CITYSCAPES_CLASSES}


def class_names_for(palette: str, weights: str | None = None) -> Sequence[str]:
    """The names the overlay's legend gives the class ids: the synthetic model's classes with ``--weights
    synthetic``, else the palette's dataset's (VOC or Cityscapes)."""
    from .weights import SYNTHETIC_CLASSES

    if isinstance(weights, str) and weights.strip().lower() == "synthetic":
        return SYNTHETIC_CLASSES
    return CLASS_NAMES[palette]


def palette_for(palette: str, weights: str | None = None) -> Sequence[int] | Sequence[Sequence[int]]:
    """The class colours: the synthetic scenes' own with ``--weights synthetic``, else ``PALETTES[palette]``."""
    from .weights import SYNTHETIC_PALETTE

    if isinstance(weights, str) and weights.strip().lower() == "synthetic":
        return SYNTHETIC_PALETTE
    return PALETTES[palette]


def add_legend(image: Image.Image, mask: np.ndarray, palette: Sequence[int] | Sequence[Sequence[int]] | None,
               class_names: Sequence[str] = ()) -> Image.Image:
    """``image`` with a white strip on its right that lists every class present in ``mask`` (ignore label
    255 left out): a swatch of the class's colour, its id and name (``class_names[id]``, else ``class id``)."""
    from PIL import ImageDraw, ImageFont

    flat = list(voc_palette() if palette is None else palette)
    if flat and not isinstance(flat[0], int):
        flat = [int(v) for rgb in flat for v in rgb]
    present = [int(c) for c in np.unique(mask) if int(c) != IGNORE_INDEX]
    font = ImageFont.load_default()
    labels = [f"{c} {class_names[c] if c < len(class_names) else f'class {c}'}" for c in present]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line, pad, swatch = 14, 4, 10
    text_w = max((int(probe.textlength(t, font=font)) for t in labels), default=0)
    width = pad * 3 + swatch + text_w
    canvas = Image.new("RGB", (image.width + width, max(image.height, pad * 2 + line * len(labels))), "white")
    canvas.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (c, text) in enumerate(zip(present, labels, strict=True)):
        x, y = image.width + pad, pad + row * line
        colour = tuple(flat[3 * c: 3 * c + 3]) if 3 * c + 2 < len(flat) else (0, 0, 0)
        draw.rectangle((x, y + 1, x + swatch, y + 1 + swatch), fill=colour, outline=(0, 0, 0))
        draw.text((x + swatch + pad, y), text, fill=(0, 0, 0), font=font)
    return canvas


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
                     alpha: float = 0.5, class_names: Sequence[str] | None = None) -> tuple[Path, Path]:
    """Write ``<stem>_mask.png`` (mode ``"P"``) and ``<stem>_overlay.png`` (RGB; with ``class_names`` a legend
    of the classes present, :func:`add_legend`, to its right) atomically; return both paths."""
    out = Path(out_dir)
    mask_path, overlay_path = out / f"{stem}_mask.png", out / f"{stem}_overlay.png"
    with atomic_path(mask_path, suffix=".png", what="mask") as tmp:
        colorize(mask, palette).save(tmp, format="PNG", pnginfo=_signature())
    with atomic_path(overlay_path, suffix=".png", what="overlay") as tmp:
        blended = overlay(image, mask, palette, alpha=alpha)
        if class_names is not None:
            blended = add_legend(blended, mask, palette, class_names)
        blended.save(tmp, format="PNG", pnginfo=_signature())
    return mask_path, overlay_path


SIGNATURE = "fastdeeplab predict"
"""The PNG ``Software`` text chunk of every file ``predict`` writes: how a later run knows it may replace it."""


def _signature():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", SIGNATURE)
    return info


def written_by_predict(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PNG that ``predict`` wrote (its ``Software`` chunk), read from the header only."""
    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get("Software") == SIGNATURE
    except Exception:  # noqa: BLE001  (anything unreadable is not ours)
        return False


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fastdeeplab predict``: declared in :func:`fastdeeplab.cli.configure_predict`, which
    imports no torch, so ``fastdeeplab predict --help`` is fast."""
    from .cli import configure_predict

    configure_predict(parser)


def output_names(stem: str) -> tuple[str, str]:
    """The two files ``predict`` writes for an image of stem ``stem``."""
    return f"{stem}_mask.png", f"{stem}_overlay.png"


def check_outputs(out_dir: str | os.PathLike, stems: Sequence[str], inputs: Sequence[str | os.PathLike] = (),
                  *, overwrite: bool = False) -> list[Path]:
    """Validate, before any work, every file ``predict`` will write under ``out_dir`` (which may not exist yet:
    it is created with the first write); nothing is created here.

    Refused, naming the file: an output that is one of ``inputs`` (compared as files: links and other
    spellings included), and an existing file that ``predict`` did not write (no ``Software`` chunk of
    :data:`SIGNATURE`) unless ``overwrite``: a photograph called ``x_mask.png`` is never replaced.
    """
    from ._io import check_not_input, check_output_path

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: Not a directory; give a folder for the PNGs")
    paths = []
    for stem in stems:
        for name in output_names(stem):
            path = check_output_path(out / name, what="--out")
            check_not_input(out / name, [p for p in inputs if p is not None], what="--out")  # named as given
            if path.exists() and not overwrite and not written_by_predict(path):
                raise FileExistsError(f"--out {path} exists and was not written by fastdeeplab predict; "
                                      "refusing to replace it: give another --out folder, or --overwrite")
            paths.append(path)
    return paths


def check_images(paths: list[Path]) -> list[str]:
    """The output stems of the images ``paths`` (``<stem>_mask.png``, ``<stem>_overlay.png``), after checking
    that each is a file and that no two would write the same outputs (predict and the serving client)."""
    stems: dict[str, Path] = {}
    for p in paths:
        if p.stem in stems:
            raise ValueError(f"{stems[p.stem]} and {p} would both write {p.stem}_mask.png; rename one")
        stems[p.stem] = p
        if p.is_dir():
            raise IsADirectoryError(f"image {p}: Is a directory; give image files")
        if not p.is_file():
            raise FileNotFoundError(f"image not found: {p}")
    return list(stems)


def run(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.images]
    stems = check_images(paths)
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    check_outputs(args.out, stems, [*paths, args.weights], overwrite=getattr(args, "overwrite", False))
    device = _device(args.device)
    for path in paths:  # every image's size and memory before any model is built
        w, h = image_size(path)
        check_inference_memory(h, w, device=device, what=f"image {path}", output_stride=args.output_stride,
                               scales=args.scales, num_classes=args.num_classes or 21)
    if args.weights is None:
        print("fastdeeplab predict: warning: no --weights given, the model is randomly initialised",
              file=sys.stderr)
    model = build_inference_model(args.model, weights=args.weights, num_classes=args.num_classes,
                                  output_stride=args.output_stride, multi_grid=args.multi_grid,
                                  head=args.head).to(device)
    for path in paths:
        image = load_image(path)
        try:
            mask = predict_mask(model, image, scales=args.scales, flip=args.flip, device=device)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        mask_path, overlay_path = write_prediction(args.out, path.stem, image, mask,
                                                   palette_for(args.palette, args.weights),
                                                   alpha=args.alpha,
                                                   class_names=class_names_for(args.palette, args.weights))
        print(f"{path} -> {mask_path}, {overlay_path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from .cli import main

    raise SystemExit(main(["predict", *sys.argv[1:]]))
