"""Start-up of `histotx train` before its first step: one process, and 2 CPU ranks under torchrun.

    python benchmarks/startup.py                       # shards a small synthetic cohort first (in --work)
    python benchmarks/startup.py --shards out/demo/shards --repeats 3

Each run is a fresh process with a fresh, empty ``TORCH_EXTENSIONS_DIR`` (what a new venv on a new machine
has: nothing JIT-built yet), the tiny CPU config, 2 steps, a metrics record after every step. The script
notes the wall time from starting the process to the first record in ``metrics.jsonl`` and subtracts the
time the record says the step itself took (data wait + compute): what is left is the start-up before step
1 (Python imports, process group, model, DeepSpeed engine, loader start). It also gives the CPU seconds of
the whole run's process tree (ranks and any compiler included): on a shared machine wall time follows the
other jobs' load, CPU time much less. It also says whether anything
was written to the extensions folder (DeepSpeed's JIT builds land there) and to ``~/.cache/torch_extensions``.

The code timed is the ``histotx`` importable in this Python (``PYTHONPATH=/path/to/checkout`` picks a
checkout). ``--keep-extensions`` reuses one extensions folder across runs (a warm build cache).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "tiny_cpu.yaml"
DEFAULT_CACHE = Path.home() / ".cache" / "torch_extensions"


def make_shards(work: Path) -> Path:
    """A small synthetic cohort (Visium SR1 + image-only), sharded once."""
    from histotx.sharding.config import ShardConfig
    from histotx.sharding.pipeline import run_cohort
    from histotx.synth import generate_cohort

    shards = work / "shards"
    if (shards / "manifest.json").is_file():
        return shards
    cohort = generate_cohort(work / "cohort", seed=0, size="small", technologies=("visium", "image_only"))
    run_cohort(cohort, shards, ShardConfig(seed=0), workers=1)
    return shards


def _children_cpu() -> float:
    """User + system CPU seconds of every finished descendant (the run, its ranks, a compiler it started):
    less sensitive than wall time to other jobs on a shared machine."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def files_under(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def one_run(shards: Path, work: Path, ranks: int, ext_dir: Path, port: int, config: Path = CONFIG) -> dict[str, float]:
    out = Path(tempfile.mkdtemp(prefix=f"run{ranks}_", dir=work))
    overrides = [
        f"data.stream.shards={shards}",
        f"out={out}",
        "steps=2",
        "log.every_steps=1",
        "log.tensorboard=false",
        "log.progress=false",
        "checkpoint.every_steps=1000",
    ]
    if ranks == 1:
        cmd = [sys.executable, "-m", "histotx.cli", "train", str(config), *overrides]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={ranks}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "-m",
            "histotx.launch.train",
            str(config),
            *overrides,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(ext_dir)}
    before_default = files_under(DEFAULT_CACHE)
    ext_before = files_under(ext_dir)
    log = open(out.parent / f"{out.name}.log", "w")
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    # cwd outside any checkout: `python -m` puts the cwd first on sys.path, ahead of PYTHONPATH
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    metrics = out / "metrics.jsonl"
    first = None
    while proc.poll() is None:
        if first is None and metrics.is_file() and metrics.read_text().strip():
            first = time.perf_counter() - t0
        time.sleep(0.02)
    total = time.perf_counter() - t0
    cpu = _children_cpu() - cpu0
    log.close()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log.name}")
    built = [line.strip() for line in open(log.name) if "built successfully" in line]  # deepspeed's own line
    record = json.loads(metrics.read_text().splitlines()[0])
    step_s = record["time/data_wait_s"] + record["time/compute_s"]
    first = total if first is None else first
    return {
        "to_first_record_s": first,
        "step1_s": step_s,
        "startup_s": first - step_s,
        "total_s": total,
        "extensions_written": files_under(ext_dir) - ext_before,
        "default_cache_written": files_under(DEFAULT_CACHE) - before_default,
        "jit_builds": len(built),
        "cpu_s": cpu,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, default=None, help="a shard set (default: shard a small synthetic cohort)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--repeats", type=int, default=1, help="runs per case (default 1)")
    p.add_argument("--ranks", default="1,2", help="cases: comma-separated process counts (default 1,2)")
    p.add_argument("--keep-extensions", action="store_true", help="one extensions folder for every run (warm cache)")
    p.add_argument("--port", type=int, default=29731, help="first torchrun master port (default 29731)")
    p.add_argument(
        "--config",
        type=Path,
        default=CONFIG,
        help="training config (default: this checkout's configs/train/tiny_cpu.yaml; give the timed checkout's "
        "own when its config keys differ)",
    )
    args = p.parse_args(argv)

    import histotx

    tmp = tempfile.TemporaryDirectory(prefix="histotx_startup_") if args.work is None else None
    work = Path(tmp.name) if tmp else args.work
    work.mkdir(parents=True, exist_ok=True)
    shards = args.shards or make_shards(work)
    print(f"histotx from {Path(histotx.__file__).parent}; shards {shards}; {os.cpu_count()} CPUs", flush=True)
    shared_ext = work / "torch_extensions"
    rows = []
    port = args.port
    for ranks in [int(r) for r in args.ranks.split(",")]:
        results = []
        for i in range(args.repeats):
            ext = shared_ext if args.keep_extensions else work / f"torch_extensions_{ranks}_{i}"
            r = one_run(shards, work, ranks, ext, port, args.config)
            port += 1
            results.append(r)
            print(
                f"  {ranks} rank(s), run {i + 1}: start-up {r['startup_s']:.1f} s (first record at "
                f"{r['to_first_record_s']:.1f} s, step 1 {r['step1_s']:.2f} s, process {r['total_s']:.1f} s, "
                f"CPU of the whole run {r['cpu_s']:.1f} s); "
                f"DeepSpeed JIT builds logged: {r['jit_builds']}; files written to TORCH_EXTENSIONS_DIR: "
                f"{r['extensions_written']}, to {DEFAULT_CACHE} meanwhile (by any process): "
                f"{r['default_cache_written']}",
                flush=True,
            )
        rows.append((ranks, results))
    print(
        "\n| ranks | start-up before step 1, s (median) | min | max | CPU s of the whole run (median) | JIT builds "
        "| files in TORCH_EXTENSIONS_DIR |"
    )
    print("|---|---|---|---|---|---|---|")
    for ranks, results in rows:
        s = [r["startup_s"] for r in results]
        builds = sum(r["jit_builds"] for r in results)
        files = sum(r["extensions_written"] for r in results)
        cpu = statistics.median(r["cpu_s"] for r in results)
        print(
            f"| {ranks} | {statistics.median(s):.1f} | {min(s):.1f} | {max(s):.1f} | {cpu:.1f} | {builds} | {files} |"
        )
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
