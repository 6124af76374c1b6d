"""``histotx synth``: its parser (built whenever the CLI starts: light imports only) and its handler."""

from __future__ import annotations

import argparse

from histotx.synth.variants import ALL_VARIANTS, SIZES, VARIANTS


def register_cli(subparsers) -> None:
    """Add ``histotx synth OUT [--seed N] [--size small|medium] [--markers]`` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "synth",
        help="write a synthetic cohort (slides + Visium/Visium HD/Xenium/HEST files) and its cohort.yaml",
        description=(
            "Write a synthetic cohort in genuine file formats: pyramidal JPEG TIFF, OME-TIFF and SVS slides; "
            "Space Ranger 1.x and 2.x outs; Visium HD binned outputs; a Xenium bundle with an H&E alignment; "
            "a HEST-layout sample; an image-only slide. Expression follows tissue regions visible in the H&E "
            "plus a hidden state that is not, so fusion has something to add over the image alone."
        ),
        epilog=(
            "Writes OUT/cohort.yaml (feed it to `histotx shard`) and OUT/truth/<id>.json (site positions in "
            "level-0 px, regions, programs). Example: histotx synth /tmp/cohort --seed 1 --markers"
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out", metavar="OUT", help="folder to write the cohort into (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same cohort")
    p.add_argument(
        "--size",
        choices=SIZES,
        default="small",
        help="small: ~2k px slides, seconds (tests, demo); medium: ~9k px slides, for benchmarks; "
        "bench: 2× small's tissue at 1 µm/px (CPU training benchmarks)",
    )
    p.add_argument(
        "--markers",
        action="store_true",
        help="paint a green disk on the H&E at every site in truth/<id>.json (co-registration checks)",
    )
    p.add_argument(
        "--technologies",
        default=",".join(VARIANTS),
        metavar="LIST",
        help=f"comma-separated subset of: {', '.join(ALL_VARIANTS)}",
    )
    p.add_argument("--replicates", type=int, default=1, help="samples per variant, each its own tissue")
    p.add_argument(
        "--patients",
        type=int,
        default=None,
        help="deal the samples out to this many patients in turn (default: two, by variant)",
    )
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    from histotx.synth.cohort import generate_cohort

    path = generate_cohort(
        args.out,
        seed=args.seed,
        size=args.size,
        markers=args.markers,
        replicates=args.replicates,
        patients=args.patients,
        technologies=tuple(t.strip() for t in args.technologies.split(",") if t.strip()),
    )
    print(path)
    return 0
