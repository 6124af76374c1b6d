"""Sites banded on disk: the same sites as in memory, whatever the chunking, and the right ones per box."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

import histotx.sharding.bands as bands
import histotx.sharding.xenium as xenium
from histotx.sharding.bands import BandedSites
from histotx.sharding.sites import Sites


def _boxes(n: int, side: float) -> list[tuple[float, float, float, float]]:
    """A grid of tile boxes visited row by row (as the pipeline's runs are)."""
    step = side / n
    return [(c * step, r * step, (c + 1) * step, (r + 1) * step) for r in range(n) for c in range(n)]


@pytest.mark.parametrize("unit", [True, False])
def test_banded_sites_match_in_memory(monkeypatch, unit):
    monkeypatch.setattr(bands, "FLUSH_SITES", 700)  # many flushes, each touching many bands
    monkeypatch.setattr(bands, "FLUSH_ENTRIES", 1500)  # counts of 6 genes a site: flushed by entries first
    rng = np.random.default_rng(0)
    n, n_genes, side = 5000, 30, 1000.0
    xy = rng.uniform(-50, side + 50, (n, 2))  # some off the slide
    xy[::97] = np.nan
    if unit:
        gene = rng.integers(0, n_genes, n)
        counts = sp.csr_matrix((np.ones(n, np.float32), gene, np.arange(n + 1)), shape=(n, n_genes))
    else:
        counts = sp.random(n, n_genes, density=0.2, format="csr", random_state=1, dtype=np.float32)
    genes = [(f"G{i}", "") for i in range(n_genes)]
    banded = BandedSites(37.0, (int(side), int(side)), genes, 0.0, "point", unit_counts=unit)
    for a in range(0, n, 900):  # chunks as a reader adds them
        banded.add(
            xy[a : a + 900], counts=None if unit else counts[a : a + 900], gene=gene[a : a + 900] if unit else None
        )
    banded.finish()
    memory = Sites(xy, counts, genes, 0.0, "point")
    assert banded.n_sites == memory.n_sites == n  # NaN positions count as off the slide, as in memory
    assert banded.count_outside(int(side), int(side)) == memory.count_outside(int(side), int(side)) > len(xy[::97])
    on = memory.on_slide(int(side), int(side))
    np.testing.assert_array_equal(banded.xy_px, xy[on])  # input order restored
    assert (banded.counts != counts[np.flatnonzero(on)]).nnz == 0
    for box in _boxes(7, side):
        got_xy, got = banded.in_box(*box)
        want_xy, want = memory.in_box(*box)
        np.testing.assert_array_equal(got_xy, want_xy)
        assert (got != want).nnz == 0 and got.shape == want.shape
    assert banded.n_kept == memory.n_kept == on.sum()
    folder = banded.folder
    del banded
    assert not Path(folder).exists()  # scratch removed with the object


def test_streamed_xenium_reader_is_chunking_invariant(tmp_path, monkeypatch):
    """A parquet bundle read in 1 000-row batches into 10 µm bands gives the molecules of a one-shot read."""
    rng = np.random.default_rng(3)
    n = 12_000
    names = [f"G{i}" for i in range(40)] + ["BLANK_0001", "NegControlProbe_00002", "ctrl_flagged"]
    feature = rng.integers(0, len(names), n)
    x, y, qv = rng.uniform(0, 300, n), rng.uniform(0, 300, n), rng.uniform(0, 40, n).astype(np.float32)
    is_gene = np.array([not n_.startswith(("BLANK", "NegControl", "ctrl")) for n_ in names])[feature]
    pq.write_table(
        pa.table(
            {
                "feature_name": pa.DictionaryArray.from_arrays(pa.array(feature.astype(np.int32)), pa.array(names)),
                "x_location": x.astype(np.float32),
                "y_location": y.astype(np.float32),
                "qv": qv,
                "is_gene": is_gene,
                "cell_id": ["UNASSIGNED"] * n,
            }
        ),
        tmp_path / "transcripts.parquet",
        row_group_size=2500,
    )
    (tmp_path / "experiment.xenium").write_text('{"pixel_size": 0.2125, "panel_name": "p"}')
    one_shot = xenium.read_xenium(tmp_path)
    monkeypatch.setattr(xenium, "BATCH_ROWS", 1000)
    monkeypatch.setattr(xenium, "BAND_UM", 10.0)
    monkeypatch.setattr(bands, "FLUSH_SITES", 3000)
    sites = xenium.read_xenium(tmp_path, slide_px=(1500, 1400))
    keep = is_gene & (qv >= 20)
    assert one_shot.dropped == {"control_probe": int((~is_gene).sum()), "low_qv": int((is_gene & (qv < 20)).sum())}
    assert sites.genes == one_shot.genes == [(g, "") for g in sorted(names[:40])]
    np.testing.assert_allclose(one_shot.xy_px, np.stack([x, y], 1)[keep].astype(np.float32) / 0.2125)
    on = one_shot.xy_px[:, 1] < 1400
    np.testing.assert_array_equal(sites.xy_px, one_shot.xy_px[on])
    assert (sites.counts != one_shot.counts[np.flatnonzero(on)]).nnz == 0
    assert sites.count_outside(1500, 1400) == int((~on).sum()) and len(sites.band_sites) > 20


def _hd_outs(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, np.ndarray, sp.csr_matrix, np.ndarray]:
    """A 2 µm output listing every bin of a 40 × 40 grid, matrix barcodes in shuffled order."""
    from histotx.synth.tenx import write_10x_h5

    folder = tmp_path / "outs" / "binned_outputs" / "square_002um"
    (folder / "spatial").mkdir(parents=True)
    rows, cols = (a.ravel() for a in np.mgrid[0:40, 0:40])
    barcodes = np.array([f"s_002um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)])
    in_tissue = rng.random(len(rows)) < 0.7
    xy = np.stack([cols * 7.3 + 20.5, rows * 7.3 + 11.25], 1)
    pq.write_table(
        pa.table(
            {
                "barcode": barcodes,
                "in_tissue": in_tissue.astype(np.int32),
                "array_row": rows.astype(np.int32),
                "array_col": cols.astype(np.int32),
                "pxl_row_in_fullres": xy[:, 1],
                "pxl_col_in_fullres": xy[:, 0],
            }
        ),
        folder / "spatial" / "tissue_positions.parquet",
        row_group_size=300,
    )
    (folder / "spatial" / "scalefactors_json.json").write_text(
        '{"microns_per_pixel": 0.274, "bin_size_um": 2.0, "spot_diameter_fullres": 7.3}'
    )
    listed = rng.permutation(len(rows))[:1200]  # the matrix lists some bins, in its own order
    counts = sp.random(len(listed), 25, density=0.3, format="csr", random_state=2, dtype=np.float32)
    counts.data = np.ceil(counts.data * 5)
    genes = [(f"G{i}", f"ENSG{i:011d}") for i in range(25)]
    write_10x_h5(folder / "filtered_feature_bc_matrix.h5", counts, list(barcodes[listed]), genes, "sr-4", "HD")
    return tmp_path / "outs", xy[listed], counts, in_tissue[listed]


def test_streamed_visium_hd_reader(tmp_path, monkeypatch):
    import histotx.sharding.visium_hd as visium_hd

    outs, xy, counts, in_tissue = _hd_outs(tmp_path, np.random.default_rng(5))
    monkeypatch.setattr(visium_hd, "CHUNK_BARCODES", 100)
    monkeypatch.setattr(visium_hd, "BAND_UM", 5.0)
    monkeypatch.setattr(bands, "FLUSH_SITES", 250)
    sites = visium_hd.read_visium_hd(outs, 2, slide_px=(400, 200))
    on = in_tissue & (xy[:, 1] < 200)
    assert sites.dropped == {"not_in_tissue": int((~in_tissue).sum())}
    assert sites.count_outside(400, 200) == int((in_tissue & (xy[:, 1] >= 200)).sum())
    np.testing.assert_array_equal(sites.xy_px, xy[on])
    assert (sites.counts != counts[np.flatnonzero(on)]).nnz == 0
    assert (sites.footprint_um, sites.footprint_shape) == (2.0, "square") and len(sites.band_sites) > 10
    assert sites.peak_buffered < 250 + 100  # a flush buffer and one matrix chunk, not the sample
    sites.peak_loaded = 0  # xy_px and counts above loaded every band (they are for tests and small samples)
    got_xy, got = sites.in_box(100, 50, 200, 120)
    box = on & (xy[:, 0] >= 100) & (xy[:, 0] < 200) & (xy[:, 1] >= 50) & (xy[:, 1] < 120)
    np.testing.assert_array_equal(got_xy, xy[box])
    assert (got != counts[np.flatnonzero(box)]).nnz == 0
    band_px = sites.band_px  # the box's row loads only the bands from y = 50 to 120
    row = on & (xy[:, 1] >= np.floor(50 / band_px) * band_px) & (xy[:, 1] < np.ceil(120 / band_px) * band_px)
    assert sites.peak_loaded == row.sum() < on.sum() / 2
    occupied = sites.occupied_tiles(50.0, 8, 4)  # grid_sites asks band by band
    want = np.zeros(32, bool)
    want[(xy[on, 1] // 50).astype(int) * 8 + (xy[on, 0] // 50).astype(int)] = True
    np.testing.assert_array_equal(occupied, want)
    assert sites.peak_loaded == row.sum()  # one band at a time: no more than the row above


def test_visium_hd_barcodes_must_name_their_bin(tmp_path):
    from histotx.sharding.errors import InputError
    from histotx.sharding.visium_hd import parse_bin_barcodes

    rows, cols = parse_bin_barcodes(np.array(["s_002um_00305_01021-1", "s_008um_00000_00007-1"]), tmp_path)
    assert rows.tolist() == [305, 0] and cols.tolist() == [1021, 7]
    with pytest.raises(InputError, match="does not name its bin"):
        parse_bin_barcodes(np.array(["s_002um_00305_01021-1", "AAACCCAAGTTTGGG-1"]), tmp_path / "m.h5")


@pytest.mark.parametrize("shuffled", [False, True])
def test_visium_hd_bin_table_finds_every_listed_bin(tmp_path, shuffled):
    """Bins listed row by row (as Space Ranger writes them) or in any order are found by (row, col)."""
    from histotx.sharding.visium_hd import BinTable

    rows, cols = (a.ravel() for a in np.mgrid[0:30, 0:20])
    order = np.random.default_rng(2).permutation(len(rows)) if shuffled else np.arange(len(rows))
    rows, cols = rows[order], cols[order]
    pq.write_table(
        pa.table(
            {
                "barcode": [f"s_002um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)],
                "in_tissue": (rows % 3 != 0).astype(np.int32),
                "array_row": rows.astype(np.int32),
                "array_col": cols.astype(np.int32),
                "pxl_row_in_fullres": rows * 7.0 + 0.25,
                "pxl_col_in_fullres": cols * 7.0 + 0.5,
            }
        ),
        tmp_path / "tissue_positions.parquet",
        row_group_size=128,
    )
    table = BinTable(tmp_path / "tissue_positions.parquet")
    asked = np.array(["s_002um_00029_00019-1", "s_002um_00003_00004-1", "s_002um_00030_00000-1"])
    at = table.lookup(asked, tmp_path / "m.h5")
    assert at[2] == -1 and np.all(at[:2] >= 0)
    np.testing.assert_array_equal(table.x[at[:2]], [19 * 7.0 + 0.5, 4 * 7.0 + 0.5])
    np.testing.assert_array_equal(table.y[at[:2]], [29 * 7.0 + 0.25, 3 * 7.0 + 0.25])
    assert table.in_tissue[at[:2]].tolist() == [True, False]
