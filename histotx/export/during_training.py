"""Exports made while a run trains: the teacher backbone as a timm folder at checkpoints (``checkpoint.export_every``).

    RUN/exports/step_00001000/   config.json + model.safetensors: what ``histotx export --format timm`` puts in
                                 OUT/timm; ``timm.create_model("local-dir:RUN/exports/step_00001000", pretrained=True)``

The trainer knows nothing of exports: the layer above it (the ``histotx`` CLI, launch/train.py) passes
:func:`checkpoint_hooks` to ``histotx.train.cli``, and the trainer calls the hooks on rank 0 after each
complete checkpoint. The hook reads the checkpoint just written, as ``histotx export`` would (its teacher
is whole in ``teacher.safetensors`` at every ZeRO stage), so both give the same folder. Only the timm folder
is kept: it outlives the checkpoint (``checkpoint.keep``), and the HistoTx / Hugging Face folders, which add
the transcript branch, are a ``histotx export`` of the checkpoint away while it exists.
This module imports nothing heavy at the top: the CLI builds its parsers without torch.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from histotx.train.config import TrainConfig

log = logging.getLogger(__name__)

EXPORTS = "exports"
"""The run folder's subfolder that holds the exports, one per exported checkpoint, named like it."""


def is_due(step: int, every: int, last: int) -> bool:
    """Whether the checkpoint of ``step`` is exported: ``every`` > 0 and a multiple of it, or the last step."""
    return every > 0 and (step % every == 0 or step == last)


def export_timm(checkpoint: str | Path, out: str | Path) -> Path:
    """The checkpoint's teacher backbone → the timm folder ``out``, built aside and renamed into place
    (an existing ``out``, from an earlier save of the same step, is replaced)."""
    from histotx.export.source import read_teacher
    from histotx.export.timm_hub import write_timm
    from histotx.files import atomic_folder
    from histotx.model import FusedViT

    teacher = read_teacher(checkpoint)
    model = FusedViT(teacher.config)
    model.load_state_dict(teacher.state, strict=True)
    out = Path(out)
    with atomic_folder(out) as tmp:
        write_timm(model, tmp, teacher.mpp, teacher.mean, teacher.std, teacher.name)
    return out


class TimmExportHook:
    """A checkpoint hook: at the steps :func:`is_due` picks, the checkpoint's teacher → ``root/step_*``."""

    def __init__(self, root: str | Path, every: int, last: int) -> None:
        self.root, self.every, self.last = Path(root), every, last

    def __call__(self, checkpoint: Path, step: int) -> Path | None:
        if not is_due(step, self.every, self.last):
            return None
        t0 = time.perf_counter()
        out = export_timm(checkpoint, self.root / Path(checkpoint).name)
        log.info("step %d: teacher backbone exported for timm to %s in %.1f s", step, out, time.perf_counter() - t0)
        return out


def checkpoint_hooks(cfg: TrainConfig) -> list[TimmExportHook]:
    """The hooks a run's config asks for: none unless ``checkpoint.export_every`` > 0."""
    every = cfg.checkpoint.export_every
    return [TimmExportHook(Path(cfg.out) / EXPORTS, every, cfg.steps)] if every > 0 else []
