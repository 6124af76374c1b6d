"""Genes only a failed sample holds leave vocab.tsv (so they never reach a model's vocabulary or an export's
gene list), without changing the id of any gene a written sample uses."""

from __future__ import annotations

import logging

from histotx.sharding.pipeline import drop_unused_genes
from histotx.vocab import Vocab


def _vocab(path, n: int) -> None:
    v = Vocab()
    v.extend((f"G{i}", "") for i in range(n))
    v.save(path / "vocab.tsv")


def test_genes_of_a_failed_sample_at_the_end_are_removed(tmp_path):
    _vocab(tmp_path, 6)
    records = {"ok": {"status": "ok", "gene_ranges": [[0, 3]]}, "bad": {"status": "failed", "error": "x"}}
    assert drop_unused_genes(tmp_path, 0, records) == 3
    v = Vocab.load(tmp_path / "vocab.tsv")
    assert [v.name(i) for i in range(len(v))] == ["G0", "G1", "G2"]


def test_genes_the_folder_had_before_stay(tmp_path):
    _vocab(tmp_path, 6)
    records = {"ok": {"status": "ok", "gene_ranges": [[0, 2]]}, "bad": {"status": "failed"}}
    assert drop_unused_genes(tmp_path, 4, records) == 2
    assert len(Vocab.load(tmp_path / "vocab.tsv")) == 4


def test_unused_genes_before_used_ones_keep_the_ids_and_are_reported(tmp_path, caplog):
    _vocab(tmp_path, 6)
    records = {"a": {"status": "ok", "gene_ranges": [[0, 2], [4, 5]]}, "bad": {"status": "failed"}}
    with caplog.at_level(logging.WARNING):
        assert drop_unused_genes(tmp_path, 0, records) == 1
    v = Vocab.load(tmp_path / "vocab.tsv")
    assert len(v) == 5 and v.name(4) == "G4"
    assert "2 genes that only failed samples hold stay in" in caplog.text


def test_every_gene_used_changes_nothing(tmp_path):
    _vocab(tmp_path, 3)
    before = (tmp_path / "vocab.tsv").read_bytes()
    assert drop_unused_genes(tmp_path, 0, {"ok": {"status": "ok", "gene_ranges": [[0, 3]]}}) == 0
    assert (tmp_path / "vocab.tsv").read_bytes() == before
