"""Typed configuration of the SSL objective (heads, loss terms, schedules); see histotx.config."""

from __future__ import annotations

from dataclasses import dataclass, field

from histotx.config import ConfigError

TEACHER_NORMS = ("centering", "sinkhorn")


@dataclass
class HeadConfig:
    out_dim: int = 65536  # prototypes
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    n_layers: int = 3
    separate_ibot_head: bool = False  # one head for CLS and tokens (DINOv2 default), or an iBOT head of its own


@dataclass
class LossConfig:
    student_temp: float = 0.1
    teacher_norm: str = "centering"  # "centering" or "sinkhorn"
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3
    dino_weight: float = 1.0
    ibot_image_weight: float = 1.0
    ibot_transcript_weight: float = 1.0
    koleo_weight: float = 0.1
    masked_expression_weight: float = 0.0  # optional reconstruction of masked transcript tokens


@dataclass
class ScheduleConfig:
    lr: float = 2e-4  # at lr_reference_batch; scaled by sqrt(global_batch / lr_reference_batch)
    lr_reference_batch: int = 1024
    min_lr: float = 1e-6
    warmup_steps: int = 1000
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    momentum_teacher: float = 0.994
    momentum_teacher_end: float = 1.0
    teacher_temp: float = 0.07
    teacher_temp_warmup: float = 0.04
    teacher_temp_warmup_steps: int = 3000
    freeze_last_layer_steps: int = 1250


@dataclass
class SSLConfig:
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def validate(self) -> None:
        if self.loss.teacher_norm not in TEACHER_NORMS:
            raise ConfigError(f"ssl.loss.teacher_norm must be one of {TEACHER_NORMS}, got {self.loss.teacher_norm!r}")
        if not 0.0 <= self.loss.center_momentum < 1.0:
            raise ConfigError(f"ssl.loss.center_momentum must be in [0, 1), got {self.loss.center_momentum}")
        for name in ("momentum_teacher", "momentum_teacher_end"):
            value = getattr(self.schedule, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"ssl.schedule.{name} must be in [0, 1], got {value}")
        if self.loss.student_temp <= 0:
            raise ConfigError(f"ssl.loss.student_temp must be positive, got {self.loss.student_temp}")
        if self.schedule.teacher_temp <= 0 or self.schedule.teacher_temp_warmup <= 0:
            raise ConfigError("ssl.schedule teacher temperatures must be positive")
        if min(self.head.out_dim, self.head.hidden_dim, self.head.bottleneck_dim, self.head.n_layers) < 1:
            raise ConfigError("ssl.head sizes must be positive")
