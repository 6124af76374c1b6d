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

from histotx.presets import packaged

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN_CONFIG = packaged("tiny_cpu")  # package data: found from a wheel as from a checkout
TRAIN_STEPS = 200  # a few minutes on 2 CPU ranks
TRAIN_RANKS = 2
EVAL_MODES = ("image", "transcripts", "fused")


def _stage(n: int, text: str, started: float, quiet: _Quiet | None = None) -> None:
    note = quiet.take() if quiet is not None else ""
    print(f"[demo {n}/8, {time.monotonic() - started:5.0f} s] {text}{note}", flush=True)


def run_demo(out: Path, seed: int = 0, workers: int = 1, steps: int = TRAIN_STEPS, ranks: int = TRAIN_RANKS) -> int:
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with _Quiet(out / "demo.log") as quiet:
        return _run_demo(out, seed, workers, steps, ranks, quiet)


def _run_demo(out: Path, seed: int, workers: int, steps: int, ranks: int, quiet: _Quiet) -> int:
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
    _stage(1, f"synthetic cohort (Visium SR1/SR2, Visium HD, Xenium, HEST, image-only) → {cohort}", t0, quiet)
    manifest = run_cohort(cohort, out / "shards", ShardConfig(seed=seed), workers=workers)
    tot = manifest["totals"]
    _stage(
        2,
        f"sharded {tot['tiles']} tiles into {tot['shards']} shards ({tot['samples_ok']} samples ok, "
        f"{tot['samples_failed']} failed) → {out / 'shards'}",
        t0,
        quiet,
    )
    report = verify(out / "shards")
    _stage(3, f"verified {report['tiles']} tiles, {len(report['problems'])} problems", t0, quiet)
    run = out / "train"
    losses = pretrain(out / "shards", run, seed, steps, ranks)
    finite = bool(losses) and all(math.isfinite(v) for v in losses)
    _stage(
        4,
        f"pretrained the tiny fused model {steps} steps on {ranks} CPU ranks; loss {losses[0]:.3f} → "
        f"{losses[-1]:.3f} (logged every {max(1, steps // 10)} steps) → {run}"
        + train_warnings(run.parent / "train.log"),
        t0,
        quiet,
    )
    summary = export(run, out / "export", formats=("hf", "timm"), overwrite=True)
    _stage(5, f"exported the teacher → {summary.out} (hf/, timm/)", t0, quiet)
    model = load_model(out / "export")
    _stage(
        6,
        f"reloaded the export: {model.name}, {len(model.genes)} genes, {model.image_size} px at {model.mpp:g} µm/px",
        t0,
        quiet,
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
    _stage(7, f"embedded every tile ({', '.join(EVAL_MODES)}) → {out / 'eval' / 'embeddings'}", t0, quiet)
    _stage(8, "evaluated (HEST-Bench protocol, leave-one-patient-out):", t0, quiet)
    from histotx.eval.report import print_table

    print_table(table, table.attrs["header"])
    print(explain_table(table.attrs["results"]["targets"], gene_groups()))
    print(
        "\nThis table is a smoke test of the pipeline, not evidence that pretraining teaches anything: the demo\n"
        "trains a 2-block model for 20 steps on 32 px tiles, where the teacher's targets carry no tile information\n"
        "(its DINO loss equals the shuffled-tile control: dino/control_gap ~ 0 in metrics.jsonl). What the objective\n"
        "learns, and when, is measured by benchmarks/ssl_reference.py and benchmarks/claims.py; every attempt is in\n"
        "benchmarks/ssl_results.md."
    )
    print(
        f"\nartefacts under {out}:\n"
        f"  cohort        {cohort} (+ truth/<sample>.json: sites, regions, programs)\n"
        f"  shards        {out / 'shards'} (manifest.json, vocab.tsv, <sample>.<k>.tar)\n"
        f"  training run  {run} (config.yaml, metrics.jsonl, checkpoints/latest)\n"
        f"  export        {out / 'export'} (teacher.safetensors + model_config.yaml; hf/: "
        f"AutoModel.from_pretrained(..., trust_remote_code=True); timm/: timm.create_model('local-dir:...'))\n"
        f"  embeddings    {out / 'eval' / 'embeddings'} (<model>/<sample>.h5ad)\n"
        f"  evaluation    " + ", ".join(str(p) for p in table.attrs.get("paths", {}).values()) + "\n"
        f"  log           {quiet.path} (every stage's log lines, warnings included)\n"
        f"demo finished in {time.monotonic() - t0:.0f} s"
    )
    return 1 if tot["samples_failed"] or report["problems"] or not finite else 0


GROUP_MEANING = {
    "region": "genes of the region programs (tissue types the H&E shows through its nuclei): an image model can "
    "learn them",
    "crowding": "genes that rise with local nuclei density, visible as how packed the nuclei are",
    "hidden": "genes of a hidden cell state (hypoxia) that the H&E does not show: only transcript input can "
    "carry them, so image rows should stay near 0",
    "housekeeping": "genes every cell expresses about alike: little to predict",
}


def explain_table(targets: list[str], groups: dict[str, list[str]], width: int = 110) -> str:
    """What the demo's columns mean, and why a group's column can be empty (no target gene in it)."""
    import textwrap

    def item(name: str, text: str) -> list[str]:
        return textwrap.wrap(text, width, initial_indent=f"  {name:<13} ", subsequent_indent=" " * 16)

    lines = ["How to read the table:"]
    lines += item(
        "Pearson",
        "per target gene, Pearson r between the expression predicted from a tile's embedding (ridge on PCA, fitted "
        "on the other patients) and the measured log1p expression of the held-out patient's tiles; the mean over "
        f"the {len(targets)} target genes, ± sd over the folds",
    )
    lines += item(
        "mode",
        "image: the tile alone; transcripts: its transcript tokens alone; fused: both (the target genes are "
        "removed from the transcript input, so they cannot leak into their own prediction)",
    )
    for name, genes in groups.items():
        n = len(set(genes) & set(targets))
        note = f"{n} of the targets" if n else "no target gene in this group: column empty (—)"
        lines += item(name, f"the same mean over this group's target genes ({note}): {GROUP_MEANING.get(name, '')}")
    lines += item(
        "targets",
        "up to 50 genes, those of largest variance among the genes present in ≥ 10 % of the sites of every "
        "sample (HEST's rule); a group whose genes are rare or nearly constant, like housekeeping, may have "
        "none, hence an empty column",
    )
    lines += item("folds ...", "folds (leave-one-patient-out), target genes, tiles evaluated, genes without r")
    lines += item("random_init", "the same architecture untrained: the baseline every row should beat")
    return "\n".join(lines)


def train_warnings(log: Path) -> str:
    """`` (N warnings: see LOG)`` for the trainer's own warnings in its log, or nothing."""
    n = sum(" WARNING histotx" in line for line in log.read_text(errors="replace").splitlines()) if log.is_file() else 0
    return f" ({n} warning{'s' if n != 1 else ''}: see {log})" if n else ""


class _Quiet:
    """During the demo, every log record goes to ``demo.log`` instead of between the stage lines (errors
    still reach the terminal); the warnings of a stage are counted for its stage line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.root = logging.getLogger()
        self.file = logging.FileHandler(path, mode="w")
        self.file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.file.setLevel(logging.INFO)
        self.warnings = 0
        self.saved: list[tuple[logging.Handler, int]] = []
        self.level = self.root.level

    def __enter__(self) -> _Quiet:
        self.saved = [(h, h.level) for h in self.root.handlers]
        for h, _ in self.saved:
            h.setLevel(logging.ERROR)
        counter = logging.Handler(logging.WARNING)
        counter.emit = lambda _record: setattr(self, "warnings", self.warnings + 1)
        self.counter = counter
        self.root.addHandler(self.file)
        self.root.addHandler(counter)
        self.root.setLevel(min(self.level or logging.INFO, logging.INFO))
        return self

    def take(self) -> str:
        """`` (N warnings: see demo.log)`` for the warnings since the last call, or nothing."""
        n, self.warnings = self.warnings, 0
        return f" ({n} warning{'s' if n != 1 else ''}: see {self.path})" if n else ""

    def __exit__(self, *_exc) -> None:
        self.root.removeHandler(self.file)
        self.root.removeHandler(self.counter)
        self.file.close()
        for h, level in self.saved:
            h.setLevel(level)
        self.root.setLevel(self.level)


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
