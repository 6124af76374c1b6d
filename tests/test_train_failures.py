"""Ranks that fail, and GPUs that are missing.

- One of 2 CPU ranks raises at step 3 (tests/faults/sitecustomize.py, worded like an OOM): the job under
  torchrun ends with that rank's error at the end of its output instead of hanging in a barrier until the
  collective timeout (before the fix, the failing rank's close() entered a barrier while the other rank
  waited in the step's all-reduce: the run hung until killed).
- ``require_cuda`` (on in the GPU configs and slurm/pretrain.sbatch) stops a run at start-up, naming the
  NVIDIA driver and torch's CUDA build, when CUDA is unavailable: here, on a CPU-only machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train_distributed import RUN, TINY, shards  # noqa: F401 (the module's shard set fixture)

REPO = Path(__file__).resolve().parents[1]
FAULTS = REPO / "tests" / "faults"


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{FAULTS}:{REPO}", **extra}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.mark.slow
def test_a_rank_failing_mid_run_ends_the_job_with_its_error(shards, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "histotx.launch.train",
            str(TINY),
            f"out={out}",
            *RUN,
            f"data.stream.shards={shards}",
            "steps=10",
            "checkpoint.every_steps=2",
        ],
        env=_env(HISTOTX_TEST_FAULT="step:1:3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Without the fix this never returns (both ranks wait in different collectives until killed).
        log, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0, log[-4000:]
    tail = "\n".join(log.rstrip().splitlines()[-40:])  # torchrun's summary: the root cause comes last
    assert "Root Cause (first observed failure)" in tail and "rank      : 1 (local_rank: 1)" in tail, tail
    assert "RuntimeError: injected fault: rank 1 out of memory taking step 3" in tail, tail
    assert "rank 1 of 2 failed at step 3" in log
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2], steps  # steps 1-2 logged, and their checkpoint kept for a retry
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"


def _run_cpu_only(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "histotx.launch.train", *args],
        env=_env(CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch cannot use CUDA")
def test_require_cuda_stops_at_start_up_naming_driver_and_cuda(shards, tmp_path):  # noqa: F811
    t0 = time.monotonic()
    common = [str(TINY), f"out={tmp_path / 'run'}", f"data.stream.shards={shards}", "steps=1"]
    for how in (["require_cuda=true"], ["--require-cuda"]):
        run = _run_cpu_only([*common, *how], tmp_path)
        assert run.returncode == 4, run.stderr[-3000:]
        last = run.stderr.strip().splitlines()[-1]
        assert "require_cuda is set but CUDA is unavailable" in last, last
        assert "NVIDIA driver: " in last and f"torch {torch.__version__} is " in last, last
        assert ("CUDA " + str(torch.version.cuda) if torch.version.cuda else "CPU-only build") in last, last
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert time.monotonic() - t0 < 240  # no rendezvous, no model: it stops before either


def test_gpu_configs_require_cuda_and_the_cpu_config_does_not():
    from histotx.config import load_config
    from histotx.train.config import TrainConfig

    assert load_config(TrainConfig, REPO / "configs/train/vit_l16_uni.yaml", []).require_cuda
    assert not load_config(TrainConfig, TINY, []).require_cuda
    sbatch = (REPO / "slurm/pretrain.sbatch").read_text()
    assert "REQUIRE_CUDA=${HISTOTX_REQUIRE_CUDA:-true}" in sbatch and '"require_cuda=$REQUIRE_CUDA"' in sbatch


def test_the_cuda_report_names_driver_and_build(monkeypatch):
    from histotx.train import engine

    monkeypatch.setattr(engine, "_nvidia_driver", lambda: "550.54.15")
    report = engine.cuda_report()
    assert report.startswith("NVIDIA driver: 550.54.15; torch ") and (
        f"CUDA {torch.version.cuda}" in report if torch.version.cuda else "CPU-only build" in report
    )


def test_a_peer_failure_is_told_from_a_rank_of_its_own():
    from histotx.train.loop import is_peer_failure

    gloo = RuntimeError(
        "[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:17328. This is typically "
        "caused by a remote worker crashing."
    )
    assert is_peer_failure(gloo)
    assert not is_peer_failure(RuntimeError("injected fault: rank 1 out of memory taking step 3"))
    assert not is_peer_failure(OSError(28, "No space left on device"))
