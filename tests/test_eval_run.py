"""`histotx eval` end to end: the leakage guard, the table, CSV/PNG/JSON, the label probe, gene groups,
HEST-Benchmark's own task layout, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from test_eval_targets import grid_from_sites, write_shards

from histotx.eval import hestbench, hestlayout
from histotx.eval.run import LeakageError, evaluate
from histotx.eval.targets import select_target_genes, target_matrix, tile_expression

GENES = [f"G{i}" for i in range(8)]
SAMPLES = {"s1": "P1", "s2": "P2", "s3": "P3"}


def _cohort(tmp_path: Path, n_tiles: int = 16) -> Path:
    """Three samples (three patients), tiles of two spots with Poisson counts that vary by tile."""
    rng = np.random.default_rng(0)
    tiles = {}
    for sid in SAMPLES:
        grids = []
        for _ in range(n_tiles):
            level = rng.uniform(0.5, 6.0, len(GENES))
            grids.append(
                grid_from_sites([{g: float(c) for g, c in enumerate(rng.poisson(level)) if c > 0} for _ in range(2)])
            )
        tiles[sid] = grids
    return write_shards(tmp_path / "shards", tiles, SAMPLES, genes=GENES)


def _write_embeddings(
    folder: Path,
    shards: Path,
    targets: list[str],
    dropped: list[str],
    modes=("image", "fused"),
    dim: int = 12,
    seed: int = 1,
) -> Path:
    """Embeddings that carry the targets linearly plus noise, one h5ad per sample as `histotx embed` writes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    proj = rng.normal(size=(len(targets), dim))
    for sid, entry in tile_expression(shards).items():
        Y = target_matrix(entry, targets)
        obs = pd.DataFrame(
            {"sample": sid, "patient": SAMPLES[sid], "region": np.where(Y[:, 0] > np.median(Y[:, 0]), "high", "low")},
            index=pd.Index(entry.keys, dtype=str),
        )
        adata = ad.AnnData(obs=obs)
        for i, mode in enumerate(modes):
            adata.obsm[mode] = (Y @ proj + rng.normal(scale=0.5 + i, size=(len(Y), dim))).astype(np.float32)
        adata.uns.update(
            {
                "model": "hand-made",
                "modes": np.array(modes, dtype=object),
                "dropped_genes": np.array(sorted(dropped), dtype=object),
                "embedding": "cls",
            }
        )
        adata.write_h5ad(folder / f"{sid}.h5ad")
    return folder


def test_leakage_guard_refuses_embeddings_with_target_genes(tmp_path):
    shards = _cohort(tmp_path)
    targets = select_target_genes(tile_expression(shards), n=4)
    leaky = _write_embeddings(tmp_path / "leaky", shards, targets, dropped=targets[:3])  # one target kept
    with pytest.raises(LeakageError, match=r"s1\.h5ad.*'fused'.*1 of 4"):
        evaluate(shards, embeddings={"m": leaky}, modes=["image", "fused"], n_targets=4, show=False, progress=False)
    # image mode never sees transcripts: no guard needed
    table = evaluate(shards, embeddings={"m": leaky}, modes=["image"], n_targets=4, show=False, progress=False)
    assert table["mode"].tolist() == ["image"]


def test_table_csv_png_json_label_probe_and_gene_groups(tmp_path):
    shards = _cohort(tmp_path)
    targets = select_target_genes(tile_expression(shards), n=6)
    emb = _write_embeddings(tmp_path / "emb", shards, targets, dropped=targets + ["G7"])
    emb2 = _write_embeddings(tmp_path / "emb2", shards, targets, dropped=targets, seed=2)
    labels = tmp_path / "labels.csv"
    expr = tile_expression(shards)
    keys = [k for e in expr.values() for k in e.keys]
    pd.DataFrame({"key": keys, "region": ["a", "b"] * (len(keys) // 2)}).to_csv(labels, index=False)
    groups = {"first": targets[:2], "rest": targets[2:] + ["NOT_A_TARGET"]}
    out = tmp_path / "out"
    table = evaluate(
        shards,
        embeddings={"one": emb, "two": emb2},
        modes=["image", "fused"],
        out=out,
        n_targets=6,
        labels=labels,
        label="region",
        gene_groups=groups,
        show=False,
        progress=False,
    )
    assert list(zip(table["model"], table["mode"], strict=True)) == [
        ("one", "image"),
        ("one", "fused"),
        ("two", "image"),
        ("two", "fused"),
    ]
    assert set(table["n_folds"]) == {3} and set(table["n_tiles"]) == {48} and set(table["n_genes"]) == {6}
    assert (table["pearson_mean"] > 0.3).all()  # the embeddings carry the targets
    assert {"pearson_first_mean", "pearson_rest_sd", "label_bal_acc_mean"} <= set(table.columns)
    # the CSV is the table; the JSON holds every per-gene, per-fold number and reproduces the table
    csv = pd.read_csv(out / "results.csv")
    np.testing.assert_allclose(csv["pearson_mean"], table["pearson_mean"], rtol=1e-5)
    doc = json.loads((out / "results.json").read_text())
    assert doc["targets"] == targets and doc["patients"] == ["P1", "P2", "P3"]
    assert "removed from the transcript input" in doc["protocol"]
    for run, (_, row) in zip(doc["runs"], table.iterrows(), strict=True):
        folds = run["regression"]["folds"]
        assert [f["test_patients"] for f in folds] == [["P1"], ["P2"], ["P3"]]
        per_fold = [np.mean([f["pearson"][g] for g in targets]) for f in folds]
        assert np.mean(per_fold) == pytest.approx(row["pearson_mean"], abs=1e-12)
        first = np.mean([np.mean([f["pearson"][g] for g in targets[:2]]) for f in folds])
        assert first == pytest.approx(row["pearson_first_mean"], abs=1e-12)
        assert len(run["label_probe"]["balanced_accuracy"]) == 3
    assert doc["gene_groups"]["rest"] == targets[2:]
    assert (out / "pearson.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same numbers straight from the protocol: the flow adds nothing to them
    X, Y, patients = [], [], []
    for sid, entry in expr.items():
        a = ad.read_h5ad(emb / f"{sid}.h5ad")
        X.append(a[entry.keys].obsm["fused"])
        Y.append(target_matrix(entry, targets))
        patients += [SAMPLES[sid]] * len(entry.keys)
    direct = hestbench.regression_probe(np.concatenate(X), np.concatenate(Y), targets, patients)
    assert direct.mean == pytest.approx(table.loc[1, "pearson_mean"], abs=1e-12)


def test_tiles_without_an_embedding_leave_every_row(tmp_path):
    """A tile whose transcript input is empty once the targets are dropped has a NaN embedding in that mode;
    it is left out of every model × mode so all rows are computed on the same tiles."""
    shards = _cohort(tmp_path)
    targets = select_target_genes(tile_expression(shards), n=4)
    emb = _write_embeddings(tmp_path / "emb", shards, targets, dropped=targets)
    adata = ad.read_h5ad(emb / "s2.h5ad")
    adata.obsm["fused"][:3] = np.nan
    adata.write_h5ad(emb / "s2.h5ad")
    table = evaluate(shards, embeddings={"m": emb}, modes=["image", "fused"], n_targets=4, show=False, progress=False)
    assert table["n_tiles"].tolist() == [45, 45]
    assert table.attrs["results"]["n_tiles_left_out"] == 3


def test_label_from_obs_column(tmp_path):
    shards = _cohort(tmp_path)
    targets = select_target_genes(tile_expression(shards), n=4)
    emb = _write_embeddings(tmp_path / "emb", shards, targets, dropped=targets, modes=("image",))
    table = evaluate(shards, embeddings={"m": emb}, n_targets=4, label="region", show=False, progress=False)
    assert table.loc[0, "label_bal_acc_mean"] > 0.6  # region = a target's median split, carried by X
    with pytest.raises(ValueError, match="not in the embeddings' obs"):
        evaluate(shards, embeddings={"m": emb}, n_targets=4, label="nope", show=False, progress=False)


# ---------------------------------------------------------------- HEST-Benchmark's own layout


def _hest_task(root: Path, n_spots: int = 20, genes=("A", "B", "C", "D")) -> Path:
    """A task folder as HEST-Benchmark ships one: 4 samples, 2 splits; adata with more genes and spots in
    another order than the patch file, barcodes (N, 1) bytes, raw counts."""
    rng = np.random.default_rng(3)
    for sub in ("splits", "patches", "adata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    all_genes = list(genes) + ["EXTRA1", "EXTRA2"]
    for sid in ("S1", "S2", "S3", "S4"):
        barcodes = [f"{sid}_{i:03d}x{i:03d}" for i in range(n_spots)]
        counts = rng.poisson(rng.uniform(1, 8, (n_spots, 1)) * rng.uniform(0.5, 2, len(all_genes)))
        order = rng.permutation(n_spots)  # adata rows in another order than the patches
        adata = ad.AnnData(
            X=counts[order].astype(np.float32),
            obs=pd.DataFrame(index=pd.Index([barcodes[i] for i in order], dtype=str)),
            var=pd.DataFrame(index=pd.Index(all_genes, dtype=str)),
        )
        adata.write_h5ad(root / "adata" / f"{sid}.h5ad")
        brightness = (counts[:, 0] / counts[:, 0].max() * 200).astype(np.uint8)
        img = np.broadcast_to(brightness[:, None, None, None], (n_spots, 32, 32, 3)).copy()
        img = (img + rng.integers(0, 30, img.shape)).astype(np.uint8)
        with h5py.File(root / "patches" / f"{sid}.h5", "w") as f:
            f["img"] = img
            f["coords"] = rng.integers(0, 5000, (n_spots, 2))
            f["barcode"] = np.array([[b.encode()] for b in barcodes])
    for i, (train, test) in enumerate([(["S1", "S2"], ["S3", "S4"]), (["S3", "S4"], ["S1", "S2"])]):
        for kind, ids in (("train", train), ("test", test)):
            pd.DataFrame(
                {
                    "sample_id": ids,
                    "patches_path": [f"patches/{s}.h5" for s in ids],
                    "expr_path": [f"adata/{s}.h5ad" for s in ids],
                }
            ).to_csv(root / "splits" / f"{kind}_{i}.csv", index=False)
    (root / "var_50genes.json").write_text(json.dumps({"genes": list(genes)}))
    return root


def test_hest_layout_read(tmp_path):
    root = _hest_task(tmp_path / "IDC")
    task = hestlayout.read_task(root)
    assert task.genes == ["A", "B", "C", "D"] and task.splits == [
        (["S1", "S2"], ["S3", "S4"]),
        (["S3", "S4"], ["S1", "S2"]),
    ]
    barcodes = hestlayout.read_barcodes(task.patches["S2"])
    assert barcodes[:2] == ["S2_000x000", "S2_001x001"]
    Y = hestlayout.read_targets(task.expression["S2"], ["C", "A"], barcodes)
    adata = ad.read_h5ad(task.expression["S2"])
    np.testing.assert_array_equal(Y, np.log1p(adata[barcodes, ["C", "A"]].X.astype(np.float64)))
    (root / "splits" / "test_1.csv").unlink()
    with pytest.raises(FileNotFoundError, match="test_1.csv"):
        hestlayout.read_task(root)


def test_cli_eval(tmp_path, capsys):
    from histotx.cli import main

    shards = _cohort(tmp_path)
    targets = select_target_genes(tile_expression(shards), n=5)
    emb = _write_embeddings(tmp_path / "emb", shards, targets, dropped=targets)
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"g": targets[:2]}))
    out = tmp_path / "out"
    rc = main(
        [
            "eval",
            "--shards",
            str(shards),
            "--embeddings",
            f"mine={emb}",
            "--modes",
            "image,fused",
            "--targets",
            "5",
            "--gene-groups",
            str(groups),
            "--label",
            "region",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "HEST-Bench protocol" in printed and "removed from the transcript input" in printed
    assert pd.read_csv(out / "results.csv")["mode"].tolist() == ["image", "fused"]
    assert main(["eval", "--shards", str(shards), "--embeddings", "nonsense", "--out", str(out)]) == 2
