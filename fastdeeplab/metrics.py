"""The one home for the project's numerics: confusion matrices and the scores derived from them (per-class
IoU, mIoU, pixel accuracy), and the comparisons of one output with another (:func:`max_rel_error`,
:func:`pixel_agreement`, :func:`logits_of`). Tests, the bench, export checks and scripts all call these.
BatchNorm folding lives with the kernels' reference twins (:func:`fastdeeplab.kernels.reference.fold_bn`).

Convention: ``confusion[t, p]`` counts pixels of ground-truth class ``t`` predicted as ``p`` (rows are the
truth). Pixels whose target equals ``ignore_index`` (255 in VOC and Cityscapes) are not counted.

``IoU_c = TP / (TP + FP + FN)``. A class with ``TP + FP + FN = 0`` — absent from the ground truth and never
predicted — has IoU ``NaN`` and does not enter the mean; a class that is absent but predicted scores 0.
This is the PASCAL VOC / Cityscapes convention (mIoU over the classes present in the confusion matrix).

The functions are independent of the model and the data, so other code (the benchmark suite) can score one
prediction against another:

>>> import torch
>>> a = torch.tensor([[0, 1], [1, 1]]); b = torch.tensor([[0, 1], [0, 1]])
>>> round(miou(a, b, num_classes=2), 4)           # IoU 1/2 for class 0, 2/3 for class 1
0.5833
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "ConfusionMatrix",
    "confusion_matrix",
    "iou_per_class",
    "logits_of",
    "max_rel_error",
    "miou",
    "pixel_agreement",
    "scores_from_confusion",
]

IGNORE_INDEX = 255
"""The label of pixels that are not scored (object boundaries in VOC, void in Cityscapes)."""


def logits_of(output: Any) -> Tensor:
    """The ``[N, K, H, W]`` logits in a model's output: the ``"out"`` entry of a dict (torchvision's contract),
    the first element of a tuple or list, a NumPy array (runtime sessions), or the tensor itself."""
    if isinstance(output, Mapping):
        output = output["out"]
    elif isinstance(output, (tuple, list)):
        output = output[0]
    if isinstance(output, np.ndarray):
        output = torch.from_numpy(output)
    if not isinstance(output, Tensor) or output.dim() != 4:
        raise TypeError(f"expected [N, K, H, W] logits or {{'out': logits}}, got {type(output).__name__}"
                        + (f" of shape {tuple(output.shape)}" if isinstance(output, Tensor) else ""))
    return output


def max_rel_error(out: Tensor | np.ndarray, ref: Tensor | np.ndarray) -> float:
    """``max|out - ref| / max|ref|`` over all elements, computed in float64 (``max|out - ref|`` when the
    reference is all zeros). ``inf`` when ``out`` has NaN/inf where ``ref`` is finite."""
    out = torch.as_tensor(out).detach().cpu().double()
    ref = torch.as_tensor(ref).detach().cpu().double()
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} differs from the reference's {tuple(ref.shape)}")
    if out.numel() == 0:
        return 0.0
    if not torch.isfinite(out[torch.isfinite(ref)]).all():
        return float("inf")
    finite = torch.isfinite(ref)
    scale = ref[finite].abs().max().item() if finite.any() else 0.0
    err = (out - ref)[finite].abs().max().item() if finite.any() else 0.0
    return err / scale if scale > 0 else err


def pixel_agreement(pred: Tensor | np.ndarray, target: Tensor | np.ndarray,
                    ignore_index: int | None = IGNORE_INDEX) -> float:
    """Fraction of pixels where the class maps ``pred`` and ``target`` (``[N, H, W]`` ints) agree, pixels
    labelled ``ignore_index`` in ``target`` left out (``NaN`` when none is left)."""
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from the target's {tuple(target.shape)}")
    valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    total = int(valid.sum())
    return float(((pred == target) & valid).sum()) / total if total else float("nan")


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = IGNORE_INDEX) -> Tensor:
    """``[K, K]`` int64 confusion matrix of integer class maps of the same shape (any shape, e.g. ``[N, H, W]``).

    Rows are ground truth, columns prediction. Target pixels equal to ``ignore_index`` are skipped; any
    other value outside ``[0, K)`` in either map raises, since it means the labels and the model disagree
    on the class set (e.g. Cityscapes label ids that were not mapped to train ids).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    if pred.is_floating_point() or target.is_floating_point():
        raise TypeError("confusion_matrix takes integer class maps; apply argmax over the class dimension first")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long().to(target.device)
    if ignore_index is not None:
        keep = target != ignore_index
        target, pred = target[keep], pred[keep]
    for name, values in (("target", target), ("prediction", pred)):
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_classes):
            bad = values[(values < 0) | (values >= num_classes)].unique()[:10].tolist()
            raise ValueError(f"{name} holds class ids {bad} outside 0..{num_classes - 1}"
                             + (f" (ignore_index is {ignore_index})" if name == "target" else ""))
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_per_class(confusion: Tensor) -> Tensor:
    """``[K]`` float64 IoU of each class from a ``[K, K]`` confusion matrix; NaN where TP + FP + FN = 0."""
    conf = confusion.double()
    tp = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))


def scores_from_confusion(confusion: Tensor) -> dict[str, Any]:
    """Scores of a ``[K, K]`` confusion matrix (rows = truth).

    Returns ``{"mIoU": float, "per_class_iou": list[float] (NaN for absent classes), "pixel_accuracy":
    float, "mean_accuracy": float (mean recall over classes present in the truth), "confusion": [K, K]
    int64 tensor}``. Scores are NaN when the matrix is empty.
    """
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"expected a square [K, K] confusion matrix, got shape {tuple(confusion.shape)}")
    confusion = confusion.detach().cpu().long()
    conf = confusion.double()
    iou = iou_per_class(confusion)
    present = ~torch.isnan(iou)
    total = conf.sum()
    truth = conf.sum(1)
    recall = conf.diagonal()[truth > 0] / truth[truth > 0]
    return {
        "mIoU": float(iou[present].mean()) if present.any() else math.nan,
        "per_class_iou": iou.tolist(),
        "pixel_accuracy": float(conf.diagonal().sum() / total) if total > 0 else math.nan,
        "mean_accuracy": float(recall.mean()) if recall.numel() else math.nan,
        "confusion": confusion,
    }


def miou(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = IGNORE_INDEX) -> float:
    """Mean IoU of class map ``pred`` against ``target`` (same shape); NaN if no pixel is scored."""
    return scores_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))["mIoU"]


class ConfusionMatrix:
    """Accumulates a confusion matrix over batches (on the device of the first update).

    ``update(pred, target)`` takes integer class maps of one shape, e.g. ``[N, H, W]``.

    >>> cm = ConfusionMatrix(num_classes=21)
    >>> cm.update(logits.argmax(1), labels)          # doctest: +SKIP
    >>> cm.compute()["mIoU"]                          # doctest: +SKIP
    """

    def __init__(self, num_classes: int, ignore_index: int | None = IGNORE_INDEX) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add integer class maps ``pred`` and ``target`` of the same shape."""
        counts = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        if self.matrix.device != counts.device:
            self.matrix = self.matrix.to(counts.device)
        self.matrix += counts

    def reset(self) -> None:
        self.matrix.zero_()

    def all_reduce(self) -> None:
        """Sum the matrices of every process (``torch.distributed``); a no-op when not distributed."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.matrix)

    def compute(self) -> dict[str, Any]:
        """:func:`scores_from_confusion` of the accumulated matrix."""
        return scores_from_confusion(self.matrix)
