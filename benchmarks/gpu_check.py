"""The Python half of benchmarks/gpu_check.sh: the environment and xformers probes, and the final table.

    python benchmarks/gpu_check.py env --json OUT/env.json          # interpreter, torch, CUDA, project imports
    python benchmarks/gpu_check.py xformers --json OUT/xformers.json
    python benchmarks/gpu_check.py report OUT [--dry-run]           # one table from every step's files in OUT

The probes write what they saw as JSON and exit 0 whenever they could look (a missing package is a
finding, not a crash); `report` turns the step files that gpu_check.sh leaves in OUT (STEP.log, STEP.rc
holding "exit-status seconds timeout", and the JSON the benchmarks write) into rows of
(check, result, figure, target, pass/fail), prints them and writes OUT/table.md and OUT/table.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import importlib.util
import json
import platform
import re
import sys
from pathlib import Path

TORCH_PIN = "2.14.1"  # the Makefile's pin
# what the checks import: the project's training path, and xformers for the attention kernels
MODULES = (
    "torch",
    "torchvision",
    "yaml",
    "numpy",
    "deepspeed",
    "webdataset",
    "imagecodecs",
    "timm",
    "safetensors",
    "einops",
    "zarr",
    "anndata",
    "xformers",
    "histotx",
)
BACKENDS = ("xformers", "flex", "sdpa")
LENGTHS = [197, 3333, 1, 600]  # a packed ViT-L batch: 224 px image tokens alone, with 2 µm bins, CLS only, Xenium
MFU_TARGET = 0.45
DATASHEET_TFLOPS = 989.0  # H100/H200 SXM dense bf16; gpu_train_check.py's MFU is against 790, measured here
CORES_TARGET = 4.0
SKIP_NO_CUDA = "skipped (no CUDA)"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------- env


def env_probe() -> dict:
    """Versions, and which modules the checks import are not installed (found, not imported: the steps
    import them and say so when one is broken)."""
    info = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch_pin": TORCH_PIN,
        "modules": {},
        "missing": [],
    }
    for name in MODULES:
        found = importlib.util.find_spec(name) is not None
        info["modules"][name] = found
        if not found:
            info["missing"].append(name)
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cuda"] = torch.cuda.is_available()
        info["device"] = torch.cuda.get_device_name(0) if info["cuda"] else None
    except Exception:  # no torch: the row says so
        info.update(torch=None, torch_cuda=None, cuda=False, device=None)
    return info


# ------------------------------------------------------------------------------------------------- xformers


def xformers_probe(lengths: list[int], heads: int, dim: int) -> dict:
    """Whether xformers imports, whether its own C++/CUDA library (_C.so) loads, and on CUDA which
    operators its dispatcher picks for a packed bf16 batch and which kernels actually ran (profiler)."""
    info = {"version": _version("xformers"), "cuda": False}
    if info["version"] is None:
        info["status"] = "not installed"
        return info
    try:
        import torch
        import xformers
        from xformers import _cpp_lib
        from xformers.ops import fmha
    except Exception as exc:
        info.update(status="import failed", error=f"{type(exc).__name__}: {exc}"[:500])
        return info
    failure = _cpp_lib._cpp_library_load_exception
    info["c_library_loaded"] = bool(xformers._has_cpp_library)
    if failure is not None:  # the root cause (a missing shared library, an undefined symbol) sits in the chain
        causes, exc = [], failure
        while exc is not None:
            causes.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
            exc = exc.__cause__
        info["c_library_error"] = causes[-1][:300]
    info["cuda"] = torch.cuda.is_available()
    if not info["cuda"]:
        info["status"] = SKIP_NO_CUDA
        return info
    try:
        device = torch.device("cuda")
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (
            torch.randn(1, sum(lengths), heads, dim, generator=g).to(device, torch.bfloat16).requires_grad_()
            for _ in range(3)
        )
        bias = fmha.BlockDiagonalMask.from_seqlens(lengths, device=device)
        inp = fmha.Inputs(query=q, key=k, value=v, attn_bias=bias)
        from xformers.ops.fmha import dispatch

        fw = dispatch._dispatch_fw(inp, True)
        info["forward_op"] = fw.NAME
        passed_over = {}  # the operators xformers prefers to the one it chose, and why each was not used
        for op in dispatch._dispatch_fw_priority_list(inp, True):
            if op is fw:
                break
            passed_over[op.NAME] = op.not_supported_reasons(inp)
        info["passed_over"] = passed_over
        info["backward_op"] = dispatch._dispatch_bw(inp, varlen_lse_packed=getattr(fw, "VARLEN_LSE_PACKED", None)).NAME
        from torch.profiler import ProfilerActivity, profile

        fmha.memory_efficient_attention(q, k, v, attn_bias=bias).sum().backward()  # warm-up
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = fmha.memory_efficient_attention(q, k, v, attn_bias=bias)
            out.float().square().sum().backward()
            torch.cuda.synchronize()
        kernels = sorted(
            ((e.device_time_total, e.key) for e in prof.key_averages() if e.device_time_total > 0), reverse=True
        )
        info["kernels"] = [name[:90] for _, name in kernels[:4]]
        info["finite"] = bool(torch.isfinite(out).all() and torch.isfinite(q.grad).all())
        info["status"] = "ran" if info["finite"] else "ran, non-finite output"
    except Exception as exc:
        info.update(status="failed on CUDA", error=f"{type(exc).__name__}: {exc}"[:500])
    return info


# ------------------------------------------------------------------------------------------------- report


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _step(out: Path, name: str) -> dict:
    """How a step ended: ran / failed / timed out / not run, its seconds, and its log's last lines."""
    rc_file, log = out / f"{name}.rc", out / f"{name}.log"
    if not rc_file.exists():
        return {"state": "not run", "log": ""}
    rc, seconds, timeout = rc_file.read_text().split()[:3]
    text = log.read_text(errors="replace") if log.exists() else ""
    state = "ok" if rc == "0" else "timed out" if rc in ("124", "137") else "failed"
    return {"state": state, "rc": int(rc), "seconds": float(seconds), "timeout": float(timeout), "log": text}


def _failure(step: dict) -> str:
    """A short reason for a step that did not end well: its state and its log's last meaningful line."""
    lines = [ln.strip() for ln in step["log"].splitlines() if ln.strip() and not ln.startswith(" ")]
    last = lines[-1][:160] if lines else "no output"
    if step["state"] == "timed out" and step["timeout"] == 0:  # gpu_check.sh gave it no time
        return last
    if step["state"] == "timed out":
        return f"timed out after {step['timeout']:.0f} s ({last})"
    if step["state"] == "not run":
        return "not run"
    return f"{step['state']} (exit {step['rc']}): {last}"


def _row(check, result, figure="", target="", verdict="") -> dict:
    return {"check": check, "result": result, "figure": figure, "target": target, "pass/fail": verdict}


def env_rows(out: Path) -> list[dict]:
    step, info = _step(out, "env"), _load(out / "env.json")
    if not info:
        return [_row("python environment", _failure(step), target=f"torch {TORCH_PIN}", verdict="FAIL")]
    figure = f"Python {info['python']}, torch {info['torch']} (CUDA {info['torch_cuda']}), {info['device'] or 'no GPU'}"
    problems = [f"missing {', '.join(info['missing'])}"] if info["missing"] else []
    if info["torch"] and info["torch"].split("+")[0] != TORCH_PIN:
        problems.append(f"torch {info['torch'].split('+')[0]} is not the pin")
    install = _load(out / "install.json") or {}
    result = "; ".join(problems) or "ok"
    if install.get("ran"):
        result += f"; installed: {install['what']} ({'ok' if install['ok'] else 'failed'})"
    return [
        _row(
            "python environment",
            result,
            figure,
            f"torch {TORCH_PIN}, every module imports",
            "FAIL" if problems else "PASS",
        )
    ]


def xformers_rows(out: Path) -> list[dict]:
    step, info = _step(out, "xformers"), _load(out / "xformers.json")
    if not info:
        reason = _failure(step)
        return [
            _row("xformers _C.so loads", reason, verdict="FAIL"),
            _row("xformers attention runs", reason, verdict="FAIL"),
        ]
    if info["version"] is None or "c_library_loaded" not in info:
        reason = info.get("status", "?") + (f": {info['error']}" if info.get("error") else "")
        return [
            _row("xformers _C.so loads", reason, target="loads with the torch pin", verdict="FAIL"),
            _row("xformers attention runs", reason, target="runs on CUDA", verdict="FAIL"),
        ]
    loaded = info["c_library_loaded"]
    # _C.so holds xformers' own CUDA kernels (sparse 2:4, indexing); its attention operators named "-pt"
    # are PyTorch's bundled FlashAttention-2 / CUTLASS kernels and run whether or not _C.so loads
    rows = [
        _row(
            "xformers _C.so loads",
            "loaded" if loaded else "not loaded",
            f"xformers {info['version']}" + ("" if loaded else f"; {info.get('c_library_error', '')}"),
            "loads with the torch pin (attention does not need it: see the next row's operator)",
            "PASS" if loaded else "FAIL",
        )
    ]
    target = "memory_efficient_attention, bf16, BlockDiagonalMask, on CUDA"
    if not info["cuda"]:
        rows.append(_row("xformers attention runs", SKIP_NO_CUDA, target=target, verdict="SKIP"))
    elif info.get("status") == "ran":
        passed = "; ".join(f"{op} not used: {', '.join(why)}" for op, why in info.get("passed_over", {}).items())
        rows.append(
            _row(
                "xformers attention runs",
                f"ran: forward {info['forward_op']}, backward {info['backward_op']}"
                + (f" ({passed})" if passed else ""),
                "kernels: " + "; ".join(info.get("kernels", [])),
                target,
                "PASS",
            )
        )
    else:
        rows.append(
            _row(
                "xformers attention runs",
                f"{info.get('status')}: {info.get('error', '')}"[:300],
                target=target,
                verdict="FAIL",
            )
        )
    return rows


def agreement_rows(out: Path, dry: bool) -> list[dict]:
    step, info = _step(out, "equivalence"), _load(out / "equivalence.json")
    found = {r["backend"]: r for r in (info or {}).get("equivalence", [])}
    rows = []
    for backend in BACKENDS:
        check = f"packed attention ≡ exact: {backend}"
        r = found.get(backend)
        if r is None:
            result = SKIP_NO_CUDA if dry and backend != "sdpa" else _failure(step)
            rows.append(
                _row(
                    check,
                    result,
                    target="error ≤ 1 × its rounding bound",
                    verdict="SKIP" if dry and backend != "sdpa" else "FAIL",
                )
            )
            continue
        target = f"error ≤ 1 × its first-order {r['dtype']} bound, vs float64"
        if "error" in r:
            rows.append(_row(check, f"did not run: {r['error']}"[:300], target=target, verdict="FAIL"))
            continue
        figure = (
            f"out {r['out_ratio']:.3f}, grad {r['grad_ratio']:.3f} of the bound; largest Δout "
            f"{r['max_abs_out']:.1e}, Δgrad {r['max_abs_grad']:.1e}; {r['dtype']}, lengths {r['lengths']}, "
            f"{r['heads']}×{r['head_dim']}"
        )
        rows.append(_row(check, "agrees" if r["ok"] else "MISMATCH", figure, target, "PASS" if r["ok"] else "FAIL"))
    return rows


def throughput_rows(out: Path, dry: bool) -> list[dict]:
    step, info = _step(out, "attention"), _load(out / "attention.json")
    results = (info or {}).get("benchmark", [])
    rows = []
    for backend in BACKENDS:
        check = f"attention TFLOP/s: {backend}"
        packed = backend != "sdpa"  # sdpa pads uneven batches: it is the baseline, no target
        target = "time ÷ ideal ≤ 1.1 (ideal: padded SDPA × non-padding share)" if packed else "— (padded baseline)"
        figures = [(r["resolution_um"], r["backends"][backend], r) for r in results if backend in r["backends"]]
        if not figures:
            if dry and backend != "sdpa":
                rows.append(_row(check, SKIP_NO_CUDA, target=target, verdict="SKIP"))
            elif any(backend in r.get("unavailable", []) for r in results):
                rows.append(_row(check, "not run: its kernels do not run here", target=target, verdict="FAIL"))
            else:
                rows.append(_row(check, _failure(step), target=target, verdict="FAIL"))
            continue
        figure = "; ".join(
            f"{b['tflops']:.1f} TFLOP/s at {res:g} µm (÷ideal {b['per_ideal']:.2f}, {r['dtype']}, "
            f"batch {r['batch']}, Lmax {r['max_len']})"
            for res, b, r in figures
        )
        ok = all(b["per_ideal"] <= 1.1 for _, b, _ in figures)
        if dry:
            rows.append(_row(check, "ran on CPU (dry run)", figure, target, "SKIP"))
        else:
            rows.append(_row(check, "ran", figure, target, ("PASS" if ok else "FAIL") if packed else "INFO"))
    return rows


def train_rows(out: Path, dry: bool) -> list[dict]:
    step, info = _step(out, "train"), _load(out / "train.json")
    target = f"MFU ≥ {MFU_TARGET:.0%}"
    if not info:
        return [
            _row("ViT-L/16 bf16 ZeRO-2 MFU", _failure(step), target=target, verdict="FAIL"),
            _row("ViT-L/16 end to end (loader)", _failure(step), verdict="FAIL"),
        ]
    mfu = (
        f"MFU {info['mfu']:.1%} ({info['tflops']:.1f} of {info['peak_tflops']:.0f} TFLOP/s; "
        f"{info['tflops'] / DATASHEET_TFLOPS:.1%} of the datasheet's {DATASHEET_TFLOPS:.0f}), "
        f"{info['ms_per_step']:.0f} ms/step, {info['samples_per_s']:.1f} samples/s, batch {info['batch']}, "
        f"{info['steps']} steps, peak {info['peak_memory_gib']:.1f} GiB"
    )
    e2e = (
        f"{info['end_to_end_samples_per_s']:.1f} samples/s from {info['loader_workers']} loader workers "
        f"({info['end_to_end_samples_per_s'] / info['samples_per_s']:.2f} of the model's rate)"
    )
    if dry:
        return [
            _row("ViT-L/16 bf16 ZeRO-2 MFU", f"ran on CPU (dry run, {info['model']} model)", mfu, target, "SKIP"),
            _row("ViT-L/16 end to end (loader)", "ran on CPU (dry run)", e2e, "— (info)", "SKIP"),
        ]
    ok = info["mfu"] >= MFU_TARGET
    return [
        _row("ViT-L/16 bf16 ZeRO-2 MFU", "ran", mfu, target, "PASS" if ok else "FAIL"),
        _row("ViT-L/16 end to end (loader)", "ran", e2e, "— (info)", "INFO"),
    ]


def loader_figures(log: str) -> dict:
    """The figures benchmarks/train_step.py --loader-only prints (absent ones left out)."""
    found = {}
    if m := re.search(r"= ([\d.]+) samples/s per CPU core", log):
        found["per_core"] = float(m.group(1))
    if m := re.search(r"cores per GPU at ([\d.]+) samples/s: ([\d.]+)", log):
        found["gpu_rate"], found["cores"] = float(m.group(1)), float(m.group(2))
    if m := re.search(
        r"trainer-side stage on (\S+) .*?: ([\d.]+) ms/sample wall.*?take ([\d.]+)% of the device's time", log
    ):
        found["stage_device"], found["stage_ms"], found["stage_share"] = (
            m.group(1),
            float(m.group(2)),
            float(m.group(3)),
        )
    return found


def loader_rows(out: Path, dry: bool) -> list[dict]:
    rows = []
    for device in ("cuda", "cpu"):
        check = f"loader, {device.upper()} JPEG decode"
        target = f"≤ {CORES_TARGET:g} loader cores per GPU at the ViT-L step rate"
        step = _step(out, f"loader_{device}")
        if device == "cuda" and dry:
            rows.append(_row(check, SKIP_NO_CUDA, target=target, verdict="SKIP"))
            continue
        if step["state"] != "ok":
            missing = re.search(r"unrecognized arguments: .*|invalid choice: .*", step["log"])
            result = (
                f"not available: benchmarks/train_step.py has no such option ({missing.group(0)[:100]})"
                if missing
                else _failure(step)
            )
            rows.append(_row(check, result, target=target, verdict="FAIL"))
            continue
        f = loader_figures(step["log"])
        parts = []
        if "per_core" in f:
            parts.append(f"{f['per_core']:.1f} samples/s per worker CPU core")
        if "cores" in f:
            parts.append(f"{f['cores']:.1f} cores per GPU at {f['gpu_rate']:.0f} samples/s")
        if "stage_ms" in f:
            parts.append(
                f"trainer-side stage on {f['stage_device']}: {f['stage_ms']:.3f} ms/sample, "
                f"{f['stage_share']:.1f} % of the device's time"
            )
        figure = "; ".join(parts) or "no figures in the log: " + " / ".join(step["log"].strip().splitlines()[-2:])[:200]
        if dry:
            rows.append(_row(check, "ran on CPU (dry run)", figure, target, "SKIP"))
        elif device == "cuda" and not f.get("stage_device", "").startswith("cuda"):
            rows.append(
                _row(
                    check, f"the decode stage ran on {f.get('stage_device', '?')}, not the GPU", figure, target, "FAIL"
                )
            )
        elif "cores" in f:
            rows.append(_row(check, "ran", figure, target, "PASS" if f["cores"] <= CORES_TARGET else "FAIL"))
        else:
            rows.append(_row(check, "ran", figure, target, "INFO"))
    return rows


def report(out: Path, dry: bool, budget_s: float, elapsed_s: float) -> list[dict]:
    rows = (
        env_rows(out)
        + xformers_rows(out)
        + agreement_rows(out, dry)
        + throughput_rows(out, dry)
        + train_rows(out, dry)
        + loader_rows(out, dry)
    )
    steps = {f.stem: _step(out, f.stem)["seconds"] for f in sorted(out.glob("*.rc"))}
    figure = f"{elapsed_s:.0f} s end to end (" + ", ".join(f"{k} {v:.0f}" for k, v in steps.items()) + ")"
    rows.append(
        _row(
            "gpu_check wall time",
            "dry run" if dry else "measured",
            figure,
            f"≤ {budget_s:.0f} s",
            "SKIP" if dry else ("PASS" if elapsed_s <= budget_s else "FAIL"),
        )
    )
    return rows


def render(rows: list[dict]) -> str:
    """A markdown table (pipes in cells escaped) that reads as plain text too."""
    cols = list(rows[0])
    cells = [[str(r[c]).replace("|", "/").replace("\n", " ") for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_env = sub.add_parser("env", help="interpreter, torch, CUDA and the project's imports")
    p_env.add_argument("--json", type=Path, required=True)
    p_x = sub.add_parser("xformers", help="xformers' library load, dispatch and kernels on CUDA")
    p_x.add_argument("--json", type=Path, required=True)
    p_x.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    p_x.add_argument("--heads", type=int, default=16)
    p_x.add_argument("--head-dim", type=int, default=64)
    p_r = sub.add_parser("report", help="the table from a gpu_check.sh output folder")
    p_r.add_argument("out", type=Path)
    p_r.add_argument("--dry-run", action="store_true")
    p_r.add_argument("--budget-s", type=float, default=480.0)
    p_r.add_argument("--elapsed-s", type=float, default=0.0, help="the whole run's seconds, set-up included")
    args = parser.parse_args()
    if args.command == "env":
        info = env_probe()
        args.json.write_text(json.dumps(info, indent=1))
        print(json.dumps(info, indent=1))
    elif args.command == "xformers":
        info = xformers_probe(args.lengths, args.heads, args.head_dim)
        args.json.write_text(json.dumps(info, indent=1))
        print(json.dumps(info, indent=1))
    else:
        rows = report(args.out, args.dry_run, args.budget_s, args.elapsed_s)
        table = render(rows)
        (args.out / "table.md").write_text(table + "\n")
        (args.out / "table.json").write_text(json.dumps(rows, indent=1))
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
