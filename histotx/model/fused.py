"""The early-fusion model: one ViT stack over image patches and transcript tokens together.

Each sample's sequence is ``[CLS, registers, image patches, transcript tokens]``; either modality may
be missing per sample (no image: no patch tokens; an empty tile: no transcript tokens). The samples
of a batch are packed into one token tensor and attend only within themselves
(:mod:`histotx.model.attention`), so transcript-rich tiles cost what they hold, not the batch maximum.

The image half is a DINOv2-style ViT whose parameters are named like timm's VisionTransformer with
``no_embed_class=True`` (the position embedding covers patches only; CLS and registers carry none),
so :meth:`FusedViT.image_backbone_state_dict` is a timm state dict and pathology foundation models
load by the key map of :mod:`histotx.model.pretrained`. A sample without transcript tokens goes
through exactly the computation of the plain image backbone. The model knows nothing of DeepSpeed:
every parameter lives in an ``nn.Module`` used in its own forward (ZeRO-3 gathers per module).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.utils.checkpoint
from torch import nn

from histotx.batch import TranscriptBatch
from histotx.model.attention import BACKENDS, PackedSeq
from histotx.model.transcripts import TranscriptTokenizer
from histotx.model.vit import MLP_KINDS, Block, PatchEmbed, resample_pos_grid

# embed_dim, depth, num_heads, mlp, mlp_ratio (timm's convention: fc1 width = int(dim · ratio)).
PRESETS: dict[str, tuple[int, int, int, str, float]] = {
    "tiny": (64, 2, 4, "mlp", 4.0),  # tests
    "S": (384, 12, 6, "mlp", 4.0),
    "B": (768, 12, 12, "mlp", 4.0),
    "L": (1024, 24, 16, "mlp", 4.0),  # UNI, Phikon-v2
    "H": (1280, 32, 16, "mlp", 4.0),
    "g": (1536, 40, 24, "swiglu", 2.66667 * 2),  # DINOv2 giant, H-optimus-0
    "custom": (0, 0, 0, "mlp", 4.0),  # every size field given explicitly (e.g. Virchow2's SwiGLU ViT-H)
}

BACKBONE_KEYS = ("patch_embed.", "cls_token", "reg_token", "pos_embed", "blocks.", "norm.")
"""Prefixes of the image backbone's parameters: a timm VisionTransformer's, head excluded."""


class ModelConfigError(ValueError):
    pass


@dataclass
class FusedViTConfig:
    """Architecture of :class:`FusedViT`. Zero/empty architecture fields are filled from ``size``
    (one of :data:`PRESETS`; ``custom`` requires embed_dim, depth and num_heads).

    ``img_size`` sets the stored position-embedding grid (img_size / patch_size per side); other input
    sizes interpolate it. ``mlp_hidden_dim`` (fc1's width) overrides ``mlp_ratio`` when set.
    ``vocab_size`` 0 builds no transcript branch (an image-only backbone).
    """

    size: str = "tiny"
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    mlp: str = ""
    mlp_ratio: float = 0.0
    mlp_hidden_dim: int = 0
    qkv_bias: bool = True
    num_registers: int = 0
    init_values: float | None = 1e-5
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    vocab_size: int = 0
    gene_dim: int = 0
    attention: str = "auto"
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.size not in PRESETS:
            raise ModelConfigError(f"model size must be one of {sorted(PRESETS)}, got {self.size!r}")
        dim, depth, heads, mlp, ratio = PRESETS[self.size]
        self.embed_dim = self.embed_dim or dim
        self.depth = self.depth or depth
        self.num_heads = self.num_heads or heads
        self.mlp = self.mlp or mlp
        self.mlp_ratio = self.mlp_ratio or ratio
        self.mlp_hidden_dim = self.mlp_hidden_dim or int(self.embed_dim * self.mlp_ratio)
        self.gene_dim = self.gene_dim or self.embed_dim
        self.validate()

    def validate(self) -> None:
        problems = []
        if min(self.embed_dim, self.depth, self.num_heads) <= 0:
            problems.append("embed_dim, depth and num_heads must be positive (size 'custom' needs all three)")
        elif self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.mlp not in MLP_KINDS:
            problems.append(f"mlp must be one of {MLP_KINDS}, got {self.mlp!r}")
        if self.mlp == "swiglu" and self.mlp_hidden_dim % 2:
            problems.append(f"swiglu needs an even mlp_hidden_dim (fc1 packs two halves), got {self.mlp_hidden_dim}")
        if self.attention not in BACKENDS:
            problems.append(f"attention must be one of {BACKENDS}, got {self.attention!r}")
        if self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            problems.append(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.num_registers < 0 or self.vocab_size < 0:
            problems.append("num_registers and vocab_size must be >= 0")
        if problems:
            raise ModelConfigError("; ".join(problems))

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.img_size // self.patch_size, self.img_size // self.patch_size


class FusedOutput(NamedTuple):
    """Final-norm outputs. ``patch`` rows of samples without an image are zeros; ``transcript`` is
    packed in the input order, ``transcript_lengths[b]`` tokens per sample.

    A named tuple rather than a dataclass: DeepSpeed ZeRO-3 gathers a module's own parameters (here
    ``cls_token``, ``pos_embed``, ``mask_token``, ...) for its backward through hooks on the tensors the
    module returns, and it finds them inside tuples, lists and dicts only."""

    cls: torch.Tensor  # (B, D)
    registers: torch.Tensor  # (B, R, D)
    patch: torch.Tensor  # (B, Np, D)
    transcript: torch.Tensor  # (T, D)
    transcript_lengths: torch.Tensor  # (B,)
    image_present: torch.Tensor  # (B,) bool
    grid_size: tuple[int, int] = (0, 0)


@dataclass
class LoadReport:
    """What a backbone load did: checkpoint keys placed, model keys left as initialised, keys dropped."""

    source: str
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    resized: list[str]
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None

    def summary(self) -> str:
        blocks = sum(k.startswith("blocks.") for k in self.loaded)
        text = (
            f"{self.source}: loaded {len(self.loaded)} tensors ({blocks} in blocks), "
            f"{len(self.missing)} model keys not in the checkpoint, {len(self.unexpected)} checkpoint keys unused"
        )
        if self.resized:
            text += f", resized {self.resized}"
        return text


def _packing(
    n_prefix: int, n_patches: int, present: torch.Tensor, n_present: int, tx_lengths: torch.Tensor, n_tx: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the rows of [prefixes of all samples; patches of present images; transcript tokens] go in
    the packed sequence, whose sample b is [prefix, patches if present, its transcripts]; and the
    per-sample lengths."""
    device = present.device
    n_image = present.long() * n_patches
    seq_lengths = n_prefix + n_image + tx_lengths
    start = seq_lengths.cumsum(0) - seq_lengths
    dest = [(start[:, None] + torch.arange(n_prefix, device=device)).reshape(-1)]
    if n_present:
        dest.append(((start + n_prefix)[present][:, None] + torch.arange(n_patches, device=device)).reshape(-1))
    if n_tx:
        batch = torch.arange(present.shape[0], device=device)
        sample = torch.repeat_interleave(batch, tx_lengths, output_size=n_tx)
        rank = torch.arange(n_tx, device=device) - (tx_lengths.cumsum(0) - tx_lengths)[sample]
        dest.append((start + n_prefix + n_image)[sample] + rank)
    return torch.cat(dest), seq_lengths


def _present(
    images: torch.Tensor | None, image_present: torch.Tensor | None, batch_size: int, device: torch.device
) -> torch.Tensor:
    """(B,) bool: which samples have an image (none without images, all unless ``image_present`` says)."""
    if images is None:
        return torch.zeros(batch_size, dtype=torch.bool, device=device)
    if image_present is None:
        return torch.ones(batch_size, dtype=torch.bool, device=device)
    return image_present.to(device=device, dtype=torch.bool)


class FusedViT(nn.Module):
    def __init__(self, config: FusedViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.reg_token = nn.Parameter(torch.zeros(1, config.num_registers, dim)) if config.num_registers else None
        gh, gw = config.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, gh * gw, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        drop = torch.linspace(0, config.drop_path_rate, config.depth).tolist()
        self.blocks = nn.ModuleList(
            [
                Block(
                    dim,
                    config.num_heads,
                    config.mlp_hidden_dim,
                    config.mlp,
                    config.qkv_bias,
                    config.init_values,
                    drop[i],
                    config.norm_eps,
                )
                for i in range(config.depth)
            ]
        )
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.transcript = TranscriptTokenizer(config.vocab_size, config.gene_dim, dim) if config.vocab_size else None
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.config.num_registers

    def pos_grid(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """The patch position embedding at a (gh, gw) grid, as (gh, gw, D)."""
        pos = resample_pos_grid(self.pos_embed, self.config.grid_size, grid_hw)
        return pos.view(grid_hw[0], grid_hw[1], -1)

    def forward(
        self,
        images: torch.Tensor | None,
        transcripts: TranscriptBatch | None = None,
        image_present: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        transcript_mask: torch.Tensor | None = None,
        image_hw: tuple[int, int] | None = None,
    ) -> FusedOutput:
        """Encode a batch. ``images`` (B, 3, H, W) may be None (then ``image_hw`` or ``img_size`` sets the
        frame transcript positions refer to); ``image_present`` (B,) drops the images of some samples;
        ``image_mask`` (B, Np) and ``transcript_mask`` (T,) mark tokens replaced by the mask tokens."""
        batch_size, device, grid = self._frame(images, transcripts, image_hw)
        present = _present(images, image_present, batch_size, device)  # (B,) bool
        n_patches = grid[0] * grid[1]
        if image_mask is not None and image_mask.shape != (batch_size, n_patches):
            raise ValueError(f"image_mask must be ({batch_size}, {n_patches}), got {tuple(image_mask.shape)}")
        n_present = sum(present.tolist())
        parts, tx_lengths, n_tx = self.embed(images, transcripts, present, n_present, grid, image_mask, transcript_mask)
        dest, seq_lengths = _packing(self.num_prefix_tokens, n_patches, present, n_present, tx_lengths, n_tx)
        out = self.encode(torch.cat(parts), dest, seq_lengths)
        return self._unpack(out, present, n_present, grid, tx_lengths)

    def _frame(
        self, images: torch.Tensor | None, transcripts: TranscriptBatch | None, image_hw: tuple[int, int] | None
    ) -> tuple[int, torch.device, tuple[int, int]]:
        """The batch size, device and patch grid (gh, gw): the images', else the transcripts' in the frame
        ``image_hw`` (default img_size × img_size)."""
        if images is not None:
            batch_size, device = images.shape[0], images.device
            grid = self.patch_embed.grid_size(images.shape[-2], images.shape[-1])
        elif transcripts is not None:
            batch_size, device = transcripts.batch_size, transcripts.xy.device
            hw = image_hw or (self.config.img_size, self.config.img_size)
            grid = self.patch_embed.grid_size(*hw)
        else:
            raise ValueError("FusedViT needs images, transcripts or both")
        if transcripts is not None and transcripts.batch_size != batch_size:
            raise ValueError(f"transcripts hold {transcripts.batch_size} samples, images {batch_size}")
        return batch_size, device, grid

    def embed(
        self,
        images: torch.Tensor | None,
        transcripts: TranscriptBatch | None,
        present: torch.Tensor,
        n_present: int,
        grid: tuple[int, int],
        image_mask: torch.Tensor | None = None,
        transcript_mask: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor, int]:
        """The token rows before the blocks, in three parts: the prefixes of all samples (B·(1+R), D), the
        patches of the present images (n_present·Np, D) and the transcript tokens (T, D); with the
        transcript tokens per sample (B,) and T."""
        batch_size, dim = present.shape[0], self.config.embed_dim
        n_patches = grid[0] * grid[1]
        pos = self.pos_grid(grid)  # (gh, gw, D)
        parts = [self._prefix(batch_size).reshape(batch_size * self.num_prefix_tokens, dim)]
        # The patch embedding and the transcript tokenizer run even on zero rows: every rank of a
        # data-parallel job then calls the same modules in the same order (ZeRO-3 gathers parameters
        # per module call, collectively) and every parameter gets a gradient (ZeRO-1/2 reduce them all).
        if images is not None:
            pixels = images if n_present == batch_size else images[present]
            patches = self.patch_embed(pixels)  # (n_present, Np, D)
            if image_mask is not None:
                mask = image_mask if n_present == batch_size else image_mask[present]
                patches = torch.where(mask[..., None], self.mask_token.to(patches.dtype), patches)
            parts.append((patches + pos.view(1, n_patches, dim)).reshape(-1, dim))
        n_tx = transcripts.n_tokens if transcripts is not None else 0
        tx_lengths = torch.zeros(batch_size, dtype=torch.long, device=present.device)
        if self.transcript is not None:
            if transcripts is None:
                transcripts = TranscriptBatch.empty(batch_size).to(present.device)
            tx_lengths = transcripts.lengths.to(present.device)
            parts.append(self.transcript(transcripts, pos, self.patch_embed.patch_size, transcript_mask))
        elif n_tx:
            raise ValueError("this model has no transcript branch (vocab_size = 0 in its config)")
        return parts, tx_lengths, n_tx

    def encode(self, tokens: torch.Tensor, dest: torch.Tensor, seq_lengths: torch.Tensor) -> torch.Tensor:
        """The blocks and the final norm over the packed batch. ``tokens`` (N, D) are the parts' rows,
        ``dest`` (N,) each row's place in the packed sequence, whose sample b is ``seq_lengths[b]`` rows;
        the result (N, D) is back in the order of the parts."""
        order = torch.empty_like(dest)
        order[dest] = torch.arange(dest.shape[0], device=dest.device)
        seq = PackedSeq(seq_lengths.tolist(), dest.device, self.config.attention)
        x = tokens[order]  # (N, D), packed: sample after sample
        for block in self.blocks:
            if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, seq, use_reentrant=False)
            else:
                x = block(x, seq)
        return self.norm(x)[dest]

    def _unpack(
        self, out: torch.Tensor, present: torch.Tensor, n_present: int, grid: tuple[int, int], tx_lengths: torch.Tensor
    ) -> FusedOutput:
        """The encoded parts' rows (N, D) as per-sample outputs; zero patch rows where there is no image."""
        batch_size, n_prefix, dim = present.shape[0], self.num_prefix_tokens, self.config.embed_dim
        n_patches = grid[0] * grid[1]
        n_head_rows = batch_size * n_prefix
        n_image_rows = n_present * n_patches
        head = out[:n_head_rows].view(batch_size, n_prefix, dim)
        image_rows = out[n_head_rows : n_head_rows + n_image_rows].view(n_present, n_patches, dim)
        if n_present == batch_size:
            patch = image_rows
        else:
            patch = out.new_zeros(batch_size, n_patches, dim).index_put((present.nonzero()[:, 0],), image_rows)
        return FusedOutput(
            cls=head[:, 0],
            registers=head[:, 1:],
            patch=patch,
            transcript=out[n_head_rows + n_image_rows :],
            transcript_lengths=tx_lengths,
            image_present=present,
            grid_size=grid,
        )

    def _prefix(self, batch_size: int) -> torch.Tensor:
        tokens = [self.cls_token.expand(batch_size, -1, -1)]
        if self.reg_token is not None:
            tokens.append(self.reg_token.expand(batch_size, -1, -1))
        return torch.cat(tokens, dim=1)

    # ------------------------------------------------------------------ the image backbone as timm sees it

    def image_backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The image backbone's tensors under timm VisionTransformer names (no_embed_class layout)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(BACKBONE_KEYS)}

    def load_image_backbone_state_dict(
        self,
        state_dict: dict[str, torch.Tensor],
        pos_grid_hw: tuple[int, int] | None = None,
        source: str = "state dict",
        strict: bool = True,
    ) -> LoadReport:
        """Load timm-layout backbone tensors (``pos_embed`` patches only, at grid ``pos_grid_hw``, by
        default square); the position embedding is interpolated to this model's grid. Fails unless
        every block tensor loads with its shape; with ``strict``, also on any other missing or unused key
        (``mask_token``, absent from timm checkpoints, may be missing)."""
        own = self.state_dict()
        state = dict(state_dict)
        resized = []
        if "pos_embed" in state:
            pos = state["pos_embed"]
            if pos_grid_hw is None:
                side = math.isqrt(pos.shape[1])
                if side * side != pos.shape[1]:
                    raise ModelConfigError(
                        f"{source}: pos_embed has {pos.shape[1]} rows, not a square grid; give its grid size"
                    )
                pos_grid_hw = (side, side)
            if tuple(pos_grid_hw) != self.config.grid_size:
                state["pos_embed"] = resample_pos_grid(pos, pos_grid_hw, self.config.grid_size)
                resized.append(f"pos_embed {tuple(pos_grid_hw)} → {self.config.grid_size}")
        expected = [k for k in own if k.startswith(BACKBONE_KEYS) or k == "mask_token"]
        mismatched = [
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in expected
            if k in state and state[k].shape != own[k].shape
        ]
        missing = [k for k in expected if k not in state]
        unexpected = sorted(k for k in state if k not in own or k not in expected)
        block_missing = [k for k in missing if k.startswith("blocks.")]
        if mismatched or block_missing or not any(k.startswith("blocks.") for k in state):
            raise ModelConfigError(
                f"{source}: the backbone's blocks did not load: "
                + "; ".join(
                    mismatched[:8]
                    + [f"missing {block_missing[:8]}" if block_missing else ""]
                    + ([] if any(k.startswith("blocks.") for k in state) else ["no blocks.* keys at all"])
                )
            )
        if strict and ([k for k in missing if k != "mask_token"] or unexpected):
            raise ModelConfigError(f"{source}: missing {missing}, unexpected {unexpected}")
        loadable = {k: state[k] for k in expected if k in state}
        with torch.no_grad():
            for k, v in loadable.items():
                own[k].copy_(v)
        return LoadReport(source, sorted(loadable), missing, unexpected, resized)

    # ------------------------------------------------------------------ optimiser helpers

    def no_weight_decay(self) -> set[str]:
        """Names kept out of weight decay: tensors of at most one dimension (biases, norms, LayerScale) as
        in DINOv2, plus the tokens and the position embedding as in timm (DINOv2 decays those; see
        histotx.train.engine). Uses ZeRO-3's recorded shape when parameters are already partitioned."""
        return {
            n
            for n, p in self.named_parameters()
            if len(getattr(p, "ds_shape", p.shape)) <= 1 or n in ("cls_token", "reg_token", "pos_embed", "mask_token")
        }

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise lr decay: embeddings 0, block i → i + 1, the rest depth + 1."""
        if name.startswith(("patch_embed.", "cls_token", "reg_token", "pos_embed", "mask_token", "transcript.")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.config.depth + 1
