"""The expression head: tile image embedding → log1p expression of each gene, with the confidence per gene.

Fitted by :func:`histotx.predict.heads.fit_head` with the evaluation's protocol
(:mod:`histotx.eval.hestbench`): StandardScaler → PCA(256, capped by the rows and the width, random_state=1) →
ridge without intercept, all fitted on training patients only, in float64. Two differences from the benchmark,
both because a head is meant to be used rather than compared: the ridge's alpha is *chosen* by an inner
leave-patient-out cross-validation on the training patients (from :data:`ALPHAS` and HEST's fixed 100 / (PCs ·
genes); mean Pearson over genes), and the ridge is solved exactly (SVD), not by lsqr. The per-gene Pearson
each gene is reported with comes from the outer leave-patient-out CV
(:func:`histotx.eval.hestbench.patient_folds`: every patient held out once with ≤ 4 patients, GroupKFold(5)
beyond), each outer fold choosing its own alpha on its own training patients. The saved head is refitted on
every patient with the alpha chosen on all.

Prediction adds the intercept the benchmark leaves out (the training mean of each gene), so the head
returns log1p(count per tile) on the scale of the training data, not a centred value. ``histotx predict``
keeps each gene's prediction inside its training range (:meth:`ExpressionHead.clip`) and counts, per gene,
the tiles that fell outside (``var["tiles_outside_training_range"]``): many such tiles say the slide is
unlike the training cohort.

On disk (no pickle): ``head.safetensors`` (float64 scaler, PCA and ridge arrays, and the folded affine map
``W``, ``b``), ``head.json`` (genes, per-gene held-out Pearson, alpha, the model's fingerprint, the tile
geometry the embeddings were made at, provenance) and ``genes.tsv`` (gene, held-out Pearson, mean).
A head belongs to one model: :func:`model_fingerprint` (SHA-256 over the state dict) is checked on use.

Two kinds, named by ``head.json``'s ``kind`` (:func:`histotx.predict.heads.load_head` reads either; a file
without one is a ridge head, as every head was before the MLP): ``ridge`` (this module, :class:`ExpressionHead`)
and ``mlp`` (:mod:`histotx.predict.mlp`, :class:`~histotx.predict.mlp.MLPHead`: a small MLP on the same
standardised PCA scores, its hyper-parameters chosen by the same inner CV). Both share the outer CV of
:func:`histotx.predict.heads.fit_head`, the files, the model check and the clipping (:class:`HeadCommon`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histotx.eval import hestbench
from histotx.files import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

HEAD_FORMAT = "histotx-expression-head"
HEAD_VERSION = 1
HEAD_JSON = "head.json"
HEAD_WEIGHTS = "head.safetensors"
GENES_TSV = "genes.tsv"
HEAD_KINDS = ("ridge", "mlp")
ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
"""Ridge alphas tried by the inner CV (besides HEST's 100 / (PCs · genes)); the design is PCA scores of
standardised embeddings, so a component's sum of squares is about its variance × rows."""


class HeadMismatchError(ValueError):
    """A head used with a model other than the one it was fitted on."""


def model_fingerprint(net) -> str:
    """SHA-256 over a model's state dict (names, dtypes, shapes and values in name order): the same weights
    give the same fingerprint whatever folder or format (export, HF, run checkpoint) they were loaded from."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}|{list(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@dataclass
class TileSpec:
    """The tiles a head's embeddings were made of: ``tile_px`` px at ``mpp`` µm/px, shown at ``image_px``."""

    tile_px: int
    mpp: float
    image_px: int

    @property
    def size_um(self) -> float:
        return self.tile_px * self.mpp


class HeadCommon:
    """What every kind of head has and does: genes with their held-out Pearson, the training mean and range of
    each gene, the model it belongs to, its tile; clipping, the model check, and the files around its weights."""

    kind = ""
    genes: list[str]
    pearson: np.ndarray
    intercept: np.ndarray  # (G,) the training mean of each gene's log1p count
    y_min: np.ndarray
    y_max: np.ndarray
    model_name: str
    model_hash: str
    tile: TileSpec
    info: dict[str, Any]

    def clip(self, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predictions kept inside each gene's training range (a head extrapolates without bound on tiles
        unlike its training data), and per gene the number of rows that were outside it."""
        outside = (pred < self.y_min) | (pred > self.y_max)
        return np.clip(pred, self.y_min, self.y_max), outside.sum(axis=0)

    def check_model(self, net, name: str = "", where: str | Path = "") -> None:
        """Refuse a model whose weights are not the ones the head was fitted on."""
        fp = model_fingerprint(net)
        if fp != self.model_hash:
            raise HeadMismatchError(
                f"{where or 'the head'}: fitted on the embeddings of model {self.model_name!r} "
                f"(weights sha256 {self.model_hash[:12]}…), not of {name or 'this model'} ({fp[:12]}…); a head "
                "only reads its own model's embedding space: fit one for this model with `histotx fit`"
            )

    def describe(self) -> str:
        raise NotImplementedError

    def _write(self, folder: str | Path, tensors: dict[str, np.ndarray], fields: dict[str, Any]) -> Path:
        """head.safetensors (``tensors`` as float64), genes.tsv and head.json (the common fields, then ``fields``)."""
        from safetensors.numpy import save

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()}
        atomic_write_bytes(folder / HEAD_WEIGHTS, save(tensors, metadata={"format": HEAD_FORMAT, "kind": self.kind}))
        pearson = [None if not math.isfinite(r) else float(r) for r in self.pearson]
        lines = ["gene\theldout_pearson\tmean_log1p"]
        for g, r, m in zip(self.genes, pearson, self.intercept, strict=True):
            lines.append(f"{g}\t{'' if r is None else f'{r:.6f}'}\t{m:.6f}")
        atomic_write_bytes(folder / GENES_TSV, ("\n".join(lines) + "\n").encode())
        atomic_write_json(
            folder / HEAD_JSON,
            {
                "format": HEAD_FORMAT,
                "version": HEAD_VERSION,
                "kind": self.kind,
                "model": {"name": self.model_name, "sha256": self.model_hash},
                "tile": asdict(self.tile),
                "target": "log1p(count per tile), the sum of the tile's sites",
                **fields,
                "genes": self.genes,
                "heldout_pearson": pearson,
                "info": self.info,
            },
        )
        return folder


def read_head_files(folder: str | Path, kind: str | None = None) -> tuple[dict, dict[str, np.ndarray], Path]:
    """(head.json, the weights, the weights' path) of a head folder, checked: the format, the version, the kind
    (``kind``: the one expected), and the arrays every kind has, shaped for its genes."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    meta_path, weights = folder / HEAD_JSON, folder / HEAD_WEIGHTS
    for path in (meta_path, weights):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not an expression head folder (made by `histotx fit`)")
    meta = _read_head_json(meta_path, kind)
    try:
        t = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{weights}: not a readable safetensors file ({exc})") from exc
    g = len(meta["genes"])
    need = {"scaler_mean": None, "scaler_scale": None, "pca_mean": None, "pca_components": None, "intercept": (g,),
            "y_min": (g,), "y_max": (g,)}  # fmt: skip
    missing = [k for k in need if k not in t]
    if missing:
        raise ValueError(f"{weights}: lacks {missing}")
    d, k = t["scaler_mean"].shape[0], t["pca_components"].shape[0]
    need.update(scaler_scale=(d,), pca_mean=(d,), pca_components=(k, d))
    for key, shape in need.items():
        if shape is not None and t[key].shape != shape:
            raise ValueError(f"{weights}: {key} is {t[key].shape}, expected {shape} for {g} genes")
    return meta, t, weights


def _read_head_json(meta_path: Path, kind: str | None) -> dict:
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise ValueError(f"{meta_path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != HEAD_FORMAT:
        raise ValueError(f"{meta_path}: not a {HEAD_FORMAT} file")
    if meta.get("version") != HEAD_VERSION:
        raise ValueError(f"{meta_path}: version {meta.get('version')}, this HistoTx reads {HEAD_VERSION}")
    found = meta.get("kind", "ridge")  # heads written before the MLP say no kind: ridge
    if found not in HEAD_KINDS:
        raise ValueError(
            f"{meta_path}: a head of kind {found!r}, which this HistoTx does not know (it reads "
            f"{', '.join(HEAD_KINDS)}): fitted by a newer HistoTx? refit it with `histotx fit`, or upgrade"
        )
    if kind is not None and found != kind:
        raise ValueError(f"{meta_path}: a {found} head, not a {kind} one (histotx.predict.load_head reads either)")
    genes = meta.get("genes")
    if not isinstance(genes, list) or len(meta.get("heldout_pearson") or []) != len(genes):
        raise ValueError(f"{meta_path}: genes and heldout_pearson must be lists of the same length")
    return meta


def _pearson_list(meta: dict) -> np.ndarray:
    return np.array([np.nan if r is None else float(r) for r in meta["heldout_pearson"]], dtype=np.float64)


@dataclass
class ExpressionHead(HeadCommon):
    """The ridge head (module docstring): one affine map of the embedding."""

    kind = "ridge"

    genes: list[str]
    pearson: np.ndarray  # (G,) held-out Pearson per gene (mean over outer folds; NaN: never defined)
    scaler_mean: np.ndarray  # (D,)
    scaler_scale: np.ndarray  # (D,)
    pca_mean: np.ndarray  # (D,) (zero after the scaler, kept as sklearn has it)
    pca_components: np.ndarray  # (K, D)
    coef: np.ndarray  # (G, K)
    intercept: np.ndarray  # (G,) the training mean of each gene's log1p count
    y_min: np.ndarray  # (G,) the training range of each gene's log1p count (predictions are kept inside it)
    y_max: np.ndarray
    alpha: float
    model_name: str
    model_hash: str
    tile: TileSpec
    info: dict[str, Any] = field(default_factory=dict)  # folds, alphas, data source, ...

    @property
    def n_components(self) -> int:
        return int(self.pca_components.shape[0])

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(W (D, G), b (G,)): the whole head as one affine map of the embedding, float64."""
        proj = self.pca_components.T / self.scaler_scale[:, None]  # (D, K)
        W = proj @ self.coef.T
        b = (
            self.intercept
            - (self.scaler_mean / self.scaler_scale + self.pca_mean) @ self.pca_components.T @ self.coef.T
        )
        return W, b

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(n, G) float64 predicted log1p(count per tile) from (n, D) image embeddings."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.scaler_mean.shape[0]:
            raise ValueError(f"embeddings must be (n, {self.scaler_mean.shape[0]}), got {X.shape}")
        Z = ((X - self.scaler_mean) / self.scaler_scale - self.pca_mean) @ self.pca_components.T
        return Z @ self.coef.T + self.intercept

    def describe(self) -> str:
        return f"ridge, alpha {self.alpha:g}, {self.n_components} PCs"

    # ------------------------------------------------------------ disk

    def save(self, folder: str | Path) -> Path:
        W, b = self.affine()
        tensors = {
            "scaler_mean": self.scaler_mean,
            "scaler_scale": self.scaler_scale,
            "pca_mean": self.pca_mean,
            "pca_components": self.pca_components,
            "coef": self.coef,
            "intercept": self.intercept,
            "y_min": self.y_min,
            "y_max": self.y_max,
            "W": W,
            "b": b,
        }
        fields = {
            "protocol": __doc__.split("\n\n")[1].replace("\n", " "),
            "alpha": self.alpha,
            "n_components": self.n_components,
            "embedding_dim": int(self.scaler_mean.shape[0]),
        }
        return self._write(folder, tensors, fields)

    @classmethod
    def load(cls, folder: str | Path) -> "ExpressionHead":
        meta, t, weights = read_head_files(folder, "ridge")
        genes = [str(g) for g in meta["genes"]]
        if "coef" not in t or t["coef"].shape != (len(genes), t["pca_components"].shape[0]):
            raise ValueError(
                f"{weights}: coef missing or not (genes, components) {(len(genes), t['pca_components'].shape[0])}"
            )
        return cls(
            genes,
            _pearson_list(meta),
            t["scaler_mean"],
            t["scaler_scale"],
            t["pca_mean"],
            t["pca_components"],
            t["coef"],
            t["intercept"],
            t["y_min"],
            t["y_max"],
            float(meta["alpha"]),
            str(meta["model"]["name"]),
            str(meta["model"]["sha256"]),
            TileSpec(**meta["tile"]),
            dict(meta.get("info") or {}),
        )


# ---------------------------------------------------------------- fitting


@dataclass
class _Design:
    """Scaler → PCA fitted on training rows; the ridge for any alpha from one SVD of the scores."""

    scaler: Any
    pca: Any
    U: np.ndarray
    s: np.ndarray
    Vt: np.ndarray
    y_mean: np.ndarray
    Yc: np.ndarray

    @classmethod
    def fit(cls, X: np.ndarray, Y: np.ndarray, latent_dim: int, seed: int) -> "_Design":
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(X)
        Xs = scaler.transform(X)
        pca = PCA(n_components=min(latent_dim, X.shape[0], X.shape[1]), random_state=seed).fit(Xs)
        Z = pca.transform(Xs)
        U, s, Vt = np.linalg.svd(Z, full_matrices=False)
        y_mean = Y.mean(axis=0)
        return cls(scaler, pca, U, s, Vt, y_mean, Y - y_mean)

    def coef(self, alpha: float) -> np.ndarray:
        """(G, K) exact ridge weights (no intercept: the scores are centred on these rows; y centred)."""
        d = self.s / (self.s**2 + alpha)
        return ((self.Vt.T * d) @ (self.U.T @ self.Yc)).T

    def predict(self, X: np.ndarray, alpha: float) -> np.ndarray:
        Z = self.pca.transform(self.scaler.transform(X))
        return Z @ self.coef(alpha).T + self.y_mean


def _alphas(n_components: int, n_genes: int) -> list[float]:
    return sorted({hestbench.ridge_alpha(n_components, n_genes), *ALPHAS})


def choose_alpha(
    X: np.ndarray, Y: np.ndarray, patients: np.ndarray, latent_dim: int, seed: int
) -> tuple[float, dict[str, float]]:
    """The alpha with the best mean (over genes, then inner folds) held-out Pearson over patient folds of
    these rows; with one patient only, HEST's fixed alpha (said in the returned scores)."""
    n_comp = min(latent_dim, X.shape[0], X.shape[1])
    alphas = _alphas(n_comp, Y.shape[1])
    if np.unique(patients).size < 2:
        return hestbench.ridge_alpha(n_comp, Y.shape[1]), {}
    scores = {a: [] for a in alphas}
    for tr, te in hestbench.patient_folds(patients):
        design = _Design.fit(X[tr], Y[tr], latent_dim, seed)
        for a in alphas:
            r = hestbench.pearson_per_gene(Y[te], design.predict(X[te], a))
            scores[a].append(float(np.nanmean(r)) if np.isfinite(r).any() else np.nan)
    mean = {a: float(np.nanmean(v)) if np.isfinite(v).any() else -np.inf for a, v in scores.items()}
    best = max(alphas, key=lambda a: (mean[a], -a))
    return best, {f"{a:g}": m for a, m in mean.items()}


class _Ridge:
    """The ridge head's learner for :func:`histotx.predict.heads.fit_head`: alpha chosen by :func:`choose_alpha`."""

    kind = "ridge"

    def __init__(self, latent_dim: int, seed: int) -> None:
        self.latent_dim, self.seed = latent_dim, seed

    def choose(self, X: np.ndarray, Y: np.ndarray, patients: np.ndarray) -> tuple[dict[str, Any], dict[str, float]]:
        alpha, scores = choose_alpha(X, Y, patients, self.latent_dim, self.seed)
        return {"alpha": alpha}, scores

    def fit_predict(self, X: np.ndarray, Y: np.ndarray, params: dict[str, Any], X_test: np.ndarray) -> np.ndarray:
        return _Design.fit(X, Y, self.latent_dim, self.seed).predict(X_test, params["alpha"])

    def head(self, X, Y, genes, pearson, params, scores, record, **common) -> ExpressionHead:
        design = _Design.fit(X, Y, self.latent_dim, self.seed)
        pca = design.pca
        record.update(alpha_scores=scores, ridge="exact (SVD), float64, intercept = training mean")
        return ExpressionHead(
            genes,
            pearson,
            design.scaler.mean_.astype(np.float64),
            design.scaler.scale_.astype(np.float64),
            pca.mean_.astype(np.float64),
            pca.components_.astype(np.float64),
            design.coef(params["alpha"]),
            design.y_mean,
            Y.min(axis=0),
            Y.max(axis=0),
            float(params["alpha"]),
            info=record,
            **common,
        )
