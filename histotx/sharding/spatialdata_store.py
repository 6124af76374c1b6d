"""A SpatialData zarr store (scverse): the H&E image element, and molecules (a points element) or spots/cells
(a shapes element annotated by a table) as the sites. Any platform ``spatialdata-io`` reads (Visium, Visium HD,
Xenium, CosMx, MERSCOPE, Stereo-seq, ...) can so be sharded without a reader of HistoTx's own.

The store is opened with ``spatialdata.read_zarr`` (lazily: points stay dask dataframes, images dask arrays);
the slide is the image element's own OME-Zarr folder (``<store>/images/<name>``), which
:class:`~histotx.sharding.slides.Slide` reads level by level, chunk by chunk (the same zarr arrays the element's
dask arrays wrap), so no slide is ever loaded whole.

Elements are chosen by name (options ``image``, ``points``/``shapes``, ``table``) or, when the store holds only
one candidate, that one. Coordinates: every element carries transformations to named coordinate systems; with
T_img (image px → system) and T_el (element → system), a site lands on the slide at inv(T_img) · T_el · xy, in
the coordinate system ``coordinate_system`` (default: the one system the image and the sites share). Any
transformation spatialdata can write as an affine in x, y (Identity, Scale, Translation, Affine and
Sequences of them) is taken; one it cannot, one tilting x, y by z, or an image transformation that is not
invertible, is an error.

µm/px: a SpatialData coordinate system has no physical unit HistoTx can trust (spatialdata writes ``unit``),
so it is declared: the sample's ``mpp:`` (µm per slide px), or ``um_per_unit`` (µm per unit of the coordinate
system; the slide's µm/px is then that times the image's scale to it: e.g. 1 for a system in µm, 0.2125 for
spatialdata-io's Xenium ``global``, a morphology px).

Points: x, y and the gene column (``feature_key``, default the element's own ``feature_key`` attribute); control
probes (Xenium, CosMx and MERSCOPE names, or ``is_gene`` False) are dropped, and with a ``qv`` column the
molecules below the run's ``qv_min``; streamed partition by partition to bands of the slide, as Xenium.
Shapes: circles (points with a ``radius``) or polygons (their centroids); the table's rows whose
``region_key`` names the element are linked to shapes by ``instance_key``; counts are its ``X`` (or ``layer``),
genes its ``var_names`` (Ensembl ids from ``var['gene_ids']``); a table ``in_tissue`` column is honoured as
Visium's. The site footprint is the circles' median diameter (polygons: the median diameter of a disk of the
same area) unless ``footprint_um`` says it.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histotx.sharding.bands import BandedSites
from histotx.sharding.cosmx import CONTROL_PREFIXES as COSMX_CONTROLS
from histotx.sharding.errors import InputError
from histotx.sharding.sites import Sites
from histotx.sharding.technologies import Folder, ReaderOptions, SampleInput
from histotx.sharding.tenx import check_counts, gene_identity
from histotx.sharding.visium import MAX_UNPLACED_FRACTION
from histotx.sharding.xenium import CONTROL_PREFIXES as XENIUM_CONTROLS

log = logging.getLogger(__name__)

CONTROL_PREFIXES = tuple(dict.fromkeys(XENIUM_CONTROLS + COSMX_CONTROLS + ("Blank-",)))  # + MERSCOPE blanks
FEATURE_COLUMNS = ("feature_name", "gene", "target", "gene_name")  # tried when the element names none
BAND_UM = 128.0


def is_control(name: str) -> bool:
    return name.startswith(CONTROL_PREFIXES)


# ---------------------------------------------------------------------------------------------- the store


@functools.lru_cache(maxsize=4)
def _read(store: Path, stamp: tuple) -> Any:  # noqa: ARG001 (stamp: part of the cache key)
    try:
        import spatialdata
    except ImportError as exc:
        raise InputError(
            store, "the spatialdata technology needs spatialdata: pip install 'histotx[spatialdata]'"
        ) from exc
    quiet = logging.getLogger("ome_zarr")  # logs every attribute and level it reads at INFO: 20 lines a store
    level = quiet.level
    quiet.setLevel(max(level, logging.WARNING))
    try:
        return spatialdata.read_zarr(store)
    except Exception as exc:  # zarr, ome-zarr and spatialdata raise many types for a store they cannot read
        raise InputError(store, f"unreadable SpatialData store ({type(exc).__name__}: {exc})") from exc
    finally:
        quiet.setLevel(level)


def _key(store: Path) -> tuple[Path, tuple]:
    """The store's cache key: its path and the modification times of its element folders."""
    if not store.is_dir():
        raise InputError(store, "not a SpatialData store (expected a .zarr folder)")
    if not any((store / f).is_file() for f in ("zarr.json", ".zgroup", ".zattrs")):
        raise InputError(store, "not a SpatialData store: no zarr.json or .zgroup in the folder")
    parts = [store] + [store / k for k in ("images", "points", "shapes", "tables") if (store / k).is_dir()]
    return store.resolve(), tuple((p.name, p.stat().st_mtime_ns) for p in parts)


def open_store(store: Path) -> Any:
    """The store read lazily, remembered while its folders are unchanged (scan, genes and read ask in turn)."""
    return _read(*_key(store))


def _pick(store: Path, kind: str, elements: dict, name: str | None, option: str) -> str:
    if name is not None:
        if name not in elements:
            have = ", ".join(sorted(elements)) or "none"
            plural = "images" if kind == "image" else kind
            raise InputError(store, f"no {kind} element {name!r} (option {option}); the store's {plural}: {have}")
        return name
    if len(elements) != 1:
        have = ", ".join(sorted(elements)) or "none"
        raise InputError(store, f"expected one {kind} element, found {have}: name one with options.{option}")
    return next(iter(elements))


def _tables_of(sdata: Any, shapes: str) -> list[str]:
    """The tables annotating the shapes element (their spatialdata_attrs region names it)."""
    found = []
    for name, table in sdata.tables.items():
        region = table.uns.get("spatialdata_attrs", {}).get("region")
        regions = [region] if isinstance(region, str) else list(region if region is not None else [])
        if shapes in regions:
            found.append(name)
    return found


@dataclass(frozen=True)
class Choice:
    """The elements one sample reads: the image (None: the cohort's `slide:` is in the coordinate system),
    the sites (a points or a shapes element), the table annotating shapes, the coordinate system."""

    image: str | None
    kind: str  # points | shapes
    sites: str
    table: str | None
    system: str


def _site_element(store: Path, sdata: Any, o: Any) -> tuple[str, str]:
    if o.points is not None and o.shapes is not None:
        raise InputError(store, "options name both points and shapes: name one")
    if o.points is not None:
        return "points", _pick(store, "points", dict(sdata.points), o.points, "points")
    if o.shapes is not None:
        return "shapes", _pick(store, "shapes", dict(sdata.shapes), o.shapes, "shapes")
    candidates = [("points", n) for n in sdata.points] + [("shapes", n) for n in sdata.shapes if _tables_of(sdata, n)]
    if len(candidates) != 1:
        listed = ", ".join(f"{k} {n!r}" for k, n in candidates) or "none"
        raise InputError(
            store,
            f"expected one points element or one shapes element annotated by a table, found {listed}: "
            "name one with options.points or options.shapes",
        )
    return candidates[0]


def _systems(element: Any) -> set[str]:
    from spatialdata.transformations import get_transformation

    return set(get_transformation(element, get_all=True))


def _system(store: Path, named: str | None, image: tuple[str | None, Any], sites: tuple[str, str, Any]) -> str:
    """The coordinate system where image and sites meet: the one named, or the only one they share."""
    (image_name, image_element), (kind, name, element) = image, sites
    own = _systems(element)
    shared = own & (_systems(image_element) if image_element is not None else own)
    if named is not None and named in shared:
        return named
    if named is None and len(shared) == 1:
        return next(iter(shared))
    if not shared:
        raise InputError(
            store,
            f"the image {image_name!r} (coordinate systems {sorted(_systems(image_element))}) and the {kind} "
            f"{name!r} ({sorted(own)}) share no coordinate system: nothing places one on the other",
        )
    if named is None:
        raise InputError(
            store,
            f"the image {image_name!r} and the {kind} {name!r} share the coordinate systems {sorted(shared)}: "
            "name one with options.coordinate_system",
        )
    raise InputError(
        store,
        f"coordinate system {named!r} is not one the image {image_name!r} and the {kind} {name!r} share "
        f"(they share {sorted(shared)})",
    )


def choose(given: SampleInput) -> Choice:
    store, o = given.data, given.options
    sdata = open_store(store)
    image = None
    if given.sample.slide is None or o.image is not None or len(sdata.images):
        image = _pick(store, "image", dict(sdata.images), o.image, "image")
    kind, sites = _site_element(store, sdata, o)
    table = None
    if kind == "shapes":
        tables = _tables_of(sdata, sites)
        if o.table is not None:
            if o.table not in tables:
                raise InputError(
                    store, f"table {o.table!r} does not annotate shapes {sites!r} (tables that do: {tables})"
                )
            table = o.table
        elif len(tables) != 1:
            raise InputError(
                store,
                f"no table links the shapes {sites!r} to counts (spatialdata_attrs region)"
                if not tables
                else f"several tables annotate shapes {sites!r} ({', '.join(tables)}): name one with options.table",
            )
        else:
            table = tables[0]
    element = getattr(sdata, kind)[sites]
    system = _system(
        store, o.coordinate_system, (image, sdata.images[image] if image else None), (kind, sites, element)
    )
    return Choice(image, kind, sites, table, system)


def affine(store: Path, element: Any, name: str, system: str) -> np.ndarray:
    """The element's transformation to ``system`` as a 3×3 affine on (x, y); an error for one that is not (x or y
    depending on z: a 3-D affine that tilts the section is not a placement on a 2-D slide)."""
    from spatialdata.models import get_axes_names
    from spatialdata.transformations import get_transformation

    t = get_transformation(element, to_coordinate_system=system)
    axes = ("x", "y", "z") if "z" in get_axes_names(element) else ("x", "y")
    try:
        m = np.asarray(t.to_affine_matrix(input_axes=axes, output_axes=axes), dtype=np.float64)
    except Exception as exc:  # spatialdata raises ValueError/KeyError/NotImplementedError for what it cannot map
        raise InputError(
            store,
            f"element {name!r}: unsupported transformation to {system!r} ({type(t).__name__}: {exc}); "
            "an affine in x, y is needed",
        ) from exc
    if len(axes) == 3:
        if np.any(m[:2, 2] != 0):
            raise InputError(
                store,
                f"element {name!r}: unsupported transformation to {system!r}: x, y depend on z "
                f"(its x, y rows over x, y, z, 1: {m[:2].tolist()})",
            )
        m = m[np.ix_([0, 1, 3], [0, 1, 3])]
    if not np.all(np.isfinite(m)) or not np.allclose(m[2], [0, 0, 1]):
        raise InputError(store, f"element {name!r}: transformation to {system!r} is not an affine in x, y ({t})")
    return m


def to_slide(given: SampleInput, choice: Choice) -> tuple[np.ndarray, np.ndarray]:
    """(site element → slide px, slide px → coordinate system), both 3×3."""
    store, sdata = given.data, open_store(given.data)
    element = getattr(sdata, choice.kind)[choice.sites]
    to_system = affine(store, element, choice.sites, choice.system)
    image = np.eye(3)
    if choice.image is not None:
        image = affine(store, sdata.images[choice.image], choice.image, choice.system)
    if not abs(np.linalg.det(image[:2, :2])) > 0 or not np.linalg.cond(image[:2, :2]) < 1e10:
        raise InputError(store, f"image {choice.image!r}: its transformation to {choice.system!r} is not invertible")
    return np.linalg.inv(image) @ to_system, image


def declared_mpp(given: SampleInput, image: np.ndarray) -> float | None:
    """µm per slide px: the sample's `mpp:`, else um_per_unit × the image's scale to the coordinate system."""
    if given.sample.mpp is not None:
        return float(given.sample.mpp)
    if given.options.um_per_unit is None:
        return None
    return float(given.options.um_per_unit) * float(np.sqrt(abs(np.linalg.det(image[:2, :2]))))


def _apply(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ m[:2, :2].T + m[:2, 2]


# ---------------------------------------------------------------------------------------------- points


def _feature_key(store: Path, points: Any, name: str, option: str | None) -> str:
    key = option or points.attrs.get("spatialdata_attrs", {}).get("feature_key")
    if key is None:
        key = next((c for c in FEATURE_COLUMNS if c in points.columns), None)
    if key is None or key not in points.columns:
        raise InputError(
            store,
            f"points {name!r} have no gene column"
            + (f" {key!r}" if key else "")
            + f" (columns: {list(points.columns)}): name it with options.feature_key",
        )
    return key


def _partitions(points: Any):
    import dask

    with dask.config.set(scheduler="synchronous"):
        for part in points.to_delayed():
            yield part.compute()


def _is_gene(part: pd.DataFrame, names: np.ndarray) -> np.ndarray:
    """Not a control probe by name, nor flagged ``is_gene`` False where the points have that column."""
    keep = ~np.array([is_control(str(n)) for n in names], dtype=bool)
    if "is_gene" in part.columns:
        flag = part["is_gene"]
        keep &= (
            flag.to_numpy(bool) if flag.dtype == bool else flag.astype(str).str.lower().isin(["true", "1"]).to_numpy()
        )
    return keep


@functools.lru_cache(maxsize=8)
def _panel_of(store: Path, stamp: tuple, name: str, key: str) -> list[tuple[str, str]]:  # noqa: ARG001 (cache key)
    points = _read(store, stamp).points[name]
    genes: set[str] = set()
    for part in _partitions(points[[key] + (["is_gene"] if "is_gene" in points.columns else [])]):
        names = part[key].astype(str).to_numpy()
        genes.update(np.unique(names[_is_gene(part, names)]).tolist())
    return [(g, "") for g in sorted(genes)]


def _panel(given: SampleInput, choice: Choice) -> list[tuple[str, str]]:
    sdata = open_store(given.data)
    key = _feature_key(given.data, sdata.points[choice.sites], choice.sites, given.options.feature_key)
    return list(_panel_of(*_key(given.data), choice.sites, key))


def _read_points(given: SampleInput, choice: Choice, run: ReaderOptions, mpp: float | None) -> BandedSites:
    store, sdata = given.data, open_store(given.data)
    points = sdata.points[choice.sites]
    key = _feature_key(store, points, choice.sites, given.options.feature_key)
    for axis in ("x", "y"):
        if axis not in points.columns:
            raise InputError(store, f"points {choice.sites!r} have no {axis} column (columns: {list(points.columns)})")
    m, _ = to_slide(given, choice)
    genes = _panel(given, choice)
    column_of = {g: j for j, (g, _) in enumerate(genes)}
    band_px = BAND_UM / mpp if mpp else 256.0
    info = {"store": given.data.name, "points": choice.sites, "image": choice.image, "coordinate_system": choice.system}
    sites = BandedSites(band_px, run.slide_px, genes, 0.0, "point", unit_counts=True, mpp_estimate=mpp, info=info)
    dropped = dict.fromkeys(("control_probe", "low_qv", "no_position"), 0)
    wanted = ["x", "y", key] + [c for c in ("qv", "is_gene") if c in points.columns]
    for part in _partitions(points[wanted]):
        names = part[key].astype(str).to_numpy()
        control = ~_is_gene(part, names)
        qv = part["qv"].to_numpy(np.float64) if "qv" in part.columns else np.full(len(part), np.inf)
        low_qv = ~control & ~(qv >= run.qv_min)
        xy = np.stack([part["x"].to_numpy(np.float64), part["y"].to_numpy(np.float64)], axis=1)
        no_pos = ~control & ~low_qv & ~np.all(np.isfinite(xy), axis=1)
        if no_pos.sum() > MAX_UNPLACED_FRACTION * max(int((~control & ~low_qv).sum()), 1):
            raise InputError(store, f"points {choice.sites!r}: {int(no_pos.sum())} molecules have NaN/inf x or y")
        keep = ~(control | low_qv | no_pos)
        for reason, mask in zip(dropped, (control, low_qv, no_pos), strict=True):
            dropped[reason] += int(mask.sum())
        gene = np.array([column_of.get(n, -1) for n in names[keep]], dtype=np.int32)
        sites.add(_apply(m, xy[keep]), gene=gene)
    sites.dropped = {k: v for k, v in dropped.items() if v}
    return sites.finish()


# ---------------------------------------------------------------------------------------------- shapes + table


def _centres(store: Path, shapes: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Each shape's centre and diameter, in the element's units: circles, or polygons (centroid, the
    diameter of a disk of the same area)."""
    kinds = set(shapes.geometry.geom_type.unique().tolist())
    if kinds == {"Point"}:
        if "radius" not in shapes.columns:
            raise InputError(store, f"shapes {name!r} are points without a radius column (circles need one)")
        geometry, diameter = shapes.geometry, 2.0 * shapes["radius"].to_numpy(np.float64)
    elif kinds and kinds <= {"Polygon", "MultiPolygon"}:
        geometry, diameter = shapes.geometry.centroid, 2.0 * np.sqrt(shapes.geometry.area.to_numpy() / np.pi)
    else:
        raise InputError(store, f"shapes {name!r}: geometry {sorted(kinds)} is neither circles nor polygons")
    return np.stack([geometry.x.to_numpy(np.float64), geometry.y.to_numpy(np.float64)], axis=1), diameter


def _linked(store: Path, table: Any, choice: Choice, index: pd.Index) -> tuple[np.ndarray, np.ndarray, dict]:
    """(table rows of the shapes, their shape positions, dropped): rows whose region_key names the shapes,
    linked by instance_key; a row whose instance is no shape is dropped (more than 5 %: an error)."""
    attrs = table.uns.get("spatialdata_attrs", {})
    region_key, instance_key = attrs.get("region_key"), attrs.get("instance_key")
    for key, what in ((region_key, "region_key"), (instance_key, "instance_key")):
        if key is None or key not in table.obs.columns:
            raise InputError(store, f"table {choice.table!r}: {what} {key!r} is not an obs column")
    rows = np.flatnonzero(table.obs[region_key].astype(str).to_numpy() == choice.sites)
    ids = pd.Index(table.obs[instance_key].to_numpy()[rows])
    if ids.has_duplicates:
        first = ids[ids.duplicated()][0]
        raise InputError(store, f"table {choice.table!r}: instance {first} of shapes {choice.sites!r} has several rows")
    where = index.get_indexer(ids)
    if (where < 0).all() and len(ids):  # ids written as strings on one side, numbers on the other
        where = pd.Index(index.astype(str)).get_indexer(ids.astype(str))
    missing = where < 0
    if missing.sum() > MAX_UNPLACED_FRACTION * max(len(rows), 1):
        raise InputError(
            store,
            f"{int(missing.sum())} of {len(rows)} rows of table {choice.table!r} name no shape of {choice.sites!r} "
            f"(e.g. {ids[np.flatnonzero(missing)[0]]}): the table and the shapes do not belong together",
        )
    dropped = {"no_position": int(missing.sum())} if missing.any() else {}
    return rows[~missing], where[~missing], dropped


def _counts(store: Path, table: Any, name: str, layer: str | None) -> sp.csr_matrix:
    if layer is not None and layer not in table.layers:
        raise InputError(store, f"table {name!r} has no layer {layer!r} (layers: {list(table.layers)})")
    x = table.layers[layer] if layer is not None else table.X
    if x is None or table.n_vars == 0:
        raise InputError(store, f"table {name!r} holds no counts (X is empty)")
    counts = sp.csr_matrix(x, dtype=np.float32) if sp.issparse(x) else None
    check_counts(np.asarray(x.data if sp.issparse(x) else x), store, f"table {name!r} " + (layer or "X"))
    return counts if counts is not None else sp.csr_matrix(np.asarray(x, dtype=np.float32))


def _table_genes(table: Any) -> list[tuple[str, str]]:
    var = table.var
    ids = var["gene_ids"].astype(str).to_numpy() if "gene_ids" in var.columns else np.full(len(var), "")
    return gene_identity(var.index.astype(str).to_numpy(), ids)


def _read_shapes(given: SampleInput, choice: Choice, run: ReaderOptions, mpp: float | None) -> Sites:
    store, sdata = given.data, open_store(given.data)
    shapes, table = sdata.shapes[choice.sites], sdata.tables[choice.table]
    xy, diameter = _centres(store, shapes, choice.sites)
    rows, where, dropped = _linked(store, table, choice, pd.Index(shapes.index))
    keep = np.all(np.isfinite(xy[where]), axis=1)
    if (~keep).any():
        dropped["no_position"] = dropped.get("no_position", 0) + int((~keep).sum())
    if run.in_tissue_only and "in_tissue" in table.obs.columns:
        in_tissue = table.obs["in_tissue"].to_numpy()[rows].astype(float) != 0
        if (keep & ~in_tissue).any():
            dropped["not_in_tissue"] = int((keep & ~in_tissue).sum())
        keep &= in_tissue
    m, _ = to_slide(given, choice)
    footprint = given.options.footprint_um
    if footprint is None:
        if mpp is None:
            raise InputError(store, "µm/px unknown: set the sample's `mpp:` or options.um_per_unit")
        px_per_unit = float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
        footprint = float(np.median(diameter[where])) * px_per_unit * mpp if len(where) else 0.0
    info = {"store": store.name, "shapes": choice.sites, "table": choice.table, "image": choice.image}
    info["coordinate_system"] = choice.system
    return Sites(
        xy_px=_apply(m, xy[where[keep]]),
        counts=_counts(store, table, choice.table, given.options.layer)[rows[keep]],
        genes=_table_genes(table),
        footprint_um=footprint,
        footprint_shape="disk",
        dropped=dropped,
        mpp_estimate=mpp,
        info=info,
    )


# ---------------------------------------------------------------------------------------------- reader protocol
# (histotx.sharding.technologies.Reader; sample.options is a SpatialDataOptions)


def read(given: SampleInput, run: ReaderOptions) -> Sites | BandedSites:
    choice = choose(given)
    mpp = declared_mpp(given, to_slide(given, choice)[1])
    return (_read_points if choice.kind == "points" else _read_shapes)(given, choice, run, mpp)


def mpp_hint(given: SampleInput) -> float:
    """The declared µm/px (a SpatialData coordinate system carries no unit HistoTx can trust)."""
    mpp = declared_mpp(given, to_slide(given, choose(given))[1])
    if mpp is None:
        raise InputError(
            given.data,
            "µm/px of the image unknown: set the sample's `mpp:` (µm per image px) or options.um_per_unit "
            "(µm per unit of the coordinate system)",
        )
    return mpp


def genes(given: SampleInput) -> list[tuple[str, str]]:
    choice = choose(given)
    if choice.kind == "points":
        return _panel(given, choice)
    return _table_genes(open_store(given.data).tables[choice.table])


def slide(given: SampleInput) -> Path:
    """The image element's own OME-Zarr folder, ``<store>/images/<name>``."""
    choice = choose(given)
    path = given.data / "images" / str(choice.image)
    if not path.is_dir():
        raise InputError(given.data, f"image {choice.image!r} is not stored at {path} (a store written in place?)")
    return path


def _root_attrs(folder: Path, files: list[str]) -> dict:
    for name in ("zarr.json", ".zattrs"):
        if name in files:
            try:
                doc = json.loads((folder / name).read_text())
            except (OSError, ValueError):
                return {}
            doc = doc.get("attributes", {}) if name == "zarr.json" else doc
            return doc if isinstance(doc, dict) else {}
    return {}


def detect(folder: Folder) -> bool:
    return any(d in folder.dirs for d in ("images", "points", "shapes")) and "spatialdata_attrs" in _root_attrs(
        folder.path, folder.files
    )


def scan_entries(folder: Folder) -> list[dict]:
    """The store's entry, named after it; the slide is its image element (the µm/px is the user's to declare)."""
    from histotx.sharding.scan import PATIENT_TODO, rel, sample_id_of

    name = folder.path.name
    return [
        {
            "id": sample_id_of(name[: -len(".zarr")] if name.endswith(".zarr") else name),
            "patient": PATIENT_TODO,
            "technology": "spatialdata",
            "data": rel(folder.path, folder.base),
            "mpp": None,
        }
    ]
