"""The MLP expression head: ``histotx fit --head mlp``, a small non-linear alternative to the ridge head.

The same input as the ridge head (:mod:`histotx.predict.head`): StandardScaler → PCA(256, capped) fitted on
the training rows, the scores then divided by their standard deviation on those rows (so every component starts
on one scale). Then one hidden layer: ``y = W2 · relu(W1 · z + b1) + b2`` on standardised log1p targets (each
gene's training mean and sd; the prediction is scaled back), trained with AdamW (mean squared error,
mini-batches of :data:`BATCH`, at most :data:`MAX_EPOCHS` epochs) in float64 on the CPU, seeded.

- Early stopping: a seeded :data:`VALIDATION_SHARE` of the training rows is held out; training stops
  :data:`PATIENCE` epochs after the validation loss last improved, and the weights of the best epoch are kept.
- Hyper-parameters (hidden width × weight decay, :data:`GRID`) are chosen as the ridge's alpha is: by an
  inner leave-patient-out CV on the training patients (mean over genes, then folds, of the held-out Pearson;
  ties go to the smaller model); with one training patient, :data:`DEFAULT`.
- The held-out Pearson each gene is saved with comes from :func:`histotx.predict.head.fit_head`'s outer
  leave-patient-out CV, each outer fold choosing its own hyper-parameters on its own training patients.

On disk, beside the same genes.tsv and head.json as the ridge head (``kind: mlp``, the hyper-parameters, the
epochs trained): ``head.safetensors`` holds the scaler, PCA, score scale, target mean/sd/range and the layers'
weights, float64. Prediction is numpy (no torch needed to apply a head).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histotx.eval import hestbench
from histotx.predict.head import HeadCommon, TileSpec, _pearson_list, read_head_files

GRID = ({"hidden": 64, "weight_decay": 1e-2}, {"hidden": 64, "weight_decay": 1.0},
        {"hidden": 256, "weight_decay": 1e-2}, {"hidden": 256, "weight_decay": 1.0})  # fmt: skip
"""Hyper-parameters the inner CV chooses from (AdamW's decoupled weight decay, per step × lr)."""
DEFAULT = GRID[0]
LR = 1e-3
BATCH = 128
MAX_EPOCHS = 300
PATIENCE = 20
VALIDATION_SHARE = 0.15


@dataclass
class _Input:
    """Scaler → PCA → score scale, fitted on training rows (float64)."""

    scaler_mean: np.ndarray
    scaler_scale: np.ndarray
    pca_mean: np.ndarray
    pca_components: np.ndarray
    z_scale: np.ndarray

    @classmethod
    def fit(cls, X: np.ndarray, latent_dim: int, seed: int) -> "_Input":
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(X)
        Xs = scaler.transform(X)
        pca = PCA(n_components=min(latent_dim, X.shape[0], X.shape[1]), random_state=seed).fit(Xs)
        Z = pca.transform(Xs)
        sd = Z.std(axis=0)
        return cls(
            scaler.mean_.astype(np.float64),
            scaler.scale_.astype(np.float64),
            pca.mean_.astype(np.float64),
            pca.components_.astype(np.float64),
            np.where(sd > 1e-12, sd, 1.0),
        )

    def __call__(self, X: np.ndarray) -> np.ndarray:
        Z = ((np.asarray(X, np.float64) - self.scaler_mean) / self.scaler_scale - self.pca_mean) @ self.pca_components.T
        return Z / self.z_scale


@dataclass
class _Net:
    """The trained layers (numpy float64) and how training went."""

    w1: np.ndarray  # (H, K)
    b1: np.ndarray
    w2: np.ndarray  # (G, H)
    b2: np.ndarray
    epochs: int  # the best epoch (its weights are these)
    val_loss: float

    def __call__(self, Z: np.ndarray) -> np.ndarray:
        return np.maximum(Z @ self.w1.T + self.b1, 0.0) @ self.w2.T + self.b2


def train_net(Z: np.ndarray, T: np.ndarray, hidden: int, weight_decay: float, seed: int) -> _Net:
    """An MLP from standardised scores ``Z`` to standardised targets ``T``, early-stopped on a seeded
    validation share of the rows (module docstring)."""
    import torch

    n = Z.shape[0]
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_val = int(round(VALIDATION_SHARE * n)) if n >= 10 else 0
    val, tr = order[:n_val], order[n_val:]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(
            torch.nn.Linear(Z.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, T.shape[1])
        ).double()
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=weight_decay)
    Zt, Tt = torch.from_numpy(np.ascontiguousarray(Z)), torch.from_numpy(np.ascontiguousarray(T))
    ztr, ttr = Zt[tr], Tt[tr]
    zval, tval = (Zt[val], Tt[val]) if n_val else (ztr, ttr)
    best, best_state, best_epoch, since = np.inf, None, 0, 0
    for epoch in range(1, MAX_EPOCHS + 1):
        net.train()
        for idx in torch.randperm(len(tr), generator=gen).split(BATCH):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(ztr[idx]), ttr[idx])
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            v = float(torch.nn.functional.mse_loss(net(zval), tval))
        if v < best - 1e-6:
            best, best_epoch, since = v, epoch, 0
            best_state = [p.detach().clone() for p in net.parameters()]
        else:
            since += 1
            if since >= PATIENCE:
                break
    w1, b1, w2, b2 = (p.numpy() for p in best_state)
    return _Net(w1, b1, w2, b2, best_epoch, best)


@dataclass
class _Fitted:
    inp: _Input
    net: _Net
    y_mean: np.ndarray
    y_scale: np.ndarray

    @classmethod
    def fit(cls, X, Y, params: dict[str, Any], latent_dim: int, seed: int) -> "_Fitted":
        inp = _Input.fit(X, latent_dim, seed)
        y_mean, sd = Y.mean(axis=0), Y.std(axis=0)
        y_scale = np.where(sd > 1e-12, sd, 1.0)
        net = train_net(inp(X), (Y - y_mean) / y_scale, int(params["hidden"]), float(params["weight_decay"]), seed)
        return cls(inp, net, y_mean, y_scale)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.net(self.inp(X)) * self.y_scale + self.y_mean


class MLPLearner:
    """The MLP head's learner for :func:`histotx.predict.head.fit_head`."""

    kind = "mlp"

    def __init__(self, latent_dim: int, seed: int) -> None:
        self.latent_dim, self.seed = latent_dim, seed

    def choose(self, X: np.ndarray, Y: np.ndarray, patients: np.ndarray) -> tuple[dict[str, Any], dict[str, float]]:
        """The grid point with the best mean held-out Pearson over leave-patient-out folds of these rows."""
        if np.unique(patients).size < 2:
            return dict(DEFAULT), {}
        scores: dict[int, list[float]] = {i: [] for i in range(len(GRID))}
        for tr, te in hestbench.patient_folds(patients):
            for i, params in enumerate(GRID):
                pred = _Fitted.fit(X[tr], Y[tr], params, self.latent_dim, self.seed).predict(X[te])
                r = hestbench.pearson_per_gene(Y[te], pred)
                scores[i].append(float(np.nanmean(r)) if np.isfinite(r).any() else np.nan)
        mean = {i: float(np.nanmean(v)) if np.isfinite(v).any() else -np.inf for i, v in scores.items()}
        best = max(range(len(GRID)), key=lambda i: (mean[i], -GRID[i]["hidden"], GRID[i]["weight_decay"]))
        return dict(GRID[best]), {_name(p): mean[i] for i, p in enumerate(GRID)}

    def fit_predict(self, X: np.ndarray, Y: np.ndarray, params: dict[str, Any], X_test: np.ndarray) -> np.ndarray:
        return _Fitted.fit(X, Y, params, self.latent_dim, self.seed).predict(X_test)

    def head(self, X, Y, genes, pearson, params, scores, record, **common) -> "MLPHead":
        fitted = _Fitted.fit(X, Y, params, self.latent_dim, self.seed)
        record.update(
            hyper_scores=scores,
            mlp=f"relu, 1 hidden layer; AdamW lr {LR}, batch {BATCH}, early stopping on {VALIDATION_SHARE:.0%} of "
            f"the rows (patience {PATIENCE}, ≤ {MAX_EPOCHS} epochs), float64, seed {self.seed}",
        )
        return MLPHead(
            genes=genes,
            pearson=pearson,
            inp=fitted.inp,
            net=fitted.net,
            y_mean=fitted.y_mean,
            y_scale=fitted.y_scale,
            y_min=Y.min(axis=0),
            y_max=Y.max(axis=0),
            params=dict(params),
            info=record,
            **common,
        )


def _name(params: dict[str, Any]) -> str:
    return f"hidden={params['hidden']},weight_decay={params['weight_decay']:g}"


@dataclass
class MLPHead(HeadCommon):
    """An MLP head (module docstring); the same interface as the ridge :class:`~histotx.predict.head.ExpressionHead`."""

    kind = "mlp"

    genes: list[str]
    pearson: np.ndarray
    inp: _Input
    net: _Net
    y_mean: np.ndarray
    y_scale: np.ndarray
    y_min: np.ndarray
    y_max: np.ndarray
    params: dict[str, Any]
    model_name: str
    model_hash: str
    tile: TileSpec
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def intercept(self) -> np.ndarray:  # the training mean of each gene (what genes.tsv and var report)
        return self.y_mean

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(n, G) float64 predicted log1p(count per tile) from (n, D) image embeddings."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.inp.scaler_mean.shape[0]:
            raise ValueError(f"embeddings must be (n, {self.inp.scaler_mean.shape[0]}), got {X.shape}")
        return self.net(self.inp(X)) * self.y_scale + self.y_mean

    def describe(self) -> str:
        return f"mlp, {_name(self.params)}, {self.net.epochs} epochs, {self.inp.pca_components.shape[0]} PCs"

    def save(self, folder: str | Path) -> Path:
        i, n = self.inp, self.net
        tensors = {
            "scaler_mean": i.scaler_mean,
            "scaler_scale": i.scaler_scale,
            "pca_mean": i.pca_mean,
            "pca_components": i.pca_components,
            "z_scale": i.z_scale,
            "w1": n.w1,
            "b1": n.b1,
            "w2": n.w2,
            "b2": n.b2,
            "intercept": self.y_mean,
            "y_scale": self.y_scale,
            "y_min": self.y_min,
            "y_max": self.y_max,
        }
        fields = {
            "protocol": __doc__.split("\n\n")[1].replace("\n", " "),
            "mlp": {**self.params, "epochs": n.epochs, "validation_loss": n.val_loss},
            "n_components": int(i.pca_components.shape[0]),
            "embedding_dim": int(i.scaler_mean.shape[0]),
        }
        return self._write(folder, tensors, fields)

    @classmethod
    def load(cls, folder: str | Path) -> "MLPHead":
        meta, t, weights = read_head_files(folder, "mlp")
        genes = [str(g) for g in meta["genes"]]
        k = t["pca_components"].shape[0]
        mlp = meta.get("mlp") or {}
        hidden = int(mlp.get("hidden", 0))
        shapes = {"z_scale": (k,), "w1": (hidden, k), "b1": (hidden,), "w2": (len(genes), hidden),
                  "b2": (len(genes),), "y_scale": (len(genes),)}  # fmt: skip
        for key, shape in shapes.items():
            if key not in t or t[key].shape != shape:
                got = t[key].shape if key in t else "missing"
                raise ValueError(f"{weights}: {key} is {got}, expected {shape} (hidden {hidden}, {len(genes)} genes)")
        inp = _Input(t["scaler_mean"], t["scaler_scale"], t["pca_mean"], t["pca_components"], t["z_scale"])
        net = _Net(t["w1"], t["b1"], t["w2"], t["b2"], int(mlp.get("epochs", 0)), float(mlp.get("validation_loss", 0)))
        params = {"hidden": hidden, "weight_decay": float(mlp.get("weight_decay", 0))}
        return cls(
            genes=genes,
            pearson=_pearson_list(meta),
            inp=inp,
            net=net,
            y_mean=t["intercept"],
            y_scale=t["y_scale"],
            y_min=t["y_min"],
            y_max=t["y_max"],
            params=params,
            model_name=str(meta["model"]["name"]),
            model_hash=str(meta["model"]["sha256"]),
            tile=TileSpec(**meta["tile"]),
            info=dict(meta.get("info") or {}),
        )
