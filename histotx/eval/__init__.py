"""Evaluation of a trained model: embeddings (``embed``) and the HEST-Benchmark protocol (``hestbench``).

``targets``: tile expression from shards and the target genes; ``hestbench``: folds, PCA → ridge → Pearson,
the linear probe; ``hestlayout``: HEST-Benchmark's own task folders; ``report``: table, CSV, PNG, JSON;
``run``: :func:`evaluate` and ``histotx eval``. Names are imported on first use (no sklearn at import).
"""

from __future__ import annotations

import importlib

DEFAULT_RESOLUTION_UM = 16.0
"""Transcript token side for embedding (``histotx embed``, ``histotx eval``). Training draws one size per batch from
``data.collate.resolutions_um``; 16 µm is in every shipped list (the default native/8/16/32/55,
tiny_cpu's 8/16/32, vit_l16_uni's 8/16/32/55), and unlike ``native`` it does not make one token per
Xenium molecule."""

_LAZY = {
    "embed_shards": "histotx.eval.embed",
    "embed_slide": "histotx.eval.embed",
    "tile_expression": "histotx.eval.targets",
    "select_target_genes": "histotx.eval.targets",
    "evaluate": "histotx.eval.run",
    "evaluate_hest_task": "histotx.eval.hestlayout",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'histotx.eval' has no attribute {name!r}")
