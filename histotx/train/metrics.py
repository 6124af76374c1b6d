"""Training metrics: summed over a logging window on every rank, reduced once per window, written by
rank 0 to ``metrics.jsonl`` (one JSON object per line) and TensorBoard, and shown on the console
(:mod:`histotx.train.console`: progress line, collapse monitors, warnings)."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from histotx.train.config import LogConfig
from histotx.train.console import Console
from histotx.train.monitor import CollapseStats

PHASES = ("data_wait", "forward", "backward", "optimizer", "ema")


class Window:
    """Sums of one logging window on this rank: loss terms (finite steps only), phase times, counts."""

    def __init__(self) -> None:
        self.losses: dict[str, float] = defaultdict(float)
        self.times: dict[str, float] = defaultdict(float)
        self.steps = 0  # micro-steps with a finite loss
        self.micro_steps = 0
        self.samples = 0
        self.tokens = 0
        self.empty_views = 0  # student views without any token (left out of the losses)
        self.flops = 0.0
        self.collapse = CollapseStats()  # the teacher's CLS probabilities, every micro-step
        self.started = time.perf_counter()

    def add_losses(self, losses: dict[str, float]) -> None:
        for k, v in losses.items():
            self.losses[k] += v
        self.steps += 1

    def reduce(self, device: torch.device) -> dict[str, Any]:
        """Global means and totals over ranks (collective: every rank calls it at the same step)."""
        keys = sorted(self.losses)
        values = (
            [self.losses[k] for k in keys]
            + [self.times[p] for p in PHASES]
            + [
                float(self.steps),
                float(self.micro_steps),
                float(self.samples),
                float(self.tokens),
                self.flops,
                float(self.empty_views),
            ]
        )
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(t)
        v = t.tolist()
        world = dist.get_world_size() if dist.is_initialized() else 1
        n_loss, n_phase = len(keys), len(PHASES)
        steps, micro, samples, tokens, flops, empty_views = v[n_loss + n_phase :]
        wall = time.perf_counter() - self.started
        out: dict[str, Any] = {k: v[i] / max(steps, 1.0) for i, k in enumerate(keys)}
        per_rank_steps = max(micro / world, 1.0)
        for i, phase in enumerate(PHASES):
            out[f"time/{phase}_s"] = v[n_loss + i] / world / per_rank_steps
        compute = sum(out[f"time/{p}_s"] for p in PHASES[1:])
        out["time/compute_s"] = compute
        out["time/data_wait_fraction"] = out["time/data_wait_s"] / max(out["time/data_wait_s"] + compute, 1e-12)
        out["samples_per_s"] = samples / wall
        out["tokens_per_s"] = tokens / wall
        out["tflops_per_s_per_rank"] = flops / wall / world / 1e12
        out["empty_views"] = int(empty_views)  # in the window, all ranks
        out.update(self.collapse.reduce(device))
        return out


class MetricsWriter:
    """Rank 0's outputs; other ranks hold a writer that writes nothing."""

    def __init__(self, out: Path, cfg: LogConfig, total_steps: int, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.tb = None
        self.console = Console(total_steps, start_step, cfg.progress, enabled)
        self.file = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "metrics.jsonl", "a", buffering=1)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **record}) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if "loss" in record:  # a training window (the probe writes records of its own)
            self.console.record(step, record)

    def advance(self, steps: int = 1) -> None:
        self.console.advance(steps)

    def close(self) -> None:
        self.console.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()
