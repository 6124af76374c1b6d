"""Evaluation targets: each tile's expression, read from the shards, and the target genes.

Targets come from the shards (the measured transcripts), never from an embedding. A tile's expression is
the sum of its sites' counts per gene; tiles without sites (outside the capture area, image-only samples)
are not measured and are left out. With ``tiling=spots`` (one tile per spot, HEST-style) a tile's
expression is its spot's, as in HEST-Benchmark.

Target genes follow HEST's ``get_k_genes``: keep the genes present in ≥ ``min_frac`` of the sites of
*every* sample (HEST: ``scanpy.pp.filter_genes(min_cells=ceil(0.1 · n_spots))``), drop ``BLANK``/``Control``
probes, then take the ``n`` most variable. Two differences, both stated: (1) a "site" is a spot
(footprint ≥ 50 µm: Visium 55 µm, ST 100 µm, HEST's 100/128 µm pseudo-spots); finer sites, i.e. Visium HD
bins and Xenium molecules (one molecule is one site holding one gene), are pooled to the tile first, as
HEST pools them into pseudo-spots, since no gene is in 10 % of single molecules or 2 µm bins; (2) "most
variable" ranks the variance of log1p(count) over all tiles of all samples, ties by name; HEST ranks
scanpy's seurat-flavour normalised dispersion (not a dependency here). HEST-Benchmark's own tasks ship
their gene list (``var_50genes.json``), which :mod:`histotx.eval.hestlayout` uses as it is.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import scipy.sparse as sp

from histotx.format import decode_sample, manifest_sample, read_manifest
from histotx.shard_reader import read_shard_file, shard_path
from histotx.vocab import Vocab

log = logging.getLogger(__name__)

EXCLUDED_PROBES = ("BLANK", "Control")  # HEST drops gene names containing these
SPOT_MIN_UM = 50.0  # sites at least this wide count as spots for the presence rule; finer ones pool to tiles


@dataclass
class TileExpression:
    """One sample's measured tiles. Unpacks as ``keys, counts, genes`` (the agreed tuple)."""

    keys: list[str]
    counts: sp.csr_matrix  # (n_tiles, n_genes) float64: per-tile sums of site counts
    genes: list[str]  # the shard set's vocabulary, column order
    patient: str
    unit: str  # "site" (spots) or "tile" (bins and molecules, pooled to the tile)
    n_units: int  # sites (or tiles) the presence rule counts over
    unit_presence: np.ndarray  # (n_genes,) int64: units with count > 0 per gene

    def __iter__(self) -> Iterator:
        return iter((self.keys, self.counts, self.genes))

    def __getitem__(self, i):
        return (self.keys, self.counts, self.genes)[i]


def _shard_paths(shard_dir: Path, manifest: dict, samples: set[str] | None) -> list[Path]:
    paths = []
    for entry in manifest["shards"]:
        sid = entry.get("sample_id")  # written by `histotx shard`; absent in hand-made sets
        if samples is not None and sid is not None and sid not in samples:
            continue
        paths.append(shard_path(shard_dir, entry["name"]))
    return paths


def tile_expression(
    shards: str | Path, samples: Iterable[str] | None = None, progress: bool = False
) -> dict[str, TileExpression]:
    """Per sample, the summed expression of every tile that holds sites (see the module docstring)."""
    from tqdm import tqdm

    shard_dir = Path(shards)
    manifest = read_manifest(shard_dir)
    vocab = Vocab.load(shard_dir / manifest["vocab"])
    genes = [vocab.name(i) for i in range(len(vocab))]
    n_genes = len(genes)
    wanted = set(samples) if samples is not None else None
    acc: dict[str, dict] = {}
    paths = _shard_paths(shard_dir, manifest, wanted)
    for path in tqdm(paths, desc="tile expression", unit="shard", disable=not progress):
        if not path.exists():
            raise FileNotFoundError(f"{path}: listed in {shard_dir / 'manifest.json'} but missing")
        for members in read_shard_file(path):
            tile = decode_sample(members)
            sid = tile.meta["sample"]
            manifest_sample(manifest, sid, f"{path}: tile {tile.key}")
            if wanted is not None and sid not in wanted:
                continue
            grid = tile.grid
            if grid.n_sites == 0:
                continue
            if grid.gene.size and grid.gene.max() >= n_genes:
                raise ValueError(
                    f"{path}: tile {tile.key} has gene id {int(grid.gene.max())} beyond "
                    f"the vocabulary ({n_genes} genes)"
                )
            a = acc.setdefault(
                sid,
                {
                    "keys": [],
                    "rows": [],
                    "patient": str(tile.meta["patient"] or sid),
                    "pooled": grid.footprint_um < SPOT_MIN_UM,
                    "n_sites": 0,
                    "presence": np.zeros(n_genes, np.int64),
                },
            )
            row = np.bincount(grid.gene, weights=grid.count.astype(np.float64), minlength=n_genes)
            a["keys"].append(tile.key)
            a["rows"].append(sp.csr_matrix(row))
            a["n_sites"] += grid.n_sites
            present = grid.count > 0
            site_gene = np.unique(grid.site_of_entry()[present].astype(np.int64) * n_genes + grid.gene[present])
            a["presence"] += np.bincount(site_gene % n_genes, minlength=n_genes)
    if wanted is not None and (missing := wanted - set(acc)):
        raise ValueError(f"{shard_dir}: no tiles with transcripts for samples {sorted(missing)}")
    out = {}
    for sid in sorted(acc):
        a = acc[sid]
        counts = sp.vstack(a["rows"], format="csr")
        if a["pooled"]:  # bins, molecules: presence over tiles
            unit, n_units, presence = "tile", counts.shape[0], np.asarray((counts > 0).sum(axis=0)).ravel()
        else:
            unit, n_units, presence = "site", a["n_sites"], a["presence"]
        out[sid] = TileExpression(a["keys"], counts, genes, a["patient"], unit, int(n_units), presence.astype(np.int64))
    return out


def _presence(entry) -> tuple[np.ndarray, int]:
    """(units with count > 0 per gene, number of units); a plain (keys, counts, genes) counts rows."""
    if isinstance(entry, TileExpression):
        return entry.unit_presence, entry.n_units
    _, counts, _ = entry
    counts = sp.csr_matrix(counts)
    return np.asarray((counts > 0).sum(axis=0)).ravel(), counts.shape[0]


def select_target_genes(expr: dict, n: int = 50, min_frac: float = 0.10) -> list[str]:
    """Top-``n`` genes by variance of log1p(count) among genes present in ≥ ``min_frac`` of the sites
    of every sample (module docstring). Most variable first."""
    if not expr:
        raise ValueError("no samples with transcripts to select target genes from")
    genes = None
    keep = None
    for sid, entry in expr.items():
        _, _, g = entry
        if genes is None:
            genes = list(g)
        elif list(g) != genes:
            raise ValueError(f"sample {sid}: gene columns differ from the other samples'")
        presence, n_units = _presence(entry)
        ok = presence >= math.ceil(min_frac * n_units)
        keep = ok if keep is None else keep & ok
    names = np.asarray(genes, dtype=object)
    keep &= np.array([bool(g) and not any(p in g for p in EXCLUDED_PROBES) for g in genes])
    candidates = np.flatnonzero(keep)
    if candidates.size == 0:
        raise ValueError(f"no gene is present in ≥ {min_frac:.0%} of the sites of every sample")
    stacked = sp.vstack([sp.csr_matrix(e[1])[:, candidates] for e in expr.values()]).astype(np.float64)
    logged = stacked.log1p()
    mean = np.asarray(logged.mean(axis=0)).ravel()
    var = np.asarray(logged.multiply(logged).mean(axis=0)).ravel() - mean**2
    order = sorted(range(candidates.size), key=lambda i: (-var[i], names[candidates[i]]))
    chosen = [str(names[candidates[i]]) for i in order[:n]]
    if len(chosen) < n:
        log.warning("only %d genes pass the presence rule (asked for %d targets)", len(chosen), n)
    return chosen


def target_matrix(entry, targets: Sequence[str]) -> np.ndarray:
    """log1p(count) of the target genes, float64 (n_tiles, n_targets), in ``targets`` order."""
    _, counts, genes = entry
    index = {g: i for i, g in enumerate(genes)}
    missing = [g for g in targets if g not in index]
    if missing:
        raise ValueError(f"target genes {missing[:5]} are not in the shard set's vocabulary")
    cols = [index[g] for g in targets]
    return np.log1p(sp.csr_matrix(counts)[:, cols].toarray().astype(np.float64))


def read_gene_groups(path: str | Path) -> dict[str, list[str]]:
    """``{"group": ["GENE", ...], ...}`` from a JSON file."""
    path = Path(path)
    try:
        groups = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(groups, dict) or not all(
        isinstance(v, list) and all(isinstance(g, str) for g in v) for v in groups.values()
    ):
        raise ValueError(f"{path}: expected an object of group name → list of gene symbols")
    return {str(k): list(v) for k, v in groups.items()}
