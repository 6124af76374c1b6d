"""The pixel half of multi-crop: decoded tiles + drawn view parameters → views.

:mod:`histotx.data.augment` draws every random number (crop geometry, colour parameters) and moves the
transcript sites; this module only computes pixels from those parameters, in two implementations of the
same operations, both held by the tests to torchvision's reference. The operations are DINOv2's recipe:
colour jitter (brightness, contrast, saturation, hue) in a random order, then stain jitter, grayscale,
blur, solarize.

- On a GPU (:mod:`histotx.data.device_decode`, per batch): torch ops over a stack of views with per-view
  parameters (:func:`render`, :func:`colour`): brightness, contrast and saturation as one pass per jitter
  step, hue as torchvision's HSV rotation, stain jitter as one 3×3 map in optical density, blur separable.
  A view's parameters stay on the CPU, where the decisions (which views an operation touches) are made
  without device synchronisation.
- In a CPU loader worker (:func:`render_views` on CPU tiles): one view at a time, channels last, with
  OpenCV's kernels (:func:`colour_hwc`): each op is one cache-resident pass over one view (a 3×4 colour
  map, an HSV conversion, a separable filter) in two buffers reused for all views, where torch's
  elementwise ops on CPU take several passes per op. The views leave the worker as bytes; the trainer's
  device normalises them (:func:`normalise`, called by :class:`histotx.data.device_decode.BatchDecoder`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data

from histotx.data.opencv import cv2

if TYPE_CHECKING:
    from histotx.data.views import CropGeometry, View

COLOUR_FIELDS = (
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "order0",
    "order1",
    "order2",
    "order3",
    "hed",
    "alpha_h",
    "alpha_e",
    "alpha_d",
    "beta_h",
    "beta_e",
    "beta_d",
    "grayscale",
    "blur_sigma",
    "solarize",
)
IDENTITY = (1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
"""Colour parameters that leave a view unchanged (jitter factors 1, hue 0, every other op off)."""
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # op codes in order0..order3 (torchvision's order)
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _hed_matrices() -> tuple[np.ndarray, np.ndarray]:
    from skimage.color import hed_from_rgb, rgb_from_hed

    return np.asarray(hed_from_rgb, np.float64), np.asarray(rgb_from_hed, np.float64)


_HED = _hed_matrices()


def _per_view(values: np.ndarray, like: torch.Tensor, trailing: int = 3) -> torch.Tensor:
    """Per-view numbers as a tensor shaped to broadcast over ``like``'s views (dtype and device of ``like``)."""
    return (
        torch.as_tensor(values, dtype=like.dtype)
        .to(like.device, non_blocking=True)
        .view(*np.shape(values), *([1] * trailing))
    )


def _subset(x: torch.Tensor, mask: np.ndarray, fn) -> torch.Tensor:
    """``fn(views, their indices)`` on the views where ``mask`` holds, in place in ``x`` (a tensor this
    module owns); the other views are untouched, bit for bit. Decisions are made on the CPU (the
    parameters live there): no device synchronisation."""
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return x
    if idx.size == x.shape[0]:
        return fn(x, idx)
    where = torch.as_tensor(idx).to(x.device, non_blocking=True)
    return _put(x, idx, where, fn(x.index_select(0, where), idx))


def _put(out: torch.Tensor, idx: np.ndarray, where: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    """``out[idx] = values``: view by view on CPU (a memcpy each; index_copy_ is several times slower
    there), one index_copy_ kernel on a GPU."""
    if out.device.type != "cpu":
        return out.index_copy_(0, where, values)
    for j, i in enumerate(idx.tolist()):
        out[i].copy_(values[j])
    return out


def _gray(x: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` → ``[N, 1, H, W]`` luma, as torchvision computes it."""
    r, g, b = x.unbind(1)
    return (r * _GRAY[0]).add_(g, alpha=_GRAY[1]).add_(b, alpha=_GRAY[2]).unsqueeze(1)


def _affine(x: torch.Tensor, matrix: np.ndarray, offset: np.ndarray) -> torch.Tensor:
    """Per-view colour map ``matrix @ rgb + offset`` (``[N, 3, 3]``, ``[N, 3]``): three broadcast
    multiply-adds (a batched matmul with an inner size of 3 is several times slower on CPU)."""
    m = _per_view(matrix, x, 2)  # [N, 3, 3, 1, 1]
    out = (x[:, 0:1] * m[:, :, 0]).add_(_per_view(offset, x, 2))  # (an addcmul onto a broadcast base is slow)
    return out.addcmul_(m[:, :, 1], x[:, 1:2]).addcmul_(m[:, :, 2], x[:, 2:3])


def _jitter_step(x: torch.Tensor, p: np.ndarray, op: np.ndarray) -> torch.Tensor:
    """One of the four jitter steps: each view applies its own op (``op[n]``) with its own factor, as
    torchvision's adjust_brightness (b·x), adjust_contrast (c·x + (1 − c)·mean gray), adjust_saturation
    (s·x + (1 − s)·gray) and adjust_hue, each clamped to [0, 1]. The first three are one pass for all
    views, x·a + gray·g + o, whose identity (a = 1, g = o = 0) leaves a view bit for bit as it was."""
    b = np.where(op == BRIGHTNESS, p[:, 0], 1.0)
    c = np.where(op == CONTRAST, p[:, 1], 1.0)
    s = np.where(op == SATURATION, p[:, 2], 1.0)
    if (b != 1).any() or (c != 1).any() or (s != 1).any():
        gray = _gray(x) if (s != 1).any() else None
        if (c != 1).any():  # mean gray = gray weights · channel means
            gray_mean = x.mean(dim=(2, 3)) @ torch.tensor(_GRAY, dtype=x.dtype, device=x.device)
            offset = (gray_mean * _per_view(1 - c, x, 0))[:, None, None, None]
        x = x.mul_(_per_view(b * c * s, x))
        if (c != 1).any():
            x = x.add_(offset)
        if gray is not None:
            x = x.addcmul_(gray, _per_view(1 - s, x))
        x = x.clamp_(0.0, 1.0)
    return _subset(x, (op == HUE) & (p[:, 3] != 0), lambda v, i: _hue(v, p[i, 3]))


def _hue(x: torch.Tensor, shift: np.ndarray) -> torch.Tensor:
    """torchvision's adjust_hue (HSV hue rotated by ``shift`` turns) with a shift per view, without
    building the HSV image or comparing (both slow on CPU): each channel is V − C·f(k), k = n + 6h,
    n = 5, 3, 1 for R, G, B, f the hexcone's ramp (periodic in k, written out over two periods)."""
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    # hue in sextants, from the sector torchvision picks: max at R, else at G, else at B (grey: 0)
    top_r = (maxc - r).sign_().neg_().add_(1.0)  # 1 where max == r (maxc − r ≥ 0)
    top_g = (maxc - g).sign_().neg_().add_(1.0).mul_(1.0 - top_r)
    h = (
        (g - b)
        .mul_(top_r)
        .add_((b - r).add_(chroma, alpha=2.0).mul_(top_g))
        .add_((r - g).add_(chroma, alpha=4.0).mul_((1.0 - top_r).sub_(top_g)))
    )
    h = h.div_(chroma.clamp_min(1e-30)).add_(_per_view(6.0 * shift + 6.0, x, 2))
    h = h.sub_(torch.floor(h / 6.0).mul_(6.0))  # (hue + 6·shift) mod 6, in [0, 6)
    k = h[:, None] + _per_view(np.array([5.0, 3.0, 1.0]), x, 2)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0).add_(torch.minimum(k - 6.0, 10.0 - k).clamp_(0.0, 1.0))
    return maxc[:, None] - chroma[:, None] * ramp


def _stain(x: torch.Tensor, p: np.ndarray) -> torch.Tensor:
    """Tellez et al. stain jitter: optical density → H, E, DAB → scale α, shift β → back, as one 3×3 map
    of log intensities: exp(−((−log x) @ H·diag(α)·R + β·R)) = exp(log x @ H·diag(α)·R − β·R)."""
    hed_from_rgb, rgb_from_hed = _HED
    alpha, beta = p[:, 9:12], p[:, 12:15]
    matrix = np.einsum("ji,nj,kj->nik", rgb_from_hed, alpha, hed_from_rgb)  # column form of H·diag(α)·R
    log_x = x.clamp_min(1e-6).log_()
    return _affine(log_x, matrix, -(beta @ rgb_from_hed)).exp_().clamp_(0.0, 1.0)


def _blur(x: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
    """torchvision's gaussian_blur (kernel 2·⌈3σ⌉ + 1, reflect padding) with a σ per view, separable, as
    shifted multiply-adds (depthwise convolutions and banded matmuls are several times slower on CPU):
    every kernel is zero-padded to the widest, which leaves each view's result as its own kernel's."""
    hgt, wid = x.shape[-2:]
    radius = np.ceil(3 * sigma).astype(int)
    r = int(radius.max())
    taps = np.arange(-r, r + 1, dtype=np.float64)
    kernel = np.exp(-(taps[None] ** 2) / (2 * sigma[:, None] ** 2)) * (np.abs(taps)[None] <= radius[:, None])
    kernel = _per_view((kernel / kernel.sum(1, keepdims=True)).T, x)  # [2r + 1, N, 1, 1, 1]
    padded = F.pad(x, (r, r, r, r), mode="reflect")
    rows = padded[..., 0:wid] * kernel[0]
    for t in range(1, 2 * r + 1):
        rows.addcmul_(padded[..., t : t + wid], kernel[t])
    out = rows[..., 0:hgt, :] * kernel[0]
    for t in range(1, 2 * r + 1):
        out.addcmul_(rows[..., t : t + hgt, :], kernel[t])
    return out


def colour(x: torch.Tensor, p: np.ndarray) -> torch.Tensor:
    """``x``: ``[N, 3, H, W]`` float in [0, 1], overwritten; ``p``: ``[N, len(COLOUR_FIELDS)]`` (numpy or
    a CPU tensor) → jittered views in [0, 1]."""
    p = np.asarray(p, dtype=np.float64)
    for step in range(4):
        x = _jitter_step(x, p, np.rint(p[:, 4 + step]).astype(int))
    x = _subset(x, p[:, 8] > 0, lambda v, i: _stain(v, p[i]))
    x = _subset(x, p[:, 15] > 0, lambda v, _idx: _gray(v).expand(-1, 3, -1, -1).contiguous())
    x = _subset(x, p[:, 16] > 0, lambda v, i: _blur(v, p[i, 16]))
    x = _subset(x, p[:, 17] > 0, lambda v, _idx: torch.where(v >= 0.5, 1.0 - v, v))
    return x.clamp_(0.0, 1.0)


def _aa_weights(start: torch.Tensor, length: torch.Tensor, out: int, size: int) -> torch.Tensor:
    """``[N, out, size]``: torch's antialiased bilinear resize (align_corners False; PIL's triangle filter,
    widened by the downscale) of the spans ``[start, start + length)`` (``[N]``) of an axis of ``size``."""
    scale = (length.double() / out)[:, None]  # [N, 1]
    support, invscale = torch.clamp(scale, min=1.0), 1.0 / torch.clamp(scale, min=1.0)
    centre = scale * (torch.arange(out, dtype=torch.float64, device=start.device) + 0.5)  # [N, out]
    lo = torch.clamp((centre - support + 0.5).long(), min=0)  # C's truncation toward 0, as torch's kernel
    hi = torch.minimum((centre + support + 0.5).long(), length[:, None])
    j = torch.arange(size, device=start.device)[None, None] - start[:, None, None]  # [N, 1, size], crop coords
    w = torch.clamp(1.0 - ((j - centre[..., None] + 0.5) * invscale[..., None]).abs(), min=0.0)
    w = w * ((j >= lo[..., None]) & (j < hi[..., None]))
    return w / w.sum(-1, keepdim=True)


def resize_batched(tiles: torch.Tensor, geometries: list[CropGeometry], per_tile: int) -> torch.Tensor:
    """The crops of :meth:`CropGeometry.apply_to_image` for views in crop-major order (view ``k·T + t`` of
    tile ``t``), as two batched matmuls instead of a dozen kernels per view (a GPU batch has hundreds of
    views): each view is ``L·X·Rᵀ`` with L, R the resize weights over rows and columns; a flip reverses
    one, quarter turns swap and reverse them (``rot90(O) = flip_rows(Oᵀ)``, ``Oᵀ = R·Xᵀ·Lᵀ``); rounded to
    uint8 values as the CPU path is. ``tiles``: ``[T, 3, H, W]`` uint8 → ``[T·per_tile, 3, S, S]`` float."""
    n_tiles, _, hgt, wid = tiles.shape
    size = geometries[0].size
    g = torch.tensor(
        [[v.left, v.top, v.width, v.height, v.hflip, v.vflip, v.quarter_turns % 4] for v in geometries],
        dtype=torch.long,
    ).to(tiles.device)
    rows = _aa_weights(g[:, 1], g[:, 3], size, hgt)
    cols = _aa_weights(g[:, 0], g[:, 2], size, wid)
    rows = torch.where(g[:, 5, None, None].bool(), rows.flip(1), rows)
    cols = torch.where(g[:, 4, None, None].bool(), cols.flip(1), cols)
    turns = g[:, 6, None, None]
    # after k turns, O = rows'·X·cols'ᵀ for even k, (rows'·X·cols'ᵀ)ᵀ for odd k, with rows' = rows reversed
    # for k ∈ {2, 3} and cols' = cols reversed for k ∈ {1, 2} (one turn: (rows, cols) → (cols reversed, rows))
    left = torch.where(turns >= 2, rows.flip(1), rows).float()
    right = torch.where((turns == 1) | (turns == 2), cols.flip(1), cols).float()

    def per_tile_first(w):  # [per_tile·T, ...] → [T, per_tile, ...]
        return w.view(per_tile, n_tiles, *w.shape[1:]).transpose(0, 1)

    y = torch.einsum("tksh,tchw->tkcsw", per_tile_first(left), tiles.float())
    out = y @ per_tile_first(right).transpose(-1, -2)[:, :, None]  # [T, per_tile, 3, S, S]
    odd = per_tile_first(turns % 2 == 1)[..., None]
    out = torch.where(odd, out.transpose(-1, -2), out)
    return out.transpose(0, 1).reshape(per_tile * n_tiles, 3, size, size).round_().clamp_(0.0, 255.0)


def render(
    tiles: list[torch.Tensor],
    tile_of_view: list[int],
    geometries: list[CropGeometry],
    params: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """Views of one size: ``tiles`` are ``[3, H, W]`` uint8 (any device), view ``n`` is cut from
    ``tiles[tile_of_view[n]]`` by ``geometries[n]`` and coloured by ``params[n]``; → ``[N, 3, S, S]``
    float, normalised by ``mean``/``std`` (``[3]``). On a GPU, a batch of equal tiles with the same
    number of views each, in crop-major order, is resized in one go (:func:`resize_batched`)."""
    n_tiles, n = len(tiles), len(tile_of_view)
    if (
        tiles[0].device.type != "cpu"
        and n % n_tiles == 0
        and len({t.shape for t in tiles}) == 1
        and list(tile_of_view) == [t for _ in range(n // n_tiles) for t in range(n_tiles)]
    ):
        crops = resize_batched(torch.stack(tiles), geometries, n // n_tiles)
    else:
        crops = torch.stack([g.apply_to_image(tiles[t]) for t, g in zip(tile_of_view, geometries, strict=True)]).float()
    x = colour(crops.div_(255.0), params)
    mean, std = mean.to(x.device).view(1, 3, 1, 1), std.to(x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def render_views(views: list[View], tiles: list[torch.Tensor], mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Images of views of one size, whose ``source`` is one of ``tiles`` (``[3, H, W]`` uint8; a view
    without a source is cut from ``tiles[0]``): on a GPU ``[N, 3, S, S]`` float32, normalised; on a CPU
    ``[N, 3, S, S]`` uint8 (memory format channels_last), the coloured views rounded to 0–255, for
    :func:`normalise` on the trainer's device.

    On a CPU, one view at a time (:func:`colour_hwc`), which keeps each pass over the pixels in cache.
    Handing over bytes rather than floats is the fast loaders' design (timm's prefetcher, FFCV, DALI):
    a quarter of the shared memory to fill and of the host-to-device copy, and the normalisation is
    free on a GPU. The rounding moves a pixel by at most 0.5/255, once: DINOv2's reference pipeline
    rounds to bytes after every colour op (PIL images).
    """
    if not views:
        return torch.zeros(0, 3, 0, 0)
    where = {id(s): i for i, s in enumerate(tiles)}
    tile_of_view = [where[id(v.source)] if v.source is not None else 0 for v in views]
    geometries = [v.geometry for v in views]
    if tiles[0].device.type != "cpu":
        params = torch.from_numpy(np.stack([v.colour for v in views]))
        return render(tiles, tile_of_view, geometries, params, mean, std)
    size = views[0].size
    out = torch.empty(len(views), size, size, 3, dtype=torch.uint8)  # channels last: each view written once
    if torch.utils.data.get_worker_info() is not None:  # in a loader worker: made in shared memory, as
        # torch's default_collate does, so the hand-over to the trainer does not copy it again
        out = out.new(out._typed_storage()._new_shared(out.numel(), device=out.device)).resize_(out.shape)
        cv2.setNumThreads(1)  # one worker, one core: OpenCV's own pool would contend with the other workers
    pixels = out.numpy()
    hwc = [tile.permute(1, 2, 0).numpy() for tile in tiles]  # the decoder's own [H, W, 3] arrays
    work, spare = np.empty((size, size, 3), np.float32), np.empty((size, size, 3), np.float32)
    for n, (t, g) in enumerate(zip(tile_of_view, geometries, strict=True)):
        crop = g.apply_to_hwc(hwc[t])  # [S, S, 3] uint8
        x = colour_hwc(np.divide(crop, np.float32(255.0), out=work), views[n].colour, spare)
        # |255·x| rounded and saturated to 0–255: x leaves [0, 1] by float rounding only, so the |·| changes nothing
        cv2.convertScaleAbs(x, dst=pixels[n], alpha=255.0)
    return out.permute(0, 3, 1, 2)  # [N, 3, S, S], memory format channels_last


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 views (:func:`render_views` on a CPU), on any device → float32 ``(x / 255 − mean) / std``
    (``mean``, ``std``: ``[3]`` on the same device), the memory format kept; float views pass through.
    On a CPU, channels last, through a 256-entry table per channel (cv2.LUT, computed in float64): torch's
    elementwise kernels, broadcasting over an inner dimension of 3, are several times slower."""
    if images.dtype != torch.uint8:
        return images
    if images.device.type == "cpu" and images.is_contiguous(memory_format=torch.channels_last):
        levels = torch.arange(256, dtype=torch.float64)[:, None] / 255.0
        table = ((levels - mean.double()) / std.double()).float().numpy()[None]  # [1, 256, 3]
        hwc = images.permute(0, 2, 3, 1).numpy()  # [N, S, S, 3], the views' own memory
        out = torch.empty(hwc.shape, dtype=torch.float32)
        for view, dst in zip(hwc, out.numpy(), strict=True):
            cv2.LUT(view, table, dst=dst)
        return out.permute(0, 3, 1, 2)
    scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
    return torch.addcmul((-mean / std).view(1, 3, 1, 1), images.float(), scale)


@dataclass
class PendingViews:
    """A batch's views whose pixels are still to be made, for decoding on the GPU: the batch's tiles (JPEG
    bytes; uint8 ``[3, H, W]`` pixels for a tile of another format) and, per view in the batch's order
    (crop-major), its tile, geometry and colour parameters. Small: it crosses the worker → trainer queue."""

    tiles: list
    global_tile: list[int]
    global_geometry: list[CropGeometry]
    global_colour: torch.Tensor  # [2B, len(COLOUR_FIELDS)]
    local_tile: list[int]
    local_geometry: list[CropGeometry]
    local_colour: torch.Tensor
    local_size: int

    @classmethod
    def pack(cls, global_views: list[View], local_views: list[View], local_size: int) -> "PendingViews":
        where: dict[int, int] = {}
        tiles = []
        for v in global_views + local_views:
            if id(v.source) not in where:
                where[id(v.source)] = len(tiles)
                tiles.append(v.source)

        def colour(views):
            return torch.from_numpy(np.stack([v.colour for v in views])) if views else torch.zeros(0, len(IDENTITY))

        return cls(
            tiles,
            [where[id(v.source)] for v in global_views],
            [v.geometry for v in global_views],
            colour(global_views),
            [where[id(v.source)] for v in local_views],
            [v.geometry for v in local_views],
            colour(local_views),
            local_size,
        )

    def render(
        self, tiles: list[torch.Tensor], mean: torch.Tensor, std: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(global images, local images) from ``tiles``, the decoded :attr:`tiles` (``[3, H, W]`` uint8)."""
        images = render(tiles, self.global_tile, self.global_geometry, self.global_colour, mean, std)
        if self.local_tile:
            return images, render(tiles, self.local_tile, self.local_geometry, self.local_colour, mean, std)
        return images, torch.zeros(0, 3, self.local_size, self.local_size, device=images.device)


# -- the CPU worker's kernels: one view, channels last, OpenCV ------------------------------------------

_EYE_MAP = np.eye(3, 4)  # 3×4 colour maps for cv2.transform: identity,
_GRAY_MAP = np.concatenate([np.tile(np.array(_GRAY), (3, 1)), np.zeros((3, 1))], axis=1)  # every channel the luma,
_OFFSET_MAP = np.concatenate([np.zeros((3, 3)), np.ones((3, 1))], axis=1)  # a constant


def _scalar(c: float) -> tuple[float, ...]:
    """``c`` as OpenCV's per-channel scalar (a bare number would reach the first channel only)."""
    return (c, c, c, c)


def _clip(x: np.ndarray, low: bool = True) -> np.ndarray:
    """Clamped to [0, 1] in place (OpenCV's thresholds); ``low=False`` where nothing can be negative."""
    cv2.threshold(x, 1.0, 1.0, cv2.THRESH_TRUNC, dst=x)
    return cv2.threshold(x, 0.0, 0.0, cv2.THRESH_TOZERO, dst=x)[1] if low else x


def _map(x: np.ndarray, m: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The 3×4 colour map ``m`` (``m[:, :3] @ rgb + m[:, 3]``) per pixel into ``out`` (cv2.transform: one
    pass, the map in float64; in place it copies its input first, twice the time)."""
    return cv2.transform(x, m, dst=out)


def colour_hwc(x: np.ndarray, p: np.ndarray, spare: np.ndarray | None = None) -> np.ndarray:
    """:func:`colour` for one view on a CPU: ``x`` ``[H, W, 3]`` float32 in [0, 1], ``p`` a row of
    :data:`COLOUR_FIELDS` → the jittered view in [0, 1], up to float rounding (a blur's taps sum to
    1 ± 1 ulp, an HSV round trip's saturation can reach 1 + 1 ulp). An op whose parameter is its identity
    is skipped, as there; a clamp is skipped where the op cannot leave [0, 1]: a brightness, contrast or
    saturation factor below 1 (they mix values in [0, 1]), a hue rotation (HSV → RGB gives values in
    [0, V]). The ops write into ``x`` or ``spare`` (an array like ``x``, made if not given) and the result
    is one of the two: reusing two buffers for all views matters, as on a virtual machine the first touch
    of fresh memory can cost more than the op itself. The parameters are read as Python floats: numpy's
    per-call overhead on one-element arrays is a visible share of a 96 px view."""
    spare = np.empty_like(x) if spare is None else spare
    q = p.tolist()
    if q[0] != 1 or q[1] != 1 or q[2] != 1 or q[3] != 0:
        x, spare = _jitter_hwc(x, q, spare)
    if q[8] > 0:  # stain jitter, as _stain: exp(log x @ H·diag(α)·R − β·R), positive
        hed_from_rgb, rgb_from_hed = _HED
        m = np.empty((3, 4))
        m[:, :3], m[:, 3] = (rgb_from_hed.T * p[9:12]) @ hed_from_rgb.T, -(p[12:15] @ rgb_from_hed)
        cv2.log(cv2.max(x, _scalar(1e-6), dst=x), dst=x)
        x, spare = _map(x, m, spare), x
        x = _clip(cv2.exp(x, dst=x), low=False)
    if q[15] > 0:  # luma weights sum to 0.9999: stays in [0, 1]
        x, spare = _map(x, _GRAY_MAP, spare), x
    if q[16] > 0:  # torchvision's kernel (2·⌈3σ⌉ + 1 taps) and "reflect" padding (OpenCV's REFLECT_101)
        x, spare = cv2.sepFilter2D(x, -1, *(_gauss_taps(q[16]),) * 2, dst=spare, borderType=cv2.BORDER_REFLECT_101), x
    if q[17] > 0:  # x < 0.5 stays, x ≥ 0.5 becomes 1 − x: 0.5 − |x − 0.5| (a masked numpy op is 20× slower)
        x = cv2.subtract(_scalar(0.5), cv2.absdiff(x, _scalar(0.5), dst=x), dst=x)
    return x


def _jitter_hwc(x: np.ndarray, q: list[float], spare: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The four colour-jitter ops of :func:`colour_hwc` in the drawn order; (result, the other buffer)."""
    for op in (round(code) for code in q[4:8]):
        factor = q[op]
        if op == HUE:
            if factor != 0:  # OpenCV's float HSV has hue in degrees and wraps values ≥ 360 (not < 0)
                cv2.cvtColor(x, cv2.COLOR_RGB2HSV, dst=x)
                cv2.add(x, (360.0 * (factor % 1.0), 0.0, 0.0, 0.0), dst=x)
                x = cv2.cvtColor(x, cv2.COLOR_HSV2RGB, dst=x)
        elif factor == 1:
            continue
        elif op == BRIGHTNESS:
            x = np.multiply(x, np.float32(factor), out=x)  # (cv2.multiply by a scalar: 7× slower)
            x = _clip(x, low=False) if factor > 1 else x
        elif op == CONTRAST:
            r, g, b, _ = cv2.mean(x)
            offset = (1 - factor) * (r * _GRAY[0] + g * _GRAY[1] + b * _GRAY[2])  # towards the mean gray
            x, spare = _map(x, _EYE_MAP * factor + _OFFSET_MAP * offset, spare), x
            x = _clip(x) if factor > 1 else x
        else:  # saturation: towards each pixel's gray
            x, spare = _map(x, _EYE_MAP * factor + _GRAY_MAP * (1 - factor), spare), x
            x = _clip(x) if factor > 1 else x
    return x, spare


def _gauss_taps(sigma: float) -> np.ndarray:
    """torchvision's gaussian_blur kernel: 2·⌈3σ⌉ + 1 taps, normalised."""
    r = math.ceil(3 * sigma)
    taps = np.exp(np.arange(-r, r + 1, dtype=np.float64) ** 2 * (-0.5 / sigma**2))
    return taps / taps.sum()
