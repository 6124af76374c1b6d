"""Xenium output bundle: each kept molecule becomes one site (count 1, point footprint) on the H&E.

The transcripts file is streamed in chunks (parquet batches, csv blocks) twice: once for the panel's
names, once for the molecules, which go to disk in bands of the slide (:mod:`histotx.sharding.bands`).

Transcript coordinates are µm in the morphology frame; ``experiment.xenium``'s ``pixel_size`` turns
them into morphology pixels. The post-Xenium ``*_he_imagealignment.csv`` is a 3×3 affine M mapping
**H&E px → morphology px**, so a molecule lands on the H&E at inv(M) @ [x/ps, y/ps, 1]. Without an
alignment file the slide is taken to be in the morphology frame itself (H&E px = µm / pixel_size).
"""

from __future__ import annotations

import csv
import functools
import gzip
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from histotx.sharding.bands import BandedSites
from histotx.sharding.errors import InputError, read_json_object
from histotx.sharding.technologies import Folder, ReaderOptions, SampleInput
from histotx.sharding.visium import MAX_UNPLACED_FRACTION

log = logging.getLogger(__name__)

CONTROL_PREFIXES = (
    "NegControlProbe_",
    "NegControlCodeword_",
    "UnassignedCodeword_",
    "BLANK_",
    "DeprecatedCodeword_",
    "Intergenic",
    "antisense_",
)
COLUMNS = ("feature_name", "x_location", "y_location", "qv")
OPTIONAL_COLUMNS = ("is_gene",)  # Xenium ≥ 2: False for control probes and codewords
TRANSCRIPT_FILES = ("transcripts.parquet", "transcripts.csv.gz", "transcripts.csv")
BATCH_ROWS = 1 << 20  # molecules per parquet chunk
CSV_BLOCK_BYTES = 32 << 20  # bytes per csv chunk
BAND_UM = 128.0  # height of a band of the slide on disk (about one tile row)


def is_control(name: str) -> bool:
    return name.startswith(CONTROL_PREFIXES)


def find_transcripts(bundle: Path) -> Path:
    for name in TRANSCRIPT_FILES:
        if (bundle / name).is_file():
            return bundle / name
    raise InputError(bundle, f"no transcripts file: none of {', '.join(TRANSCRIPT_FILES)}")


def read_experiment(bundle: Path) -> dict:
    path = bundle / "experiment.xenium"
    exp = read_json_object(path, "experiment.xenium")
    ps = exp.get("pixel_size")
    if not isinstance(ps, (int, float)) or not ps > 0:
        raise InputError(path, "pixel_size missing or not positive")
    return exp


def _csv_header(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", newline="") as fh:
            return next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"unreadable transcripts file ({exc})") from exc


def _schema_names(path: Path) -> list[str]:
    try:
        return pq.read_schema(path).names if path.suffix == ".parquet" else _csv_header(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(path, f"unreadable transcripts file ({exc})") from exc


def _batches(path: Path, columns: tuple[str, ...], optional: tuple[str, ...] = ()) -> Iterator[pa.RecordBatch]:
    """The transcripts in chunks of about BATCH_ROWS rows, only the needed columns (and the optional ones
    present); cell_id (int or string), z, etc. are never parsed. Parquet names come dictionary-encoded."""
    names = _schema_names(path)
    missing = [c for c in columns if c not in names]
    if missing:
        raise InputError(path, f"transcripts file lacks columns {missing} (has {names})")
    columns = columns + tuple(c for c in optional if c in names)
    try:
        if path.suffix == ".parquet":
            # pre_buffer off: with it (pyarrow's default) every row group read stays cached until the file
            # closes, about 14 bytes per molecule (pyarrow 26: RSS 1.2 GB after 64 M rows, flat at 0.19 GB without).
            yield from pq.ParquetFile(path, pre_buffer=False, read_dictionary=["feature_name"]).iter_batches(
                BATCH_ROWS, columns=list(columns)
            )
        else:
            string_cols = {"feature_name": pa.string()} if "feature_name" in columns else {}
            yield from pacsv.open_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                convert_options=pacsv.ConvertOptions(include_columns=list(columns), column_types=string_cols),
            )
    except (OSError, pa.ArrowException) as exc:
        raise InputError(path, f"unreadable transcripts file ({exc})") from exc


def _names(batch: pa.RecordBatch, path: Path) -> tuple[list[str], np.ndarray]:
    """The batch's feature names and one code per molecule (parquet may store names as binary)."""
    col = batch.column("feature_name")
    if col.null_count:
        raise InputError(path, f"feature_name is empty in {col.null_count} rows")
    if not pa.types.is_dictionary(col.type):
        col = pc.dictionary_encode(col)
    names = col.dictionary
    if pa.types.is_binary(names.type) or pa.types.is_large_binary(names.type):
        names = names.cast(pa.string())
    return [str(n) for n in names.to_pylist()], col.indices.to_numpy(zero_copy_only=False)


def _panel(path: Path) -> tuple[list[tuple[str, str]], frozenset[str], int]:
    """The panel's genes (sorted, so read_genes and read_sites agree whatever the file order), the
    control features, and the number of rows: one streamed pass over the names, remembered for the
    file as it is (the vocabulary pass and the reader ask the same question).

    A control is a feature with a control prefix or, where the file has ``is_gene``, one flagged as
    not a gene in any row.
    """
    st = path.stat()
    return _panel_of(path.resolve(), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _panel_of(
    path: Path,
    size: int,  # noqa: ARG001 (with mtime_ns, part of the cache key: a rewritten file is read again)
    mtime_ns: int,  # noqa: ARG001
) -> tuple[list[tuple[str, str]], frozenset[str], int]:
    features: set[str] = set()
    controls: set[str] = set()
    rows = 0
    for batch in _batches(path, ("feature_name",), OPTIONAL_COLUMNS):
        names, codes = _names(batch, path)
        used = np.unique(codes)
        features.update(names[i] for i in used)
        if "is_gene" in batch.schema.names:
            controls.update(names[i] for i in np.unique(codes[~_is_gene(batch, path)]))
        rows += batch.num_rows
    controls.update(n for n in features if is_control(n))
    return [(n, "") for n in sorted(features - controls)], frozenset(controls), rows


def float_column(batch: pa.RecordBatch, name: str, path: Path) -> np.ndarray:
    try:
        return batch.column(name).cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InputError(path, f"column {name} is not numeric ({exc})") from exc


def _is_gene(batch: pa.RecordBatch, path: Path) -> np.ndarray:
    col = batch.column("is_gene")
    if pa.types.is_string(col.type):  # csv: "True"/"False"
        return np.isin(np.char.lower(col.to_numpy(zero_copy_only=False).astype(str)), ["true", "1"])
    try:
        return col.cast(pa.bool_()).to_numpy(zero_copy_only=False).astype(bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InputError(path, f"column is_gene is not boolean ({exc})") from exc


def find_alignment(bundle: Path, explicit: Path | None) -> Path | None:
    if explicit is not None:
        if not explicit.is_file():
            raise InputError(explicit, "alignment file not found")
        return explicit
    found = sorted(bundle.glob("*imagealignment.csv"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise InputError(bundle, f"several alignment files ({names}); name one with `alignment:`")
    return found[0] if found else None


def read_alignment(path: Path) -> np.ndarray:
    """The 3×3 affine H&E px → morphology px, checked: numeric, 3×3, last row (0, 0, 1), invertible."""
    try:
        rows = [r for r in csv.reader(path.read_text().splitlines()) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"unreadable alignment file ({exc})") from exc
    shape = f"{len(rows)}×{'/'.join(sorted({str(len(r)) for r in rows})) or 0}"
    if len(rows) != 3 or any(len(r) != 3 for r in rows):
        raise InputError(path, f"alignment matrix has the wrong shape: expected 3×3 numbers, found {shape}")
    try:
        m = np.array([[float(c.strip().strip('"')) for c in r] for r in rows])
    except ValueError as exc:
        raise InputError(path, f"alignment matrix is not numeric ({exc})") from exc
    if not np.all(np.isfinite(m)):
        raise InputError(path, "alignment matrix has NaN/inf entries")
    if not np.allclose(m[2], [0, 0, 1], atol=1e-9):
        raise InputError(path, f"not an affine matrix: last row is {m[2].tolist()}, expected [0, 0, 1] (transposed?)")
    if not np.linalg.cond(m[:2, :2]) < 1e10:
        raise InputError(path, "alignment matrix is not invertible")
    return m


def he_mpp(pixel_size: float, m: np.ndarray | None) -> float:
    """µm per H&E px: a one-pixel H&E step spans |M·e| morphology px (sqrt|det| = that length for rotation+scale)."""
    return pixel_size if m is None else pixel_size * float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))


def morphology_um_to_he_px(xy_um: np.ndarray, pixel_size: float, m: np.ndarray | None) -> np.ndarray:
    morph = np.asarray(xy_um, dtype=np.float64) / pixel_size
    if m is None:
        return morph
    inv = np.linalg.inv(m)
    return morph @ inv[:2, :2].T + inv[:2, 2]


def read_xenium(
    bundle: Path, alignment: Path | None = None, qv_min: float = 20.0, slide_px: tuple[int, int] | None = None
) -> BandedSites:
    """Molecules streamed in chunks into bands of the slide (``slide_px``: its level-0 size, when known):
    memory is bounded by a chunk and a band, not by the section's 300–500 M molecules."""
    exp = read_experiment(bundle)
    pixel_size = float(exp["pixel_size"])
    align_path = find_alignment(bundle, alignment)
    m = read_alignment(align_path) if align_path else None
    if m is None:
        log.warning("%s: no H&E alignment file; the slide is taken to be in the morphology frame", bundle)

    path = find_transcripts(bundle)
    genes, controls, n_rows = _panel(path)
    genes = list(genes)  # the cached list stays as it is
    if n_rows == 0:
        raise InputError(path, "no transcripts")
    column_of = {g: j for j, (g, _) in enumerate(genes)}
    mpp = he_mpp(pixel_size, m)
    info = {
        "transcripts": path.name,
        "pixel_size_um": pixel_size,
        "alignment": align_path.name if align_path else "none: slide taken in the morphology frame",
        "qv_min": qv_min,
        "analysis_sw_version": str(exp.get("analysis_sw_version", "")),
    }
    sites = BandedSites(
        BAND_UM / mpp,
        slide_px,
        genes,
        footprint_um=0.0,
        footprint_shape="point",
        unit_counts=True,
        panel=str(exp.get("panel_name", "")),
        mpp_estimate=mpp,
        info=info,
    )
    dropped = dict.fromkeys(("control_probe", "low_qv", "no_position"), 0)
    for batch in _batches(path, COLUMNS):
        names, codes = _names(batch, path)
        column = np.array([column_of.get(n, -1) for n in names], dtype=np.int32)
        control = np.array([n in controls for n in names], dtype=bool)[codes]
        x, y, qv = (float_column(batch, c, path) for c in ("x_location", "y_location", "qv"))
        low_qv = ~control & ~(qv >= qv_min)
        no_pos = ~control & ~low_qv & ~(np.isfinite(x) & np.isfinite(y))
        if no_pos.sum() > MAX_UNPLACED_FRACTION * max(int((~control & ~low_qv).sum()), 1):
            raise InputError(
                path,
                f"{int(no_pos.sum())} of {int((~control & ~low_qv).sum())} transcripts "
                "read have NaN/inf x_location or y_location: the file is damaged",
            )
        keep = ~(control | low_qv | no_pos)
        for reason, mask in zip(dropped, (control, low_qv, no_pos), strict=True):
            dropped[reason] += int(mask.sum())
        xy = morphology_um_to_he_px(np.stack([x[keep], y[keep]], axis=1), pixel_size, m)
        sites.add(xy, gene=column[codes[keep]])
    sites.dropped = {k: v for k, v in dropped.items() if v}
    return sites.finish()


def xenium_mpp_hint(bundle: Path, alignment: Path | None = None) -> float:
    pixel_size = float(read_experiment(bundle)["pixel_size"])
    align_path = find_alignment(bundle, alignment)
    return he_mpp(pixel_size, read_alignment(align_path) if align_path else None)


def xenium_genes(bundle: Path) -> list[tuple[str, str]]:
    return list(_panel(find_transcripts(bundle))[0])


# ---------------------------------------------------------------------------------------------- reader protocol
# (histotx.sharding.technologies.Reader; sample.options is a XeniumOptions)


def read(given: SampleInput, run: ReaderOptions) -> BandedSites:
    return read_xenium(given.data, given.resolve(given.options.alignment), run.qv_min, run.slide_px)


def mpp_hint(given: SampleInput) -> float:
    return xenium_mpp_hint(given.data, given.resolve(given.options.alignment))


def genes(given: SampleInput) -> list[tuple[str, str]]:
    return xenium_genes(given.data)


def detect(folder: Folder) -> bool:
    return "experiment.xenium" in folder.files


def scan_entries(folder: Folder) -> list[dict]:
    """The bundle's entry; an alignment file beside a slide found outside the bundle becomes its option."""
    from histotx.sharding.scan import folder_entry, rel

    entry = folder_entry(folder, "xenium")
    slide = None if entry["slide"].startswith("TODO") else (folder.base / entry["slide"]).resolve()
    if not list(folder.path.glob("*imagealignment.csv")) and slide is not None and slide.parent != folder.path:
        aligned = sorted(slide.parent.glob(f"{slide.name.split('_he_image')[0]}*imagealignment.csv"))
        if len(aligned) == 1:
            entry["options"] = {"alignment": rel(aligned[0], folder.base)}
    return [entry]
