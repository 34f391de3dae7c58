"""Training checkpoints: what they hold, how they are written and read, and when a run may resume from one.

A checkpoint (``out_dir/checkpoint.pt``) holds only tensors, numbers, strings, lists and dicts, and is read
with ``torch.load(..., weights_only=True)``: a file that needs anything else (pickled code) is refused, not
run. It is written atomically (:func:`fastdeeplab._io.atomic_path`), and never from non-finite weights: a
diverged run stops with a ``RuntimeError`` and leaves the last good checkpoint in place.

A resume is refused, with what differs and how to proceed, when the checkpoint's model (architecture,
``num_classes``, ``aux_loss``, ``multi_grid``, ``model_kwargs``), schedule or recipe (:data:`RECIPE_FIELDS`:
data, crops, augmentation, batch size, seed, optimiser settings) differs from this run's config, or when its
weights are not finite; a moved ``data_root`` or another ``val_split`` is allowed with a warning naming it.

Checkpoints never replace an input of the run (``weights``, ``weights_backbone``, the config file), and a
write that fails (a full disk, a read-only mount) is one ``OSError`` naming the checkpoint, not torch's
``enforce fail``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_path
from .config import TrainConfig

__all__ = [
    "CHECKPOINT_NAME",
    "FINAL_WEIGHTS_NAME",
    "check_finite_weights",
    "check_resumable",
    "model_config",
    "nonfinite_tensors",
    "output_paths",
    "read_checkpoint",
    "write_file",
    "write_state",
]

CHECKPOINT_NAME = "checkpoint.pt"
FINAL_WEIGHTS_NAME = "model_final.pt"
FORMAT = 1
_KEYS = ("model", "model_config", "optimizer", "scheduler", "iteration", "stage", "stage_iteration", "rng",
         "config", "history")


def model_config(cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    """How the model was built: ``{"name": builder, "kwargs": {num_classes, aux_loss, multi_grid, ...}}``."""
    kwargs = {"num_classes": num_classes, "aux_loss": cfg.aux_loss, "multi_grid": list(cfg.multi_grid),
              **cfg.model_kwargs}
    return {"name": cfg.model, "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}


def nonfinite_tensors(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``state`` that hold NaN or infinity."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_finite_weights(model: nn.Module, *, iteration: int, path: Path | None = None) -> None:
    """Raise ``RuntimeError`` when ``model``'s weights hold NaN or infinity (a diverged run), before any write.

    Under ``torchrun`` every process holds the same weights, so every process raises alike.
    """
    bad = nonfinite_tensors(model.state_dict())
    if bad:
        where = f"{path} not written (the last good one is kept); " if path is not None else ""
        raise RuntimeError(f"training diverged: {len(bad)} weight tensors hold NaN or inf at iteration {iteration} "
                           f"(e.g. {bad[0]}); {where}lower the learning rate (stages[i].lr), then start afresh "
                           "(--no-resume or another --out)")


def write_state(path: Path, state: Mapping[str, Any]) -> None:
    """``torch.save(state)`` to ``path`` atomically: readers see the old file or the complete new one.

    A failed write (no space left, a read-only mount, a file-size limit) raises ``OSError`` naming ``path``
    and the reason (with the free space when the disk is full); the previous file stays as it was."""
    write_file(path, lambda tmp: torch.save(dict(state), tmp), suffix=".pt")


def write_file(path: Path, write: Any, suffix: str = "") -> None:
    """``write(tmp)`` through :func:`fastdeeplab._io.atomic_path` for a training output ``path``
    (checkpoints, ``history.json``): every failure of the write is one ``OSError`` naming ``path``."""
    try:
        with atomic_path(path, suffix=suffix, what="training output") as tmp:
            try:
                write(tmp)
            except (RuntimeError, OSError) as exc:
                raise OSError(_write_failure(path, exc)) from None
    except OSError as exc:
        message = str(exc)
        raise OSError(message if str(path) in message else f"cannot write {path}: {message}") from None


def _write_failure(path: Path, exc: BaseException) -> str:
    """Why writing checkpoint ``path`` failed, in one line (torch reports ``enforce fail at
    inline_container.cc ... file write failed`` for every cause)."""
    import errno
    import shutil

    code = getattr(exc, "errno", None)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if code == errno.ENOSPC or (free is not None and free < 64 * 2**20):
        where = f" ({free / 2**20:.0f} MiB free)" if free is not None else ""
        return f"cannot write {path}: no space left on the device{where}; free some space or " \
               "give another --out"
    if code == errno.EROFS or not os.access(path.parent, os.W_OK):
        return f"cannot write {path}: {path.parent} is read-only; give another --out"
    reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:200]
    if "enforce fail" in reason or "inline_container" in reason:  # torch's zip writer: it never says why
        reason = "the write stopped before the end of the file"
    return f"cannot write {path}: {reason}; check the disk (space, quota, file-size limit) or " \
           "give another --out"


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint read with ``weights_only=True``; ``ValueError`` naming the file otherwise."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and truncation errors alike mean "not a readable checkpoint"
        reason = " ".join(str(exc).split())[:300]
        raise ValueError(f"cannot resume from {path}: not a readable weights-only checkpoint "
                         f"({type(exc).__name__}: {reason}); use another out_dir or --no-resume") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"cannot resume from {path}: not a fastdeeplab training checkpoint; use another "
                         "out_dir or --no-resume")
    missing = [key for key in _KEYS if key not in state]
    if missing or not isinstance(state["model"], Mapping) or not isinstance(state["config"], Mapping):
        raise ValueError(f"cannot resume from {path}: an incomplete training checkpoint (missing "
                         f"{', '.join(missing) or 'a model or config mapping'}); use another out_dir or --no-resume")
    return state


RECIPE_FIELDS = ("dataset", "train_split", "crop_size", "scale_range", "scale_step", "flip", "batch_size",
                 "bootstrap_classes", "bootstrap_factor", "aux_weight", "weights", "weights_backbone", "momentum",
                 "weight_decay", "poly_power", "bn_momentum", "seed")
"""Config fields that change what a resumed run computes: a resume with other values is refused."""
WARN_FIELDS = ("data_root", "val_split")
"""Config fields a resume may change (a moved dataset, another validation split), with a warning."""
_FLAGS = {"dataset": "--dataset", "train_split": "--split", "crop_size": "--crop-size", "batch_size": "--batch-size",
          "seed": "--seed", "weights_backbone": "--weights-backbone", "data_root": "--data"}


def _flag(key: str, value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"))
    return f"{_FLAGS[key]} {value}" if key in _FLAGS else f"--set {key}={text}"


def check_resumable(state: Mapping[str, Any], cfg: TrainConfig, num_classes: int, path: Path | str) -> list[str]:
    """Refuse (``ValueError``) to resume ``cfg`` from checkpoint ``state`` when they do not describe the same
    model, schedule and recipe, saying what differs and how to proceed. Returns warnings (one line each) for
    the :data:`WARN_FIELDS` that changed."""
    how = "or start afresh: another --out (out_dir) or --no-resume (resume=False)"
    saved, wanted = state.get("model_config") or {}, model_config(cfg, num_classes)
    diffs, flags = [], []
    if saved.get("name") != wanted["name"]:
        diffs.append(f"model {saved.get('name')!r} (this run: {wanted['name']!r})")
        flags.append(f"--set model={saved.get('name')}")
    saved_kw, wanted_kw = saved.get("kwargs", {}), wanted["kwargs"]
    for key in sorted(set(saved_kw) | set(wanted_kw)):
        if saved_kw.get(key) != wanted_kw.get(key):
            diffs.append(f"{key}={saved_kw.get(key)!r} (this run: {wanted_kw.get(key)!r})")
            if key == "num_classes":
                flags.append(f"--num-classes {saved_kw.get(key)}")
            elif key in ("aux_loss", "multi_grid"):
                flags.append(f"--set {key}={json.dumps(saved_kw.get(key), separators=(',', ':'))}")
            else:
                flags.append("--set model_kwargs=...")
    if diffs:
        raise ValueError(f"cannot resume from {path}: the checkpoint's model differs: {'; '.join(diffs)}. "
                         f"Run with the checkpoint's settings ({', '.join(dict.fromkeys(flags))}), {how}")
    saved_stages, wanted_stages = state["config"]["stages"], cfg.to_dict()["stages"]
    if saved_stages != wanted_stages:
        raise ValueError(f"cannot resume from {path}: its schedule {saved_stages} differs from this config's "
                         f"{wanted_stages}; use the checkpoint's stages, {how}")
    saved_cfg, wanted_cfg = state["config"], cfg.to_dict()
    changed = [k for k in RECIPE_FIELDS if k in saved_cfg and saved_cfg[k] != wanted_cfg.get(k)]
    if changed:
        diffs = "; ".join(f"{k}={saved_cfg[k]!r} (this run: {wanted_cfg.get(k)!r})" for k in changed)
        flags = ", ".join(_flag(k, saved_cfg[k]) for k in changed)
        raise ValueError(f"cannot resume from {path}: the checkpoint was trained with other settings: {diffs}. "
                         f"Run with the checkpoint's ({flags}), {how}")
    bad = nonfinite_tensors(state["model"])
    if bad:
        raise ValueError(f"cannot resume from {path}: {len(bad)} weight tensors hold NaN or inf (e.g. {bad[0]}), "
                         f"from a run that diverged; {how}")
    return [f"resuming from {path} with {k}={wanted_cfg.get(k)!r}; the checkpoint was trained with "
            f"{saved_cfg[k]!r}" for k in WARN_FIELDS if k in saved_cfg and saved_cfg[k] != wanted_cfg.get(k)]


def output_paths(out_dir: str | os.PathLike, inputs: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """The files a run writes under ``out_dir``, validated before any work (``check_output_path``); none of
    them may be one of ``inputs`` (``{"weights": path, ...}``, compared as files: ``check_not_input``)."""
    from .._io import check_not_input, check_output_path

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir {out} exists and is not a directory; give a folder for checkpoints")
    paths = {name: check_output_path(out / name, what="training output")
             for name in (CHECKPOINT_NAME, FINAL_WEIGHTS_NAME, "history.json")}
    files = {k: v for k, v in (inputs or {}).items() if v is not None and Path(v).exists()}
    for path in paths.values():
        check_not_input(path, files, what="training output")
    return paths
