"""Transcript tokens for the model: a packed batch of binned cells, and the module that embeds them.

A token's value is its normalised expression vector embedded as a weighted sum of learned gene
embeddings (``nn.EmbeddingBag`` with per-sample weights: a linear map of the sparse vector, so a
300-gene panel and an 18,000-gene transcriptome cost the same per non-zero), then a LayerNorm (the
number of expressed genes per cell varies by orders of magnitude between technologies) and a linear
projection to the model width. Its position is the image's patch position embedding, bilinearly
sampled at the cell centre, so a transcript token and the image patch under it share a position.
A modality embedding and an embedding of the token size r (Fourier features of log r through a
small MLP, so any r works) are added; r may differ from token to token (a batch mixing 55 µm spots
and 8 µm cells), and the MLP runs once per distinct size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from histotx.batch import TranscriptBatch


class ResolutionEmbedding(nn.Module):
    """r (µm) → a D-vector: Fourier features of log r through a two-layer MLP, defined for any r > 0;
    a ``(T,)`` tensor of sizes → ``(T, D)``."""

    def __init__(self, dim: int, n_frequencies: int = 8) -> None:
        super().__init__()
        # Periods from ~0.2 to ~25 in log-µm: resolves 2 vs 2.5 µm and still orders 2 µm vs 100 µm.
        self.register_buffer("frequencies", 2.0 ** torch.arange(n_frequencies) / 4.0, persistent=False)
        self.fc1 = nn.Linear(2 * n_frequencies + 1, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, resolution_um: float | torch.Tensor) -> torch.Tensor:
        if isinstance(resolution_um, torch.Tensor):
            sizes, index = torch.unique(resolution_um, return_inverse=True)
            return self._embed(sizes.double().log())[index]
        return self._embed(torch.tensor([math.log(resolution_um)], dtype=torch.float64))[0]

    def _embed(self, log_r: torch.Tensor) -> torch.Tensor:
        log_r = log_r.to(device=self.frequencies.device, dtype=self.fc1.weight.dtype)[:, None]
        angles = log_r * self.frequencies
        features = torch.cat([log_r, angles.sin(), angles.cos()], dim=-1)
        return self.fc2(F.silu(self.fc1(features)))


class TranscriptTokenizer(nn.Module):
    """Embeds a :class:`TranscriptBatch` into (T, D) tokens on the image's position grid."""

    def __init__(self, vocab_size: int, gene_dim: int, dim: int) -> None:
        super().__init__()
        self.gene_embed = nn.EmbeddingBag(vocab_size, gene_dim, mode="sum", include_last_offset=True)
        self.norm = nn.LayerNorm(gene_dim, eps=1e-6)
        self.proj = nn.Linear(gene_dim, dim)
        self.modality = nn.Parameter(torch.zeros(dim))
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.resolution = ResolutionEmbedding(dim)
        nn.init.normal_(self.gene_embed.weight, std=0.02)
        nn.init.trunc_normal_(self.modality, std=0.02)

    def forward(
        self,
        batch: TranscriptBatch,
        pos_grid: torch.Tensor,
        patch_size: int,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``pos_grid`` (gh, gw, D) is the image's patch position embedding at this input's grid;
        ``mask`` (T,) bool replaces the value of masked tokens by a learned mask token (position kept)."""
        if batch.n_tokens and int(batch.gene.max()) >= self.gene_embed.num_embeddings:
            raise ValueError(
                f"gene id {int(batch.gene.max())} is outside the vocabulary of "
                f"{self.gene_embed.num_embeddings} (vocab_size in the model config)"
            )
        weight = batch.weight.to(self.gene_embed.weight.dtype)
        bag = self.gene_embed(batch.gene, batch.offsets, per_sample_weights=weight)
        value = self.proj(self.norm(bag))
        if mask is not None:
            if mask.shape != (batch.n_tokens,):
                raise ValueError(f"transcript_mask must have shape ({batch.n_tokens},), got {tuple(mask.shape)}")
            value = torch.where(mask[:, None], self.mask_token.to(value.dtype), value)
        position = self.position(batch.xy, pos_grid, patch_size)
        return value + position + self.modality + self.resolution(batch.resolution_um)

    @staticmethod
    def position(xy: torch.Tensor, pos_grid: torch.Tensor, patch_size: int) -> torch.Tensor:
        """Bilinear sample of the (gh, gw, D) grid at pixel positions (T, 2); patch (i, j)'s value sits at
        its centre ((j + ½)·p, (i + ½)·p); beyond the outer centres the border value holds."""
        gh, gw, dim = pos_grid.shape
        norm = xy.new_tensor([2.0 / (gw * patch_size), 2.0 / (gh * patch_size)])
        dtype = torch.promote_types(pos_grid.dtype, torch.float32)  # fp32 at least, float64 kept
        where = (xy.to(dtype) * norm.to(dtype) - 1.0).view(1, 1, -1, 2)
        image = pos_grid.permute(2, 0, 1)[None].to(dtype)
        sampled = F.grid_sample(image, where, mode="bilinear", padding_mode="border", align_corners=False)
        return sampled.view(dim, -1).t().to(pos_grid.dtype)
