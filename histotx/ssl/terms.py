"""The SSL loss terms, each declared once: its name (the key of the losses and the monitor's column), the
:class:`~histotx.ssl.config.LossConfig` field holding its weight, the student head it trains and the function
computing it from one step's outputs.

A new term is one :class:`LossTerm` in :data:`LOSS_TERMS` (with its weight field in ``LossConfig``): the
total, the logged losses and the config check all follow this list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from histotx.batch import SSLBatch
    from histotx.ssl.meta import SSLMetaArch, TeacherTargets


@dataclass
class StepOutputs:
    """What every term may read of one step: the student's outputs, the teacher's targets, the batch and the
    crop bookkeeping they share."""

    out: dict[str, torch.Tensor]
    targets: TeacherTargets
    batch: SSLBatch
    n_global: int  # global crops per sample
    n_crops: int  # student crops per sample (global first)
    valid: torch.Tensor  # [n_crops · B] bool: student views holding any token
    n_valid: int  # valid global crops (the iBOT terms' divisor)


def _dino(meta: SSLMetaArch, s: StepOutputs) -> torch.Tensor:
    b = s.batch.batch_size
    return meta.dino_loss(
        s.out["cls_logits"].view(s.n_crops, b, -1), s.targets.cls.view(s.n_global, b, -1), s.valid.view(s.n_crops, b)
    )


def _ibot_image(meta: SSLMetaArch, s: StepOutputs) -> torch.Tensor:
    image_crop = s.batch.image_mask.nonzero()[:, 0]
    return meta.ibot_loss(s.out["patch_logits"], s.targets.patch, image_crop, s.n_valid)


def _ibot_transcript(meta: SSLMetaArch, s: StepOutputs) -> torch.Tensor:
    tokens = s.batch.student_global_transcripts
    crops = s.n_global * s.batch.batch_size
    token_crop = torch.repeat_interleave(
        torch.arange(crops, device=tokens.lengths.device), tokens.lengths, output_size=tokens.n_tokens
    )[s.batch.transcript_mask]
    return meta.ibot_loss(s.out["transcript_logits"], s.targets.transcript, token_crop, s.n_valid)


def _koleo(meta: SSLMetaArch, s: StepOutputs) -> torch.Tensor:
    valid_global = s.valid[: s.n_global * s.batch.batch_size]
    features = s.out["cls_features"].chunk(s.n_global)
    return sum(meta.koleo_loss(f[v]) for f, v in zip(features, valid_global.chunk(s.n_global), strict=True))


def _expression(meta: SSLMetaArch, s: StepOutputs) -> torch.Tensor:
    return meta.expression_term(s.out, s.batch)


def _cls_expression(meta: SSLMetaArch, s: StepOutputs) -> torch.Tensor:
    return meta.cls_expression_term(s.out, s.batch)


@dataclass(frozen=True)
class LossTerm:
    name: str  # key in the losses dict and the monitor
    weight: str  # field of LossConfig holding the term's weight (0 turns it off)
    head: str | None  # the SSLNetwork attribute whose output it trains (None: the backbone's features)
    compute: Callable[[SSLMetaArch, StepOutputs], torch.Tensor]


LOSS_TERMS: tuple[LossTerm, ...] = (
    LossTerm("dino", "dino_weight", "dino_head", _dino),
    LossTerm("ibot_image", "ibot_image_weight", "ibot_head", _ibot_image),
    LossTerm("ibot_transcript", "ibot_transcript_weight", "ibot_head", _ibot_transcript),
    LossTerm("koleo", "koleo_weight", None, _koleo),
    LossTerm("expression", "masked_expression_weight", "expression_head", _expression),
    LossTerm("cls_expression", "cls_expression_weight", "cls_expression_head", _cls_expression),
)
TERM_NAMES: tuple[str, ...] = tuple(t.name for t in LOSS_TERMS)
