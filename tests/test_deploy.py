"""``fastdeeplab deploy``: a Triton Inference Server model repository whose config parses with Triton's own
schema and whose model.onnx runs in ONNX Runtime on exactly the inputs that config declares."""

from __future__ import annotations

import importlib.util
import os
import time

import numpy as np
import pytest
import torch
from _models import randomize_bn
from test_export_onnx import TinySeg

import fastdeeplab
from fastdeeplab.export.deploy import (
    LEGACY_MIN_AGE_S,
    _model_config_module,
    load_model_config,
    model_config_text,
)
from fastdeeplab.export.onnx import ort_session

SIZE = (33, 47)
HAS_TRITONCLIENT = importlib.util.find_spec("tritonclient") is not None
needs_tritonclient = pytest.mark.skipif(not HAS_TRITONCLIENT, reason="Triton's config schema ships with "
                                        "tritonclient (pip install tritonclient, in the dev extra)")


def type_name(value: int) -> str:
    return _model_config_module().DataType.Name(value)


NUMPY_TYPES = {"TYPE_UINT8": np.uint8, "TYPE_INT32": np.int32, "TYPE_FP32": np.float32, "TYPE_FP16": np.float16}


@pytest.fixture(scope="module")
def tiny() -> TinySeg:
    torch.manual_seed(0)
    return randomize_bn(TinySeg()).eval()


@pytest.fixture(scope="module", params=[pytest.param(dict(), id="uint8-in-uint8-labels"),
                                        pytest.param(dict(uint8_input=False, labels_dtype="int32", logits=True),
                                                     id="float-in-int32-labels-logits")])
def repo(request, tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("repo") / "model_repository"
    report = fastdeeplab.deploy(tiny, path, input_size=SIZE, class_names=["sky", "road", "car"], **request.param)
    return path, report, request.param


def declared_inputs(config, batch: int = 2, size: tuple[int, int] = (29, 35)) -> dict[str, np.ndarray]:
    """Inputs built from the config alone: the batch dimension Triton adds, -1 dims filled in."""
    feeds = {}
    rng = np.random.default_rng(0)
    for tensor in config.input:
        dtype = NUMPY_TYPES[type_name(tensor.data_type)]
        dims = [d if d > 0 else s for d, s in zip(tensor.dims, (3, *size))]
        shape = ([batch] if config.max_batch_size > 0 else []) + dims
        feeds[tensor.name] = (rng.integers(0, 256, shape).astype(dtype) if dtype == np.uint8
                              else rng.standard_normal(shape).astype(dtype))
    return feeds


def test_repository_layout(repo):
    path, report, options = repo
    model = path / "deeplabv3"
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) == [
        "README.md", "deeplabv3/1/model.onnx", "deeplabv3/config.pbtxt", "deeplabv3/labels.txt",
        "deeplabv3_python/1/model.onnx", "deeplabv3_python/1/model.py", "deeplabv3_python/config.pbtxt",
        "deeplabv3_python/labels.txt"]
    assert (model / "labels.txt").read_text().splitlines() == ["sky", "road", "car"]
    readme = (path / "README.md").read_text()
    assert "perf_analyzer -m deeplabv3" in readme and f"input:3,{SIZE[0]},{SIZE[1]}" in readme
    assert "tritonserver --model-repository" in readme
    assert report.models == {"deeplabv3_python": path / "deeplabv3_python", "deeplabv3": model}
    assert report.export.passed
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


@needs_tritonclient
def test_config_parses_with_tritons_schema(repo):
    path, report, options = repo
    config = load_model_config(path / "deeplabv3" / "config.pbtxt")
    assert report.validated
    assert config.name == "deeplabv3" and config.backend == "onnxruntime" and config.max_batch_size == 8
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert [(g.count, config.instance_group[0].Kind.Name(g.kind)) for g in config.instance_group] == [(1, "KIND_CPU")]
    (inp,) = config.input
    uint8 = options.get("uint8_input", True)
    assert inp.name == "input" and list(inp.dims) == [3, -1, -1]
    assert type_name(inp.data_type) == ("TYPE_UINT8" if uint8 else "TYPE_FP32")
    outputs = {o.name: o for o in config.output}
    labels_type = "TYPE_UINT8" if options.get("labels_dtype", "uint8") == "uint8" else "TYPE_INT32"
    assert type_name(outputs["labels"].data_type) == labels_type
    assert list(outputs["labels"].dims) == [-1, -1] and outputs["labels"].label_filename == "labels.txt"
    assert set(outputs) == ({"out", "labels"} if options.get("logits") else {"labels"})
    if options.get("logits"):
        assert list(outputs["out"].dims) == [3, -1, -1]


@needs_tritonclient
@torch.no_grad()
def test_model_runs_on_exactly_the_declared_inputs(repo, tiny):
    path, _, options = repo
    config = load_model_config(path / "deeplabv3" / "config.pbtxt")
    session = ort_session(path / "deeplabv3" / "1" / "model.onnx", threads=1)
    assert [i.name for i in session.get_inputs()] == [t.name for t in config.input]
    assert sorted(o.name for o in session.get_outputs()) == sorted(o.name for o in config.output)
    feeds = declared_inputs(config)
    names = [o.name for o in config.output]
    got = dict(zip(names, session.run(names, feeds), strict=True))
    for output in config.output:
        value = got[output.name]
        assert value.dtype == NUMPY_TYPES[type_name(output.data_type)], output.name
        assert value.shape[0] == 2 and len(value.shape) == 1 + len(output.dims)
        assert all(d == -1 or d == s for d, s in zip(output.dims, value.shape[1:]))
    x = torch.from_numpy(feeds["input"])
    if x.dtype == torch.uint8:  # the graph normalises raw pixels itself
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        x = (x.float() / 255 - mean) / std
    expected = tiny(x)["out"].argmax(1).numpy()
    assert (got["labels"] == expected).mean() > 0.999


def test_refusals_before_any_work(tiny, tmp_path):
    repo = tmp_path / "repo"
    with pytest.raises(ValueError, match="preferred_batch_sizes"):
        fastdeeplab.deploy(tiny, repo, max_batch_size=4, preferred_batch_sizes=(8,))
    with pytest.raises(ValueError, match="device must be one of"):
        fastdeeplab.deploy(tiny, repo, device="tpu")
    for bad in ("../escape", 'x"\ninstance_group [{kind: KIND_GPU}]', ".hidden", "", "a b"):
        with pytest.raises(ValueError, match="not a valid Triton model name"):
            fastdeeplab.deploy(tiny, repo, name=bad, check=False)
    with pytest.raises(ValueError, match="nothing to serve"):
        fastdeeplab.deploy(tiny, repo, argmax=False)
    blocker = tmp_path / "afile"
    blocker.write_text("a file, not a folder")
    with pytest.raises(OSError, match="not a directory"):
        fastdeeplab.deploy(tiny, blocker / "repo")
    (repo / "deeplabv3").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="overwrite"):
        fastdeeplab.deploy(tiny, repo)
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(ImportError, match=r"pip install 'fastdeeplab\[tensorrt\]'"):
            fastdeeplab.deploy(tiny, tmp_path / "trt", tensorrt=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["afile", "deeplabv3", "repo"]


def test_class_names_must_match(tiny, tmp_path):
    with pytest.raises(ValueError, match="class_names has 2 names; the model has 3 classes"):
        fastdeeplab.deploy(tiny, tmp_path / "repo", input_size=SIZE, class_names=["a", "b"], check=False)
    assert not (tmp_path / "repo" / "deeplabv3").exists()


@needs_tritonclient
def test_config_writer_types_and_schema_errors():
    text = model_config_text("m", backend="tensorrt", inputs={"input": ("float16", ("batch", 3, "h", "w"))},
                             outputs={"out": ("float32", ("batch", 5, "h", "w"))}, max_batch_size=0,
                             preferred_batch_sizes=(), max_queue_delay_us=0, instances=2, kind="KIND_GPU")
    config = load_model_config(text)
    assert list(config.input[0].dims) == [-1, 3, -1, -1]  # no batching: the batch dim stays, dynamic
    assert not config.HasField("dynamic_batching") and config.instance_group[0].count == 2
    from google.protobuf import text_format

    with pytest.raises(text_format.ParseError, match="max_batch"):
        load_model_config(text.replace("max_batch_size", "max_batch"))


@needs_tritonclient
def test_cli_writes_a_repository(tmp_path, capsys):
    from fastdeeplab.cli import main

    out = tmp_path / "repo"
    code = main(["deploy", "--model", "deeplabv3_resnet50", "--num-classes", "2", "--input-size", "33", "33",
                 "--max-batch-size", "2", "--preferred-batch-sizes", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "parsed with Triton's ModelConfig schema" in printed and "FAIL" not in printed
    config = load_model_config(out / "deeplabv3" / "config.pbtxt")
    assert config.max_batch_size == 2 and (out / "deeplabv3" / "labels.txt").read_text().split() == [
        "class_0", "class_1"]


def test_class_name_count_is_checked_before_the_export(tmp_path, monkeypatch):
    """A DeepLabV3 says its class count: a wrong --class-names fails before the (long) export."""
    from fastdeeplab.export import onnx as export_onnx_module

    model = fastdeeplab.deeplabv3_resnet50(num_classes=3).eval()
    monkeypatch.setattr(export_onnx_module, "export_onnx", lambda *a, **k: pytest.fail("exported first"))
    with pytest.raises(ValueError, match="class_names has 2 names; the model has 3 classes"):
        fastdeeplab.deploy(model, tmp_path / "repo", class_names=["a", "b"])


def test_a_hand_written_readme_is_not_replaced_without_overwrite(tiny, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("# my notes\n")
    with pytest.raises(FileExistsError, match="README.md exists and was not written by fastdeeplab deploy"):
        fastdeeplab.deploy(tiny, repo, input_size=SIZE, check=False, backends=("onnxruntime",))
    assert (repo / "README.md").read_text() == "# my notes\n"
    assert sorted(p.name for p in repo.iterdir()) == ["README.md"]
    fastdeeplab.deploy(tiny, repo, input_size=SIZE, check=False, backends=("onnxruntime",), overwrite=True)
    assert "fastdeeplab deploy" in (repo / "README.md").read_text().splitlines()[0]
    # its own README is replaced by the next deploy of another model without --overwrite
    fastdeeplab.deploy(tiny, repo, name="other", input_size=SIZE, check=False, backends=("onnxruntime",))


def test_a_killed_deploy_leaves_nothing_the_next_one_keeps(tiny, tmp_path):
    """Work folders of a deploy that no longer runs (pid 999999999) are removed; a live one's (pid 1) kept."""
    repo = tmp_path / "repo"
    repo.mkdir()
    dead = [tmp_path / ".deploy.999999999.abcd1234", repo / ".deeplabv3.999999999.x1y2z3w4.staging",
            repo / ".deeplabv3.999999999.q1w2e3r4.old"]
    live = [tmp_path / ".deploy.1.abcd1234", repo / ".deeplabv3.1.x1y2z3w4.staging"]
    for folder in dead + live:
        (folder / "1").mkdir(parents=True)
        (folder / "1" / "model.onnx").write_bytes(b"x" * 1000)
    # deploys from before the pid tag: tempfile's 8 characters only; removed once untouched for an hour
    legacy_old = [tmp_path / ".deploy.k2_9xq0a", repo / ".deeplabv3.ab12cd34.staging", repo / ".m-1.v2.zz99yy88.old"]
    legacy_kept = [tmp_path / ".deploy.r4nd0m12",  # recent: its deploy may still run
                   tmp_path / ".deploy.notmine1",  # old, but holds something deploy does not write
                   tmp_path / ".deploy.short", repo / ".deploy.k2_9xq0b",  # not the exact pattern, not the place
                   tmp_path / ".deeplabv3.ab12cd34.staging"]  # a staging name beside the repository
    for folder in legacy_old + legacy_kept:
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"x")
    (legacy_old[2] / "model.onnx").unlink()  # an old folder holds the replaced model folder, under its name
    (legacy_old[2] / "m-1.v2").mkdir()
    (tmp_path / ".deploy.notmine1" / "notes.txt").write_text("mine")
    (tmp_path / ".deploy.r4nd0m12" / "model.onnx").touch()
    hour_ago = time.time() - LEGACY_MIN_AGE_S - 60
    for folder in [*legacy_old, *legacy_kept[1:]]:
        for p in (*folder.iterdir(), folder):
            os.utime(p, (hour_ago, hour_ago))
    (tmp_path / ".deploy.abcdefgh").symlink_to(legacy_old[0])  # a link is never followed nor removed
    fastdeeplab.deploy(tiny, repo, input_size=SIZE, check=False, backends=("onnxruntime",))
    assert not any(p.exists() for p in dead + legacy_old)
    assert all(p.exists() for p in live + legacy_kept)
    assert (tmp_path / ".deploy.abcdefgh").is_symlink()
    assert sorted(p.name for p in repo.iterdir() if not p.name.startswith(".")) == ["README.md", "deeplabv3"]


def test_legacy_cleanup_inside_the_repository_removes_only_deploys_layout(tmp_path):
    """Inside the repository a pre-pid-tag staging or old folder is removed only if it holds what deploy put
    there (a staging: config.pbtxt, labels.txt, model.*.json, 1/model.*; an old: the replaced model folder under
    its own name): a user's hidden folder that merely matches the name pattern is kept, however old."""
    from fastdeeplab.export.deploy import remove_stale_work

    repo = tmp_path / "repo"
    staging, old = repo / ".deeplabv3.ab12cd34.staging", repo / ".resnet.zz99yy88.old"
    (staging / "1").mkdir(parents=True)
    for name in ("config.pbtxt", "labels.txt", "model.build.json", "1/model.plan"):
        (staging / name).write_text("x")
    (old / "resnet" / "1").mkdir(parents=True)
    (old / "resnet" / "1" / "model.onnx").write_text("x")
    mine = [repo / ".notes.backup01.staging", repo / ".resnet.20240101.old", repo / ".scratch.abcdefgh.staging"]
    for folder in mine:
        folder.mkdir()
    (mine[0] / "todo.txt").write_text("mine")
    (mine[1] / "weights.pt").write_text("mine")
    (mine[2] / "1").mkdir()
    (mine[2] / "1" / "notes.txt").write_text("mine")
    hour_ago = time.time() - LEGACY_MIN_AGE_S - 60
    for p in repo.rglob("*"):
        os.utime(p, (hour_ago, hour_ago))
    assert sorted(remove_stale_work(repo)) == sorted([staging, old])
    assert all(p.exists() for p in mine)


def test_cli_refuses_inputs_inside_what_it_replaces(tmp_path, capsys):
    from fastdeeplab import cli

    repo = tmp_path / "repo"
    (repo / "deeplabv3").mkdir(parents=True)
    weights = repo / "deeplabv3" / "w.pt"
    torch.save(fastdeeplab.deeplabv3_resnet50(num_classes=3).state_dict(), weights)
    rc = cli.main(["deploy", "--out", str(repo), "--weights", str(weights), "--num-classes", "3", "--overwrite",
                   "--backends", "onnxruntime"])
    err = capsys.readouterr().err
    assert rc == 1 and "--weights" in err and "which this command replaces" in err, err
    assert weights.is_file()
