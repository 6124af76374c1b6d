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
import torchvision.transforms.v2.functional as TF

from histotx.data.config import AugmentConfig
from histotx.format import TileSample, TranscriptGrid, decode_image_rgb


_COLOUR_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


@dataclass
class View:
    """One crop: the normalised image, its transcript sites in view pixels, and its µm per pixel."""

    image: torch.Tensor  # [3, S, S] float32
    grid: TranscriptGrid
    mpp: float


@dataclass
class TileViews:
    """All views of one tile: the 2 global crops (teacher and student) and the local crops (student)."""

    key: str
    globals: list[View]
    locals: list[View]


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
        out = TF.resized_crop(image, self.top, self.left, self.height, self.width, [self.size, self.size],
                              interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        if self.hflip:
            out = out.flip(-1)
        if self.vflip:
            out = out.flip(-2)
        return torch.rot90(out, self.quarter_turns, dims=(-2, -1)) if self.quarter_turns else out

    def apply_to_xy(self, xy: np.ndarray) -> np.ndarray:
        """Tile pixel positions (x right, y down, continuous) → view pixel positions."""
        s = float(self.size)
        x = (xy[:, 0].astype(np.float64) - self.left) * (s / self.width)
        y = (xy[:, 1].astype(np.float64) - self.top) * (s / self.height)
        if self.hflip:
            x = s - x
        if self.vflip:
            y = s - y
        for _ in range(self.quarter_turns % 4):
            x, y = y, s - x  # a counter-clockwise quarter turn of an S×S image: (x, y) → (y, S − x)
        return np.stack([x, y], axis=1).astype(np.float32)

    def mpp(self, tile_mpp: float) -> float:
        """µm per view pixel (geometric mean over the axes when the crop's aspect was jittered)."""
        return tile_mpp * math.sqrt(self.width * self.height) / self.size


def select_sites(grid: TranscriptGrid, keep: np.ndarray) -> TranscriptGrid:
    """The sites where ``keep`` is True, with their CSR entries."""
    counts = np.diff(grid.offsets)
    entries = np.repeat(keep, counts)
    offsets = np.concatenate([[0], np.cumsum(counts[keep])])
    return TranscriptGrid(grid.xy[keep], offsets, grid.gene[entries], grid.count[entries], grid.footprint_um,
                          grid.footprint_shape)


def transform_grid(grid: TranscriptGrid, geometry: CropGeometry, tile_mpp: float) -> TranscriptGrid:
    """Sites whose footprint overlaps the crop, moved into the view's pixel frame.

    A spot whose centre lies just outside the crop but whose disk reaches into it is kept: binning
    assigns it only the share of its footprint inside the view.
    """
    reach = 0.5 * grid.footprint_um / tile_mpp if grid.footprint_shape != "point" else 0.0
    x, y = grid.xy[:, 0], grid.xy[:, 1]
    keep = ((x + reach >= geometry.left) & (x - reach < geometry.left + geometry.width)
            & (y + reach >= geometry.top) & (y - reach < geometry.top + geometry.height))
    kept = select_sites(grid, keep)
    kept.xy = geometry.apply_to_xy(kept.xy)
    return kept


def sample_crop_box(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
                    ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(left, top, width, height) of a random-resized crop (area share in ``scale``, aspect in ``ratio``)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    # Fallback (as torchvision): the largest centred crop with an aspect inside the range.
    aspect = width / height
    w, h = (width, height)
    if aspect < ratio[0]:
        h = int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w = int(round(height * ratio[1]))
    return (width - w) // 2, (height - h) // 2, w, h


class StainJitter:
    """Random rescaling and shifting of the H, E and DAB optical densities (Tellez et al. 2018)."""

    def __init__(self) -> None:
        from skimage.color import hed_from_rgb, rgb_from_hed

        self.hed_from_rgb = torch.as_tensor(hed_from_rgb, dtype=torch.float32)
        self.rgb_from_hed = torch.as_tensor(rgb_from_hed, dtype=torch.float32)

    def __call__(self, image: torch.Tensor, alpha: np.ndarray, beta: np.ndarray) -> torch.Tensor:
        """``image``: ``[3, H, W]`` in [0, 1]; ``alpha``/``beta``: per-stain scale and shift."""
        od = -torch.log(image.clamp_min(1e-6)).permute(1, 2, 0)  # optical density, H×W×3
        stains = od @ self.hed_from_rgb
        stains = stains * torch.as_tensor(alpha, dtype=torch.float32) + torch.as_tensor(beta, dtype=torch.float32)
        return torch.exp(-(stains @ self.rgb_from_hed)).permute(2, 0, 1).clamp(0.0, 1.0)


class MultiCrop:
    """2 global + N local co-registered views of a tile, DINOv2 style."""

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg
        self.stain = StainJitter()
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)

    def geometry(self, rng: np.random.Generator, tile_hw: tuple[int, int], size: int,
                 scale: tuple[float, float]) -> CropGeometry:
        c = self.cfg
        left, top, w, h = sample_crop_box(rng, tile_hw[0], tile_hw[1], scale, c.crop_ratio)
        return CropGeometry(left, top, w, h, size, hflip=bool(rng.random() < c.hflip_p),
                            vflip=bool(rng.random() < c.vflip_p),
                            quarter_turns=int(rng.integers(0, 4)) if c.rot90 else 0)

    def colour(self, image: torch.Tensor, rng: np.random.Generator, blur_p: float, solarize_p: float) -> torch.Tensor:
        """Photometric jitter of a ``[3, H, W]`` float image in [0, 1]."""
        c = self.cfg
        if rng.random() < c.color_jitter_p:
            factors = (rng.uniform(1 - c.brightness, 1 + c.brightness), rng.uniform(1 - c.contrast, 1 + c.contrast),
                       rng.uniform(1 - c.saturation, 1 + c.saturation), rng.uniform(-c.hue, c.hue))
            for i in rng.permutation(len(_COLOUR_OPS)):
                image = _COLOUR_OPS[i](image, float(factors[i]))
        if rng.random() < c.hed_jitter_p:
            image = self.stain(image, rng.uniform(1 - c.hed_sigma, 1 + c.hed_sigma, 3),
                               rng.uniform(-c.hed_sigma, c.hed_sigma, 3))
        if rng.random() < c.grayscale_p:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        if rng.random() < blur_p:
            sigma = float(rng.uniform(*c.blur_sigma))
            kernel = 2 * math.ceil(3 * sigma) + 1
            image = TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
        if rng.random() < solarize_p:
            image = TF.solarize(image, 0.5)
        return image.clamp(0.0, 1.0)

    def view(self, tile: torch.Tensor, grid: TranscriptGrid, mpp: float, rng: np.random.Generator, size: int,
             scale: tuple[float, float], blur_p: float, solarize_p: float = 0.0) -> View:
        # Separate streams for geometry and colour: the crops do not change when colour settings do.
        geometry_rng, colour_rng = rng.spawn(2)
        geometry = self.geometry(geometry_rng, (tile.shape[-2], tile.shape[-1]), size, scale)
        image = geometry.apply_to_image(tile).float().div_(255.0)
        image = self.colour(image, colour_rng, blur_p, solarize_p)
        return View((image - self.mean) / self.std, transform_grid(grid, geometry, mpp), geometry.mpp(mpp))

    def __call__(self, tile: TileSample, rng: np.random.Generator) -> TileViews:
        """A shard sample's views (the loader's per-sample transform)."""
        globals_, locals_ = self.crops(decode_image_rgb(tile.image), tile.grid, float(tile.meta["mpp"]), rng)
        return TileViews(tile.key, globals_, locals_)

    def crops(self, rgb: np.ndarray, grid: TranscriptGrid, mpp: float,
              rng: np.random.Generator) -> tuple[list[View], list[View]]:
        """``rgb``: H×W×3 uint8 tile; ``grid``: its sites in tile pixels; ``mpp``: µm per tile pixel."""
        c = self.cfg
        tile = torch.from_numpy(np.require(rgb, np.uint8, ["C", "W"])).permute(2, 0, 1)
        g_size, g_scale = c.global_crop_size, c.global_crop_scale
        globals_ = [
            self.view(tile, grid, mpp, rng, g_size, g_scale, c.blur_p_global1),
            self.view(tile, grid, mpp, rng, g_size, g_scale, c.blur_p_global2, c.solarize_p_global2),
        ]
        locals_ = [self.view(tile, grid, mpp, rng, c.local_crop_size, c.local_crop_scale, c.blur_p_local)
                   for _ in range(c.local_crops_number)]
        return globals_, locals_
