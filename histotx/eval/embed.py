"""Whole-tile embeddings of a shard set (or of a slide, sharded on the fly) → one AnnData ``.h5ad`` per sample.

Each tile is shown to the model whole: no crop, no augmentation. The image goes through the training
loader's own geometry (:class:`~histotx.data.augment.CropGeometry` with the full tile as the box, resized
to the model's input size, then the same mean/std normalisation), and its transcript sites move with it
(:func:`~histotx.data.augment.transform_grid`) before :func:`~histotx.tokens.bin_grid` makes the tokens,
so a tile here is exactly a training global crop of scale 1 with every random choice off.

Genes are matched by name between the shard set's ``vocab.tsv`` and the model's vocabulary, so a model
can embed a cohort sharded on its own. ``drop_genes`` removes genes from the transcript input *before*
binning (their counts do not even enter a token's normalising total): evaluating expression prediction
of a gene from an input that contains it would measure nothing.

Modes: ``image`` (image alone), ``transcripts`` (transcript tokens alone, on the tile's frame), ``fused``
(both in one sequence). The embedding is the final-norm CLS token. A tile with no token left has no
``transcripts`` embedding: :func:`embed_batch` gives NaN, the h5ad a zero row with
``obs["has_transcripts"] = False`` (so ``sc.pp.neighbors(use_rep="transcripts")`` runs; subset first); a
``fused`` row of such a tile is its image-only embedding. The h5ad is spatial as scverse expects it
(``obsm["spatial"]``, ``uns["spatial"]``: see :func:`embed_shards`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from histotx.batch import TranscriptBatch
from histotx.data.augment import transform_grid
from histotx.data.views import CropGeometry
from histotx.eval import DEFAULT_RESOLUTION_UM
from histotx.files import atomic_path
from histotx.format import (
    VOCAB_NAME,
    FormatError,
    TileSample,
    TranscriptGrid,
    decode_image_rgb,
    decode_sample,
    output_path,
    read_manifest,
)
from histotx.shard_reader import ReadCounts, read_shard_file, shard_path
from histotx.spatial import TileMosaic, mosaic_side, mosaic_thumb, tile_centres, visium_spatial
from histotx.tokens import TranscriptCells, bin_grid, token_size
from histotx.vocab import Vocab

log = logging.getLogger(__name__)

MODES = ("image", "transcripts", "fused")

MPP_TOLERANCE = 0.05
"""Warn when the tiles' µm/px and the model's training µm/px differ by more than this share."""


# ---------------------------------------------------------------- one tile → model inputs


def gene_map(vocab: Vocab, model_genes: Sequence[str], drop_genes: Iterable[str] = ()) -> np.ndarray:
    """Shard gene id → model gene id, or -1 for a gene the model does not know or that is dropped.

    A gene matches by symbol, else by Ensembl id; ``drop_genes`` (symbols or Ensembl ids) are -1.
    """
    drop = set(drop_genes)
    index: dict[str, int] = {}
    for i, name in enumerate(model_genes):
        index.setdefault(name, i)
    out = np.full(len(vocab), -1, dtype=np.int64)
    for i, (symbol, ensembl) in enumerate(zip(vocab.symbols, vocab.ensembl, strict=True)):
        if symbol in drop or (ensembl and ensembl in drop):
            continue
        out[i] = index.get(symbol, index.get(ensembl, -1)) if symbol else index.get(ensembl, -1)
    return out


def remap_grid(grid: TranscriptGrid, mapping: np.ndarray) -> TranscriptGrid:
    """The grid with gene ids mapped to the model's; entries mapped to -1 removed (sites stay, maybe empty)."""
    if grid.gene.size and int(grid.gene.max()) >= mapping.shape[0]:
        raise FormatError(
            f"gene id {int(grid.gene.max())} is outside the shard set's vocabulary ({VOCAB_NAME}) of "
            f"{mapping.shape[0]} genes"
        )
    gene = mapping[grid.gene]
    keep = gene >= 0
    per_site = np.bincount(grid.site_of_entry()[keep], minlength=grid.n_sites)
    offsets = np.concatenate([[0], np.cumsum(per_site)])
    return TranscriptGrid(
        grid.xy,
        offsets,
        gene[keep],
        grid.count[keep],
        grid.footprint_um,
        grid.footprint_shape,
        grid.footprint_angle_deg,
    )


@dataclass
class TileInputs:
    """Turns a shard tile into what the model sees: the whole tile at ``image_px`` (normalised) and its
    transcript tokens at ``resolution_um`` (None: native) in that frame, genes in the model's ids."""

    image_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resolution_um: float | None
    genes: np.ndarray | None  # gene_map(...); None: no transcript tokens wanted

    def __post_init__(self) -> None:
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, tile: TileSample) -> tuple[torch.Tensor, TranscriptCells | None]:
        return self.from_rgb(tile, decode_image_rgb(tile.image))

    def from_rgb(self, tile: TileSample, rgb: np.ndarray) -> tuple[torch.Tensor, TranscriptCells | None]:
        """As calling it, with the tile's image already decoded (``rgb``: (h, w, 3) uint8)."""
        h, w = rgb.shape[:2]
        geometry = CropGeometry(0, 0, w, h, self.image_px)
        pixels = torch.from_numpy(np.require(rgb, np.uint8, ["C", "W"])).permute(2, 0, 1)
        image = geometry.apply_to_image(pixels).float().div_(255.0)  # as MultiCrop.view, colour jitter off
        image = (image - self._mean) / self._std
        if self.genes is None:
            return image, None
        mpp = float(tile.meta["mpp"])
        grid = transform_grid(remap_grid(tile.grid, self.genes), geometry, mpp)
        size = token_size(grid.footprint_um, self.resolution_um)  # as in training: spots stay whole
        return image, bin_grid(grid, geometry.mpp(mpp), size, (self.image_px, self.image_px))


# ---------------------------------------------------------------- the model


def resolve_model(model: Any, device: torch.device):
    """A LoadedModel as is, or anything :func:`histotx.export.load_model` accepts (export, run, checkpoint)."""
    if isinstance(model, torch.nn.Module):
        raise TypeError(
            "embed needs a histotx.export.LoadedModel (the network with its genes, µm/px, input size "
            "and normalisation) or a run/checkpoint/export folder, not a bare module"
        )
    if not hasattr(model, "model"):
        from histotx.export import load_model

        model = load_model(model, device="cpu")
    model.model.to(device).eval()
    return model


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _autocast(device: torch.device):
    """bf16 on GPU (as training), fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def embed_batch(
    net: torch.nn.Module,
    images: torch.Tensor,
    cells: list[TranscriptCells] | None,
    modes: Sequence[str],
    device: torch.device,
) -> dict[str, np.ndarray]:
    """CLS embeddings (B, D) float32 per mode for one batch (NaN rows: no input for that mode)."""
    images = images.to(device, net.cls_token.dtype, non_blocking=True)  # fp32 (autocast on GPU), or a float64 model
    batch = TranscriptBatch.collate(cells).to(device) if cells is not None else None
    has_tokens = (batch.lengths > 0).cpu().numpy() if batch is not None else None
    out: dict[str, np.ndarray] = {}
    with _autocast(device):
        for mode in modes:
            if mode == "image":
                cls = net(images).cls
            elif mode == "fused":
                cls = net(images, transcripts=batch).cls
            elif not has_tokens.any():
                out[mode] = np.full((images.shape[0], net.config.embed_dim), np.nan, dtype=np.float32)
                continue
            else:
                cls = net(None, transcripts=batch, image_hw=tuple(images.shape[-2:])).cls
            emb = cls.float().cpu().numpy()
            if mode == "transcripts":
                emb[~has_tokens] = np.nan
            out[mode] = emb
    return out


# ---------------------------------------------------------------- shard set → h5ad per sample


def tile_level0_px(meta: dict[str, Any]) -> float:
    """A tile's side in level-0 px: ``tile_px`` px at ``mpp`` µm/px on a slide of ``source_mpp`` µm/px."""
    return float(meta["tile_px"]) * float(meta["mpp"]) / float(meta["source_mpp"])


def _obs_row(tile: TileSample, cells: TranscriptCells | None) -> dict[str, Any]:
    m = tile.meta
    row = {
        "sample": m["sample"],
        "patient": m["patient"],
        "technology": m["technology"],
        "x0_px": float(m["origin_level0_px"][0]),
        "y0_px": float(m["origin_level0_px"][1]),
        "x_um": float(m["origin_um"][0]),
        "y_um": float(m["origin_um"][1]),
        "mpp": float(m["mpp"]),
        "n_sites": int(m["n_sites"]),
        "n_counts": float(m["total_count"]),
        "tile_px": int(m["tile_px"]),
        "tile_level0_px": tile_level0_px(m),
    }
    if cells is not None:
        row["n_tokens"] = cells.n_cells
    return row


@dataclass
class PreparedTile:
    """One tile ready for the model; ``order`` (shard index, position in the shard) fixes its obs row."""

    order: tuple[int, int]
    key: str
    obs: dict[str, Any]
    image: torch.Tensor
    cells: TranscriptCells | None
    thumb: np.ndarray | None = None  # the tile shrunk for the sample's picture (TileMosaic)


def _tiles(url: str) -> Iterator[TileSample]:
    """Every tile of a shard, in order; a damaged shard or sample is an error (an embedding must be
    complete). Tar members that are not plain files with safe names are skipped and counted (logged)."""
    counts = ReadCounts()
    try:
        for raw in read_shard_file(url, counts):
            try:
                tile = decode_sample(raw)
            except FormatError as exc:
                raise FormatError(f"{url}: {exc}; check the shard with `histotx shard verify`") from exc
            yield tile
    except FormatError as exc:
        if str(exc).startswith(url):
            raise
        raise FormatError(f"{url}: damaged shard ({exc}); check it with `histotx shard verify`") from exc
    if counts.skipped_members:
        log.warning("%s: %d tar members skipped (%s)", url, counts.skipped_members, counts.summary())


class PreparedShards(IterableDataset):
    """The wanted samples' tiles, prepared, as ``(shard index, [PreparedTile], shard finished)`` chunks of at
    most ``chunk`` tiles. DataLoader worker w of W prepares shards w, w + W, ... (decoding, resizing and
    binning are the CPU work; the model runs in the main process)."""

    def __init__(
        self,
        urls: list[str],
        samples: set[str],
        inputs: TileInputs,
        chunk: int,
        thumb_px: dict[str, int] | None = None,
        listed: set[str] | None = None,
    ) -> None:
        self.urls, self.samples, self.inputs, self.chunk = urls, samples, inputs, chunk
        self.thumb_px = thumb_px or {}  # sample → side of each tile's thumbnail (none: no thumbnails)
        self.listed = samples if listed is None else listed  # the manifest's samples

    def __iter__(self) -> Iterator[tuple[int, list[PreparedTile], bool]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        for index in range(worker, len(self.urls), n_workers):
            items: list[PreparedTile] = []
            for position, tile in enumerate(_tiles(self.urls[index])):
                if tile.meta["sample"] not in self.listed:
                    raise FormatError(
                        f"{self.urls[index]}: tile {tile.key}: sample {tile.meta['sample']!r} is not in the "
                        "shard set's manifest"
                    )
                if tile.meta["sample"] not in self.samples:
                    continue
                try:
                    rgb = decode_image_rgb(tile.image)
                    image, cells = self.inputs.from_rgb(tile, rgb)
                except FormatError as exc:
                    raise FormatError(f"{self.urls[index]}: tile {tile.key}: {exc}") from exc
                side = self.thumb_px.get(tile.meta["sample"])
                thumb = mosaic_thumb(rgb, side) if side else None
                items.append(PreparedTile((index, position), tile.key, _obs_row(tile, cells), image, cells, thumb))
                if len(items) == self.chunk:
                    yield index, items, False
                    items = []
            yield index, items, True


def _as_is(chunk):
    return chunk


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # workers parallelise over shards


@dataclass
class SampleEmbeddings:
    """A sample's tiles as they arrive: batched through the model, then written as one AnnData."""

    rows: list[tuple[tuple[int, int], str, dict[str, Any]]] = field(default_factory=list)
    emb: dict[str, list[np.ndarray]] = field(default_factory=dict)
    pending: list[PreparedTile] = field(default_factory=list)
    mosaic: TileMosaic | None = None

    def add(self, tile: PreparedTile) -> None:
        self.rows.append((tile.order, tile.key, tile.obs))
        self.pending.append(tile)
        if tile.thumb is not None:
            if self.mosaic is None:
                self.mosaic = TileMosaic(tile.thumb.shape[0])
            self.mosaic.add(tile.thumb, tile.obs["x0_px"], tile.obs["y0_px"], tile.obs["tile_level0_px"])

    def flush(self, net: torch.nn.Module, modes: Sequence[str], device: torch.device) -> None:
        if not self.pending:
            return
        images = torch.stack([t.image for t in self.pending])
        cells = [t.cells for t in self.pending] if self.pending[0].cells is not None else None
        for mode, emb in embed_batch(net, images, cells, modes, device).items():
            self.emb.setdefault(mode, []).append(emb)
        self.pending.clear()

    def to_anndata(self, modes: Sequence[str], dim: int, uns: dict[str, Any]):
        """obs in shard order (independent of the number of workers), obsm[mode] (n, dim) float32."""
        import anndata as ad
        import pandas as pd

        order = sorted(range(len(self.rows)), key=lambda i: self.rows[i][0])
        obs = pd.DataFrame(
            [self.rows[i][2] for i in order], index=pd.Index([self.rows[i][1] for i in order], dtype=str)
        )
        for col in ("sample", "patient", "technology"):
            if col in obs:
                obs[col] = obs[col].astype("category")
        if "n_tokens" in obs:
            obs["has_transcripts"] = obs["n_tokens"].to_numpy() > 0
        adata = ad.AnnData(obs=obs)
        for mode in modes:
            emb = np.concatenate(self.emb[mode]) if self.emb.get(mode) else np.zeros((0, dim), np.float32)
            emb = np.ascontiguousarray(emb[order], dtype=np.float32)
            if mode == "transcripts":  # no input, no embedding: a zero row, marked by obs["has_transcripts"]
                emb[~obs["has_transcripts"].to_numpy()] = 0.0
            adata.obsm[mode] = emb
        adata.uns.update(uns)
        if len(obs):
            first = obs.iloc[0]
            size0 = float(first["tile_level0_px"])
            adata.obsm["spatial"] = tile_centres(obs[["x0_px", "y0_px"]].to_numpy(), size0)
            adata.uns["tile"] = {
                "tile_px": int(first["tile_px"]),
                "mpp": float(first["mpp"]),
                "size_um": float(first["tile_px"] * first["mpp"]),
                "size_level0_px": size0,
                "slide_mpp": float(first["tile_px"] * first["mpp"] / size0),  # level 0's µm/px
            }
            if self.mosaic is not None:
                picture, per_px = self.mosaic.image()
                library = str(first["sample"])
                adata.uns["spatial"] = {library: visium_spatial(picture, per_px, size0, {"source": "tile mosaic"})}
        return adata


def write_h5ad_atomic(adata, path: Path) -> Path:
    """Write to a hidden temporary name in the same folder, then rename: readers never see half a file."""
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return path


def _shard_plan(shard_dir: Path, manifest: dict, samples: Sequence[str] | None) -> tuple[list[str], list[dict]]:
    """(samples to embed, manifest entries of the shards to read). A shard that names its sample
    (``sample_id``, as `histotx shard` writes) is read only when that sample is wanted."""
    ok = [s for s, rec in manifest["samples"].items() if rec.get("status") == "ok"]
    if samples is None:
        wanted = ok
    else:
        wanted = list(dict.fromkeys(samples))
        missing = [s for s in wanted if s not in ok]
        if missing:
            raise ValueError(f"{shard_dir}: no sample {missing} in the shard set (samples: {', '.join(ok)})")
    return wanted, [s for s in manifest["shards"] if s.get("sample_id") is None or s["sample_id"] in wanted]


def _checked_args(
    modes: Sequence[str], batch_size: int, num_workers: int, resolution_um: float | str | None
) -> tuple[list[str], float | None]:
    """The modes (once each) and the token side in µm (None: native); a ValueError naming a bad argument."""
    modes = list(dict.fromkeys(modes))
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {modes}")
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
    resolution = None if resolution_um in (None, "native") else float(resolution_um)
    if resolution is not None and not resolution > 0:
        raise ValueError(f"resolution_um must be positive or 'native', got {resolution_um}")
    return modes, resolution


def _input_px(image_px: int | None, loaded) -> int:
    """The side tiles are resized to: ``image_px``, by default the model's training input size."""
    image_px = int(image_px or loaded.image_size)
    if image_px % loaded.model.config.patch_size:
        raise ValueError(
            f"image_px {image_px} is not a multiple of the model's patch size {loaded.model.config.patch_size}"
        )
    return image_px


def _uns(
    name: str,
    modes: Sequence[str],
    dropped: list[str],
    resolution: float | None,
    image_px: int,
    shard_dir: Path,
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    """The h5ad's ``uns``: model, modes, dropped genes and input settings; ``extra`` adds (None: removes)."""
    uns = {
        "model": name,
        "modes": np.array(modes, dtype=object),
        "dropped_genes": np.array(dropped, dtype=object),
        "embedding": "cls",
        "resolution_um": "native" if resolution is None else resolution,
        "image_px": image_px,
        "shards": str(shard_dir.resolve()),
    }
    for key, value in (extra or {}).items():
        if value is None:
            uns.pop(key, None)
        else:
            uns[key] = value
    return uns


def _loader(
    shard_dir: Path,
    manifest: dict,
    entries: list[dict],
    wanted: list[str],
    inputs: TileInputs,
    batch_size: int,
    num_workers: int,
) -> DataLoader:
    """The prepared tiles of the wanted samples' shards, each shard's in turn, from ``num_workers`` processes."""
    tile_px = int((manifest.get("config") or {}).get("tile_px") or 256)
    thumb_px = {s: mosaic_side(int(manifest["samples"][s].get("tiles") or 1), tile_px) for s in wanted}
    stream = PreparedShards(
        [str(shard_path(shard_dir, e["name"])) for e in entries],
        set(wanted),
        inputs,
        batch_size,
        thumb_px,
        set(manifest["samples"]),
    )
    return DataLoader(
        stream,
        batch_size=None,
        collate_fn=_as_is,
        num_workers=num_workers,
        worker_init_fn=_one_thread if num_workers else None,
    )


def embed_shards(
    model,
    shards,
    out_dir,
    modes: Sequence[str] = ("image",),
    samples: Sequence[str] | None = None,
    drop_genes: Iterable[str] = (),
    batch_size: int = 64,
    device: str | torch.device = "auto",
    progress: bool = True,
    resolution_um: float | str | None = DEFAULT_RESOLUTION_UM,
    image_px: int | None = None,
    num_workers: int = 0,
    uns_extra: dict[str, Any] | None = None,
) -> list[Path]:
    """Embed the tiles of a shard set, writing ``<out_dir>/<sample>.h5ad`` per sample; returns the paths.

    ``model``: a LoadedModel or a source for :func:`histotx.export.load_model`. ``modes``: any of
    :data:`MODES`. ``samples``: a subset (default: every sample sharded ok). ``drop_genes``: gene symbols
    removed from the transcript input. ``resolution_um``: transcript token side (``"native"``/None: one
    token per spot, bin or molecule). ``image_px``: the side the whole tile is resized to (default: the
    model's training input size). ``num_workers``: DataLoader processes preparing tiles (0: this one).
    The h5ad holds no X; obs are the tiles (in shard order; with ``n_tokens``, the transcript tokens the
    model saw, and ``has_transcripts`` (n_tokens > 0), when a transcript mode runs), ``obsm[mode]`` the CLS
    embeddings (float32), ``uns`` the model, modes, dropped genes and input settings (``uns_extra`` adds to
    them; a None value removes a key). A tile without transcript tokens has no ``transcripts`` embedding: its
    row of ``obsm["transcripts"]`` is zero and ``obs["has_transcripts"]`` is False (select
    ``adata[adata.obs.has_transcripts]`` before using that matrix; its ``fused`` row is its image embedding).

    Spatial, as scanpy/squidpy read Visium (:mod:`histotx.spatial`): ``obsm["spatial"]`` the tile centres in
    level-0 px, ``uns["spatial"][sample]`` a picture of the slide made from the tiles themselves (hires ≤ 2000
    px, lowres ≤ 600 px) with its scale factors and ``spot_diameter_fullres`` = the tile side, and
    ``uns["tile"]`` the tile's size (``tile_px``, ``mpp``, ``size_um``, ``size_level0_px``, ``slide_mpp``).
    A LoadedModel is moved to ``device``.
    """
    from tqdm import tqdm

    modes, resolution = _checked_args(modes, batch_size, num_workers, resolution_um)
    shard_dir, out_dir = Path(shards), Path(out_dir)
    manifest = read_manifest(shard_dir)
    wanted, entries = _shard_plan(shard_dir, manifest, samples)
    dev = resolve_device(device)
    loaded = resolve_model(model, dev)
    net = loaded.model
    image_px = _input_px(image_px, loaded)
    dropped = sorted(set(drop_genes))
    genes = _input_genes(shard_dir, loaded, dropped) if {"transcripts", "fused"} & set(modes) else None
    inputs = TileInputs(image_px, tuple(loaded.mean), tuple(loaded.std), resolution, genes)
    out_dir.mkdir(parents=True, exist_ok=True)
    uns = _uns(loaded.name, modes, dropped, resolution, image_px, shard_dir, uns_extra)

    acc = {s: SampleEmbeddings() for s in wanted}
    shards_left = {s: sum(e.get("sample_id") == s for e in entries) for s in wanted}
    named = all(e.get("sample_id") is not None for e in entries)  # else a sample is complete only at the end
    paths: dict[str, Path] = {}

    def finish(sample: str) -> None:
        a = acc.pop(sample)
        a.flush(net, modes, dev)
        expected = manifest["samples"][sample].get("tiles")
        if expected is not None and len(a.rows) != int(expected):
            raise FormatError(
                f"{shard_dir}: sample {sample} has {len(a.rows)} tiles in its shards, the manifest says {expected}"
            )
        path = output_path(out_dir, sample, ".h5ad")
        paths[sample] = write_h5ad_atomic(a.to_anndata(modes, net.config.embed_dim, uns), path)

    loader = _loader(shard_dir, manifest, entries, wanted, inputs, batch_size, num_workers)
    total = sum(int(manifest["samples"][s].get("tiles", 0)) for s in wanted)
    seen: set[str] = set()
    with tqdm(total=total, desc="embed", unit="tile", disable=not progress, dynamic_ncols=True) as bar:
        for index, items, shard_done in loader:
            for tile in items:
                sample = tile.obs["sample"]
                if sample not in seen:
                    seen.add(sample)
                    _check_mpp(sample, tile.obs["mpp"], loaded.mpp)
                acc[sample].add(tile)
                if len(acc[sample].pending) == batch_size:
                    acc[sample].flush(net, modes, dev)
            bar.update(len(items))
            sample = entries[index].get("sample_id")
            if shard_done and named and sample in acc:
                shards_left[sample] -= 1
                if shards_left[sample] == 0:
                    bar.set_postfix_str(sample)
                    finish(sample)
        for sample in list(acc):
            finish(sample)
    return [paths[s] for s in wanted]


def _input_genes(shard_dir: Path, loaded, dropped: list[str]) -> np.ndarray:
    """:func:`gene_map` of the shard set's vocabulary to the model's, with the reasons genes go missing logged."""
    if loaded.model.transcript is None:
        raise ValueError(f"{loaded.name}: the model has no transcript branch; only mode 'image' is possible")
    path = shard_dir / VOCAB_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the shard set has no gene vocabulary, needed for transcript tokens")
    vocab = Vocab.load(path)
    mapping = gene_map(vocab, loaded.genes, dropped)
    named = set(vocab.symbols) | set(vocab.ensembl)
    drop = set(dropped)
    unknown = sum(1 for i, m in enumerate(mapping) if m < 0 and not {vocab.symbols[i], vocab.ensembl[i]} & drop)
    if unknown:
        log.warning(
            "%s: %d of %d genes are not in the model's vocabulary and are left out of its input",
            path,
            unknown,
            len(vocab),
        )
    absent = [g for g in dropped if g not in named]
    if absent:
        log.warning("drop_genes not in %s (nothing to drop): %s", path, absent)
    if len(vocab) and not (mapping >= 0).any():
        shared = (gene_map(vocab, loaded.genes) >= 0).any()
        why = "every gene the two share is dropped" if shared else "the shards' genes and the model's share none"
        log.warning(
            "%s: no gene reaches the model (%s; the model knows %d genes, e.g. %s; the shards %d, e.g. %s): every "
            "tile has no transcript token, so 'transcripts' embeddings are empty and 'fused' equals 'image'",
            path,
            why,
            len(loaded.genes),
            ", ".join(list(loaded.genes)[:3]),
            len(vocab),
            ", ".join(vocab.name(i) for i in range(min(3, len(vocab)))),
        )
    return mapping


def _check_mpp(sample: str, tile_mpp: float, model_mpp: float | None) -> None:
    """A model sees tiles at the scale it was trained on (timm exports may not know it: no check)."""
    if model_mpp and math.isfinite(model_mpp) and abs(tile_mpp - model_mpp) > MPP_TOLERANCE * model_mpp:
        log.warning(
            "%s: tiles at %.4g µm/px, the model was trained on tiles at %.4g µm/px; embeddings of a "
            "different scale (reshard with mpp=%.4g to match)",
            sample,
            tile_mpp,
            model_mpp,
            model_mpp,
        )


# ---------------------------------------------------------------- a slide → shards (as `histotx shard`) → h5ad


_NOT_SAMPLE_FOLDERS = re.compile(r"(outs|spatial|binned_outputs|square_\d+um)$")  # named by Space Ranger
_SPACERANGER_IMAGE = re.compile(r"tissue_(hires|lowres)_image$|(aligned_)?tissue_image$|detected_tissue_image$")


def _clean_id(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name).lstrip("_-")


def slide_sample_id(slide: Path | None, data: Path | None = None) -> str:
    """The sample's id when none is given: its sample folder, the first folder above ``data`` (or above the
    slide, when the slide is one of Space Ranger's images) that Space Ranger did not name (``outs``,
    ``spatial``, ``binned_outputs``, ``square_*um``); for a slide on its own, its file name (``he-01.ome.tif``
    → ``he-01``)."""
    start = None
    if data is not None:
        start = Path(os.path.abspath(data))
    elif slide is not None and _SPACERANGER_IMAGE.match(Path(slide).name.split(".")[0]):
        start = Path(os.path.abspath(slide)).parent
    if start is not None:
        folder = start
        while _NOT_SAMPLE_FOLDERS.match(folder.name) and folder.parent != folder:
            folder = folder.parent
        if sid := _clean_id(folder.name):
            return sid
    stem = Path(slide).name.split(".")[0] if slide is not None else ""
    return _clean_id(stem) or "slide"


def embed_slide(
    model,
    slide,
    out_dir,
    *,
    data=None,
    technology: str | None = None,
    sample_id: str | None = None,
    patient: str = "",
    mpp: float | None = None,
    image_scale: str = "fullres",
    bin_size_um: float = 2.0,
    alignment: str | None = None,
    shard_config=None,
    shards_dir=None,
    progress: bool = True,
    **embed_kwargs,
) -> Path:
    """Embed one slide (+ its Visium / Visium HD / Xenium / HEST data): tile it with the sharding pipeline
    itself (``shard_config``: a :class:`histotx.sharding.config.ShardConfig`, default as ``histotx shard run``)
    into ``shards_dir`` (default a temporary folder, removed after), then :func:`embed_shards`.
    The h5ad's ``uns["slide"]`` is the slide; ``uns["shards"]`` is the shard folder when it is kept
    (``shards_dir``), absent otherwise. Returns the path of ``<out_dir>/<sample_id>.h5ad``."""
    from histotx.sharding import technologies
    from histotx.sharding.cohort import dump_cohort
    from histotx.sharding.config import ShardConfig
    from histotx.sharding.pipeline import run_cohort

    technology = technology or (technologies.IMAGE_ONLY if data is None else None)
    if technology is None:
        raise ValueError("embed_slide: give the technology of the data (one of histotx.sharding.technologies)")
    if technology == "hest" and not sample_id:
        raise ValueError("embed_slide: a HEST sample needs its id (sample_id)")
    sample_id = sample_id or slide_sample_id(Path(slide) if slide else None, Path(data) if data else None)
    slide = Path(slide).resolve() if slide else None
    tech = technologies.technology(technology)
    entry = {"id": sample_id, "technology": technology, "patient": patient or sample_id}
    for key, value in (
        ("slide", slide),
        ("data", Path(data).resolve() if data else None),
        ("mpp", mpp),
    ):
        if value is not None:
            entry[key] = str(value) if isinstance(value, Path) else value
    given = {
        "image_scale": image_scale,
        "bin_size_um": bin_size_um,
        "alignment": str(Path(alignment).resolve()) if alignment else None,
    }
    entry["options"] = {k: v for k, v in given.items() if k in tech.option_names() and v is not None}
    cfg = shard_config or ShardConfig()
    cfg.validate()
    with tempfile.TemporaryDirectory(prefix="histotx-embed-") as tmp:
        shard_dir = Path(shards_dir) if shards_dir else Path(tmp) / "shards"
        cohort = Path(tmp) / "cohort.yaml"
        dump_cohort([entry], cohort)
        t0 = time.time()
        manifest = run_cohort(cohort, shard_dir, cfg)
        record = manifest["samples"][sample_id]
        if record["status"] != "ok":  # the cohort file is ours, not the user's: name what they gave
            error = str(record.get("error")).replace(f"{cohort}: ", "").replace(str(cohort), "the command line")
            raise ValueError(f"sharding {slide or data} failed: {error}")
        log.info("%s: %d tiles sharded in %.1f s (%s)", sample_id, record["tiles"], time.time() - t0, shard_dir)
        extra = {"slide": str(slide) if slide else "", "shards": str(shard_dir.resolve()) if shards_dir else None}
        return embed_shards(
            model, shard_dir, out_dir, samples=[sample_id], progress=progress, uns_extra=extra, **embed_kwargs
        )[0]
