"""Tissue mask from a low-resolution view of the slide, and the tissue fraction of any box.

H&E tissue is stained (saturated) and darker than the bright, grey glass around it: threshold the
saturation by Otsu (never below a floor, so an empty slide stays empty), drop pale pixels, then
close small gaps. Fractions per box come from an integral image, so scoring every tile is cheap.
"""

from __future__ import annotations

import numpy as np
from skimage.filters import threshold_otsu

MIN_SATURATION = 0.07
MAX_BRIGHTNESS = 0.94


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean (h, w) mask of tissue in an RGB uint8 thumbnail.

    A pixel's saturation depends only on its channel maximum and range, so it is computed once per (max, range)
    pair present, and Otsu's threshold from those values weighted by their pixel counts (the histogram, hence
    the threshold, of ``threshold_otsu`` on the whole image: tested equal). Channel sums in integers, the closing
    by OpenCV (same border rule as scipy's: outside is background, so tissue touching the edge erodes there),
    holes filled by one OpenCV flood fill of the glass from the border (4-connected, as scipy's
    ``binary_fill_holes``, ~6x faster)."""
    import cv2

    r, g, b = (rgb[..., i] for i in range(3))
    hi, lo = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    pair = (hi.astype(np.intp) << 8) | (hi - lo)  # (max, range) of each px, as max·256 + range
    counts = np.bincount(pair.ravel(), minlength=1 << 16)
    present = np.flatnonzero(counts)
    sat = saturation(present >> 8, present & 255)
    thr = MIN_SATURATION
    if sat.size and np.ptp(sat) > 1e-3:
        hist, edges = np.histogram(sat, bins=256, weights=counts[present])  # = np.histogram of every px's value
        thr = max(thr, float(threshold_otsu(hist=(hist, (edges[:-1] + edges[1:]) / 2))))
    tissue = np.zeros(1 << 16, bool)
    tissue[present] = sat > thr
    bright = r.astype(np.uint16) + g + b >= MAX_BRIGHTNESS * 3 * 255
    mask = (tissue[pair] & ~bright).astype(np.uint8)
    kernel, edge = np.ones((3, 3), np.uint8), dict(borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return fill_holes(cv2.erode(cv2.dilate(mask, kernel, iterations=2, **edge), kernel, iterations=2, **edge))


def saturation(hi: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """HSV saturation (float32) of pixels with channel maximum ``hi`` and range ``spread``; 0 for black."""
    return np.where(hi > 0, spread.astype(np.float32) / np.maximum(hi, 1).astype(np.float32), np.float32(0))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Boolean mask with its holes (background not 4-connected to the border) filled, as scipy's
    ``binary_fill_holes`` (tested equal), by one OpenCV flood fill of the background from the border."""
    import cv2

    glass = np.pad(mask.astype(np.uint8), 1)  # a background frame joins all the border's background into one region
    cv2.floodFill(glass, np.zeros((glass.shape[0] + 2, glass.shape[1] + 2), np.uint8), (0, 0), 1, flags=4)
    return (glass[1:-1, 1:-1] == 0) | mask.astype(bool)  # holes: the background the fill did not reach


def integral(mask: np.ndarray) -> np.ndarray:
    """(h + 1, w + 1) counts of True above and left of each corner (a zero first row and column), by OpenCV:
    ~10x faster than two numpy cumulative sums; int32 while the mask has under 2**31 px, else int64."""
    import cv2

    if mask.size < 2**31:
        return cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_32S)
    return np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))


class TissueMap:
    """The mask of a slide with its scale, answering "what fraction of this level-0 box is tissue?"."""

    def __init__(self, mask: np.ndarray, level0_per_px: float) -> None:
        self.mask = mask
        self.scale = level0_per_px
        self._integral = integral(mask)

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def box_fraction(self, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
        """Tissue fraction of level-0 boxes (vectorised; boxes partly outside the slide count the outside as glass)."""
        h, w = self.mask.shape
        s = self.scale
        ax0 = np.clip(np.floor(np.asarray(x0) / s), 0, w).astype(np.int64)
        ay0 = np.clip(np.floor(np.asarray(y0) / s), 0, h).astype(np.int64)
        ax1 = np.clip(np.ceil(np.asarray(x1) / s), 0, w).astype(np.int64)
        ay1 = np.clip(np.ceil(np.asarray(y1) / s), 0, h).astype(np.int64)
        ii = self._integral
        inside = ii[ay1, ax1] - ii[ay0, ax1] - ii[ay1, ax0] + ii[ay0, ax0]
        area = np.maximum((np.asarray(x1) - np.asarray(x0)) / s, 1e-9) * np.maximum(
            (np.asarray(y1) - np.asarray(y0)) / s, 1e-9
        )
        return np.clip(inside / area, 0.0, 1.0)
