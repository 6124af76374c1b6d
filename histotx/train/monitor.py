"""What a DINOv2-style run is watched by besides its losses: a kNN probe and teacher-collapse statistics.

kNN probe. A held-out shard set (``monitor.shards``: tiles, ideally patients, the run never trains on)
is read once; each tile is resized whole to the global crop size and embedded, image only, by the
teacher backbone (the model a user keeps). Every tile's expression target is its pseudo-bulk over its
sites on the genes every sample of the subset measured (a gene some sample never shows is taken as
outside its panel), normalised to 1e4 over those genes and log1p, restricted to the ``genes`` most
variable of them (so technologies with different panels compare).
kNN regression (cosine, k neighbours) predicts each tile from the tiles of the *other* samples (a
neighbouring, overlapping tile of the same slide would make any feature look good); the score is the
Pearson correlation per gene between prediction and truth, averaged over genes (``probe/knn_pearson``). It
needs no labels, costs one teacher pass over a few hundred tiles, and a random-init teacher gives the baseline
it should beat (the probe also runs at step 0).

Collapse. Per step, from the teacher's CLS probabilities (after centring or Sinkhorn): the mean entropy
of a row (``teacher/entropy``; ln K is a uniform teacher that teaches nothing), the KL divergence from
the uniform distribution to the batch-mean distribution (``teacher/kl_to_uniform``; large when all
samples go to few prototypes), and the number of prototypes that are some row's argmax within the
logging window, all ranks together (``teacher/prototypes_used``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from histotx.data.config import AugmentConfig
from histotx.data.stream import LoaderStats, read_shard
from histotx.data.views import CropGeometry
from histotx.format import decode_image_rgb, decode_sample, read_manifest
from histotx.shard_reader import shard_path
from histotx.tokens import NORMALISED_TOTAL


class CollapseStats:
    """Sums over a logging window of the teacher's CLS probabilities (kept on the device until reduced)."""

    def __init__(self) -> None:
        self.rows = 0
        self.entropy: torch.Tensor | None = None
        self.prob_sum: torch.Tensor | None = None
        self.argmax_count: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, probs: torch.Tensor) -> None:
        """``probs``: ``[rows, K]`` teacher probabilities of one step."""
        p = probs.float()
        entropy = -(p * p.clamp_min(1e-30).log()).sum()
        counts = torch.bincount(p.argmax(-1), minlength=p.shape[1]).float()
        if self.entropy is None:
            self.entropy, self.prob_sum, self.argmax_count = entropy, p.sum(0), counts
        else:
            self.entropy += entropy
            self.prob_sum += p.sum(0)
            self.argmax_count += counts
        self.rows += p.shape[0]

    def reduce(self, device: torch.device) -> dict[str, float]:
        """Window values over all ranks (collective when distributed; every rank must have added)."""
        if self.entropy is None:
            return {}
        rows = torch.tensor([float(self.rows)], device=device)
        packed = torch.cat(
            [self.entropy.view(1).to(device), rows, self.prob_sum.to(device), self.argmax_count.to(device)]
        ).double()
        if dist.is_initialized():
            dist.all_reduce(packed)
        k = self.prob_sum.shape[0]
        entropy, n = packed[0].item(), max(packed[1].item(), 1.0)
        mean = packed[2 : 2 + k] / n
        kl = float((mean * (mean.clamp_min(1e-30) * k).log()).sum())
        return {
            "teacher/entropy": entropy / n,
            "teacher/entropy_max": math.log(k),
            "teacher/kl_to_uniform": kl,
            "teacher/prototypes_used": int((packed[2 + k :] > 0).sum()),
        }


def pseudo_bulk(counts: np.ndarray) -> np.ndarray:
    """Tiles' expression ``[tiles, genes]``: counts summed over sites, normalised to 1e4 per tile, log1p."""
    return np.log1p(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-12) * NORMALISED_TOTAL)


class KnnProbe:
    """Held-out tiles (images and expression targets), read once; :meth:`__call__` scores a backbone."""

    def __init__(
        self, shards: str, n_tiles: int, n_genes: int, k: int, augment: AugmentConfig, vocab_size: int
    ) -> None:
        manifest = read_manifest(shards)
        images, targets, samples = [], [], []
        size = augment.global_crop_size
        mean = torch.tensor(augment.mean).view(3, 1, 1)
        std = torch.tensor(augment.std).view(3, 1, 1)
        stats = LoaderStats()
        for shard in manifest["shards"]:
            for raw in read_shard(str(shard_path(shards, shard["name"])), stats):
                tile = decode_sample(raw)
                if tile.grid.n_sites == 0:
                    continue
                rgb = torch.from_numpy(np.array(decode_image_rgb(tile.image))).permute(2, 0, 1)
                whole = CropGeometry(0, 0, rgb.shape[2], rgb.shape[1], size)
                images.append((whole.apply_to_image(rgb).float() / 255.0 - mean) / std)
                targets.append(
                    np.bincount(tile.grid.gene.astype(np.int64), weights=tile.grid.count, minlength=vocab_size)[
                        :vocab_size
                    ]
                )
                samples.append(str(tile.meta["sample"]))
                if len(images) == n_tiles:
                    break
            if len(images) == n_tiles:
                break
        _, sample_index = np.unique(samples, return_inverse=True)
        if len(images) - np.bincount(sample_index).max() < k:
            raise ValueError(
                f"{shards}: {len(images)} tiles with transcripts in {sample_index.max() + 1} samples; the "
                f"kNN probe needs at least {k} outside any one sample"
            )
        counts = np.stack(targets)
        shared = np.ones(vocab_size, dtype=bool)  # genes seen in some tile of every sample
        for s in range(sample_index.max() + 1):
            shared &= counts[sample_index == s].sum(axis=0) > 0
        if not shared.any():
            raise ValueError(
                f"{shards}: no gene is measured by every sample of the first {len(images)} tiles; the "
                "kNN probe needs held-out samples that share a gene panel"
            )
        y = pseudo_bulk(counts[:, shared])
        top = np.argsort(-y.var(axis=0), kind="stable")[:n_genes]
        self.images = torch.stack(images)
        self.targets = y[:, top[y[:, top].var(axis=0) > 0]]
        self.same_sample = sample_index[:, None] == sample_index[None, :]
        self.k = k

    @torch.no_grad()
    def embed(self, backbone: torch.nn.Module, device: torch.device, batch: int = 64) -> np.ndarray:
        out = [
            backbone(images=self.images[i : i + batch].to(device)).cls.float().cpu()
            for i in range(0, self.images.shape[0], batch)
        ]
        return torch.cat(out).numpy()

    def score(self, features: np.ndarray) -> float:
        """Mean over genes of the Pearson correlation of kNN predictions (other samples' tiles) with the truth."""
        x = features.astype(np.float64)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        similarity = np.where(self.same_sample, -np.inf, x @ x.T)
        neighbours = np.argpartition(-similarity, self.k - 1, axis=1)[:, : self.k]
        pred = self.targets[neighbours].mean(axis=1)
        pc, tc = pred - pred.mean(0), self.targets - self.targets.mean(0)
        denom = np.sqrt((pc**2).sum(0) * (tc**2).sum(0))
        r = np.where(denom > 0, (pc * tc).sum(0) / np.where(denom > 0, denom, 1.0), 0.0)
        return float(r.mean())

    def __call__(self, backbone: torch.nn.Module, device: torch.device) -> dict[str, Any]:
        return {
            "probe/knn_pearson": self.score(self.embed(backbone, device)),
            "probe/tiles": int(self.images.shape[0]),
            "probe/genes": int(self.targets.shape[1]),
        }
