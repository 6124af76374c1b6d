"""HEST-Benchmark's own task folders, evaluated as HEST-Bench evaluates them (numbers comparable with its table).

A task (IDC, PRAD, ..., as downloaded from ``MahmoodLab/hest-bench``)::

    <TASK>/splits/train_0.csv, test_0.csv, ...   columns sample_id, patches_path, expr_path (relative to <TASK>)
    <TASK>/patches/<id>.h5                       img (N, 224, 224, 3) uint8, coords (N, 2), barcode (N, 1) bytes
    <TASK>/adata/<id>.h5ad                       raw counts, obs index = spot barcodes
    <TASK>/var_50genes.json                      {"genes": [...]}: the task's 50 target genes

Each split i is one fold (its own train/test samples; HEST made them patient-stratified). Each patch is
embedded once per model with the model's image mode, as a shard tile is by ``histotx embed`` (the whole
patch resized to the model's input size, the model's mean/std); targets are log1p of the task's h5ad
counts at the patches' barcodes for the task's genes; then :mod:`.hestbench`. HEST-Bench's patches are
224 px at 0.5 µm/px: a model trained at another µm/px gets a warning, as in ``histotx embed``.

A folder of tasks (HEST-Bench's ``bench_data``) runs every task and adds, per model, the mean over tasks,
HEST-Bench's headline number (:func:`evaluate_hest_bench`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from histotx.eval import hestbench, report

log = logging.getLogger(__name__)

GENES_FILE = "var_50genes.json"
PATCH_MPP = 0.5  # HEST-Bench patching: 224 px at 0.5 µm/px (112 µm)


@dataclass
class HestTask:
    root: Path
    genes: list[str]
    splits: list[tuple[list[str], list[str]]]  # (train sample ids, test sample ids) per fold
    patches: dict[str, Path]
    expression: dict[str, Path]

    @property
    def samples(self) -> list[str]:
        return list(self.patches)


def read_task(task_dir: str | Path, genes_file: str = GENES_FILE) -> HestTask:
    """Read a task folder's splits and gene list; every listed file must exist."""
    root = Path(task_dir)
    split_dir = root / "splits"
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir}: not a HEST-Benchmark task folder (no splits/)")
    genes_path = root / genes_file
    if not genes_path.is_file():
        raise FileNotFoundError(f"{genes_path}: the task's gene list is missing")
    try:
        genes = json.loads(genes_path.read_text())["genes"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f'{genes_path}: expected {{"genes": [...]}} ({exc})') from exc
    splits, patches, expression = [], {}, {}
    i = 0
    while (split_dir / f"train_{i}.csv").is_file():
        train, test = (
            _read_split(root, split_dir / f"{kind}_{i}.csv", patches, expression) for kind in ("train", "test")
        )
        if set(train) & set(test):
            raise ValueError(f"{split_dir}: split {i} has samples in both train and test: {set(train) & set(test)}")
        splits.append((train, test))
        i += 1
    if not splits:
        raise FileNotFoundError(f"{split_dir}: no train_0.csv / test_0.csv")
    return HestTask(root, [str(g) for g in genes], splits, patches, expression)


def _read_split(root: Path, path: Path, patches: dict[str, Path], expression: dict[str, Path]) -> list[str]:
    """The sample ids of one split file; each sample's patch and expression files go into ``patches`` and
    ``expression`` (paths relative to the task folder ``root``, which must exist)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing ({path.name.replace('test_', 'train_')} exists)")
    table = pd.read_csv(path, dtype=str)
    need = {"sample_id", "patches_path", "expr_path"}
    if need - set(table.columns):
        raise ValueError(f"{path}: needs columns {sorted(need)}, has {list(table.columns)}")
    for sid, pp, ep in zip(table["sample_id"], table["patches_path"], table["expr_path"], strict=True):
        for kind_path, where in ((root / pp, patches), (root / ep, expression)):
            if not kind_path.is_file():
                raise FileNotFoundError(f"{kind_path}: listed in {path} but missing")
            where[sid] = kind_path
    return table["sample_id"].tolist()


def read_barcodes(h5_path: Path) -> list[str]:
    import h5py

    with h5py.File(h5_path, "r") as f:
        key = "barcode" if "barcode" in f else "barcodes"
        if key not in f or "img" not in f:
            raise ValueError(f"{h5_path}: a HEST patch file needs 'img' and 'barcode' datasets, has {list(f)}")
        raw = np.asarray(f[key]).reshape(len(f["img"]), -1)[:, 0]
    return [b.decode() if isinstance(b, bytes) else str(b) for b in raw]


def read_targets(expr_path: Path, genes: Sequence[str], barcodes: Sequence[str]) -> np.ndarray:
    """log1p(count) (float64, rows = ``barcodes``, columns = ``genes``), as HEST-Bench's ``load_adata``."""
    import anndata as ad
    import scipy.sparse as sp

    adata = ad.read_h5ad(expr_path)
    rows = pd.Index(adata.obs_names.astype(str)).get_indexer(list(barcodes))
    cols = pd.Index(adata.var_names.astype(str)).get_indexer(list(genes))
    if (rows < 0).any():
        raise ValueError(
            f"{expr_path}: {(rows < 0).sum()} patch barcodes are not in its obs "
            f"(e.g. {[b for b, r in zip(barcodes, rows, strict=True) if r < 0][:3]})"
        )
    if (cols < 0).any():
        raise ValueError(
            f"{expr_path}: target genes not in its var: {[g for g, c in zip(genes, cols, strict=True) if c < 0][:5]}"
        )
    X = adata.X[rows][:, cols]
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    return np.log1p(X.astype(np.float64))


def embed_patches(loaded, h5_path: Path, batch_size: int = 64, device=None, progress: bool = False) -> np.ndarray:
    """CLS embeddings (N, D) float32 of a patch file's images, image mode."""
    import h5py
    import torch
    from tqdm import tqdm

    from histotx.data.views import CropGeometry
    from histotx.eval.embed import embed_batch

    net = loaded.model
    mean = torch.tensor(loaded.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std, dtype=torch.float32).view(1, 3, 1, 1)
    out = []
    with h5py.File(h5_path, "r") as f:
        img = f["img"]
        if img.ndim != 4 or img.shape[-1] != 3:
            raise ValueError(f"{h5_path}: img must be (N, H, W, 3), is {img.shape}")
        geometry = CropGeometry(0, 0, img.shape[2], img.shape[1], int(loaded.image_size))
        for start in tqdm(range(0, img.shape[0], batch_size), desc=h5_path.stem, unit="batch", disable=not progress):
            pixels = torch.from_numpy(np.ascontiguousarray(img[start : start + batch_size], dtype=np.uint8))
            images = geometry.apply_to_image(pixels.permute(0, 3, 1, 2)).float().div_(255.0)
            out.append(embed_batch(net, (images - mean) / std, None, ("image",), device)["image"])
    return np.concatenate(out) if out else np.zeros((0, net.config.embed_dim), np.float32)


def _write_embeddings(path: Path, barcodes: list[str], emb: np.ndarray, name: str) -> None:
    import anndata as ad

    from histotx.eval.embed import write_h5ad_atomic

    adata = ad.AnnData(obs=pd.DataFrame(index=pd.Index(barcodes, dtype=str)))
    adata.obsm["image"] = emb
    adata.uns.update(
        {
            "model": name,
            "modes": np.array(["image"], dtype=object),
            "dropped_genes": np.array([], dtype=object),
            "embedding": "cls",
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_h5ad_atomic(adata, path)


def _read_embeddings(path: Path, barcodes: list[str]) -> np.ndarray:
    import anndata as ad

    adata = ad.read_h5ad(path)
    rows = pd.Index(adata.obs_names.astype(str)).get_indexer(barcodes)
    if (rows < 0).any() or "image" not in adata.obsm:
        raise ValueError(f"{path}: needs obsm['image'] and a row for every patch barcode")
    return np.asarray(adata.obsm["image"])[rows]


def evaluate_hest_task(
    task_dir: str | Path,
    models: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    *,
    embeddings: Mapping[str, str | Path] | None = None,
    gene_groups: Mapping[str, Sequence[str]] | None = None,
    batch_size: int = 64,
    device: str = "auto",
    latent_dim: int = hestbench.LATENT_DIM,
    seed: int = hestbench.SEED,
    progress: bool = True,
    show: bool = True,
    nan_policy: str = "hest",
) -> pd.DataFrame:
    """HEST-Bench on one task folder for each model (name → LoadedModel or load_model source) and/or
    precomputed embedding folder (name → folder of ``<sample_id>.h5ad`` with obsm["image"], obs = barcodes)."""
    if not models and not embeddings:
        raise ValueError("give at least one model (name=source) or one embedding folder (name=folder)")
    started = time.monotonic()
    task = read_task(task_dir)
    samples = task.samples
    barcodes = {s: read_barcodes(task.patches[s]) for s in samples}
    Y = {s: read_targets(task.expression[s], task.genes, barcodes[s]) for s in samples}
    folders = {n: Path(f) for n, f in (embeddings or {}).items()}
    X: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    if models:
        from histotx.eval.embed import resolve_device, resolve_model

        dev = resolve_device(device)
        for name, model in models.items():
            loaded = resolve_model(model, dev)
            if loaded.mpp and math.isfinite(loaded.mpp) and abs(loaded.mpp - PATCH_MPP) > 0.05 * loaded.mpp:
                log.warning(
                    "%s was trained on tiles at %.4g µm/px; HEST-Bench patches are at %.4g µm/px",
                    name,
                    loaded.mpp,
                    PATCH_MPP,
                )
            per_sample = {}
            for s in samples:
                per_sample[s] = embed_patches(loaded, task.patches[s], batch_size, dev, progress)
                if out is not None:
                    _write_embeddings(
                        Path(out) / "embeddings" / name / f"{s}.h5ad", barcodes[s], per_sample[s], loaded.name
                    )
            X[(name, "image")] = per_sample
    for name, folder in folders.items():
        X[(name, "image")] = {s: _read_embeddings(folder / f"{s}.h5ad", barcodes[s]) for s in samples}

    # all samples once, in order; fold i = split i's samples
    offsets = np.cumsum([0] + [len(barcodes[s]) for s in samples])
    rows_of = {s: np.arange(offsets[i], offsets[i + 1]) for i, s in enumerate(samples)}
    folds = [
        (np.concatenate([rows_of[s] for s in tr]), np.concatenate([rows_of[s] for s in te])) for tr, te in task.splits
    ]
    groups = np.concatenate([[s] * len(barcodes[s]) for s in samples])  # HEST's splits keep patients apart
    Y_all = np.concatenate([Y[s] for s in samples])
    regression = {}
    for key, per_sample in X.items():
        X_all = np.concatenate([per_sample[s] for s in samples])
        regression[key] = hestbench.regression_probe(
            X_all, Y_all, task.genes, groups, folds, latent_dim, seed, nan_policy=nan_policy
        )
    table = report.build_table(regression, {}, gene_groups, int(Y_all.shape[0]))
    header = (
        f"HEST-Bench task {task.root.name}: {len(task.genes)} genes ({GENES_FILE}), log1p; the task's "
        f"{len(folds)} splits; StandardScaler → PCA(256) → Ridge(α = 100/(PCs·genes), no intercept, lsqr); "
        "Pearson per gene on test, mean over genes then splits (± sd over splits). Image mode."
    )
    results = {
        "protocol": header,
        "task": str(task.root),
        "targets": task.genes,
        "splits": [{"train": tr, "test": te} for tr, te in task.splits],
        "n_patches": {s: len(barcodes[s]) for s in samples},
        "settings": {"latent_dim": latent_dim, "seed": seed, "ridge_solver": "lsqr", "nan_policy": nan_policy},
        "deviations": sorted({d for r in regression.values() for d in r.deviations}),
        "runs": [{"model": m, "mode": mode, "regression": r.to_json()} for (m, mode), r in regression.items()],
        "seconds": time.monotonic() - started,
    }
    return report.publish(table, results, header, out, show)


def is_task(folder: str | Path) -> bool:
    return (Path(folder) / "splits").is_dir()


def evaluate_hest_bench(
    root: str | Path,
    models: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    *,
    embeddings: Mapping[str, str | Path] | None = None,
    tasks: Sequence[str] | None = None,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
    show: bool = True,
    nan_policy: str = "hest",
) -> pd.DataFrame:
    """Every task folder under ``root`` (or ``tasks``), each as :func:`evaluate_hest_task`; one table with a
    row per task × model and, per model, the mean over tasks (``task`` = "average"). ``embeddings``: name →
    a folder of precomputed embeddings per task (``<folder>/<TASK>/<sample_id>.h5ad``)."""
    from histotx.eval.embed import resolve_device, resolve_model

    root = Path(root)
    names = list(tasks) if tasks else sorted(p.name for p in root.iterdir() if is_task(p))
    if not names:
        raise FileNotFoundError(f"{root}: no HEST-Benchmark task folders (<TASK>/splits/) in it")
    dev = resolve_device(device)
    loaded = {n: resolve_model(m, dev) for n, m in (models or {}).items()}  # each model loaded once for all tasks
    parts, runs = [], {}
    for task in names:
        t = evaluate_hest_task(
            root / task,
            loaded,
            Path(out) / task if out is not None else None,
            embeddings={n: Path(f) / task for n, f in (embeddings or {}).items()},
            nan_policy=nan_policy,
            batch_size=batch_size,
            device=device,
            progress=progress,
            show=False,
        )
        parts.append(t.assign(task=task))
        runs[task] = t.attrs["results"]
    per_task = pd.concat(parts, ignore_index=True)
    by_model = per_task.groupby(["model", "mode"], sort=False)
    average = (
        by_model.agg(
            pearson_mean=("pearson_mean", "mean"),
            pearson_sd=("pearson_mean", lambda v: float(np.std(v))),
            n_folds=("n_folds", "sum"),
            n_genes=("n_genes", "max"),
            n_tiles=("n_tiles", "sum"),
            n_nan=("n_nan", "sum"),
        )
        .reset_index()
        .assign(task="average")
    )
    table = pd.concat([per_task, average], ignore_index=True)
    table = table[["task"] + [c for c in table.columns if c != "task"]]
    header = (
        f"HEST-Bench on {len(names)} tasks of {root}: per task, Pearson mean ± sd over its splits; "
        "average = mean over tasks (± sd over tasks), HEST-Bench's headline number. Image mode."
    )
    results = {
        "protocol": header,
        "root": str(root),
        "tasks": runs,
        "average": {m: float(v) for m, v in zip(average["model"], average["pearson_mean"], strict=True)},
    }
    table.attrs["results"], table.attrs["header"] = results, header
    if show:
        report.print_table(table, header)
    if out is not None:
        plot = table.assign(mode=table["task"])  # bars: one group per task
        paths = {
            "csv": report.write_csv(table, Path(out) / report.CSV_NAME),
            "png": report.plot_bars(plot, Path(out) / report.PNG_NAME, header),
            "json": report.write_json(results, Path(out) / report.JSON_NAME),
        }
        table.attrs["paths"] = {k: str(v) for k, v in paths.items()}
        if show:
            print("wrote " + ", ".join(str(p) for p in paths.values()))
    return table
