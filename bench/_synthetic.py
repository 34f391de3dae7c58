"""``--weights synthetic``: a DeepLabv3 trained on synthetic scenes, so accuracy numbers mean something with no
network and no dataset. The model, its training and its held-out scenes live in :mod:`fastdeeplab.weights`
(``fastdeeplab predict --weights synthetic`` uses the same cached model); re-exported here for the suite.

``python -m fastdeeplab.weights --train`` trains (or loads) it and prints how it was made.
"""

from __future__ import annotations

from fastdeeplab.weights import (  # noqa: F401
    SPEC,
    SyntheticSpec,
    cache_dir,
    cache_path,
    evaluate_miou,
    held_out_set,
    load_or_train,
    scenes,
    synthetic_spec,
    train_synthetic,
)

__all__ = ["SPEC", "SyntheticSpec", "cache_path", "held_out_set", "load_or_train", "scenes", "synthetic_spec",
           "train_synthetic"]
