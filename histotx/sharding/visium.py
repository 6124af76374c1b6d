"""Visium (Space Ranger ``outs/``): spot positions + 10x matrix → Sites on the slide's pixels.

Also the shared Space Ranger pieces Visium HD reuses: the positions file in its three variants
(SR 1.x csv without header, SR ≥ 2 csv with header, HD parquet), scalefactors, image scale, and the
barcode matching. Barcode matching policy: a matrix barcode missing from the positions file is
dropped and counted as ``no_position`` (and logged); when more than ``MAX_UNPLACED_FRACTION`` of them
(or all) have no position, the positions file is incomplete or the files do not belong together, and
the sample fails with an InputError. A barcode listed twice in either file is an InputError too.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from histotx.sharding.errors import InputError, read_json_object
from histotx.sharding.sites import Sites
from histotx.sharding.technologies import Folder, ReaderOptions, SampleInput
from histotx.sharding.tenx import TenxMatrix, read_10x_genes, read_10x_h5

log = logging.getLogger(__name__)

SPOT_DIAMETER_UM = 55.0  # the physical capture spot
SPOT_PITCH_UM = 100.0  # centre-to-centre; same-row neighbours differ by 2 in array_col
THEORETICAL_SPOT_UM = 65.0  # what spot_diameter_fullres spans
POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
POSITION_FILES = ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv")
MATRIX_FILES = ("filtered_feature_bc_matrix.h5", "raw_feature_bc_matrix.h5", "raw_probe_bc_matrix.h5")
SCALE_KEYS = {"hires": "tissue_hires_scalef", "lowres": "tissue_lowres_scalef"}
MAX_UNPLACED_FRACTION = 0.05  # more matrix barcodes than this without a position fail the sample


def find_positions(spatial: Path) -> Path:
    for name in POSITION_FILES:
        if (spatial / name).is_file():
            return spatial / name
    raise InputError(spatial, f"positions file missing: none of {', '.join(POSITION_FILES)}")


def read_positions(path: Path) -> pd.DataFrame:
    """The six standard columns, whichever variant; a csv's header is sniffed, not assumed from its name."""
    try:
        if path.suffix == ".parquet":
            df = pq.read_table(path).to_pandas()
        else:
            with open(path) as fh:
                first = fh.readline()
            has_header = first.split(",")[0].strip().strip('"') == "barcode"
            df = pd.read_csv(path, header=0 if has_header else None, dtype={"barcode" if has_header else 0: str})
            if not has_header:
                if df.shape[1] != len(POSITION_COLUMNS):
                    raise InputError(path, f"expected {len(POSITION_COLUMNS)} columns, found {df.shape[1]}")
                df.columns = POSITION_COLUMNS
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise InputError(path, f"unreadable positions file ({exc})") from exc
    missing = [c for c in POSITION_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(path, f"positions file lacks columns {missing}")
    df = df[POSITION_COLUMNS].copy()
    df["barcode"] = df["barcode"].astype(str)
    for c in POSITION_COLUMNS[1:]:
        if not pd.api.types.is_numeric_dtype(df[c]):
            raise InputError(path, f"column {c} is not numeric")
    return df


def read_scalefactors(spatial: Path) -> dict:
    path = spatial / "scalefactors_json.json"
    return read_json_object(path, "scalefactors")


def image_scale_factor(sf: dict, image_scale: str, spatial: Path) -> float:
    """Full-res px → px of the image the cohort names as the slide."""
    if image_scale == "fullres":
        return 1.0
    key = SCALE_KEYS.get(image_scale)
    if key is None:
        raise InputError(None, f"image_scale must be fullres, hires or lowres, got {image_scale!r}")
    value = sf.get(key)
    if not isinstance(value, (int, float)) or not value > 0:
        raise InputError(
            spatial / "scalefactors_json.json", f"{key} missing or not positive (needed for image_scale {image_scale})"
        )
    return float(value)


def lattice_mpp(pos: pd.DataFrame) -> tuple[float | None, int]:
    """µm per full-res px from the spot lattice: 100 µm / mean distance of same-row spots 2 columns apart.

    The mean over all pairs, because positions are whole pixels (pairs are 137 or 138 px apart in real
    files; the median would be off by 0.3 %).
    """
    s = pos.sort_values(["array_row", "array_col"])
    r, c = s["array_row"].to_numpy(), s["array_col"].to_numpy()
    x, y = s["pxl_col_in_fullres"].to_numpy(float), s["pxl_row_in_fullres"].to_numpy(float)
    pair = (r[1:] == r[:-1]) & (c[1:] - c[:-1] == 2)
    d = np.hypot(np.diff(x), np.diff(y))[pair]
    d = d[np.isfinite(d) & (d > 0)]
    return (SPOT_PITCH_UM / float(d.mean()), int(d.size)) if d.size else (None, 0)


def visium_mpp_fullres(pos: pd.DataFrame, sf: dict) -> tuple[float | None, str]:
    mpp, n = lattice_mpp(pos)
    if mpp is not None:
        return mpp, f"spot lattice ({n} neighbour pairs)"
    diameter = sf.get("spot_diameter_fullres")
    if isinstance(diameter, (int, float)) and diameter > 0:
        return THEORETICAL_SPOT_UM / float(diameter), "65 µm / spot_diameter_fullres"
    return None, "unknown"


def find_matrix(outs: Path) -> Path:
    for name in MATRIX_FILES:
        if (outs / name).is_file():
            return outs / name
    raise InputError(outs, f"no feature-barcode matrix: none of {', '.join(MATRIX_FILES)}")


def place_barcodes(
    matrix: TenxMatrix, pos: pd.DataFrame, pos_path: Path, matrix_path: Path, scale: float, in_tissue_only: bool
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Match matrix barcodes to positions → (kept row indices, xy in slide px, dropped counts)."""
    for barcodes, path in ((pos["barcode"], pos_path), (pd.Series(matrix.barcodes), matrix_path)):
        dup = barcodes[barcodes.duplicated()]
        if len(dup):
            raise InputError(
                path,
                f"{len(dup)} duplicated barcodes (e.g. {dup.iloc[0]} appears "
                f"{int((barcodes == dup.iloc[0]).sum())} times): every spot must be listed once",
            )
    where = pd.Index(pos["barcode"]).get_indexer(matrix.barcodes)
    dropped: dict[str, int] = {}
    has_pos = where >= 0
    if not has_pos.any():
        raise InputError(
            pos_path,
            f"none of the {len(where)} barcodes of {matrix_path.name} is in the positions file "
            f"(e.g. {matrix.barcodes[0]}): the files are from different runs",
        )
    x = np.full(len(where), np.nan)
    y = np.full(len(where), np.nan)
    x[has_pos] = pos["pxl_col_in_fullres"].to_numpy(float)[where[has_pos]]
    y[has_pos] = pos["pxl_row_in_fullres"].to_numpy(float)[where[has_pos]]
    located = np.isfinite(x) & np.isfinite(y)
    if (~located).sum() > MAX_UNPLACED_FRACTION * len(located):
        first = matrix.barcodes[int(np.flatnonzero(~located)[0])]
        raise InputError(
            pos_path,
            f"{int((~located).sum())} of {len(located)} barcodes of {matrix_path.name} "
            f"have no position here (e.g. {first}): the positions file is incomplete or "
            "from another run",
        )
    if (~located).any():
        dropped["no_position"] = int((~located).sum())
        log.warning(
            "%s: %d barcodes of %s have no position; dropped", pos_path, dropped["no_position"], matrix_path.name
        )
    keep = located
    if in_tissue_only:
        in_tissue = np.zeros(len(where), dtype=bool)
        in_tissue[has_pos] = pos["in_tissue"].to_numpy()[where[has_pos]] != 0
        if (located & ~in_tissue).any():
            dropped["not_in_tissue"] = int((located & ~in_tissue).sum())
        keep = located & in_tissue
    rows = np.flatnonzero(keep)
    return rows, np.stack([x[rows], y[rows]], axis=1) * scale, dropped


def read_spaceranger(
    spatial: Path, matrix_path: Path, image_scale: str, in_tissue_only: bool
) -> tuple[Sites, pd.DataFrame, dict]:
    """Sites of one Space Ranger output (Visium or one HD bin size); footprint filled in by the caller."""
    sf = read_scalefactors(spatial)
    scale = image_scale_factor(sf, image_scale, spatial)
    pos_path = find_positions(spatial)
    pos = read_positions(pos_path)
    matrix = read_10x_h5(matrix_path)
    rows, xy, dropped = place_barcodes(matrix, pos, pos_path, matrix_path, scale, in_tissue_only)
    info = {
        "positions": pos_path.name,
        "matrix": matrix_path.name,
        "image_scale": image_scale,
        "scale_factor": scale,
        "probe_level": matrix.probe_level,
        **matrix.attrs,
    }
    sites = Sites(
        xy_px=xy,
        counts=matrix.counts[rows],
        genes=matrix.genes,
        footprint_um=0.0,
        footprint_shape="point",
        panel=matrix.attrs.get("chemistry_description", ""),
        dropped=dropped,
        info=info,
    )
    return sites, pos, sf


def read_visium(outs: Path, image_scale: str = "fullres", in_tissue_only: bool = True) -> Sites:
    spatial = outs / "spatial"
    sites, pos, sf = read_spaceranger(spatial, find_matrix(outs), image_scale, in_tissue_only)
    mpp, source = visium_mpp_fullres(pos, sf)
    sites.footprint_um, sites.footprint_shape = SPOT_DIAMETER_UM, "disk"
    sites.mpp_estimate = mpp / sites.info["scale_factor"] if mpp else None
    sites.info["mpp_source"] = source
    return sites


def visium_mpp_hint(outs: Path, image_scale: str = "fullres") -> float | None:
    spatial = outs / "spatial"
    sf = read_scalefactors(spatial)
    scale = image_scale_factor(sf, image_scale, spatial)
    mpp, _ = visium_mpp_fullres(read_positions(find_positions(spatial)), sf)
    return mpp / scale if mpp else None


def visium_genes(outs: Path) -> list[tuple[str, str]]:
    return read_10x_genes(find_matrix(outs))


# ---------------------------------------------------------------------------------------------- reader protocol
# (histotx.sharding.technologies.Reader; sample.options is a VisiumOptions)


def read(given: SampleInput, run: ReaderOptions) -> Sites:
    return read_visium(given.data, given.options.image_scale, run.in_tissue_only)


def mpp_hint(given: SampleInput) -> float | None:
    return visium_mpp_hint(given.data, given.options.image_scale)


def genes(given: SampleInput) -> list[tuple[str, str]]:
    return visium_genes(given.data)


def detect(folder: Folder) -> bool:
    return "spatial" in folder.dirs and any(
        f.endswith(("feature_bc_matrix.h5", "probe_bc_matrix.h5")) for f in folder.files
    )


SQUARE_FOLDER = re.compile(r"square_(\d+)um")  # a Visium HD binned output
_WRAPPERS = ("outs", "binned_outputs")  # folders named by Space Ranger, not by the sample


def spaceranger_entry(folder: Folder, technology: str) -> dict:
    """A Space Ranger output's draft entry, its id from the first folder above the ones Space Ranger names."""
    from histotx.sharding.scan import folder_entry

    sample_folder = folder.path
    while (
        sample_folder.name in _WRAPPERS or SQUARE_FOLDER.fullmatch(sample_folder.name)
    ) and sample_folder != folder.root:
        sample_folder = sample_folder.parent
    return folder_entry(folder, technology, sample_folder)


def scan_entries(folder: Folder) -> list[dict]:
    return [{**spaceranger_entry(folder, "visium"), "options": {"image_scale": "fullres"}}]
