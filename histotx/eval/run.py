"""``histotx eval``: embed a shard set with each model and mode, then run the HEST-Bench protocol on it.

Flow: targets from the shards (:mod:`.targets`) → embeddings per model (:func:`histotx.eval.embed.embed_shards`,
the target genes removed from the transcript input) → the leakage guard (every ``transcripts``/``fused``
embedding file must say, in ``uns["dropped_genes"]``, that all target genes were removed) → one set of
patient folds for every model × mode → :mod:`.hestbench` → :mod:`.report`. HEST-Benchmark's own task
folders go through :mod:`.hestlayout` instead (``--hest``).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from histotx.eval import hestbench, report
from histotx.eval.targets import select_target_genes, target_matrix, tile_expression

log = logging.getLogger(__name__)

MODES = ("image", "transcripts", "fused")
TRANSCRIPT_MODES = ("transcripts", "fused")


class LeakageError(ValueError):
    """A transcript-bearing embedding was made from an input that still held target genes."""


def check_no_leakage(adata, path: Path | str, mode: str, targets: Sequence[str]) -> None:
    """Refuse ``transcripts``/``fused`` embeddings unless ``uns["dropped_genes"]`` ⊇ ``targets``."""
    if mode not in TRANSCRIPT_MODES:
        return
    dropped = {str(g) for g in np.asarray(adata.uns.get("dropped_genes", []), dtype=object).ravel()}
    missing = [g for g in targets if g not in dropped]
    if missing:
        raise LeakageError(
            f"{path}: the {mode!r} embeddings were made with target genes still in the transcript input "
            f"({len(missing)} of {len(targets)}, e.g. {missing[:5]}); predicting a gene from an input that "
            "holds it measures nothing. Re-embed with drop_genes ⊇ the targets (histotx embed --drop-genes)"
        )


def read_embeddings(
    folder: Path, samples: Sequence[str], keys: Mapping[str, list[str]], modes: Sequence[str], targets: Sequence[str]
) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """Per mode, the embeddings of the evaluated tiles (rows in ``keys`` order, samples in order), and the obs."""
    import anndata as ad

    per_mode: dict[str, list[np.ndarray]] = {m: [] for m in modes}
    obs = []
    for sample in samples:
        path = Path(folder) / f"{sample}.h5ad"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no embeddings for sample {sample}")
        adata = ad.read_h5ad(path)
        index = pd.Index(adata.obs_names.astype(str))
        rows = index.get_indexer(keys[sample])
        if (rows < 0).any():
            lost = [k for k, r in zip(keys[sample], rows, strict=True) if r < 0]
            raise ValueError(f"{path}: {len(lost)} tiles with transcripts have no embedding (e.g. {lost[:3]})")
        for mode in modes:
            if mode not in adata.obsm:
                raise ValueError(f"{path}: no obsm[{mode!r}] (it holds {sorted(adata.obsm)}); embed that mode")
            check_no_leakage(adata, path, mode, targets)
            emb = np.asarray(adata.obsm[mode], dtype=np.float32)[rows]
            if mode == "transcripts" and "has_transcripts" in adata.obs:  # a zero row there: no input, no embedding
                emb[~adata.obs["has_transcripts"].to_numpy(dtype=bool)[rows]] = np.nan
            per_mode[mode].append(emb)
        obs.append(adata.obs.iloc[rows])
    return {m: np.concatenate(v) for m, v in per_mode.items()}, pd.concat(obs)


def read_labels(path: Path, column: str) -> dict[str, str]:
    """tile key → label from a CSV with a ``key`` column (the tile key, the h5ad's obs index) and ``column``."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    for col in ("key", column):
        if col not in table.columns:
            raise ValueError(f"{path}: no {col!r} column (columns: {list(table.columns)}); expected key,{column}")
    return {k: v for k, v in zip(table["key"], table[column], strict=True) if v != ""}


def protocol_header(n_targets: int, folds_desc: str, modes: Sequence[str], source: str) -> str:
    text = (
        f"HEST-Bench protocol on {source}: {n_targets} target genes, log1p; {folds_desc}; "
        "StandardScaler → PCA(256) → Ridge(α = 100/(PCs·genes), no intercept), fitted on train; "
        "Pearson per gene on test, mean over genes then folds (± sd over folds)."
    )
    if set(modes) & set(TRANSCRIPT_MODES):
        text += " transcripts/fused: the target genes were removed from the transcript input before embedding."
    return text


def folds_description(folds: list[hestbench.Fold], patients: np.ndarray) -> str:
    n_patients = np.unique(patients).size
    kind = "leave-one-patient-out" if n_patients <= hestbench.MAX_LOPO_PATIENTS else "GroupKFold by patient"
    return f"{kind}, {len(folds)} folds over {n_patients} patients"


def run_probes(
    X: Mapping[tuple[str, str], np.ndarray],
    Y: np.ndarray,
    targets: Sequence[str],
    patients: np.ndarray,
    folds: list[hestbench.Fold],
    label_values: np.ndarray | None,
    latent_dim: int,
    seed: int,
    progress: bool,
    nan_policy: str = "hest",
):
    """Every model × mode through the regression (and the label probe when labels are given)."""
    from tqdm import tqdm

    regression, labels = {}, {}
    for key in tqdm(list(X), desc="probe", unit="model×mode", disable=not progress):
        regression[key] = hestbench.regression_probe(
            X[key], Y, targets, patients, folds, latent_dim, seed, nan_policy=nan_policy
        )
        if label_values is not None:
            has = label_values != ""
            pos = np.full(has.size, -1)
            pos[has] = np.arange(has.sum())
            sub = [(pos[tr][has[tr]], pos[te][has[te]]) for tr, te in folds]
            sub = [(tr, te) for tr, te in sub if tr.size and te.size]
            labels[key] = hestbench.classification_probe(X[key][has], label_values[has], patients[has], sub, seed)
    return regression, labels


def _require_two_patients(shards, expr: Mapping[str, Any], patients: np.ndarray) -> None:
    """Every fold leaves patients out: one patient cannot be evaluated; said before anything is embedded."""
    if np.unique(patients).size >= 2:
        return
    found = ", ".join(f"{s} (patient {e.patient})" for s, e in expr.items()) or "none"
    raise ValueError(
        f"{shards}: the evaluation needs tiles with transcripts from at least 2 patients (every fold leaves "
        f"patients out), found {np.unique(patients).size}: {found}. Give each sample its `patient:` in the "
        "cohort (a sample without one counts as its own), or add samples of another patient"
    )


def evaluate(
    shards: str | Path,
    models: Mapping[str, Any] | None = None,
    modes: Sequence[str] = ("image",),
    out: str | Path | None = None,
    *,
    embeddings: Mapping[str, str | Path] | None = None,
    samples: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    n_targets: int = 50,
    min_frac: float = 0.10,
    label: str | None = None,
    labels: str | Path | None = None,
    gene_groups: Mapping[str, Sequence[str]] | None = None,
    batch_size: int = 64,
    device: str = "auto",
    latent_dim: int = hestbench.LATENT_DIM,
    seed: int = hestbench.SEED,
    progress: bool = True,
    show: bool = True,
    nan_policy: str = "hest",
) -> pd.DataFrame:
    """Run the protocol on a shard set for each model (name → LoadedModel or source for ``load_model``)
    and/or precomputed embedding folders (name → folder of ``<sample>.h5ad``), for each mode.

    Returns the table (one row per model × mode); ``table.attrs["results"]`` holds every per-gene,
    per-fold number (also written to ``out``/results.json with results.csv and pearson.png).
    ``label``: an obs column of the embeddings, or the column of the ``labels`` CSV (default "label").
    ``gene_groups``: name → genes, reported as per-group means over the targets they contain.
    """
    modes, names = _checked_request(modes, models, embeddings)
    started = time.monotonic()
    expr = tile_expression(shards, samples, progress=progress)
    targets = select_target_genes(expr, n_targets, min_frac) if targets is None else list(dict.fromkeys(targets))
    sample_ids = list(expr)
    keys = {s: expr[s].keys for s in sample_ids}
    Y = np.concatenate([target_matrix(expr[s], targets) for s in sample_ids])  # (tiles, targets)
    patients = np.concatenate([[expr[s].patient] * len(keys[s]) for s in sample_ids])
    _require_two_patients(shards, expr, patients)  # before any embedding
    log.info(
        "%d samples, %d tiles with transcripts, %d patients, %d targets",
        len(sample_ids),
        Y.shape[0],
        np.unique(patients).size,
        len(targets),
    )
    folders: dict[str, Path] = {n: Path(f) for n, f in (embeddings or {}).items()}
    with tempfile.TemporaryDirectory(prefix="histotx-eval-") as tmp:
        if models:
            root = Path(out) / "embeddings" if out is not None else Path(tmp)
            folders.update(
                _embed_models(models, shards, root, modes, sample_ids, targets, batch_size, device, progress)
            )
        X, obs = _read_all(folders, names, sample_ids, keys, modes, targets)
    finite = _finite_rows(X, keys, sample_ids)
    X = {k: v[finite] for k, v in X.items()}
    Y, patients = Y[finite], patients[finite]
    all_keys = np.concatenate([keys[s] for s in sample_ids])[finite]
    label_values = _label_values(label, labels, obs, all_keys, finite)

    folds = hestbench.patient_folds(patients)
    regression, label_res = run_probes(
        X, Y, targets, patients, folds, label_values, latent_dim, seed, progress, nan_policy
    )
    table = report.build_table(regression, label_res, gene_groups, int(Y.shape[0]))
    header = protocol_header(len(targets), folds_description(folds, patients), modes, f"the shard set {shards}")
    results = {
        "protocol": header,
        "shards": str(shards),
        "targets": list(targets),
        "modes": modes,
        "gene_groups": {g: [x for x in genes if x in set(targets)] for g, genes in (gene_groups or {}).items()},
        "n_tiles": int(Y.shape[0]),
        "n_tiles_left_out": int((~finite).sum()),
        "patients": sorted(map(str, np.unique(patients))),
        "label": (label or "label") if label_values is not None else None,
        "settings": {
            "latent_dim": latent_dim,
            "seed": seed,
            "min_frac": min_frac,
            "ridge_solver": "lsqr",
            "nan_policy": nan_policy,
        },
        "deviations": sorted({d for r in regression.values() for d in r.deviations}),
        "runs": _runs(regression, label_res, folders),
        "seconds": time.monotonic() - started,
    }
    return report.publish(table, results, header, out, show)


def _runs(regression: Mapping, label_res: Mapping, folders: Mapping[str, Path]) -> list[dict[str, Any]]:
    """Every model × mode's numbers for results.json: its embeddings, regression and label probe."""
    return [
        {
            "model": m,
            "mode": mode,
            "embeddings": str(folders[m]),
            "regression": regression[(m, mode)].to_json(),
            "label_probe": label_res[(m, mode)].to_json() if (m, mode) in label_res else None,
        }
        for (m, mode) in regression
    ]


def _checked_request(
    modes: Sequence[str], models: Mapping[str, Any] | None, embeddings: Mapping[str, str | Path] | None
) -> tuple[list[str], list[str]]:
    """The modes (once each) and the row names (models, then embedding folders); a ValueError if unusable."""
    modes = list(dict.fromkeys(modes))
    if not modes or set(modes) - set(MODES):
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {modes}")
    if not models and not embeddings:
        raise ValueError("give at least one model (name=source) or one embedding folder (name=folder)")
    names = list(models or {}) + list(embeddings or {})
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    return modes, names


def _embed_models(
    models: Mapping[str, Any],
    shards: str | Path,
    root: Path,
    modes: Sequence[str],
    samples: Sequence[str],
    targets: Sequence[str],
    batch_size: int,
    device: str,
    progress: bool,
) -> dict[str, Path]:
    """Each model's embeddings of the samples in ``root/<name>``, the target genes dropped from the input."""
    from histotx.eval.embed import embed_shards

    folders = {}
    for name, model in models.items():
        folders[name] = root / name
        embed_shards(
            model,
            shards,
            folders[name],
            modes=modes,
            samples=samples,
            drop_genes=targets,
            batch_size=batch_size,
            device=device,
            progress=progress,
        )
    return folders


def _read_all(
    folders: Mapping[str, Path],
    names: Sequence[str],
    samples: Sequence[str],
    keys: Mapping[str, list[str]],
    modes: Sequence[str],
    targets: Sequence[str],
) -> tuple[dict[tuple[str, str], np.ndarray], pd.DataFrame]:
    """(name, mode) → embeddings (tiles, D) of every row, and the first folder's obs."""
    X, obs = {}, None
    for name in names:
        per_mode, model_obs = read_embeddings(folders[name], samples, keys, modes, targets)
        obs = model_obs if obs is None else obs
        X.update({(name, m): per_mode[m] for m in modes})
    return X, obs


def _finite_rows(
    X: Mapping[tuple[str, str], np.ndarray], keys: Mapping[str, list[str]], samples: Sequence[str]
) -> np.ndarray:
    """(tiles,) bool: the tiles every model × mode embedded (a warning counts the others per sample)."""
    finite = np.all([np.isfinite(x).all(axis=1) for x in X.values()], axis=0)
    if not finite.all():
        sample_of = np.concatenate([[s] * len(keys[s]) for s in samples])
        lost = pd.Series(sample_of[~finite]).value_counts().sort_index()
        log.warning(
            "%d of %d tiles have no embedding in some model × mode (no transcript token left once the "
            "targets are dropped: %s); they are left out of every row so all rows see the same tiles",
            (~finite).sum(),
            finite.size,
            ", ".join(f"{s} {n}/{len(keys[s])}" for s, n in lost.items()),
        )
    return finite


def _label_values(
    label: str | None, labels: str | Path | None, obs: pd.DataFrame, keys: np.ndarray, finite: np.ndarray
) -> np.ndarray | None:
    """The evaluated tiles' labels ("" where none) from the labels CSV or the obs column, or None."""
    if not (label or labels):
        return None
    column = label or "label"
    if labels is not None:
        mapping = read_labels(Path(labels), column)
        values = np.array([mapping.get(k, "") for k in keys], dtype=object)
    elif column in obs.columns:
        values = obs[column].astype(str).to_numpy()[finite]
    else:
        raise ValueError(
            f"label column {column!r} is not in the embeddings' obs ({list(obs.columns)}); give a CSV with --labels"
        )
    if not (values != "").any():
        raise ValueError(f"no evaluated tile has a {column!r} label")
    return values
