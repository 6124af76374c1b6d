"""HistoTx's own Visium and Xenium readers against spatialdata-io's, on the real files in ../shared/data.

Neither side wrote the other's input: spatialdata-io reads the Space Ranger outs and the Xenium transcripts
itself, its SpatialData store goes through HistoTx's `spatialdata` technology, and the native readers read the
same files. Site positions (px on the slide) and counts per gene must agree, and so must the shards each path
writes (tile origins, sites, genes, counts, pixels).

What spatialdata-io can run on here: ``visium()`` on the Space Ranger 1.0 outs as they are. ``xenium()`` cannot:
it opens ``cells.zarr.zip`` (and the morphology images, cell_feature_matrix.h5) unconditionally, and the data has
only ``transcripts.csv`` (written by R) and ``experiment.xenium``; so its transcripts function (``_get_points``,
what ``xenium()`` calls for the points element) reads a ``transcripts.parquet`` holding the CSV's columns
unchanged, and its ``xenium_aligned_image`` attaches a test-made H&E through a test-made alignment CSV (the real
data has neither). The native Xenium reader reads the original CSV.

The figures are printed (``pytest -s``): Visium 100/100 spots, 0.0 px, counts identical; Xenium molecules
identical to ~1e-11 px.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml
from scipy.spatial import cKDTree

spatialdata_io = pytest.importorskip("spatialdata_io", reason="the agreement check needs spatialdata-io (dev extra)")

from histotx.format import decode_image_rgb, decode_sample, read_manifest  # noqa: E402
from histotx.sharding.cohort import load_cohort  # noqa: E402
from histotx.sharding.config import ShardConfig  # noqa: E402
from histotx.sharding.pipeline import run_cohort  # noqa: E402
from histotx.sharding.readers import ReaderOptions, read_sites  # noqa: E402
from histotx.sharding.verify import iter_shard  # noqa: E402
from histotx.sharding.visium import read_visium, visium_mpp_hint  # noqa: E402
from histotx.sharding.xenium import read_xenium  # noqa: E402
from histotx.vocab import Vocab  # noqa: E402

VISIUM = "scanpy-visium/visium_data/1.0.0"
XENIUM = "moleculeexperiment-xenium/xenium_V1_FF_Mouse_Brain/sample1"


def _cohort(tmp_path, samples):
    path = tmp_path / "cohort.yaml"
    path.write_text(yaml.safe_dump({"samples": samples}))
    cohort = load_cohort(path)
    return cohort, {s.id: s for s in cohort.samples}


def _match(ours: np.ndarray, native: np.ndarray) -> tuple[np.ndarray, float]:
    """For each of our sites the native one nearest, and the largest distance; each native site used once."""
    dist, j = cKDTree(native).query(ours)
    assert len(set(j.tolist())) == len(j) == len(native), "sites do not pair one to one"
    return j, float(dist.max())


def _all_sites(sites, extent=1e5):
    xy, counts = sites.in_box(0.0, 0.0, extent, extent)
    return np.asarray(xy, dtype=np.float64), counts.tocsr()


def _gene_columns(ours_genes, native_genes) -> np.ndarray:
    """Our column of each native gene (matched by (symbol, Ensembl id))."""
    index = {g: i for i, g in enumerate(ours_genes)}
    assert set(index) == set(native_genes)
    return np.array([index[g] for g in native_genes])


def _shard_tiles(shard_dir, sample):
    """origin → (image, sorted (x, y, gene, count) rows) of one sample's tiles."""
    vocab = Vocab.load(shard_dir / "vocab.tsv")
    tiles = {}
    for entry in read_manifest(shard_dir)["shards"]:
        for members in iter_shard(shard_dir / entry["name"]):
            t = decode_sample(members)
            if t.meta["sample"] != sample:
                continue
            g = t.grid
            rows = []
            for i in range(g.n_sites):
                for k in range(g.offsets[i], g.offsets[i + 1]):
                    rows.append((float(g.xy[i, 0]), float(g.xy[i, 1]), vocab.name(int(g.gene[k])), float(g.count[k])))
            # µm/px declared one way may differ from a file's in the 16th digit: origins to 1e-6 px
            origin = tuple(round(float(v), 6) for v in t.meta["origin_level0_px"])
            tiles[origin] = (decode_image_rgb(t.image), sorted(rows))
    return tiles


def _compare_shards(shard_dir, native: str, ours: str) -> tuple[int, int, float]:
    """Same tiles, pixels, genes and counts; returns (tiles, sites, largest site offset in tile px)."""
    a, b = _shard_tiles(shard_dir, native), _shard_tiles(shard_dir, ours)
    assert sorted(a) == sorted(b) and a
    worst, n_sites = 0.0, 0
    for origin, (image, rows) in a.items():
        image_b, rows_b = b[origin]
        assert np.array_equal(image, image_b), origin
        assert [(g, c) for *_, g, c in rows] == [(g, c) for *_, g, c in rows_b], origin
        if rows:
            worst = max(worst, float(np.abs(np.array([r[:2] for r in rows]) - [r[:2] for r in rows_b]).max()))
        n_sites += len(rows)
    return len(a), n_sites, worst


def test_visium_spots_and_counts_agree_with_spatialdata_io(shared_data, tmp_path, capsys):
    outs = shared_data / VISIUM
    store = tmp_path / "v1.zarr"
    spatialdata_io.visium(outs, dataset_id="v1").write(store)
    mpp = visium_mpp_hint(outs, "lowres")  # the lowres image's µm/px, from the spot lattice (as the native path)
    options = {"image": "v1_lowres_image", "shapes": "v1", "coordinate_system": "v1_downscaled_lowres"}
    cohort, s = _cohort(
        tmp_path,
        [
            {"id": "native", "technology": "visium", "data": str(outs),
             "slide": str(outs / "spatial/tissue_lowres_image.png"), "options": {"image_scale": "lowres"}},
            {"id": "sdio", "technology": "spatialdata", "data": "v1.zarr", "mpp": mpp,
             "options": {**options, "footprint_um": 55.0}},  # spatialdata-io's radius spans the theoretical 65 µm
            {"id": "sdio_fullres", "technology": "spatialdata", "data": "v1.zarr", "mpp": mpp,
             "options": {**options, "coordinate_system": "v1"}},
        ],
    )  # fmt: skip
    native = read_visium(outs, "lowres")
    ours = read_sites(s["sdio"], cohort)
    j, worst = _match(ours.xy_px, native.xy_px)
    cols = _gene_columns(ours.genes, native.genes)
    diff = np.abs(ours.counts[:, cols].toarray() - native.counts[j].toarray()).max()
    # The same spots through the full-resolution system `v1`, where spatialdata-io gives the low-res image a
    # Scale(1 / tissue_lowres_scalef) and the spots Identity (measured: also 0.0 px).
    fullres = read_sites(s["sdio_fullres"], cohort)
    _, worst_fullres = _match(fullres.xy_px, native.xy_px)
    default_footprint = read_sites(s["sdio_fullres"], cohort).footprint_um
    with capsys.disabled():
        print(
            f"\nAGREEMENT visium (spatialdata-io {spatialdata_io.__version__}): {len(j)}/{native.n_sites} spots "
            f"paired, max {worst} px (lowres system), {worst_fullres:.2e} px (fullres system); "
            f"counts max |diff| {diff}, "
            f"total {ours.counts.sum():g} vs {native.counts.sum():g}; spot footprint {default_footprint:.1f} µm "
            f"from spatialdata-io's radius (native: 55 µm)"
        )
    assert ours.n_sites == native.n_sites == 100 and len(j) == 100
    assert worst == 0.0 and diff == 0 and ours.counts.sum() == native.counts.sum()
    assert worst_fullres < 1e-3

    cfg = ShardConfig(mpp=16.0, tile_px=32, mask_mpp=16.0, min_tissue_fraction=0.5)
    cohort_path = tmp_path / "shard.yaml"
    doc = yaml.safe_load((tmp_path / "cohort.yaml").read_text())
    cohort_path.write_text(yaml.safe_dump({"samples": doc["samples"][:2]}))
    manifest = run_cohort(cohort_path, tmp_path / "shards", cfg)
    for sid in ("native", "sdio"):
        assert manifest["samples"][sid]["status"] == "ok", manifest["samples"][sid]
    tiles, sites, offset = _compare_shards(tmp_path / "shards", "native", "sdio")
    with capsys.disabled():
        print(f"AGREEMENT visium shards: {tiles} tiles, {sites} (site, gene) entries identical, max offset {offset} px")
    assert offset == 0.0 and sites >= manifest["samples"]["native"]["sites_kept"]


def _xenium_he(tmp_path, tx: pd.DataFrame):
    """An H&E OME-TIFF at 0.35 µm/px and its alignment M (H&E px → morphology px): rotation 25°, the patch at
    H&E px (150, 140) (as tests/test_shard_real.py)."""
    ps, he_mpp, theta = 0.2125, 0.35, math.radians(25)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]) * he_mpp / ps
    centre = np.array([tx.x_location.mean(), tx.y_location.mean()]) / ps
    m = np.eye(3)
    m[:2, :2], m[:2, 2] = rot, centre - rot @ np.array([150.0, 140.0])
    rng = np.random.default_rng(0)
    rgb = np.full((300, 300, 3), 245, np.uint8)
    rgb[40:260, 40:260] = (200, 120, 170) + rng.integers(0, 20, (220, 220, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "he.ome.tif", rgb, photometric="rgb", tile=(128, 128),
                     metadata={"PhysicalSizeX": he_mpp, "PhysicalSizeY": he_mpp, "axes": "YXS"})  # fmt: skip
    np.savetxt(tmp_path / "he_imagealignment.csv", m, delimiter=",")
    return m


def test_xenium_molecules_agree_with_spatialdata_io(shared_data, tmp_path, capsys):
    from spatialdata import SpatialData
    from spatialdata_io.readers.xenium import _get_points, xenium_aligned_image

    src = shared_data / XENIUM
    tx = pd.read_csv(src / "transcripts.csv", index_col=0)  # R's row index first
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copy(src / "experiment.xenium", bundle)
    tx.to_parquet(bundle / "transcripts.parquet", index=False)  # the CSV's columns, unchanged
    m = _xenium_he(tmp_path, tx)
    points = _get_points(bundle, json.loads((bundle / "experiment.xenium").read_text()))
    image = xenium_aligned_image(tmp_path / "he.ome.tif", tmp_path / "he_imagealignment.csv")
    SpatialData(images={"he": image}, points={"transcripts": points}).write(tmp_path / "x1.zarr")
    cohort, s = _cohort(
        tmp_path,
        [
            {"id": "native", "technology": "xenium", "data": str(src), "slide": "he.ome.tif",
             "options": {"alignment": "he_imagealignment.csv"}},
            {"id": "sdio", "technology": "spatialdata", "data": "x1.zarr",
             "options": {"um_per_unit": 0.2125}},  # spatialdata-io's `global` system: morphology px
        ],
    )  # fmt: skip
    run = ReaderOptions(slide_px=(300, 300))
    native = read_xenium(src, tmp_path / "he_imagealignment.csv", run.qv_min, run.slide_px)
    ours = read_sites(s["sdio"], cohort, run)
    xy_n, c_n = _all_sites(native)
    xy_o, c_o = _all_sites(ours)
    j, worst = _match(xy_o, xy_n)
    gene_n = np.array([native.genes[k][0] for k in c_n.indices])
    gene_o = np.array([ours.genes[k][0] for k in c_o.indices])
    per_gene_n, per_gene_o = pd.Series(gene_n).value_counts(), pd.Series(gene_o).value_counts()
    with capsys.disabled():
        print(
            f"\nAGREEMENT xenium (spatialdata-io {spatialdata_io.__version__}): {len(j)}/{len(xy_n)} molecules paired "
            f"(of {len(tx)} rows; dropped {dict(sorted(ours.dropped.items()))} vs "
            f"{dict(sorted(native.dropped.items()))}), max {worst:.1e} px; {len(per_gene_o)} genes, "
            "per-gene counts identical: "
            f"{per_gene_o.sort_index().equals(per_gene_n.sort_index())}; same gene at each paired molecule: "
            f"{bool((gene_o == gene_n[j]).all())}; slide µm/px {ours.mpp_estimate!r} vs {native.mpp_estimate!r}"
        )
    assert len(j) == len(xy_n) == 962 - int(((tx.qv < 20) | tx.feature_name.str.startswith(("BLANK", "NegC"))).sum())
    assert worst < 1e-9 and (gene_o == gene_n[j]).all()
    assert per_gene_o.sort_index().equals(per_gene_n.sort_index())
    assert ours.dropped == native.dropped and ours.genes == native.genes
    assert ours.mpp_estimate == pytest.approx(native.mpp_estimate, rel=1e-12)
    assert not np.allclose((np.c_[xy_o, np.ones(len(xy_o))] @ m.T)[:, :2], xy_o)  # the affine is not a no-op

    cfg = ShardConfig(mpp=0.5, tile_px=32, mask_mpp=2.0, min_tissue_fraction=0.5)
    manifest = run_cohort(tmp_path / "cohort.yaml", tmp_path / "shards", cfg)
    for sid in ("native", "sdio"):
        assert manifest["samples"][sid]["status"] == "ok", manifest["samples"][sid]
    tiles, sites, offset = _compare_shards(tmp_path / "shards", "native", "sdio")
    with capsys.disabled():
        print(f"AGREEMENT xenium shards: {tiles} tiles, {sites} molecules identical, max offset {offset:.1e} tile px")
    assert sites == manifest["samples"]["native"]["sites_kept"] == manifest["samples"]["sdio"]["sites_kept"]
    assert offset < 1e-3  # positions are float32 in tile px
