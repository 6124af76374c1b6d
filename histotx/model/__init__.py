"""HistoTx's model: an early-fusion ViT over H&E patches and transcript tokens.

Data side (numpy, in loader workers), :mod:`histotx.tokens`:
    ``bin_grid(grid, mpp, resolution_um, image_hw) -> TranscriptCells`` bins a tile's
    :class:`~histotx.format.TranscriptGrid` into tokens of side ``resolution_um`` (None: one per site);
    ``TranscriptCells`` has ``xy`` (n, 2) px, ``offsets`` (n + 1), ``gene``, ``weight`` (log1p of counts
    scaled to 1e4 per cell), ``resolution_um``, and ``crop / flip / rot90 / scale / select`` to follow
    the image's augmentations.

Model side:
    ``TranscriptBatch.collate(list[TranscriptCells])`` packs a batch (``lengths`` (B,), ``xy`` (T, 2),
    ``offsets`` (T + 1,), ``gene``, ``weight``, ``resolution_um``; ``.to(device)``, ``.pin_memory()``).

    ``FusedViT(FusedViTConfig(size="L", patch_size=16, num_registers=0, mlp="mlp"|"swiglu",
    init_values=1e-5, drop_path_rate=..., vocab_size=..., attention="auto"|"sdpa"|"loop"|"xformers"|"flex"|
    "reference", grad_checkpointing=False))``; sizes tiny, S, B, L, H, g, or custom (explicit embed_dim,
    depth, num_heads); ``vocab_size=0`` builds an image-only backbone. YAML presets: configs/model/.

    ``model(images (B,3,H,W) | None, transcripts=TranscriptBatch | None, image_present=(B,) bool,
    image_mask=(B, Np) bool, transcript_mask=(T,) bool, image_hw=(H, W) when images is None)``
    → ``FusedOutput(cls (B,D), registers (B,R,D), patch (B,Np,D), transcript (T,D) packed in input
    order, transcript_lengths (B,), image_present (B,), grid_size)`` (a named tuple, which ZeRO-3 looks
    into), all after the final norm. Masked positions take learned mask tokens (``mask_token``,
    ``transcript.mask_token``); samples without an image have zero ``patch`` rows; samples without
    transcripts compute exactly the image backbone.

    ``model.image_backbone_state_dict()`` / ``model.load_image_backbone_state_dict(sd)`` (timm names,
    ``no_embed_class`` layout, → :class:`LoadReport`); ``model.no_weight_decay()``, ``model.layer_id(name)``.

Pretrained backbones, :mod:`histotx.model.pretrained`:
    ``load_pretrained(source, weights=None, model_args=None, **config_overrides) -> (FusedViT, LoadReport)``
    builds the model a checkpoint describes (UNI, H-optimus-0, Virchow2: timm hub folder or timm name +
    weights file; Phikon-v2: transformers Dinov2 folder); ``init_from_pretrained(model, source)`` loads
    into an existing model; ``save_timm(model, folder)`` writes the image backbone in timm hub format.

Attention backends, :mod:`histotx.model.attention`: ``PackedSeq(lengths, device, backend)``,
``attend(qkv, seq)``.
"""

from histotx.batch import TranscriptBatch
from histotx.model.attention import BACKENDS, PackedSeq, attend, resolve_backend
from histotx.model.fused import FusedOutput, FusedViT, FusedViTConfig, LoadReport, ModelConfigError
from histotx.model.transcripts import TranscriptTokenizer

__all__ = [
    "BACKENDS",
    "FusedOutput",
    "FusedViT",
    "FusedViTConfig",
    "LoadReport",
    "ModelConfigError",
    "PackedSeq",
    "TranscriptBatch",
    "TranscriptTokenizer",
    "attend",
    "resolve_backend",
]
