"""The HEST-Bench protocol (histotx.eval.hestbench): a hand-computed case, folds, the linear probe."""

from __future__ import annotations

import numpy as np
import pytest

from histotx.eval import hestbench


def _case(seed: int = 0, n_per_patient: int = 12, n_patients: int = 4, d: int = 3, g: int = 2):
    rng = np.random.default_rng(seed)
    n = n_per_patient * n_patients
    X = rng.normal(size=(n, d)) * np.array([1.0, 3.0, 0.5])[:d] + 2.0
    beta = rng.normal(size=(d, g))
    Y = 5.0 + X @ beta + rng.normal(scale=0.8, size=(n, g))  # an offset the ridge has no intercept for
    patients = np.repeat([f"P{i}" for i in range(n_patients)], n_per_patient)
    return X, Y, patients


def _reference(X, Y, patients):
    """The protocol by hand in float64: LOPO, z-score on train (ddof 0), ridge by least squares on the
    augmented system [Z; √α·I] w = [y; 0] (PCA with every component is a rotation, which a ridge with
    an isotropic penalty does not see), Pearson by np.corrcoef, mean over genes then over folds."""
    fold_means = []
    for p in np.unique(patients):
        tr, te = patients != p, patients == p
        mu, sd = X[tr].mean(0), X[tr].std(0)
        Z, Zt = (X[tr] - mu) / sd, (X[te] - mu) / sd
        d, g = X.shape[1], Y.shape[1]
        alpha = 100.0 / (d * g)
        A = np.vstack([Z, np.sqrt(alpha) * np.eye(d)])
        B = np.vstack([Y[tr], np.zeros((d, g))])
        w = np.linalg.lstsq(A, B, rcond=None)[0]
        P = Zt @ w
        fold_means.append(np.mean([np.corrcoef(Y[te, j], P[:, j])[0, 1] for j in range(g)]))
    return np.array(fold_means)


@pytest.mark.parametrize("seed", [0, 1])
def test_protocol_reproduces_hand_computed_case(seed):
    X, Y, patients = _case(seed)
    ref = _reference(X, Y, patients)
    exact = hestbench.regression_probe(X, Y, ["g0", "g1"], patients, solver="cholesky")
    assert [f.test_patients for f in exact.folds] == [["P0"], ["P1"], ["P2"], ["P3"]]
    assert all(f.n_components == 3 and f.alpha == pytest.approx(100 / 6) for f in exact.folds)
    # Same estimator, different kernels (SVD-based PCA + Cholesky vs lstsq): float64 round-off on
    # well-conditioned 36 × 3 systems is ~1e-14; 1e-10 leaves room for any BLAS.
    np.testing.assert_allclose(exact.fold_means, ref, rtol=0, atol=1e-10)
    assert exact.mean == pytest.approx(ref.mean(), abs=1e-10)
    assert exact.sd == pytest.approx(ref.std(), abs=1e-10)
    assert 0.3 < exact.mean < 1.0  # a real signal, not a degenerate case
    # HEST's lsqr stops at tol 1e-4 (seed 1: after 2 of 3 iterations on one gene, 1.1e-4 off).
    hest = hestbench.regression_probe(X, Y, ["g0", "g1"], patients)
    np.testing.assert_allclose(hest.fold_means, ref, rtol=0, atol=1e-3)


def test_no_intercept_gives_the_pearson_of_a_ridge_with_intercept():
    """X is centred on the training rows, so dropping the intercept only drops ȳ from the predictions."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    X, Y, patients = _case(seed=1, d=3, g=2)
    tr, te = patients != "P0", patients == "P0"
    pred, info = hestbench.fit_predict(X[tr], Y[tr], X[te], solver="cholesky")
    scaler = StandardScaler().fit(X[tr])
    pca = PCA(info["n_components"], random_state=1).fit(scaler.transform(X[tr]))
    ridge = Ridge(alpha=info["alpha"], fit_intercept=True, solver="cholesky")
    ridge.fit(pca.transform(scaler.transform(X[tr])), Y[tr])
    with_intercept = ridge.predict(pca.transform(scaler.transform(X[te])))
    np.testing.assert_allclose(pred, with_intercept - ridge.intercept_, atol=1e-8)
    np.testing.assert_allclose(
        hestbench.pearson_per_gene(Y[te], pred), hestbench.pearson_per_gene(Y[te], with_intercept), atol=1e-10
    )


def test_pca_is_capped_and_alpha_follows_it():
    rng = np.random.default_rng(2)
    X, Y = rng.normal(size=(30, 300)), rng.normal(size=(30, 4))
    patients = np.repeat(["a", "b", "c"], 10)
    res = hestbench.regression_probe(X, Y, list("wxyz"), patients)
    assert [f.n_components for f in res.folds] == [20, 20, 20]  # capped by the 20 training rows
    assert res.folds[0].alpha == pytest.approx(100 / (20 * 4))
    # HEST's PCA(256) would fail here: the score is said to be off-protocol, not silently reported
    assert "PCA capped at 20 < 256" in res.off_protocol and not res.to_json()["on_protocol"]
    assert any(d.startswith("off-protocol") for d in res.deviations)


def test_folds_never_split_a_patient():
    few = np.repeat(["A", "B", "C"], [5, 7, 3])
    folds = hestbench.patient_folds(few)
    assert len(folds) == 3  # leave one patient out
    for tr, te in folds:
        assert np.unique(few[te]).size == 1 and not set(few[tr]) & set(few[te])
    many = np.repeat([f"P{i}" for i in range(9)], np.arange(1, 10))
    folds = hestbench.patient_folds(many)
    assert len(folds) == hestbench.GROUP_KFOLD_SPLITS
    tested = np.concatenate([te for _, te in folds])
    assert np.array_equal(np.sort(tested), np.arange(many.size))  # every row tested exactly once
    for tr, te in folds:
        assert not set(many[tr]) & set(many[te])
    with pytest.raises(ValueError, match="2 patients"):
        hestbench.patient_folds(["A"] * 4)


def test_constant_gene_is_nan_and_counted():
    X, Y, patients = _case(seed=3)
    Y[patients == "P2", 1] = 0.0  # constant on the test split of fold P2
    res = hestbench.regression_probe(X, Y, ["g0", "g1"], patients)
    assert res.n_nan == 1
    fold = res.folds[2]
    # as HEST-Bench: np.mean over genes is NaN, and so is the mean over folds
    assert np.isnan(fold.pearson[1]) and np.isnan(fold.mean) and np.isnan(res.mean)
    assert res.to_json()["folds"][2]["pearson"]["g1"] is None and hestbench.OMIT_DEVIATION not in res.deviations
    omit = hestbench.regression_probe(X, Y, ["g0", "g1"], patients, nan_policy="omit")
    assert omit.folds[2].mean == pytest.approx(omit.folds[2].pearson[0]) and np.isfinite(omit.mean)
    assert hestbench.OMIT_DEVIATION in omit.deviations and omit.to_json()["deviations"] == omit.deviations


def test_gene_group_means():
    X, Y, patients = _case(seed=4, g=3)
    res = hestbench.regression_probe(X, Y, ["a", "b", "c"], patients)
    mean, sd, n = res.group_mean(["a", "c", "not-a-target"])
    per_fold = [np.mean(f.pearson[[0, 2]]) for f in res.folds]
    assert n == 2 and mean == pytest.approx(np.mean(per_fold)) and sd == pytest.approx(np.std(per_fold))
    assert np.isnan(res.group_mean(["zzz"])[0])


def test_classification_probe_separable_label():
    rng = np.random.default_rng(5)
    labels = np.tile(["tumour", "stroma"], 20)
    X = rng.normal(size=(40, 6))
    X[:, 0] += np.where(labels == "tumour", 4.0, -4.0)
    patients = np.repeat(["p1", "p2", "p3", "p4"], 10)
    res = hestbench.classification_probe(X, labels, patients)
    assert res.classes == ["stroma", "tumour"]
    assert len(res.balanced_accuracy) == 4 and min(res.balanced_accuracy) == 1.0
