"""The bench's weights: torchvision names resolve (short, long, any case) and are taken only from the cache
unless a download is allowed; synthetic scenes have thin structures that a coarse output stride loses; the
synthetic model is trained once and then loaded from the cache."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a source-checkout package, not installed with fastdeeplab
    sys.path.insert(0, str(ROOT))

from bench import _synthetic  # noqa: E402
from bench._weights import (  # noqa: E402
    WEIGHT_KINDS,
    resolve_weights,
    torchvision_reference,
    torchvision_weights_enum,
)
from fastdeeplab.data.synthetic import synthetic_sample  # noqa: E402


def _no_calibration() -> torch.Tensor:
    raise AssertionError("random weights were not asked for")


@pytest.mark.parametrize("name", ["COCO_WITH_VOC_LABELS_V1", "coco_with_voc_labels_v1", "DEFAULT",
                                  "DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1"])
def test_torchvision_names_resolve(name: str) -> None:
    member = torchvision_weights_enum(name, 50)
    assert type(member).__name__ == "DeepLabV3_ResNet50_Weights"
    assert member.name == "COCO_WITH_VOC_LABELS_V1"  # DEFAULT is an alias of it


@pytest.mark.parametrize("name", ["COCO", "VOC_V2", "DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1"])
def test_unknown_names_list_the_valid_ones(name: str) -> None:
    with pytest.raises(ValueError, match="COCO_WITH_VOC_LABELS_V1") as info:
        torchvision_weights_enum(name, 50)
    assert "DEFAULT" in str(info.value)


@pytest.fixture
def empty_hub(tmp_path: Path) -> Path:
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


def test_not_cached_is_refused_without_download(empty_hub: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--download-weights") as info:
        resolve_weights("COCO_WITH_VOC_LABELS_V1", "resnet50", 0, _no_calibration, download=False)
    assert str(empty_hub) in str(info.value)  # says where it looked


def test_cached_torchvision_weights_are_used(empty_hub: Path) -> None:
    """A state dict at the hub cache's file name is loaded as kind 'torchvision' (no network involved)."""
    member = torchvision_weights_enum("COCO_WITH_VOC_LABELS_V1", 50)
    state = torchvision_reference(50, 21, 8).state_dict()
    path = empty_hub / "checkpoints" / Path(member.url).name
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    for spec in ("coco_with_voc_labels_v1", None):  # by name, and the default when cached
        w = resolve_weights(spec, "resnet50", 0, _no_calibration)
        assert w.kind == "torchvision" and w.kind in WEIGHT_KINDS and w.real
        assert w.as_json()["accuracy_meaningful"] is True
        assert torch.equal(w.state_dict["classifier.4.weight"], state["classifier.4.weight"])


def test_random_weights_are_marked_not_meaningful() -> None:
    w = resolve_weights("random", "resnet50", 0, lambda: torch.randn(2, 3, 33, 33))
    assert w.kind == "random" and not w.cross_stride_meaningful
    assert w.as_json()["accuracy_meaningful"] is False


def test_thin_structures_are_drawn_and_default_is_unchanged() -> None:
    plain, plain_label = synthetic_sample(5, (64, 64), 4)
    same, same_label = synthetic_sample(5, (64, 64), 4, thin_structures=0)
    assert np.array_equal(plain, same) and np.array_equal(plain_label, same_label)
    image, label = synthetic_sample(5, (64, 64), 4, thin_structures=3)
    changed = (label != plain_label) & (label != 255)
    assert changed.sum() > 40  # three bars of 1-3 px over most of the image


def _lost_at(stride: int, label: np.ndarray) -> float:
    """Fraction of labelled pixels a class map sampled every ``stride`` pixels gets wrong."""
    coarse = torch.from_numpy(label[::stride, ::stride].astype(np.float32))[None, None]
    up = torch.nn.functional.interpolate(coarse, size=label.shape, mode="nearest")[0, 0].numpy()
    valid = label != 255
    return float((up[valid] != label[valid]).mean())


def test_thin_structures_make_output_stride_matter() -> None:
    lost = {16: 0.0, 8: 0.0}
    for i in range(8):
        _, label = synthetic_sample(i, (64, 64), 4, thin_structures=3)
        for s in lost:
            lost[s] += _lost_at(s, label) / 8
    assert lost[16] > 1.3 * lost[8] > 0


def test_synthetic_model_is_trained_once_then_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTDEEPLAB_CACHE", str(tmp_path))
    spec = _synthetic.SyntheticSpec(size=33, batch=2, iterations_os16=2, iterations_os8=1, held_out_images=2)
    lines: list[str] = []
    state, info, path = _synthetic.load_or_train(50, spec, lines.append)
    assert path.is_file() and path.parent == tmp_path
    assert any("iteration 2/2" in line for line in lines)
    assert 0.0 <= info["held_out_miou_eager"]["os8"] <= 1.0 and info["spec"]["size"] == 33
    torchvision_reference(50, spec.num_classes, 16, state)  # torchvision names, strict load
    again, info2, _ = _synthetic.load_or_train(50, spec, lines.append)
    assert "loaded" in lines[-1] and info2 == info
    assert all(torch.equal(state[k], again[k]) for k in state)
    images, labels = _synthetic.held_out_set(spec)
    train_images, _ = _synthetic.scenes(range(2), spec, seed=spec.train_seed)
    assert images.shape == (2, 3, 33, 33) and labels.shape == (2, 33, 33)
    assert not torch.equal(images, train_images)  # held out: another seed
