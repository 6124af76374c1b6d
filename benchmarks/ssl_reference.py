"""Does HistoTx's SSL teach the backbone anything? A reference comparison at CPU scale (issue 21).

On the synthetic claims cohort (benchmarks/claims.py: pretraining patients P01-P04, test patients P05-P08, expression
driven by region type and crowding, both seen only through morphology), with the claims backbone (ViT 64 wide,
2 blocks, 64 px tiles at 1 µm/px), every arm sees the same tiles, views, batch and steps:

- ``histotx``: HistoTx's trainer (``histotx train configs/train/claims_image.yaml`` + the recipe under test), image
  only on the pretraining patients' grid tiles;
- ``lightly``: a DINO loop built from lightly's own parts (DINOProjectionHead, centred DINOLoss with its teacher
  temperature warm-up, update_momentum), on the same backbone and HistoTx's own loader (same views, batch, lr,
  weight decay and momentum schedules);
- ``supervised``: the same backbone regressing the pretraining patients' expression (the upper bound a label-free
  objective can hope to approach);
- ``random``: the seeded random init every arm starts from; ``morphology``: handcrafted nucleus/texture features.

With ``--init fm`` both SSL arms continue the stand-in foundation model instead (region-supervised on the
pretraining patients' tiles: benchmarks/ssl_kit.make_standin_fm) and the FM itself is a row.

Probe: image-only CLS of whole spot tiles → HEST-Bench ridge (StandardScaler → PCA-256 → Ridge), leave one patient
out, Pearson on the 42 claims targets (and the region and crowding groups: the image-visible genes). Student and
teacher of both SSL arms. ``--split val`` (default) scores on the pretraining patients (the recipe is chosen there);
``--split test`` on the test patients, once the recipe is fixed. The DINO-vs-shuffled gap (the DINO loss with each
student crop paired with another tile's teacher, minus the real one, over the last 20 % of steps) says whether the
DINO term carried information about the tile. Every arm's result is appended to benchmarks/ssl_results.jsonl.

    python benchmarks/ssl_reference.py                           # 3 seeds, validation split
    python benchmarks/ssl_reference.py --split test              # once the recipe is fixed
    python benchmarks/ssl_reference.py --table --split test      # the table again, from ssl_results.jsonl
    python benchmarks/ssl_reference.py --init fm --seeds 0 --steps 60 --arms histotx lightly
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import claims  # noqa: E402
import ssl_kit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "ssl_results.jsonl"
# The recipe under test, on top of claims_image.yaml: attempt rB of benchmarks/ssl_results.md, chosen on the
# validation split (KoLeo off at 32 tiles a rank, teacher momentum sized to the run, teacher temperature held at 0.04).
RECIPE = [
    "ssl.loss.koleo_weight=0",
    "ssl.schedule.teacher_init_kept=0.01",
    "ssl.schedule.teacher_temp=0.04",
]
ARMS = ("random", "morphology", "supervised", "fm", "histotx", "lightly")


def log(msg: str) -> None:
    print(f"[ssl_reference {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def record(entry: dict) -> None:
    with open(RESULTS, "a") as f:
        f.write(json.dumps(entry) + "\n")


def _gap(metrics: Path, tail: float = 0.2) -> dict[str, float]:
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    rows = [r for r in rows if "dino" in r]
    last = rows[-max(1, int(len(rows) * tail)) :]
    out = {k: float(np.mean([r[k] for r in last])) for k in ("dino", "dino_shuffled", "teacher/entropy")}
    out["control_gap"] = out["dino_shuffled"] - out["dino"]
    out["prototypes_used"] = float(np.mean([r["teacher/prototypes_used"] for r in last]))
    return out


# ---------------------------------------------------------------- the arms


def run_histotx(out: Path, shards: Path, seed: int, steps: int, init: Path | None, recipe: list[str]) -> Path:
    run = out / f"histotx_s{seed}"
    if (run / "checkpoints" / "latest").is_file():
        return run
    cmd = [
        sys.executable,
        "-m",
        "histotx.cli",
        "train",
        str(claims.IMAGE_CONFIG),
        f"data.stream.shards={shards}",
        f"out={run}",
        f"seed={seed}",
        f"data.stream.seed={seed}",
        f"steps={steps}",
        "log.every_steps=5",
        "data.stream.num_workers=1",
        *([f"init.backbone={init}"] if init else []),
        *recipe,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(out / f"histotx_s{seed}.log", "w") as logfile:
        rc = subprocess.run(cmd, env=env, stdout=logfile, stderr=subprocess.STDOUT).returncode
    if rc:
        raise RuntimeError(f"histotx train failed ({rc}); see {out / f'histotx_s{seed}.log'}")
    return run


def run_lightly(out: Path, shards: Path, seed: int, steps: int, init: Path | None, recipe: list[str]):
    """lightly's DINO on the claims backbone, fed by HistoTx's loader; returns (student, teacher, gap stats)."""
    import torch
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import update_momentum

    from histotx.config import load_config
    from histotx.data.device_decode import BatchDecoder
    from histotx.data.loader import build_loader
    from histotx.model import FusedViT
    from histotx.ssl.schedules import SSLSchedules
    from histotx.train.config import TrainConfig

    overrides = [f"data.stream.shards={shards}", f"seed={seed}", f"data.stream.seed={seed}", f"steps={steps}"]
    cfg = load_config(TrainConfig, claims.IMAGE_CONFIG, overrides + [r for r in recipe if r.startswith("ssl.sched")])
    h = cfg.ssl.head
    s = cfg.ssl.schedule

    def network() -> torch.nn.ModuleDict:
        head = DINOProjectionHead(
            cfg.model_config().embed_dim,
            h.hidden_dim,
            h.bottleneck_dim,
            h.out_dim,
            freeze_last_layer=s.freeze_last_layer_steps,
        )
        return torch.nn.ModuleDict({"backbone": FusedViT(cfg.model_config()), "head": head})

    torch.manual_seed(seed)
    student = network()
    if init is not None:
        from histotx.model.pretrained import init_from_pretrained

        init_from_pretrained(student["backbone"], init)
    head = student["head"]
    teacher = network().eval()  # lightly's head is weight-normed the old way: no deepcopy
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    criterion = DINOLoss(
        output_dim=h.out_dim,
        warmup_teacher_temp=s.teacher_temp_warmup,
        teacher_temp=s.teacher_temp,
        warmup_teacher_temp_epochs=s.teacher_temp_warmup_steps,
        student_temp=cfg.ssl.loss.student_temp,
        center_momentum=0.9,
    )
    batch_size = cfg.data.stream.batch_size
    sched = SSLSchedules(s, steps, batch_size)
    groups = []
    for part in ("backbone", "head"):
        params = [p for p in student[part].parameters() if p.requires_grad]
        groups += [
            {"params": [p for p in params if p.ndim > 1], "wd": 1.0, "part": part},
            {"params": [p for p in params if p.ndim <= 1], "wd": 0.0, "part": part},
        ]
    opt = torch.optim.AdamW(groups, lr=0.0)
    loader = iter(build_loader(cfg.data, 0, 1))
    decoder = BatchDecoder(cfg.data.augment, torch.device("cpu"))
    trace = []
    for step in range(steps):
        v = sched(step)
        for g in opt.param_groups:  # the head trains during a head warm-up, the backbone waits
            g["lr"] = v.backbone_lr if g["part"] == "backbone" else v.lr
            g["weight_decay"] = v.weight_decay * g["wd"]
        batch = decoder(next(loader))
        b = batch.batch_size
        glob, loc = batch.global_images, batch.local_images
        with torch.no_grad():
            t_out = teacher["head"](teacher["backbone"](images=glob).cls).chunk(2)
        s_glob = student["head"](student["backbone"](images=glob).cls).chunk(2)
        s_loc = student["head"](student["backbone"](images=loc).cls).chunk(loc.shape[0] // b) if loc.shape[0] else ()
        s_out = [*s_glob, *s_loc]
        with torch.no_grad():  # the negative control, before the loss moves lightly's centre
            t_rolled = [t.roll(1, dims=0) for t in t_out]
            centre = criterion.center.clone()
            shuffled = float(criterion(t_rolled, [x.detach() for x in s_out], epoch=step))
            criterion.center.copy_(centre)
        loss = criterion(list(t_out), s_out, epoch=step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        head.cancel_last_layer_gradients(step)
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.clip_grad)
        opt.step()
        update_momentum(student, teacher, v.momentum)
        with torch.no_grad():
            warm = step < criterion.warmup_teacher_temp_epochs
            temp = float(criterion.teacher_temp_schedule[step]) if warm else criterion.teacher_temp
            p = torch.softmax((torch.cat(t_out) - centre) / temp, -1)
            entropy = float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())
            used = int(p.argmax(-1).unique().numel())
        trace.append(
            {
                "step": step + 1,
                "dino": float(loss.detach()),
                "dino_shuffled": shuffled,
                "entropy": entropy,
                "used": used,
            }
        )
    with open(out / f"lightly_s{seed}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in trace)
    last = trace[-max(1, steps // 5) :]
    stats = {
        "dino": float(np.mean([r["dino"] for r in last])),
        "dino_shuffled": float(np.mean([r["dino_shuffled"] for r in last])),
        "teacher/entropy": float(np.mean([r["entropy"] for r in last])),
        "prototypes_used": float(np.mean([r["used"] for r in last])),
    }
    stats["control_gap"] = stats["dino_shuffled"] - stats["dino"]
    return student["backbone"].eval(), teacher["backbone"].eval(), stats


# ---------------------------------------------------------------- driver


def run_seed(seed: int, args, shards: dict, pre, evaluated, out: Path, recipe: list[str], add) -> None:
    """Every arm of one seed (each scored and recorded by ``add``)."""
    import torch

    from histotx.export import load_model

    _, cfg = ssl_kit.model_from_config(claims.IMAGE_CONFIG, seed)
    mean, std = cfg.data.augment.mean, cfg.data.augment.std
    vocab = shards["pretrain_fused"] / "vocab.tsv"
    fm = None
    if args.init == "fm" or "fm" in args.arms:
        fm, _ = ssl_kit.make_standin_fm(
            args.out.resolve() / f"standin_fm_s{seed}", pre, claims.IMAGE_CONFIG, vocab, seed
        )
    init = fm if args.init == "fm" else None
    if "random" in args.arms:
        backbone, _ = ssl_kit.model_from_config(claims.IMAGE_CONFIG, seed)
        add("random", seed, ssl_kit.embed_images(backbone, evaluated.images, mean, std))
    if "fm" in args.arms:
        m = load_model(fm)
        add("fm", seed, ssl_kit.embed_images(m.model, evaluated.images, m.mean, m.std))
    if "supervised" in args.arms:
        backbone, _ = ssl_kit.model_from_config(claims.IMAGE_CONFIG, seed)
        torch.manual_seed(seed)
        ssl_kit.train_supervised(backbone, pre.images, pre.Y, mean, std, args.supervised_steps, seed)
        add("supervised", seed, ssl_kit.embed_images(backbone, evaluated.images, mean, std))
    if "histotx" in args.arms:
        t0 = time.monotonic()
        run = run_histotx(out, shards["pretrain_image"], seed, args.steps, init, recipe)
        gap = _gap(run / "metrics.jsonl")
        for which in ("student", "teacher"):
            m = load_model(run, which=which)
            add(f"histotx_{which}", seed, ssl_kit.embed_images(m.model, evaluated.images, m.mean, m.std), gap)
        log(f"histotx s{seed}: {time.monotonic() - t0:.0f} s")
    if "lightly" in args.arms:
        t0 = time.monotonic()
        student, teacher, gap = run_lightly(out, shards["pretrain_image"], seed, args.steps, init, recipe)
        for which, net in (("student", student), ("teacher", teacher)):
            add(f"lightly_{which}", seed, ssl_kit.embed_images(net, evaluated.images, mean, std), gap)
        log(f"lightly s{seed}: {time.monotonic() - t0:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/ssl_reference"))
    p.add_argument("--claims-out", type=Path, default=Path("out/claims"), help="claims.py's data folder (reused)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--init", choices=("random", "fm"), default="random")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--recipe", nargs="*", default=None, help="overrides replacing RECIPE (the attempt's config diff)")
    p.add_argument("--tag", default="", help="a name for this attempt in the results file")
    p.add_argument("--supervised-steps", type=int, default=300)
    p.add_argument(
        "--table", action="store_true", help="only print the table of this init/split/tag from the results file"
    )
    args = p.parse_args(argv)
    if args.table:
        rows = [json.loads(x) for x in RESULTS.read_text().splitlines()] if RESULTS.is_file() else []
        table: dict[str, list[dict]] = {}
        for r in rows:
            if (r["init"], r["split"], r["tag"], r["steps"]) == (args.init, args.split, args.tag, args.steps):
                if r["seed"] is None or r["seed"] in args.seeds:
                    table.setdefault(r["arm"], []).append(r)
        print_table(table, args)
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    recipe = RECIPE if args.recipe is None else args.recipe
    data = args.claims_out.resolve()
    shards = claims.make_data(data, workers=1)
    targets, groups = claims.claims_targets()
    groups = {g: v for g, v in groups.items() if g in ("region", "crowding")}
    pre = ssl_kit.read_tiles(shards["pretrain_fused"], data / "cohort", targets, data / "tiles_pretrain_fused.npz")
    evaluated = (
        pre
        if args.split == "val"
        else ssl_kit.read_tiles(shards["eval"], data / "cohort", targets, data / "tiles_eval.npz")
    )
    out = (args.out / f"{args.init}_{args.tag or 'run'}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = {"split": args.split, "init": args.init, "steps": args.steps, "recipe": recipe, "tag": args.tag}
    table: dict[str, list[dict]] = {}

    def add(arm: str, seed: int | None, X: np.ndarray, extra: dict | None = None) -> None:
        res = {**base, "arm": arm, "seed": seed, **ssl_kit.score(X, evaluated, groups), **(extra or {})}
        record(res)
        table.setdefault(arm, []).append(res)
        log(
            f"{arm} s{seed}: Pearson {res['pearson_fold']:.3f} (concat {res['pearson_concat']:.3f}), "
            f"region {res['region_fold']:.3f}, crowding {res['crowding_fold']:.3f}, "
            f"region acc {res['region_bal_acc']:.3f}"
            + (
                f", control gap {extra['control_gap']:+.4f}, entropy {extra['teacher/entropy']:.3f}"
                if extra and "control_gap" in extra
                else ""
            )
        )

    if "morphology" in args.arms:
        cache = data / f"morphology_{args.split}.npy"
        if not cache.is_file():
            np.save(cache, ssl_kit.morphology_features(evaluated.images))
        add("morphology", None, np.load(cache))
    for seed in args.seeds:
        run_seed(seed, args, shards, pre, evaluated, out, recipe, add)
    print_table(table, args)
    return 0


def print_table(table: dict[str, list[dict]], args) -> None:
    cols = [
        ("pearson_fold", "Pearson (fold mean)"),
        ("pearson_concat", "Pearson (concat)"),
        ("region_fold", "region genes"),
        ("crowding_fold", "crowding genes"),
        ("region_bal_acc", "region bal.acc"),
    ]
    print(
        f"\nssl_reference: init {args.init}, {args.steps} steps, split {args.split} "
        f"({'pretraining patients P01-P04' if args.split == 'val' else 'test patients P05-P08'}, leave-one-patient-out)"
    )
    head = "arm".ljust(20) + "".join(n.ljust(22) for _, n in cols) + "DINO-vs-shuffled gap"
    print(head)
    print("-" * len(head))
    for arm, rows in table.items():
        cells = []
        for c, _ in cols:
            v = np.array([r[c] for r in rows])
            cells.append(f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}")
        gap = ""
        if "control_gap" in rows[0]:
            g = np.array([r["control_gap"] for r in rows])
            gap = f"{g.mean():+.4f} ± {g.std(ddof=1):.4f}" if len(g) > 1 else f"{g.mean():+.4f}"
        print(arm.ljust(20) + "".join(c.ljust(22) for c in cells) + gap)
    print(f"mean ± sd (ddof 1) over seeds {args.seeds}; every row also in {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
