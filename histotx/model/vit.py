"""ViT building blocks that run on packed token sequences, named like timm's VisionTransformer.

Every module here takes tokens as one packed ``(tokens, dim)`` tensor plus the batch layout
(:class:`~histotx.model.attention.PackedSeq`), so samples of different lengths share one stack
without padding. Parameter names follow timm (``patch_embed.proj``, ``blocks.N.norm1``,
``attn.qkv``, ``attn.proj``, ``ls1.gamma``, ``mlp.fc1``, ...) so timm checkpoints map one to one.
Attention is written here (qkv Linear + proj) rather than nn.MultiheadAttention, whose fused
parameters DeepSpeed ZeRO-3 cannot partition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from histotx.model.attention import PackedSeq, attend

MLP_KINDS = ("mlp", "swiglu")


class PatchEmbed(nn.Module):
    """Non-overlapping patches → tokens: (B, C, H, W) → (B, H/p · W/p, D), row-major."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}×{width} is not a multiple of the patch size {p}")
        return height // p, width // p

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.grid_size(images.shape[-2], images.shape[-1])
        return self.proj(images).flatten(2).transpose(1, 2)


def resample_pos_grid(pos: torch.Tensor, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> torch.Tensor:
    """Resize a (1, h·w, D) patch position embedding to another grid as timm does (bicubic, antialiased, fp32)."""
    if tuple(old_hw) == tuple(new_hw):
        return pos
    dim = pos.shape[-1]
    grid = pos.float().reshape(1, old_hw[0], old_hw[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_hw), mode="bicubic", antialias=True, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], dim).to(pos.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, seq: PackedSeq) -> torch.Tensor:
        qkv = self.qkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim)
        return self.proj(attend(qkv, seq).reshape(x.shape[0], -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUPacked(nn.Module):
    """SwiGLU with one packed input projection: fc1 → [x1 | x2], out = fc2(silu(x1) · x2).

    The layout of timm's ``SwiGLUPacked`` (H-optimus-0, Virchow2) and DINOv2's fused ``w12``:
    ``hidden`` is fc1's width, twice fc2's input.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        if hidden % 2:
            raise ValueError(f"SwiGLU hidden width must be even, got {hidden}")
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden // 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(x1) * x2)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with optional LayerScale and per-sample drop path."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        mlp: str = "mlp",
        qkv_bias: bool = True,
        init_values: float | None = None,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if mlp not in MLP_KINDS:
            raise ValueError(f"mlp must be one of {MLP_KINDS}, got {mlp!r}")
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = (Mlp if mlp == "mlp" else SwiGLUPacked)(dim, mlp_hidden)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = drop_path

    def _drop_path(self, x: torch.Tensor, seq: PackedSeq) -> torch.Tensor:
        """Stochastic depth per sample: a dropped sample's whole residual branch is zeroed."""
        if not self.training or self.drop_path == 0.0:
            return x
        keep = 1.0 - self.drop_path
        scale = x.new_empty(seq.batch_size).bernoulli_(keep) / keep
        return x * scale[seq.sample_of_token, None]

    def forward(self, x: torch.Tensor, seq: PackedSeq) -> torch.Tensor:
        x = x + self._drop_path(self.ls1(self.attn(self.norm1(x), seq)), seq)
        return x + self._drop_path(self.ls2(self.mlp(self.norm2(x))), seq)
