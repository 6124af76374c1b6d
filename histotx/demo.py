"""`histotx demo OUT`: the whole loop on a small built-in synthetic cohort, end to end, on CPU.

synth → shard → verify → pretrain (the tiny model, 2 CPU ranks under torchrun, DeepSpeed over gloo)
→ export (HistoTx + Hugging Face + timm folders) → reload the export → embed → eval (HEST-Bench
protocol: the trained model against a random-init backbone of the same architecture), then where every
artefact is. Each stage is the same code the CLI subcommands run.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN_CONFIG = ROOT / "configs" / "train" / "tiny_cpu.yaml"
TRAIN_STEPS = 200  # a few minutes on 2 CPU ranks
TRAIN_RANKS = 2
EVAL_MODES = ("image", "transcripts", "fused")


def _stage(n: int, text: str, started: float) -> None:
    print(f"[demo {n}/8, {time.monotonic() - started:5.0f} s] {text}", flush=True)


def run_demo(out: Path, seed: int = 0, workers: int = 1, steps: int = TRAIN_STEPS, ranks: int = TRAIN_RANKS) -> int:
    from histotx.eval import evaluate
    from histotx.export import load_model
    from histotx.export.write import export
    from histotx.sharding.config import ShardConfig
    from histotx.sharding.pipeline import run_cohort
    from histotx.sharding.verify import verify
    from histotx.synth import generate_cohort
    from histotx.synth.genes import gene_groups

    out = Path(out).resolve()
    t0 = time.monotonic()
    cohort = generate_cohort(out / "cohort", seed=seed, size="small")
    _stage(1, f"synthetic cohort (Visium SR1/SR2, Visium HD, Xenium, HEST, image-only) → {cohort}", t0)
    manifest = run_cohort(cohort, out / "shards", ShardConfig(seed=seed), workers=workers)
    tot = manifest["totals"]
    _stage(
        2,
        f"sharded {tot['tiles']} tiles into {tot['shards']} shards ({tot['samples_ok']} samples ok, "
        f"{tot['samples_failed']} failed) → {out / 'shards'}",
        t0,
    )
    report = verify(out / "shards")
    _stage(3, f"verified {report['tiles']} tiles, {len(report['problems'])} problems", t0)
    run = out / "train"
    losses = pretrain(out / "shards", run, seed, steps, ranks)
    finite = bool(losses) and all(math.isfinite(v) for v in losses)
    _stage(
        4,
        f"pretrained the tiny fused model {steps} steps on {ranks} CPU ranks; loss {losses[0]:.3f} → "
        f"{losses[-1]:.3f} (logged every {max(1, steps // 10)} steps) → {run}",
        t0,
    )
    summary = export(run, out / "export", formats=("hf", "timm"), overwrite=True)
    _stage(5, f"exported the teacher → {summary.out} (hf/, timm/)", t0)
    model = load_model(out / "export")
    _stage(
        6,
        f"reloaded the export: {model.name}, {len(model.genes)} genes, {model.image_size} px at {model.mpp:g} µm/px",
        t0,
    )
    # the synthetic cohort knows what drives each gene: report region / crowding / hidden-state genes apart
    table = evaluate(
        out / "shards",
        models={"demo": model, "random_init": _random_like(model, seed)},
        modes=EVAL_MODES,
        out=out / "eval",
        gene_groups=gene_groups(),
        progress=False,
        show=False,
    )
    _stage(7, f"embedded every tile ({', '.join(EVAL_MODES)}) → {out / 'eval' / 'embeddings'}", t0)
    _stage(8, "evaluated (HEST-Bench protocol, leave-one-patient-out):", t0)
    from histotx.eval.report import print_table

    print_table(table, table.attrs["header"])
    print(
        f"\nartefacts under {out}:\n"
        f"  cohort        {cohort} (+ truth/<sample>.json: sites, regions, programs)\n"
        f"  shards        {out / 'shards'} (manifest.json, vocab.tsv, <sample>.<k>.tar)\n"
        f"  training run  {run} (config.yaml, metrics.jsonl, checkpoints/latest)\n"
        f"  export        {out / 'export'} (teacher.safetensors + model_config.yaml; hf/: "
        f"AutoModel.from_pretrained(..., trust_remote_code=True); timm/: timm.create_model('local-dir:...'))\n"
        f"  embeddings    {out / 'eval' / 'embeddings'} (<model>/<sample>.h5ad)\n"
        f"  evaluation    " + ", ".join(str(p) for p in table.attrs.get("paths", {}).values()) + "\n"
        f"demo finished in {time.monotonic() - t0:.0f} s"
    )
    return 1 if tot["samples_failed"] or report["problems"] or not finite else 0


def pretrain(shards: Path, run: Path, seed: int, steps: int, ranks: int) -> list[float]:
    """The tiny model on ``ranks`` CPU processes (torchrun → histotx.launch.train, DeepSpeed over gloo)."""
    import json

    every = max(1, steps // 10)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={ranks}",
        "-m",
        "histotx.launch.train",
        str(TINY_TRAIN_CONFIG),
        f"data.stream.shards={shards}",
        f"out={run}",
        f"steps={steps}",
        f"seed={seed}",
        f"log.every_steps={every}",
        f"checkpoint.every_steps={steps}",
        "deepspeed.backend=gloo",
        "deepspeed.precision=fp32",
        "log.progress=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logfile = run.parent / "train.log"
    run.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc:
        raise RuntimeError(f"pretraining failed (exit {rc}); its output is in {logfile}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


def _random_like(loaded, seed: int):
    """The same architecture and preprocessing with random weights: the baseline every table needs."""
    import dataclasses

    import torch

    from histotx.model import FusedViT

    torch.manual_seed(seed)
    return dataclasses.replace(loaded, model=FusedViT(loaded.model.config).eval(), name="random init")


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole loop end to end on a small built-in synthetic cohort (CPU, minutes)",
        description="Generate a small synthetic cohort (every technology), shard it, verify the shards, pretrain the "
        "tiny fused model on 2 CPU ranks (torchrun, DeepSpeed over gloo), export the teacher, reload the "
        "export, embed every tile and evaluate it against a random-init backbone (HEST-Bench protocol).",
        epilog="Example: histotx demo out/demo   (make demo does the same after installing)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", type=Path, nargs="?", default=Path("out/demo"), help="output folder (default out/demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cohort, the sharding and the training (default 0)")
    p.add_argument("--workers", type=int, default=1, help="sharding processes (default 1)")
    p.add_argument("--steps", type=int, default=TRAIN_STEPS, help=f"pretraining steps (default {TRAIN_STEPS})")
    p.add_argument("--ranks", type=int, default=TRAIN_RANKS, help=f"CPU training processes (default {TRAIN_RANKS})")
    p.set_defaults(func=lambda a: run_demo(a.out, a.seed, a.workers, a.steps, a.ranks))
