"""What ``histotx predict`` writes for a slide: an AnnData, a SpatialData store, heat-map PNGs.

All three share one coordinate system: level-0 pixels of the slide (x right, y down). The AnnData is spatial
as scanpy/squidpy read Visium (:mod:`histotx.spatial`); the SpatialData store holds the slide thumbnail as
a multiscale image (scaled into level-0 px), the tiles as square polygons and the AnnData as the table
annotating them (``region = "tiles"``, ``instance_id`` = the polygon's index), all in the ``global``
coordinate system, so ``spatialdata.read_zarr`` / napari-spatialdata show predictions over the slide.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from histotx.files import atomic_folder, atomic_path

SHAPES_KEY = "tiles"
IMAGE_KEY = "he"
TABLE_KEY = "table"
PNG_MAX_PX = 1200


def write_spatialdata(adata, thumb: np.ndarray, level0_per_px: float, size0: float, path: str | Path) -> Path:
    """A SpatialData zarr store at ``path`` (written beside, then renamed into place)."""
    import geopandas as gpd
    import pandas as pd
    import shapely
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    path = Path(path)
    x0, y0 = (adata.obsm["spatial"] - size0 / 2).T
    polygons = shapely.box(x0, y0, x0 + size0, y0 + size0)
    shapes = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=polygons, index=pd.RangeIndex(adata.n_obs)),
        transformations={"global": Identity()},
    )
    scale_factors = []
    side = max(thumb.shape[:2])
    while side // 2 ** (len(scale_factors) + 1) >= 256 and len(scale_factors) < 4:
        scale_factors.append(2)
    image = Image2DModel.parse(
        np.moveaxis(np.ascontiguousarray(thumb, dtype=np.uint8), -1, 0),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=scale_factors or None,
        transformations={"global": Scale([level0_per_px, level0_per_px], axes=("y", "x"))},
    )
    table = adata.copy()
    table.uns.pop("spatial", None)  # the image lives in the store; the table annotates the tiles
    table.obs["region"] = pd.Categorical([SHAPES_KEY] * table.n_obs)
    table.obs["instance_id"] = np.arange(table.n_obs)
    table = TableModel.parse(table, region=SHAPES_KEY, region_key="region", instance_key="instance_id")
    sdata = SpatialData(images={IMAGE_KEY: image}, shapes={SHAPES_KEY: shapes}, tables={TABLE_KEY: table})
    with atomic_folder(path) as tmp:
        sdata.write(tmp)
    return path


def heat_raster(values: np.ndarray, xy0: np.ndarray, size0: float, shape: tuple[int, int], per_px: float) -> np.ndarray:
    """(h, w) float raster at the thumbnail's scale: each tile's value over its square, NaN elsewhere."""
    out = np.full(shape, np.nan, dtype=np.float64)
    h, w = shape
    for v, (x, y) in zip(values, xy0, strict=True):
        a, b = int(round(x / per_px)), int(round((x + size0) / per_px))
        c, d = int(round(y / per_px)), int(round((y + size0) / per_px))
        out[max(c, 0) : min(max(d, c + 1), h), max(a, 0) : min(max(b, a + 1), w)] = v
    return out


def write_pngs(
    adata, genes: Sequence[str], thumb: np.ndarray, level0_per_px: float, size0: float, stem: Path
) -> list[Path]:
    """One PNG per gene, ``<stem>.<GENE>.png``: the predicted log1p count per tile over the slide thumbnail,
    titled with the gene's held-out Pearson (from the head's leave-patient-out CV)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    unknown = [g for g in genes if g not in adata.var_names]
    if unknown:
        raise ValueError(f"--png: genes {unknown} are not predicted by the head (it predicts {adata.n_vars} genes)")
    xy0 = adata.obsm["spatial"] - size0 / 2
    if max(thumb.shape[:2]) > PNG_MAX_PX:  # a picture to look at: ~1200 px is plenty, and 3× faster to draw
        from histotx.spatial import shrink_image

        thumb, s = shrink_image(thumb, PNG_MAX_PX)
        level0_per_px = level0_per_px / s
    paths = []
    for gene in genes:
        col = adata.var_names.get_loc(gene)
        values = np.asarray(adata.X[:, col]).ravel()
        raster = heat_raster(values, xy0, size0, thumb.shape[:2], level0_per_px)
        h, w = thumb.shape[:2]
        fig, ax = plt.subplots(figsize=(8, 8 * h / w + 0.6), dpi=120)
        ax.imshow(thumb)
        im = ax.imshow(np.ma.masked_invalid(raster), cmap="magma", alpha=0.6, interpolation="nearest")
        r = adata.var["heldout_pearson"].iloc[col]
        conf = "held-out Pearson n/a" if not np.isfinite(r) else f"held-out Pearson {r:.2f}"
        title = f"{gene}: predicted log1p(count per tile) ({conf})"
        if "tiles_outside_training_range" in adata.var:
            n_out = int(adata.var["tiles_outside_training_range"].iloc[col])
            title += f"\n{n_out} of {adata.n_obs} tiles predicted outside the training range (clipped)"
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
        fig.colorbar(im, ax=ax, fraction=0.035, pad=0.01)
        fig.tight_layout()
        path = Path(f"{stem}.{gene}.png")
        try:
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png")
        finally:
            plt.close(fig)
        paths.append(path)
    return paths
