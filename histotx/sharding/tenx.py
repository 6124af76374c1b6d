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
from typing import Iterator

import h5py
import numpy as np
import scipy.sparse as sp

from histotx.sharding.errors import InputError
from histotx.vocab import is_ensembl_id

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
            path,
            f"not a 10x feature-barcode matrix: no 'matrix' group (top-level groups: {groups}; "
            "Cell Ranger 2 per-genome files are not supported)",
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
    for name, gid in zip(symbols.tolist(), ids.tolist(), strict=True):
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


class TenxChunks:
    """A 10x h5 read barcode chunk by barcode chunk (CSC: each barcode's entries are contiguous), so a
    Visium HD 2 µm matrix never sits in memory whole. Shapes are checked on opening, counts per chunk."""

    def __init__(self, path: str | Path) -> None:
        self.path = path = Path(path)
        self._file = _open(path)
        try:
            self._m = m = _open_matrix(self._file, path)
            self.n_features, self.n_barcodes = (int(v) for v in m["shape"][()])
            self._indptr = m["indptr"][()].astype(np.int64)
            self._keep, self.genes, column, self.probe_level = _features(m, path)
            n_data, n_indices, n_bc = m["data"].shape[0], m["indices"].shape[0], m["barcodes"].shape[0]
        except (OSError, ValueError, TypeError) as exc:  # h5py raises OSError on truncated data
            self._file.close()
            raise InputError(path, f"malformed 10x matrix ({exc})") from exc
        self.attrs = {
            k: _attr(self._file.attrs[k])
            for k in ("software_version", "chemistry_description")
            if k in self._file.attrs
        }
        indptr = self._indptr
        if len(self._keep) != self.n_features or n_bc != self.n_barcodes or len(indptr) != n_bc + 1:
            self._file.close()
            raise InputError(
                path,
                f"matrix/shape {[self.n_features, self.n_barcodes]} disagrees with {len(self._keep)} features, "
                f"{n_bc} barcodes and {len(indptr)} indptr entries",
            )
        if n_data != n_indices or indptr[-1] != n_data or np.any(np.diff(indptr) < 0):
            self._file.close()
            raise InputError(path, "matrix/indptr, indices and data are inconsistent (truncated or corrupt file?)")
        self._kept = np.flatnonzero(self._keep)
        self._to_gene = None
        if column is not None:  # probe → gene: sum the probes of each gene
            self._to_gene = sp.csr_matrix(
                (np.ones(len(column), np.float32), (np.arange(len(column)), column)),
                shape=(len(column), len(self.genes)),
            )
        self.any_count = False  # set once a chunk holds a non-zero gene count

    def chunks(self, size: int) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        """(barcodes as str, barcodes × genes float32 CSR) of ``size`` barcodes at a time, in file order."""
        m, path, indptr = self._m, self.path, self._indptr
        for a in range(0, max(self.n_barcodes, 1), size):
            b = min(self.n_barcodes, a + size)
            lo, hi = indptr[a], indptr[b]
            try:
                data, indices = m["data"][lo:hi], m["indices"][lo:hi].astype(np.int64)
                barcodes = _strings(m["barcodes"][a:b]) if b > a else np.zeros(0, str)
            except (OSError, ValueError, TypeError) as exc:
                raise InputError(path, f"malformed 10x matrix ({exc})") from exc
            if len(indices) and (indices.min() < 0 or indices.max() >= self.n_features):
                raise InputError(path, f"matrix/indices outside 0..{self.n_features - 1}")
            check_counts(data, path, "matrix/data")
            rows = sp.csr_matrix(
                (data.astype(np.float32), indices, indptr[a : b + 1] - lo), shape=(b - a, self.n_features)
            )[:, self._kept]
            if self._to_gene is not None:
                rows = rows @ self._to_gene
            rows = sp.csr_matrix(rows, dtype=np.float32)
            rows.sum_duplicates()
            self.any_count |= bool(np.any(rows.data != 0))
            yield barcodes, rows

    def check_not_empty(self) -> None:
        """After reading every chunk: a matrix without barcodes, genes or non-zero gene counts is an error."""
        if self.n_barcodes == 0 or not self.genes or not self.any_count:
            raise InputError(
                self.path, f"empty matrix: {self.n_barcodes} barcodes, {len(self.genes)} genes, no non-zero gene counts"
            )

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "TenxChunks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_10x_h5(path: str | Path) -> TenxMatrix:
    """Barcodes × genes counts, checked: consistent shapes, finite non-negative values, not empty."""
    with TenxChunks(path) as tenx:
        ((barcodes, rows),) = tenx.chunks(max(tenx.n_barcodes, 1))
        tenx.check_not_empty()
        return TenxMatrix(
            barcodes=barcodes, genes=tenx.genes, counts=rows, attrs=tenx.attrs, probe_level=tenx.probe_level
        )


def _attr(v) -> str:
    v = v[0] if isinstance(v, np.ndarray) and v.size == 1 else v
    return v.decode() if isinstance(v, bytes) else str(v)
