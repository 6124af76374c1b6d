"""Expression from H&E alone: ``histotx fit`` (an expression head on a cohort's embeddings) and
``histotx predict`` (a slide → predicted expression per tile, as AnnData / SpatialData / PNG).

Names are imported on first use: the CLI's parser (:mod:`histotx.predict.cli`) needs none of them."""

import importlib

__all__ = ["ExpressionHead", "HeadMismatchError", "MLPHead", "TileSpec", "fit_head", "load_head", "model_fingerprint"]


def __getattr__(name: str):
    if name == "MLPHead":
        return importlib.import_module("histotx.predict.mlp").MLPHead
    if name in ("fit_head", "load_head"):
        return getattr(importlib.import_module("histotx.predict.heads"), name)
    if name in __all__:
        return getattr(importlib.import_module("histotx.predict.head"), name)
    raise AttributeError(f"module 'histotx.predict' has no attribute {name!r}")
