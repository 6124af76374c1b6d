"""The `spatialdata` technology: a SpatialData zarr store as a cohort sample.

Small stores made here: polygons become their centroids through a Scale, a table is linked to its shapes by
instance_key whatever its row order, scan finds a store, the image element is the slide (read as OME-Zarr,
level by level), and every bad store is refused naming the store and the problem. The co-registration test
(tests/test_shard_coregistration.py) runs the synthetic stores through the whole pipeline.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml

pytest.importorskip("spatialdata", reason="the spatialdata technology needs spatialdata (histotx[spatialdata])")

import anndata  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from shapely.geometry import Polygon  # noqa: E402
from spatialdata import SpatialData  # noqa: E402
from spatialdata.models import Image2DModel, PointsModel, ShapesModel, TableModel  # noqa: E402
from spatialdata.transformations import Affine, Identity, Scale, Sequence, Translation  # noqa: E402

from histotx.sharding.cohort import load_cohort  # noqa: E402
from histotx.sharding.errors import InputError  # noqa: E402
from histotx.sharding.readers import read_genes, read_sites, slide_mpp_hint, slide_path  # noqa: E402
from histotx.sharding.scan import scan  # noqa: E402
from histotx.sharding.slides import Slide  # noqa: E402


def _image(transformations, size=(200, 300), levels=True):
    rng = np.random.default_rng(0)
    rgb = np.full((3, *size), 240, np.uint8)
    rgb[:, 20:-20, 20:-20] = np.array([200, 120, 170], np.uint8)[:, None, None]
    rgb[:, 20:-20, 20:-20] += rng.integers(0, 20, (3, size[0] - 40, size[1] - 40), dtype=np.uint8)
    return Image2DModel.parse(
        rgb, dims=("c", "y", "x"), scale_factors=[2] if levels else None, chunks=(3, 64, 64),
        transformations=transformations,
    )  # fmt: skip


def _table(region, ids, genes=("GENE1", "GENE2", "GENE3"), order=None):
    n = len(ids)
    order = np.arange(n) if order is None else order
    counts = np.arange(n * len(genes), dtype=np.float32).reshape(n, len(genes)) % 5
    obs = pd.DataFrame({"region": pd.Categorical([region] * n), "cell": np.asarray(ids)[order]})
    obs.index = obs.index.astype(str)
    adata = anndata.AnnData(X=sp.csr_matrix(counts[order]), obs=obs, var=pd.DataFrame(index=list(genes)))
    return TableModel.parse(adata, region=region, region_key="region", instance_key="cell"), counts


def _points(transformations, n=50, feature_key="gene", seed=1):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "x": rng.uniform(30, 120, n),
            "y": rng.uniform(30, 80, n),
            feature_key or "probe": pd.Categorical(rng.choice(["A", "B", "BLANK_0001", "NegPrb3"], n)),
        }
    )
    kwargs = {"feature_key": feature_key} if feature_key else {}
    return PointsModel.parse(df, coordinates={"x": "x", "y": "y"}, transformations=transformations, **kwargs), df


def _cohort(tmp_path, samples):
    path = tmp_path / "cohort.yaml"
    path.write_text(yaml.safe_dump({"samples": samples}))
    cohort = load_cohort(path)
    assert not cohort.invalid, cohort.invalid
    return cohort, {s.id: s for s in cohort.samples}


def test_polygons_linked_by_instance_key_become_centroids(tmp_path):
    """Squares of side 10 in a system the image reaches by Scale(2): sites at centre / 2, the table's shuffled
    rows linked by instance id, the footprint a disk of the squares' area; the slide is the image element."""
    centres = np.array([[40.0, 60.0], [100.0, 200.0], [300.0, 150.0], [410.0, 330.0]])
    squares = [Polygon([(x - 5, y - 5), (x + 5, y - 5), (x + 5, y + 5), (x - 5, y + 5)]) for x, y in centres]
    ids = np.array([7, 3, 11, 5])
    shapes = ShapesModel.parse(
        __import__("geopandas").GeoDataFrame({"geometry": squares}, index=ids), transformations={"global": Identity()}
    )
    order = np.array([2, 0, 3, 1])
    table, counts = _table("cells", ids, order=order)
    store = tmp_path / "s.zarr"
    SpatialData(
        images={"he": _image({"global": Scale([2.0, 2.0, 1.0], axes=("x", "y", "c"))})},
        shapes={"cells": shapes},
        tables={"table": table},
    ).write(store)
    cohort, s = _cohort(tmp_path, [{"id": "poly", "technology": "spatialdata", "data": "s.zarr", "mpp": 0.5}])
    sites = read_sites(s["poly"], cohort)
    # Sites come in table order; each row's counts are its own shape's.
    np.testing.assert_allclose(sites.xy_px, centres[order] / 2, atol=1e-9)
    np.testing.assert_array_equal(sites.counts.toarray(), counts[order])
    assert sites.footprint_shape == "disk"
    assert sites.footprint_um == pytest.approx(2 * np.sqrt(25 / np.pi) * 0.5)  # 5 px squares at 0.5 µm/px
    assert [g for g, _ in read_genes(s["poly"], cohort)] == ["GENE1", "GENE2", "GENE3"]
    assert slide_path(s["poly"], cohort) == store / "images" / "he"
    with Slide(slide_path(s["poly"], cohort), mpp_hint=slide_mpp_hint(s["poly"], cohort)) as slide:
        assert (slide.width, slide.height, len(slide.levels), slide.mpp) == (300, 200, 2, 0.5)
        region = slide.read_region(0, 250, 150, 100, 100)  # past the image's edge: white
        assert region.shape == (100, 100, 3) and (region[60:, :] == 255).all()
        assert region[:30, :30].mean() < 220  # stained tissue from the zarr chunks
    for folder, problem in ((store, "no `multiscales` in its zarr attributes"), (tmp_path, "no zarr group in it")):
        with pytest.raises(InputError, match=problem):  # a slide folder must be an OME-Zarr image
            Slide(folder, mpp=0.5)
    (entry,) = scan(tmp_path)
    assert entry["technology"] == "spatialdata" and entry["data"] == "s.zarr" and entry["id"] == "s"


def test_points_through_a_sequence_and_the_declared_unit(tmp_path):
    """Molecules stored in 0.2125 µm px of a rotated frame, the image in µm by Sequence[Scale, Translation]:
    each lands at inv(T_image) · T_points; controls are dropped; µm/px = um_per_unit × the image's scale."""
    theta = np.deg2rad(12.0)
    rot = np.array([[np.cos(theta), -np.sin(theta), 30.0], [np.sin(theta), np.cos(theta), -20.0], [0, 0, 1]])
    t_points = Sequence([Scale([0.2125, 0.2125], axes=("x", "y")), Affine(rot, ("x", "y"), ("x", "y"))])
    t_image = Sequence([Scale([0.5, 0.5], axes=("x", "y")), Translation([10.0, 5.0], axes=("x", "y"))])
    points, df = _points({"global": t_points})
    SpatialData(images={"he": _image({"global": t_image})}, points={"tx": points}).write(tmp_path / "p.zarr")
    cohort, s = _cohort(
        tmp_path, [{"id": "pts", "technology": "spatialdata", "data": "p.zarr", "options": {"um_per_unit": 1.0}}]
    )
    assert slide_mpp_hint(s["pts"], cohort) == pytest.approx(0.5)
    sites = read_sites(s["pts"], cohort)
    genes = [df.gene[i] for i in range(len(df)) if df.gene[i] in ("A", "B")]
    keep = df.gene.isin(["A", "B"]).to_numpy()
    g = np.c_[df.x, df.y][keep] * 0.2125 @ rot[:2, :2].T + rot[:2, 2]
    expect = (g - [10.0, 5.0]) / 0.5
    got = np.concatenate([sites.in_box(-1e9, -1e9, 1e9, 1e9)[0]])
    order = np.lexsort(expect.T)
    np.testing.assert_allclose(got[np.lexsort(got.T)], expect[order], atol=1e-9)
    assert sites.dropped == {"control_probe": int((~keep).sum())} and len(genes) == len(got)
    assert [n for n, _ in read_genes(s["pts"], cohort)] == ["A", "B"]


def _bad_stores(tmp_path):
    """(sample entry, expected message) for every refusal."""
    ident = {"global": Identity()}
    cases = []

    def store(name, **elements):
        SpatialData(**elements).write(tmp_path / f"{name}.zarr")
        return f"{name}.zarr"

    pts, _ = _points(ident)
    shapes = ShapesModel.parse(np.array([[50.0, 50.0], [80.0, 60.0]]), geometry=0, radius=np.ones(2),
                               transformations=ident)  # fmt: skip
    data = store("two_points", images={"he": _image(ident)}, points={"a": pts, "b": _points(ident, seed=2)[0]})
    one = "expected one points element or one shapes element annotated by a table, found points 'a', points 'b'"
    cases.append(({"data": data}, one + ": name one with options.points or options.shapes"))
    cases.append(
        ({"data": data, "options": {"points": "c"}}, "no points element 'c' (option points); the store's points: a, b")
    )
    cases.append(({"data": data, "options": {"points": "a", "image": "hne"}}, "no image element 'hne' (option image)"))
    data = store("no_table", images={"he": _image(ident)}, shapes={"spots": shapes})
    cases.append(({"data": data, "options": {"shapes": "spots"}}, "no table links the shapes 'spots' to counts"))
    data = store(
        "strangers",
        images={"he": _image(ident)},
        shapes={"spots": shapes},
        tables={"table": _table("spots", [5, 6])[0]},
    )
    cases.append(({"data": data}, "2 of 2 rows of table 'table' name no shape of 'spots' (e.g. 5)"))
    flat = Affine(np.array([[1.0, 2.0, 0.0], [0.5, 1.0, 0.0], [0, 0, 1]]), ("x", "y"), ("x", "y"))
    data = store("singular", images={"he": _image({"global": flat})}, points={"a": pts})
    cases.append(({"data": data}, "image 'he': its transformation to 'global' is not invertible"))
    pts3 = PointsModel.parse(
        pd.DataFrame({"x": [50.0], "y": [60.0], "z": [1.0], "gene": ["A"]}), coordinates={"x": "x", "y": "y", "z": "z"},
        feature_key="gene",
        transformations={"global": Affine(np.array([[1, 0, 3.0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
                                          ("x", "y", "z"), ("x", "y", "z"))},
    )  # fmt: skip
    data = store("tilted", images={"he": _image(ident)}, points={"a": pts3})
    cases.append(({"data": data}, "element 'a': unsupported transformation to 'global': x, y depend on z"))
    nogene, _ = _points(ident, feature_key=None)
    data = store("nogene", images={"he": _image(ident)}, points={"a": nogene})
    cases.append(({"data": data}, "points 'a' have no gene column"))
    data = store("elsewhere", images={"he": _image({"aligned": Identity()})}, points={"a": pts})
    cases.append(
        ({"data": data}, "(coordinate systems ['aligned']) and the points 'a' (['global']) share no coordinate system")
    )
    other = "coordinate system 'x' is not one the image 'he' and the points 'a' share (they share ['global'])"
    cases.append(({"data": "two_points.zarr", "options": {"points": "a", "coordinate_system": "x"}}, other))
    data = store("nompp", images={"he": _image(ident)}, points={"a": pts})
    cases.append(({"data": data, "mpp": None}, "µm/px of the image unknown: set the sample's `mpp:`"))
    (tmp_path / "plain.zarr").mkdir()
    cases.append(({"data": "plain.zarr"}, "not a SpatialData store: no zarr.json or .zgroup in the folder"))
    return cases


def test_bad_stores_are_refused_naming_store_and_problem(tmp_path):
    cases = _bad_stores(tmp_path)
    entries = [{"id": f"s{i}", "technology": "spatialdata", "mpp": 0.5, **entry} for i, (entry, _) in enumerate(cases)]
    cohort, samples = _cohort(tmp_path, entries)
    for i, (entry, message) in enumerate(cases):
        sample = samples[f"s{i}"]
        with pytest.raises(InputError) as caught:  # the first question the pipeline asks of the sample, or a later
            slide_mpp_hint(sample, cohort)
            read_genes(sample, cohort)
            read_sites(sample, cohort)
            pytest.fail(f"{entry} was not refused")
        assert caught.value.path == str(tmp_path / entry["data"]), (entry, str(caught.value))
        assert message in caught.value.problem, (entry, str(caught.value))
