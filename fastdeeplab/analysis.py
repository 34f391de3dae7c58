"""The paper's boundary-effect analysis (DeepLabv3 §3.3, Figure 3).

With a large atrous rate on a small feature map, many taps of a 3×3 filter fall on the zero padding
instead of on real pixels; when the rate reaches the map size, the filter degenerates to its centre tap.
These helpers count, exactly, how much of a convolution's work touches real pixels. The Triton kernel uses
the same arithmetic to skip taps that are dead for a whole output tile.
"""

from __future__ import annotations

__all__ = ["live_offsets", "valid_tap_fraction", "valid_weight_distribution"]


def live_offsets(rate: int, size: int, kernel_size: int = 3, *, stride: int = 1, padding: int | None = None,
                 out_range: tuple[int, int] | None = None) -> list[int]:
    """Tap indices ``k`` along one axis that read at least one real pixel for some output in ``out_range``.

    Output position ``o`` reads input ``o * stride - padding + k * rate``. ``padding`` defaults to "same"
    padding, ``rate * (kernel_size // 2)``; ``out_range`` is a half-open ``[o0, o1)``, all outputs by default.
    """
    _check(rate, size, kernel_size)
    pad = rate * (kernel_size // 2) if padding is None else padding
    out_size = (size + 2 * pad - rate * (kernel_size - 1) - 1) // stride + 1
    o0, o1 = (0, out_size) if out_range is None else out_range
    o1 = min(o1, out_size)
    live = []
    for k in range(kernel_size):
        lo = o0 * stride - pad + k * rate
        hi = (o1 - 1) * stride - pad + k * rate
        if o1 > o0 and hi >= 0 and lo <= size - 1:
            live.append(k)
    return live


def _valid_counts_1d(rate: int, size: int, kernel_size: int) -> list[int]:
    """For each output position of a 'same'-padded stride-1 conv, how many taps land inside ``[0, size)``."""
    half = kernel_size // 2
    return [sum(0 <= p + (k - half) * rate < size for k in range(kernel_size)) for p in range(size)]


def valid_tap_fraction(rate: int, size: int, kernel_size: int = 3) -> float:
    """Fraction of a ``kernel_size``² atrous filter's multiply-adds that touch real pixels.

    The feature map is ``size``×``size`` with "same" zero padding and stride 1, as in ASPP. The result is
    averaged over every output position: 1.0 when nothing reads padding, ``1 / kernel_size**2`` when the rate
    is so large that only the centre tap ever lands inside the map.

    >>> round(valid_tap_fraction(36, 65), 3)   # ASPP's largest rate at output stride 8 on a 513 input
    0.398
    >>> valid_tap_fraction(100, 33) == 1 / 9
    True
    """
    _check(rate, size, kernel_size)
    per_axis = sum(_valid_counts_1d(rate, size, kernel_size)) / (size * kernel_size)
    return per_axis * per_axis


def valid_weight_distribution(rate: int, size: int, kernel_size: int = 3) -> dict[int, float]:
    """The paper's Figure 3: for each number of valid weights, the fraction of output positions that have it.

    ``{9: 1.0}`` for a small rate; ``{1: 1.0}`` once the rate reaches the map size (only the centre tap).
    """
    _check(rate, size, kernel_size)
    counts = _valid_counts_1d(rate, size, kernel_size)
    dist: dict[int, float] = {}
    for a in counts:
        for b in counts:
            dist[a * b] = dist.get(a * b, 0.0) + 1.0
    total = float(size * size)
    return {k: v / total for k, v in sorted(dist.items(), reverse=True)}


def _check(rate: int, size: int, kernel_size: int) -> None:
    if rate < 1:
        raise ValueError(f"atrous rate must be >= 1, got {rate}")
    if size < 1:
        raise ValueError(f"feature map size must be >= 1, got {size}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
