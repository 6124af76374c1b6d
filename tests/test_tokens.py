"""Binning transcript grids into tokens (histotx.tokens): counts, geometry, normalisation, transforms."""

from __future__ import annotations

import numpy as np
import pytest

from histotx.format import TranscriptGrid
from histotx.tokens import NORMALISED_TOTAL, TranscriptCells, bin_grid


def make_grid(xy, genes, counts, footprint_um=0.0, shape="point") -> TranscriptGrid:
    """Grid from per-site lists of genes and counts."""
    offsets = np.concatenate([[0], np.cumsum([len(g) for g in genes])])
    gene = np.concatenate([np.asarray(g, dtype=np.int64) for g in genes]) if genes else np.zeros(0)
    count = np.concatenate([np.asarray(c, dtype=np.float64) for c in counts]) if counts else np.zeros(0)
    return TranscriptGrid(np.asarray(xy, dtype=np.float64).reshape(-1, 2), offsets, gene, count, footprint_um, shape)


def as_dict(cells: TranscriptCells) -> dict[tuple[float, float], dict[int, float]]:
    out = {}
    for i in range(cells.n_cells):
        sl = slice(cells.offsets[i], cells.offsets[i + 1])
        out[tuple(np.round(cells.xy[i], 4))] = dict(
            zip(cells.gene[sl].tolist(), cells.weight[sl].tolist(), strict=True)
        )
    return out


def raw_ratio(cell: dict[int, float], a: int, b: int) -> float:
    """Ratio of two genes' un-normalised counts in one token (normalisation cancels)."""
    return float(np.expm1(cell[a]) / np.expm1(cell[b]))


def test_native_tokens_are_sites_inside_the_image_normalised():
    grid = make_grid(
        [[1.5, 2.5], [10.0, 3.0], [-1.0, 4.0], [5.0, 5.0]],
        [[3, 7], [2], [1], [4]],
        [[1.0, 3.0], [5.0], [9.0], [0.0]],
        footprint_um=2.0,
        shape="square",
    )
    cells = bin_grid(grid, mpp=0.5, resolution_um=None, image_hw=(8, 12))
    # site 2 lies outside the image, site 3 holds no counts
    assert cells.n_cells == 2
    np.testing.assert_allclose(cells.xy, [[1.5, 2.5], [10.0, 3.0]])
    assert cells.gene.tolist() == [3, 7, 2]
    np.testing.assert_allclose(cells.weight, np.log1p(np.array([0.25, 0.75, 1.0]) * NORMALISED_TOTAL), rtol=1e-6)
    assert cells.resolution_um == 2.0
    assert (cells.xy.dtype, cells.gene.dtype, cells.weight.dtype, cells.offsets.dtype) == (
        np.float32,
        np.int64,
        np.float32,
        np.int64,
    )
    # molecules (no footprint) are given the pixel size as their token size
    molecules = make_grid([[1.0, 1.0]], [[0]], [[1.0]])
    assert bin_grid(molecules, mpp=0.25, resolution_um=None, image_hw=(4, 4)).resolution_um == 0.25


def test_small_footprints_go_to_the_cell_of_their_centre():
    rng = np.random.default_rng(0)
    n, h, w, mpp, r = 200, 40, 50, 0.5, 4.0  # cells of 8 px; 50 px wide → a cut last column
    xy = rng.uniform([-5, -5], [w + 5, h + 5], size=(n, 2))
    genes = [rng.choice(30, size=rng.integers(1, 4), replace=False) for _ in range(n)]
    counts = [rng.integers(1, 6, size=len(g)).astype(float) for g in genes]
    cells = bin_grid(make_grid(xy, genes, counts, footprint_um=2.0, shape="square"), mpp, r, (h, w))

    side = r / mpp
    expected: dict[tuple[int, int], dict[int, float]] = {}
    for (x, y), gs, cs in zip(xy, genes, counts, strict=True):
        if 0 <= x < w and 0 <= y < h:
            cell = expected.setdefault((int(y // side), int(x // side)), {})
            for g, c in zip(gs, cs, strict=True):
                cell[int(g)] = cell.get(int(g), 0.0) + c
    got = as_dict(cells)
    assert len(got) == len(expected) == cells.n_cells
    for (row, col), counts_of in expected.items():
        cx = (col * side + min((col + 1) * side, w)) / 2
        cy = (row * side + min((row + 1) * side, h)) / 2
        total = sum(counts_of.values())
        want = {g: np.log1p(c / total * NORMALISED_TOTAL) for g, c in counts_of.items()}
        have = got[(round(cx, 4), round(cy, 4))]
        assert have.keys() == want.keys()
        np.testing.assert_allclose([have[g] for g in want], list(want.values()), rtol=1e-5)
    # tokens come row by row, and the cut last column's centre is inside the image
    order = np.lexsort((cells.xy[:, 0], cells.xy[:, 1]))
    assert np.array_equal(order, np.arange(cells.n_cells))
    assert cells.xy[:, 0].max() == 49.0  # the column [48, 50) is centred at 49


def test_large_footprints_spread_by_area_and_lose_the_share_outside_the_tile():
    # 16 µm squares over 8 µm cells at 1 µm/px: a square centred on a cell corner covers 4 cells by ¼.
    grid = make_grid(
        [[16, 16], [24, 16], [0, 48], [8, 48]],
        [[0], [1], [2], [3]],
        [[4.0], [12.0], [6.0], [6.0]],
        footprint_um=16.0,
        shape="square",
    )
    got = as_dict(bin_grid(grid, mpp=1.0, resolution_um=8.0, image_hw=(64, 64)))
    centre = lambda row, col: (col * 8 + 4.0, row * 8 + 4.0)  # noqa: E731
    assert set(got[centre(1, 1)]) == {0}
    assert set(got[centre(1, 3)]) == {1}
    # cells shared by the first two spots mix them by counts × covered fraction (¼ each)
    assert raw_ratio(got[centre(1, 2)], 1, 0) == pytest.approx(3.0, rel=1e-5)
    assert raw_ratio(got[centre(2, 2)], 1, 0) == pytest.approx(3.0, rel=1e-5)
    # the third spot hangs half outside: its cells keep ¼ each, not ½ (the outside half is dropped)
    assert raw_ratio(got[centre(5, 0)], 2, 3) == pytest.approx(1.0, rel=1e-5)
    assert set(got[centre(5, 1)]) == {3}
    assert len(got) == 3 * 2 + 2 * 2  # spots 1-2 cover 3×2 cells, spots 3-4 cover 2×2
    assert all(x >= 0 for x, _ in got)


def test_disk_spot_covers_the_cells_under_it():
    r_px = 55 / 0.5 / 2  # a 55 µm Visium spot at 0.5 µm/px
    centre = np.array([100.0, 90.0])
    grid = make_grid([centre], [[0, 1]], [[10.0, 30.0]], footprint_um=55.0, shape="disk")
    cells = bin_grid(grid, mpp=0.5, resolution_um=8.0, image_hw=(224, 224))
    half_diag = 16 * np.sqrt(2) / 2
    dist = np.linalg.norm(cells.xy - centre, axis=1)
    assert dist.max() <= r_px + half_diag
    inside = 0  # cells lying wholly inside the disk must all be tokens
    for row in range(14):
        for col in range(14):
            corners = np.array([[col, row], [col + 1, row], [col, row + 1], [col + 1, row + 1]]) * 16.0
            inside += bool(np.all(np.linalg.norm(corners - centre, axis=1) <= r_px))
    assert inside >= 20 and cells.n_cells >= inside
    # one source → every token has the spot's profile
    np.testing.assert_allclose(cells.weight[0::2], np.log1p(0.25 * NORMALISED_TOTAL), rtol=1e-6)
    np.testing.assert_allclose(cells.weight[1::2], np.log1p(0.75 * NORMALISED_TOTAL), rtol=1e-6)


def test_empty_grids_and_bad_arguments():
    empty = bin_grid(TranscriptGrid.empty(), mpp=0.5, resolution_um=16.0, image_hw=(224, 224))
    assert empty.n_cells == 0 and empty.offsets.tolist() == [0] and empty.resolution_um == 16.0
    assert bin_grid(TranscriptGrid.empty(), mpp=0.5, resolution_um=None, image_hw=(8, 8)).n_cells == 0
    grid = make_grid([[1, 1]], [[0]], [[1.0]])
    with pytest.raises(ValueError, match="mpp"):
        bin_grid(grid, mpp=0.0, resolution_um=8.0, image_hw=(8, 8))
    with pytest.raises(ValueError, match="resolution_um"):
        bin_grid(grid, mpp=0.5, resolution_um=-2.0, image_hw=(8, 8))


def marker_image(h, w, cells: TranscriptCells) -> np.ndarray:
    """An image whose non-zero pixels are at the cells' centres, valued 1..n."""
    img = np.zeros((h, w), dtype=np.int32)
    for i, (x, y) in enumerate(cells.xy):
        img[int(y), int(x)] = i + 1
    return img


def assert_markers_match(img: np.ndarray, cells: TranscriptCells) -> None:
    for i, (x, y) in enumerate(cells.xy):
        assert img[int(np.floor(y)), int(np.floor(x))] == i + 1, f"cell {i} at {(x, y)}"


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_transforms_follow_the_image(k):
    h, w = 6, 9
    rng = np.random.default_rng(k)
    pix = rng.choice(h * w, size=5, replace=False)
    xy = np.stack([pix % w + 0.5, pix // w + 0.5], axis=1)
    cells = TranscriptCells(xy, np.arange(6), np.arange(5), np.ones(5), 8.0)
    img = marker_image(h, w, cells)
    assert_markers_match(np.rot90(img, k), cells.rot90((h, w), k))
    assert_markers_match(img[:, ::-1], cells.flip((h, w), horizontal=True))
    assert_markers_match(img[::-1], cells.flip((h, w), horizontal=False))
    cropped = cells.crop(2, 1, 5, 4)
    crop_img = img[1:5, 2:7]
    assert cropped.n_cells == int((crop_img > 0).sum())
    for x, y in cropped.xy:
        assert crop_img[int(y), int(x)] > 0
    # the CSR stays aligned with the kept cells
    assert cropped.gene.tolist() == [int(crop_img[int(y), int(x)]) - 1 for x, y in cropped.xy]
    np.testing.assert_allclose(cells.scale(0.5).xy, xy * 0.5)


def test_binning_many_tiles_at_once_gives_each_tile_its_own_tokens():
    """bin_grids (a batch's views numbered one after the other) = bin_grid tile by tile, bit for bit: mixed
    native and binned draws, µm per pixel and footprints (molecules, bins, spots spread over a lattice),
    sites outside the image, zero counts and empty tiles."""
    from histotx.tokens import bin_grids

    rng = np.random.default_rng(0)

    def random_grid() -> TranscriptGrid:
        shape = str(rng.choice(["point", "disk", "square"]))
        footprint = {"point": 0.0, "disk": float(rng.choice([10.0, 55.0])), "square": float(rng.choice([2.0, 16.0]))}
        n = int(rng.integers(0, 40))
        nnz = rng.integers(0, 5, n)
        genes = [rng.integers(0, 30, k) for k in nnz]
        counts = [rng.integers(0, 4, k) for k in nnz]
        return make_grid(rng.uniform(-20, 110, (n, 2)), genes, counts, footprint[shape], shape)

    for _ in range(40):
        n_tiles = int(rng.integers(1, 10))
        grids = [random_grid() for _ in range(n_tiles)]
        mpps = rng.uniform(0.3, 2.0, n_tiles).tolist()
        sizes = [None if rng.random() < 0.3 else float(rng.choice([2.0, 8.0, 32.0])) for _ in range(n_tiles)]
        hw = (int(rng.integers(20, 100)), int(rng.integers(20, 100)))
        for grid, mpp, size, got in zip(grids, mpps, sizes, bin_grids(grids, mpps, sizes, hw), strict=True):
            alone = bin_grid(grid, mpp, size, hw)
            for name in ("xy", "offsets", "gene", "weight"):
                np.testing.assert_array_equal(getattr(got, name), getattr(alone, name))
            assert got.resolution_um == alone.resolution_um
            again = TranscriptCells(got.xy, got.offsets, got.gene, got.weight, got.resolution_um)  # checks the CSR
            for name in ("xy", "offsets", "gene", "weight"):  # already in the class's dtypes, contiguous
                assert getattr(again, name).dtype == getattr(got, name).dtype and getattr(got, name).flags.c_contiguous
