"""The formats a model is exported to besides HistoTx's own folder: the one list ``histotx export --format``,
the export itself, its summary and ``load_model``'s recognition of a folder derive from.

A target is an :class:`ExportTarget` naming the module of ``histotx.export`` that implements :class:`Target`;
the module is imported on first use (the CLI builds its parsers without torch). Adding a target: its module,
and one :class:`ExportTarget` below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from histotx.export.load import LoadedModel
    from histotx.export.source import Teacher
    from histotx.model import FusedViT


@dataclass(frozen=True)
class ExportContext:
    """What an export hands every target: the teacher read from the run, its model built and loaded, the
    license of the model card and every target asked for (a card may point at its siblings)."""

    teacher: Teacher
    model: FusedViT
    license: str
    formats: tuple[str, ...]
    license_name: str = ""  # with license "other": its name and link (default: a LICENSE.md saying none)
    license_link: str = ""


class Target(Protocol):
    """What a target's module provides, as module-level functions."""

    def write(self, ctx: ExportContext, folder: Path) -> None:
        """Write the target's folder (``folder`` does not exist yet; the export renames it into place)."""

    def detect(self, path: Path) -> bool:
        """Whether ``path`` is a folder this target wrote (``load_model`` asks each in turn)."""

    def load(self, path: Path, model: FusedViT) -> LoadedModel:
        """The loaded folder's model with what feeding it needs (genes, µm/px, size, mean/std, name)."""


@dataclass(frozen=True)
class ExportTarget:
    name: str  # --format value, and the subfolder of OUT
    module: str  # module of histotx.export implementing Target
    help: str  # its lines in `histotx export --help`
    usage: str  # how to load it, printed after an export ({folder}: where it went)

    def target(self) -> Target:
        return importlib.import_module(f"histotx.export.{self.module}")  # type: ignore[return-value]


# In the order load_model asks them about a folder.
TARGETS: dict[str, ExportTarget] = {
    t.name: t
    for t in (
        ExportTarget(
            "hf",
            "hf",
            "transformers folder: AutoModel.from_pretrained(OUT/hf, trust_remote_code=True) works\n"
            "offline without HistoTx; image processor (size, mean, std, µm/px), vocab.tsv, model card",
            "AutoModel.from_pretrained('{folder}', trust_remote_code=True)",
        ),
        ExportTarget(
            "timm",
            "timm_hub",
            'the image backbone alone in timm\'s hub layout: timm.create_model("local-dir:OUT/timm",\n'
            "pretrained=True) — for HEST-Bench, trident, CLAM-style pipelines",
            "timm.create_model('local-dir:{folder}', pretrained=True)",
        ),
    )
}
ALL = "both"  # --format value for every target (named when there were two)
FORMATS: dict[str, tuple[str, ...]] = {**{name: (name,) for name in TARGETS}, ALL: tuple(TARGETS)}


def formats_help() -> str:
    """The --format lines of `histotx export --help`."""
    lines = []
    for t in TARGETS.values():
        first, *rest = t.help.splitlines()
        lines.append(f"  {t.name:<6} OUT/{t.name:<5} {first}")
        lines += [f"{'':19}{line}" for line in rest]
    lines.append(f"  {ALL:<6} {' and '.join(TARGETS)}")
    return "\n".join(lines)
