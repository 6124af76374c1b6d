"""benchmarks/gpu_check.sh, the one GPU check script: its CPU dry run runs every step's command line and
prints the whole table, and its table's verdicts follow the figures the steps leave."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from shardkit import write_shard_set

REPO = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(gpu_check)

CHECKS = [
    "python environment",
    "xformers _C.so loads",
    "xformers attention runs",
    *(f"packed attention ≡ exact: {b}" for b in gpu_check.BACKENDS),
    *(f"attention TFLOP/s: {b}" for b in gpu_check.BACKENDS),
    "ViT-L/16 bf16 ZeRO-2 MFU",
    "ViT-L/16 end to end (loader)",
    "loader, CUDA JPEG decode",
    "loader, CPU JPEG decode",
    "gpu_check wall time",
]


@pytest.mark.slow
def test_dry_run_prints_every_row(tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "GPU_CHECK_SHARDS": str(write_shard_set(tmp_path / "shards")),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    run = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    rows = json.loads((out / "table.json").read_text())
    assert [r["check"] for r in rows] == CHECKS
    table = (out / "table.md").read_text()
    assert run.stdout.rstrip().endswith(table.rstrip())  # the table is the last thing printed
    by = {r["check"]: r for r in rows}
    logs = {p.stem: p.read_text()[-2000:] for p in out.glob("*.log")}
    for check in (
        "xformers attention runs",
        "packed attention ≡ exact: xformers",
        "packed attention ≡ exact: flex",
        "attention TFLOP/s: xformers",
        "attention TFLOP/s: flex",
        "loader, CUDA JPEG decode",
    ):
        assert by[check]["result"] == "skipped (no CUDA)" and by[check]["pass/fail"] == "SKIP", by[check]
    # the steps that run on CPU ran: their command lines are valid
    assert by["packed attention ≡ exact: sdpa"]["pass/fail"] == "PASS", by["packed attention ≡ exact: sdpa"]
    assert "float32" in by["packed attention ≡ exact: sdpa"]["figure"]
    assert by["attention TFLOP/s: sdpa"]["result"] == "ran on CPU (dry run)", logs.get("attention")
    assert by["ViT-L/16 bf16 ZeRO-2 MFU"]["result"].startswith("ran on CPU"), logs.get("train")
    assert "MFU" in by["ViT-L/16 bf16 ZeRO-2 MFU"]["figure"]
    assert by["python environment"]["figure"].startswith("Python ")
    assert by["xformers _C.so loads"]["pass/fail"] in ("PASS", "FAIL")
    assert by["loader, CPU JPEG decode"]["result"] == "ran on CPU (dry run)", logs.get("loader_cpu")
    assert "samples/s per worker CPU core" in by["loader, CPU JPEG decode"]["figure"]


def _write(out: Path, name: str, rc: int, log: str = "", figures: dict | None = None, seconds: float = 1.0) -> None:
    (out / f"{name}.rc").write_text(f"{rc} {seconds} 60\n")
    (out / f"{name}.log").write_text(log)
    if figures is not None:
        (out / f"{name}.json").write_text(json.dumps(figures))


def test_verdicts_follow_the_figures(tmp_path):
    """A GPU run's table from step files: targets met → PASS, missed → FAIL, a crashed or timed-out step
    → a FAIL row naming why, and the rows are all there whatever happened."""
    _write(
        tmp_path,
        "env",
        0,
        figures={
            "python": "3.12.3",
            "torch": "2.11.0+cu130",
            "torch_cuda": "13.0",
            "device": "NVIDIA H200",
            "missing": [],
        },
    )
    _write(
        tmp_path,
        "xformers",
        0,
        figures={
            "version": "0.0.35",
            "cuda": True,
            "c_library_loaded": False,
            "c_library_error": "OSError: libcudart.so.12",
            "status": "ran",
            "forward_op": "fa2F@2.5.7-pt",
            "backward_op": "fa2B@2.5.7-pt",
            "kernels": ["flash_fwd"],
        },
    )
    eq = [
        {
            "backend": "xformers",
            "dtype": "bfloat16",
            "lengths": [3, 1],
            "heads": 16,
            "head_dim": 64,
            "out_ratio": 0.3,
            "grad_ratio": 0.6,
            "max_abs_out": 1e-3,
            "max_abs_grad": 2e-3,
            "ok": True,
        },
        {
            "backend": "flex",
            "dtype": "bfloat16",
            "lengths": [3, 1],
            "heads": 16,
            "head_dim": 64,
            "out_ratio": 3.0,
            "grad_ratio": 0.6,
            "max_abs_out": 1e-2,
            "max_abs_grad": 2e-3,
            "ok": False,
        },
    ]
    _write(tmp_path, "equivalence", 1, figures={"equivalence": eq})  # sdpa missing: a FAIL row
    bench = [
        {
            "resolution_um": 2.0,
            "batch": 32,
            "dtype": "bfloat16",
            "max_len": 3333,
            "unavailable": [],
            "backends": {
                "xformers": {"tflops": 300.0, "per_ideal": 1.02},
                "flex": {"tflops": 200.0, "per_ideal": 1.5},
                "sdpa": {"tflops": 100.0, "per_ideal": 3.0},
            },
        }
    ]
    _write(tmp_path, "attention", 0, figures={"benchmark": bench})
    _write(tmp_path, "train", 124, log="step 3\nmodel (batches on the device): ...\n")  # timed out, no JSON
    _write(
        tmp_path,
        "loader_cuda",
        0,
        log=(
            "loader, ..., decode on cuda, 1 worker: 6.00 CPU ms/sample in the worker = 166.7 samples/s per CPU core\n"
            "  cores per GPU at 278 samples/s: 1.7 (meets the goal of ≤ 4)\n"
            "  trainer-side stage on cpu (batched decode_jpeg + crops + colour): 1.500 ms/sample wall, "
            "1.400 CPU ms/sample in the trainer process; at 278 samples/s it would take 41.7% of the device's time\n"
        ),
    )
    _write(
        tmp_path,
        "loader_cpu",
        0,
        log=(  # as benchmarks/train_step.py --loader-only prints it
            "loader, default recipe (...), decode on cpu, 1 worker, 960 samples × 1 rounds (median; range 90.1-90.1): "
            "11.10 CPU ms/sample in the worker = 90.1 samples/s per CPU core\n"
            "  cores per GPU at 278 samples/s: 3.1 (meets the goal of ≤ 4)\n"
        ),
    )
    rows = gpu_check.report(tmp_path, dry=False, budget_s=480, elapsed_s=500)
    by = {r["check"]: r for r in rows}
    assert [r["check"] for r in rows] == CHECKS
    verdicts = {c: by[c]["pass/fail"] for c in CHECKS}
    assert verdicts == {
        "python environment": "FAIL",  # torch 2.11 is not the pin
        "xformers _C.so loads": "FAIL",
        "xformers attention runs": "PASS",
        "packed attention ≡ exact: xformers": "PASS",
        "packed attention ≡ exact: flex": "FAIL",
        "packed attention ≡ exact: sdpa": "FAIL",
        "attention TFLOP/s: xformers": "PASS",
        "attention TFLOP/s: flex": "FAIL",
        "attention TFLOP/s: sdpa": "INFO",
        "ViT-L/16 bf16 ZeRO-2 MFU": "FAIL",
        "ViT-L/16 end to end (loader)": "FAIL",
        "loader, CUDA JPEG decode": "FAIL",
        "loader, CPU JPEG decode": "PASS",
        "gpu_check wall time": "FAIL",
    }
    assert "fa2F@2.5.7-pt" in by["xformers attention runs"]["result"]
    assert "not the pin" in by["python environment"]["result"]
    assert by["ViT-L/16 bf16 ZeRO-2 MFU"]["result"].startswith("timed out")
    assert by["loader, CUDA JPEG decode"]["result"] == "the decode stage ran on cpu, not the GPU"
    assert by["loader, CPU JPEG decode"]["figure"] == (
        "90.1 samples/s per worker CPU core; 3.1 cores per GPU at 278 samples/s"
    )
    assert "300.0 TFLOP/s" in by["attention TFLOP/s: xformers"]["figure"]
    _write(
        tmp_path,
        "train",
        0,
        figures={
            "model": "L",
            "mfu": 0.47,
            "tflops": 371.3,
            "peak_tflops": 790.0,
            "ms_per_step": 140.0,
            "samples_per_s": 228.0,
            "batch": 32,
            "steps": 10,
            "peak_memory_gib": 60.0,
            "end_to_end_samples_per_s": 200.0,
            "loader_workers": 10,
        },
    )
    by = {r["check"]: r for r in gpu_check.report(tmp_path, dry=False, budget_s=480, elapsed_s=400)}
    mfu = by["ViT-L/16 bf16 ZeRO-2 MFU"]
    assert mfu["pass/fail"] == "PASS" and "MFU 47.0%" in mfu["figure"] and "37.5% of the datasheet" in mfu["figure"]
    _write(
        tmp_path,
        "loader_cuda",
        2,
        log="usage: train_step.py\ntrain_step.py: error: unrecognized arguments: --loader-only\n",
    )
    by = {r["check"]: r for r in gpu_check.report(tmp_path, dry=False, budget_s=480, elapsed_s=400)}
    assert by["loader, CUDA JPEG decode"]["result"].startswith("not available: benchmarks/train_step.py has no")
    assert by["gpu_check wall time"]["pass/fail"] == "PASS"
    lines = gpu_check.render(rows).splitlines()  # a cell's own "|" must not split it
    assert len(lines) == len(rows) + 2 and all(line.count(" | ") == len(rows[0]) - 1 for line in lines[2:])
