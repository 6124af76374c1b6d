"""CosMx SMI (NanoString / Bruker, AtoMx flat-file export): each kept molecule becomes one site (count 1, point
footprint) on the H&E.

The export folder holds ``<run>_tx_file.csv[.gz]`` (one row per decoded molecule: ``fov, cell_ID, x_global_px,
y_global_px, x_local_px, y_local_px, z, target, CellComp``) and ``<run>_fov_positions_file.csv[.gz]`` (each field
of view's corner in the stitched frame: ``fov``/``FOV`` with ``x_global_px, y_global_px``, or ``x_global_mm,
y_global_mm`` in newer exports). Global pixels are the instrument camera's, ``pixel_size_um`` (0.12028 µm) each.

CosMx has no H&E of its own: the slide is registered to the stitched frame by a 3×3 affine ``alignment`` CSV
mapping **slide px → CosMx global px** (as Xenium's ``*_he_imagealignment.csv`` maps H&E px → morphology px); a
molecule lands on the slide at inv(M) @ [x_global_px, y_global_px, 1]. Without one the slide is taken to be
the stitched CosMx image itself. Negative probes and system controls (``NegPrb*``, ``SystemControl*``,
``FalseCode*``) are dropped. The transcripts are streamed in chunks to bands of the slide on disk, as Xenium's.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from histotx.sharding.bands import BandedSites
from histotx.sharding.errors import InputError
from histotx.sharding.technologies import Folder, ReaderOptions, SampleInput
from histotx.sharding.visium import MAX_UNPLACED_FRACTION
from histotx.sharding.xenium import float_column, he_mpp, read_alignment

log = logging.getLogger(__name__)

TX_SUFFIXES = ("_tx_file.csv", "_tx_file.csv.gz")
FOV_SUFFIXES = ("_fov_positions_file.csv", "_fov_positions_file.csv.gz")
COLUMNS = ("fov", "x_global_px", "y_global_px", "x_local_px", "target")
CONTROL_PREFIXES = ("NegPrb", "Negative", "SystemControl", "FalseCode")
FOV_PX = 4256  # a field of view's side in camera pixels
CSV_BLOCK_BYTES = 32 << 20
BAND_UM = 128.0
FOV_TOLERANCE_PX = 2.0  # x_global_px − x_local_px against the FOV's position: beyond, a warning


def is_control(name: str) -> bool:
    return name.startswith(CONTROL_PREFIXES)


def _one(folder: Path, suffixes: tuple[str, ...], what: str) -> Path:
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(suffixes))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise InputError(folder, f"expected one CosMx {what} (*{suffixes[0]}[.gz]), found {names}")
    return found[0]


def tx_file(folder: Path) -> Path:
    return _one(folder, TX_SUFFIXES, "transcripts file")


def fov_file(folder: Path) -> Path:
    return _one(folder, FOV_SUFFIXES, "FOV positions file")


def read_fov_positions(path: Path, pixel_size_um: float) -> dict[int, tuple[float, float]]:
    """FOV → its corner (x, y) in global px, from pixel columns or, in newer exports, millimetres."""
    try:
        table = pacsv.read_csv(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(path, f"unreadable FOV positions file ({exc})") from exc
    lower = {c.lower(): c for c in table.column_names}
    fov = lower.get("fov")
    if fov is None:
        raise InputError(path, f"no fov/FOV column (has {table.column_names})")
    if "x_global_px" in lower and "y_global_px" in lower:
        xs, ys, scale = lower["x_global_px"], lower["y_global_px"], 1.0
    elif "x_global_mm" in lower and "y_global_mm" in lower:
        xs, ys, scale = lower["x_global_mm"], lower["y_global_mm"], 1000.0 / pixel_size_um
    else:
        raise InputError(path, f"no x_global_px/y_global_px (or _mm) columns (has {table.column_names})")
    try:
        ids = table.column(fov).cast(pa.int64()).to_pylist()
        x, y = (table.column(c).cast(pa.float64()).to_numpy(zero_copy_only=False) * scale for c in (xs, ys))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InputError(path, f"FOV positions are not numeric ({exc})") from exc
    if len(set(ids)) != len(ids):
        raise InputError(path, "a FOV is listed twice")
    return {i: (float(a), float(b)) for i, a, b in zip(ids, x, y, strict=True)}


def _batches(path: Path) -> Iterator[pa.RecordBatch]:
    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
            convert_options=pacsv.ConvertOptions(include_columns=list(COLUMNS), column_types={"target": pa.string()}),
        )
        yield from reader
    except KeyError as exc:
        raise InputError(path, f"transcripts file lacks a column of {list(COLUMNS)} ({exc})") from exc
    except (OSError, pa.ArrowException) as exc:
        raise InputError(path, f"unreadable transcripts file ({exc})") from exc


def _targets(batch: pa.RecordBatch, path: Path) -> tuple[list[str], np.ndarray]:
    col = batch.column("target")
    if col.null_count:
        raise InputError(path, f"target is empty in {col.null_count} rows")
    col = pc.dictionary_encode(col)
    return [str(n) for n in col.dictionary.to_pylist()], col.indices.to_numpy(zero_copy_only=False)


@functools.lru_cache(maxsize=8)
def _panel_of(path: Path, size: int, mtime_ns: int) -> tuple[list[tuple[str, str]], int]:  # noqa: ARG001 (cache key)
    targets: set[str] = set()
    rows = 0
    for batch in _batches(path):
        names, codes = _targets(batch, path)
        targets.update(names[i] for i in np.unique(codes))
        rows += batch.num_rows
    return [(n, "") for n in sorted(t for t in targets if not is_control(t))], rows


def _panel(path: Path) -> tuple[list[tuple[str, str]], int]:
    """The panel's genes (sorted) and the number of rows: one streamed pass, remembered for the file as it is."""
    st = path.stat()
    return _panel_of(path.resolve(), st.st_size, st.st_mtime_ns)


def _fov_offset(batch: pa.RecordBatch, fovs: dict[int, tuple[float, float]], tx: Path, fov_path: Path) -> float:
    """Every molecule's FOV must be listed (else the files do not belong together); returns how far, at most,
    x_global_px − x_local_px lies from its FOV's corner (0 in an export as AtoMx writes it)."""
    ids = np.array(sorted(fovs), dtype=np.int64)
    corner_x = np.array([fovs[i][0] for i in ids.tolist()])
    fov = batch.column("fov").cast(pa.int64()).to_numpy(zero_copy_only=False)
    at = np.minimum(np.searchsorted(ids, fov), len(ids) - 1)
    unknown = ids[at] != fov
    if unknown.any():
        listed = sorted(set(fov[unknown].tolist()))[:5]
        raise InputError(fov_path, f"FOVs {listed} of {tx.name} are not listed: the files do not belong together")
    off = np.abs(float_column(batch, "x_global_px", tx) - float_column(batch, "x_local_px", tx) - corner_x[at])
    return float(np.nanmax(off, initial=0.0))


def read_cosmx(
    folder: Path, alignment: Path | None, pixel_size_um: float, slide_px: tuple[int, int] | None = None
) -> BandedSites:
    tx, fov_path = tx_file(folder), fov_file(folder)
    fovs = read_fov_positions(fov_path, pixel_size_um)
    if alignment is not None and not alignment.is_file():
        raise InputError(alignment, "alignment file not found")
    m = read_alignment(alignment) if alignment is not None else None
    if m is None:
        log.warning("%s: no slide alignment; the slide is taken to be the stitched CosMx image", folder)
    genes, n_rows = _panel(tx)
    if n_rows == 0:
        raise InputError(tx, "no transcripts")
    column_of = {g: j for j, (g, _) in enumerate(genes)}
    mpp = he_mpp(pixel_size_um, m)
    inv = np.linalg.inv(m) if m is not None else np.eye(3)
    info = {
        "transcripts": tx.name,
        "fov_positions": fov_path.name,
        "fovs": len(fovs),
        "pixel_size_um": pixel_size_um,
        "alignment": alignment.name if alignment else "none: slide taken as the stitched CosMx image",
    }
    sites = BandedSites(
        BAND_UM / mpp, slide_px, list(genes), 0.0, "point", unit_counts=True, mpp_estimate=mpp, info=info
    )
    dropped = dict.fromkeys(("control_probe", "no_position"), 0)
    offset = 0.0
    for batch in _batches(tx):
        offset = max(offset, _fov_offset(batch, fovs, tx, fov_path))
        names, codes = _targets(batch, tx)
        column = np.array([column_of.get(n, -1) for n in names], dtype=np.int32)
        control = np.array([is_control(n) for n in names], dtype=bool)[codes]
        x, y = float_column(batch, "x_global_px", tx), float_column(batch, "y_global_px", tx)
        no_pos = ~control & ~(np.isfinite(x) & np.isfinite(y))
        if no_pos.sum() > MAX_UNPLACED_FRACTION * max(int((~control).sum()), 1):
            raise InputError(tx, f"{int(no_pos.sum())} transcripts have NaN/inf global positions: the file is damaged")
        keep = ~(control | no_pos)
        dropped["control_probe"] += int(control.sum())
        dropped["no_position"] += int(no_pos.sum())
        xy = np.stack([x[keep], y[keep]], axis=1) @ inv[:2, :2].T + inv[:2, 2]
        sites.add(xy, gene=column[codes[keep]])
    sites.dropped = {k: v for k, v in dropped.items() if v}
    info["fov_offset_max_px"] = round(offset, 3)
    if offset > FOV_TOLERANCE_PX:
        log.warning("%s: x_global_px − x_local_px is up to %.0f px from the FOV positions of %s", tx, offset, fov_path)
    return sites.finish()


# ---------------------------------------------------------------------------------------------- reader protocol
# (histotx.sharding.technologies.Reader; sample.options is a CosMxOptions)


def read(given: SampleInput, run: ReaderOptions) -> BandedSites:
    o = given.options
    return read_cosmx(given.data, given.resolve(o.alignment), o.pixel_size_um, run.slide_px)


def mpp_hint(given: SampleInput) -> float:
    path = given.resolve(given.options.alignment)
    return he_mpp(given.options.pixel_size_um, read_alignment(path) if path else None)


def genes(given: SampleInput) -> list[tuple[str, str]]:
    return list(_panel(tx_file(given.data))[0])


def detect(folder: Folder) -> bool:
    return any(f.endswith(TX_SUFFIXES) for f in folder.files) and any(f.endswith(FOV_SUFFIXES) for f in folder.files)


def scan_entries(folder: Folder) -> list[dict]:
    """The export's entry, named after its run (``<run>_tx_file.csv``); the slide is an image in the export
    folder or one naming the run next to it (AtoMx writes no H&E: an alignment is the user's to add)."""
    from histotx.sharding.scan import folder_entry, guess_slide, rel, sample_id_of

    entry = folder_entry(folder, "cosmx")
    run = next(f for f in sorted(folder.files) if f.endswith(TX_SUFFIXES))
    entry["id"] = sample_id_of(run[: run.rindex("_tx_file")])
    if entry["slide"].startswith("TODO") and (slide := guess_slide([], [folder.path.parent], entry["id"])):
        entry["slide"] = rel(slide, folder.base)
    return [entry]
