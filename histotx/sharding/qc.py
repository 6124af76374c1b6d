"""Quality-control pictures, to judge a shard set by eye.

- ``{sample}.png``: a contact sheet of tiles with their sites drawn on (co-registration up close);
- ``{sample}_overview.png``: the whole slide with every kept tile outlined (green), the sites the shards hold
  (cyan) and the sites of the input that no kept tile holds (red) — spots and bins as their true size,
  molecules (or sites smaller than 2 overview px) as density. A half-missing slide, a tissue mask that cut
  away tissue, or a shifted alignment shows at a glance.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw

from histotx.format import (
    FormatError,
    TranscriptGrid,
    decode_grid,
    decode_image_rgb,
    decode_sample,
    output_path,
    read_manifest,
)
from histotx.shard_reader import shard_path
from histotx.sharding.technologies import IMAGE_ONLY
from histotx.sharding.verify import iter_shard

log = logging.getLogger(__name__)

MIN_QC_PX = 192
OVERVIEW_PX = 1600  # longest side of an overview
TILE_RGB, KEPT_RGB, DROPPED_RGB = (0, 200, 0), (0, 230, 255), (255, 30, 30)


def _square(x: float, y: float, r: float, angle_deg: float) -> list[tuple[float, float]]:
    """Corners of a square of half-side r centred on (x, y), turned by angle_deg (x towards y)."""
    c, s = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
    return [(x + c * u - s * v, y + s * u + c * v) for u, v in ((-r, -r), (r, -r), (r, r), (-r, r))]


def draw_sites(rgb: np.ndarray, xy: np.ndarray, footprint_px: float, shape: str, angle_deg: float = 0.0) -> Image.Image:
    """Overlay sites: circles of the spot footprint, squares of the bin size (turned by ``angle_deg``), or dots
    for molecules."""
    zoom = max(1, -(-MIN_QC_PX // rgb.shape[1]))  # small tiles are enlarged so the marks stay visible
    img = Image.fromarray(rgb).convert("RGB").resize((rgb.shape[1] * zoom, rgb.shape[0] * zoom), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    r = max(footprint_px * zoom / 2, 1.5)
    for x, y in np.asarray(xy) * zoom:
        box = (x - r, y - r, x + r, y + r)
        if shape == "disk":
            draw.ellipse(box, outline=(0, 255, 255), width=2)
        elif shape == "square":
            draw.polygon(_square(x, y, r, angle_deg), outline=(0, 255, 255))
        else:
            draw.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=(0, 255, 255))
    return img


def write_qc(shard_dir: Path, out_dir: Path, per_sample: int = 8, columns: int = 4) -> list[Path]:
    """One PNG contact sheet per sample (the first ``per_sample`` tiles with sites); returns the files."""
    shard_dir, out_dir = Path(shard_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(shard_dir)
    picked: dict[str, list[Image.Image]] = {}
    for entry in manifest["shards"]:
        sid = entry["sample_id"]
        if len(picked.get(sid, [])) >= per_sample:
            continue
        for members in iter_shard(shard_path(shard_dir, entry["name"])):
            tile = decode_sample(members)
            tiles = picked.setdefault(sid, [])
            if len(tiles) >= per_sample:
                break
            if tile.grid.n_sites == 0 and manifest["samples"][sid].get("technology") != IMAGE_ONLY:
                continue
            footprint_px = tile.grid.footprint_um / tile.meta["mpp"]
            tiles.append(
                draw_sites(
                    decode_image_rgb(tile.image),
                    tile.grid.xy,
                    footprint_px,
                    tile.grid.footprint_shape,
                    tile.grid.footprint_angle_deg,
                )
            )
    written = []
    for sid, tiles in sorted(picked.items()):
        if not tiles:
            continue
        w, h = tiles[0].size
        rows = (len(tiles) + columns - 1) // columns
        sheet = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
        for i, t in enumerate(tiles):
            sheet.paste(t, ((i % columns) * w, (i // columns) * h))
        path = output_path(out_dir, sid, ".png")
        sheet.save(path)
        written.append(path)
    return written


def _tile_boxes(shard_dir: Path, manifest: dict, sid: str) -> Iterator[tuple[tuple[float, ...], dict]]:
    """(tile box in level-0 px, its shard members) of every tile of the sample, read shard by shard."""
    for entry in manifest["shards"]:
        if entry.get("sample_id") != sid:
            continue
        for members in iter_shard(shard_path(shard_dir, entry["name"])):
            meta = json.loads(members["json"])
            scale0 = meta["mpp"] / meta["source_mpp"]  # level-0 px per tile px
            ox, oy = meta["origin_level0_px"]
            yield (ox, oy, ox + meta["tile_px"] * scale0, oy + meta["tile_px"] * scale0), members


def _kept_sites(members: dict, box: tuple[float, ...]) -> tuple[np.ndarray, TranscriptGrid]:
    """A tile's sites in level-0 px (images are not decoded) and its grid."""
    meta = json.loads(members["json"])
    grid = decode_grid(members["tx"])
    scale0 = meta["mpp"] / meta["source_mpp"]
    return grid.xy.astype(np.float64) * scale0 + (box[0], box[1]), grid


class _Boxes:
    """Which points lie in a kept tile ([x0, x1) × [y0, y1) of any box): boxes grouped by their rows, so a chunk
    of points is tested against the rows it meets, not against every tile."""

    def __init__(self, boxes: list[tuple[float, ...]]) -> None:
        rows: dict[tuple[float, float], list[tuple[float, float]]] = {}
        for x0, y0, x1, y1 in boxes:
            rows.setdefault((y0, y1), []).append((x0, x1))
        self.rows = []
        for (y0, y1), spans in sorted(rows.items()):
            spans.sort()
            x0s = np.array([a for a, _ in spans])
            reach = np.maximum.accumulate(np.array([b for _, b in spans]))  # overlapping spot tiles: union so far
            self.rows.append((y0, y1, x0s, reach))

    def cover(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        covered = np.zeros(len(x), dtype=bool)
        if not len(x):
            return covered
        finite = y[np.isfinite(y)]
        lo, hi = (finite.min(), finite.max()) if len(finite) else (0.0, -1.0)
        for y0, y1, x0s, reach in self.rows:
            if y1 <= lo or y0 > hi:
                continue
            row = np.flatnonzero((y >= y0) & (y < y1) & ~covered)
            at = np.searchsorted(x0s, x[row], side="right") - 1  # the last box starting at or left of x
            ok = at >= 0
            covered[row[ok]] = x[row[ok]] < reach[at[ok]]
        return covered


class _Overlay:
    """Sites at overview scale, added chunk by chunk: outlines of their true size (spots, bins of 2 px or more:
    few, kept as points), or a density image (molecules, fine bins: counts only, however many)."""

    def __init__(self, size: tuple[int, int], per_px: float, footprint_px: float, shape: str, angle_deg: float):
        self.size, self.per_px, self.footprint_px, self.shape, self.angle = size, per_px, footprint_px, shape, angle_deg
        self.outlines = footprint_px >= 2 and shape in ("disk", "square")
        self.points: list[np.ndarray] = []
        self.density = np.zeros(size[0] * size[1], dtype=np.int64)
        self.n = 0

    def add(self, xy: np.ndarray) -> None:
        self.n += len(xy)
        if self.outlines:
            self.points.append(xy)
            return
        pts = xy / self.per_px
        w, h = self.size
        inside = (pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)
        ix, iy = pts[inside].astype(np.int64).T
        self.density += np.bincount(iy * w + ix, minlength=w * h)

    def draw(self, img: Image.Image, rgb: tuple[int, int, int]) -> None:
        if self.outlines:
            xy = np.concatenate(self.points) if self.points else np.zeros((0, 2))
            _draw_sites(img, xy, self.per_px, self.footprint_px, self.shape, rgb, self.angle)
            return
        w, h = self.size
        _paint_density(img, self.density.reshape(h, w).astype(np.float64), rgb)


def _input_sites(manifest: dict, sid: str):
    """The sample's sites as read from its input (for the dropped ones), or None when it cannot be read."""
    from histotx.sharding.cohort import load_cohort
    from histotx.sharding.readers import ReaderOptions, read_sites

    cfg = manifest["config"]
    try:
        cohort = load_cohort(cfg["cohort"])
        sample = next(s for s in cohort.samples if s.id == sid)
        return read_sites(
            sample,
            cohort,
            ReaderOptions(qv_min=cfg.get("qv_min", 20.0), in_tissue_only=cfg.get("in_tissue_only", True)),
        )
    except Exception as exc:  # noqa: BLE001 — the overview still shows what the shards hold
        log.warning("qc overview of %s: input sites not readable, dropped sites not drawn (%s)", sid, exc)
        return None


def _draw_sites(
    img: Image.Image,
    xy: np.ndarray,
    per_px: float,
    footprint_px: float,
    shape: str,
    rgb: tuple[int, int, int],
    angle_deg: float = 0.0,
) -> None:
    """Sites at overview scale: outlines of their true size, or a density overlay when smaller than 2 px."""
    pts = xy / per_px
    if footprint_px >= 2 and shape in ("disk", "square"):
        draw, r = ImageDraw.Draw(img), footprint_px / 2
        for x, y in pts:
            if shape == "disk":
                draw.ellipse((x - r, y - r, x + r, y + r), outline=rgb)
            else:
                draw.polygon(_square(x, y, r, angle_deg), outline=rgb)
        return
    w, h = img.size
    inside = (pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)
    ix, iy = pts[inside].astype(np.int64).T
    _paint_density(img, np.bincount(iy * w + ix, minlength=w * h).reshape(h, w).astype(np.float64), rgb)


def _paint_density(img: Image.Image, density: np.ndarray, rgb: tuple[int, int, int]) -> None:
    """Blend ``rgb`` over the image where sites are, stronger where they are dense."""
    if not density.any():
        return
    alpha = np.clip(density / max(np.percentile(density[density > 0], 95), 1.0), 0, 1) * 0.85
    base = np.asarray(img, dtype=np.float64)
    out = base * (1 - alpha[..., None]) + np.asarray(rgb, np.float64) * alpha[..., None]
    img.paste(Image.fromarray(out.round().astype(np.uint8)))


def _check_slide_path(shard_dir: Path, sid: str, slide: Any) -> None:
    """The manifest names the sample's slide: a file or folder, never a pipe, device or socket (opening one
    could block), checked with ``stat`` before anything opens it."""
    where = f"{Path(shard_dir) / 'manifest.json'}: samples.{sid}.slide"
    if not isinstance(slide, str) or not slide:
        raise FormatError(f"{where} is {slide!r}, not a path")
    try:
        mode = os.stat(slide).st_mode
    except OSError as exc:
        raise FormatError(f"{where} {slide}: {exc.strerror}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise FormatError(f"{where} {slide} is not a file or folder (a pipe, device or socket); refused")


def write_overview(shard_dir: Path, manifest: dict, sid: str, out_dir: Path, max_px: int = OVERVIEW_PX) -> Path:
    """The whole-slide overview of one sample (see the module docstring)."""
    from histotx.sharding.slides import Slide

    rec = manifest["samples"][sid]
    _check_slide_path(shard_dir, sid, rec.get("slide"))
    with Slide(rec["slide"], mpp=rec["slide_mpp"]) as slide:
        target = max(slide.mpp * max(slide.width, slide.height) / max_px, slide.mpp)
        thumb, per_px = slide.thumbnail(target)  # per_px: level-0 px per overview px
        width, height, slide_mpp = slide.width, slide.height, slide.mpp
    img = Image.fromarray(thumb).convert("RGB")
    # Shards and input are read tile by tile and band by band (a 500 M-molecule section never whole in memory).
    sites = _input_sites(manifest, sid) if rec.get("technology") != IMAGE_ONLY else None
    footprint = (sites.footprint_um, sites.footprint_shape, sites.footprint_angle_deg) if sites is not None else None
    boxes: list[tuple[float, ...]] = []
    kept = None
    for box, members in _tile_boxes(shard_dir, manifest, sid):
        boxes.append(box)
        xy, grid = _kept_sites(members, box)
        if not grid.n_sites:
            continue
        if footprint is None:  # input not readable: the shards say what the sites are
            footprint = (grid.footprint_um, grid.footprint_shape, grid.footprint_angle_deg)
        if kept is None:
            fp_um, shape, angle = footprint
            kept = _Overlay(img.size, per_px, fp_um / (slide_mpp * per_px), shape, angle)
        kept.add(xy)
    fp_um, shape, angle = footprint or (0.0, "point", 0.0)
    kept = kept or _Overlay(img.size, per_px, fp_um / (slide_mpp * per_px), shape, angle)
    dropped = _Overlay(img.size, per_px, fp_um / (slide_mpp * per_px), shape, angle)
    if sites is not None:
        in_tiles = _Boxes(boxes)
        for x, y in sites.positions():
            on = (x >= 0) & (x < width) & (y >= 0) & (y < height)
            out = on & ~in_tiles.cover(x, y)
            dropped.add(np.stack([x[out], y[out]], axis=1).astype(np.float64))
    draw = ImageDraw.Draw(img)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle((x0 / per_px, y0 / per_px, x1 / per_px - 1, y1 / per_px - 1), outline=TILE_RGB)
    kept.draw(img, KEPT_RGB)
    dropped.draw(img, DROPPED_RGB)
    legend = (
        f"{sid}: {len(boxes)} tiles (green), {kept.n} sites in shards (cyan), {dropped.n} sites "
        f"under no tile (red)"
        + (
            ""
            if rec.get("technology") == IMAGE_ONLY or sites is not None
            else "; input not readable, dropped sites not drawn"
        )
    )
    canvas = Image.new("RGB", (img.width, img.height + 16), (255, 255, 255))
    canvas.paste(img, (0, 16))
    ImageDraw.Draw(canvas).text((2, 2), legend, fill=(0, 0, 0))
    path = output_path(out_dir, sid, "_overview.png")
    canvas.save(path)
    return path


def write_overviews(shard_dir: Path, out_dir: Path, max_px: int = OVERVIEW_PX) -> list[Path]:
    """One overview PNG per sample that was sharded."""
    shard_dir, out_dir = Path(shard_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(shard_dir)
    return [
        write_overview(shard_dir, manifest, sid, out_dir, max_px)
        for sid, rec in sorted(manifest["samples"].items())
        if rec.get("status") == "ok"
    ]
