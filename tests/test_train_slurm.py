"""slurm/pretrain.sbatch's preemption path without a SLURM cluster: the script runs under bash with
stand-ins for srun (runs its command in place) and scontrol (names the host, records a requeue).

USR1 to the batch shell — what `#SBATCH --signal=B:USR1@120` or `scancel -b -s USR1` deliver — must
reach both torchrun ranks through the trap and torchrun's forwarding, the ranks must save and stop,
the script must requeue and exit 0, and the requeued start must resume and finish the run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_distributed import RUN, TINY, build_shard_set

REPO = Path(__file__).resolve().parents[1]
FAKE_SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1" in
  show) echo localhost ;;
  requeue) echo "$2" >> "$REQUEUE_LOG" ;;
esac
"""


def _steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_usr1_to_the_batch_script_saves_requeues_and_the_next_start_resumes(shared_data, tmp_path):
    shards = build_shard_set(tmp_path / "data", shared_data)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out, n = tmp_path / "run", 12
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
        "SLURM_JOB_ID": str(random.randint(1000, 19000)),
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NNODES": "1",
        "GPUS_PER_NODE": "2",
        "HISTOTX_REQUIRE_CUDA": "false",
        "REQUEUE_LOG": str(tmp_path / "requeued"),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
    }
    command = [
        "bash",
        str(REPO / "slurm" / "pretrain.sbatch"),
        str(TINY),
        f"out={out}",
        *RUN,
        f"data.stream.shards={shards}",
        f"steps={n}",
        "deepspeed.zero_stage=1",
    ]

    job = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while len(_steps(out)) < 2:
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0][-4000:]
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    log, _ = job.communicate(timeout=180)
    assert job.returncode == 0, log[-4000:]
    assert (tmp_path / "requeued").read_text().split() == [env["SLURM_JOB_ID"]]
    stopped_at = max(_steps(out))
    assert 2 <= stopped_at < n and "stopped by SIGUSR1" in log
    assert (out / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"

    again = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped_at:08d}'}" in again.stdout + again.stderr
    assert _steps(out) == list(range(1, n + 1))
    assert (tmp_path / "requeued").read_text().split() == [env["SLURM_JOB_ID"]]  # not requeued again
