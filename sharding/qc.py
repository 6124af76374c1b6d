"""Quality-control pictures: sample tiles with their sites drawn on, to see co-registration by eye."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from histotx.format import decode_image_rgb, decode_sample, read_manifest
from sharding.verify import iter_shard

MIN_QC_PX = 192


def draw_sites(rgb: np.ndarray, xy: np.ndarray, footprint_px: float, shape: str) -> Image.Image:
    """Overlay sites: circles of the spot footprint, squares of the bin size, or dots for molecules."""
    zoom = max(1, -(-MIN_QC_PX // rgb.shape[1]))  # small tiles are enlarged so the marks stay visible
    img = Image.fromarray(rgb).convert("RGB").resize((rgb.shape[1] * zoom, rgb.shape[0] * zoom), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    r = max(footprint_px * zoom / 2, 1.5)
    for x, y in np.asarray(xy) * zoom:
        box = (x - r, y - r, x + r, y + r)
        if shape == "disk":
            draw.ellipse(box, outline=(0, 255, 255), width=2)
        elif shape == "square":
            draw.rectangle(box, outline=(0, 255, 255))
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
        for members in iter_shard(shard_dir / entry["name"]):
            tile = decode_sample(members)
            tiles = picked.setdefault(sid, [])
            if len(tiles) >= per_sample:
                break
            if tile.grid.n_sites == 0 and manifest["samples"][sid].get("technology") != "image_only":
                continue
            footprint_px = tile.grid.footprint_um / tile.meta["mpp"]
            tiles.append(draw_sites(decode_image_rgb(tile.image), tile.grid.xy, footprint_px,
                                    tile.grid.footprint_shape))
    written = []
    for sid, tiles in sorted(picked.items()):
        if not tiles:
            continue
        w, h = tiles[0].size
        rows = (len(tiles) + columns - 1) // columns
        sheet = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
        for i, t in enumerate(tiles):
            sheet.paste(t, ((i % columns) * w, (i // columns) * h))
        path = out_dir / f"{sid}.png"
        sheet.save(path)
        written.append(path)
    return written
