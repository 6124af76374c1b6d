"""`histotx embed` and `histotx eval`: argument parsing only.

The CLI builds every subcommand's parser at start, so this module imports nothing heavy (no torch,
sklearn or pandas); the handlers import :mod:`histotx.eval.embed` / :mod:`histotx.eval.run` when they run.
That keeps `histotx shard ...` torch-free and quick to start.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

from histotx.eval import DEFAULT_RESOLUTION_UM
from histotx.sharding.technologies import TECHNOLOGIES


def register_cli(subparsers) -> None:
    register_embed(subparsers)
    register_eval(subparsers)


# ---------------------------------------------------------------- `histotx embed`


CLI_DESCRIPTION = """\
Embed tiles with a trained model: one AnnData .h5ad per sample (obs = tiles with sample, patient,
level-0 px and µm origin; obsm[MODE] = whole-tile CLS embeddings; no X), spatial as scanpy/squidpy
read Visium: obsm["spatial"] = tile centres in level-0 px, uns["spatial"][SAMPLE] = a picture of the
slide made from its tiles with Visium scale factors (spot_diameter_fullres = the tile side),
uns["tile"] = tile size (px, µm/px, µm, level-0 px). Tiles without transcript tokens have a zero
obsm["transcripts"] row and obs["has_transcripts"] False: use adata[adata.obs.has_transcripts].

  # a shard set (made by `histotx shard`), every sample or some
  histotx embed --model runs/tiny --shards shards/ --out emb/ --modes image,transcripts,fused
  histotx embed --model export/ --shards shards/ --samples lung01,lung02 --out emb/

  # one slide, tiled exactly as `histotx shard run` would (same settings: --shard-config, key=value)
  histotx embed --model export/ --slide he.svs --out emb/
  histotx embed --model export/ --slide he.tif --data outs/ --technology visium --out emb/ mpp=0.5 tile_px=224
  histotx embed --model export/ --technology hest --data hest/ --sample-id TENX95 --out emb/

The model: a run folder (its latest checkpoint), a checkpoint folder, or an export (`histotx export`).
Each tile is shown whole (no crop, no augmentation), resized to the model's training input size and
normalised as in training; transcript tokens are binned at --resolution-um in that frame. Modes:
image (the image alone), transcripts (the tokens alone; zero rows, marked, for tiles without any), fused (both).
--drop-genes removes genes from the transcript input before binning (e.g. the targets of an
expression-prediction evaluation, so they cannot leak in); the .h5ad's uns records them.
bf16 autocast on a GPU, fp32 on CPU.
"""


def _names(text: str | None, file: Path | None) -> list[str]:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if file is not None:
        names += [
            line.strip() for line in Path(file).read_text().splitlines() if line.strip() and not line.startswith("#")
        ]
    return names


def register_embed(subparsers) -> None:
    p = subparsers.add_parser(
        "embed",
        help="embed a shard set or a slide with a trained model (→ .h5ad per sample)",
        description=CLI_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="run folder, checkpoint folder or export folder")
    p.add_argument("--out", type=Path, required=True, help="folder for <sample>.h5ad (created)")
    p.add_argument("--modes", default="image", help="comma-separated: image, transcripts, fused (default image)")
    p.add_argument("--drop-genes", help="comma-separated gene symbols removed from the transcript input")
    p.add_argument("--drop-genes-file", type=Path, help="a file of gene symbols to remove, one per line")
    p.add_argument(
        "--resolution-um",
        default=str(DEFAULT_RESOLUTION_UM),
        help="transcript token side in µm, or 'native' (one token per spot/bin/molecule); "
        f"default {DEFAULT_RESOLUTION_UM:g}, a size every shipped training config draws",
    )
    p.add_argument("--image-px", type=int, help="resize each tile to this side (default: the model's input size)")
    p.add_argument("--batch-size", type=int, default=64, help="tiles per forward pass (default 64)")
    p.add_argument(
        "--device", default="auto", help="auto (GPU when there is one), cpu, cuda, cuda:1, ... (default auto)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes that decode, resize and bin tiles (default 0: the main process; "
        "on a GPU use several, or the GPU waits for them)",
    )
    g = p.add_argument_group("a shard set")
    g.add_argument("--shards", type=Path, help="shard folder with manifest.json (made by `histotx shard`)")
    g.add_argument("--samples", help="comma-separated sample ids (default: all)")
    s = p.add_argument_group("a slide (sharded first, into a temporary folder, exactly as `histotx shard run`)")
    s.add_argument("--slide", type=Path, help="the H&E slide (SVS, pyramidal TIFF, OME-TIFF, ...)")
    s.add_argument("--data", type=Path, help="its Space Ranger outs/, Xenium bundle or HEST root")
    s.add_argument("--technology", help=f"{' | '.join(TECHNOLOGIES)} (default image_only without --data)")
    s.add_argument(
        "--sample-id",
        help="sample id (default: the sample's folder, the first above --data, or above a Space Ranger "
        "spatial/ image, that Space Ranger did not name; a slide on its own: its file name)",
    )
    s.add_argument("--patient", default="", help="patient id (default: the sample id)")
    s.add_argument("--mpp", type=float, help="µm/px of the slide's level 0, overriding its metadata")
    s.add_argument(
        "--image-scale",
        default="fullres",
        help="visium: which image --slide is (fullres|hires|lowres; default fullres)",
    )
    s.add_argument(
        "--bin-size-um", type=float, default=2.0, help="visium_hd: which binned output (2, 8, 16; default 2)"
    )
    s.add_argument("--alignment", type=Path, help="xenium: the *_he_imagealignment.csv (default: from the bundle)")
    s.add_argument("--shard-config", type=Path, help="shard settings YAML (e.g. a shard set's shard_config.yaml)")
    s.add_argument("--keep-shards", type=Path, help="write the slide's shards here and keep them")
    s.add_argument("overrides", nargs="*", help="key=value shard settings, e.g. mpp=0.5 tile_px=224")
    p.set_defaults(func=_run_embed)


def _run_embed(args) -> int:
    from histotx.config import load_config
    from histotx.eval.embed import embed_shards, embed_slide

    if bool(args.shards) == bool(args.slide or args.data):
        raise ValueError("give either --shards DIR or --slide FILE (with --data for Visium/Xenium/HEST data)")
    if args.shards and (args.overrides or args.shard_config):
        raise ValueError("shard settings (--shard-config, key=value) apply to --slide only")
    _check_inputs(args)
    t0 = time.time()
    kwargs = dict(
        modes=_names(args.modes, None),
        drop_genes=_names(args.drop_genes, args.drop_genes_file),
        batch_size=args.batch_size,
        device=args.device,
        image_px=args.image_px,
        num_workers=args.workers,
        resolution_um="native" if args.resolution_um == "native" else float(args.resolution_um),
    )
    if args.shards:
        samples = _names(args.samples, None) or None
        paths = embed_shards(args.model, args.shards, args.out, samples=samples, **kwargs)
    else:
        from histotx.sharding.config import ShardConfig

        cfg = load_config(ShardConfig, args.shard_config, args.overrides)
        paths = [
            embed_slide(
                args.model,
                args.slide,
                args.out,
                data=args.data,
                technology=args.technology,
                sample_id=args.sample_id,
                patient=args.patient,
                mpp=args.mpp,
                image_scale=args.image_scale,
                bin_size_um=args.bin_size_um,
                alignment=args.alignment,
                shard_config=cfg,
                shards_dir=args.keep_shards,
                **kwargs,
            )
        ]
    _summary(paths, time.time() - t0)
    return 0


def _check_inputs(args) -> None:
    """Each embed flag's value checked before any model is loaded; a message names the flag."""
    _check_paths(args)
    if args.slide or args.data:
        _check_slide_flags(args)
    if args.sample_id:
        from histotx.format import FormatError, check_sample_id

        try:
            check_sample_id(args.sample_id)
        except FormatError as exc:
            raise ValueError(f"--sample-id {args.sample_id}: {exc}") from None
    try:
        if args.resolution_um != "native" and not float(args.resolution_um) > 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"--resolution-um {args.resolution_um}: expected a size in µm > 0, or 'native'") from None


def _check_paths(args) -> None:
    for flag, path, kind in (
        ("--shards", args.shards, "folder"),
        ("--slide", args.slide, "file"),
        ("--data", args.data, None),
        ("--alignment", args.alignment, "file"),
        ("--shard-config", args.shard_config, "file"),
        ("--drop-genes-file", args.drop_genes_file, "file"),
    ):
        if path is not None and not Path(path).exists():
            raise ValueError(f"{flag} {path}: no such {kind or 'file or folder'}")
    if args.shards and not (Path(args.shards) / "manifest.json").is_file():
        raise ValueError(f"--shards {args.shards}: no manifest.json there (a folder made by `histotx shard run`)")


def _check_slide_flags(args) -> None:
    """--slide / --data / --technology and their options, as the technology registry defines them."""
    technology = args.technology or ("image_only" if args.data is None else None)
    if technology is None:
        raise ValueError(f"--data {args.data}: say which data it is with --technology ({' | '.join(TECHNOLOGIES)})")
    tech = TECHNOLOGIES.get(technology)
    if tech is None:
        raise ValueError(f"--technology {technology}: expected one of {', '.join(TECHNOLOGIES)}")
    if tech.reader is not None and args.data is None:
        raise ValueError(f"--technology {technology} needs --data ({tech.data})")
    if tech.reader is None and args.data is not None:
        raise ValueError(f"--data {args.data}: --technology {technology} reads no data; give --technology")
    if tech.needs_slide and args.slide is None:
        raise ValueError(f"--technology {technology} needs --slide (the H&E image)")
    if technology == "hest" and not args.sample_id:
        raise ValueError("--technology hest needs --sample-id (the HEST id, e.g. TENX95)")
    if args.image_scale not in ("fullres", "hires", "lowres"):
        raise ValueError(f"--image-scale {args.image_scale}: expected fullres, hires or lowres")


def _summary(paths: list[Path], seconds: float) -> None:
    import anndata as ad
    from rich.console import Console
    from rich.table import Table

    table = Table(title="histotx embed: summary")
    for col in ("sample", "tiles", "embeddings", "file"):
        table.add_column(col, overflow="fold")
    tiles = 0
    for path in paths:
        adata = ad.read_h5ad(path)
        tiles += adata.n_obs
        dims = ", ".join(f"{k} {v.shape[1]}" for k, v in adata.obsm.items() if k != "spatial")
        table.add_row(path.stem, str(adata.n_obs), dims, str(path))
    console = Console(stderr=True, width=160)
    console.print(table)
    console.print(
        f"{len(paths)} samples, {tiles} tiles in {seconds:.1f} s ({tiles / max(seconds, 1e-9):.1f} tiles/s) "
        f"→ {paths[0].parent if paths else '-'}"
    )


# ---------------------------------------------------------------- `histotx eval`


def _named(values: Sequence[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values or []:
        name, sep, source = value.partition("=")
        if not sep or not name or not source:
            raise ValueError(f"{flag} takes NAME=PATH, got {value!r}")
        if name in out:
            raise ValueError(f"{flag}: the name {name!r} is given twice")
        out[name] = source
    return out


EPILOG = """\
what it does:
  1. targets: the tiles' expression is read from the shards (sum of each tile's sites); the 50 most
     variable genes (variance of log1p) among those present in >= 10 % of the sites of every sample.
  2. embeddings: each --model embeds every tile in each --mode (image, transcripts, fused) with the
     target genes REMOVED from the transcript input; --embeddings uses folders made by `histotx embed`
     (refused unless their uns["dropped_genes"] holds every target gene: no leakage).
  3. HEST-Bench protocol per model x mode, on one set of patient folds (leave-one-patient-out with
     <= 4 patients, else GroupKFold(5)): StandardScaler -> PCA(256) -> Ridge(alpha=100/(256*50),
     no intercept, lsqr), float64, fitted on train; Pearson per gene on the test patients; mean over
     genes, folds. A gene constant on a test split makes that split's mean NaN, as in HEST-Bench
     (--omit-constant-genes: left out, a named deviation); fewer than 256 training rows or embedding
     dims cap the PCA, and the score is marked off-protocol (the table's protocol column).
  4. optional linear probe of a tile label (--label COLUMN of the embeddings' obs, or --labels CSV
     with columns key,COLUMN): StandardScaler -> LogisticRegression; balanced accuracy per fold.
  Prints the table; writes OUT/results.csv, OUT/pearson.png, OUT/results.json (every per-gene,
  per-fold number) and OUT/embeddings/<model>/<sample>.h5ad.

examples:
  histotx eval --shards out/demo/shards --model base=runs/img/export --model fused=runs/tiny \\
      --modes image,transcripts,fused --out out/eval
  histotx eval --shards shards/ --embeddings mine=emb/ --modes image,fused --labels regions.csv --label region \\
      --gene-groups groups.json --out out/eval
  histotx eval --hest bench_data/IDC --model uni=exports/uni --out out/idc      # HEST-Benchmark's own task
  histotx eval --hest bench_data --model a=exports/a --model b=runs/b --out out/hest  # every task + average
  histotx eval --hest bench_data/IDC --embeddings mine=emb/IDC --out out/idc   # precomputed <sample_id>.h5ad
"""


def register_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="HEST-Bench-style expression prediction (+ a label probe) from each model x mode",
        description="Compare models and embedding modes on predicting gene expression from tile embeddings, "
        "with the HEST-Benchmark protocol, on a HistoTx shard set or a HEST-Benchmark task folder.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", type=Path, help="a shard folder made by `histotx shard` (targets come from it)")
    src.add_argument(
        "--hest",
        type=Path,
        metavar="DIR",
        help="a HEST-Benchmark task folder (splits/, adata/, patches/, var_50genes.json), or a folder "
        "of them (bench_data/: every task, plus the mean over tasks); image mode only",
    )
    p.add_argument(
        "--model",
        action="append",
        metavar="NAME=SOURCE",
        help="a model to embed with: an export folder, a run folder or a checkpoint (repeatable)",
    )
    p.add_argument(
        "--embeddings",
        action="append",
        metavar="NAME=DIR",
        help="precomputed embeddings (<DIR>/<sample>.h5ad from `histotx embed`; with --hest on a folder of "
        "tasks, <DIR>/<TASK>/<sample_id>.h5ad) (repeatable)",
    )
    p.add_argument("--modes", default="image", help="comma-separated: image, transcripts, fused (default image)")
    p.add_argument("--out", type=Path, required=True, help="folder for the table, plot, JSON and embeddings")
    p.add_argument("--samples", help="comma-separated sample ids (default: every sample with transcripts)")
    p.add_argument("--targets", type=int, default=50, help="number of target genes (default 50)")
    p.add_argument(
        "--min-frac",
        type=float,
        default=0.10,
        help="a target must be present in this share of the sites of every sample (default 0.10)",
    )
    p.add_argument("--label", help="label column for the linear probe (obs column, or the --labels CSV column)")
    p.add_argument(
        "--labels", type=Path, help="CSV of tile labels: columns key (tile key) and --label (default 'label')"
    )
    p.add_argument("--gene-groups", type=Path, help='JSON {"group": ["GENE", ...]}: per-group Pearson columns')
    p.add_argument("--batch-size", type=int, default=64, help="tiles per forward pass (default 64)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ... (default auto)")
    p.add_argument(
        "--omit-constant-genes",
        action="store_true",
        help="a gene constant on a test split is left out of that split's mean (a named deviation; default: "
        "as HEST-Bench, the split's mean is NaN)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    from histotx.eval.run import evaluate
    from histotx.eval.targets import read_gene_groups

    models = _named(args.model, "--model")
    embeddings = _named(args.embeddings, "--embeddings")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    groups = read_gene_groups(args.gene_groups) if args.gene_groups else None
    nan_policy = "omit" if args.omit_constant_genes else "hest"
    if args.hest is not None:
        from histotx.eval import hestlayout

        if not (models or embeddings) or modes != ["image"]:
            raise ValueError(
                "--hest takes --model and/or --embeddings (one or more) and --modes image (HEST-Benchmark tasks "
                "are images)"
            )
        if hestlayout.is_task(args.hest):
            hestlayout.evaluate_hest_task(
                args.hest,
                models,
                args.out,
                embeddings=embeddings,
                nan_policy=nan_policy,
                gene_groups=groups,
                batch_size=args.batch_size,
                device=args.device,
                progress=not args.no_progress,
            )
        else:
            hestlayout.evaluate_hest_bench(
                args.hest,
                models,
                args.out,
                embeddings=embeddings,
                nan_policy=nan_policy,
                batch_size=args.batch_size,
                device=args.device,
                progress=not args.no_progress,
            )
        return 0
    samples = [s.strip() for s in args.samples.split(",")] if args.samples else None
    evaluate(
        args.shards,
        models,
        modes,
        args.out,
        embeddings=embeddings,
        samples=samples,
        n_targets=args.targets,
        min_frac=args.min_frac,
        label=args.label,
        labels=args.labels,
        gene_groups=groups,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.no_progress,
        nan_policy=nan_policy,
    )
    return 0
