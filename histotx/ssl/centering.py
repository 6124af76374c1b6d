"""Teacher-output normalisation: DINO centring and Sinkhorn-Knopp, both global over all ranks.

The teacher's targets must be normalised over the *global* batch, otherwise each rank's targets would
depend on how the batch was split. Every function here all-reduces when ``torch.distributed`` is
initialised and runs the same collectives on every rank, also when a rank holds no rows (e.g. no
masked tokens), so that no rank waits forever.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max) when distributed; a no-op on a single process."""
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


class Centering(nn.Module):
    """DINO centring: teacher probabilities ``softmax((t - c) / T)`` with ``c`` an EMA of the batch mean."""

    center: torch.Tensor

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def softmax(self, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        return torch.softmax((teacher_logits.float() - self.center) / temperature, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """Move the centre towards the mean of this step's teacher logits over all ranks."""
        logits = teacher_logits.float().reshape(-1, self.center.shape[-1])
        stats = torch.cat([logits.sum(0), logits.new_tensor([logits.shape[0]])])
        all_reduce_(stats)
        count = stats[-1]
        if count > 0:
            self.center.mul_(self.momentum).add_(stats[:-1] / count, alpha=1.0 - self.momentum)


def _global_logsumexp_over_rows(x: torch.Tensor) -> torch.Tensor:
    """``log sum_n exp(x[n, k])`` over the rows of every rank, computed stably: ``[K]``."""
    peak = x.max(dim=0).values if x.shape[0] else x.new_full(x.shape[1:], float("-inf"))
    peak = all_reduce_(peak.clone(), op="max")
    total = all_reduce_(torch.exp(x - peak).sum(dim=0))
    return peak + torch.log(total)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float, n_iterations: int = 3) -> torch.Tensor:
    """Teacher probabilities with equal prototype usage over the global batch (SwAV / DINOv2).

    Rows (samples) of the result sum to 1; columns (prototypes) tend to ``N / K`` over all ranks.
    Computed in the log domain, so no temperature or logit range under- or overflows.
    """
    log_q = teacher_logits.float() / temperature  # N × K
    n_total = int(all_reduce_(log_q.new_tensor([float(log_q.shape[0])])).item())
    if n_total == 0:
        return log_q.exp()
    for _ in range(n_iterations):
        log_q = log_q - _global_logsumexp_over_rows(log_q)  # each prototype: mass 1 (then 1/K)
        log_q = torch.log_softmax(log_q, dim=1)  # each sample: mass 1 (then 1/N)
    return log_q.exp()
