"""The two claims of HistoTx, measured on a synthetic cohort whose truth is known (CPU, 2 cores).

Claims: (a) the image encoder after fusion pretraining predicts expression from the image alone at
least as well as the image-only foundation model it started from; (b) image + transcripts (fused)
beat either modality alone.

The cohort (``histotx.synth``, size ``bench``, 1 µm/px): 8 Visium samples, each its own patient.
Expression follows region type (seen only through nuclear density, size, shape and texture: the mean
colour is the same everywhere), local crowding (seen as how packed the nuclei are) and a hidden state
(never drawn). Patients P01-P04 are for pretraining, P05-P08 for evaluation only (never seen in any
pretraining), evaluated leave-one-patient-out.

    1. FM:      the foundation model HistoTx continues. ``--fm standin`` (default): the claims backbone trained
                to classify the region type at the spot on the pretraining patients' tiles
                (benchmarks/ssl_kit.make_standin_fm). Why: HistoTx's setting is continuing an FM that already has
                morphological features, and at this size image-only SSL from random init does not learn them
                (benchmarks/ssl_results.md: the DINO term's gap to its shuffled control stays ~0); tissue types are
                what pathology FMs are known to separate. ``--fm ssl``: the earlier stand-in, image-only DINOv2
                SSL from random init (configs/train/claims_image.yaml).
    2. HistoTx: the FM continued with fusion pretraining (configs/train/claims_fusion.yaml, with a head
                warm-up: ``--head-warmup`` steps at backbone lr 0) on spot tiles with their transcripts;
    3. control: the FM continued for the *same steps with the same recipe on the same spot tiles*, transcripts
                stripped (``pretrain_spots_image``): claim (a) compares with this, not with the shorter FM;
    4. eval:    every model embedded on the evaluation patients' spot tiles (image; fused/transcripts with the
                target genes removed from the input), then the HEST-Bench ridge probe (StandardScaler → PCA-256 →
                Ridge, leave-one-patient-out) scored both ways HEST users compare: the mean over folds of the
                per-fold Pearson (HEST-Bench's) and the Pearson of the concatenated out-of-fold predictions, with
                PCA-256 on and off; region and crowding gene groups; and the region-type linear probe (the
                pure-image task transcripts cannot help with).

Targets are fixed before anything is measured: half of every gene program (the first six genes of
each), so the transcript input keeps the other half (the leakage guard drops every target gene) and
fused/transcripts inputs carry the hidden state through the hypoxia genes left in. Every margin is
computed per seed, then mean ± sd over seeds; each claim is printed as SHOWN or NOT SHOWN by a stated rule.

Recipe of stages 2-3: claims_fusion.yaml (300 steps, lr 1e-3 at batch 256, sqrt rule; layer decay 0.9; Sinkhorn;
attempt D of benchmarks/ssl_results.md, chosen on the validation split after the first recipe's test table had
been seen: 100 steps at 5e-4 left the FM unchanged, so that table is kept beside this one) + FUSION_RECIPE
(KoLeo off: 32 tiles per rank; teacher momentum sized so the teacher keeps 1 % of its initial weights;
teacher temperature held at 0.04, which kept the DINO control gap at +0.04-0.07 where warming it to 0.07
let it decay to +0.02) + a 20-step head warm-up. Re-examined on the validation split against transcript-side changes
(more transcripts-only student views, masked-expression weight 1, the CLS expression term): none beat D by the rule
stated beforehand, so D was fixed (ssl_results.md, "Claim (b)") and run once on the test patients with fresh seeds:

    python benchmarks/claims.py --split test --seeds 3 4 5     # the clean test run of the fixed recipe

Its result (3 seeds, looked at once): (a) HistoTx image − control image −0.004 ± 0.012, "not worse" SHOWN, not
better; (b) fused − transcripts −0.002 ± 0.016 and fused − control image +0.011 ± 0.019: NOT SHOWN. Whether the fused
CLS reads the one transcript token of a spot tile varies by seed (benchmarks/fusion_use.py; ssl_results.md).

A longer stage 2 (L600: D with ``--steps-fusion 600``; both stage-2 runs get the steps, so the control stays equal
length) was pre-registered, adopted on val by the same rule and run once on fresh seeds 6-8 on the test patients:
fused − transcripts +0.002 ± 0.015, fused − control image +0.016 ± 0.021: NOT SHOWN either (ssl_results.md).

    python benchmarks/claims.py --split test --seeds 6 7 8 --steps-fusion 600 --tag _L600

    python benchmarks/claims.py                      # → out/claims/, prints the table
    python benchmarks/claims.py --seeds 0 --steps-fusion 20   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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
    shards["pretrain_spots_image"] = strip_transcripts(
        shards["pretrain_fused"], out / "shards" / "pretrain_spots_image"
    )
    return shards


def strip_transcripts(src: Path, dst: Path) -> Path:
    """The same tiles as ``src`` with every transcript grid emptied: the equal-length control's input (the same
    spot tiles as the fusion run, no transcripts)."""
    import hashlib

    import webdataset as wds

    from histotx.data.stream import LoaderStats, read_shard
    from histotx.format import TileSample, TranscriptGrid, decode_sample, encode_sample, read_manifest, write_manifest

    if (dst / "manifest.json").is_file():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(src)
    shards = []
    for entry in manifest["shards"]:
        path = dst / entry["name"]
        with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
            for raw in read_shard(str(src / entry["name"]), LoaderStats()):
                tile = decode_sample(raw)
                grid = TranscriptGrid.empty(tile.grid.footprint_um, tile.grid.footprint_shape)
                meta = {**tile.meta, "n_sites": 0, "n_genes": 0, "total_count": 0.0}
                sink.write(encode_sample(TileSample(tile.key, tile.image, tile.image_ext, grid, meta)))
        data = path.read_bytes()
        shards.append({**entry, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    (dst / "vocab.tsv").write_bytes((src / "vocab.tsv").read_bytes())
    write_manifest(dst, {**manifest, "shards": shards})
    return dst


def claims_targets() -> tuple[list[str], dict[str, list[str]]]:
    """The first TARGETS_PER_PROGRAM genes of every program, and the targets by group."""
    from histotx.synth.genes import PROGRAMS, gene_groups

    targets = [sym for members in PROGRAMS.values() for sym, _ in members[:TARGETS_PER_PROGRAM]]
    groups = {g: [s for s in genes if s in set(targets)] for g, genes in gene_groups().items()}
    return targets, groups


def region_labels(out: Path, cohort_dir: Path, shard_dir: Path) -> Path:
    """tile key → region type at the tile centre (the spot), from the cohort's truth, as a labels CSV."""
    from histotx.shard_reader import read_shard_file

    rows, truths = [], {}
    for tar_path in sorted(shard_dir.glob("*.tar")):
        for members in read_shard_file(tar_path):
            meta = json.loads(members["json"])
            if meta["sample"] not in truths:
                truths[meta["sample"]] = json.loads((cohort_dir / "truth" / f"{meta['sample']}.json").read_text())
            truth = truths[meta["sample"]]
            sites = np.asarray(truth["sites"]["xy_px"])
            half = meta["tile_px"] * meta["mpp"] / truth["mpp"] / 2
            centre = np.asarray(meta["origin_level0_px"]) + half
            nearest = int(np.argmin(((sites - centre) ** 2).sum(1)))
            rows.append((members["__key__"], truth["regions"][truth["sites"]["region"][nearest]]))
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


# Chosen on the validation split (the pretraining patients' kNN probe and the DINO control gap; attempts C-w20,
# C-w0 and C-w20-t04 in benchmarks/ssl_results.md) before the test patients were looked at.
FUSION_RECIPE = ["ssl.loss.koleo_weight=0", "ssl.schedule.teacher_init_kept=0.01", "ssl.schedule.teacher_temp=0.04"]


def pretrain(
    out: Path,
    shards: dict[str, Path],
    seeds: list[int],
    steps_image: int | None,
    steps_fusion: int | None,
    jobs: int,
    fm_kind: str,
    head_warmup: int,
    tag: str = "",
    overrides: list[str] | None = None,
) -> dict[int, dict[str, Path]]:
    """Per seed: the FM (stage 1), then from its export, for the same steps and recipe, HistoTx fusion
    pretraining on the spot tiles with their transcripts and the control: the same tiles, transcripts stripped."""
    import ssl_kit

    from histotx.export.write import export

    runs = out / "runs"
    stage2 = out / f"runs{tag}"  # the FM is shared; an attempt's stage-2 runs get their own folder
    targets, _ = claims_targets()
    extra = [*FUSION_RECIPE, f"ssl.schedule.head_warmup_steps={head_warmup}", *(overrides or [])]

    def fm_of(seed: int) -> Path:
        if fm_kind == "standin":
            pre = ssl_kit.read_tiles(
                shards["pretrain_fused"], out / "cohort", targets, out / "tiles_pretrain_fused.npz"
            )
            fm, _ = ssl_kit.make_standin_fm(
                runs / f"fm_s{seed}_export", pre, IMAGE_CONFIG, shards["pretrain_fused"] / "vocab.tsv", seed
            )
            return fm
        run = train(
            IMAGE_CONFIG, shards["pretrain_image"], runs / f"fm_s{seed}", seed, steps_image, 29600 + 3 * seed, []
        )
        init = runs / f"fm_s{seed}_export"
        if not (init / "teacher.safetensors").is_file():
            export(run, init, formats=(), overwrite=True)
        return init

    fms = {s: fm_of(s) for s in seeds}  # one at a time: the stand-in FM trains in this process
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        fused = {
            s: pool.submit(
                train,
                FUSION_CONFIG,
                shards["pretrain_fused"],
                stage2 / f"histotx_s{s}",
                s,
                steps_fusion,
                29600 + 3 * s + 1,
                [f"init.backbone={fms[s]}", *extra],
            )
            for s in seeds
        }
        control = {
            s: pool.submit(
                train,
                FUSION_CONFIG,
                shards["pretrain_spots_image"],
                stage2 / f"control_s{s}",
                s,
                steps_fusion,
                29600 + 3 * s + 2,
                [f"init.backbone={fms[s]}", *extra],
            )
            for s in seeds
        }
        return {s: {"fm": fms[s], "histotx": fused[s].result(), "control": control[s].result()} for s in seeds}


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


# (name, modes): every model of a seed and what it is embedded with
MODELS = {
    "random": ("image", "fused", "transcripts"),
    "fm": ("image",),
    "control": ("image",),
    "histotx": ("image", "fused", "transcripts"),
}


def evaluate_all(out: Path, shards: Path, runs: dict[int, dict[str, Path]], name: str = "eval") -> pd.DataFrame:
    """Embed the evaluation tiles with every model × mode, then score each with the HEST-Bench ridge both ways
    (fold-mean and concatenated Pearson), PCA-256 on and off; one row per seed × model × mode × PCA."""
    import ssl_kit

    from histotx.eval import embed_shards
    from histotx.eval.run import read_embeddings
    from histotx.export import load_model

    targets, groups = claims_targets()
    tiles = ssl_kit.read_tiles(shards, out / "cohort", targets, out / f"tiles_{shards.name}.npz")
    samples = list(dict.fromkeys(tiles.samples))
    keys = {s: [k for k, t in zip(tiles.keys, tiles.samples, strict=True) if t == s] for s in samples}
    emb = out / f"embeddings_{name}"
    X: dict[tuple[int, str, str], np.ndarray] = {}
    for seed, paths in runs.items():
        for model_name, modes in MODELS.items():
            folder = emb / f"{model_name}_s{seed}"
            if not folder.is_dir():
                model = random_backbone(seed, shards) if model_name == "random" else load_model(paths[model_name])
                embed_shards(model, shards, folder, modes=modes, drop_genes=targets, progress=False)
            per_mode, _ = read_embeddings(folder, samples, keys, modes, targets)
            X.update({(seed, model_name, m): v for m, v in per_mode.items()})
    finite = np.all([np.isfinite(x).all(axis=1) for x in X.values()], axis=0)
    if not finite.all():
        log(f"{(~finite).sum()} of {finite.size} tiles have no transcript token once the targets are dropped: left out")
    sub = ssl_kit.TileSet(
        tiles.images[finite],
        [k for k, f in zip(tiles.keys, finite, strict=True) if f],
        tiles.samples[finite],
        tiles.patients[finite],
        tiles.Y[finite],
        tiles.targets,
        tiles.region[finite],
    )
    rows = []
    for (seed, model_name, mode), x in X.items():
        for pca in (True, False):
            res = ssl_kit.score(x[finite], sub, groups, pca=pca, region_probe=pca)
            rows.append({"seed": int(seed), "model": model_name, "mode": mode, "pca": pca, **res})
    return pd.DataFrame(rows)


ROWS = [
    ("random init", "random", "image"),
    ("FM", "fm", "image"),
    ("control: FM + image-only SSL", "control", "image"),
    ("HistoTx", "histotx", "image"),
    ("HistoTx", "histotx", "fused"),
    ("HistoTx", "histotx", "transcripts"),
    ("random init", "random", "fused"),
    ("random init", "random", "transcripts"),
]
SCORES = [("pearson_fold", "fold-mean"), ("pearson_concat", "concatenated")]


def _pm(values: pd.Series) -> str:
    sd = values.std(ddof=1) if len(values) > 1 else float("nan")
    return f"{values.mean():.3f} ± {sd:.3f}"


def margin(long: pd.DataFrame, a: tuple[str, str], b: tuple[str, str], col: str, pca: bool = True) -> pd.Series:
    """Per seed: score of (model, mode) a minus that of b."""
    t = long[long["pca"] == pca].pivot_table(index="seed", columns=["model", "mode"], values=col)
    return t[a] - t[b]


def verdict(d: pd.Series, kind: str) -> str:
    """'better': positive in every seed and mean > 2 sd; 'not worse': mean > -1 sd (within the seed spread)."""
    if len(d) < 2:
        return "not decided (one seed: no spread)"
    mean, sd = d.mean(), d.std(ddof=1)
    if kind == "better":
        return "SHOWN" if (d > 0).all() and mean > 2 * sd else "NOT SHOWN"
    return "SHOWN" if mean > -sd else "NOT SHOWN"


def print_table(long: pd.DataFrame, header: str) -> None:
    print(header)
    seeds = sorted(int(s) for s in long["seed"].unique())
    cols = [
        *[(c, p, f"Pearson {n}{'' if p else ' (no PCA)'}") for p in (True, False) for c, n in SCORES],
        ("region_fold", True, "region genes"),
        ("crowding_fold", True, "crowding genes"),
        ("region_bal_acc", True, "region probe bal.acc"),
    ]
    widths = [30, 13] + [24] * len(cols)
    line = "".join(h.ljust(w) for h, w in zip(["model", "mode", *[n for *_, n in cols]], widths, strict=True))
    print(line)
    print("-" * len(line))
    for label, model, mode in ROWS:
        cells = [label, mode]
        for c, pca, _ in cols:
            sub = long[(long["model"] == model) & (long["mode"] == mode) & (long["pca"] == pca)]
            cells.append(_pm(sub[c]) if c in sub and len(sub) else "-")
        print("".join(str(x).ljust(w) for x, w in zip(cells, widths, strict=True)))
    print(f"mean ± sd over {len(seeds)} seeds {seeds} (sd: ddof 1, of the per-seed scores)")
    print()
    claims = [
        ("(a) HistoTx image − control image (equal length)", ("histotx", "image"), ("control", "image"), "not worse"),
        ("    HistoTx image − FM image", ("histotx", "image"), ("fm", "image"), "not worse"),
        ("(b) HistoTx fused − HistoTx transcripts", ("histotx", "fused"), ("histotx", "transcripts"), "better"),
        ("(b) HistoTx fused − control image", ("histotx", "fused"), ("control", "image"), "better"),
        ("(b) HistoTx fused − HistoTx image", ("histotx", "fused"), ("histotx", "image"), "better"),
        ("    HistoTx fused − random-init fused", ("histotx", "fused"), ("random", "fused"), "better"),
        ("    control image − FM image", ("control", "image"), ("fm", "image"), "better"),
        ("    FM image − random image", ("fm", "image"), ("random", "image"), "better"),
    ]
    for name, a, b, kind in claims:
        parts = []
        for col, sname in SCORES:
            for pca in (True, False):
                d = margin(long, a, b, col, pca)
                sd = d.std(ddof=1) if len(d) > 1 else float("nan")
                parts.append(f"{sname}{'' if pca else '/noPCA'} {d.mean():+.3f} ± {sd:.3f}")
        d = margin(long, a, b, "pearson_fold")
        print(f"{name}: {'; '.join(parts)} → {verdict(d, kind)} [rule: {kind}]")
    d = margin(long, ("histotx", "image"), ("control", "image"), "region_bal_acc")
    print(
        f"(a) pure-image task, region probe bal.acc HistoTx image − control image: {d.mean():+.3f} ± "
        f"{d.std(ddof=1) if len(d) > 1 else float('nan'):.3f} → {verdict(d, 'not worse')} [rule: not worse]"
    )
    print(
        "verdicts on the fold-mean Pearson with PCA-256 (HEST-Bench's own); 'better': > 0 in every seed and "
        "mean > 2 sd; 'not worse': mean > −1 sd"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/claims"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fm", choices=("standin", "ssl"), default="standin", help="stage 1: stand-in FM or image SSL")
    p.add_argument("--steps-image", type=int, default=None, help="override claims_image.yaml's steps (--fm ssl)")
    p.add_argument("--steps-fusion", type=int, default=None, help="override claims_fusion.yaml's steps")
    p.add_argument("--head-warmup", type=int, default=20, help="ssl.schedule.head_warmup_steps of stage 2")
    p.add_argument("--jobs", type=int, default=2, help="training runs at once (1 thread + 1 loader worker each)")
    p.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="test: the evaluation patients P05-P08; val: the pretraining patients' spot tiles (to choose a recipe)",
    )
    p.add_argument("--tag", default="", help="stage-2 runs go to runs<TAG>/ (an attempt with other settings)")
    p.add_argument("--set", nargs="*", default=[], help="extra overrides of both stage-2 runs (key=value)")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.monotonic()
    out = args.out.resolve()
    shards = make_data(out, workers=args.jobs)
    log(f"data ready in {time.monotonic() - t0:.0f} s")
    runs = pretrain(
        out,
        shards,
        args.seeds,
        args.steps_image,
        args.steps_fusion,
        args.jobs,
        args.fm,
        args.head_warmup,
        args.tag,
        args.set,
    )
    log(f"pretraining done at {time.monotonic() - t0:.0f} s")
    split = "eval" if args.split == "test" else "pretrain_fused"
    long = evaluate_all(out, shards[split], runs, f"{args.split}{args.tag}")
    csv = out / f"claims_per_seed_{args.split}{args.tag}.csv"
    long.to_csv(csv, index=False)
    targets, groups = claims_targets()
    header = (
        f"HistoTx claims on the synthetic bench cohort (seed {COHORT_SEED}): FM = {args.fm}; stage 2: "
        f"{args.steps_fusion or 'config'} steps {' '.join(args.set)}; pretraining on P01-P04, scored on "
        f"{'the evaluation patients P05-P08' if args.split == 'test' else 'the PRETRAINING patients (validation)'}, "
        f"leave-one-patient-out; {len(targets)} targets "
        f"({', '.join(f'{g} {len(v)}' for g, v in groups.items())}), all removed from the transcript input"
    )
    print_table(long, header)
    log(f"total {time.monotonic() - t0:.0f} s; per seed: {csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
