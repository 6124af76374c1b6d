"""HEST pseudo-spots stored rotated come out rotated: the square lattice's angle on the WSI is measured, carried
into every tile's transcript grid, and a turned square's counts go to the cells the turned square covers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histotx.data.augment import transform_grids
from histotx.data.views import CropGeometry
from histotx.format import TranscriptGrid, decode_grid, read_manifest
from histotx.shard_reader import read_shard_file
from histotx.sharding.cohort import Cohort, CohortSample
from histotx.sharding.config import ShardConfig
from histotx.sharding.hest import measure_lattice
from histotx.sharding.pipeline import run_cohort
from histotx.sharding.readers import read_sites
from histotx.synth.hest import tissue_blob, write_hest_layout
from histotx.tokens import _footprint_lattice, bin_grid

MPP = 2.0
SIDE_PX = 800
GENES = [(f"GENE{i}", f"ENSG{i:011d}") for i in range(8)]
# id → (st_technology, angle the pseudo-spot lattice is turned by on the WSI, expected side µm)
SAMPLES = {
    "NCBI900": ("Xenium", 23.0, 100.0),
    "TENX200": ("Visium HD", -31.0, 128.0),
    "NCBI901": ("Xenium", 0.0, 100.0),
}


@pytest.fixture(scope="module")
def hest_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hest_rotated") / "hest"
    for i, (hid, (tech, angle, _)) in enumerate(SAMPLES.items()):
        rng = np.random.default_rng(10 + i)
        write_hest_layout(
            root, hid, tech, tissue_blob(rng, SIDE_PX, SIDE_PX), MPP, GENES, rng, f"P{i}", angle_deg=angle
        )
    return root


def _sites(root, hid):
    s = CohortSample(id=hid, technology="hest", data=str(root))
    return read_sites(s, Cohort(path=root / "cohort.yaml", samples=[s]))


@pytest.mark.parametrize("hid", list(SAMPLES))
def test_pseudo_spots_keep_the_lattice_angle(hest_root, hid):
    _, angle, side = SAMPLES[hid]
    sites = _sites(hest_root, hid)
    fp = sites.info["footprint"]
    assert (sites.footprint_um, sites.footprint_shape, fp["source"]) == (
        pytest.approx(side, rel=1e-3),
        "square",
        "lattice",
    )
    assert sites.footprint_angle_deg == pytest.approx(angle, abs=0.02) and fp["angle_deg"] == sites.footprint_angle_deg
    if angle == 0:
        assert sites.footprint_angle_deg == 0.0  # exactly: unrotated samples shard as before


def _square_grid(angle_deg: float, n: int = 9, pitch: float = 50.0) -> np.ndarray:
    grid = np.stack(np.meshgrid(np.arange(n), np.arange(n)), -1).reshape(-1, 2) * pitch
    t = np.radians(angle_deg)
    return grid @ np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]).T


@pytest.mark.parametrize("turned, expect", [(23.0, 23.0), (113.0, 23.0), (-50.0, 40.0), (45.0, 45.0), (-45.0, 45.0)])
def test_a_square_lattice_angle_is_taken_modulo_its_symmetry(turned, expect):
    lat = measure_lattice(_square_grid(turned)[np.random.default_rng(1).permutation(81)[:60]])  # holes in the grid
    assert lat.kind == "square" and lat.angle_deg == pytest.approx(expect, abs=0.01)


def test_the_angle_reaches_every_tile_of_the_shards(hest_root, tmp_path):
    cohort = tmp_path / "cohort.yaml"
    cohort.write_text(
        json.dumps({"samples": [{"id": h, "technology": "hest", "data": str(hest_root)} for h in SAMPLES]})
    )
    cfg = ShardConfig(mpp=MPP, tile_px=64, mask_mpp=8.0, min_tissue_fraction=0.3)
    run_cohort(cohort, tmp_path / "shards", cfg)
    manifest = read_manifest(tmp_path / "shards")
    for hid, (_, angle, _) in SAMPLES.items():
        rec = manifest["samples"][hid]
        assert rec["status"] == "ok" and rec["reader"]["footprint"]["angle_deg"] == pytest.approx(angle, abs=0.02)
        grids = [
            (decode_grid(s["tx"]), s["tx"])
            for tar in sorted((tmp_path / "shards").glob(f"{hid}.*.tar"))
            for s in read_shard_file(tar)
        ]
        assert len(grids) == rec["tiles"] > 5
        assert {g.footprint_angle_deg for g, _ in grids} == {rec["reader"]["footprint"]["angle_deg"]}
        assert all((b"footprint_angle_deg" in raw) == bool(angle) for _, raw in grids)  # absent when 0


def _cell_shares(centre, side, angle_deg, cell, n=1000):
    """The exact shares of a turned square's area per cell (by dense sampling of the square itself)."""
    t = (np.arange(n) + 0.5) / n * side - side / 2
    u, v = (a.ravel() for a in np.meshgrid(t, t))
    c, s = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
    x, y = centre[0] + c * u - s * v, centre[1] + s * u + c * v
    key = np.floor(y / cell).astype(int) * 1000 + np.floor(x / cell).astype(int)
    cells, counts = np.unique(key, return_counts=True)
    return dict(zip(cells.tolist(), (counts / counts.sum()).tolist(), strict=True))


@pytest.mark.parametrize("angle", [30.0, -17.0])
def test_a_turned_square_spreads_over_the_cells_it_covers(angle):
    centre, side, cell = (100.0, 100.0), 80.0, 20.0  # 80 µm square over 20 µm cells at 1 µm/px
    truth = _cell_shares(centre, side, angle, cell)
    offsets = _footprint_lattice(side, "square", cell, angle)
    pts = np.asarray(centre) + offsets
    key = np.floor(pts[:, 1] / cell).astype(int) * 1000 + np.floor(pts[:, 0] / cell).astype(int)
    got = {k: v / len(pts) for k, v in zip(*np.unique(key, return_counts=True), strict=True)}
    assert max(abs(got.get(k, 0) - truth.get(k, 0)) for k in truth.keys() | got.keys()) < 0.012
    grid = TranscriptGrid([centre], [0, 1], [3], [50.0], side, "square", angle)
    tokens = bin_grid(grid, mpp=1.0, resolution_um=cell, image_hw=(200, 200))
    covered = {int(y // cell) * 1000 + int(x // cell) for x, y in tokens.xy}
    assert {k for k, v in truth.items() if v > 0.004} <= covered <= set(truth)
    axis_aligned = _cell_shares(centre, side, 0.0, cell)
    assert set(axis_aligned) != covered  # an axis-aligned square would put counts elsewhere


def test_a_mirrored_view_turns_the_footprint_the_other_way():
    grid = TranscriptGrid([[5.0, 50.0], [60.0, 60.0]], [0, 1, 2], [0, 1], [1.0, 1.0], 40.0, "square", 30.0)
    plain, mirrored, both, turned = transform_grids(
        grid,
        [
            CropGeometry(20, 20, 80, 80, 80),
            CropGeometry(20, 20, 80, 80, 80, hflip=True),
            CropGeometry(20, 20, 80, 80, 80, hflip=True, vflip=True),
            CropGeometry(20, 20, 80, 80, 80, quarter_turns=1),
        ],
        tile_mpp=1.0,
    )
    assert [g.footprint_angle_deg for g in (plain, mirrored, both, turned)] == [30.0, -30.0, 30.0, 30.0]
    # the site 15 px left of the crop reaches into it with a corner (half-diagonal reach 27.3 px), not with a side
    assert plain.n_sites == 2
