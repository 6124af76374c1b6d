"""The batch types the data side builds and the model and SSL side read: one home both may depend on.

:class:`TranscriptBatch` is the model's transcript input (packed tokens of a batch); :class:`SSLBatch` is
one training step's inputs, as :mod:`histotx.data.collate` makes them. Neither knows how it is made.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import torch

from histotx.tokens import TranscriptCells

if TYPE_CHECKING:
    from histotx.data.pixels import PendingViews


@dataclass
class TranscriptBatch:
    """The transcript tokens of a batch, packed sample after sample.

    ``lengths[b]`` tokens belong to sample b (0 allowed); token t sits at ``xy[t]`` (image pixels of
    the model's input) and holds ``gene[offsets[t]:offsets[t+1]]`` with ``weight[...]`` (CSR with
    T + 1 offsets, i.e. ``nn.EmbeddingBag(..., include_last_offset=True)``). ``resolution_um`` is the
    token size in µm: one number for every token, or a ``(T,)`` tensor of per-token sizes.
    """

    lengths: torch.Tensor
    xy: torch.Tensor
    offsets: torch.Tensor
    gene: torch.Tensor
    weight: torch.Tensor
    resolution_um: float | torch.Tensor

    def __post_init__(self) -> None:
        n = int(self.xy.shape[0])
        if self.xy.shape != (n, 2) or self.offsets.shape != (n + 1,):
            raise ValueError(
                f"xy must be (T, 2) and offsets (T + 1,), got {tuple(self.xy.shape)}, {tuple(self.offsets.shape)}"
            )
        if self.gene.shape != self.weight.shape:
            raise ValueError(f"gene {tuple(self.gene.shape)} and weight {tuple(self.weight.shape)} differ")
        if self.lengths.dim() != 1 or int(self.lengths.sum()) != n or bool((self.lengths < 0).any()):
            raise ValueError(f"lengths must hold one count >= 0 per sample, summing to the {n} tokens")
        r = self.resolution_um
        if isinstance(r, torch.Tensor):
            if r.shape != (n,) or bool((r <= 0).any()):
                raise ValueError(f"per-token resolution_um must be ({n},) positive sizes, got {tuple(r.shape)}")
        elif not r > 0:
            raise ValueError(f"resolution_um must be positive, got {r}")

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.xy.shape[0])

    @classmethod
    def collate(cls, cells: list[TranscriptCells]) -> "TranscriptBatch":
        """Pack the tokens of a batch's tiles (one :class:`TranscriptCells` per sample, possibly empty);
        the size is one number when all samples share it, else per token."""
        if not cells:
            raise ValueError("cannot collate an empty list of samples")
        resolutions = {c.resolution_um for c in cells}
        resolution: float | torch.Tensor = next(iter(resolutions))
        if len(resolutions) > 1:
            resolution = torch.from_numpy(np.concatenate([np.full(c.n_cells, c.resolution_um) for c in cells]))
        nnz = np.concatenate([[0]] + [np.diff(c.offsets) for c in cells])
        return cls(
            lengths=torch.tensor([c.n_cells for c in cells], dtype=torch.long),
            xy=torch.from_numpy(np.concatenate([c.xy for c in cells]).reshape(-1, 2)),
            offsets=torch.from_numpy(np.cumsum(nnz)),
            gene=torch.from_numpy(np.concatenate([c.gene for c in cells])),
            weight=torch.from_numpy(np.concatenate([c.weight for c in cells])),
            resolution_um=resolution,
        )

    @classmethod
    def empty(cls, batch_size: int, resolution_um: float = 1.0) -> "TranscriptBatch":
        return cls.collate([TranscriptCells.empty(resolution_um)] * batch_size)

    def _map(self, fn) -> "TranscriptBatch":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return TranscriptBatch(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()})

    def to(self, device, non_blocking: bool = False) -> "TranscriptBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "TranscriptBatch":
        return self._map(lambda t: t.pin_memory())


@dataclass
class SSLBatch:
    """One step's inputs. ``transcript_index[t]`` is the teacher token of student global token t (the
    pairing for iBOT on transcript tokens); ``resolution_um`` is the token size drawn for the batch (None
    for a "native" draw; the tokens carry their own sizes)."""

    keys: list[str]
    global_images: torch.Tensor  # [2B, 3, G, G]: uint8 from a CPU worker until BatchDecoder normalises it
    local_images: torch.Tensor  # [nL·B, 3, L, L]
    teacher_transcripts: TranscriptBatch  # global crops, all samples
    student_global_transcripts: TranscriptBatch
    student_local_transcripts: TranscriptBatch
    student_global_image_present: torch.Tensor  # [2B] bool
    student_local_image_present: torch.Tensor  # [nL·B] bool
    image_mask: torch.Tensor  # [2B, patches] bool, iBOT
    transcript_mask: torch.Tensor  # [student global tokens] bool
    transcript_index: torch.Tensor  # [student global tokens] long
    modality: torch.Tensor  # [B] long: BOTH, IMAGE_ONLY or TRANSCRIPTS_ONLY
    resolution_um: float | None
    native: bool
    gene_panel: torch.Tensor | None = None  # [B, V] bool: genes each sample measured (None: unknown, all)
    # With data.augment.decode_device "cuda": the views to decode and make on the GPU; until then
    # global_images and local_images are empty (histotx.data.device_decode.BatchDecoder fills them)
    pending: PendingViews | None = None

    @property
    def batch_size(self) -> int:
        return len(self.keys)

    def student_view_nonempty(self) -> torch.Tensor:
        """``[(n_global + n_local)·B]`` bool in the order of the student's CLS outputs (global crops,
        then local crops, crop-major): False for a view the student gets no token of — no image
        (transcripts-only) and no site in the crop — whose output is [CLS, registers] only, the same
        for every such view; the losses leave those views out."""
        image, tokens = [self.student_global_image_present], [self.student_global_transcripts.lengths]
        if self.local_images.shape[0]:
            image.append(self.student_local_image_present)
            tokens.append(self.student_local_transcripts.lengths)
        return torch.cat(image) | (torch.cat(tokens) > 0)

    @property
    def n_empty_views(self) -> int:
        return int((~self.student_view_nonempty()).sum())

    def _model_images(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            raise ValueError(
                "this batch's images are still the loader workers' bytes: pass the batch through "
                "histotx.data.device_decode.BatchDecoder, which normalises them on the device"
            )
        return images

    def teacher_inputs(self) -> dict:
        return {"images": self._model_images(self.global_images), "transcripts": self.teacher_transcripts}

    def student_global_inputs(self) -> dict:
        return {
            "images": self._model_images(self.global_images),
            "transcripts": self.student_global_transcripts,
            "image_present": self.student_global_image_present,
            "image_mask": self.image_mask,
            "transcript_mask": self.transcript_mask,
        }

    def student_local_inputs(self) -> dict | None:
        if self.local_images.shape[0] == 0:
            return None
        return {
            "images": self._model_images(self.local_images),
            "transcripts": self.student_local_transcripts,
            "image_present": self.student_local_image_present,
        }

    def _map(self, fn) -> "SSLBatch":
        def move(value):
            return (
                fn(value)
                if isinstance(value, torch.Tensor)
                else (value._map(fn) if isinstance(value, TranscriptBatch) else value)
            )

        return SSLBatch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def to(self, device, non_blocking: bool = False) -> "SSLBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "SSLBatch":
        return self._map(lambda t: t.pin_memory())
