"""Accuracy columns of the benchmark: how far an implementation's output is from the reference's.

Every row of the suite and ``tests/test_bench_accuracy.py`` call these functions; there is no other copy.

* ``max_rel_logit_error``: ``max|out - ref| / max|ref|`` against the torchvision model at the *same*
  output stride and float32 — a bug detector (fp32 implementations sit near 1e-6).
* ``pixel_agreement``: fraction of pixels whose argmax equals the torchvision **OS8** float32 argmax — the
  ground truth for every row, OS16 rows included, so the accuracy OS16 gives up shows here.
* ``miou_vs_reference``: mean IoU of the argmax with that OS8 prediction taken as ground truth, scored by
  :mod:`fastdeeplab.metrics` (the same confusion matrix and mIoU as ``fastdeeplab eval``).

>>> import torch
>>> ref = torch.randn(1, 3, 4, 4)
>>> meter = AccuracyMeter(num_classes=3)
>>> meter.update(ref, ref_same_os=ref, ref_labels=ref.argmax(1))
>>> meter.result()["pixel_agreement"]
1.0
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdeeplab.metrics import ConfusionMatrix

__all__ = ["AccuracyMeter", "IGNORE_INDEX", "max_rel_logit_error", "pixel_agreement"]

IGNORE_INDEX = 255


def max_rel_logit_error(out: Tensor, ref: Tensor) -> float:
    """``max|out - ref| / max|ref|`` over all elements, both ``[N, K, H, W]``, computed in float32.

    ``inf`` when the output has NaN/inf where the reference has none.
    """
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} differs from the reference's {tuple(ref.shape)}")
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("inf")
    scale = ref.abs().max().item()
    err = (out - ref).abs().max().item()
    return err / scale if scale > 0 else err


def pixel_agreement(pred: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> float:
    """Fraction of pixels where the class maps ``pred`` and ``target`` (``[N, H, W]`` ints) agree,
    pixels labelled ``ignore_index`` in ``target`` left out."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from the target's {tuple(target.shape)}")
    valid = target != ignore_index
    total = int(valid.sum())
    return float(((pred == target) & valid).sum()) / total if total else float("nan")


class AccuracyMeter:
    """Accumulates the accuracy columns over batches of logits.

    ``update(out, ref_same_os=..., ref_labels=...)`` takes the implementation's logits ``[N, K, H, W]``,
    the float32 reference logits at the same output stride (for the logit error) and the reference OS8
    argmax ``[N, H, W]`` (for agreement and mIoU). ``result()`` returns ``max_rel_logit_error`` (worst
    batch), ``pixel_agreement`` (over all pixels) and ``miou_vs_reference``.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.max_error = 0.0
        self.agree = 0
        self.pixels = 0
        self.conf = ConfusionMatrix(num_classes, IGNORE_INDEX)

    def update(self, out: Tensor, *, ref_same_os: Tensor | None, ref_labels: Tensor) -> None:
        if ref_same_os is not None:
            self.max_error = max(self.max_error, max_rel_logit_error(out, ref_same_os))
        pred = out.float().argmax(1)
        if pred.shape != ref_labels.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from the labels' {tuple(ref_labels.shape)}")
        valid = ref_labels != IGNORE_INDEX
        self.agree += int(((pred == ref_labels) & valid).sum())
        self.pixels += int(valid.sum())
        self.conf.update(pred, ref_labels)

    def result(self) -> dict[str, float]:
        return {
            "max_rel_logit_error": self.max_error,
            "pixel_agreement": self.agree / self.pixels if self.pixels else float("nan"),
            "miou_vs_reference": self.conf.compute()["mIoU"],
        }
