"""Model FLOPs of a training step, counted from the architecture and the batch's sequence lengths.

The usual MFU convention: matrix-multiply FLOPs only (2 per multiply-add), backward = 2 × forward,
activation recomputation not counted. Per sequence of n tokens and per block: qkv and output
projections 2n·4d², the MLP 2n·(d·h + h·d) (SwiGLU: fc1 d → h, fc2 h/2 → d), attention scores and
weighted values 2 · 2n²d; plus the patch embedding per image patch and the heads per row they see.
The teacher runs forward only; the student forward and backward.
"""

from __future__ import annotations

from itertools import pairwise

import torch

from histotx.batch import SSLBatch
from histotx.model import FusedViTConfig
from histotx.ssl.config import SSLConfig


def attention_flops(lengths: torch.Tensor | list[int], width: int) -> float:
    """One attention forward over sequences of ``lengths`` tokens, each attending only within itself: the
    scores QKᵀ and the weighted values PV, 2 · n² · width each (``width`` = heads × head dim)."""
    n = torch.as_tensor(lengths, dtype=torch.float64)
    return (4 * n * n * width).sum().item()


def backbone_flops(cfg: FusedViTConfig, lengths: torch.Tensor | list[int], n_patches: int) -> float:
    """One forward pass over sequences of ``lengths`` tokens holding ``n_patches`` image patches in all."""
    d, h = cfg.embed_dim, cfg.mlp_hidden_dim
    n = torch.as_tensor(lengths, dtype=torch.float64)
    mlp = d * h + (h // 2) * d if cfg.mlp == "swiglu" else 2 * d * h
    per_block = (2 * n * (4 * d * d + mlp)).sum().item() + attention_flops(n, d)
    return cfg.depth * per_block + 2.0 * n_patches * cfg.in_chans * cfg.patch_size**2 * d


def head_flops(embed_dim: int, ssl: SSLConfig, rows: int) -> float:
    h = ssl.head
    dims = [embed_dim] + [h.hidden_dim] * (h.n_layers - 1) + [h.bottleneck_dim, h.out_dim]
    return 2.0 * rows * sum(a * b for a, b in pairwise(dims))


def step_flops(cfg: FusedViTConfig, ssl: SSLConfig, batch: SSLBatch, lengths: dict[str, torch.Tensor]) -> float:
    """FLOPs of one micro-step on ``batch``; ``lengths`` from :meth:`SSLMetaArch.sequence_lengths`."""

    def grid(images: torch.Tensor) -> int:
        return (images.shape[-2] // cfg.patch_size) * (images.shape[-1] // cfg.patch_size)

    n_global = batch.global_images.shape[0]
    masked = int(batch.image_mask.sum()) + int(batch.transcript_mask.sum())
    teacher = backbone_flops(cfg, lengths["teacher"], n_global * grid(batch.global_images)) + head_flops(
        cfg.embed_dim, ssl, n_global + masked
    )
    student = backbone_flops(
        cfg, lengths["student_global"], int(batch.student_global_image_present.sum()) * grid(batch.global_images)
    ) + head_flops(cfg.embed_dim, ssl, n_global + masked)
    if "student_local" in lengths:
        n_local = batch.local_images.shape[0]
        student += backbone_flops(
            cfg, lengths["student_local"], int(batch.student_local_image_present.sum()) * grid(batch.local_images)
        ) + head_flops(cfg.embed_dim, ssl, n_local)
    if ssl.loss.masked_expression_weight > 0:
        student += 2.0 * int(batch.transcript_mask.sum()) * cfg.embed_dim * cfg.vocab_size
    if ssl.loss.cls_expression_weight > 0:
        student += 2.0 * n_global * cfg.embed_dim * cfg.vocab_size
    return teacher + 3 * student
