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

from collections.abc import Sequence

from torch import Tensor

from fastdeeplab.metrics import IGNORE_INDEX, ConfusionMatrix, max_rel_error, pixel_agreement

__all__ = ["AccuracyMeter", "IGNORE_INDEX", "accuracy_columns", "max_rel_logit_error", "pixel_agreement"]

# The one home of these numerics is fastdeeplab.metrics; the bench keeps its historical names.
max_rel_logit_error = max_rel_error


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


def accuracy_columns(outputs: Sequence[Tensor], ref_same_os: Sequence[Tensor], ref_os8: Sequence[Tensor],
                     num_classes: int) -> dict[str, float]:
    """The accuracy columns of one row, from per-batch logits ``[N, K, H, W]``.

    Args:
        outputs: the implementation's logits, one tensor per batch of photographs.
        ref_same_os: float32 torchvision logits at the row's output stride, same batches.
        ref_os8: float32 torchvision logits at output stride 8 (its argmax is the ground truth).
    Returns:
        ``max_rel_logit_error`` (vs ``ref_same_os``), ``pixel_agreement`` and ``miou_vs_reference`` (vs the
        OS8 argmax), ``pixel_agreement_same_os`` (vs the ``ref_same_os`` argmax).
    """
    if not (len(outputs) == len(ref_same_os) == len(ref_os8)):
        raise ValueError(f"{len(outputs)} outputs but {len(ref_same_os)} / {len(ref_os8)} reference batches")
    vs_os8 = AccuracyMeter(num_classes)
    vs_same = AccuracyMeter(num_classes)
    for out, same, os8 in zip(outputs, ref_same_os, ref_os8, strict=True):
        vs_os8.update(out, ref_same_os=same, ref_labels=os8.argmax(1))
        vs_same.update(out, ref_same_os=None, ref_labels=same.argmax(1))
    result = vs_os8.result()
    result["pixel_agreement_same_os"] = vs_same.result()["pixel_agreement"]
    return result
