"""Sharding options on the synthetic cohort: HEST-style spot-centred tiles, the pixel-size cross-check,
QC sheets, and determinism across worker counts."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from histotx.format import decode_sample, read_manifest
from histotx.synth import generate_cohort
from sharding.config import ShardConfig
from sharding.pipeline import run_cohort
from sharding.qc import write_qc
from sharding.verify import iter_shard


@pytest.fixture(scope="module")
def visium_cohort(tmp_path_factory):
    return generate_cohort(tmp_path_factory.mktemp("synth") / "c", seed=1, size="small",
                           technologies=("visium", "hest"))


def test_spot_centred_tiles(visium_cohort, tmp_path):
    cfg = ShardConfig(tiling="spots", tile_px=224, mpp=0.5, min_tissue_fraction=0.15)
    manifest = run_cohort(visium_cohort, tmp_path / "out", cfg)
    for sid in ("visium", "hest"):
        rec = manifest["samples"][sid]
        assert rec["status"] == "ok" and rec["tiles"] > 20, rec
    for entry in manifest["shards"]:
        for members in iter_shard(tmp_path / "out" / entry["name"]):
            t = decode_sample(members)
            assert "__spot" in t.key
            # The spot the tile is centred on sits at its centre (112 µm tiles hold only that spot's centre).
            d = np.linalg.norm(t.grid.xy - 112.0, axis=1)
            assert d.min() < 1e-3 and t.grid.n_sites == 1


def test_pixel_size_disagreement_is_reported(visium_cohort, tmp_path):
    slide = visium_cohort.parent / "visium/visium_fullres.tif"
    with tifffile.TiffFile(slide, mode="r+b") as tif:  # claim 0.80 µm/px where the spots say 0.7268
        tif.pages[0].tags["XResolution"].overwrite((10000 * 100, 80))
    manifest = run_cohort(visium_cohort, tmp_path / "out", ShardConfig(mpp=2.0, tile_px=64))
    rec = manifest["samples"]["visium"]
    assert rec["status"] == "ok" and rec["slide_mpp"] == pytest.approx(0.8)
    assert rec["data_mpp_estimate"] == pytest.approx(0.7268, rel=5e-3)
    assert any("differ by" in w for w in rec["warnings"]), rec["warnings"]


def test_qc_sheets_and_worker_count_determinism(visium_cohort, tmp_path):
    cfg = ShardConfig(mpp=1.0, tile_px=128)
    one = run_cohort(visium_cohort, tmp_path / "one", cfg, workers=1)
    two = run_cohort(visium_cohort, tmp_path / "two", cfg, workers=2)
    assert [(s["name"], s["sha256"]) for s in one["shards"]] == [(s["name"], s["sha256"]) for s in two["shards"]]
    files = write_qc(tmp_path / "one", tmp_path / "qc", per_sample=4)
    assert sorted(f.name for f in files) == ["hest.png", "visium.png"]
    w, h = Image.open(files[0]).size
    assert w == 4 * 256 and h == 256  # 128 px tiles enlarged x2 (to at least 192 px), 4 per row
    saved = json.loads((tmp_path / "one/manifest.json").read_text())["config"]
    assert saved["mpp"] == 1.0 and saved["tile_px"] == 128
