"""Co-registration to the pixel, for every technology's path.

The synthetic cohort paints a green disk at each (marked) spot / bin / molecule position on the H&E and
records the level-0 positions. After sharding (Visium full-res at 0.7268 µm/px upsampled to 0.5, the
Visium HD OME-TIFF at 0.25 downsampled from its pyramid, the Xenium H&E through its affine, the HEST
slide, the SVS, the CosMx export through its mirrored affine, SpatialData stores whose image, points and shapes
each reach the shared coordinate system by their own transformation), every marked site in the shards must (a) map
back to its true level-0 position and (b) sit on its marker in the tile image, within 1 px.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from histotx.format import decode_image_rgb, decode_sample
from histotx.sharding.config import ShardConfig
from histotx.sharding.pipeline import run_cohort
from histotx.sharding.verify import iter_shard
from histotx.synth import generate_cohort
from histotx.synth.variants import ALL_VARIANTS

TECHNOLOGY_SAMPLES = [
    "visium",
    "visium_sr2",
    "visium_hd",
    "xenium",
    "hest",
    "cosmx",
    "spatialdata_points",
    "spatialdata_shapes",
]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("coreg")
    cohort = generate_cohort(root / "cohort", seed=3, size="small", markers=True, technologies=ALL_VARIANTS)
    cfg = ShardConfig(mpp=0.5, tile_px=128, image_format="png", min_tissue_fraction=0.05)
    manifest = run_cohort(cohort, root / "shards", cfg)
    assert manifest["totals"]["samples_failed"] == 0, manifest["samples"]
    tiles: dict[str, list] = {}
    for entry in manifest["shards"]:
        for members in iter_shard(root / "shards" / entry["name"]):
            t = decode_sample(members)
            tiles.setdefault(t.meta["sample"], []).append(t)
    return root, manifest, tiles


def marker_centres(rgb: np.ndarray) -> np.ndarray:
    """Centres (x, y), continuous px, of the green marker blobs in a tile."""
    rgb = rgb.astype(int)
    green = (rgb[..., 1] > 140) & (rgb[..., 0] < 110) & (rgb[..., 2] < 110)
    labels, n = ndimage.label(green)
    if n == 0:
        return np.zeros((0, 2))
    cy_cx = np.array(ndimage.center_of_mass(green, labels, range(1, n + 1)))
    return cy_cx[:, ::-1] + 0.5


@pytest.mark.parametrize("sample", TECHNOLOGY_SAMPLES)
def test_sites_land_on_their_markers(sharded, sample):
    root, manifest, tiles = sharded
    truth = json.loads((root / "cohort/truth" / f"{sample}.json").read_text())
    true_xy = np.asarray(truth["sites"]["xy_px"], dtype=np.float64)
    found, on_marker, checked = 0, [], 0
    for t in tiles[sample]:
        scale = t.meta["mpp"] / t.meta["source_mpp"]  # level-0 px per tile px
        origin = np.asarray(t.meta["origin_level0_px"])
        level0 = origin + t.grid.xy.astype(np.float64) * scale
        if not len(level0):
            continue
        # (a) Marked sites come back at their true level-0 positions.
        d = np.linalg.norm(level0[:, None] - true_xy[None], axis=-1)
        nearest = d.min(1)
        marked = nearest < 0.05 * scale + 0.01
        found += int(marked.sum())
        # (b) ... and sit on their green disk in the tile's pixels.
        centres = marker_centres(decode_image_rgb(t.image))
        edge = 4 + truth["marker_radius_px"] / scale
        for x, y in t.grid.xy[marked]:
            if min(x, y) < edge or max(x, y) > t.meta["tile_px"] - edge:
                continue  # a disk cut by the tile border has a biased centre
            checked += 1
            on_marker.append(np.linalg.norm(centres - (x, y), axis=1).min() if len(centres) else np.inf)
    kept_truth = manifest["samples"][sample]["sites_kept"]
    assert found >= min(0.8 * len(true_xy), kept_truth), (found, len(true_xy))
    assert checked >= 5
    on_marker = np.asarray(on_marker)
    assert on_marker.max() <= 1.0, f"{sample}: worst site is {on_marker.max():.2f} px from its marker"
