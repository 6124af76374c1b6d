"""One entry point per question the writer asks of a sample, dispatched through the technology registry.

Which slide, what µm/px the data itself implies, which genes (cheaply, for the vocabulary pass), and
the sites on the slide's level-0 pixels. Every bad input raises ``InputError`` naming the file. Each
technology answers through its module's :class:`~histotx.sharding.technologies.Reader` functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from histotx.sharding.cohort import Cohort, CohortSample
from histotx.sharding.errors import InputError
from histotx.sharding.technologies import TECHNOLOGIES, Reader, ReaderOptions, SampleInput

if TYPE_CHECKING:
    from histotx.sharding.bands import BandedSites
    from histotx.sharding.sites import Sites

__all__ = ["ReaderOptions", "read_genes", "read_sites", "slide_mpp_hint", "slide_path"]


def _data(sample: CohortSample, cohort: Cohort) -> Path:
    path = cohort.resolve(sample.data)
    if path is None:
        raise InputError(cohort.path, f"sample {sample.id}: technology {sample.technology} needs `data:`")
    if not path.exists():
        raise InputError(path, f"sample {sample.id}: data folder not found")
    return path


def _reader(sample: CohortSample) -> Reader | None:
    """None for a technology without data (image_only); an InputError for one no reader knows."""
    if sample.technology not in TECHNOLOGIES:
        raise InputError(None, f"sample {sample.id}: unknown technology {sample.technology!r}")
    tech = TECHNOLOGIES[sample.technology]
    return tech.module() if tech.reader is not None else None


def slide_path(sample: CohortSample, cohort: Cohort) -> Path:
    """The H&E: `slide` when given; otherwise where the technology's reader finds it (HEST: <root>/wsis/)."""
    if sample.slide:
        return cohort.resolve(sample.slide)
    reader = _reader(sample)
    if reader is not None and hasattr(reader, "slide"):
        return reader.slide(SampleInput(_data(sample, cohort), sample, cohort))
    raise InputError(cohort.path, f"sample {sample.id}: no `slide:` given")


def slide_mpp_hint(sample: CohortSample, cohort: Cohort) -> float | None:
    """µm/px of the slide as the data implies it, for slides whose metadata lacks it (and to cross-check)."""
    reader = _reader(sample)
    return reader.mpp_hint(SampleInput(_data(sample, cohort), sample, cohort)) if reader else None


def read_genes(sample: CohortSample, cohort: Cohort) -> list[tuple[str, str]]:
    """(symbol, Ensembl id or "") of every gene the sample can contribute, without reading counts."""
    reader = _reader(sample)
    return reader.genes(SampleInput(_data(sample, cohort), sample, cohort)) if reader else []


def read_sites(sample: CohortSample, cohort: Cohort, opts: ReaderOptions | None = None) -> Sites | BandedSites | None:
    """The sample's sites in slide level-0 px (in memory, or on disk in bands); None for image_only."""
    reader = _reader(sample)
    return reader.read(SampleInput(_data(sample, cohort), sample, cohort), opts or ReaderOptions()) if reader else None
