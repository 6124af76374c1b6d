"""10x Genomics outputs: the feature-barcode HDF5 matrix, Visium Space Ranger 1.x/2.x ``outs/``, Visium HD bins.

Layouts follow the real files (see ../shared/notes/formats.md): a spot lattice 100 µm centre to centre
with same-row neighbours two ``array_col`` apart, whole-pixel ``pxl_row/col_in_fullres``,
``spot_diameter_fullres`` spanning 65 µm, HD barcodes ``s_002um_RRRRR_CCCCC-1`` and parquet positions.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from PIL import Image

SPOT_PITCH_UM = 100.0
SPOT_DIAMETER_UM = 55.0
SCALEFACTOR_SPOT_UM = 65.0  # what spot_diameter_fullres spans
FIDUCIAL_OVER_SPOT = 1.6154  # fiducial_diameter_fullres / spot_diameter_fullres in real files
HD_BIN_SIZES = (2, 8, 16)


def random_barcodes(rng: np.random.Generator, n: int) -> list[str]:
    """Distinct 16-nt barcodes with the ``-1`` GEM-group suffix."""
    codes = rng.choice(4**16, size=n, replace=False)
    digits = (codes[:, None] // 4 ** np.arange(15, -1, -1)) % 4
    letters = np.array(list("ACGT"))[digits]
    return ["".join(row) + "-1" for row in letters]


def write_10x_h5(
    path: Path, counts: sp.csr_matrix, barcodes: list[str], genes: list[tuple[str, str]], software: str, chemistry: str
) -> None:
    """The filtered_feature_bc_matrix.h5 layout: CSC features × barcodes, one indptr entry per barcode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = sp.csr_matrix(counts, dtype=np.int32)
    opts = dict(compression="gzip", compression_opts=4, track_times=False)
    with h5py.File(path, "w", track_order=False) as f:
        f.attrs["filetype"] = np.bytes_("matrix")
        f.attrs["version"] = np.int32(2)
        f.attrs["software_version"] = software
        f.attrs["chemistry_description"] = np.bytes_(chemistry)
        f.attrs["library_ids"] = np.array([b"synthetic"])
        f.attrs["original_gem_groups"] = np.array([1], dtype=np.int64)
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=np.array(barcodes, dtype="S"), **opts)
        m.create_dataset("data", data=counts.data, **opts)
        m.create_dataset("indices", data=counts.indices.astype(np.int64), **opts)
        m.create_dataset("indptr", data=counts.indptr.astype(np.int64), **opts)
        m.create_dataset("shape", data=np.array([counts.shape[1], counts.shape[0]], dtype=np.int32), track_times=False)
        ft = m.create_group("features")
        ft.create_dataset("id", data=np.array([g[1] for g in genes], dtype="S"), **opts)
        ft.create_dataset("name", data=np.array([g[0] for g in genes], dtype="S"), **opts)
        ft.create_dataset("feature_type", data=np.array([b"Gene Expression"] * len(genes)), **opts)
        ft.create_dataset("genome", data=np.array([b"GRCh38"] * len(genes)), **opts)
        ft.create_dataset("_all_tag_keys", data=np.array([b"genome"]), track_times=False)


@dataclass
class Spots:
    """A Visium spot lattice placed on a slide: indices, barcodes and whole-pixel centres."""

    barcodes: list[str]
    array_row: np.ndarray
    array_col: np.ndarray
    px: np.ndarray  # (n, 2) int: (pxl_col_in_fullres, pxl_row_in_fullres) = (x, y)

    def xy_um(self, mpp: float) -> np.ndarray:
        return self.px.astype(np.float64) * mpp

    @classmethod
    def lattice(cls, rng: np.random.Generator, width_um: float, height_um: float, mpp: float) -> "Spots":
        """The hexagonal lattice (slightly rotated, as on a real slide) cropped to the spots fully on the image."""
        theta = np.deg2rad(rng.uniform(-1.0, 1.0))
        origin = rng.uniform(50.0, 90.0, 2)
        r0, c0 = int(rng.integers(2, 30)), int(rng.integers(4, 40))
        rows = np.arange(int(height_um / (SPOT_PITCH_UM * np.sqrt(3) / 2)) + 2)
        cols = np.arange(int(2 * width_um / SPOT_PITCH_UM) + 4)
        rr, cc = np.meshgrid(rows, cols, indexing="ij")
        rr, cc = rr.ravel(), cc.ravel()
        keep = (rr + r0 + cc + c0) % 2 == 0  # even rows hold even columns
        rr, cc = rr[keep], cc[keep]
        u, v = cc * SPOT_PITCH_UM / 2, rr * SPOT_PITCH_UM * np.sqrt(3) / 2
        x = origin[0] + np.cos(theta) * u - np.sin(theta) * v
        y = origin[1] + np.sin(theta) * u + np.cos(theta) * v
        margin = SCALEFACTOR_SPOT_UM / 2
        on = (x >= margin) & (x <= width_um - margin) & (y >= margin) & (y <= height_um - margin)
        px = np.rint(np.stack([x[on], y[on]], axis=1) / mpp).astype(np.int64)
        return cls(random_barcodes(rng, int(on.sum())), rr[on] + r0, cc[on] + c0, px)


@dataclass
class SpatialImages:
    """tissue_hires_image.png / tissue_lowres_image.png: the slide reduced by integer factors, so that
    hires px = fullres px × tissue_hires_scalef exactly (hires ≤ 2000 px and lowres ≤ 600 px, as Space Ranger)."""

    hires: int
    lowres: int
    hires_png: bytes
    lowres_png: bytes

    @classmethod
    def of(cls, level0: np.ndarray) -> "SpatialImages":
        side = max(level0.shape[:2])
        hires, lowres = max(2, int(np.ceil(side / 2000))), max(4, int(np.ceil(side / 600)))
        image = Image.fromarray(level0)
        return cls(hires, lowres, _png(image.reduce(hires)), _png(image.reduce(lowres)))

    def write(self, spatial: Path, mpp: float, spot_um: float = SCALEFACTOR_SPOT_UM, **extra) -> None:
        """The images and scalefactors_json.json (``extra`` adds keys, e.g. Visium HD's bin_size_um)."""
        spatial.mkdir(parents=True, exist_ok=True)
        (spatial / "tissue_hires_image.png").write_bytes(self.hires_png)
        (spatial / "tissue_lowres_image.png").write_bytes(self.lowres_png)
        factors = {
            "spot_diameter_fullres": spot_um / mpp,
            "tissue_hires_scalef": 1.0 / self.hires,
            "fiducial_diameter_fullres": SCALEFACTOR_SPOT_UM * FIDUCIAL_OVER_SPOT / mpp,
            "tissue_lowres_scalef": 1.0 / self.lowres,
            **extra,
        }
        (spatial / "scalefactors_json.json").write_text(json.dumps(factors, indent=4) + "\n")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # speed over size: these are test fixtures
    return buf.getvalue()


def write_visium_outs(
    outs: Path,
    spots: Spots,
    counts: sp.csr_matrix,
    in_tissue: np.ndarray,
    genes: list[tuple[str, str]],
    mpp: float,
    images: SpatialImages,
    sr_version: int,
    rng: np.random.Generator,
) -> None:
    """Space Ranger ``outs/``: 1.x writes tissue_positions_list.csv without header, 2.x tissue_positions.csv
    with one."""
    spatial = outs / "spatial"
    images.write(spatial, mpp)
    lines = [
        f"{spots.barcodes[i]},{int(in_tissue[i])},{spots.array_row[i]},{spots.array_col[i]},"
        f"{spots.px[i, 1]},{spots.px[i, 0]}"
        for i in rng.permutation(len(spots.barcodes))  # Space Ranger's row order is not the matrix order
    ]
    if sr_version == 1:
        (spatial / "tissue_positions_list.csv").write_text("\n".join(lines) + "\n")
    else:
        header = "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"
        (spatial / "tissue_positions.csv").write_text("\n".join([header, *lines]) + "\n")
    keep = np.flatnonzero(in_tissue)
    keep = keep[np.argsort([spots.barcodes[i] for i in keep], kind="stable")]
    write_10x_h5(
        outs / "filtered_feature_bc_matrix.h5",
        counts[keep],
        [spots.barcodes[i] for i in keep],
        genes,
        software=f"spaceranger-{sr_version}.{'0.0' if sr_version == 1 else '1.0'}",
        chemistry="Spatial 3' v1",
    )


@dataclass
class HDGrid:
    """The 2 µm bins of a Visium HD crop: indices start at multiples of 8 so 8/16 µm bins are whole."""

    row0: int
    col0: int
    n: int  # bins per side at 2 µm
    origin_um: np.ndarray  # top-left corner of bin (row0, col0) on the slide

    def bins(self, size_um: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """array_row, array_col and centre (x, y) µm of every bin of ``size_um``, row-major."""
        k = size_um // 2
        m = self.n // k
        rr, cc = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
        rr, cc = rr.ravel(), cc.ravel()
        centre = self.origin_um + (np.stack([cc, rr], axis=1) + 0.5) * size_um
        return (rr + self.row0 // k).astype(np.int32), (cc + self.col0 // k).astype(np.int32), centre

    def pooling(self, size_um: int) -> sp.csr_matrix:
        """(n_bins(size), n_bins(2)) 0/1 matrix summing 2 µm bins into bins of ``size_um``."""
        k = size_um // 2
        rr, cc = np.meshgrid(np.arange(self.n), np.arange(self.n), indexing="ij")
        parent = (rr.ravel() // k) * (self.n // k) + cc.ravel() // k
        return sp.csr_matrix(
            (np.ones(self.n**2), (parent, np.arange(self.n**2))), shape=((self.n // k) ** 2, self.n**2)
        )


def write_visium_hd_outs(
    outs: Path,
    grid: HDGrid,
    counts2: sp.csr_matrix,
    in_tissue_of,
    genes: list[tuple[str, str]],
    mpp: float,
    images: SpatialImages,
) -> None:
    """``binned_outputs/square_{002,008,016}um``: filtered matrix, parquet positions, scalefactors.

    ``in_tissue_of(x_um, y_um)`` says which bin centres are on tissue; coarser bins sum their 2 µm bins.
    """
    for size in HD_BIN_SIZES:
        folder = outs / "binned_outputs" / f"square_{size:03d}um"
        rows, cols, centre = grid.bins(size)
        counts = counts2 if size == 2 else sp.csr_matrix(grid.pooling(size) @ counts2)
        barcodes = [f"s_{size:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)]
        tissue = in_tissue_of(centre[:, 0], centre[:, 1]).astype(np.int32)
        table = pa.table(
            {
                "barcode": pa.array(barcodes, pa.string()),
                "in_tissue": pa.array(tissue, pa.int32()),
                "array_row": pa.array(rows, pa.int32()),
                "array_col": pa.array(cols, pa.int32()),
                "pxl_row_in_fullres": pa.array(centre[:, 1] / mpp, pa.float64()),
                "pxl_col_in_fullres": pa.array(centre[:, 0] / mpp, pa.float64()),
            }
        )
        # HD scalefactors describe the bin, not the 65 µm Visium spot.
        images.write(folder / "spatial", mpp, spot_um=size, bin_size_um=float(size), microns_per_pixel=mpp)
        pq.write_table(table, folder / "spatial" / "tissue_positions.parquet")
        keep = np.flatnonzero(tissue)
        write_10x_h5(
            folder / "filtered_feature_bc_matrix.h5",
            counts[keep],
            [barcodes[i] for i in keep],
            genes,
            software="spaceranger-3.0.0",
            chemistry="Visium HD v1",
        )
