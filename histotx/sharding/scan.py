"""Find Space Ranger / Visium HD / Xenium / HEST outputs under a folder and draft a cohort file.

The draft is meant to be edited: the slide is guessed from image files next to each output and,
when none is found, left as a ``TODO`` placeholder that fails loudly if sharded unedited. A folder
above the sample's own (e.g. the scanned root) only offers images whose name contains the sample id,
so one sample never silently gets another's slide. HEST samples take patient, organ and species from
``metadata/<id>.json``; a patient nobody recorded is a visible ``TODO`` (the sample then counts as its
own patient, and `shard run` warns when that holds for every sample).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from histotx.sharding.cohort import TODO
from histotx.sharding.errors import InputError
from histotx.sharding.hest import sample_labels

SLIDE_PATTERNS = ("*_he_image.ome.tif", "*.svs", "*.ome.tif", "*.tif", "*.tiff")  # best first
NOT_HE = ("morphology",)  # Xenium fluorescence images, never the H&E
PATIENT_TODO = f"{TODO}: patient id (sections of one patient share it; until set, the sample is its own patient)"


def _sample_id(name: str) -> str:
    sid = re.sub(r"[^A-Za-z0-9-]+", "_", name).strip("_-")
    return sid or "sample"


def _slide_candidates(folder: Path, must_contain: str | None) -> list[Path]:
    found: list[Path] = []
    for pattern in SLIDE_PATTERNS:
        for p in sorted(folder.glob(pattern), key=lambda p: (-p.stat().st_size, p.name)):
            if p in found or not p.is_file() or p.name.lower().startswith(NOT_HE):
                continue
            if must_contain and must_contain.lower() not in p.name.lower():
                continue
            found.append(p)
    return found


def guess_slide(own: list[Path], nearby: list[Path], sample_id: str) -> Path | None:
    """Best image in the sample's own folders, else one naming the sample in a folder nearby."""
    for folder in own:
        if c := _slide_candidates(folder, None):
            return c[0]
    for folder in nearby:
        if c := _slide_candidates(folder, sample_id):
            return c[0]
    return None


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base)


def _todo(folder: Path, base: Path) -> str:
    return f"{TODO}: path to the H&E slide (none found near {_rel(folder, base)})"


_SQUARE = re.compile(r"square_(\d+)um")
_WRAPPERS = ("outs", "binned_outputs")  # folders named by Space Ranger, not by the sample


def _spaceranger_entry(data: Path, root: Path, base: Path, technology: str) -> dict:
    sample_folder = data
    while (sample_folder.name in _WRAPPERS or _SQUARE.fullmatch(sample_folder.name)) and sample_folder != root:
        sample_folder = sample_folder.parent
    sid = _sample_id(sample_folder.name)
    own = [data] + ([data.parent] if data.name == "outs" else [])
    if sample_folder not in own:
        own.append(sample_folder)
    nearby = [sample_folder.parent] if sample_folder != root else []
    slide = guess_slide(own, nearby, sid)
    entry = {
        "id": sid,
        "patient": PATIENT_TODO,
        "technology": technology,
        "slide": _rel(slide, base) if slide else _todo(data, base),
        "data": _rel(data, base),
        "mpp": None,
        "image_scale": "fullres",
    }
    if technology == "visium_hd":
        binned = data if data.name == "binned_outputs" or _SQUARE.fullmatch(data.name) else data / "binned_outputs"
        folders = [binned] if _SQUARE.fullmatch(binned.name) else binned.glob("square_*um")
        sizes = sorted(int(m.group(1)) for p in folders if (m := _SQUARE.fullmatch(p.name)))
        entry["bin_size_um"] = 2 if 2 in sizes or not sizes else sizes[0]
    return entry


def _xenium_entry(bundle: Path, root: Path, base: Path) -> dict:
    sid = _sample_id(bundle.name)
    nearby = [bundle.parent] if bundle != root else []
    slide = guess_slide([bundle], nearby, sid)
    entry = {
        "id": sid,
        "patient": PATIENT_TODO,
        "technology": "xenium",
        "slide": _rel(slide, base) if slide else _todo(bundle, base),
        "data": _rel(bundle, base),
        "mpp": None,
    }
    if not list(bundle.glob("*imagealignment.csv")) and slide is not None and slide.parent != bundle:
        aligned = sorted(slide.parent.glob(f"{slide.name.split('_he_image')[0]}*imagealignment.csv"))
        if len(aligned) == 1:
            entry["alignment"] = _rel(aligned[0], base)
    return entry


def _hest_entries(hest_root: Path, base: Path) -> list[dict]:
    entries = []
    for h5ad in sorted((hest_root / "st").glob("*.h5ad")):
        try:
            labels = sample_labels(hest_root, h5ad.stem)
        except InputError:  # missing or unreadable metadata: `shard run` reports it for this sample
            labels = {}
        entry = {
            "id": _sample_id(h5ad.stem),
            "patient": labels.get("patient") or PATIENT_TODO,
            **{k: v for k, v in labels.items() if k != "patient" and v},
            "technology": "hest",
            "data": _rel(hest_root, base),
            "mpp": None,
        }
        if entry["id"] != h5ad.stem:  # an id the cohort cannot carry: point at the h5ad itself
            entry["data"] = _rel(h5ad, base)
        if not any((hest_root / "wsis" / f"{h5ad.stem}{s}").is_file() for s in (".tif", ".tiff", ".svs", ".ome.tif")):
            entry["slide"] = _todo(hest_root / "wsis", base)
        entries.append(entry)
    return entries


def _kind(folder: Path, dirnames: list[str], filenames: list[str]) -> str | None:
    if "binned_outputs" in dirnames or folder.name == "binned_outputs" or _SQUARE.fullmatch(folder.name):
        return "visium_hd"
    if "experiment.xenium" in filenames:
        return "xenium"
    if "spatial" in dirnames and any(f.endswith(("feature_bc_matrix.h5", "probe_bc_matrix.h5")) for f in filenames):
        return "visium"
    if "st" in dirnames and "wsis" in dirnames and any((folder / "st").glob("*.h5ad")):
        return "hest"
    return None


def scan(root: Path, relative_to: Path | None = None) -> list[dict]:
    """Cohort entries (sharding/cohort.py schema) for every output under `root`, paths relative to
    `relative_to` (default `root`; pass the cohort file's folder when it is written elsewhere)."""
    root = Path(root).resolve()
    base = Path(relative_to).resolve() if relative_to else root
    entries: list[dict] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        folder = Path(dirpath)
        kind = _kind(folder, dirnames, filenames)
        if kind is None:
            continue
        dirnames[:] = []  # an output's insides are not further outputs
        if kind == "hest":
            entries += _hest_entries(folder, base)
        elif kind == "xenium":
            entries.append(_xenium_entry(folder, root, base))
        else:
            entries.append(_spaceranger_entry(folder, root, base, kind))
    seen: dict[str, int] = {}
    for entry in entries:  # unique ids: the second "outs" of a name becomes name_2
        n = seen[entry["id"]] = seen.get(entry["id"], 0) + 1
        if n > 1:
            entry["id"] = f"{entry['id']}_{n}"
    return entries
