"""``histotx fit``: a cohort's image embeddings + measured expression → an expression head (:mod:`.head`).

Sources: a HistoTx shard set (targets: each tile's summed site counts, log1p, as ``histotx eval`` reads
them; the tiles are embedded whole, image only, by :func:`histotx.eval.embed.embed_shards`), or a
HEST-Benchmark task folder (its patches and its expression, as ``histotx eval --hest``; each sample is
taken as its own patient: the task folder names no patients).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from histotx.eval import hestbench
from histotx.predict.head import HeadCommon, TileSpec, model_fingerprint
from histotx.predict.heads import fit_head

log = logging.getLogger(__name__)


def _shard_tiles(shards: Path, samples: Sequence[str] | None) -> TileSpec | None:
    from histotx.format import read_manifest

    manifest = read_manifest(shards)
    config = manifest.get("config") or {}
    records = [r for s, r in manifest["samples"].items() if r.get("status") == "ok" and (not samples or s in samples)]
    mpps = sorted({round(float(r["tile_mpp"]), 4) for r in records if r.get("tile_mpp")})
    if not config.get("tile_px") or not mpps:
        return None
    if len(mpps) > 1:
        log.warning("%s: tiles at several µm/px (%s); the head records the first", shards, mpps)
    return TileSpec(int(config["tile_px"]), float(config.get("mpp") or mpps[0]), 0)


def fit_from_shards(
    model,
    shards: str | Path,
    out: str | Path,
    *,
    samples: Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
    n_targets: int = 50,
    min_frac: float = 0.10,
    batch_size: int = 64,
    device: str = "auto",
    embeddings: str | Path | None = None,
    latent_dim: int = hestbench.LATENT_DIM,
    progress: bool = True,
    kind: str = "ridge",
) -> HeadCommon:
    """Fit and save a head (folder ``out``) on a shard set; ``genes``: the targets (default the
    ``n_targets`` most variable, as ``histotx eval`` picks them); ``embeddings``: a folder of image
    embeddings made by ``histotx embed`` of this shard set with this model (default: embedded here)."""
    import anndata as ad
    import pandas as pd

    from histotx.eval.embed import embed_shards, resolve_device, resolve_model
    from histotx.eval.targets import select_target_genes, target_matrix, tile_expression

    shards = Path(shards)
    loaded = resolve_model(model, resolve_device(device))
    expr = tile_expression(shards, samples, progress=progress)
    targets = list(dict.fromkeys(genes)) if genes else select_target_genes(expr, n_targets, min_frac)
    tile = _shard_tiles(shards, samples)
    if tile is None:
        raise ValueError(f"{shards}: the manifest does not say the tiles' size (config.tile_px, samples' tile_mpp)")
    tile.image_px = int(loaded.image_size)
    with tempfile.TemporaryDirectory(prefix="histotx-fit-") as tmp:
        folder = Path(embeddings) if embeddings else Path(tmp)
        if not embeddings:
            embed_shards(
                loaded, shards, folder, modes=("image",), samples=list(expr), batch_size=batch_size,
                device=device, progress=progress,
            )  # fmt: skip
        X, Y, patients = [], [], []
        for sample, entry in expr.items():
            path = folder / f"{sample}.h5ad"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no embeddings for sample {sample}")
            adata = ad.read_h5ad(path)
            if "image" not in adata.obsm:
                raise ValueError(f"{path}: no obsm['image'] (embed with --modes image)")
            if embeddings and int(adata.uns.get("image_px", tile.image_px)) != tile.image_px:
                raise ValueError(f"{path}: embedded at {adata.uns.get('image_px')} px, the model takes {tile.image_px}")
            rows = pd.Index(adata.obs_names.astype(str)).get_indexer(entry.keys)
            if (rows < 0).any():
                raise ValueError(f"{path}: {(rows < 0).sum()} measured tiles have no embedding")
            X.append(np.asarray(adata.obsm["image"])[rows])
            Y.append(target_matrix(entry, targets))
            patients += [entry.patient] * len(rows)
    X, Y = np.concatenate(X), np.concatenate(Y)
    info: dict[str, Any] = {"source": str(shards.resolve()), "kind": "shards", "samples": list(expr)}
    head = fit_head(
        X, Y, targets, patients, model_name=loaded.name, model_hash=model_fingerprint(loaded.model), tile=tile,
        latent_dim=latent_dim, info=info, kind=kind,
    )  # fmt: skip
    head.save(out)
    return head


def fit_from_hest(
    model,
    task_dir: str | Path,
    out: str | Path,
    *,
    batch_size: int = 64,
    device: str = "auto",
    embeddings: str | Path | None = None,
    latent_dim: int = hestbench.LATENT_DIM,
    progress: bool = True,
    kind: str = "ridge",
) -> HeadCommon:
    """Fit and save a head on a HEST-Benchmark task folder (its gene list; its patches' size at 0.5 µm/px)."""
    from histotx.eval import hestlayout
    from histotx.eval.embed import resolve_device, resolve_model

    dev = resolve_device(device)
    loaded = resolve_model(model, dev)
    task = hestlayout.read_task(task_dir)
    X, Y, patients = [], [], []
    for sample in task.samples:
        barcodes = hestlayout.read_barcodes(task.patches[sample])
        if embeddings:
            X.append(hestlayout._read_embeddings(Path(embeddings) / f"{sample}.h5ad", barcodes))
        else:
            X.append(hestlayout.embed_patches(loaded, task.patches[sample], batch_size, dev, progress))
        Y.append(hestlayout.read_targets(task.expression[sample], task.genes, barcodes))
        patients += [sample] * len(barcodes)
    import h5py

    with h5py.File(task.patches[task.samples[0]], "r") as f:
        patch_px = int(f["img"].shape[1])  # HEST-Bench's patches: 224 px at 0.5 µm/px
    info = {"source": str(Path(task_dir).resolve()), "kind": "hest", "samples": task.samples}
    tile = TileSpec(patch_px, hestlayout.PATCH_MPP, int(loaded.image_size))
    head = fit_head(
        np.concatenate(X), np.concatenate(Y), task.genes, patients, model_name=loaded.name,
        model_hash=model_fingerprint(loaded.model), tile=tile, latent_dim=latent_dim, info=info, kind=kind,
    )  # fmt: skip
    head.save(out)
    return head
