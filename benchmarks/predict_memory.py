"""Peak RSS and time of `histotx predict`: the real slide in ../shared/data and a synthetic 100,000 × 100,000 px one.

    python benchmarks/predict_memory.py [--work out/predict_memory] [--side 100000] [--slide-dir /tmp]

Memory must follow the batch, not the slide. The synthetic slide is a real-size whole-slide image: an OME-TIFF
of ``--side``² px at 0.25 µm/px (25 mm square, a 40× scan), JPEG in 512 px tiles, a pyramid halving down to
< 2,000 px in SubIFDs, written tile by tile from a generator (never held whole). It is glass with a few
round tissue sections (``--tissue-mm``: their radii), so tiling finds a bounded number of tissue tiles while
any allocation the size of the slide or of a level (a mask or thumbnail at full resolution, a level read
whole) would show in the peak: level 0 is 28 GiB of RGB, level 3 still 440 MiB. A second copy has level 0
only (``-flat``, as some pipelines export a slide), so every overview must come from level 0 itself (before
thumbnails were read in bands, that read alone cost ~460 MiB here). Both are written once into ``--slide-dir``
(default the system's temporary folder; ~270 and ~200 MiB) and reused; ``--no-flat`` skips the second.

Both slides are predicted by the same command (a random-init tiny model and a head fitted on a synthetic
cohort, as ``benchmarks/predict_real_slide.py`` makes them; the mechanics, not biology), each in its own
process under a peak-RSS probe (``getrusage`` high-water mark at exit), h5ad + SpatialData + one PNG.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict_real_slide import REPO, SLIDE, prepare, run_predict  # noqa: E402

MPP = 0.25
TILE = 512
GLASS = (242, 240, 244)


def _sections(side: int, radii_mm: list[float]) -> list[tuple[float, float, float]]:
    """(x, y, r) in level-0 px of round tissue sections spread over the slide."""
    out = []
    for i, r_mm in enumerate(radii_mm):
        angle = 2 * math.pi * i / max(1, len(radii_mm))
        cx, cy = side * (0.5 + 0.28 * math.cos(angle)), side * (0.5 + 0.28 * math.sin(angle))
        out.append((cx, cy, r_mm * 1000 / MPP))
    return out


def _tile(x0: int, y0: int, down: int, sections, glass: np.ndarray) -> np.ndarray:
    """The 512² RGB tile at (x0, y0) of the level ``down``× smaller than level 0: glass, or H&E-like tissue
    (pink stroma, purple nuclei on a jittered 10 µm lattice, defined in level-0 px so every level agrees)."""
    size0 = TILE * down
    near = [
        (cx, cy, r) for cx, cy, r in sections
        if x0 * down - r < cx < x0 * down + size0 + r and y0 * down - r < cy < y0 * down + size0 + r
    ]  # fmt: skip
    if not near:
        return glass
    ys, xs = np.mgrid[0:TILE, 0:TILE].astype(np.float32)
    X, Y = (x0 + xs + 0.5) * down, (y0 + ys + 0.5) * down
    inside = np.zeros((TILE, TILE), bool)
    for cx, cy, r in near:
        inside |= (X - cx) ** 2 + (Y - cy) ** 2 < r * r
    if not inside.any():
        return glass
    cell = 40.0  # 10 µm at 0.25 µm/px
    i, j = np.floor(X / cell), np.floor(Y / cell)
    h = np.sin(i * 12.9898 + j * 78.233) * 43758.5453
    jx, jy = (h - np.floor(h)), (h * 7.13 - np.floor(h * 7.13))
    d2 = (X - (i + 0.2 + 0.6 * jx) * cell) ** 2 + (Y - (j + 0.2 + 0.6 * jy) * cell) ** 2
    nucleus = (d2 < 11.0**2) if down < 8 else np.zeros_like(inside)
    rgb = np.empty((TILE, TILE, 3), np.uint8)
    rgb[:] = glass[0, 0]
    stroma, purple = np.array([226, 150, 190], np.uint8), np.array([110, 60, 150], np.uint8)
    if down >= 8:  # nuclei smaller than a px: their colour averaged in
        stroma = (0.8 * stroma + 0.2 * purple).astype(np.uint8)
    rgb[inside] = stroma
    rgb[inside & nucleus] = purple
    return rgb


def write_big_slide(path: Path, side: int, radii_mm: list[float], pyramid: bool = True) -> Path:
    """The synthetic slide (module docstring), written tile by tile; returns ``path``. ``pyramid=False``: level 0
    alone (as some pipelines export a slide), so any overview must come from level 0 itself."""
    import tifffile

    sections = _sections(side, radii_mm)
    glass = np.empty((TILE, TILE, 3), np.uint8)
    glass[:] = GLASS
    downs = [1]
    while side // (downs[-1] * 2) >= 2000:
        downs.append(downs[-1] * 2)
    downs = downs if pyramid else [1]
    downs.append(downs[-1] * 2)
    downs = downs if pyramid else [1]

    def tiles(down: int):
        n = -(-side // down)
        for y0 in range(0, n, TILE):
            for x0 in range(0, n, TILE):
                yield _tile(x0, y0, down, sections, glass)

    jpeg = dict(photometric="rgb", compression="jpeg", compressionargs={"level": 90}, tile=(TILE, TILE))
    meta = {"axes": "YXS", "PhysicalSizeX": MPP, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": MPP,
            "PhysicalSizeYUnit": "µm"}  # fmt: skip
    tmp = path.with_name(f".{path.name}.tmp")
    t0 = time.perf_counter()
    with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:  # OME whatever the temporary name
        for k, down in enumerate(downs):
            n = -(-side // down)
            res = dict(resolution=(1e4 / (MPP * down), 1e4 / (MPP * down)), resolutionunit="CENTIMETER")
            if k == 0:
                tw.write(tiles(down), shape=(n, n, 3), dtype=np.uint8, subifds=len(downs) - 1, metadata=meta, **res,
                         **jpeg)  # fmt: skip
            else:
                tw.write(tiles(down), shape=(n, n, 3), dtype=np.uint8, subfiletype=1, metadata=None, **res, **jpeg)
            print(f"  level {k}: {n} px ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    tmp.replace(path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "out" / "predict_memory")
    ap.add_argument("--slide-dir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--side", type=int, default=100_000, help="the synthetic slide's side in px (default 100000)")
    ap.add_argument("--tissue-mm", default="1.2,0.8,0.6", help="radii of its tissue sections, mm (default 1.2,0.8,0.6)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--no-flat", action="store_true", help="skip the one-level (no pyramid) copy of the slide")
    args = ap.parse_args()
    radii = [float(r) for r in args.tissue_mm.split(",")]
    slides = [("real CMU-1 region (SVS)", SLIDE)]
    for pyramid in (True,) if args.no_flat else (True, False):
        name = f"histotx-synthetic-{args.side}px-{'_'.join(map(str, radii))}mm{'' if pyramid else '-flat'}.ome.tif"
        big = args.slide_dir / name
        if not big.is_file():
            print(f"writing {big} ...", file=sys.stderr)
            t0 = time.perf_counter()
            write_big_slide(big, args.side, radii, pyramid)
            mib = big.stat().st_size / 2**20
            print(f"wrote {big} ({mib:.0f} MiB) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        slides.append((f"synthetic OME-TIFF{'' if pyramid else ', flat'}", big))
    export, head, best = prepare(args.work)
    import anndata as ad

    rows = []
    for name, slide in slides:
        if not slide.is_file():
            print(f"{slide}: not here; skipped", file=sys.stderr)
            continue
        out = args.work / (
            "pred-" + ("real" if slide == SLIDE else "synthetic-flat" if "flat" in name else "synthetic")
        )
        cmd = ["predict", str(slide), "--model", str(export), "--head", str(head), "--out", str(out),
               "--format", "h5ad,spatialdata", "--png", best, "--batch-size", str(args.batch_size), "--overwrite",
               "--no-progress"]  # fmt: skip
        seconds, peak, _ = run_predict(cmd)
        a = ad.read_h5ad(next(out.glob("*.h5ad")), backed="r")
        from histotx.sharding.slides import Slide

        with Slide(slide) as s:
            dims = f"{s.width:,} × {s.height:,} px, {len(s.levels)} levels"
        rows.append((name, dims, slide.stat().st_size / 2**20, a.n_obs, seconds, peak))
        print(f"command: histotx {' '.join(cmd)}", flush=True)
    print(f"\n{'slide':<26} {'size':<36} {'file MiB':>9} {'tiles':>7} {'wall s':>7} {'peak RSS MiB':>13}")
    for name, dims, mib, n, seconds, peak in rows:
        print(f"{name:<26} {dims:<36} {mib:>9.0f} {n:>7} {seconds:>7.1f} {peak:>13.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
