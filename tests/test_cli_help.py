"""Every ``--help`` is fast and complete: no torch import before the arguments are parsed, every option has
help text, and ``import fastdeeplab`` resolves its submodules lazily (``fastdeeplab.data.VOCSegmentation``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fastdeeplab import cli

HEAVY = ("torch", "onnx", "onnxruntime", "openvino", "tensorrt", "triton", "matplotlib")

# One subprocess for all subcommands: `main([name, "--help"])` each, and the heavy modules each one imported.
_PROBE = f"""
import json, sys
HEAVY = {HEAVY!r}
from fastdeeplab.cli import COMMANDS, main
out = {{}}
for argv in [[]] + [[name] for name in COMMANDS]:
    try:
        main([*argv, "--help"])
    except SystemExit:
        pass
    out[" ".join(argv) or "(top)"] = sorted(m for m in HEAVY if m in sys.modules)
print("@@" + json.dumps(out))
"""


def test_every_help_imports_no_torch():
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    heavy = json.loads(result.stdout.rsplit("@@", 1)[1])
    assert set(heavy) == {"(top)", *cli.COMMANDS}
    first = next(((name, mods) for name, mods in heavy.items() if mods), None)
    assert first is None, f"fastdeeplab {first[0]} --help imported {first[1]}"


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_option_has_help_text(name):
    parser = cli.build_parser([name])
    sub = next(a for a in parser._actions if a.dest == "command").choices[name]
    missing = [a.option_strings[0] if a.option_strings else a.dest for a in sub._actions
               if not a.help and a.dest != "help"]
    assert missing == [], f"fastdeeplab {name}: options without help text: {missing}"


def test_train_help_names_the_output_stride_and_the_two_stages():
    text = subprocess.run([sys.executable, "-m", "fastdeeplab", "train", "--help"], capture_output=True,
                          text=True, timeout=120).stdout
    for words in ("output stride 16", "output stride 8", "stage 1", "stage 2", "--crop-size", "--seed",
                  "--no-progress", "BatchNorm frozen"):
        assert words in text, words


def test_eval_help_explains_dataset_and_split():
    text = subprocess.run([sys.executable, "-m", "fastdeeplab", "eval", "--help"], capture_output=True,
                          text=True, timeout=120).stdout
    assert "cityscapes" in text and "ImageSets/Segmentation" in text and "synthetic" in text


def test_model_names_match_the_registry():
    from fastdeeplab.hub import list_models

    assert sorted(cli.MODEL_NAMES) == sorted(list_models()), "update fastdeeplab.cli.MODEL_NAMES"


def test_import_fastdeeplab_is_lazy_and_submodules_resolve():
    probe = ("import sys, fastdeeplab; assert 'torch' not in sys.modules, 'import fastdeeplab imported torch';"
             "import fastdeeplab as f; print(f.data.VOCSegmentation.__name__, f.export.__name__, "
             "callable(f.optimize), f.kernels.__name__)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["VOCSegmentation", "fastdeeplab.export", "True", "fastdeeplab.kernels"]


def test_unknown_attribute_is_an_attribute_error():
    import fastdeeplab

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fastdeeplab.nope  # noqa: B018

