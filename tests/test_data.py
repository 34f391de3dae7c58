"""Datasets, joint transforms, palettes: what the training and evaluation pipelines stand on."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from _voc import NUM_CLASSES, make_voc
from PIL import Image

from fastdeeplab.data import (
    IGNORE_INDEX,
    CityscapesSegmentation,
    VOCSegmentation,
    colorize,
    overlay,
    read_label,
    synthetic_sample,
    train_transform,
    voc_palette,
    write_cityscapes_dataset,
)
from fastdeeplab.data.transforms import RandomScale
from fastdeeplab.images import IMAGENET_MEAN, IMAGENET_STD


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------
def test_voc_items_match_the_generated_labels(tmp_path):
    sizes = [(33, 41), (40, 33)]
    root = make_voc(tmp_path, num_images=3, size=sizes)
    ds = VOCSegmentation(root, "val")
    assert len(ds) == 3 and ds.num_classes == 21
    for i in range(3):
        image, label = ds[i]
        h, w = sizes[i % 2]
        assert image.shape == (3, h, w) and image.dtype == torch.float32
        assert label.shape == (h, w) and label.dtype == torch.int64
        expected = synthetic_sample(i, (h, w), NUM_CLASSES)[1]
        np.testing.assert_array_equal(label.numpy(), expected)  # palette PNG stores indices exactly
        assert set(label.unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}


def test_voc_train_aug_reads_segmentation_class_aug(tmp_path):
    root = make_voc(tmp_path, num_images=2, train_aug=True)
    ds = VOCSegmentation(root, "train_aug")
    assert ds.label_path(0).parent.name == "SegmentationClassAug"
    with Image.open(ds.label_path(0)) as im:
        assert im.mode == "L"  # grey labels, as SBD conversions ship them
    np.testing.assert_array_equal(ds[1][1].numpy(), VOCSegmentation(root, "val")[1][1].numpy())


def test_voc_accepts_deeplab_two_column_lists_and_devkit_parent(tmp_path):
    root = make_voc(tmp_path / "VOCdevkit" / "VOC2012", num_images=2)
    (root / "ImageSets/Segmentation/pairs.txt").write_text(
        "/JPEGImages/synth_0001.jpg /SegmentationClass/synth_0001.png\n\n")
    ds = VOCSegmentation(tmp_path, "pairs")  # the folder above VOCdevkit/
    assert len(ds) == 1 and ds.image_path(0).name == "synth_0001.jpg"


def test_voc_missing_split_lists_the_available_ones(tmp_path):
    root = make_voc(tmp_path, num_images=1)
    with pytest.raises(FileNotFoundError, match=r"test\.txt.*available splits: train, val"):
        VOCSegmentation(root, "test")
    with pytest.raises(FileNotFoundError, match="no PASCAL VOC dataset"):
        VOCSegmentation(tmp_path / "nowhere", "val")


def test_cityscapes_maps_label_ids_to_the_19_train_ids(tmp_path):
    root = write_cityscapes_dataset(tmp_path, "val", num_images=2, size=(24, 48))
    ds = CityscapesSegmentation(root, "val")
    assert len(ds) == 2 and ds.num_classes == 19
    for i in range(2):
        expected = synthetic_sample(i, (24, 48), 19)[1]  # train ids, 255 on boundaries
        np.testing.assert_array_equal(ds.load_label(i), expected)
    raw = read_label(ds.label_path(0))
    assert raw.max() > 18  # the files really hold label ids (7 = road, 8 = sidewalk ...)


def test_cityscapes_image_without_label_is_named(tmp_path):
    root = write_cityscapes_dataset(tmp_path, "val", num_images=1, size=(24, 48))
    label = next((root / "gtFine/val").rglob("*_labelIds.png"))
    label.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(label))):
        CityscapesSegmentation(root, "val")


@pytest.mark.parametrize("which", ["image", "label"])
def test_corrupt_file_error_names_the_file(tmp_path, which):
    root = make_voc(tmp_path, num_images=2)
    ds = VOCSegmentation(root, "val")
    bad = ds.image_path(1) if which == "image" else ds.label_path(1)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n definitely not an image")
    ds[0]  # the good sample still loads
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        ds[1]


def test_truncated_label_error_names_the_file(tmp_path):
    root = make_voc(tmp_path, num_images=1)
    ds = VOCSegmentation(root, "val")
    path = ds.label_path(0)
    path.write_bytes(path.read_bytes()[:60])  # valid header, missing pixel data
    with pytest.raises(ValueError, match=re.escape(str(path))):
        ds.load(0)


def test_colour_label_and_size_mismatch_are_refused(tmp_path):
    root = make_voc(tmp_path, num_images=1)
    ds = VOCSegmentation(root, "val")
    path = ds.label_path(0)
    Image.new("RGB", (33, 33)).save(path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*mode RGB"):
        ds.load(0)
    Image.new("L", (20, 33)).save(path)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} is 20x33 but image .* is 33x33"):
        ds.load(0)


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------
def _image_encoding_label(h: int, w: int, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    """An image whose red channel is 40 * label, so image/label alignment can be checked after a transform."""
    label = np.random.default_rng(seed).integers(0, 5, (h, w)).astype(np.uint8)
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = label * 40
    return Image.fromarray(rgb), label


def _red_to_label(image: torch.Tensor) -> torch.Tensor:
    red = image[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    return torch.round(red * 255 / 40).long()


@pytest.mark.parametrize("h, w", [(20, 27), (50, 61)], ids=["smaller-than-crop", "larger-than-crop"])
def test_crop_and_flip_keep_image_and_label_aligned(h, w):
    image, label = _image_encoding_label(h, w)
    t = train_transform(crop_size=33, scale_range=(1.0, 1.0))
    for seed in range(6):  # several crops and flips
        x, y = t(image, label, generator=torch.Generator().manual_seed(seed))
        assert x.shape == (3, 33, 33) and y.shape == (33, 33) and y.dtype == torch.int64
        padded = y == IGNORE_INDEX
        assert padded.any() == (h < 33 or w < 33)
        assert torch.equal(_red_to_label(x)[~padded], y[~padded])
        assert torch.all(x[:, padded] == 0)  # padding = mean colour = 0 after normalisation


def test_random_scale_uses_nearest_labels_and_bilinear_images():
    image, label = _image_encoding_label(30, 30)
    t = train_transform(crop_size=70, scale_range=(0.5, 2.0))
    seen_sizes = set()
    for seed in range(8):
        x, y = t(image, label, generator=torch.Generator().manual_seed(seed))
        valid = y != IGNORE_INDEX
        seen_sizes.add(int(valid.sum()))
        assert set(y[valid].unique().tolist()) <= set(np.unique(label).tolist())  # no interpolated ids
    assert len(seen_sizes) > 1  # the scale really varies


def test_transform_is_reproducible_from_a_seed():
    image, label = _image_encoding_label(40, 40)
    t = train_transform(crop_size=33)
    a = t(image, label, generator=torch.Generator().manual_seed(7))
    b = t(image, label, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_random_scale_steps_land_on_the_grid():
    scale = RandomScale(0.5, 2.0, step=0.25)
    g = torch.Generator().manual_seed(0)
    draws = {scale.draw(g) for _ in range(200)}
    assert draws == {0.5 + 0.25 * k for k in range(7)}


# --------------------------------------------------------------------------------------------------
# Palettes
# --------------------------------------------------------------------------------------------------
def test_voc_palette_known_colours():
    pal = voc_palette()
    assert len(pal) == 768
    assert pal[0:3] == [0, 0, 0] and pal[3:6] == [128, 0, 0] and pal[15 * 3:16 * 3] == [192, 128, 128]
    assert pal[255 * 3:] == [224, 224, 192]


def test_colorize_round_trips_and_overlay_keeps_background(tmp_path):
    mask = np.array([[0, 1], [2, 255]], np.uint8)
    path = tmp_path / "m.png"
    colorize(mask).save(path)
    with Image.open(path) as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(np.array(im), mask)
    photo = Image.fromarray(np.full((2, 2, 3), 100, np.uint8))
    blended = np.asarray(overlay(photo, mask, alpha=0.5))
    np.testing.assert_array_equal(blended[0, 0], [100, 100, 100])  # background untouched
    np.testing.assert_array_equal(blended[1, 1], [100, 100, 100])  # ignore untouched
    np.testing.assert_array_equal(blended[0, 1], [114, 50, 50])  # (100 + 128) / 2, 100 / 2, 100 / 2


@pytest.mark.parametrize("dtype, values, expected", [
    (np.uint8, [0, 128, 255], [0, 128, 255]),            # 8-bit: as is
    (np.uint16, [0, 200, 255], [0, 200, 255]),           # 8-bit values in 16 bits: as is
    (np.uint16, [1000, 33000, 65000], [0, 128, 255]),    # 16-bit: its real range, not clipped at 255
    (np.int32, [-5, 0, 5], [0, 128, 255]),               # signed: min to 0, max to 255
    (np.float32, [0.0, 0.5, 1.0], [0, 128, 255]),        # fractions
    (np.float32, [-1.0, 0.0, 1.0], [0, 128, 255]),       # other units: the real range
    (np.float32, [np.nan, 0.25, 0.75], [0, 64, 191]),    # NaN -> 0
    (np.float32, [3.0, 3.0, 3.0], [3, 3, 3]),            # constant: kept, clipped to 0..255
])
def test_to_8bit_scales_by_the_real_range(dtype, values, expected):
    from fastdeeplab.images import to_8bit

    assert to_8bit(np.array([values], dtype=dtype)).tolist() == [expected]


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "L", "LA", "P", "RGBA", "1"])
def test_load_image_gives_8_bit_rgb_for_every_mode(tmp_path, mode):
    from fastdeeplab.images import load_image

    ramp = np.linspace(0, 1, 16 * 16).reshape(16, 16)
    scale = {"I;16": 60000, "I": 1_000_000, "F": 1.0}.get(mode, 255)
    base = Image.fromarray((ramp * scale).astype({"F": np.float32, "I": np.int32, "I;16": np.uint16}.get(mode, np.uint8)))
    image = base if mode in ("I;16", "I", "F", "L") else base.convert(mode)
    path = tmp_path / ("x.tif" if mode in ("I", "F") else "x.png")
    image.save(path)
    got = load_image(path)
    assert got.mode == "RGB" and got.size == (16, 16)
    grey = np.asarray(got)[..., 0].astype(int)
    if mode in ("I;16", "I", "F", "L", "LA"):
        assert grey.min() <= 1 and grey.max() >= 254 and (np.diff(grey.ravel()) >= 0).all(), (grey.min(), grey.max())
