"""Sites kept on disk in horizontal bands of the slide, so a reader's memory is bounded by one band.

A Xenium section holds 300–500 M molecules and a Visium HD 2 µm sample tens of millions of bins:
held in memory (positions, CSR counts and the reader's own columns) that is 25–40 GB per worker.
Readers instead stream their input in chunks and append each site to the band holding its level-0 y
(raw little-endian files per band and array, in a scratch folder removed with the object); tiling
then asks for the sites under one tile at a time (:meth:`BandedSites.in_box`) and only the bands of
the current tile row are in memory, sorted by x once per row.

Per site: x, y (float64 level-0 px), seq (int64 position in the input, so the read order can be
restored) and, unless every site is one molecule of count 1, nnz; per entry: gene column (int32)
and count (float32).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import scipy.sparse as sp

from histotx.sharding.sites import mark_tiles

FLUSH_SITES = 1 << 21  # buffered sites (all bands) before appending to the band files
FLUSH_ENTRIES = 1 << 22  # ... or buffered (gene, count) entries, whichever comes first (HD bins hold ~10 each)
_SITE_ARRAYS = {"x": np.float64, "y": np.float64, "seq": np.int64, "nnz": np.int32}
_ENTRY_ARRAYS = {"gene": np.int32, "count": np.float32}


@dataclass
class _Row:
    """The sites of the bands under one tile row, sorted by x."""

    bands: tuple[int, int]
    x: np.ndarray
    y: np.ndarray
    seq: np.ndarray
    counts: sp.csr_matrix


@dataclass
class BandedSites:
    """A :class:`~histotx.sharding.sites.Sites` look-alike whose sites live on disk, one band of ``band_px`` rows
    each. Fill with :meth:`add`, then :meth:`finish`; sites off the slide (``slide_px``, when known) are
    counted, not kept."""

    band_px: float
    slide_px: tuple[int, int] | None
    genes: list[tuple[str, str]]
    footprint_um: float
    footprint_shape: str
    unit_counts: bool  # every site is one molecule (one entry of count 1): nnz and count are not stored
    panel: str = ""
    dropped: dict[str, int] = field(default_factory=dict)
    mpp_estimate: float | None = None
    info: dict = field(default_factory=dict)
    footprint_angle_deg: float = 0.0  # as Sites'
    n_kept: int = 0  # sites handed out by in_box (tiles do not overlap, so each once)

    def __post_init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="histotx-bands-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, True)
        self.band_sites: dict[int, int] = {}  # band index (floor(y / band_px)) → sites stored
        self.n_outside = 0
        self._seq = 0
        self._buffer: list[tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]] = []
        self._buffered = 0
        self._buffered_entries = 0
        self._row: _Row | None = None
        # Most sites held in memory at once: buffered before a flush, or loaded from the bands (one tile row, or
        # one band while finding the occupied tiles). Bounded by FLUSH_SITES and the densest tile row, not by
        # the sample: the tests check it.
        self.peak_buffered = 0
        self.peak_loaded = 0

    # ------------------------------------------------------------------------------------------ writing
    def add(self, xy: np.ndarray, counts: sp.csr_matrix | None = None, gene: np.ndarray | None = None) -> None:
        """Append sites in input order: ``counts`` (CSR, one row per site) or, for unit sites, ``gene``."""
        n = len(xy)
        seq = np.arange(self._seq, self._seq + n, dtype=np.int64)
        self._seq += n
        x, y = xy[:, 0], xy[:, 1]
        on = np.isfinite(x) & np.isfinite(y)
        if self.slide_px is not None:
            on &= (x >= 0) & (x < self.slide_px[0]) & (y >= 0) & (y < self.slide_px[1])
        self.n_outside += int(n - on.sum())
        band = (y[on] // self.band_px).astype(np.int64)
        sites = {"x": x[on], "y": y[on], "seq": seq[on]}
        if self.unit_counts:
            entries = {"gene": np.asarray(gene)[on]}
        else:
            counts = counts[np.flatnonzero(on)]
            sites["nnz"] = np.diff(counts.indptr)
            entries = {"gene": counts.indices, "count": counts.data}
        self._buffer.append((band, sites, entries))
        self._buffered += len(band)
        self._buffered_entries += len(entries["gene"])
        self.peak_buffered = max(self.peak_buffered, self._buffered)
        if self._buffered >= FLUSH_SITES or self._buffered_entries >= FLUSH_ENTRIES:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        band = np.concatenate([b for b, _, _ in self._buffer])
        sites = {k: np.concatenate([s[k] for _, s, _ in self._buffer]) for k in self._buffer[0][1]}
        entries = {k: np.concatenate([e[k] for _, _, e in self._buffer]) for k in self._buffer[0][2]}
        self._buffer, self._buffered, self._buffered_entries = [], 0, 0
        if not len(band):  # every buffered site was off the slide
            return
        shifted = band - band.min()
        if shifted.max() < 1 << 16:
            shifted = shifted.astype(np.uint16)  # numpy sorts 16-bit keys stably by radix: linear time
        order = np.argsort(shifted, kind="stable")
        sorted_band = band[order]
        starts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_band)) + 1, [len(band)]])
        present = sorted_band[starts[:-1]]
        if self.unit_counts:
            entry_of = order
            entry_starts = starts
        else:
            nnz = sites["nnz"][order]
            first = np.concatenate([[0], np.cumsum(sites["nnz"])])[:-1][order]
            entry_of = np.repeat(first, nnz) + (np.arange(nnz.sum()) - np.repeat(np.cumsum(nnz) - nnz, nnz))
            entry_starts = np.concatenate([[0], np.cumsum(nnz)])[starts]
        for i, b in enumerate(present.tolist()):
            rows = order[starts[i] : starts[i + 1]]
            ents = entry_of[entry_starts[i] : entry_starts[i + 1]]
            for name, arr in sites.items():
                self._append(b, name, arr[rows].astype(_SITE_ARRAYS[name], copy=False))
            for name, arr in entries.items():
                self._append(b, name, arr[ents].astype(_ENTRY_ARRAYS[name], copy=False))
            self.band_sites[b] = self.band_sites.get(b, 0) + len(rows)

    def _append(self, band: int, name: str, arr: np.ndarray) -> None:
        with open(self.folder / f"{band:06d}.{name}", "ab") as fh:
            arr.tofile(fh)

    def finish(self) -> "BandedSites":
        self._flush()
        return self

    # ------------------------------------------------------------------------------------------ reading
    @property
    def n_sites(self) -> int:
        """Sites read, including those off the slide (as for in-memory Sites)."""
        return sum(self.band_sites.values()) + self.n_outside

    def count_outside(self, width: int, height: int) -> int:
        if self.slide_px is None or (width, height) != tuple(self.slide_px):
            raise ValueError(f"sites were banded for a slide of {self.slide_px} px, not {width}×{height}")
        return self.n_outside

    def _load(self, b: int) -> tuple[dict[str, np.ndarray], sp.csr_matrix]:
        sites = {name: self._array(b, name) for name in _SITE_ARRAYS if not (name == "nnz" and self.unit_counts)}
        n = len(sites["x"])
        gene_path = self.folder / f"{b:06d}.gene"
        gene = np.fromfile(gene_path, dtype=np.int32) if gene_path.exists() else np.zeros(0, np.int32)
        if self.unit_counts:
            indptr, count = np.arange(n + 1, dtype=np.int64), np.ones(n, np.float32)
        else:
            indptr = np.concatenate([[0], np.cumsum(sites.pop("nnz"), dtype=np.int64)])
            count_path = self.folder / f"{b:06d}.count"
            count = np.fromfile(count_path, dtype=np.float32) if count_path.exists() else np.zeros(0, np.float32)
        return sites, sp.csr_matrix((count, gene, indptr), shape=(n, len(self.genes)))

    def _array(self, b: int, name: str) -> np.ndarray:
        path = self.folder / f"{b:06d}.{name}"
        dtype = _SITE_ARRAYS[name]
        return np.fromfile(path, dtype=dtype) if path.exists() else np.zeros(0, dtype)

    def positions(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every on-slide site's (x, y) level-0 px, one band at a time (band order; input order within a band)."""
        for b in sorted(self.band_sites):
            x, y = self._array(b, "x"), self._array(b, "y")
            self.peak_loaded = max(self.peak_loaded, len(x))
            yield x, y

    def occupied_tiles(self, size0: float, n_cols: int, n_rows: int) -> np.ndarray:
        """(n_rows × n_cols,) bool, row-major: which tiles of a grid of ``size0`` px squares hold a site
        centre. Reads one band's positions at a time, never the sample."""
        occupied = np.zeros(n_rows * n_cols, dtype=bool)
        for x, y in self.positions():
            mark_tiles(occupied, x, y, size0, n_cols, n_rows)
        return occupied

    def _bands(self, bands: list[int], key: tuple[int, int], order_by: str) -> _Row:
        loaded = [self._load(b) for b in bands if b in self.band_sites]
        self.peak_loaded = max(self.peak_loaded, sum(len(s["x"]) for s, _ in loaded))
        cat = {
            k: np.concatenate([s[k] for s, _ in loaded] or [np.zeros(0, _SITE_ARRAYS[k])]) for k in ("x", "y", "seq")
        }
        counts = sp.vstack([c for _, c in loaded], format="csr") if loaded else sp.csr_matrix((0, len(self.genes)))
        order = np.argsort(cat[order_by], kind="stable")
        return _Row(key, cat["x"][order], cat["y"][order], cat["seq"][order], counts[order])

    def in_box(self, x0: float, y0: float, x1: float, y1: float) -> tuple[np.ndarray, sp.csr_matrix]:
        """Sites with centre in [x0, x1) × [y0, y1), in input order: (xy level-0 px, CSR counts).
        Boxes are asked for row by row, so the bands of a row are loaded once."""
        key = (int(y0 // self.band_px), int(np.ceil(y1 / self.band_px)))
        if self._row is None or self._row.bands != key:
            self._row = None  # free the previous row before loading the next
            self._row = self._bands(list(range(*key)), key, "x")
        row = self._row
        lo, hi = np.searchsorted(row.x, [x0, x1], side="left")
        cand = np.arange(lo, hi)
        cand = cand[(row.y[lo:hi] >= y0) & (row.y[lo:hi] < y1)]
        cand = cand[np.argsort(row.seq[cand], kind="stable")]
        self.n_kept += len(cand)
        return np.stack([row.x[cand], row.y[cand]], axis=1), row.counts[cand]

    # ----------------------------------------------------------------- everything at once (tests, small data)
    def _all(self) -> _Row:
        return self._bands(sorted(self.band_sites), (0, 0), "seq")

    @property
    def xy_px(self) -> np.ndarray:
        """Every on-slide site in input order (loads all bands: for tests and small samples)."""
        row = self._all()
        return np.stack([row.x, row.y], axis=1)

    @property
    def counts(self) -> sp.csr_matrix:
        return self._all().counts
