"""Packed variable-length attention against a padded-to-max batch, on realistic token counts.

Sequence lengths come from binning tiles with :func:`histotx.tokens.bin_grid` at 2, 8, 16 and 55 µm:
tiles of a real shard set (``--shards DIR``) or, by default, synthetic 112 µm tiles of four kinds
(Visium HD 2 µm bins, Xenium molecules, 55 µm Visium spots, image only) with a random tissue edge.
Each sample's sequence is CLS + registers + image patches + its transcript tokens.

For every resolution it times attention forward + backward:

- padded: every sample padded to the batch maximum, SDPA with a key-padding mask;
- each packed backend of :mod:`histotx.model.attention` (CPU: sdpa, loop, reference; CUDA: xformers, flex, sdpa);
- ideal = padded time × Σ Lᵢ² / (B · Lmax²), the padded cost scaled to the work that is not padding.

and prints packed ÷ ideal (target ≤ 1.1 on GPU) and peak memory (CUDA: the allocator's peak above
the inputs; CPU, Linux: the rise of the resident set's high-water mark, each in a fresh process).

    python benchmarks/attention.py                      # CPU, small settings, about a minute
    python benchmarks/attention.py --device cuda --batch 32 --heads 16 --head-dim 64
    python benchmarks/attention.py --gpu-check          # backends ≡ exact within bf16 rounding; ViT-L fused throughput
    python benchmarks/attention.py --gpu-check --device cpu --size tiny --batch 2 --transcripts 0 196 \
        --lengths 17 90 1 40                            # the same, exercised on CPU (fp32)

TFLOP/s counts the attention matmuls of the samples' own tokens (backward = 2 × forward); --json FILE
writes every figure.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import json
import multiprocessing
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from histotx.format import GRID_EXTENSION, TranscriptGrid, decode_sample
from histotx.model.attention import PackedSeq, attend, xformers_usable
from histotx.shard_reader import read_shard_file
from histotx.tokens import bin_grid
from histotx.train.flops import attention_flops, backbone_flops

TILE_UM = 112.0


# ----------------------------------------------------------------------------------------- token counts


def _tissue(rng: np.random.Generator, xy: np.ndarray, tile_px: float) -> np.ndarray:
    """A straight tissue edge at a random angle covering 20–100 % of the tile."""
    angle = rng.uniform(0, 2 * np.pi)
    proj = (xy - tile_px / 2) @ np.array([np.cos(angle), np.sin(angle)])
    return proj < rng.uniform(-0.3, 0.75) * tile_px


def _grid(rng, xy, genes_per_site, vocab, footprint_um, shape) -> TranscriptGrid:
    nnz = rng.integers(1, genes_per_site + 1, size=len(xy))
    offsets = np.concatenate([[0], np.cumsum(nnz)])
    return TranscriptGrid(
        xy, offsets, rng.integers(0, vocab, offsets[-1]), rng.integers(1, 4, offsets[-1]), footprint_um, shape
    )


def synthetic_grids(n_tiles: int, mpp: float, seed: int = 0) -> list[TranscriptGrid]:
    rng = np.random.default_rng(seed)
    tile_px = TILE_UM / mpp
    grids = []
    for i in range(n_tiles):
        kind = ("visium_hd", "xenium", "visium", "image_only")[i % 4]
        if kind == "visium_hd":
            ticks = (np.arange(int(TILE_UM / 2)) + 0.5) * (2 / mpp)
            xy = np.stack(np.meshgrid(ticks, ticks), -1).reshape(-1, 2)
            xy = xy[_tissue(rng, xy, tile_px) & (rng.random(len(xy)) > 0.1)]
            grids.append(_grid(rng, xy, 6, 18000, 2.0, "square"))
        elif kind == "xenium":
            xy = rng.uniform(0, tile_px, size=(rng.poisson(TILE_UM**2 * rng.uniform(0.3, 1.5)), 2))
            grids.append(_grid(rng, xy[_tissue(rng, xy, tile_px)], 1, 5000, 0.0, "point"))
        elif kind == "visium":
            pitch = 100 / mpp
            rows = np.arange(-1, 3)
            xy = np.array(
                [[(c + 0.5 * (r % 2)) * pitch, r * pitch * np.sqrt(3) / 2] for r in rows for c in range(-1, 3)]
            )
            xy = xy + rng.uniform(0, pitch, size=2)
            xy = xy[(xy >= 0).all(1) & (xy < tile_px).all(1)]
            grids.append(_grid(rng, xy, 40, 18000, 55.0, "disk"))
        else:
            grids.append(TranscriptGrid.empty())
    return grids


def shard_grids(folder: Path, limit: int) -> tuple[list[TranscriptGrid], float]:
    """Transcript grids (and their µm/px) of up to ``limit`` tiles of a shard set."""
    grids, mpps = [], []
    for tar in sorted(Path(folder).glob("*.tar")):
        for members in read_shard_file(tar):
            sample = decode_sample(members)
            grids.append(sample.grid)
            mpps.append(sample.meta["mpp"])
            if len(grids) >= limit:
                return grids, float(np.median(mpps))
    if not grids:
        raise SystemExit(f"{folder}: no *.tar shards with .{GRID_EXTENSION} members")
    return grids, float(np.median(mpps))


# ----------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _padded_step(lengths, heads, dim, device, dtype):
    """Forward + backward of SDPA over the batch padded to its longest sample (key-padding mask)."""
    b, n = len(lengths), max(lengths)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, heads, n, dim, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    keep = (torch.arange(n)[None] < torch.tensor(lengths)[:, None]).to(device)[:, None, None]
    grad = torch.randn(b, heads, n, dim, generator=g).to(device, dtype)

    def step():
        F.scaled_dot_product_attention(q, k, v, attn_mask=keep).backward(grad)

    return step


def _packed_step(lengths, heads, dim, device, dtype, backend):
    g = torch.Generator(device="cpu").manual_seed(0)
    qkv = torch.randn(sum(lengths), 3, heads, dim, generator=g).to(device, dtype).requires_grad_()
    grad = torch.randn(sum(lengths), heads, dim, generator=g).to(device, dtype)
    seq = PackedSeq(lengths, device, backend)

    def step():
        attend(qkv, seq).backward(grad)

    return step


def _make_step(variant, lengths, heads, dim, device, dtype):
    if variant == "padded":
        return _padded_step(lengths, heads, dim, device, dtype)
    return _packed_step(lengths, heads, dim, device, dtype, variant)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _cpu_peak_mib(variant, lengths, heads, dim) -> float:
    """In a fresh process: how far a forward + backward lifts the resident set above where it
    started (after one warm-up step, since first calls also initialise libraries; Linux: the
    high-water mark is reset to the current RSS first)."""
    step = _make_step(variant, lengths, heads, dim, torch.device("cpu"), torch.float32)
    step()
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - base) / 1024


def peak_mib(variant, lengths, heads, dim, device, dtype) -> float:
    if device.type == "cuda":
        step = _make_step(variant, lengths, heads, dim, device, dtype)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    spawn = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        return pool.submit(_cpu_peak_mib, variant, lengths, heads, dim).result()


def benchmark(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.shards:
        grids, mpp = shard_grids(Path(args.shards), args.tiles)
    else:
        grids, mpp = synthetic_grids(args.tiles, args.mpp), args.mpp
    tile_px = int(round(TILE_UM / mpp))
    n_patches = (tile_px // args.patch) ** 2
    default = ["xformers", "flex", "sdpa"] if device.type == "cuda" else ["sdpa", "loop", "reference"]
    backends = args.backends or default
    unavailable = [b for b in backends if b == "xformers" and not xformers_usable()]
    backends = [b for b in backends if b not in unavailable]
    if unavailable:
        print(f"not run (their kernels do not run on {device}): {', '.join(unavailable)}")
    rng = np.random.default_rng(args.seed)
    print(
        f"{len(grids)} tiles ({'shards ' + args.shards if args.shards else 'synthetic'}), {tile_px} px at "
        f"{mpp} µm/px, {n_patches} patches + {1 + args.registers} prefix; batch {args.batch}, heads {args.heads}, "
        f"head dim {args.head_dim}, {dtype}, {device}; attention forward+backward, median of {args.repeats}"
    )
    header = f"{'r µm':>5} {'tokens mean/max':>16} {'Lmax':>5} {'ΣL²share':>8} {'padded ms':>9} {'ideal ms':>8}"
    print(
        header
        + "".join(f" | {b:>9} ms  ÷ideal TFLOP/s" for b in backends)
        + ("  | peak MiB: padded, " + ", ".join(backends) if args.memory else "")
        + "\n(TFLOP/s: the attention matmuls of the samples' own tokens, backward = 2 × forward)"
    )
    rows = []
    for r in args.resolutions:
        tokens = np.array([bin_grid(g, mpp, r, (tile_px, tile_px)).n_cells for g in grids])
        batch = rng.choice(len(grids), size=args.batch, replace=len(grids) < args.batch)
        lengths = [int(1 + args.registers + n_patches + tokens[i]) for i in batch]
        share = sum(n * n for n in lengths) / (len(lengths) * max(lengths) ** 2)
        padded = _median_seconds(
            _make_step("padded", lengths, args.heads, args.head_dim, device, dtype), args.repeats, device
        )
        ideal = padded * share
        flops = 3 * attention_flops(lengths, args.heads * args.head_dim)  # forward + backward = 3 × forward
        result = {
            "resolution_um": r,
            "batch": len(lengths),
            "heads": args.heads,
            "head_dim": args.head_dim,
            "dtype": str(dtype).removeprefix("torch."),
            "max_len": max(lengths),
            "tokens": sum(lengths),
            "sum_sq_share": share,
            "padded_ms": padded * 1e3,
            "ideal_ms": ideal * 1e3,
            "padded_tflops": flops / padded / 1e12,
            "backends": {},
            "unavailable": unavailable,
        }
        row = (
            f"{r:>5g} {f'{tokens.mean():.0f}/{tokens.max()}':>16} {max(lengths):>5} {share:>8.3f} "
            f"{padded * 1e3:>9.1f} {ideal * 1e3:>8.1f}"
        )
        for backend in backends:
            t = _median_seconds(
                _make_step(backend, lengths, args.heads, args.head_dim, device, dtype), args.repeats, device
            )
            result["backends"][backend] = {"ms": t * 1e3, "per_ideal": t / ideal, "tflops": flops / t / 1e12}
            row += f" | {t * 1e3:>12.1f} {t / ideal:>7.2f} {flops / t / 1e12:>7.2f}"
        if args.memory:
            mems = [peak_mib(v, lengths, args.heads, args.head_dim, device, dtype) for v in ["padded", *backends]]
            row += "  | " + ", ".join(f"{m:.0f}" for m in mems)
            result["peak_mib"] = dict(zip(["padded", *backends], mems, strict=True))
        print(row, flush=True)
        rows.append(result)
    return rows


# ----------------------------------------------------------------------------------------- GPU check


def reference_and_bounds(qkv: torch.Tensor, grad: torch.Tensor, lengths: list[int], unit: float, acc_unit: float):
    """Exact (float64) packed attention of ``qkv`` and its input gradient for output gradient ``grad``, with
    first-order bounds on the error of a kernel that works as FlashAttention does: inputs and outputs
    stored at unit roundoff ``unit``, P and dS rounded to it before their matmuls, products and sums
    accumulated at ``acc_unit`` (fp32) over at most max(lengths) terms (the padded batch's keys).
    Returns (out, dqkv, out bound, dqkv bound) in the packed layouts."""
    n_acc = max(lengths)
    outs, grads, out_bounds, grad_bounds = [], [], [], []
    for part, g in zip(qkv.double().split(lengths), grad.double().split(lengths), strict=True):
        q, k, v = part.permute(1, 2, 0, 3)  # each (heads, n, dim)
        do = g.transpose(0, 1)  # (heads, n, dim)
        dim = q.shape[-1]
        scale = dim**-0.5
        p = (q @ k.transpose(-1, -2) * scale).softmax(-1)  # (heads, n, n)
        o = p @ v
        ds = p * (do @ v.transpose(-1, -2) - (do * o).sum(-1, keepdim=True))
        dq, dk, dv = scale * ds @ k, scale * ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ do
        # relative error of each P entry: its logit (a dim-term dot product, then the scaling), the row's
        # exponentials and sum (n_acc terms), carried through the softmax normalisation
        d_logit = (dim + 2) * acc_unit * scale * (q.abs() @ k.abs().transpose(-1, -2))
        eps_p = d_logit + (p * d_logit).sum(-1, keepdim=True) + (n_acc + 8) * acc_unit
        term = unit + n_acc * acc_unit  # per term of a product with a rounded P or dS, accumulated
        b_o = unit * o.abs() + term * (p @ v.abs()) + (p * eps_p) @ v.abs()
        b_dv = unit * dv.abs() + (term * p + p * eps_p).transpose(-1, -2) @ do.abs()
        # dS = P ∘ (dO·Vᵀ − D) with D = rowsum(dO ∘ O) of the stored O, then rounded before dS·K and dSᵀ·Q
        d_dp = dim * acc_unit * (do.abs() @ v.abs().transpose(-1, -2))
        d_d = (do.abs() * (b_o + dim * acc_unit * o.abs())).sum(-1, keepdim=True)
        e_ds = (term + eps_p) * ds.abs() + p * (d_dp + d_d)
        b_dq = unit * dq.abs() + scale * e_ds @ k.abs()
        b_dk = unit * dk.abs() + scale * e_ds.transpose(-1, -2) @ q.abs()
        outs.append(o.transpose(0, 1))
        out_bounds.append(b_o.transpose(0, 1))
        grads.append(torch.stack([dq, dk, dv]).permute(2, 0, 1, 3))  # (n, 3, heads, dim)
        grad_bounds.append(torch.stack([b_dq, b_dk, b_dv]).permute(2, 0, 1, 3))
    return torch.cat(outs), torch.cat(grads), torch.cat(out_bounds), torch.cat(grad_bounds)


def equivalence(args, device: torch.device) -> list[dict]:
    """Each packed backend on one packed batch (bf16 on CUDA, fp32 on CPU), output and gradients, against
    exact float64 attention of the same rounded inputs: the worst error ÷ its first-order bound
    (:func:`reference_and_bounds`) must be ≤ 1. Backends that agree with the exact result within their
    rounding agree with each other; a wrong mask (a token seeing another sample) is off by O(1)."""
    lengths, heads, dim = args.lengths, args.heads, args.head_dim
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    qkv = torch.randn(sum(lengths), 3, heads, dim, generator=g).to(device, dtype)
    grad = torch.randn(sum(lengths), heads, dim, generator=g).to(device, dtype)
    unit = torch.finfo(dtype).eps / 2
    ref_out, ref_grad, b_out, b_grad = reference_and_bounds(
        qkv, grad, lengths, unit, torch.finfo(torch.float32).eps / 2
    )
    tiny = torch.finfo(torch.float64).tiny
    rows = []
    for backend in ["xformers", "flex", "sdpa"] if device.type == "cuda" else ["sdpa", "loop", "reference"]:
        row = {
            "backend": backend,
            "dtype": str(dtype).removeprefix("torch."),
            "lengths": lengths,
            "heads": heads,
            "head_dim": dim,
        }
        try:
            x = qkv.clone().requires_grad_()
            out = attend(x, PackedSeq(lengths, device, backend))
            out.backward(grad)
            d_out, d_grad = out.double() - ref_out, x.grad.double() - ref_grad
            row.update(
                out_ratio=(d_out.abs() / b_out.clamp_min(tiny)).max().item(),
                grad_ratio=(d_grad.abs() / b_grad.clamp_min(tiny)).max().item(),
                max_abs_out=d_out.abs().max().item(),
                max_abs_grad=d_grad.abs().max().item(),
            )
            row["ok"] = row["out_ratio"] <= 1 and row["grad_ratio"] <= 1
            print(
                f"equivalence {backend}, {dtype}, lengths {lengths}, {heads} heads × {dim}: max |Δout| "
                f"{row['max_abs_out']:.2e} ({row['out_ratio']:.3f} of its bound), max |Δgrad| "
                f"{row['max_abs_grad']:.2e} ({row['grad_ratio']:.3f} of its bound) → "
                f"{'OK' if row['ok'] else 'MISMATCH'}",
                flush=True,
            )
        except Exception as exc:  # a backend that does not run here is a result, not the end of the check
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
            print(f"equivalence {backend}: did not run: {row['error']}", flush=True)
        rows.append(row)
    return rows


def _model_step(model, images: torch.Tensor, tx, amp) -> None:
    """One forward and backward of the fused model on a batch (the loss touches every output)."""
    model.zero_grad(set_to_none=True)
    with amp:
        out = model(images, tx)
        loss = out.cls.float().square().mean() + out.patch.float().mean()
        if tx.n_tokens:
            loss = loss + out.transcript.float().mean()
    loss.backward()


def throughput(args, device: torch.device) -> list[dict]:
    from histotx.model import FusedViT, FusedViTConfig, TranscriptBatch
    from histotx.tokens import TranscriptCells

    cfg = FusedViTConfig(
        size=args.size,
        img_size=args.img_size,
        patch_size=args.patch,
        vocab_size=20000,
        attention=args.attention,
        grad_checkpointing=args.checkpointing,
    )
    model = FusedViT(cfg).to(device).train()
    n_patches = (args.img_size // args.patch) ** 2
    amp = torch.autocast(device.type, dtype=torch.bfloat16)
    rng = np.random.default_rng(0)
    print(
        f"FusedViT {args.size}/{args.patch} at {args.img_size} px, bf16 autocast, "
        f"attention {PackedSeq([1], device, cfg.attention).backend}, checkpointing {cfg.grad_checkpointing}; "
        "TFLOP/s counts forward + backward as 3 × the forward's matmuls"
    )
    rows = []
    for n_tx in args.transcripts:
        batch = args.batch or max(1, args.tokens_per_step // (1 + n_patches + n_tx))
        cells = []
        for _ in range(batch):
            nnz = rng.integers(5, 40, size=n_tx)
            offsets = np.concatenate([[0], np.cumsum(nnz)])
            cells.append(
                TranscriptCells(
                    rng.uniform(0, args.img_size, (n_tx, 2)),
                    offsets,
                    rng.integers(0, 20000, offsets[-1]),
                    rng.uniform(0, 5, offsets[-1]),
                    2.0,
                )
            )
        tx = TranscriptBatch.collate(cells).to(device)
        images = torch.randn(batch, 3, args.img_size, args.img_size, device=device)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = _median_seconds(functools.partial(_model_step, model, images, tx, amp), args.repeats, device)
        lengths = [1 + n_patches + n_tx] * batch
        flops = 3 * backbone_flops(cfg, lengths, n_patches * batch)  # forward + backward ≈ 3 × forward
        mem = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
        print(
            f"  {n_tx:>5} transcript tokens/sample, batch {batch:>3}: {sum(lengths) / seconds:,.0f} tokens/s, "
            f"{flops / seconds / 1e12:.2f} TFLOP/s, {seconds * 1e3:.1f} ms/step{mem}",
            flush=True,
        )
        rows.append(
            {
                "transcripts": n_tx,
                "batch": batch,
                "tokens_per_s": sum(lengths) / seconds,
                "tflops": flops / seconds / 1e12,
                "ms_per_step": seconds * 1e3,
            }
        )
    return rows


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--shards", help="a shard folder to take token counts from (default: synthetic tiles)")
    p.add_argument("--tiles", type=int, default=64, help="tiles to draw token counts from")
    p.add_argument("--mpp", type=float, default=0.5, help="µm/px of the synthetic tiles")
    p.add_argument("--resolutions", type=float, nargs="+", default=[2, 8, 16, 55])
    p.add_argument(
        "--batch",
        type=int,
        help="samples per batch (default: 32 on CUDA, 4 on CPU; --gpu-check: as many as --tokens-per-step allows)",
    )
    p.add_argument("--tokens-per-step", type=int, default=32768, help="--gpu-check: token budget of one step")
    p.add_argument("--heads", type=int, default=16 if cuda else 2)
    p.add_argument("--head-dim", type=int, default=64 if cuda else 32)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--registers", type=int, default=0)
    p.add_argument("--backends", nargs="+", help="packed backends to time (default: all that run here)")
    p.add_argument("--repeats", type=int, default=5 if cuda else 2)
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurements")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--gpu-check",
        action="store_true",
        help="every backend ≡ exact attention within bf16 rounding, then fused-model throughput",
    )
    p.add_argument("--equivalence", action="store_true", help="only the backends' agreement of --gpu-check")
    p.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=[197, 3333, 1, 600],
        help="--gpu-check/--equivalence: the packed batch's sequence lengths",
    )
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.add_argument("--size", default="L", help="--gpu-check: model size preset")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument(
        "--transcripts", type=int, nargs="+", default=[0, 196, 3136], help="--gpu-check: transcript tokens per sample"
    )
    p.add_argument("--attention", default="auto")
    p.add_argument("--checkpointing", action="store_true")
    args = p.parse_args()
    if args.batch is None and not args.gpu_check:
        args.batch = 32 if args.device == "cuda" else 4
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    if args.gpu_check or args.equivalence:
        results["equivalence"] = equivalence(args, device)
        if args.gpu_check:
            results["throughput"] = throughput(args, device)
    else:
        results["benchmark"] = benchmark(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if not all(row["ok"] for row in results.get("equivalence", [])):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
