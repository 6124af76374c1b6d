"""A Xenium output bundle registered to a post-Xenium H&E by a non-trivial affine.

The tissue lives in H&E pixels. The alignment matrix M (``*_he_imagealignment.csv``, 3×3, no header)
maps H&E px → morphology px, so a molecule at H&E (x, y) is stored at µm = (M · [x, y, 1])[:2] × 0.2125,
exactly as 10x's files relate; a reader must apply inv(M) to come back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from histotx.synth.genes import XENIUM_CONTROLS
from histotx.synth.tissue import Cells

PIXEL_SIZE_UM = 0.2125  # morphology image µm/px
TRANSCRIPT_ID_BASE = 281474976710656  # 2**48, as in real transcript ids
QV_PASS = 20.0
LOW_QV_FRACTION = 0.08
CONTROL_FRACTION = 0.02
UNASSIGNED_BEYOND = 1.8  # molecules farther than this many σ from their cell's centre are unassigned


def he_to_morphology(rng: np.random.Generator, he_mpp: float, width_px: int, height_px: int) -> np.ndarray:
    """A rotation + scale + translation that maps H&E px → morphology px, keeping morphology px positive."""
    theta = np.deg2rad(rng.uniform(8.0, 20.0) * rng.choice([-1.0, 1.0]))
    s = he_mpp / PIXEL_SIZE_UM
    lin = s * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    corners = lin @ np.array([[0, width_px, 0, width_px], [0, 0, height_px, height_px]], dtype=np.float64)
    shift = -corners.min(axis=1) + rng.uniform(200.0, 600.0, 2)
    m = np.eye(3)
    m[:2, :2], m[:2, 2] = lin, shift
    return m


def cell_ids(n: int) -> list[str]:
    """Xenium ≥ 1.3 string cell ids: the integer in 8 hex digits written with letters a–p, then ``-1``."""
    table = str.maketrans("0123456789abcdef", "abcdefghijklmnop")
    return [f"{i:08x}".translate(table) + "-1" for i in range(1, n + 1)]


@dataclass
class Molecules:
    """Decoded molecules in H&E px (continuous, pixel i covering [i, i+1))."""

    xy_he: np.ndarray  # (n, 2)
    feature: np.ndarray  # (n,) object: gene symbol or control name
    cell: np.ndarray  # (n,) int: index into the cells, -1 unassigned
    nucleus: np.ndarray  # (n,) uint8 overlaps_nucleus
    qv: np.ndarray  # (n,) float32

    @classmethod
    def sample(
        cls,
        rng: np.random.Generator,
        cells: Cells,
        counts: np.ndarray,
        symbols: list[str],
        he_mpp: float,
        area_px: tuple[int, int],
        in_tissue,
    ) -> "Molecules":
        """Molecules scattered around their cells, plus unassigned background, control probes and low-qv reads.

        ``counts`` is (n_cells, n_panel_genes) molecules per cell; ``in_tissue(x_um, y_um)`` bounds the background.
        """
        which_cell, which_gene = np.nonzero(counts)
        reps = counts[which_cell, which_gene]
        owner, gene = np.repeat(which_cell, reps), np.repeat(which_gene, reps)
        sigma = 2.0 * cells.radius_um[owner]
        offset = rng.standard_normal((len(owner), 2)) * sigma[:, None]
        dist = np.linalg.norm(offset, axis=1)
        xy_um = cells.xy_um[owner] + offset
        assigned = dist <= UNASSIGNED_BEYOND * sigma
        nucleus = (dist <= cells.radius_um[owner]).astype(np.uint8)
        # Unassigned background across the tissue, and control probes anywhere in the imaged area.
        w_um, h_um = area_px[0] * he_mpp, area_px[1] * he_mpp
        n_bg = int(0.05 * len(owner))
        bg = rng.random((n_bg, 2)) * [w_um, h_um]
        bg = bg[in_tissue(bg[:, 0], bg[:, 1])]
        n_ctrl = int(CONTROL_FRACTION * len(owner))
        ctrl = rng.random((n_ctrl, 2)) * [w_um, h_um]
        names = np.array(symbols + list(XENIUM_CONTROLS), dtype=object)
        feature = np.concatenate(
            [gene, rng.integers(0, len(symbols), len(bg)), len(symbols) + rng.integers(0, len(XENIUM_CONTROLS), n_ctrl)]
        )
        xy = np.concatenate([xy_um, bg, ctrl]) / he_mpp
        cell = np.concatenate([np.where(assigned, owner, -1), np.full(len(bg) + n_ctrl, -1)])
        nucleus = np.concatenate([nucleus, np.zeros(len(bg) + n_ctrl, np.uint8)])
        low = rng.random(len(xy)) < LOW_QV_FRACTION
        qv = np.where(low, rng.uniform(2.0, QV_PASS - 0.5, len(xy)), rng.uniform(QV_PASS + 0.5, 40.0, len(xy)))
        return cls(xy, names[feature], cell, nucleus, qv.astype(np.float32))

    def subset(self, keep: np.ndarray) -> "Molecules":
        return Molecules(self.xy_he[keep], self.feature[keep], self.cell[keep], self.nucleus[keep], self.qv[keep])

    def is_control(self) -> np.ndarray:
        return np.isin(self.feature, np.array(XENIUM_CONTROLS, dtype=object))


def sparse_subset(xy: np.ndarray, cell_px: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most one point per ``cell_px`` grid square, each within a quarter square of its
    centre: the chosen points are at least half a square apart, so markers painted on them never touch."""
    square = np.floor(xy / cell_px).astype(np.int64)
    off = np.abs(xy / cell_px - square - 0.5).max(axis=1)
    near = np.flatnonzero(off < 0.25)
    near = near[rng.permutation(len(near))]
    key = square[near, 0] * 1_000_003 + square[near, 1]
    _, first = np.unique(key, return_index=True)
    return np.sort(near[first])


def write_xenium_bundle(
    bundle: Path,
    name: str,
    molecules: Molecules,
    cells: Cells,
    he_mpp: float,
    m: np.ndarray,
    panel_size: int,
    z_rng: np.random.Generator,
) -> None:
    """transcripts.parquet, cells.parquet, experiment.xenium and ``{name}_he_imagealignment.csv``."""
    bundle.mkdir(parents=True, exist_ok=True)
    morph = (m @ np.vstack([molecules.xy_he.T, np.ones(len(molecules.qv))]))[:2].T
    um = morph * PIXEL_SIZE_UM
    ids = np.array(cell_ids(len(cells)) + ["UNASSIGNED"], dtype=object)
    transcripts = pa.table(
        {
            "transcript_id": pa.array(TRANSCRIPT_ID_BASE + np.arange(len(um), dtype=np.uint64), pa.uint64()),
            "cell_id": pa.array(ids[molecules.cell], pa.string()),
            "overlaps_nucleus": pa.array(molecules.nucleus, pa.uint8()),
            "feature_name": pa.array(molecules.feature, pa.string()),
            "x_location": pa.array(um[:, 0].astype(np.float32), pa.float32()),
            "y_location": pa.array(um[:, 1].astype(np.float32), pa.float32()),
            "z_location": pa.array(z_rng.normal(12.0, 2.0, len(um)).astype(np.float32), pa.float32()),
            "qv": pa.array(molecules.qv, pa.float32()),
        }
    )
    pq.write_table(transcripts, bundle / "transcripts.parquet")
    centre = (m @ np.vstack([cells.xy_um.T / he_mpp, np.ones(len(cells))]))[:2].T * PIXEL_SIZE_UM
    assigned = molecules.cell[molecules.cell >= 0]
    controls = molecules.is_control()[molecules.cell >= 0]
    cells_table = pa.table(
        {
            "cell_id": pa.array(ids[:-1], pa.string()),
            "x_centroid": pa.array(centre[:, 0], pa.float64()),
            "y_centroid": pa.array(centre[:, 1], pa.float64()),
            "transcript_counts": pa.array(np.bincount(assigned[~controls], minlength=len(cells)), pa.int64()),
            "control_probe_counts": pa.array(np.bincount(assigned[controls], minlength=len(cells)), pa.int64()),
            "nucleus_area": pa.array(np.pi * cells.radius_um**2, pa.float64()),
            "cell_area": pa.array(np.pi * (UNASSIGNED_BEYOND * 2.0 * cells.radius_um) ** 2, pa.float64()),
        }
    )
    pq.write_table(cells_table, bundle / "cells.parquet")
    experiment = {
        "run_name": "histotx_synthetic",
        "region_name": name,
        "preservation_method": "ffpe",
        "num_cells": len(cells),
        "panel_name": "HistoTx synthetic breast panel",
        "panel_organism": "Human",
        "panel_num_targets_predesigned": panel_size,
        "pixel_size": PIXEL_SIZE_UM,
        "analysis_sw_version": "xenium-2.0.0.10",
        "z_step_size": 3.0,
        "images": {"morphology_filepath": "morphology.ome.tif", "morphology_focus_filepath": "morphology_focus/"},
    }
    (bundle / "experiment.xenium").write_text(json.dumps(experiment, indent=4) + "\n")
    (bundle / f"{name}_he_imagealignment.csv").write_text(
        "\n".join(",".join(repr(float(v)) for v in row) for row in m) + "\n"
    )
