"""The adversarial cases of issue 16, as data: one table that ``tests/test_hardening.py`` runs under pytest and
``scripts/hardening_catalogue.py`` runs to write ``docs/HARDENING.md`` from the actual outcomes.

Each :class:`Case` is a bad (or awkward) input and what it must get:

* ``error``/``match`` set: a **clear error**, an exception of that type whose message matches ``match`` (for the
  command line: exit code 1 or 2 and exactly one ``error:`` line on stderr);
* ``error`` unset: a **correct result**; ``run`` raises ``AssertionError`` when the result is wrong.

``after`` runs whatever happened and raises :class:`DataLost` when a file or device that must survive did not.
:func:`run_case` classifies the outcome: ``clear error``, ``correct``, ``unclear error``, ``silent result``,
``wrong result`` or ``data lost``. Only the first two pass.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import os
import pickle
import re
import socket
import stat
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import fastdeeplab
from fastdeeplab import cli
from fastdeeplab._io import atomic_path, check_output_path


class DataLost(AssertionError):
    """A file or device that had to survive was replaced, changed or left behind."""


class CommandFailed(Exception):
    """A command-line run that exited non-zero: ``rc`` and its stderr."""

    def __init__(self, rc: int, stderr: str) -> None:
        self.rc, self.stderr = rc, stderr
        errors = [line for line in stderr.splitlines() if ": error:" in line]
        super().__init__(errors[-1] if errors else stderr.strip())
        self.error_lines = errors


@dataclass
class Case:
    id: str
    area: str
    what: str  # the input tried, as a reader would describe it
    run: Callable[[Path], object]
    error: type[BaseException] | tuple[type[BaseException], ...] | None = None
    match: str = ""
    after: Callable[[Path], None] | None = None


@dataclass
class Outcome:
    kind: str  # clear error | correct | unclear error | silent result | wrong result | data lost
    message: str

    @property
    def passed(self) -> bool:
        return self.kind in ("clear error", "correct")


def run_case(case: Case, tmp: Path) -> Outcome:
    """Run one case in the empty folder ``tmp`` and classify what it got."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = case.run(tmp)
    except AssertionError as exc:
        outcome = Outcome("data lost" if isinstance(exc, DataLost) else "wrong result", str(exc))
    except Exception as exc:  # noqa: BLE001  (classifying every failure is the point)
        message = str(exc).strip()
        if case.error is None:
            outcome = Outcome("unclear error", f"{type(exc).__name__}: {message}")
        elif isinstance(exc, CommandFailed):
            clear = (exc.rc in (1, 2) and len(exc.error_lines) == 1 and "Traceback" not in exc.stderr
                     and re.search(case.match, message, re.I))
            outcome = Outcome("clear error" if clear else "unclear error", f"exit {exc.rc}: {message}")
        else:
            clear = isinstance(exc, case.error) and re.search(case.match, message, re.I) and "\n" not in message
            outcome = Outcome("clear error" if clear else "unclear error", f"{type(exc).__name__}: {message}")
    else:
        if case.error is None:
            outcome = Outcome("correct", str(result) if result is not None else "as expected")
        else:
            outcome = Outcome("silent result", f"no error; returned {result!r:.200}")
    if case.after is not None:
        try:
            case.after(tmp)
        except DataLost as exc:
            outcome = Outcome("data lost", str(exc))
    return outcome


# --------------------------------------------------------------------------------------------------
# Shared, built once: a small-class model, its optimized copies, inputs.
# --------------------------------------------------------------------------------------------------
NUM_CLASSES = 3
SIZE = 65


@functools.cache
def model() -> fastdeeplab.DeepLabV3:
    torch.manual_seed(0)
    return fastdeeplab.deeplabv3_resnet50(num_classes=NUM_CLASSES, output_stride=16).eval()


@functools.cache
def optimized(backend: str) -> torch.nn.Module:
    if backend == "eager":
        return model()
    return fastdeeplab.optimize(model(), backend=backend)


def _image(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _backends() -> list[str]:
    import importlib.util

    names = ["eager", "torch"]
    names += [b for b, pkg in (("onnxruntime", "onnxruntime"), ("openvino", "openvino"))
              if importlib.util.find_spec(pkg) is not None]
    return names


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def run_cli(*argv: str) -> str:
    """Run ``fastdeeplab argv`` in-process; raise :class:`CommandFailed` on a non-zero exit."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = cli.main(list(argv))
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
    if rc:
        raise CommandFailed(rc, err.getvalue())
    return out.getvalue()


def _same_file(path: Path, content: bytes, mode: int | None = None) -> Callable[[Path], None]:
    def check(tmp: Path) -> None:
        p = tmp / path if not path.is_absolute() else path
        if not p.is_file() or p.read_bytes() != content:
            raise DataLost(f"{p} changed")
        if mode is not None and stat.S_IMODE(p.stat().st_mode) != mode:
            raise DataLost(f"{p} changed mode to {oct(stat.S_IMODE(p.stat().st_mode))}")
    return check


def _still(path: str, test: Callable[[int], bool], kind: str) -> Callable[[Path], None]:
    def check(tmp: Path) -> None:
        p = Path(path) if path.startswith("/") else tmp / path
        if not test(os.lstat(p).st_mode):
            raise DataLost(f"{p} is no longer {kind}")
    return check


def _no_leftovers(tmp: Path) -> None:
    temps = [p.name for p in tmp.rglob("*") if p.name.endswith(".tmp")]
    if temps:
        raise DataLost(f"temporary files left behind: {temps}")


def _nothing_created(*names: str) -> Callable[[Path], None]:
    def check(tmp: Path) -> None:
        made = [n for n in names if (tmp / n).exists()]
        if made:
            raise DataLost(f"created for an invalid argument: {made}")
    return check


def _read_only_file(tmp: Path) -> Path:
    p = tmp / "scores.json"
    p.write_bytes(b"precious")
    p.chmod(0o444)
    return p


def _fifo(tmp: Path) -> Path:
    p = tmp / "pipe"
    os.mkfifo(p)
    return p


def _socket(tmp: Path) -> Path:
    p = tmp / "sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    s.close()
    return p


def _photo(tmp: Path) -> Path:
    from PIL import Image

    p = tmp / "photo.png"
    Image.new("RGB", (40, 33), (120, 30, 200)).save(p)
    return p


def _dataset_dir(tmp: Path) -> Path:
    d = tmp / "voc"
    d.mkdir()
    return d


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------
def _file_cases() -> list[Case]:
    area = "file writes"

    def write(path: Path | str, **kw) -> Callable[[Path], None]:
        def go(tmp: Path) -> None:
            with atomic_path(path if isinstance(path, str) else tmp / path, **kw) as t:
                t.write_bytes(b"new")
        return go

    def stale(tmp: Path) -> str:
        old = tmp / ".model.onnx.fastdeeplab-999999999-abcd.tmp"  # a pid that cannot run
        old.write_bytes(b"x" * 1000)
        live = tmp / ".model.onnx.fastdeeplab-1-abcd.tmp"  # pid 1 runs: another process's write in flight
        live.write_bytes(b"y")
        write(Path("model.onnx"))(tmp)
        assert not old.exists(), "the stale temporary file is still there"
        assert live.exists(), "a live process's temporary file was removed"
        live.unlink()
        return "the killed write's temp removed; a live one kept"

    def fails_inside(tmp: Path) -> None:
        (tmp / "model.onnx").write_bytes(b"old")
        with atomic_path(tmp / "model.onnx") as t:
            t.write_bytes(b"half")
            raise RuntimeError("export failed half way")

    def names_target(tmp: Path) -> None:
        with atomic_path(tmp / "model.onnx") as t:
            t.unlink()
            os.rmdir(t)  # an OSError about the temporary file itself

    def message_names_target(tmp: Path) -> None:
        with atomic_path(tmp / "model.onnx") as t:
            raise ValueError(f"the serializer could not write {t}")

    def becomes_fifo(tmp: Path) -> None:
        with atomic_path(tmp / "model.onnx") as t:
            t.write_bytes(b"new")
            os.mkfifo(tmp / "model.onnx")  # appears between validation and rename

    def forced_read_only(tmp: Path) -> str:
        p = _read_only_file(tmp)
        write(Path(p.name), overwrite=True)(tmp)
        assert p.read_bytes() == b"new", "not replaced"
        assert stat.S_IMODE(p.stat().st_mode) == 0o444, "the mode changed"
        return "replaced on request; still 0444"

    def through_symlink(tmp: Path) -> str:
        (tmp / "real.onnx").write_bytes(b"old")
        (tmp / "link.onnx").symlink_to(tmp / "real.onnx")
        write(Path("link.onnx"))(tmp)
        assert (tmp / "link.onnx").is_symlink() and (tmp / "real.onnx").read_bytes() == b"new"
        return "the file the link points to is written; the link stays"

    def failed_torch_save(tmp: Path) -> None:
        with atomic_path(tmp / "model.pt") as t:
            torch.save({"not picklable": lambda: None}, t)

    def no_dirs(tmp: Path) -> None:
        (tmp / "file").write_bytes(b"")
        check_output_path(tmp / "file" / "new" / "model.onnx")

    def missing_parents_ok(tmp: Path) -> str:
        check_output_path(tmp / "a" / "b" / "model.onnx")
        assert not (tmp / "a").exists(), "validation created a folder"
        write(Path("a/b/model.onnx"))(tmp)
        assert (tmp / "a" / "b" / "model.onnx").read_bytes() == b"new"
        return "validation creates nothing; the write creates the folders"

    return [
        Case("path-empty", area, 'output path ""', lambda t: check_output_path(""), ValueError, "empty"),
        Case("path-none", area, "output path None", lambda t: check_output_path(None), ValueError, "empty"),
        Case("path-dir", area, "an existing directory as output file", lambda t: check_output_path(t),
             IsADirectoryError, "is a directory"),
        Case("path-trailing-slash", area, '"out/" (ends with a separator)',
             lambda t: check_output_path(str(t / "out") + "/"), IsADirectoryError, "directory",
             _nothing_created("out")),
        Case("path-dev-null", area, "/dev/null as output file", lambda t: check_output_path("/dev/null"),
             ValueError, "character device; refusing", _still("/dev/null", stat.S_ISCHR, "a character device")),
        Case("write-dev-null", area, "atomic write to /dev/null (root renamed over it before)",
             write("/dev/null"), ValueError, "character device",
             _still("/dev/null", stat.S_ISCHR, "a character device")),
        Case("path-fifo", area, "a fifo as output file", lambda t: check_output_path(_fifo(t)), ValueError,
             "fifo", _still("pipe", stat.S_ISFIFO, "a fifo")),
        Case("path-socket", area, "a socket as output file", lambda t: check_output_path(_socket(t)),
             ValueError, "socket", _still("sock", stat.S_ISSOCK, "a socket")),
        Case("path-symlink-to-device", area, "a symlink to /dev/null",
             lambda t: (t / "l.onnx").symlink_to("/dev/null") or check_output_path(t / "l.onnx"), ValueError,
             "character device", _still("/dev/null", stat.S_ISCHR, "a character device")),
        Case("path-proc", area, "/proc/x.onnx (writable for root by os.access)",
             lambda t: check_output_path("/proc/x.onnx"), PermissionError, "/proc/x.onnx.*nothing can be created"),
        Case("path-sys", area, "/sys/x.onnx", lambda t: check_output_path("/sys/x.onnx"), PermissionError,
             "/sys/x.onnx.*nothing can be created"),
        Case("path-parent-is-file", area, "a path under a regular file", no_dirs, NotADirectoryError,
             "not a directory", _nothing_created("file/new")),
        Case("path-read-only", area, "a read-only existing file (0444), no overwrite",
             lambda t: check_output_path(_read_only_file(t)), PermissionError, "read-only",
             _same_file(Path("scores.json"), b"precious", 0o444)),
        Case("write-read-only", area, "atomic write over a read-only file, no overwrite",
             lambda t: (_read_only_file(t), write(Path("scores.json"))(t)), PermissionError, "read-only",
             _same_file(Path("scores.json"), b"precious", 0o444)),
        Case("write-read-only-forced", area, "atomic write over a read-only file with overwrite=True",
             forced_read_only),
        Case("write-through-symlink", area, "atomic write to a symlink to a regular file", through_symlink),
        Case("write-missing-parents", area, "a file under folders that do not exist yet", missing_parents_ok),
        Case("write-fails-inside", area, "the work fails half way through an atomic write", fails_inside,
             RuntimeError, "half way", lambda t: (_same_file(Path("model.onnx"), b"old")(t), _no_leftovers(t))),
        Case("write-error-names-target", area, "an OSError about the temporary file", names_target, OSError,
             r"model\.onnx(?!\.)", _no_leftovers),
        Case("write-message-names-target", area, "a library error whose message names the temporary file",
             message_names_target, ValueError, r"could not write \S*/model\.onnx$", _no_leftovers),
        Case("write-target-becomes-fifo", area, "the target turns into a fifo before the rename", becomes_fifo,
             ValueError, "fifo; refusing", lambda t: (_still("model.onnx", stat.S_ISFIFO, "a fifo")(t),
                                                      _no_leftovers(t))),
        Case("write-stale-temps", area, "a temp file left by a killed write of the same target", stale),
        Case("torch-save-fails", area, "torch.save of an unpicklable object through atomic_path",
             failed_torch_save, (AttributeError, pickle.PicklingError, TypeError), "pickle|lambda",
             lambda t: (_no_leftovers(t), _nothing_created("model.pt")(t))),
    ]


def _cli_cases() -> list[Case]:
    area = "command line"

    def c(id_: str, what: str, argv: Callable[[Path], list[str]], match: str,
          after: Callable[[Path], None] | None = None) -> Case:
        return Case(id_, area, what, lambda t: run_cli(*argv(t)), CommandFailed, match, after)

    def eval_(*extra: str) -> Callable[[Path], list[str]]:
        return lambda t: ["eval", "--data", str(_dataset_dir(t)), "--workers", "0", "--no-progress", *extra]

    def predict(*extra: str) -> Callable[[Path], list[str]]:
        return lambda t: ["predict", str(_photo(t)), "--out", str(t / "masks"), "--device", "cpu", *extra]

    ro = lambda t: ["eval", "--data", str(_dataset_dir(t)), "--json", str(_read_only_file(t))]  # noqa: E731
    return [
        c("cli-unknown-command", "fastdeeplab nosuch", lambda t: ["nosuch"], "invalid choice.*bench"),
        c("demo-runs-0", "demo --runs 0", lambda t: ["demo", "--runs", "0"], r"--runs.*>= 1"),
        c("demo-runs-neg", "demo --runs -1", lambda t: ["demo", "--runs", "-1"], r"--runs.*>= 1"),
        c("demo-runs-text", "demo --runs three", lambda t: ["demo", "--runs", "three"], r"--runs.*integer"),
        c("demo-resolution-8", "demo --resolution 8", lambda t: ["demo", "--resolution", "8"],
          r"--resolution.*>= 16"),
        c("demo-device-tpu", "demo --device tpu", lambda t: ["demo", "--device", "tpu"],
          r"--device.*tpu.*cpu, cuda or cuda:N"),
        c("demo-device-cuda", "demo --device cuda:7 (no such GPU)", lambda t: ["demo", "--device", "cuda:7"],
          r"--device.*cuda"),
        c("demo-image-dir", "demo --image <a folder>", lambda t: ["demo", "--image", str(t)],
          r"--image.*is a directory"),
        c("demo-image-missing", "demo --image missing.jpg", lambda t: ["demo", "--image", str(t / "missing.jpg")],
          r"--image.*no such file"),
        c("demo-model-unknown", "demo --model resnet", lambda t: ["demo", "--model", "resnet"],
          r"--model.*deeplabv3_resnet50"),
        c("eval-scales-nan", "eval --scales nan", eval_("--scales", "nan"), r"--scales.*finite"),
        c("eval-scales-inf", "eval --scales inf", eval_("--scales", "inf"), r"--scales.*finite"),
        c("eval-scales-0", "eval --scales 0", eval_("--scales", "0"), r"--scales.*\(0, 8\]"),
        c("eval-scales-neg", "eval --scales -1", eval_("--scales", "-1"), r"--scales"),
        c("eval-data-file", "eval --data <a file>", lambda t: ["eval", "--data", str(_photo(t))],
          r"--data.*not a directory"),
        c("eval-data-missing", "eval --data missing/", lambda t: ["eval", "--data", str(t / "missing")],
          r"--data.*no such directory"),
        c("eval-json-dev-null", "eval --json /dev/null", eval_("--json", "/dev/null"),
          r"--json.*character device", _still("/dev/null", stat.S_ISCHR, "a character device")),
        c("eval-json-dir", "eval --json <a folder>", lambda t: eval_("--json", str(t))(t), r"--json.*is a directory"),
        c("eval-json-proc", "eval --json /proc/x.json", eval_("--json", "/proc/x.json"),
          r"--json.*nothing can be created"),
        c("eval-json-read-only", "eval --json <a read-only file>", ro, r"--json.*read-only",
          _same_file(Path("scores.json"), b"precious", 0o444)),
        c("eval-json-parent-file", "eval --json <file>/scores.json",
          lambda t: eval_("--json", str(_photo(t) / "s.json"))(t), r"--json.*not a directory"),
        c("eval-device-tpu", "eval --device tpu", eval_("--device", "tpu"), r"--device.*cpu, cuda or cuda:N"),
        c("eval-batch-0", "eval --batch-size 0", eval_("--batch-size", "0"), r"--batch-size.*>= 1"),
        c("eval-workers-neg", "eval --workers -1", eval_("--workers", "-1"), r"--workers.*>= 0"),
        c("eval-classes-0", "eval --num-classes 0", eval_("--num-classes", "0"), r"--num-classes.*>= 1"),
        c("eval-classes-float", "eval --num-classes 2.5", eval_("--num-classes", "2.5"), r"--num-classes.*integer"),
        c("eval-multi-grid-0", "eval --multi-grid 1 0 1", eval_("--multi-grid", "1", "0", "1"), r"--multi-grid.*>= 1"),
        c("eval-output-stride-12", "eval --output-stride 12", eval_("--output-stride", "12"),
          r"--output-stride.*choose from 8, 16, 32"),
        c("eval-dataset-unknown", "eval --dataset coco", eval_("--dataset", "coco"), r"--dataset.*voc"),
        c("predict-image-dir", "predict <a folder>", lambda t: ["predict", str(t), "--out", str(t / "o")],
          r"IMAGE.*is a directory", _nothing_created("o")),
        c("predict-image-missing", "predict missing.jpg", lambda t: ["predict", str(t / "missing.jpg"), "--out",
                                                                     str(t / "o")], r"IMAGE.*no such file",
          _nothing_created("o")),
        c("predict-out-file", "predict --out <a file>",
          lambda t: ["predict", str(_photo(t)), "--out", str(_photo(t))], r"--out.*not a directory"),
        c("predict-out-proc", "predict --out /proc/masks", lambda t: ["predict", str(_photo(t)), "--out", "/proc/m"],
          r"--out.*nothing can be created"),
        c("predict-alpha-2", "predict --alpha 2", predict("--alpha", "2"), r"--alpha.*\[0, 1\]",
          _nothing_created("masks")),
        c("predict-alpha-nan", "predict --alpha nan", predict("--alpha", "nan"), r"--alpha.*finite"),
        c("predict-weights-dir", "predict --weights <a folder>", lambda t: predict("--weights", str(t))(t),
          r"is a directory", _nothing_created("masks")),
        c("predict-weights-unknown", "predict --weights NO_SUCH_WEIGHTS", predict("--weights", "NO_SUCH_WEIGHTS"),
          r"unknown torchvision weights.*COCO_WITH_VOC_LABELS_V1", _nothing_created("masks")),
        c("bench-impl-unknown", "bench --impl foo", lambda t: ["bench", "--impl", "foo"],
          r"--impl.*foo.*torchvision"),
        c("bench-os-32", "bench --output-strides 32", lambda t: ["bench", "--output-strides", "32"],
          r"--output-strides.*8, 16"),
        c("bench-batch-0", "bench --batch 0", lambda t: ["bench", "--batch", "0"], r"--batch.*>= 1"),
        c("bench-rounds-0", "bench --rounds 0", lambda t: ["bench", "--rounds", "0"], r"--rounds.*>= 1"),
        c("bench-threads-0", "bench --threads 0", lambda t: ["bench", "--threads", "0"], r"--threads.*>= 1"),
        c("bench-resolution-8", "bench --resolution 8", lambda t: ["bench", "--resolution", "8"],
          r"--resolution.*>= 33"),
        c("bench-budget-nan", "bench --time-budget nan", lambda t: ["bench", "--time-budget", "nan"],
          r"--time-budget.*finite"),
        c("bench-results-file", "bench --results-dir <a file>",
          lambda t: ["bench", "--results-dir", str(_photo(t))], r"--results-dir.*not a directory"),
        c("bench-data-missing", "bench --data missing/", lambda t: ["bench", "--data", str(t / "missing")],
          r"--data.*no such directory"),
        Case("python-m", area, "python -m fastdeeplab --help (the module entry point)",
             lambda t: _python_m()),
    ]


def _python_m() -> str:
    result = subprocess.run([sys.executable, "-m", "fastdeeplab", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "usage: fastdeeplab" in result.stdout, result.stderr[-500:]
    for name in cli.COMMANDS:
        assert name in result.stdout, f"{name} missing from --help"
    return "prints the usage, exit 0"


def _model_cases() -> list[Case]:
    area = "model arguments"
    build = fastdeeplab.deeplabv3_resnet50

    def b(id_: str, what: str, kw: dict, error: type, match: str) -> Case:
        return Case(id_, area, what, lambda t: build(**kw), error, match)

    def short_name(t: Path) -> str:
        from torchvision.models.segmentation import DeepLabV3_ResNet50_Weights

        from fastdeeplab.hub import _torchvision_weights, _weights_enums

        got = _torchvision_weights("COCO_WITH_VOC_LABELS_V1", _weights_enums("model", 50))
        assert got is DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1, got
        return str(got)

    return [
        b("os-float", "output_stride=16.0", dict(output_stride=16.0), TypeError, r"output_stride.*\(8, 16, 32\).*float"),
        b("os-str", 'output_stride="16"', dict(output_stride="16"), TypeError, r"output_stride.*str"),
        b("os-bool", "output_stride=True", dict(output_stride=True), TypeError, r"output_stride.*bool"),
        b("os-12", "output_stride=12", dict(output_stride=12), ValueError, r"unknown output stride 12"),
        b("mg-str", 'multi_grid="124"', dict(multi_grid="124"), TypeError, r"multi_grid.*list or tuple of ints"),
        b("mg-float", "multi_grid=(1.5, 2, 4)", dict(multi_grid=(1.5, 2, 4)), TypeError, r"multi_grid.*1\.5"),
        b("mg-zero", "multi_grid=(0, 1, 1)", dict(multi_grid=(0, 1, 1)), ValueError, r"multi_grid.*>= 1"),
        b("mg-short", "multi_grid=(1, 2)", dict(multi_grid=(1, 2)), ValueError, r"multi_grid.*3 units"),
        b("mg-empty", "multi_grid=()", dict(multi_grid=()), TypeError, r"multi_grid.*non-empty"),
        b("classes-float", "num_classes=2.5", dict(num_classes=2.5), TypeError, r"num_classes.*2\.5"),
        b("classes-bool", "num_classes=True", dict(num_classes=True), TypeError, r"num_classes.*bool"),
        b("classes-str", 'num_classes="21"', dict(num_classes="21"), TypeError, r"num_classes.*str"),
        b("classes-0", "num_classes=0", dict(num_classes=0), ValueError, r"num_classes must be >= 1"),
        b("head-unknown", 'head="fcn"', dict(head="fcn"), ValueError, r"unknown head.*torchvision"),
        b("aux-str", 'aux_loss="yes"', dict(aux_loss="yes"), TypeError, r"aux_loss"),
        b("weights-unknown", 'weights="NO_SUCH"', dict(weights="NO_SUCH"), ValueError,
          r"unknown torchvision weights.*COCO_WITH_VOC_LABELS_V1.*DEFAULT"),
        Case("weights-dir", area, "weights=<a folder>", lambda t: build(weights=t), IsADirectoryError,
             "is a directory"),
        Case("weights-missing", area, "weights=missing.pt", lambda t: build(weights=t / "missing.pt"),
             FileNotFoundError, "not found"),
        Case("weights-short-name", area, 'weights="COCO_WITH_VOC_LABELS_V1" (short torchvision name)', short_name),
        Case("set-os-float", area, "model.set_output_stride(8.0)", lambda t: model().set_output_stride(8.0),
             TypeError, r"output_stride.*float"),
    ]


def _sample_images(**kw):
    from fastdeeplab.images import sample_images

    return sample_images(33, **kw)


def _load_image(path):
    from fastdeeplab.images import load_image

    return load_image(path)


def _input_cases() -> list[Case]:
    area = "model input"

    def call(x: torch.Tensor) -> Callable[[Path], object]:
        def go(t: Path) -> object:
            with torch.no_grad():
                return model()(x)
        return go

    x = torch.randn(1, 3, 33, 33)
    return [
        Case("in-float64", area, "float64 input, float32 model", call(x.double()), TypeError,
             r"input is torch\.float64.*weights are torch\.float32"),
        Case("in-float16", area, "float16 input, float32 model", call(x.half()), TypeError, r"torch\.float16"),
        Case("in-bfloat16", area, "bfloat16 input, float32 model", call(x.bfloat16()), TypeError, r"torch\.bfloat16"),
        Case("in-device", area, "input on another device (meta)", call(x.to("meta")), ValueError,
             r"input is on meta but the model is on cpu"),
        Case("in-uint8", area, "uint8 image", call((x * 50).to(torch.uint8)), TypeError, "floating-point"),
        Case("in-rank3", area, "[3, H, W] without the batch", call(x[0]), ValueError, "4-D"),
        Case("in-rgba", area, "4 channels", call(torch.randn(1, 4, 33, 33)), ValueError, "3 input channels"),
        Case("in-empty", area, "batch of 0", call(torch.randn(0, 3, 33, 33)), ValueError, "empty batch"),
        Case("in-tiny", area, "8x8, below the output stride", call(torch.randn(1, 3, 8, 8)), ValueError,
             "smaller than the output stride"),
        Case("in-list", area, "a list instead of a tensor", call([[1.0]]), TypeError, "torch.Tensor"),
        Case("images-folder-file", area, "sample_images(folder=<a file>)",
             lambda t: _sample_images(folder=_photo(t)), NotADirectoryError, "not a directory"),
        Case("images-folder-missing", area, "sample_images(folder=missing/)",
             lambda t: _sample_images(folder=t / "missing"), FileNotFoundError, "image folder not found"),
        Case("load-image-dir", area, "load_image(<a folder>)", lambda t: _load_image(t), IsADirectoryError,
             "is a directory"),
        Case("eval-api-device-tpu", area, 'fastdeeplab.evaluate(..., device="tpu")',
             lambda t: fastdeeplab.evaluate(model(), [], device="tpu", progress=False), ValueError,
             "unknown device 'tpu'; expected 'cpu', 'cuda'"),
        Case("eval-api-scales-nan", area, "fastdeeplab.evaluate(..., scales=[nan])",
             lambda t: fastdeeplab.evaluate(model(), [], scales=[float("nan")], progress=False), ValueError,
             "scales must be finite positive"),
    ]


def _nonfinite_cases() -> list[Case]:
    area = "non-finite input"

    def nan_in_nan_out(backend: str, value: float) -> Callable[[Path], str]:
        def go(t: Path) -> str:
            x = _image()
            x[0, 1, 7, 9] = value
            with torch.no_grad():
                out = optimized(backend)(x)
            y = out["out"]
            assert y[0].isnan().all(), f"{backend}: image 0 has {int((~y[0].isnan()).sum())} finite logits"
            assert torch.isfinite(y[1]).all(), f"{backend}: the finite image 1 got NaN"
            return "image with the bad value: all NaN; the other image: finite"
        return go

    def contract(t: Path) -> str:
        from fastdeeplab.runtime.base import RuntimeModel

        class FusedReluRuntime(RuntimeModel):  # what TensorRT or OpenVINO give: NaN turned into confident zeros
            backend = "fake"
            output_stride = 16

            def _build(self, x):
                return object()

            def _run(self, session, x):
                n, _, h, w = x.shape
                return {"out": torch.zeros(n, NUM_CLASSES, h, w), "labels": torch.zeros(n, h, w, dtype=torch.int32)}

        x = _image()
        x[1, 0, 0, 0] = float("nan")
        out = FusedReluRuntime()(x)
        assert torch.isfinite(out["out"][0]).all() and out["out"][1].isnan().all(), "logits"
        assert (out["labels"][0] == 0).all() and (out["labels"][1] == -1).all(), "labels"
        assert out["labels"].dtype == torch.int64
        return "a runtime subclass that loses NaN still returns NaN logits and label -1"

    cases = [Case("nan-runtime-contract", area, "NaN through the runtime contract (as TensorRT would run it)",
                  contract)]
    for backend in _backends():
        cases.append(Case(f"nan-{backend}", area, f"one NaN pixel, backend {backend}", nan_in_nan_out(backend, float("nan"))))
        cases.append(Case(f"inf-{backend}", area, f"one +inf pixel, backend {backend}", nan_in_nan_out(backend, float("inf"))))
    return cases


def _persistence_cases() -> list[Case]:
    area = "persistence"

    def round_trip(backend: str, how: str) -> Callable[[Path], str]:
        def go(t: Path) -> str:
            fast = optimized(backend)
            x = _image(1)
            with torch.no_grad():
                before = fast(x)["out"]  # after use: the session exists
                if how == "pickle":
                    other = pickle.loads(pickle.dumps(fast))
                elif how == "deepcopy":
                    other = copy.deepcopy(fast)
                else:
                    torch.save(fast, t / "fast.pt")
                    other = torch.load(t / "fast.pt", weights_only=False)
                after = other(x)["out"]
                again = fast(x)["out"]
            assert torch.equal(before, after) or (before - after).abs().max() <= 1e-5 * before.abs().max()
            assert torch.equal(before, again)
            return "same outputs after the round trip; the original still runs"
        return go

    return [Case(f"{how}-{backend}", area, f"{how} of an optimized model after use, backend {backend}",
                 round_trip(backend, how))
            for backend in _backends() if backend != "eager" for how in ("pickle", "deepcopy", "torch.save")]


def _script_cases() -> list[Case]:
    area = "TorchScript"

    def eager(t: Path) -> str:
        scripted = torch.jit.script(model())
        x = torch.randn(1, 3, 33, 33)
        with torch.no_grad():
            assert torch.equal(scripted(x)["out"], model()(x)["out"])
        return "scripts; same outputs"

    def torchvision_too(t: Path) -> str:
        import torchvision

        torch.jit.script(torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None,
                                                                             num_classes=3))
        return "torchvision's scripts too (the drop-in reference)"

    cases = [Case("script-eager", area, "torch.jit.script(model)", eager),
             Case("script-torchvision", area, "torch.jit.script(torchvision deeplabv3_resnet50)", torchvision_too),
             Case("script-optimized-torch", area, "torch.jit.script(optimize(model, backend='torch'))",
                  lambda t: torch.jit.script(optimized("torch")), RuntimeError, r"trace it instead.*script the eager")]
    for backend in _backends():
        if backend in ("onnxruntime", "openvino"):
            cases.append(Case(f"script-{backend}", area, f"torch.jit.script(optimize(model, backend={backend!r}))",
                              lambda t, b=backend: torch.jit.script(optimized(b)), RuntimeError,
                              r"session.*Script the eager model"))
    return cases


# --------------------------------------------------------------------------------------------------
# Issue 20: files and commands. No command replaces its own inputs or files it did not write; images load
# by their real range; strict JSON; flags that do not apply are refused; one line before any long work.
# --------------------------------------------------------------------------------------------------
def _voc(tmp: Path, **kw) -> Path:
    from _voc import make_voc

    return make_voc(tmp / "voc", **kw)


def _ppm_header(path: Path, width: int, height: int) -> Path:
    """A PPM whose header claims ``width x height`` (PIL reads the size without the pixels)."""
    path.write_bytes(f"P6\n{width} {height}\n255\n".encode() + b"\0" * 12)
    return path


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    from _voc import NUM_CLASSES, SIZE

    return ["train", "--data", str(data), "--out", str(out), "--split", "train", "--num-classes", str(NUM_CLASSES),
            "--crop-size", str(SIZE), "--batch-size", "2", "--workers", "0", "--no-progress",
            "--set", "stages=[{iterations: 2, lr: 0.01}]", "--set", "scale_range=[1.0, 1.0]",
            "--set", "checkpoint_every=0", "--set", "log_every=0", *extra]


@functools.cache
def _trained_run() -> tuple[Path, dict]:
    """A tiny run stopped after one iteration (its checkpoint is what the resume cases continue from)."""
    import tempfile

    from _voc import tiny_train_config

    root = Path(tempfile.mkdtemp(prefix="fastdeeplab-hardening-"))
    data = _voc(root)
    config = tiny_train_config(data, root / "run", stop_after=1)
    fastdeeplab.train(**config)
    return root, config


def _resume(change: dict) -> Callable[[Path], object]:
    def go(t: Path) -> object:
        import shutil

        root, config = _trained_run()
        shutil.copytree(root / "run", t / "run")
        return fastdeeplab.train(**{**config, "out_dir": str(t / "run"), "stop_after": None, **change})
    return go


def _issue20_cases() -> list[Case]:
    area = "files and commands"

    def c(id_: str, what: str, argv: Callable[[Path], list[str]], match: str,
          after: Callable[[Path], None] | None = None) -> Case:
        return Case(id_, area, what, lambda t: run_cli(*argv(t)), CommandFailed, match, after)

    def photo_and(t: Path, name: str, content: bytes | None = None) -> list[str]:
        from PIL import Image

        Image.new("RGB", (40, 33), (120, 30, 200)).save(t / "x.png")
        Image.new("RGB", (40, 33), (1, 2, 3)).save(t / name)
        return [str(t / "x.png"), str(t / name)]

    def predict_foreign(t: Path) -> list[str]:
        from PIL import Image

        Image.new("RGB", (40, 33), (120, 30, 200)).save(t / "x.png")
        (t / "x_mask.png").write_bytes(b"someone's file")
        return ["predict", str(t / "x.png"), "--out", str(t), "--device", "cpu", "--num-classes", "3"]

    def predict_link(t: Path) -> list[str]:
        from PIL import Image

        Image.new("RGB", (40, 33), (120, 30, 200)).save(t / "x.png")
        (t / "out").mkdir()
        (t / "out" / "x_mask.png").symlink_to(t / "x.png")
        return ["predict", str(t / "x.png"), "--out", str(t / "out"), "--device", "cpu", "--num-classes", "3"]

    def predict_twice(t: Path) -> str:
        from PIL import Image

        Image.new("RGB", (40, 33), (120, 30, 200)).save(t / "x.png")
        argv = ["predict", str(t / "x.png"), "--out", str(t / "o"), "--device", "cpu", "--num-classes", "3"]
        run_cli(*argv)
        first = (t / "o" / "x_mask.png").stat().st_mtime_ns
        run_cli(*argv)
        assert (t / "o" / "x_mask.png").stat().st_mtime_ns >= first
        return "its own earlier PNGs are replaced (they carry its Software chunk)"

    def ckpt(t: Path, name: str = "c.pt") -> Path:
        p = t / name
        p.write_bytes(b"checkpoint bytes")
        return p

    def png16(t: Path) -> str:
        import numpy as np
        from PIL import Image

        ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
        Image.fromarray(ramp).save(t / "g16.png")
        got = np.asarray(_load_image(t / "g16.png"))[..., 0].astype(int)
        assert (got == 255).mean() < 0.01, f"{(got == 255).mean():.1%} white: clipped"
        assert got.min() == 0 and got.max() == 255 and (np.diff(got.ravel()) >= 0).all(), "not the ramp"
        return "0..65520 ramp -> 0..255 ramp (Image.convert: 99.6% white)"

    def float_tiff(t: Path, nan: bool = False) -> str:
        import numpy as np
        from PIL import Image

        values = np.linspace(0.2, 0.7, 30 * 20, dtype=np.float32).reshape(20, 30)
        if nan:
            values[0, 0] = np.nan
        Image.fromarray(values).save(t / "f.tif")
        got = np.asarray(_load_image(t / "f.tif"))[..., 0].astype(int)
        assert got.max() > 150 and got[~np.isnan(values)].min() >= 50, f"range {got.min()}..{got.max()}: black"
        if nan:
            assert got[0, 0] == 0
        return "fractions x 255 (" + ("NaN -> 0; " if nan else "") + f"{got.min()}..{got.max()}; Image.convert: 0)"

    def strict_json(t: Path) -> str:
        import json

        data = _voc(t, num_images=2)
        run_cli("eval", "--data", str(data), "--split", "val", "--num-classes", "5", "--workers", "0",
                "--no-progress", "--device", "cpu", "--json", str(t / "s.json"))

        def refuse(token: str) -> None:
            raise AssertionError(f"non-JSON token {token}")

        scores = json.loads((t / "s.json").read_text(), parse_constant=refuse)
        absent = [i for i, v in enumerate(scores["per_class_iou"]) if v is None]
        assert absent and all(i >= 3 for i in absent), scores["per_class_iou"]  # the data holds classes 0..2
        return f"classes {absent} absent from truth and prediction: null (was NaN); strict parsers read it"

    def json_text_api(t: Path) -> str:
        import json

        from fastdeeplab._io import json_text

        text = json_text({"a": float("nan"), "b": [float("inf"), 1.0], "t": torch.tensor([float("-inf")])})
        assert json.loads(text) == {"a": None, "b": [None, 1.0], "t": [None]}, text
        return text

    def export_onnx(t: Path, *flags: str) -> list[str]:
        return ["export", "--out", str(t / "m.onnx"), *flags]

    def deploy_readme(t: Path) -> list[str]:
        (t / "repo").mkdir()
        (t / "repo" / "README.md").write_text("# hand-written\n")
        return ["deploy", "--out", str(t / "repo")]

    def stale_deploy(t: Path) -> str:
        from test_export_onnx import TinySeg

        repo = t / "repo"
        dead = [t / ".deploy.999999999.abcd1234", repo / ".deeplabv3.999999999.abcd1234.staging"]
        for d in dead:
            (d / "1").mkdir(parents=True)
            (d / "1" / "model.onnx").write_bytes(b"x" * 4096)
        torch.manual_seed(0)
        fastdeeplab.deploy(TinySeg().eval(), repo, input_size=(33, 33), check=False, backends=("onnxruntime",))
        left = [p.name for p in dead if p.exists()]
        assert not left, f"left behind: {left}"
        return "the killed deploy's work and staging folders removed by the next deploy"

    def huge_predict(t: Path) -> list[str]:
        return ["predict", str(_ppm_header(t / "huge.ppm", 60000, 60000)), "--out", str(t / "o"), "--device", "cpu"]

    def scaled_predict(t: Path) -> list[str]:
        return ["predict", str(_ppm_header(t / "big.ppm", 6000, 6000)), "--out", str(t / "o"), "--device", "cpu",
                "--scales", "1", "8"]

    def bomb(t: Path) -> object:
        return _load_image(_ppm_header(t / "bomb.ppm", 100000, 100000))

    def eval_corrupt_worker(t: Path) -> list[str]:
        data = _voc(t, num_images=2)
        image = sorted((data / "JPEGImages").iterdir())[0]
        image.write_bytes(b"not a jpeg")
        return ["eval", "--data", str(data), "--split", "val", "--num-classes", "3", "--workers", "1",
                "--no-progress", "--device", "cpu"]

    def eval_bad_label(t: Path) -> list[str]:
        import numpy as np
        from PIL import Image

        data = _voc(t, num_images=2)
        label = sorted((data / "SegmentationClass").iterdir())[1]
        array = np.array(Image.open(label))
        array[0, 0] = 7
        Image.fromarray(array).save(label)
        return ["eval", "--data", str(data), "--split", "val", "--num-classes", "3", "--workers", "0",
                "--no-progress", "--device", "cpu"]

    def bom_split(t: Path) -> str:
        from fastdeeplab.data import VOCSegmentation

        data = _voc(t, num_images=2)
        lst = data / "ImageSets" / "Segmentation" / "val.txt"
        lst.write_bytes(b"\xef\xbb\xbf" + lst.read_bytes())
        ds = VOCSegmentation(data, "val")
        assert ds.image_path(0).is_file(), ds.image_path(0)
        image, label = ds[0]
        return f"{len(ds)} samples; the first id reads {ds.image_path(0).name}"

    def config_pipe(t: Path) -> str:
        from fastdeeplab.training import load_config

        r, w = os.pipe()
        os.write(w, b"batch_size: 3\ncrop_size: 65\n")
        os.close(w)
        try:
            cfg = load_config(f"/dev/fd/{r}")
        finally:
            os.close(r)
        assert (cfg.batch_size, cfg.crop_size) == (3, 65)
        return "--config <(...) and /dev/stdin read to the end (at most 1 MiB)"

    def disk_full(t: Path) -> None:
        import resource
        import signal

        from fastdeeplab.training.checkpoint import write_state

        (t / "checkpoint.pt").write_bytes(b"the last good checkpoint")
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # writes past 64 KiB fail, as on a full disk
        try:
            write_state(t / "checkpoint.pt", {"model": {"w": torch.zeros(1 << 18)}})
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous)

    def deploy_names(t: Path) -> list[str]:
        (t / "names.txt").write_text("background\ncat\n")
        return ["deploy", "--out", str(t / "repo"), "--num-classes", "3", "--class-names", str(t / "names.txt")]

    def out_is_weights(t: Path) -> list[str]:
        data = _voc(t)
        (t / "run").mkdir()
        (t / "run" / "model_final.pt").write_bytes(b"weights to fine-tune from")
        return _train_args(data, t / "run", "--no-resume", "--set", f"weights={t / 'run' / 'model_final.pt'}")

    def moved_data(t: Path) -> str:
        import shutil

        root, config = _trained_run()
        shutil.copytree(Path(config["data_root"]), t / "moved")
        with _captured_warnings() as lines:
            _resume({"data_root": str(t / "moved")})(t)
        assert any("data_root" in line for line in lines), lines
        return "resumed, with a warning naming data_root"

    def changed_data(t: Path) -> str:
        import shutil

        root, config = _trained_run()
        shutil.copytree(Path(config["data_root"]), t / "changed")
        lst = t / "changed" / "ImageSets" / "Segmentation" / "train.txt"
        lst.write_text("\n".join(lst.read_text().split()[:-1]) + "\n")  # one image fewer
        with _captured_warnings() as lines:
            _resume({"data_root": str(t / "changed")})(t)
        assert any("split 'train' now has 3 samples" in line for line in lines), lines
        return "resumed, with a warning that the split changed size (the sample order differs)"

    tensorrt_only = [("workspace", "--workspace-gb 8", ("--workspace-gb", "8")),
                     ("timing-cache", "--timing-cache /nonexistent/x", ("--timing-cache", "/nonexistent/x")),
                     ("profile", "--profile 1x3x65x65", ("--profile", "1x3x65x65")),
                     ("calibration-cache", "--calibration-cache c.cache", ("--calibration-cache", "c.cache")),
                     ("min-shape", "--min-shape 1x3x33x33", ("--min-shape", "1x3x33x33"))]
    resume_changes = [("crop", {"crop_size": 35}, "crop_size=33"), ("seed", {"seed": 7}, "seed=0"),
                      ("weight-decay", {"weight_decay": 5e-4}, "weight_decay=0.0001"),
                      ("momentum", {"momentum": 0.5}, "momentum=0.9"),
                      ("split", {"train_split": "val"}, "train_split='train'"),
                      ("batch", {"batch_size": 3}, "batch_size=2")]
    return [
        # data lost
        c("predict-out-is-input", "predict x.png x_mask.png --out <their folder>",
          lambda t: ["predict", *photo_and(t, "x_mask.png"), "--out", str(t), "--device", "cpu"],
          r"--out.*x_mask\.png is an input", _same_png(Path("x_mask.png"))),
        c("predict-out-foreign", "predict x.png --out <a folder with someone's x_mask.png>", predict_foreign,
          r"x_mask\.png exists and was not written by fastdeeplab predict.*--overwrite",
          _same_file(Path("x_mask.png"), b"someone's file")),
        c("predict-out-link-to-input", "predict x.png --out o/ where o/x_mask.png links to x.png", predict_link,
          r"--out.*is an input", _same_png(Path("x.png"), (120, 30, 200))),
        Case("predict-rerun", area, "predict twice into the same folder", predict_twice),
        c("eval-json-is-weights", "eval --weights c.pt --json c.pt",
          lambda t: ["eval", "--data", str(_dataset_dir(t)), "--weights", str(ckpt(t)), "--json", str(t / "c.pt")],
          r"--json.*--weights input", _same_file(Path("c.pt"), b"checkpoint bytes")),
        c("eval-json-is-weights-hardlink", "eval --weights c.pt --json <a hard link to c.pt>",
          lambda t: ["eval", "--data", str(_dataset_dir(t)), "--weights", str(ckpt(t)), "--json",
                     (os.link(t / "c.pt", t / "link.json"), str(t / "link.json"))[1]],
          r"--json.*--weights input", _same_file(Path("c.pt"), b"checkpoint bytes")),
        c("export-out-is-weights", "export --weights w.pt --out w.pt",
          lambda t: ["export", "--weights", str(ckpt(t, "w.pt")), "--out", str(t / "w.pt")],
          r"--out.*--weights input", _same_file(Path("w.pt"), b"checkpoint bytes")),
        c("export-onnx-out-is-weights", "export --precision int8 --weights w.pt --onnx-out ./w.pt",
          lambda t: ["export", "--precision", "int8", "--weights", str(ckpt(t, "w.pt")), "--out", str(t / "q.onnx"),
                     "--onnx-out", str(t / "." / "w.pt")],
          r"--onnx-out.*--weights input", _same_file(Path("w.pt"), b"checkpoint bytes")),
        c("export-intermediate-foreign", "export --precision int8 --out q.onnx beside someone's q.fp32.onnx",
          lambda t: ((t / "q.fp32.onnx").write_bytes(b"their graph"),
                     ["export", "--precision", "int8", "--out", str(t / "q.onnx")])[1],
          r"q\.fp32\.onnx exists and was not written by fastdeeplab.*--onnx-out",
          _same_file(Path("q.fp32.onnx"), b"their graph")),
        c("deploy-readme", "deploy --out repo (a hand-written README.md), no --overwrite", deploy_readme,
          r"README\.md exists and was not written by fastdeeplab deploy",
          _same_file(Path("repo/README.md"), b"# hand-written\n")),
        Case("deploy-stale-work", area, "deploy after a killed deploy --overwrite (.deploy.*, *.staging left)",
             stale_deploy),
        c("train-out-is-weights", "train --out run --set weights=run/model_final.pt", out_is_weights,
          r"model_final\.pt is the weights input", _same_file(Path("run/model_final.pt"),
                                                              b"weights to fine-tune from")),
        # silently wrong
        Case("image-16-bit", area, "16-bit grayscale PNG", png16),
        Case("image-float-tiff", area, "float32 TIFF in [0.2, 0.7]", float_tiff),
        Case("image-float-nan", area, "float32 TIFF with a NaN pixel", lambda t: float_tiff(t, nan=True)),
        Case("eval-json-strict", area, "eval --json with classes absent from truth and prediction", strict_json),
        Case("json-text", area, "fastdeeplab._io.json_text with NaN, inf and a tensor", json_text_api),
        *[c(f"export-onnx-{key}", f"export --format onnx {shown}", lambda t, f=flags: export_onnx(t, *f),
            rf"{flags[0]} applies to --format tensorrt only", _nothing_created("m.onnx"))
          for key, shown, flags in tensorrt_only],
        c("export-workspace-negative", "export --format tensorrt --workspace-gb -5",
          lambda t: export_onnx(t, "--format", "tensorrt", "--workspace-gb", "-5"), r"--workspace-gb.*\(0, inf\)"),
        c("deploy-name-injection", "deploy --no-check --name 'x\"\\ninstance_group ...'",
          lambda t: ["deploy", "--no-check", "--out", str(t / "repo"), "--name",
                     'x"\ninstance_group [{ kind: KIND_GPU }]'], r"--name.*not a valid Triton model name",
          _nothing_created("repo")),
        *[Case(f"resume-changed-{key}", area, f"resume with {', '.join(f'{k}={v}' for k, v in change.items())}",
               _resume(change), ValueError, rf"cannot resume.*{re.escape(saved)}")
          for key, change, saved in resume_changes],
        Case("resume-moved-data", area, "resume with the dataset at another data_root", moved_data),
        Case("resume-changed-data", area, "resume after an image was dropped from the split", changed_data),
        # unclear before, one line now
        c("predict-huge-image", "predict a 60000x60000 image", huge_predict, r"60000x60000.*GiB.*free",
          _nothing_created("o")),
        c("predict-scales-memory", "predict a 6000x6000 image at --scales 1 8", scaled_predict,
          r"6000x6000.*scale 8.*GiB", _nothing_created("o")),
        Case("image-decompression-bomb", area, "load_image of a 100000x100000 image", bomb, ValueError,
             r"bomb\.ppm is too large to load safely"),
        c("eval-worker-error", "eval --workers 1 with a corrupt image", eval_corrupt_worker,
          r"cannot read image \S+\.jpg"),
        c("eval-label-out-of-range", "eval with a mask value 7 and 3 classes", eval_bad_label,
          r"label \S+/SegmentationClass/\S+\.png: target holds class ids \[7\]"),
        Case("split-list-bom", area, "a VOC split list with a UTF-8 BOM", bom_split),
        Case("config-pipe", area, "train --config from a pipe (<(...), /dev/stdin)", config_pipe),
        c("config-dev-zero", "train --config /dev/zero", lambda t: ["train", "--config", "/dev/zero"],
          r"config /dev/zero is a character device"),
        Case("checkpoint-disk-full", area, "a checkpoint write that runs out of space (RLIMIT_FSIZE)", disk_full,
             OSError, r"cannot write \S+checkpoint\.pt: .*(space|file-size limit)",
             lambda t: (_same_file(Path("checkpoint.pt"), b"the last good checkpoint")(t), _no_leftovers(t))),
        c("deploy-class-names-count", "deploy --num-classes 3 --class-names <2 names>", deploy_names,
          r"--class-names.*2 names.*3 classes", _nothing_created("repo")),
        c("train-crop-memory", "train --crop-size 20000", lambda t: _train_args(_voc(t), t / "run", "--crop-size",
                                                                             "20000"),
          r"--crop-size.*--batch-size.*GiB", _nothing_created("run")),
        c("train-batch-size-1", "train --batch-size 1", lambda t: _train_args(_voc(t), t / "run", "--batch-size", "1"),
          r"--batch-size.*batch norm", _nothing_created("run")),
    ]


def _same_png(path: Path, colour: tuple[int, int, int] = (1, 2, 3)) -> Callable[[Path], None]:
    def check(tmp: Path) -> None:
        from PIL import Image

        with Image.open(tmp / path) as im:
            if im.convert("RGB").getpixel((0, 0)) != colour:
                raise DataLost(f"{tmp / path} was replaced")
    return check


@contextlib.contextmanager
def _captured_warnings():
    import logging

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    log = logging.getLogger("fastdeeplab.training")
    handler = Keep(logging.WARNING)
    log.addHandler(handler)
    try:
        yield lines
    finally:
        log.removeHandler(handler)


def _tiny_onnx(path: Path, input_name: str = "x") -> Path:
    """A one-Conv ONNX graph [1, 3, 8, 8] -> ``out``, made with onnx.helper (no export needed)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", [input_name, "w"], ["out"], pads=[1, 1, 1, 1])], "tiny",
                              [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8, 8])], [weight])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _bad_onnx(t: Path, kind: str) -> Path:
    path = t / f"{kind}.onnx"
    if kind == "truncated":
        good = _tiny_onnx(t / "good.onnx").read_bytes()
        path.write_bytes(good[: len(good) // 2])
    elif kind == "text":
        path.write_text("this is not a model\n")
    elif kind == "png":
        from PIL import Image

        Image.new("RGB", (8, 8)).save(path, format="PNG")
    else:
        path.write_bytes(b"")
    return path


def _issue20_library_cases() -> list[Case]:
    """Issue 20, the library API and the runtimes: one ONNX reader, state that stays true, one-line errors."""
    import importlib.util

    area = "library API"
    cases: list[Case] = []
    readers: dict[str, Callable[[Path], object]] = {}
    if importlib.util.find_spec("onnxruntime"):
        from fastdeeplab.export.quantize import quantize_onnx
        from fastdeeplab.runtime.onnxruntime import ort_session

        readers["ort_session"] = ort_session
        readers["quantize_onnx"] = lambda p: quantize_onnx(p, p.with_name("q.onnx"), torch.randn(1, 3, 8, 8))
    if importlib.util.find_spec("openvino"):
        from fastdeeplab.runtime.openvino import openvino_compiled_model

        readers["openvino"] = openvino_compiled_model
    if importlib.util.find_spec("onnx"):
        from fastdeeplab.export.checks import check_tensorrt
        from fastdeeplab.export.tensorrt import build_tensorrt_engine

        readers["check_tensorrt"] = check_tensorrt
        readers["build_tensorrt_engine"] = lambda p: build_tensorrt_engine(p, p.with_name("m.engine"))
    reasons = {"truncated": "not a readable ONNX model", "text": "not an ONNX model: it looks like text",
               "png": "not an ONNX model: it looks like a PNG image", "empty": r"is empty \(0 bytes\)"}
    for kind, reason in reasons.items():
        for reader, call in readers.items():
            cases.append(Case(f"onnx-{kind}-{reader}", area, f"{reader} of a {kind} .onnx file",
                              lambda t, k=kind, f=call: f(_bad_onnx(t, k)), ValueError, rf"{kind}\.onnx .*{reason}",
                              _nothing_created("q.onnx", "m.engine")))
    if "quantize_onnx" in readers:
        def input_named_x(t: Path) -> str:
            from fastdeeplab.export.quantize import quantize_onnx

            out = quantize_onnx(_tiny_onnx(t / "x.onnx"), t / "q.onnx", torch.randn(4, 3, 8, 8), input_size=(8, 8))
            ops = {n.op_type for n in __import__("onnx").load(str(out)).graph.node}
            assert "QuantizeLinear" in ops, ops
            return "quantized (the graph's own input name is fed)"

        def nan_calibration(t: Path) -> object:
            from fastdeeplab.export.quantize import quantize_onnx

            images = torch.randn(4, 3, 8, 8)
            images[2, 1, 3, 3] = float("nan")
            return quantize_onnx(_tiny_onnx(t / "x.onnx"), t / "q.onnx", images, input_size=(8, 8))

        cases += [Case("quantize-input-not-named-input", area, "quantize_onnx of a graph whose input is 'x'",
                       input_named_x),
                  Case("quantize-nan-calibration", area, "quantize_onnx with a NaN in a calibration image",
                       nan_calibration, ValueError, r"calibration images: 1 of 4 hold NaN or inf",
                       _nothing_created("q.onnx"))]

    def other_model(seed: int = 1) -> fastdeeplab.DeepLabV3:
        torch.manual_seed(seed)
        return fastdeeplab.deeplabv3_resnet50(num_classes=NUM_CLASSES, output_stride=16).eval()

    def state_follows(backend: str) -> Callable[[Path], str]:
        def go(t: Path) -> str:
            fast, x, m2 = optimized(backend), _image(), other_model()
            before = {k: v.clone() for k, v in fast.state_dict().items()}  # state_dict() shares storage
            fast(x)  # a session over model()'s weights
            try:
                fast.load_state_dict(fastdeeplab.optimize(m2, backend=backend).state_dict())
                with torch.no_grad():
                    got, want = fast(x)["out"], m2(x)["out"]
            finally:
                fast.load_state_dict(before)
            error = float((got - want).abs().max() / want.abs().max())
            assert error < 1e-4, f"{backend}: after load_state_dict the output is {error:.2e} from the loaded model's"
            return f"the session is rebuilt: {error:.1e} from the loaded model (relative)"
        return go

    def overflow(backend: str) -> Callable[[Path], str]:
        def go(t: Path) -> str:
            with torch.no_grad():
                y = optimized(backend)(torch.full((1, 3, SIZE, SIZE), 3e38))["out"]
            assert y.isnan().all(), f"{backend}: {int((~y.isnan()).sum())} finite logits where eager gives NaN"
            return "all NaN, as eager"
        return go

    def autocast_runtime(backend: str) -> Callable[[Path], str]:
        def go(t: Path) -> str:
            x = _image()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = optimized(backend)(x)["out"]
            want = model()(x)["out"]
            error = float((got - want).abs().max() / want.abs().max())
            assert got.dtype == torch.float32 and error < 1e-4, (got.dtype, error)
            return f"runs in float32 under autocast ({error:.1e} from eager float32)"
        return go

    runtimes = [b for b in ("onnxruntime", "openvino") if b in _backends()]
    for backend in runtimes:
        cases += [Case(f"state-load-{backend}", "state", f"load_state_dict into a used {backend} model",
                       state_follows(backend)),
                  Case(f"autocast-{backend}", "state", f"torch.autocast(bfloat16) around a {backend} model",
                       autocast_runtime(backend))]
    for backend in ["eager", *runtimes]:
        cases.append(Case(f"overflow-{backend}", "non-finite input",
                          f"torch.full((1, 3, 65, 65), 3e38) (overflows), backend {backend}", overflow(backend)))

    if "ort_session" in readers:
        class Tiny(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = torch.nn.Conv2d(3, NUM_CLASSES, 3, padding=1)

            def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
                return {"out": self.conv(x)}

        def export_under_autocast(t: Path) -> str:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                report = fastdeeplab.export_onnx(Tiny().eval(), t / "m.onnx", input_size=(16, 16))
            assert report.passed and report.precision == "fp32", str(report)
            return "exported and checked in fp32 (autocast does not apply to the graph)"

        def export_optimized(t: Path) -> str:
            report = fastdeeplab.export_onnx(optimized("onnxruntime"), t / "m.onnx", input_size=(SIZE, SIZE),
                                             check_sizes=[(SIZE, SIZE)])
            assert report.passed, str(report)
            return "exports the fused model it runs; checks pass"

        cases += [Case("export-under-autocast", area, "export_onnx inside torch.autocast(bfloat16)",
                       export_under_autocast),
                  Case("export-optimized-runtime", area, "export_onnx of an optimize(backend='onnxruntime') model",
                       export_optimized)]

    def checkpoint(t: Path, config: object) -> object:
        from fastdeeplab.evaluation import build_inference_model

        torch.save({"model": model().state_dict(), "model_config": config}, t / "c.pt")
        return build_inference_model(weights=str(t / "c.pt"))

    good = {"name": "deeplabv3_resnet50", "kwargs": {"num_classes": NUM_CLASSES}}
    x1 = torch.randn(1, 3, SIZE, SIZE)

    def train_mode_batch_1(t: Path) -> object:
        m = model()
        m.train()
        try:
            return m(x1)
        finally:
            m.eval()

    cases += [
        Case("weights-other-depth", area, "deeplabv3_resnet50(weights='DeepLabV3_ResNet101_Weights.DEFAULT')",
             lambda t: fastdeeplab.deeplabv3_resnet50(weights="DeepLabV3_ResNet101_Weights.DEFAULT"), ValueError,
             r"DeepLabV3_ResNet101_Weights\.\S+ are for another model.*takes DeepLabV3_ResNet50_Weights"),
        Case("backbone-weights-other-depth", area, "deeplabv3_resnet50(weights_backbone='ResNet101_Weights.DEFAULT')",
             lambda t: fastdeeplab.deeplabv3_resnet50(weights_backbone="ResNet101_Weights.DEFAULT"), ValueError,
             r"ResNet101_Weights\.\S+ are for another model.*takes ResNet50_Weights"),
        Case("checkpoint-config-extra-field", area, "a checkpoint whose model_config has an extra field",
             lambda t: checkpoint(t, {**good, "colour": "red"}), ValueError,
             r"checkpoint \S+c\.pt: model_config has unknown field.*colour"),
        Case("checkpoint-config-unknown-argument", area, "a checkpoint whose model_config kwargs has depth=7",
             lambda t: checkpoint(t, {"name": "deeplabv3_resnet50", "kwargs": {"depth": 7}}), ValueError,
             r"checkpoint \S+c\.pt: model_config field 'kwargs\.depth' is not an argument"),
        Case("checkpoint-config-bad-value", area, "a checkpoint whose model_config has num_classes=-3",
             lambda t: checkpoint(t, {"name": "deeplabv3_resnet50", "kwargs": {"num_classes": -3}}), ValueError,
             r"checkpoint \S+c\.pt: model_config field 'kwargs'.*num_classes must be >= 1"),
        Case("checkpoint-config-bad-name", area, "a checkpoint whose model_config names no registered model",
             lambda t: checkpoint(t, {"name": "resnet", "kwargs": {}}), ValueError,
             r"checkpoint \S+c\.pt: model_config field 'name' is 'resnet', not a registered model"),
        Case("input-sparse", area, "a sparse COO input", lambda t: model()(x1.to_sparse()), TypeError,
             r"dense input.*sparse_coo.*to_dense"),
        Case("train-mode-batch-1", area, "a model in training mode at batch 1", train_mode_batch_1, ValueError,
             r"training mode.*one image.*model\.eval\(\).*batch size > 1"),
    ]
    return cases


def all_cases() -> list[Case]:
    return (_file_cases() + _cli_cases() + _model_cases() + _input_cases() + _nonfinite_cases()
            + _persistence_cases() + _script_cases() + _issue20_cases() + _issue20_library_cases())


CASES = all_cases()
