"""Transcript tokens: a tile's sparse transcript grid binned into square cells of a chosen size.

The model sees expression as tokens, one per cell of side ``resolution_um`` that holds any counts;
the resolution may change from batch to batch (2 µm Visium HD bins, 8/16/32 µm, 55 µm spots), so
binning happens here, per tile, in the data-loader workers. numpy only: this module must not import
torch.

Geometry: positions are tile pixels, x right and y down, pixel (0, 0) covering [0, 1)² (the
:class:`~histotx.format.TranscriptGrid` convention). Cells tile the image from its top-left corner;
cell (row, col) covers [col·s, (col+1)·s) × [row·s, (row+1)·s) with s = resolution_um / mpp pixels,
cut at the image border; a token sits at the centre of its cell's part inside the image.

Counts: a site whose footprint (spot disk, bin square) is wider than a cell spreads its counts over
the cells the footprint covers, in proportion to the covered area (sampled on a regular lattice);
the share falling outside the image is dropped, since that tissue is not in the tile. Smaller
footprints, and molecules, go wholly to the cell holding their centre. A token's value is its
expression normalised to a fixed total and log1p-transformed, so tokens from different
technologies and cell sizes have comparable scales.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from histotx.format import TranscriptGrid

NORMALISED_TOTAL = 1e4
"""Each token's counts are scaled to this total before log1p (the usual scanpy target)."""

MAX_SAMPLES_PER_AXIS = 64
"""Bound on the footprint lattice (64² points per site) when spreading a large spot over small cells."""


@dataclass
class TranscriptCells:
    """The transcript tokens of one tile: cell centres and each cell's normalised expression (CSR).

    ``gene[offsets[i]:offsets[i+1]]`` and ``weight[...]`` are cell i's genes (vocabulary ids) and
    log1p-normalised expression. ``resolution_um`` is the token size the model is told: the cell
    side, or for native tokens the site footprint (at least one pixel, so molecules get a size).
    """

    xy: np.ndarray
    offsets: np.ndarray
    gene: np.ndarray
    weight: np.ndarray
    resolution_um: float

    def __post_init__(self) -> None:
        self.xy = np.ascontiguousarray(self.xy, dtype=np.float32).reshape(-1, 2)
        self.offsets = np.ascontiguousarray(self.offsets, dtype=np.int64)
        self.gene = np.ascontiguousarray(self.gene, dtype=np.int64)
        self.weight = np.ascontiguousarray(self.weight, dtype=np.float32)
        self.resolution_um = float(self.resolution_um)
        n = self.xy.shape[0]
        if self.offsets.shape != (n + 1,) or self.offsets[0] != 0 or np.any(np.diff(self.offsets) < 0):
            raise ValueError(f"offsets must be a CSR index of {n + 1} non-decreasing entries from 0")
        if self.gene.shape != self.weight.shape or self.gene.shape[0] != self.offsets[-1]:
            raise ValueError(f"gene {self.gene.shape} and weight {self.weight.shape} must hold offsets[-1] entries")
        if not self.resolution_um > 0:
            raise ValueError(f"resolution_um must be positive, got {self.resolution_um}")

    @classmethod
    def trusted(
        cls, xy: np.ndarray, offsets: np.ndarray, gene: np.ndarray, weight: np.ndarray, resolution_um: float
    ) -> "TranscriptCells":
        """Cells from arrays already in this class's dtypes and forming a valid CSR index (binning's own
        output, cut per tile): not converted or checked again."""
        cells = cls.__new__(cls)
        cells.xy, cells.offsets, cells.gene, cells.weight = xy, offsets, gene, weight
        cells.resolution_um = float(resolution_um)
        return cells

    @classmethod
    def empty(cls, resolution_um: float) -> "TranscriptCells":
        return cls(np.zeros((0, 2)), np.zeros(1), np.zeros(0), np.zeros(0), resolution_um)

    @property
    def n_cells(self) -> int:
        return int(self.xy.shape[0])

    def select(self, keep: np.ndarray) -> "TranscriptCells":
        """The cells where ``keep`` (bool, n_cells) is True, in their order."""
        keep = np.asarray(keep, dtype=bool)
        nnz = np.diff(self.offsets)[keep]
        entries = np.repeat(keep, np.diff(self.offsets))
        offsets = np.concatenate([[0], np.cumsum(nnz)])
        return TranscriptCells(self.xy[keep], offsets, self.gene[entries], self.weight[entries], self.resolution_um)

    def with_xy(self, xy: np.ndarray) -> "TranscriptCells":
        return TranscriptCells(xy, self.offsets, self.gene, self.weight, self.resolution_um)

    # Geometric transforms, matching what is done to the image (only the centres move).

    def crop(self, x0: float, y0: float, width: float, height: float) -> "TranscriptCells":
        """Cells whose centre lies in the crop box, in the crop's pixel frame."""
        x, y = self.xy[:, 0] - x0, self.xy[:, 1] - y0
        keep = (x >= 0) & (x < width) & (y >= 0) & (y < height)
        return self.select(keep).with_xy(np.stack([x[keep], y[keep]], axis=1))

    def flip(self, image_hw: tuple[int, int], horizontal: bool) -> "TranscriptCells":
        """As ``image[:, ::-1]`` (horizontal) or ``image[::-1]`` (vertical) on an H×W image."""
        h, w = image_hw
        xy = self.xy.copy()
        if horizontal:
            xy[:, 0] = w - xy[:, 0]
        else:
            xy[:, 1] = h - xy[:, 1]
        return self.with_xy(xy)

    def rot90(self, image_hw: tuple[int, int], k: int = 1) -> "TranscriptCells":
        """As ``np.rot90(image, k)`` (counter-clockwise quarter turns) on an H×W image."""
        h, w = image_hw
        xy = self.xy.astype(np.float64)
        for _ in range(k % 4):
            xy = np.stack([xy[:, 1], w - xy[:, 0]], axis=1)
            h, w = w, h
        return self.with_xy(xy)

    def scale(self, factor: float) -> "TranscriptCells":
        """As resizing the image by ``factor`` (the cells keep their physical size)."""
        return self.with_xy(self.xy * np.float32(factor))


def _footprint_lattice(footprint_px: float, shape: str, cell_px: float, angle_deg: float = 0.0) -> np.ndarray:
    """Offsets (m, 2) of equal-area sample points covering a footprint, about 4 per cell side; a square's
    lattice turned by ``angle_deg`` (x towards y)."""
    k = int(min(MAX_SAMPLES_PER_AXIS, max(1, math.ceil(4 * footprint_px / cell_px))))
    ticks = ((np.arange(k) + 0.5) / k - 0.5) * footprint_px
    off = np.stack(np.meshgrid(ticks, ticks, indexing="xy"), axis=-1).reshape(-1, 2)
    if shape == "disk":
        off = off[np.hypot(off[:, 0], off[:, 1]) <= footprint_px / 2]
        if off.shape[0] == 0:
            off = np.zeros((1, 2))
    elif shape == "square" and angle_deg:
        c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
        off = off @ np.array([[c, s], [-s, c]])  # each row (x, y) → (c·x − s·y, s·x + c·y)
    return off


def _normalise(cell_of_entry: np.ndarray, gene: np.ndarray, value: np.ndarray, n_cells: int):
    """Sum duplicate (cell, gene) entries, drop non-positive ones, normalise each cell → CSR."""
    ok = value > 0
    cell_of_entry, gene, value = cell_of_entry[ok], gene[ok].astype(np.int64), value[ok].astype(np.float64)
    n_genes = int(gene.max()) + 1 if gene.size else 1
    key, inverse = np.unique(cell_of_entry * n_genes + gene, return_inverse=True)
    summed = np.bincount(inverse, weights=value, minlength=key.size)
    cell, gene = key // n_genes, key % n_genes
    total = np.bincount(cell, weights=summed, minlength=n_cells)
    weight = np.log1p(summed / total[cell] * NORMALISED_TOTAL)
    occupied = np.flatnonzero(np.bincount(cell, minlength=n_cells))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(cell, minlength=n_cells)[occupied])])
    return occupied, offsets, gene, weight


def token_size(footprint_um: float, drawn_um: float | None) -> float | None:
    """The token side for sites of ``footprint_um`` when ``drawn_um`` was drawn: the draw, or None (native,
    one token per site) when the draw is native or finer than a site. Spreading one site over several
    cells would make tokens of identical composition, so a masked token's target would stay visible."""
    return None if drawn_um is None or footprint_um > drawn_um else drawn_um


def bin_grid(
    grid: TranscriptGrid, mpp: float, resolution_um: float | None, image_hw: tuple[int, int]
) -> TranscriptCells:
    """Tokens of one tile at ``resolution_um`` (None: native, one token per site).

    ``mpp`` is the tile's µm per pixel and ``image_hw`` its (height, width) in pixels. Cells are
    listed row by row (y, then x); empty cells make no token.
    """
    return bin_grids([grid], [mpp], [resolution_um], image_hw)[0]


def bin_grids(
    grids: Sequence[TranscriptGrid],
    mpps: Sequence[float],
    resolutions_um: Sequence[float | None],
    image_hw: tuple[int, int],
) -> list[TranscriptCells]:
    """:func:`bin_grid` for many tiles of one size (a batch's views), each with its own µm per pixel and
    token size: the tiles' sites and cells are numbered one after the other and binned in one pass of
    numpy calls, instead of a few dozen calls per tile (a loader bins ten views per sample)."""
    h, w = int(image_hw[0]), int(image_hw[1])
    for mpp, resolution in zip(mpps, resolutions_um, strict=True):
        if not mpp > 0:
            raise ValueError(f"mpp must be positive, got {mpp}")
        if resolution is not None and not resolution > 0:
            raise ValueError(f"resolution_um must be positive or None (native), got {resolution}")
    out: list[TranscriptCells] = [None] * len(grids)  # type: ignore[list-item]
    native = [i for i, r in enumerate(resolutions_um) if r is None]
    binned = [i for i, r in enumerate(resolutions_um) if r is not None]
    if native:
        for i, cells in zip(native, _native([grids[i] for i in native], [mpps[i] for i in native], h, w), strict=True):
            out[i] = cells
    if binned:
        for i, cells in zip(
            binned,
            _binned(
                [grids[i] for i in binned],
                [float(mpps[i]) for i in binned],
                [float(resolutions_um[i]) for i in binned],
                h,
                w,
            ),
            strict=True,
        ):
            out[i] = cells
    return out


def _starts(sizes) -> np.ndarray:
    """``[0, s0, s0 + s1, ...]``: where each tile's items start when numbered one after the other."""
    out = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=out[1:])
    return out


def _concat(grids: Sequence[TranscriptGrid]):
    """The tiles' sites numbered one after the other: (site starts, xy, non-zeros per site, gene, count)."""
    site_start = _starts([g.n_sites for g in grids])
    xy = np.concatenate([g.xy for g in grids])
    nnz = np.concatenate([g.offsets[1:] - g.offsets[:-1] for g in grids])
    return site_start, xy, nnz, np.concatenate([g.gene for g in grids]), np.concatenate([g.count for g in grids])


def _split(occupied, offsets, gene, weight, start, xy, resolutions) -> list[TranscriptCells]:
    """:func:`_normalise`'s output over all tiles (``occupied`` sorted global ids), cut at ``start``; the
    dtypes set once for all tiles."""
    bounds = np.searchsorted(occupied, start)
    xy = np.ascontiguousarray(xy, dtype=np.float32).reshape(-1, 2)
    offsets, gene, weight = offsets.astype(np.int64), gene.astype(np.int64), weight.astype(np.float32)
    out = []
    for v, resolution in enumerate(resolutions):
        a, b = bounds[v], bounds[v + 1]
        e0, e1 = offsets[a], offsets[b]
        out.append(TranscriptCells.trusted(xy[a:b], offsets[a : b + 1] - e0, gene[e0:e1], weight[e0:e1], resolution))
    return out


def _native(grids: Sequence[TranscriptGrid], mpps: Sequence[float], h: int, w: int) -> list[TranscriptCells]:
    site_start, xy, nnz, gene, count = _concat(grids)
    x, y = xy[:, 0], xy[:, 1]
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    site = np.repeat(np.arange(xy.shape[0]), nnz)
    keep = inside[site]
    occupied, offsets, gene, weight = _normalise(site[keep], gene[keep], count[keep], xy.shape[0])
    return _split(
        occupied,
        offsets,
        gene,
        weight,
        site_start,
        xy[occupied],
        [max(g.footprint_um, mpp) for g, mpp in zip(grids, mpps, strict=True)],
    )


def _binned(
    grids: Sequence[TranscriptGrid], mpps: list[float], resolutions: list[float], h: int, w: int
) -> list[TranscriptCells]:
    sides = np.array([r / m for r, m in zip(resolutions, mpps, strict=True)])  # cell side in pixels, per tile
    n_cols = np.maximum(1, np.ceil(w / sides)).astype(np.int64)
    n_rows = np.maximum(1, np.ceil(h / sides)).astype(np.int64)
    cell_start = _starts(n_cols * n_rows)
    site_start, xy, nnz, gene, count = _concat(grids)
    # Sample points: one per site at its centre, or a lattice over a footprint wider than a cell.
    lattices = [
        _footprint_lattice(g.footprint_um / m, g.footprint_shape, side, g.footprint_angle_deg)
        if g.footprint_shape != "point" and g.footprint_um / m > side
        else np.zeros((1, 2))
        for g, m, side in zip(grids, mpps, sides, strict=True)
    ]
    per_tile = np.array([lat.shape[0] for lat in lattices])
    site_tile = np.repeat(np.arange(len(grids)), np.diff(site_start))
    per_site = per_tile[site_tile]
    point_site = np.repeat(np.arange(xy.shape[0]), per_site)
    point_tile = site_tile[point_site]
    k = np.arange(point_site.size) - _starts(per_site)[point_site]  # the point's index in its lattice
    pts = xy.astype(np.float64)[point_site] + np.concatenate(lattices)[_starts(per_tile)[point_tile] + k]
    side = sides[point_tile]
    inside = (pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)
    cell = (np.floor(pts[:, 1] / side) * n_cols[point_tile] + np.floor(pts[:, 0] / side)).astype(np.int64)
    cell += cell_start[point_tile]
    n_cells = int(cell_start[-1])
    pair, n_points = np.unique(point_site[inside] * n_cells + cell[inside], return_counts=True)
    pair_site, pair_cell = pair // n_cells, pair % n_cells
    fraction = n_points / per_site[pair_site]

    # Every (site, cell) pair takes the site's entries scaled by the covered fraction.
    pair_nnz = nnz[pair_site]
    pair_of_entry = np.repeat(np.arange(pair.size), pair_nnz)
    first = np.cumsum(pair_nnz) - pair_nnz
    entry = _starts(nnz)[pair_site][pair_of_entry] + np.arange(pair_of_entry.size) - first[pair_of_entry]
    value = count[entry].astype(np.float64) * fraction[pair_of_entry]
    occupied, offsets, gene, weight = _normalise(pair_cell[pair_of_entry], gene[entry], value, n_cells)

    tile = np.searchsorted(cell_start, occupied, side="right") - 1
    local, side = occupied - cell_start[tile], sides[tile]
    row, col = local // n_cols[tile], local % n_cols[tile]
    cx = (col * side + np.minimum((col + 1) * side, w)) / 2
    cy = (row * side + np.minimum((row + 1) * side, h)) / 2
    return _split(occupied, offsets, gene, weight, cell_start, np.stack([cx, cy], axis=1), resolutions)
