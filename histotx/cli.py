"""`histotx`: one command, one subcommand per stage. Thin: parse, then call the stage."""

from __future__ import annotations

import argparse
import logging
import sys

DESCRIPTION = """\
HistoTx: early-fusion pretraining on H&E whole-slide images + spatial transcriptomics.

The pipeline, one subcommand per stage:
  histotx synth OUT                      write a synthetic cohort in genuine file formats (demo, tests)
  histotx shard run COHORT --out DIR     slides + Visium/Visium HD/Xenium/HEST → WebDataset shards
  histotx shard verify DIR               re-read and check a shard set
  histotx train CONFIG.yaml [k=v ...]    DINO/iBOT/KoLeo pretraining under DeepSpeed ZeRO (torchrun/srun)
  histotx export RUN --out DIR           the run's teacher as HistoTx / Hugging Face / timm folders
  histotx eval --shards DIR --model N=SRC --out DIR   HEST-Bench protocol: each model x mode, one table
  histotx embed --model M --shards DIR --out DIR   whole-tile embeddings, one .h5ad per sample
  histotx fit MODEL SHARDS --out HEAD    an expression head (embeddings → genes, held-out Pearson per gene)
  histotx predict SLIDE --model M --head HEAD --out DIR   expression from H&E alone (.h5ad, SpatialData, PNG)
  histotx demo OUT                       all of the above on a small built-in cohort, end to end

Run `histotx <subcommand> --help` for each stage's options.
"""

EXIT_DONE, EXIT_SOME_FAILED, EXIT_UNUSABLE = 0, 1, 2

EXIT_STATUS = """\
Exit status (every subcommand, and launch/train.py):
  0  done.
  1  some inputs failed: a slide, sample or shard was bad (damaged, missing, unreadable as data); the
     others were done, and the summary or the log names each failure with its file. Also an unexpected
     error (a bug), which prints its traceback.
  2  bad usage or an unusable environment: nothing more could be done as asked. A wrong option or argument
     (argparse), a bad config file or key=value override, a path that does not exist, a head from another
     model; the output folder locked by another run, a full disk, quota or file-size limit (ENOSPC, EDQUOT,
     EFBIG), permission denied or a read-only file system (EACCES, EPERM, EROFS). One line says what and
     where; fix it and run the same command again (sharding and predict resume).
  3  `histotx train` only: the losses stayed non-finite.
  4  `histotx train` only: CUDA required (require_cuda) but not usable.
  slurm/pretrain.sbatch requeues none of 2, 3, 4 (a retry would fail the same way).
"""


def _register_all(sub) -> None:
    from histotx import demo, synth
    from histotx.eval import cli as eval_cli
    from histotx.export import cli as export_cli
    from histotx.export.during_training import checkpoint_hooks
    from histotx.predict import cli as predict_cli
    from histotx.sharding import cli as shard_cli
    from histotx.train import cli as train_cli

    synth.register_cli(sub)
    shard_cli.register(sub)
    train_cli.register_cli(sub, checkpoint_hooks)  # training cannot import the export (it sits above)
    export_cli.register_cli(sub)
    eval_cli.register_cli(sub)
    predict_cli.register_cli(sub)
    demo.register_cli(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="histotx",
        description=DESCRIPTION,
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from histotx import __version__

    parser.add_argument("--version", action="version", version=f"histotx {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<subcommand>")
    _register_all(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from histotx.sharding.cli import normalise_argv

    argv = normalise_argv(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parse_with_overrides(parser, argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):  # `histotx` alone: what it can do (asking is not an error)
        parser.print_help()
        return 0
    return run_command(args.func, args)


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser``'s arguments, where ``key=value`` config overrides may come anywhere after the subcommand,
    also after options: those the positional list did not take are added to ``args.overrides``. Any
    other unknown argument is an error (argparse's usage message, exit status 2)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        takes = hasattr(args, "overrides")
        bad = [e for e in extra if not (takes and "=" in e and not e.startswith("-"))]
        if bad:  # named alone: the overrides beside them are fine
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides = list(args.overrides or []) + extra
    return args


def exit_status(exc: BaseException) -> tuple[int, str] | None:
    """(exit status, the one line to log) an exception stands for (:data:`EXIT_STATUS`), or None for an
    unexpected one (a bug: its traceback is worth more than a line). The one place that decides it."""
    from histotx.files import environment_problem
    from histotx.sharding.errors import InputError

    if isinstance(exc, InputError):  # bad data of one input: "<file>: <problem>"
        return EXIT_SOME_FAILED, str(exc)
    problem = environment_problem(exc)  # full disk, quota, ulimit -f, permission, read-only
    if problem:
        return EXIT_UNUSABLE, f"{problem}; nothing more can be written here: fix it and run the same command again"
    if isinstance(exc, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return EXIT_UNUSABLE, str(exc)  # config, override, flag, missing path, locked output (OutputError)
    return None


def run_command(func, args: argparse.Namespace, on_known_error=None) -> int:
    """``func(args)``'s exit status; an exception with a meaning (:func:`exit_status`) is one clear logged line
    and its status, anything else propagates with its traceback (Python's status 1). ``on_known_error(exc)`` is
    called (inside the ``except``) before a meaningful exception becomes its status: the training ranks use it to
    keep the root cause in torchrun's error file, which only an escaping exception would otherwise fill."""
    try:
        return int(func(args) or 0)
    except Exception as exc:
        known = exit_status(exc)
        if known is None:
            raise
        if on_known_error is not None:
            on_known_error(exc)
        logging.getLogger("histotx").error("%s", known[1])
        return known[0]


if __name__ == "__main__":
    sys.exit(main())
