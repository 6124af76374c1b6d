"""`histotx predict` holds the batch, not the slide: the pictures it makes of a slide (the tissue mask's, the
outputs' thumbnail) come from bounded reads even when the slide has no pyramid. The mechanism at small scale;
the figures (peak RSS on a 100,000 × 100,000 px slide, flat and pyramidal) are `benchmarks/predict_memory.py`'s."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

import histotx.sharding.slides as slides_mod
from histotx.predict.slide import THUMB_MAX_PX, _plan
from histotx.sharding.config import ShardConfig
from histotx.sharding.slides import Slide


@pytest.fixture(scope="module")
def flat_slide(tmp_path_factory):
    """A 3,072 × 2,560 px slide at 0.5 µm/px, one level only (JPEG in 256 px tiles): glass and a textured disk."""
    rng = np.random.default_rng(0)
    h, w = 2560, 3072
    rgb = np.full((h, w, 3), 242, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    disk = (yy - 1300) ** 2 + (xx - 1500) ** 2 < 900**2
    rgb[disk] = np.array([220, 140, 185], np.uint8)
    dots = disk & (rng.random((h, w)) < 0.08)
    rgb[dots] = np.array([110, 60, 150], np.uint8)
    path = tmp_path_factory.mktemp("flat") / "flat.tif"
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb", compression="jpeg",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")  # fmt: skip
    return path


def _spy(monkeypatch):
    reads = []
    real = Slide.read_region

    def read_region(self, level, x, y, w, h, reduce=1):
        reads.append((level, w, h, reduce))
        return real(self, level, x, y, w, h, reduce)

    monkeypatch.setattr(Slide, "read_region", read_region)
    return reads


def test_predicts_pictures_of_a_flat_slide_are_read_in_bounded_bands(flat_slide, monkeypatch):
    """What predict reads besides its tiles (the tissue mask's picture at mask_mpp, the ≤ 2000 px thumbnail)
    stays within the band budget, here 32 rows of the level decoded at 1/8 (1/10 of it); the mask, the tile plan
    and the thumbnail are those of one whole-level read (up to rounding at the bands' seams)."""
    cfg = ShardConfig(mpp=1.0, tile_px=64, mask_mpp=5.0)  # both pictures shrink after a 1/8 decode
    with Slide(flat_slide) as s:
        assert len(s.levels) == 1
        whole_plan = _plan(s, cfg)[1]
        target = max(s.mpp, s.mpp * max(s.width, s.height) / 300)  # predict's thumbnail, scaled to this slide
        whole_thumb = s.thumbnail(target)[0]
    budget = 32 * (3072 // 8) * 3
    monkeypatch.setattr(slides_mod, "THUMB_BAND_BYTES", budget)
    reads = _spy(monkeypatch)
    with Slide(flat_slide) as s:
        plan = _plan(s, cfg)[1]
        thumb = s.thumbnail(target)[0]
    decoded = [w * h * 3 if k in (1, 2, 4, 8) else 0 for _, w, h, k in reads]
    assert len(reads) > 20 and max(decoded) <= budget, (max(decoded), budget)
    assert plan.names == whole_plan.names and np.array_equal(plan.origins, whole_plan.origins)
    assert thumb.shape == whole_thumb.shape
    diff = np.abs(thumb.astype(int) - whole_thumb.astype(int))
    assert diff.mean() < 0.5 and np.quantile(diff, 0.999) <= 8, (diff.mean(), diff.max())
    assert THUMB_MAX_PX <= 2000  # what the outputs' thumbnail is bounded by
