"""One entry point per question the writer asks of a sample, dispatched by technology.

Which slide, what µm/px the data itself implies, which genes (cheaply, for the vocabulary pass), and
the sites on the slide's level-0 pixels. Every bad input raises ``InputError`` naming the file.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from histotx.sharding.cohort import Cohort, CohortSample
from histotx.sharding.errors import InputError

if TYPE_CHECKING:
    from histotx.sharding.bands import BandedSites
    from histotx.sharding.sites import Sites


def _call(function: str, *args: Any) -> Any:
    """``sharding.<module>.<name>(*args)``, imported on first use: the readers pull in pandas, h5py, pyarrow
    and scipy (~2 s), which image-only samples and every sharding worker's start-up need not pay."""
    module, name = function.rsplit(".", 1)
    return getattr(importlib.import_module(f"histotx.sharding.{module}"), name)(*args)


@dataclass
class ReaderOptions:
    qv_min: float = 20.0  # Xenium: keep transcripts with qv >= qv_min (10x's own threshold)
    in_tissue_only: bool = True  # Visium/HD/HEST: drop spots with in_tissue == 0
    slide_px: tuple[int, int] | None = None  # the slide's level-0 (width, height): banded readers drop sites off it


def _data(sample: CohortSample, cohort: Cohort) -> Path:
    path = cohort.resolve(sample.data)
    if path is None:
        raise InputError(cohort.path, f"sample {sample.id}: technology {sample.technology} needs `data:`")
    if not path.exists():
        raise InputError(path, f"sample {sample.id}: data folder not found")
    return path


@dataclass(frozen=True)
class _Technology:
    sites: Callable[[CohortSample, Path, Cohort, ReaderOptions], Sites]
    mpp_hint: Callable[[CohortSample, Path, Cohort], float | None]
    genes: Callable[[CohortSample, Path], list[tuple[str, str]]]


_TECHNOLOGIES = {
    "visium": _Technology(
        sites=lambda s, d, c, o: _call("visium.read_visium", d, s.image_scale, o.in_tissue_only),
        mpp_hint=lambda s, d, c: _call("visium.visium_mpp_hint", d, s.image_scale),
        genes=lambda s, d: _call("visium.visium_genes", d),
    ),
    "visium_hd": _Technology(
        sites=lambda s, d, c, o: _call(
            "visium_hd.read_visium_hd", d, s.bin_size_um, s.image_scale, o.in_tissue_only, o.slide_px
        ),
        mpp_hint=lambda s, d, c: _call("visium_hd.visium_hd_mpp_hint", d, s.bin_size_um, s.image_scale),
        genes=lambda s, d: _call("visium_hd.visium_hd_genes", d, s.bin_size_um),
    ),
    "xenium": _Technology(
        sites=lambda s, d, c, o: _call("xenium.read_xenium", d, c.resolve(s.alignment), o.qv_min, o.slide_px),
        mpp_hint=lambda s, d, c: _call("xenium.xenium_mpp_hint", d, c.resolve(s.alignment)),
        genes=lambda s, d: _call("xenium.xenium_genes", d),
    ),
    "hest": _Technology(
        sites=lambda s, d, c, o: _call("hest.read_hest", d, s.id, o.in_tissue_only),
        mpp_hint=lambda s, d, c: _call("hest.hest_mpp_hint", d, s.id),
        genes=lambda s, d: _call("hest.hest_genes", d, s.id),
    ),
}


def _technology(sample: CohortSample) -> _Technology | None:
    """None for image_only; an InputError for a technology no reader knows."""
    if sample.technology == "image_only":
        return None
    if sample.technology not in _TECHNOLOGIES:
        raise InputError(None, f"sample {sample.id}: unknown technology {sample.technology!r}")
    return _TECHNOLOGIES[sample.technology]


def slide_path(sample: CohortSample, cohort: Cohort) -> Path:
    """The H&E: `slide` when given; for HEST otherwise <root>/wsis/<id>.tif (or .tiff/.svs/.ome.tif)."""
    if sample.slide:
        return cohort.resolve(sample.slide)
    if sample.technology == "hest":
        return _call("hest.hest_slide", *_call("hest.hest_root_and_id", _data(sample, cohort), sample.id))
    raise InputError(cohort.path, f"sample {sample.id}: no `slide:` given")


def slide_mpp_hint(sample: CohortSample, cohort: Cohort) -> float | None:
    """µm/px of the slide as the data implies it, for slides whose metadata lacks it (and to cross-check)."""
    tech = _technology(sample)
    return tech.mpp_hint(sample, _data(sample, cohort), cohort) if tech else None


def read_genes(sample: CohortSample, cohort: Cohort) -> list[tuple[str, str]]:
    """(symbol, Ensembl id or "") of every gene the sample can contribute, without reading counts."""
    tech = _technology(sample)
    return tech.genes(sample, _data(sample, cohort)) if tech else []


def read_sites(sample: CohortSample, cohort: Cohort, opts: ReaderOptions | None = None) -> Sites | BandedSites | None:
    """The sample's sites in slide level-0 px (in memory, or on disk in bands); None for image_only."""
    tech = _technology(sample)
    return tech.sites(sample, _data(sample, cohort), cohort, opts or ReaderOptions()) if tech else None
