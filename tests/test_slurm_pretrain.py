"""slurm/pretrain.sbatch on a real (private, one-node) SLURM, every way a job can end:

- preempted (`scancel -b -s USR1`, what `--signal=B:USR1@120` sends before the time limit): the ranks save
  and stop, the script requeues, SLURM starts it again (SLURM_RESTART_COUNT=1) and it resumes to the end;
- preempted, but the save fails on one rank: not requeued (a new start would resume from an older
  checkpoint), the job fails, the last line of the log is the error;
- preempted at the restart bound (HISTOTX_MAX_RESTARTS): the checkpoint is saved, the job is not requeued
  and ends with the error;
- a rank crashes (not preempted): requeued HISTOTX_CRASH_RETRIES times, then the job fails with the first
  failing rank's error as the last line of the log.

Faults are injected into the real ranks by tests/faults/sitecustomize.py (HISTOTX_TEST_FAULT).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurmkit import local_slurm, wait_for_job
from test_train_distributed import RUN, TINY, build_shard_set
from test_train_slurm import _steps

REPO = Path(__file__).resolve().parents[1]
FAULTS = REPO / "tests" / "faults"


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shared_data) -> Path:
    return build_shard_set(tmp_path_factory.mktemp("slurm_data"), shared_data)


def _submit(
    env: dict, log: Path, out: Path, shards: Path, n: int, extra_env: dict[str, str], options: tuple[str, ...] = ()
) -> str:
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}:{env['PATH']}",
            "GPUS_PER_NODE": "2",
            "OMP_NUM_THREADS": "1",
            "HISTOTX_REQUIRE_CUDA": "false",  # CPU ranks on purpose
            "PYTHONPATH": f"{FAULTS}:{REPO}",
            **extra_env,
        }
    )
    return subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--gpus-per-node=0",
            "--cpus-per-task=2",
            "--export=ALL",
            f"--output={log}",
            f"--chdir={log.parent}",
            *options,
            str(REPO / "slurm/pretrain.sbatch"),
            str(TINY),
            f"out={out}",
            *RUN,
            f"data.stream.shards={shards}",
            f"steps={n}",
            "deepspeed.zero_stage=2",
        ],
        env=env,
        cwd=log.parent,  # SLURM_SUBMIT_DIR: the job's error files go under it
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def _preempt_after(job: str, env: dict, out: Path, log: Path, steps: int = 2) -> None:
    deadline = time.monotonic() + 240
    while len(_steps(out)) < steps:
        assert time.monotonic() < deadline, log.read_text()[-4000:] if log.exists() else "no log"
        time.sleep(0.2)
    subprocess.run(["scancel", "-b", "-s", "USR1", job], env=env, check=True)


def _job(job: str, env: dict) -> str:
    return subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout


def _last_line(log: Path) -> str:
    return log.read_text().rstrip().splitlines()[-1]


@pytest.mark.slow
def test_preempted_job_requeues_and_resumes(shards, tmp_path):
    out, n, log = tmp_path / "run", 12, tmp_path / "pretrain.out"
    with local_slurm(tmp_path / "slurm", port=16917) as env:
        job = _submit(env, log, out, shards, n, {})
        _preempt_after(job, env, out, log)
        wait_for_job(job, env, timeout=400)
        state = _job(job, env)
    text = log.read_text()
    assert "requeueing (restart 1 of at most 3)" in text and "start 1:" in text, text[-4000:]
    assert "resumed from" in text, text[-4000:]
    assert _steps(out) == list(range(1, n + 1)), text[-4000:]  # every step once, none repeated or lost
    assert "JobState=COMPLETED" in state and "Restarts=1" in state, state
    assert _last_line(log).endswith("training ended with status 0")


@pytest.mark.slow
def test_a_failed_save_is_not_requeued_and_ends_the_job_with_the_error(shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "pretrain.out"
    with local_slurm(tmp_path / "slurm", port=16927) as env:
        job = _submit(env, log, out, shards, 12, {"HISTOTX_TEST_FAULT": "save:1"})
        _preempt_after(job, env, out, log)
        wait_for_job(job, env, timeout=300)
        state = _job(job, env)
    text = log.read_text()
    assert "requeueing" not in text and "start 1:" not in text, text[-4000:]
    assert "JobState=FAILED" in state and "Restarts=0" in state, state
    last = _last_line(log)
    assert "error: preempted, but the checkpoint save failed" in last, text[-4000:]
    assert "local rank 1: OSError: [Errno 28] injected fault: no space left on device" in last, last
    assert not (out / "checkpoints" / "latest").exists()  # nothing was reported as saved


@pytest.mark.slow
def test_preemption_at_the_restart_bound_saves_and_ends_with_the_error(shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "pretrain.out"
    with local_slurm(tmp_path / "slurm", port=16937) as env:
        job = _submit(env, log, out, shards, 12, {"HISTOTX_MAX_RESTARTS": "0"})
        _preempt_after(job, env, out, log)
        wait_for_job(job, env, timeout=300)
        state = _job(job, env)
    stopped_at = max(_steps(out))
    assert (out / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"
    assert "JobState=FAILED" in state and "Restarts=0" in state, state
    last = _last_line(log)
    assert "error: checkpoint saved, but this job has been restarted 0 time(s) (HISTOTX_MAX_RESTARTS=0)" in last


@pytest.mark.slow
def test_a_crashing_rank_is_retried_a_bounded_number_of_times(shards, tmp_path):
    """Rank 1 fails at step 3 at every start: one retry (requeue), then the job fails, each start ending
    within seconds of the failure (no barrier hang), the failing rank's error the last line of the log."""
    out, log = tmp_path / "run", tmp_path / "pretrain.out"
    with local_slurm(tmp_path / "slurm", port=16947) as env:
        job = _submit(env, log, out, shards, 12, {"HISTOTX_TEST_FAULT": "step:1:3", "HISTOTX_CRASH_RETRIES": "1"})
        wait_for_job(job, env, timeout=500)
        state = _job(job, env)
    text = log.read_text()
    assert "start 0:" in text and "start 1:" in text and "start 2:" not in text, text[-4000:]
    assert "crash retry 1 of 1: requeueing" in text, text[-4000:]
    assert "JobState=FAILED" in state and "Restarts=1" in state and "histotx_crashes=1" in state, state
    last = _last_line(log)
    assert re.search(r"error: training failed with status 1 after 1 crash retry .*HISTOTX_MAX_RESTARTS=3", last), last
    assert "local rank 1: RuntimeError: injected fault: rank 1 out of memory taking step 3" in last, last
