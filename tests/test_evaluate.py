"""Confusion matrix and mIoU by hand; multi-scale + flip inference; the eval command."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _voc import NUM_CLASSES, make_voc, single_thread  # noqa: F401  (fixture)

import fastdeeplab
from fastdeeplab import cli
from fastdeeplab.data import VOCSegmentation
from fastdeeplab.evaluation import build_inference_model, segment
from fastdeeplab.metrics import ConfusionMatrix, confusion_matrix, miou, scores_from_confusion

pytestmark = pytest.mark.usefixtures("single_thread")

# --------------------------------------------------------------------------------------------------
# Metrics, worked out by hand
# --------------------------------------------------------------------------------------------------
TARGET = torch.tensor([[0, 0, 1, 1],
                       [0, 255, 1, 2],
                       [2, 2, 255, 1]])
PRED = torch.tensor([[0, 1, 1, 1],
                     [0, 0, 1, 2],
                     [2, 2, 2, 1]])
# Scored pixels (the two 255s are skipped, whatever was predicted there):
#   truth 0: predicted 0, 1, 0      truth 1: 1, 1, 1, 1      truth 2: 2, 2, 2      class 3: nowhere
HAND_CONFUSION = torch.tensor([[2, 1, 0, 0],
                               [0, 4, 0, 0],
                               [0, 0, 3, 0],
                               [0, 0, 0, 0]])
# IoU = TP / (row + column - TP):  class 0: 2 / (3 + 2 - 2),  class 1: 4 / (4 + 5 - 4),  class 2: 3 / 3
HAND_IOU = [2 / 3, 4 / 5, 1.0, math.nan]


def test_confusion_matrix_matches_hand_count():
    conf = confusion_matrix(PRED, TARGET, num_classes=4)
    assert conf.dtype == torch.int64
    assert torch.equal(conf, HAND_CONFUSION)


def test_scores_match_hand_computation():
    scores = scores_from_confusion(HAND_CONFUSION)
    for got, want in zip(scores["per_class_iou"], HAND_IOU, strict=True):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)
    assert scores["mIoU"] == pytest.approx((2 / 3 + 4 / 5 + 1) / 3)  # the absent class is left out
    assert scores["pixel_accuracy"] == pytest.approx(9 / 10)
    assert scores["mean_accuracy"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert miou(PRED, TARGET, 4) == pytest.approx(scores["mIoU"])


def test_class_predicted_but_absent_from_truth_scores_zero():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])
    iou = scores_from_confusion(confusion_matrix(pred, target, 3))["per_class_iou"]
    assert iou == pytest.approx([1 / 2, 1.0, 0.0])


def test_accumulator_sums_batches_and_checks_ids():
    cm = ConfusionMatrix(4)
    cm.update(PRED[:1], TARGET[:1])
    cm.update(PRED[1:], TARGET[1:])
    assert torch.equal(cm.matrix, HAND_CONFUSION)
    with pytest.raises(ValueError, match=r"target holds class ids \[7\] outside 0..3"):
        cm.update(torch.tensor([0]), torch.tensor([7]))
    with pytest.raises(TypeError, match="argmax"):
        cm.update(torch.rand(4), TARGET.flatten()[:4])


def test_empty_matrix_gives_nan():
    scores = scores_from_confusion(torch.zeros(3, 3, dtype=torch.int64))
    assert math.isnan(scores["mIoU"]) and math.isnan(scores["pixel_accuracy"])


# --------------------------------------------------------------------------------------------------
# Inference on a real (randomly initialised) ResNet-50 DeepLabv3 at tiny sizes
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return fastdeeplab.deeplabv3_resnet50(num_classes=NUM_CLASSES, output_stride=16).eval()


@pytest.fixture(scope="module")
def mixed_sizes(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc"), num_images=3, size=[(33, 41), (36, 33), (33, 41)])


def test_flip_averaging_is_mirror_equivariant(model):
    x = torch.randn(2, 3, 33, 45)
    a = segment(model, x, scales=(0.75, 1.0), flip=True)
    b = segment(model, x.flip(-1), scales=(0.75, 1.0), flip=True)
    assert a.shape == (2, NUM_CLASSES, 33, 45)
    torch.testing.assert_close(b, a.flip(-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.sum(1), torch.ones(2, 33, 45))  # averaged probabilities


def test_multiscale_flip_evaluation_is_valid(model, mixed_sizes):
    ds = VOCSegmentation(mixed_sizes, "val")
    scores = fastdeeplab.evaluate(model, ds, scales=(0.5, 0.75, 1.0, 1.25), flip=True, progress=False)
    labels = torch.cat([ds[i][1].flatten() for i in range(len(ds))])
    conf = scores["confusion"]
    assert conf.shape == (NUM_CLASSES, NUM_CLASSES)
    assert int(conf.sum()) == int((labels != 255).sum())  # every scored pixel counted once
    assert 0.0 <= scores["mIoU"] <= 1.0 and 0.0 <= scores["pixel_accuracy"] <= 1.0
    iou = torch.tensor(scores["per_class_iou"])
    absent = (conf.sum(0) + conf.sum(1)) == 0
    assert torch.equal(torch.isnan(iou), absent)
    assert scores["mIoU"] == pytest.approx(float(iou[~absent].mean()))
    assert scores["num_images"] == 3 and scores["flip"] is True
    assert model.training is False


def test_batches_of_mixed_sizes_equal_one_by_one(model, mixed_sizes):
    ds = VOCSegmentation(mixed_sizes, "val")
    one = fastdeeplab.evaluate(model, ds, batch_size=1, progress=False)
    three = fastdeeplab.evaluate(model, ds, batch_size=3, progress=False)
    assert torch.equal(one["confusion"], three["confusion"])


def test_evaluate_restores_module_modes(model, mixed_sizes):
    model.train()
    model.backbone.bn1.eval()  # e.g. frozen BN during training
    try:
        fastdeeplab.evaluate(model, VOCSegmentation(mixed_sizes, "val"), progress=False)
        assert model.training and model.classifier.training and not model.backbone.bn1.training
    finally:
        model.eval()


def test_num_classes_must_match_the_model(model, mixed_sizes):
    with pytest.raises(ValueError, match="num_classes=21 but the model outputs 3 classes"):
        fastdeeplab.evaluate(model, VOCSegmentation(mixed_sizes, "val"), num_classes=21, progress=False)


def test_eval_command_rebuilds_the_trained_architecture(tmp_path, mixed_sizes, capsys):
    """A training checkpoint records multi-grid (1, 2, 4); ``fastdeeplab eval`` must rebuild it that way."""
    torch.manual_seed(1)
    trained = fastdeeplab.deeplabv3_resnet50(num_classes=NUM_CLASSES, output_stride=16, multi_grid=(1, 2, 4))
    weights = tmp_path / "model_final.pt"
    torch.save({"model": trained.state_dict(),
                "model_config": {"name": "deeplabv3_resnet50",
                                 "kwargs": {"num_classes": NUM_CLASSES, "multi_grid": [1, 2, 4]}}}, weights)
    rebuilt = build_inference_model(weights=str(weights), output_stride=16)
    assert rebuilt.multi_grid == (1, 2, 4)
    expected = fastdeeplab.evaluate(trained.eval(), VOCSegmentation(mixed_sizes, "val"), flip=True, progress=False)

    out = tmp_path / "scores.json"
    rc = cli.main(["eval", "--data", str(mixed_sizes), "--weights", str(weights), "--flip", "--workers", "0",
                   "--json", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    saved = json.loads(out.read_text())
    assert saved["confusion"] == expected["confusion"].tolist()
    assert saved["mIoU"] == pytest.approx(expected["mIoU"])
    assert saved["output_stride"] == 16
    printed = capsys.readouterr().out
    # one unit on the console: percent, with the output stride used
    assert f"mIoU {100 * expected['mIoU']:.2f}%" in printed and "output stride 16" in printed, printed


def test_optimized_model_evaluates_like_the_original(model, mixed_sizes):
    """Any model with the ``{"out": logits}`` contract works, e.g. the BN-folded inference model."""
    optimize = pytest.importorskip("fastdeeplab.optimization").optimize
    fast = optimize(model, backend="torch")
    ds = VOCSegmentation(mixed_sizes, "val")
    a = fastdeeplab.evaluate(model, ds, scales=(0.75, 1.0), flip=True, progress=False)
    b = fastdeeplab.evaluate(fast, ds, scales=(0.75, 1.0), flip=True, progress=False)
    assert int(a["confusion"].sum()) == int(b["confusion"].sum())
    assert b["mIoU"] == pytest.approx(a["mIoU"], abs=0.01)
