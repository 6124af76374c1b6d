"""Xenium output bundle: each kept molecule becomes one site (count 1, point footprint) on the H&E.

Transcript coordinates are µm in the morphology frame; ``experiment.xenium``'s ``pixel_size`` turns
them into morphology pixels. The post-Xenium ``*_he_imagealignment.csv`` is a 3×3 affine M mapping
**H&E px → morphology px**, so a molecule lands on the H&E at inv(M) @ [x/ps, y/ps, 1]. Without an
alignment file the slide is taken to be in the morphology frame itself (H&E px = µm / pixel_size).
"""
from __future__ import annotations

import csv
import gzip
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import scipy.sparse as sp

from sharding.errors import InputError, read_json_object
from sharding.visium import MAX_UNPLACED_FRACTION
from sharding.sites import Sites

log = logging.getLogger(__name__)

CONTROL_PREFIXES = (
    "NegControlProbe_", "NegControlCodeword_", "UnassignedCodeword_", "BLANK_", "DeprecatedCodeword_",
    "Intergenic", "antisense_",
)
COLUMNS = ("feature_name", "x_location", "y_location", "qv")
OPTIONAL_COLUMNS = ("is_gene",)  # Xenium ≥ 2: False for control probes and codewords
TRANSCRIPT_FILES = ("transcripts.parquet", "transcripts.csv.gz", "transcripts.csv")


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


def _read_columns(path: Path, columns: tuple[str, ...], optional: tuple[str, ...] = ()) -> pa.Table:
    """Only the needed columns (and the optional ones present); cell_id (int or string), z, etc. are never parsed."""
    try:
        names = pq.read_schema(path).names if path.suffix == ".parquet" else _csv_header(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(path, f"unreadable transcripts file ({exc})") from exc
    missing = [c for c in columns if c not in names]
    if missing:
        raise InputError(path, f"transcripts file lacks columns {missing} (has {names})")
    columns = columns + tuple(c for c in optional if c in names)
    try:
        if path.suffix == ".parquet":
            return pq.read_table(path, columns=list(columns))
        string_cols = {"feature_name": pa.string()} if "feature_name" in columns else {}
        opts = pacsv.ConvertOptions(include_columns=list(columns), column_types=string_cols)
        return pacsv.read_csv(path, convert_options=opts)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(path, f"unreadable transcripts file ({exc})") from exc


def _panel(table: pa.Table, path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Feature names, one code per molecule, and which codes are controls.

    A control is a feature with a control prefix or, where the file has ``is_gene``, one flagged as
    not a gene. Parquet may store names as binary.
    """
    col = table.column("feature_name")
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        col = col.cast(pa.string())
    if col.null_count:
        raise InputError(path, f"feature_name is empty in {col.null_count} rows")
    enc = pc.dictionary_encode(col).combine_chunks()
    names = [str(n) for n in enc.dictionary.to_pylist()]
    codes = enc.indices.to_numpy(zero_copy_only=False)
    control = np.array([is_control(n) for n in names], dtype=bool)
    if "is_gene" in table.column_names:
        control[np.unique(codes[~_is_gene(table, path)])] = True
    return names, codes, control


def _floats(table: pa.Table, name: str, path: Path) -> np.ndarray:
    try:
        return table.column(name).cast(pa.float64()).to_numpy().astype(np.float64, copy=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InputError(path, f"column {name} is not numeric ({exc})") from exc


def _is_gene(table: pa.Table, path: Path) -> np.ndarray:
    col = table.column("is_gene")
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


def _genes(names: list[str], control_code: np.ndarray) -> list[tuple[str, str]]:
    """The panel's genes, sorted so that read_genes and read_sites agree whatever the file order."""
    return [(n, "") for n in sorted(n for n, c in zip(names, control_code) if not c)]


def read_xenium(bundle: Path, alignment: Path | None = None, qv_min: float = 20.0) -> Sites:
    exp = read_experiment(bundle)
    pixel_size = float(exp["pixel_size"])
    align_path = find_alignment(bundle, alignment)
    m = read_alignment(align_path) if align_path else None
    if m is None:
        log.warning("%s: no H&E alignment file; the slide is taken to be in the morphology frame", bundle)

    path = find_transcripts(bundle)
    table = _read_columns(path, COLUMNS, OPTIONAL_COLUMNS)
    names, codes, control_code = _panel(table, path)
    x, y, qv = (_floats(table, c, path) for c in ("x_location", "y_location", "qv"))
    if len(codes) == 0:
        raise InputError(path, "no transcripts")

    control = control_code[codes]
    low_qv = ~control & ~(qv >= qv_min)
    no_pos = ~control & ~low_qv & ~(np.isfinite(x) & np.isfinite(y))
    if no_pos.sum() > MAX_UNPLACED_FRACTION * max(int((~control & ~low_qv).sum()), 1):
        raise InputError(path, f"{int(no_pos.sum())} of {int((~control & ~low_qv).sum())} transcripts "
                               "read have NaN/inf x_location or y_location: the file is damaged")
    keep = ~(control | low_qv | no_pos)
    reasons = {"control_probe": control, "low_qv": low_qv, "no_position": no_pos}
    dropped = {k: int(v.sum()) for k, v in reasons.items() if v.any()}

    genes = _genes(names, control_code)
    column = np.full(len(names), -1, dtype=np.int64)
    code_of = {name: i for i, name in enumerate(names)}
    column[[code_of[g] for g, _ in genes]] = np.arange(len(genes))
    n = int(keep.sum())
    counts = sp.csr_matrix(
        (np.ones(n, np.float32), column[codes[keep]], np.arange(n + 1)), shape=(n, len(genes))
    )
    xy = morphology_um_to_he_px(np.stack([x[keep], y[keep]], axis=1), pixel_size, m)
    info = {
        "transcripts": path.name,
        "pixel_size_um": pixel_size,
        "alignment": align_path.name if align_path else "none: slide taken in the morphology frame",
        "qv_min": qv_min,
        "analysis_sw_version": str(exp.get("analysis_sw_version", "")),
    }
    return Sites(
        xy_px=xy, counts=counts, genes=genes, footprint_um=0.0, footprint_shape="point",
        panel=str(exp.get("panel_name", "")), dropped=dropped, mpp_estimate=he_mpp(pixel_size, m), info=info,
    )


def xenium_mpp_hint(bundle: Path, alignment: Path | None = None) -> float:
    pixel_size = float(read_experiment(bundle)["pixel_size"])
    align_path = find_alignment(bundle, alignment)
    return he_mpp(pixel_size, read_alignment(align_path) if align_path else None)


def xenium_genes(bundle: Path) -> list[tuple[str, str]]:
    path = find_transcripts(bundle)
    names, _, control_code = _panel(_read_columns(path, ("feature_name",), OPTIONAL_COLUMNS), path)
    return _genes(names, control_code)
