"""Visium HD: one binned output (``binned_outputs/square_{002,008,016}um``), native bins kept, not pooled.

Each bin is a site with a square footprint of its side; the pixel size comes from the scalefactors'
``microns_per_pixel`` (HD has no spot lattice to estimate it from).

A 2 µm output lists every bin of the capture area (11 M rows) and holds tens of millions of non-zeros,
so nothing is read whole: the positions are streamed into a table keyed by (array_row, array_col), and
the matrix is read in barcode chunks, each barcode placed through the bin its name gives
(``s_002um_RRRRR_CCCCC-1``) and written to bands of the slide on disk (:mod:`histotx.sharding.bands`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from histotx.sharding.bands import BandedSites
from histotx.sharding.errors import InputError
from histotx.sharding.technologies import Folder, ReaderOptions, SampleInput
from histotx.sharding.tenx import TenxChunks, read_10x_genes
from histotx.sharding.visium import (
    MAX_UNPLACED_FRACTION,
    POSITION_COLUMNS,
    SQUARE_FOLDER,
    find_matrix,
    find_positions,
    image_scale_factor,
    read_positions,
    read_scalefactors,
    spaceranger_entry,
)

log = logging.getLogger(__name__)

CHUNK_BARCODES = 1 << 19  # matrix barcodes per chunk
BAND_UM = 128.0  # height of a band of the slide on disk (about one tile row)


def bin_dir(data: Path, bin_size_um: float) -> Path:
    """The ``square_XXXum`` folder; `data` may be the outs/, its binned_outputs/, or the bin folder itself."""
    if data.name.startswith("square_"):
        return data
    binned = data if data.name == "binned_outputs" else data / "binned_outputs"
    if not binned.is_dir():
        raise InputError(data, "not a Visium HD output: no binned_outputs/")
    if float(bin_size_um) != int(bin_size_um) or bin_size_um <= 0:
        raise InputError(binned, f"bin_size_um must be a whole number of µm, got {bin_size_um}")
    folder = binned / f"square_{int(bin_size_um):03d}um"
    if not folder.is_dir():
        found = ", ".join(sorted(p.name for p in binned.glob("square_*um"))) or "none"
        raise InputError(folder, f"no {bin_size_um:g} µm binned output (found: {found})")
    return folder


def _microns_per_pixel(sf: dict, spatial: Path) -> float:
    mpp = sf.get("microns_per_pixel")
    if not isinstance(mpp, (int, float)) or not mpp > 0:
        raise InputError(spatial / "scalefactors_json.json", "microns_per_pixel missing or not positive")
    return float(mpp)


class BinTable:
    """Every listed bin's position and in_tissue flag, looked up by (array_row, array_col)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        keys, x, y, tissue = [], [], [], []
        for batch in _position_batches(path):
            cols = {c: batch.column(c).to_numpy(zero_copy_only=False) for c in POSITION_COLUMNS[1:]}
            keys.append(_key(cols["array_row"], cols["array_col"]))
            x.append(cols["pxl_col_in_fullres"].astype(np.float64))
            y.append(cols["pxl_row_in_fullres"].astype(np.float64))
            tissue.append(cols["in_tissue"] != 0)
        # joined one array at a time, each list freed once joined (a full 2 µm area lists 11.2 M bins, 25 bytes each
        # in the table): building it peaked at 0.9 GB above the table with every list and copy alive, now 0.5 GB
        self.keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        del keys
        order = None  # Space Ranger lists bins row by row: usually sorted already
        if len(self.keys) > 1 and not np.all(self.keys[1:] >= self.keys[:-1]):
            order = np.argsort(self.keys, kind="stable")
            self.keys = self.keys[order]
        self.x = _joined(x, np.float64, order)
        self.y = _joined(y, np.float64, order)
        self.in_tissue = _joined(tissue, bool, order)

    def lookup(self, barcodes: np.ndarray, matrix_path: Path) -> np.ndarray:
        """Row of each barcode's bin in the table, -1 where the table does not list it."""
        key = _key(*parse_bin_barcodes(barcodes, matrix_path))
        if not len(self.keys):
            return np.full(len(key), -1)
        at = np.minimum(np.searchsorted(self.keys, key), len(self.keys) - 1)
        return np.where(self.keys[at] == key, at, -1)


def _joined(parts: list[np.ndarray], dtype, order: np.ndarray | None) -> np.ndarray:
    """The parts as one array (emptied list: each part freed as soon as it is copied), reordered by ``order``."""
    out = np.concatenate(parts) if parts else np.zeros(0, dtype)
    parts.clear()
    return out if order is None else out[order]


def _key(row: np.ndarray, col: np.ndarray) -> np.ndarray:
    return row.astype(np.int64) << 32 | col.astype(np.int64)


def _position_batches(path: Path):
    """tissue_positions in batches (the parquet streamed; a csv, as older outputs have, read whole)."""
    if path.suffix != ".parquet":
        yield pa.RecordBatch.from_pandas(read_positions(path), preserve_index=False)
        return
    try:
        names = pq.read_schema(path).names
        missing = [c for c in POSITION_COLUMNS if c not in names]
        if missing:
            raise InputError(path, f"positions file lacks columns {missing}")
        # pre_buffer off, as for Xenium transcripts (sharding/xenium.py): read row groups are not kept
        for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(1 << 20, columns=POSITION_COLUMNS[1:]):
            for c in POSITION_COLUMNS[1:]:
                if not (pa.types.is_integer(batch.column(c).type) or pa.types.is_floating(batch.column(c).type)):
                    raise InputError(path, f"column {c} is not numeric")
            yield batch
    except (OSError, pa.ArrowException) as exc:
        raise InputError(path, f"unreadable positions file ({exc})") from exc


def parse_bin_barcodes(barcodes: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(array_row, array_col) from Space Ranger's bin barcodes ``s_XXXum_RRRRR_CCCCC-N``, vectorised."""
    barcodes = np.asarray(barcodes, dtype=str)
    if not len(barcodes):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    codes = barcodes.view(np.uint32).reshape(len(barcodes), -1)  # fixed-width UTF-32
    if codes.shape[1] < 19:
        raise InputError(path, f"barcode {barcodes[0]!r} does not name its bin (expected s_002um_RRRRR_CCCCC-1)")
    digits = codes[:, np.r_[8:13, 14:19]].astype(np.int64) - ord("0")
    sep = codes[:, [0, 1, 5, 6, 7, 13]]
    ok = np.all((digits >= 0) & (digits <= 9), axis=1) & np.all(sep == [ord(c) for c in "s_um__"], axis=1)
    if not ok.all():
        bad = barcodes[np.flatnonzero(~ok)[0]]
        raise InputError(path, f"barcode {bad!r} does not name its bin (expected s_002um_RRRRR_CCCCC-1)")
    weights = 10 ** np.arange(4, -1, -1)
    return digits[:, :5] @ weights, digits[:, 5:] @ weights


def read_visium_hd(
    data: Path,
    bin_size_um: float = 2.0,
    image_scale: str = "fullres",
    in_tissue_only: bool = True,
    slide_px: tuple[int, int] | None = None,
) -> BandedSites:
    folder = bin_dir(data, bin_size_um)
    spatial = folder / "spatial"
    sf = read_scalefactors(spatial)
    scale = image_scale_factor(sf, image_scale, spatial)
    side = float(sf.get("bin_size_um", bin_size_um))
    if abs(side - float(bin_size_um)) > 1e-6 and not data.name.startswith("square_"):
        raise InputError(spatial / "scalefactors_json.json", f"bin_size_um is {side:g}, expected {bin_size_um:g}")
    mpp = _microns_per_pixel(sf, spatial) / scale
    pos_path, matrix_path = find_positions(spatial), find_matrix(folder)
    bins = BinTable(pos_path)
    dropped = {"no_position": 0, "not_in_tissue": 0}
    with TenxChunks(matrix_path) as tenx:
        info = {
            "positions": pos_path.name,
            "matrix": matrix_path.name,
            "image_scale": image_scale,
            "scale_factor": scale,
            "probe_level": tenx.probe_level,
            **tenx.attrs,
            "bin_size_um": side,
            "mpp_source": "scalefactors microns_per_pixel",
        }
        sites = BandedSites(
            BAND_UM / mpp,
            slide_px,
            tenx.genes,
            footprint_um=side,
            footprint_shape="square",
            unit_counts=False,
            panel=tenx.attrs.get("chemistry_description", ""),
            mpp_estimate=mpp,
            info=info,
        )
        example = None
        for barcodes, counts in tenx.chunks(CHUNK_BARCODES):
            at = bins.lookup(barcodes, matrix_path)
            has = at >= 0
            x, y = np.full(len(at), np.nan), np.full(len(at), np.nan)
            x[has], y[has] = bins.x[at[has]], bins.y[at[has]]
            located = np.isfinite(x) & np.isfinite(y)
            keep = located
            if in_tissue_only:
                tissue = np.zeros(len(at), dtype=bool)
                tissue[has] = bins.in_tissue[at[has]]
                dropped["not_in_tissue"] += int((located & ~tissue).sum())
                keep = located & tissue
            dropped["no_position"] += int((~located).sum())
            if example is None and (~located).any():
                example = str(barcodes[int(np.flatnonzero(~located)[0])])
            rows = np.flatnonzero(keep)
            sites.add(np.stack([x[rows], y[rows]], axis=1) * scale, counts=counts[rows])
        tenx.check_not_empty()
    if dropped["no_position"] > MAX_UNPLACED_FRACTION * tenx.n_barcodes:  # same policy as Visium
        raise InputError(
            pos_path,
            f"{dropped['no_position']} of {tenx.n_barcodes} barcodes of {matrix_path.name} "
            f"have no position here (e.g. {example}): the positions file is incomplete or "
            "from another run",
        )
    if dropped["no_position"]:
        log.warning(
            "%s: %d barcodes of %s have no position; dropped", pos_path, dropped["no_position"], matrix_path.name
        )
    sites.dropped = {k: v for k, v in dropped.items() if v}
    return sites.finish()


def visium_hd_mpp_hint(data: Path, bin_size_um: float = 2.0, image_scale: str = "fullres") -> float:
    spatial = bin_dir(data, bin_size_um) / "spatial"
    sf = read_scalefactors(spatial)
    return _microns_per_pixel(sf, spatial) / image_scale_factor(sf, image_scale, spatial)


def visium_hd_genes(data: Path, bin_size_um: float = 2.0) -> list[tuple[str, str]]:
    return read_10x_genes(find_matrix(bin_dir(data, bin_size_um)))


# ---------------------------------------------------------------------------------------------- reader protocol
# (histotx.sharding.technologies.Reader; sample.options is a VisiumHDOptions)


def read(given: SampleInput, run: ReaderOptions) -> BandedSites:
    o = given.options
    return read_visium_hd(given.data, o.bin_size_um, o.image_scale, run.in_tissue_only, run.slide_px)


def mpp_hint(given: SampleInput) -> float:
    return visium_hd_mpp_hint(given.data, given.options.bin_size_um, given.options.image_scale)


def genes(given: SampleInput) -> list[tuple[str, str]]:
    return visium_hd_genes(given.data, given.options.bin_size_um)


def detect(folder: Folder) -> bool:
    name = folder.path.name
    return "binned_outputs" in folder.dirs or name == "binned_outputs" or bool(SQUARE_FOLDER.fullmatch(name))


def scan_entries(folder: Folder) -> list[dict]:
    """Bins of 2 µm when that output is there (else the smallest found)."""
    entry = spaceranger_entry(folder, "visium_hd")
    path = folder.path
    binned = path if path.name == "binned_outputs" or SQUARE_FOLDER.fullmatch(path.name) else path / "binned_outputs"
    folders = [binned] if SQUARE_FOLDER.fullmatch(binned.name) else binned.glob("square_*um")
    sizes = sorted(int(m.group(1)) for p in folders if (m := SQUARE_FOLDER.fullmatch(p.name)))
    entry["options"] = {"bin_size_um": 2 if 2 in sizes or not sizes else sizes[0], "image_scale": "fullres"}
    return [entry]
