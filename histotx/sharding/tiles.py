"""Which tiles to cut, which sites fall under each, and the pixels of each tile.

Tiles are cut from one pyramid level, optionally reduced by 2/4/8 (:class:`TileGeometry`), on a grid of
whole pixels of that reduced level: a tile is an integer ``size_px`` square there, resized to ``tile_px``
(or cut 1:1 when ``size_px == tile_px``), so every tile is an exact region and resizing needs no sub-pixel
box. Its µm/px is therefore ``size_px · read_mpp / tile_px``, within ½ px (≤ 0.3 % at 256 px) of the
configured ``mpp``, and stored in each tile's metadata. In level-0 px a tile spans
``size0 = tile_px · mpp / slide.mpp``; a site at level-0 (x, y) lands in the tile with origin (ox, oy) at
tile px ((x − ox) / s, (y − oy) / s) with s = size0 / tile_px — the resizer's own map.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np

from histotx.sharding.config import ShardConfig
from histotx.sharding.slides import Slide, resize_pixels
from histotx.sharding.tissue import TissueMap


@dataclass
class TilePlan:
    names: list[str]  # key suffixes, e.g. r00012_c00040 or spot000123
    origins: np.ndarray  # (n, 2) float64 level-0 (x, y) of each tile's top-left corner
    rows: np.ndarray  # (n,) grid row, or -1 for spot-centred tiles (never stitched into stripes)
    cols: np.ndarray
    tissue: np.ndarray  # (n,) tissue fraction
    size0: float  # tile side in level-0 px

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, idx: np.ndarray) -> "TilePlan":
        idx = np.sort(np.asarray(idx, dtype=np.int64))
        return TilePlan(
            [self.names[i] for i in idx],
            self.origins[idx],
            self.rows[idx],
            self.cols[idx],
            self.tissue[idx],
            self.size0,
        )


@dataclass(frozen=True)
class TileGeometry:
    level: int  # pyramid level read
    reduce: int  # ... reduced by this factor (1, 2, 4, 8) while decoding
    size_px: int  # tile side in px of that reduced level (== tile_px: cut 1:1)
    mpp: float  # µm/px of the output tiles
    size0: float  # tile side in level-0 px

    def read_px(self, slide: Slide, x0: float, y0: float) -> tuple[int, int]:
        """Level-0 (x, y) in whole px of the reduced level read (tile origins lie on them exactly)."""
        lv = slide.levels[self.level]
        return round(x0 / (lv.downsample_x * self.reduce)), round(y0 / (lv.downsample_y * self.reduce))


def tile_geometry(slide: Slide, cfg: ShardConfig) -> TileGeometry:
    """Read from the coarsest level at least as fine as the target, reduced inside the decoder by the largest
    of 2, 4, 8 that still leaves it at least as fine (``decode_reduce``); a read resolution within
    ``snap_tolerance`` of the target is cut 1:1 (no resizing) and the tiles carry its exact µm/px."""
    level = slide.best_level(cfg.mpp, tolerance=cfg.snap_tolerance)
    level_mpp = slide.level_mpp(level)
    reduce = 1
    while cfg.decode_reduce and reduce < 8 and level_mpp * reduce * 2 <= cfg.mpp * (1 + cfg.snap_tolerance):
        reduce *= 2
    read_mpp = level_mpp * reduce
    if abs(read_mpp / cfg.mpp - 1) <= cfg.snap_tolerance:
        size_px = cfg.tile_px
    else:
        size_px = max(1, round(cfg.tile_px * cfg.mpp / read_mpp))
    mpp = size_px * read_mpp / cfg.tile_px
    return TileGeometry(level, reduce, size_px, mpp, cfg.tile_px * mpp / slide.mpp)


class SiteTiles(Protocol):
    """What ``tiling=grid_sites`` asks of a sample's sites (:class:`~histotx.sharding.sites.Sites` in memory,
    :class:`~histotx.sharding.bands.BandedSites` on disk, band by band)."""

    def occupied_tiles(self, size0: float, n_cols: int, n_rows: int) -> np.ndarray: ...


def plan_grid(
    slide: Slide, tissue: TissueMap, cfg: ShardConfig, geom: TileGeometry, sites: SiteTiles | None = None
) -> TilePlan:
    """Complete tiles of a regular grid over the whole slide, kept where tissue covers enough; with
    ``tiling=grid_sites`` also every tile holding a centre of ``sites`` (level-0 px), whatever the mask says.
    Sites on disk are asked band by band, so the whole sample is never in memory."""
    size0 = geom.size0
    n_cols, n_rows = int(slide.width // size0), int(slide.height // size0)
    rows, cols = np.divmod(np.arange(n_rows * n_cols), max(n_cols, 1))
    x0, y0 = cols * size0, rows * size0
    frac = tissue.box_fraction(x0, y0, x0 + size0, y0 + size0)
    keep = frac >= max(cfg.min_tissue_fraction, 1e-9)
    if cfg.tiling == "grid_sites" and sites is not None and n_rows * n_cols:
        keep |= sites.occupied_tiles(size0, n_cols, n_rows)
    rows, cols = rows[keep], cols[keep]
    names = [f"r{r:05d}_c{c:05d}" for r, c in zip(rows, cols, strict=True)]
    return TilePlan(names, np.stack([cols * size0, rows * size0], 1).astype(np.float64), rows, cols, frac[keep], size0)


def plan_spots(site_xy: np.ndarray, tissue: TissueMap, cfg: ShardConfig, geom: TileGeometry) -> TilePlan:
    """One tile centred on each site (HEST-style patches; within ½ px of the reduced level read), kept when
    the tile holds enough tissue."""
    size0 = geom.size0
    px0 = size0 / geom.size_px  # level-0 px per px read
    origins = np.round((np.asarray(site_xy, dtype=np.float64) - size0 / 2) / px0) * px0
    frac = tissue.box_fraction(origins[:, 0], origins[:, 1], origins[:, 0] + size0, origins[:, 1] + size0)
    keep = np.flatnonzero(frac >= cfg.min_tissue_fraction)
    minus = -np.ones(len(keep), dtype=np.int64)
    return TilePlan([f"spot{i:06d}" for i in keep], origins[keep], minus, minus, frac[keep], size0)


def sample_subset(plan: TilePlan, cfg: ShardConfig, sample_id: str) -> TilePlan:
    """A seeded random subset of tiles when ``max_tiles_per_sample`` is set (same seed → same tiles)."""
    if not cfg.max_tiles_per_sample or len(plan) <= cfg.max_tiles_per_sample:
        return plan
    rng = np.random.default_rng([cfg.seed, zlib.crc32(sample_id.encode())])
    return plan.subset(rng.choice(len(plan), cfg.max_tiles_per_sample, replace=False))


def runs(plan: TilePlan, max_tiles: int) -> Iterator[np.ndarray]:
    """Runs of neighbouring grid tiles in one row (≤ max_tiles), each read and resampled as one region;
    the slide's tile cache shares source tiles between consecutive rows. Spot tiles come one by one."""
    order = np.lexsort((plan.cols, plan.rows))
    start, n = 0, len(order)
    while start < n:
        end = start + 1
        first = order[start]
        if plan.rows[first] >= 0:
            while (
                end < n
                and end - start < max_tiles
                and plan.rows[order[end]] == plan.rows[first]
                and plan.cols[order[end]] == plan.cols[order[end - 1]] + 1
            ):
                end += 1
        yield order[start:end]
        start = end


def render_run(
    slide: Slide, geom: TileGeometry, plan: TilePlan, idx: np.ndarray, tile_px: int, resample: str = "area"
) -> list[np.ndarray]:
    """Pixels of the tiles ``idx`` (one run of a row, or one spot tile), each (tile_px, tile_px, 3) uint8: the
    run is read as one strip, each tile resized from its own square of it (so no tile depends on its run).
    Grid runs come row by row (:func:`runs`), so the slide's cache forgets the source tiles above a grid run
    (a caller going another way only costs decodes, never pixels)."""
    x, y = geom.read_px(slide, *plan.origins[idx[0]])
    n, side = len(idx), geom.size_px
    if plan.rows[idx[0]] >= 0:
        slide.forget_above(geom.level, y, geom.reduce)
    strip = slide.read_region(geom.level, x, y, n * side, side, geom.reduce)
    return [resize_pixels(strip[:, i * side : (i + 1) * side], tile_px, tile_px, resample) for i in range(n)]
