"""Self-attention over packed variable-length sequences, with interchangeable backends.

A batch of samples whose token counts differ (tiles with 0 to thousands of transcript tokens) is
packed into one ``(tokens, heads, head_dim)`` tensor; sample b owns rows ``cu_seqlens[b]`` to
``cu_seqlens[b+1]`` and attends only to itself. Backends:

- ``xformers``: ``memory_efficient_attention`` with a ``BlockDiagonalMask`` (CUDA). No padding is
  computed and no tokens × tokens matrix is formed: memory grows linearly with tokens.
- ``flex``: torch ``flex_attention`` with a per-sample block mask (CUDA, compiled; on CPU it runs
  eagerly and forward only, which torch does not support backward for).
- ``sdpa``: torch ``scaled_dot_product_attention`` on a padded batch with a key-padding mask;
  batches of equal lengths skip the padding and the mask (one call, the fastest case).
- ``loop``: torch SDPA once per sample, no padding: on CPU, with lengths as uneven as 2 µm tokens
  give, 1.0–1.4 × the ideal Σ Lᵢ² cost where the padded batch takes 2.5–3.8 × (benchmarks/attention.py).
- ``reference``: a per-sample loop of softmax(QKᵀ/√d)V written out in fp32, to test the others against.

``auto`` picks xformers on CUDA when its kernels actually run there (a probe call, since wheels
built for another torch import but fail at the first call), else sdpa; on CPU, sdpa for equal
lengths and loop otherwise.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "loop", "xformers", "flex", "reference")

_log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def xformers_usable() -> bool:
    """Whether xformers' memory-efficient attention runs on this machine's GPU."""
    if not torch.cuda.is_available():
        return False
    try:
        from xformers.ops import fmha

        q = torch.zeros(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
        fmha.memory_efficient_attention(q, q, q, attn_bias=fmha.BlockDiagonalMask.from_seqlens([3, 5], device=q.device))
    except Exception as exc:  # any failure (missing wheel, ABI mismatch, no kernel) means: do not use it
        _log.warning("xformers attention unavailable, falling back to torch SDPA: %s", exc)
        return False
    return True


def resolve_backend(name: str, device: torch.device, uniform: bool = True) -> str:
    """The backend ``name`` stands for on ``device`` for a batch of equal (``uniform``) or uneven lengths."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            return "xformers" if xformers_usable() else "sdpa"
        return "sdpa" if uniform else "loop"
    if name == "xformers" and not (device.type == "cuda" and xformers_usable()):
        raise RuntimeError(f"attention backend 'xformers' was requested but does not run on {device}")
    return name


class PackedSeq:
    """The layout of one packed batch, built once per forward and shared by every block.

    Holds the per-sample lengths on the host (xformers and the padding need them as Python ints) and
    on the device, and caches each backend's mask so that a deep stack builds it once.
    """

    def __init__(self, lengths: list[int], device: torch.device, backend: str = "auto") -> None:
        self.lengths = [int(n) for n in lengths]
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"every packed sequence needs at least one token, got lengths {self.lengths}")
        self.device = torch.device(device)
        self.batch_size = len(self.lengths)
        self.total = sum(self.lengths)
        self.max_len = max(self.lengths)
        self.uniform = all(n == self.max_len for n in self.lengths)
        self.backend = resolve_backend(backend, self.device, self.uniform)
        self.lengths_t = torch.tensor(self.lengths, dtype=torch.long, device=self.device)
        self.cu_seqlens = torch.nn.functional.pad(self.lengths_t.cumsum(0), (1, 0))
        self.sample_of_token = torch.repeat_interleave(
            torch.arange(self.batch_size, device=self.device), self.lengths_t, output_size=self.total
        )
        self._cache: dict[str, object] = {}

    def _cached(self, key: str, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def pad_index(self) -> torch.Tensor:
        """Row of each packed token in the (batch × max_len) padded layout."""

        def build():
            rank = torch.arange(self.total, device=self.device) - self.cu_seqlens[self.sample_of_token]
            return self.sample_of_token * self.max_len + rank

        return self._cached("pad_index", build)

    def key_padding_mask(self) -> torch.Tensor:
        """(batch, 1, 1, max_len) bool, True where a key is a real token."""
        return self._cached(
            "key_padding_mask",
            lambda: (torch.arange(self.max_len, device=self.device)[None] < self.lengths_t[:, None])[:, None, None],
        )

    def block_diagonal_mask(self):
        from xformers.ops import fmha

        return self._cached("xformers", lambda: fmha.BlockDiagonalMask.from_seqlens(self.lengths, device=self.device))

    def flex_block_mask(self):
        from torch.nn.attention.flex_attention import create_block_mask

        def build():
            doc = self.sample_of_token

            def same_sample(b, h, q_idx, kv_idx):  # noqa: ARG001 (flex_attention's mask_mod signature)
                return doc[q_idx] == doc[kv_idx]

            # compiled on CUDA so that building the mask does not evaluate a tokens × tokens grid
            return create_block_mask(
                same_sample, None, None, self.total, self.total, device=self.device, _compile=self.device.type == "cuda"
            )

        return self._cached("flex", build)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(x, self.lengths)


def attend(qkv: torch.Tensor, seq: PackedSeq) -> torch.Tensor:
    """Attention of packed ``qkv`` (tokens, 3, heads, head_dim) within each sample → (tokens, heads, head_dim)."""
    if qkv.shape[0] != seq.total:
        raise ValueError(f"qkv holds {qkv.shape[0]} tokens, the packed layout {seq.total}")
    return _BACKEND_FUNCTIONS[seq.backend](qkv, seq)


def _sdpa(qkv: torch.Tensor, seq: PackedSeq) -> torch.Tensor:
    _, _, heads, dim = qkv.shape
    b, n = seq.batch_size, seq.max_len
    if seq.uniform:
        q, k, v = qkv.view(b, n, 3, heads, dim).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(seq.total, heads, dim)
    index = seq.pad_index()
    padded = qkv.new_zeros(b * n, 3, heads, dim).index_copy(0, index, qkv)
    q, k, v = padded.view(b, n, 3, heads, dim).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=seq.key_padding_mask())
    return out.transpose(1, 2).reshape(b * n, heads, dim)[index]


def _loop(qkv: torch.Tensor, seq: PackedSeq) -> torch.Tensor:
    outs = []
    for part in seq.split(qkv):
        q, k, v = part.permute(1, 2, 0, 3)  # each (heads, n, dim)
        outs.append(F.scaled_dot_product_attention(q, k, v).transpose(0, 1))
    return torch.cat(outs)


def _xformers(qkv: torch.Tensor, seq: PackedSeq) -> torch.Tensor:
    from xformers.ops import fmha

    q, k, v = qkv[None].unbind(2)
    return fmha.memory_efficient_attention(q, k, v, attn_bias=seq.block_diagonal_mask())[0]


@functools.lru_cache(maxsize=None)
def _flex_function(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True) if compiled else flex_attention


def _flex(qkv: torch.Tensor, seq: PackedSeq) -> torch.Tensor:
    q, k, v = qkv.permute(1, 2, 0, 3)[:, None]  # each (1, heads, tokens, dim)
    flex = _flex_function(qkv.device.type == "cuda")
    return flex(q, k, v, block_mask=seq.flex_block_mask())[0].transpose(0, 1)


def _reference(qkv: torch.Tensor, seq: PackedSeq) -> torch.Tensor:
    outs = []
    # at least fp32 (bf16/fp16 are upcast), float64 stays float64 for exact equivalence tests
    for part in seq.split(qkv.to(torch.promote_types(qkv.dtype, torch.float32))):
        q, k, v = part.permute(1, 2, 0, 3)  # each (heads, n, dim)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        outs.append((scores.softmax(dim=-1) @ v).transpose(0, 1))
    return torch.cat(outs).to(qkv.dtype)


_BACKEND_FUNCTIONS = {"sdpa": _sdpa, "loop": _loop, "xformers": _xformers, "flex": _flex, "reference": _reference}
