"""slurm/pretrain.sbatch on a real (private, one-node) SLURM: submitted with sbatch, preempted with
`scancel -b -s USR1` (what `--signal=B:USR1@120` sends before the time limit), the ranks save and stop,
the script requeues the job, SLURM starts it again (SLURM_RESTART_COUNT=1) and it resumes to the end."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurmkit import local_slurm, wait_for_job
from test_train_distributed import RUN, TINY, build_shard_set
from test_train_slurm import _steps

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_preempted_job_requeues_and_resumes(shared_data, tmp_path):
    shards = build_shard_set(tmp_path / "data", shared_data)
    out, n = tmp_path / "run", 12
    log = tmp_path / "pretrain.out"
    with local_slurm(tmp_path / "slurm", port=16917) as env:
        env.update(
            PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
            GPUS_PER_NODE="2",
            OMP_NUM_THREADS="1",
            HISTOTX_REPO=str(REPO),
            PYTHONPATH=str(REPO),
        )
        job = subprocess.run(
            [
                "sbatch",
                "--parsable",
                "--gpus-per-node=0",
                "--cpus-per-task=2",
                "--export=ALL",
                f"--output={log}",
                str(REPO / "slurm/pretrain.sbatch"),
                str(TINY),
                f"out={out}",
                *RUN,
                f"data.stream.shards={shards}",
                f"steps={n}",
                "deepspeed.zero_stage=2",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        deadline = time.monotonic() + 240
        while len(_steps(out)) < 2:
            assert time.monotonic() < deadline, log.read_text()[-4000:] if log.exists() else "no log"
            time.sleep(0.2)
        subprocess.run(["scancel", "-b", "-s", "USR1", job], env=env, check=True)
        wait_for_job(job, env, timeout=400)
        state = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    text = log.read_text()
    assert "requeueing job" in text and "start 1:" in text, text[-4000:]  # ran again after the requeue
    assert "resumed from" in text, text[-4000:]
    assert _steps(out) == list(range(1, n + 1)), text[-4000:]  # every step once, none repeated or lost
    assert "JobState=COMPLETED" in state and "Restarts=1" in state, state
