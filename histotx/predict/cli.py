"""`histotx fit` and `histotx predict`: argument parsing only (the handlers import the work when they run)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

FIT_DESCRIPTION = """\
Fit an expression head on a cohort: the model's image embeddings of its tiles → log1p(count per tile) of
each gene. StandardScaler → PCA(256) → ridge, fitted on training patients in float64, alpha chosen by an
inner leave-patient-out CV; each gene's held-out Pearson from an outer leave-patient-out CV (the confidence
`histotx predict` reports with it). Writes HEAD/head.safetensors, HEAD/head.json (genes, per-gene Pearson,
the model's weight fingerprint, the tile size) and HEAD/genes.tsv. No pickle.

  histotx fit export/ shards/ --out head/                  # the 50 most variable genes of the shard set
  histotx fit export/ shards/ --out head/ --genes EPCAM,CD3E,MKI67
  histotx fit export/ bench_data/IDC --out head-idc/       # a HEST-Benchmark task folder (its 50 genes)
  histotx fit export/ shards/ --out head-mlp/ --head mlp   # a small MLP instead of the ridge

--head mlp: the same scaler and PCA, then one hidden layer (ReLU) on standardised targets, its width and
weight decay chosen by the same inner leave-patient-out CV, early stopping on a held-out 15% of the training
rows, seeded; saved the same way (head.json says its kind; `histotx predict` reads either).
"""

PREDICT_DESCRIPTION = """\
Predict expression from H&E alone: tile each slide (any format `histotx shard` reads) at the head's tile
size, embed the tiles with the model (image only; GPU when present) and apply the head.

Writes, per slide, into --out: SLIDE.h5ad (X = predicted log1p count per tile, var.heldout_pearson,
obsm["spatial"] = tile centres in level-0 px, uns["spatial"] = slide thumbnail + Visium scale factors:
scanpy.pl.spatial / squidpy.pl.spatial_scatter draw it as is); with --format spatialdata, SLIDE.zarr
(SpatialData: image pyramid, tile polygons, table); with --png GENE..., SLIDE.GENE.png heat maps.
Resumable: a killed run re-does only the missing chunks; finished slides are skipped (--overwrite). One run
at a time per --out folder (a second refuses, naming the first's process; exit 2).

  histotx predict he.svs --model export/ --head head/ --out pred/ --png EPCAM CD3E
  histotx predict slides/*.tif --model export/ --head head/ --out pred/ --format h5ad,spatialdata
"""


def register_cli(subparsers) -> None:
    f = subparsers.add_parser(
        "fit",
        help="fit an expression head (embeddings → genes) on a shard set or HEST task",
        description=FIT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("model", help="export folder, run folder or checkpoint (the model the head reads)")
    f.add_argument("data", type=Path, help="a shard folder (manifest.json) or a HEST-Benchmark task folder")
    f.add_argument("--out", type=Path, required=True, help="the head folder (created)")
    f.add_argument("--genes", help="comma-separated target genes (shards; default: the --targets most variable)")
    f.add_argument("--targets", type=int, default=50, help="number of most variable genes (default 50)")
    f.add_argument("--samples", help="comma-separated sample ids of the shard set (default: all with transcripts)")
    f.add_argument("--embeddings", type=Path, help="image embeddings already made by `histotx embed` (a folder)")
    f.add_argument("--head", choices=("ridge", "mlp"), default="ridge",
                   help="the head: ridge (PCA + ridge, the default) or mlp (PCA + a one-hidden-layer MLP)")  # fmt: skip
    f.add_argument("--batch-size", type=int, default=64, help="tiles per forward pass (default 64)")
    f.add_argument("--device", default="auto", help="auto (GPU when there is one; the default), cpu, cuda, ...")
    f.add_argument("--no-progress", action="store_true", help="no progress bars")
    f.set_defaults(func=_run_fit)

    p = subparsers.add_parser(
        "predict",
        help="predict expression per tile from H&E alone (→ .h5ad / SpatialData / PNG)",
        description=PREDICT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("slides", nargs="+", type=Path, help="slide files (SVS, TIFF, OME-TIFF, ...)")
    p.add_argument("--model", required=True, help="export folder, run folder or checkpoint")
    p.add_argument("--head", type=Path, required=True, help="the head folder made by `histotx fit` for this model")
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--format", default="h5ad", help="comma-separated: h5ad, spatialdata (default h5ad)")
    p.add_argument("--png", nargs="+", metavar="GENE", default=[], help="heat maps of these genes over the slide")
    p.add_argument("--mpp", type=float, help="µm/px of the slides' level 0, overriding their metadata")
    p.add_argument("--min-tissue-fraction", type=float, help="skip tiles with less tissue (default as sharding)")
    p.add_argument("--batch-size", type=int, default=64, help="tiles per forward pass (bounds the memory; default 64)")
    p.add_argument("--device", default="auto", help="auto (GPU when there is one; the default), cpu, cuda, ...")
    p.add_argument("--overwrite", action="store_true", help="predict slides whose outputs exist again")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_predict)


def _run_fit(args) -> int:
    import logging

    from histotx.predict import fit

    log = logging.getLogger("histotx")
    t0 = time.time()
    common = dict(batch_size=args.batch_size, device=args.device, embeddings=args.embeddings,
                  progress=not args.no_progress, kind=args.head)  # fmt: skip
    if (args.data / "splits").is_dir():
        if args.genes or args.samples:
            raise ValueError("--genes/--samples apply to a shard set; a HEST task brings its own genes and samples")
        head = fit.fit_from_hest(args.model, args.data, args.out, **common)
    elif (args.data / "manifest.json").is_file():
        genes = [g.strip() for g in (args.genes or "").split(",") if g.strip()] or None
        samples = [s.strip() for s in (args.samples or "").split(",") if s.strip()] or None
        head = fit.fit_from_shards(args.model, args.data, args.out, genes=genes, samples=samples,
                                   n_targets=args.targets, **common)  # fmt: skip
    else:
        raise FileNotFoundError(f"{args.data}: neither a shard folder (manifest.json) nor a HEST task (splits/)")
    order = sorted(
        range(len(head.genes)), key=lambda i: -(head.pearson[i] if head.pearson[i] == head.pearson[i] else -9)
    )
    best = ", ".join(f"{head.genes[i]} {head.pearson[i]:.2f}" for i in order[:5])
    log.info(
        "head of %d genes on %d tiles in %.1f s: held-out Pearson mean %.3f (best: %s); %s → %s",
        len(head.genes), head.info["n_rows"], time.time() - t0, head.info["heldout_pearson_mean"] or float("nan"),
        best, head.describe(), args.out,
    )  # fmt: skip
    return 0


def _run_predict(args) -> int:
    from histotx.predict.slide import FORMATS

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    if not formats or set(formats) - set(FORMATS):
        raise ValueError(f"--format takes some of {', '.join(FORMATS)}, got {args.format!r}")
    model = _model_for_head(args)  # before any slide: a missing or foreign model or head is bad usage (exit 2)
    from histotx.sharding.writer import OutputLock

    args.out.mkdir(parents=True, exist_ok=True)
    with OutputLock(args.out):  # one run per output folder; a lock whose process is gone is taken over
        return _predict_each(args, model, formats)


def _predict_each(args, model, formats) -> int:
    """Every slide in turn: a bad slide is logged and counted (exit 1), the others go on; a full disk or a
    refused write stops the run (exit 2)."""
    import logging

    from histotx.files import environment_problem
    from histotx.format import FormatError
    from histotx.predict.slide import predict_slide
    from histotx.sharding.errors import InputError

    log = logging.getLogger("histotx")
    failed = 0
    for slide in args.slides:
        t0 = time.time()
        try:
            written = predict_slide(
                slide, model, args.head, args.out, formats=formats, png_genes=args.png, mpp=args.mpp,
                min_tissue_fraction=args.min_tissue_fraction, batch_size=args.batch_size, device=args.device,
                progress=not args.no_progress, overwrite=args.overwrite,
            )  # fmt: skip
        except (InputError, FormatError, OSError, RuntimeError) as exc:  # this slide; the others go on
            if environment_problem(exc):
                raise  # a full disk or a refused write stops the run (exit 2), the slides left are not "failed"
            failed += 1
            log.error("%s", exc if isinstance(exc, InputError) else f"{slide}: {exc}")
            continue
        log.info("%s: %.1f s → %s", slide, time.time() - t0, ", ".join(str(p) for p in written.values()))
    return 1 if failed else 0


def _model_for_head(args):
    """The model (loaded once for every slide), checked against the head: a head folder that is missing or
    unreadable, a model that does not load or one the head was not fitted on stops the run before any slide."""
    from histotx.eval.embed import resolve_device, resolve_model
    from histotx.predict.heads import load_head

    head = load_head(args.head)
    loaded = resolve_model(args.model, resolve_device(args.device))
    head.check_model(loaded.model, loaded.name, args.head)
    return loaded
