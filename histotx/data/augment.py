"""DINOv2 multi-crop in which the transcripts move with the tissue.

Every geometric step applied to a crop's pixels — crop box, resize, flips, quarter turns — is applied to
the transcript sites' positions by the same :class:`CropGeometry`, so a site stays over the tissue it
was measured on and the tokens later made from it sit on the right patches. Colour and stain jitter
touch the image only. All randomness comes from the ``numpy.random.Generator`` passed in, so a sample's
views are a function of its seed (needed for exact resume).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from histotx.data.config import RESIZE_ANTIALIAS, RESIZE_MODE, AugmentConfig
from histotx.data.opencv import cv2
from histotx.data.pixels import IDENTITY, normalise, render_views
from histotx.format import TileSample, TranscriptGrid, decode_image_rgb


@dataclass
class View:
    """One crop: its transcript sites in view pixels, its µm per pixel, and how its pixels are made —
    cut from ``source`` by ``geometry``, coloured by ``colour`` — or, once made, the normalised ``image``.
    The loader leaves ``image`` to the batch (:func:`histotx.data.pixels.render`, all views at once)."""

    image: torch.Tensor | None  # [3, S, S] float32
    grid: TranscriptGrid
    mpp: float
    size: int
    geometry: CropGeometry
    colour: np.ndarray  # [len(pixels.COLOUR_FIELDS)] float64
    source: torch.Tensor | bytes | None = None  # the tile: [3, H, W] uint8 pixels, or its JPEG bytes


@dataclass
class TileViews:
    """All views of one tile: the 2 global crops (teacher and student) and the local crops (student)."""

    key: str
    globals: list[View]
    locals: list[View]


_CV2_TURNS = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}
"""np.rot90's k counter-clockwise quarter turns as OpenCV's rotations."""


@dataclass(frozen=True)
class CropGeometry:
    """Crop box ``[left, left+width) × [top, top+height)`` of the tile, resized to ``size``², then
    flipped (horizontal, vertical) and turned by ``quarter_turns`` × 90° counter-clockwise (as np.rot90)."""

    left: int
    top: int
    width: int
    height: int
    size: int
    hflip: bool = False
    vflip: bool = False
    quarter_turns: int = 0

    def apply_to_image(self, image: torch.Tensor) -> torch.Tensor:
        """``image``: ``[C, H, W]`` tile → ``[C, size, size]`` view."""
        out = image[..., self.top : self.top + self.height, self.left : self.left + self.width]
        if (self.height, self.width) != (self.size, self.size):  # torchvision's resized_crop, less its overhead
            native = image.dtype != torch.uint8 or image.device.type == "cpu"  # uint8 kernel: CPU only
            x = out.reshape(-1, *out.shape[-3:])
            x = F.interpolate(
                x if native else x.float(),
                size=(self.size, self.size),
                mode=RESIZE_MODE,
                align_corners=False,
                antialias=RESIZE_ANTIALIAS,
            )
            out = (x if native else x.round_().to(image.dtype)).reshape(*out.shape[:-2], self.size, self.size)
        if self.hflip:
            out = out.flip(-1)
        if self.vflip:
            out = out.flip(-2)
        return torch.rot90(out, self.quarter_turns, dims=(-2, -1)) if self.quarter_turns else out

    def apply_to_hwc(self, image: np.ndarray) -> np.ndarray:
        """:meth:`apply_to_image` for an ``[H, W, C]`` uint8 array (the CPU loader's layout): the same
        pixels, contiguous, about twice as fast (torch's channels-last uint8 resize kernel, OpenCV's flips
        and quarter turns, which only move bytes)."""
        out = image[self.top : self.top + self.height, self.left : self.left + self.width]
        if (self.height, self.width) != (self.size, self.size):
            h, w, c = out.shape  # as [1, C, h, w] with channels-last strides, which the kernel keeps
            x = torch.from_numpy(np.ascontiguousarray(out)).as_strided((1, c, h, w), (h * w * c, 1, w * c, c))
            x = F.interpolate(
                x, size=(self.size, self.size), mode=RESIZE_MODE, align_corners=False, antialias=RESIZE_ANTIALIAS
            )
            out = x[0].permute(1, 2, 0).numpy()
        out = np.ascontiguousarray(out)
        if self.hflip or self.vflip:
            out = cv2.flip(out, -1 if self.hflip and self.vflip else 1 if self.hflip else 0)
        if self.quarter_turns % 4:
            out = cv2.rotate(out, _CV2_TURNS[self.quarter_turns % 4])
        return out

    def apply_to_xy(self, xy: np.ndarray) -> np.ndarray:
        """Tile pixel positions (x right, y down, continuous) → view pixel positions (float32, computed
        in float64)."""
        s = float(self.size)
        x = (xy[:, 0].astype(np.float64) - self.left) * (s / self.width)
        y = (xy[:, 1].astype(np.float64) - self.top) * (s / self.height)
        if self.hflip:
            x = s - x
        if self.vflip:
            y = s - y
        for _ in range(self.quarter_turns % 4):  # a counter-clockwise quarter turn of an S×S image
            x, y = y, s - x
        return np.stack([x, y], axis=1).astype(np.float32)

    def _params(self) -> tuple:
        return self.left, self.top, self.width, self.height, self.size, self.hflip, self.vflip, self.quarter_turns

    def mpp(self, tile_mpp: float) -> float:
        """µm per view pixel (geometric mean over the axes when the crop's aspect was jittered)."""
        return tile_mpp * math.sqrt(self.width * self.height) / self.size


def transform_grid(grid: TranscriptGrid, geometry: CropGeometry, tile_mpp: float) -> TranscriptGrid:
    """Sites whose footprint overlaps the crop, moved into the view's pixel frame.

    A spot whose centre lies just outside the crop but whose disk reaches into it is kept: binning
    assigns it only the share of its footprint inside the view.
    """
    return transform_grids(grid, [geometry], tile_mpp)[0]


def transform_grids(grid: TranscriptGrid, geometries: list[CropGeometry], tile_mpp: float) -> list[TranscriptGrid]:
    """:func:`transform_grid` for many crops of one tile, in one pass over its sites."""
    reach = 0.5 * grid.footprint_um / tile_mpp if grid.footprint_shape != "point" else 0.0
    params = np.array([g._params() for g in geometries], dtype=np.int64)  # [crops, 8]
    left, top, width, height = (params[:, i : i + 1] for i in range(4))
    right, bottom = left + width, top + height
    x, y = grid.xy[:, 0], grid.xy[:, 1]
    keep = (x + reach >= left) & (x - reach < right) & (y + reach >= top) & (y - reach < bottom)  # [crops, sites]
    kept = grid.select_many(keep)
    for k, g in zip(kept, geometries, strict=True):
        k.xy = g.apply_to_xy(k.xy)
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
