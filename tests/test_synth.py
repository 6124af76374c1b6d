"""The synthetic cohort: genuine formats read by the field's readers, determinism, biology, markers."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import tifffile
import yaml
from PIL import Image

from histotx.synth import VARIANTS, generate_cohort, register_cli
from histotx.synth.genes import XENIUM_CONTROLS, gene_table, xenium_panel
from histotx.vocab import is_ensembl_id

SEED = 7


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """The full small cohort with markers (the co-registration configuration)."""
    return generate_cohort(tmp_path_factory.mktemp("synth") / "c", seed=SEED, markers=True)


@pytest.fixture(scope="module")
def plain_xenium(tmp_path_factory) -> Path:
    """The Xenium sample alone, without markers (so every molecule is written)."""
    return generate_cohort(tmp_path_factory.mktemp("synth") / "x", seed=SEED, technologies=("xenium",))


def truth(cohort: Path, sample: str) -> dict:
    return json.loads((cohort.parent / "truth" / f"{sample}.json").read_text())


def read_10x(path: Path) -> tuple[sp.csr_matrix, list[str], list[str]]:
    """(barcodes × genes) counts, barcodes, gene symbols, read the way 10x documents the layout."""
    with h5py.File(path, "r") as f:
        m = f["matrix"]
        n_features, n_barcodes = m["shape"][:]
        assert len(m["indptr"]) == n_barcodes + 1  # CSC over features × barcodes: one pointer per barcode
        x = sp.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=(n_features, n_barcodes))
        barcodes = [b.decode() for b in m["barcodes"][:]]
        names = [n.decode() for n in m["features/name"][:]]
        assert set(m["features"].keys()) >= {"id", "name", "feature_type", "genome", "_all_tag_keys"}
        assert all(is_ensembl_id(i.decode()) for i in m["features/id"][:])
        assert {t.decode() for t in m["features/feature_type"][:]} == {"Gene Expression"}
    return x.T.tocsr(), barcodes, names


def slide_mpp(path: Path) -> tuple[float, int]:
    """µm/px of level 0 from the file's own metadata, and the number of pyramid levels."""
    with tifffile.TiffFile(path) as tif:
        page, levels = tif.pages[0], len(tif.series[0].levels)
        assert page.is_tiled and (page.tilewidth, page.tilelength) == (256, 256)
        assert page.compression == tifffile.COMPRESSION.JPEG
        if tif.is_svs:
            return float(re.search(r"MPP = ([\d.]+)", page.description).group(1)), levels
        if tif.is_ome:
            return float(re.search(r'PhysicalSizeX="([\d.]+)"', tif.ome_metadata).group(1)), levels
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        num, den = page.tags["XResolution"].value
        return 1e4 * den / num, levels


# ---------------------------------------------------------------- cohort file, slides


def test_cohort_file_loads_and_names_existing_files(cohort):
    from histotx.sharding.cohort import load_cohort

    c = load_cohort(cohort)
    assert not c.invalid
    assert [s.id for s in c.samples] == list(VARIANTS)
    assert {s.technology for s in c.samples} == {"visium", "visium_hd", "xenium", "hest", "image_only"}
    assert len({s.patient for s in c.samples}) == 2
    for s in c.samples:
        s.validate()
        for p in (s.slide, s.data):
            if p is not None:
                assert not Path(p).is_absolute() and c.resolve(p).exists(), p


@pytest.mark.parametrize(
    "sample, layout, mpp",
    [
        ("visium", "tiff_subifds", 0.7268),
        ("visium_sr2", "svs", 0.5),
        ("visium_hd", "ome", 0.25),
        ("xenium", "ome", 0.5),
        ("hest", "tiff_pages", 0.5),
        ("image_only", "tiff_subifds", 0.5),
    ],
)
def test_slides_are_tiled_jpeg_pyramids_with_their_mpp(cohort, sample, layout, mpp):
    t = truth(cohort, sample)
    path = cohort.parent / t["slide"]
    assert t["slide_layout"] == layout
    found, levels = slide_mpp(path)
    assert found == pytest.approx(mpp, rel=1e-4)
    assert levels == 3
    with tifffile.TiffFile(path) as tif:
        base = tif.series[0].levels[0]
        assert base.shape[:2] == (t["size_px"][1], t["size_px"][0])
        if layout in ("tiff_subifds", "ome"):
            assert tif.pages[0].subifds and len(tif.pages) == 1
        if layout == "svs":
            assert tif.is_svs and [s.name for s in tif.series] == ["Baseline", "Thumbnail", "Label", "Macro"]
        # The pyramid is the level-0 image reduced, and reads lazily through zarr.
        store = tifffile.imread(path, aszarr=True)
        store.close()
        l0 = tif.series[0].levels[0].asarray()
        l1 = tif.series[0].levels[1].asarray()
        f = l0.shape[0] // l1.shape[0]
        reduced = np.asarray(Image.fromarray(l0).reduce(f)).astype(float)
        assert np.abs(reduced[: l1.shape[0], : l1.shape[1]] - l1).mean() < 4.0
    # Tissue on white glass: a mask thresholding brightness finds both.
    grey = l0.mean(axis=2)
    assert 0.3 < (grey < 225).mean() < 0.9
    assert grey[:20, :20].mean() > 235


def test_regions_share_mean_colour_and_differ_in_morphology(cohort):
    """Mean colour tells nothing (every region within a few levels of the same colour), nuclei do: the
    share of dark (nucleus) pixels and the pixel spread differ between region types. 40 µm windows at
    the spots, averaged per region over both Visium samples."""
    mean, dark, spread, region = [], [], [], []
    for sample in ("visium", "visium_sr2"):
        t = truth(cohort, sample)
        img = tifffile.imread(cohort.parent / t["slide"]).astype(np.float64)
        half = int(20 / t["mpp"])
        inside = np.array(t["sites"]["in_tissue"]) == 1
        for (x, y), r in zip(
            np.array(t["sites"]["xy_px"])[inside].astype(int), np.array(t["sites"]["region"])[inside], strict=True
        ):
            grey = img[y - half : y + half, x - half : x + half].mean(-1)
            # the marker disk (radius 3 px) is a few pixels of 1,600+: it moves no mean by more than 0.5 %
            mean.append(img[y - half : y + half, x - half : x + half].reshape(-1, 3).mean(0))
            dark.append((grey < 120).mean())
            spread.append(grey.std())
            region.append(r)
    mean, dark, spread, region = map(np.array, (mean, dark, spread, region))
    by_region = lambda v: np.stack([v[region == r].mean(0) for r in range(4)])  # noqa: E731
    colour = by_region(mean)
    assert np.abs(colour - colour.mean(0)).max() < 4.0, colour
    d = by_region(dark)
    assert d.max() > 2.5 * d.min(), d  # immune/tumour nuclei crowd, stroma's are sparse and thin
    assert np.ptp(by_region(spread)) > 4.0


def test_crowding_is_drawn_and_drives_its_program():
    """Cell density follows the crowding field, and the crowding genes follow cell density."""
    from histotx.synth.genes import CROWDING_GAMMA, CROWDING_PROGRAM, DENSITY_REF, ExpressionModel, gene_groups
    from histotx.synth.tissue import CELL_DENSITY, Cells, Tissue

    rng = np.random.default_rng(0)
    tissue = Tissue.random(rng, 1500.0, 1500.0)
    cells = Cells.sample(rng, tissue)
    # cells per 50 µm box / expected: ≈ 1 where crowding is high and where it is low alike
    xy = (cells.xy_um // 50).astype(int)
    counts = np.zeros((30, 30))
    np.add.at(counts, (xy[:, 1], xy[:, 0]), 1)
    centres = (np.arange(30) + 0.5) * 50
    cx, cy = np.meshgrid(centres, centres)
    expected = tissue.density_at(cx, cy, tissue.region_at(cx, cy)) * 2500 * tissue.in_tissue(cx, cy)
    ok = expected > 0
    assert np.corrcoef(counts[ok], expected[ok])[0, 1] > 0.7
    assert np.allclose(cells.density, CELL_DENSITY[cells.region] * tissue.crowding.at(*cells.xy_um.T), rtol=1e-5)
    model = ExpressionModel.random(rng)
    rates = model.cell_rates(cells)
    crowded = np.array(model.program) == CROWDING_PROGRAM
    per_cell = rates[:, crowded] / model.loading[cells.region][:, crowded] / model.base[crowded]
    assert np.allclose(per_cell, (cells.density / DENSITY_REF)[:, None] ** CROWDING_GAMMA, rtol=1e-5)
    groups = gene_groups()
    assert sorted(sum(groups.values(), [])) == sorted(g for g, _ in gene_table()[0])
    assert len(groups["region"]) == 48 and len(groups["hidden"]) == 12 and len(groups["crowding"]) == 12


# ---------------------------------------------------------------- Visium, Visium HD


@pytest.mark.parametrize("sample, version", [("visium", 1), ("visium_sr2", 2)])
def test_visium_outs(cohort, sample, version):
    t = truth(cohort, sample)
    spatial = cohort.parent / sample / "outs" / "spatial"
    cols = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    if version == 1:
        assert not (spatial / "tissue_positions.csv").exists()
        pos = pd.read_csv(spatial / "tissue_positions_list.csv", header=None, names=cols)
    else:
        pos = pd.read_csv(spatial / "tissue_positions.csv")
        assert list(pos.columns) == cols
    assert pos.barcode.str.fullmatch(r"[ACGT]{16}-1").all() and pos.barcode.is_unique
    assert ((pos.array_row + pos.array_col) % 2 == 0).all()  # hexagonal lattice indexing
    by_index = pos.set_index(["array_row", "array_col"])
    right = by_index.reindex(list(zip(pos.array_row, pos.array_col + 2, strict=True)))
    ok = right.barcode.notna().to_numpy()
    d = np.hypot(
        right.pxl_col_in_fullres.to_numpy()[ok] - pos.pxl_col_in_fullres.to_numpy()[ok],
        right.pxl_row_in_fullres.to_numpy()[ok] - pos.pxl_row_in_fullres.to_numpy()[ok],
    )
    mpp = t["mpp"]
    assert ok.sum() > 30 and 100.0 / d.mean() == pytest.approx(mpp, rel=0.003)  # 100 µm centre to centre
    sf = json.loads((spatial / "scalefactors_json.json").read_text())
    assert sf["spot_diameter_fullres"] * mpp == pytest.approx(65.0)
    assert sf["fiducial_diameter_fullres"] > sf["spot_diameter_fullres"]
    w, h = t["size_px"]
    for name, key in (
        ("tissue_hires_image.png", "tissue_hires_scalef"),
        ("tissue_lowres_image.png", "tissue_lowres_scalef"),
    ):
        with Image.open(spatial / name) as im:
            assert im.size == (int(np.ceil(w * sf[key])), int(np.ceil(h * sf[key])))
    # Positions and in_tissue agree with the ground truth; the matrix holds exactly the in-tissue spots.
    truth_pos = dict(zip(t["sites"]["id"], zip(t["sites"]["xy_px"], t["sites"]["in_tissue"], strict=True), strict=True))
    for b, x, y, it in zip(pos.barcode, pos.pxl_col_in_fullres, pos.pxl_row_in_fullres, pos.in_tissue, strict=True):
        assert truth_pos[b] == ([x, y], it)
    x, barcodes, names = read_10x(cohort.parent / sample / "outs" / "filtered_feature_bc_matrix.h5")
    assert barcodes == sorted(pos.barcode[pos.in_tissue == 1])
    assert names == [g[0] for g in gene_table()[0]]
    assert x.dtype == np.int32 and x.sum() > 0


def test_visium_hd_binned_outputs(cohort):
    t = truth(cohort, "visium_hd")
    binned = cohort.parent / "visium_hd" / "outs" / "binned_outputs"
    tables = {}
    for size in (2, 8, 16):
        folder = binned / f"square_{size:03d}um"
        table = pq.read_table(folder / "spatial" / "tissue_positions.parquet")
        assert [f.name for f in table.schema] == [
            "barcode",
            "in_tissue",
            "array_row",
            "array_col",
            "pxl_row_in_fullres",
            "pxl_col_in_fullres",
        ]
        assert str(table.schema.field("array_row").type) == "int32"
        assert str(table.schema.field("pxl_col_in_fullres").type) == "double"
        df = table.to_pandas()
        assert df.barcode.str.fullmatch(rf"s_{size:03d}um_\d{{5}}_\d{{5}}-1").all()
        sf = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())
        assert sf["bin_size_um"] == size and sf["microns_per_pixel"] == t["mpp"]
        assert sf["spot_diameter_fullres"] == pytest.approx(size / t["mpp"])
        x, barcodes, _ = read_10x(folder / "filtered_feature_bc_matrix.h5")
        assert barcodes == df.barcode[df.in_tissue == 1].tolist()
        tables[size] = (df, x, barcodes)
    df2 = tables[2][0]
    assert 30_000 <= len(df2) <= 50_000
    step = np.diff(df2.pxl_col_in_fullres.to_numpy()[:3])
    assert step == pytest.approx([2 / t["mpp"]] * 2)  # adjacent 2 µm bins, native (not pooled)
    # Coarser bins are the sums of their 2 µm bins.
    x2 = dict(zip(tables[2][2], tables[2][1], strict=True))
    x8 = dict(zip(tables[8][2], tables[8][1], strict=True))
    checked = 0
    for b8, row in x8.items():
        r8, c8 = map(int, b8[8:-2].split("_"))
        kids = [f"s_002um_{4 * r8 + i:05d}_{4 * c8 + j:05d}-1" for i in range(4) for j in range(4)]
        if all(k in x2 for k in kids):
            assert np.array_equal(sum(x2[k].toarray() for k in kids), row.toarray())
            checked += 1
        if checked == 20:
            break
    assert checked == 20


# ---------------------------------------------------------------- Xenium


def test_xenium_bundle_and_affine(plain_xenium):
    bundle = plain_xenium.parent / "xenium"
    tx = pq.read_table(bundle / "transcripts.parquet")
    assert [f.name for f in tx.schema] == [
        "transcript_id",
        "cell_id",
        "overlaps_nucleus",
        "feature_name",
        "x_location",
        "y_location",
        "z_location",
        "qv",
    ]
    df = tx.to_pandas()
    assert df.transcript_id.is_unique
    assert df.cell_id.str.fullmatch(r"[a-p]{8}-1|UNASSIGNED").all()
    assert 0.1 < (df.cell_id == "UNASSIGNED").mean() < 0.5
    assert 0.03 < (df.qv < 20).mean() < 0.15 and df.qv.max() <= 40
    controls = df.feature_name.isin(XENIUM_CONTROLS)
    assert 0.005 < controls.mean() < 0.05
    assert df.feature_name[controls].str.startswith("NegControlProbe_").any()
    assert df.feature_name[controls].str.startswith("BLANK_").any()
    genes = set(df.feature_name[~controls])
    assert genes == {gene_table()[0][i][0] for i in xenium_panel()} and 35 <= len(genes) <= 50
    assert set(df.overlaps_nucleus) == {0, 1}
    experiment = json.loads((bundle / "experiment.xenium").read_text())
    assert experiment["pixel_size"] == 0.2125
    cells = pq.read_table(bundle / "cells.parquet").to_pandas()
    assert set(df.cell_id) - {"UNASSIGNED"} <= set(cells.cell_id)

    m = np.loadtxt(bundle / "xenium_he_imagealignment.csv", delimiter=",")
    assert m.shape == (3, 3) and np.allclose(m[2], [0, 0, 1])
    angle = np.degrees(np.arctan2(m[1, 0], m[0, 0]))
    scale = np.hypot(m[0, 0], m[1, 0])
    assert abs(angle) > 5 and abs(scale - 1) > 0.5 and np.abs(m[:2, 2]).min() > 100  # rotation, scale, shift
    # H&E px size = pixel_size × |M·(0,1) − M·(0,0)|, and it is the OME-TIFF's own.
    he_mpp, _ = slide_mpp(bundle / "xenium_he_image.ome.tif")
    assert experiment["pixel_size"] * np.linalg.norm(m[:2, 1]) == pytest.approx(he_mpp)
    # inv(M) brings the stored µm back onto the H&E positions the tissue was drawn at.
    t = truth(plain_xenium, "xenium")
    sel = df.set_index("transcript_id").loc[t["sites"]["id"]]
    um = sel[["x_location", "y_location"]].to_numpy(np.float64)
    he = (np.linalg.inv(m) @ np.vstack([um.T / 0.2125, np.ones(len(um))]))[:2].T
    assert len(he) > 200 and np.abs(he - np.array(t["sites"]["xy_px"])).max() < 0.01
    assert (sel.qv >= 20).all() and not sel.feature_name.isin(XENIUM_CONTROLS).any()


def test_xenium_markers_mode_writes_only_marked_gene_molecules(cohort):
    df = pq.read_table(cohort.parent / "xenium" / "transcripts.parquet").to_pandas()
    kept = df[(df.qv >= 20) & ~df.feature_name.isin(XENIUM_CONTROLS)]
    assert sorted(kept.transcript_id) == sorted(truth(cohort, "xenium")["sites"]["id"])


# ---------------------------------------------------------------- HEST


def test_hest_layout(cohort):
    import anndata as ad

    root = cohort.parent / "hest"
    t = truth(cohort, "hest")
    adata = ad.read_h5ad(root / "st" / "hest.h5ad")
    assert set(adata.obs.columns) >= {"in_tissue", "array_row", "array_col", "pxl_col_in_fullres", "pxl_row_in_fullres"}
    xy = np.asarray(adata.obsm["spatial"])
    assert np.array_equal(xy, adata.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float))
    assert xy.tolist() == t["sites"]["xy_px"] and list(adata.obs_names) == t["sites"]["id"]
    assert list(adata.var_names) == [g[0] for g in gene_table()[0]]
    assert all(is_ensembl_id(i) for i in adata.var["gene_ids"])
    meta = json.loads((root / "metadata" / "hest.json").read_text())
    assert meta["pixel_size_um_estimated"] == t["mpp"] and meta["spot_diameter"] == 55.0
    assert meta["inter_spot_dist"] == 100.0 and meta["st_technology"] == "Visium"
    assert {"organ", "oncotree_code", "patient"} <= set(meta)
    assert (root / "wsis" / "hest.tif").exists() and not (cohort.parent / "hest" / "hest.tif").exists()


# ---------------------------------------------------------------- biology


def test_expression_follows_regions_and_the_hidden_state(cohort):
    t = truth(cohort, "visium")
    x, barcodes, names = read_10x(cohort.parent / "visium" / "outs" / "filtered_feature_bc_matrix.h5")
    index = {b: i for i, b in enumerate(t["sites"]["id"])}
    region = np.array([t["sites"]["region"][index[b]] for b in barcodes])
    hidden = np.array([t["sites"]["hidden"][index[b]] for b in barcodes])
    total = np.asarray(x.sum(axis=1)).ravel()

    def share(program: str) -> np.ndarray:
        cols = [names.index(g) for g in t["programs"][program]]
        return np.asarray(x[:, cols].sum(axis=1)).ravel() / total

    for r, name in enumerate(t["regions"]):
        s = share(name)
        here, elsewhere = s[region == r].mean(), s[region != r].mean()
        assert here > 2.5 * elsewhere, (name, here, elsewhere)
    # The hypoxia program follows the hidden state, which region types (all the image shows) do not explain.
    s = share(t["hidden_program"])
    onehot = np.eye(4)[region]
    resid = s - onehot @ np.linalg.lstsq(onehot, s, rcond=None)[0]
    r2_region = 1 - resid.var() / s.var()
    assert np.corrcoef(s, hidden)[0, 1] > 0.6
    assert r2_region < 0.4


def test_gene_panel_is_real_looking():
    genes, program = gene_table()
    assert 60 <= len(genes) <= 120
    assert len({g[0] for g in genes}) == len(genes) and len({g[1] for g in genes}) == len(genes)
    assert all(is_ensembl_id(g[1]) for g in genes)
    assert ("EPCAM", "ENSG00000119888") in genes and ("PTPRC", "ENSG00000081237") in genes
    panel = xenium_panel()
    assert 35 <= len(panel) <= 50 and all(program[i] != "housekeeping" for i in panel)


# ---------------------------------------------------------------- markers


@pytest.mark.parametrize("sample", ["visium", "visium_sr2", "visium_hd", "xenium", "hest"])
def test_markers_sit_at_truth_positions(cohort, sample):
    t = truth(cohort, sample)
    assert t["markers"]
    img = tifffile.imread(cohort.parent / t["slide"]).astype(np.int32)
    xy = np.array(t["sites"]["xy_px"])
    assert len(xy) >= 30
    green = (img[..., 1] - (img[..., 0] + img[..., 2]) // 2) > 100
    for x, y in xy:
        i, j = int(np.floor(x)), int(np.floor(y))
        win = green[j - 6 : j + 7, i - 6 : i + 7]
        jj, ii = np.nonzero(win)
        assert len(ii) >= 15, (sample, x, y)
        # Pixel i covers [i, i+1): the painted disk's centroid is the continuous site position.
        assert abs(ii.mean() + 0.5 + i - 6 - x) < 0.6 and abs(jj.mean() + 0.5 + j - 6 - y) < 0.6, (sample, x, y)
    # No stray markers: green pixels are about one disk per site.
    disk = np.pi * t["marker_radius_px"] ** 2
    assert green.sum() < 1.3 * disk * len(xy)


def test_no_markers_unless_asked(plain_xenium, cohort):
    for root, sample in ((plain_xenium, "xenium"), (cohort, "image_only")):
        t = truth(root, sample)
        assert not t["markers"]
        img = tifffile.imread(root.parent / t["slide"]).astype(np.int32)
        assert ((img[..., 1] - (img[..., 0] + img[..., 2]) // 2) > 100).sum() == 0


# ---------------------------------------------------------------- determinism, CLI, errors


def _contents(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_subsets_match(cohort, tmp_path):
    again = generate_cohort(tmp_path / "again", seed=SEED, markers=True)
    a, b = _contents(cohort.parent), _contents(again.parent)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []  # TIFF, h5, h5ad, parquet, csv, json, png: all identical
    # A subset cohort holds the very same samples; another seed draws another cohort.
    sub = generate_cohort(tmp_path / "sub", seed=SEED, markers=True, technologies=("hest",))
    assert (sub.parent / "hest" / "st" / "hest.h5ad").read_bytes() == a["hest/st/hest.h5ad"]
    other = generate_cohort(tmp_path / "other", seed=SEED + 1, technologies=("hest",))
    assert (other.parent / "hest" / "st" / "hest.h5ad").read_bytes() != a["hest/st/hest.h5ad"]


def test_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="histotx")
    register_cli(parser.add_subparsers(dest="command"))
    help_text = parser._subparsers._group_actions[0].choices["synth"].format_help()
    for option in ("--seed", "--size", "--markers", "small", "medium"):
        assert option in help_text
    args = parser.parse_args(
        ["synth", str(tmp_path / "out"), "--seed", "3", "--technologies", "image_only", "--markers"]
    )
    assert args.func(args) == 0
    path = tmp_path / "out" / "cohort.yaml"
    assert capsys.readouterr().out.strip() == str(path)
    assert "technology: image_only" in path.read_text()


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="size"):
        generate_cohort(tmp_path, size="huge")
    with pytest.raises(ValueError, match="merfish"):
        generate_cohort(tmp_path, technologies=("visium", "merfish"))


def test_replicates_are_new_samples_dealt_to_patients(tmp_path):
    """Replicate 0 is the plain cohort's sample; later replicates are other tissues, dealt out to patients."""
    path = generate_cohort(tmp_path / "r", seed=SEED, technologies=("image_only",), replicates=2, patients=2)
    samples = yaml.safe_load(path.read_text())["samples"]
    assert [(s["id"], s["patient"]) for s in samples] == [("image_only", "P01"), ("image_only_r1", "P02")]
    plain = generate_cohort(tmp_path / "p", seed=SEED, technologies=("image_only",))
    first = [tifffile.imread(c.parent / s["slide"]) for c, s in ((path, samples[0]), (path, samples[1]))]
    assert np.array_equal(first[0], tifffile.imread(plain.parent / "image_only" / "image_only.tif"))
    assert not np.array_equal(first[0], first[1])
