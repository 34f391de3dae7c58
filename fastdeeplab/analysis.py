"""The paper's boundary-effect analysis (DeepLabv3 §3.3, Figure 3).

With a large atrous rate on a small feature map, many taps of a 3×3 filter fall on the zero padding
instead of on real pixels; when the rate reaches the map size, the filter degenerates to its centre tap.
These helpers count, exactly, how much of a convolution's work touches real pixels. The Triton kernel uses
the same arithmetic to skip taps that are dead for a whole output tile.
"""

from __future__ import annotations

__all__ = ["live_offsets", "tile_live_taps", "tile_live_taps_1d", "tile_tap_fraction", "valid_tap_fraction",
           "valid_weight_distribution"]


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


def _axis(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or an (h, w) pair, got {value!r}")
    return int(value[0]), int(value[1])


def tile_live_taps_1d(rate: int, size: int, tile: int, kernel_size: int = 3, *, stride: int = 1,
                      padding: int | None = None) -> list[int]:
    """Live taps along one axis for each output tile ``[t*tile, (t+1)*tile)``: ``len(live_offsets(...))``.

    A tap is live for a tile when it reads at least one real pixel for at least one of the tile's outputs.
    """
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    _check(rate, size, kernel_size)
    pad = rate * (kernel_size // 2) if padding is None else padding
    out_size = (size + 2 * pad - rate * (kernel_size - 1) - 1) // stride + 1
    n_tiles = -(-out_size // tile)
    return [len(live_offsets(rate, size, kernel_size, stride=stride, padding=pad,
                             out_range=(t * tile, (t + 1) * tile))) for t in range(n_tiles)]


def tile_live_taps(rate: int | tuple[int, int], size: int | tuple[int, int], tile: int | tuple[int, int],
                   kernel_size: int | tuple[int, int] = 3, *, stride: int | tuple[int, int] = 1,
                   padding: int | tuple[int, int] | None = None) -> list[list[int]]:
    """Taps a tile-skipping kernel executes for each ``tile_h × tile_w`` output tile of one image.

    Every argument is an int or an ``(h, w)`` pair. A tap ``(kh, kw)`` runs for a tile when tap ``kh`` is live
    for the tile's rows and tap ``kw`` for its columns (:func:`live_offsets`), so the count is the product of
    the two axes' counts. Returns ``counts[th][tw]``.

    >>> tile_live_taps(6, 5, 8)          # map smaller than the rate: every tile runs the centre tap only
    [[1]]
    >>> tile_live_taps(2, 16, 8)         # small rate: no tap is dead for a whole 8×8 tile
    [[9, 9], [9, 9]]
    """
    (rh, rw), (sh, sw), (th, tw) = _axis(rate, "rate"), _axis(size, "size"), _axis(tile, "tile")
    (kh, kw), (st_h, st_w) = _axis(kernel_size, "kernel_size"), _axis(stride, "stride")
    ph, pw = (None, None) if padding is None else _axis(padding, "padding")
    rows = tile_live_taps_1d(rh, sh, th, kh, stride=st_h, padding=ph)
    cols = tile_live_taps_1d(rw, sw, tw, kw, stride=st_w, padding=pw)
    return [[r * c for c in cols] for r in rows]


def tile_tap_fraction(rate: int, size: int, tile: int | tuple[int, int], kernel_size: int = 3) -> float:
    """Fraction of the dense multiply-adds a tile-skipping kernel executes on a "same"-padded, stride-1 map.

    Sums, over tiles, live taps × real output pixels in the tile, divided by ``kernel_size² · size²``: the
    tile-level counterpart of :func:`valid_tap_fraction`. Tiles are coarser than pixels, so it is never below
    ``valid_tap_fraction(rate, size)``; both equal ``1 / kernel_size²`` once ``rate >= size``.

    >>> tile_tap_fraction(8, 16, 8) == valid_tap_fraction(8, 16)   # tile edges on the dead-band edges
    True
    """
    th, tw = _axis(tile, "tile")
    counts = tile_live_taps(rate, size, (th, tw), kernel_size)
    rows = [min(th, size - i * th) for i in range(len(counts))]
    cols = [min(tw, size - j * tw) for j in range(len(counts[0]))]
    executed = sum(counts[i][j] * rows[i] * cols[j] for i in range(len(rows)) for j in range(len(cols)))
    return executed / (kernel_size * kernel_size * size * size)
