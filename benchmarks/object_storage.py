"""Loader throughput from an S3-compatible server on 127.0.0.1 vs from local disk: the same shards, one run.

    python benchmarks/object_storage.py [--shards DIR] [--batches 40] [--workers 2]

Starts moto's server mode on a free port of 127.0.0.1 (pip install 'histotx[dev]': moto[server], boto3,
s3fs), uploads the shard set (default: the synthetic cohort sharded at 8 µm/px, 32 px tiles), then reads
``--batches`` batches of the tiny training config's loader from the folder and from s3://, alternating
the two for ``--rounds`` rounds, and prints samples/s of each and their ratio (server / local). Each
reading starts a new loader (the worker processes, the manifest read and the shards' SHA-256 checks are
part of what is timed, as at the start of a run). The server is local, so this measures the loader's cost
of going through fsspec/s3fs and HTTP, not a network.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUCKET = "histotx-bench"


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("moto server did not start (pip install 'moto[server]')") from None
            time.sleep(0.2)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    return proc, endpoint


def make_shards(root: Path) -> Path:
    from histotx.sharding.config import ShardConfig
    from histotx.sharding.pipeline import run_cohort
    from histotx.synth import generate_cohort

    cohort = generate_cohort(root / "synth", seed=0, size="small")
    cfg = ShardConfig(mpp=8.0, tile_px=32, mask_mpp=16.0, min_tissue_fraction=0.3, shard_max_tiles=8)
    run_cohort(cohort, root / "shards", cfg)
    return root / "shards"


def read(shards: str, batches: int, workers: int, batch_size: int) -> tuple[float, int]:
    from histotx.config import load_config
    from histotx.data.loader import build_loader
    from histotx.train.config import TrainConfig

    cfg = load_config(
        TrainConfig,
        REPO / "configs" / "train" / "tiny_cpu.yaml",
        [
            f"data.stream.shards={shards}",
            f"data.stream.num_workers={workers}",
            f"data.stream.batch_size={batch_size}",
            "data.collate.resolutions_um=[16.0, 32.0]",
        ],
    )
    t0 = time.perf_counter()
    loader = build_loader(cfg.data, rank=0, world_size=1)
    it = iter(loader)
    samples = sum(next(it).batch_size for _ in range(batches))
    seconds = time.perf_counter() - t0
    del it
    if loader.stats.corrupt_shards:
        raise SystemExit(f"{shards}: {loader.stats.corrupt_shards} corrupt shards while reading")
    return seconds, samples


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, help="a local shard set (default: make the synthetic one)")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating local / s3 readings, median reported")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or make_shards(Path(tmp))
        proc, endpoint = start_server()
        try:
            import boto3

            s3 = boto3.client("s3", endpoint_url=endpoint)
            s3.create_bucket(Bucket=BUCKET)
            files = sorted(f for f in shards.iterdir() if f.is_file())
            for f in files:
                s3.upload_file(str(f), BUCKET, f"set/{f.name}")
            mb = sum(f.stat().st_size for f in files) / 1e6
            print(f"shard set {shards}: {len(files)} files, {mb:.1f} MB; server {endpoint} (moto)")
            rates: dict[str, list[float]] = {"local": [], "s3": []}
            for r in range(args.rounds):
                for name, where in (("local", str(shards)), ("s3", f"s3://{BUCKET}/set")):
                    seconds, samples = read(where, args.batches, args.workers, args.batch_size)
                    rates[name].append(samples / seconds)
                    print(f"round {r + 1} {name:5s}: {samples} samples in {seconds:.2f} s = {samples / seconds:.1f}/s")
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    local, remote = statistics.median(rates["local"]), statistics.median(rates["s3"])
    print(
        f"loader samples/s (median of {args.rounds}, {args.workers} workers, batch {args.batch_size}): "
        f"local disk {local:.1f}, S3 server on 127.0.0.1 {remote:.1f}; ratio server/local {remote / local:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
