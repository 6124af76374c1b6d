"""HEST-1k layout: ``st/<id>.h5ad`` + ``wsis/<id>.tif`` + ``metadata/<id>.json`` under one root.

Spot centres are ``obsm['spatial']`` as (x, y) in WSI level-0 pixels; genes are ``var_names``
(symbols) with ``var['gene_ids']`` as Ensembl ids when present. The cohort's ``data`` is the HEST
root (the sample id is the HEST id) or the ``st/<id>.h5ad`` file itself.

Spot footprints: HEST pools Xenium transcripts into 100 µm square pseudo-spots and Visium HD bins
into 128 µm squares (gap-free square grids), keeps Visium's 55 µm disks (hexagonal lattice, 100 µm
pitch) and legacy Spatial Transcriptomics' disks (mostly 100 µm on a 200 µm square grid). Its
``spot_diameter`` is blank (NaN) for Xenium and the native 2 µm bin for Visium HD, so the metadata
alone is wrong for both: the footprint comes from ``st_technology`` and the spot lattice itself
(nearest-neighbour spacing × µm/px; 6 neighbours on a hexagonal lattice, 4 on a square grid), and
the metadata only where it agrees. ``Sites.info['footprint']`` records which source was used.

HEST pools Xenium transcripts in the morphology frame and Visium HD bins on the capture array, then maps the
spot centres onto the WSI through the H&E alignment: on the slide the square pseudo-spots are rotated by the
alignment's angle. The lattice's orientation (from the nearest-neighbour directions) gives the squares their
angle (``Sites.footprint_angle_deg``, carried into each tile's transcript grid), so a rotated sample's counts
are spread over rotated squares, not axis-aligned ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from histotx.sharding.errors import InputError, read_json_object
from histotx.sharding.sites import Sites
from histotx.sharding.technologies import Folder, ReaderOptions, SampleInput
from histotx.sharding.tenx import check_counts, gene_identity

log = logging.getLogger(__name__)

LABELS = ("patient", "organ", "species")  # metadata keys a cohort entry carries
DEFAULT_SPOT_DIAMETER_UM = 55.0  # unknown st_technology without a usable spot_diameter
SLIDE_SUFFIXES = (".tif", ".tiff", ".svs", ".ome.tif")


def hest_root_and_id(data: Path, sample_id: str) -> tuple[Path, str]:
    if data.suffix == ".h5ad":
        return data.parent.parent, data.stem
    return data, sample_id


def h5ad_path(root: Path, hid: str) -> Path:
    path = root / "st" / f"{hid}.h5ad"
    if not path.is_file():
        raise InputError(path, "HEST expression file missing")
    return path


def read_metadata(root: Path, hid: str) -> dict:
    return read_json_object(root / "metadata" / f"{hid}.json", "HEST metadata")


def _text(v) -> str:
    """A metadata string; HEST leaves unknown values blank (NaN in the JSON) → ''."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    return str(v).strip()


def sample_labels(root: Path, hid: str) -> dict[str, str]:
    """patient, organ, species from the metadata ('' where HEST has none)."""
    meta = read_metadata(root, hid)
    return {k: _text(meta.get(k)) for k in LABELS}


def _positive(meta: dict, key: str) -> float | None:
    v = meta.get(key)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) and v > 0 else None


def _mpp(meta: dict) -> float | None:
    return _positive(meta, "pixel_size_um_estimated") or _positive(meta, "pixel_size_um_embedded")


@dataclass(frozen=True)
class Lattice:
    """How the spot centres are arranged: the pitch (mean nearest-neighbour distance) and the kind."""

    pitch_px: float
    neighbours: int  # spots at the pitch around an interior spot: 6 on a hexagonal lattice, 4 on a square grid
    # orientation: the angle of the lattice's rows against the slide's x axis (y down, so positive turns
    # clockwise on screen), in (-45°, 45°] for a square grid and (-30°, 30°] for a hexagonal one
    angle_deg: float = 0.0

    @property
    def kind(self) -> str:
        return {6: "hexagonal", 4: "square"}.get(self.neighbours, "irregular")


def measure_lattice(xy: np.ndarray) -> Lattice | None:
    """None for fewer than 3 distinct spots. Border spots have fewer neighbours, so the count is the 90th
    percentile over spots; the diagonal of a square grid (√2 pitch) and the second hexagonal ring (√3)
    lie outside the 1.2 pitch radius."""
    xy = np.unique(np.asarray(xy, dtype=np.float64), axis=0)
    if len(xy) < 3:
        return None
    tree = cKDTree(xy)
    dist, index = tree.query(xy, k=2)
    nearest = dist[:, 1]
    median = float(np.median(nearest))
    at_pitch = (nearest > 0.8 * median) & (nearest < 1.2 * median)
    pitch = float(nearest[at_pitch].mean())
    around = tree.query_ball_point(xy, r=1.2 * pitch, return_length=True) - 1
    neighbours = int(np.percentile(around, 90))
    step = xy[index[at_pitch, 1]] - xy[at_pitch]
    return Lattice(pitch, neighbours, _orientation(step, 6 if neighbours == 6 else 4))


ANGLE_SNAP_DEG = 0.05  # below this a lattice counts as axis-aligned (a 100 µm square's corner moves < 0.1 µm)


def _orientation(step: np.ndarray, symmetry: int) -> float:
    """The lattice's angle from its nearest-neighbour steps: the circular mean of ``symmetry`` × their angles
    (every step of a square grid gives the same 4θ mod 360°), divided back; rounded to 0.01°, ~0 snapped to 0."""
    theta = np.arctan2(step[:, 1], step[:, 0]) * symmetry
    angle = float(np.degrees(np.arctan2(np.sin(theta).mean(), np.cos(theta).mean())) / symmetry)
    angle = round(angle, 2)
    half = 180.0 / symmetry
    if angle <= -half + 0.005:  # the interval's open end: -45° is 45°
        angle += 2 * half
    return 0.0 if abs(angle) < ANGLE_SNAP_DEG else angle


@dataclass(frozen=True)
class _Technology:
    """What HEST stores for one ``st_technology``: spot shape, the lattice it sits on, and its size.
    ``diameter_um`` None: gap-free squares, as wide as the pitch. ``metadata_may_set``: pitch and spot
    diameter vary between arrays (``pitch_um`` is the usual one), so a ``spot_diameter`` that fits the
    measured lattice is taken."""

    shape: str
    lattice: str
    pitch_um: float
    diameter_um: float | None
    metadata_may_set: bool = False


TECHNOLOGIES = {
    "visium": _Technology("disk", "hexagonal", 100.0, 55.0),
    "xenium": _Technology("square", "square", 100.0, None),  # transcripts pooled on a 100 µm grid
    "visium hd": _Technology("square", "square", 128.0, None),  # 16 µm bins pooled 8 × 8
    "spatial transcriptomics": _Technology("disk", "square", 200.0, 100.0, metadata_may_set=True),
}
AGREE = 0.1  # relative tolerance between a measured and an expected size


def _close(a: float | None, b: float) -> bool:
    return a is not None and abs(a / b - 1) <= AGREE


def spot_footprint(
    st_technology: str, lattice: Lattice | None, mpp: float | None, spot_diameter: float | None
) -> tuple[float, str, dict]:
    """(size µm, shape, record) of a HEST sample's spots; the record says which source decided and, for
    squares on a square lattice, their angle on the slide (``angle_deg``)."""
    tech = TECHNOLOGIES.get(st_technology.strip().lower())
    pitch = lattice.pitch_px * mpp if lattice is not None and mpp is not None else None
    kind = lattice.kind if lattice is not None else None
    record: dict = {
        "st_technology": st_technology,
        "lattice": kind,
        "lattice_pitch_um": round(pitch, 3) if pitch is not None else None,
        "metadata_spot_diameter_um": spot_diameter,
    }
    warnings = []
    if tech is None:  # unknown technology: the metadata when it fits the lattice, else the lattice
        if spot_diameter is not None and (pitch is None or spot_diameter <= pitch * (1 + AGREE)):
            size, shape, source = spot_diameter, "disk", "metadata"
        elif kind == "square" and pitch is not None:
            size, shape, source = pitch, "square", "lattice"
        else:
            size, shape, source = DEFAULT_SPOT_DIAMETER_UM, "disk", "default"
    else:
        shape = tech.shape
        if lattice is None or pitch is None:
            warnings.append(
                "spot lattice not measured ("
                + ("no pixel size in the metadata" if lattice is not None else "fewer than 3 spots")
                + ")"
            )
        elif kind != tech.lattice or not (tech.metadata_may_set or _close(pitch, tech.pitch_um)):
            warnings.append(
                f"{kind} lattice of pitch {pitch:.1f} µm; {st_technology} in HEST is a "
                f"{tech.lattice} lattice of {tech.pitch_um:g} µm"
            )
        if tech.diameter_um is None:  # gap-free squares: the pitch is the side
            lattice_ok = pitch is not None and kind == tech.lattice
            size, source = (pitch, "lattice") if lattice_ok else (tech.pitch_um, "st_technology")
        elif tech.metadata_may_set and spot_diameter is not None and spot_diameter <= (pitch or tech.pitch_um):
            size, source = spot_diameter, "metadata"
        else:
            size, source = tech.diameter_um, "st_technology"
    record["metadata_agrees"] = None if spot_diameter is None else _close(spot_diameter, size)
    # a square's orientation is the square lattice's own (a disk has none)
    angle = lattice.angle_deg if shape == "square" and kind == "square" else 0.0
    record.update(um=round(float(size), 3), shape=shape, source=source, angle_deg=angle)
    if warnings:
        record["warning"] = "; ".join(warnings)
    return float(size), shape, record


def hest_slide(root: Path, hid: str) -> Path:
    for suffix in SLIDE_SUFFIXES:
        if (root / "wsis" / f"{hid}{suffix}").is_file():
            return root / "wsis" / f"{hid}{suffix}"
    raise InputError(root / "wsis", f"no slide for {hid} ({', '.join(hid + s for s in SLIDE_SUFFIXES)})")


def _genes(var) -> list[tuple[str, str]]:
    ids = var["gene_ids"].astype(str).to_numpy() if "gene_ids" in var.columns else np.full(len(var), "")
    return gene_identity(var.index.astype(str).to_numpy(), ids)


def _read_h5ad(path: Path):
    import anndata  # heavy import, only for HEST samples

    try:
        return anndata.read_h5ad(path)
    except Exception as exc:  # anndata raises many types for a broken file; all mean "unreadable"
        raise InputError(path, f"unreadable h5ad ({type(exc).__name__}: {exc})") from exc


def read_hest(data: Path, sample_id: str, in_tissue_only: bool = True) -> Sites:
    root, hid = hest_root_and_id(data, sample_id)
    meta = read_metadata(root, hid)
    path = h5ad_path(root, hid)
    adata = _read_h5ad(path)
    if "spatial" not in adata.obsm:
        raise InputError(path, "obsm['spatial'] (spot centres in WSI px) missing")
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise InputError(path, f"obsm['spatial'] has shape {xy.shape}, expected (n_spots, 2)")
    if adata.X is None or adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(path, f"empty matrix: {adata.n_obs} spots × {adata.n_vars} genes")
    counts = sp.csr_matrix(adata.X, dtype=np.float32) if sp.issparse(adata.X) else None
    if counts is None:
        dense = np.asarray(adata.X)
        check_counts(dense, path, "X")
        counts = sp.csr_matrix(dense.astype(np.float32))
    else:
        check_counts(np.asarray(adata.X.data), path, "X")
    if counts.nnz == 0 or not counts.data.any():
        raise InputError(path, "empty matrix: no non-zero counts")

    xy = xy[:, :2]
    located = np.all(np.isfinite(xy), axis=1)
    keep = located.copy()
    dropped = {"no_position": int((~located).sum())} if (~located).any() else {}
    if in_tissue_only and "in_tissue" in adata.obs.columns:
        in_tissue = adata.obs["in_tissue"].to_numpy().astype(float) != 0
        if (located & ~in_tissue).any():
            dropped["not_in_tissue"] = int((located & ~in_tissue).sum())
        keep &= in_tissue
    rows = np.flatnonzero(keep)
    technology = _text(meta.get("st_technology"))
    size, shape, footprint = spot_footprint(
        technology, measure_lattice(xy[located]), _mpp(meta), _positive(meta, "spot_diameter")
    )
    if "warning" in footprint:
        log.warning("%s: %s", path, footprint["warning"])
    return Sites(
        xy_px=xy[rows],
        counts=counts[rows],
        genes=_genes(adata.var),
        footprint_um=size,
        footprint_shape=shape,
        footprint_angle_deg=footprint["angle_deg"],
        panel=technology,
        dropped=dropped,
        mpp_estimate=_positive(meta, "pixel_size_um_estimated"),
        info={
            "hest_id": hid,
            "h5ad": path.name,
            "st_technology": technology,
            "footprint": footprint,
            **{k: _text(meta.get(k)) for k in LABELS},
        },
    )


def hest_mpp_hint(data: Path, sample_id: str) -> float | None:
    root, hid = hest_root_and_id(data, sample_id)
    return _positive(read_metadata(root, hid), "pixel_size_um_estimated")


def hest_genes(data: Path, sample_id: str) -> list[tuple[str, str]]:
    """var only, without loading X."""
    from anndata.io import read_elem

    root, hid = hest_root_and_id(data, sample_id)
    path = h5ad_path(root, hid)
    try:
        with h5py.File(path, "r") as f:
            var = read_elem(f["var"])
    except Exception as exc:  # as in _read_h5ad: any failure means the file is unreadable
        raise InputError(path, f"unreadable h5ad ({type(exc).__name__}: {exc})") from exc
    return _genes(var)


# ---------------------------------------------------------------------------------------------- reader protocol
# (histotx.sharding.technologies.Reader; HEST has no options)


def read(given: SampleInput, run: ReaderOptions) -> Sites:
    return read_hest(given.data, given.sample.id, run.in_tissue_only)


def mpp_hint(given: SampleInput) -> float | None:
    return hest_mpp_hint(given.data, given.sample.id)


def genes(given: SampleInput) -> list[tuple[str, str]]:
    return hest_genes(given.data, given.sample.id)


def slide(given: SampleInput) -> Path:
    """<root>/wsis/<id>.tif (or .tiff/.svs/.ome.tif): HEST cohort entries need no `slide:`."""
    return hest_slide(*hest_root_and_id(given.data, given.sample.id))


def detect(folder: Folder) -> bool:
    return "st" in folder.dirs and "wsis" in folder.dirs and any((folder.path / "st").glob("*.h5ad"))


def scan_entries(found: Folder) -> list[dict]:
    """One entry per st/<id>.h5ad, labelled from metadata/<id>.json; the reader finds the slide in wsis/."""
    from histotx.sharding.scan import PATIENT_TODO, rel, sample_id_of, todo_slide

    folder, base = found.path, found.base
    entries = []
    for h5ad in sorted((folder / "st").glob("*.h5ad")):
        try:
            labels = sample_labels(folder, h5ad.stem)
        except InputError:  # missing or unreadable metadata: `shard run` reports it for this sample
            labels = {}
        entry = {
            "id": sample_id_of(h5ad.stem),
            "patient": labels.get("patient") or PATIENT_TODO,
            **{k: v for k, v in labels.items() if k != "patient" and v},
            "technology": "hest",
            "data": rel(folder, base),
            "mpp": None,
        }
        if entry["id"] != h5ad.stem:  # an id the cohort cannot carry: point at the h5ad itself
            entry["data"] = rel(h5ad, base)
        if not any((folder / "wsis" / f"{h5ad.stem}{s}").is_file() for s in SLIDE_SUFFIXES):
            entry["slide"] = todo_slide(folder / "wsis", base)
        entries.append(entry)
    return entries
