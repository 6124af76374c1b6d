"""The SSL loss terms, one small module each; they take logits and teacher probabilities, no model.

Cross-entropies are computed in fp32 whatever the autocast dtype: at 65k prototypes and a student
temperature of 0.1, bf16 log-softmax loses the signal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _zero_like_graph(t: torch.Tensor) -> torch.Tensor:
    """A zero loss still connected to ``t`` (so every rank runs the same backward graph)."""
    return t.sum() * 0.0


class DINOLoss(nn.Module):
    """DINO loss on CLS: every student crop against every teacher crop of the same image but itself.

    ``student_logits`` is ``[n_student_crops, B, K]`` with the teacher's (global) crops first, in the
    same order as ``teacher_probs`` ``[n_teacher_crops, B, K]``; the result is the mean over crop pairs
    of the batch-mean cross-entropy ``-sum_k p_t log softmax(s / T_s)``.
    """

    def __init__(self, student_temperature: float = 0.1) -> None:
        super().__init__()
        self.student_temperature = student_temperature

    def forward(
        self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``student_valid`` ``[n_s, B]`` bool leaves out student crops (views without any token): the
        mean runs over the remaining (teacher crop, other student crop, sample) triples."""
        n_s, batch, _ = student_logits.shape
        n_t = teacher_probs.shape[0]
        if n_t > n_s or teacher_probs.shape[1] != batch:
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} and teacher probabilities "
                f"{tuple(teacher_probs.shape)} do not pair up (teacher crops must come first)"
            )
        log_p = F.log_softmax(student_logits.float() / self.student_temperature, dim=-1)
        ce = -torch.einsum("tbk,sbk->tsb", teacher_probs.float(), log_p)  # [n_t, n_s, B]
        weight = ~torch.eye(n_t, n_s, dtype=torch.bool, device=ce.device)[:, :, None]
        if student_valid is not None:
            weight = weight & student_valid.to(ce.device)[None]
        weight = weight.expand_as(ce)
        n_terms = int(weight.sum())
        if n_terms == 0:
            return _zero_like_graph(student_logits)
        return ce.masked_fill(~weight, 0.0).sum() / n_terms


class iBOTLoss(nn.Module):  # noqa: N801 (the method's name)
    """iBOT loss on masked tokens (image patches or transcript tokens) of the student.

    Each masked token's cross-entropy is weighted by 1 / (masked tokens of its crop), and the sum is
    divided by the number of crops, masked or not (as DINOv2 does): every crop weighs the same
    whatever its mask size. The caller counts the crops (views without any token do not count).
    """

    def __init__(self, student_temperature: float = 0.1) -> None:
        super().__init__()
        self.student_temperature = student_temperature

    def forward(
        self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, crop_index: torch.Tensor, n_crops: int
    ) -> torch.Tensor:
        """``student_logits``/``teacher_probs``: ``[M, K]`` for the M masked tokens; ``crop_index``: ``[M]``."""
        if student_logits.shape != teacher_probs.shape or crop_index.shape != student_logits.shape[:1]:
            raise ValueError(
                f"masked-token shapes differ: student {tuple(student_logits.shape)}, teacher "
                f"{tuple(teacher_probs.shape)}, crop index {tuple(crop_index.shape)}"
            )
        if student_logits.shape[0] == 0 or n_crops == 0:
            return _zero_like_graph(student_logits)
        log_p = F.log_softmax(student_logits.float() / self.student_temperature, dim=-1)
        ce = -(teacher_probs.float() * log_p).sum(-1)
        per_crop = torch.bincount(crop_index, minlength=n_crops).to(ce.dtype)
        return (ce / per_crop[crop_index]).sum() / n_crops


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator on L2-normalised features: spreads the batch out.

    ``-mean log(distance to nearest neighbour)``. Duplicates (distance 0) would give -log 0 = inf and
    a NaN gradient; the pairwise distance carries an ``eps`` so the loss and its gradient stay finite.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[0] < 2:
            return _zero_like_graph(features)
        x = F.normalize(features.float(), p=2, dim=-1, eps=self.eps)
        with torch.no_grad():
            dots = x @ x.t()
            dots.fill_diagonal_(-2.0)  # below any cosine: never one's own neighbour
            nearest = dots.argmax(dim=1)
        distance = F.pairwise_distance(x, x[nearest], p=2, eps=self.eps)
        return -torch.log(distance + self.eps).mean()


class MaskedExpressionLoss(nn.Module):
    """Reconstruct the expression of masked transcript tokens: multinomial NLL over genes.

    The target of a token is its gene composition (counts / total). Genes outside the token's panel
    are left out of the softmax when ``gene_mask`` says which genes were measured, so that an
    unmeasured gene is not taught to be absent. Tokens with no counts are ignored.
    """

    def forward(
        self,
        logits: torch.Tensor,
        offsets: torch.Tensor,
        gene: torch.Tensor,
        weight: torch.Tensor,
        gene_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``logits``: ``[M, V]``; targets in CSR form: ``offsets [M+1]``, ``gene``/``weight [nnz]``;
        ``gene_mask``: ``[V]`` or ``[M, V]`` booleans, True where a gene was measured."""
        n_tokens = logits.shape[0]
        if offsets.shape != (n_tokens + 1,) or gene.shape != weight.shape:
            raise ValueError(
                f"CSR targets do not match {n_tokens} tokens: offsets {tuple(offsets.shape)}, "
                f"gene {tuple(gene.shape)}, weight {tuple(weight.shape)}"
            )
        logits = logits.float()
        if gene_mask is not None:
            logits = logits.masked_fill(~gene_mask.expand_as(logits), float("-inf"))
        row = torch.repeat_interleave(torch.arange(n_tokens, device=logits.device), offsets.diff())
        w = weight.float()
        total = torch.zeros(n_tokens, device=logits.device).index_add_(0, row, w)
        valid = total > 0
        if not bool(valid.any()):
            return _zero_like_graph(logits.nan_to_num(0.0, 0.0, 0.0))
        log_p = F.log_softmax(logits, dim=-1)
        nll = torch.zeros(n_tokens, device=logits.device).index_add_(
            0, row, -(w / total[row].clamp_min(1e-12)) * log_p[row, gene.long()]
        )
        return nll[valid].mean()
