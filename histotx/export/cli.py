"""`histotx export RUN_OR_CHECKPOINT --out DIR [--format hf|timm|both]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from histotx.export.targets import FORMATS, formats_help

DESCRIPTION = """\
Export the EMA teacher of a training run — the model you embed with — so that it leaves HistoTx.

RUN_OR_CHECKPOINT is a run folder (its checkpoints/latest is used) or one checkpoints/step_* folder, of
any ZeRO stage. No GPU, DeepSpeed engine or process group is needed: every checkpoint holds the teacher
whole (teacher.safetensors); --which student reassembles the student from the ranks' ZeRO partitions.
The run's shard set gives the gene vocabulary, the µm/px and the cohort.

OUT always receives HistoTx's own folder (teacher.safetensors, model_config.yaml, vocab.tsv, export.json);
--format adds:
{formats}

Every folder loads back with histotx.export.load_model(...) and as `histotx train ... init.backbone=DIR`.

Examples:
  histotx export runs/tiny_cpu --out exports/tiny
  histotx export runs/vit_l/checkpoints/step_00100000 --out exports/vit_l --format both --license cc-by-nc-sa-4.0
"""


def run(args: argparse.Namespace) -> int:
    from histotx.export.write import export

    summary = export(
        args.source,
        args.out,
        FORMATS[args.format],
        shards=args.shards,
        license=args.license,
        license_name=args.license_name,
        license_link=args.license_link,
        overwrite=args.overwrite,
        which=args.which,
    )
    print(summary.text())
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="a run's teacher → HistoTx / Hugging Face / timm folders",
        description=DESCRIPTION.format(formats=formats_help()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", type=Path, metavar="RUN_OR_CHECKPOINT", help="a run folder or a checkpoints/step_* folder")
    p.add_argument("--out", type=Path, required=True, help="output folder (built aside, then renamed into place)")
    p.add_argument(
        "--format",
        choices=tuple(FORMATS),
        default="hf",
        help="what to add to HistoTx's own folder (default: hf)",
    )
    p.add_argument(
        "--shards",
        type=Path,
        default=None,
        help="the run's shard set, when it is no longer at the config's data.stream.shards",
    )
    p.add_argument(
        "--license",
        default="other",
        help="license id for the model card (default: other); it must respect the training data's terms",
    )
    p.add_argument(
        "--license-name",
        default="",
        help="with --license other: the license's name for the card (default: unspecified)",
    )
    p.add_argument(
        "--license-link",
        default="",
        help="with --license other: a URL or file of the license (default: a LICENSE.md saying none is granted)",
    )
    p.add_argument(
        "--which",
        choices=("teacher", "student"),
        default="teacher",
        help="teacher (default: the EMA model one embeds with) or student (reassembled from DeepSpeed's "
        "ZeRO partitions, read weights-only)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out")
    p.set_defaults(func=run)
