"""`histotx demo OUT`: the whole pipeline on a small built-in synthetic cohort, end to end."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def run_demo(out: Path, seed: int = 0, workers: int = 1) -> int:
    from histotx.synth import generate_cohort
    from sharding.config import ShardConfig
    from sharding.pipeline import run_cohort
    from sharding.verify import verify

    out = Path(out)
    cohort = generate_cohort(out / "cohort", seed=seed, size="small")
    log.info("demo 1/3: synthetic cohort → %s", cohort)
    manifest = run_cohort(cohort, out / "shards", ShardConfig(seed=seed), workers=workers)
    tot = manifest["totals"]
    log.info("demo 2/3: sharded %d tiles in %d shards (%d samples ok, %d failed)", tot["tiles"], tot["shards"],
             tot["samples_ok"], tot["samples_failed"])
    report = verify(out / "shards")
    log.info("demo 3/3: verified %d tiles, %d problems", report["tiles"], len(report["problems"]))
    print(f"demo finished: {tot['tiles']} tiles from {tot['samples_ok']} samples in {out / 'shards'}; "
          f"{len(report['problems'])} problems")
    return 1 if tot["samples_failed"] or report["problems"] else 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run the pipeline end to end on a small built-in synthetic cohort",
        description="Generate a small synthetic cohort (all technologies), shard it, verify the shards.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, nargs="?", default=Path("out/demo"), help="output folder (default out/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(func=lambda a: run_demo(a.out, a.seed, a.workers))
