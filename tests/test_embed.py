"""`histotx embed`: whole-tile embeddings of a shard set or a slide → one .h5ad per sample."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from shardkit import random_grid, tile_sample

from histotx.eval.embed import MODES, embed_shards, embed_slide
from histotx.export import LoadedModel
from histotx.files import sha256_file
from histotx.format import (
    FormatError,
    TranscriptGrid,
    decode_image_rgb,
    decode_sample,
    encode_sample,
    new_manifest,
    read_manifest,
    write_manifest,
)
from histotx.model import FusedViT, FusedViTConfig
from histotx.preprocess import IMAGENET_MEAN, IMAGENET_STD
from histotx.sharding.config import ShardConfig
from histotx.vocab import Vocab

N_GENES = 50
GENES = [f"G{i}" for i in range(N_GENES)]
DROP = ["G3", "G7"]
TILE_PX, IMAGE_PX = 64, 32  # 64 px tiles at 0.5 µm/px (32 µm) shown at 32 px (1 µm/px)
OBS_COLUMNS = ["sample", "patient", "technology", "x0_px", "y0_px", "x_um", "y_um", "mpp", "n_sites", "n_counts"]


def point_grid(rng: np.random.Generator, n_sites: int, genes: np.ndarray) -> TranscriptGrid:
    """Molecule-like sites (no footprint), one gene each, drawn from ``genes``."""
    return TranscriptGrid(
        rng.uniform(0, TILE_PX, (n_sites, 2)),
        np.arange(n_sites + 1),
        rng.choice(genes, n_sites),
        np.ones(n_sites),
        0.0,
        "point",
    )


def _write_shard(out: Path, name: str, tiles: list, sample_id: str | None) -> dict:
    with wds.TarWriter(str(out / name), encoder=False, mtime=0) as sink:
        for t in tiles:
            sink.write(encode_sample(t))
    entry = {
        "name": name,
        "samples": len(tiles),
        "bytes": (out / name).stat().st_size,
        "sha256": sha256_file(out / name),
    }
    return {**entry, "sample_id": sample_id} if sample_id else entry


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """s00: 5 spot tiles, one without sites; s01: 6 tiles over two shards; s02: 4 molecule tiles in a shard
    that does not name its sample (as tests/shardkit.py writes them); s03: one tile without G3/G7."""
    out = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    s00 = [tile_sample(rng, "s00", i, TILE_PX) for i in range(4)]
    s00.insert(2, tile_sample(rng, "s00", 4, TILE_PX, grid=TranscriptGrid.empty(55.0, "disk")))
    s01 = [tile_sample(rng, "s01", i, TILE_PX) for i in range(6)]
    s02 = [tile_sample(rng, "s02", i, TILE_PX, grid=point_grid(rng, 30, np.arange(N_GENES))) for i in range(4)]
    clean = random_grid(np.random.default_rng(1), TILE_PX, n_genes=N_GENES)
    clean.gene = np.where(np.isin(clean.gene, [3, 7]), 11, clean.gene).astype(np.int32)
    s03 = [tile_sample(rng, "s03", 0, TILE_PX, grid=clean)]
    for t in s02:
        t.meta["technology"] = "xenium"
    entries = [
        _write_shard(out, "s00.00000.tar", s00, "s00"),
        _write_shard(out, "s01.00000.tar", s01[:3], "s01"),
        _write_shard(out, "s01.00001.tar", s01[3:], "s01"),
        _write_shard(out, "mixed.tar", s02, None),
        _write_shard(out, "s03.00000.tar", s03, "s03"),
    ]
    samples = {s: {"status": "ok", "tiles": n} for s, n in (("s00", 5), ("s01", 6), ("s02", 4), ("s03", 1))}
    write_manifest(out, new_manifest({"synthetic": True}, entries, samples))
    vocab = Vocab()
    vocab.extend((g, "") for g in GENES)
    vocab.save(out / "vocab.tsv")
    return out


def tiny_model(genes=GENES, seed: int = 0) -> LoadedModel:
    """No LayerScale (init_values None): at its 1e-5 init the CLS output would barely depend on the input."""
    torch.manual_seed(seed)
    net = FusedViT(
        FusedViTConfig(
            size="tiny",
            embed_dim=32,
            num_heads=2,
            img_size=IMAGE_PX,
            patch_size=8,
            num_registers=1,
            init_values=None,
            vocab_size=len(genes),
        )
    )
    return LoadedModel(net.eval(), list(genes), 0.5, IMAGE_PX, IMAGENET_MEAN, IMAGENET_STD, "tiny-test")


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return tiny_model()


def tiles_of(shard_dir: Path, sample: str) -> list:
    manifest = read_manifest(shard_dir)
    out = []
    for entry in manifest["shards"]:
        for raw in wds.WebDataset(str(shard_dir / entry["name"]), shardshuffle=False):
            tile = decode_sample(raw)
            if tile.meta["sample"] == sample:
                out.append(tile)
    return out


def test_all_modes_obs_and_shapes(shards, model, tmp_path):
    paths = embed_shards(model, shards, tmp_path, modes=MODES, batch_size=2, progress=False)
    assert [p.name for p in paths] == ["s00.h5ad", "s01.h5ad", "s02.h5ad", "s03.h5ad"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]  # no temporaries left
    for path, n in zip(paths, (5, 6, 4, 1), strict=True):
        a = ad.read_h5ad(path)
        sample = path.stem
        assert a.shape == (n, 0) and a.X is None
        assert list(a.obs.columns[: len(OBS_COLUMNS)]) == OBS_COLUMNS
        assert list(a.obs_names) == [t.key for t in tiles_of(shards, sample)]
        assert (a.obs["sample"] == sample).all() and (a.obs["patient"] == f"p-{sample}").all()
        for mode in MODES:
            assert a.obsm[mode].dtype == np.float32 and a.obsm[mode].shape == (n, 32)
        assert a.uns["model"] == "tiny-test" and list(a.uns["modes"]) == list(MODES)
        assert list(a.uns["dropped_genes"]) == [] and a.uns["embedding"] == "cls"
        assert a.uns["image_px"] == IMAGE_PX and a.uns["resolution_um"] == 16.0
        tiles = tiles_of(shards, sample)
        np.testing.assert_array_equal(a.obs["y0_px"], [t.meta["origin_level0_px"][1] for t in tiles])
        np.testing.assert_array_equal(a.obs["y_um"], [t.meta["origin_um"][1] for t in tiles])
        np.testing.assert_array_equal(a.obs["n_sites"], [t.grid.n_sites for t in tiles])
        np.testing.assert_allclose(a.obs["n_counts"], [t.grid.total_count for t in tiles])
        empty = (a.obs["n_tokens"] == 0).to_numpy()
        # A tile without tokens has no transcripts embedding (a zero row, marked in obs); its fused one is its
        # image-only embedding.
        assert (a.obs["has_transcripts"].to_numpy() == ~empty).all()
        assert (a.obsm["transcripts"][empty] == 0).all() and (np.abs(a.obsm["transcripts"][~empty]).sum(1) > 0).all()
        assert np.isfinite(a.obsm["transcripts"]).all()
        assert not np.isnan(a.obsm["image"]).any() and not np.isnan(a.obsm["fused"]).any()
        scale = np.abs(a.obsm["image"]).max()  # same sample, other batch mates: fp32 rounding apart at most
        np.testing.assert_allclose(
            a.obsm["fused"][empty], a.obsm["image"][empty], rtol=0, atol=64 * np.finfo(np.float32).eps * scale
        )
        assert not np.allclose(a.obsm["fused"][~empty], a.obsm["image"][~empty], atol=1e-3)
    assert (ad.read_h5ad(paths[0]).obs["n_tokens"] == 0).sum() == 1  # s00's tile without sites


def test_image_mode_equals_a_direct_model_call(shards, model, tmp_path):
    """The whole tile, resized as the training loader resizes a crop (torch's bilinear antialiased kernel on
    uint8) and normalised: the same batch through the same kernels gives the same numbers. (torchvision's
    resize is not that kernel on every CPU: without AVX2 it resizes uint8 in float and rounds.)"""
    [path] = embed_shards(model, shards, tmp_path, samples=["s01"], batch_size=3, progress=False)
    tiles = tiles_of(shards, "s01")
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    images = []
    for t in tiles:
        rgb = torch.from_numpy(decode_image_rgb(t.image).copy()).permute(2, 0, 1)
        x = F.interpolate(rgb[None], size=(IMAGE_PX, IMAGE_PX), mode="bilinear", align_corners=False, antialias=True)[0]
        images.append((x.float() / 255.0 - mean) / std)
    with torch.inference_mode():
        direct = torch.cat([model.model(torch.stack(images[i : i + 3])).cls for i in (0, 3)]).numpy()
    np.testing.assert_array_equal(ad.read_h5ad(path).obsm["image"], direct)


def test_transcript_tokens_sit_where_the_molecules_are(shards, model, tmp_path):
    """s02's molecules (no footprint) make one 16 µm token per occupied cell of the 32 µm tile (2 × 2 cells
    of 16 px at the shown 1 µm/px), and one per molecule at the native resolution."""
    [grid_16] = embed_shards(model, shards, tmp_path / "16", samples=["s02"], modes=["transcripts"], progress=False)
    [native] = embed_shards(
        model, shards, tmp_path / "n", samples=["s02"], modes=["transcripts"], progress=False, resolution_um="native"
    )
    tiles = tiles_of(shards, "s02")
    cells = [len({(int(x * 0.5 // 16), int(y * 0.5 // 16)) for x, y in t.grid.xy}) for t in tiles]
    assert list(ad.read_h5ad(grid_16).obs["n_tokens"]) == cells
    assert list(ad.read_h5ad(native).obs["n_tokens"]) == [t.grid.n_sites for t in tiles]
    assert ad.read_h5ad(native).uns["resolution_um"] == "native"


def test_leakage_guard_drops_genes_before_the_model_sees_them(shards, model, tmp_path):
    seen: list[torch.Tensor] = []
    hook = model.model.transcript.register_forward_pre_hook(lambda _, args: seen.append(args[0].gene.clone()))
    try:
        kept = embed_shards(model, shards, tmp_path / "kept", modes=MODES, batch_size=2, progress=False)
        kept_genes = torch.cat(seen)
        seen.clear()
        dropped = embed_shards(
            model,
            shards,
            tmp_path / "dropped",
            modes=MODES,
            batch_size=2,
            progress=False,
            drop_genes=["G7", "G3", "G7"],
        )
        dropped_genes = torch.cat(seen)
    finally:
        hook.remove()
    drop_ids = [GENES.index(g) for g in DROP]
    assert np.isin(drop_ids, kept_genes.numpy()).all()  # they are in the input unless dropped ...
    assert not np.isin(drop_ids, dropped_genes.numpy()).any()  # ... and never reach the model when dropped
    for a_path, b_path in zip(kept, dropped, strict=True):
        a, b = ad.read_h5ad(a_path), ad.read_h5ad(b_path)
        assert list(b.uns["dropped_genes"]) == DROP  # sorted, once each
        np.testing.assert_array_equal(a.obsm["image"], b.obsm["image"])
        tiles = tiles_of(shards, a_path.stem)
        touched = np.array([np.isin(drop_ids, t.grid.gene).any() for t in tiles])
        for mode in ("transcripts", "fused"):
            if a_path.stem == "s03":  # one tile without G3/G7, alone in its batch: bit-identical input and output
                assert not touched.any()
                np.testing.assert_array_equal(a.obsm[mode], b.obsm[mode])
            else:
                change = np.abs(a.obsm[mode][touched] - b.obsm[mode][touched]).max(axis=1)
                assert (change > 1e-3).all(), (a_path.stem, mode, change)


def test_genes_match_by_name_not_by_id(shards, tmp_path):
    """A model whose vocabulary lists the genes in another order (its gene embedding rows permuted to
    match) gives the same transcript embeddings: shard ids are mapped through the gene names."""
    # A token lists its genes by id, so reversed ids sum its gene embeddings in the reverse order: compared
    # in float64, where that reordering is ~1e-16 relative, so the float32 files agree to one float32 ulp.
    original = tiny_model()
    original.model.double()
    reordered = tiny_model(GENES[::-1])
    reordered.model.double().load_state_dict(original.model.state_dict())
    with torch.no_grad():
        reordered.model.transcript.gene_embed.weight.copy_(original.model.transcript.gene_embed.weight.flip(0))
    [a] = embed_shards(original, shards, tmp_path / "a", samples=["s02"], modes=["transcripts"], progress=False)
    [b] = embed_shards(reordered, shards, tmp_path / "b", samples=["s02"], modes=["transcripts"], progress=False)
    a, b = ad.read_h5ad(a).obsm["transcripts"], ad.read_h5ad(b).obsm["transcripts"]
    np.testing.assert_allclose(a, b, rtol=0, atol=np.spacing(np.abs(a).max()))
    assert np.abs(a).max() > 0.1


def test_subset_reads_only_its_shards_and_damage_is_an_error(shards, model, tmp_path):
    damaged = tmp_path / "shards"
    shutil.copytree(shards, damaged)
    (damaged / "s00.00000.tar").write_bytes((damaged / "s00.00000.tar").read_bytes()[:1500])
    paths = embed_shards(model, damaged, tmp_path / "out", samples=["s01", "s03"], progress=False)
    assert [p.name for p in paths] == ["s01.h5ad", "s03.h5ad"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["s01.h5ad", "s03.h5ad"]
    with pytest.raises(FormatError, match="s00.00000.tar"):
        embed_shards(model, damaged, tmp_path / "out", samples=["s00"], progress=False)
    with pytest.raises(ValueError, match="no sample \\['nope'\\]"):
        embed_shards(model, shards, tmp_path / "out", samples=["nope"], progress=False)
    with pytest.raises(ValueError, match="modes"):
        embed_shards(model, shards, tmp_path / "out", modes=["pixels"], progress=False)
    with pytest.raises(TypeError, match="LoadedModel"):
        embed_shards(model.model, shards, tmp_path / "out", progress=False)


def test_write_is_atomic(shards, model, tmp_path, monkeypatch):
    [path] = embed_shards(model, shards, tmp_path, samples=["s03"], progress=False)
    before = path.read_bytes()

    def crash(_self, filename, *_args, **_kwargs):
        Path(filename).write_bytes(b"half an h5ad")
        raise RuntimeError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        embed_shards(model, shards, tmp_path, samples=["s03"], modes=MODES, progress=False)
    assert path.read_bytes() == before  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["s03.h5ad"]  # and the temporary is gone


def test_workers_give_the_same_file(shards, model, tmp_path):
    """Tiles prepared in 2 DataLoader worker processes: same rows in the same (shard) order, same numbers
    (each sample's batches hold the same tiles: its shards are read in order)."""
    [a] = embed_shards(model, shards, tmp_path / "a", samples=["s01"], modes=MODES, batch_size=4, progress=False)
    [b] = embed_shards(
        model, shards, tmp_path / "b", samples=["s01"], modes=MODES, batch_size=4, progress=False, num_workers=2
    )
    a, b = ad.read_h5ad(a), ad.read_h5ad(b)
    assert list(a.obs_names) == list(b.obs_names)
    for mode in MODES:
        np.testing.assert_array_equal(a.obsm[mode], b.obsm[mode])


def write_export(loaded: LoadedModel, out: Path) -> Path:
    """The model as `histotx export` writes it (HistoTx folder: teacher weights, config, genes, µm/px)."""
    from histotx.export.native import write_native
    from histotx.export.source import Teacher

    vocab = Vocab()
    vocab.extend((g, "") for g in loaded.genes)
    augment = {"global_crop_size": loaded.image_size, "mean": list(loaded.mean), "std": list(loaded.std)}
    teacher = Teacher(
        loaded.model.state_dict(),
        loaded.model.config,
        {"data": {"augment": augment}},
        vocab,
        {"config": {"mpp": loaded.mpp}},
        out.parent / "run" / "checkpoints" / "step_00000010",
        10,
    )
    return write_native(teacher, out)


@pytest.mark.slow
def test_slide_is_tiled_as_histotx_shard_tiles_it(tmp_path):
    """`histotx embed --slide` shards through the sharding pipeline itself, with the same settings syntax:
    the same shard bytes, and the same embeddings, as `histotx shard run` + embed_shards."""
    from histotx.cli import main
    from histotx.sharding.config import ShardConfig
    from histotx.sharding.pipeline import run_cohort
    from histotx.synth import generate_cohort

    cohort = generate_cohort(tmp_path / "synth", seed=1, size="small", technologies=("visium",))
    settings = dict(mpp=2.0, tile_px=64, max_tiles_per_sample=12)
    run_cohort(cohort, tmp_path / "shards", ShardConfig(**settings))
    vocab = Vocab.load(tmp_path / "shards" / "vocab.tsv")
    loaded = tiny_model([vocab.name(i) for i in range(len(vocab))])
    loaded.mpp = 2.0
    [ref] = embed_shards(loaded, tmp_path / "shards", tmp_path / "ref", modes=MODES, progress=False)
    folder = cohort.parent / "visium"
    code = main(
        [
            "embed",
            "--model",
            str(write_export(loaded, tmp_path / "export")),
            "--out",
            str(tmp_path / "emb"),
            "--slide",
            str(folder / "visium_fullres.tif"),
            "--data",
            str(folder / "outs"),
            "--technology",
            "visium",
            "--sample-id",
            "visium",
            "--patient",
            "P01",
            "--modes",
            "image,transcripts,fused",
            "--keep-shards",
            str(tmp_path / "kept"),
        ]
        + [f"{k}={v}" for k, v in settings.items()]
    )
    assert code == 0
    assert sha256_file(tmp_path / "kept" / "visium.00000.tar") == sha256_file(tmp_path / "shards" / "visium.00000.tar")
    a, b = ad.read_h5ad(ref), ad.read_h5ad(tmp_path / "emb" / "visium.h5ad")
    assert a.n_obs == 12 and list(a.obs_names) == list(b.obs_names)
    for col in OBS_COLUMNS + ["n_tokens"]:
        assert list(a.obs[col]) == list(b.obs[col]), col
    for mode in MODES:
        np.testing.assert_array_equal(a.obsm[mode], b.obsm[mode])
    assert (a.obs["n_tokens"] > 0).any()


def test_slide_shards_in_a_temporary_folder(tmp_path, model, monkeypatch):
    """Without --keep-shards the slide's shards go to a temporary folder that is removed afterwards."""
    from histotx.synth.slides import write_slide

    rng = np.random.default_rng(0)
    write_slide(
        tmp_path / "he-01.tif", rng.integers(0, 200, (256, 192, 3), dtype=np.uint8), 0.5, "tiff_subifds", n_levels=1
    )
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = embed_slide(
        model,
        tmp_path / "he-01.tif",
        tmp_path / "emb",
        progress=False,
        shard_config=ShardConfig(tile_px=64, min_tissue_fraction=0.0),
    )
    a = ad.read_h5ad(path)
    assert path.name == "he-01.h5ad" and a.n_obs == 12 and set(a.obs["technology"]) == {"image_only"}
    assert list((tmp_path / "tmp").iterdir()) == []


def test_cli(shards, model, tmp_path, monkeypatch, capsys, caplog):
    """`histotx embed`: --help teaches, a bad combination is one clear error, a run writes the files and
    prints a summary (the model source is resolved by histotx.export.load_model, stubbed here)."""
    import histotx.eval.embed as embed
    from histotx.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["embed", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--drop-genes" in text and "--slide" in text and "obsm" in text

    sources = []
    monkeypatch.setattr(embed, "resolve_model", lambda source, _device: sources.append(source) or model)
    assert main(["embed", "--model", "m", "--out", str(tmp_path), "--shards", str(shards), "--slide", "x.tif"]) == 2
    assert "either --shards" in caplog.text
    (tmp_path / "drop.txt").write_text("# targets\nG3\n")
    code = main(
        [
            "embed",
            "--model",
            "runs/x",
            "--shards",
            str(shards),
            "--out",
            str(tmp_path / "emb"),
            "--samples",
            "s01,s03",
            "--modes",
            "image,fused",
            "--drop-genes",
            "G7",
            "--drop-genes-file",
            str(tmp_path / "drop.txt"),
            "--batch-size",
            "4",
            "--resolution-um",
            "native",
        ]
    )
    assert code == 0 and sources == ["runs/x"]
    a = ad.read_h5ad(tmp_path / "emb" / "s01.h5ad")
    assert sorted(a.obsm) == ["fused", "image", "spatial"] and list(a.uns["dropped_genes"]) == DROP
    assert a.uns["resolution_um"] == "native"
    assert sorted(p.name for p in (tmp_path / "emb").iterdir()) == ["s01.h5ad", "s03.h5ad"]
    err = capsys.readouterr().err
    assert "2 samples, 7 tiles" in err and str(tmp_path / "emb") in err


def test_cli_with_an_export_folder(shards, model, tmp_path):
    """An export folder, loaded by histotx.export.load_model: the same weights give the same embeddings."""
    from histotx.cli import main

    export = write_export(model, tmp_path / "export")
    assert (
        main(
            [
                "embed",
                "--model",
                str(export),
                "--shards",
                str(shards),
                "--out",
                str(tmp_path / "cli"),
                "--samples",
                "s00",
                "--modes",
                "image,transcripts,fused",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    [ref] = embed_shards(model, shards, tmp_path / "ref", samples=["s00"], modes=MODES, progress=False)
    a, b = ad.read_h5ad(tmp_path / "cli" / "s00.h5ad"), ad.read_h5ad(ref)
    assert a.uns["model"] == "run@step_00000010"
    for mode in MODES:
        np.testing.assert_array_equal(a.obsm[mode], b.obsm[mode])
