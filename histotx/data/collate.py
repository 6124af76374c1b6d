"""A batch of multi-crop tiles → the teacher's and the student's packed inputs, masks included.

Per batch, one transcript token size is drawn from ``resolutions_um`` (so the model learns every
scale) and every view's sites are binned at it in the view's own frame (:func:`histotx.tokens.bin_grids`),
except where the sites are coarser than the draw (55 µm spots at 8 µm): those keep one token per site at
their own size, since spreading a spot over smaller cells makes copies of one expression that the
masked-expression and transcript-iBOT targets would leak through. Every site thus feeds exactly one
token of a view, and each token carries its own size.
Per sample, modality dropout makes the *student* see the image only, the transcripts only, or both;
the teacher always sees both, so the student learns to reach the fused embedding from one modality
(which is what keeps image-only inference strong). Crops are ordered crop-major (all samples' first
global crop, then all second ones), so a ``[2B, ...]`` output views as ``[2, B, ...]``.
"""

from __future__ import annotations

import numpy as np
import torch

from histotx.batch import SSLBatch, TranscriptBatch
from histotx.data.config import DataConfig
from histotx.data.masking import image_masks, token_masks
from histotx.data.pixels import PendingViews, render_views
from histotx.data.views import TileViews, View
from histotx.format import VOCAB_NAME
from histotx.tokens import TranscriptCells, bin_grids, token_size

BOTH, IMAGE_ONLY, TRANSCRIPTS_ONLY = 0, 1, 2
"""Per-sample modality codes of the student's input."""


def _tokens(views: list[View], resolution_um: float | None) -> list[TranscriptCells]:
    """Each view's tokens at the drawn size, or one per site (native) when the draw is "native" or finer
    than the site footprint; binned for all views of a size at once."""
    out: list[TranscriptCells] = [None] * len(views)  # type: ignore[list-item]
    for size in {v.size for v in views}:
        idx = [i for i, v in enumerate(views) if v.size == size]
        cells = bin_grids(
            [views[i].grid for i in idx],
            [views[i].mpp for i in idx],
            [token_size(views[i].grid.footprint_um, resolution_um) for i in idx],
            (size, size),
        )
        for i, c in zip(idx, cells, strict=True):
            out[i] = c
    return out


def _images(views: list[View], mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The views' images: made here for all of them at once (one pass per operation over the batch),
    or stacked where they were made already."""
    if all(v.image is not None for v in views):
        return torch.stack([v.image for v in views])
    tiles = list({id(v.source): v.source for v in views}.values())
    return render_views(views, tiles, mean, std)


def read_panels(shards: str) -> tuple[dict[str, np.ndarray], int]:
    """Each sample's measured genes (vocabulary ids) from the manifest's ``gene_ranges`` (half-open id
    ranges, written by ``histotx shard``), and the width of a panel row (the shard vocabulary)."""
    if not shards:
        return {}, 0
    from histotx.shard_location import load_manifest, load_vocab

    samples = load_manifest(shards).get("samples", {})
    panels = {
        sid: np.concatenate([np.zeros(0, np.int64)] + [np.arange(a, b) for a, b in rec["gene_ranges"]])
        for sid, rec in samples.items()
        if rec.get("gene_ranges") is not None
    }
    if not panels:
        return {}, 0
    vocab = load_vocab(shards, VOCAB_NAME)
    width = max([len(vocab) if vocab is not None else 0] + [int(g.max()) + 1 for g in panels.values() if g.size])
    return panels, width


class SSLCollate:
    """The loader's per-batch collation (runs in the workers; all randomness from ``rng``).

    When the shard set's manifest records each sample's gene panel, the batch carries it
    (``gene_panel``) so that the expression loss leaves unmeasured genes out; a sample without a
    record counts as measuring every gene of the shard vocabulary."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.grid_hw = (cfg.augment.global_crop_size // cfg.mask.patch_size,) * 2
        self.panels, self.panel_width = read_panels(cfg.stream.shards)
        self.mean = torch.tensor(cfg.augment.mean, dtype=torch.float32)
        self.std = torch.tensor(cfg.augment.std, dtype=torch.float32)

    def gene_panel(self, keys: list[str]) -> torch.Tensor | None:
        if not self.panels:
            return None
        out = np.ones((len(keys), self.panel_width), dtype=bool)
        for row, key in zip(out, keys, strict=True):
            genes = self.panels.get(key.split("__")[0])  # keys are {sample}__{tile} (histotx.format.tile_key)
            if genes is not None:
                row[:] = False
                row[genes] = True
        return torch.from_numpy(out)

    def __call__(self, items: list[TileViews], rng: np.random.Generator) -> SSLBatch:
        c, m = self.cfg.collate, self.cfg.mask
        batch = len(items)
        n_global, n_local = len(items[0].globals), len(items[0].locals)
        choice = c.resolutions_um[int(rng.integers(len(c.resolutions_um)))]
        native = choice == "native"
        resolution = None if native else float(choice)

        draw = rng.random(batch)
        modality = np.where(
            draw < c.p_image_only,
            IMAGE_ONLY,
            np.where(draw < c.p_image_only + c.p_transcripts_only, TRANSCRIPTS_ONLY, BOTH),
        )
        has_sites = np.array([any(v.grid.n_sites for v in it.globals + it.locals) for it in items])
        modality[~has_sites] = IMAGE_ONLY  # nothing to drop the image for

        global_views = [it.globals[k] for k in range(n_global) for it in items]
        local_views = [it.locals[k] for k in range(n_local) for it in items]
        cells = _tokens(global_views + local_views, resolution)
        global_cells, local_cells = cells[: len(global_views)], cells[len(global_views) :]

        keep_tx = np.tile(modality != IMAGE_ONLY, n_global)
        student_cells = [
            cell if keep else TranscriptCells.empty(cell.resolution_um)
            for cell, keep in zip(global_cells, keep_tx, strict=True)
        ]
        starts = np.cumsum([0] + [cell.n_cells for cell in global_cells])
        transcript_index = np.concatenate(
            [np.zeros(0, np.int64)] + [np.arange(starts[i], starts[i + 1]) for i in np.flatnonzero(keep_tx)]
        )
        local_keep = np.tile(modality != IMAGE_ONLY, n_local)
        local_student = [
            cell if keep else TranscriptCells.empty(cell.resolution_um)
            for cell, keep in zip(local_cells, local_keep, strict=True)
        ]

        image_present = np.tile(modality != TRANSCRIPTS_ONLY, n_global)
        masks = (
            image_masks(
                len(global_views),
                self.grid_hw,
                rng,
                m.image_mask_probability,
                m.image_mask_ratio,
                m.mask_aspect,
                m.min_block_patches,
            )
            & image_present[:, None]
        )
        tx_masks = token_masks(
            [cell.n_cells for cell in student_cells], rng, m.transcript_mask_probability, m.transcript_mask_ratio
        )

        size = self.cfg.augment.local_crop_size
        pending = None
        if any(isinstance(v.source, bytes) for v in global_views + local_views):  # left to the GPU
            pending = PendingViews.pack(global_views, local_views, size)
            global_images, local_images = torch.zeros(0), torch.zeros(0)
        else:
            global_images = _images(global_views, self.mean, self.std)
            local_images = _images(local_views, self.mean, self.std) if local_views else torch.zeros(0, 3, size, size)
        return SSLBatch(
            keys=[it.key for it in items],
            global_images=global_images,
            local_images=local_images,
            teacher_transcripts=TranscriptBatch.collate(global_cells),
            student_global_transcripts=TranscriptBatch.collate(student_cells),
            student_local_transcripts=TranscriptBatch.collate(local_student or [TranscriptCells.empty(1.0)]),
            student_global_image_present=torch.from_numpy(image_present),
            student_local_image_present=torch.from_numpy(np.tile(modality != TRANSCRIPTS_ONLY, n_local)),
            image_mask=torch.from_numpy(masks),
            transcript_mask=torch.from_numpy(np.concatenate([np.zeros(0, bool)] + tx_masks)),
            transcript_index=torch.from_numpy(transcript_index),
            modality=torch.from_numpy(modality.astype(np.int64)),
            resolution_um=resolution,
            native=native,
            gene_panel=self.gene_panel([it.key for it in items]),
            pending=pending,
        )
