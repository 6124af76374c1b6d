"""Expression from H&E alone: ``histotx fit`` (an expression head on a cohort's embeddings) and
``histotx predict`` (a slide → predicted expression per tile, as AnnData / SpatialData / PNG)."""

from histotx.predict.head import ExpressionHead, HeadMismatchError, TileSpec, fit_head, model_fingerprint

__all__ = ["ExpressionHead", "HeadMismatchError", "TileSpec", "fit_head", "model_fingerprint"]
