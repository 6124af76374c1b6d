"""Masks for the student: iBOT block masks on image patches, random masks on transcript tokens.

As in DINOv2, a share of the global crops in a batch is masked and their mask ratios are spread evenly
over a range (rather than drawn independently), so every batch sees easy and hard masks.
"""

from __future__ import annotations

import math

import numpy as np


def block_mask(
    height: int,
    width: int,
    n_masked: int,
    rng: np.random.Generator,
    aspect: tuple[float, float] = (0.3, 3.3),
    min_block: int = 4,
) -> np.ndarray:
    """A ``[height, width]`` boolean mask of about ``n_masked`` patches made of rectangular blocks (BEiT).

    Blocks of random area (at least ``min_block``) and log-uniform aspect are added until the target is
    reached or no block fits; the result may fall a little short of ``n_masked``, never over it.
    """
    mask = np.zeros((height, width), dtype=bool)
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    count = 0
    while count < n_masked:
        room = n_masked - count
        added = 0
        for _ in range(10):
            area = rng.uniform(min(min_block, room), room)
            ratio = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * ratio)))
            w = int(round(math.sqrt(area / ratio)))
            if not (0 < h <= height and 0 < w <= width):
                continue
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            new = h * w - int(mask[top : top + h, left : left + w].sum())
            if 0 < new <= room:
                mask[top : top + h, left : left + w] = True
                added = new
                break
        if added == 0:
            break
        count += added
    return mask


def _spread_ratios(
    n_items: int, probability: float, ratio: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    """Mask ratio of each item: ``probability`` of them get ratios spread evenly over ``ratio``, the
    rest 0; shuffled."""
    n_masked = int(n_items * probability)
    bounds = np.linspace(ratio[0], ratio[1], n_masked + 1)
    ratios = np.zeros(n_items)
    ratios[:n_masked] = rng.uniform(bounds[:-1], bounds[1:])
    return ratios[rng.permutation(n_items)]


def image_masks(
    n_crops: int,
    grid_hw: tuple[int, int],
    rng: np.random.Generator,
    probability: float = 0.5,
    ratio: tuple[float, float] = (0.1, 0.5),
    aspect: tuple[float, float] = (0.3, 3.3),
    min_block: int = 4,
) -> np.ndarray:
    """iBOT masks for ``n_crops`` global crops: ``[n_crops, h*w]`` booleans (True = masked patch)."""
    h, w = grid_hw
    ratios = _spread_ratios(n_crops, probability, ratio, rng)
    out = np.zeros((n_crops, h * w), dtype=bool)
    for i, r in enumerate(ratios):
        if r > 0:
            out[i] = block_mask(h, w, int(h * w * r), rng, aspect, min_block).ravel()
    return out


def token_masks(
    n_tokens: list[int], rng: np.random.Generator, probability: float = 0.5, ratio: tuple[float, float] = (0.1, 0.5)
) -> list[np.ndarray]:
    """Random masks over each crop's transcript tokens (token order carries no geometry to block).

    The number masked is ``ratio × n`` rounded stochastically, so crops with few tokens are masked
    with the right expected share.
    """
    ratios = _spread_ratios(len(n_tokens), probability, ratio, rng)
    out = []
    for n, r in zip(n_tokens, ratios, strict=True):
        mask = np.zeros(n, dtype=bool)
        k = min(n, int(math.floor(r * n + rng.random()))) if r > 0 else 0
        mask[rng.choice(n, size=k, replace=False)] = True
        out.append(mask)
    return out
