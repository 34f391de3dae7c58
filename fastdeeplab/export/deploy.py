"""``fastdeeplab.deploy``: a Triton Inference Server model repository, ready for ``tritonserver``.

What it writes (each model directory is assembled beside the repository and renamed into place, so a
server polling the repository never sees half a model; ``README.md`` is written atomically)::

    REPO/
      README.md                   how to serve it, a client call, the perf_analyzer load test
      deeplabv3_python/           backend "python": model.py runs model.onnx with ONNX Runtime (any Triton;
        config.pbtxt              the one `fastdeeplab serve` starts has only this backend)
        labels.txt                one class name per line, line i = label i
        1/model.py, 1/model.onnx
      deeplabv3/                  backend "onnxruntime" (CPU or GPU instances; NVIDIA's tritonserver images)
        config.pbtxt
        labels.txt
        1/model.onnx              (the same file as the python model's, hard-linked where possible)
      deeplabv3_tensorrt/         backend "tensorrt", where an engine was built (tensorrt=True)
        config.pbtxt
        labels.txt
        1/model.plan

The graph (:func:`fastdeeplab.export_onnx`, checked against PyTorch as usual) by default takes raw **uint8**
RGB ``[N, 3, H, W]`` and normalises it in the graph, and returns **uint8** ``labels`` ``[N, H, W]`` from an
in-graph argmax (4x smaller than int32), so clients send pixels and get class maps. ``logits=True`` adds the
``out`` logits. The config declares dynamic batching (preferred batch sizes, max queue delay), an instance
group, the input and output names and types, and ``-1`` for the dynamic height and width. With
``tritonclient`` installed the written config is parsed with Triton's own ``ModelConfig`` schema
(:func:`load_model_config`).

>>> import fastdeeplab
>>> model = fastdeeplab.deeplabv3_resnet50(num_classes=21)                 # doctest: +SKIP
>>> print(fastdeeplab.deploy(model, "model_repository"))                     # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .._io import atomic_path, check_output_path

__all__ = ["DeployReport", "deploy", "load_model_config", "model_config_text"]

DEFAULT_NAME = "deeplabv3"
_TRITON_TYPES = {"uint8": "TYPE_UINT8", "int32": "TYPE_INT32", "int64": "TYPE_INT64", "float32": "TYPE_FP32",
                 "float16": "TYPE_FP16"}
_KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}


@dataclass
class DeployReport:
    """What :func:`deploy` wrote: the repository, each model's directory and config, the export report."""

    repository: Path
    models: dict[str, Path] = field(default_factory=dict)
    configs: dict[str, str] = field(default_factory=dict)
    export: Any = None
    validated: bool = False

    def __str__(self) -> str:
        lines = [f"Triton model repository {self.repository}"]
        for name, path in self.models.items():
            files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
            lines.append(f"  {name}/: {', '.join(files)}")
        lines.append("  config.pbtxt " + ("parsed with Triton's ModelConfig schema (tritonclient)" if self.validated
                                          else "not parsed (pip install tritonclient to check it)"))
        lines.append(f"  serve: see {self.repository / 'README.md'}")
        if self.export is not None:
            lines.append(str(self.export))
        return "\n".join(lines)


def _model_config_module() -> Any:
    """Triton's ``model_config_pb2`` from the tritonclient package, loaded without its grpc client."""
    import importlib.util

    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("parsing config.pbtxt needs Triton's schema from the tritonclient package: "
                          "pip install tritonclient")
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        raise ImportError(f"tritonclient has no {path.name} at {path.parent}: pip install -U tritonclient")
    module_spec = importlib.util.spec_from_file_location("_fastdeeplab_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_model_config(path_or_text: str | os.PathLike) -> Any:
    """Parse a ``config.pbtxt`` (path or text) with Triton's ``ModelConfig`` protobuf schema; a field the
    schema does not know raises ``google.protobuf.text_format.ParseError`` naming it."""
    from google.protobuf import text_format

    text = str(path_or_text)
    if isinstance(path_or_text, os.PathLike) or (("\n" not in text) and Path(text).is_file()):
        text = Path(path_or_text).read_text(encoding="utf-8")
    return text_format.Parse(text, _model_config_module().ModelConfig())


def _dims(dims: Sequence[int | str], batched: bool) -> list[int]:
    """ONNX dims to Triton dims: without the batch dimension when Triton batches, ``-1`` where dynamic."""
    dims = list(dims)[1:] if batched else list(dims)
    return [d if isinstance(d, int) and d > 0 else -1 for d in dims]


def model_config_text(name: str, *, backend: str, inputs: dict[str, tuple[str, Sequence[int | str]]],
                      outputs: dict[str, tuple[str, Sequence[int | str]]], max_batch_size: int,
                      preferred_batch_sizes: Sequence[int], max_queue_delay_us: int, instances: int,
                      kind: str, labels_file: str | None = "labels.txt",
                      parameters: dict[str, str] | None = None) -> str:
    """A ``config.pbtxt`` in protobuf text format. ``inputs``/``outputs``: ``{name: (numpy dtype name, ONNX
    dims)}``; the batch dimension is left out when ``max_batch_size > 0`` (Triton adds it). ``parameters``:
    the model's string parameters (read by the python backend's ``model.py``)."""
    batched = max_batch_size > 0

    def tensors(items: dict[str, tuple[str, Sequence[int | str]]], label: bool) -> str:
        blocks = []
        for tensor, (dtype, dims) in items.items():
            if dtype not in _TRITON_TYPES:
                raise ValueError(f"tensor {tensor!r} has type {dtype}, which this config writer does not map")
            extra = f'\n    label_filename: "{labels_file}"' if label and labels_file and tensor == "labels" else ""
            blocks.append(f'  {{\n    name: "{tensor}"\n    data_type: {_TRITON_TYPES[dtype]}\n'
                          f'    dims: [ {", ".join(map(str, _dims(dims, batched)))} ]{extra}\n  }}')
        return "[\n" + ",\n".join(blocks) + "\n]"

    lines = [f'name: "{name}"', f'backend: "{backend}"', f"max_batch_size: {max_batch_size}",
             f"input {tensors(inputs, False)}", f"output {tensors(outputs, True)}"]
    if batched:
        sizes = ", ".join(str(s) for s in preferred_batch_sizes)
        lines.append("dynamic_batching {\n" + (f"  preferred_batch_size: [ {sizes} ]\n" if sizes else "")
                     + f"  max_queue_delay_microseconds: {max_queue_delay_us}\n}}")
    lines.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]")
    for key, value in (parameters or {}).items():
        lines.append(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}')
    return "\n".join(lines) + "\n"


def _readme(repo: Path, models: dict[str, str], input_name: str, input_type: str, size: Sequence[int],
            outputs: Sequence[str], max_batch_size: int) -> str:
    h, w = size
    first = next(iter(models))
    rows = "\n".join(f"| `{m}` | `{backend}` |" for m, backend in models.items())
    numpy_type = "np.uint8" if input_type == "uint8" else "np.float32"
    data = ("np.asarray(PIL.Image.open('photo.jpg').convert('RGB')).transpose(2, 0, 1)[None]"
            if input_type == "uint8" else "normalised_image[None]  # ImageNet mean/std, [1, 3, H, W]")
    return f"""# Triton Inference Server model repository {README_MARK}

| model | backend |
|---|---|
{rows}

Input `{input_name}`: {input_type} RGB `[N, 3, H, W]` (any H and W the model takes{'; raw pixels, 0-255: the graph normalises them' if input_type == 'uint8' else ', normalised with the ImageNet mean and std'}).
Outputs: {', '.join(f'`{o}`' for o in outputs)}. `labels.txt` names the class of each label value.
Dynamic batching up to {max_batch_size} images of one size per batch.

## Serve

With fastdeeplab installed (`pip install 'fastdeeplab[serve]'`; Linux x86_64, CPU), a real `tritonserver`
serves the python-backend model (`<name>_python`; the onnxruntime and TensorRT models need NVIDIA's images):

```bash
fastdeeplab serve {repo.name}
fastdeeplab client photo.jpg --url localhost:8000 --out masks
```

In NVIDIA's tritonserver image (every model; not tested by fastdeeplab's CI):

```bash
docker run --rm --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 -v "$PWD/{repo.name}:/models" \\
    nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models
```

(`--gpus all` only for GPU instances and the TensorRT model; a `model.plan` runs only with the TensorRT
version and GPU it was built with.)

## Call it

```python
import numpy as np, PIL.Image, tritonclient.http as http

client = http.InferenceServerClient("localhost:8000")
pixels = {data}
request = http.InferInput("{input_name}", pixels.shape, "{_TRITON_TYPES[input_type][5:]}")
request.set_data_from_numpy(pixels.astype({numpy_type}))
labels = client.infer("{first}", [request]).as_numpy("{outputs[-1]}")
```

## Load test

```bash
perf_analyzer -m {first} -u localhost:8001 -i grpc --shape {input_name}:3,{h},{w} -b 1 \\
    --concurrency-range 1:8 --percentile 95
```

Raise `--concurrency-range` to see dynamic batching at work (batches up to `max_batch_size` form while
requests wait at most `max_queue_delay_microseconds`); compare `-m {first}` with the TensorRT model where
there is one.
"""


@contextlib.contextmanager
def _staged_dir(target: Path, overwrite: bool):
    """Yield an empty directory beside ``target``; on success it replaces ``target``, else it is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".staging", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes 0700: a server running as another user could not read it
    try:
        yield stage
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(stage, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, target)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
README_MARK = "(written by `fastdeeplab deploy`)"
# What deploy leaves while it runs: work folders beside the repository, staging and old model folders in it,
# each named with the writing process's id, so a later deploy removes those of processes that no longer run.
_STALE = re.compile(r"^\.(?:deploy\.(?P<pid>\d+)\..+|.+\.(?P<pid2>\d+)\..+\.(?:staging|old))$")
# The same folders as deploys before the pid tag named them (tempfile's 8 random characters, no pid): removed
# once nothing in them has changed for LEGACY_MIN_AGE_S (their process cannot be asked whether it still runs).
_LEGACY = re.compile(r"^\.(?:deploy\.(?P<work>[a-z0-9_]{8})|[A-Za-z0-9_][A-Za-z0-9_.\-]*\.[a-z0-9_]{8}\.(?:staging|old))$")
LEGACY_MIN_AGE_S = 3600.0


def check_model_name(name: str) -> str:
    """``name`` if it is a valid Triton model name (a directory name, the ``name:`` of ``config.pbtxt``):
    letters, digits, ``_``, ``.`` and ``-``, not starting with ``.`` or ``-``, at most 128 characters.
    Anything else (quotes, line breaks, separators) is refused before any work: it would break or inject
    lines into ``config.pbtxt``."""
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
        raise ValueError(f"model name {name!r} is not a valid Triton model name: use letters, digits, '_', '.' "
                         "and '-' (not first), at most 128 characters, e.g. deeplabv3")
    return name


def _check_readme(readme: Path, overwrite: bool) -> None:
    """Refuse to replace a ``README.md`` that ``deploy`` did not write, unless ``overwrite``."""
    if overwrite or not readme.is_file():
        return
    try:
        with open(readme, encoding="utf-8", errors="replace") as f:
            first = f.readline(4096)
    except OSError:
        first = ""
    if README_MARK not in first:
        raise FileExistsError(f"{readme} exists and was not written by fastdeeplab deploy; refusing to replace it: "
                              "give another --out (repository), or --overwrite")


def _newest_mtime(folder: Path) -> float:
    """The latest modification time of ``folder`` and everything below it (links not followed)."""
    newest = folder.lstat().st_mtime
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def _model_files_only(folder: Path) -> bool:
    """Whether ``folder`` holds only regular files named ``model.*`` (or their temporary ``.model.*``)."""
    return all(c.name.startswith(("model.", ".model.")) and not c.is_symlink() and c.is_file()
               for c in folder.iterdir())


def _deploy_layout(entry: Path) -> bool:
    """Whether a pre-pid-tag folder holds only what deploy put in it: beside the repository (work) ``model.*``
    files; a staging folder ``config.pbtxt``, ``labels.txt``, ``model.*`` files and ``1/`` of ``model.*``
    files; an old folder only the replaced model folder, under its own name."""
    children = list(entry.iterdir())
    if any(c.is_symlink() for c in children):
        return False
    if entry.name.startswith(".deploy."):
        return _model_files_only(entry)
    if entry.name.endswith(".old"):
        model = entry.name[1:].rsplit(".", 2)[0]
        return all(c.name == model and c.is_dir() for c in children)
    return all((c.name == "1" and c.is_dir() and _model_files_only(c))
               or (c.is_file() and (c.name in ("config.pbtxt", "labels.txt") or c.name.startswith("model.")))
               for c in children)


def _legacy_work(entry: Path, beside: bool, now: float) -> bool:
    """Whether ``entry`` is a work folder of a deploy from before the pid tag that is safe to remove: its exact
    name, in its place, holding only what deploy wrote there (:func:`_deploy_layout`: a user's folder that
    merely matches the name is kept), and untouched for :data:`LEGACY_MIN_AGE_S`."""
    match = _LEGACY.match(entry.name)
    if match is None or beside != (match["work"] is not None):
        return False
    try:
        return _deploy_layout(entry) and now - _newest_mtime(entry) >= LEGACY_MIN_AGE_S
    except OSError:
        return False


def remove_stale_work(repository: str | os.PathLike) -> list[Path]:
    """Remove (and return) the work, staging and old folders that a killed ``deploy`` left beside and inside
    ``repository``: those whose process no longer runs. A running deploy's folders are kept. Folders of
    deploys from before the pid tag (``.deploy.<8 characters>`` beside, ``.<model>.<8 characters>.staging``
    or ``.old`` inside) are removed once untouched for :data:`LEGACY_MIN_AGE_S` seconds."""
    from .._io import _alive

    repository = Path(repository)
    removed = []
    now = time.time()
    for folder in (repository.parent, repository):
        if not folder.is_dir():
            continue
        with contextlib.suppress(OSError):
            for entry in folder.iterdir():
                if entry.is_symlink() or not entry.is_dir():
                    continue
                match = _STALE.match(entry.name)
                if match is not None and not (folder == repository.parent and match["pid"] is None):
                    pid = int(match["pid"] or match["pid2"])
                    stale = pid != os.getpid() and not _alive(pid)
                else:  # beside the repository only the .deploy.* work folders are deploy's
                    stale = _legacy_work(entry, folder == repository.parent, now)
                if stale:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
    return removed


def _model_num_classes(model: nn.Module) -> int | None:
    """The class count a model declares (its ``num_classes``, or the last convolution of its ``classifier``),
    ``None`` when it does not say."""
    count = getattr(model, "num_classes", None)
    if isinstance(count, int) and not isinstance(count, bool):
        return count
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Module):
        convs = [m for m in classifier.modules() if isinstance(m, nn.Conv2d)]
        if convs:
            return int(convs[-1].out_channels)
    return None


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        from ..data.palette import CITYSCAPES_CLASSES, VOC_CLASSES

        known = {len(VOC_CLASSES): VOC_CLASSES, len(CITYSCAPES_CLASSES): CITYSCAPES_CLASSES}
        return list(known.get(num_classes, [f"class_{i}" for i in range(num_classes)]))
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names; the model has {num_classes} classes")
    if any("\n" in n for n in names):
        raise ValueError("class names cannot contain line breaks (labels.txt has one per line)")
    return names


def deploy(model: nn.Module, repository: str | os.PathLike, *, name: str = DEFAULT_NAME,
           input_size: Sequence[int] = (513, 513), output_stride: int | None = None, uint8_input: bool = True,
           argmax: bool = True, labels_dtype: str = "uint8", logits: bool = False,
           class_names: Sequence[str] | None = None, max_batch_size: int = 8,
           preferred_batch_sizes: Sequence[int] = (4, 8), max_queue_delay_us: int = 100, instances: int = 1,
           device: str = "cpu", backends: Sequence[str] = ("python", "onnxruntime"),
           max_image_pixels: int = 4096 * 4096, tensorrt: bool = False, precision: str = "fp16",
           profiles: Sequence[Any] | None = None, calibration_images: Any = None, opset: int = 17,
           overwrite: bool = False, check: bool = True) -> DeployReport:
    """Write a Triton Inference Server model repository for ``model`` at ``repository`` (see the module
    docstring for the layout).

    Args:
        model: as for :func:`fastdeeplab.export_onnx`.
        repository: the model repository directory (created; other models in it are left alone).
        name: the model's name in Triton (and its directory); the TensorRT model is ``<name>_tensorrt``.
        input_size: ``(H, W)`` traced and checked; the perf_analyzer command uses it.
        uint8_input: the graph takes raw uint8 RGB and normalises it (default) instead of normalised float32.
        argmax, labels_dtype: in-graph class map ``labels`` (uint8 by default; ``"int32"`` too).
        logits: also return the ``out`` logits ``[N, K, H, W]`` float32.
        class_names: one per class for ``labels.txt`` (default: VOC's or Cityscapes' names for 21 or 19
            classes, else ``class_<i>``).
        max_batch_size, preferred_batch_sizes, max_queue_delay_us: Triton's dynamic batching.
        instances, device: the ONNX Runtime instance group: ``count`` instances on ``"cpu"`` or ``"gpu"``
            (the python model's instances are CPU instances; with ``"gpu"`` they use ONNX Runtime's CUDA
            execution provider where the server's onnxruntime has it).
        backends: the models to write: ``"python"`` (``<name>_python``: ``model.py`` runs ``model.onnx`` with
            ONNX Runtime; serves in any Triton, including ``fastdeeplab serve``'s), ``"onnxruntime"``
            (``<name>``; NVIDIA's tritonserver images), ``"tensorrt"`` (same as ``tensorrt=True``).
        max_image_pixels: the python model refuses larger images (H*W) with an error response.
        tensorrt: also build a TensorRT engine (``model.plan``; needs TensorRT and a GPU) in ``precision``
            (``"fp32"``, ``"fp16"`` or ``"int8"`` with ``calibration_images``), with ``profiles`` (default:
            batch 1 to ``max_batch_size`` at half to full ``input_size``).
        overwrite: replace an existing ``repository/<name>``; otherwise that is an error.
        check: run the export's checks (ONNX Runtime against PyTorch), and parse the written configs with
            Triton's schema when tritonclient is installed.
    """
    repository = Path(repository)
    check_output_path(repository / "README.md", what="model repository")  # fails before the export
    check_model_name(name)
    _check_readme(repository / "README.md", overwrite)
    if device not in _KINDS:
        raise ValueError(f"device must be one of {tuple(_KINDS)}, got {device!r}")
    if max_batch_size < 0 or instances < 1 or max_queue_delay_us < 0:
        raise ValueError("max_batch_size >= 0, instances >= 1 and max_queue_delay_us >= 0 are required")
    if any(not 1 <= b <= max_batch_size for b in preferred_batch_sizes):
        raise ValueError(f"preferred_batch_sizes {tuple(preferred_batch_sizes)} must lie in 1..max_batch_size "
                         f"({max_batch_size})")
    if not argmax and not logits:
        raise ValueError("nothing to serve: argmax and logits are both off")
    unknown = sorted(set(backends) - {"python", "onnxruntime", "tensorrt"})
    if unknown or not backends:
        raise ValueError(f"backends {list(backends)}: choose one or more of python, onnxruntime, tensorrt")
    if max_image_pixels < 1:
        raise ValueError(f"max_image_pixels must be >= 1, got {max_image_pixels}")
    tensorrt = tensorrt or "tensorrt" in backends
    names = ([f"{name}_python"] if "python" in backends else []) + ([name] if "onnxruntime" in backends else []) \
        + ([f"{name}_tensorrt"] if tensorrt else [])
    for model_name in names:
        if (repository / model_name).exists() and not overwrite:
            raise FileExistsError(f"{repository / model_name} exists; pass overwrite=True (--overwrite) to replace it")
    if class_names is not None:  # the count now, not after the export, where the model says it
        known = _model_num_classes(model)
        _class_names(class_names, known if known is not None else len(class_names))
    if tensorrt:
        from ..runtime.tensorrt import require_tensorrt

        require_tensorrt()  # fail before the export
        if precision == "int8" and calibration_images is None:
            raise ValueError("an int8 TensorRT model needs calibration_images")
        if isinstance(calibration_images, (str, os.PathLike)) and not Path(calibration_images).is_dir():
            raise FileNotFoundError(f"calibration image folder not found: {calibration_images}")
    from .onnx import export_onnx

    remove_stale_work(repository)
    outputs = ("out",) if logits else ()
    with tempfile.TemporaryDirectory(prefix=f".deploy.{os.getpid()}.", dir=repository.parent
                                     if repository.parent.is_dir() else None) as work:
        onnx_file = Path(work) / "model.onnx"
        report = export_onnx(model, onnx_file, input_size=input_size, output_stride=output_stride, opset=opset,
                             outputs=outputs, argmax=argmax, labels_dtype=labels_dtype, uint8_input=uint8_input,
                             check=check)
        num_classes = next(iter(report.outputs.get("out", ())[1:2]), None) if logits else None
        if num_classes is None:
            num_classes = _num_classes(onnx_file)
        labels = _class_names(class_names, int(num_classes))
        tensors_in = {n: (report.dtypes[n], d) for n, d in report.inputs.items()}
        tensors_out = {n: (report.dtypes[n], d) for n, d in report.outputs.items()}
        common = dict(inputs=tensors_in, outputs=tensors_out, max_batch_size=max_batch_size,
                      preferred_batch_sizes=preferred_batch_sizes, max_queue_delay_us=max_queue_delay_us,
                      instances=instances)
        configs = {}
        if "python" in backends:
            configs[f"{name}_python"] = model_config_text(
                f"{name}_python", backend="python", kind="KIND_CPU", **common,
                parameters={"max_image_pixels": str(max_image_pixels), "device": device})
        if "onnxruntime" in backends:
            configs[name] = model_config_text(name, backend="onnxruntime", kind=_KINDS[device], **common)
        plan = None
        if tensorrt:
            from .tensorrt import build_tensorrt_engine

            h, w = int(input_size[0]), int(input_size[1])
            plan = Path(work) / "model.plan"
            build_tensorrt_engine(onnx_file, plan, precision=precision, calibration_images=calibration_images,
                                  profiles=profiles or [((1, 3, -(-h // 2), -(-w // 2)), (1, 3, h, w),
                                                         (max(1, max_batch_size), 3, h, w))])
            configs[f"{name}_tensorrt"] = model_config_text(f"{name}_tensorrt", backend="tensorrt",
                                                            kind="KIND_GPU", **common)
        validated = False
        if check:
            try:
                for text in configs.values():
                    load_model_config(text)
                validated = True
            except ImportError:
                validated = False
        result = DeployReport(repository=repository, export=report, configs=configs, validated=validated)
        for model_name, text in configs.items():
            with _staged_dir(repository / model_name, overwrite) as stage:
                (stage / "config.pbtxt").write_text(text, encoding="utf-8")
                (stage / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
                (stage / "1").mkdir()
                if model_name == f"{name}_python":
                    from . import triton_model

                    shutil.copyfile(triton_model.__file__, stage / "1" / "model.py")
                    _link_or_copy(onnx_file, stage / "1" / "model.onnx")
                elif model_name == name:
                    _link_or_copy(onnx_file, stage / "1" / "model.onnx")
                else:
                    shutil.copyfile(plan, stage / "1" / "model.plan")
                    for extra in plan.parent.glob("model.*.json"):  # build report, layers, per-layer times
                        shutil.copyfile(extra, stage / extra.name)
            result.models[model_name] = repository / model_name
        report.path = next(repository / n / "1" / "model.onnx" for n in configs if n != f"{name}_tensorrt")
    backends = {n: "python" if n == f"{name}_python" else "onnxruntime" if n == name else "tensorrt" for n in configs}
    input_name, (input_type, _) = next(iter(tensors_in.items()))
    with atomic_path(repository / "README.md") as tmp:
        tmp.write_text(_readme(repository, backends, input_name, input_type, input_size, list(tensors_out),
                               max_batch_size), encoding="utf-8")
    return result


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (the python and onnxruntime models share one model.onnx on disk), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _num_classes(onnx_file: Path) -> int:
    """The class count of a labels-only graph: the output channels of the last Conv before the ArgMax."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_file))
    inits = {t.name: t for t in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type == "Conv" and n.input[1] in inits]
    return int(numpy_helper.to_array(inits[convs[-1].input[1]]).shape[0])
