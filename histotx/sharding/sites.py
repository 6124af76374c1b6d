"""What every technology reader returns: measurement sites placed on the slide's level-0 pixels.

Two kinds answer the same questions (how many sites, how many off the slide, which sites lie in a
box): :class:`Sites` in memory (Visium spots, HEST spots) and :class:`~histotx.sharding.bands.BandedSites` on
disk, band by band (Xenium molecules, Visium HD bins), whose size is unbounded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import scipy.sparse as sp


@dataclass
class Sites:
    """Spots (Visium), bins (Visium HD), molecules (Xenium) or HEST spots, in slide level-0 pixels.

    ``xy_px[i]`` is site i's centre as continuous (x, y) in level-0 pixels of the sample's slide, pixel
    (i, j) covering [i, i+1) × [j, j+1). 10x and HEST coordinates are taken as given (x = pxl_col,
    y = pxl_row), scaled when the slide is a hires/lowres image.
    ``counts`` is (n_sites × n_genes) CSR; ``genes[j]`` = (symbol, ensembl id or "") of column j.
    """

    xy_px: np.ndarray
    counts: sp.csr_matrix
    genes: list[tuple[str, str]]
    footprint_um: float
    footprint_shape: str  # disk | square | point
    panel: str = ""
    # Reasons → number of sites (or molecules) dropped while reading, e.g. {"not_in_tissue": 12}.
    dropped: dict[str, int] = field(default_factory=dict)
    # µm/px of the slide's level 0 as estimated from the data itself (e.g. the Visium spot lattice).
    mpp_estimate: float | None = None
    # Anything a reader wants the manifest to record (pixel size source, software version, ...).
    info: dict = field(default_factory=dict)
    # A square footprint's rotation on the slide (degrees; HEST pseudo-spots mapped through a rotated alignment).
    footprint_angle_deg: float = 0.0
    _by_y: np.ndarray | None = field(default=None, init=False, repr=False)  # site order by y, for in_box
    _ys: np.ndarray | None = field(default=None, init=False, repr=False)
    _kept: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.xy_px = np.asarray(self.xy_px, dtype=np.float64).reshape(-1, 2)
        self.counts = sp.csr_matrix(self.counts)
        if self.counts.shape != (self.xy_px.shape[0], len(self.genes)):
            raise ValueError(
                f"counts shape {self.counts.shape} does not match {self.xy_px.shape[0]} sites × {len(self.genes)} genes"
            )

    @property
    def n_sites(self) -> int:
        return int(self.xy_px.shape[0])

    def on_slide(self, width: int, height: int) -> np.ndarray:
        x, y = self.xy_px[:, 0], self.xy_px[:, 1]
        return (x >= 0) & (x < width) & (y >= 0) & (y < height)

    def count_outside(self, width: int, height: int) -> int:
        return int((~self.on_slide(width, height)).sum())

    def positions(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every site's (x, y) level-0 px (as :meth:`BandedSites.positions`, in one piece: they are in memory)."""
        yield self.xy_px[:, 0], self.xy_px[:, 1]

    def occupied_tiles(self, size0: float, n_cols: int, n_rows: int) -> np.ndarray:
        """(n_rows × n_cols,) bool, row-major: which tiles of a grid of ``size0`` px squares hold a site centre."""
        occupied = np.zeros(n_rows * n_cols, dtype=bool)
        mark_tiles(occupied, self.xy_px[:, 0], self.xy_px[:, 1], size0, n_cols, n_rows)
        return occupied

    @property
    def n_kept(self) -> int:
        """Distinct sites handed out by in_box (spot-centred tiles overlap)."""
        return int(self._kept.sum()) if self._by_y is not None else 0

    def in_box(self, x0: float, y0: float, x1: float, y1: float) -> tuple[np.ndarray, sp.csr_matrix]:
        """Sites with centre in [x0, x1) × [y0, y1), in index order: (xy level-0 px, CSR counts)."""
        if self._by_y is None:
            self._by_y = np.argsort(self.xy_px[:, 1], kind="stable")  # NaN last: never in a box
            self._ys = self.xy_px[self._by_y, 1]
            self._kept = np.zeros(self.n_sites, dtype=bool)
        lo, hi = np.searchsorted(self._ys, [y0, y1], side="left")
        cand = np.sort(self._by_y[lo:hi])
        x = self.xy_px[cand, 0]
        cand = cand[(x >= x0) & (x < x1)]
        self._kept[cand] = True
        return self.xy_px[cand], self.counts[cand]


def mark_tiles(occupied: np.ndarray, x: np.ndarray, y: np.ndarray, size0: float, n_cols: int, n_rows: int) -> None:
    """Set ``occupied[r * n_cols + c]`` for every tile (c, r) of side ``size0`` holding one of the points."""
    if not len(x) or not n_rows * n_cols:
        return
    c, r = np.floor(x / size0).astype(np.int64), np.floor(y / size0).astype(np.int64)
    inside = (c >= 0) & (c < n_cols) & (r >= 0) & (r < n_rows)
    occupied[np.unique(r[inside] * n_cols + c[inside])] = True
