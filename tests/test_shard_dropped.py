"""Sites under no kept tile are reported per sample; above max_dropped_fraction the summary warns and says how
to keep them, and tiling=grid_sites keeps them (a tile wherever there are sites, whatever the tissue mask says).
`histotx shard qc` draws them: the overview shows kept tiles, sites in shards and dropped sites."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from histotx.cli import main as histotx_main
from histotx.config import ConfigError
from histotx.format import read_manifest
from histotx.sharding.config import ShardConfig
from histotx.sharding.qc import DROPPED_RGB, KEPT_RGB, TILE_RGB


def _pixels(path, rgb) -> int:
    return int((np.asarray(Image.open(path).convert("RGB")) == rgb).all(-1).sum())


@pytest.fixture
def cohort(shared_data, tmp_path):
    outs = shared_data / "scanpy-visium/visium_data/1.0.0"
    path = tmp_path / "cohort.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "samples": [
                    {
                        "id": "v",
                        "technology": "visium",
                        "image_scale": "lowres",
                        "data": str(outs),
                        "slide": str(outs / "spatial/tissue_lowres_image.png"),
                    }
                ]
            }
        )
    )
    return path


def test_dropped_sites_warn_and_grid_sites_keeps_them(cohort, tmp_path, capsys):
    args = ["mpp=16", "tile_px=32", "mask_mpp=16", "min_tissue_fraction=0.9"]  # a strict mask drops spots
    assert histotx_main(["shard", "run", str(cohort), "--out", str(tmp_path / "grid"), *args]) == 0
    rec = read_manifest(tmp_path / "grid")["samples"]["v"]
    dropped = rec["dropped"]["not_under_a_tile"]
    assert dropped > 5 and rec["sites_kept"] + dropped == rec["sites_read"]
    (warning,) = rec["warnings"]
    assert f"{dropped} of {rec['sites_read']} sites on the slide" in warning and "tiling=grid_sites" in warning
    assert "WARNING: " in capsys.readouterr().err  # the summary marks the sample
    assert histotx_main(["shard", "qc", str(tmp_path / "grid"), "--out", str(tmp_path / "qc")]) == 0
    overview = tmp_path / "qc" / "v_overview.png"
    assert (tmp_path / "qc" / "v.png").exists() and overview.exists()
    assert min(_pixels(overview, c) for c in (TILE_RGB, KEPT_RGB, DROPPED_RGB)) > 0

    assert (
        histotx_main(["shard", "run", str(cohort), "--out", str(tmp_path / "sites"), *args, "tiling=grid_sites"]) == 0
    )
    kept = read_manifest(tmp_path / "sites")["samples"]["v"]
    assert kept["sites_kept"] == kept["sites_read"] and "not_under_a_tile" not in kept["dropped"]
    assert kept["warnings"] == [] and kept["tiles"] > rec["tiles"]
    assert histotx_main(["shard", "qc", str(tmp_path / "sites"), "--out", str(tmp_path / "qc2")]) == 0
    assert _pixels(tmp_path / "qc2" / "v_overview.png", DROPPED_RGB) == 0  # nothing left out

    # Below the threshold: counted, no warning.
    assert (
        histotx_main(
            [
                "shard",
                "run",
                str(cohort),
                "--out",
                str(tmp_path / "lax"),
                *args[:3],
                "min_tissue_fraction=0.9",
                "max_dropped_fraction=0.5",
            ]
        )
        == 0
    )
    lax = read_manifest(tmp_path / "lax")["samples"]["v"]
    assert lax["dropped"]["not_under_a_tile"] == dropped and lax["warnings"] == []


def test_tiling_options_are_checked():
    with pytest.raises(ConfigError, match="tiling must be one of grid, grid_sites, spots, got hexagons"):
        ShardConfig(tiling="hexagons").validate()
