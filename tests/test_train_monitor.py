"""Run monitors: teacher-collapse statistics and the kNN expression probe on held-out tiles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from shardkit import write_shard_set

from histotx.data.config import AugmentConfig
from histotx.model import FusedViT, FusedViTConfig
from histotx.train.monitor import CollapseStats, KnnProbe


def test_collapse_statistics_of_a_uniform_and_a_collapsed_teacher():
    k = 16
    uniform = CollapseStats()
    uniform.add(torch.full((8, k), 1.0 / k))
    u = uniform.reduce(torch.device("cpu"))
    assert u["teacher/entropy"] == pytest.approx(math.log(k)) and u["teacher/kl_to_uniform"] == pytest.approx(
        0.0, abs=1e-9
    )
    collapsed = CollapseStats()
    for _ in range(3):  # a window of three steps, every row on prototype 5
        collapsed.add(torch.nn.functional.one_hot(torch.full((8,), 5), k).float())
    c = collapsed.reduce(torch.device("cpu"))
    assert c["teacher/entropy"] == pytest.approx(0.0, abs=1e-9) and c["teacher/prototypes_used"] == 1
    assert c["teacher/kl_to_uniform"] == pytest.approx(math.log(k))
    spread = CollapseStats()
    spread.add(torch.eye(k)[:6])  # six samples, six prototypes
    s = spread.reduce(torch.device("cpu"))
    assert s["teacher/prototypes_used"] == 6 and s["teacher/kl_to_uniform"] == pytest.approx(math.log(k / 6))


def test_knn_probe_scores_features_against_held_out_expression(tmp_path):
    shards = write_shard_set(tmp_path / "shards", n_shards=4, per_shard=6, tile_px=48)  # 4 samples
    aug = AugmentConfig(global_crop_size=32)
    probe = KnnProbe(str(shards), n_tiles=20, n_genes=10, k=3, augment=aug, vocab_size=64)
    assert probe.images.shape == (20, 3, 32, 32) and probe.targets.shape == (20, 10)
    assert not probe.same_sample[0, 6] and probe.same_sample[0, 5]  # 6 tiles per sample
    # the truth itself as features: the nearest other-sample tiles are the most similar in expression
    truth = probe.score(probe.targets - probe.targets.mean(0))
    noise = np.mean([probe.score(np.random.default_rng(s).normal(size=(20, 8))) for s in range(5)])
    assert truth > noise + 0.2
    torch.manual_seed(0)
    model = FusedViT(FusedViTConfig(size="tiny", img_size=32, patch_size=8, vocab_size=64)).eval()
    out = probe(model, torch.device("cpu"))
    assert -1 <= out["probe/knn_pearson"] <= 1 and out["probe/tiles"] == 20
    with pytest.raises(ValueError, match="outside any one sample"):
        KnnProbe(str(shards), n_tiles=6, n_genes=10, k=3, augment=aug, vocab_size=64)
