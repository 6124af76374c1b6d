"""HEST-1k layout: ``st/<id>.h5ad`` + ``wsis/<id>.tif`` + ``metadata/<id>.json`` under one root.

Spot centres are ``obsm['spatial']`` as (x, y) in WSI level-0 pixels; genes are ``var_names``
(symbols) with ``var['gene_ids']`` as Ensembl ids when present. The cohort's ``data`` is the HEST
root (the sample id is the HEST id) or the ``st/<id>.h5ad`` file itself.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

from sharding.errors import InputError, read_json_object
from sharding.sites import Sites
from sharding.tenx import check_counts, gene_identity

DEFAULT_SPOT_DIAMETER_UM = 55.0
SLIDE_SUFFIXES = (".tif", ".tiff", ".svs", ".ome.tif")


def hest_root_and_id(data: Path, sample_id: str) -> tuple[Path, str]:
    if data.suffix == ".h5ad":
        return data.parent.parent, data.stem
    return data, sample_id


def h5ad_path(root: Path, hid: str) -> Path:
    path = root / "st" / f"{hid}.h5ad"
    if not path.is_file():
        raise InputError(path, "HEST expression file missing")
    return path


def read_metadata(root: Path, hid: str) -> dict:
    return read_json_object(root / "metadata" / f"{hid}.json", "HEST metadata")


def _positive(meta: dict, key: str) -> float | None:
    v = meta.get(key)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) and v > 0 else None


def hest_slide(root: Path, hid: str) -> Path:
    for suffix in SLIDE_SUFFIXES:
        if (root / "wsis" / f"{hid}{suffix}").is_file():
            return root / "wsis" / f"{hid}{suffix}"
    raise InputError(root / "wsis", f"no slide for {hid} ({', '.join(hid + s for s in SLIDE_SUFFIXES)})")


def _genes(var) -> list[tuple[str, str]]:
    ids = var["gene_ids"].astype(str).to_numpy() if "gene_ids" in var.columns else np.full(len(var), "")
    return gene_identity(var.index.astype(str).to_numpy(), ids)


def _read_h5ad(path: Path):
    import anndata  # heavy import, only for HEST samples

    try:
        return anndata.read_h5ad(path)
    except Exception as exc:  # anndata raises many types for a broken file; all mean "unreadable"
        raise InputError(path, f"unreadable h5ad ({type(exc).__name__}: {exc})") from exc


def read_hest(data: Path, sample_id: str, in_tissue_only: bool = True) -> Sites:
    root, hid = hest_root_and_id(data, sample_id)
    meta = read_metadata(root, hid)
    path = h5ad_path(root, hid)
    adata = _read_h5ad(path)
    if "spatial" not in adata.obsm:
        raise InputError(path, "obsm['spatial'] (spot centres in WSI px) missing")
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise InputError(path, f"obsm['spatial'] has shape {xy.shape}, expected (n_spots, 2)")
    if adata.X is None or adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(path, f"empty matrix: {adata.n_obs} spots × {adata.n_vars} genes")
    counts = sp.csr_matrix(adata.X, dtype=np.float32) if sp.issparse(adata.X) else None
    if counts is None:
        dense = np.asarray(adata.X)
        check_counts(dense, path, "X")
        counts = sp.csr_matrix(dense.astype(np.float32))
    else:
        check_counts(np.asarray(adata.X.data), path, "X")
    if counts.nnz == 0 or not counts.data.any():
        raise InputError(path, "empty matrix: no non-zero counts")

    xy = xy[:, :2]
    located = np.all(np.isfinite(xy), axis=1)
    keep = located.copy()
    dropped = {"no_position": int((~located).sum())} if (~located).any() else {}
    if in_tissue_only and "in_tissue" in adata.obs.columns:
        in_tissue = adata.obs["in_tissue"].to_numpy().astype(float) != 0
        if (located & ~in_tissue).any():
            dropped["not_in_tissue"] = int((located & ~in_tissue).sum())
        keep &= in_tissue
    rows = np.flatnonzero(keep)
    return Sites(
        xy_px=xy[rows], counts=counts[rows], genes=_genes(adata.var),
        footprint_um=_positive(meta, "spot_diameter") or DEFAULT_SPOT_DIAMETER_UM, footprint_shape="disk",
        panel=str(meta.get("st_technology", "")), dropped=dropped,
        mpp_estimate=_positive(meta, "pixel_size_um_estimated"),
        info={"hest_id": hid, "h5ad": path.name, "st_technology": str(meta.get("st_technology", ""))},
    )


def hest_mpp_hint(data: Path, sample_id: str) -> float | None:
    root, hid = hest_root_and_id(data, sample_id)
    return _positive(read_metadata(root, hid), "pixel_size_um_estimated")


def hest_genes(data: Path, sample_id: str) -> list[tuple[str, str]]:
    """var only, without loading X."""
    from anndata.io import read_elem

    root, hid = hest_root_and_id(data, sample_id)
    path = h5ad_path(root, hid)
    try:
        with h5py.File(path, "r") as f:
            var = read_elem(f["var"])
    except Exception as exc:  # as in _read_h5ad: any failure means the file is unreadable
        raise InputError(path, f"unreadable h5ad ({type(exc).__name__}: {exc})") from exc
    return _genes(var)
