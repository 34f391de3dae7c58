"""Model helpers shared by the tests."""

from __future__ import annotations

import torch

from fastdeeplab.weights import randomize_bn

__all__ = ["randomize_bn", "rel_err"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the scale of ``b`` (max |b|)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
