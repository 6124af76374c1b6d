"""Projection heads of the SSL objective (student and teacher each hold their own copy)."""

from __future__ import annotations

import math
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """MLP → L2-normalised bottleneck → weight-normed prototypes (DINO / iBOT).

    The MLP may run under autocast; the normalisation and the prototype layer run in fp32 (see
    :func:`fp32`). The prototype layer's norm ``g`` is fixed at 1, so logits are cosine similarities and the
    temperatures alone set their sharpness. The prototype layer is kept out of training for the first
    steps (``last_layer_parameters`` go into their own optimiser group whose lr the schedule holds at 0),
    which stabilises the start.
    """

    def __init__(
        self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256, n_layers: int = 3
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"DINOHead needs at least one layer, got n_layers={n_layers}")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(pairwise(dims)):
            layers.append(nn.Linear(a, b))
            if i < n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        g, v = self.last_layer.parametrizations.weight.original0, self.last_layer.parametrizations.weight.original1
        # The prototypes keep nn.Linear's default init, as DINO and DINOv2 (their _init_weights runs before the
        # last layer exists): only the direction of a row counts, but its norm sets the angle an optimiser step
        # turns it by; std 0.02 is 1/sqrt(3 · bottleneck) / 0.02 times shorter (3.6× at 64) and turns faster.
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))
        g.fill_(1.0)
        g.requires_grad_(False)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The trainable prototype parameters (frozen at the start by the schedule)."""
        return [p for p in self.last_layer.parameters() if p.requires_grad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.mlp(x)
        with fp32(hidden):
            return self.last_layer(F.normalize(hidden.float(), p=2, dim=-1, eps=1e-6))


def fp32(t: torch.Tensor) -> torch.autocast:
    """Autocast off on ``t``'s device: a softmax input computed there stays fp32. In bf16, logits near 0.5
    are quantised in steps of 0.004, 0.1 after a teacher temperature of 0.04."""
    return torch.autocast(t.device.type, enabled=False)
