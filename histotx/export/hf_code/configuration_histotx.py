"""Configuration of a HistoTx early-fusion ViT (H&E patches + spatial-transcriptomics tokens).

Shipped by `histotx export`; needs only transformers. ``fused_vit`` holds the resolved ``FusedViTConfig``
of the model (histotx_fused.py): the one description of the architecture.
"""

from transformers import PretrainedConfig


class HistoTxConfig(PretrainedConfig):
    model_type = "histotx"

    def __init__(
        self,
        fused_vit: dict | None = None,
        microns_per_pixel: float = 0.5,
        image_size: int = 224,
        num_genes: int = 0,
        **kwargs,
    ):
        self.fused_vit = dict(fused_vit or {})
        self.microns_per_pixel = float(microns_per_pixel)  # µm/px of the input tiles the model was trained on
        self.image_size = int(image_size)  # side in px of the training input (the frame of transcript positions)
        self.num_genes = int(num_genes)  # genes in vocab.tsv (≤ the vocabulary size of the embedding)
        self.hidden_size = int(self.fused_vit.get("embed_dim", 0))
        super().__init__(**kwargs)
