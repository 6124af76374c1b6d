"""A private, real SLURM cluster on this machine for tests (munge + slurmctld + slurmd, one node).

Needs Debian's slurmctld, slurmd, slurm-client and munge (`.ci/run` installs them) and root; tests that
use it are skipped with that reason otherwise. Everything lives under a temporary folder, with its own
ports, and is stopped afterwards; `env` carries SLURM_CONF for sbatch/squeue/scancel.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scancel", "munged", "munge")


def skip_reason() -> str | None:
    missing = [b for b in BINARIES if not (shutil.which(b) or Path("/usr/sbin", b).exists())]
    if missing:
        return f"SLURM not installed here (missing {', '.join(missing)}; .ci/run installs it)"
    if os.geteuid() != 0:
        return "the private SLURM cluster needs root (it runs slurmd as root)"
    return None


def _conf(root: Path, host: str, port: int) -> str:
    return f"""ClusterName=histotx-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort={port}
SlurmdPort={port + 1}
MailProg=/bin/true
ReturnToService=2
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
KillWait=10
NodeName={host} CPUs={os.cpu_count()} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _two_node_conf(root: Path, host: str, port: int, nodes) -> str:
    """One controller in the host namespace (on the bridge's address), one slurmd per node namespace."""
    head = _conf(root, host, port).split("NodeName=")[0]
    head = head.replace(f"SlurmctldHost={host}\n", f"SlurmctldHost={host}({nodes[0].addr.rsplit('.', 1)[0]}.254)\n")
    for key, value in (
        ("SlurmdSpoolDir", "spool-%n"),
        ("SlurmdPidFile", "slurmd-%n.pid"),
        ("SlurmdLogFile", "slurmd-%n.log"),
    ):
        head = "\n".join(f"{key}={root}/{value}" if line.startswith(f"{key}=") else line for line in head.splitlines())
    cpus = os.cpu_count()
    lines = [f"NodeName={n.hostname} NodeAddr={n.addr} CPUs={cpus} RealMemory=8000 State=UNKNOWN" for n in nodes]
    names = ",".join(n.hostname for n in nodes)
    return (
        head + "\n" + "\n".join(lines) + f"\nPartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP\n"
    )


def _start_munge() -> None:
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return
    subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m755", "/run/munge"], check=True)
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)


@contextmanager
def local_slurm(root: Path, port: int = 16817):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    root = Path(root)
    for d in ("state", "spool"):
        (root / d).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(_conf(root, socket.gethostname(), port))
    env = dict(os.environ, SLURM_CONF=str(conf))
    _start_munge()
    procs = [
        subprocess.Popen(
            [daemon, "-D", "-f", str(conf)],
            env=env,
            start_new_session=True,
            stdout=open(root / f"{daemon}.out", "wb"),
            stderr=subprocess.STDOUT,
        )
        for daemon in ("slurmctld", "slurmd")
    ]
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True)
            if state.stdout.strip() == "idle":
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"SLURM did not come up: {(root / 'slurmctld.log').read_text()[-2000:]}")
        yield env
    finally:
        _stop(procs)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every daemon, then wait up to 20 s each before killing it."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


@contextmanager
def two_node_slurm(root: Path, nodes, port: int = 16857):
    """slurmctld in the host namespace, one slurmd in each node's namespace (tests/netkit.py's nodes)."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    root = Path(root)
    (root / "state").mkdir(parents=True, exist_ok=True)
    for n in nodes:
        (root / f"spool-{n.hostname}").mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(_two_node_conf(root, socket.gethostname(), port, nodes))
    env = dict(os.environ, SLURM_CONF=str(conf))
    _start_munge()

    def start(argv, name):
        return subprocess.Popen(
            argv, env=env, start_new_session=True, stdout=open(root / f"{name}.out", "wb"), stderr=subprocess.STDOUT
        )

    procs = [start(["slurmctld", "-D", "-f", str(conf)], "slurmctld")]
    try:
        procs += [
            start(n.enter(["slurmd", "-D", "-N", n.hostname, "-f", str(conf)]), f"slurmd-{n.hostname}") for n in nodes
        ]
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True)
            if state.stdout.split() == ["idle"] * len(nodes):
                break
            time.sleep(0.5)
        else:
            logs = "".join(
                f"{f.name}: {f.read_text()[-1000:]}\n" for f in sorted(root.glob("*.out")) + sorted(root.glob("*.log"))
            )
            pytest.fail(f"the two-node SLURM did not come up (sinfo: {state.stdout.split()}):\n{logs}")
        yield env
    finally:
        _stop(procs)


def wait_for_job(job: str, env: dict, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True).stdout
        if not out.strip():
            return
        time.sleep(1)
    raise TimeoutError(f"SLURM job {job} still queued/running after {timeout}s")
