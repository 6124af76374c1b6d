"""Sharding a sample whose sites stream to disk in bands gives the shards of the same sites held in memory, byte
for byte, while holding only a batch, a flush buffer or one tile row of sites at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import yaml
from shardkit import write_pyramid

import histotx.sharding.bands as bands
import histotx.sharding.xenium as xenium
from histotx.shard_reader import read_shard_file
from histotx.sharding.config import ShardConfig
from histotx.sharding.pipeline import run_cohort
from histotx.sharding.sites import Sites

MPP = 0.5
SIDE = 640  # H&E px: a 10 × 10 grid of 64 px tiles
ALIGN = np.array([[MPP / 0.2125 * 0.96, -MPP / 0.2125 * 0.28, 300.0], [MPP / 0.2125 * 0.28, MPP / 0.2125 * 0.96, 50.0]])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A Xenium bundle on a slide whose left half only is tissue (grid_sites adds the right half's tiles), under a
    rotated alignment, with controls, low-qv molecules and molecules off the slide."""
    root = tmp_path_factory.mktemp("xenium")
    data = root / "bundle"
    data.mkdir()
    rng = np.random.default_rng(7)
    rgb = np.full((SIDE, SIDE, 3), 240, np.uint8)
    rgb[:, : SIDE // 2] = np.clip(np.array([200, 120, 170]) + rng.integers(-30, 30, (SIDE, SIDE // 2, 3)), 0, 255)
    write_pyramid(data / "s_he_image.ome.tif", rgb, MPP, levels=2)
    m = np.vstack([ALIGN, [0, 0, 1]])
    np.savetxt(data / "s_he_imagealignment.csv", m, delimiter=",")
    (data / "experiment.xenium").write_text(json.dumps({"pixel_size": 0.2125, "panel_name": "test 5K"}))
    n = 40_000
    he = rng.uniform(-20, SIDE + 20, (n, 2))  # some off the slide
    morph_um = (he @ m[:2, :2].T + m[:2, 2]) * 0.2125
    names = [f"G{i:03d}" for i in range(60)] + ["NegControlProbe_00001", "UnassignedCodeword_0002"]
    feature = rng.integers(0, len(names), n).astype(np.int32)
    pq.write_table(
        pa.table(
            {
                "transcript_id": pa.array(np.arange(n, dtype=np.uint64) + (1 << 48)),
                "cell_id": ["UNASSIGNED"] * n,
                "overlaps_nucleus": pa.array(rng.integers(0, 2, n).astype(np.uint8)),
                "feature_name": pa.DictionaryArray.from_arrays(pa.array(feature), pa.array(names)),
                "x_location": pa.array(morph_um[:, 0].astype(np.float32)),
                "y_location": pa.array(morph_um[:, 1].astype(np.float32)),
                "z_location": pa.array(rng.uniform(5, 25, n).astype(np.float32)),
                "qv": pa.array(rng.uniform(5, 40, n).astype(np.float32)),
            }
        ),
        data / "transcripts.parquet",
        row_group_size=5000,
    )
    cohort = {"samples": [{"id": "x1", "patient": "P1", "technology": "xenium", "slide": "bundle/s_he_image.ome.tif",
                           "data": "bundle"}]}  # fmt: skip
    (root / "cohort.yaml").write_text(yaml.safe_dump(cohort))
    return root


def _in_memory_read(given, run) -> Sites:
    """The sample read whole (pyarrow read_table, no chunks, no bands): the reference the streamed path must match."""
    path = given.data / "transcripts.parquet"
    table = pq.read_table(path)
    names = table.column("feature_name").to_pylist()
    genes, controls, _ = xenium._panel(path)
    column = {g: j for j, (g, _) in enumerate(genes)}
    qv = table.column("qv").to_numpy().astype(np.float64)
    control = np.array([n in controls for n in names])
    low = ~control & ~(qv >= run.qv_min)
    keep = ~control & ~low
    xy_um = np.stack([table.column(c).to_numpy().astype(np.float64) for c in ("x_location", "y_location")], 1)
    m = xenium.read_alignment(given.data / "s_he_imagealignment.csv")
    xy = xenium.morphology_um_to_he_px(xy_um[keep], 0.2125, m)
    gene = np.array([column[n] for n, k in zip(names, keep, strict=True) if k], dtype=np.int32)
    counts = sp.csr_matrix((np.ones(len(gene), np.float32), gene, np.arange(len(gene) + 1)), (len(gene), len(genes)))
    dropped = {"control_probe": int(control.sum()), "low_qv": int(low.sum())}
    return Sites(xy, counts, list(genes), 0.0, "point", panel="test 5K", dropped=dropped, mpp_estimate=MPP)


def _members(out: Path) -> dict[str, bytes]:
    found = {}
    for tar in sorted(out.glob("*.tar")):
        for sample in read_shard_file(tar):
            for name, value in sample.items():
                if not name.startswith("__"):
                    found[f"{sample['__key__']}.{name}"] = value
    return found


def _shard(bundle: Path, out: Path, tiling: str) -> dict:
    cfg = ShardConfig(mpp=MPP, tile_px=64, tiling=tiling, mask_mpp=4.0, min_tissue_fraction=0.5)
    manifest = run_cohort(bundle / "cohort.yaml", out, cfg)
    return manifest["samples"]["x1"]


@pytest.mark.parametrize("tiling", ["grid", "grid_sites"])
def test_streamed_shards_are_byte_identical_to_in_memory(bundle, tmp_path, monkeypatch, tiling):
    seen: list[bands.BandedSites] = []
    read = xenium.read
    monkeypatch.setattr(xenium, "read", lambda given, run: seen.append(read(given, run)) or seen[-1])
    monkeypatch.setattr(xenium, "BATCH_ROWS", 1500)  # many batches, many flushes, bands thinner than a tile
    monkeypatch.setattr(xenium, "BAND_UM", 9.0)
    monkeypatch.setattr(bands, "FLUSH_SITES", 4000)
    streamed = _shard(bundle, tmp_path / "streamed", tiling)
    monkeypatch.setattr(xenium, "read", _in_memory_read)
    memory = _shard(bundle, tmp_path / "memory", tiling)

    assert streamed["status"] == memory["status"] == "ok", (streamed, memory)
    for key in ("tiles", "sites_read", "sites_kept", "dropped", "counts_kept"):
        assert streamed[key] == memory[key], key
    a, b = _members(tmp_path / "streamed"), _members(tmp_path / "memory")
    assert a.keys() == b.keys() and len(a) == 3 * streamed["tiles"]
    assert [k for k in a if a[k] != b[k]] == []
    n_grid = (SIDE // 64) ** 2
    if tiling == "grid_sites":  # every tile holds molecules: the background half is cut too
        assert streamed["tiles"] == n_grid and streamed["dropped"].get("not_under_a_tile", 0) == 0
    else:
        assert streamed["tiles"] < 0.7 * n_grid and streamed["dropped"]["not_under_a_tile"] > 5_000
    assert len(seen) == 1 and len(seen[0].band_sites) > 30


def test_streamed_sharding_bounds_the_sites_in_memory(bundle, tmp_path, monkeypatch):
    """Small batches, flushes and bands: no step holds more than a batch, a flush buffer or the bands of one tile
    row, each a small part of the sample; grid_sites reads one band at a time."""
    seen: list[bands.BandedSites] = []
    batch_rows: list[int] = []
    read, batches = xenium.read, xenium._batches

    def counted_batches(*args, **kwargs):
        for batch in batches(*args, **kwargs):
            batch_rows.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(xenium, "read", lambda given, run: seen.append(read(given, run)) or seen[-1])
    monkeypatch.setattr(xenium, "_batches", counted_batches)
    monkeypatch.setattr(xenium, "BATCH_ROWS", 1000)
    monkeypatch.setattr(xenium, "BAND_UM", 8.0)
    monkeypatch.setattr(bands, "FLUSH_SITES", 2500)
    xenium._panel_of.cache_clear()  # the panel pass (names only) streams too
    rec = _shard(bundle, tmp_path / "out", "grid_sites")
    (sites,) = seen
    assert rec["status"] == "ok" and max(batch_rows) == 1000 and sum(batch_rows) == 2 * 40_000  # names + molecules
    assert sites.peak_buffered < 2500 + 1000  # flushed once a batch takes the buffer past FLUSH_SITES
    # one tile row (32 µm) spans at most 5 bands of 8 µm: the densest such run of bands bounds what is loaded
    per_band = np.array([sites.band_sites.get(b, 0) for b in range(max(sites.band_sites) + 1)])
    densest_row = max(per_band[b : b + 5].sum() for b in range(len(per_band)))
    total = sum(sites.band_sites.values())
    assert 0 < sites.peak_loaded <= densest_row < total / 5
    assert rec["sites_kept"] == total  # every on-slide site went to a tile


def test_qc_overview_reads_the_input_band_by_band(bundle, tmp_path, monkeypatch):
    """`histotx shard qc` of a banded sample draws the sites no tile holds without loading the sample whole, and
    counts the same sites as the manifest."""
    from histotx.sharding import qc

    monkeypatch.setattr(xenium, "BAND_UM", 9.0)
    rec = _shard(bundle, tmp_path / "shards", "grid")
    drawn = {}
    draw = qc._Overlay.draw

    def counted(self, img, rgb):
        drawn[rgb] = self.n
        draw(self, img, rgb)

    def whole(_self):
        raise AssertionError("every band loaded at once")

    monkeypatch.setattr(qc._Overlay, "draw", counted)
    monkeypatch.setattr(bands.BandedSites, "_all", whole)
    (path,) = qc.write_overviews(tmp_path / "shards", tmp_path / "qc")
    assert path.exists()
    assert drawn == {qc.KEPT_RGB: rec["sites_kept"], qc.DROPPED_RGB: rec["dropped"]["not_under_a_tile"]}


def test_qc_tile_cover_is_any_box():
    from histotx.sharding.qc import _Boxes

    rng = np.random.default_rng(4)
    grid = [
        (c * 10.0, r * 10.0, c * 10.0 + 10, r * 10.0 + 10) for r in range(8) for c in range(8) if rng.random() < 0.6
    ]
    spots = [(x, y, x + 12.5, y + 12.5) for x, y in rng.uniform(0, 70, (40, 2))]  # overlapping, any origin
    x, y = rng.uniform(-5, 90, 20_000), rng.uniform(-5, 90, 20_000)
    x[:50], y[50:60] = np.nan, np.nan
    for boxes in (grid, spots, grid + spots, []):
        want = np.zeros(len(x), bool)
        for x0, y0, x1, y1 in boxes:
            want |= (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
        np.testing.assert_array_equal(_Boxes(boxes).cover(x, y), want)
