"""The model leaves the run: the teacher of a checkpoint as a HistoTx, Hugging Face or timm folder.

    load_model(source, device="cpu") -> LoadedModel     any run, checkpoint or export → FusedViT + genes, µm/px
    export(source, out, formats=("hf",)) -> ExportSummary   (``histotx export`` on the command line)

Modules, one concept each: :mod:`.source` (a run's teacher, no DeepSpeed needed), :mod:`.native`
(HistoTx's export folder), :mod:`.hf` (Hugging Face folder, self-contained remote code from
:mod:`.remote_code`, model card from :mod:`.card`), :mod:`.timm_hub` (timm hub folder), :mod:`.load`,
:mod:`.cli`. Key maps: :class:`histotx.model.pretrained.HFAdapter` / ``TimmAdapter``.
"""
from histotx.export.load import LoadedModel, load_model
from histotx.export.write import ExportSummary, export

__all__ = ["ExportSummary", "LoadedModel", "export", "load_model"]
