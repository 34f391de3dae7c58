"""One resolver for every ``--weights``: predict, demo, eval, export, deploy and the bench accept the same
names (``synthetic``, ``random``, torchvision names, checkpoint files) through :mod:`fastdeeplab.weights`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdeeplab import weights as fw
from fastdeeplab.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory):
    """A cache holding the ``synthetic`` entries of ResNet-50 and MobileNetV3-Large, trained for real but
    briefly (tiny scenes, 3 iterations): the commands' plumbing is under test here, not the models' accuracy
    (bench/RESULTS.md has that)."""
    cache = tmp_path_factory.mktemp("cache")
    tiny = fw.SyntheticSpec(size=33, batch=2, iterations_os16=2, iterations_os8=1, held_out_images=2)
    for backbone in (50, "mobilenet_v3_large"):
        state, info = fw.train_synthetic(backbone, tiny)
        path = cache / fw.cache_path(backbone).name  # where the backbone's own recipe's model is looked for
        torch.save({"state_dict": state, "info": json.dumps(info)}, path)
    return cache


def test_bench_uses_the_package_resolver():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench import _synthetic, _weights

    assert _weights.resolve_weights is fw.resolve_weights
    assert _synthetic.load_or_train is fw.load_or_train


@pytest.mark.slow
def test_predict_with_synthetic_weights_writes_masks_and_a_legend(synthetic_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTDEEPLAB_CACHE", str(synthetic_cache))
    scene = fw.write_synthetic_scene(tmp_path / "scene.png")
    assert (tmp_path / "scene_truth.png").is_file()
    out = tmp_path / "masks"
    assert main(["predict", str(scene), "--weights", "synthetic", "--device", "cpu", "--out", str(out)]) == 0
    mask = np.array(Image.open(out / "scene_mask.png"))
    assert mask.shape == (64, 64) and mask.max() < 4  # the synthetic model's 4 classes
    overlay = Image.open(out / "scene_overlay.png")
    assert overlay.width > 64 and overlay.height >= 64  # the legend strip to the right of the picture
    palette = Image.open(out / "scene_mask.png").getpalette()[:12]
    assert palette == [v for rgb in fw.SYNTHETIC_PALETTE for v in rgb]  # "red" is drawn red
    strip = np.asarray(overlay.convert("RGB"))[:, 64:]
    assert (strip == 255).mean() > 0.5 and (strip < 128).any()  # white, with swatches and text


@pytest.mark.slow
def test_synthetic_mobilenet_through_predict_export_and_deploy(synthetic_cache, tmp_path, monkeypatch, capsys):
    """``--weights synthetic`` with ``--model deeplabv3_mobilenet_v3_large``: predict, export (with its
    checks against eager) and deploy take the MobileNetV3 synthetic model, with its 4 classes."""
    monkeypatch.setenv("FASTDEEPLAB_CACHE", str(synthetic_cache))
    model = fw.build_model("deeplabv3_mobilenet_v3_large", "synthetic", output_stride=8)
    assert model.classifier[-1].out_channels == 4
    scene = fw.write_synthetic_scene(tmp_path / "scene.png")
    out = tmp_path / "masks"
    assert main(["predict", str(scene), "--model", "deeplabv3_mobilenet_v3_large", "--weights", "synthetic",
                 "--device", "cpu", "--out", str(out)]) == 0
    mask = np.array(Image.open(out / "scene_mask.png"))
    assert mask.shape == (64, 64) and mask.max() < 4
    onnx_path = tmp_path / "mnv3.onnx"
    assert main(["export", "--model", "deeplabv3_mobilenet_v3_large", "--weights", "synthetic",
                 "--input-size", "33", "33", "--out", str(onnx_path)]) == 0
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    assert graph.output[0].type.tensor_type.shape.dim[1].dim_value == 4  # the synthetic model's classes
    pytest.importorskip("tritonclient", reason="deploy's config check needs tritonclient (the dev extra)")
    repo = tmp_path / "repo"
    assert main(["deploy", "--model", "deeplabv3_mobilenet_v3_large", "--weights", "synthetic", "--input-size",
                 "33", "33", "--max-batch-size", "2", "--preferred-batch-sizes", "2", "--out", str(repo)]) == 0
    assert len((repo / "deeplabv3" / "labels.txt").read_text().split()) == 4
    assert "FAIL" not in capsys.readouterr().out


def test_legend_names_the_classes_present():
    from fastdeeplab.predict import add_legend, class_names_for

    assert class_names_for("voc", "synthetic") == fw.SYNTHETIC_CLASSES
    assert class_names_for("voc", None)[15] == "person"
    mask = np.zeros((40, 40), np.uint8)
    mask[5:20, 5:20] = 15
    mask[0, 0] = 255  # the ignore label gets no entry
    one = add_legend(Image.new("RGB", (40, 40)), mask, None, class_names_for("voc"))
    mask[30:, 30:] = 7
    two = add_legend(Image.new("RGB", (40, 40)), mask, None, class_names_for("voc"))
    assert one.width > 40 and two.height >= one.height
    assert (np.asarray(two)[:, 40:] != 255).any(axis=2).sum() > (np.asarray(one)[:, 40:] != 255).any(axis=2).sum()


@pytest.mark.slow
def test_named_weights_errors_are_one_line(synthetic_cache, monkeypatch):
    monkeypatch.setenv("FASTDEEPLAB_CACHE", str(synthetic_cache))
    with pytest.raises(ValueError, match="--weights synthetic exists for .*not --model deeplabv3_cascade_resnet50"):
        fw.build_model("deeplabv3_cascade_resnet50", "synthetic")
    with pytest.raises(ValueError, match="has 4 classes, not --num-classes 21"):
        fw.build_model("deeplabv3_resnet50", "Synthetic", num_classes=21)
    model = fw.build_model("deeplabv3_resnet50", "synthetic", output_stride=16)
    assert model.classifier[-1].out_channels == 4


@pytest.mark.slow
def test_demo_writes_an_overlay_and_reports_min_max(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--resolution", "33", "--runs", "3", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert (tmp_path / "demo_overlay.png").is_file() and str(tmp_path / "demo_overlay.png") in text
    assert "OS16  " in text and "OS8   " in text and "OS 8" not in text and "IQR" not in text
    assert "median of 3 runs (min" in text and "max" in text
