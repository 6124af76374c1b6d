"""A backbone of a training run, read from its checkpoint without a DeepSpeed engine, a process group or a GPU.

The teacher (what one embeds with): a checkpoint (:mod:`histotx.train.checkpoint`) keeps it whole in
``teacher.safetensors``, written by rank 0 whatever the ZeRO stage, since the teacher is an fp32 EMA
copy outside the DeepSpeed engine and never partitioned. The student lives in DeepSpeed's files: under
ZeRO-1/2/3 its fp32 weights are the optimiser's partitions, one file per rank, reassembled by
DeepSpeed's own ``zero_to_fp32`` with every file read through the weights-only loader
(:func:`~histotx.train.checkpoint.load_deepspeed_file`); under ZeRO-0 the module state holds it whole.
What using a backbone needs besides its weights comes from the run's resolved config (``trainer.json``)
and its shard set: the gene vocabulary (``vocab.tsv``), the tiles' µm/px and the cohort (``manifest.json``).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from histotx.config import from_dict
from histotx.format import MANIFEST_NAME, VOCAB_NAME, read_manifest
from histotx.model import FusedViTConfig
from histotx.model.pretrained import read_json_file
from histotx.train import checkpoint
from histotx.train.config import TrainConfig
from histotx.vocab import Vocab

TEACHER_BACKBONE = "teacher.backbone."
"""Prefix of the teacher backbone's tensors in a checkpoint's ``teacher.safetensors``."""
STUDENT_BACKBONE = "backbone."
"""Prefix of the backbone's tensors in the student (the module DeepSpeed trains)."""
WHICH = ("teacher", "student")


@dataclass
class Teacher:
    """A run's teacher backbone and what using it needs besides its weights."""

    state: dict[str, torch.Tensor]  # FusedViT keys, fp32
    config: FusedViTConfig
    train_config: dict[str, Any]  # the run's resolved config, as trainer.json holds it
    vocab: Vocab
    manifest: dict[str, Any]  # the shard set's manifest (cohort, tiling)
    checkpoint: Path
    step: int
    which: str = "teacher"

    @property
    def genes(self) -> list[str]:
        return [self.vocab.name(i) for i in range(len(self.vocab))]

    @property
    def mpp(self) -> float:
        return float(self.manifest["config"]["mpp"])

    @property
    def image_size(self) -> int:
        return int(self.train_config["data"]["augment"]["global_crop_size"])

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.train_config["data"]["augment"]["mean"])

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.train_config["data"]["augment"]["std"])

    @property
    def name(self) -> str:
        run = self.checkpoint.parent.parent if self.checkpoint.parent.name == "checkpoints" else self.checkpoint.parent
        return f"{run.name}@{self.checkpoint.name}" + ("" if self.which == "teacher" else f"/{self.which}")


def find_checkpoint(source: str | Path) -> Path:
    """A complete checkpoint folder: ``source`` itself, or the newest (``latest``) of a run folder."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run or checkpoint folder")
    return checkpoint.resolve(str(path), path / "checkpoints")


def _teacher_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = path / checkpoint.TEACHER
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing; every complete checkpoint has it (is {path} a HistoTx one?)")
    state = {
        k[len(TEACHER_BACKBONE) :]: v for k, v in load_file(str(weights)).items() if k.startswith(TEACHER_BACKBONE)
    }
    if not state:
        raise ValueError(f"{weights}: no {TEACHER_BACKBONE}* tensors")
    return state


class _WeightsOnlyTorch:
    """``torch`` as DeepSpeed's zero_to_fp32 sees it, with ``torch.load`` the weights-only reader."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, **_):
        return checkpoint.load_deepspeed_file(f, map_location)


def student_state(path: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """The student's full fp32 state: ZeRO-1/2/3 partitions reassembled by DeepSpeed's zero_to_fp32."""
    if zero_stage == 0:
        files = sorted(path.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{path}: no mp_rank_*_model_states.pt (DeepSpeed's module state)")
        state = checkpoint.load_deepspeed_file(files[0], "cpu")["module"]
    else:
        from unittest import mock

        from deepspeed.utils import zero_to_fp32

        with (
            mock.patch.object(zero_to_fp32, "torch", _WeightsOnlyTorch()),
            contextlib.redirect_stdout(io.StringIO()),
        ):  # its progress prints
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    return {k: v.float() for k, v in state.items()}


def read_teacher(source: str | Path, shards: str | Path | None = None, which: str = "teacher") -> Teacher:
    """The teacher (or, ``which="student"``, the student) backbone of a run folder (its newest complete
    checkpoint) or of one checkpoint folder. ``shards`` replaces the run's ``data.stream.shards`` (e.g.
    when the run was moved)."""
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    path = find_checkpoint(source)
    info = read_json_file(path / checkpoint.COMPLETE)
    if "config" not in info:
        raise ValueError(f"{path / checkpoint.COMPLETE}: holds no resolved config; cannot rebuild the model")
    cfg = from_dict(TrainConfig, info["config"], f"{path / checkpoint.COMPLETE}: config")
    if which == "teacher":
        state = _teacher_state(path)
    else:
        full = student_state(path, cfg.deepspeed.zero_stage)
        state = {k[len(STUDENT_BACKBONE) :]: v for k, v in full.items() if k.startswith(STUDENT_BACKBONE)}
    shard_dir = Path(shards or cfg.data.stream.shards)
    if not (shard_dir / VOCAB_NAME).is_file() or not (shard_dir / MANIFEST_NAME).is_file():
        raise FileNotFoundError(
            f"{shard_dir}: the run's shard set (data.stream.shards) has no {VOCAB_NAME} + "
            f"{MANIFEST_NAME}; they name the genes and the µm/px of the model's input. "
            "Pass the shard folder explicitly (--shards DIR)"
        )
    return Teacher(
        state,
        cfg.model_config(),
        info["config"],
        Vocab.load(shard_dir / VOCAB_NAME),
        read_manifest(shard_dir),
        path,
        int(info["step"]),
        which,
    )
