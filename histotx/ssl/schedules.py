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


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 1024, rule: str = "sqrt") -> float:
    """The peak lr for ``global_batch``: DINOv2's square-root rule ``base_lr * sqrt(global_batch /
    reference_batch)`` (``rule="sqrt"``), or DINO's linear rule ``base_lr * global_batch / reference_batch``."""
    if global_batch < 1 or reference_batch < 1:
        raise ValueError(f"batch sizes must be positive (global {global_batch}, reference {reference_batch})")
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch / reference_batch)
    if rule == "linear":
        return base_lr * global_batch / reference_batch
    raise ValueError(f"unknown lr scaling rule {rule!r} (sqrt or linear)")


def momentum_for_run(total_steps: int, kept: float, end: float = 1.0) -> float:
    """The start momentum of a cosine schedule to ``end`` over ``total_steps`` after which the EMA keeps
    ``kept`` of its initial weights (``prod_t m_t = kept``), found by bisection; 0 when even that is not enough."""
    if not 0.0 < kept < 1.0:
        raise ValueError(f"kept must be in (0, 1), got {kept}")

    def log_kept(start: float) -> float:
        m = CosineSchedule(start, end, total_steps)
        return sum(math.log(max(m(t), 1e-300)) for t in range(total_steps))

    target = math.log(kept)
    if log_kept(0.0) > target:
        return 0.0
    lo, hi = 0.0, end  # log_kept grows with the start momentum
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if log_kept(mid) < target else (lo, mid)
    return lo


def initial_weight_kept(momentum: "CosineSchedule", steps: int) -> float:
    """The share of its initial weights an EMA teacher still holds after ``steps`` updates."""
    return math.exp(sum(math.log(max(momentum(t), 1e-300)) for t in range(steps)))


@dataclass(frozen=True)
class StepValues:
    lr: float  # the heads and the modules a checkpoint does not provide
    last_layer_lr: float
    backbone_lr: float  # the backbone's (0 during the head warm-up); groups multiply in their layer decay
    weight_decay: float
    momentum: float
    teacher_temperature: float


class SSLSchedules:
    """Every schedule of a run, evaluated together for one step.

    ``last_layer_lr`` is 0 while the prototype layer is frozen (``freeze_last_layer_steps``), which
    freezes it under any optimiser wrapper (decoupled weight decay is scaled by the lr too). The
    prototypes' freeze counts from the end of the head warm-up only when the warm-up is longer.

    Head warm-up (``head_warmup_steps`` = H > 0): the backbone's lr is 0 for steps < H, then warms up
    linearly over ``warmup_steps`` to the value the cosine has reached and follows it; the heads' lr
    follows the ordinary schedule from step 0.

    Teacher momentum: ``momentum_teacher`` → ``momentum_teacher_end`` (cosine), or, with
    ``teacher_init_kept`` > 0, a start momentum sized to the run (:func:`momentum_for_run`).
    """

    def __init__(self, cfg, total_steps: int, global_batch: int) -> None:
        peak = scaled_lr(cfg.lr, global_batch, cfg.lr_reference_batch, getattr(cfg, "lr_scaling", "sqrt"))
        warmup = min(cfg.warmup_steps, total_steps)
        self.freeze_last_layer_steps = cfg.freeze_last_layer_steps
        self.head_warmup_steps = min(getattr(cfg, "head_warmup_steps", 0), total_steps)
        self.backbone_warmup_steps = warmup
        self.lr = CosineSchedule(peak, cfg.min_lr, total_steps, warmup, 0.0)
        self.weight_decay = CosineSchedule(cfg.weight_decay, cfg.weight_decay_end, total_steps)
        start = cfg.momentum_teacher
        kept = getattr(cfg, "teacher_init_kept", 0.0)
        if kept > 0:
            start = momentum_for_run(total_steps, kept, cfg.momentum_teacher_end)
        self.momentum = CosineSchedule(start, cfg.momentum_teacher_end, total_steps)
        self.total_steps = total_steps
        self._kept_cache = (0, 0.0)
        temp_warmup = min(cfg.teacher_temp_warmup_steps, total_steps)
        self.teacher_temperature = CosineSchedule(
            cfg.teacher_temp, cfg.teacher_temp, total_steps, temp_warmup, cfg.teacher_temp_warmup
        )

    def teacher_init_kept(self, steps: int | None = None) -> float:
        """Share of the teacher's initial weights left after ``steps`` EMA updates (default: the whole run);
        extended from the last call's sum, so calling it as a run goes costs O(1) a step."""
        steps = self.total_steps if steps is None else steps
        done, log_sum = self._kept_cache
        if steps < done:
            done, log_sum = 0, 0.0
        for t in range(done, steps):
            log_sum += math.log(max(self.momentum(t), 1e-300))
        self._kept_cache = (steps, log_sum)
        return math.exp(log_sum)

    def backbone_lr(self, step: int) -> float:
        h = self.head_warmup_steps
        if h == 0:
            return self.lr(step)
        if step < h:
            return 0.0
        since = step - h
        if since < self.backbone_warmup_steps:
            return self.lr(step) * (since + 1) / (self.backbone_warmup_steps + 1)
        return self.lr(step)

    def __call__(self, step: int) -> StepValues:
        lr = self.lr(step)
        return StepValues(
            lr=lr,
            last_layer_lr=0.0 if step < self.freeze_last_layer_steps else lr,
            backbone_lr=self.backbone_lr(step),
            weight_decay=self.weight_decay(step),
            momentum=self.momentum(step),
            teacher_temperature=self.teacher_temperature(step),
        )
