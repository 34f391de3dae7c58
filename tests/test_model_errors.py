"""Bad input gets a ValueError/TypeError whose message names the problem."""

from __future__ import annotations

import pytest
import torch

import fastdeeplab


@pytest.fixture(scope="module")
def model():
    return fastdeeplab.deeplabv3_resnet50(num_classes=3, output_stride=16).eval()


@pytest.mark.parametrize("x, exc, match", [
    pytest.param(torch.randn(3, 33, 33), ValueError, "4-D", id="rank3"),
    pytest.param(torch.randn(1, 1, 3, 33, 33), ValueError, "4-D", id="rank5"),
    pytest.param(torch.randn(1, 4, 33, 33), ValueError, "3 input channels", id="rgba"),
    pytest.param(torch.randint(0, 255, (1, 3, 33, 33), dtype=torch.uint8), TypeError, "floating-point",
                 id="uint8"),
    pytest.param(torch.randn(0, 3, 33, 33), ValueError, "empty batch", id="empty"),
    pytest.param(torch.randn(1, 3, 15, 64), ValueError, "smaller than the output stride", id="too-small"),
    pytest.param([[1.0]], TypeError, "torch.Tensor", id="list"),
    pytest.param(torch.randn(1, 3, 33, 33).to_sparse(), TypeError, "dense input.*sparse_coo.*to_dense", id="sparse"),
    pytest.param(torch.randn(1, 3, 33, 33).to_mkldnn(), TypeError, "dense input.*_mkldnn", id="mkldnn"),
])
def test_bad_inputs(model, x, exc, match):
    with pytest.raises(exc, match=match):
        model(x)


@torch.no_grad()
def test_sizes_not_multiple_of_stride_work(model):
    for h, w in [(500, 375), (97, 131), (16, 16)]:
        assert model(torch.randn(1, 3, h, w))["out"].shape == (1, 3, h, w)


@pytest.mark.parametrize("os_", [4, 12, 64])
def test_unknown_output_stride(os_):
    with pytest.raises(ValueError, match="unknown output stride"):
        fastdeeplab.deeplabv3_resnet50(output_stride=os_)
    with pytest.raises(ValueError, match="unknown output stride"):
        fastdeeplab.deeplabv3_resnet50().set_output_stride(os_)


@pytest.mark.parametrize("os_", ["16", 16.0, True, None])
def test_output_stride_of_the_wrong_type(os_):
    with pytest.raises(TypeError, match="output_stride must be one of"):
        fastdeeplab.deeplabv3_resnet50(output_stride=os_)
    with pytest.raises(TypeError, match="output_stride must be one of"):
        fastdeeplab.deeplabv3_resnet50().set_output_stride(os_)


def test_unknown_head_and_classes():
    with pytest.raises(ValueError, match="head"):
        fastdeeplab.deeplabv3_resnet50(head="fcn")
    with pytest.raises(ValueError, match="num_classes"):
        fastdeeplab.deeplabv3_resnet50(num_classes=0)


def test_checkpoint_round_trip(tmp_path, model):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "iteration": 3}, path)  # a training checkpoint is accepted
    other = fastdeeplab.deeplabv3_resnet50(num_classes=3, output_stride=16, weights=path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    fastdeeplab.deeplabv3_resnet50(num_classes=3, weights=str(tmp_path / "plain.pt"))


def test_checkpoint_mismatch_lists_the_keys(tmp_path, model):
    state = model.state_dict()
    state.pop("classifier.4.bias")
    state["classifier.9.weight"] = torch.zeros(1)
    state["classifier.4.weight"] = torch.zeros(5, 256, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        fastdeeplab.deeplabv3_resnet50(num_classes=3, weights=path)
    msg = str(info.value)
    assert "missing keys (1): classifier.4.bias" in msg
    assert "unexpected keys (1): classifier.9.weight" in msg
    assert "classifier.4.weight: checkpoint (5, 256, 1, 1) vs model (3, 256, 1, 1)" in msg


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        fastdeeplab.deeplabv3_resnet50(weights=junk)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        fastdeeplab.deeplabv3_resnet50(weights=tmp_path / "list.pth")
    with pytest.raises(FileNotFoundError, match="not found"):
        fastdeeplab.deeplabv3_resnet50(weights=tmp_path / "missing.pth")


def test_pickled_objects_are_refused(tmp_path):
    """weights_only=True: a checkpoint that needs arbitrary unpickling is refused, not executed."""
    import argparse

    path = tmp_path / "evil.pth"
    torch.save({"model": argparse.Namespace(payload=1)}, path)
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        fastdeeplab.deeplabv3_resnet50(weights=path)


def test_unknown_torchvision_weights_name():
    with pytest.raises(ValueError, match="unknown torchvision weights"):
        fastdeeplab.deeplabv3_resnet50(weights="NoSuchWeights.V1")


def test_import_without_optional_packages():
    """`import fastdeeplab` works with onnx, onnxruntime, tensorrt and openvino blocked, and imports none of
    the optional packages itself (torchvision may import triton on its own; that is not ours)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for m in ('onnx', 'onnxruntime', 'tensorrt', 'openvino'): sys.modules[m] = None  # blocked\n"
        "import torch, torchvision\n"
        "before = set(sys.modules)\n"
        "import fastdeeplab\n"
        "fastdeeplab.deeplabv3_resnet50(num_classes=2)\n"
        "new = [m for m in ('triton', 'onnx', 'onnxruntime', 'tensorrt') if m in set(sys.modules) - before]\n"
        "print(new); sys.exit(1 if new else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_train_mode_at_batch_1_says_eval(model):
    model.train()
    try:
        with pytest.raises(ValueError, match=r"training mode.*one image.*model\.eval\(\).*batch size > 1"):
            model(torch.randn(1, 3, 33, 33))
        assert model(torch.randn(2, 3, 33, 33))["out"].shape == (2, 3, 33, 33)  # batch 2 trains
    finally:
        model.eval()
    assert model(torch.randn(1, 3, 33, 33))["out"].shape == (1, 3, 33, 33)


def test_another_models_weights_are_refused_before_download():
    with pytest.raises(ValueError, match=r"DeepLabV3_ResNet101_Weights\.\S+ are for another model.*"
                                         r"DeepLabV3_ResNet50_Weights"):
        fastdeeplab.deeplabv3_resnet50(weights="DeepLabV3_ResNet101_Weights.DEFAULT")
    with pytest.raises(ValueError, match=r"DeepLabV3_ResNet50_Weights\.\S+ are for another model"):
        fastdeeplab.deeplabv3_resnet101(weights="DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1")


@pytest.mark.parametrize("config, match", [
    ({"name": "deeplabv3_resnet50", "kwargs": {"num_classes": 3}, "colour": "red"}, r"unknown field.*colour"),
    ({"name": "deeplabv3_resnet50", "kwargs": {"depth": 7}}, r"'kwargs\.depth' is not an argument"),
    ({"name": "deeplabv3_resnet50", "kwargs": {"multi_grid": ["a"]}}, r"'kwargs'.*multi_grid"),
    ({"name": "resnet", "kwargs": {}}, r"'name' is 'resnet', not a registered model"),
    ([1, 2], r" is a list"),
])
def test_checkpoint_model_config_is_checked(tmp_path, model, config, match):
    from fastdeeplab.hub import check_model_config

    with pytest.raises(ValueError, match=rf"checkpoint \S*c\.pt: model_config.*{match}"):
        check_model_config(config, tmp_path / "c.pt")
    good = {"name": "deeplabv3_resnet50", "kwargs": {"num_classes": 3, "multi_grid": [1, 2, 4]}}
    assert check_model_config(good, tmp_path / "c.pt") == {"name": "deeplabv3_resnet50",
                                                            "kwargs": {"num_classes": 3, "multi_grid": (1, 2, 4)}}
