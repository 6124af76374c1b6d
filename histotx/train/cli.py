"""`histotx train CONFIG.yaml [key=value ...] [--resume auto|PATH]`."""

from __future__ import annotations

import argparse
import functools
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from histotx.train.config import TrainConfig
    from histotx.train.loop import CheckpointHook

DESCRIPTION = """\
Self-supervised pretraining (DINO + iBOT + KoLeo + masked transcripts) of the early-fusion ViT under
DeepSpeed ZeRO, on a shard set made by `histotx shard run`.

One process (CPU or one GPU):
  histotx train configs/train/tiny_cpu.yaml data.stream.shards=out/demo/shards out=runs/tiny
Several ranks, one process each (GPUs, or CPU ranks over gloo); the launcher sets RANK / WORLD_SIZE /
MASTER_ADDR, and each rank runs the module histotx.launch.train (the same as `histotx train`):
  OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m histotx.launch.train configs/train/tiny_cpu.yaml \
      data.stream.shards=out/demo/shards out=runs/tiny2
  torchrun --nproc-per-node 8 -m histotx.launch.train configs/train/vit_l16_uni.yaml data.stream.shards=DIR
  deepspeed --num_gpus 8 launch/train.py configs/train/vit_l16_uni.yaml data.stream.shards=DIR   (a checkout)
  srun python -m histotx.launch.train ...  (or slurm/pretrain.sbatch: torchrun per node, requeue on USR1)
Input (shard folder, vocabulary, out) is checked before anything is built; a run that fails before its
first checkpoint removes the folder it made.

Outputs under `out` (a config key): config.yaml, metrics.jsonl, tensorboard/, checkpoints/step_*/ and
checkpoints/latest; with checkpoint.export_every=N, exports/step_*/: the teacher backbone as a timm
folder (timm.create_model("local-dir:DIR", pretrained=True)) every N steps and at the end.
SIGTERM / SIGUSR1 finish the current step, save and exit 0; `--resume auto` continues from the newest
complete checkpoint (same world size, data and batch settings).
"""


EXIT_CONFIG, EXIT_NONFINITE, EXIT_NO_CUDA = 2, 3, 4
"""Exit statuses of a rank besides 0 (done, or stopped by a signal after saving) and 1 (a crash): a config or
input error, a run of non-finite losses, CUDA expected but unavailable. slurm/pretrain.sbatch retries none of
them (a retry would fail the same way)."""


def run(
    args: argparse.Namespace, checkpoint_hooks: Callable[[TrainConfig], Sequence[CheckpointHook]] | None = None
) -> int:
    """``checkpoint_hooks``: the run's config → hooks for the trainer; given by the layer above training
    (the `histotx` CLI, launch/train.py), since training must not import what they do (the export)."""
    from histotx import presets
    from histotx.config import load_config
    from histotx.train import console
    from histotx.train.config import TrainConfig
    from histotx.train.preflight import check_run_inputs

    overrides = list(args.overrides)
    if getattr(args, "require_cuda", None) is not None:  # the flag wins over the config and its overrides
        overrides.append(f"require_cuda={str(args.require_cuda).lower()}")
    cfg = load_config(TrainConfig, presets.resolve(args.config), overrides)  # a file, or a packaged name
    check_run_inputs(cfg, args.resume)  # before torch, DeepSpeed, the model: seconds, and nothing written
    out = Path(cfg.out)
    lead = int(os.environ.get("RANK", "0")) == 0
    if lead:
        console.say_start(out, cfg.data.stream.shards, int(os.environ.get("WORLD_SIZE", "1")), cfg.steps, args.resume)
    fresh = not out.exists()

    from histotx.train.engine import CudaUnavailableError
    from histotx.train.loop import NonFiniteLossError, train

    try:
        rc = train(cfg, args.resume, checkpoint_hooks(cfg) if checkpoint_hooks else ())
    except NonFiniteLossError as exc:
        logging.getLogger("histotx.train").error("%s", exc)
        rc, failure = EXIT_NONFINITE, str(exc)
    except CudaUnavailableError as exc:
        logging.getLogger("histotx.train").error("%s", exc)
        rc, failure = EXIT_NO_CUDA, str(exc)
    except BaseException as exc:
        if lead:
            _record_failure(out, fresh, f"{type(exc).__name__}: {exc}")
        raise
    else:
        failure = ""
    if lead:
        if failure:
            _record_failure(out, fresh, failure)
        else:
            (out / FAILED).unlink(missing_ok=True)  # an earlier attempt's note: this run finished
            console.say_end(out)
    return rc


FAILED = "FAILED.txt"


def _record_failure(out: Path, fresh: bool, error: str) -> None:
    """A run that stopped with an error: a folder this run made and left before any step was recorded or
    saved is removed (nothing in it is worth keeping), any other gets ``FAILED.txt`` saying why (removed by
    the next run that finishes there)."""
    import shutil

    from histotx.files import atomic_write_bytes

    if not out.is_dir():
        return
    metrics = out / "metrics.jsonl"
    started = any((out / "checkpoints").glob("step_*")) or (metrics.is_file() and metrics.stat().st_size > 0)
    if fresh and not started:
        shutil.rmtree(out, ignore_errors=True)
        logging.getLogger("histotx.train").error("the run failed before its first step; removed %s", out)
        return
    atomic_write_bytes(out / FAILED, f"this run stopped with an error:\n{error}\n".encode())
    logging.getLogger("histotx.train").error("the run failed; %s says why", out / FAILED)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config",
        type=Path,
        help="training config (YAML), e.g. configs/train/tiny_cpu.yaml, or a packaged config's name "
        "(tiny_cpu, vit_l16_uni, ...)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. steps=1000 data.stream.batch_size=64 deepspeed.zero_stage=3",
    )
    p.add_argument(
        "--resume",
        metavar="auto|PATH",
        default=None,
        help="auto: continue from the newest complete checkpoint under <out>/checkpoints (start fresh "
        "if none); PATH: a checkpoints/step_* folder, or a run folder to take its newest",
    )
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument(
        "--require-cuda",
        dest="require_cuda",
        action="store_true",
        default=None,
        help="stop at start-up, naming the NVIDIA driver and torch's CUDA build, if CUDA is unavailable "
        "(config key require_cuda; on in the GPU configs and slurm/pretrain.sbatch)",
    )
    gpu.add_argument(
        "--allow-cpu",
        dest="require_cuda",
        action="store_false",
        default=None,  # neither flag: the config decides
        help="train on CPU (gloo, fp32) even if the config sets require_cuda",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher


def register_cli(subparsers, checkpoint_hooks: Callable[[TrainConfig], Sequence[CheckpointHook]] | None = None) -> None:
    p = subparsers.add_parser(
        "train",
        help="self-supervised pretraining under DeepSpeed (one process per rank)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=functools.partial(run, checkpoint_hooks=checkpoint_hooks))
