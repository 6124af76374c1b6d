"""`histotx shard ...`: shard a cohort, scan for inputs, merge parts, verify and QC a shard set."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SUBCOMMANDS = ("run", "scan", "merge", "verify", "qc")

DESCRIPTION = """\
Turn a cohort of H&E slides + spatial transcriptomics into WebDataset shards.

  histotx shard scan DATA_DIR --out cohort.yaml      find every known technology's outputs (see shard scan -h)
  histotx shard run cohort.yaml --out shards/        tile, co-register, write shards (resumable)
  histotx shard cohort.yaml --out shards/            (same as `run`)
  histotx shard run cohort.yaml --out shards/ --part 3/8   one slice, e.g. a SLURM array task
  histotx shard merge shards/                        join the parts' manifests
  histotx shard verify shards/                       re-read everything, check checksums and schema
  histotx shard qc shards/ --out qc/                 PNGs: tiles with sites drawn + a whole-slide overview

Settings (defaults: 256 px tiles at 0.5 µm/px, JPEG, tissue fraction ≥ 0.25) come from --config
YAML and key=value overrides, e.g. `mpp=0.25 tile_px=224 tiling=spots`.
"""


SCAN_DESCRIPTION = """\
Search a folder for spatial transcriptomics outputs and slides, and write a cohort file for
`histotx shard run`:
{technologies}
  a slide on its own (.svs, ...)   an image_only sample

Each sample's slide is the largest H&E image in its folder; a Visium folder without one uses
Space Ranger's spatial/tissue_hires_image.png (or _lowres_), which the summary names as a guess.
Paths are written as given (relative to the cohort file), never with symlinks resolved. Check the
patients (sections of one patient share one id) and the guesses, then run `histotx shard run`.
"""


def _technology_lines() -> str:
    """The scan help's list: every registered technology with a reader, and what its data is."""
    from histotx.sharding.technologies import TECHNOLOGIES

    return "\n".join(f"  {t.name:<32} {t.data}" for t in TECHNOLOGIES.values() if t.reader is not None)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "shard",
        help="shard a cohort into WebDataset tar files (and scan/merge/verify/qc)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="shard_cmd", metavar="{run,scan,merge,verify,qc}")

    r = sub.add_parser(
        "run",
        help="shard the samples of a cohort file",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("cohort", type=Path, help="cohort YAML (see `histotx shard scan`)")
    r.add_argument(
        "--out",
        required=True,
        help="shard folder (created; a rerun resumes), or an fsspec URL (s3://bucket/prefix, gs://...): the set "
        "is written to --stage, then uploaded, shards first and manifest.json last",
    )
    r.add_argument(
        "--stage",
        type=Path,
        help="with a URL --out: the local folder the set is written to before the upload "
        "(default: a folder under the temporary directory named after the URL; removed after the upload)",
    )
    r.add_argument("--config", type=Path, help="YAML with shard settings (histotx/sharding/config.py ShardConfig)")
    r.add_argument("--workers", type=int, default=1, help="processes, one sample each at a time (default 1)")
    r.add_argument("--part", help="i/n: shard only samples i, i+n, i+2n, ... (then `histotx shard merge`)")
    r.add_argument("--vocab", type=Path, help="start from this vocab.tsv (a new cohort appends to it)")
    r.add_argument("overrides", nargs="*", help="key=value settings, e.g. mpp=0.5 tile_px=224")
    r.set_defaults(func=_run)

    s = sub.add_parser(
        "scan",
        help="find inputs under a folder and write a cohort file to check",
        description=SCAN_DESCRIPTION.format(technologies=_technology_lines()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("root", type=Path, help="the folder to search (every level below it)")
    s.add_argument(
        "--out",
        type=Path,
        default=Path("cohort.yaml"),
        help="the cohort file to write; its paths are relative to its folder (default cohort.yaml)",
    )
    s.set_defaults(func=_scan)

    m = sub.add_parser(
        "merge",
        help="join part manifests (from --part runs) into manifest.json",
        description="Join the part manifests that `histotx shard run --part i/n` runs wrote into one shard folder "
        "(manifest.part*.json) into its manifest.json, with one vocabulary; then the folder is one shard set.",
    )
    m.add_argument("shard_dir", type=Path, help="the shard folder the parts wrote into")
    m.set_defaults(func=_merge)

    v = sub.add_parser(
        "verify",
        help="re-read every shard: checksums, schema, counts",
        description="Re-read every shard of a shard set: sha256 against the manifest, every member decoded and "
        "checked against the format, tiles and sites counted per sample. Exit status 1 when any problem is found.",
    )
    v.add_argument("shard_dir", type=Path, help="the shard folder (with manifest.json)")
    v.add_argument("--no-checksums", action="store_true", help="skip the sha256 checks (faster; default: check)")
    v.set_defaults(func=_verify)

    q = sub.add_parser(
        "qc",
        help="per sample: a contact sheet of tiles with sites drawn, and a whole-slide "
        "overview (kept tiles outlined, sites in shards cyan, sites under no tile red)",
        description="Quality-control pictures of a shard set, per sample: a contact sheet of tiles with their "
        "transcript sites drawn, and a whole-slide overview (kept tiles outlined, sites in the shards cyan, sites "
        "under no kept tile red), so a half-missing slide or a shifted alignment is seen at a glance.",
    )
    q.add_argument("shard_dir", type=Path, help="the shard folder (with manifest.json)")
    q.add_argument("--out", type=Path, required=True, help="folder for the PNGs (created)")
    q.add_argument("--per-sample", type=int, default=8, help="tiles on each sample's contact sheet (default 8)")
    q.set_defaults(func=_qc)
    p.set_defaults(func=lambda _args: p.print_help() or 0)  # `histotx shard` alone: its help


def normalise_argv(argv: list[str]) -> list[str]:
    """`histotx shard cohort.yaml ...` means `histotx shard run cohort.yaml ...`."""
    if len(argv) >= 2 and argv[0] == "shard" and argv[1] not in SUBCOMMANDS and not argv[1].startswith("-"):
        return ["shard", "run", *argv[1:]]
    return argv


def _summary_table(manifest: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="histotx shard: summary")
    for col in ("sample", "technology", "status", "tiles", "sites kept", "dropped", "note"):
        table.add_column(col, overflow="fold")
    for sid, rec in manifest["samples"].items():
        dropped = ", ".join(f"{k}={v}" for k, v in (rec.get("dropped") or {}).items())
        warned = rec["status"] == "ok" and rec.get("warnings")
        note = (
            rec.get("error")
            or ("WARNING: " + "; ".join(rec["warnings"]) if warned else "")
            or ("resumed" if rec.get("resumed") else "")
        )
        table.add_row(
            sid,
            rec.get("technology", "?"),
            rec["status"],
            str(rec.get("tiles", 0)),
            str(rec.get("sites_kept", "")),
            dropped,
            note,
            style="red" if rec["status"] != "ok" else "yellow" if warned else None,
        )
    tot = manifest["totals"]
    console = Console(stderr=True, width=160)
    console.print(table)
    console.print(
        f"{tot['tiles']} tiles in {tot['shards']} shards ({tot['bytes'] / 1e6:.1f} MB); "
        f"{tot['samples_ok']} samples ok, {tot['samples_failed']} failed"
    )


def _run(args) -> int:
    from tqdm import tqdm

    from histotx.config import load_config
    from histotx.shard_location import is_remote, local_path
    from histotx.sharding.config import ShardConfig
    from histotx.sharding.pipeline import Part, run_cohort

    cfg = load_config(ShardConfig, args.config, args.overrides)
    part = Part.parse(args.part)
    remote = is_remote(args.out)
    if remote and args.part:
        raise ValueError(f"--out {args.out}: a --part run writes to a local folder (merge, then upload the set)")
    out = (args.stage or _stage_folder(args.out)) if remote else local_path(args.out)
    with tqdm(desc="samples", unit="sample", file=sys.stderr) as bar:  # closed even when the run stops

        def progress(record: dict) -> None:
            bar.update(1)
            bar.set_postfix_str(f"{record['sample']}: {record['status']} ({record.get('tiles', 0)} tiles)")

        manifest = run_cohort(
            args.cohort, out, cfg, workers=args.workers, part=part, vocab_from=args.vocab, progress=progress
        )
    _summary_table(manifest)
    if remote:
        _upload(out, args.out, manifest, keep=args.stage is not None)
    return 1 if manifest["totals"]["samples_failed"] else 0


def _stage_folder(url: str) -> Path:
    import hashlib
    import tempfile

    return Path(tempfile.gettempdir()) / "histotx-stage" / hashlib.sha256(url.encode()).hexdigest()[:16]


def _upload(folder: Path, url: str, manifest: dict, keep: bool) -> None:
    """The finished set to ``url``: shards and vocabulary, then the manifest (what readers open first)."""
    import shutil

    from histotx.shard_location import upload_shard_set

    names = [s["name"] for s in manifest["shards"]] + [manifest.get("vocab", "vocab.tsv")]
    upload_shard_set(folder, url, [n for n in names if (folder / n).is_file()])
    print(f"uploaded {len(manifest['shards'])} shards and the manifest to {url}", file=sys.stderr)
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)


def _scan(args) -> int:
    import os

    from histotx.sharding.cohort import dump_cohort
    from histotx.sharding.scan import draft_cohort

    folder = Path(os.path.abspath(args.out)).parent  # as given: the cohort's paths are relative to it
    draft = draft_cohort(args.root, relative_to=folder)  # FileNotFoundError: "no such folder", exit 2
    notes = [f"drafted by `histotx shard scan {args.root}`: check each sample's patient and the guesses below"]
    notes += [f"guess: {g}" for g in draft.guesses] + [f"left out: {x}" for x in draft.left_out]
    folder.mkdir(parents=True, exist_ok=True)
    dump_cohort(draft.samples, args.out, notes)
    print(f"wrote {args.out} with {len(draft.samples)} samples from {args.root}")
    for g in draft.guesses:
        print(f"  guessed: {g}")
    for x in draft.left_out:
        print(f"  left out: {x} (add it with `slide:` by hand)")
    if draft.samples:
        print(
            f"check the patients (sections of one patient share one id), then: "
            f"histotx shard run {args.out} --out SHARDS"
        )
    else:
        print(f"nothing to shard found under {args.root} (Space Ranger outs, Visium HD, Xenium, HEST, or a slide)")
    return 0 if draft.samples else 1


def _merge(args) -> int:
    from histotx.sharding.writer import merge_parts

    manifest = merge_parts(args.shard_dir)
    _summary_table(manifest)
    return 1 if manifest["totals"]["samples_failed"] else 0


def _verify(args) -> int:
    from histotx.sharding.verify import verify

    report = verify(args.shard_dir, checksums=not args.no_checksums)
    for sid, n in sorted(report["per_sample"].items()):
        print(f"{sid}\t{n} tiles")
    print(f"{report['shards']} shards, {report['tiles']} tiles, {report['sites']} sites, {report['counts']:.0f} counts")
    for p in report["problems"]:
        print(f"PROBLEM: {p}", file=sys.stderr)
    print("OK" if not report["problems"] else f"{len(report['problems'])} problems", file=sys.stderr)
    return 1 if report["problems"] else 0


def _qc(args) -> int:
    from histotx.sharding.qc import write_overviews, write_qc

    files = write_qc(args.shard_dir, args.out, per_sample=args.per_sample) + write_overviews(args.shard_dir, args.out)
    for f in files:
        print(f)
    return 0 if files else 1
