"""HEST-1k samples as HEST writes them: spot footprints per st_technology, patients from the metadata."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import webdataset as wds

from histotx.format import decode_sample, read_manifest
from histotx.sharding.cohort import Cohort, CohortSample, dump_cohort, load_cohort, patient_warning
from histotx.sharding.config import ShardConfig
from histotx.sharding.hest import Lattice, measure_lattice, spot_footprint
from histotx.sharding.pipeline import run_cohort
from histotx.sharding.readers import read_sites
from histotx.sharding.scan import PATIENT_TODO, scan
from histotx.synth.hest import HEST_LAYOUTS, tissue_blob, write_hest_layout

MPP = 2.0  # µm/px of the synthetic WSIs: coarse, so 1.6 mm of tissue is 800 px
SIDE_PX = 800
GENES = [(f"GENE{i}", f"ENSG{i:011d}") for i in range(12)]
# id → (st_technology, patient, expected footprint µm, shape, source)
SAMPLES = {
    "TENX95": ("Visium", "P1", 55.0, "disk", "st_technology"),
    "NCBI783": ("Xenium", "P1", 100.0, "square", "lattice"),  # a second section of patient P1
    "TENX128": ("Visium HD", "P2", 128.0, "square", "lattice"),
    "SPA100": ("Spatial Transcriptomics", "P3", 100.0, "disk", "metadata"),
}


@pytest.fixture(scope="module")
def hest_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hest_data") / "hest"
    for i, (hid, (tech, patient, *_)) in enumerate(SAMPLES.items()):
        rng = np.random.default_rng(i)
        write_hest_layout(root, hid, tech, tissue_blob(rng, SIDE_PX, SIDE_PX), MPP, GENES, rng, patient)
    return root


def test_layout_is_written_as_hest_writes_it(hest_root):
    import anndata

    assert (hest_root / "tissue_seg").is_dir() and not any((hest_root / "tissue_seg").iterdir())
    assert "NaN" in (hest_root / "metadata" / "NCBI783.json").read_text()
    with tifffile.TiffFile(hest_root / "wsis" / "NCBI783.tif") as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.compression == tifffile.COMPRESSION.LZW
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        assert page.tags["XResolution"].value[0] / page.tags["XResolution"].value[1] == pytest.approx(1e4 / MPP)
    xen = anndata.read_h5ad(hest_root / "st" / "NCBI783.h5ad")
    assert isinstance(xen.X, np.ndarray) and xen.X.dtype == np.uint16
    assert all(re.fullmatch(r"\d{3}x\d{3}", n) for n in xen.obs_names)
    hd = anndata.read_h5ad(hest_root / "st" / "TENX128.h5ad", backed="r")
    assert all(re.fullmatch(r"\d{4}x\d{4}", n) for n in hd.obs_names)


@pytest.mark.parametrize("hid", list(SAMPLES))
def test_footprint_per_technology(hest_root, hid):
    tech, _, size, shape, source = SAMPLES[hid]
    s = CohortSample(id=hid, technology="hest", data=str(hest_root))
    sites = read_sites(s, Cohort(path=hest_root / "cohort.yaml", samples=[s]))
    fp = sites.info["footprint"]
    assert (sites.footprint_um, sites.footprint_shape) == (pytest.approx(size, rel=1e-3), shape)
    assert fp["source"] == source and "warning" not in fp, fp
    assert fp["lattice"] == HEST_LAYOUTS[tech].lattice
    assert sites.panel == tech and sites.info["patient"] == SAMPLES[hid][1]
    meta = json.loads((hest_root / "metadata" / f"{hid}.json").read_text())
    if tech == "Xenium":  # blank metadata: nothing to agree with
        assert fp["metadata_spot_diameter_um"] is None and fp["metadata_agrees"] is None
    if tech == "Visium HD":  # the native 2 µm bin: ignored
        assert meta["spot_diameter"] == 2 and fp["metadata_agrees"] is False


def _hex(n: int, pitch: float, theta: float) -> np.ndarray:
    r, c = np.mgrid[0:n, 0:n]
    u, v = (c + 0.5 * (r % 2)) * pitch, r * pitch * np.sqrt(3) / 2
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return np.stack([u.ravel(), v.ravel()], 1) @ rot.T


def test_lattice_kind_and_pitch():
    hexagonal = np.rint(_hex(12, 137.6, 0.02))  # whole pixels, slightly rotated, as Visium positions
    lat = measure_lattice(hexagonal)
    assert lat.kind == "hexagonal" and lat.pitch_px == pytest.approx(137.6, rel=0.01)
    theta = 0.3
    grid = np.stack(np.meshgrid(np.arange(9), np.arange(7)), -1).reshape(-1, 2) * 50.0
    grid = grid @ np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]).T
    lat = measure_lattice(grid[np.random.default_rng(0).permutation(len(grid))[:50]])  # holes: tissue only
    assert lat.kind == "square" and lat.pitch_px == pytest.approx(50.0)
    assert measure_lattice(grid[:2]) is None


@pytest.mark.parametrize(
    "tech, lattice, mpp, diameter, expect",
    [
        # metadata that agrees with the lattice is taken for legacy ST (a 150 µm grid of 110 µm spots) ...
        ("Spatial Transcriptomics", Lattice(75.0, 4), 2.0, 110.0, (110.0, "disk", "metadata")),
        # ... one that cannot fit the lattice is not
        ("Spatial Transcriptomics", Lattice(100.0, 4), 2.0, 250.0, (100.0, "disk", "st_technology")),
        ("Visium", Lattice(200.0, 6), 0.5, 65.0, (55.0, "disk", "st_technology")),
        # no pixel size: the technology's own size, with a warning
        ("Xenium", Lattice(200.0, 4), None, None, (100.0, "square", "st_technology")),
        ("visium hd", Lattice(256.0, 4), 0.5, 2.0, (128.0, "square", "lattice")),
        # unknown technology: the metadata when it fits, else the lattice
        ("", Lattice(100.0, 6), 1.0, 55.0, (55.0, "disk", "metadata")),
        ("", Lattice(50.0, 4), 1.0, None, (50.0, "square", "lattice")),
    ],
)
def test_spot_footprint_rules(tech, lattice, mpp, diameter, expect):
    size, shape, record = spot_footprint(tech, lattice, mpp, diameter)
    assert (size, shape, record["source"]) == (pytest.approx(expect[0]), expect[1], expect[2])
    assert ("warning" in record) == (mpp is None)


def test_lattice_at_odds_with_the_technology_is_flagged():
    size, shape, record = spot_footprint("Xenium", Lattice(50.0, 6), 2.0, None)  # hexagonal: not HEST's pooling
    assert (size, shape, record["source"]) == (100.0, "square", "st_technology")
    assert "hexagonal lattice" in record["warning"]


def test_scan_and_shard_carry_patients_and_footprints(hest_root, tmp_path, caplog):
    (hest_root / "st" / "NOMETA1.h5ad").write_bytes(b"")  # no metadata: the patient is a visible TODO
    try:
        entries = {e["id"]: e for e in scan(hest_root.parent, relative_to=tmp_path)}
    finally:
        (hest_root / "st" / "NOMETA1.h5ad").unlink()
    assert entries.pop("NOMETA1")["patient"] == PATIENT_TODO
    for hid, (_, patient, *_) in SAMPLES.items():
        assert entries[hid]["patient"] == patient
        assert entries[hid]["organ"] == "Bowel" and entries[hid]["species"] == "Homo sapiens"
    cohort_file = tmp_path / "cohort.yaml"
    dump_cohort(list(entries.values()), cohort_file)
    cfg = ShardConfig(mpp=MPP, tile_px=64, min_tissue_fraction=0.5, max_tiles_per_sample=6)
    with caplog.at_level(logging.WARNING):
        manifest = run_cohort(cohort_file, tmp_path / "shards", cfg)
    assert "its own patient" not in caplog.text  # P1 has two sections
    assert manifest["totals"]["samples_failed"] == 0, manifest["samples"]
    for hid, (_, patient, size, _shape, source) in SAMPLES.items():
        rec = manifest["samples"][hid]
        assert rec["patient"] == patient and rec["organ"] == "Bowel"
        assert rec["reader"]["footprint"]["source"] == source and rec["footprint_um"] == pytest.approx(size, rel=1e-3)
    read_manifest(tmp_path / "shards")
    grids = {}
    for shard in manifest["shards"]:
        for members in wds.WebDataset(str(tmp_path / "shards" / shard["name"]), shardshuffle=False):
            tile = decode_sample(members)
            grids.setdefault(tile.meta["sample"], tile.grid)
            assert tile.meta["patient"] == SAMPLES[tile.meta["sample"]][1]
    assert {h: (round(g.footprint_um), g.footprint_shape) for h, g in grids.items()} == {
        h: (round(v[2]), v[3]) for h, v in SAMPLES.items()
    }


def test_every_sample_its_own_patient_warns(tmp_path):
    samples = [
        CohortSample(id=f"s{i}", technology="image_only", slide="x.svs", patient=p)
        for i, p in enumerate(["", f"{PATIENT_TODO}", "P9"])
    ]
    message = patient_warning(Cohort(path=tmp_path / "c.yaml", samples=samples))
    assert "every one of the 3 samples is its own patient" in message and "2 have no patient" in message
    assert samples[1].patient_id == "s1"  # a TODO is not a patient id
    samples[2].patient = "s0"  # shares a patient with s0 (whose id stands in for its patient)
    assert patient_warning(Cohort(path=tmp_path / "c.yaml", samples=samples)) is None
    cohort_file = tmp_path / "c.yaml"
    dump_cohort([{"id": "a", "technology": "image_only", "slide": "x.svs", "patient": PATIENT_TODO}], cohort_file)
    assert load_cohort(cohort_file).samples[0].patient_id == "a"
