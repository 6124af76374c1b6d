"""The process-group environment of one rank, whichever launcher started it.

torch.distributed reads RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. torchrun and the
deepspeed launcher set them; ``srun`` sets SLURM_PROCID / SLURM_LOCALID / SLURM_STEP_NUM_TASKS and the
node list instead, which :func:`set_distributed_env` translates. A process started by hand (no launcher)
is left alone and trains as a single rank.
"""

from __future__ import annotations

import os
import subprocess


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``node[01-04]`` → ``node01``), via scontrol when present."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        head = nodelist.split(",")[0]
        if "[" in head:  # node[01-04,07] → node01
            prefix, rest = head.split("[", 1)
            head = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
        return head


def set_distributed_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Fill RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from SLURM's variables when a
    launcher did not set them already (torchrun's and deepspeed's take precedence). Returns what it set."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return {}
    if "SLURM_STEP_NUM_TASKS" not in env:  # not inside an srun step: a single process
        return {}
    new = {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
        "MASTER_ADDR": env.get("MASTER_ADDR")
        or first_host(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "localhost"))),
        # one port per job, so two jobs sharing a node do not collide
        "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000),
    }
    env.update(new)
    return new
