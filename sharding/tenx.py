"""10x Genomics HDF5 feature-barcode matrices (Space Ranger / Cell Ranger / Xenium), read with h5py.

Layout: group ``matrix/`` with ``data``, ``indices``, ``indptr``, ``shape`` = [n_features, n_barcodes]
(CSC: one indptr entry per barcode), ``barcodes`` and ``features/{id, name, feature_type, ...}``.
Probe-chemistry *probe-level* files (``raw_probe_bc_matrix.h5``) have one row per probe and add
``features/{gene_id, gene_name, filtered_probes}``: they are summed to genes here, keeping only the
probes Space Ranger kept (``filtered_probes``), so every reader sees one column per gene.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

from histotx.vocab import is_ensembl_id
from sharding.errors import InputError

_REQUIRED = ("data", "indices", "indptr", "shape", "barcodes", "features/id", "features/name")
GENE_EXPRESSION = "Gene Expression"


@dataclass
class TenxMatrix:
    barcodes: np.ndarray  # (n_barcodes,) str
    genes: list[tuple[str, str]]  # (symbol, ensembl id or "") per column
    counts: sp.csr_matrix  # n_barcodes × n_genes, float32
    attrs: dict  # file attributes worth recording (software_version, chemistry_description)
    probe_level: bool = False


def _strings(ds: h5py.Dataset) -> np.ndarray:
    v = np.asarray(ds[()])
    if v.dtype.kind == "O":  # variable-length strings come back as bytes objects
        v = v.astype(bytes)
    return np.char.decode(v, "utf-8") if v.dtype.kind == "S" else v.astype(str)


def _open_matrix(f: h5py.File, path: Path) -> h5py.Group:
    if "matrix" not in f:
        groups = ", ".join(sorted(f.keys())) or "none"
        raise InputError(
            path, f"not a 10x feature-barcode matrix: no 'matrix' group (top-level groups: {groups}; "
            "Cell Ranger 2 per-genome files are not supported)"
        )
    m = f["matrix"]
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise InputError(path, f"10x matrix lacks {', '.join('matrix/' + k for k in missing)}")
    return m


def gene_identity(symbols: np.ndarray, ids: np.ndarray) -> list[tuple[str, str]]:
    """(symbol, Ensembl id). A non-Ensembl `id` (custom reference) is left out; a `name` that is itself
    the Ensembl id (as in some Space Ranger references) is not a symbol and is left out too."""
    genes = []
    for name, gid in zip(symbols.tolist(), ids.tolist()):
        eid = gid if is_ensembl_id(gid) else (name if is_ensembl_id(name) else "")
        genes.append(("" if name == eid else name, eid))
    return genes


def _features(m: h5py.Group, path: Path) -> tuple[np.ndarray, list[tuple[str, str]], np.ndarray | None, bool]:
    """Which rows to keep, their genes, and for probe files the probe → gene column map."""
    feats = m["features"]
    lengths = {k: len(v) for k, v in feats.items() if isinstance(v, h5py.Dataset) and k != "_all_tag_keys"}
    if len(set(lengths.values())) > 1:
        raise InputError(path, f"matrix/features datasets differ in length: {lengths}")
    ids, names = _strings(feats["id"]), _strings(feats["name"])
    keep = np.ones(len(ids), dtype=bool)
    if "feature_type" in feats:
        keep &= _strings(feats["feature_type"]) == GENE_EXPRESSION
    probe_level = "gene_id" in feats and "gene_name" in feats
    if not probe_level:
        return keep, gene_identity(names[keep], ids[keep]), None, False
    if "filtered_probes" in feats:
        keep &= feats["filtered_probes"][()].astype(bool)
    gene_ids, gene_names = _strings(feats["gene_id"]), _strings(feats["gene_name"])
    uniq, first, column = np.unique(gene_ids[keep], return_index=True, return_inverse=True)
    genes = gene_identity(gene_names[keep][first], uniq)
    return keep, genes, column, True


def check_counts(values: np.ndarray, path: Path, where: str) -> None:
    """Counts must be numeric, finite and non-negative (shared by every matrix reader)."""
    if not np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_:
        raise InputError(path, f"{where} is {values.dtype}, not numeric")
    bad = ~np.isfinite(values)
    if bad.any():
        raise InputError(path, f"{where} has {int(bad.sum())} NaN/inf counts")
    if values.size and values.min() < 0:
        raise InputError(path, f"{where} has {int(np.sum(values < 0))} negative counts")


def read_10x_genes(path: str | Path) -> list[tuple[str, str]]:
    """The genes of a 10x h5 without reading its counts (for the vocabulary pass)."""
    path = Path(path)
    with _open(path) as f:
        try:
            return _features(_open_matrix(f, path), path)[1]
        except (OSError, ValueError, TypeError) as exc:
            raise InputError(path, f"malformed 10x matrix ({exc})") from exc


def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise InputError(path, "10x matrix file not found")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise InputError(path, f"not a readable HDF5 file ({exc})") from exc


def read_10x_h5(path: str | Path) -> TenxMatrix:
    """Barcodes × genes counts, checked: consistent shapes, finite non-negative values, not empty."""
    path = Path(path)
    with _open(path) as f:
        m = _open_matrix(f, path)
        try:
            n_feat, n_bc = (int(v) for v in m["shape"][()])
            data = m["data"][()]
            indices = m["indices"][()].astype(np.int64)
            indptr = m["indptr"][()].astype(np.int64)
            barcodes = _strings(m["barcodes"])
            keep, genes, column, probe_level = _features(m, path)
        except (OSError, ValueError, TypeError) as exc:  # h5py raises OSError on truncated data
            raise InputError(path, f"malformed 10x matrix ({exc})") from exc
        attrs = {k: _attr(f.attrs[k]) for k in ("software_version", "chemistry_description") if k in f.attrs}

    if len(keep) != n_feat or len(barcodes) != n_bc or len(indptr) != n_bc + 1:
        raise InputError(
            path, f"matrix/shape {[n_feat, n_bc]} disagrees with {len(keep)} features, "
            f"{len(barcodes)} barcodes and {len(indptr)} indptr entries"
        )
    if len(data) != len(indices) or indptr[-1] != len(data) or np.any(np.diff(indptr) < 0):
        raise InputError(path, "matrix/indptr, indices and data are inconsistent (truncated or corrupt file?)")
    if len(indices) and (indices.min() < 0 or indices.max() >= n_feat):
        raise InputError(path, f"matrix/indices outside 0..{n_feat - 1}")
    check_counts(data, path, "matrix/data")
    if n_bc == 0 or not genes or not np.any(data[keep[indices]] != 0):
        raise InputError(path, f"empty matrix: {n_bc} barcodes, {len(genes)} genes, no non-zero gene counts")

    csc = sp.csc_matrix((data.astype(np.float32), indices, indptr), shape=(n_feat, n_bc))
    rows = csc.T.tocsr()[:, np.flatnonzero(keep)]
    if column is not None:  # probe → gene: sum the probes of each gene
        to_gene = sp.csr_matrix(
            (np.ones(len(column), np.float32), (np.arange(len(column)), column)), shape=(len(column), len(genes))
        )
        rows = rows @ to_gene
    rows = sp.csr_matrix(rows, dtype=np.float32)
    rows.sum_duplicates()
    return TenxMatrix(barcodes=barcodes, genes=genes, counts=rows, attrs=attrs, probe_level=probe_level)


def _attr(v) -> str:
    v = v[0] if isinstance(v, np.ndarray) and v.size == 1 else v
    return v.decode() if isinstance(v, bytes) else str(v)
