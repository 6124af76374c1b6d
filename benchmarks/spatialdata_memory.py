"""Peak memory of `histotx shard run` on a SpatialData store whose image is larger than what the run holds.

Writes a store (``--side`` px square H&E-like image at 0.5 µm/px, a tissue disk over 38 % of it, a 4-level
pyramid in 512 px chunks, made chunk by chunk with dask so the writer never holds it either; ``--molecules``
molecules in a µm coordinate system) under a temporary folder, then in child processes: (1) the imports and the
store opened (``spatialdata.read_zarr``), (2) ``histotx shard run`` with one worker. Printed: the image's size
as RGB, each child's wall time and peak RSS (``ru_maxrss`` from ``wait4``). The run reads the image level by level,
chunk by chunk through zarr: its peak stays far below the image's size.

    python benchmarks/spatialdata_memory.py                   # 12,288 px side (432 MiB as RGB)
    python benchmarks/spatialdata_memory.py --side 24576      # 1.7 GiB as RGB
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHUNK = 512
OPEN = """
import sys, histotx.sharding.pipeline, histotx.sharding.spatialdata_store as s
from pathlib import Path
s.open_store(Path(sys.argv[1]))
"""


def write_store(path: Path, side: int, molecules: int) -> None:
    import dask.array as da
    import numpy as np
    import pandas as pd
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, PointsModel
    from spatialdata.transformations import Scale

    def block(block_info=None):
        (c0, c1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        yy, xx = np.mgrid[y0:y1, x0:x1]
        tissue = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (0.35 * side) ** 2
        noise = np.random.default_rng(y0 * side + x0).integers(0, 30, (3, y1 - y0, x1 - x0), dtype=np.uint8)
        out = np.full((c1 - c0, y1 - y0, x1 - x0), 242, np.uint8)
        out[:, tissue] = (np.array([200, 110, 170], np.uint8)[:, None, None] + noise)[:, tissue]
        return out

    sizes = (CHUNK,) * (side // CHUNK) + ((side % CHUNK,) if side % CHUNK else ())
    image = da.map_blocks(block, dtype=np.uint8, chunks=((3,), sizes, sizes))
    rng = np.random.default_rng(0)
    xy = rng.uniform(0.3 * side, 0.7 * side, (molecules, 2)) * 0.5
    df = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "gene": pd.Categorical(rng.choice(["A", "B", "C"], molecules))})
    um = {"global": Scale([1.0, 1.0], axes=("x", "y"))}
    half = {"global": Scale([0.5, 0.5], axes=("x", "y"))}
    SpatialData(
        images={
            "he": Image2DModel.parse(
                image, dims=("c", "y", "x"), scale_factors=[2, 2, 2], chunks=(3, CHUNK, CHUNK), transformations=half
            )
        },  # fmt: skip
        points={"tx": PointsModel.parse(df, feature_key="gene", transformations=um)},
    ).write(path)


def measure(args: list[str]) -> tuple[float, float]:
    """(wall s, peak RSS MiB) of a child process."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise RuntimeError(f"{args} failed:\n{log.read()[-3000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=12288, help="image side in px (default 12288)")
    p.add_argument("--molecules", type=int, default=200_000)
    p.add_argument("--write-to", type=Path, help=argparse.SUPPRESS)  # the child that writes the store
    args = p.parse_args()
    if args.write_to:
        write_store(args.write_to, args.side, args.molecules)
        return
    with tempfile.TemporaryDirectory(prefix="histotx-sdata-bench-") as tmp:
        root = Path(tmp)
        # Written by a child: a forked child's ru_maxrss starts from its parent's, which must stay small.
        made, _ = measure([__file__, "--side", str(args.side), "--molecules", str(args.molecules),
                           "--write-to", str(root / "big.zarr")])  # fmt: skip
        entry = "{id: big, patient: P1, technology: spatialdata, data: big.zarr, options: {um_per_unit: 1.0}}"
        (root / "cohort.yaml").write_text(f"samples:\n  - {entry}\n")
        print(f"image {args.side} x {args.side} px ({3 * args.side**2 / 2**20:.0f} MiB as RGB), "
              f"{args.molecules:,} molecules; store written in {made:.1f} s")  # fmt: skip
        wall, rss = measure(["-c", OPEN, str(root / "big.zarr")])
        print(f"imports + store opened: {wall:.1f} s, peak RSS {rss:.0f} MiB")
        cmd = ["-m", "histotx.cli", "shard", "run", str(root / "cohort.yaml"), "--out", str(root / "shards")]
        wall, rss = measure(cmd)
        print(f"histotx shard run (1 worker, 256 px at 0.5 µm/px): {wall:.1f} s, peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
