"""`histotx demo OUT`: the whole pipeline on a small built-in synthetic cohort, end to end."""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

TINY_TRAIN_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "tiny_cpu.yaml"
TRAIN_STEPS = 4


def run_demo(out: Path, seed: int = 0, workers: int = 1) -> int:
    from histotx.synth import generate_cohort
    from sharding.config import ShardConfig
    from sharding.pipeline import run_cohort
    from sharding.verify import verify

    out = Path(out)
    cohort = generate_cohort(out / "cohort", seed=seed, size="small")
    log.info("demo 1/4: synthetic cohort → %s", cohort)
    manifest = run_cohort(cohort, out / "shards", ShardConfig(seed=seed), workers=workers)
    tot = manifest["totals"]
    log.info("demo 2/4: sharded %d tiles in %d shards (%d samples ok, %d failed)", tot["tiles"], tot["shards"],
             tot["samples_ok"], tot["samples_failed"])
    report = verify(out / "shards")
    log.info("demo 3/4: verified %d tiles, %d problems", report["tiles"], len(report["problems"]))
    losses = train_briefly(out / "shards", out / "train", seed)
    finite = bool(losses) and all(math.isfinite(v) for v in losses)
    log.info("demo 4/4: trained the tiny model %d steps, losses %s", len(losses), [round(v, 3) for v in losses])
    print(f"demo finished: {tot['tiles']} tiles from {tot['samples_ok']} samples in {out / 'shards'}; "
          f"{len(report['problems'])} problems; {len(losses)} training steps, last loss "
          f"{losses[-1] if losses else float('nan'):.4f} ({out / 'train'})")
    return 1 if tot["samples_failed"] or report["problems"] or not finite else 0


def train_briefly(shards: Path, out: Path, seed: int) -> list[float]:
    """A few steps of the tiny model on one CPU process: the training stage runs on these shards."""
    from histotx.config import load_config
    from histotx.train.config import TrainConfig
    from histotx.train.loop import train

    cfg = load_config(TrainConfig, TINY_TRAIN_CONFIG, [
        f"data.stream.shards={shards}", f"out={out}", f"steps={TRAIN_STEPS}", f"seed={seed}", "log.every_steps=1",
        "deepspeed.backend=gloo", "deepspeed.precision=fp32"])
    train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows[-TRAIN_STEPS:]]


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run the pipeline end to end on a small built-in synthetic cohort",
        description="Generate a small synthetic cohort (all technologies), shard it, verify the shards, and train "
                    "the tiny model a few steps on them (one CPU process).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, nargs="?", default=Path("out/demo"), help="output folder (default out/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(func=lambda a: run_demo(a.out, a.seed, a.workers))
