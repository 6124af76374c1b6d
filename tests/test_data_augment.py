"""Co-registered multi-crop: a coloured marker under each transcript site stays under it through
crop, resize, flips and quarter turns; sites outside a crop are dropped; colour touches pixels only."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from histotx.config import load_config
from histotx.data.augment import MultiCrop, transform_grid, transform_grids
from histotx.data.config import DataConfig
from histotx.data.pixels import IDENTITY, colour
from histotx.data.views import CropGeometry
from histotx.format import TileSample, TranscriptGrid, encode_image_rgb

COLOURS = np.array([c for c in itertools.product((0, 255), repeat=3) if any(c)], dtype=np.uint8)  # 7, no black
TILE = 256


def marked_tile(rng):
    """A black tile with a 13×13 coloured square under each of 7 sites (point footprints)."""
    rgb = np.zeros((TILE, TILE, 3), np.uint8)
    cells = rng.choice(16, size=len(COLOURS), replace=False)  # one site per 64×64 cell, kept apart
    xy = np.stack(
        [(cells % 4) * 64 + rng.uniform(16, 48, len(cells)), (cells // 4) * 64 + rng.uniform(16, 48, len(cells))],
        axis=1,
    )
    for (x, y), marker in zip(xy, COLOURS, strict=True):
        rgb[int(y) - 6 : int(y) + 7, int(x) - 6 : int(x) + 7] = marker
    offsets = np.arange(len(COLOURS) + 1)
    grid = TranscriptGrid(xy, offsets, np.arange(len(COLOURS)), np.ones(len(COLOURS)), 0.0, "point")
    return rgb, grid


def geometric_only(**extra):
    overrides = [
        "augment.color_jitter_p=0",
        "augment.hed_jitter_p=0",
        "augment.grayscale_p=0",
        "augment.blur_p_global1=0",
        "augment.blur_p_global2=0",
        "augment.blur_p_local=0",
        "augment.solarize_p_global2=0",
        "augment.mean=[0,0,0]",
        "augment.std=[1,1,1]",
        "augment.global_crop_size=128",
        "augment.local_crop_size=48",
        "augment.local_crops_number=4",
        "mask.patch_size=16",
    ]
    return MultiCrop(
        load_config(DataConfig, overrides=overrides + [f"augment.{k}={v}" for k, v in extra.items()]).augment
    )


def test_markers_stay_under_their_sites_through_every_transform():
    crop = geometric_only()
    checked = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        rgb, grid = marked_tile(rng)
        globals_, locals_ = crop.crops(rgb, grid, 0.5, np.random.default_rng(100 + seed))
        for view in globals_ + locals_:
            size = view.image.shape[-1]
            xy, site = view.grid.xy, view.grid.gene  # gene id = site number = colour index here
            assert np.all((xy >= 0) & (xy < size))
            for (x, y), s in zip(xy, site, strict=True):
                pixel = view.image[:, int(y), int(x)].numpy()
                assert np.abs(pixel - COLOURS[s] / 255.0).max() < 0.2, (seed, s, pixel)
                checked += 1
            # every marker centre visible in the view has its site: sites are dropped only outside
            for s, marker in enumerate(COLOURS / 255.0):
                hits = np.abs(view.image.numpy() - marker[:, None, None]).max(0) < 0.05
                if hits.sum() >= 9 and s not in site:
                    ys, xs = np.nonzero(hits)
                    assert min(xs.min(), ys.min()) < 4 or max(xs.max(), ys.max()) > size - 5
    assert checked > 100


@pytest.mark.parametrize("hflip,vflip,turns", list(itertools.product((False, True), (False, True), range(4))))
def test_geometry_matches_numpy_on_pixel_centres(hflip, vflip, turns):
    """Without resizing, the transformed centre of pixel (r, c) is the centre of the pixel that now holds it."""
    img = torch.arange(2 * 6 * 6).view(2, 6, 6).float()
    geom = CropGeometry(left=1, top=2, width=4, height=4, size=4, hflip=hflip, vflip=vflip, quarter_turns=turns)
    out = geom.apply_to_image(img)
    expected = img[:, 2:6, 1:5].numpy()
    if hflip:
        expected = expected[:, :, ::-1]
    if vflip:
        expected = expected[:, ::-1]
    expected = np.rot90(expected, turns, axes=(1, 2))
    np.testing.assert_allclose(out.numpy(), expected)
    for r, c in itertools.product(range(2, 6), range(1, 5)):
        x, y = geom.apply_to_xy(np.array([[c + 0.5, r + 0.5]]))[0]
        assert out[0, int(y), int(x)] == img[0, r, c]


@pytest.mark.parametrize("hflip,vflip,turns", list(itertools.product((False, True), (False, True), range(4))))
def test_channels_last_crops_are_the_channels_first_crops(hflip, vflip, turns):
    """The CPU loader's apply_to_hwc (OpenCV flips and turns, channels-last resize) = apply_to_image, bit for
    bit: shrunk, enlarged, non-square and unresized crops of a uint8 tile."""
    rgb = np.random.default_rng(turns).integers(0, 256, (40, 36, 3), dtype=np.uint8)
    for box, size in (((3, 5, 30, 26), 16), ((1, 2, 9, 12), 20), ((4, 0, 8, 8), 8)):
        geom = CropGeometry(*box, size=size, hflip=hflip, vflip=vflip, quarter_turns=turns)
        out = geom.apply_to_hwc(rgb)
        assert out.flags.c_contiguous and out.shape == (size, size, 3)
        expected = geom.apply_to_image(torch.from_numpy(rgb).permute(2, 0, 1)).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(out, expected)


def test_all_crops_of_a_tile_move_its_sites_as_each_crop_alone():
    """transform_grids (one pass for a sample's views) = transform_grid crop by crop, bit for bit, with
    spots reaching in from outside, flips, turns and resizing."""
    rng = np.random.default_rng(0)
    nnz = rng.integers(0, 4, 300)
    offsets = np.concatenate([[0], np.cumsum(nnz)])
    grid = TranscriptGrid(
        rng.uniform(-10, 140, (300, 2)),
        offsets,
        rng.integers(0, 9, offsets[-1]),
        rng.uniform(0, 3, offsets[-1]),
        20.0,
        "disk",
    )
    geometries = []
    for _ in range(12):
        w, h = (int(v) for v in rng.integers(1, 128, 2))
        geometries.append(
            CropGeometry(
                int(rng.integers(0, 129 - w)),
                int(rng.integers(0, 129 - h)),
                w,
                h,
                int(rng.choice([24, 96])),
                bool(rng.random() < 0.5),
                bool(rng.random() < 0.5),
                int(rng.integers(0, 4)),
            )
        )
    for geometry, together in zip(geometries, transform_grids(grid, geometries, tile_mpp=0.5), strict=True):
        alone = transform_grid(grid, geometry, tile_mpp=0.5)
        for name in ("xy", "offsets", "gene", "count"):
            np.testing.assert_array_equal(getattr(together, name), getattr(alone, name))
        together.validate()


def test_footprints_reaching_into_a_crop_are_kept():
    grid = TranscriptGrid([[10, 50], [95, 50], [130, 50]], [0, 1, 2, 3], [0, 1, 2], [1, 1, 1], 20.0, "disk")
    geom = CropGeometry(left=40, top=0, width=80, height=100, size=80)
    kept = transform_grid(grid, geom, tile_mpp=0.5)  # footprint radius 20 px
    assert kept.gene.tolist() == [1, 2] and np.allclose(kept.xy[:, 0], [55, 90])


def test_colour_jitter_changes_pixels_not_sites_and_is_seeded():
    rng = np.random.default_rng(0)
    rgb, grid = marked_tile(rng)
    cfg = load_config(DataConfig, overrides=["augment.color_jitter_p=1", "augment.hed_jitter_p=1"]).augment
    crop = MultiCrop(cfg)
    a = crop.crops(rgb, grid, 0.5, np.random.default_rng(5))
    b = crop.crops(rgb, grid, 0.5, np.random.default_rng(5))
    plain = geometric_only(global_crop_size=224, local_crop_size=96, local_crops_number=8).crops(
        rgb, grid, 0.5, np.random.default_rng(5)
    )
    assert len(a[0]) == 2 and len(a[1]) == 8
    assert a[0][0].image.shape == (3, 224, 224) and a[1][0].image.shape == (3, 96, 96)
    for va, vb, vp in zip(a[0] + a[1], b[0] + b[1], plain[0] + plain[1], strict=True):
        assert torch.equal(va.image, vb.image)
        np.testing.assert_array_equal(va.grid.xy, vp.grid.xy)  # same geometry draws, same sites
    assert not torch.allclose(a[0][0].image, plain[0][0].image)
    assert a[0][0].mpp == pytest.approx(plain[0][0].mpp)


def test_stain_jitter_is_identity_at_unit_scale_and_zero_shift():
    image = torch.rand(1, 3, 8, 8) * 0.9 + 0.05
    p = torch.tensor([IDENTITY])
    p[0, 8] = 1.0  # stain jitter on, α = 1, β = 0
    torch.testing.assert_close(colour(image.clone(), p), image, atol=1e-4, rtol=1e-4)
    p[0, 9] = 1.3
    assert colour(image.clone(), p).mean() < image.mean()  # more haematoxylin absorbs more light


def test_views_are_made_by_the_batch_and_equal_the_per_tile_views():
    """The loader's transform leaves pixels to the collation (one pass per op over the batch); a view's
    pixels are the same whether made with its tile (crops) or later (render in the batch)."""
    from histotx.data.pixels import normalise, render_views

    cfg = load_config(DataConfig, overrides=["augment.global_crop_size=64", "augment.local_crop_size=32"]).augment
    crop = MultiCrop(cfg)
    rng = np.random.default_rng(0)
    rgb, grid = marked_tile(rng)
    made = crop.crops(rgb, grid, 0.5, np.random.default_rng(4))
    tile = TileSample("s__t", encode_image_rgb(rgb, "png"), "png", grid, {"mpp": 0.5, "tile_px": TILE})
    later = crop(tile, np.random.default_rng(4))
    assert all(v.image is None for v in later.globals + later.locals)
    for views, ready in ((later.globals, made[0]), (later.locals, made[1])):
        images = render_views(views, [views[0].source], crop.mean, crop.std)
        assert images.dtype == torch.uint8  # a CPU worker's views, normalised on the trainer's device
        assert torch.equal(normalise(images, crop.mean, crop.std), torch.stack([v.image for v in ready]))


def test_colour_draws_follow_the_configured_probabilities():
    """The per-view colour parameters, drawn for a sample's views at once: jitter, stain, grayscale at
    their probabilities on every view, blur per view kind (DINOv2: first global always, second rarely,
    locals half), solarize only on the second global crop, factors within their ranges, the four jitter
    ops in every order. Bounds: ±5 binomial standard deviations over 2000 samples."""
    c = load_config(DataConfig).augment
    crop = MultiCrop(c)
    blur_p = np.array([c.blur_p_global1, c.blur_p_global2] + [c.blur_p_local] * c.local_crops_number)
    solarize_p = np.array([0.0, c.solarize_p_global2] + [0.0] * c.local_crops_number)
    rng = np.random.default_rng(0)
    p = np.stack([crop.colours(rng, blur_p, solarize_p) for _ in range(2000)])  # [samples, views, fields]

    def rate_is(observed: np.ndarray, expected: np.ndarray) -> None:
        sd = np.sqrt(expected * (1 - expected) / observed.shape[0])
        assert np.all(np.abs(observed.mean(0) - expected) <= 5 * sd + 1e-12), (observed.mean(0), expected)

    n_views = len(blur_p)
    jittered = (p[..., 4:8] != np.arange(4)).any(-1) | (p[..., 0:3] != 1).any(-1)
    rate_is(jittered, np.full(n_views, c.color_jitter_p))
    rate_is(p[..., 8] > 0, np.full(n_views, c.hed_jitter_p))
    rate_is(p[..., 15] > 0, np.full(n_views, c.grayscale_p))
    rate_is(p[..., 16] > 0, blur_p)
    rate_is(p[..., 17] > 0, solarize_p)
    j = p[jittered]
    assert (np.abs(j[:, 0] - 1) <= c.brightness).all() and (np.abs(j[:, 3]) <= c.hue).all()
    assert len({tuple(row) for row in j[:, 4:8]}) == 24  # every order of the four ops occurs
    sigma = p[..., 16][p[..., 16] > 0]
    assert sigma.min() >= c.blur_sigma[0] and sigma.max() <= c.blur_sigma[1]


def test_crop_boxes_are_torchvisions_random_resized_crops():
    """Every box inside the tile, its area share within its view's scale range and its aspect within the
    ratio range (up to the rounding of its sides to pixels); a tile no allowed box fits gets the largest
    centred box of an allowed aspect, as torchvision's fallback."""
    from histotx.data.augment import crop_boxes

    rng = np.random.default_rng(0)
    scales = np.array([(0.32, 1.0)] * 2 + [(0.05, 0.32)] * 8)
    boxes = np.concatenate([crop_boxes(rng, 256, 200, scales, (3 / 4, 4 / 3)) for _ in range(300)])
    left, top, w, h = boxes.T
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= 200).all() and (top + h <= 256).all()
    share = w * h / (256 * 200)
    lo, hi = np.tile(scales, (300, 1)).T
    slack = (w + h + 1) / (256 * 200)  # each side rounded by at most half a pixel
    assert (share >= lo - slack).all() and (share <= hi + slack).all()
    aspect, slack = w / h, (0.5 + 0.5 * 4 / 3) / h  # |w − a·h| ≤ 0.5 + 0.5·a for the drawn aspect a
    assert (aspect >= 3 / 4 - slack).all() and (aspect <= 4 / 3 + slack).all()
    assert len({tuple(b) for b in boxes}) > 0.9 * len(boxes)  # positions and sizes vary
    # a 256 × 40 tile: no box of aspect ≥ 3/4 covers ≥ 90 % of it; the fallback is 40 wide, 53 high, centred
    (box,) = crop_boxes(rng, 256, 40, np.array([(0.9, 1.0)]), (3 / 4, 4 / 3))
    assert box.tolist() == [0, (256 - 53) // 2, 40, 53]
