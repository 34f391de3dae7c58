"""The training loop: it learns, freezes BN, resumes exactly, and trains data-parallel under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from itertools import islice
from pathlib import Path

import pytest
import torch
from _voc import NUM_CLASSES, SIZE, make_voc, single_thread, tiny_train_config  # noqa: F401  (fixture)
from torch.nn.modules.batchnorm import _BatchNorm

import fastdeeplab
from fastdeeplab import cli
from fastdeeplab.data import VOCSegmentation
from fastdeeplab.training import (
    ResumableBatchSampler,
    TrainConfig,
    bootstrap_indices,
    load_config,
    overfit_demo,
    segmentation_loss,
)

pytestmark = pytest.mark.usefixtures("single_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return make_voc(tmp_path_factory.mktemp("voc"), num_images=4)


def _bn_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.clone()
            for name, m in model.named_modules() if isinstance(m, _BatchNorm)
            for key, value in list(m.state_dict().items())}


# --------------------------------------------------------------------------------------------------
# Configuration and data order (no training)
# --------------------------------------------------------------------------------------------------
def test_configs_in_the_repository_load():
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert files, "configs/*.yaml missing"
    for path in files:
        cfg = load_config(path)
        assert cfg.stages and cfg.total_iterations > 0, path


def test_paper_defaults():
    cfg = TrainConfig()
    assert [(s.output_stride, s.lr, s.iterations, s.freeze_bn) for s in cfg.stages] == [
        (16, 0.007, 30_000, False), (8, 0.001, 30_000, True)]
    assert cfg.momentum == 0.9 and cfg.poly_power == 0.9 and cfg.crop_size == 513
    assert cfg.bn_momentum == pytest.approx(3e-4) and cfg.scale_range == (0.5, 2.0)


def test_unknown_option_lists_valid_ones(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown training option.*learning_rate.*valid options: .*weight_decay"):
        load_config(path)
    with pytest.raises(ValueError, match="unknown stage option.*lr_power"):
        load_config(stages=[{"iterations": 1, "lr": 0.1, "lr_power": 2}])


def test_sampler_resumes_mid_stream_and_shards_disjointly():
    full = list(islice(iter(ResumableBatchSampler(10, 2, seed=3)), 7))
    resumed = list(islice(iter(ResumableBatchSampler(10, 2, seed=3, start_iteration=4)), 3))
    assert resumed == full[4:]  # same images, same augmentation seeds
    assert sorted(i for batch in full[:5] for i, _ in batch) == list(range(10))  # one epoch = every image once
    ranks = [list(islice(iter(ResumableBatchSampler(10, 2, rank=r, world_size=2, seed=3)), 2)) for r in (0, 1)]
    seen = [{i for batch in r for i, _ in batch} for r in ranks]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 8  # drop_last: 10 // 2 // 2 batches of 2
    with pytest.raises(ValueError, match="cannot fill a batch of 8"):
        ResumableBatchSampler(10, 8, world_size=2)


def test_bootstrapping_duplicates_images_with_hard_classes(voc):
    ds = VOCSegmentation(voc, "train")
    has_two = [i for i in range(len(ds)) if (ds.load_label(i) == 2).any()]
    assert 0 < len(has_two) < len(ds)
    indices = bootstrap_indices(ds, classes=[2], factor=3)
    assert sorted(indices) == sorted(list(range(len(ds))) + has_two * 2)


def test_loss_ignores_255_and_handles_all_ignored():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    labels = torch.full((1, 4, 4), 255)
    loss = segmentation_loss({"out": logits}, labels)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None
    labels[0, 0, 0] = 1
    expected = torch.nn.functional.cross_entropy(logits[:, :, 0, 0], torch.tensor([1]))
    aux = torch.zeros(1, 3, 4, 4)
    total = segmentation_loss({"out": logits, "aux": aux}, labels, aux_weight=0.5)
    assert total.item() == pytest.approx(expected.item() + 0.5 * torch.log(torch.tensor(3.0)).item(), rel=1e-5)


# --------------------------------------------------------------------------------------------------
# Training runs (ResNet-50 DeepLabv3 on 33-pixel crops)
# --------------------------------------------------------------------------------------------------
def test_short_training_run_lowers_the_loss(voc, tmp_path):
    """Through the command line and a YAML config, as a user would run it."""
    config = tmp_path / "tiny.yaml"
    config.write_text(textwrap.dedent(f"""\
        dataset: voc
        train_split: train
        num_classes: {NUM_CLASSES}
        crop_size: {SIZE}
        scale_range: [1.0, 1.0]
        batch_size: 4
        num_workers: 0
        bn_momentum: 0.1
        stages:
          - {{iterations: 8, lr: 0.02, output_stride: 16}}
        """))
    out = tmp_path / "run"
    rc = cli.main(["train", "--config", str(config), "--data", str(voc), "--out", str(out), "--no-progress",
                   "--set", "checkpoint_every=0"])
    assert rc == 0
    losses = json.loads((out / "history.json").read_text())["history"]["loss"]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses
    assert (out / "model_final.pt").is_file() and (out / "checkpoint.pt").is_file()


def test_frozen_bn_stage_leaves_running_statistics_unchanged(voc, tmp_path):
    torch.manual_seed(0)
    start = fastdeeplab.deeplabv3_resnet50(num_classes=NUM_CLASSES, output_stride=16, multi_grid=(1, 2, 4))
    for m in start.modules():  # non-trivial statistics, so "unchanged" means something
        if isinstance(m, _BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(7)
    weights = tmp_path / "start.pt"
    torch.save(start.state_dict(), weights)
    before = _bn_state(start)
    result = fastdeeplab.train(**tiny_train_config(
        voc, None, weights=str(weights),
        stages=[{"iterations": 2, "lr": 0.01, "output_stride": 16, "freeze_bn": True}]))
    after = _bn_state(result.model)
    assert before.keys() == after.keys() and len(before) > 5 * 53  # every BN layer, every buffer and parameter
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"{len(changed)} BN tensors changed, e.g. {changed[:3]}"
    conv = result.model.backbone.layer4[0].conv2.weight
    assert not torch.equal(conv, start.backbone.layer4[0].conv2.weight)  # the rest did train
    assert all(not m.weight.requires_grad for m in result.model.modules() if isinstance(m, _BatchNorm))


def test_resume_continues_exactly_like_an_uninterrupted_run(voc, tmp_path):
    """Stop after iteration 1 (mid stage 1), again after 2 (stage boundary), then finish: same weights,
    same losses, same learning rates as one uninterrupted run. Dropout and aux loss are on."""
    stages = [{"iterations": 2, "lr": 0.01, "output_stride": 16},
              {"iterations": 2, "lr": 0.004, "output_stride": 8, "freeze_bn": True}]
    base = dict(stages=stages, aux_loss=True, checkpoint_every=1)
    whole = fastdeeplab.train(**tiny_train_config(voc, tmp_path / "whole", **base))
    parts = []
    for stop_after in (1, 1, None):
        parts.append(fastdeeplab.train(**tiny_train_config(voc, tmp_path / "parts", stop_after=stop_after, **base)))
    assert [p.iteration for p in parts] == [1, 2, 4]
    assert [p.finished for p in parts] == [False, False, True]
    checkpoint = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    assert checkpoint["iteration"] == 4 and checkpoint["stage"] == 2

    final = parts[-1]
    assert final.history["iteration"] == [1, 2, 3, 4]
    assert final.history["lr"] == whole.history["lr"]
    assert final.history["loss"] == whole.history["loss"]
    expected, got = whole.model.state_dict(), final.model.state_dict()
    mismatched = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not mismatched, f"{len(mismatched)} tensors differ after resuming, e.g. {mismatched[:3]}"
    assert whole.history["lr"][0] == 0.01 and whole.history["lr"][2] == 0.004  # poly restarts per stage
    assert whole.history["lr"][1] == pytest.approx(0.01 * 0.5 ** 0.9)

    reloaded = fastdeeplab.load_checkpoint(
        fastdeeplab.deeplabv3_resnet50(num_classes=NUM_CLASSES, aux_loss=True, multi_grid=(1, 2, 4)),
        tmp_path / "parts" / "model_final.pt")
    assert torch.equal(reloaded.classifier[-1].weight, final.model.classifier[-1].weight)


_DDP_SCRIPT = '''
import json, os, sys
import torch, torch.distributed as dist
from fastdeeplab.training import SyncBatchNorm, train

config, out = json.loads(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()

# 1. SyncBatchNorm on CPU: each rank holds half of a batch; outputs, input gradients, weight gradients and
#    running statistics must equal those of a plain BatchNorm2d over the whole batch.
g = torch.Generator().manual_seed(0)
x_all, w_all = torch.randn(4, 3, 5, 5, generator=g) * 3 + 1, torch.randn(4, 3, 5, 5, generator=g)
ref = torch.nn.BatchNorm2d(3, momentum=0.3)
sync = SyncBatchNorm(3, momentum=0.3)
x_ref = x_all.clone().requires_grad_()
y_ref = ref(x_ref)
(y_ref * w_all).sum().backward()
x = x_all[2 * rank: 2 * rank + 2].clone().requires_grad_()
y = sync(x)
(y * w_all[2 * rank: 2 * rank + 2]).sum().backward()
grad_w = sync.weight.grad.clone()
dist.all_reduce(grad_w)
errors = {
    "out": (y - y_ref[2 * rank: 2 * rank + 2]).abs().max().item(),
    "grad_x": (x.grad - x_ref.grad[2 * rank: 2 * rank + 2]).abs().max().item(),
    "grad_weight": (grad_w - ref.weight.grad).abs().max().item(),
    "running_mean": (sync.running_mean - ref.running_mean).abs().max().item(),
    "running_var": (sync.running_var - ref.running_var).abs().max().item(),
}

# 2. Two iterations of data-parallel training.
result = train(**config)
torch.save({"state": result.model.state_dict(), "loss": result.history["loss"], "errors": errors,
            "sync_bn": sum(isinstance(m, SyncBatchNorm) for m in result.model.modules())},
           os.path.join(out, f"rank{rank}.pt"))
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_torchrun_two_processes_end_with_identical_weights(voc, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(_DDP_SCRIPT)
    # Batch 1 per process: the image-pooling BN sees one value per channel per process, which only works
    # because the statistics are synchronised over both processes.
    config = tiny_train_config(voc, tmp_path / "run", batch_size=1, checkpoint_every=1,
                               stages=[{"iterations": 2, "lr": 0.01, "output_stride": 16}])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), json.dumps(config), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for r in ranks:
        assert max(r["errors"].values()) < 1e-4, r["errors"]
        assert r["sync_bn"] > 50
    assert ranks[0]["loss"] == ranks[1]["loss"] and len(ranks[0]["loss"]) == 2
    differ = [k for k, v in ranks[0]["state"].items() if not torch.equal(v, ranks[1]["state"][k])]
    assert not differ, f"{len(differ)} tensors differ between ranks, e.g. {differ[:3]}"
    start = fastdeeplab.deeplabv3_resnet50(num_classes=NUM_CLASSES, multi_grid=(1, 2, 4)).state_dict()
    assert not torch.equal(start["classifier.4.weight"], ranks[0]["state"]["classifier.4.weight"])
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2


@pytest.mark.slow
def test_overfit_small_reaches_miou_0_9(tmp_path):
    """The CI-sized overfit run: 4 synthetic 48-pixel images, 3 classes, 50 iterations at output stride 8.

    BN momentum 0.5 lets the running statistics follow the last few batches, so the eval-mode score
    reflects what was learned (the full demo, ``fastdeeplab train --overfit-demo``, uses both stages)."""
    summary = overfit_demo(tmp_path, num_images=4, image_size=48, num_classes=3, batch_size=4, bn_momentum=0.5,
                           stages=[{"iterations": 50, "lr": 0.02, "output_stride": 8}], progress=False)
    assert summary["loss_last5_mean"] < 0.25 * summary["loss_first5_mean"]
    assert summary["mIoU"] >= 0.9, summary["per_class_iou"]
    assert json.loads((tmp_path / "overfit.json").read_text())["mIoU"] == summary["mIoU"]
