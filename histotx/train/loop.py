"""The training loop: steps, schedules, skipped non-finite steps, metrics, checkpoints, signals.

One micro-step: schedule values for the current optimiser step → teacher targets (no grad, fp32 weights,
bf16 compute on GPU) → student forward through the DeepSpeed engine → losses → a check, agreed by all
ranks, that the loss is finite (else the step is skipped and counted; too many in a row stop the run)
→ backward, optimiser step → centre update, and at each optimiser step the teacher's EMA.

SIGTERM and SIGUSR1 (what SLURM sends before a time limit or preemption) only set a flag; the ranks
agree on it in the same all-reduce as the loss check (one collective per step), finish that step,
save a checkpoint and return 0, so a requeued job resumes with ``--resume auto`` from the next sample.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from histotx.config import dump_config, to_dict
from histotx.data.device_decode import BatchDecoder
from histotx.data.loader import build_loader
from histotx.files import atomic_write_json
from histotx.model import FusedViT
from histotx.ssl.config import KOLEO_MIN_BATCH
from histotx.ssl.meta import SSLMetaArch
from histotx.ssl.schedules import SSLSchedules
from histotx.ssl.terms import TERM_NAMES
from histotx.train import checkpoint
from histotx.train.config import TrainConfig
from histotx.train.engine import (
    apply_schedule,
    autocast,
    build_engine,
    init_distributed,
    memory_mb,
    param_groups,
    student_weights,
)
from histotx.train.flops import step_flops
from histotx.train.metrics import MetricsWriter, Window
from histotx.train.monitor import KnnProbe

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_REPORT_ENV = "HISTOTX_STOP_REPORT"

CheckpointHook = Callable[[Path, int], Any]
"""Called on rank 0 with a just completed checkpoint's folder and step, while the other ranks wait; what
a run makes from its checkpoints besides resuming (``histotx train`` adds the timm export of
``checkpoint.export_every``). The trainer knows no hook's purpose."""


class NonFiniteLossError(RuntimeError):
    """Too many steps in a row had a NaN or infinite loss."""


def _check_vocabulary(cfg: TrainConfig, vocab_size: int) -> None:
    from histotx.shard_location import load_manifest, load_vocab

    shards = cfg.data.stream.shards
    vocab = load_vocab(shards, load_manifest(shards)["vocab"])
    if vocab is not None and len(vocab) > vocab_size:
        raise ValueError(
            f"{shards}: the shard set's vocabulary has {len(vocab)} genes, more than model.vocab_size={vocab_size}"
        )


def build_backbone(cfg: TrainConfig) -> FusedViT:
    """The backbone, from a pretrained checkpoint when ``init.backbone`` names one."""
    backbone = FusedViT(cfg.model_config())
    if cfg.init.backbone:
        from histotx.model.pretrained import init_from_pretrained

        report = init_from_pretrained(backbone, cfg.init.backbone, cfg.init.weights or None)
        log.info("backbone init: %s", report.summary())
        for name, theirs, ours in (
            ("mean", report.image_mean, cfg.data.augment.mean),
            ("std", report.image_std, cfg.data.augment.std),
        ):
            if theirs is not None and not np.allclose(theirs, ours, atol=1e-4):
                log.warning(
                    "the checkpoint normalises images with %s %s, data.augment.%s is %s", name, theirs, name, ours
                )
    return backbone


class Trainer:
    """A run on this rank: process group, model, engine, loader, schedules, logging, checkpoints."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None, hooks: Sequence[CheckpointHook] = ()) -> None:
        self.cfg = cfg
        self.hooks = tuple(hooks)  # every rank must get the same number (> 0 means a barrier per checkpoint)
        self.device = init_distributed(cfg)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if cfg.checkpoint.export_every and not self.hooks and self.rank == 0:
            log.warning(
                "checkpoint.export_every=%d, but this trainer got no checkpoint hooks (`histotx train` and "
                "launch/train.py add the export's): nothing will be exported",
                cfg.checkpoint.export_every,
            )
        self.out = Path(cfg.out)
        self.checkpoints = self.out / "checkpoints"
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        np.random.seed(cfg.seed)
        model_cfg = cfg.model_config()
        _check_vocabulary(cfg, model_cfg.vocab_size)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out / "config.yaml")
            dump_config(model_cfg, self.out / "model_config.yaml")

        self.meta = SSLMetaArch(build_backbone(cfg), cfg.ssl)
        self.meta.teacher.to(self.device)
        self.meta.centers.to(self.device)
        self.engine, self.optimizer = build_engine(
            cfg, self.meta.student, param_groups(self.meta.student, cfg), self.device
        )
        self.student_params = list(self.meta.student.parameters())
        self.loader = build_loader(cfg.data, self.rank, self.world, pin_memory=self.device.type == "cuda")
        self.decoder = BatchDecoder(cfg.data.augment, self.device)  # makes the views left to the GPU, if any
        global_batch = cfg.data.stream.batch_size * cfg.optim.accumulation_steps * self.world
        self.schedules = SSLSchedules(cfg.ssl.schedule, cfg.steps, global_batch)
        if self.rank == 0:
            sched, loss = cfg.ssl.schedule, cfg.ssl.loss
            kept = self.schedules.teacher_init_kept()
            log.info(
                "teacher momentum %.5f -> %.5f over %d steps: the final teacher keeps %.1f%% of its initial weights",
                self.schedules.momentum(0),
                sched.momentum_teacher_end,
                cfg.steps,
                100 * kept,
            )
            if kept > 0.05 and not cfg.init.backbone:
                log.warning(
                    "the teacher of this run ends %.0f%% random init: a shorter run needs a lower "
                    "ssl.schedule.momentum_teacher, or set ssl.schedule.teacher_init_kept (e.g. 0.01)",
                    100 * kept,
                )
            if loss.koleo_weight > 0 and cfg.data.stream.batch_size < KOLEO_MIN_BATCH:
                log.warning(
                    "ssl.loss.koleo_weight=%g on %d tiles per rank: DINOv2's weight is for 64+ per GPU; on a small "
                    "batch of similar CLS vectors KoLeo spreads them into noise (0 turns it off)",
                    loss.koleo_weight,
                    cfg.data.stream.batch_size,
                )
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self._signal: int | None = None  # set by the handler on this rank
        self._stop_agreed = False  # some rank had a signal when the last step's flags were reduced
        self._rng_to_restore: dict[str, Any] | None = None
        self._batches: Iterator | None = None
        m = cfg.monitor
        self.probe = (
            KnnProbe(m.shards, m.tiles, m.genes, m.k, cfg.data.augment, model_cfg.vocab_size)
            if m.every_steps and self.rank == 0
            else None
        )

        path = checkpoint.resolve(resume, self.checkpoints) if resume else None
        if path is not None:
            info, self._rng_to_restore = checkpoint.load(path, self.engine, self.meta, self.loader)
            self.nonfinite_total = int(info.get("nonfinite_total", 0))
            if info["step"] != self.step:
                raise RuntimeError(f"{path}: trainer.json says step {info['step']}, DeepSpeed's state {self.step}")
            log.info("resumed from %s at step %d", path, self.step)
        elif resume == "auto":
            log.info("no checkpoint under %s: starting from scratch", self.checkpoints)

    @property
    def step(self) -> int:
        """Optimiser steps taken."""
        return int(self.engine.global_steps)

    # ------------------------------------------------------------------ data

    def next_batch(self):
        """The next batch on the device. The first call starts the loader (whose workers draw their seed
        from torch's RNG) and only then restores a resumed run's RNG states."""
        if self._batches is None:
            self._batches = iter(self.loader)
            first = next(self._batches)
            if self._rng_to_restore is not None:
                checkpoint.set_rng_state(self._rng_to_restore)
                self._rng_to_restore = None
            return self.decoder(first.to(self.device, non_blocking=True))
        return self.decoder(next(self._batches).to(self.device, non_blocking=True))

    # ------------------------------------------------------------------ one micro-step

    def _sync(self) -> None:
        if self.cfg.log.phase_timing and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_step(self, batch, window: Window | None = None) -> dict[str, float] | None:
        """One micro-batch: forward, and unless the loss is non-finite on some rank, backward, optimiser
        step (at the accumulation boundary), centre update and EMA. Returns the local loss terms, or
        None for a skipped step."""
        values = self.schedules(self.step)
        apply_schedule(self.optimizer, values)
        times = window.times if window is not None else {}
        t0 = time.perf_counter()
        with autocast(self.cfg, self.device):
            targets = self.meta.teacher_targets(batch, values.teacher_temperature)
        if window is not None:
            window.collapse.add(targets.cls)
        out = self.engine(batch)
        losses = self.meta.losses(out, targets, batch)
        control = self.meta.dino_shuffled(out, targets, batch)
        # One collective agrees on both: a non-finite loss anywhere, and a stop signal anywhere.
        flags = torch.stack(
            [
                (~torch.isfinite(losses["loss"].detach())).float(),
                torch.tensor(float(self._signal is not None), device=self.device),
            ]
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad, stop = flags.tolist()
        self._stop_agreed = self._stop_agreed or bool(stop)
        t1 = time.perf_counter()
        times["forward"] = times.get("forward", 0.0) + t1 - t0
        if bad:
            self.nonfinite_total += 1
            self.nonfinite_run += 1
            log.warning(
                "step %d: non-finite loss (%s), step skipped (%d in a row, %d in all)",
                self.step,
                {k: float(v.detach()) for k, v in losses.items()},
                self.nonfinite_run,
                self.nonfinite_total,
            )
            if self.nonfinite_run >= self.cfg.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"{self.nonfinite_run} steps in a row had a NaN/inf loss (at step {self.step}); stopping. "
                    "Lower ssl.schedule.lr or optim.clip_grad, check the data (corrupt_shards, bad_samples in "
                    f"metrics.jsonl), or resume from an earlier checkpoint under {self.checkpoints}"
                )
            return None
        self.nonfinite_run = 0
        self.engine.backward(losses["loss"])
        self._sync()
        t2 = time.perf_counter()
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        self._sync()
        t3 = time.perf_counter()
        self.meta.commit(targets)
        if boundary:
            self.meta.update_teacher(values.momentum, student_weights(self.engine, self.student_params))
        self._sync()
        t4 = time.perf_counter()
        for phase, dt in (("backward", t2 - t1), ("optimizer", t3 - t2), ("ema", t4 - t3)):
            times[phase] = times.get(phase, 0.0) + dt
        values = torch.stack([v.detach().float() for v in (*losses.values(), control)]).tolist()
        return dict(zip((*losses, "dino_shuffled"), values, strict=True))

    # ------------------------------------------------------------------ the run

    def _on_signal(self, signum, _frame) -> None:
        self._signal = signum
        log.warning("rank %d got %s: finishing the step, then saving", self.rank, signal.Signals(signum).name)

    def save(self) -> Path:
        """A checkpoint, then the checkpoint hooks on rank 0. A failing hook is logged, not raised: the
        checkpoint is safe and the run goes on (the other ranks wait at the barrier either way)."""
        state = {"nonfinite_total": self.nonfinite_total, "config": to_dict(self.cfg)}
        path = checkpoint.save(
            self.checkpoints, self.step, self.engine, self.meta, self.loader, state, self.cfg.checkpoint.keep
        )
        if self.hooks:
            if self.rank == 0:
                for hook in self.hooks:
                    try:
                        hook(path, self.step)
                    except Exception:
                        log.exception(
                            "checkpoint hook %s failed at step %d (the checkpoint %s is complete)",
                            getattr(hook, "__name__", type(hook).__name__),
                            self.step,
                            path,
                        )
            dist.barrier()
        return path

    def _report_stop(self, path: Path) -> None:
        """Rank 0 tells the job script (``$HISTOTX_STOP_REPORT``, set by slurm/pretrain.sbatch) that a stop
        signal's checkpoint is complete on every rank (:func:`checkpoint.save` returned after its last
        barrier). The launcher's exit status cannot say so: torchrun exits 1 after forwarding a signal,
        whatever its ranks did."""
        target = os.environ.get(STOP_REPORT_ENV)
        if self.rank == 0 and target:
            atomic_write_json(target, {"step": self.step, "checkpoint": str(path), "world_size": self.world})

    def _record(self, window: Window) -> dict[str, Any]:
        record = window.reduce(self.device)
        values = self.schedules(self.step - 1)
        stats = self.loader.stats
        if "dino" in record and "dino_shuffled" in record:
            # > 0 when the teacher's targets say something about the tile (see SSLMetaArch.dino_shuffled)
            record["dino/control_gap"] = record["dino_shuffled"] - record["dino"]
            record["dino/ln_k"] = math.log(self.cfg.ssl.head.out_dim)
        record.update(
            lr=values.lr,
            backbone_lr=values.backbone_lr,
            teacher_init_kept=self.schedules.teacher_init_kept(self.step),
            last_layer_lr=values.last_layer_lr,
            weight_decay=values.weight_decay,
            momentum=values.momentum,
            teacher_temperature=values.teacher_temperature,
            epoch=self.loader.epoch,
            memory_mb=memory_mb(self.device),
            nonfinite_skipped=self.nonfinite_total,
            corrupt_shards=stats.corrupt_shards,
            bad_samples=stats.bad_samples,
        )
        return record

    def run_probe(self, metrics: MetricsWriter) -> float:
        """The kNN probe of the teacher on rank 0 (the others wait at a barrier), written as its own
        record; returns the seconds it took."""
        t0 = time.perf_counter()
        if self.probe is not None:
            with autocast(self.cfg, self.device):
                record = self.probe(self.meta.teacher.backbone, self.device)
            record["time/probe_s"] = time.perf_counter() - t0
            metrics.write(self.step, record)
        dist.barrier()
        return time.perf_counter() - t0

    def _after_step(self, metrics: MetricsWriter, window: Window) -> tuple[Window, bool]:
        """After an optimiser step: the metrics record, the probe and the checkpoint when due; returns the
        window going on and whether the ranks agreed to stop (then the checkpoint is saved)."""
        cfg, probe_every = self.cfg, self.cfg.monitor.every_steps
        if self.step % cfg.log.every_steps == 0 or self.step == cfg.steps:
            metrics.write(self.step, self._record(window))
            window = Window()
        if probe_every and (self.step % probe_every == 0 or self.step == cfg.steps):
            window.started += self.run_probe(metrics)  # the probe's time is not the window's
        stopped = self._stop_agreed
        if stopped or self.step % cfg.checkpoint.every_steps == 0 or self.step == cfg.steps:
            saved = self.save()
        if stopped:
            log.warning(
                "stopped by %s after step %d; checkpoint saved, resume with --resume auto",
                signal.Signals(self._signal).name if self._signal else "a signal on another rank",
                self.step,
            )
            self._report_stop(saved)
        return window, stopped

    def run(self) -> int:
        cfg = self.cfg
        metrics = MetricsWriter(self.out, cfg.log, cfg.steps, self.step, enabled=self.rank == 0)
        window, stopped, previous = Window(), False, {}
        model_cfg = self.meta.student.backbone.config
        try:
            # Start the loader's worker processes first, so that they keep the default signal actions.
            t0 = time.perf_counter()
            pending = self.next_batch() if self.step < cfg.steps else None
            window.times["data_wait"] += time.perf_counter() - t0
            previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
            probe_every = cfg.monitor.every_steps
            if probe_every and self.step == 0:
                self.run_probe(metrics)  # the random-init baseline
                window = Window()
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                batch, pending = pending if pending is not None else self.next_batch(), None
                window.times["data_wait"] += time.perf_counter() - t0
                lengths = self.meta.sequence_lengths(batch)
                before = self.step
                losses = self.train_step(batch, window)
                window.micro_steps += 1
                if losses is not None:
                    window.add_losses({k: losses[k] for k in ("loss", *TERM_NAMES, "dino_shuffled")})
                    window.samples += batch.batch_size
                    window.empty_views += batch.n_empty_views
                    window.tokens += int(sum(int(v.sum()) for v in lengths.values()))
                    window.flops += step_flops(model_cfg, cfg.ssl, batch, lengths)
                if self.step == before:
                    continue  # inside an accumulation window, or skipped
                metrics.advance(self.step - before)
                window, stopped = self._after_step(metrics, window)
                if stopped:
                    break
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            metrics.close()
            self._batches = None
        if self.rank == 0 and not stopped:
            log.info("finished %d steps; %d non-finite steps skipped", self.step, self.nonfinite_total)
        return 0

    def close(self) -> None:
        """The end of a run that every rank reached: a barrier, then the process group goes."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def abort(self) -> None:
        """The end of a run that failed on this rank. No barrier: the other ranks may be waiting in another
        collective (a barrier here would match nothing and hang every rank until the NCCL/gloo timeout).
        The process group is aborted, so that this process exits now; its peers then fail in their pending
        collective (gloo: the connection closes) or are stopped by the launcher (torchrun, srun
        --kill-on-bad-exit)."""
        abort_process_group(self.rank)


def abort_process_group(rank: int | None = None) -> None:
    if not dist.is_initialized():
        return
    try:
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort is not None:
            abort()
        else:  # pragma: no cover - older torch
            dist.destroy_process_group()
    except Exception as exc:  # the group is already broken: nothing more to release
        log.debug("rank %s: aborting the process group: %s", rank, exc)


def train(cfg: TrainConfig, resume: str | None = None, hooks: Sequence[CheckpointHook] = ()) -> int:
    try:
        trainer = Trainer(cfg, resume, hooks)
    except BaseException:  # set-up failed on this rank (the caller reports it): leave without a barrier
        abort_process_group()
        raise
    try:
        code = trainer.run()
    except BaseException as exc:
        consequence = is_peer_failure(exc)
        log.error(
            "rank %d of %d failed at step %d: %s: %s%s",
            trainer.rank,
            trainer.world,
            trainer.step + 1,
            type(exc).__name__,
            exc,
            " (a peer failed first)" if consequence else "",
        )
        if consequence:
            # torchrun names the failure with the earliest time stamp (whole seconds) the root cause; a rank
            # that only saw its peer go waits, so that the rank that failed first is the one reported
            time.sleep(PEER_FAILURE_DELAY_S)
        trainer.abort()
        raise
    trainer.close()
    return code


PEER_FAILURE_DELAY_S = 2.0
_PEER_FAILURE = re.compile(
    r"Connection closed by peer|Connection reset by peer|remote worker|Broken pipe|NCCL communicator was aborted"
    r"|ncclRemoteError|remote process exited",
    re.IGNORECASE,
)


def is_peer_failure(exc: BaseException) -> bool:
    """Whether a rank's exception only reports that another rank went away (gloo: "Connection closed by
    peer ... typically caused by a remote worker crashing"; NCCL: a remote error or an aborted
    communicator), rather than a failure of its own."""
    return isinstance(exc, RuntimeError) and bool(_PEER_FAILURE.search(str(exc)))
