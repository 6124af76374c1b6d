"""`histotx train`: self-supervised pretraining of the fused ViT under DeepSpeed ZeRO.

- :mod:`~histotx.train.config`: :class:`TrainConfig` (model / data / ssl / optim / deepspeed /
  checkpoint / log sections, YAML + ``key=value``);
- :mod:`~histotx.train.engine`: process group, precision, AdamW parameter groups, the DeepSpeed
  engine, the student's full fp32 weights for the EMA under every ZeRO stage;
- :mod:`~histotx.train.checkpoint`: save / resume (DeepSpeed state + teacher + loader + RNG + step),
  ``latest`` written last, ``--resume auto``;
- :mod:`~histotx.train.loop`: :class:`Trainer` — steps, schedules, NaN skipping, signals, metrics, checkpoint
  hooks (what the layers above make of a checkpoint: ``histotx.export.during_training``'s timm export);
- :mod:`~histotx.train.metrics`, :mod:`~histotx.train.flops`: what a run reports;
- :mod:`~histotx.train.cli`: the subcommand. The student/teacher pair is :mod:`histotx.ssl.meta`.
"""
