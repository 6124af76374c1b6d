"""Typed configuration of the SSL objective (heads, loss terms, schedules); see histotx.config."""

from __future__ import annotations

from dataclasses import dataclass, field

from histotx.config import ConfigError

TEACHER_NORMS = ("centering", "sinkhorn")
LR_SCALINGS = ("sqrt", "linear")
KOLEO_MIN_BATCH = 64  # per rank: below it KoLeo's nearest neighbours are few and near-identical


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
    # DINOv2's 0.1 is for per-GPU batches of 64-128 (global 1,024+). On a small batch of near-identical CLS
    # vectors (a fresh or tiny backbone) it spreads them into noise: set 0 below KOLEO_MIN_BATCH per rank.
    koleo_weight: float = 0.1
    masked_expression_weight: float = 0.0  # optional reconstruction of masked transcript tokens
    # Cross-modal prediction from the CLS: every student global crop's CLS, whatever modality the student saw
    # (image only, transcripts only or both), predicts the gene composition of all the transcripts of that
    # crop as the teacher sees them. Image-only views learn image → expression; fused and transcripts-only
    # views must carry the transcripts in the CLS (a fused teacher's DINO targets need not: at CPU scale a
    # fused CLS ignored the transcript tokens, benchmarks/ssl_results.md).
    cls_expression_weight: float = 0.0


@dataclass
class ScheduleConfig:
    """Peak lr: ``lr`` at ``lr_reference_batch``, scaled to the global batch by ``lr_scaling``:
    ``sqrt`` is DINOv2's rule (base_lr · sqrt(batch / 1024); its default base_lr 4e-3, 2e-4 for ViT-g),
    ``linear`` is DINO's (5e-4 · batch / 256)."""

    lr: float = 2e-4
    lr_reference_batch: int = 1024
    lr_scaling: str = "sqrt"
    min_lr: float = 1e-6
    warmup_steps: int = 1000
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    momentum_teacher: float = 0.994
    momentum_teacher_end: float = 1.0
    # > 0: the start momentum is derived from the run length instead, so that the teacher keeps this share
    # of its initial weights at the end (product of the momenta; cosine to momentum_teacher_end). DINO's
    # 0.996 over 125k steps keeps ~e^-250 of them; 0.99 -> 1 over 150 steps keeps 47 %.
    teacher_init_kept: float = 0.0
    teacher_temp: float = 0.07
    teacher_temp_warmup: float = 0.04
    teacher_temp_warmup_steps: int = 3000
    freeze_last_layer_steps: int = 1250
    # Continuing a released backbone with fresh heads: for these steps the backbone's lr is 0 (the heads and
    # prototypes fit the teacher's features first), then it joins with its own warm-up of warmup_steps.
    head_warmup_steps: int = 0


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
        self._validate_schedule()
        if self.loss.student_temp <= 0:
            raise ConfigError(f"ssl.loss.student_temp must be positive, got {self.loss.student_temp}")
        if self.schedule.teacher_temp <= 0 or self.schedule.teacher_temp_warmup <= 0:
            raise ConfigError("ssl.schedule teacher temperatures must be positive")
        for name, value in vars(self.loss).items():
            if name.endswith("_weight") and value < 0:
                raise ConfigError(f"ssl.loss.{name} must be >= 0 (0 turns the term off), got {value}")
        if min(self.head.out_dim, self.head.hidden_dim, self.head.bottleneck_dim, self.head.n_layers) < 1:
            raise ConfigError("ssl.head sizes must be positive")

    def _validate_schedule(self) -> None:
        s = self.schedule
        if s.lr_scaling not in LR_SCALINGS:
            raise ConfigError(f"ssl.schedule.lr_scaling must be one of {LR_SCALINGS}, got {s.lr_scaling!r}")
        if not 0.0 <= s.teacher_init_kept < 1.0:
            raise ConfigError(f"ssl.schedule.teacher_init_kept must be in [0, 1), got {s.teacher_init_kept}")
        if s.head_warmup_steps < 0:
            raise ConfigError(f"ssl.schedule.head_warmup_steps must be >= 0, got {s.head_warmup_steps}")
