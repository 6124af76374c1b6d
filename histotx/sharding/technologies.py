"""The spatial technologies the sharding stage reads: the one list the cohort's allowed values, `histotx
shard scan`'s detection and the reader dispatch derive from.

A technology is a :class:`Technology`: its name (the cohort's ``technology:``), its options (a dataclass,
the sample's ``options:`` mapping in the cohort file), and the module under ``histotx.sharding`` that reads
it, following :class:`Reader`. That module is imported on first use: readers pull in pandas, h5py, pyarrow
and scipy (~2 s), which image-only samples, cohort validation and every sharding worker's start-up need not
pay. Adding a technology: its reader module, and one :class:`Technology` (with its options) below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from histotx.config import ConfigError

if TYPE_CHECKING:
    from histotx.sharding.bands import BandedSites
    from histotx.sharding.cohort import Cohort, CohortSample
    from histotx.sharding.sites import Sites


@dataclass
class ReaderOptions:
    """Run-wide reading settings (from the shard config), the same for every sample."""

    qv_min: float = 20.0  # Xenium: keep transcripts with qv >= qv_min (10x's own threshold)
    in_tissue_only: bool = True  # Visium/HD/HEST: drop spots with in_tissue == 0
    slide_px: tuple[int, int] | None = None  # the slide's level-0 (width, height): banded readers drop sites off it


@dataclass(frozen=True)
class SampleInput:
    """What a reader is asked about: one sample of a cohort, its ``data:`` resolved and found."""

    data: Path
    sample: CohortSample
    cohort: Cohort

    @property
    def options(self) -> Any:
        """The sample's options: its technology's dataclass."""
        return self.sample.options

    def resolve(self, path: str | None) -> Path | None:
        """A path of the cohort file (an option's), relative to its folder."""
        return self.cohort.resolve(path)


@dataclass(frozen=True)
class Folder:
    """One folder `histotx shard scan` walks through: its subfolders and files, and where the scan started
    (``root``) and its paths are written relative to (``base``)."""

    path: Path
    dirs: list[str]
    files: list[str]
    root: Path
    base: Path


class Reader(Protocol):
    """What a technology's module provides, as module-level functions (``slide`` only when the technology
    finds the slide itself: ``needs_slide=False``)."""

    def read(self, given: SampleInput, run: ReaderOptions) -> Sites | BandedSites:
        """The sample's sites in slide level-0 px; every bad input raises InputError naming the file."""

    def mpp_hint(self, given: SampleInput) -> float | None:
        """µm/px of the slide as the data implies it (for slides whose metadata lacks it, and to cross-check)."""

    def genes(self, given: SampleInput) -> list[tuple[str, str]]:
        """(symbol, Ensembl id or "") of every gene the sample can contribute, without reading counts."""

    def detect(self, folder: Folder) -> bool:
        """Whether `folder` is an output of this technology (`histotx shard scan`)."""

    def scan_entries(self, folder: Folder) -> list[dict[str, Any]]:
        """Draft cohort entries for a detected folder (see histotx.sharding.scan)."""


# ---------------------------------------------------------------------------------------------- options


@dataclass
class NoOptions:
    pass


IMAGE_SCALES = ("fullres", "hires", "lowres")


def _check_image_scale(image_scale: str) -> None:
    if image_scale not in IMAGE_SCALES:
        raise ConfigError(f"image_scale must be one of {IMAGE_SCALES}, got {image_scale!r}")


@dataclass
class VisiumOptions:
    image_scale: str = "fullres"  # which image `slide` is: fullres | hires | lowres

    def validate(self) -> None:
        _check_image_scale(self.image_scale)


@dataclass
class VisiumHDOptions:
    bin_size_um: float = 2.0  # which binned output: 2, 8 or 16
    image_scale: str = "fullres"  # which image `slide` is: fullres | hires | lowres

    def validate(self) -> None:
        _check_image_scale(self.image_scale)


@dataclass
class XeniumOptions:
    alignment: str | None = None  # *_he_imagealignment.csv (default: found in the bundle); relative to the cohort


@dataclass
class CosMxOptions:
    alignment: str | None = None  # 3×3 affine CSV, slide px → CosMx global px (default: the slide is that frame)
    pixel_size_um: float = 0.12028  # µm per CosMx global pixel (the instrument's camera)

    def validate(self) -> None:
        if not self.pixel_size_um > 0:
            raise ConfigError(f"pixel_size_um must be > 0, got {self.pixel_size_um}")


@dataclass
class SpatialDataOptions:
    image: str | None = None  # the H&E image element (default: the store's only one)
    points: str | None = None  # the points element of molecules (x, y, gene column), or ...
    shapes: str | None = None  # ... the shapes element of spots/cells (circles, polygons) a table annotates
    table: str | None = None  # the table annotating `shapes` (default: the only one that does)
    coordinate_system: str | None = None  # where image and sites meet (default: the only one they share)
    feature_key: str | None = None  # the points' gene column (default: the element's feature_key)
    layer: str | None = None  # the table layer holding the counts (default: X)
    um_per_unit: float | None = None  # µm per unit of the coordinate system (else the sample's `mpp:`)
    footprint_um: float | None = None  # site diameter (default: shapes' median diameter; molecules: points)

    def validate(self) -> None:
        if self.points is not None and self.shapes is not None:
            raise ConfigError(f"name points or shapes, not both (points {self.points!r}, shapes {self.shapes!r})")
        if self.um_per_unit is not None and not self.um_per_unit > 0:
            raise ConfigError(f"um_per_unit must be > 0, got {self.um_per_unit}")
        if self.footprint_um is not None and not self.footprint_um >= 0:
            raise ConfigError(f"footprint_um must be >= 0, got {self.footprint_um}")


# ---------------------------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Technology:
    name: str  # the cohort's `technology:`
    options: type  # dataclass: the sample's `options:` mapping
    reader: str | None  # module of histotx.sharding following Reader; None: no data, no sites (image_only)
    data: str = ""  # what `data:` names (cohort documentation, errors)
    needs_slide: bool = True  # False: the reader finds the slide from `data:` itself (a `slide(data, sample)`)
    spots: bool = False  # sites are capture spots a tile can be centred on (tiling=spots)

    def module(self) -> Reader:
        if self.reader is None:
            raise ValueError(f"technology {self.name} has no reader")
        return importlib.import_module(f"histotx.sharding.{self.reader}")  # type: ignore[return-value]

    def option_names(self) -> set[str]:
        return {f.name for f in fields(self.options)}


IMAGE_ONLY = "image_only"
# In the order `scan` tries them on a folder (Visium HD before Visium: its outs hold a spatial/ folder too).
TECHNOLOGIES: dict[str, Technology] = {
    t.name: t
    for t in (
        Technology("visium_hd", VisiumHDOptions, "visium_hd", "Space Ranger outs/ (binned_outputs/ inside)"),
        Technology("xenium", XeniumOptions, "xenium", "the Xenium output bundle"),
        Technology("visium", VisiumOptions, "visium", "Space Ranger outs/", spots=True),
        Technology("hest", NoOptions, "hest", "the HEST root (st/, wsis/, metadata/)", needs_slide=False, spots=True),
        Technology(
            "cosmx", CosMxOptions, "cosmx", "the CosMx flat-file export (*_tx_file.csv, *_fov_positions_file.csv)"
        ),
        Technology(
            "spatialdata",
            SpatialDataOptions,
            "spatialdata_store",
            "a SpatialData zarr store (image + points, or image + shapes + table)",
            needs_slide=False,
        ),
        Technology(IMAGE_ONLY, NoOptions, None),
    )
}


def technology(name: str) -> Technology:
    """The registered technology of that name; a ValueError listing the known ones otherwise."""
    if name not in TECHNOLOGIES:
        raise ValueError(f"unknown technology {name!r}; expected one of {', '.join(TECHNOLOGIES)}")
    return TECHNOLOGIES[name]


def readers() -> list[tuple[Technology, Reader]]:
    """Every technology with a reader, with its module, in the order `scan` tries them."""
    return [(t, t.module()) for t in TECHNOLOGIES.values() if t.reader is not None]
