"""SpatialData zarr stores (scverse) of a synthetic section: the H&E as a multiscale image element, and either
the molecules as a points element or the Visium-like spots as circles annotated by a table.

Every element sits in its own frame and reaches the shared coordinate system through a transformation of its own,
so a reader must compose them: with T_img (H&E px → system) and T_el (element → system), a site at H&E px h is
stored at inv(T_el) · T_img · h.

- points (``spatialdata_points``): system ``global`` in µm; the H&E reaches it by Sequence[Scale(µm/px),
  Translation]; the molecules are stored in morphology px (0.2125 µm) of a rotated, shifted frame, reaching it by
  Sequence[Scale(0.2125), Affine(rotation + shift)] (as a Xenium section on a stage); columns x, y, z,
  feature_name (the element's feature_key), qv, cell_id; controls and low-qv molecules included.
- shapes (``spatialdata_shapes``): system ``aligned`` with no physical unit; the shapes are in it (Identity), the
  H&E reaches it by an Affine (rotation + scale + shift, as a registered image); circles of the 55 µm spot's
  radius, indexed by spot ids; the table's rows are shuffled against the shapes and linked by ``spot_id``
  (region ``spots``), X = counts, var = symbols with Ensembl ``gene_ids``, obs ``in_tissue``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PIXEL_SIZE_UM = 0.2125  # the points' unit, a Xenium morphology px
IMAGE = "he"
CHUNK = 256


def _rotation(theta_deg: float) -> np.ndarray:
    t = np.deg2rad(theta_deg)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def _affine(m: np.ndarray):
    from spatialdata.transformations import Affine

    return Affine(m, input_axes=("x", "y"), output_axes=("x", "y"))


def _image(rgb: np.ndarray, transformations: dict):
    from spatialdata.models import Image2DModel

    return Image2DModel.parse(
        np.ascontiguousarray(rgb.transpose(2, 0, 1)),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=[2, 2],
        chunks=(3, CHUNK, CHUNK),
        transformations=transformations,
    )


def points_frames(rng: np.random.Generator, mpp: float) -> dict[str, np.ndarray]:
    """The 3×3 affines of the points store: H&E px → global µm (``image``) and points → global µm (``points``)."""
    image = np.eye(3)
    image[:2, :2] = mpp * np.eye(2)
    image[:2, 2] = rng.uniform(1000.0, 5000.0, 2)
    stage = np.eye(3)
    stage[:2, :2] = _rotation(rng.uniform(5.0, 20.0) * rng.choice([-1.0, 1.0]))
    stage[:2, 2] = rng.uniform(-800.0, 800.0, 2)
    points = stage @ np.diag([PIXEL_SIZE_UM, PIXEL_SIZE_UM, 1.0])
    return {"image": image, "points": points, "stage": stage}


def write_points_store(
    path: Path,
    rgb: np.ndarray,
    frames: dict[str, np.ndarray],
    xy_he: np.ndarray,
    feature: np.ndarray,
    qv: np.ndarray,
    cell: np.ndarray,
    rng: np.random.Generator,
) -> Path:
    import pandas as pd
    from spatialdata import SpatialData
    from spatialdata.models import PointsModel
    from spatialdata.transformations import Scale, Sequence, Translation

    image_tf = Sequence(
        [Scale(np.diag(frames["image"])[:2], axes=("x", "y")), Translation(frames["image"][:2, 2], axes=("x", "y"))]
    )
    points_tf = Sequence([Scale([PIXEL_SIZE_UM, PIXEL_SIZE_UM], axes=("x", "y")), _affine(frames["stage"])])
    to_points = np.linalg.inv(frames["points"]) @ frames["image"]
    xy = xy_he @ to_points[:2, :2].T + to_points[:2, 2]
    df = pd.DataFrame(
        {
            "x": xy[:, 0],
            "y": xy[:, 1],
            "z": rng.uniform(10.0, 20.0, len(xy)),
            "feature_name": pd.Categorical(feature.astype(str)),
            "qv": qv.astype(np.float32),
            "cell_id": cell.astype(np.int64) + 1,
        }
    )
    points = PointsModel.parse(
        df,
        coordinates={"x": "x", "y": "y", "z": "z"},
        feature_key="feature_name",
        instance_key="cell_id",
        transformations={"global": points_tf},
    )
    sdata = SpatialData(images={IMAGE: _image(rgb, {"global": image_tf})}, points={"transcripts": points})
    sdata.write(path)
    return path


def shapes_frame(rng: np.random.Generator, mpp: float) -> np.ndarray:
    """H&E px → the ``aligned`` system: rotation, a scale that is not the µm/px, a shift."""
    m = np.eye(3)
    m[:2, :2] = rng.uniform(1.3, 2.2) * _rotation(rng.uniform(2.0, 6.0) * rng.choice([-1.0, 1.0]))
    m[:2, 2] = rng.uniform(200.0, 900.0, 2)
    del mpp  # the system has no physical unit: the cohort declares the slide's µm/px
    return m


def write_shapes_store(
    path: Path,
    rgb: np.ndarray,
    image_to_aligned: np.ndarray,
    spots_px: np.ndarray,
    counts,  # (spots × genes) CSR
    in_tissue: np.ndarray,
    genes: list[tuple[str, str]],
    spot_diameter_px: float,
    rng: np.random.Generator,
) -> Path:
    import anndata
    import pandas as pd
    import scipy.sparse as sp
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    xy = spots_px @ image_to_aligned[:2, :2].T + image_to_aligned[:2, 2]
    scale = float(np.sqrt(abs(np.linalg.det(image_to_aligned[:2, :2]))))
    ids = 1000 + np.arange(len(xy))
    shapes = ShapesModel.parse(
        xy,
        geometry=0,
        radius=np.full(len(xy), spot_diameter_px * scale / 2),
        index=ids,
        transformations={"aligned": Identity()},
    )
    order = rng.permutation(len(xy))  # table rows in another order than the shapes: only spot_id links them
    obs = pd.DataFrame(
        {
            "region": pd.Categorical(["spots"] * len(xy)),
            "spot_id": ids[order],
            "in_tissue": np.asarray(in_tissue, dtype=int)[order],
        },
        index=[f"spot{i}" for i in ids[order]],
    )
    var = pd.DataFrame({"gene_ids": [e for _, e in genes]}, index=[s for s, _ in genes])
    table = TableModel.parse(
        anndata.AnnData(X=sp.csr_matrix(counts, dtype=np.float32)[order], obs=obs, var=var),
        region="spots",
        region_key="region",
        instance_key="spot_id",
    )
    sdata = SpatialData(
        images={IMAGE: _image(rgb, {"aligned": _affine(image_to_aligned)})},
        shapes={"spots": shapes},
        tables={"table": table},
    )
    sdata.write(path)
    return path
