"""Visium HD: one binned output (``binned_outputs/square_{002,008,016}um``), native bins kept, not pooled.

Each bin is a site with a square footprint of its side; the pixel size comes from the scalefactors'
``microns_per_pixel`` (HD has no spot lattice to estimate it from).
"""
from __future__ import annotations

from pathlib import Path

from sharding.errors import InputError
from sharding.sites import Sites
from sharding.visium import find_matrix, image_scale_factor, read_scalefactors, read_spaceranger
from sharding.tenx import read_10x_genes


def bin_dir(data: Path, bin_size_um: float) -> Path:
    """The ``square_XXXum`` folder; `data` may be the outs/, its binned_outputs/, or the bin folder itself."""
    if data.name.startswith("square_"):
        return data
    binned = data if data.name == "binned_outputs" else data / "binned_outputs"
    if not binned.is_dir():
        raise InputError(data, "not a Visium HD output: no binned_outputs/")
    if float(bin_size_um) != int(bin_size_um) or bin_size_um <= 0:
        raise InputError(binned, f"bin_size_um must be a whole number of µm, got {bin_size_um}")
    folder = binned / f"square_{int(bin_size_um):03d}um"
    if not folder.is_dir():
        found = ", ".join(sorted(p.name for p in binned.glob("square_*um"))) or "none"
        raise InputError(folder, f"no {bin_size_um:g} µm binned output (found: {found})")
    return folder


def _microns_per_pixel(sf: dict, spatial: Path) -> float:
    mpp = sf.get("microns_per_pixel")
    if not isinstance(mpp, (int, float)) or not mpp > 0:
        raise InputError(spatial / "scalefactors_json.json", "microns_per_pixel missing or not positive")
    return float(mpp)


def read_visium_hd(
    data: Path, bin_size_um: float = 2.0, image_scale: str = "fullres", in_tissue_only: bool = True
) -> Sites:
    folder = bin_dir(data, bin_size_um)
    spatial = folder / "spatial"
    sites, _, sf = read_spaceranger(folder, spatial, find_matrix(folder), image_scale, in_tissue_only)
    side = float(sf.get("bin_size_um", bin_size_um))
    if abs(side - float(bin_size_um)) > 1e-6 and not data.name.startswith("square_"):
        raise InputError(spatial / "scalefactors_json.json", f"bin_size_um is {side:g}, expected {bin_size_um:g}")
    sites.footprint_um, sites.footprint_shape = side, "square"
    sites.mpp_estimate = _microns_per_pixel(sf, spatial) / sites.info["scale_factor"]
    sites.info.update(bin_size_um=side, mpp_source="scalefactors microns_per_pixel")
    return sites


def visium_hd_mpp_hint(data: Path, bin_size_um: float = 2.0, image_scale: str = "fullres") -> float:
    spatial = bin_dir(data, bin_size_um) / "spatial"
    sf = read_scalefactors(spatial)
    return _microns_per_pixel(sf, spatial) / image_scale_factor(sf, image_scale, spatial)


def visium_hd_genes(data: Path, bin_size_um: float = 2.0) -> list[tuple[str, str]]:
    return read_10x_genes(find_matrix(bin_dir(data, bin_size_um)))
