"""Write a whole synthetic cohort: one sample per technology variant, a cohort.yaml and ground truth.

Each sample gets its own tissue, cells and slide, drawn from seeds derived from (seed, variant), so a
cohort of a few variants holds exactly the same samples as the full one. The expression model is shared
by the cohort (same programs everywhere), with a mild per-patient batch effect.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from histotx.synth.cosmx import he_to_global, with_negative_probes, write_cosmx_export
from histotx.synth.genes import (
    HIDDEN_PROGRAM,
    PROGRAMS,
    ExpressionModel,
    coverage,
    negative_binomial,
    site_rates,
    xenium_panel,
)
from histotx.synth.hest import write_hest_sample
from histotx.synth.render import MARKER_RADIUS_PX, MARKER_RGB, paint_markers, render_he
from histotx.synth.slides import write_slide
from histotx.synth.spatialdata_store import (
    IMAGE,
    points_frames,
    shapes_frame,
    write_points_store,
    write_shapes_store,
)
from histotx.synth.tenx import (
    SPOT_DIAMETER_UM,
    HDGrid,
    SpatialImages,
    Spots,
    write_visium_hd_outs,
    write_visium_outs,
)
from histotx.synth.tissue import REGIONS, Cells, Tissue
from histotx.synth.variants import ALL_VARIANTS, SIZES, VARIANTS
from histotx.synth.xenium import (
    PIXEL_SIZE_UM,
    QV_PASS,
    TRANSCRIPT_ID_BASE,
    Molecules,
    he_to_morphology,
    sparse_subset,
    write_xenium_bundle,
)

TECHNOLOGY = {
    "visium_sr2": "visium",
    "spatialdata_points": "spatialdata",
    "spatialdata_shapes": "spatialdata",
}  # variant → cohort technology where they differ
N_PATIENTS = 2

EFFICIENCY = {"visium": 0.3, "visium_hd": 0.3, "xenium": 1.0, "cosmx": 0.8}  # fraction of a cell's RNA captured
AMBIENT_PER_UM2 = 2e-4  # cells' worth of base expression per µm² landing anywhere (ambient RNA)
HD_SIGMA_UM = 3.0  # spread of a cell's RNA over 2 µm bins
HD_MARK_EVERY = 20  # mark one 2 µm bin in 20 along each axis (40 µm apart)
XENIUM_MARK_SPACING_UM = 25.0


@dataclass(frozen=True)
class SlideSpec:
    width: int
    height: int
    mpp: float
    layout: str


# Non-square on purpose (x/y swaps show); µm/px: 0.7268 like a real Visium full-res image, 0.25 for one
# slide that must be resampled, 0.5 elsewhere.
_SMALL = {
    "visium": SlideSpec(2400, 2160, 0.7268, "tiff_subifds"),
    "visium_sr2": SlideSpec(2304, 2048, 0.5, "svs"),
    "visium_hd": SlideSpec(2400, 2240, 0.25, "ome"),
    "xenium": SlideSpec(2304, 2048, 0.5, "ome"),
    "hest": SlideSpec(2048, 2304, 0.5, "tiff_pages"),
    "image_only": SlideSpec(2048, 1792, 0.5, "tiff_subifds"),
    "cosmx": SlideSpec(2048, 2304, 0.5, "ome"),
    "spatialdata_points": SlideSpec(2304, 2048, 0.5, "spatialdata"),  # the image element of a SpatialData store
    "spatialdata_shapes": SlideSpec(2400, 2160, 0.6, "spatialdata"),
}
# bench: twice the small tissue per side, drawn at 1 µm/px (nuclei still 4-7 px across), for benchmarks
# that train and evaluate on CPU: a quarter of the pixels of the same tissue at 0.5 µm/px.
SPECS = {
    "small": _SMALL,
    "medium": {k: SlideSpec(4 * s.width, 4 * s.height, s.mpp, s.layout) for k, s in _SMALL.items()},
    "bench": {
        k: SlideSpec(round(2 * s.width * s.mpp), round(2 * s.height * s.mpp), 1.0, s.layout) for k, s in _SMALL.items()
    },
}
HD_CROP_UM = {"small": 400, "medium": 1200, "bench": 800}


@dataclass
class _Sample:
    """What the per-technology writers share: the drawn tissue, its cells and their RNA."""

    sample_id: str  # also its folder name
    patient: str
    spec: SlideSpec
    tissue: Tissue
    cells: Cells
    rates: np.ndarray  # (n_cells, n_genes) expected molecules per cell
    rng: np.random.Generator


def _sites_truth(kind: str, ids: list, xy_px: np.ndarray, s: _Sample, **extra) -> dict:
    xy_um = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2) * s.spec.mpp
    return {
        "kind": kind,
        "id": list(ids),
        "xy_px": np.asarray(xy_px, dtype=np.float64).reshape(-1, 2).tolist(),
        "region": s.tissue.region_at(xy_um[:, 0], xy_um[:, 1]).tolist(),
        "hidden": np.round(s.tissue.hidden_at(xy_um[:, 0], xy_um[:, 1]), 6).tolist(),
        **{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in extra.items()},
    }


def _ambient(model: ExpressionModel, area_um2: float, efficiency: float) -> np.ndarray:
    return AMBIENT_PER_UM2 * area_um2 * efficiency * model.base


@dataclass
class _Plan:
    """A technology's sample, decided before the slide is painted: cohort fields, truth, what to write."""

    entry: dict  # cohort fields besides id/patient/technology (absolute paths)
    slide: Path
    sites: dict  # truth["sites"]
    marks: np.ndarray | None  # level-0 px to paint when markers are on
    write: Callable[[np.ndarray], None] | None = None  # writes the technology's files, given the final H&E
    slide_in_data: bool = False  # the slide is written by `write` (a SpatialData store's image element)


def _spot_counts(s: _Sample, model: ExpressionModel, xy_um: np.ndarray):
    eff = EFFICIENCY["visium"]
    cover = coverage(xy_um, s.cells, SPOT_DIAMETER_UM / 2)
    return negative_binomial(
        s.rng, site_rates(cover, s.rates, eff, _ambient(model, np.pi * (SPOT_DIAMETER_UM / 2) ** 2, eff))
    )


def _visium(s: _Sample, out: Path, model: ExpressionModel, sr_version: int) -> _Plan:
    mpp = s.spec.mpp
    spots = Spots.lattice(s.rng, s.spec.width * mpp, s.spec.height * mpp, mpp)
    xy_um = spots.xy_um(mpp)
    in_tissue = s.tissue.in_tissue(xy_um[:, 0], xy_um[:, 1])
    counts = _spot_counts(s, model, xy_um)
    slide = out / s.sample_id / (f"{s.sample_id}.svs" if s.spec.layout == "svs" else f"{s.sample_id}_fullres.tif")
    outs = out / s.sample_id / "outs"

    def write(image: np.ndarray) -> None:
        write_visium_outs(outs, spots, counts, in_tissue, model.genes, mpp, SpatialImages.of(image), sr_version, s.rng)

    return _Plan(
        {"slide": slide, "data": outs, "options": {"image_scale": "fullres"}},
        slide,
        _sites_truth("spot", spots.barcodes, spots.px, s, in_tissue=in_tissue.astype(int)),
        spots.px.astype(np.float64),
        write,
    )


def _visium_hd(s: _Sample, out: Path, model: ExpressionModel, crop_um: int) -> _Plan:
    mpp = s.spec.mpp
    n = crop_um // 2 // 8 * 8
    centre = np.array([s.spec.width, s.spec.height]) * mpp / 2
    origin = centre - n + s.rng.uniform(0.0, 2.0, 2)  # n bins × 2 µm, centred, off the pixel grid
    grid = HDGrid(int(s.rng.integers(40, 200)) * 8, int(s.rng.integers(40, 200)) * 8, n, origin)
    rows, cols, xy_um = grid.bins(2)
    eff = EFFICIENCY["visium_hd"]
    mean = site_rates(coverage(xy_um, s.cells, 2.0, sigma_um=HD_SIGMA_UM), s.rates, eff, _ambient(model, 4.0, eff))
    counts = negative_binomial(s.rng, mean)
    in_tissue = s.tissue.in_tissue(xy_um[:, 0], xy_um[:, 1])
    half = HD_MARK_EVERY // 2
    on_grid = ((rows - grid.row0) % HD_MARK_EVERY == half) & ((cols - grid.col0) % HD_MARK_EVERY == half)
    marked = np.flatnonzero(in_tissue & on_grid)
    xy_px = xy_um[marked] / mpp
    ids = [f"s_002um_{rows[i]:05d}_{cols[i]:05d}-1" for i in marked]
    slide, outs = out / s.sample_id / f"{s.sample_id}.ome.tif", out / s.sample_id / "outs"

    def write(image: np.ndarray) -> None:
        write_visium_hd_outs(outs, grid, counts, s.tissue.in_tissue, model.genes, mpp, SpatialImages.of(image))

    return _Plan(
        {"slide": slide, "data": outs, "options": {"bin_size_um": 2}},
        slide,
        _sites_truth(
            "bin", ids, xy_px, s, bin_size_um=2, subset=f"in-tissue 2 µm bins, one in {HD_MARK_EVERY} per axis"
        ),
        xy_px,
        write,
    )


def _xenium(s: _Sample, out: Path, model: ExpressionModel, markers: bool) -> _Plan:
    mpp, w, h = s.spec.mpp, s.spec.width, s.spec.height
    m = he_to_morphology(s.rng, mpp, w, h)
    panel = xenium_panel()
    per_cell = s.rng.poisson(s.rates[:, panel] * EFFICIENCY["xenium"])
    mol = Molecules.sample(
        s.rng, s.cells, per_cell, [model.genes[i][0] for i in panel], mpp, (w, h), s.tissue.in_tissue
    )
    good = np.flatnonzero(~mol.is_control() & (mol.qv >= QV_PASS))
    marked = good[sparse_subset(mol.xy_he[good], XENIUM_MARK_SPACING_UM / mpp, s.rng)]
    if markers:
        # Only the marked molecules (plus controls and low-qv reads, which a reader must drop) are written,
        # so every molecule a reader keeps must land on a marker.
        keep = np.ones(len(mol.qv), dtype=bool)
        keep[good] = False
        keep[marked] = True
        marked = np.cumsum(keep)[marked] - 1  # their indices once the others are gone
        mol = mol.subset(keep)
    bundle = out / s.sample_id
    slide = bundle / f"{s.sample_id}_he_image.ome.tif"
    sites = _sites_truth(
        "molecule",
        (TRANSCRIPT_ID_BASE + marked).tolist(),
        mol.xy_he[marked],
        s,
        feature=mol.feature[marked].tolist(),
        subset=f"gene molecules with qv >= {QV_PASS:g}, at least {XENIUM_MARK_SPACING_UM / 2:g} µm apart",
        he_to_morphology=m,
        morphology_pixel_size_um=PIXEL_SIZE_UM,
    )

    def write(_image: np.ndarray) -> None:
        write_xenium_bundle(bundle, s.sample_id, mol, s.cells, mpp, m, len(panel), s.rng)

    return _Plan({"slide": slide, "data": bundle}, slide, sites, mol.xy_he[marked], write)


def _hest(s: _Sample, out: Path, model: ExpressionModel) -> _Plan:
    """HEST keeps the spots under tissue only; the cohort entry names the root, the reader finds the WSI."""
    mpp = s.spec.mpp
    spots = Spots.lattice(s.rng, s.spec.width * mpp, s.spec.height * mpp, mpp)
    on = s.tissue.in_tissue(*spots.xy_um(mpp).T)
    spots = Spots(
        [b for b, k in zip(spots.barcodes, on, strict=True) if k],
        spots.array_row[on],
        spots.array_col[on],
        spots.px[on],
    )
    counts = _spot_counts(s, model, spots.xy_um(mpp))
    root = out / "hest"

    def write(_image: np.ndarray) -> None:
        write_hest_sample(root, s.sample_id, spots, counts, model.genes, mpp, (s.spec.width, s.spec.height), s.patient)

    return _Plan(
        {"data": root},
        root / "wsis" / f"{s.sample_id}.tif",
        _sites_truth("spot", spots.barcodes, spots.px, s),
        spots.px.astype(np.float64),
        write,
    )


def _cosmx(s: _Sample, out: Path, model: ExpressionModel, markers: bool) -> _Plan:
    """A CosMx export registered to the H&E by a mirrored affine (the cohort entry names the alignment)."""
    mpp, area = s.spec.mpp, (s.spec.width, s.spec.height)
    m = he_to_global(s.rng, mpp)
    panel = xenium_panel()
    per_cell = s.rng.poisson(s.rates[:, panel] * EFFICIENCY["cosmx"])
    mol = Molecules.sample(s.rng, s.cells, per_cell, [model.genes[i][0] for i in panel], mpp, area, s.tissue.in_tissue)
    xy, target, cell, nucleus = with_negative_probes(s.rng, mol, area)
    gene = np.flatnonzero(~np.char.startswith(target.astype(str), "NegPrb"))
    marked = gene[sparse_subset(xy[gene], XENIUM_MARK_SPACING_UM / mpp, s.rng)]
    if markers:  # only the marked molecules and the negative probes (which a reader must drop)
        keep = np.zeros(len(xy), dtype=bool)
        keep[marked] = True
        keep[np.setdiff1d(np.arange(len(xy)), gene)] = True
        marked = np.cumsum(keep)[marked] - 1
        xy, target, cell, nucleus = xy[keep], target[keep], cell[keep], nucleus[keep]
    folder = out / s.sample_id / "flatFiles"
    slide = out / s.sample_id / f"{s.sample_id}_he.ome.tif"
    alignment = folder.parent / f"{s.sample_id}_he_alignment.csv"
    sites = _sites_truth(
        "molecule",
        marked.tolist(),
        xy[marked],
        s,
        feature=target[marked].tolist(),
        subset=f"gene molecules at least {XENIUM_MARK_SPACING_UM / 2:g} µm apart",
        he_to_global_px=m,
    )

    def write(_image: np.ndarray) -> None:
        write_cosmx_export(folder, s.sample_id, xy, target, cell, nucleus, m, area, s.rng)

    entry = {"slide": slide, "data": folder, "options": {"alignment": alignment.relative_to(out).as_posix()}}
    return _Plan(entry, slide, sites, xy[marked], write)


def _spatialdata_points(s: _Sample, out: Path, model: ExpressionModel, markers: bool) -> _Plan:
    """Xenium-like molecules in a SpatialData store: image and points each in a frame of their own."""
    mpp, area = s.spec.mpp, (s.spec.width, s.spec.height)
    panel = xenium_panel()
    per_cell = s.rng.poisson(s.rates[:, panel] * EFFICIENCY["xenium"])
    mol = Molecules.sample(s.rng, s.cells, per_cell, [model.genes[i][0] for i in panel], mpp, area, s.tissue.in_tissue)
    good = np.flatnonzero(~mol.is_control() & (mol.qv >= QV_PASS))
    marked = good[sparse_subset(mol.xy_he[good], XENIUM_MARK_SPACING_UM / mpp, s.rng)]
    if markers:  # only the marked molecules, the controls and the low-qv reads (which a reader must drop)
        keep = np.ones(len(mol.qv), dtype=bool)
        keep[good] = False
        keep[marked] = True
        marked = np.cumsum(keep)[marked] - 1
        mol = mol.subset(keep)
    frames = points_frames(s.rng, mpp)
    store = out / s.sample_id / f"{s.sample_id}.zarr"
    sites = _sites_truth(
        "molecule",
        marked.tolist(),
        mol.xy_he[marked],
        s,
        feature=mol.feature[marked].tolist(),
        subset=f"gene molecules with qv >= {QV_PASS:g}, at least {XENIUM_MARK_SPACING_UM / 2:g} µm apart",
        image_to_global=frames["image"],
        points_to_global=frames["points"],
    )

    def write(image: np.ndarray) -> None:
        write_points_store(store, image, frames, mol.xy_he, mol.feature, mol.qv, mol.cell, s.rng)

    entry = {"data": store, "options": {"um_per_unit": 1.0}}  # the global system is in µm
    return _Plan(entry, store / "images" / IMAGE, sites, mol.xy_he[marked], write, slide_in_data=True)


def _spatialdata_shapes(s: _Sample, out: Path, model: ExpressionModel) -> _Plan:
    """Visium-like spots as circles annotated by a table in a SpatialData store, the H&E registered by an affine."""
    mpp = s.spec.mpp
    spots = Spots.lattice(s.rng, s.spec.width * mpp, s.spec.height * mpp, mpp)
    xy_um = spots.xy_um(mpp)
    in_tissue = s.tissue.in_tissue(xy_um[:, 0], xy_um[:, 1])
    counts = _spot_counts(s, model, xy_um)
    m = shapes_frame(s.rng, mpp)
    store = out / s.sample_id / f"{s.sample_id}.zarr"

    def write(image: np.ndarray) -> None:
        write_shapes_store(store, image, m, spots.px.astype(np.float64), counts, in_tissue, model.genes,
                           SPOT_DIAMETER_UM / mpp, s.rng)  # fmt: skip

    sites = _sites_truth("spot", spots.barcodes, spots.px, s, in_tissue=in_tissue.astype(int), image_to_aligned=m)
    entry = {"data": store, "mpp": mpp}  # the aligned system has no unit: the slide's µm/px is declared
    return _Plan(entry, store / "images" / IMAGE, sites, spots.px.astype(np.float64), write, slide_in_data=True)


def _image_only(s: _Sample, out: Path) -> _Plan:
    slide = out / s.sample_id / f"{s.sample_id}.tif"
    return _Plan({"slide": slide}, slide, _sites_truth("none", [], np.zeros((0, 2)), s), None)


def _plan(variant: str, s: _Sample, out: Path, model: ExpressionModel, markers: bool, size: str) -> _Plan:
    """The variant's sample, planned."""
    plans: dict[str, Callable[[], _Plan]] = {
        "visium": lambda: _visium(s, out, model, 1),
        "visium_sr2": lambda: _visium(s, out, model, 2),
        "visium_hd": lambda: _visium_hd(s, out, model, HD_CROP_UM[size]),
        "xenium": lambda: _xenium(s, out, model, markers),
        "hest": lambda: _hest(s, out, model),
        "cosmx": lambda: _cosmx(s, out, model, markers),
        "spatialdata_points": lambda: _spatialdata_points(s, out, model, markers),
        "spatialdata_shapes": lambda: _spatialdata_shapes(s, out, model),
    }
    return plans.get(variant, lambda: _image_only(s, out))()


def _make_sample(
    variant: str,
    seed: int,
    size: str,
    out: Path,
    model: ExpressionModel,
    markers: bool,
    replicate: int = 0,
    patient_index: int | None = None,
) -> tuple[dict, dict]:
    spec = SPECS[size][variant]
    if patient_index is None:
        patient_index = ALL_VARIANTS.index(variant) % N_PATIENTS
    patient = f"P{patient_index + 1:02d}"
    key = [seed, ALL_VARIANTS.index(variant)] + ([replicate] if replicate else [])
    tissue_seed, cell_seed, render_seed, rng_seed = np.random.SeedSequence(key).spawn(4)
    tissue = Tissue.random(np.random.default_rng(tissue_seed), spec.width * spec.mpp, spec.height * spec.mpp)
    cells = Cells.sample(np.random.default_rng(cell_seed), tissue)
    patient_scale = model.patient_scale(np.random.default_rng([seed, 1000 + patient_index]))
    sample_seed = int(render_seed.generate_state(1)[0])  # pixel noise, and the OME UUID
    image = render_he(tissue, cells, spec.width, spec.height, spec.mpp, sample_seed)
    s = _Sample(
        variant if not replicate else f"{variant}_r{replicate}",
        patient,
        spec,
        tissue,
        cells,
        model.cell_rates(cells, patient_scale),
        np.random.default_rng(rng_seed),
    )
    plan = _plan(variant, s, out, model, markers, size)
    painted = markers and plan.marks is not None
    if painted:
        paint_markers(image, plan.marks)
    if not plan.slide_in_data:
        write_slide(plan.slide, image, spec.mpp, spec.layout, seed=sample_seed)
    if plan.write is not None:
        plan.write(image)
    technology = TECHNOLOGY.get(variant, variant)
    entry = {
        "id": s.sample_id,
        "patient": patient,
        "technology": technology,
        **{k: (v.relative_to(out).as_posix() if isinstance(v, Path) else v) for k, v in plan.entry.items()},
    }
    truth = {
        "sample": s.sample_id,
        "variant": variant,
        "technology": technology,
        "patient": patient,
        "slide": plan.slide.relative_to(out).as_posix(),
        "slide_layout": spec.layout,
        "mpp": spec.mpp,
        "size_px": [spec.width, spec.height],
        "markers": painted,
        "marker_radius_px": MARKER_RADIUS_PX,
        "marker_rgb": list(MARKER_RGB),
        "regions": list(REGIONS),
        "programs": {name: model.program_genes(name) for name in PROGRAMS},
        "hidden_program": HIDDEN_PROGRAM,
        "n_cells": len(cells),
        "sites": plan.sites,
    }
    return entry, truth


def generate_cohort(
    out_dir,
    seed: int = 0,
    size: str = "small",
    technologies=VARIANTS,
    markers: bool = False,
    replicates: int = 1,
    patients: int | None = None,
) -> Path:
    """Write the synthetic cohort under ``out_dir`` and return its cohort.yaml.

    ``technologies`` picks variants from VARIANTS (visium = Space Ranger 1.x, visium_sr2 = 2.x);
    ``markers`` paints a green disk on the H&E at every site listed in ``truth/{id}.json``.
    ``replicates`` > 1 writes each variant that many times (ids ``{variant}_r{k}`` after the first, each
    its own tissue); ``patients`` then deals the samples out to that many patients in turn (default:
    two patients, by variant). Replicate 0 is the same sample whatever these two say.
    """
    if size not in SPECS:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    unknown = sorted(set(technologies) - set(ALL_VARIANTS))
    if unknown:
        raise ValueError(f"unknown technology variant(s) {unknown}; expected some of {ALL_VARIANTS}")
    if replicates < 1 or (patients is not None and patients < 1):
        raise ValueError(f"replicates and patients must be >= 1, got {replicates} and {patients}")
    out = Path(out_dir).resolve()
    (out / "truth").mkdir(parents=True, exist_ok=True)
    model = ExpressionModel.random(np.random.default_rng([seed, 999]))
    samples = []
    order = [(k, v) for k in range(replicates) for v in ALL_VARIANTS if v in technologies]
    for n, (k, variant) in enumerate(order):
        entry, truth = _make_sample(
            variant, seed, size, out, model, markers, k, None if patients is None else n % patients
        )
        samples.append(entry)
        (out / "truth" / f"{entry['id']}.json").write_text(json.dumps(truth) + "\n")
    path = out / "cohort.yaml"
    header = f"# HistoTx synthetic cohort: seed {seed}, size {size}, markers {'on' if markers else 'off'}\n"
    path.write_text(header + yaml.safe_dump({"samples": samples}, sort_keys=False))
    return path
