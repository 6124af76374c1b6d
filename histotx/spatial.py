"""Tiles as spots for scverse: ``obsm["spatial"]`` and ``uns["spatial"]`` in the Visium convention.

scanpy (``sc.pl.spatial``) and squidpy (``sq.pl.spatial_scatter``, ``sq.gr.spatial_neighbors``) read a
spatial AnnData as 10x's Space Ranger output is read by ``sc.read_visium``:

- ``obsm["spatial"]``: (n, 2) float, the centre of each spot (here: each tile) in full-resolution (level-0)
  pixels, x then y;
- ``uns["spatial"][library_id]``: ``images`` (``hires``, ``lowres``: RGB uint8 pictures of the slide) and
  ``scalefactors``: ``tissue_hires_scalef`` / ``tissue_lowres_scalef`` (image px per level-0 px) and
  ``spot_diameter_fullres`` (level-0 px). A tile is a square; its "spot" is the inscribed circle
  (diameter = the tile side), so neighbouring tiles' circles touch and ``sc.pl.spatial`` tiles the tissue.

:class:`TileMosaic` pictures a slide from its tiles alone (a shard set travels without its slides): each
tile shrunk onto a white canvas at its place. With the slide at hand, its own thumbnail is used instead.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

HIRES_MAX_PX = 2000
"""Longest side of the ``hires`` image (Space Ranger's tissue_hires_image.png is 2000 px)."""
LOWRES_MAX_PX = 600
"""Longest side of the ``lowres`` image (Space Ranger's tissue_lowres_image.png is 600 px)."""


def tile_centres(origins_level0: np.ndarray, size_level0: float) -> np.ndarray:
    """(n, 2) float64 centres (x, y) of square tiles from their top-left corners, all in level-0 px."""
    return np.asarray(origins_level0, dtype=np.float64).reshape(-1, 2) + float(size_level0) / 2.0


def shrink_image(rgb: np.ndarray, max_px: int) -> tuple[np.ndarray, float]:
    """``rgb`` shrunk (area average) so its longest side is ≤ ``max_px``; (image, its scale to the input)."""
    h, w = rgb.shape[:2]
    scale = min(1.0, max_px / max(h, w, 1))
    if scale >= 1.0:
        return np.ascontiguousarray(rgb, dtype=np.uint8), 1.0
    import cv2

    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    out = cv2.resize(np.ascontiguousarray(rgb, dtype=np.uint8), size, interpolation=cv2.INTER_AREA)
    return out, size[0] / w


def visium_spatial(
    image: np.ndarray, level0_per_px: float, spot_diameter_level0: float, metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One library's ``uns["spatial"]`` entry from a picture of the slide (``level0_per_px``: level-0 px per
    image px): ``hires`` (≤ 2000 px) and ``lowres`` (≤ 600 px) images with their scale factors."""
    if not level0_per_px > 0:
        raise ValueError(f"level0_per_px must be positive, got {level0_per_px}")
    hires, s_hi = shrink_image(image, HIRES_MAX_PX)
    lowres, s_lo = shrink_image(hires, LOWRES_MAX_PX)
    hires_scalef = s_hi / level0_per_px
    entry: dict[str, Any] = {
        "images": {"hires": hires, "lowres": lowres},
        "scalefactors": {
            "tissue_hires_scalef": float(hires_scalef),
            "tissue_lowres_scalef": float(hires_scalef * s_lo),
            "spot_diameter_fullres": float(spot_diameter_level0),
            "fiducial_diameter_fullres": float(spot_diameter_level0),
        },
    }
    if metadata:
        entry["metadata"] = dict(metadata)
    return entry


def mosaic_side(n_tiles: int, tile_px: int) -> int:
    """Side of each tile's thumbnail so ``n_tiles`` tiles make a picture about :data:`HIRES_MAX_PX` across
    (4 px to ``tile_px``; ≤ 16 px beyond 15,000 tiles, so the thumbnails of 100,000 tiles take ≤ 77 MB)."""
    return int(np.clip(round(HIRES_MAX_PX / math.sqrt(max(int(n_tiles), 1))), 4, max(4, int(tile_px))))


def mosaic_thumb(rgb: np.ndarray, side: int) -> np.ndarray:
    """A tile shrunk (area average) to ``side`` × ``side`` px for :class:`TileMosaic`."""
    import cv2

    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.shape[0] == side and rgb.shape[1] == side:
        return rgb
    return cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA)


class TileMosaic:
    """A slide pictured from its tiles: each tile's thumbnail (:func:`mosaic_thumb`) at its place on a white
    canvas. Memory: the thumbnails until :meth:`image` pastes them."""

    def __init__(self, side: int) -> None:
        self.side = int(side)
        self._thumbs: list[tuple[float, float, np.ndarray]] = []
        self.size0: float | None = None

    def add(self, thumb: np.ndarray, x0: float, y0: float, size0: float) -> None:
        """``thumb``: the tile at ``side`` px; (``x0``, ``y0``) its top-left corner, ``size0`` its side (level-0 px)."""
        if thumb.shape[:2] != (self.side, self.side):
            raise ValueError(f"a mosaic thumbnail must be {self.side}×{self.side} px, got {thumb.shape[:2]}")
        if self.size0 is None:
            self.size0 = float(size0)
        self._thumbs.append((float(x0), float(y0), thumb))

    def image(self) -> tuple[np.ndarray, float]:
        """(RGB uint8 canvas, level-0 px per canvas px); the canvas covers (0, 0) to the farthest tile corner."""
        if not self._thumbs:
            return np.full((1, 1, 3), 255, np.uint8), 1.0
        per_px = self.size0 / self.side  # level-0 px per canvas px
        xs = np.array([t[0] for t in self._thumbs])
        ys = np.array([t[1] for t in self._thumbs])
        w = int(math.ceil((max(xs.max(), 0) + self.size0) / per_px))
        h = int(math.ceil((max(ys.max(), 0) + self.size0) / per_px))
        canvas = np.full((h, w, 3), 255, np.uint8)
        for x0, y0, thumb in self._thumbs:
            cx, cy = int(round(x0 / per_px)), int(round(y0 / per_px))
            ax, ay = max(cx, 0), max(cy, 0)  # a tile reaching past the slide's top or left edge is cut there
            bx, by = min(cx + self.side, w), min(cy + self.side, h)
            if bx > ax and by > ay:
                canvas[ay:by, ax:bx] = thumb[ay - cy : by - cy, ax - cx : bx - cx]
        return canvas, per_px
