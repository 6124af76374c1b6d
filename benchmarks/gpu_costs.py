"""The known GPU costs a first GPU session measures (issue 26), in one run, one line and one JSON record each.

    python benchmarks/gpu_costs.py [--json OUT.json] [--peak-tflops 989] [--shards DIR]
    python benchmarks/gpu_costs.py --dry-run          # no GPU: the same code paths on CPU at tiny sizes

On a bare GPU machine with only the repository: `bash benchmarks/gpu_check.sh --prepare` here (carried
wheels in .gpu_check/wheels, a shard set in .gpu_check/shards), then there, in one command,
`GPU_CHECK_OUT=$OUT bash benchmarks/gpu_check.sh; python3 benchmarks/gpu_costs.py --json $OUT/costs.json`
(gpu_check.sh installs the carried wheels offline first; nothing is downloaded there; ~5 min on one H200
for this script, most of it building ViT-L trainers). What it measures:

  sdpa_mask      a packed bf16 batch with a key-padding mask through torch's SDPA with the math kernel
                 disabled: which of flash / memory-efficient / cuDNN accept it (none: the mask forces math)
  memory         ViT-L, batch 32, peak memory of a training step with gradient checkpointing off and on, at
                 8 µm and at 55 µm token resolution (OOM is recorded, not fatal)
  tf32           the fp32 head GEMMs (tokens × D → prototypes) with TF32 off and on: ms and max |difference|
  host_syncs     host-device synchronisations during one training step (torch.cuda sync debug mode)
  save_resume    N steps straight vs. N/2, save, a new trainer resumed, N/2 more: losses equal (bit for bit)
  zero3_ema      the EMA update's time per step under ZeRO-2 and ZeRO-3 (log.phase_timing)
  mfu            model FLOPs / s of held batches against --peak-tflops (H200 datasheet, dense bf16: 989)

Figures are for one GPU and one rank. Each measurement runs in its own try block: a failure is a
record {"error": ...}, never the end of the run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from gpu_train_check import make_shards, synchronize, timed_steps  # noqa: E402


def trainer_for(args, shards: Path, out: Path, *overrides: str, resume: str | None = None):
    from histotx.config import load_config
    from histotx.train.config import TrainConfig
    from histotx.train.loop import Trainer

    config = REPO / "configs" / "train" / ("tiny_cpu.yaml" if args.dry_run else "vit_l16_uni.yaml")
    cfg = load_config(
        TrainConfig,
        config,
        [
            f"data.stream.shards={shards}",
            f"out={out}",
            f"data.stream.batch_size={args.batch}",
            "data.stream.num_workers=1",
            "data.stream.resample=true",
            "log.progress=false",
            "log.tensorboard=false",
            "checkpoint.every_steps=1000000",
            "steps=1000",
            f"require_cuda={'false' if args.dry_run else 'true'}",
            *(["data.collate.resolutions_um=[16.0]"] if args.dry_run else []),
            *overrides,
        ],
    )
    return Trainer(cfg, resume)


def release(trainer) -> None:
    """Stop a trainer's loader workers and free its engine, keeping the process group: DeepSpeed keeps
    references to the group it first saw, so every trainer of this process shares one (destroyed at exit)."""
    trainer._batches = None
    trainer.engine = trainer.optimizer = trainer.meta = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sdpa_mask(args) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = "cuda" if not args.dry_run else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    b, h, n, d = (32, 16, 197, 64) if device == "cuda" else (2, 2, 16, 8)
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    lengths = torch.randint(n // 2, n + 1, (b,), device=device)
    keep = torch.arange(n, device=device)[None, :] < lengths[:, None]  # key padding: True = attend
    mask = keep[:, None, None, :].expand(b, 1, n, n)
    out = {}
    for name, backend in (
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
    ):
        try:
            with sdpa_kernel([backend]):
                y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                y.float().sum().backward()
            out[name] = "runs forward and backward"
        except RuntimeError as exc:
            out[name] = f"refused: {str(exc).splitlines()[0][:160]}"
    out["off_math"] = any(v.startswith("runs") for v in out.values())
    return out


def memory(args, shards: Path, tmp: Path) -> dict:
    from histotx.train.engine import memory_mb

    out = {}
    resolutions = (8.0, 55.0) if not args.dry_run else (16.0, 32.0)
    for um, gc in itertools.product(resolutions, (False, True)):
        key = f"{um:g}um_gc_{'on' if gc else 'off'}"
        trainer = trainer_for(
            args,
            shards,
            tmp / key,
            f"data.collate.resolutions_um=[{um}]",
            f"model.grad_checkpointing={str(gc).lower()}",
        )
        try:
            if trainer.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(trainer.device)
            batch = trainer.next_batch()
            trainer.train_step(batch)
            synchronize(trainer.device)
            out[key] = {"peak_gib": memory_mb(trainer.device) / 1024, "global_crops": int(batch.global_images.shape[0])}
        except torch.cuda.OutOfMemoryError as exc:
            out[key] = {"oom": str(exc).splitlines()[0][:200]}
        finally:
            release(trainer)
    return out


def tf32(args) -> dict:
    device = "cuda" if not args.dry_run else "cpu"
    rows, dim, protos = (32 * 2 * 197, 1024, 65536) if device == "cuda" else (64, 32, 128)
    x = torch.randn(rows, dim, device=device)
    w = torch.randn(protos, dim, device=device) / dim**0.5
    out = {}
    results = {}
    for on in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = on
        for _ in range(3):
            y = x @ w.T
        synchronize(torch.device(device))
        t0 = time.perf_counter()
        for _ in range(10):
            y = x @ w.T
        synchronize(torch.device(device))
        out[f"ms_tf32_{'on' if on else 'off'}"] = (time.perf_counter() - t0) / 10 * 1e3
        results[on] = y
    torch.backends.cuda.matmul.allow_tf32 = False
    out["max_abs_difference"] = float((results[True] - results[False]).abs().max())
    return out


def host_syncs(args, shards: Path, tmp: Path) -> dict:
    trainer = trainer_for(args, shards, tmp / "syncs")
    try:
        batch = trainer.next_batch()
        trainer.train_step(batch)  # warm-up
        batch = trainer.next_batch()
        if trainer.device.type != "cuda":
            return {"skipped": "no CUDA: host syncs are a GPU cost"}
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.train_step(batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        where = sorted({str(w.filename).split("site-packages/")[-1] + f":{w.lineno}" for w in caught})
        return {"syncs_per_step": len(caught), "where": where[:20]}
    finally:
        release(trainer)


def save_resume(args, shards: Path, tmp: Path) -> dict:
    n = 4
    straight = trainer_for(args, shards, tmp / "straight")
    try:
        losses = [straight.train_step(straight.next_batch())["loss"] for _ in range(n)]
    finally:
        release(straight)
    first = trainer_for(args, shards, tmp / "broken")
    try:
        part = [first.train_step(first.next_batch())["loss"] for _ in range(n // 2)]
        first.save()
    finally:
        release(first)
    second = trainer_for(args, shards, tmp / "broken", resume="auto")
    try:
        part += [second.train_step(second.next_batch())["loss"] for _ in range(n - n // 2)]
    finally:
        release(second)
    return {"straight": losses, "resumed": part, "equal": losses == part}


def zero3_ema(args, shards: Path, tmp: Path) -> dict:
    from histotx.train.metrics import Window

    out = {}
    for stage in (2, 3):
        trainer = trainer_for(
            args, shards, tmp / f"ema{stage}", f"deepspeed.zero_stage={stage}", "log.phase_timing=true"
        )
        try:
            held = [trainer.next_batch() for _ in range(2)]
            window = Window()
            for batch in itertools.islice(itertools.cycle(held), 6):
                trainer.train_step(batch, window)
            out[f"zero{stage}_ema_ms_per_step"] = window.times.get("ema", 0.0) / 6 * 1e3
            out[f"zero{stage}_step_ms"] = (
                sum(window.times.get(k, 0.0) for k in ("forward", "backward", "optimizer", "ema")) / 6 * 1e3
            )
        finally:
            release(trainer)
    return out


def mfu(args, shards: Path, tmp: Path) -> dict:
    trainer = trainer_for(args, shards, tmp / "mfu")
    try:
        held = [trainer.next_batch() for _ in range(2)]
        timed_steps(trainer, itertools.cycle(held), 2 if args.dry_run else 5)
        steps = 2 if args.dry_run else 20
        seconds, flops, samples = timed_steps(trainer, itertools.cycle(held), steps)
        tflops = flops / seconds / 1e12
        return {
            "tflops": tflops,
            "mfu": tflops / args.peak_tflops,
            "peak_tflops": args.peak_tflops,
            "samples_per_s": samples / seconds,
        }
    finally:
        release(trainer)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H200 datasheet: 989)")
    p.add_argument("--shards", type=Path, help="a shard set (default: .gpu_check/shards if present, else made)")
    p.add_argument("--batch", type=int, default=None, help="samples per step (default 32; dry run 2)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny config: check the code paths")
    p.add_argument("--only", nargs="*", help="run only these measurements")
    args = p.parse_args()
    args.dry_run = args.dry_run or not torch.cuda.is_available()
    args.batch = args.batch or (2 if args.dry_run else 32)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    results: dict[str, dict] = {
        "device": {"name": torch.cuda.get_device_name() if not args.dry_run else "cpu (dry run)"}
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        prepared = REPO / ".gpu_check" / "shards"
        shards = args.shards or (prepared if prepared.is_dir() else make_shards(tmp / "data"))
        steps = {
            "sdpa_mask": lambda: sdpa_mask(args),
            "tf32": lambda: tf32(args),
            "memory": lambda: memory(args, shards, tmp),
            "host_syncs": lambda: host_syncs(args, shards, tmp),
            "save_resume": lambda: save_resume(args, shards, tmp),
            "zero3_ema": lambda: zero3_ema(args, shards, tmp),
            "mfu": lambda: mfu(args, shards, tmp),
        }
        for name, fn in steps.items():
            if args.only and name not in args.only:
                continue
            t0 = time.perf_counter()
            try:
                results[name] = fn()
            except Exception as exc:  # noqa: BLE001 - one failed measurement is a record, not the end
                results[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}
            results[name]["seconds"] = round(time.perf_counter() - t0, 1)
            print(f"{name}: {json.dumps(results[name], default=str)[:600]}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
