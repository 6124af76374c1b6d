"""The synthetic tissue: where tissue is, which region type each point belongs to, how crowded its cells
are, a hidden state, and cells.

Everything is defined in micrometres on the slide plane, so the same tissue is read identically by the
renderer (a raster per pixel) and by the expression model (points at spots, bins or cells). Regions
differ in nuclear density, size, shape and texture, and a smooth crowding field scales the cell
density within every region; both are visible only as morphology (the renderer keeps the mean colour
the same everywhere). The hidden state is never rendered: it modulates a gene program that the image
alone cannot predict.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

REGIONS = ("tumour", "stroma", "immune", "vessel")
# Cells per µm² and nucleus radius (µm) per region: what makes regions look different besides colour.
CELL_DENSITY = np.array([0.0050, 0.0015, 0.0080, 0.0025])
NUCLEUS_RADIUS_UM = np.array([3.6, 2.4, 2.2, 2.8])
NUCLEUS_ELONGATION = np.array([1.3, 2.6, 1.1, 1.8])
# Local cell density = CELL_DENSITY[region] × crowding, crowding = exp(CROWDING_SD · smooth noise) within
# CROWDING_RANGE, varying over CROWDING_SCALE_UM (about a Visium spot pitch).
CROWDING_SD = 0.45
CROWDING_RANGE = (0.5, 2.0)
CROWDING_SCALE_UM = 50.0


@dataclass
class Field:
    """A smooth scalar field sampled on a grid of nodes ``step_um`` apart, read by bilinear interpolation.

    Node (j, i) sits at (i·step, j·step) µm. A periodic field wraps around (used for fine textures, so
    their cost does not grow with the slide).
    """

    grid: np.ndarray
    step_um: float
    periodic: bool = False

    def _axis(self, coord_um: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        f = np.asarray(coord_um, dtype=np.float64) / self.step_um
        if self.periodic:
            i0 = np.floor(f)
            t = (f - i0).astype(np.float32)
            i0 = i0.astype(np.int64) % n
            return i0, (i0 + 1) % n, t
        i0 = np.clip(np.floor(f), 0, n - 2).astype(np.int64)
        t = np.clip(f - i0, 0.0, 1.0).astype(np.float32)
        return i0, i0 + 1, t

    def at(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Values at points (same shape as x_um)."""
        ny, nx = self.grid.shape
        i0, i1, tx = self._axis(x_um, nx)
        j0, j1, ty = self._axis(y_um, ny)
        g = self.grid
        top = g[j0, i0] * (1 - tx) + g[j0, i1] * tx
        bottom = g[j1, i0] * (1 - tx) + g[j1, i1] * tx
        return top * (1 - ty) + bottom * ty

    def raster(self, xs_um: np.ndarray, ys_um: np.ndarray) -> np.ndarray:
        """Values on the grid ys × xs, computed separably (rows first), shape (len(ys), len(xs))."""
        ny, nx = self.grid.shape
        j0, j1, ty = self._axis(ys_um, ny)
        rows = self.grid.take(j0, axis=0) * (1 - ty)[:, None] + self.grid.take(j1, axis=0) * ty[:, None]
        i0, i1, tx = self._axis(xs_um, nx)
        return rows.take(i0, axis=1) * (1 - tx) + rows.take(i1, axis=1) * tx


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma, periodic: bool = False) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    g = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap" if periodic else "reflect")
    return (g - g.mean()) / (g.std() + 1e-12)


@dataclass
class Tissue:
    """A tissue section of ``width_um`` × ``height_um``: mask, region types, hidden state, textures."""

    width_um: float
    height_um: float
    mask: Field  # > 0 inside tissue
    regions: list[Field]  # region type = argmax over these
    hidden: Field  # in (0, 1); modulates the hidden gene program, never drawn
    fibres: Field  # anisotropic texture (stroma-like), periodic
    grain: Field  # isotropic fine texture, periodic
    crowding: Field  # multiplies the region's cell density (CROWDING_RANGE)

    @classmethod
    def random(cls, rng: np.random.Generator, width_um: float, height_um: float, step_um: float = 10.0) -> "Tissue":
        nx = int(np.ceil(width_um / step_um)) + 2
        ny = int(np.ceil(height_um / step_um)) + 2
        yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32) * step_um
        # An irregular section: an ellipse covering most of the slide, its edge roughened by noise,
        # leaving a white margin all around so a tissue mask has something to find.
        ex = (xx - width_um / 2) / (0.40 * width_um)
        ey = (yy - height_um / 2) / (0.40 * height_um)
        envelope = 1.0 - ex**2 - ey**2
        mask = envelope + 0.30 * smooth_noise(rng, (ny, nx), 150.0 / step_um)
        regions = [Field(smooth_noise(rng, (ny, nx), 110.0 / step_um), step_um) for _ in REGIONS]
        hidden = 1.0 / (1.0 + np.exp(-1.8 * smooth_noise(rng, (ny, nx), 180.0 / step_um)))
        fine = 1.5  # µm between texture nodes
        fibres = smooth_noise(rng, (384, 384), (0.6, 4.0), periodic=True)
        grain = smooth_noise(rng, (384, 384), 0.8, periodic=True)
        crowding = np.clip(
            np.exp(CROWDING_SD * smooth_noise(rng, (ny, nx), CROWDING_SCALE_UM / step_um)), *CROWDING_RANGE
        )
        return cls(
            width_um,
            height_um,
            Field(mask.astype(np.float32), step_um),
            regions,
            Field(hidden.astype(np.float32), step_um),
            Field(fibres, fine, periodic=True),
            Field(grain, fine, periodic=True),
            Field(crowding.astype(np.float32), step_um),
        )

    def in_tissue(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        return self.mask.at(x_um, y_um) > 0

    def region_at(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        return np.argmax(np.stack([f.at(x_um, y_um) for f in self.regions]), axis=0).astype(np.int8)

    def hidden_at(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        return self.hidden.at(x_um, y_um)

    def density_at(self, x_um: np.ndarray, y_um: np.ndarray, region: np.ndarray) -> np.ndarray:
        """Expected cells per µm² (``region`` from :meth:`region_at` at the same points)."""
        return CELL_DENSITY[region] * self.crowding.at(x_um, y_um)

    def region_raster(self, xs_um: np.ndarray, ys_um: np.ndarray) -> np.ndarray:
        return np.argmax(np.stack([f.raster(xs_um, ys_um) for f in self.regions]), axis=0).astype(np.int8)


@dataclass
class Cells:
    """Cells (one nucleus each) in µm; the renderer draws their nuclei, the expression model their RNA."""

    xy_um: np.ndarray  # (n, 2)
    region: np.ndarray  # (n,) int8
    hidden: np.ndarray  # (n,) float32
    radius_um: np.ndarray  # (n,) nucleus radius
    angle: np.ndarray  # (n,) nucleus orientation, radians
    density: np.ndarray  # (n,) expected cells per µm² where the cell sits (region × crowding)

    def __len__(self) -> int:
        return int(self.xy_um.shape[0])

    @classmethod
    def sample(cls, rng: np.random.Generator, tissue: Tissue) -> "Cells":
        """Poisson process thinned to the local density (region × crowding), inside the tissue only."""
        top = CELL_DENSITY.max() * CROWDING_RANGE[1]
        n = rng.poisson(top * tissue.width_um * tissue.height_um)
        xy = rng.random((n, 2)) * np.array([tissue.width_um, tissue.height_um])
        region = tissue.region_at(xy[:, 0], xy[:, 1])
        density = tissue.density_at(xy[:, 0], xy[:, 1], region)
        keep = tissue.in_tissue(xy[:, 0], xy[:, 1]) & (rng.random(n) < density / top)
        xy, region, density = xy[keep], region[keep], density[keep]
        radius = NUCLEUS_RADIUS_UM[region] * rng.uniform(0.8, 1.2, len(xy))
        angle = rng.uniform(0, np.pi, len(xy))
        hidden = tissue.hidden_at(xy[:, 0], xy[:, 1]).astype(np.float32)
        return cls(xy, region, hidden, radius, angle, density.astype(np.float32))
