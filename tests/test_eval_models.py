"""`histotx eval` with a model: embedded through histotx.eval.embed with the targets dropped; a HEST-Benchmark
task embedded with the model's image mode."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from test_eval_run import GENES, SAMPLES, _cohort, _hest_task

from histotx.eval import hestbench, hestlayout
from histotx.eval.run import evaluate


def _tiny_model():
    import torch

    from histotx.export import LoadedModel
    from histotx.model.fused import FusedViT, FusedViTConfig

    torch.manual_seed(0)
    net = FusedViT(FusedViTConfig(size="tiny", img_size=32, patch_size=8, vocab_size=len(GENES))).eval()
    return LoadedModel(net, list(GENES), 0.5, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "tiny-random")


def test_models_are_embedded_with_targets_dropped(tmp_path):
    shards = _cohort(tmp_path, n_tiles=8)
    out = tmp_path / "out"
    table = evaluate(
        shards,
        {"tiny": _tiny_model()},
        ["image", "transcripts", "fused"],
        out,
        n_targets=3,
        batch_size=16,
        device="cpu",
        show=False,
        progress=False,
    )
    assert table["mode"].tolist() == ["image", "transcripts", "fused"]
    targets = table.attrs["results"]["targets"]
    for sid in SAMPLES:
        adata = ad.read_h5ad(out / "embeddings" / "tiny" / f"{sid}.h5ad")
        assert set(targets) <= set(adata.uns["dropped_genes"])
    assert (out / "results.csv").is_file() and (out / "pearson.png").is_file()


def test_hest_task_evaluated_with_a_model_and_with_embeddings(tmp_path):
    root = _hest_task(tmp_path / "IDC")
    out = tmp_path / "out"
    table = hestlayout.evaluate_hest_task(
        root, {"tiny": _tiny_model()}, out, batch_size=8, device="cpu", show=False, progress=False
    )
    assert table[["model", "mode", "n_folds", "n_genes", "n_tiles"]].values.tolist() == [["tiny", "image", 2, 4, 80]]
    for name in ("results.csv", "pearson.png", "results.json"):
        assert (out / name).is_file()
    # the written embeddings, evaluated as precomputed ones, give the same numbers; and the numbers are
    # the protocol's on the splits assembled by hand
    again = hestlayout.evaluate_hest_task(
        root, embeddings={"tiny": out / "embeddings" / "tiny"}, show=False, progress=False
    )
    assert again.loc[0, "pearson_mean"] == table.loc[0, "pearson_mean"]
    task = hestlayout.read_task(root)
    emb = {s: ad.read_h5ad(out / "embeddings" / "tiny" / f"{s}.h5ad").obsm["image"] for s in task.samples}
    ys = {
        s: hestlayout.read_targets(task.expression[s], task.genes, hestlayout.read_barcodes(task.patches[s]))
        for s in task.samples
    }
    fold_means = []
    for train, test in task.splits:
        pred, _ = hestbench.fit_predict(
            np.concatenate([emb[s] for s in train]),
            np.concatenate([ys[s] for s in train]),
            np.concatenate([emb[s] for s in test]),
        )
        r = hestbench.pearson_per_gene(np.concatenate([ys[s] for s in test]), pred)
        fold_means.append(np.nanmean(r))
    assert table.loc[0, "pearson_mean"] == pytest.approx(np.mean(fold_means), abs=1e-12)


def test_hest_bench_folder_runs_every_task_and_averages(tmp_path):
    root = tmp_path / "bench_data"
    _hest_task(root / "IDC")
    _hest_task(root / "PRAD", genes=("B", "C", "D"))
    (root / "README.md").write_text("not a task")
    out = tmp_path / "out"
    table = hestlayout.evaluate_hest_bench(
        root, {"tiny": _tiny_model()}, out, batch_size=8, device="cpu", show=False, progress=False
    )
    assert table[["task", "model", "n_genes"]].values.tolist() == [
        ["IDC", "tiny", 4],
        ["PRAD", "tiny", 3],
        ["average", "tiny", 4],
    ]
    per_task = table["pearson_mean"][:2].to_numpy()
    assert table.loc[2, "pearson_mean"] == pytest.approx(per_task.mean(), abs=1e-12)
    assert table.loc[2, "pearson_sd"] == pytest.approx(per_task.std(), abs=1e-12)
    for path in ("results.csv", "pearson.png", "results.json", "IDC/results.json", "PRAD/results.json"):
        assert (out / path).is_file()
