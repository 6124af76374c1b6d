"""The two claims of HistoTx, measured on a synthetic cohort whose truth is known (CPU, 2 cores).

Claims: (a) the image encoder after fusion pretraining predicts expression from the image alone at
least as well as the image-only foundation model it started from; (b) image + transcripts (fused)
beat either modality alone.

The cohort (``histotx.synth``, size ``bench``, 1 µm/px): 8 Visium samples, each its own patient.
Expression follows region type (seen only through nuclear density, size, shape and texture: the mean
colour is the same everywhere), local crowding (seen as how packed the nuclei are) and a hidden state
(never drawn). Patients P01-P04 are for pretraining, P05-P08 for evaluation only (never seen in any
pretraining), evaluated leave-one-patient-out.

    1. FM:      a small ViT pretrained image-only with the DINOv2 recipe (configs/train/claims_image.yaml)
                on grid tiles of the pretraining slides, transcripts not given;
    2. HistoTx: the same backbone continued with fusion pretraining (configs/train/claims_fusion.yaml)
                on spot tiles of the same slides with their transcripts;
    3. eval:    HEST-Bench protocol (histotx.eval.evaluate) on the evaluation patients' spot tiles, for
                a random-init backbone, FM image, HistoTx image / fused / transcripts.

Targets are fixed before anything is measured: half of every gene program (the first six genes of
each), so the transcript input keeps the other half (the leakage guard drops every target gene) and
fused/transcripts inputs carry the hidden state through the hypoxia genes left in. Pearson is reported
per group: region, crowding, hidden, housekeeping (histotx.synth.genes.gene_groups); plus a
linear probe (logistic regression) of the region type at the spot. Every number is the mean ± sd over
seeds (training seed = random-init seed) of the per-seed mean over folds.

Recipe (configs/train/claims_*.yaml), fixed from first principles and training metrics before the
claims table was looked at; what differs from tiny_cpu.yaml and why:
- input: 64 µm tiles seen at 1 µm/px (64 px, patch 8). tiny_cpu shows a 128 µm tile at 32 px (4 µm/px),
  where a 4-7 µm nucleus is 1-2 px: only mean colour survives, and random features read mean colour
  as well as any trained ones. Blur sigma scaled with the crop (DINOv2's 0.1-2 px at 224 px → 0.1-0.6 px
  at 64 px), so the always-blurred first global crop keeps its nuclei.
- teacher normalisation: Sinkhorn-Knopp (DINOv2's), not centring at momentum 0.99 with a fixed teacher
  temperature of 0.04: there the DINO term first collapses onto one prototype (loss → 0.06) and then,
  once the slow centre catches up with the constant output, sits at ln(out_dim) (a uniform teacher).
- LayerScale init 0.1 (CaiT's value for shallow nets), not DINOv2's 1e-5: in a first 141-step image-only
  run with 1e-5 the gammas had only reached ~1e-3, so the blocks added ~0.1 % to the residual stream and
  the CLS was nearly the same vector for every tile, and a first claims run showed the teacher's
  Sinkhorn rows at entropy 5.49 of ln 256 = 5.55 (``teacher/entropy``, steps 20-40): no DINO signal.
  (The 141-step run's image Pearson, 0.523 against 0.508 for random init on the evaluation patients,
  is the one probe result seen before the recipe was fixed.)
- teacher momentum 0.99 (0.996 barely moves the teacher in a few hundred steps), teacher temperature
  warmed 0.04 → 0.07, warm-up and prototype freezing a fraction of the run (not 2 steps), peak lr by
  DINO's rule (1e-3 at batch 256, square-root scaled), batch 32, 2 local crops, no layer decay from scratch.
- fusion stage: lower lr (5e-4) with layer decay 0.9, fresh heads, modality dropout (30 % image-only
  student views), masked-expression weight 0.1.
Steps (150 image-only, 100 fusion) are what fits the CPU budget, not a tuned value; the fusion model
has therefore seen 100 more steps than the FM (no image-only continuation of equal length is run).

    python benchmarks/claims.py                      # → out/claims/, prints the table
    python benchmarks/claims.py --seeds 0 --steps-image 40 --steps-fusion 20   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
IMAGE_CONFIG = ROOT / "configs" / "train" / "claims_image.yaml"
FUSION_CONFIG = ROOT / "configs" / "train" / "claims_fusion.yaml"
COHORT_SEED = 3
N_SAMPLES = 8  # Visium SR1/SR2 replicates, one patient each
PRETRAIN_PATIENTS = {f"P{i:02d}" for i in range(1, 5)}
TILE = {"mpp": 1.0, "tile_px": 64}  # 64 µm tiles: a Visium spot (55 µm) and its rim
TARGETS_PER_PROGRAM = 6
GROUPS = ("region", "crowding", "hidden", "housekeeping")


def log(msg: str) -> None:
    print(f"[claims {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- data


def make_data(out: Path, workers: int) -> dict[str, Path]:
    """The cohort and three shard sets: pretraining image-only (grid), pretraining fused (spots), evaluation."""
    from histotx.sharding.config import ShardConfig
    from histotx.sharding.pipeline import run_cohort
    from histotx.synth import generate_cohort

    cohort_dir = out / "cohort"
    cohort = cohort_dir / "cohort.yaml"
    if not cohort.is_file():
        generate_cohort(
            cohort_dir,
            seed=COHORT_SEED,
            size="bench",
            technologies=("visium", "visium_sr2"),
            replicates=N_SAMPLES // 2,
            patients=N_SAMPLES,
        )
    entries = yaml.safe_load(cohort.read_text())["samples"]
    pre = [e for e in entries if e["patient"] in PRETRAIN_PATIENTS]
    ev = [e for e in entries if e["patient"] not in PRETRAIN_PATIENTS]
    image_only = [
        {"id": e["id"], "patient": e["patient"], "technology": "image_only", "slide": e["slide"]} for e in pre
    ]
    sets = {"pretrain_image": (image_only, "grid"), "pretrain_fused": (pre, "spots"), "eval": (ev, "spots")}
    shards = {}
    for name, (samples, tiling) in sets.items():
        path = cohort_dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"samples": samples}, sort_keys=False))
        shards[name] = out / "shards" / name
        if not (shards[name] / "manifest.json").is_file():
            manifest = run_cohort(path, shards[name], ShardConfig(tiling=tiling, **TILE), workers=workers)
            if manifest["totals"]["samples_failed"]:
                raise RuntimeError(f"sharding {path} failed for some samples: see {shards[name]}/manifest.json")
        tiles = json.loads((shards[name] / "manifest.json").read_text())["totals"]["tiles"]
        log(f"{name}: {len(samples)} samples, {tiles} tiles → {shards[name]}")
    return shards


def claims_targets() -> tuple[list[str], dict[str, list[str]]]:
    """The first TARGETS_PER_PROGRAM genes of every program, and the targets by group."""
    from histotx.synth.genes import PROGRAMS, gene_groups

    targets = [sym for members in PROGRAMS.values() for sym, _ in members[:TARGETS_PER_PROGRAM]]
    groups = {g: [s for s in genes if s in set(targets)] for g, genes in gene_groups().items()}
    return targets, groups


def region_labels(out: Path, cohort_dir: Path, shard_dir: Path) -> Path:
    """tile key → region type at the tile centre (the spot), from the cohort's truth, as a labels CSV."""
    rows, truths = [], {}
    for tar_path in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if not member.name.endswith(".json"):
                    continue
                meta = json.loads(tar.extractfile(member).read())
                if meta["sample"] not in truths:
                    truths[meta["sample"]] = json.loads((cohort_dir / "truth" / f"{meta['sample']}.json").read_text())
                truth = truths[meta["sample"]]
                sites = np.asarray(truth["sites"]["xy_px"])
                half = meta["tile_px"] * meta["mpp"] / truth["mpp"] / 2
                centre = np.asarray(meta["origin_level0_px"]) + half
                nearest = int(np.argmin(((sites - centre) ** 2).sum(1)))
                rows.append((member.name[: -len(".json")], truth["regions"][truth["sites"]["region"][nearest]]))
    path = out / "region_labels.csv"
    pd.DataFrame(rows, columns=["key", "region"]).to_csv(path, index=False)
    return path


# ---------------------------------------------------------------- training


def train(config: Path, shards: Path, run: Path, seed: int, steps: int | None, port: int, extra: list[str]) -> Path:
    """One single-process training run (1 thread + 1 loader worker), skipped when already finished."""
    if (run / "checkpoints" / "latest").is_file():
        return run
    cmd = [
        sys.executable,
        "-m",
        "histotx.cli",
        "train",
        str(config),
        f"data.stream.shards={shards}",
        f"out={run}",
        f"seed={seed}",
        f"data.stream.seed={seed}",
        *([f"steps={steps}"] if steps else []),
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    t0 = time.monotonic()
    run.mkdir(parents=True, exist_ok=True)
    with open(run.parent / f"{run.name}.log", "w") as logfile:
        rc = subprocess.run(cmd, env=env, stdout=logfile, stderr=subprocess.STDOUT).returncode
    if rc:
        raise RuntimeError(f"training failed ({rc}): {' '.join(cmd)}; see {run.parent / f'{run.name}.log'}")
    log(f"trained {run.name} in {time.monotonic() - t0:.0f} s")
    return run


def pretrain(
    out: Path, shards: dict[str, Path], seeds: list[int], steps_image: int | None, steps_fusion: int | None, jobs: int
) -> dict[int, tuple[Path, Path]]:
    """Stage 1 (image-only FM) then stage 2 (fusion, from stage 1's export) for every seed, ``jobs`` at a time."""
    from histotx.export.write import export

    runs = out / "runs"

    def stage2(seed: int, first: Future) -> Path:
        fm = first.result()
        init = runs / f"fm_s{seed}_export"
        if not (init / "teacher.safetensors").is_file():
            export(fm, init, formats=(), overwrite=True)
        return train(
            FUSION_CONFIG,
            shards["pretrain_fused"],
            runs / f"histotx_s{seed}",
            seed,
            steps_fusion,
            29600 + 2 * seed + 1,
            [f"init.backbone={init}"],
        )

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        first = {
            s: pool.submit(
                train, IMAGE_CONFIG, shards["pretrain_image"], runs / f"fm_s{s}", s, steps_image, 29600 + 2 * s, []
            )
            for s in seeds
        }
        second = {s: pool.submit(stage2, s, first[s]) for s in seeds}
        return {s: (first[s].result(), second[s].result()) for s in seeds}


# ---------------------------------------------------------------- evaluation


def random_backbone(seed: int, shards: Path):
    """The architecture of the claims config with seeded random weights (what training starts from)."""
    import torch

    from histotx.config import load_config
    from histotx.export import LoadedModel
    from histotx.model import FusedViT
    from histotx.train.config import TrainConfig
    from histotx.vocab import Vocab

    cfg = load_config(TrainConfig, IMAGE_CONFIG, [])
    torch.manual_seed(seed)
    model = FusedViT(cfg.model_config()).eval()
    a = cfg.data.augment
    return LoadedModel(
        model,
        Vocab.load(shards / "vocab.tsv").symbols,
        TILE["mpp"],
        cfg.model_config().img_size,
        tuple(a.mean),
        tuple(a.std),
        f"random init (seed {seed})",
    )


def evaluate_all(out: Path, shards: Path, labels: Path, runs: dict[int, tuple[Path, Path]]) -> pd.DataFrame:
    """Embed the evaluation tiles with every model, run the protocol per seed, return one long table."""
    from histotx.eval import embed_shards, evaluate
    from histotx.export import load_model

    targets, groups = claims_targets()
    emb = out / "embeddings"
    tables = []
    for seed, (fm, fused) in runs.items():
        models = {
            f"random_s{seed}": (random_backbone(seed, shards), ("image", "fused", "transcripts")),
            f"fm_s{seed}": (load_model(fm), ("image",)),
            f"histotx_s{seed}": (load_model(fused), ("image", "fused", "transcripts")),
        }
        for name, (model, modes) in models.items():
            if not (emb / name).is_dir():
                embed_shards(model, shards, emb / name, modes=modes, drop_genes=targets, progress=False)
        for modes, names in (
            (["image"], list(models)),
            (["fused", "transcripts"], [f"random_s{seed}", f"histotx_s{seed}"]),
        ):
            t = evaluate(
                shards,
                embeddings={n: emb / n for n in names},
                modes=modes,
                out=out / "eval" / f"s{seed}_{modes[0]}",
                targets=targets,
                labels=labels,
                label="region",
                gene_groups=groups,
                progress=False,
                show=False,
            )
            t["seed"] = seed
            tables.append(t)
    return pd.concat(tables, ignore_index=True)


ROWS = [
    ("random init", "random", "image"),
    ("FM (image-only SSL)", "fm", "image"),
    ("HistoTx", "histotx", "image"),
    ("HistoTx", "histotx", "fused"),
    ("HistoTx", "histotx", "transcripts"),
    ("random init", "random", "fused"),
    ("random init", "random", "transcripts"),
]


def summarise(long: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd over seeds of each (model, mode)."""
    long = long.assign(kind=long["model"].str.replace(r"_s\d+$", "", regex=True))
    cols = ["pearson_mean"] + [f"pearson_{g}_mean" for g in GROUPS] + ["label_bal_acc_mean"]
    rows = []
    for label, kind, mode in ROWS:
        sub = long[(long["kind"] == kind) & (long["mode"] == mode)]
        row = {"model": label, "mode": mode, "seeds": len(sub)}
        for c in cols:
            name = c[len("pearson_") : -len("_mean")] if c.startswith("pearson_") and c != "pearson_mean" else c
            row[f"{name}"] = sub[c].mean()
            row[f"{name}_sd"] = sub[c].std(ddof=1) if len(sub) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def print_table(summary: pd.DataFrame, long: pd.DataFrame, header: str) -> None:
    print(header)
    names = [
        ("pearson_mean", "Pearson all"),
        *[(g, f"Pearson {g}") for g in GROUPS],
        ("label_bal_acc_mean", "region probe bal.acc"),
    ]
    widths = [22, 13] + [23] * len(names)
    line = "".join(h.ljust(w) for h, w in zip(["model", "mode", *[n for _, n in names]], widths, strict=True))
    print(line)
    print("-" * len(line))
    for _, r in summary.iterrows():
        cells = [r["model"], r["mode"]] + [f"{r[c]:.3f} ± {r[c + '_sd']:.3f}" for c, _ in names]
        print("".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)))
    print(
        f"mean ± sd over {int(summary['seeds'].max())} seeds (sd: sample sd, ddof=1, of the per-seed means over "
        "leave-one-patient-out folds)"
    )
    # The margins the claims and the issue ask about, per seed then over seeds.
    wide = long.assign(kind=long["model"].str.replace(r"_s\d+$", "", regex=True)).pivot_table(
        index="seed", columns=["kind", "mode"], values="pearson_mean"
    )
    region = long.assign(kind=long["model"].str.replace(r"_s\d+$", "", regex=True)).pivot_table(
        index="seed", columns=["kind", "mode"], values="pearson_region_mean"
    )

    def diff(table, a, b, what):
        d = table[a] - table[b]
        sd = d.std(ddof=1) if len(d) > 1 else float("nan")
        return f"{what}: {d.mean():+.3f} ± {sd:.3f} (per seed {', '.join(f'{v:+.3f}' for v in d)})"

    print(diff(wide, ("fm", "image"), ("random", "image"), "FM image − random init, Pearson all"))
    print(diff(region, ("fm", "image"), ("random", "image"), "FM image − random init, Pearson region"))
    print(diff(wide, ("histotx", "image"), ("fm", "image"), "claim (a) HistoTx image − FM image, Pearson all"))
    print(diff(wide, ("histotx", "fused"), ("histotx", "image"), "claim (b) fused − image"))
    print(diff(wide, ("histotx", "fused"), ("histotx", "transcripts"), "claim (b) fused − transcripts"))
    print(diff(wide, ("histotx", "fused"), ("random", "fused"), "HistoTx fused − random-init fused"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/claims"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps-image", type=int, default=None, help="override claims_image.yaml's steps")
    p.add_argument("--steps-fusion", type=int, default=None, help="override claims_fusion.yaml's steps")
    p.add_argument("--jobs", type=int, default=2, help="training runs at once (1 thread + 1 loader worker each)")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.monotonic()
    out = args.out.resolve()
    shards = make_data(out, workers=args.jobs)
    labels = region_labels(out, out / "cohort", shards["eval"])
    log(f"data ready in {time.monotonic() - t0:.0f} s")
    runs = pretrain(out, shards, args.seeds, args.steps_image, args.steps_fusion, args.jobs)
    log(f"pretraining done at {time.monotonic() - t0:.0f} s")
    long = evaluate_all(out, shards["eval"], labels, runs)
    summary = summarise(long)
    long.to_csv(out / "claims_per_seed.csv", index=False)
    summary.to_csv(out / "claims.csv", index=False)
    targets, groups = claims_targets()
    header = (
        f"HistoTx claims on the synthetic bench cohort (seed {COHORT_SEED}): pretraining on 4 patients, "
        f"evaluation on 4 others, leave-one-patient-out; {len(targets)} targets "
        f"({', '.join(f'{g} {len(v)}' for g, v in groups.items())}), all removed from the transcript input"
    )
    print_table(summary, long, header)
    log(f"total {time.monotonic() - t0:.0f} s; per seed: {out / 'claims_per_seed.csv'}, summary: {out / 'claims.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
