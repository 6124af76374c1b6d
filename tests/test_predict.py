"""`histotx fit` + `histotx predict`: a head fitted on synthetic slides recovers the expression planted in a
held-out slide from its H&E alone; the outputs open in scanpy and SpatialData; a foreign head is refused."""

from __future__ import annotations

import json

import anndata as ad
import matplotlib
import numpy as np
import pytest
from test_embed import tiny_model, write_export

from histotx.eval.hestbench import pearson_per_gene
from histotx.eval.targets import target_matrix, tile_expression
from histotx.predict import ExpressionHead, HeadMismatchError, MLPHead, TileSpec, fit_head, load_head
from histotx.predict.slide import slide_id
from histotx.sharding.config import ShardConfig
from histotx.vocab import Vocab

matplotlib.use("Agg")

SETTINGS = dict(mpp=2.0, tile_px=64)  # 128 µm tiles, shown to the tiny model at 32 px
RECOVERY_BAR = 0.45
"""Mean Pearson, predicted from the held-out slide's H&E alone vs measured there (Visium counts pooled per
128 µm tile, count noise included), over the synthetic tumour program's genes (the region drawn in the H&E
as dense epithelium, its genes 8× higher there) and over the genes the head trusts (fit Pearson ≥ 0.3).
Measured: 0.60 and 0.55 (KRT8 0.66, EPCAM 0.62, KRT19 0.61, CLDN4 0.58, MKI67 0.56, CDH1 0.55). A
random-init tiny ViT at 32 px per 128 µm does not see lymphocytes: the immune program is not recovered
(≤ 0.2), and the head says so (fit Pearson ≤ 0.16 for those genes). A head on shuffled rows scores ~0."""


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """4 synthetic Visium slides of 2 patients: 3 to fit on (sharded), 1 held out (its slide alone predicted;
    its shards only to measure the truth)."""
    import yaml

    from histotx.sharding.pipeline import run_cohort
    from histotx.synth import generate_cohort

    tmp = tmp_path_factory.mktemp("predict")
    path = generate_cohort(tmp / "synth", seed=3, size="small", technologies=("visium",), replicates=4, patients=2)
    samples = yaml.safe_load(path.read_text())["samples"]
    for name, part in (("fit", samples[:3]), ("held", samples[3:])):
        (path.parent / f"{name}.yaml").write_text(yaml.safe_dump({"samples": part}))  # paths relative to it
        run_cohort(path.parent / f"{name}.yaml", tmp / f"shards_{name}", ShardConfig(**SETTINGS))
    vocab = Vocab.load(tmp / "shards_fit" / "vocab.tsv")
    model = tiny_model([vocab.name(i) for i in range(len(vocab))])
    model.mpp = SETTINGS["mpp"]
    export = write_export(model, tmp / "export")
    held = samples[3]
    return {
        "tmp": tmp,
        "model": model,
        "export": export,
        "fit_shards": tmp / "shards_fit",
        "held_shards": tmp / "shards_held",
        "held_slide": path.parent / held["slide"],
        "held_sample": held["id"],
        "held_id": slide_id(path.parent / held["slide"]),  # predict names a slide's outputs by its file name
    }


@pytest.fixture(scope="module")
def head_dir(cohort):
    from histotx.cli import main

    out = cohort["tmp"] / "head"
    code = main(["fit", str(cohort["export"]), str(cohort["fit_shards"]), "--out", str(out), "--targets", "20",
                 "--no-progress"])  # fmt: skip
    assert code == 0
    return out


@pytest.fixture(scope="module")
def predicted(cohort, head_dir):
    from histotx.cli import main

    out = cohort["tmp"] / "pred"
    args = ["predict", str(cohort["held_slide"]), "--model", str(cohort["export"]), "--head", str(head_dir),
            "--out", str(out), "--format", "h5ad,spatialdata", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    return out


def test_head_on_disk(head_dir):
    meta = json.loads((head_dir / "head.json").read_text())
    assert meta["format"] == "histotx-expression-head" and len(meta["genes"]) == 20
    assert meta["tile"] == {"tile_px": 64, "mpp": 2.0, "image_px": 32}
    assert len(meta["info"]["outer_folds"]) == 2  # leave-one-patient-out over 2 patients
    head = ExpressionHead.load(head_dir)
    assert head.model_hash == meta["model"]["sha256"]
    assert not list(head_dir.glob("*.pkl")) and (head_dir / "genes.tsv").read_text().startswith("gene\theldout")
    X = np.random.default_rng(0).normal(size=(5, 32))
    W, b = head.affine()
    np.testing.assert_allclose(X @ W + b, head.predict(X), rtol=1e-10, atol=1e-10)


def _recovery(pred_dir, cohort, head):
    """(per-gene Pearson of the held-out slide's predictions vs its measured counts, tumour-program gene
    indices, trusted gene indices), checking the h5ad on the way."""
    a = ad.read_h5ad(pred_dir / f"{cohort['held_id']}.h5ad")
    assert list(a.var_names) == head.genes and a.X.dtype == np.float32
    np.testing.assert_allclose(a.var["heldout_pearson"], head.pearson)
    assert (a.X >= head.y_min.astype(np.float32) - 1e-6).all() and (a.X <= head.y_max.astype(np.float32) + 1e-6).all()
    assert (a.var["tiles_outside_training_range"] <= 0.1 * a.n_obs).all()  # a slide like the training ones
    [entry] = tile_expression(cohort["held_shards"]).values()
    names = a.obs_names.str.split("__").str[-1]  # r00003_c00007: the grid position, as in the shards' keys
    rows = names.get_indexer([k.split("__")[-1] for k in entry.keys])
    assert (rows >= 0).mean() > 0.9, "predict tiles the slide on the grid sharding uses"
    keep = rows >= 0
    truth = target_matrix(entry, head.genes)[keep]
    r = pearson_per_gene(truth, a.X[rows[keep]])
    truth_file = cohort["tmp"] / "synth" / "truth" / f"{cohort['held_sample']}.json"
    tumour = [i for i, g in enumerate(head.genes) if g in json.loads(truth_file.read_text())["programs"]["tumour"]]
    trusted = np.flatnonzero(head.pearson >= 0.3)
    print(
        f"{head.kind} head, held-out slide, {keep.sum()} tiles: mean Pearson {np.nanmean(r):.3f} over all {len(r)} "
        f"genes, {np.nanmean(r[tumour]):.3f} over the {len(tumour)} tumour-program genes, "
        f"{np.nanmean(r[trusted]):.3f} over the {trusted.size} genes the head trusts (held-out r ≥ 0.3); per gene "
        + ", ".join(f"{g} {x:.2f} (fit {h:.2f})" for g, x, h in zip(head.genes, r, head.pearson, strict=True))
    )
    return r, tumour, trusted


def test_predict_recovers_the_planted_expression(predicted, cohort, head_dir):
    head = ExpressionHead.load(head_dir)
    r, tumour, trusted = _recovery(predicted, cohort, head)
    assert len(tumour) >= 4 and np.nanmean(r[tumour]) > RECOVERY_BAR
    assert trusted.size >= 4 and np.nanmean(r[trusted]) > RECOVERY_BAR
    # the confidence shipped with each gene says which genes to trust on a new slide
    assert np.corrcoef(head.pearson, r)[0, 1] > 0.7


@pytest.fixture(scope="module")
def mlp_head_dir(cohort):
    from histotx.cli import main

    out = cohort["tmp"] / "head-mlp"
    code = main(["fit", str(cohort["export"]), str(cohort["fit_shards"]), "--out", str(out), "--targets", "20",
                 "--head", "mlp", "--no-progress"])  # fmt: skip
    assert code == 0
    return out


def test_mlp_head_recovers_the_planted_expression(mlp_head_dir, cohort, head_dir):
    """`histotx fit --head mlp`, then `histotx predict` with it: the same bar as the ridge head."""
    from histotx.cli import main

    head = load_head(mlp_head_dir)
    assert isinstance(head, MLPHead) and json.loads((mlp_head_dir / "head.json").read_text())["kind"] == "mlp"
    from histotx.predict.mlp import GRID

    assert len(head.info["outer_folds"]) == 2 and head.params in [dict(p) for p in GRID]
    out = cohort["tmp"] / "pred-mlp"
    args = ["predict", str(cohort["held_slide"]), "--model", str(cohort["export"]), "--head", str(mlp_head_dir),
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    r, tumour, trusted = _recovery(out, cohort, head)
    ridge = ExpressionHead.load(head_dir)
    print(
        f"held-out Pearson at fit, mean over genes: mlp {np.nanmean(head.pearson):.3f}, ridge "
        f"{np.nanmean(ridge.pearson):.3f}; {head.describe()}"
    )
    assert len(tumour) >= 4 and np.nanmean(r[tumour]) > RECOVERY_BAR
    assert trusted.size >= 4 and np.nanmean(r[trusted]) > RECOVERY_BAR
    assert np.corrcoef(head.pearson, r)[0, 1] > 0.7


def test_mlp_head_round_trips_and_an_unknown_kind_is_refused(mlp_head_dir, tmp_path):
    import shutil

    head = load_head(mlp_head_dir)
    X = np.random.default_rng(0).normal(size=(7, head.inp.scaler_mean.shape[0]))
    again = load_head(head.save(tmp_path / "copy"))
    np.testing.assert_array_equal(again.predict(X), head.predict(X))
    assert again.genes == head.genes and again.params == head.params and again.model_hash == head.model_hash
    np.testing.assert_array_equal(again.pearson, head.pearson)
    with pytest.raises(ValueError, match="a mlp head, not a ridge one"):
        ExpressionHead.load(mlp_head_dir)
    odd = tmp_path / "odd"
    shutil.copytree(mlp_head_dir, odd)
    meta = json.loads((odd / "head.json").read_text())
    (odd / "head.json").write_text(json.dumps({**meta, "kind": "forest"}))
    with pytest.raises(
        ValueError, match=r"head of kind 'forest', which this HistoTx does not know \(it reads ridge, mlp\)"
    ):
        load_head(odd)
    del meta["kind"]  # a head written before kinds existed: read as ridge, and its weights say otherwise
    (odd / "head.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="coef missing"):
        load_head(odd)


def test_shuffled_targets_recover_nothing(cohort, head_dir):
    """The bar means something: the same fit on rows whose targets are shuffled scores about 0."""
    import tempfile

    from histotx.eval.embed import embed_shards

    head = ExpressionHead.load(head_dir)
    expr = tile_expression(cohort["fit_shards"])
    with tempfile.TemporaryDirectory() as tmp:
        embed_shards(cohort["model"], cohort["fit_shards"], tmp, progress=False)
        X, Y, patients = [], [], []
        for sample, entry in expr.items():
            emb = ad.read_h5ad(f"{tmp}/{sample}.h5ad")
            X.append(emb[entry.keys].obsm["image"])
            Y.append(target_matrix(entry, head.genes))
            patients += [entry.patient] * len(entry.keys)
    X, Y = np.concatenate(X), np.concatenate(Y)
    Y = Y[np.random.default_rng(0).permutation(len(Y))]
    shuffled = fit_head(X, Y, head.genes, patients, model_name="m", model_hash="h", tile=TileSpec(64, 2.0, 32))
    assert abs(np.nanmean(shuffled.pearson)) < 0.15 < np.nanmean(head.pearson)


def test_h5ad_opens_in_scanpy_and_plots(predicted, cohort):
    sc = pytest.importorskip("scanpy")
    a = ad.read_h5ad(predicted / f"{cohort['held_id']}.h5ad")
    lib = a.uns["spatial"][cohort["held_id"]]
    assert set(lib["images"]) == {"hires", "lowres"} and lib["scalefactors"]["spot_diameter_fullres"] > 0
    fig = sc.pl.spatial(a, color=a.var_names[0], show=False, return_fig=True)
    assert fig is not None
    sq = pytest.importorskip("squidpy")
    sq.pl.spatial_scatter(a, color=a.var_names[:2].tolist())
    sc.pp.neighbors(a, n_neighbors=5)
    matplotlib.pyplot.close("all")


def test_spatialdata_round_trip(predicted, cohort):
    sd = pytest.importorskip("spatialdata")
    a = ad.read_h5ad(predicted / f"{cohort['held_id']}.h5ad")
    sdata = sd.read_zarr(predicted / f"{cohort['held_id']}.zarr")
    table = sdata.tables["table"]
    np.testing.assert_array_equal(table.X, a.X)
    assert list(table.obs_names) == list(a.obs_names) and list(table.var_names) == list(a.var_names)
    shapes = sdata.shapes["tiles"]
    assert len(shapes) == a.n_obs
    centres = np.stack([shapes.geometry.centroid.x, shapes.geometry.centroid.y], 1)
    np.testing.assert_allclose(centres[table.obs["instance_id"].to_numpy()], a.obsm["spatial"], atol=1e-6)
    image = sdata.images["he"]
    assert "scale0" in image and "scale1" in image  # a pyramid
    from spatialdata.transformations import Scale, get_transformation

    to_global = get_transformation(image, "global")
    assert isinstance(to_global, Scale)  # the thumbnail's px → level-0 px, the tiles' coordinate system
    hires = a.uns["spatial"][cohort["held_id"]]
    per_px = 1 / hires["scalefactors"]["tissue_hires_scalef"]
    scale = dict(zip(to_global.axes, to_global.scale, strict=True))
    assert scale["x"] == pytest.approx(per_px, rel=1e-9) and scale["y"] == pytest.approx(per_px, rel=1e-9)


def test_a_head_of_another_model_is_refused(cohort, head_dir, tmp_path):
    from histotx.cli import main
    from histotx.predict.slide import predict_slide

    other = tiny_model(cohort["model"].genes, seed=1)
    other.mpp = 2.0
    with pytest.raises(HeadMismatchError, match="fit one for this model with `histotx fit`"):
        predict_slide(cohort["held_slide"], other, head_dir, tmp_path, progress=False)
    assert not list(tmp_path.iterdir())
    export = write_export(other, tmp_path / "other")
    args = ["predict", str(cohort["held_slide"]), "--model", str(export), "--head", str(head_dir), "--out",
            str(tmp_path / "o"), "--no-progress"]  # fmt: skip
    assert main(args) == 2


def test_resume_redoes_only_missing_chunks(cohort, head_dir, tmp_path, monkeypatch):
    """A run killed after its first chunk: the next run predicts only the rest, and the result is the same."""
    import histotx.predict.slide as slide_mod

    calls = []
    real = slide_mod._save_npy

    def crash_after_one(path, array):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real(path, array)

    monkeypatch.setattr(slide_mod, "_save_npy", crash_after_one)
    kwargs = dict(progress=False, chunk_tiles=40)
    with pytest.raises(KeyboardInterrupt):
        slide_mod.predict_slide(cohort["held_slide"], cohort["model"], head_dir, tmp_path / "a", **kwargs)
    partial = next((tmp_path / "a").glob(".*.partial"))
    assert sorted(p.name for p in partial.glob("chunk*.npy")) == ["chunk000000.npy"]
    calls.clear()
    monkeypatch.setattr(slide_mod, "_save_npy", lambda p, a: (calls.append(p.name), real(p, a)))
    [path] = slide_mod.predict_slide(cohort["held_slide"], cohort["model"], head_dir, tmp_path / "a", **kwargs).values()
    assert "chunk000000.npy" not in calls and calls and not partial.exists()
    monkeypatch.setattr(slide_mod, "_save_npy", real)
    [ref] = slide_mod.predict_slide(cohort["held_slide"], cohort["model"], head_dir, tmp_path / "b", **kwargs).values()
    np.testing.assert_array_equal(ad.read_h5ad(path).X, ad.read_h5ad(ref).X)


def test_png(cohort, head_dir, tmp_path):
    from histotx.predict.slide import predict_slide

    head = ExpressionHead.load(head_dir)
    gene = head.genes[int(np.nanargmax(head.pearson))]
    written = predict_slide(cohort["held_slide"], cohort["model"], head_dir, tmp_path, png_genes=[gene], progress=False)
    png = written[f"png:{cohort['held_id']}.{gene}.png"]
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 500
    with pytest.raises(ValueError, match="not predicted by the head"):
        predict_slide(cohort["held_slide"], cohort["model"], head_dir, tmp_path, png_genes=["NOPE"], progress=False)


def test_fit_on_a_hest_task(tmp_path):
    """`histotx fit MODEL HEST_TASK`: the task's genes, each sample its own patient, the patches' size (here
    32 px; HEST-Bench's are 224) at 0.5 µm/px."""
    from test_eval_run import _hest_task

    from histotx.cli import main

    task = _hest_task(tmp_path / "IDC", n_spots=30)
    model = tiny_model(["A", "B"])
    export = write_export(model, tmp_path / "export")
    assert main(["fit", str(export), str(task), "--out", str(tmp_path / "head"), "--no-progress"]) == 0
    head = ExpressionHead.load(tmp_path / "head")
    assert head.genes == ["A", "B", "C", "D"] and head.tile == TileSpec(32, 0.5, 32)
    assert head.info["kind"] == "hest" and len(head.info["outer_folds"]) == 4  # 4 samples: leave one out
    assert np.isfinite(head.pearson).all()
    assert main(["fit", str(export), str(task), "--out", str(tmp_path / "h2"), "--genes", "A"]) == 2
