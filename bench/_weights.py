"""The weights every implementation of a benchmark run shares: :mod:`fastdeeplab.weights`, the package's one
resolver of ``--weights`` names (``synthetic``, ``random``, torchvision names, checkpoint paths), which
``fastdeeplab predict/demo/eval/export/deploy`` use too. Re-exported here for the suite and its tests."""

from __future__ import annotations

from fastdeeplab.weights import (  # noqa: F401
    BACKBONES,
    DEPTHS,
    NAMED_WEIGHTS,
    WEIGHT_KINDS,
    Weights,
    _drop_aux,
    _looks_like_path,
    backbone_spec,
    cached_torchvision_weights,
    check_synthetic,
    random_state_dict,
    resolve_weights,
    torchvision_reference,
    torchvision_weights_enum,
)

__all__ = ["BACKBONES", "DEPTHS", "NAMED_WEIGHTS", "WEIGHT_KINDS", "Weights", "backbone_spec", "cached_torchvision_weights",
           "check_synthetic", "random_state_dict", "resolve_weights", "torchvision_reference",
           "torchvision_weights_enum"]
