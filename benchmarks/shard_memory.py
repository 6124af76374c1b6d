"""Peak memory and time of `histotx shard` on one worker against sample size: Xenium and Visium HD.

Writes inputs in the real formats, at a fixed density so that only the size changes:

- Xenium Prime 5K density: 4 M transcripts per mm² of tissue (5,001 genes + controls), ``transcripts.parquet``
  with 10x's columns and dtypes (transcript_id uint64, dictionary-encoded cell_id / feature_name / fov_name,
  overlaps_nucleus uint8, float32 µm x/y/z, qv, nucleus_distance, codeword_index int32) in 1 M-row row groups,
  zstd; ``experiment.xenium`` (pixel size 0.2125 µm), an H&E at 0.5 µm/px (pyramidal JPEG TIFF) and its
  ``he_imagealignment.csv``. A 300–500 M-transcript section is 75–125 mm². To keep a 500 M-row file within a
  shared disk, the columns no reader decodes are cheap to store: transcript_id delta-encoded, z_location and
  nucleus_distance on a 0.01 µm grid (dictionary pages); x, y and qv are full float32 (the file: about 20 B a
  row, 10 GB at 500 M).
- Visium HD 2 µm: ``binned_outputs/square_002um`` with ``tissue_positions.parquet`` listing every bin of a
  square capture area (3,350 × 3,350 bins = 11.2 M rows for the full 6.5 mm area), 60 % of them in tissue,
  10 non-zero genes per bin on average (18,085 genes), ``filtered_feature_bc_matrix.h5`` (10x CSC layout),
  scalefactors, and a full-resolution H&E at 0.5 µm/px.

Inputs are kept under ``--cache`` (default ``out/shard_memory``) and reused by later runs (``--drop-inputs``
removes each after it is measured). Each sample is sharded in a child process (256 px tiles at 0.5 µm/px,
``tiling=grid_sites`` by default: every tile holding a site, the path that once read every site at once) into a
temporary folder removed afterwards; printed: wall and CPU time, the child's peak RSS (``ru_maxrss`` from
``wait4``: the largest process of its tree, which is one process with one worker), throughput (transcripts or
bins per wall second), the most sites the banded reader held at once, the size of its scratch bands on disk
(in ``$TMPDIR``, removed when the sample is done) and of the shards written.

    python benchmarks/shard_memory.py --small                        # a quick check (under a minute)
    python benchmarks/shard_memory.py --xenium 4e6,16e6,64e6 --hd 0.25,0.5,1.0   # the slope
    python benchmarks/shard_memory.py --xenium 50e6,500e6 --hd 1.0                # full size (README, Memory)
    PYTHONPATH=/path/to/other/checkout python benchmarks/shard_memory.py ...     # the same inputs, other code

On the 2-core dev machine (shared, load 3–8), one worker, tiling=grid_sites, code at 98afd4b:

    input               size  peak RSS GB  shard s  CPU s  units/s    held at once  bands GB  shards GB
    xenium        50,000,000         0.54     47.6   40.2  1,049,708     2,621,349      1.17       0.33
    xenium       500,000,000         0.93    707.1  561.6    707,096     4,774,066     11.66       3.20
    visium_hd     11,222,500         1.01     39.1   36.8    287,180       524,288      0.73       0.27

The code before (PYTHONPATH at 480b8bf, same inputs): Xenium 50 M 5.16 GB (grid_sites loaded every band at
once), Visium HD 2.44 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tifffile
import yaml

XENIUM_PER_MM2 = 4e6
XENIUM_GENES = 5001
PIXEL_SIZE_UM = 0.2125
HE_MPP = 0.5
ROW_GROUP = 1 << 20
HD_FULL_SIDE = 3350  # 2 µm bins along each side of the 6.5 mm capture area
HD_GENES = 18085
HD_NNZ_PER_BIN = 10
HD_IN_TISSUE = 0.6
REPO = Path(__file__).resolve().parents[1]

SHARD = """
import json, sys
from pathlib import Path
import histotx.sharding.pipeline as pipeline
from histotx.sharding.config import ShardConfig
held = []
read_sites = pipeline.read_sites
def kept(*args, **kwargs):
    sites = read_sites(*args, **kwargs)
    folder = getattr(sites, "folder", None)  # banded sites: their scratch on disk, all written by now
    held.append((sites, sum(p.stat().st_size for p in folder.iterdir()) if folder else 0))
    return sites
pipeline.read_sites = kept
m = pipeline.run_cohort(Path(sys.argv[1]), Path(sys.argv[2]), ShardConfig(mpp=0.5, tile_px=256, tiling=sys.argv[3]))
r = next(iter(m["samples"].values()))
assert r["status"] == "ok", r
sites, scratch = held[0]
peaks = {k: getattr(sites, k, None) for k in ("peak_loaded", "peak_buffered")}
print(json.dumps({"tiles": r["tiles"], "sites_kept": r["sites_kept"], "scratch_bytes": scratch, **peaks}))
"""


def write_slide(path: Path, width: int, height: int, mpp: float, seed: int = 0) -> None:
    """Pink tissue over the whole area, JPEG tiles, levels down to ≤ 1024 px, written tile by tile."""
    rng = np.random.default_rng(seed)
    bank = [
        np.clip(np.array([205, 125, 175]) + rng.integers(-25, 26, (256, 256, 1)), 0, 255).astype(np.uint8)
        for _ in range(8)
    ]

    def tiles(w: int, h: int):
        for i in range(-(-h // 256) * -(-w // 256)):
            yield bank[i % len(bank)]

    levels = [(width, height)]
    while max(levels[-1]) > 1024:
        levels.append((levels[-1][0] // 2, levels[-1][1] // 2))
    kw = dict(
        tile=(256, 256),
        dtype=np.uint8,
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": 85},
        resolutionunit="CENTIMETER",
        metadata=None,
    )
    with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2**31) as tw:
        tw.write(
            tiles(width, height),
            shape=(height, width, 3),
            subifds=len(levels) - 1,
            resolution=(1e4 / mpp, 1e4 / mpp),
            **kw,
        )
        for k, (w, h) in enumerate(levels[1:], 1):
            tw.write(
                tiles(w, h), shape=(h, w, 3), subfiletype=1, resolution=(1e4 / (mpp * 2**k), 1e4 / (mpp * 2**k)), **kw
            )


def make_xenium(folder: Path, n: int, seed: int = 0) -> Path:
    """A Xenium bundle of n transcripts over a square of n / 4 M mm², and its cohort file."""
    rng = np.random.default_rng(seed)
    side_um = np.sqrt(n / XENIUM_PER_MM2) * 1e3
    side_px = int(side_um / HE_MPP)
    bundle = folder / "xenium"
    bundle.mkdir(parents=True)
    write_slide(bundle / "bench_he_image.ome.tif", side_px, side_px, HE_MPP, seed)
    s = HE_MPP / PIXEL_SIZE_UM  # H&E px → morphology px
    np.savetxt(bundle / "bench_he_imagealignment.csv", [[s, 0, 40.0], [0, s, 25.0], [0, 0, 1]], delimiter=",")
    (bundle / "experiment.xenium").write_text(
        json.dumps(
            {
                "pixel_size": PIXEL_SIZE_UM,
                "panel_name": "Xenium Prime 5K (benchmark)",
                "analysis_sw_version": "xenium-3.0",
            }
        )
    )
    controls = [f"NegControlProbe_{i:05d}" for i in range(20)] + [f"UnassignedCodeword_{i:04d}" for i in range(60)]
    names = pa.array([f"G{i:04d}" for i in range(XENIUM_GENES)] + controls)
    cells = pa.array(
        ["UNASSIGNED"]
        + [f"{i:08x}-1".translate(str.maketrans("0123456789abcdef", "abcdefghijklmnop")) for i in range(1, 20001)]
    )
    fovs = pa.array([f"{chr(65 + i // 26)}{i % 26 + 1}" for i in range(100)])
    schema = None
    with_writer = None
    for start in range(0, n, ROW_GROUP):
        k = min(ROW_GROUP, n - start)
        he = rng.random((k, 2)) * side_px
        morph_um = (he * s + [40.0, 25.0]) * PIXEL_SIZE_UM
        feature = np.where(
            rng.random(k) < 0.02, rng.integers(XENIUM_GENES, len(names), k), rng.integers(0, XENIUM_GENES, k)
        ).astype(np.int32)
        cell = np.where(rng.random(k) < 0.2, 0, rng.integers(1, len(cells), k)).astype(np.int32)
        table = pa.table(
            {
                "transcript_id": pa.array(np.arange(start, start + k, dtype=np.uint64) + (1 << 48)),
                "cell_id": pa.DictionaryArray.from_arrays(pa.array(cell), cells),
                "overlaps_nucleus": pa.array(rng.integers(0, 2, k).astype(np.uint8)),
                "feature_name": pa.DictionaryArray.from_arrays(pa.array(feature), names),
                "x_location": pa.array(morph_um[:, 0].astype(np.float32)),
                "y_location": pa.array(morph_um[:, 1].astype(np.float32)),
                "z_location": pa.array(np.round(rng.uniform(5, 25, k), 2).astype(np.float32)),
                "qv": pa.array(
                    np.where(rng.random(k) < 0.15, rng.uniform(5, 20, k), rng.uniform(20, 40, k)).astype(np.float32)
                ),
                "fov_name": pa.DictionaryArray.from_arrays(pa.array(rng.integers(0, 100, k).astype(np.int32)), fovs),
                "nucleus_distance": pa.array(np.round(np.minimum(rng.exponential(5, k), 60), 2).astype(np.float32)),
                "codeword_index": pa.array(feature),
            }
        )
        if with_writer is None:
            schema = table.schema
            with_writer = pq.ParquetWriter(
                bundle / "transcripts.parquet",
                schema,
                compression="zstd",
                use_dictionary=[
                    c for c in schema.names if c not in ("transcript_id", "x_location", "y_location", "qv")
                ],
                column_encoding={"transcript_id": "DELTA_BINARY_PACKED"},
            )
        with_writer.write_table(table, row_group_size=ROW_GROUP)
    with_writer.close()
    cohort = {
        "samples": [
            {"id": "xenium", "technology": "xenium", "slide": "xenium/bench_he_image.ome.tif", "data": "xenium"}
        ]
    }
    (folder / "cohort.yaml").write_text(yaml.safe_dump(cohort))
    return folder / "cohort.yaml"


def make_visium_hd(folder: Path, scale: float, seed: int = 0) -> tuple[Path, int]:
    """A Visium HD outs/ with a square_002um output over `scale` of the full capture area's side."""
    rng = np.random.default_rng(seed)
    side = int(HD_FULL_SIDE * scale)
    outs = folder / "hd" / "outs"
    spatial = outs / "binned_outputs" / "square_002um" / "spatial"
    spatial.mkdir(parents=True)
    px_per_bin = 2.0 / HE_MPP
    margin = 200
    write_slide(outs / "he.tif", int(side * px_per_bin) + 2 * margin, int(side * px_per_bin) + 2 * margin, HE_MPP, seed)
    (spatial / "scalefactors_json.json").write_text(
        json.dumps(
            {
                "spot_diameter_fullres": px_per_bin,
                "bin_size_um": 2.0,
                "microns_per_pixel": HE_MPP,
                "tissue_hires_scalef": 0.1,
                "tissue_lowres_scalef": 0.01,
                "fiducial_diameter_fullres": 10 * px_per_bin,
            }
        )
    )
    # Every bin of the grid, row-major, as Space Ranger lists them; a disc-ish blob is in tissue.
    writer = None
    in_tissue_rows = []
    for r0 in range(0, side, 256):
        rows, cols = (a.ravel() for a in np.mgrid[r0 : min(side, r0 + 256), 0:side])
        inside = ((rows - side / 2) ** 2 + (cols - side / 2) ** 2) <= HD_IN_TISSUE * side**2 / np.pi
        bc = np.char.add(
            np.char.add(np.char.add("s_002um_", np.char.zfill(rows.astype(str), 5)), "_"),
            np.char.add(np.char.zfill(cols.astype(str), 5), "-1"),
        )
        table = pa.table(
            {
                "barcode": pa.array(bc),
                "in_tissue": pa.array(inside.astype(np.int32)),
                "array_row": pa.array(rows.astype(np.int32)),
                "array_col": pa.array(cols.astype(np.int32)),
                "pxl_row_in_fullres": pa.array(margin + (rows + 0.5) * px_per_bin),
                "pxl_col_in_fullres": pa.array(margin + (cols + 0.5) * px_per_bin),
            }
        )
        writer = writer or pq.ParquetWriter(spatial / "tissue_positions.parquet", table.schema)
        writer.write_table(table)
        in_tissue_rows.append(bc[inside])
    writer.close()
    barcodes = np.concatenate(in_tissue_rows)
    n_bc = len(barcodes)
    nnz = rng.poisson(HD_NNZ_PER_BIN, n_bc)
    indptr = np.concatenate([[0], np.cumsum(nnz)]).astype(np.int64)
    with h5py.File(outs / "binned_outputs" / "square_002um" / "filtered_feature_bc_matrix.h5", "w") as f:
        f.attrs["software_version"] = "spaceranger-4.0.1"
        f.attrs["chemistry_description"] = np.bytes_("Visium HD v1")
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=barcodes.astype("S"), compression="gzip", chunks=True)
        opts = dict(compression="gzip", compression_opts=4, chunks=(1 << 20,))
        data = m.create_dataset("data", shape=(indptr[-1],), dtype=np.int32, **opts)
        indices = m.create_dataset("indices", shape=(indptr[-1],), dtype=np.int64, **opts)
        for a in range(0, n_bc, 1 << 20):  # written in chunks: the matrix never sits in memory whole
            lo, hi = indptr[a], indptr[min(n_bc, a + (1 << 20))]
            data[lo:hi] = rng.integers(1, 4, hi - lo)
            indices[lo:hi] = rng.integers(0, HD_GENES, hi - lo)
        m["indptr"] = indptr
        m["shape"] = np.array([HD_GENES, n_bc], dtype=np.int32)
        m["features/id"] = np.array([f"ENSG{i:011d}" for i in range(HD_GENES)], dtype="S")
        m["features/name"] = np.array([f"GENE{i}" for i in range(HD_GENES)], dtype="S")
        m["features/feature_type"] = np.array([b"Gene Expression"] * HD_GENES)
    cohort = {
        "samples": [
            {"id": "hd", "technology": "visium_hd", "slide": "hd/outs/he.tif", "data": "hd/outs", "bin_size_um": 2}
        ]
    }
    (folder / "cohort.yaml").write_text(yaml.safe_dump(cohort))
    return folder / "cohort.yaml", side * side


def measure(cohort: Path, out: Path, tiling: str) -> tuple[float, float, float, dict]:
    """(wall s, CPU s, peak RSS GB, the child's figures) of sharding `cohort` in a fresh process. CPU time
    (user + system) is the figure to compare on a shared machine, where wall time depends on the neighbours."""
    t0 = time.perf_counter()
    # the child imports HistoTx from PYTHONPATH when set (other code, same inputs), else from this checkout; it runs
    # in the output's folder, since `python -c` puts its working directory first on sys.path
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH") or str(REPO)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:  # files: no pipe to drain
        proc = subprocess.Popen(
            [sys.executable, "-c", SHARD, str(cohort.resolve()), str(out.resolve()), tiling],
            stdout=stdout,
            stderr=stderr,
            env=env,
            cwd=out.parent,
        )
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage (RUSAGE_CHILDREN would keep the max of all)
        wall = time.perf_counter() - t0
        stdout.seek(0), stderr.seek(0)
        out_text, err_text = stdout.read(), stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"sharding {cohort} failed:\n{err_text[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20, json.loads(out_text.strip().splitlines()[-1])


def cached_input(cache: Path, kind: str, size: float) -> tuple[Path, int, float]:
    """(cohort file, units, seconds spent making it) of an input kept under ``cache`` (made once, atomically: a
    folder is renamed into place when complete, so an interrupted run leaves no half input behind to reuse)."""
    folder = cache / f"{kind}-{size:g}"
    units_file = folder / "units.txt"
    if units_file.exists():
        return folder / "cohort.yaml", int(units_file.read_text()), 0.0
    shutil.rmtree(folder.with_name(folder.name + ".partial"), ignore_errors=True)
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True)
    t0 = time.perf_counter()
    if kind == "xenium":
        units = int(size)
        make_xenium(partial, units)
    else:
        units = make_visium_hd(partial, size)[1]
    (partial / "units.txt").write_text(str(units))
    partial.rename(folder)
    return folder / "cohort.yaml", units, time.perf_counter() - t0


def _du(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9


SMALL = {"xenium": "2e6", "hd": "0.15"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--xenium", default="4e6,16e6,64e6", help="transcript counts, comma-separated ('' for none)")
    ap.add_argument(
        "--hd",
        default="0.25,0.5,1.0",
        help="fractions of the full 6.5 mm capture area's side for Visium HD 2 µm ('' for none)",
    )
    ap.add_argument(
        "--small", action="store_true", help=f"a quick check: --xenium {SMALL['xenium']} --hd {SMALL['hd']}"
    )
    ap.add_argument("--tiling", default="grid_sites", choices=("grid", "grid_sites"))
    ap.add_argument("--cache", type=Path, default=Path("out/shard_memory"), help="where inputs are kept and reused")
    ap.add_argument("--drop-inputs", action="store_true", help="remove each input once measured (disk)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder for the shards (default: $TMPDIR)")
    args = ap.parse_args()
    if args.small:
        args.xenium, args.hd = SMALL["xenium"], SMALL["hd"]
    jobs = [("xenium", float(v)) for v in args.xenium.split(",") if v] + [
        ("visium_hd", float(v)) for v in args.hd.split(",") if v
    ]
    print(
        f"{'input':<10}{'size':>14}{'unit':>12}{'input GB':>10}{'make s':>9}{'shard s':>9}{'CPU s':>9}"
        f"{'peak RSS GB':>13}{'units/s':>11}{'tiles':>8}{'sites kept':>13}{'held at once':>14}{'bands GB':>10}"
        f"{'shards GB':>11}",
        flush=True,
    )
    for kind, size in jobs:
        cohort, units, made = cached_input(args.cache, kind, size)
        work = Path(tempfile.mkdtemp(prefix="shard-memory-", dir=args.work))
        try:
            wall, cpu, rss, got = measure(cohort, work / "shards", args.tiling)
            shards_gb = _du(work / "shards")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        held = max(got["peak_loaded"] or 0, got["peak_buffered"] or 0)
        print(
            f"{kind:<10}{units:>14,}{'transcripts' if kind == 'xenium' else 'grid bins':>12}"
            f"{_du(cohort.parent):>10.2f}{made:>9.1f}{wall:>9.1f}{cpu:>9.1f}{rss:>13.2f}{units / wall:>11,.0f}"
            f"{got['tiles']:>8,}{got['sites_kept']:>13,}{held:>14,}{got['scratch_bytes'] / 1e9:>10.2f}"
            f"{shards_gb:>11.2f}",
            flush=True,
        )
        if args.drop_inputs:
            shutil.rmtree(cohort.parent)


if __name__ == "__main__":
    main()
