"""Technology readers on the real files in ../shared/data, plus fixtures built from them in tmp_path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from histotx.sharding.cohort import Cohort, CohortSample, nest_options
from histotx.sharding.errors import InputError
from histotx.sharding.readers import ReaderOptions, read_genes, read_sites, slide_mpp_hint, slide_path
from histotx.sharding.tenx import read_10x_h5
from histotx.sharding.xenium import is_control

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VISIUM = DATA / "scanpy-visium" / "visium_data" / "1.0.0"
PROBE_H5 = DATA / "scanpy-visium" / "visium_data" / "2.1.0" / "raw_probe_bc_matrix.h5"
XENIUM = DATA / "moleculeexperiment-xenium" / "xenium_V1_FF_Mouse_Brain"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real test data not found at {DATA}")

LOWRES = 0.045004502
HIRES = 0.150015
MPP_LATTICE = 0.72684  # 100 µm / 137.5817 px, the mean over all same-row neighbour pairs
PIXEL_SIZE = 0.2125
# SOURCE.md: (transcripts, control rows, qv < 20); 4 of the controls also have qv < 20 in each sample.
XENIUM_COUNTS = {"sample1": (962, 5, 185), "sample2": (777, 4, 185)}


def run(tmp_path: Path, opts: ReaderOptions | None = None, **sample):
    """read_sites for one sample of a cohort file that lives in tmp_path."""
    s = CohortSample(**nest_options(sample))  # options given flat, as older cohort files do
    cohort = Cohort(path=tmp_path / "cohort.yaml", samples=[s])
    return read_sites(s, cohort, opts or ReaderOptions()), s, cohort


def visium(tmp_path: Path, data, opts: ReaderOptions | None = None, **sample):
    return run(tmp_path, opts, id="v", technology="visium", slide="x.tif", data=str(data), **sample)


def xenium(tmp_path: Path, data, opts: ReaderOptions | None = None, **sample):
    return run(tmp_path, opts, id="x", technology="xenium", slide="he.tif", data=str(data), **sample)


def raises(match: str, path_part: str):
    """An InputError naming the file (path_part) and the problem (match)."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(InputError, match=match)
            self.info = self.ctx.__enter__()

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            assert path_part in str(self.info.value), f"{path_part!r} not named in: {self.info.value}"
            return handled

    return _Check()


def write_10x_h5(path: Path, counts: sp.spmatrix, barcodes, ids, names) -> None:
    """A 10x h5 (barcodes × genes counts) in the Space Ranger layout."""
    csc = sp.csc_matrix(counts.T)  # features × barcodes, one indptr entry per barcode
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["data"], m["indices"], m["indptr"] = csc.data, csc.indices, csc.indptr
        m["shape"] = np.array(csc.shape, dtype=np.int32)
        m["barcodes"] = np.array(barcodes, dtype="S")
        m["features/id"] = np.array(ids, dtype="S")
        m["features/name"] = np.array(names, dtype="S")
        m["features/feature_type"] = np.array(["Gene Expression"] * len(ids), dtype="S")


def real_matrix():
    return read_10x_h5(VISIUM / "filtered_feature_bc_matrix.h5")


def real_positions() -> pd.DataFrame:
    from histotx.sharding.visium import read_positions

    return read_positions(VISIUM / "spatial" / "tissue_positions_list.csv")


def copy_visium(tmp_path: Path) -> Path:
    outs = tmp_path / "outs"
    shutil.copytree(VISIUM, outs)
    return outs


# --------------------------------------------------------------------------------------------- Visium
def test_visium_sr1_real_fullres(tmp_path):
    sites, s, cohort = visium(tmp_path, VISIUM)
    pos = real_positions().set_index("barcode")
    m = real_matrix()
    assert sites.n_sites == 100 and len(sites.genes) == 100  # every matrix barcode is in tissue
    assert sites.dropped == {}
    assert sites.footprint_shape == "disk" and sites.footprint_um == 55.0
    assert sites.mpp_estimate == pytest.approx(MPP_LATTICE, abs=5e-5)
    assert slide_mpp_hint(s, cohort) == pytest.approx(sites.mpp_estimate)
    # x = pxl_col, y = pxl_row, in the order of the matrix
    np.testing.assert_array_equal(sites.xy_px[:, 0], pos.loc[m.barcodes, "pxl_col_in_fullres"].to_numpy())
    np.testing.assert_array_equal(sites.xy_px[:, 1], pos.loc[m.barcodes, "pxl_row_in_fullres"].to_numpy())
    assert sites.counts.sum() == pytest.approx(m.counts.sum()) and sites.counts.nnz == 656
    # names in this subset are Ensembl ids: kept as ids, not as symbols
    assert all(sym == "" and eid.startswith("ENSG") for sym, eid in sites.genes)
    assert read_genes(s, cohort) == sites.genes


def test_visium_lowres_and_hires_scaling(tmp_path):
    full, _, _ = visium(tmp_path, VISIUM)
    for scale, factor in (("lowres", LOWRES), ("hires", HIRES)):
        sites, s, cohort = visium(tmp_path, VISIUM, image_scale=scale)
        np.testing.assert_allclose(sites.xy_px, full.xy_px * factor)
        assert sites.mpp_estimate == pytest.approx(full.mpp_estimate / factor)
        assert slide_mpp_hint(s, cohort) == pytest.approx(full.mpp_estimate / factor)
    # the real lowres H&E is 600×600: every spot falls inside it
    lowres, _, _ = visium(tmp_path, VISIUM, image_scale="lowres")
    assert lowres.xy_px.min() > 0 and lowres.xy_px.max() < 600


def test_visium_sr2_header_csv_and_in_tissue_filter(tmp_path):
    outs = copy_visium(tmp_path)
    pos = real_positions()
    (outs / "spatial" / "tissue_positions_list.csv").unlink()
    m = real_matrix()
    off = pos["barcode"].isin(m.barcodes[:7])
    pos.loc[off, "in_tissue"] = 0
    pos.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)  # SR ≥ 2: with header
    sites, _, _ = visium(tmp_path, outs)
    assert sites.n_sites == 93 and sites.dropped == {"not_in_tissue": 7}
    assert sites.info["positions"] == "tissue_positions.csv"
    assert sites.mpp_estimate == pytest.approx(MPP_LATTICE, abs=5e-5)
    everything, _, _ = visium(tmp_path, outs, ReaderOptions(in_tissue_only=False))
    assert everything.n_sites == 100 and everything.dropped == {}


def test_visium_barcodes_without_position_are_dropped_and_counted(tmp_path):
    outs = copy_visium(tmp_path)
    pos = real_positions()
    m = real_matrix()
    pos = pos[~pos["barcode"].isin(m.barcodes[:3])]
    pos.to_csv(outs / "spatial" / "tissue_positions_list.csv", index=False, header=False)
    sites, _, _ = visium(tmp_path, outs)
    assert sites.n_sites == 97 and sites.dropped == {"no_position": 3}

    pos["barcode"] = pos["barcode"].str.replace("-1", "-2")  # positions of another library
    pos.to_csv(outs / "spatial" / "tissue_positions_list.csv", index=False, header=False)
    with raises("none of the 100 barcodes", "tissue_positions_list.csv"):
        visium(tmp_path, outs)


def test_probe_level_matrix_is_summed_to_genes():
    m = read_10x_h5(PROBE_H5)
    with h5py.File(PROBE_H5) as f:
        kept = f["matrix/features/filtered_probes"][()]
        gene_of_probe = f["matrix/features/gene_id"][()].astype(str)
        raw = sp.csc_matrix(
            (f["matrix/data"][()], f["matrix/indices"][()], f["matrix/indptr"][()]), shape=tuple(f["matrix/shape"][()])
        ).T.tocsr()
    assert m.probe_level and m.counts.shape == (4987, len(set(gene_of_probe[kept])))
    assert len({eid for _, eid in m.genes}) == len(m.genes)  # one column per gene
    assert m.counts.sum() == raw[:, kept].sum()  # deprecated / filtered-out probes are not counted
    j = next(j for j, (sym, _) in enumerate(m.genes) if sym == "Raf1")
    assert m.genes[j] == ("Raf1", "ENSMUSG00000000441")
    probes = np.flatnonzero(kept & (gene_of_probe == "ENSMUSG00000000441"))
    np.testing.assert_array_equal(m.counts[:, j].toarray().ravel(), np.asarray(raw[:, probes].sum(axis=1)).ravel())


def test_visium_outs_with_only_a_probe_matrix(tmp_path):
    outs = tmp_path / "outs"
    (outs / "spatial").mkdir(parents=True)
    shutil.copy(VISIUM / "spatial" / "scalefactors_json.json", outs / "spatial")
    shutil.copy(PROBE_H5, outs)
    with h5py.File(PROBE_H5) as f:
        barcodes = f["matrix/barcodes"][()].astype(str)
        in_tissue = f["matrix/filtered_barcodes"][()].astype(int)
    n = len(barcodes)  # a made-up lattice: the barcodes of this file are not in the 1.0 positions
    pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": in_tissue,
            "array_row": np.arange(n) // 64,
            "array_col": 2 * (np.arange(n) % 64),
            "pxl_row_in_fullres": 120 * (np.arange(n) // 64),
            "pxl_col_in_fullres": 200 * (np.arange(n) % 64),
        }
    ).to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    sites, _, _ = visium(tmp_path, outs)
    assert sites.n_sites == in_tissue.sum() == 2348 and sites.dropped == {"not_in_tissue": n - 2348}
    assert sites.info["matrix"] == "raw_probe_bc_matrix.h5" and sites.mpp_estimate == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------ Visium HD
def make_visium_hd(tmp_path: Path) -> Path:
    """HD outs from the real Visium files: the real counts on 2 µm and 8 µm bins (8 µm: 30 bins)."""
    outs = tmp_path / "hd" / "outs"
    m = real_matrix()
    genes = [eid for _, eid in m.genes]
    for size, n in ((2, 100), (8, 30)):
        folder = outs / "binned_outputs" / f"square_{size:03d}um"
        (folder / "spatial").mkdir(parents=True)
        rows, cols = np.arange(n) // 10, np.arange(n) % 10
        barcodes = [f"s_{size:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)]
        write_10x_h5(folder / "filtered_feature_bc_matrix.h5", m.counts[:n], barcodes, genes, genes)
        mpp = 0.27382
        table = pa.table(
            {
                "barcode": barcodes + ["s_002um_09999_09999-1"],
                "in_tissue": np.r_[np.ones(n, np.int32), 0],
                "array_row": np.r_[rows, 9999].astype(np.int32),
                "array_col": np.r_[cols, 9999].astype(np.int32),
                "pxl_row_in_fullres": np.r_[rows * size / mpp + 100.25, 1.0],
                "pxl_col_in_fullres": np.r_[cols * size / mpp + 50.5, 1.0],
            }
        )
        pq.write_table(table, folder / "spatial" / "tissue_positions.parquet")
        sf = {
            "spot_diameter_fullres": size / mpp,
            "bin_size_um": float(size),
            "microns_per_pixel": mpp,
            "tissue_lowres_scalef": 0.0125,
            "tissue_hires_scalef": 0.125,
            "fiducial_diameter_fullres": 1000.0,
        }
        (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf))
    return outs


def test_visium_hd_native_bins(tmp_path):
    outs = make_visium_hd(tmp_path)
    sites, s, cohort = run(tmp_path, id="hd", technology="visium_hd", slide="x.tif", data=str(outs), bin_size_um=2)
    assert sites.n_sites == 100 and sites.footprint_shape == "square" and sites.footprint_um == 2.0
    assert sites.mpp_estimate == pytest.approx(0.27382)
    np.testing.assert_allclose(sites.xy_px[11], [1 * 2 / 0.27382 + 50.5, 1 * 2 / 0.27382 + 100.25])
    assert sites.counts.sum() == pytest.approx(real_matrix().counts.sum())
    assert read_genes(s, cohort) == sites.genes

    hires, s, cohort = run(
        tmp_path, id="hd", technology="visium_hd", slide="x.tif", data=str(outs), bin_size_um=8, image_scale="hires"
    )
    assert hires.n_sites == 30 and hires.footprint_um == 8.0
    assert hires.mpp_estimate == pytest.approx(0.27382 / 0.125) == slide_mpp_hint(s, cohort)
    np.testing.assert_allclose(hires.xy_px[11], np.array([8 / 0.27382 + 50.5, 8 / 0.27382 + 100.25]) * 0.125)


def test_visium_hd_missing_bin_size(tmp_path):
    outs = make_visium_hd(tmp_path)
    with raises(r"no 16 µm binned output \(found: square_002um, square_008um\)", "square_016um"):
        run(tmp_path, id="hd", technology="visium_hd", slide="x.tif", data=str(outs), bin_size_um=16)


# --------------------------------------------------------------------------------------------- Xenium
def real_transcripts(sample: str) -> pd.DataFrame:
    return pd.read_csv(XENIUM / sample / "transcripts.csv", index_col=0)


def copy_xenium(tmp_path: Path, sample: str = "sample1", keep_csv: bool = True) -> Path:
    bundle = tmp_path / sample
    bundle.mkdir()
    shutil.copy(XENIUM / sample / "experiment.xenium", bundle)
    if keep_csv:
        shutil.copy(XENIUM / sample / "transcripts.csv", bundle)
    return bundle


@pytest.mark.parametrize("sample", ["sample1", "sample2"])
def test_xenium_real_csv_controls_and_low_qv_dropped(tmp_path, sample):
    total, controls, low_qv = XENIUM_COUNTS[sample]
    sites, s, cohort = run(tmp_path, id=sample, technology="xenium", slide="he.tif", data=str(XENIUM / sample))
    df = real_transcripts(sample)
    assert len(df) == total and df.feature_name.map(is_control).sum() == controls and (df.qv < 20).sum() == low_qv
    both = int((df.feature_name.map(is_control) & (df.qv < 20)).sum())
    assert sites.dropped == {"control_probe": controls, "low_qv": low_qv - both}
    assert sites.n_sites == total - controls - (low_qv - both)
    assert sites.footprint_shape == "point" and sites.footprint_um == 0.0
    assert sites.panel == "Xenium Mouse Brain GEX"
    # one molecule per site, count 1; no control gene in the panel
    assert np.all(np.diff(sites.counts.indptr) == 1) and np.all(sites.counts.data == 1)
    assert not any(is_control(sym) for sym, _ in sites.genes)
    assert read_genes(s, cohort) == sites.genes
    # no alignment file: the slide is the morphology frame
    kept = df[~df.feature_name.map(is_control) & (df.qv >= 20)]
    np.testing.assert_allclose(sites.xy_px, kept[["x_location", "y_location"]].to_numpy() / PIXEL_SIZE)
    genes = [sites.genes[j][0] for j in sites.counts.indices]
    assert genes == kept.feature_name.tolist()
    assert sites.mpp_estimate == PIXEL_SIZE == slide_mpp_hint(s, cohort)


def test_xenium_qv_threshold_is_an_option(tmp_path):
    sites, _, _ = xenium(tmp_path, XENIUM / "sample1", ReaderOptions(qv_min=0.0))
    assert sites.n_sites == 962 - 5 and sites.dropped == {"control_probe": 5}


@pytest.mark.parametrize("fmt", ["parquet", "csv.gz"])
def test_xenium_parquet_and_gzip_with_string_cell_ids(tmp_path, fmt):
    df = real_transcripts("sample1")
    df["cell_id"] = np.where(df.cell_id > 0, df.cell_id.map(lambda c: f"aa{c:06x}-1"), "UNASSIGNED")
    bundle = copy_xenium(tmp_path, keep_csv=False)
    if fmt == "parquet":  # Xenium 1.x wrote feature_name as binary
        table = pa.Table.from_pandas(df, preserve_index=False)
        table = table.set_column(
            table.schema.get_field_index("feature_name"),
            "feature_name",
            pa.array(df.feature_name.str.encode("utf-8"), pa.binary()),
        )
        pq.write_table(table, bundle / "transcripts.parquet")
    else:
        df.to_csv(bundle / "transcripts.csv.gz", index=False)
    sites, _, _ = xenium(tmp_path, bundle)
    reference, _, _ = xenium(tmp_path, XENIUM / "sample1")
    assert sites.info["transcripts"] == f"transcripts.{fmt}"
    np.testing.assert_allclose(sites.xy_px, reference.xy_px)
    assert sites.genes == reference.genes and (sites.counts != reference.counts).nnz == 0
    assert sites.dropped == reference.dropped


def test_xenium_is_gene_column_marks_controls(tmp_path):
    df = real_transcripts("sample1")
    df["is_gene"] = ~df.feature_name.map(is_control)
    df["feature_name"] = df.feature_name.str.replace("BLANK_", "SomeNewControl_")  # a prefix we do not know
    bundle = copy_xenium(tmp_path, keep_csv=False)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), bundle / "transcripts.parquet")
    sites, s, cohort = xenium(tmp_path, bundle)
    assert sites.dropped == {"control_probe": 5, "low_qv": 181} and sites.n_sites == 776
    assert not any(sym.startswith("SomeNewControl_") for sym, _ in sites.genes)
    assert read_genes(s, cohort) == sites.genes


def affine(theta_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    t = np.deg2rad(theta_deg)
    c, s = scale * np.cos(t), scale * np.sin(t)
    return np.array([[c, -s, tx], [s, c, ty], [0, 0, 1]])


def test_xenium_affine_maps_he_to_morphology_so_inverse_is_applied(tmp_path):
    bundle = copy_xenium(tmp_path)
    m = affine(30.0, 1.7, 850.0, -420.0)  # H&E px → morphology px
    np.savetxt(bundle / "Xenium_V1_FF_he_imagealignment.csv", m, delimiter=",")
    sites, s, cohort = xenium(tmp_path, bundle)
    plain, _, _ = xenium(tmp_path, XENIUM / "sample1")
    morph = plain.xy_px  # µm / pixel_size
    # forward M of the result gives back the morphology px: the inverse was applied
    back = np.c_[sites.xy_px, np.ones(len(morph))] @ m.T
    np.testing.assert_allclose(back[:, :2], morph, atol=1e-6)
    expected = (np.linalg.inv(m) @ np.c_[morph, np.ones(len(morph))].T).T[:, :2]
    np.testing.assert_allclose(sites.xy_px, expected, atol=1e-6)
    wrong = (m @ np.c_[morph, np.ones(len(morph))].T).T[:, :2]  # the classic bug
    assert np.min(np.linalg.norm(sites.xy_px - wrong, axis=1)) > 1000
    assert sites.info["alignment"] == "Xenium_V1_FF_he_imagealignment.csv"
    # one H&E px spans 1.7 morphology px
    assert sites.mpp_estimate == pytest.approx(PIXEL_SIZE * 1.7) == slide_mpp_hint(s, cohort)


def test_xenium_alignment_named_in_the_cohort_is_resolved_against_it(tmp_path):
    m = affine(-12.0, 0.5, 10.0, 20.0)
    np.savetxt(tmp_path / "align.csv", m, delimiter=",")
    sites, s, cohort = xenium(tmp_path, XENIUM / "sample2", alignment="align.csv")
    df = real_transcripts("sample2")
    kept = df[~df.feature_name.map(is_control) & (df.qv >= 20)][["x_location", "y_location"]].to_numpy() / PIXEL_SIZE
    np.testing.assert_allclose((np.c_[sites.xy_px, np.ones(len(kept))] @ m.T)[:, :2], kept, atol=1e-6)
    assert slide_mpp_hint(s, cohort) == pytest.approx(PIXEL_SIZE * 0.5)


# ----------------------------------------------------------------------------------------------- HEST
def make_hest(tmp_path: Path, hid: str = "TENX01", metadata: bool = True) -> Path:
    import anndata

    root = tmp_path / "hest"
    for d in ("st", "wsis", "metadata"):
        (root / d).mkdir(parents=True, exist_ok=True)
    m = real_matrix()
    pos = real_positions().set_index("barcode").loc[m.barcodes]
    in_tissue = np.ones(m.counts.shape[0], dtype=int)
    in_tissue[:4] = 0
    symbols = [f"GENE{i}" for i in range(len(m.genes))]
    adata = anndata.AnnData(
        X=m.counts.tocsr(),
        obs=pd.DataFrame({"in_tissue": in_tissue}, index=list(m.barcodes)),
        var=pd.DataFrame({"gene_ids": [eid for _, eid in m.genes]}, index=symbols),
    )
    adata.obsm["spatial"] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
    adata.write_h5ad(root / "st" / f"{hid}.h5ad")
    (root / "wsis" / f"{hid}.tif").write_bytes(b"")
    if metadata:
        meta = {
            "pixel_size_um_estimated": 0.7268,
            "spot_diameter": 55.0,
            "inter_spot_dist": 100.0,
            "st_technology": "Visium",
        }
        (root / "metadata" / f"{hid}.json").write_text(json.dumps(meta))
    return root


def test_hest_sample(tmp_path):
    root = make_hest(tmp_path)
    sites, s, cohort = run(tmp_path, id="TENX01", technology="hest", data=str(root))
    m = real_matrix()
    assert sites.n_sites == 96 and sites.dropped == {"not_in_tissue": 4}
    assert sites.footprint_shape == "disk" and sites.footprint_um == 55.0
    assert sites.mpp_estimate == 0.7268 == slide_mpp_hint(s, cohort)
    assert sites.genes[0] == ("GENE0", m.genes[0][1]) and sites.panel == "Visium"
    pos = real_positions().set_index("barcode").loc[m.barcodes[4:]]
    np.testing.assert_array_equal(sites.xy_px, pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float))
    assert (sites.counts != m.counts[4:]).nnz == 0
    assert slide_path(s, cohort) == root / "wsis" / "TENX01.tif"
    assert read_genes(s, cohort) == sites.genes
    # `data` may name the h5ad itself
    by_file, _, _ = run(tmp_path, id="any", technology="hest", data=str(root / "st" / "TENX01.h5ad"))
    assert by_file.n_sites == 96


def test_image_only_has_no_sites(tmp_path):
    sites, s, cohort = run(tmp_path, id="img", technology="image_only", slide="x.svs")
    assert sites is None and read_genes(s, cohort) == [] and slide_mpp_hint(s, cohort) is None
    assert slide_path(s, cohort) == tmp_path / "x.svs"


# -------------------------------------------------------------------------------- bad-input catalogue
def test_bad_missing_scalefactors(tmp_path):
    outs = copy_visium(tmp_path)
    (outs / "spatial" / "scalefactors_json.json").unlink()
    with raises("scalefactors missing", "scalefactors_json.json"):
        visium(tmp_path, outs)


def test_bad_positions_file_missing(tmp_path):
    outs = copy_visium(tmp_path)
    (outs / "spatial" / "tissue_positions_list.csv").unlink()
    with raises("positions file missing", str(outs / "spatial")):
        visium(tmp_path, outs)


def test_bad_nan_and_negative_counts(tmp_path):
    outs = copy_visium(tmp_path)
    h5 = outs / "filtered_feature_bc_matrix.h5"
    with h5py.File(h5, "r+") as f:
        f["matrix/data"][3] = np.nan
    with raises("1 NaN/inf counts", "filtered_feature_bc_matrix.h5"):
        visium(tmp_path, outs)
    with h5py.File(h5, "r+") as f:
        f["matrix/data"][3] = -2.0
    with raises("1 negative counts", "filtered_feature_bc_matrix.h5"):
        visium(tmp_path, outs)


def test_bad_matrix_groups(tmp_path):
    outs = copy_visium(tmp_path)
    h5 = outs / "filtered_feature_bc_matrix.h5"
    whole = h5.read_bytes()
    h5.write_bytes(whole[: len(whole) // 2])
    with raises("truncated file", "filtered_feature_bc_matrix.h5"):
        visium(tmp_path, outs)
    h5.write_bytes(whole)
    with h5py.File(h5, "r+") as f:
        del f["matrix/features/name"]
    with raises("lacks matrix/features/name", "filtered_feature_bc_matrix.h5"):
        visium(tmp_path, outs)
    with h5py.File(h5, "w") as f:
        f.create_group("GRCh38")
    with raises("no 'matrix' group", "filtered_feature_bc_matrix.h5"):
        visium(tmp_path, outs)
    h5.write_bytes(b"not hdf5 at all")
    with raises("not a readable HDF5 file", "filtered_feature_bc_matrix.h5"):
        visium(tmp_path, outs)


def test_bad_inconsistent_or_empty_matrix(tmp_path):
    outs = copy_visium(tmp_path)
    h5 = outs / "filtered_feature_bc_matrix.h5"
    with h5py.File(h5, "r+") as f:
        f["matrix/shape"][1] = 99
    with raises("disagrees with", "filtered_feature_bc_matrix.h5"):
        visium(tmp_path, outs)
    m = real_matrix()
    ids = [e for _, e in m.genes]
    write_10x_h5(h5, sp.csr_matrix(m.counts.shape, dtype=np.float32), m.barcodes, ids, ids)
    with raises("empty matrix", "filtered_feature_bc_matrix.h5"):
        visium(tmp_path, outs)


def test_bad_xenium_transcripts_missing_columns(tmp_path):
    bundle = copy_xenium(tmp_path, keep_csv=False)
    real_transcripts("sample1").drop(columns=["qv"]).to_csv(bundle / "transcripts.csv")
    with raises(r"lacks columns \['qv'\]", "transcripts.csv"):
        xenium(tmp_path, bundle)
    (bundle / "transcripts.csv").unlink()
    no_x = real_transcripts("sample1").drop(columns=["x_location"])
    pq.write_table(pa.Table.from_pandas(no_x), bundle / "transcripts.parquet")
    with raises(r"lacks columns \['x_location'\]", "transcripts.parquet"):
        xenium(tmp_path, bundle)


def test_bad_xenium_experiment_missing(tmp_path):
    bundle = copy_xenium(tmp_path)
    (bundle / "experiment.xenium").unlink()
    with raises("experiment.xenium missing", "experiment.xenium"):
        xenium(tmp_path, bundle)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("1,0,0\n0,1,0\n", "wrong shape: expected 3×3 numbers, found 2×3"),
        ("1,0,0,0\n0,1,0,0\n0,0,1,0\n", "wrong shape: expected 3×3 numbers, found 3×4"),
        ("1,0,a\n0,1,0\n0,0,1\n", "not numeric"),
        ("1,2,0\n2,4,0\n0,0,1\n", "not invertible"),
        ("1,0,0\n0,1,0\n50,60,1\n", "transposed"),
    ],
)
def test_bad_alignment_file(tmp_path, text, problem):
    bundle = copy_xenium(tmp_path)
    (bundle / "s_he_imagealignment.csv").write_text(text)
    with raises(problem, "s_he_imagealignment.csv"):
        xenium(tmp_path, bundle)


def test_bad_unreadable_h5ad(tmp_path):
    root = make_hest(tmp_path)
    (root / "st" / "TENX01.h5ad").write_bytes(b"\x89HDF\r\n garbage")
    with raises("unreadable h5ad", "TENX01.h5ad"):
        run(tmp_path, id="TENX01", technology="hest", data=str(root))
    with raises("unreadable h5ad", "TENX01.h5ad"):
        read_genes(CohortSample(id="TENX01", technology="hest", data=str(root)), Cohort(path=tmp_path / "c.yaml"))


def test_bad_hest_metadata_missing(tmp_path):
    root = make_hest(tmp_path, metadata=False)
    with raises("HEST metadata missing", "TENX01.json"):
        run(tmp_path, id="TENX01", technology="hest", data=str(root))


def test_bad_data_folder_missing(tmp_path):
    with raises("data folder not found", "nowhere"):
        visium(tmp_path, "nowhere")
