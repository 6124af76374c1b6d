"""Continuing a released backbone with fresh heads (issue 21, section 3): the head warm-up.

A small "foundation model" (the tiny backbone, trained a few supervised steps so it is not its random init) is
written as a timm hub folder, as a released FM comes, and continued with ``init.backbone``. With
``ssl.schedule.head_warmup_steps`` the backbone's lr is 0 while the fresh heads and prototypes fit: its weights,
the teacher's and the kNN probe logged from step 0 stay those of the FM, then it trains. Without the warm-up the
fresh heads move the backbone from the first step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from shardkit import write_shard_set

from histotx.config import load_config
from histotx.export.source import STUDENT_BACKBONE, _teacher_state, find_checkpoint, student_state
from histotx.model import FusedViT
from histotx.model.pretrained import save_timm
from histotx.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "train" / "tiny_cpu.yaml"
WARMUP = 4


def _fm(folder: Path) -> FusedViT:
    cfg = load_config(TrainConfig, TINY, [])
    torch.manual_seed(7)
    model = FusedViT(cfg.model_config())
    with torch.no_grad():  # not a fresh init: every tensor moved off its initial value
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_timm(model, folder, tuple(cfg.data.augment.mean), tuple(cfg.data.augment.std))
    return model


def _train(out: Path, shards: Path, held_out: Path, fm: Path, *extra: str) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "histotx.cli",
        "train",
        str(TINY),
        f"out={out}",
        f"data.stream.shards={shards}",
        f"init.backbone={fm}",
        "data.collate.resolutions_um=[16.0, 32.0]",
        f"steps={WARMUP + 2}",
        "log.every_steps=1",
        "log.tensorboard=false",
        "checkpoint.every_steps=1000",
        "monitor.every_steps=2",
        f"monitor.shards={held_out}",
        "monitor.k=2",
        "ssl.schedule.warmup_steps=1",
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    run = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _backbone_change(run: Path, fm: FusedViT, which: str) -> float:
    """Largest change of any tensor the FM ships (the transcript branch and the image mask token are new modules:
    a released backbone has neither, and they train from step 0)."""
    path = find_checkpoint(run)
    if which == "teacher":
        state = _teacher_state(path)
    else:
        state = {
            k[len(STUDENT_BACKBONE) :]: v for k, v in student_state(path, 2).items() if k.startswith(STUDENT_BACKBONE)
        }
    return max(
        (state[k] - v).abs().max().item()
        for k, v in fm.state_dict().items()
        if not k.startswith(("transcript.", "mask_token"))
    )


@pytest.mark.slow
def test_head_warmup_holds_the_continued_backbone_and_its_probe(tmp_path):
    shards = write_shard_set(tmp_path / "train", n_shards=2, per_shard=8, tile_px=32, seed=1)
    held_out = write_shard_set(tmp_path / "held_out", n_shards=3, per_shard=4, tile_px=32, seed=2)
    fm = _fm(tmp_path / "fm")

    warm = _train(tmp_path / "warm", shards, held_out, tmp_path / "fm", f"ssl.schedule.head_warmup_steps={WARMUP}")
    probes = {r["step"]: r["probe/knn_pearson"] for r in warm if "probe/knn_pearson" in r}
    steps = [r for r in warm if "loss" in r]
    assert sorted(probes) == [0, 2, 4, 6]
    assert probes[2] == pytest.approx(probes[0], abs=1e-6) and probes[4] == pytest.approx(probes[0], abs=1e-6)
    assert all(r["backbone_lr"] == 0.0 for r in steps[:WARMUP]) and all(r["lr"] > 0 for r in steps[1:WARMUP])
    assert steps[WARMUP]["backbone_lr"] > 0  # then the backbone joins
    assert _backbone_change(tmp_path / "warm", fm, "student") > 0  # ... and moves in the last steps

    held = _train(tmp_path / "held", shards, held_out, tmp_path / "fm", f"ssl.schedule.head_warmup_steps={WARMUP + 2}")
    held_probes = [r["probe/knn_pearson"] for r in held if "probe/knn_pearson" in r]
    assert held_probes == pytest.approx([probes[0]] * 4, abs=1e-6)  # the probe held to the end
    assert _backbone_change(tmp_path / "held", fm, "student") == 0.0  # lr 0: not one weight moved
    assert _backbone_change(tmp_path / "held", fm, "teacher") < 1e-6  # the EMA of an unchanged student

    cold = _train(tmp_path / "cold", shards, held_out, tmp_path / "fm")
    cold_probes = {r["step"]: r["probe/knn_pearson"] for r in cold if "probe/knn_pearson" in r}
    assert cold_probes[0] == pytest.approx(probes[0], abs=1e-6)  # the same FM at step 0
    assert _backbone_change(tmp_path / "cold", fm, "student") > 1e-4  # fresh heads move it from the start
