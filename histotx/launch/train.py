"""Per-rank entry point of `histotx train` for torchrun, the deepspeed launcher and srun
(the repository's ``launch/train.py`` is the script that calls it).

    torchrun --nproc-per-node 2 launch/train.py CONFIG.yaml [key=value ...] [--resume auto]
    deepspeed --num_gpus 2 launch/train.py CONFIG.yaml ...
    srun --ntasks-per-node 4 python launch/train.py CONFIG.yaml ...
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys

from torch.distributed.elastic.multiprocessing.errors import get_error_handler, record

from histotx.launch.env import set_distributed_env


@record  # under torchrun: the exception goes to the error file torchrun reports as the root cause
def main(argv: list[str] | None = None) -> int:
    set_distributed_env()
    from histotx.cli import parse_with_overrides, run_command
    from histotx.export.during_training import checkpoint_hooks
    from histotx.train import cli

    parser = argparse.ArgumentParser(
        prog="launch/train.py", description=cli.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_arguments(parser)
    args = parse_with_overrides(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # A full disk or a bad config ends this rank with its status (2) rather than a traceback, but slurm/pretrain.sbatch
    # names the root cause from the ranks' error files: record it there as an escaping exception would be.
    run = functools.partial(cli.run, checkpoint_hooks=checkpoint_hooks)
    return run_command(run, args, on_known_error=get_error_handler().record_exception)


if __name__ == "__main__":
    sys.exit(main())
