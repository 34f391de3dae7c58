"""What a TensorRT build says about its own engine (TensorRT and a GPU needed; called by
:func:`fastdeeplab.export.tensorrt.build_tensorrt_engine`).

Beside ``<engine>`` it writes:

* ``<engine>.build.json`` — TensorRT version, precision, the graph built, the profiles, build time, and for
  each profile the engine against ONNX Runtime (CPU) on the reference graph, on images at the profile's
  ``opt`` shape: max error (relative to the largest logit) and pixel agreement of the class maps;
* ``<engine>.layers.json`` — the engine inspector's layer list
  (``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``: layer names, types, tactics,
  precisions; the build sets ``ProfilingVerbosity.DETAILED``);
* ``<engine>.profile.json`` — per-layer times from an ``IProfiler`` over a few runs at the first profile's
  ``opt`` shape, slowest first, with each layer's share of the total.

Without ``check`` only ``<engine>.build.json`` is written, without the measured parts.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._io import atomic_path, json_text
from ..runtime.tensorrt import Profile, _Session, _torch_dtype, require_tensorrt, run_engine, select_profile
from .calibration import CalibrationBatches

__all__ = ["report_paths", "write_engine_report"]

log = logging.getLogger(__name__)
_PROFILE_RUNS = 10


def report_paths(engine_path: str | os.PathLike) -> dict[str, Path]:
    """Where the build's report files go, beside the engine."""
    engine_path = Path(engine_path)
    stem = engine_path.name.removesuffix(engine_path.suffix)
    return {kind: engine_path.with_name(f"{stem}.{kind}.json") for kind in ("build", "layers", "profile")}


def _write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(data, indent=1) + "\n", encoding="utf-8")  # strict: NaN as null


def _image_batches(images: Any, shape: Sequence[int], max_batches: int = 4) -> tuple[list[Tensor], str]:
    """Normalised image batches at ``shape``: the given folder or tensor, else scikit-image's photographs,
    else seeded noise (said so in the report)."""
    if images is None:
        try:
            from ..images import sample_images

            _, images = sample_images((int(shape[2]), int(shape[3])), count=None)
            source = "scikit-image sample photographs"
        except Exception:  # scikit-image missing: noise, and the report says so
            images = torch.randn(int(shape[0]), 3, int(shape[2]), int(shape[3]),
                                 generator=torch.Generator().manual_seed(0))
            source = "seeded Gaussian noise (no images given, scikit-image not installed)"
    else:
        source = str(images) if not isinstance(images, Tensor) else f"tensor {tuple(images.shape)}"
    batches = list(CalibrationBatches(images, shape))[:max_batches]
    return batches, source


def _pixels(x: Tensor) -> Tensor:
    from .quantize import to_pixels

    return to_pixels(x)


def _layer_profiler(trt: Any) -> Any:
    class LayerTimes(trt.IProfiler):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)
            self.times: dict[str, list[float]] = {}

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            self.times.setdefault(layer_name, []).append(float(ms))

    return LayerTimes()


def write_engine_report(engine_path: Path, *, reference: Path, graph: Path, precision: str,
                        profiles: Sequence[Profile], build_seconds: float, check: bool, images: Any,
                        tensorrt_version: str) -> dict[str, Any]:
    """Measure the engine (when ``check``) and write the report files; returns the build report."""
    from .. import metrics

    paths = report_paths(engine_path)
    report: dict[str, Any] = {
        "engine": str(engine_path), "tensorrt": tensorrt_version, "precision": precision,
        "strongly_typed": True, "graph": str(graph), "reference": str(reference),
        "profiles": [p.as_dict() for p in profiles], "build_seconds": round(build_seconds, 2),
        "engine_bytes": engine_path.stat().st_size, "accuracy": [], "files": {},
    }
    if check:
        from ..runtime.onnxruntime import ort_session

        trt = require_tensorrt()
        device = torch.device("cuda", torch.cuda.current_device())
        session = _Session(trt, engine_path, device)
        engine = session.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        dtypes = {n: _torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        name = inputs[0]

        inspector = engine.create_engine_inspector()
        layers = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        _write_json(paths["layers"], layers)
        report["files"]["layers"] = str(paths["layers"])

        ort = ort_session(reference)
        ort_outputs = [o.name for o in ort.get_outputs()]
        for index, profile in enumerate(profiles):
            batches, source = _image_batches(images, profile.opt)
            errors, agree, total = [], 0, 0
            for x in batches:
                feed = _pixels(x) if dtypes[name] == torch.uint8 else x.to(dtypes[name])
                got = run_engine(session, select_profile(profiles, tuple(feed.shape)),
                                 {name: feed.to(device).contiguous()}, outputs, dtypes, device)
                ort_feed = _pixels(x).numpy() if ort.get_inputs()[0].type == "tensor(uint8)" else x.numpy()
                want = dict(zip(ort_outputs, ort.run(None, {ort.get_inputs()[0].name: ort_feed}), strict=True))
                if "out" in got and "out" in want:
                    errors.append(metrics.max_rel_error(got["out"].float().cpu(), torch.from_numpy(want["out"])))
                key = "labels" if "labels" in got and "labels" in want else "out"
                mine = got[key].cpu() if key == "labels" else got[key].float().argmax(1).cpu()
                theirs = torch.from_numpy(np.asarray(want[key])) if key == "labels" else \
                    torch.from_numpy(want[key]).argmax(1)
                agree += int((mine.long() == theirs.long()).sum())
                total += mine.numel()
            report["accuracy"].append({"profile": index, "shape": list(profile.opt), "images": source,
                                       "batches": len(batches),
                                       "max_rel_error": max(errors) if errors else None,
                                       "pixel_agreement": agree / total if total else None})

        profiler = _layer_profiler(trt)
        first = profiles[0].opt
        x = torch.randn(*first, generator=torch.Generator().manual_seed(0))
        feed = (_pixels(x) if dtypes[name] == torch.uint8 else x.to(dtypes[name])).to(device).contiguous()
        for _ in range(_PROFILE_RUNS):
            run_engine(session, 0, {name: feed}, outputs, dtypes, device, profiler=profiler)
        means = {layer: sum(t) / len(t) for layer, t in profiler.times.items()}
        total_ms = sum(means.values())
        _write_json(paths["profile"], {
            "shape": list(first), "runs": _PROFILE_RUNS, "total_ms": total_ms,
            "layers": [{"layer": layer, "ms": ms, "share": ms / total_ms if total_ms else None}
                       for layer, ms in sorted(means.items(), key=lambda kv: -kv[1])]})
        report["files"]["profile"] = str(paths["profile"])
        report["layer_time_ms"] = total_ms
    _write_json(paths["build"], report)
    for row in report["accuracy"]:
        log.info("engine vs ONNX Runtime at %s: max error %.3g x max|logit|, %.3f%% of pixels agree",
                 "x".join(map(str, row["shape"])), row["max_rel_error"] or 0.0, 100 * (row["pixel_agreement"] or 0))
    return report
