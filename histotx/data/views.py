"""A view of a tile: the crop geometry that makes its pixels and moves its sites, and what a view holds.

:class:`CropGeometry` is one crop box, resize, flips and quarter turns, applied alike to the tile's pixels
(:meth:`~CropGeometry.apply_to_image`, :meth:`~CropGeometry.apply_to_hwc`) and to its sites' positions
(:meth:`~CropGeometry.apply_to_xy`). :mod:`histotx.data.augment` draws them, :mod:`histotx.data.pixels`
renders them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from histotx.data.opencv import cv2
from histotx.format import TranscriptGrid
from histotx.preprocess import RESIZE_ANTIALIAS, RESIZE_MODE


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
