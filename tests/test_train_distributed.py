"""2-rank DeepSpeed training on CPU (gloo) on a shard set made from ../shared/data's Visium sample and
the synthetic cohort (every technology, one vocabulary):

- ZeRO-1, ZeRO-2 and ZeRO-3: finite losses, the loss falling over a short run on 28 tiles, the same
  per-step losses whatever the stage, the exact EMA at momentum 0.9 after a training step, and
  teacher ≡ student after a momentum-0 update — with the tiny model's parameters partly kept whole and
  partly partitioned under ZeRO-3 (persistence threshold 1000 elements);
- exact resume: N steps straight vs. SIGTERM on rank 0 / SIGUSR1 on rank 1 part-way, then
  ``--resume auto`` to N: the same per-step losses and the same final student and teacher weights.

Run as a script, this file is the per-rank harness of the stage checks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "train" / "tiny_cpu.yaml"
RUN = [
    "data.collate.resolutions_um=[16.0, 32.0]",
    "data.stream.batch_size=4",
    "log.every_steps=1",
    "checkpoint.every_steps=1000",
]
STEPS = 24


def build_shard_set(root: Path, shared_data: Path) -> Path:
    """The synthetic cohort plus the scanpy Visium sample (low-res H&E) sharded together at 8 µm/px.

    The real sample names its genes by Ensembl id only and the synthetic ones by symbol only, which
    `histotx shard` rightly refuses to mix blindly; as a user would, the run starts from a vocabulary that
    already holds the real sample's genes (`--vocab`), made by sharding that sample alone first."""
    from histotx.sharding.config import ShardConfig
    from histotx.sharding.pipeline import run_cohort
    from histotx.synth import generate_cohort

    cohort = generate_cohort(root / "synth", seed=0, size="small")
    data = yaml.safe_load(cohort.read_text())
    for sample in data["samples"]:
        for key in ("slide", "data"):
            if key in sample:
                sample[key] = str((cohort.parent / sample[key]).resolve())
    outs = shared_data / "scanpy-visium" / "visium_data" / "1.0.0"
    real = {
        "id": "scanpy_visium",
        "patient": "real",
        "technology": "visium",
        "data": str(outs),
        "image_scale": "lowres",
        "slide": str(outs / "spatial" / "tissue_lowres_image.png"),
    }
    data["samples"].append(real)
    (root / "cohort.yaml").write_text(yaml.safe_dump(data))
    (root / "real.yaml").write_text(yaml.safe_dump({"samples": [real]}))
    cfg = ShardConfig(
        mpp=8.0, tile_px=32, mask_mpp=16.0, min_tissue_fraction=0.3, shard_max_tiles=4, max_tiles_per_sample=4
    )
    run_cohort(root / "real.yaml", root / "real_only", cfg)
    manifest = run_cohort(root / "cohort.yaml", root / "shards", cfg, vocab_from=root / "real_only" / "vocab.tsv")
    assert manifest["totals"]["samples_failed"] == 0, manifest["samples"]
    assert manifest["samples"]["scanpy_visium"]["tiles"] > 0
    return root / "shards"


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shared_data) -> Path:
    return build_shard_set(tmp_path_factory.mktemp("train_data"), shared_data)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(argv: list[str], world: int = 2) -> list[subprocess.Popen]:
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, *argv], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    return procs


def wait_ranks(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    deadline = time.monotonic() + timeout
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out)
    for rank, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{out[-6000:]}"
    return outputs


# ---------------------------------------------------------------------------------------------- ZeRO stages


@pytest.fixture(scope="module")
def stage_results(shards, tmp_path_factory):
    """Run every stage (one after another: two cores) and collect rank 0's report."""
    results = {}
    for stage in (1, 2, 3):
        out = tmp_path_factory.mktemp(f"zero{stage}")
        overrides = RUN + [
            f"data.stream.shards={shards}",
            f"out={out}",
            f"steps={STEPS}",
            f"deepspeed.zero_stage={stage}",
        ]
        wait_ranks(start_ranks([__file__, "stage", str(TINY), str(out / "report.json"), *overrides]))
        results[stage] = json.loads((out / "report.json").read_text())
    return results


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_and_the_teacher_is_the_exact_ema(stage_results, stage):
    r = stage_results[stage]
    losses = [step["loss"] for step in r["losses"]]
    assert len(losses) == STEPS and all(map(lambda v: v == v and abs(v) < 1e6, losses))
    assert all(all(abs(v) < 1e6 for v in step.values()) for step in r["losses"])  # every term finite
    # Seen: 8.1 → 5.3 (the DINO, iBOT and KoLeo terms all fall as the student fits its 28 tiles).
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.85 * first, losses
    assert r["ema_max_error"] < 1e-6  # teacher = 0.9 · teacher + 0.1 · student, every parameter, fp32
    assert r["teacher_equals_student_after_momentum_0"]
    assert r["ranks_agree"]  # the same teacher and student on both ranks
    assert r["n_teacher_tensors"] == r["n_student_tensors"] > 20
    if stage == 3:  # both kinds of ZeRO-3 parameter were exercised
        assert r["zero3_whole"] > 0 and r["zero3_partitioned"] > 0


@pytest.mark.slow
def test_zero_stages_take_the_same_steps(stage_results):
    """Sharding the optimiser, gradients and parameters changes nothing but where tensors live."""
    reference = [s["loss"] for s in stage_results[1]["losses"]][:8]
    for stage in (2, 3):
        losses = [s["loss"] for s in stage_results[stage]["losses"]][:8]
        assert losses == pytest.approx(reference, rel=1e-4), (stage, losses, reference)


@pytest.mark.slow
def test_nonfinite_losses_are_skipped_by_every_rank_and_a_run_of_them_stops_training(shards, tmp_path):
    overrides = RUN + [
        f"data.stream.shards={shards}",
        f"out={tmp_path}",
        "steps=20",
        "deepspeed.zero_stage=2",
        "max_consecutive_nonfinite=3",
    ]
    wait_ranks(start_ranks([__file__, "nonfinite", str(TINY), str(tmp_path / "report.json"), *overrides]))
    r = json.loads((tmp_path / "report.json").read_text())
    # micro-steps 1 ok, 2-3 skipped (NaN on rank 1 only, so rank 0 skipped them too), 4-5 ok, 6-8 NaN → stop
    assert r["results"] == [True, False, False, True, True, False, False]
    assert r["unchanged_by_skips"] and r["step_after_skips"] == 1
    assert r["nonfinite_total"] == 5 and r["step"] == 3
    assert "3 steps in a row had a NaN/inf loss" in r["error"]


@pytest.mark.slow
def test_bf16_autocast_zero0_gradient_accumulation_on_cpu(shards, tmp_path):
    """The GPU precision path (fp32 weights, bf16 compute via DeepSpeed's torch_autocast) without ZeRO
    and with two micro-batches per optimiser step, one CPU rank; the kNN probe on held-out tiles."""
    from shardkit import write_shard_set

    held_out = write_shard_set(tmp_path / "held_out", n_shards=3, per_shard=4, tile_px=32)  # 3 samples, one panel
    entry = str(REPO / "launch" / "train.py")
    wait_ranks(
        start_ranks(
            [
                entry,
                str(TINY),
                f"out={tmp_path}",
                *RUN,
                f"data.stream.shards={shards}",
                "steps=3",
                "deepspeed.precision=bf16",
                "deepspeed.zero_stage=0",
                "optim.accumulation_steps=2",
                "monitor.every_steps=2",
                f"monitor.shards={held_out}",
                "monitor.k=2",
            ],
            world=1,
        )
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in rows if "probe/knn_pearson" in r]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["step"] for r in probes] == [0, 2, 3]
    assert all(-1 <= r["probe/knn_pearson"] <= 1 for r in probes)
    assert all(0 < r["loss"] < 1e3 for r in rows) and rows[0]["samples_per_s"] > 0
    expected = {
        "loss",
        "dino",
        "ibot_image",
        "ibot_transcript",
        "koleo",
        "expression",
        "lr",
        "last_layer_lr",
        "weight_decay",
        "momentum",
        "teacher_temperature",
        "samples_per_s",
        "tokens_per_s",
        "memory_mb",
        "time/data_wait_s",
        "time/compute_s",
        "time/data_wait_fraction",
        "nonfinite_skipped",
        "empty_views",
        "teacher/entropy",
        "teacher/kl_to_uniform",
        "teacher/prototypes_used",
    }
    assert expected <= set(rows[-1]) and rows[-1]["tokens_per_s"] > rows[-1]["samples_per_s"]
    assert any((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    saved = tmp_path / "checkpoints" / "step_00000003"
    assert json.loads((saved / "rank_00000.json").read_text())["loader"]["batches"] == 6  # 2 per step


@pytest.mark.slow
def test_gpu_check_script_runs_end_to_end_on_cpu(shards):
    """benchmarks/gpu_train_check.py, the ViT-L GPU check, on the tiny config: the same code path, so a
    GPU session does not find it broken."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu_train_check.py"),
            "--allow-cpu",
            "--config",
            str(TINY),
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batch",
            "2",
            "--workers",
            "1",
            "--held",
            "2",
            "--shards",
            str(shards),
            "data.collate.resolutions_um=[16.0]",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "TFLOP/s, MFU" in run.stdout and "samples/s" in run.stdout and "end to end" in run.stdout


# ---------------------------------------------------------------------------------------------- exact resume


def _metrics(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _final_state(out: Path, step: int) -> dict:
    """Every tensor of a checkpoint (each rank's model and optimiser files, the teacher), by file and key path."""
    from safetensors.torch import load_file

    from histotx.train.checkpoint import load_deepspeed_file

    def tensors(obj, prefix):
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from tensors(v, f"{prefix}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from tensors(v, f"{prefix}/{i}")
        elif hasattr(obj, "dtype") and hasattr(obj, "shape"):
            yield prefix, obj

    path = out / "checkpoints" / f"step_{step:08d}"
    state = {f"{f.name}{k}": t for f in sorted(path.glob("*.pt")) for k, t in tensors(load_deepspeed_file(f), "")}
    state.update({f"teacher/{k}": t for k, t in load_file(path / "teacher.safetensors").items()})
    return state


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_sigterm_then_resume_gives_the_same_run(shards, tmp_path, stage):
    import torch

    n = 10
    entry = str(REPO / "launch" / "train.py")
    common = RUN + [
        f"data.stream.shards={shards}",
        f"steps={n}",
        f"deepspeed.zero_stage={stage}",
        "data.stream.num_workers=1",
    ]
    straight = tmp_path / "straight"
    wait_ranks(start_ranks([entry, str(TINY), f"out={straight}", *common]))

    broken = tmp_path / "broken"
    procs = start_ranks([entry, str(TINY), f"out={broken}", *common])
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(_metrics(broken) if (broken / "metrics.jsonl").exists() else {}) < 3:
        assert all(p.poll() is None for p in procs), "the run ended before it could be interrupted"
        time.sleep(0.05)
    procs[0].send_signal(signal.SIGTERM)  # what torchrun forwards
    procs[1].send_signal(signal.SIGUSR1)  # what SLURM sends before the time limit
    outputs = wait_ranks(procs)
    stopped_at = int((broken / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 3 <= stopped_at < n, "the run was not interrupted part-way"
    assert "stopped by SIGTERM" in outputs[0] and "stopped by SIGUSR1" in outputs[1]

    outputs = wait_ranks(start_ranks([entry, str(TINY), f"out={broken}", *common, "--resume", "auto"]))
    assert f"resumed from {broken / 'checkpoints' / f'step_{stopped_at:08d}'}" in outputs[0]

    expected, got = _metrics(straight), _metrics(broken)
    assert sorted(got) == list(range(1, n + 1)) and got == expected  # bit-identical per-step losses
    # Student (model + ZeRO partitions of fp32 weights and Adam moments) and teacher: bit-identical.
    s1, s2 = _final_state(straight, n), _final_state(broken, n)
    assert s1.keys() == s2.keys() and len(s1) > 10
    assert all(torch.equal(s1[k], s2[k]) for k in s1), [k for k in s1 if not torch.equal(s1[k], s2[k])][:5]


# ---------------------------------------------------------------------------------------------- the harness


def _harness(config: str, report: str, overrides: list[str]) -> None:
    """One rank of a stage check: train, then test the EMA at momentum 0.9 and 0 on the live engine."""
    import torch
    import torch.distributed as dist

    from histotx.config import load_config
    from histotx.ssl.schedules import CosineSchedule
    from histotx.train.config import TrainConfig
    from histotx.train.engine import student_weights
    from histotx.train.loop import Trainer

    cfg = load_config(TrainConfig, config, overrides)
    trainer = Trainer(cfg)
    meta, engine = trainer.meta, trainer.engine
    losses = [trainer.train_step(trainer.next_batch()) for _ in range(cfg.steps - 1)]
    momentum = 0.9  # the last step's EMA at momentum 0.9 instead of the schedule's
    trainer.schedules.momentum = CosineSchedule(momentum, momentum, cfg.steps)
    before = [t.detach().clone() for t in meta.teacher.parameters()]
    losses.append(trainer.train_step(trainer.next_batch()))
    student = [w.clone() for w in student_weights(engine, trainer.student_params)]
    teacher = list(meta.teacher.parameters())
    error = max(
        float((t - (momentum * b + (1 - momentum) * s)).abs().max() / (s.abs().max() + 1e-12))
        for t, b, s in zip(teacher, before, student, strict=True)
    )
    meta.update_teacher(0.0, student_weights(engine, trainer.student_params))
    equal = all(torch.equal(t, s) for t, s in zip(meta.teacher.parameters(), student, strict=True))
    checksum = torch.tensor(
        [float(sum(t.double().sum() for t in teacher)), float(sum(s.double().sum() for s in student))]
    )
    gathered = [torch.zeros(2, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum.double())
    params = trainer.student_params
    out = {
        "losses": losses,
        "ema_max_error": error,
        "momentum": momentum,
        "teacher_equals_student_after_momentum_0": equal,
        "ranks_agree": all(torch.equal(g, gathered[0]) for g in gathered),
        "n_teacher_tensors": len(teacher),
        "n_student_tensors": len(student),
        "zero3_whole": sum(bool(getattr(p, "ds_persist", False)) for p in params),
        "zero3_partitioned": sum(hasattr(p, "ds_id") and not getattr(p, "ds_persist", False) for p in params),
    }
    if dist.get_rank() == 0:
        Path(report).write_text(json.dumps(out))
    trainer.close()


def _nonfinite_harness(config: str, report: str, overrides: list[str]) -> None:
    """NaN losses on rank 1 only, at micro-steps 2-3 (skipped by both ranks, weights untouched) and from
    step 6 on (the run stops after max_consecutive_nonfinite of them)."""
    import torch
    import torch.distributed as dist

    from histotx.config import load_config
    from histotx.train.config import TrainConfig
    from histotx.train.engine import student_weights
    from histotx.train.loop import NonFiniteLossError, Trainer

    trainer = Trainer(load_config(TrainConfig, config, overrides))
    rank, calls, losses = dist.get_rank(), [0], trainer.meta.losses

    def poisoned(*args):
        out = losses(*args)
        calls[0] += 1
        if rank == 1 and (calls[0] in (2, 3) or calls[0] >= 6):
            out["loss"] = out["loss"] * float("nan")
        return out

    trainer.meta.losses = poisoned
    record = {"results": [], "unchanged_by_skips": None, "error": None}
    try:
        for i in range(12):
            if i == 1:
                before = [w.clone() for w in student_weights(trainer.engine, trainer.student_params)]
            record["results"].append(trainer.train_step(trainer.next_batch()) is not None)
            if i == 2:
                after = list(student_weights(trainer.engine, trainer.student_params))
                record["unchanged_by_skips"] = all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
                record["step_after_skips"] = trainer.step
    except NonFiniteLossError as exc:
        record["error"] = str(exc)
    record.update(nonfinite_total=trainer.nonfinite_total, step=trainer.step)
    if rank == 0:
        Path(report).write_text(json.dumps(record))
    trainer.close()


if __name__ == "__main__":
    {"stage": _harness, "nonfinite": _nonfinite_harness}[sys.argv[1]](sys.argv[2], sys.argv[3], sys.argv[4:])
