"""A tiny shard set of random tiles and transcript grids, written the way `histotx shard` writes one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import webdataset as wds

from histotx.files import sha256_file
from histotx.format import (
    TileSample,
    TranscriptGrid,
    encode_image_rgb,
    encode_sample,
    new_manifest,
    tile_key,
    write_manifest,
)


def random_grid(
    rng: np.random.Generator,
    tile_px: int,
    n_sites: int = 20,
    n_genes: int = 50,
    footprint_um: float = 55.0,
    footprint_shape: str = "disk",
) -> TranscriptGrid:
    per_site = rng.integers(1, 6, n_sites)
    offsets = np.concatenate([[0], np.cumsum(per_site)])
    gene = np.concatenate([rng.choice(n_genes, k, replace=False) for k in per_site]) if n_sites else np.zeros(0)
    return TranscriptGrid(
        rng.uniform(0, tile_px, (n_sites, 2)),
        offsets,
        gene,
        rng.integers(1, 20, offsets[-1]).astype(np.float32),
        footprint_um,
        footprint_shape,
    )


def tile_sample(
    rng: np.random.Generator,
    sample_id: str,
    index: int,
    tile_px: int = 64,
    mpp: float = 0.5,
    grid: TranscriptGrid | None = None,
) -> TileSample:
    grid = random_grid(rng, tile_px) if grid is None else grid
    rgb = rng.integers(0, 256, (tile_px, tile_px, 3), dtype=np.uint8)
    meta = {
        "sample": sample_id,
        "patient": f"p-{sample_id}",
        "technology": "visium",
        "tile_px": tile_px,
        "mpp": mpp,
        "origin_level0_px": [0.0, float(index * tile_px)],
        "origin_um": [0.0, index * tile_px * mpp],
        "source_mpp": mpp,
        "n_sites": grid.n_sites,
        "n_genes": int(np.unique(grid.gene).size),
        "total_count": grid.total_count,
        "index": index,
    }
    return TileSample(tile_key(sample_id, f"t{index:05d}"), encode_image_rgb(rgb, "png"), "png", grid, meta)


def write_shard_set(out: Path, n_shards: int = 4, per_shard: int = 6, tile_px: int = 64, seed: int = 0) -> Path:
    """``n_shards`` shards of ``per_shard`` tiles; tile ``meta["index"]`` numbers them 0.. over the set."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, samples, index = [], {}, 0
    for s in range(n_shards):
        name = f"shard-{s:05d}.tar"
        sample_id = f"s{s:02d}"
        with wds.TarWriter(str(out / name), encoder=False, mtime=0) as sink:
            for _ in range(per_shard):
                sink.write(encode_sample(tile_sample(rng, sample_id, index, tile_px)))
                index += 1
        path = out / name
        shards.append({"name": name, "samples": per_shard, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
        samples[sample_id] = {"status": "ok", "technology": "visium", "tiles": per_shard}
    write_manifest(out, new_manifest({"synthetic": True}, shards, samples))
    return out


def write_pyramid(path: Path, rgb: np.ndarray, mpp: float, levels: int = 3, tile: int = 256, step: int = 2) -> Path:
    """A pyramidal TIFF as scanners write them: JPEG tiles, level 0 then its reductions by step, step², ... as
    SubIFDs (Aperio 40× scans: step 4, so no level at 2×)."""
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        kw = dict(tile=(tile, tile), compression="jpeg", photometric="rgb", resolutionunit="CENTIMETER")
        tw.write(rgb, subifds=levels - 1, resolution=(1e4 / mpp, 1e4 / mpp), **kw)
        for i in range(1, levels):
            k = step**i
            tw.write(rgb[::k, ::k], subfiletype=1, resolution=(1e4 / mpp / k,) * 2, **kw)
    return path
