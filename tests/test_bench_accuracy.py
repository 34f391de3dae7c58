"""The benchmark's accuracy columns catch a broken implementation.

A deliberately wrong implementation — one perturbed conv weight, or shuffled class channels — is scored
with the very functions the suite uses (``bench._metrics.accuracy_columns``, the weights and reference of
``bench._impls``) and must show a higher logit error and a lower agreement than the correct one. Tiny
resolution (65×65), real photographs, CPU, a few seconds.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a source-checkout package, not installed with fastdeeplab
    sys.path.insert(0, str(ROOT))

import fastdeeplab  # noqa: E402
from bench._impls import random_state_dict, torchvision_reference  # noqa: E402
from bench._metrics import accuracy_columns, max_rel_logit_error, pixel_agreement  # noqa: E402
from fastdeeplab.images import sample_images  # noqa: E402

pytest.importorskip("skimage", reason="the accuracy columns are measured on scikit-image's photographs")

SIZE = 65
NUM_CLASSES = 21


class ShuffledClasses(nn.Module):
    """A wrong implementation: right logits, class channels rolled by one (class k reported as k+1)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"out": self.model(x)["out"].roll(1, dims=1)}


def _perturb_one_conv(model: nn.Module) -> nn.Module:
    """A wrong implementation: a copy whose last bottleneck's 3×3 conv weight has 50 % noise added."""
    broken = copy.deepcopy(model)
    with torch.no_grad():
        w = broken.backbone.layer4[2].conv2.weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) * 0.5 * w.std())
    return broken


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny inputs: one thread is as fast, and immune to the OpenMP stalls of a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(one_thread: None) -> dict[str, object]:
    """Seeded random weights as the suite makes them, both torchvision references, and their outputs."""
    calibration = sample_images(SIZE, count=6)[1]
    state = random_state_dict(50, NUM_CLASSES, seed=0, calibration=calibration)
    refs = {os_: torchvision_reference(50, NUM_CLASSES, os_, state) for os_ in (8, 16)}
    x = sample_images(SIZE, count=2)[1]
    with torch.inference_mode():
        truth = {os_: [refs[os_](x)["out"]] for os_ in (8, 16)}
    setup = {"refs": refs, "x": x, "truth": truth}
    good = {os_: fastdeeplab.from_torchvision(refs[os_]).eval() for os_ in (8, 16)}
    setup.update(good=good, good_columns={os_: _columns(setup, good[os_], os_) for os_ in (8, 16)})
    return setup


def _columns(setup: dict[str, object], model: nn.Module, output_stride: int) -> dict[str, float]:
    """Run ``model`` on the photographs and score it exactly as a suite row is scored."""
    with torch.inference_mode():
        out = model.eval()(setup["x"])["out"]
    truth = setup["truth"]
    return accuracy_columns([out], truth[output_stride], truth[8], NUM_CLASSES)


@pytest.mark.parametrize("output_stride", [8, 16], ids=["OS8", "OS16"])
def test_correct_implementation_matches(setup: dict, output_stride: int) -> None:
    cols = setup["good_columns"][output_stride]
    assert cols["max_rel_logit_error"] < 1e-4
    assert cols["pixel_agreement_same_os"] > 0.999
    if output_stride == 8:
        assert cols["pixel_agreement"] > 0.999 and cols["miou_vs_reference"] > 0.99


def test_os16_accuracy_loss_shows_against_os8(setup: dict) -> None:
    """OS16 is scored against the OS8 prediction: a correct OS16 model agrees less than a correct OS8 one."""
    os8, os16 = setup["good_columns"][8], setup["good_columns"][16]
    assert os16["max_rel_logit_error"] < 1e-4  # a correct implementation at its own stride...
    assert os16["pixel_agreement"] < os8["pixel_agreement"]  # ...that still differs from OS8's answer


@pytest.mark.parametrize("breakage", ["perturbed_conv", "shuffled_classes"])
@pytest.mark.parametrize("output_stride", [8, 16], ids=["OS8", "OS16"])
def test_broken_implementation_shows_up(setup: dict, output_stride: int, breakage: str) -> None:
    good_model = setup["good"][output_stride]
    bad_model = _perturb_one_conv(good_model) if breakage == "perturbed_conv" else ShuffledClasses(good_model)
    good = setup["good_columns"][output_stride]
    bad = _columns(setup, bad_model, output_stride)
    assert bad["max_rel_logit_error"] > 100 * max(good["max_rel_logit_error"], 1e-6)
    assert bad["max_rel_logit_error"] > 1e-2
    assert bad["pixel_agreement_same_os"] < good["pixel_agreement_same_os"] - 0.01
    assert bad["pixel_agreement"] < good["pixel_agreement"]
    assert bad["miou_vs_reference"] < good["miou_vs_reference"]


def test_metric_edge_cases() -> None:
    ref = torch.randn(1, 3, 5, 7)
    assert max_rel_logit_error(ref.clone(), ref) == 0.0
    assert max_rel_logit_error(torch.full_like(ref, float("nan")), ref) == float("inf")
    with pytest.raises(ValueError, match="shape"):
        max_rel_logit_error(ref[:, :2], ref)
    labels = ref.argmax(1)
    ignored = labels.clone()
    ignored[..., 0] = 255
    assert pixel_agreement(labels, labels) == 1.0
    assert pixel_agreement((labels + 1) % 3, ignored) == 0.0
