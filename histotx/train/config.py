"""Typed configuration of a training run (``histotx train CONFIG.yaml key=value ...``).

One YAML file holds every section; ``key=value`` overrides address any field
(``optim.lr_layer_decay=0.9``, ``data.stream.batch_size=64``, ``model.size=L``). The resolved config
is written beside the run and into every checkpoint, so what ran can always be read back.

``model`` is a :class:`ModelSection`: the :class:`~histotx.model.FusedViTConfig` fields and defaults,
typed, with the widths left at 0 ("from the ``size`` preset") until the model is built. (Storing a
filled-in FusedViTConfig here would make the tiny preset's widths stick when a file only says
``size: L``.) A train config starts its model from a preset of configs/model/ and states the
differences: ``model: {_base_: ../model/vit_l16.yaml, drop_path_rate: 0.2}``.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, make_dataclass
from typing import Any

from histotx.config import ConfigError, from_dict
from histotx.data.config import DataConfig
from histotx.model import FusedViTConfig, ModelConfigError
from histotx.ssl.config import SSLConfig

PRECISIONS = ("auto", "fp32", "bf16")


_HINTS = typing.get_type_hints(FusedViTConfig)
# FusedViTConfig's fields and defaults, without its __post_init__: widths left at 0 stay "from the size preset"
# here (and in the dumped config), and are filled in only when the model is built (model_config).
ModelSection = make_dataclass(
    "ModelSection",
    [
        (
            f.name,
            _HINTS[f.name],
            field(default=f.default) if f.default is not MISSING else field(default_factory=f.default_factory),
        )
        for f in fields(FusedViTConfig)
    ],
)
ModelSection.__module__ = __name__  # pickled by name (make_dataclass's module= needs Python 3.12)


@dataclass
class InitConfig:
    """Where the backbone starts from: empty for random, else a pretrained checkpoint (timm hub
    folder, timm model name + ``weights``, or a transformers Dinov2 folder) loaded into student and
    teacher; the heads always start fresh."""

    backbone: str = ""
    weights: str = ""


@dataclass
class OptimConfig:
    """AdamW parameter groups. The lr and weight decay themselves follow ``ssl.schedule``."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    layer_decay: float = 0.9  # lr × layer_decay^(depth + 1 − layer) for the backbone (1: off)
    patch_embed_lr_mult: float = 0.2  # on top of the layer decay
    new_module_lr_mult: float = 1.0  # transcript tokenizer and heads: modules the checkpoint did not have
    clip_grad: float = 3.0  # global gradient norm; 0: off
    accumulation_steps: int = 1  # micro-batches per optimiser step


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2  # 0, 1, 2 or 3
    precision: str = "auto"  # auto: bf16 compute (torch autocast, fp32 weights) on GPU, fp32 on CPU
    backend: str = "auto"  # torch.distributed backend: auto = nccl on GPU, gloo on CPU
    bucket_size: int = 50_000_000  # ZeRO reduce / all-gather bucket (elements)
    stage3_param_persistence_threshold: int = 100_000  # ZeRO-3 keeps smaller parameters whole
    extra: dict[str, Any] = field(default_factory=dict)  # merged last into the DeepSpeed config


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # also saved at the end and on SIGTERM / SIGUSR1
    keep: int = 3  # newest complete checkpoints kept; 0: all
    # 0: off. N: rank 0 also writes the teacher backbone as a timm hub folder, RUN/exports/step_*/ (what
    # `histotx export --format timm` puts in OUT/timm), at each checkpoint whose step is a multiple of N and at
    # the last step; a multiple of every_steps. Exports outlive `keep`; `histotx export` gives the rest.
    export_every: int = 0


@dataclass
class LogConfig:
    every_steps: int = 10
    tensorboard: bool = True
    progress: bool = True  # a progress bar on rank 0
    phase_timing: bool = False  # synchronise the device between phases to time fwd/bwd/optimiser/EMA apart


@dataclass
class MonitorConfig:
    """The kNN probe of the teacher's image embedding on held-out tiles (see histotx.train.monitor)."""

    every_steps: int = 0  # 0: off; else also at step 0 (the random-init baseline) and at the end
    shards: str = ""  # a held-out shard folder (tiles the run does not train on)
    tiles: int = 512  # read from the start of the set
    genes: int = 50  # most variable genes of the subset
    k: int = 10


@dataclass
class TrainConfig:
    out: str = "runs/histotx"  # run folder: config, metrics, TensorBoard, checkpoints
    steps: int = 100_000  # optimiser steps of the whole run (the schedules span them)
    seed: int = 0
    max_consecutive_nonfinite: int = 20  # NaN/inf losses in a row before the run stops
    # GPU configs and slurm/pretrain.sbatch: stop at start-up, naming the driver and the CUDA build, when CUDA is
    # unavailable (else the run falls back to gloo + fp32 on CPU)
    require_cuda: bool = False
    init: InitConfig = field(default_factory=InitConfig)
    model: ModelSection = field(default_factory=lambda: ModelSection(size="tiny"))
    data: DataConfig = field(default_factory=DataConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def model_config(self) -> FusedViTConfig:
        try:
            return from_dict(FusedViTConfig, asdict(self.model), "model")
        except ModelConfigError as exc:
            raise ConfigError(f"model: {exc}") from exc

    def validate(self) -> None:
        model = self.model_config()
        _check_deepspeed(self.deepspeed)
        o = self.optim
        if self.steps < 1 or o.accumulation_steps < 1 or self.checkpoint.every_steps < 1 or self.log.every_steps < 1:
            raise ConfigError(
                "steps, optim.accumulation_steps, checkpoint.every_steps and log.every_steps must be >= 1"
            )
        if not 0 < o.layer_decay <= 1 or o.patch_embed_lr_mult < 0 or o.new_module_lr_mult < 0 or o.clip_grad < 0:
            raise ConfigError("optim: layer_decay must be in (0, 1]; lr multipliers and clip_grad >= 0")
        c = self.checkpoint
        if c.export_every < 0 or c.export_every % c.every_steps:
            raise ConfigError(
                f"checkpoint.export_every ({c.export_every}) must be 0 (off) or a multiple of "
                f"checkpoint.every_steps ({c.every_steps}): exports are made from checkpoints"
            )
        m = self.monitor
        if m.every_steps < 0 or (m.every_steps and (not m.shards or min(m.tiles, m.genes, m.k) < 1)):
            raise ConfigError(
                "monitor: every_steps must be >= 0; when on, set monitor.shards (a held-out shard "
                "folder) and tiles, genes, k >= 1"
            )
        if self.max_consecutive_nonfinite < 1:
            raise ConfigError("max_consecutive_nonfinite must be >= 1")
        if self.data.mask.patch_size != model.patch_size:
            raise ConfigError(
                f"data.mask.patch_size ({self.data.mask.patch_size}) must equal the model's "
                f"patch_size ({model.patch_size}): the iBOT masks are drawn per patch"
            )
        if model.vocab_size == 0:
            raise ConfigError(
                "model.vocab_size is 0 (no transcript branch): set it to at least the shard set's vocabulary size"
            )


def _check_deepspeed(ds: DeepSpeedConfig) -> None:
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {ds.zero_stage}")
    if ds.precision not in PRECISIONS:
        raise ConfigError(f"deepspeed.precision must be one of {PRECISIONS}, got {ds.precision!r}")
    if ds.backend not in ("auto", "nccl", "gloo"):
        raise ConfigError(f"deepspeed.backend must be auto, nccl or gloo, got {ds.backend!r}")
