"""The HEST-Benchmark protocol on embeddings: patient folds → StandardScaler → PCA → ridge → Pearson per gene.

As HEST-Bench (``hest/bench/benchmark.py``, ``trainer.py``) does it, with scikit-learn:

- X: float64 (the embeddings are cast first) → StandardScaler → PCA(n_components = 256, random_state = 1),
  both fitted on the training split only. HEST passes 256 as it is, and scikit-learn fails when the
  training rows or the embedding width are fewer: here the PCA is capped at what exists (and the alpha
  follows), and the score is marked **off-protocol** (``FoldResult.off_protocol``, ``results.json``, the
  table's ``protocol`` column): it does not compare with the leaderboard.
- y: log1p counts, **not centred** (HEST's ``load_adata(normalize=True)`` is log1p only).
- Ridge(solver="lsqr", alpha = 100 / (n_components · n_genes), fit_intercept=False, max_iter=1000,
  random_state=1): HEST's formula, 100 / (256 · 50) in the published setting. lsqr stops at scikit-learn's
  default tol (1e-4), before the exact ridge solution on some genes: a fold's mean Pearson can differ from
  the exact ridge's by up to ~1e-2 (0.0074 measured on a test task; 1.1e-4 on the 3-dimension case of
  tests/test_eval_protocol.py). Kept, since HEST's numbers are made so; ``solver="cholesky"`` gives the
  exact ridge (the tests check the pipeline against a float64 least-squares solve with it).
- Precision: float64 throughout. HEST's own code turns the PCA scores into a float32 ``torch.Tensor``
  before the ridge (``benchmark.py``): on the test task that moves the mean by 1.6e-4 (1–2e-3 per fold
  was seen on another task). tests/test_eval_hest_protocol.py scores a HEST-layout task against a float64
  re-implementation of HEST's steps to ≤ 1e-6 and prints how far the float32 cast lands.
- Metric: Pearson per gene on the test split (scipy ``pearsonr``, all test rows together), mean over genes
  (``np.mean``), then mean (± population sd, ``np.std``) over folds.
- A gene constant on a test split has no Pearson (NaN). As HEST, that fold's mean is then NaN, and so is
  the overall mean (``nan_policy="hest"``, the default). ``nan_policy="omit"`` leaves such genes out of the
  fold's mean instead (counted in ``n_nan``); this deviation is named in ``RegressionResult.deviations``.

Ridge without an intercept and centring: the scaler centres X on the training rows and PCA keeps it
centred, so every training column of the design has mean zero. Then Xᵀy = Xᵀ(y − ȳ) and the fitted
weights equal those of a ridge *with* an intercept: the intercept (ȳ) is simply left out. Predictions
come out centred near zero instead of near ȳ, which makes the MSE and R² of HEST's table meaningless
but leaves Pearson (invariant to an offset) exactly as with ``fit_intercept=True``. Tested.

Folds: the patients are the groups and a patient is never split. With ≤ 4 patients, leave one patient
out (HEST-Bench's tasks); with more, ``GroupKFold(5)`` (five folds of whole patients, balanced by rows).
HEST-Bench's own task folders bring their splits (:mod:`histotx.eval.hestlayout`).

The second task, a linear probe of a label: StandardScaler → LogisticRegression(max_iter=1000) on the
same embeddings and the same patient folds; accuracy and balanced accuracy per fold.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

LATENT_DIM = 256
SEED = 1
ALPHA_NUMERATOR = 100.0
MAX_LOPO_PATIENTS = 4
GROUP_KFOLD_SPLITS = 5
NAN_POLICIES = ("hest", "omit")
OMIT_DEVIATION = (
    "nan_policy=omit: a gene constant on a test split (no Pearson) is left out of that split's mean; "
    "HEST-Bench's mean over genes is NaN then"
)

Fold = tuple[np.ndarray, np.ndarray]  # (train row indices, test row indices)


def patient_folds(patients: Sequence[str]) -> list[Fold]:
    """Leave-one-patient-out for ≤ 4 patients, else GroupKFold(5); a patient's rows stay together."""
    from sklearn.model_selection import GroupKFold, LeaveOneGroupOut

    groups = np.asarray(patients)
    n_patients = np.unique(groups).size
    if n_patients < 2:
        raise ValueError(f"patient-stratified folds need ≥ 2 patients, the data has {n_patients}")
    splitter = LeaveOneGroupOut() if n_patients <= MAX_LOPO_PATIENTS else GroupKFold(GROUP_KFOLD_SPLITS)
    index = np.zeros((groups.size, 1))
    return [(tr, te) for tr, te in splitter.split(index, groups=groups)]


def ridge_alpha(n_components: int, n_genes: int) -> float:
    return ALPHA_NUMERATOR / (n_components * n_genes)


def fit_predict(
    X_train: np.ndarray,
    Y_train: np.ndarray,
    X_test: np.ndarray,
    latent_dim: int = LATENT_DIM,
    seed: int = SEED,
    solver: str = "lsqr",
) -> tuple[np.ndarray, dict]:
    """Fit scaler → PCA → ridge on the training rows; predictions for the test rows and what was used."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    X_train, X_test = np.asarray(X_train, np.float64), np.asarray(X_test, np.float64)
    n_components = min(latent_dim, X_train.shape[0], X_train.shape[1])
    alpha = ridge_alpha(n_components, Y_train.shape[1])
    pipe = Pipeline(
        [
            ("scaler", StandardScaler()),
            ("pca", PCA(n_components=n_components, random_state=seed)),
            ("ridge", Ridge(alpha=alpha, solver=solver, fit_intercept=False, max_iter=1000, random_state=seed)),
        ]
    )
    pipe.fit(X_train, Y_train)
    return pipe.predict(X_test), {"n_components": n_components, "alpha": alpha}


def pearson_per_gene(Y: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Pearson r of each column of Y with the same column of P (scipy); NaN where either is constant."""
    from scipy.stats import ConstantInputWarning, pearsonr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        r = pearsonr(np.asarray(Y, np.float64), np.asarray(P, np.float64), axis=0).statistic
    return np.atleast_1d(np.asarray(r, dtype=np.float64))


@dataclass
class FoldResult:
    test_patients: list[str]
    n_train: int
    n_test: int
    n_components: int
    alpha: float
    pearson: np.ndarray  # (n_genes,)
    nan_policy: str = "hest"
    latent_dim: int = LATENT_DIM

    @property
    def mean(self) -> float:
        """Mean Pearson over genes: NaN if any gene's is (HEST), or over the defined ones (``omit``)."""
        if self.nan_policy == "hest":
            return float(np.mean(self.pearson)) if self.pearson.size else float("nan")
        finite = self.pearson[np.isfinite(self.pearson)]
        return float(finite.mean()) if finite.size else float("nan")

    @property
    def off_protocol(self) -> str | None:
        """Why this fold is not HEST-Bench's protocol (PCA capped below ``latent_dim``), or None."""
        if self.n_components < self.latent_dim:
            return (
                f"PCA capped at {self.n_components} < {self.latent_dim} components "
                f"(the {self.n_train} training rows or the embedding width are fewer; HEST's "
                f"PCA({self.latent_dim}) would fail)"
            )
        return None


@dataclass
class RegressionResult:
    genes: list[str]
    folds: list[FoldResult] = field(default_factory=list)

    @property
    def fold_means(self) -> np.ndarray:
        return np.array([f.mean for f in self.folds])

    @property
    def mean(self) -> float:
        return float(np.mean(self.fold_means))

    @property
    def sd(self) -> float:
        return float(np.std(self.fold_means))

    @property
    def n_nan(self) -> int:
        return int(sum(np.isnan(f.pearson).sum() for f in self.folds))

    @property
    def off_protocol(self) -> str | None:
        """The folds that left HEST's protocol, in words (None: every fold is on protocol)."""
        why = [f"fold {i}: {f.off_protocol}" for i, f in enumerate(self.folds) if f.off_protocol]
        return "; ".join(why) or None

    @property
    def deviations(self) -> list[str]:
        """Named departures from HEST-Bench's protocol that were asked for (``nan_policy="omit"``) or forced
        (off-protocol PCA)."""
        out = [OMIT_DEVIATION] if self.folds and self.folds[0].nan_policy == "omit" else []
        return out + ([f"off-protocol: {self.off_protocol}"] if self.off_protocol else [])

    def group_mean(self, genes: Sequence[str]) -> tuple[float, float, int]:
        """Mean (over folds of the per-fold mean over the group's target genes), sd over folds, genes used."""
        cols = [i for i, g in enumerate(self.genes) if g in set(genes)]
        if not cols:
            return float("nan"), float("nan"), 0
        per_fold = [np.nanmean(f.pearson[cols]) if np.isfinite(f.pearson[cols]).any() else np.nan for f in self.folds]
        return float(np.mean(per_fold)), float(np.std(per_fold)), len(cols)

    def to_json(self) -> dict:
        return {
            "genes": self.genes,
            "pearson_mean": None if np.isnan(self.mean) else self.mean,
            "pearson_sd": None if np.isnan(self.sd) else self.sd,
            "mean_per_fold": [None if np.isnan(m) else float(m) for m in self.fold_means],
            "n_nan": self.n_nan,
            "on_protocol": self.off_protocol is None,
            "deviations": self.deviations,
            "folds": [
                {
                    "test_patients": f.test_patients,
                    "n_train": f.n_train,
                    "n_test": f.n_test,
                    "n_components": f.n_components,
                    "alpha": f.alpha,
                    "pearson": {
                        g: (None if np.isnan(r) else float(r)) for g, r in zip(self.genes, f.pearson, strict=True)
                    },
                }
                for f in self.folds
            ],
        }


def regression_probe(
    X: np.ndarray,
    Y: np.ndarray,
    genes: Sequence[str],
    patients: Sequence[str],
    folds: list[Fold] | None = None,
    latent_dim: int = LATENT_DIM,
    seed: int = SEED,
    solver: str = "lsqr",
    nan_policy: str = "hest",
) -> RegressionResult:
    """The HEST-Bench regression over ``folds`` (default :func:`patient_folds`); ``nan_policy``: see the
    module docstring."""
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    patients = np.asarray(patients)
    if not (X.shape[0] == Y.shape[0] == patients.shape[0]):
        raise ValueError(f"rows differ: X {X.shape[0]}, Y {Y.shape[0]}, patients {patients.shape[0]}")
    if Y.shape[1] != len(genes):
        raise ValueError(f"Y has {Y.shape[1]} columns for {len(genes)} genes")
    if not np.all(np.isfinite(X)):
        raise ValueError("embeddings hold NaN/inf rows; drop them before the probe")
    result = RegressionResult(list(genes))
    for train, test in folds if folds is not None else patient_folds(patients):
        if np.intersect1d(patients[train], patients[test]).size:
            raise ValueError("a patient is in both the training and the test split of a fold")
        pred, info = fit_predict(X[train], Y[train], X[test], latent_dim, seed, solver)
        result.folds.append(
            FoldResult(
                sorted(map(str, np.unique(patients[test]))),
                int(train.size),
                int(test.size),
                info["n_components"],
                info["alpha"],
                pearson_per_gene(Y[test], pred),
                nan_policy,
                latent_dim,
            )
        )
    return result


@dataclass
class ClassificationResult:
    classes: list[str]
    accuracy: list[float] = field(default_factory=list)
    balanced_accuracy: list[float] = field(default_factory=list)
    n_test: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "classes": self.classes,
            "accuracy": self.accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "n_test": self.n_test,
            "balanced_accuracy_mean": float(np.mean(self.balanced_accuracy)),
            "balanced_accuracy_sd": float(np.std(self.balanced_accuracy)),
        }


def classification_probe(
    X: np.ndarray, labels: Sequence, patients: Sequence[str], folds: list[Fold] | None = None, seed: int = SEED
) -> ClassificationResult:
    """Linear probe of a label: StandardScaler → LogisticRegression, per patient fold."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels).astype(str)
    patients = np.asarray(patients)
    result = ClassificationResult(sorted(np.unique(labels).tolist()))
    for train, test in folds if folds is not None else patient_folds(patients):
        if np.unique(labels[train]).size < 2:
            raise ValueError(f"a training split holds one label only ({labels[train][0]!r}); a probe needs ≥ 2 classes")
        pipe = Pipeline(
            [("scaler", StandardScaler()), ("logreg", LogisticRegression(max_iter=1000, random_state=seed))]
        )
        pipe.fit(X[train], labels[train])
        pred = pipe.predict(X[test])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a test class the model never predicts
            result.balanced_accuracy.append(float(balanced_accuracy_score(labels[test], pred)))
        result.accuracy.append(float(accuracy_score(labels[test], pred)))
        result.n_test.append(int(test.size))
    return result
