"""DINOv2 multi-crop in which the transcripts move with the tissue.

Every geometric step applied to a crop's pixels — crop box, resize, flips, quarter turns — is applied to
the transcript sites' positions by the same :class:`CropGeometry`, so a site stays over the tissue it
was measured on and the tokens later made from it sit on the right patches. Colour and stain jitter
touch the image only. All randomness comes from the ``numpy.random.Generator`` passed in, so a sample's
views are a function of its seed (needed for exact resume).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from histotx.data.config import AugmentConfig
from histotx.data.pixels import IDENTITY, normalise, render_views
from histotx.data.views import CropGeometry, TileViews, View
from histotx.format import TileSample, TranscriptGrid, decode_image_rgb


def transform_grid(grid: TranscriptGrid, geometry: CropGeometry, tile_mpp: float) -> TranscriptGrid:
    """Sites whose footprint overlaps the crop, moved into the view's pixel frame.

    A spot whose centre lies just outside the crop but whose disk reaches into it is kept: binning
    assigns it only the share of its footprint inside the view.
    """
    return transform_grids(grid, [geometry], tile_mpp)[0]


def transform_grids(grid: TranscriptGrid, geometries: list[CropGeometry], tile_mpp: float) -> list[TranscriptGrid]:
    """:func:`transform_grid` for many crops of one tile, in one pass over its sites."""
    reach = 0.5 * grid.footprint_um / tile_mpp if grid.footprint_shape != "point" else 0.0
    angle = grid.footprint_angle_deg
    if grid.footprint_shape == "square" and angle:  # a turned square reaches out to its corners' bounding box
        reach *= abs(math.cos(math.radians(angle))) + abs(math.sin(math.radians(angle)))
    params = np.array([g._params() for g in geometries], dtype=np.int64)  # [crops, 8]
    left, top, width, height = (params[:, i : i + 1] for i in range(4))
    right, bottom = left + width, top + height
    x, y = grid.xy[:, 0], grid.xy[:, 1]
    keep = (x + reach >= left) & (x - reach < right) & (y + reach >= top) & (y - reach < bottom)  # [crops, sites]
    kept = grid.select_many(keep)
    for k, g in zip(kept, geometries, strict=True):
        k.xy = g.apply_to_xy(k.xy)
        if angle and g.hflip != g.vflip:  # a mirror turns a footprint's angle the other way; quarter turns keep
            k.footprint_angle_deg = -angle  # a square's (its symmetry), and both flips are a half turn
    return kept


def crop_boxes(
    rng: np.random.Generator,
    height: int,
    width: int,
    scales: np.ndarray,
    ratio: tuple[float, float],
    attempts: int = 10,
) -> np.ndarray:
    """``[n, 4]`` (left, top, width, height) of random-resized crops, one per row of ``scales`` (``[n, 2]``,
    the range of the crop's share of the tile's area): torchvision's RandomResizedCrop draw — up to 10
    tries of an area share and a log-uniform aspect in ``ratio``, the first that fits — for all crops at
    once, and where none fits, the largest centred crop of an aspect inside the range."""
    scales = np.asarray(scales, dtype=np.float64)
    n = scales.shape[0]
    target = height * width * rng.uniform(scales[:, :1], scales[:, 1:], (n, attempts))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, attempts)))
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)  # (rint: Python's round, halves to even)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(axis=1)
    w, h = w[np.arange(n), first], h[np.arange(n), first]
    left, top = rng.integers(0, width - np.minimum(w, width) + 1), rng.integers(0, height - np.minimum(h, height) + 1)
    none = ~fits.any(axis=1)
    if none.any():
        fw, fh = width, height
        if width / height < ratio[0]:
            fh = int(round(width / ratio[0]))
        elif width / height > ratio[1]:
            fw = int(round(height * ratio[1]))
        w[none], h[none], left[none], top[none] = fw, fh, (width - fw) // 2, (height - fh) // 2
    return np.stack([left, top, w, h], axis=1)


class MultiCrop:
    """2 global + N local co-registered views of a tile, DINOv2 style.

    Drawing (here: every view's geometry, then its colour parameters, each kind of draw made for all views
    at once from the sample's generator; the sites of all views moved in one pass) is separate from pixel work
    (:func:`histotx.data.pixels.render_views`, per batch). With ``decode_device`` "cuda" the JPEG stays
    undecoded and the GPU renders the same views per batch."""

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32)
        self.std = torch.tensor(cfg.std, dtype=torch.float32)

    def geometries(
        self, rng: np.random.Generator, tile_hw: tuple[int, int], sizes: list[int], scales: list[tuple[float, float]]
    ) -> list[CropGeometry]:
        """One crop per view (output side ``sizes[i]``, area share in ``scales[i]``): box, flips and quarter
        turn, each kind drawn for all views at once."""
        c, n = self.cfg, len(sizes)
        boxes = crop_boxes(rng, tile_hw[0], tile_hw[1], np.array(scales), c.crop_ratio).tolist()
        hflip, vflip = (rng.random(n) < c.hflip_p).tolist(), (rng.random(n) < c.vflip_p).tolist()
        turns = rng.integers(0, 4, n).tolist() if c.rot90 else [0] * n
        return [
            CropGeometry(*box, size, hf, vf, k)
            for box, size, hf, vf, k in zip(boxes, sizes, hflip, vflip, turns, strict=True)
        ]

    def colours(self, rng: np.random.Generator, blur_p: np.ndarray, solarize_p: np.ndarray) -> np.ndarray:
        """Photometric parameters of views with these blur and solarize probabilities: ``[views,
        len(pixels.COLOUR_FIELDS)]``, each kind of draw made for all views at once."""
        c, n = self.cfg, len(blur_p)
        p = np.tile(np.array(IDENTITY), (n, 1))
        jitter = rng.random(n) < c.color_jitter_p
        low = [1 - c.brightness, 1 - c.contrast, 1 - c.saturation, -c.hue]
        high = [1 + c.brightness, 1 + c.contrast, 1 + c.saturation, c.hue]
        p[jitter, 0:4] = rng.uniform(low, high, (n, 4))[jitter]
        p[jitter, 4:8] = rng.permuted(np.tile(np.arange(4.0), (n, 1)), axis=1)[jitter]  # the ops' order
        stain = rng.random(n) < c.hed_jitter_p
        p[stain, 8] = 1.0
        p[stain, 9:12] = rng.uniform(1 - c.hed_sigma, 1 + c.hed_sigma, (n, 3))[stain]
        p[stain, 12:15] = rng.uniform(-c.hed_sigma, c.hed_sigma, (n, 3))[stain]
        p[:, 15] = rng.random(n) < c.grayscale_p
        blur = rng.random(n) < blur_p
        p[blur, 16] = rng.uniform(*c.blur_sigma, n)[blur]
        p[:, 17] = rng.random(n) < solarize_p
        return p

    def __call__(self, tile: TileSample, rng: np.random.Generator) -> TileViews:
        """A shard sample's views (the loader's per-sample transform), pixels not yet made: the tile
        decoded here, or with ``decode_device`` "cuda" its JPEG bytes kept for the GPU."""
        mpp = float(tile.meta["mpp"])
        if self.cfg.decode_device != "cpu" and tile.image_ext == "jpg":
            px = int(tile.meta["tile_px"])  # decode_sample checked the header against it
            source: torch.Tensor | bytes = bytes(tile.image)
            globals_, locals_ = self.draw((px, px), tile.grid, mpp, rng)
        else:
            source = torch.from_numpy(np.require(decode_image_rgb(tile.image), np.uint8, ["C", "W"])).permute(2, 0, 1)
            globals_, locals_ = self.draw((source.shape[-2], source.shape[-1]), tile.grid, mpp, rng)
        for v in globals_ + locals_:
            v.source = source
        return TileViews(tile.key, globals_, locals_)

    def draw(
        self, tile_hw: tuple[int, int], grid: TranscriptGrid, mpp: float, rng: np.random.Generator
    ) -> tuple[list[View], list[View]]:
        """Every view's geometry, colour and sites (no pixels), in the order the generator is consumed."""
        c = self.cfg
        # (size, scale, blur probability, solarize probability) per view: 2 global crops, then the local ones
        specs = [
            (c.global_crop_size, c.global_crop_scale, c.blur_p_global1, 0.0),
            (c.global_crop_size, c.global_crop_scale, c.blur_p_global2, c.solarize_p_global2),
        ]
        specs += [(c.local_crop_size, c.local_crop_scale, c.blur_p_local, 0.0)] * c.local_crops_number
        # geometry first: the crops do not change when colour settings do
        geometries = self.geometries(rng, tile_hw, [s[0] for s in specs], [s[1] for s in specs])
        grids = transform_grids(grid, geometries, mpp)
        colours = self.colours(rng, np.array([s[2] for s in specs]), np.array([s[3] for s in specs]))
        views = [
            View(None, g_sites, g.mpp(mpp), size, g, p)
            for g, g_sites, (size, *_), p in zip(geometries, grids, specs, colours, strict=True)
        ]
        return views[:2], views[2:]

    def crops(
        self, rgb: np.ndarray, grid: TranscriptGrid, mpp: float, rng: np.random.Generator
    ) -> tuple[list[View], list[View]]:
        """Views with their pixels made. ``rgb``: H×W×3 uint8 tile; ``grid``: its sites in tile pixels;
        ``mpp``: µm per tile pixel."""
        tile = torch.from_numpy(np.require(rgb, np.uint8, ["C", "W"])).permute(2, 0, 1)
        globals_, locals_ = self.draw((tile.shape[-2], tile.shape[-1]), grid, mpp, rng)
        for views in (globals_, locals_):
            images = render_views(views, [tile], self.mean, self.std)
            for v, image in zip(views, normalise(images, self.mean, self.std), strict=True):
                v.image = image
        return globals_, locals_
