"""``fastdeeplab predict`` writes readable class-map and overlay PNGs, atomically, named after each image."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from _voc import NUM_CLASSES, single_thread  # noqa: F401  (fixture)
from PIL import Image

import fastdeeplab
from fastdeeplab import cli
from fastdeeplab.data import synthetic_sample, voc_palette
from fastdeeplab.images import load_image
from fastdeeplab.predict import predict_mask

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = fastdeeplab.deeplabv3_resnet50(num_classes=NUM_CLASSES, output_stride=16)
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(model.state_dict(), path)
    return path, model.eval()


@pytest.fixture()
def photos(tmp_path):
    paths = []
    for i, (size, suffix) in enumerate([((33, 47), ".jpg"), ((40, 35), ".png")]):
        path = tmp_path / "in" / f"photo{i}{suffix}"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(synthetic_sample(i, size, NUM_CLASSES)[0]).save(path)
        paths.append(path)
    return paths


def test_predict_writes_palette_mask_and_overlay(tmp_path, photos, weights):
    path, model = weights
    out = tmp_path / "out"
    rc = cli.main(["predict", *map(str, photos), "--out", str(out), "--weights", str(path),
                   "--num-classes", str(NUM_CLASSES), "--output-stride", "16", "--flip", "--device", "cpu"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "photo0_mask.png", "photo0_overlay.png", "photo1_mask.png", "photo1_overlay.png"]  # no temp files left
    for photo in photos:
        image = load_image(photo)
        with Image.open(out / f"{photo.stem}_mask.png") as mask_png:
            mask_png.load()
        with Image.open(out / f"{photo.stem}_overlay.png") as overlay_png:
            overlay_png.load()
        assert mask_png.mode == "P" and mask_png.size == image.size
        assert mask_png.getpalette()[:3 * 256] == voc_palette()
        mask = np.array(mask_png)
        assert mask.max() < NUM_CLASSES
        np.testing.assert_array_equal(mask, predict_mask(model, image, flip=True))  # the same model, in-process
        # the overlay is the photograph's size plus a legend strip on its right
        assert overlay_png.mode == "RGB" and overlay_png.width > image.width and overlay_png.height >= image.height
        photo_px = np.asarray(image)
        overlay_px = np.asarray(overlay_png)[: image.height, : image.width]
        background = mask == 0
        np.testing.assert_array_equal(overlay_px[background], photo_px[background])
        if (~background).any():
            assert not np.array_equal(overlay_px[~background], photo_px[~background])


def test_predict_names_a_corrupt_image(tmp_path, photos, capsys, weights):
    photos[1].write_bytes(b"garbage")
    rc = cli.main(["predict", *map(str, photos), "--out", str(tmp_path / "out"), "--weights", str(weights[0]),
                   "--num-classes", str(NUM_CLASSES), "--device", "cpu"])
    assert rc == 1
    assert str(photos[1]) in capsys.readouterr().err


def test_predict_refuses_colliding_output_names(tmp_path, photos, capsys):
    twin = tmp_path / "other" / photos[0].name
    twin.parent.mkdir()
    twin.write_bytes(photos[0].read_bytes())
    rc = cli.main(["predict", str(photos[0]), str(twin), "--out", str(tmp_path / "out")])
    assert rc == 1
    assert "would both write photo0_mask.png" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_images_smaller_than_the_output_stride_are_upsampled_for_the_model(tmp_path, weights):
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (12, 40), (200, 30, 30)).save(tiny)
    rc = cli.main(["predict", str(tiny), "--out", str(tmp_path / "out"), "--weights", str(weights[0]),
                   "--num-classes", str(NUM_CLASSES), "--output-stride", "16", "--device", "cpu"])
    assert rc == 0
    with Image.open(tmp_path / "out" / "tiny_mask.png") as mask:
        assert mask.size == (12, 40)  # the model saw 16 x 40; the mask is back at the image's size


def test_outputs_never_replace_inputs_or_files_predict_did_not_write(tmp_path):
    """Compared as files: the same name, a hard link, a symbolic link; a foreign file needs overwrite=True;
    predict's own earlier PNGs (signed with a Software chunk) are replaced."""
    from fastdeeplab.predict import SIGNATURE, check_outputs, write_prediction, written_by_predict

    photo = tmp_path / "x.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(photo)
    with pytest.raises(ValueError, match="is an input of this command"):
        check_outputs(tmp_path, ["x"], [photo, tmp_path / "x_mask.png"])
    out = tmp_path / "out"
    out.mkdir()
    os.link(photo, out / "x_mask.png")
    with pytest.raises(ValueError, match="is an input of this command"):
        check_outputs(out, ["x"], [photo], overwrite=True)  # --overwrite never reaches an input
    (out / "x_mask.png").unlink()
    (out / "x_mask.png").write_bytes(b"someone's notes")
    with pytest.raises(FileExistsError, match="not written by fastdeeplab predict"):
        check_outputs(out, ["x"], [photo])
    assert len(check_outputs(out, ["x"], [photo], overwrite=True)) == 2
    (out / "x_mask.png").unlink()
    write_prediction(out, "x", Image.open(photo), np.zeros((8, 8), np.uint8))
    assert written_by_predict(out / "x_mask.png") and Image.open(out / "x_overlay.png").info["Software"] == SIGNATURE
    assert len(check_outputs(out, ["x"], [photo])) == 2  # its own files: replaced without asking
