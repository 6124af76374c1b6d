"""The kinds of expression head, together: :func:`fit_head` fits either (the outer leave-patient-out CV they
share) and :func:`load_head` reads either, as its ``head.json`` names it. The ridge head is
:mod:`histotx.predict.head`, the MLP :mod:`histotx.predict.mlp`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from histotx.eval import hestbench
from histotx.predict.head import HEAD_KINDS, ExpressionHead, HeadCommon, TileSpec, _Ridge, read_head_files
from histotx.predict.mlp import MLPHead, MLPLearner


def load_head(folder: str | Path) -> "HeadCommon":
    """The head in ``folder``, of whichever kind its head.json names (a clear error for an unknown kind)."""
    meta, _, _ = read_head_files(folder)
    if meta.get("kind", "ridge") == "mlp":
        return MLPHead.load(folder)
    return ExpressionHead.load(folder)


def fit_head(
    X: np.ndarray,
    Y: np.ndarray,
    genes: Sequence[str],
    patients: Sequence[str],
    *,
    model_name: str,
    model_hash: str,
    tile: TileSpec,
    kind: str = "ridge",
    latent_dim: int = hestbench.LATENT_DIM,
    seed: int = hestbench.SEED,
    info: dict[str, Any] | None = None,
) -> HeadCommon:
    """Fit a head of ``kind`` (ridge or mlp) on (n, D) embeddings ``X`` and (n, G) log1p targets ``Y`` of
    ``patients`` (module docstring): each gene's held-out Pearson from the outer leave-patient-out CV, each
    outer fold choosing its own hyper-parameters on its training patients; then the head on every row."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"head kind {kind!r}: expected one of {', '.join(HEAD_KINDS)}")
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    patients = np.asarray(patients).astype(str)
    if not (X.shape[0] == Y.shape[0] == patients.shape[0]):
        raise ValueError(f"rows differ: X {X.shape[0]}, Y {Y.shape[0]}, patients {patients.shape[0]}")
    if Y.shape[1] != len(genes):
        raise ValueError(f"Y has {Y.shape[1]} columns for {len(genes)} genes")
    if not np.isfinite(X).all() or not np.isfinite(Y).all():
        raise ValueError("embeddings and targets must be finite")
    learner: Any = MLPLearner(latent_dim, seed) if kind == "mlp" else _Ridge(latent_dim, seed)
    folds = hestbench.patient_folds(patients)  # ≥ 2 patients, or a clear error
    per_fold, fold_info = [], []
    for tr, te in folds:
        params, scores = learner.choose(X[tr], Y[tr], patients[tr])
        r = hestbench.pearson_per_gene(Y[te], learner.fit_predict(X[tr], Y[tr], params, X[te]))
        per_fold.append(r)
        fold_info.append(
            {
                "test_patients": sorted(set(patients[te].tolist())),
                "n_train": int(tr.size),
                "n_test": int(te.size),
                **params,
                "inner_scores": scores,
                "pearson_mean": float(np.nanmean(r)) if np.isfinite(r).any() else None,
            }
        )
    R = np.vstack(per_fold)
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(R)
        pearson = np.where(finite.any(0), np.nansum(np.where(finite, R, 0), 0) / np.maximum(finite.sum(0), 1), np.nan)
    params, scores = learner.choose(X, Y, patients)
    record = {
        "n_rows": int(X.shape[0]),
        "patients": sorted(set(patients.tolist())),
        "outer_folds": fold_info,
        "heldout_pearson_mean": float(np.nanmean(pearson)) if np.isfinite(pearson).any() else None,
        **(info or {}),
    }
    n_comp = min(latent_dim, X.shape[0], X.shape[1])
    if n_comp < latent_dim:
        record["pca_capped"] = f"{n_comp} components (rows {X.shape[0]}, width {X.shape[1]}) < {latent_dim}"
    common = dict(model_name=model_name, model_hash=model_hash, tile=tile)
    return learner.head(X, Y, list(map(str, genes)), pearson, params, scores, record, **common)
