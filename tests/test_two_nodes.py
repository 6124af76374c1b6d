"""Two nodes on one machine: one training rank in each of two network namespaces joined by veth pairs
(tests/netkit.py), torchrun's c10d rendezvous over gloo between them, ZeRO-2 and ZeRO-3 steps of the tiny
config on one shard set: the per-step losses must equal the 2-rank single-host run's, bit for bit.

Slow (four short runs). Skips, naming the refused command, where the machine cannot make the namespaces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from netkit import IFNAME, two_nodes
from test_train_distributed import RUN, TINY, build_shard_set

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shared_data) -> Path:
    return build_shard_set(tmp_path_factory.mktemp("two_node_data"), shared_data)


def _train_args(out: Path, shards: Path, stage: int) -> list[str]:
    return [
        "-m",
        "histotx.launch.train",
        str(TINY),
        f"out={out}",
        *RUN,
        f"data.stream.shards={shards}",
        f"steps={STEPS}",
        f"deepspeed.zero_stage={stage}",
    ]


def _env() -> dict[str, str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "GLOO_SOCKET_IFNAME": IFNAME,
        "LOGLEVEL": "INFO",
    }
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_one_rank_per_namespace_matches_two_ranks_on_one_host(shards, tmp_path, stage):
    one_host = tmp_path / "one_host"
    env = {k: v for k, v in _env().items() if k != "GLOO_SOCKET_IFNAME"}
    run = subprocess.run(
        [*TORCHRUN, "--standalone", "--nproc-per-node=2", *_train_args(one_host, shards, stage)],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stderr[-4000:]

    two = tmp_path / "two_nodes"
    with two_nodes(f"t{stage}", net=251) as nodes:
        rdzv = [
            "--nnodes=2",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={nodes[0].hostname}:29411",
            f"--rdzv-id=two-nodes-zero{stage}",
        ]
        procs = [
            subprocess.Popen(
                node.enter([*TORCHRUN, *rdzv, *_train_args(two, shards, stage)]),
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for node in nodes
        ]
        try:
            outputs = [p.communicate(timeout=400)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    for node, p, text in zip(nodes, procs, outputs, strict=True):
        assert p.returncode == 0, f"{node.hostname} ({node.addr}): exit {p.returncode}\n{text[-4000:]}"
    # torchrun's rendezvous result (LOGLEVEL=INFO): two agents, each on its own node, the store on node1's address
    for text in outputs:
        assert "group_world_size=2" in text and "master_addr=node" in text, text[-3000:]
    expected, got = _losses(one_host), _losses(two)
    assert [s for s, _ in expected] == list(range(1, STEPS + 1))
    assert got == expected  # bit-identical: the same ranks' data, the same reductions, only the wire differs


@pytest.mark.slow
def test_two_node_slurm_job_is_preempted_requeued_and_resumes_on_both_nodes(shards, tmp_path):
    """slurm/pretrain.sbatch with --nodes=2 on two slurmd (one per namespace) and one slurmctld: srun starts a
    torchrun on each node, one rank each; `scancel -b -s USR1` → both ranks save, the job is requeued and
    resumes on both nodes; every step is logged once."""
    from slurmkit import two_node_slurm, wait_for_job
    from test_slurm_pretrain import _job, _last_line, _preempt_after, _submit
    from test_train_slurm import _steps

    out, n, log = tmp_path / "run", 12, tmp_path / "pretrain.out"
    with two_nodes("s", net=252) as nodes, two_node_slurm(tmp_path / "slurm", nodes, port=16957) as env:
        env.update(GLOO_SOCKET_IFNAME=IFNAME, LOGLEVEL="INFO")
        job = _submit(env, log, out, shards, n, {"GPUS_PER_NODE": "1"}, ["--nodes=2", "--cpus-per-task=1"])
        _preempt_after(job, env, out, log)
        wait_for_job(job, env, timeout=500)
        state = _job(job, env)
    text = log.read_text()
    first, _, second = text.partition("start 1:")
    assert "NodeList=node[1-2]" in state and "JobState=COMPLETED" in state and "Restarts=1" in state, state
    assert "2 node(s) × 1 rank(s)" in first, text[-4000:]
    assert first.count("stopped by SIGUSR1") == 2, text[-6000:]  # a rank on each node saved and stopped
    assert second.count("resumed from") == 2, text[-6000:]  # and both resumed
    assert all("master_addr=node1" in part and "group_world_size=2" in part for part in (first, second))
    assert _steps(out) == list(range(1, n + 1)), text[-4000:]  # every step once
    assert _last_line(log).endswith("training ended with status 0")
