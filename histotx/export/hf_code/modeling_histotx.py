"""HistoTx early-fusion ViT for transformers: an image, transcripts, or both → CLS, patch and
transcript-token embeddings.

Shipped by `histotx export` (load with ``AutoModel.from_pretrained(DIR, trust_remote_code=True)``).
The network is HistoTx's ``FusedViT``, whose source is copied verbatim into the histotx_*.py files;
this file only adapts its inputs and outputs to transformers' conventions.

Transcript input: tokens packed over the batch. Token t of the batch lies at ``transcript_xy[t]``
(pixels of the input image, x right, y down) and holds genes ``transcript_genes[o[t]:o[t+1]]`` with
weights ``transcript_weights[...]`` (o = ``transcript_offsets``, T + 1 entries), the weights being
log1p(count / token total · 1e4); ``transcript_lengths[b]`` tokens belong to image b; every token of a
batch has side ``transcript_resolution_um``. :func:`pack_transcripts` builds all of this from counts.
Gene ids are rows of vocab.tsv.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_histotx import HistoTxConfig
from .histotx_batch import TranscriptBatch
from .histotx_fused import FusedViT, FusedViTConfig
from .histotx_tokens import TranscriptCells, _normalise
from .histotx_transcripts import ResolutionEmbedding


@dataclass
class HistoTxModelOutput(ModelOutput):
    """After the final norm. ``last_hidden_state`` = [CLS, registers, patches] (B, 1 + R + Np, D), the
    layout image-feature-extraction pipelines expect; ``pooler_output`` = CLS (B, D); patch rows of
    samples without an image are zeros; ``transcript_embeddings`` (T, D) are packed in input order,
    ``transcript_lengths[b]`` per sample."""

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    patch_embeddings: torch.FloatTensor | None = None
    register_embeddings: torch.FloatTensor | None = None
    transcript_embeddings: torch.FloatTensor | None = None
    transcript_lengths: torch.LongTensor | None = None


def pack_transcripts(samples: list[dict], resolution_um: float) -> dict:
    """Model inputs from raw counts. One dict per image: ``xy`` (n, 2) token centres in input pixels,
    and the token's counts as entries ``token`` (nnz,) (index into xy), ``gene`` (nnz,) (vocab.tsv row),
    ``count`` (nnz,). Counts are summed per (token, gene), normalised per token like HistoTx's loader
    does, and empty tokens dropped."""
    cells = []
    for sample in samples:
        xy = np.asarray(sample["xy"], dtype=np.float32).reshape(-1, 2)
        occupied, offsets, gene, weight = _normalise(
            np.asarray(sample["token"], dtype=np.int64),
            np.asarray(sample["gene"], dtype=np.int64),
            np.asarray(sample["count"], dtype=np.float64),
            xy.shape[0],
        )
        cells.append(TranscriptCells(xy[occupied], offsets, gene, weight, resolution_um))
    batch = TranscriptBatch.collate(cells)
    return {
        "transcript_lengths": batch.lengths,
        "transcript_xy": batch.xy,
        "transcript_offsets": batch.offsets,
        "transcript_genes": batch.gene,
        "transcript_weights": batch.weight,
        "transcript_resolution_um": batch.resolution_um,
    }


class HistoTxPreTrainedModel(PreTrainedModel):
    config_class = HistoTxConfig
    base_model_prefix = "histotx"
    main_input_name = "pixel_values"

    def _init_weights(self, module):
        """Weights come from model.safetensors. Constant buffers are not saved there and transformers may
        build the model on the meta device, so the resolution embedding's frequencies are recomputed by
        building that small module again, on the CPU (its constructor is their one definition)."""
        if isinstance(module, ResolutionEmbedding):
            with torch.device("cpu"):
                fresh = ResolutionEmbedding(module.fc2.out_features, module.frequencies.numel())
            module.frequencies = fresh.frequencies.to(module.fc1.weight.device)


class HistoTxModel(HistoTxPreTrainedModel):
    def __init__(self, config: HistoTxConfig):
        super().__init__(config)
        self.backbone = FusedViT(FusedViTConfig(**config.fused_vit))
        self.post_init()

    pack_transcripts = staticmethod(pack_transcripts)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        transcript_lengths: torch.Tensor | None = None,
        transcript_xy: torch.Tensor | None = None,
        transcript_offsets: torch.Tensor | None = None,
        transcript_genes: torch.Tensor | None = None,
        transcript_weights: torch.Tensor | None = None,
        transcript_resolution_um: float | None = None,
        image_size: tuple[int, int] | None = None,
        return_dict: bool | None = None,
        **kwargs,  # noqa: ARG002 (transformers' callers pass extra keywords, e.g. output_attentions)
    ) -> HistoTxModelOutput | tuple:
        """``pixel_values`` (B, 3, H, W) normalised as preprocessor_config.json says, and/or the packed
        transcripts (see the module docstring). ``image_size`` (H, W): the frame transcript positions
        refer to when no image is given (default: the training input size)."""
        transcripts = None
        if transcript_lengths is not None:
            if transcript_resolution_um is None:
                raise ValueError("transcript_resolution_um (the token side in µm) is required with transcripts")
            device = pixel_values.device if pixel_values is not None else transcript_xy.device
            transcripts = TranscriptBatch(
                lengths=transcript_lengths,
                xy=transcript_xy,
                offsets=transcript_offsets,
                gene=transcript_genes,
                weight=transcript_weights,
                resolution_um=float(transcript_resolution_um),
            ).to(device)
        if pixel_values is None and transcripts is None:
            raise ValueError("give pixel_values, transcripts (transcript_*), or both")
        dtype = self.backbone.cls_token.dtype
        if pixel_values is not None:
            pixel_values = pixel_values.to(dtype)
        frame = tuple(image_size) if image_size is not None else (self.config.image_size, self.config.image_size)
        # Weights loaded in bf16/fp16 (dtype=...): compute under autocast, as HistoTx does on a GPU; some
        # inputs (token positions and sizes) are made in fp32 inside the model.
        low = dtype in (torch.bfloat16, torch.float16)
        device = self.backbone.cls_token.device
        with torch.autocast(device.type, dtype=dtype) if low else contextlib.nullcontext():
            out = self.backbone(pixel_values, transcripts, image_hw=frame)
        hidden = torch.cat([out.cls[:, None], out.registers, out.patch], dim=1)
        result = HistoTxModelOutput(
            last_hidden_state=hidden,
            pooler_output=out.cls,
            patch_embeddings=out.patch,
            register_embeddings=out.registers,
            transcript_embeddings=out.transcript,
            transcript_lengths=out.transcript_lengths,
        )
        use_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return result if use_dict else result.to_tuple()
