"""H&E-like rendering of a synthetic tissue at a slide's level 0, and co-registration markers.

Pink eosin background with a texture per region type, purple nuclei drawn at the cells' positions
(density, size, shape and darkness per region, density scaled by the tissue's crowding), white glass
outside the tissue. The eosin shade is set point by point so that the expected colour (eosin and nuclei
together) is MEAN_RGB everywhere in the tissue: mean colour tells nothing about region or crowding, so a
model must see the nuclei and textures (morphology) to predict what they drive. Rendered in
horizontal stripes so memory stays bounded for benchmark-size slides; nothing random is drawn per
stripe, so the image does not depend on the stripe height.
"""

from __future__ import annotations

import numpy as np

from histotx.synth.tissue import CELL_DENSITY, NUCLEUS_ELONGATION, NUCLEUS_RADIUS_UM, REGIONS, Cells, Tissue

BACKGROUND = np.array([244.0, 242.0, 246.0], dtype=np.float32)
MEAN_RGB = np.array([196.0, 136.0, 186.0], dtype=np.float32)  # expected colour of tissue, every region
HAEMATOXYLIN = np.array([88.0, 52.0, 138.0], dtype=np.float32)  # nuclei, every region
# Per region (order of REGIONS): nucleus opacity, texture amplitudes.
NUCLEUS_OPACITY = np.array([0.72, 0.85, 0.95, 0.75], dtype=np.float32)
FIBRE_AMP = np.array([0.03, 0.12, 0.02, 0.05], dtype=np.float32)
GRAIN_AMP = np.array([0.06, 0.03, 0.05, 0.07], dtype=np.float32)
EDGE_WIDTH = 0.03  # mask-field units over which the tissue edge fades into the glass

MARKER_RGB = (0, 255, 0)
MARKER_RADIUS_PX = 3.0
_SIZES = np.array([0.85, 1.0, 1.15])
_ANGLES = 8


def _nucleus_bank(mpp: float) -> tuple[list[np.ndarray], int]:
    """Soft elliptical nucleus stamps (opacity included) per (region, size, angle), and their half-width in px."""
    half = int(np.ceil(NUCLEUS_RADIUS_UM.max() * _SIZES.max() * np.sqrt(NUCLEUS_ELONGATION.max()) / mpp)) + 1
    v, u = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    bank = []
    for r in range(len(REGIONS)):
        e = np.sqrt(NUCLEUS_ELONGATION[r])
        for s in _SIZES:
            a = NUCLEUS_RADIUS_UM[r] * s * e / mpp
            b = NUCLEUS_RADIUS_UM[r] * s / e / mpp
            for k in range(_ANGLES):
                t = np.pi * k / _ANGLES
                p = u * np.cos(t) + v * np.sin(t)
                q = -u * np.sin(t) + v * np.cos(t)
                rho = np.sqrt((p / a) ** 2 + (q / b) ** 2)
                bank.append((np.clip((1.0 - rho) * b + 0.5, 0.0, 1.0) * NUCLEUS_OPACITY[r]).astype(np.float32))
    return bank, half


def _eosin(bank: list[np.ndarray], mpp: float, region: np.ndarray, density: np.ndarray) -> np.ndarray:
    """Eosin colour (…, 3) that makes the expected colour MEAN_RGB given the expected nucleus cover.

    A region's nuclei, drawn by taking the most opaque stamp, cover an expected share
    o·(1 − exp(−ρ·a)) of the tissue at ρ cells/µm² (opacity o, nucleus area a: a Boolean model); the
    expected colour is then eosin·(1 − cover) + HAEMATOXYLIN·cover.
    """
    per_region = len(bank) // len(REGIONS)
    alpha_um2 = (
        np.array([np.mean([b.sum() for b in bank[r * per_region : (r + 1) * per_region]]) for r in range(len(REGIONS))])
        * mpp**2
    )  # ∫ opacity over one nucleus, µm²
    o = NUCLEUS_OPACITY.take(region)
    cover = (o * (1.0 - np.exp(-density * alpha_um2.take(region) / o)))[..., None]
    return ((MEAN_RGB - HAEMATOXYLIN * cover) / (1.0 - cover)).astype(np.float32)


def _stamp_index(cells: Cells) -> np.ndarray:
    size = np.argmin(np.abs(cells.radius_um[:, None] / NUCLEUS_RADIUS_UM[cells.region][:, None] - _SIZES), axis=1)
    angle = np.round(cells.angle / np.pi * _ANGLES).astype(int) % _ANGLES
    return (cells.region.astype(int) * len(_SIZES) + size) * _ANGLES + angle


def render_he(
    tissue: Tissue, cells: Cells, width: int, height: int, mpp: float, seed: int, stripe: int = 256
) -> np.ndarray:
    """The level-0 RGB image (height, width, 3) uint8; pixel (i, j) shows the tissue at ((i+½)·mpp, (j+½)·mpp) µm.

    The tissue's own fields decide colour and texture; ``seed`` only drives the pixel noise.
    """
    out = np.empty((height, width, 3), dtype=np.uint8)
    xs = (np.arange(width) + 0.5) * mpp
    step = max(1, int(2.0 / mpp))
    stripe = max(step, stripe // step * step)
    bank, half = _nucleus_bank(mpp)
    stamp = _stamp_index(cells)
    cx = np.floor(cells.xy_um[:, 0] / mpp).astype(np.int64)
    cy = np.floor(cells.xy_um[:, 1] / mpp).astype(np.int64)
    order = np.argsort(cy, kind="stable")
    cx, cy, stamp = cx[order], cy[order], stamp[order]
    # Pixel noise (sensor grain) from a block of rows that repeats down the slide: cheap, and invisible.
    noise = np.random.default_rng(seed).standard_normal((min(height, 512), width), dtype=np.float32) * 3.0
    for y0 in range(0, height, stripe):
        y1 = min(height, y0 + stripe)
        h = y1 - y0
        ys = (np.arange(y0, y1) + 0.5) * mpp
        # Region boundaries are smooth on a 100 µm scale: a ~2 µm raster repeated to pixels is enough.
        region = tissue.region_raster(xs[::step], ys[::step])
        eosin = _eosin(bank, mpp, region, CELL_DENSITY.take(region) * tissue.crowding.raster(xs[::step], ys[::step]))
        region = np.repeat(np.repeat(region, step, axis=0), step, axis=1)[:h, :width]
        eosin = np.repeat(np.repeat(eosin, step, axis=0), step, axis=1)[:h, :width]
        edge = np.clip(tissue.mask.raster(xs, ys) / EDGE_WIDTH + 0.5, 0.0, 1.0)
        # np.take: several times faster than fancy indexing for these small lookup tables.
        texture = (
            1.0
            + FIBRE_AMP.take(region) * tissue.fibres.raster(xs, ys)
            + GRAIN_AMP.take(region) * tissue.grain.raster(xs, ys)
        )
        # Nuclei: the most opaque stamp wins where two overlap.
        # Padded by 2·half so stamps of cells just above/below the stripe fit; stamp (y, x) covers padded
        # rows y - y0 + half … y - y0 + 3·half.
        nuclei = np.zeros((h + 4 * half, width + 4 * half), dtype=np.float32)
        lo, hi = np.searchsorted(cy, [y0 - half, y1 + half])
        for x, y, k in zip(cx[lo:hi], cy[lo:hi], stamp[lo:hi], strict=True):
            win = nuclei[y - y0 + half : y - y0 + 3 * half + 1, x + half : x + 3 * half + 1]
            np.maximum(win, bank[k], out=win)
        nuclei = nuclei[2 * half : 2 * half + h, 2 * half : 2 * half + width]
        rgb = eosin * texture[..., None]
        rgb += (HAEMATOXYLIN - rgb) * nuclei[..., None]
        rgb -= BACKGROUND
        rgb *= edge[..., None]
        rgb += BACKGROUND
        rgb += noise[(y0 + np.arange(h)) % len(noise), :, None]
        out[y0:y1] = np.clip(rgb, 0, 255).astype(np.uint8)
    return out


def paint_markers(image: np.ndarray, xy_px: np.ndarray, radius: float = MARKER_RADIUS_PX) -> None:
    """Paint saturated green disks centred at continuous (x, y) positions, in place.

    Pixel (i, j) covers [i, i+1) × [j, j+1), so it is painted when its centre (i+½, j+½) lies within
    ``radius`` of the position: the disk's centroid is the position itself.
    """
    h, w = image.shape[:2]
    reach = int(np.ceil(radius)) + 1
    for x, y in np.asarray(xy_px, dtype=np.float64).reshape(-1, 2):
        i0, j0 = max(int(np.floor(x)) - reach, 0), max(int(np.floor(y)) - reach, 0)
        i1, j1 = min(int(np.floor(x)) + reach + 1, w), min(int(np.floor(y)) + reach + 1, h)
        if i0 >= i1 or j0 >= j1:
            continue
        jj, ii = np.mgrid[j0:j1, i0:i1]
        disk = (ii + 0.5 - x) ** 2 + (jj + 0.5 - y) ** 2 <= radius**2
        image[j0:j1, i0:i1][disk] = MARKER_RGB
