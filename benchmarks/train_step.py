"""Where a training step's time goes, and what the loader's worker processes cost, on CPU.

1. Step time: a small fused ViT (128 wide, 4 blocks, 64 px global crops) trained by 2 ranks (gloo,
   ZeRO-2 or --zero N, one loader worker each) on the synthetic cohort's shards (256 px JPEG tiles,
   every technology). Per step: data wait (blocked on
   the loader), forward (teacher + student + losses), backward (with ZeRO's gradient reduction),
   optimiser (AdamW + parameter all-gather) and EMA (teacher update + centres), averaged over the
   logging windows after the first (loader warm). Target: time outside forward/backward ≤ 5 %.
   On CPU every gloo collective costs about a millisecond and ZeRO-1/2 issue two per optimiser group
   (gradient norm, parameter all-gather) per step, so the optimiser share says more about gloo than
   about the trainer; ZeRO-0 (gradients all-reduced in buckets, no partitions) shows the difference.
2. Loader: CPU seconds per sample of decode + multi-crop + collation in one plain loop (the bound),
   against the CPU seconds a DataLoader worker spends per sample it delivers (shard reading, shuffle
   buffer, decoding, augmentation, collation, hand-over). Target: ratio ≥ 0.9. CPU time, not wall
   time, so that other processes on a shared machine do not distort it.
3. Loader rate: samples/s per CPU core for the default recipe (2 global 224 + 8 local 96 crops with
   transcript grids, from the cohort's 256 px JPEG tiles): the CPU time of one DataLoader worker per
   sample it delivers, in steady state (the worker's own CPU clock from its first batch to its last,
   LoaderStats.worker_cpu_s: process start-up and batches made ahead are left out). From it, the cores
   one H200 needs at the ViT-L/16 step rate (GPU_* constants below; goal ≤ 4). The worker hands its views
   over as bytes; the trainer-side stage (histotx.data.device_decode.BatchDecoder) normalises them on the
   device, and its time per sample is printed too (on CPU when no GPU is present, said so in the output).
   With --decode-device cuda the worker leaves decoding and pixel work to that stage
   (data.augment.decode_device): then its CPU cost per sample, and the stage's time per sample.

    OMP_NUM_THREADS=1 python benchmarks/train_step.py [--steps 40] [--batch 32] [--window 10] [--zero 2]
    OMP_NUM_THREADS=1 python benchmarks/train_step.py --loader-only [--decode-device cpu|cuda]
        [--loader-samples 1600] [--loader-batch 32]     (small and fast: --loader-samples 64 --loader-batch 8)
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# The rate one GPU consumes samples at (issue 11's model): a ViT-L/16 DINOv2 step on one sample (teacher
# 2 × 224, student 2 × 224 + 8 × 96, forward + backward) against an H200's dense bf16 peak at the MFU target.
GPU_FLOP_PER_SAMPLE = 1.6e12
GPU_PEAK_FLOPS = 989e12  # H200 SXM, dense bf16
GPU_MFU = 0.45
GPU_SAMPLES_PER_S = GPU_PEAK_FLOPS * GPU_MFU / GPU_FLOP_PER_SAMPLE
CORES_PER_GPU_GOAL = 4
PHASES = ("data_wait", "forward", "backward", "optimizer", "ema")
SMALL_MODEL = [
    "model.size=custom",
    "model.embed_dim=128",
    "model.depth=4",
    "model.num_heads=4",
    "model.img_size=64",
    "model.patch_size=8",
    "model.num_registers=1",
    "model.vocab_size=1024",
    "data.mask.patch_size=8",
    "data.augment.global_crop_size=64",
    "data.augment.local_crop_size=32",
    "data.augment.local_crops_number=4",
    "data.collate.resolutions_um=[8.0, 16.0, 32.0]",
    "ssl.head.out_dim=4096",
    "ssl.head.hidden_dim=256",
    "ssl.head.bottleneck_dim=64",
    "deepspeed.precision=fp32",
    "data.stream.shuffle_buffer=64",
    "data.stream.resample=true",
    "log.progress=false",
    "log.tensorboard=false",
    "checkpoint.every_steps=100000",
]


def make_shards(root: Path) -> Path:
    from histotx.sharding.config import ShardConfig
    from histotx.sharding.pipeline import run_cohort
    from histotx.synth import generate_cohort

    cohort = generate_cohort(root / "cohort", seed=0, size="small")
    run_cohort(cohort, root / "shards", ShardConfig(seed=0, shard_max_tiles=64))
    return root / "shards"


def rank_main(overrides: list[str]) -> None:
    from histotx.config import load_config
    from histotx.train.config import TrainConfig
    from histotx.train.loop import train

    train(load_config(TrainConfig, REPO / "configs" / "train" / "tiny_cpu.yaml", overrides))


def step_breakdown(shards: Path, out: Path, steps: int, batch: int, window: int, zero: int) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    overrides = SMALL_MODEL + [
        f"data.stream.shards={shards}",
        f"out={out}",
        f"steps={steps}",
        f"data.stream.batch_size={batch}",
        "data.stream.num_workers=1",
        f"log.every_steps={window}",
        f"deepspeed.zero_stage={zero}",
    ]
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--rank", *overrides],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for p in procs:
        log, _ = p.communicate()
        if p.returncode:
            raise RuntimeError(f"a rank failed:\n{log[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]  # loader warm
    mean = {p: float(np.mean([r[f"time/{p}_s"] for r in rows])) for p in PHASES}
    mean["samples_per_s"] = float(np.mean([r["samples_per_s"] for r in rows]))
    return mean


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def loader_ratio(shards: Path, batch: int, batches: int) -> tuple[float, float]:
    """(bound, worker) CPU seconds per sample, the bound measured on the very samples the worker delivered."""
    import torch

    from histotx.config import load_config
    from histotx.data.augment import MultiCrop
    from histotx.data.collate import SSLCollate
    from histotx.data.config import DataConfig
    from histotx.data.loader import build_loader
    from histotx.data.stream import LoaderStats, read_shard
    from histotx.format import decode_sample, read_manifest

    torch.set_num_threads(1)
    data_overrides = [o[len("data.") :] for o in SMALL_MODEL if o.startswith("data.")]
    cfg = load_config(
        DataConfig,
        overrides=data_overrides + [f"stream.shards={shards}", f"stream.batch_size={batch}", "stream.num_workers=1"],
    )
    start = _children_cpu()
    it = iter(build_loader(cfg, rank=0, world_size=1))  # endless: stop after `batches`
    delivered = [b.keys for b in itertools.islice(it, batches)]
    del it  # the worker may have made up to prefetch_factor (2) more batches: counted against it
    gc.collect()
    time.sleep(1.0)  # the worker exits; its CPU time is counted once it has been waited for
    worker = (_children_cpu() - start) / (batch * batches)

    raw = {
        r["__key__"]: r
        for s in read_manifest(shards)["shards"]
        for r in read_shard(str(shards / s["name"]), LoaderStats())
    }
    crop, collate = MultiCrop(cfg.augment), SSLCollate(cfg)
    start = _cpu()
    for i, keys in enumerate(delivered):
        items = [crop(decode_sample(raw[k]), np.random.default_rng([i, j])) for j, k in enumerate(keys)]
        collate(items, np.random.default_rng(i))
    bound = (_cpu() - start) / (batch * batches)
    return bound, worker


def loader_rate(shards: Path, batch: int, samples: int, decode_device: str) -> dict[str, float]:
    """CPU seconds per delivered sample of one loader worker on the default recipe, and the trainer-side
    stage's seconds per sample (wall, synchronised; with decode_device "cuda" decoding and pixel work, else
    the normalisation of the workers' byte views) and the trainer process's CPU seconds in it."""
    import torch

    from histotx.config import load_config
    from histotx.data.config import DataConfig
    from histotx.data.device_decode import BatchDecoder
    from histotx.data.loader import build_loader

    torch.set_num_threads(1)
    batches = max(1, samples // batch)
    cfg = load_config(
        DataConfig,
        overrides=[
            f"stream.shards={shards}",
            f"stream.batch_size={batch}",
            "stream.num_workers=1",
            "stream.shuffle_buffer=64",
            "stream.resample=true",
            f"augment.decode_device={decode_device}",
        ],
    )
    loader = build_loader(cfg, rank=0, world_size=1)
    it = iter(loader)
    delivered = [next(it)]
    first = loader.stats  # the worker's CPU clock when it had made the first batch: start-up left out
    delivered += list(itertools.islice(it, batches))
    last = loader.stats
    del it
    out = {"worker_cpu_s": (last.worker_cpu_s - first.worker_cpu_s) / (last.samples - first.samples)}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    decoder = BatchDecoder(cfg.augment, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    decoder(delivered[0].to(device))  # warm-up: decoder and kernels initialised
    sync()
    wall, cpu = time.perf_counter(), _cpu()
    for b in delivered[1:] or delivered[:1]:
        decoder(b.to(device, non_blocking=True))
    sync()
    n = batch * max(1, len(delivered) - 1)
    out.update(stage_s=(time.perf_counter() - wall) / n, stage_cpu_s=(_cpu() - cpu) / n, stage_device=str(device))
    return out


def loader_stages(shards: Path, batch: int, samples: int) -> dict[str, float]:
    """CPU seconds per sample of each stage of the default recipe (decode on CPU), in one plain loop over
    the shards' samples: shard reading, sample checks + grid decompression, JPEG decode, view drawing
    (geometry, colour draws, sites), then the collation's pixels, tokens and the rest (masks, batch)."""
    import torch

    import histotx.data.collate as collate_module
    from histotx.config import load_config
    from histotx.data.augment import MultiCrop
    from histotx.data.collate import SSLCollate
    from histotx.data.config import DataConfig
    from histotx.data.stream import LoaderStats, read_shard
    from histotx.data.views import TileViews
    from histotx.format import decode_image_rgb, decode_sample, read_manifest

    torch.set_num_threads(1)
    cfg = load_config(DataConfig, overrides=[f"stream.shards={shards}"])
    crop, collate = MultiCrop(cfg.augment), SSLCollate(cfg)
    t = dict.fromkeys(("read", "checks + grid", "JPEG decode", "draw", "pixels", "tokens", "masks + rest"), 0.0)

    def timed(fn, stage):
        def run(*a, **k):
            start = time.process_time()
            out = fn(*a, **k)
            t[stage] += time.process_time() - start
            return out

        return run

    start = time.process_time()
    raw = [r for s in read_manifest(shards)["shards"] for r in read_shard(str(shards / s["name"]), LoaderStats())]
    read_per_sample = (time.process_time() - start) / len(raw)
    raw = (raw * (samples // len(raw) + 1))[:samples]
    collate_module._images = timed(collate_module._images, "pixels")  # (this process only: a benchmark)
    collate_module._tokens = timed(collate_module._tokens, "tokens")
    for i in range(0, samples - batch + 1, batch):
        items = []
        for j, r in enumerate(raw[i : i + batch]):
            tile = timed(decode_sample, "checks + grid")(r)
            rgb = timed(decode_image_rgb, "JPEG decode")(tile.image)
            source = torch.from_numpy(rgb).permute(2, 0, 1)
            globals_, locals_ = timed(crop.draw, "draw")(
                rgb.shape[:2], tile.grid, float(tile.meta["mpp"]), np.random.default_rng([i, j])
            )
            for v in globals_ + locals_:
                v.source = source
            items.append(TileViews(tile.key, globals_, locals_))
        timed(collate, "masks + rest")(items, np.random.default_rng(i))
    t["masks + rest"] -= t["pixels"] + t["tokens"]
    n = samples // batch * batch
    return {**{k: v / n for k, v in t.items()}, "read": read_per_sample}


def print_loader_rate(args: argparse.Namespace, shards: Path) -> None:
    rounds = [
        loader_rate(shards, args.loader_batch, args.loader_samples, args.decode_device) for _ in range(args.rounds)
    ]
    worker = float(np.median([r["worker_cpu_s"] for r in rounds]))
    per_core = 1.0 / worker
    print(
        f"GPU rate model: {GPU_FLOP_PER_SAMPLE / 1e12:.1f} TFLOP per sample (ViT-L/16; teacher 2×224, student "
        f"2×224 + 8×96, fwd + bwd) at {GPU_MFU:.0%} MFU of {GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s (H200 dense bf16): "
        f"{GPU_SAMPLES_PER_S:.0f} samples/s per GPU"
    )
    print(
        f"loader, default recipe (2×224 + 8×96 crops with transcript grids, 256 px JPEG tiles), decode on "
        f"{args.decode_device}, 1 worker, {args.loader_batch * max(1, args.loader_samples // args.loader_batch)} "
        f"samples × {args.rounds} rounds (median; range {min(1 / r['worker_cpu_s'] for r in rounds):.1f}-"
        f"{max(1 / r['worker_cpu_s'] for r in rounds):.1f}): {worker * 1e3:.2f} CPU ms/sample in the worker = "
        f"{per_core:.1f} samples/s per CPU core"
    )
    cores = GPU_SAMPLES_PER_S / per_core
    print(
        f"  cores per GPU at {GPU_SAMPLES_PER_S:.0f} samples/s: {cores:.1f} "
        f"({'meets' if cores <= CORES_PER_GPU_GOAL else 'misses'} the goal of ≤ {CORES_PER_GPU_GOAL})"
    )
    if args.decode_device == "cpu":
        stages = loader_stages(shards, args.loader_batch, args.loader_samples)
        total = sum(stages.values())
        print(
            "  where a sample's CPU time goes (one process, plain loop): "
            + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in stages.items())
            + f" ms; total {total * 1e3:.2f} ms. The worker's steady state adds {(worker - total) * 1e3:.2f} ms "
            f"(shuffle buffer, hand-over of the views in shared memory, queue)"
        )
    stage = float(np.median([r["stage_s"] for r in rounds]))
    stage_cpu = float(np.median([r["stage_cpu_s"] for r in rounds]))
    what = "batched decode_jpeg + crops + colour" if args.decode_device == "cuda" else "normalising the byte views"
    print(
        f"  trainer-side stage on {rounds[0]['stage_device']} ({what}): {stage * 1e3:.3f} ms/sample wall, "
        f"{stage_cpu * 1e3:.3f} CPU ms/sample in the trainer process; at {GPU_SAMPLES_PER_S:.0f} samples/s "
        f"it would take {stage * GPU_SAMPLES_PER_S:.1%} of the device's time"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument(
        "--batch",
        type=int,
        default=32,
        help="per rank (32: a usual per-GPU DINOv2 batch; "
        "at 8 the fixed per-step costs of gloo collectives weigh 3x more)",
    )
    parser.add_argument("--window", type=int, default=10, help="steps per logging window")
    parser.add_argument("--zero", type=int, default=2, help="ZeRO stage")
    parser.add_argument(
        "--loader-batches",
        type=int,
        default=100,
        help="batches per loader measurement (the ≤ 2 prefetched extra weigh ≤ 2 %%)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="loader measurements (worker, then bound)")
    parser.add_argument("--loader-only", action="store_true", help="only the loader rate (3.), no training")
    parser.add_argument(
        "--decode-device", choices=("cpu", "cuda"), default="cpu", help="data.augment.decode_device for the loader rate"
    )
    parser.add_argument("--loader-samples", type=int, default=1600, help="samples per loader-rate round")
    parser.add_argument("--loader-batch", type=int, default=32, help="batch size for the loader rate")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp))
        if args.loader_only:
            print_loader_rate(args, shards)
            return
        t = step_breakdown(shards, Path(tmp) / "run", args.steps, args.batch, args.window, args.zero)
        total = sum(t[p] for p in PHASES)
        print(
            f"ViT 128×4 on CPU, 2 ranks × batch {args.batch}, ZeRO-{args.zero}, {args.steps} steps, windows of "
            f"{args.window} after the first: {t['samples_per_s']:.1f} samples/s"
        )
        for p in PHASES:
            print(f"  {p:<10} {t[p] * 1e3:8.1f} ms  {t[p] / total:6.1%}")
        outside = (t["data_wait"] + t["optimizer"] + t["ema"]) / total
        overhead = (t["optimizer"] + t["ema"]) / total
        print(
            f"  outside forward/backward: {outside:.1%} (target ≤ 5 %); of which optimiser + EMA {overhead:.1%}, "
            f"data wait {t['data_wait'] / total:.1%}"
        )
        # alternate the two measurements: CPU time per sample drifts with what else the machine runs
        rounds = [loader_ratio(shards, args.batch, args.loader_batches) for _ in range(args.rounds)]
        ratios = sorted(b / w for b, w in rounds)
        bound, worker = (float(np.median(x)) for x in zip(*rounds, strict=True))
        print(
            f"loader: decode + augment + collate alone {bound * 1e3:.2f} CPU ms/sample, in a worker "
            f"{worker * 1e3:.2f} CPU ms/sample: per-worker throughput ratio {ratios[len(ratios) // 2]:.2f} "
            f"(median of {args.rounds}, range {ratios[0]:.2f}-{ratios[-1]:.2f}; target ≥ 0.9)"
        )
        print_loader_rate(args, shards)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank":
        rank_main(sys.argv[2:])
    else:
        main()
