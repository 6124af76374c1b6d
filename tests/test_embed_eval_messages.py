"""What `histotx embed` and `histotx eval` say before any model is loaded: each wrong flag named, the
sample named after its folder, fewer than 2 patients refused up front, and no shared gene said aloud."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from histotx.cli import main
from histotx.eval.embed import _input_genes, slide_sample_id
from histotx.vocab import Vocab


def test_sample_is_named_after_its_folder(tmp_path):
    assert slide_sample_id(tmp_path / "he.tif", tmp_path / "lung01" / "outs") == "lung01"
    assert slide_sample_id(tmp_path / "lung02" / "outs" / "spatial" / "tissue_lowres_image.png") == "lung02"
    assert slide_sample_id(None, tmp_path / "hd9" / "outs" / "binned_outputs" / "square_008um") == "hd9"
    assert slide_sample_id(tmp_path / "slides" / "he-01.ome.tif") == "he-01"  # a slide on its own: its name


def _embed(caplog, tmp_path, *args):
    caplog.clear()
    rc = main(["embed", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "emb"), *args])
    return rc, "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--slide", "{tmp}/nope.svs"], "--slide {tmp}/nope.svs: no such file"),
        (["--slide", "{tmp}/he.png", "--technology", "spatialomics"], "--technology spatialomics: expected one of"),
        (["--slide", "{tmp}/he.png", "--technology", "visium"], "--technology visium needs --data"),
        (["--slide", "{tmp}/he.png", "--data", "{tmp}"], "--data {tmp}: say which data it is with --technology"),
        (["--slide", "{tmp}/he.png", "--sample-id", "a b"], "--sample-id a b: "),
        (["--slide", "{tmp}/he.png", "--resolution-um", "big"], "--resolution-um big: expected a size in µm"),
        (["--shards", "{tmp}"], "--shards {tmp}: no manifest.json there"),
    ],
)
def test_embed_flag_errors_name_the_flag(tmp_path, caplog, args, message):
    (tmp_path / "he.png").write_bytes(b"")
    rc, text = _embed(caplog, tmp_path, *[a.format(tmp=tmp_path) for a in args])
    assert rc == 2
    assert message.format(tmp=tmp_path) in text
    assert "cohort.yaml" not in text and not (tmp_path / "emb").exists()


def test_eval_with_one_patient_is_refused_before_embedding(tmp_path):
    from shardkit import write_shard_set

    from histotx.eval import evaluate

    shards = write_shard_set(tmp_path / "shards", n_shards=1, per_shard=6)
    v = Vocab()
    v.extend((f"G{i}", "") for i in range(50))
    v.save(shards / "vocab.tsv")
    (tmp_path / "emb").mkdir()
    with pytest.raises(ValueError, match=r"needs tiles with transcripts from at least 2 patients .*found 1: s00"):
        evaluate(shards, embeddings={"m": tmp_path / "emb"}, modes=["image"], progress=False, show=False)


def test_no_gene_shared_with_the_model_is_said(tmp_path, caplog):
    v = Vocab()
    v.extend([("EPCAM", ""), ("KRT8", "")])
    v.save(tmp_path / "vocab.tsv")
    loaded = SimpleNamespace(model=SimpleNamespace(transcript=object()), genes=["Gfap", "Snap25"], name="m")
    with caplog.at_level(logging.WARNING):
        mapping = _input_genes(Path(tmp_path), loaded, [])
    assert (mapping < 0).all()
    assert "the shards' genes and the model's share none" in caplog.text and "'fused' equals 'image'" in caplog.text
    caplog.clear()
    loaded.genes = ["EPCAM"]
    with caplog.at_level(logging.WARNING):
        _input_genes(Path(tmp_path), loaded, ["EPCAM"])
    assert "every gene the two share is dropped" in caplog.text
