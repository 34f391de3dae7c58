"""Evaluation: mIoU from a confusion matrix, with the paper's multi-scale and left–right flip inference.

>>> import fastdeeplab
>>> from fastdeeplab.data import VOCSegmentation
>>> model = fastdeeplab.deeplabv3_resnet50(weights="model_final.pt", output_stride=8)     # doctest: +SKIP
>>> scores = fastdeeplab.evaluate(model, VOCSegmentation("VOCdevkit", "val"),            # doctest: +SKIP
...                               scales=PAPER_SCALES, flip=True)
>>> scores["mIoU"]                                                                         # doctest: +SKIP

Command line: ``fastdeeplab eval --data VOCdevkit --dataset voc --split val --weights W --scales 0.5 0.75 1
1.25 1.5 1.75 --flip``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .data.base import one_line_worker_errors
from .metrics import ConfusionMatrix, logits_of

__all__ = ["PAPER_SCALES", "as_device", "available_memory", "build_inference_model", "check_inference_memory",
           "configure_parser", "evaluate", "inference_bytes", "model_logits", "run", "segment"]

PAPER_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
"""The input scales of the paper's multi-scale inference (§4.2, Table 6)."""


def model_logits(model: nn.Module, images: Tensor) -> Tensor:
    """``[N, K, h, w]`` logits of ``model(images)`` (see :func:`fastdeeplab.metrics.logits_of`)."""
    return logits_of(model(images))


def segment(model: nn.Module, images: Tensor, *, scales: Sequence[float] = (1.0,), flip: bool = False) -> Tensor:
    """Class probabilities ``[N, K, H, W]`` (float32) of normalised images ``[N, 3, H, W]``.

    For each scale ``s`` the batch is resized bilinearly to ``round(s * H) × round(s * W)`` (at least the
    model's output stride), run through the model, and its logits resized back to ``H × W``; with ``flip``
    the mirrored batch is run too and its output mirrored back. The result is the mean of the softmax
    probabilities over all ``len(scales) * (1 + flip)`` passes (the paper averages the per-pass outputs;
    averaging probabilities rather than raw logits keeps each pass on the same footing). Take
    ``.argmax(1)`` for the class map. Runs without gradients; the caller puts the model in eval mode.
    """
    if images.dim() != 4:
        raise ValueError(f"expected images [N, 3, H, W], got shape {tuple(images.shape)}")
    scales = _check_scales(scales)
    h, w = images.shape[-2:]
    min_side = int(getattr(model, "output_stride", 1))
    total: Tensor | None = None
    passes = 0
    with torch.no_grad():
        for scale in scales:
            size = (max(min_side, round(h * scale)), max(min_side, round(w * scale)))
            x = images if size == (h, w) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            for mirrored in (False, True) if flip else (False,):
                logits = model_logits(model, x.flip(-1) if mirrored else x).float()
                if mirrored:
                    logits = logits.flip(-1)
                if logits.shape[-2:] != (h, w):
                    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
                probs = logits.softmax(1)
                total = probs if total is None else total + probs
                passes += 1
    assert total is not None
    return total / passes


def _check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    """``scales`` as floats, each finite and positive (``nan``, ``inf``, ``0``, ``-1`` and strings refused)."""
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or len(scales) == 0:
        raise ValueError(f"scales must be a non-empty list of positive numbers, e.g. (0.75, 1.0, 1.25); got {scales!r}")
    out = []
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise ValueError(f"scales must be finite positive numbers; got {s!r} in {list(scales)!r}")
        out.append(float(s))
    return tuple(out)


# Peak bytes of activation memory per input pixel of a DeepLabv3-ResNet forward (batch 1, no gradients),
# measured with ru_maxrss on CPU (fp32) at 513 and 1025 px; rounded up. The logits, their softmax and the
# running sum of :func:`segment` come on top (num_classes x 4 bytes each).
_BYTES_PER_PIXEL = {8: 850, 16: 350, 32: 250}


def available_memory(device: str | torch.device) -> int | None:
    """Bytes free for a new allocation on ``device`` (``MemAvailable`` on the CPU, free memory on a CUDA
    device), ``None`` when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def inference_bytes(height: int, width: int, *, output_stride: int | None = 16, scales: Sequence[float] = (1.0,),
                    num_classes: int = 21, batch: int = 1) -> int:
    """An estimate of the peak memory of :func:`segment` on ``batch`` images of ``height x width``: the
    forward at the largest scale plus the class probabilities it accumulates."""
    pixels = height * width * batch
    largest = max(float(s) for s in scales) ** 2
    per_pixel = _BYTES_PER_PIXEL.get(int(output_stride or 16), _BYTES_PER_PIXEL[8])
    return int(pixels * (largest * (per_pixel + 2 * 4 * num_classes) + 3 * 4 * num_classes + 3 * 4))


def check_inference_memory(height: int, width: int, *, device: str | torch.device, what: str,
                           output_stride: int | None = 16, scales: Sequence[float] = (1.0,), num_classes: int = 21,
                           batch: int = 1) -> None:
    """Refuse (``ValueError``, one line naming ``what``) an image whose segmentation cannot fit in the free
    memory of ``device``, before any work, instead of the allocator's message after minutes."""
    need = inference_bytes(height, width, output_stride=output_stride, scales=scales, num_classes=num_classes,
                           batch=batch)
    free = available_memory(device)
    if free is not None and need > free:
        largest = max(float(s) for s in scales)
        raise ValueError(f"{what} is {width}x{height}: segmenting it at output stride {output_stride}"
                          f"{f' and scale {largest:g}' if largest != 1 else ''} needs about {need / 2**30:.1f} GiB "
                          f"but {torch.device(device).type} has {free / 2**30:.1f} GiB free; resize it, or use "
                          "a larger output stride or smaller scales")


def _collate_lists(batch: list[tuple[Tensor, Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
    return [b[0] for b in batch], [b[1] for b in batch]


def _groups_of_equal_size(images: list[Tensor]) -> list[list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    return list(groups.values())


def _sample_name(dataset: Any, index: int, attr: str) -> str:
    """The file of sample ``index`` when the dataset names its files (``label_path``/``image_path``), else
    ``#index``."""
    getter = getattr(dataset, attr, None)
    if callable(getter):
        try:
            return str(getter(index))
        except Exception:  # noqa: BLE001  (a name for a message only)
            pass
    return f"#{index}"


def as_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, or a ``ValueError`` that lists what is accepted (torch lists 20 device types)."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; expected 'cpu', 'cuda' or 'cuda:N'") from None


def _model_device(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def evaluate(model: nn.Module, dataset: Dataset, *, scales: Sequence[float] = (1.0,), flip: bool = False,
             batch_size: int = 1, device: str | torch.device | None = None, num_classes: int | None = None,
             progress: bool = True, ignore_index: int = 255, num_workers: int = 0) -> dict[str, Any]:
    """Score ``model`` on ``dataset`` (items ``(image [3, H, W] normalised, label [H, W] int64)``).

    Each image is segmented at its own size with :func:`segment` (``scales``, ``flip``), ``argmax`` gives
    the class map, and one confusion matrix is accumulated over the dataset.

    Batches: images of different sizes are never padded together — zero padding would leak into the
    image-pooling branch of ASPP and change the predictions. Each batch is split into groups of equal
    size, so ``batch_size > 1`` speeds up datasets of fixed size (Cityscapes) and gives the same result
    as ``batch_size=1`` on any dataset.

    Args:
        model: anything that maps ``[N, 3, H, W]`` to ``{"out": [N, K, H, W]}`` (or the logits tensor),
            including optimized or exported models. It is run in eval mode and its modes are restored.
        device: where to run; defaults to the model's device. A plain ``nn.Module`` is moved there.
        num_classes: ``K``; defaults to the number of channels of the model's output.
        progress: show a tqdm bar with the running mIoU.

    Returns:
        ``{"mIoU", "per_class_iou" (NaN for classes absent from truth and prediction), "pixel_accuracy",
        "mean_accuracy", "confusion" ([K, K] int64, rows = truth), "num_images", "scales", "flip",
        "output_stride" (the model's, ``None`` if it has none), "seconds"}``; scores are fractions in
        ``[0, 1]`` (the command line prints them in percent) and ``"class_names"`` when the dataset names its classes.
    """
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    scales = _check_scales(scales)
    run_device = as_device(device) if device is not None else _model_device(model)
    if device is not None and _model_device(model) != run_device:
        model.to(run_device)
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    # A private generator: iterating the loader must not consume the global RNG (training resumes exactly).
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate_lists, generator=torch.Generator())
    modes = {m: m.training for m in model.modules()}
    model.eval()
    matrix: ConfusionMatrix | None = None
    start = time.perf_counter()
    count = 0
    try:
        bar = tqdm(loader, desc="eval", unit="batch", disable=not progress, dynamic_ncols=True)
        for images, labels in one_line_worker_errors(bar):
            for group in _groups_of_equal_size(images):
                h, w = images[group[0]].shape[-2:]
                check_inference_memory(int(h), int(w), device=run_device, batch=len(group), scales=scales,
                                       output_stride=getattr(model, "output_stride", None),
                                       num_classes=num_classes or 21,
                                       what=f"image {_sample_name(dataset, count + group[0], 'image_path')}")
                x = torch.stack([images[i] for i in group]).to(run_device, dtype, non_blocking=True)
                probs = segment(model, x, scales=scales, flip=flip)
                if matrix is None:
                    k = probs.shape[1] if num_classes is None else int(num_classes)
                    if k != probs.shape[1]:
                        raise ValueError(f"num_classes={k} but the model outputs {probs.shape[1]} classes")
                    matrix = ConfusionMatrix(k, ignore_index)
                pred = probs.argmax(1)
                for i, p in zip(group, pred, strict=True):  # one image at a time: an error names its label
                    try:
                        matrix.update(p, labels[i].to(run_device))
                    except ValueError as exc:
                        raise ValueError(f"label {_sample_name(dataset, count + i, 'label_path')}: {exc}; "
                                         "check the dataset's labels or --num-classes") from None
            count += len(images)
            if progress and matrix is not None:
                bar.set_postfix(mIoU=f"{100 * matrix.compute()['mIoU']:.2f}%")
    finally:
        for module, mode in modes.items():
            module.training = mode
    if matrix is None:
        raise ValueError("the dataset is empty")
    scores = matrix.compute()
    scores.update(num_images=count, scales=[float(s) for s in scales], flip=bool(flip),
                  output_stride=getattr(model, "output_stride", None), seconds=time.perf_counter() - start)
    names = getattr(dataset, "class_names", None)
    if names is not None and len(names) == matrix.num_classes:
        scores["class_names"] = list(names)
    return scores


# --------------------------------------------------------------------------------------------------
# Building a model for inference (shared with ``fastdeeplab predict``)
# --------------------------------------------------------------------------------------------------
def _checkpoint_model_config(weights: str | None) -> dict[str, Any]:
    """The ``"model_config"`` a training run stores next to its weights (``{}`` when absent)."""
    if weights is None or not Path(weights).is_file():
        return {}
    try:
        obj = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception:  # the builder reports unreadable files with a better message
        return {}
    config = obj.get("model_config") if isinstance(obj, Mapping) else None
    if config is None:
        return {}
    from .hub import check_model_config

    return check_model_config(config, weights)  # bad or extra fields: one line naming the checkpoint


def build_inference_model(name: str | None = None, *, weights: str | None = None, num_classes: int | None = None,
                          output_stride: int = 16, multi_grid: Sequence[int] | None = None,
                          head: str | None = None, default_num_classes: int = 21) -> nn.Module:
    """Build a registered model in eval mode for evaluation or prediction.

    Checkpoints written by :func:`fastdeeplab.train` carry their ``model_config`` (builder name, classes,
    multi-grid, head): it fills every argument left as ``None``, so a model trained with multi-grid
    ``(1, 2, 4)`` is rebuilt with it; ``default_num_classes`` applies when neither the arguments nor the
    checkpoint say. ``weights`` may also be a torchvision weights name, ``synthetic`` or ``random``
    (:func:`fastdeeplab.weights.build_model`, the one resolver of weights names; they bring their classes).
    """
    from .weights import build_model, is_named_weights

    saved = _checkpoint_model_config(weights)
    name = name or saved.get("name") or "deeplabv3_resnet50"
    kwargs: dict[str, Any] = {k: v for k, v in saved.get("kwargs", {}).items()
                              if k not in ("weights", "weights_backbone", "aux_loss", "output_stride")}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    elif "num_classes" not in kwargs and not is_named_weights(weights):
        kwargs["num_classes"] = default_num_classes
    if multi_grid is not None:
        kwargs["multi_grid"] = tuple(multi_grid)
    if head is not None:
        kwargs["head"] = head
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return build_model(name, weights, output_stride=output_stride, **kwargs).eval()


def _device(name: str | None) -> torch.device:
    return torch.device(name) if name else torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------------
# Command line: fastdeeplab eval
# --------------------------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fastdeeplab eval``: declared in :func:`fastdeeplab.cli.configure_eval`, which imports no
    torch, so ``fastdeeplab eval --help`` is fast."""
    from .cli import configure_eval

    configure_eval(parser)


def _format_scores(scores: Mapping[str, Any]) -> str:
    """Per-class IoU and the summary, every score in percent."""
    names = scores.get("class_names") or [str(i) for i in range(len(scores["per_class_iou"]))]
    width = max(len(n) for n in names)
    lines = ["IoU per class (%):"]
    lines += [f"  {n:<{width}}  {'absent' if math.isnan(v) else f'{100 * v:6.2f}'}"
              for n, v in zip(names, scores["per_class_iou"], strict=True)]
    stride = scores.get("output_stride")
    lines.append(f"mIoU {100 * scores['mIoU']:.2f}%  pixel accuracy {100 * scores['pixel_accuracy']:.2f}%  "
                 f"({scores['num_images']} images, output stride {stride if stride is not None else 'n/a'}, "
                 f"scales {scores['scales']}, flip {scores['flip']}, {scores['seconds']:.1f} s)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ._io import atomic_path, check_not_input, check_output_path, json_text
    from .data import build_dataset

    if args.json:  # before any work: a bad path fails now, not after the evaluation
        check_output_path(args.json, what="--json")
        check_not_input(args.json, {"--weights": args.weights}, what="--json")
    dataset = build_dataset(args.dataset, args.data, args.split)
    if args.json and getattr(dataset, "list_file", None) is not None:
        check_not_input(args.json, {"--split list": dataset.list_file}, what="--json")
    if args.weights is None:
        print("fastdeeplab eval: warning: no --weights given, the model is randomly initialised", file=sys.stderr)
    model = build_inference_model(args.model, weights=args.weights, num_classes=args.num_classes,
                                  output_stride=args.output_stride, multi_grid=args.multi_grid, head=args.head,
                                  default_num_classes=getattr(dataset, "num_classes", 21))
    scores = evaluate(model, dataset, scales=args.scales, flip=args.flip, batch_size=args.batch_size,
                      device=_device(args.device), progress=not args.no_progress, num_workers=args.workers)
    print(_format_scores(scores))
    if args.json:
        payload = dict(scores)  # NaN (a class absent from truth and prediction) is written as null
        payload.update(dataset=args.dataset, split=args.split, weights=args.weights,
                       output_stride=args.output_stride)
        with atomic_path(args.json, what="--json") as tmp:
            tmp.write_text(json_text(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from .cli import main

    raise SystemExit(main(["eval", *sys.argv[1:]]))
