"""Whole-slide image files as scanners and pipelines write them, via tifffile.

Three layouts the sharding stage must read: a generic pyramidal TIFF (levels in SubIFDs or as
successive reduced pages; µm/px in XResolution/YResolution with ResolutionUnit CENTIMETER), an OME-TIFF
(PhysicalSizeX/Y; pyramid in SubIFDs) and an Aperio-like SVS (µm/px only in the ImageDescription's
``MPP = ``; baseline, thumbnail, reduced levels, label, macro). All JPEG-compressed in 256 px tiles.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

TILE = (256, 256)
JPEG_QUALITY = 90
LAYOUTS = ("tiff_subifds", "tiff_pages", "ome", "svs")


def pyramid(level0: np.ndarray, n_levels: int, factor: int = 2) -> list[np.ndarray]:
    """Level 0 and its box-filtered reductions, each ``factor`` times smaller than the previous."""
    levels = [level0]
    for _ in range(n_levels - 1):
        levels.append(np.asarray(Image.fromarray(levels[-1]).reduce(factor)))
    return levels


def _jpeg(**extra) -> dict:
    return dict(photometric="rgb", compression="jpeg", compressionargs={"level": JPEG_QUALITY}, **extra)


def _resolution(mpp: float) -> dict:
    """TIFF resolution tags: pixels per centimetre."""
    return dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")


def write_slide(path: Path, level0: np.ndarray, mpp: float, layout: str, n_levels: int = 3, seed: int = 0) -> None:
    """Write ``level0`` (H, W, 3 uint8) at ``mpp`` µm/px as a pyramidal slide in one of LAYOUTS."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown slide layout {layout!r}; expected one of {LAYOUTS}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "svs":
        _write_svs(path, level0, mpp, n_levels)
        return
    levels = pyramid(level0, n_levels)
    scale = [level0.shape[1] / lv.shape[1] for lv in levels]
    with tifffile.TiffWriter(path, bigtiff=level0.nbytes > 2**31) as tw:
        if layout == "ome":
            # A seeded UUID keeps the file byte-identical for a given seed.
            meta = {
                "axes": "YXS",
                "PhysicalSizeX": mpp,
                "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": mpp,
                "PhysicalSizeYUnit": "µm",
                "UUID": f"urn:uuid:{uuid.UUID(int=int(np.random.default_rng(seed).integers(0, 2**63)) << 64)}",
            }
            tw.write(levels[0], tile=TILE, subifds=n_levels - 1, metadata=meta, **_resolution(mpp), **_jpeg())
        else:
            subifds = n_levels - 1 if layout == "tiff_subifds" else None
            tw.write(
                levels[0],
                tile=TILE,
                subifds=subifds,
                metadata=None,
                software="histotx.synth",
                **_resolution(mpp),
                **_jpeg(),
            )
        for lv, s in zip(levels[1:], scale[1:], strict=True):
            tw.write(lv, tile=TILE, subfiletype=1, metadata=None, **_resolution(mpp * s), **_jpeg())


def _write_svs(path: Path, level0: np.ndarray, mpp: float, n_levels: int) -> None:
    """Aperio layout: baseline, thumbnail, reduced levels (4× steps), label, macro; MPP in the description."""
    h, w = level0.shape[:2]
    levels = pyramid(level0, n_levels, factor=4)
    head = "Aperio Image Library v12.0.15 \n"
    tail = f"|AppMag = {20 if mpp > 0.35 else 40}|MPP = {mpp:.4f}|ScanScope ID = SYNTH|Filename = synthetic"
    thumb = np.asarray(Image.fromarray(level0).reduce(max(1, int(np.ceil(max(h, w) / 768)))))
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            levels[0],
            tile=TILE,
            metadata=None,
            description=f"{head}{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q={JPEG_QUALITY}{tail}",
            **_jpeg(),
        )
        tw.write(thumb, metadata=None, description=f"{head}{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]} - ", **_jpeg())
        for lv in levels[1:]:
            size = f"{w}x{h} [0,0 {w}x{h}] (256x256) -> {lv.shape[1]}x{lv.shape[0]} JPEG/RGB Q={JPEG_QUALITY}"
            tw.write(lv, tile=TILE, metadata=None, description=f"{head}{size}", **_jpeg())
        label = np.full((300, 300, 3), 255, np.uint8)
        label[40:260:20, 40:260] = 0  # a barcode-like pattern
        tw.write(
            label,
            subfiletype=1,
            metadata=None,
            description=f"{head}label 300x300",
            photometric="rgb",
            compression="lzw",
        )
        macro = np.asarray(Image.fromarray(level0).resize((800, max(1, int(800 * h / w)))))
        tw.write(
            macro, subfiletype=9, metadata=None, description=f"{head}macro {macro.shape[1]}x{macro.shape[0]}", **_jpeg()
        )
