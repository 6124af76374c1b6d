"""``export``: a run's teacher → OUT (HistoTx folder) + OUT/hf (transformers) and/or OUT/timm (timm).

The folder is built under a temporary name beside OUT and renamed when complete, so OUT is either the
whole export or absent (an existing OUT is replaced only with ``overwrite``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from histotx.export.native import write_native
from histotx.export.source import read_teacher
from histotx.export.targets import FORMATS, TARGETS, ExportContext
from histotx.files import atomic_folder
from histotx.model import FusedViT

__all__ = ["FORMATS", "ExportSummary", "export"]


@dataclass
class ExportSummary:
    out: Path
    name: str
    checkpoint: Path
    step: int
    parameters: int
    genes: int
    mpp: float
    formats: tuple[str, ...]
    folders: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    def text(self) -> str:
        lines = [
            f"exported {self.name} (step {self.step}, {self.parameters:,} parameters, {self.genes} genes, "
            f"{self.mpp:g} µm/px) from {self.checkpoint} in {self.seconds:.1f} s"
        ]
        for kind, folder in self.folders.items():
            size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            lines.append(f"  {kind:<8}{folder}  ({size / 2**20:.1f} MiB)")
        lines.append(f"load it: histotx.export.load_model('{self.out}'), histotx train ... init.backbone={self.out}")
        for kind, folder in self.folders.items():
            if kind in TARGETS:
                lines.append(f"          {TARGETS[kind].usage.format(folder=folder)}")
        return "\n".join(lines)


def export(
    source: str | Path,
    out: str | Path,
    formats: tuple[str, ...] = ("hf",),
    shards: str | Path | None = None,
    license: str = "other",
    overwrite: bool = False,
    which: str = "teacher",
    license_name: str = "",
    license_link: str = "",
) -> ExportSummary:
    """Export the teacher (or the student) of ``source`` (run or checkpoint folder) to ``out``;
    ``formats``: names of :data:`~histotx.export.targets.TARGETS`."""
    t0 = time.perf_counter()
    unknown = sorted(set(formats) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; choose from {', '.join(TARGETS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out}: exists and is not empty; choose another --out or pass --overwrite")
    teacher = read_teacher(source, shards, which)
    model = FusedViT(teacher.config)
    model.load_state_dict(teacher.state, strict=True)  # the weights fit the config before anything is written
    with atomic_folder(out) as tmp:
        write_native(teacher, tmp)
        ctx = ExportContext(teacher, model, license, tuple(formats), license_name, license_link)
        for name in TARGETS:  # in the registry's order, whatever the order asked
            if name in formats:
                TARGETS[name].target().write(ctx, tmp / name)
    folders = {"histotx": out, **{kind: out / kind for kind in TARGETS if kind in formats}}
    return ExportSummary(
        out,
        teacher.name,
        teacher.checkpoint,
        teacher.step,
        sum(p.numel() for p in model.parameters()),
        len(teacher.vocab),
        teacher.mpp,
        tuple(formats),
        folders,
        time.perf_counter() - t0,
    )
