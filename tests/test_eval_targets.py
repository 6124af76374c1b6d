"""Tile expression from shards and the target-gene rule (present in ≥ 10 % of the sites of every sample)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import webdataset as wds
from shardkit import tile_sample

from histotx.eval.targets import select_target_genes, target_matrix, tile_expression
from histotx.files import sha256_file
from histotx.format import TranscriptGrid, encode_sample, new_manifest, write_manifest
from histotx.vocab import Vocab

GENES = ["G0", "G1", "G2", "G3", "G4", "BLANK_0001"]


def grid_from_sites(
    sites: list[dict[int, float]], shape: str = "disk", footprint: float = 55.0, tile_px: int = 64
) -> TranscriptGrid:
    """A grid whose site i holds ``sites[i]`` (gene id → count)."""
    offsets = np.cumsum([0] + [len(s) for s in sites])
    gene = [g for s in sites for g in s]
    count = [c for s in sites for c in s.values()]
    xy = np.linspace(1, tile_px - 2, 2 * len(sites)).reshape(-1, 2) if sites else np.zeros((0, 2))
    return TranscriptGrid(xy, offsets, np.array(gene, np.int32), np.array(count, np.float32), footprint, shape)


def write_shards(
    out: Path,
    tiles: dict[str, list[TranscriptGrid]],
    patients: dict[str, str],
    genes: list[str] = GENES,
    tile_px: int = 64,
    seed: int = 0,
) -> Path:
    """One shard per sample, laid out as `histotx shard` lays it out (manifest, vocab.tsv)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab = Vocab()
    vocab.extend((g, "") for g in genes)
    vocab.save(out / "vocab.tsv")
    shards, samples = [], {}
    for sid, grids in tiles.items():
        name = f"{sid}.00000.tar"
        with wds.TarWriter(str(out / name), encoder=False, mtime=0) as sink:
            for i, grid in enumerate(grids):
                tile = tile_sample(rng, sid, i, tile_px, grid=grid)
                tile.meta["patient"] = patients[sid]
                sink.write(encode_sample(tile))
        shards.append(
            {
                "name": name,
                "samples": len(grids),
                "bytes": (out / name).stat().st_size,
                "sha256": sha256_file(out / name),
                "sample_id": sid,
            }
        )
        samples[sid] = {"status": "ok", "tiles": len(grids)}
    write_manifest(out, new_manifest({"tile_px": tile_px}, shards, samples))
    return out


def _rule_cohort(tmp_path: Path) -> Path:
    """Sample A: 10 tiles × 2 Visium spots (20 sites); sample B: 10 tiles of Xenium molecules.

    G0 everywhere, variable; G1 in exactly 2/20 = 10 % of A's spots (kept) and in 3/10 of B's tiles;
    G2 very variable but in 1/20 of A's spots (dropped); G3 everywhere in A, nowhere in B (dropped);
    G4 everywhere, constant (kept, least variable); BLANK_0001 everywhere, variable (a probe: dropped).
    """
    a_tiles = []
    for t in range(10):
        sites = []
        for s in range(2):
            i = 2 * t + s
            site = {0: float(1 + 7 * (i % 3)), 3: 2.0, 4: 1.0, 5: float(1 + 40 * (i % 2))}
            if i in (4, 11):
                site[1] = 5.0
            if i == 7:
                site[2] = 500.0
            sites.append(site)
        a_tiles.append(grid_from_sites(sites))
    b_tiles = []
    for t in range(10):
        molecules = [{0: 1.0}] * (1 + 3 * (t % 4)) + [{4: 1.0}, {4: 1.0}, {5: 1.0}] + ([{1: 1.0}] if t < 3 else [])
        b_tiles.append(grid_from_sites(molecules, shape="point", footprint=0.0))
    empty = grid_from_sites([])  # a tile without sites: not measured, left out
    return write_shards(tmp_path / "shards", {"A": a_tiles + [empty], "B": b_tiles}, {"A": "P1", "B": "P2"})


def test_tile_expression_sums_sites_and_counts_units(tmp_path):
    expr = tile_expression(_rule_cohort(tmp_path))
    assert sorted(expr) == ["A", "B"]
    a, b = expr["A"], expr["B"]
    keys, counts, genes = a  # the agreed (keys, counts, genes) tuple
    assert genes == GENES and len(keys) == 10 and counts.shape == (10, 6)  # the empty tile is left out
    assert counts[0, 0] == 1 + 8 and counts[0, 3] == 4 and counts[2, 1] == 5  # site 4 is tile 2's first
    assert (a.patient, a.unit, a.n_units) == ("P1", "site", 20)
    assert a.unit_presence.tolist() == [20, 2, 1, 20, 20, 20]
    assert (b.patient, b.unit, b.n_units) == ("P2", "tile", 10)  # molecules: presence over tiles
    assert b.unit_presence.tolist() == [10, 3, 0, 0, 10, 10]
    assert tile_expression(tmp_path / "shards", samples=["B"]).keys() == {"B"}
    # Visium HD-like 8 µm bins pool to the tile as molecules do; HEST's 100 µm pseudo-spots are sites
    bins = [grid_from_sites([{0: 1.0}, {1: 2.0}], shape="square", footprint=8.0)] * 3
    pseudo = [grid_from_sites([{0: 1.0}, {1: 2.0}], shape="square", footprint=100.0)] * 3
    expr = tile_expression(write_shards(tmp_path / "hd", {"H": bins, "X": pseudo}, {"H": "P3", "X": "P4"}))
    assert (expr["H"].unit, expr["H"].n_units) == ("tile", 3) and (expr["X"].unit, expr["X"].n_units) == ("site", 6)


def test_target_rule_every_sample_ten_percent_of_sites(tmp_path):
    expr = tile_expression(_rule_cohort(tmp_path))
    chosen = select_target_genes(expr, n=50)
    assert set(chosen) == {"G0", "G1", "G4"}
    # ranked by the variance of log1p(tile count) over both samples' tiles, computed here by hand
    logged = np.log1p(np.vstack([e.counts.toarray() for e in expr.values()]))
    var = {g: logged[:, i].var() for i, g in enumerate(GENES)}
    assert chosen == sorted(["G0", "G1", "G4"], key=lambda g: -var[g])
    assert select_target_genes(expr, n=2) == chosen[:2]
    # one site fewer in A and G1 falls under 10 % of A's sites
    assert "G1" not in select_target_genes(expr, n=50, min_frac=0.11)


def test_plain_tuples_count_rows_and_target_matrix_is_log1p():
    counts = np.array([[0, 3, 1], [0, 0, 1], [2, 0, 1], [0, 0, 1]] * 5, dtype=float)  # 20 rows
    expr = {"s": ([f"k{i}" for i in range(20)], counts, ["x", "y", "z"])}
    counts_b = counts.copy()
    counts_b[:, 0] = 0
    counts_b[0, 0] = 4  # x in 1/20 rows of sample t: under 10 %
    expr["t"] = ([f"m{i}" for i in range(20)], counts_b, ["x", "y", "z"])
    assert set(select_target_genes(expr)) == {"y", "z"}
    np.testing.assert_array_equal(target_matrix(expr["s"], ["z", "y"]), np.log1p(counts[:, [2, 1]]))
