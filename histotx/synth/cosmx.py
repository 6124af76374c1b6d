"""A CosMx SMI flat-file export (as AtoMx writes it) of a section, registered to its H&E by a mirrored affine.

The stitched CosMx frame ("global px", 0.12028 µm each) relates to the H&E by M (H&E px → global px): a
rotation, the pixel-size ratio and a y mirror (the stage's y axis runs against the image rows), then a shift
into the large positive numbers the instrument reports. Fields of view are 4256 px squares tiling the
section; a molecule's local px lie within its FOV, y counted from the FOV's far edge (x_global = x0 + x_local,
y_global = y0 + 4256 − y_local, the placement spatialdata-io's reader applies). Files:
``<name>_tx_file.csv``, ``<name>_fov_positions_file.csv`` and, beside the export, the slide alignment
``<name>_he_alignment.csv`` (M as 3×3 numbers; CosMx has no H&E of its own, so the user registers one).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from histotx.synth.xenium import Molecules

PIXEL_SIZE_UM = 0.12028  # the CosMx camera's µm per pixel
FOV_PX = 4256  # a field of view's side in pixels
NEGATIVE_PROBES = tuple(f"NegPrb{i}" for i in range(1, 11))
CONTROL_FRACTION = 0.02
TX_COLUMNS = ("fov", "cell_ID", "x_global_px", "y_global_px", "x_local_px", "y_local_px", "z", "target", "CellComp")


def he_to_global(rng: np.random.Generator, he_mpp: float) -> np.ndarray:
    """A rotation, scale and y mirror, then a shift, mapping H&E px → CosMx global px."""
    theta = np.deg2rad(rng.uniform(5.0, 15.0) * rng.choice([-1.0, 1.0]))
    s = he_mpp / PIXEL_SIZE_UM
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    m = np.eye(3)
    m[:2, :2] = s * np.diag([1.0, -1.0]) @ rot
    m[:2, 2] = rng.uniform(2e4, 6e4, 2)
    return m


def with_negative_probes(rng: np.random.Generator, mol: Molecules, area_px: tuple[int, int]):
    """(xy H&E px, target names, cell index or -1, in nucleus) of the gene molecules plus negative probes."""
    genes = ~mol.is_control()
    n = int(CONTROL_FRACTION * genes.sum())
    xy = rng.random((n, 2)) * area_px
    target = np.concatenate([mol.feature[genes], rng.choice(np.array(NEGATIVE_PROBES, dtype=object), n)])
    cell = np.concatenate([mol.cell[genes], np.full(n, -1)])
    nucleus = np.concatenate([mol.nucleus[genes], np.zeros(n, np.uint8)])
    return np.concatenate([mol.xy_he[genes], xy]), target, cell, nucleus


def write_cosmx_export(
    folder: Path,
    name: str,
    xy_he: np.ndarray,
    target: np.ndarray,
    cell: np.ndarray,
    nucleus: np.ndarray,
    m: np.ndarray,
    area_px: tuple[int, int],
    rng: np.random.Generator,
) -> Path:
    """The two flat files in ``folder`` and the alignment beside it; returns the alignment's path."""
    folder.mkdir(parents=True, exist_ok=True)
    w, h = area_px
    corners = (m @ np.array([[0, w, 0, w], [0, 0, h, h], [1, 1, 1, 1]], dtype=np.float64))[:2]
    origin = np.floor(corners.min(axis=1)) - 100.0
    n_cols, n_rows = (np.ceil((corners.max(axis=1) - origin) / FOV_PX)).astype(int)
    fov_xy = [origin + FOV_PX * np.array([c, r]) for r in range(n_rows) for c in range(n_cols)]
    with open(folder / f"{name}_fov_positions_file.csv", "w", newline="") as fh:
        out = csv.writer(fh, quoting=csv.QUOTE_NONNUMERIC)
        out.writerow(["FOV", "x_global_px", "y_global_px"])
        out.writerows([i + 1, float(x), float(y)] for i, (x, y) in enumerate(fov_xy))

    g = (m @ np.vstack([xy_he.T, np.ones(len(xy_he))]))[:2].T
    col_row = np.floor((g - origin) / FOV_PX).astype(int)
    fov = col_row[:, 1] * n_cols + col_row[:, 0] + 1
    corner = origin + FOV_PX * col_row
    local = np.stack([g[:, 0] - corner[:, 0], corner[:, 1] + FOV_PX - g[:, 1]], axis=1)
    comp = np.where(cell < 0, "None", np.where(nucleus > 0, "Nuclear", "Cytoplasm"))
    z = rng.integers(0, 9, len(g))
    order = np.lexsort((g[:, 1], fov))  # AtoMx writes FOV by FOV
    with open(folder / f"{name}_tx_file.csv", "w", newline="") as fh:
        out = csv.writer(fh, quoting=csv.QUOTE_NONNUMERIC)
        out.writerow(TX_COLUMNS)
        for i in order.tolist():
            out.writerow(
                [
                    int(fov[i]),
                    int(cell[i] + 1),  # 0: no cell
                    round(float(g[i, 0]), 3),
                    round(float(g[i, 1]), 3),
                    round(float(local[i, 0]), 3),
                    round(float(local[i, 1]), 3),
                    int(z[i]),
                    str(target[i]),
                    str(comp[i]),
                ]
            )
    alignment = folder.parent / f"{name}_he_alignment.csv"
    alignment.write_text("\n".join(",".join(f"{v:.12g}" for v in row) for row in m) + "\n")
    return alignment
