"""The model leaves the run: the teacher of a checkpoint as a HistoTx, Hugging Face or timm folder.

    load_model(source, device="cpu") -> LoadedModel     any run, checkpoint or export → FusedViT + genes, µm/px
    export(source, out, formats=("hf",)) -> ExportSummary   (``histotx export`` on the command line)

Modules, one concept each: :mod:`.source` (a run's teacher, no DeepSpeed needed), :mod:`.native`
(HistoTx's export folder), :mod:`.targets` (the registry of export targets: a new format is a module and
one entry there), :mod:`.hf` (Hugging Face folder, self-contained remote code from
:mod:`.remote_code`, model card from :mod:`.card`), :mod:`.timm_hub` (timm hub folder), :mod:`.load`,
:mod:`.cli`, :mod:`.during_training` (the timm export at checkpoints, ``checkpoint.export_every``).
Key maps: :class:`histotx.model.pretrained.HFAdapter` / ``TimmAdapter``.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "LoadedModel": "histotx.export.load",
    "load_model": "histotx.export.load",
    "ExportSummary": "histotx.export.write",
    "export": "histotx.export.write",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    """Names load on first use, so that `histotx` builds its parsers (``histotx.export.cli``) without torch."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'histotx.export' has no attribute {name!r}")
