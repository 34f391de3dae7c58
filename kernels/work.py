"""The executed-work model of the conv kernels: CTAs launched and MMA multiply-adds executed, per tiling.

Pure Python (no torch, no triton): the autotuner's early prune (:mod:`fastdeeplab.kernels.conv`), the
executed-work table (``scripts/executed_work.py``) and the tests all use these functions, and the tests check
them against the tap counts the kernel itself reports (``return_tap_counts=True``).

A program executes ``BLOCK_M × BLOCK_N × BLOCK_K`` MMA work per K step, padded rows and channels included, so
the executed work of one launch is ``Σ_tiles BLOCK_M · live_taps(tile) · ceil(Cin/BLOCK_K)·BLOCK_K ·
ceil(Cout/BLOCK_N)·BLOCK_N``; cuDNN's dense work is ``N·OH·OW · KH·KW · Cin · Cout``.

>>> g = ConvGeometry(n=1, cin=256, h=33, w=33, cout=256, k=3, dilation=6)
>>> spatial = Tiling(block_m=64, block_n=128, block_k=32, block_ow=8, raster=False)
>>> raster = Tiling(block_m=64, block_n=128, block_k=32, raster=True)
>>> round(executed_macs(g, spatial) / g.dense_macs, 2), round(executed_macs(g, raster) / g.dense_macs, 2)
(1.28, 0.91)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ConvGeometry", "Tiling", "ctas", "executed_macs", "tap_window", "tile_taps", "tiling_of"]


@dataclass(frozen=True)
class ConvGeometry:
    """One convolution launch: ``[n, cin, h, w] → [n, cout, oh, ow]``, square kernel ``k``, padding
    ``dilation·(k//2)`` unless given."""

    n: int
    cin: int
    h: int
    w: int
    cout: int
    k: int = 3
    stride: int = 1
    dilation: int = 1
    padding: int | None = None

    @property
    def pad(self) -> int:
        return self.dilation * (self.k // 2) if self.padding is None else self.padding

    @property
    def oh(self) -> int:
        return (self.h + 2 * self.pad - self.dilation * (self.k - 1) - 1) // self.stride + 1

    @property
    def ow(self) -> int:
        return (self.w + 2 * self.pad - self.dilation * (self.k - 1) - 1) // self.stride + 1

    @property
    def dense_macs(self) -> int:
        return self.n * self.oh * self.ow * self.k * self.k * self.cin * self.cout


@dataclass(frozen=True)
class Tiling:
    """A config's tile: ``block_m`` pixels (``block_m // block_ow`` × ``block_ow`` when spatial, consecutive
    row-major pixels when ``raster``), ``block_n`` output channels, ``block_k`` input channels per step."""

    block_m: int
    block_n: int
    block_k: int
    block_ow: int = 1
    raster: bool = True

    @property
    def block_oh(self) -> int:
        return self.block_m // self.block_ow


def tiling_of(kwargs: dict) -> Tiling:
    """The :class:`Tiling` of a conv config's meta-parameters (``BLOCK_OH``, ``BLOCK_OW``, ...)."""
    return Tiling(block_m=kwargs["BLOCK_OH"] * kwargs["BLOCK_OW"], block_n=kwargs["BLOCK_N"],
                  block_k=kwargs["BLOCK_K"], block_ow=kwargs["BLOCK_OW"], raster=bool(kwargs.get("RASTER", False)))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tap_window(first: int, last: int, size: int, k: int, stride: int, pad: int, dilation: int) -> int:
    """Live taps along one axis for outputs ``first..last`` (inclusive): the kernel's ``[k_lo, k_hi)``."""
    lo = sum(last * stride - pad + t * dilation < 0 for t in range(k))
    hi = k - sum(first * stride - pad + t * dilation >= size for t in range(k))
    return max(hi - lo, 0)


def tile_taps(g: ConvGeometry, t: Tiling) -> list[int]:
    """Executed taps of every M tile, in program order (spatial: image, tile row, tile column)."""
    kw = dict(k=g.k, stride=g.stride, pad=g.pad, dilation=g.dilation)
    out = []
    if not t.raster:
        rows = [tap_window(i * t.block_oh, min((i + 1) * t.block_oh, g.oh) - 1, g.h, **kw)
                for i in range(_cdiv(g.oh, t.block_oh))]
        cols = [tap_window(j * t.block_ow, min((j + 1) * t.block_ow, g.ow) - 1, g.w, **kw)
                for j in range(_cdiv(g.ow, t.block_ow))]
        return [r * c for _ in range(g.n) for r in rows for c in cols]
    per_img, total = g.oh * g.ow, g.n * g.oh * g.ow
    for m0 in range(0, total, t.block_m):
        m1 = min(m0 + t.block_m, total) - 1
        if m0 // per_img != m1 // per_img:  # straddles two images: every row and column
            oh0, oh1, ow0, ow1 = 0, g.oh - 1, 0, g.ow - 1
        else:
            p0, p1 = m0 % per_img, m1 % per_img
            oh0, oh1 = p0 // g.ow, p1 // g.ow
            ow0, ow1 = (p0 % g.ow, p1 % g.ow) if oh0 == oh1 else (0, g.ow - 1)
        out.append(tap_window(oh0, oh1, g.h, **kw) * tap_window(ow0, ow1, g.w, **kw))
    return out


def ctas(g: ConvGeometry, t: Tiling) -> int:
    """Programs one launch runs: M tiles × output-channel tiles."""
    return len(tile_taps(g, t)) * _cdiv(g.cout, t.block_n)


def executed_macs(g: ConvGeometry, t: Tiling) -> int:
    """MMA multiply-adds one launch executes, padded rows and channels included (see the module docstring)."""
    per_tap = t.block_m * _cdiv(g.cin, t.block_k) * t.block_k * _cdiv(g.cout, t.block_n) * t.block_n
    return sum(tile_taps(g, t)) * per_tap
