"""Per-step schedules of the SSL recipe: lr, weight decay, teacher momentum and temperature, freezing.

All are closed-form functions of the optimiser step (no precomputed arrays), so a resumed run only
needs the step to be back on schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_steps``, then cosine to ``final``
    at ``total_steps``; constant ``final`` afterwards."""

    base: float
    final: float
    total_steps: int
    warmup_steps: int = 0
    warmup_start: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps ({self.total_steps}), total_steps >= 1"
            )

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_start + (self.base - self.warmup_start) * step / self.warmup_steps
        if step >= self.total_steps:
            return self.final
        span = self.total_steps - self.warmup_steps
        progress = (step - self.warmup_steps) / span
        return self.final + 0.5 * (self.base - self.final) * (1.0 + math.cos(math.pi * progress))


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 1024) -> float:
    """Square-root batch scaling of DINOv2: ``base_lr * sqrt(global_batch / reference_batch)``."""
    if global_batch < 1 or reference_batch < 1:
        raise ValueError(f"batch sizes must be positive (global {global_batch}, reference {reference_batch})")
    return base_lr * math.sqrt(global_batch / reference_batch)


@dataclass(frozen=True)
class StepValues:
    lr: float
    last_layer_lr: float
    weight_decay: float
    momentum: float
    teacher_temperature: float


class SSLSchedules:
    """Every schedule of a run, evaluated together for one step.

    ``last_layer_lr`` is 0 while the prototype layer is frozen (``freeze_last_layer_steps``), which
    freezes it under any optimiser wrapper (decoupled weight decay is scaled by the lr too).
    """

    def __init__(self, cfg, total_steps: int, global_batch: int) -> None:
        peak = scaled_lr(cfg.lr, global_batch, cfg.lr_reference_batch)
        warmup = min(cfg.warmup_steps, total_steps)
        self.freeze_last_layer_steps = cfg.freeze_last_layer_steps
        self.lr = CosineSchedule(peak, cfg.min_lr, total_steps, warmup, 0.0)
        self.weight_decay = CosineSchedule(cfg.weight_decay, cfg.weight_decay_end, total_steps)
        self.momentum = CosineSchedule(cfg.momentum_teacher, cfg.momentum_teacher_end, total_steps)
        temp_warmup = min(cfg.teacher_temp_warmup_steps, total_steps)
        self.teacher_temperature = CosineSchedule(
            cfg.teacher_temp, cfg.teacher_temp, total_steps, temp_warmup, cfg.teacher_temp_warmup
        )

    def __call__(self, step: int) -> StepValues:
        lr = self.lr(step)
        return StepValues(
            lr=lr,
            last_layer_lr=0.0 if step < self.freeze_last_layer_steps else lr,
            weight_decay=self.weight_decay(step),
            momentum=self.momentum(step),
            teacher_temperature=self.teacher_temperature(step),
        )
