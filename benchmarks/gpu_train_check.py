"""GPU check: a short bf16 training run of the ViT-L config on one GPU (single rank, ZeRO-2).

Makes a synthetic cohort's shards (256 px tiles at 0.5 µm/px, every technology), builds the trainer
from configs/train/vit_l16_uni.yaml (random init: no weights are downloaded), and times full training
steps — teacher forward, student forward and backward, AdamW, EMA — on batches held on the GPU, so the
figure is the model's and not the loader's; then the same number of steps fed by the loader. Prints
samples/s, achieved TFLOP/s (model FLOPs from :mod:`histotx.train.flops`: matmuls of the actual
sequence lengths, backward = 2 × forward, no recomputation) and the MFU against a peak (790 TFLOP/s,
dense bf16, by default).

    python benchmarks/gpu_train_check.py [--steps 20] [--warmup 5] [--batch 32] [key=value ...]
    python benchmarks/gpu_train_check.py --allow-cpu --config configs/train/tiny_cpu.yaml   # smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def make_shards(root: Path) -> Path:
    from histotx.sharding.config import ShardConfig
    from histotx.sharding.pipeline import run_cohort
    from histotx.synth import generate_cohort

    cohort = generate_cohort(root / "cohort", seed=0, size="small")
    run_cohort(cohort, root / "shards", ShardConfig(seed=0), workers=min(4, os.cpu_count() or 1))
    return root / "shards"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(trainer, batches, n: int) -> tuple[float, float, int]:
    """Seconds, model FLOPs and samples of ``n`` training steps on the batches ``batches`` yields."""
    from histotx.train.flops import step_flops

    model_cfg, ssl_cfg = trainer.meta.student.backbone.config, trainer.cfg.ssl
    flops, samples = 0.0, 0
    synchronize(trainer.device)
    start = time.perf_counter()
    for batch in itertools.islice(batches, n):
        if trainer.train_step(batch) is None:
            raise RuntimeError("a step had a non-finite loss")
        flops += step_flops(model_cfg, ssl_cfg, batch, trainer.meta.sequence_lengths(batch))
        samples += batch.batch_size
    synchronize(trainer.device)
    return time.perf_counter() - start, flops, samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "train" / "vit_l16_uni.yaml")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (allocator, kernels, loader)")
    parser.add_argument("--batch", type=int, default=32, help="samples per step (each: 2 global + N local crops)")
    parser.add_argument("--workers", type=int, default=min(10, max(1, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--held", type=int, default=4, help="distinct batches kept on the device for the model timing")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="the device's dense bf16 peak")
    parser.add_argument("--shards", type=Path, default=None, help="an existing shard set (default: make one)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (a smoke run of this script)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("no CUDA device: this check needs a GPU (or --allow-cpu for a smoke run)", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from histotx.config import load_config
    from histotx.train.config import TrainConfig
    from histotx.train.engine import memory_mb, use_bf16
    from histotx.train.loop import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or make_shards(Path(tmp))
        cfg = load_config(
            TrainConfig,
            args.config,
            [
                f"data.stream.shards={shards}",
                f"out={Path(tmp) / 'run'}",
                f"data.stream.batch_size={args.batch}",
                f"data.stream.num_workers={args.workers}",
                "data.stream.resample=true",
                "deepspeed.zero_stage=2",
                f"steps={args.warmup + 2 * args.steps + args.held}",
                "log.progress=false",
                "log.tensorboard=false",
                "checkpoint.every_steps=1000000",
                f"require_cuda={'false' if args.allow_cpu else 'true'}",
                *args.overrides,
            ],
        )
        trainer = Trainer(cfg)
        device = trainer.device
        model = trainer.meta.student.backbone.config
        n_params = sum(p.numel() for p in trainer.meta.student.parameters())
        print(
            f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; model {model.size} "
            f"{model.embed_dim}×{model.depth}, {n_params / 1e6:.1f} M student parameters; "
            f"{'bf16 autocast' if use_bf16(cfg, device) else 'fp32'}; ZeRO-{cfg.deepspeed.zero_stage}; "
            f"batch {args.batch} × (2 × {cfg.data.augment.global_crop_size} px + "
            f"{cfg.data.augment.local_crops_number} × {cfg.data.augment.local_crop_size} px)"
        )
        try:
            held = [trainer.next_batch() for _ in range(args.held)]
            timed_steps(trainer, itertools.cycle(held), args.warmup)
            seconds, flops, samples = timed_steps(trainer, itertools.cycle(held), args.steps)
            tflops = flops / seconds / 1e12
            result = {
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "model": model.size,
                "zero_stage": cfg.deepspeed.zero_stage,
                "batch": args.batch,
                "steps": args.steps,
                "ms_per_step": seconds / args.steps * 1e3,
                "samples_per_s": samples / seconds,
                "tflops": tflops,
                "mfu": tflops / args.peak_tflops,
                "peak_tflops": args.peak_tflops,
            }
            print(
                f"model (batches on the device): {seconds / args.steps * 1e3:.1f} ms/step, "
                f"{samples / seconds:.1f} samples/s, {flops / args.steps / 1e12:.2f} TFLOP/step, "
                f"{tflops:.1f} TFLOP/s, MFU {tflops / args.peak_tflops:.1%} of {args.peak_tflops:.0f} TFLOP/s"
            )
            loader = iter(trainer.next_batch, None)
            seconds, flops, samples = timed_steps(trainer, loader, args.steps)
            print(
                f"end to end (batches from {args.workers} loader workers): {samples / seconds:.1f} samples/s, "
                f"{flops / seconds / 1e12:.1f} TFLOP/s; peak memory {memory_mb(device) / 1024:.1f} GiB"
            )
            result.update(
                end_to_end_samples_per_s=samples / seconds,
                end_to_end_tflops=flops / seconds / 1e12,
                loader_workers=args.workers,
                peak_memory_gib=memory_mb(device) / 1024,
            )
            if args.json:
                args.json.write_text(json.dumps(result, indent=1))
        except torch.cuda.OutOfMemoryError:
            print(f"out of GPU memory at batch {args.batch}: rerun with a smaller --batch", file=sys.stderr)
            return 3
        finally:
            trainer._batches = None  # stop the loader workers
            trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
