"""``histotx predict``: a whole-slide image → predicted expression per tile (H&E alone).

The slide is read and tiled by the sharding stage's own code (:class:`histotx.sharding.slides.Slide`,
its tissue mask and grid: any SVS, pyramidal TIFF, OME-TIFF or plain image it reads), at the tile the
head was fitted on (``tile_px`` px at ``mpp`` µm/px, see :class:`histotx.predict.head.TileSpec`). Each tile
is shown to the model whole, as ``histotx embed`` shows a shard tile (resized to the model's input,
normalised), image only, in batches (bf16 on a GPU, fp32 on CPU), and the head maps its CLS embedding to
log1p(count per tile) per gene.

Memory is bounded by the batch, not the slide: tiles are read row by row (one run of ≤ 16 neighbours at a
time), a batch is embedded and dropped, and only the (tiles × genes) float32 predictions are kept. The tissue
mask's picture (at ``mask_mpp``) and the outputs' thumbnail (≤ :data:`THUMB_MAX_PX`) come from the coarsest
adequate level, read in bands when it is large (:meth:`histotx.sharding.slides.Slide.thumbnail`: a slide
without a pyramid costs no more than one with). ``benchmarks/predict_memory.py`` measures it.
Resumable: predictions go to ``.<sample>.partial/`` in chunks of :data:`CHUNK_TILES` tiles (atomic
``.npy`` files, keyed by the slide, model and head); a killed run re-does only the missing chunks, and
a finished slide is skipped unless ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from histotx.files import atomic_path

log = logging.getLogger(__name__)

CHUNK_TILES = 1024
FORMATS = ("h5ad", "spatialdata")
THUMB_MAX_PX = 2000  # the picture of the slide in the outputs (hires; lowres is ≤ 600)


def slide_id(path: Path) -> str:
    stem = Path(path).name.split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem).lstrip("_-") or "slide"


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class _Tiles:
    names: list[str]
    origins: np.ndarray
    tissue: np.ndarray
    size0: float
    mpp: float  # the tiles' µm/px
    slide_mpp: float
    width: int
    height: int


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def predict_slide(
    slide: str | Path,
    model,
    head,
    out_dir: str | Path,
    *,
    formats: Sequence[str] = ("h5ad",),
    png_genes: Sequence[str] = (),
    sample_id: str | None = None,
    mpp: float | None = None,
    min_tissue_fraction: float | None = None,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
    chunk_tiles: int = CHUNK_TILES,
) -> dict[str, Path]:
    """Predict one slide into ``out_dir``: ``<id>.h5ad`` and/or ``<id>.zarr`` (SpatialData), and
    ``<id>.<GENE>.png`` per ``png_genes``; returns {kind: path}. ``model``: a LoadedModel or anything
    :func:`histotx.export.load_model` reads; ``head``: a head (ridge or MLP) or its folder (refused unless
    fitted on this model). ``mpp`` overrides the slide's level-0 µm/px."""
    from tqdm import tqdm

    from histotx.eval.embed import TileInputs, resolve_device, resolve_model
    from histotx.predict.head import HeadCommon
    from histotx.predict.heads import load_head
    from histotx.sharding.config import ShardConfig
    from histotx.sharding.slides import Slide

    formats = list(dict.fromkeys(formats))
    if not formats or set(formats) - set(FORMATS):
        raise ValueError(f"formats must be some of {FORMATS}, got {formats}")
    if batch_size < 1 or chunk_tiles < 1:
        raise ValueError(f"batch_size and chunk_tiles must be >= 1, got {batch_size}, {chunk_tiles}")
    slide = Path(slide)
    out_dir = Path(out_dir)
    sid = sample_id or slide_id(slide)
    head_dir = None
    if not isinstance(head, HeadCommon):
        head_dir = Path(head)
        head = load_head(head_dir)  # ridge or MLP, as its head.json says
    unknown = [g for g in png_genes if g not in head.genes]
    if unknown:
        raise ValueError(f"--png: {unknown} not predicted by the head {head_dir or ''} (genes: {head.genes[:8]}…)")
    targets = {"h5ad": out_dir / f"{sid}.h5ad", "spatialdata": out_dir / f"{sid}.zarr"}
    wanted = {k: targets[k] for k in formats}
    if not overwrite and all(p.exists() for p in wanted.values()) and not png_genes:
        log.info("%s: already predicted (%s); skipped", sid, ", ".join(map(str, wanted.values())))
        return wanted

    dev = resolve_device(device)
    loaded = resolve_model(model, dev)
    head.check_model(loaded.model, loaded.name, head_dir or "the head")
    if head.tile.image_px and head.tile.image_px != int(loaded.image_size):
        log.warning("the head was fitted on %d px inputs, the model takes %d", head.tile.image_px, loaded.image_size)
    image_px = int(head.tile.image_px or loaded.image_size)
    cfg = ShardConfig(mpp=head.tile.mpp, tile_px=head.tile.tile_px)
    cfg.min_tissue_fraction = cfg.min_tissue_fraction if min_tissue_fraction is None else float(min_tissue_fraction)
    cfg.validate()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with Slide(slide, mpp=mpp) as s:
        geom, plan = _plan(s, cfg)
        thumb, per_px = s.thumbnail(max(s.mpp, s.mpp * max(s.width, s.height) / THUMB_MAX_PX))
        tiles = _Tiles(plan.names, plan.origins, plan.tissue, plan.size0, geom.mpp, s.mpp, s.width, s.height)

        key = {
            "slide": str(slide.resolve()),
            "slide_bytes": slide.stat().st_size,
            "slide_mtime_ns": slide.stat().st_mtime_ns,
            "slide_mpp": s.mpp,
            "model_sha256": head.model_hash,
            "head": head_dir and _file_sha(head_dir / "head.safetensors"),
            "tiles": len(plan),
            "tile_px": cfg.tile_px,
            "mpp": cfg.mpp,
            "chunk_tiles": chunk_tiles,
        }
        partial = _partial_dir(out_dir / f".{sid}.partial", key)
        inputs = TileInputs(image_px, tuple(loaded.mean), tuple(loaded.std), None, None)
        n_chunks = -(-len(plan) // chunk_tiles)
        done = {k for k in range(n_chunks) if (partial / f"chunk{k:06d}.npy").is_file()}
        if done:
            log.info("%s: resuming, %d of %d chunks already predicted", sid, len(done), n_chunks)
        with tqdm(
            total=len(plan), initial=min(len(done) * chunk_tiles, len(plan)), desc=f"predict {sid}", unit="tile",
            disable=not progress, dynamic_ncols=True,
        ) as bar:  # fmt: skip
            for k in range(n_chunks):
                if k in done:
                    continue
                sub = plan.subset(np.arange(k * chunk_tiles, min((k + 1) * chunk_tiles, len(plan))))
                pred = _predict_tiles(s, geom, sub, cfg, inputs, loaded.model, dev, head, batch_size, bar)
                _save_npy(partial / f"chunk{k:06d}.npy", pred)
    seconds = time.time() - t0
    pred = np.concatenate([np.load(partial / f"chunk{k:06d}.npy", allow_pickle=False) for k in range(n_chunks)])
    adata = _anndata(pred, tiles, head, sid, thumb, per_px, loaded.name, slide, head_dir, seconds)
    written = _write_outputs(adata, formats, targets, png_genes, thumb, per_px, tiles.size0, out_dir / sid)
    shutil.rmtree(partial, ignore_errors=True)
    return written


def _plan(s, cfg):
    """The tiling `histotx shard run` would make with ``cfg``: (geometry, grid plan of the tissue tiles)."""
    from histotx.sharding.tiles import plan_grid, tile_geometry
    from histotx.sharding.tissue import TissueMap, tissue_mask

    geom = tile_geometry(s, cfg)
    mask_rgb, mask_scale = s.thumbnail(cfg.mask_mpp)
    tissue = TissueMap(tissue_mask(mask_rgb), mask_scale)
    plan = plan_grid(s, tissue, cfg, geom)
    if len(plan) == 0:
        raise ValueError(
            f"{s.path}: no tissue tiles (tissue covers {tissue.fraction:.1%}; no {cfg.tile_px}px tile at "
            f"{geom.mpp:.4g} µm/px reaches min_tissue_fraction={cfg.min_tissue_fraction})"
        )
    return geom, plan


def _predict_tiles(s, geom, sub, cfg, inputs, net, dev, head, batch_size: int, bar) -> np.ndarray:
    """(len(sub), genes) float32 predictions of the tiles of ``sub``, read run by run, embedded in batches."""
    import torch

    from histotx.eval.embed import embed_batch
    from histotx.sharding.tiles import render_run, runs

    out = np.zeros((len(sub), len(head.genes)), dtype=np.float32)
    index: list[int] = []
    images: list[torch.Tensor] = []

    def flush() -> None:
        emb = embed_batch(net, torch.stack(images), None, ("image",), dev)["image"]
        out[index] = head.predict(emb)
        bar.update(len(index))
        index.clear()
        images.clear()

    for idx in runs(sub, cfg.run_tiles):
        for i, rgb in zip(idx.tolist(), render_run(s, geom, sub, idx, cfg.tile_px, cfg.resample), strict=True):
            index.append(i)
            images.append(inputs.from_rgb(None, rgb)[0])
            if len(images) == batch_size:
                flush()
    if images:
        flush()
    return out


def _partial_dir(partial: Path, key: dict) -> Path:
    """The resumable run's folder: kept when it was made with the same slide, model, head and tiling."""
    if partial.is_dir():
        try:
            old = json.loads((partial / "plan.json").read_text())
        except (OSError, ValueError):
            old = None
        if old != key:
            log.info("%s: an unfinished run with other settings; starting over", partial)
            shutil.rmtree(partial)
    partial.mkdir(exist_ok=True)
    (partial / "plan.json").write_text(json.dumps(key, indent=1))
    return partial


def _write_outputs(adata, formats, targets, png_genes, thumb, per_px, size0, stem: Path) -> dict[str, Path]:
    written: dict[str, Path] = {}
    if "h5ad" in formats:
        from histotx.eval.embed import write_h5ad_atomic

        written["h5ad"] = write_h5ad_atomic(adata, targets["h5ad"])
    if "spatialdata" in formats:
        from histotx.predict.outputs import write_spatialdata

        written["spatialdata"] = write_spatialdata(adata, thumb, per_px, size0, targets["spatialdata"])
    if png_genes:
        from histotx.predict.outputs import write_pngs

        for path in write_pngs(adata, png_genes, thumb, per_px, size0, stem):
            written[f"png:{path.name}"] = path
    return written


def _anndata(pred, tiles: _Tiles, head, sid: str, thumb, per_px, model_name, slide: Path, head_dir, seconds: float):
    import anndata as ad
    import pandas as pd

    from histotx.spatial import tile_centres, visium_spatial

    obs = pd.DataFrame(
        {
            "sample": pd.Categorical([sid] * len(tiles.names)),
            "x0_px": tiles.origins[:, 0],
            "y0_px": tiles.origins[:, 1],
            "tissue_fraction": tiles.tissue.astype(np.float64),
        },
        index=pd.Index([f"{sid}__{n}" for n in tiles.names], dtype=str),
    )
    var = pd.DataFrame(
        {"heldout_pearson": head.pearson.astype(np.float64), "mean_log1p": head.intercept.astype(np.float64)},
        index=pd.Index(head.genes, dtype=str),
    )
    pred, outside = head.clip(np.asarray(pred, dtype=np.float64))
    var["tiles_outside_training_range"] = outside.astype(np.int64)
    adata = ad.AnnData(X=pred.astype(np.float32), obs=obs, var=var)
    adata.obsm["spatial"] = tile_centres(tiles.origins, tiles.size0)
    adata.uns["spatial"] = {
        sid: visium_spatial(thumb, per_px, tiles.size0, {"source": "slide thumbnail", "slide": str(slide)})
    }
    adata.uns["tile"] = {
        "tile_px": int(head.tile.tile_px),
        "mpp": float(tiles.mpp),
        "size_um": float(head.tile.tile_px * tiles.mpp),
        "size_level0_px": float(tiles.size0),
        "slide_mpp": float(tiles.slide_mpp),
    }
    adata.uns["predict"] = {
        "slide": str(slide.resolve()),
        "model": model_name,
        "model_sha256": head.model_hash,
        "head": str(Path(head_dir).resolve()) if head_dir else "",
        "X": "predicted log1p(count per tile) from the image alone, kept inside each gene's training range "
        "(var.tiles_outside_training_range: tiles predicted outside it, clipped); var.heldout_pearson: each "
        "gene's leave-patient-out Pearson when the head was fitted (how far to trust it)",
        "seconds": float(seconds),
    }
    return adata
