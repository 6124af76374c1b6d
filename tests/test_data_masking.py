"""iBOT block masks and transcript token masks."""

import numpy as np
import pytest

from histotx.data.masking import block_mask, image_masks, token_masks


def _blocks(mask):
    """Connected components (4-neighbour) of a boolean mask, as lists of cells."""
    seen, comps = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        stack, comp = [start], []
        seen[start] = True
        while stack:
            r, c = stack.pop()
            comp.append((r, c))
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        comps.append(comp)
    return comps


def test_block_mask_hits_its_target_with_blocks_not_scattered_patches():
    rng = np.random.default_rng(0)
    for target in (20, 59, 98):
        m = block_mask(14, 14, target, rng)
        assert 0.75 * target <= m.sum() <= target
        assert len(_blocks(m)) <= target // 4 + 1  # blocks of >= 4 patches (merged when touching)
    assert block_mask(14, 14, 0, rng).sum() == 0


def test_block_aspects_stay_in_range():
    rng = np.random.default_rng(1)
    aspects = []
    for _ in range(50):
        m = block_mask(14, 14, 12, rng, aspect=(0.5, 2.0), min_block=12)
        rows, cols = np.nonzero(m)
        h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
        if m.sum() == h * w:  # one rectangle (a rounded-down first block may get a second one)
            aspects.append(h / w)
    assert len(aspects) >= 15
    assert 0.3 <= min(aspects) < 0.8 and 1.25 < max(aspects) <= 3.0  # range used, rounding aside


def test_image_masks_share_and_spread_of_ratios():
    rng = np.random.default_rng(2)
    masks = image_masks(16, (14, 14), rng, probability=0.5, ratio=(0.1, 0.5))
    assert masks.shape == (16, 196)
    ratios = np.sort(masks.mean(1))
    assert (ratios == 0).sum() == 8
    masked = ratios[8:]
    assert masked.min() >= 0.05 and masked.max() <= 0.5 and masked.max() - masked.min() > 0.2


def test_token_masks_expected_share_and_empty_crops():
    rng = np.random.default_rng(3)
    masks = token_masks([0, 1, 50, 50, 3, 40], rng, probability=1.0, ratio=(0.3, 0.3))
    assert [m.shape[0] for m in masks] == [0, 1, 50, 50, 3, 40]
    assert [int(m.sum()) for m in masks][2:4] == [15, 15]
    shares = [token_masks([10], np.random.default_rng(s), 1.0, (0.25, 0.25))[0].sum() for s in range(400)]
    assert np.mean(shares) == pytest.approx(2.5, abs=0.15)  # stochastic rounding keeps the expected share
    none = token_masks([5, 5], rng, probability=0.0)
    assert not any(m.any() for m in none)
