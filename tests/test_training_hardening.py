"""Training refuses bad input early and in one line (issue 16): config values, labels, divergence, resumes,
checkpoints that are not plain weights, and the ``fastdeeplab train`` flags. Every case is a real run on a
tiny dataset, through the Python API or the command line as a user would meet it."""

from __future__ import annotations

import importlib
import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
from _voc import NUM_CLASSES, SIZE, make_voc, single_thread, tiny_train_config  # noqa: F401  (fixture)

import fastdeeplab
from fastdeeplab import cli
from fastdeeplab.training import TrainConfig, load_config
from fastdeeplab.training import loop as training_loop

pytestmark = pytest.mark.usefixtures("single_thread")

MODULES = ["config", "distributed", "samples", "checkpoint", "loop", "recipes", "cli"]


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return make_voc(tmp_path_factory.mktemp("voc"), num_images=4)


@pytest.fixture(scope="module")
def voc5(tmp_path_factory) -> Path:
    """Five classes on disk (ids 0..4): every image holds class ``1 + i % 4``."""
    return make_voc(tmp_path_factory.mktemp("voc5"), num_images=4, num_classes=5)


def _cli_error(capsys, argv: list[str]) -> str:
    """Run ``fastdeeplab train ARGV``; expect exit code 1 and exactly one error line, no traceback."""
    capsys.readouterr()
    rc = cli.main(["train", *argv])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("fastdeeplab train: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _usage_error(capsys, argv: list[str]) -> str:
    """Run ``fastdeeplab train ARGV``; expect argparse's refusal: exit code 2 and one ``error:`` line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def _tiny_args(data: Path, out: Path) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--split", "train", "--num-classes", str(NUM_CLASSES),
            "--crop-size", str(SIZE), "--batch-size", "2", "--workers", "0", "--no-progress",
            "--set", "stages=[{iterations: 2, lr: 0.01}]", "--set", "scale_range=[1.0, 1.0]",
            "--set", "checkpoint_every=0", "--set", "log_every=0", "--set", "bn_momentum=0.1"]


# --------------------------------------------------------------------------------------------------
# The package: one module per concern, each importable by name
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODULES)
def test_each_training_module_imports_by_name(name):
    module = importlib.import_module(f"fastdeeplab.training.{name}")
    assert module.__name__ == f"fastdeeplab.training.{name}" and module.__doc__
    assert getattr(fastdeeplab.training, name) is module  # no function shadows a module
    source = Path(module.__file__).read_text()
    assert source.count("\n") <= 500, f"{name}.py has {source.count(chr(10))} lines"


def test_old_names_stay_importable_and_train_is_the_function():
    old = ["OVERFIT_STAGES", "PAPER_STAGES", "ResumableBatchSampler", "Stage", "SyncBatchNorm", "TrainConfig",
           "TrainResult", "bootstrap_indices", "configure_parser", "convert_sync_batchnorm", "freeze_batchnorm",
           "load_config", "overfit_demo", "run", "segmentation_loss", "train"]
    assert set(old) <= set(fastdeeplab.training.__all__)
    for name in old:
        assert getattr(fastdeeplab.training, name) is not None
    assert fastdeeplab.train is fastdeeplab.training.train is training_loop.train
    assert cli.COMMANDS["train"][0] == "fastdeeplab.training.cli"
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("fastdeeplab.training.core")


# --------------------------------------------------------------------------------------------------
# Config validation at load: the field named, nothing trained
# --------------------------------------------------------------------------------------------------
BAD_YAML = [
    pytest.param("stages:\n  - {iterations: 2, lr: .nan}\n", ValueError,
                 r"stages\[0\]\.lr must be a finite number > 0, got nan", id="lr-nan"),
    pytest.param("stages:\n  - {iterations: 2, lr: .inf}\n", ValueError,
                 r"stages\[0\]\.lr must be a finite number > 0, got inf", id="lr-inf"),
    pytest.param("stages:\n  - {iterations: 2, lr: -0.1}\n", ValueError,
                 r"stages\[0\]\.lr must be a number > 0", id="lr-negative"),
    pytest.param("stages:\n  - {iterations: 2, lr: fast}\n", TypeError,
                 r"stages\[0\]\.lr must be a number > 0, got 'fast'", id="lr-text"),
    pytest.param("stages:\n  - {iterations: 2.5, lr: 0.1}\n", TypeError,
                 r"stages\[0\]\.iterations must be an integer, got 2\.5 \(float\)", id="iterations-float"),
    pytest.param("stages:\n  - {iterations: '10', lr: 0.1}\n", TypeError,
                 r"stages\[0\]\.iterations must be an integer, got '10' \(str\)", id="iterations-str"),
    pytest.param("stages:\n  - {iterations: 0, lr: 0.1}\n", ValueError,
                 r"stages\[0\]\.iterations must be an integer >= 1, got 0", id="iterations-0"),
    pytest.param("stages:\n  - {iterations: 1, lr: 0.1, output_stride: 12}\n", ValueError,
                 r"stages\[0\]\.output_stride must be one of 8, 16, 32", id="os-12"),
    pytest.param("stages: []\n", ValueError, "at least one stage", id="no-stages"),
    pytest.param("weight_decay: .nan\n", ValueError,
                 r"weight_decay must be a finite number >= 0, got nan", id="wd-nan"),
    pytest.param("momentum: 1.5\n", ValueError,
                 r"momentum must be a number in \[0, 1\), got 1\.5", id="momentum-range"),
    pytest.param("bn_momentum: .inf\n", ValueError,
                 r"bn_momentum must be a finite number", id="bn-momentum-inf"),
    pytest.param("aux_weight: -1\n", ValueError,
                 r"aux_weight must be a number >= 0", id="aux-weight-negative"),
    pytest.param("poly_power: [1]\n", TypeError,
                 r"poly_power must be a number >= 0, got \[1\] \(list\)", id="poly-list"),
    pytest.param("batch_size: 0\n", ValueError, r"batch_size must be an integer >= 1, got 0", id="batch-0"),
    pytest.param("batch_size: 8.0\n", TypeError,
                 r"batch_size must be an integer, got 8\.0", id="batch-float"),
    pytest.param("crop_size: true\n", TypeError,
                 r"crop_size must be an integer, got True \(bool\)", id="crop-bool"),
    pytest.param("num_classes: 2.5\n", TypeError,
                 r"num_classes must be an integer, got 2\.5", id="classes-float"),
    pytest.param("multi_grid: '124'\n", TypeError,
                 r"multi_grid must be a list of integers, got '124'", id="grid-str"),
    pytest.param("multi_grid: [1.5, 2, 4]\n", TypeError,
                 r"multi_grid\[0\] must be an integer, got 1\.5", id="grid-float"),
    pytest.param("scale_range: [2.0, 0.5]\n", ValueError,
                 r"scale_range must be \[min, max\] with min <= max", id="scale-order"),
    pytest.param("scale_range: [.nan, 1.0]\n", ValueError,
                 r"scale_range\[0\] must be a finite number > 0", id="scale-nan"),
    pytest.param("flip: 'yes please'\n", TypeError, r"flip must be true or false", id="flip-str"),
    pytest.param("seed: -1\n", ValueError, r"seed must be an integer >= 0", id="seed-negative"),
    pytest.param("stop_after: 0\n", ValueError,
                 r"stop_after must be an integer >= 1, got 0", id="stop-after-0"),
    pytest.param("device: tpu9\n", ValueError, r"device must be cpu, cuda, cuda:N", id="device"),
    pytest.param("dataset: coco\n", ValueError,
                 r"dataset must be one of voc, cityscapes, got 'coco'", id="dataset"),
    pytest.param("weights_backbone: 5\n", TypeError,
                 r"weights_backbone must be a non-empty string or null, got 5 \(int\)", id="weights-int"),
    pytest.param("model_kwargs: [head]\n", TypeError,
                 r"model_kwargs must be a mapping of option names to values", id="model-kwargs-list"),
    pytest.param("stages: {iterations: 2, lr: 0.1}\n", TypeError,
                 r"stages must be a list of stages", id="stages-mapping"),
    pytest.param("- 1\n- 2\n", ValueError, r"must hold a mapping of options", id="not-a-mapping"),
]


@pytest.mark.parametrize("text, error, message", BAD_YAML)
def test_bad_config_values_are_refused_at_load_naming_the_field(tmp_path, text, error, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(error, match=message):
        load_config(path)


def test_good_values_in_yaml_spellings_load(tmp_path):
    path = tmp_path / "ok.yaml"
    # YAML 1.1 (PyYAML) reads 1e-4, without a dot, as text: taken as the number it spells
    path.write_text("weight_decay: 1e-4\nstages:\n  - {iterations: 3, lr: 7e-3}\n")
    cfg = load_config(path)
    assert cfg.weight_decay == 1e-4 and cfg.stages[0].lr == 0.007 and isinstance(cfg.stages[0].lr, float)
    assert TrainConfig(multi_grid=[1, 2, 4]).multi_grid == (1, 2, 4)
    from torchvision.models import ResNet50_Weights

    assert TrainConfig(weights_backbone=ResNet50_Weights.IMAGENET1K_V1).weights_backbone == \
        "ResNet50_Weights.IMAGENET1K_V1"  # an enum is kept by name: checkpoints stay weights-only


def test_nan_learning_rate_through_the_cli_is_one_line_and_writes_nothing(voc, tmp_path, capsys):
    config = tmp_path / "nan.yaml"
    config.write_text("stages:\n  - {iterations: 2, lr: .nan}\n")
    out = tmp_path / "run"
    line = _cli_error(capsys, ["--config", str(config), "--data", str(voc), "--out", str(out)])
    assert "stages[0].lr must be a finite number > 0, got nan" in line and str(config) in line
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# Divergence: one line, and never a checkpoint of non-finite weights
# --------------------------------------------------------------------------------------------------
def test_diverging_run_stops_in_one_line_and_keeps_checkpoints_finite(voc, tmp_path, capsys):
    out = tmp_path / "run"
    args = _tiny_args(voc, out) + ["--set", "stages=[{iterations: 4, lr: 1.0e+35}]",
                                   "--set", "checkpoint_every=1"]
    line = _cli_error(capsys, args)
    assert "training diverged" in line and "lower the learning rate" in line
    if (out / "checkpoint.pt").exists():  # written only while the weights were finite
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (out / "model_final.pt").exists()


def test_non_finite_loss_is_a_runtime_error_before_the_weights_change(voc, tmp_path, monkeypatch):
    real = training_loop.segmentation_loss
    monkeypatch.setattr(training_loop, "segmentation_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(RuntimeError, match=r"training diverged: the loss is nan at iteration 1; "
                                           r"the weights were not updated"):
        fastdeeplab.train(**tiny_train_config(voc, tmp_path / "run"))


def test_no_checkpoint_is_written_from_non_finite_weights(voc, tmp_path, monkeypatch):
    """Weights turn NaN while the loss stays finite: the stop-after checkpoint is refused, nothing written."""
    real_step = training_loop.train_step

    def poisoned_step(model, *args, **kwargs):
        loss = real_step(model, *args, **kwargs)
        with torch.no_grad():
            training_loop.unwrap(model).classifier[-1].weight[0, 0] = float("nan")
        return loss

    monkeypatch.setattr(training_loop, "train_step", poisoned_step)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"weight tensors hold NaN or inf at iteration 1 "
                                           r".*checkpoint\.pt not written"):
        fastdeeplab.train(**tiny_train_config(voc, out, stop_after=1))
    assert not (out / "checkpoint.pt").exists()
    assert not out.exists() or not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_resume_from_a_checkpoint_with_non_finite_weights_is_refused(voc, tmp_path):
    out = tmp_path / "run"
    fastdeeplab.train(**tiny_train_config(voc, out, stop_after=1))
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["model"]["classifier.4.weight"][0, 0] = float("inf")
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"1 weight tensors hold NaN or inf .*classifier\.4\.weight"
                                         r".*--no-resume"):
        fastdeeplab.train(**tiny_train_config(voc, out))


# --------------------------------------------------------------------------------------------------
# Labels the model cannot predict
# --------------------------------------------------------------------------------------------------
def test_labels_out_of_range_are_named_with_num_classes(voc5, tmp_path, capsys):
    args = _tiny_args(voc5, tmp_path / "run") + ["--batch-size", "4"]
    line = _cli_error(capsys, args)
    assert re.search(r"label \S+/SegmentationClass/synth_\d+\.png holds class ids \[\d\] outside 0\.\.2 "
                     r"\(num_classes=3", line), line  # the file is named
    assert "--num-classes" in line


def test_labels_out_of_range_through_the_api_are_a_value_error(voc5, tmp_path):
    with pytest.raises(ValueError, match=r"class ids \[.*\] outside 0\.\.1 \(num_classes=2"):
        fastdeeplab.train(**tiny_train_config(voc5, None, num_classes=2, scale_range=(1.0, 1.0)))


# --------------------------------------------------------------------------------------------------
# Resumes that cannot continue
# --------------------------------------------------------------------------------------------------
def test_resume_with_other_num_classes_says_what_differs_and_how_to_proceed(voc5, tmp_path, capsys):
    out = tmp_path / "run"
    fastdeeplab.train(**tiny_train_config(voc5, out, num_classes=5, stop_after=1))
    args = _tiny_args(voc5, out) + ["--num-classes", "6"]
    line = _cli_error(capsys, args)
    assert "cannot resume from" in line and "num_classes=5 (this run: 6)" in line
    assert "(--num-classes 5)" in line and "--no-resume" in line and "size mismatch" not in line


def test_resume_with_other_model_settings_is_refused(voc, tmp_path):
    out = tmp_path / "run"
    fastdeeplab.train(**tiny_train_config(voc, out, stop_after=1))
    with pytest.raises(ValueError, match=r"multi_grid=\[1, 2, 4\] \(this run: \[1, 1, 1\]\)"):
        fastdeeplab.train(**tiny_train_config(voc, out, multi_grid=(1, 1, 1)))
    with pytest.raises(ValueError, match=r"aux_loss=False \(this run: True\)"):
        fastdeeplab.train(**tiny_train_config(voc, out, aux_loss=True))
    # the right settings, or --no-resume, proceed
    assert fastdeeplab.train(**tiny_train_config(voc, out)).iteration == 2
    assert fastdeeplab.train(**tiny_train_config(voc, out, aux_loss=True, resume=False)).iteration == 2


class _Payload:
    """Pickled into a checkpoint: loading it with weights_only=False would create ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoints_load_weights_only_so_pickled_code_never_runs(voc, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "code_ran"
    torch.save({"format": 1, "model": {}, "payload": _Payload(str(marker))}, out / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint\.pt: not a readable weights-only "
                                         r"checkpoint.*--no-resume"):
        fastdeeplab.train(**tiny_train_config(voc, out))
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# The command line: --split, --stop-after, flags named in one line
# --------------------------------------------------------------------------------------------------
def test_split_flag_chooses_the_training_split(voc, tmp_path, capsys):
    out = tmp_path / "run"
    assert TrainConfig().train_split == "train_aug"  # which the tiny dataset does not have
    rc = cli.main(["train", *_tiny_args(voc, out)])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["finished"] and summary["iteration"] == 2
    line = _cli_error(capsys, _tiny_args(voc, tmp_path / "other") + ["--split", "nosuch"])
    assert "nosuch" in line and "available splits" in line
    assert not (tmp_path / "other").exists()  # refused before any directory was made


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_stop_after_below_one_is_refused_naming_the_flag(voc, tmp_path, capsys, value):
    line = _usage_error(capsys, _tiny_args(voc, tmp_path / "run") + ["--stop-after", value])
    assert "--stop-after" in line and "expected an integer >= 1" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--crop-size", "-1"), ("--workers", "-1"),
                                         ("--num-classes", "0"), ("--seed", "x")])
def test_integer_flags_out_of_range_name_the_flag(voc, tmp_path, capsys, flag, value):
    line = _usage_error(capsys, ["--data", str(voc), flag, value])
    assert flag in line and "expected an integer >=" in line


@pytest.mark.parametrize("extra, message", [
    (["--device", "tpu9"], "device must be cpu, cuda, cuda:N"),
    (["--set", "lr=0.1"], "unknown training option(s) lr"),
    (["--set", "stages"], "--set expects KEY=VALUE"),
    (["--set", "weight_decay=.nan"], "weight_decay must be a finite number >= 0, got nan"),
    (["--set", "stages=[{iterations: 2.5, lr: 0.01}]"], "stages[0].iterations must be an integer, got 2.5"),
], ids=["device", "unknown-key", "set-no-value", "set-nan", "set-iterations-float"])
def test_cli_user_errors_are_one_line(voc, tmp_path, capsys, extra, message):
    line = _cli_error(capsys, _tiny_args(voc, tmp_path / "run") + extra)
    assert message in line
    assert not (tmp_path / "run").exists()


def test_missing_data_and_file_as_out_dir_are_one_line(voc, tmp_path, capsys):
    line = _cli_error(capsys, _tiny_args(tmp_path / "nowhere", tmp_path / "run"))
    assert "no PASCAL VOC dataset under" in line
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    line = _cli_error(capsys, _tiny_args(voc, blocker))
    assert f"out_dir {blocker} exists and is not a directory" in line
    line = _cli_error(capsys, ["--config", str(tmp_path), "--data", str(voc)])
    assert "is a directory" in line


def test_unparsable_yaml_is_one_line(voc, tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text(textwrap.dedent("""\
        stages:
          - {iterations: 2, lr: 0.01
        batch_size: 2
        """))
    line = _cli_error(capsys, ["--config", str(config), "--data", str(voc)])
    assert f"cannot parse config {config}" in line


def test_incomplete_checkpoint_is_refused_in_one_line(voc, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"format": 1, "model": {}}, out / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"an incomplete training checkpoint \(missing model_config, "
                                         r".*--no-resume"):
        fastdeeplab.train(**tiny_train_config(voc, out))
