"""The bench's weights: torchvision names resolve (short, long, any case) and are taken only from the cache
unless a download is allowed; synthetic scenes have thin structures that a coarse output stride loses; the
synthetic model is trained once and then loaded from the cache."""

from __future__ import annotations

import sys
from dataclasses import replace
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


# -- backbones: one table (fastdeeplab.weights.BACKBONES) behind every name ----------------------------------
def test_mobilenet_names_and_checkpoints(tmp_path: Path) -> None:
    from fastdeeplab.weights import BACKBONES, backbone_spec

    assert list(BACKBONES) == ["resnet50", "resnet101", "mobilenet_v3_large"] and backbone_spec(50).name == "resnet50"
    member = torchvision_weights_enum("default", "mobilenet_v3_large")
    assert type(member).__name__ == "DeepLabV3_MobileNet_V3_Large_Weights" and member.name == "COCO_WITH_VOC_LABELS_V1"
    with pytest.raises(ValueError, match="valid torchvision names for mobilenet_v3_large"):
        torchvision_weights_enum("COCO", "mobilenet_v3_large")
    with pytest.raises(ValueError, match=r"--backbone vgg16: expected one of resnet50, resnet101, mobilenet_v3_large"):
        backbone_spec("vgg16")
    # a checkpoint says which backbone it holds; the wrong --backbone is refused naming the right one
    state = torchvision_reference("mobilenet_v3_large", 5, 16).state_dict()
    path = tmp_path / "mnv3.pt"
    torch.save(state, path)
    w = resolve_weights(str(path), "mobilenet_v3_large", 0, _no_calibration)
    assert (w.kind, w.backbone, w.num_classes, w.depth) == ("checkpoint", "mobilenet_v3_large", 5, None)
    torchvision_reference("mobilenet_v3_large", 5, 8, w.state_dict)  # strict load at OS8 too (same parameters)
    with pytest.raises(ValueError, match="holds a DeepLabv3-mobilenet_v3_large but --backbone is resnet50; "
                                         "pass --backbone mobilenet_v3_large"):
        resolve_weights(str(path), "resnet50", 0, _no_calibration)
    r101 = {"classifier.4.weight": torch.zeros(3, 256, 1, 1), "backbone.layer3.22.conv1.weight": torch.zeros(1)}
    torch.save(r101, tmp_path / "r101.pt")
    with pytest.raises(ValueError, match="holds a DeepLabv3-resnet101 but --backbone is resnet50"):
        resolve_weights(str(tmp_path / "r101.pt"), "resnet50", 0, _no_calibration)


def test_synthetic_recipes_per_backbone_keep_the_scenes_and_the_resnet_cache_name() -> None:
    """Every backbone is offered ``--weights synthetic``; a recipe changes training only (same scenes and
    held-out set, so held-out mIoU compares across backbones), and the ResNets keep the recipe, hence the cache
    file name, they had before recipes existed (a cached model is not retrained)."""
    from fastdeeplab.weights import BACKBONES, SPEC, cache_path, check_synthetic, synthetic_spec

    for name in BACKBONES:
        check_synthetic(name)
    assert synthetic_spec(50) is not None and synthetic_spec("resnet50") == synthetic_spec(101) == SPEC
    assert SPEC.digest() == "58971d9389" and cache_path(50).name == "synthetic-deeplabv3_resnet50-58971d9389.pt"
    mobilenet = synthetic_spec("mobilenet_v3_large")
    assert mobilenet.bn_momentum == 0.1 and mobilenet.digest() != SPEC.digest()
    scene_fields = ("num_classes", "size", "thin_structures", "max_objects", "train_seed", "held_out_seed",
                    "held_out_images")
    assert all(getattr(synthetic_spec(name), f) == getattr(SPEC, f) for name in BACKBONES for f in scene_fields)
    assert cache_path("mobilenet_v3_large").name.startswith("synthetic-deeplabv3_mobilenet_v3_large-")


def test_a_backbone_without_synthetic_weights_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table can still hold a backbone without ``--weights synthetic`` (every one has it today): the
    resolver then refuses it before any training, in one line naming the flag and what to use instead."""
    from fastdeeplab import weights as fw

    monkeypatch.setitem(fw.BACKBONES, "mobilenet_v3_large", replace(fw.BACKBONES["mobilenet_v3_large"],
                                                                    synthetic=False))
    with pytest.raises(ValueError, match=r"^--weights synthetic is offered for resnet50 and resnet101, not "
                                         r"--backbone mobilenet_v3_large; use --weights random or COCO_WITH_VOC"):
        resolve_weights("synthetic", "mobilenet_v3_large", 0, _no_calibration)


def test_synthetic_mobilenet_trains_with_its_bn_momentum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The MobileNetV3 recipe's BN momentum reaches training: the first BN's running mean after one step is
    momentum x the first batch's mean, so 0.1 gives ten times the builder's own 0.01 (same seed, same batch);
    the record names the backbone and the spec, and torchvision's model loads the state dict."""
    monkeypatch.setenv("FASTDEEPLAB_CACHE", str(tmp_path))
    tiny = _synthetic.SyntheticSpec(size=33, batch=2, iterations_os16=1, iterations_os8=1, held_out_images=2)
    own, _ = _synthetic.train_synthetic("mobilenet_v3_large", tiny)
    state, info, path = _synthetic.load_or_train("mobilenet_v3_large", replace(tiny, bn_momentum=0.1))
    key = "backbone.0.1.running_mean"
    torch.testing.assert_close(state[key], 10 * own[key], rtol=1e-4, atol=1e-6)
    assert info["backbone"] == "mobilenet_v3_large" and info["spec"]["bn_momentum"] == 0.1
    assert path.parent == tmp_path and path.name.startswith("synthetic-deeplabv3_mobilenet_v3_large-")
    torchvision_reference("mobilenet_v3_large", 4, 16, state)  # torchvision names, strict load
    # --weights synthetic finds it under the recipe's own cache name (the tiny model stands in for it here)
    path.rename(_synthetic.cache_path("mobilenet_v3_large"))
    w = resolve_weights("synthetic", "mobilenet_v3_large", 0, _no_calibration)
    assert (w.kind, w.backbone, w.num_classes) == ("synthetic", "mobilenet_v3_large", 4)
    assert all(torch.equal(w.state_dict[k], state[k]) for k in state)


def test_mobilenet_reference_geometry_and_random_weights() -> None:
    """torchvision's own MobileNetV3 DeepLabV3: as shipped at OS16, re-dilated at OS8 (same parameters), and
    seeded random weights (BN statistics from the photographs) give finite, O(1) logits at both."""
    from torchvision.models.segmentation.deeplabv3 import DeepLabV3 as TvDeepLabV3

    import fastdeeplab
    from fastdeeplab.mobilenet import depthwise_conv

    w = resolve_weights("random", "mobilenet_v3_large", 0, lambda: torch.randn(2, 3, 65, 65))
    assert (w.kind, w.backbone, w.num_classes) == ("random", "mobilenet_v3_large", 21)
    x = torch.randn(1, 3, 65, 65)
    for stride, dilation_c4 in ((16, 2), (8, 4)):
        tv = torchvision_reference("mobilenet_v3_large", 21, stride, w.state_dict)
        assert isinstance(tv, TvDeepLabV3) and not tv.training
        assert depthwise_conv(tv.backbone["13"]).dilation == (dilation_c4, dilation_c4)
        assert [m[0].dilation[0] for m in tv.classifier[0].convs[1:4]] == [12, 24, 36]  # torchvision's rates
        ours = fastdeeplab.from_torchvision(tv).eval()
        assert ours.output_stride == stride
        with torch.inference_mode():
            ref, out = tv(x)["out"], ours(x)["out"]
        assert torch.isfinite(ref).all() and 0.1 < ref.abs().max() < 1e3
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
