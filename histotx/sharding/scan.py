"""Find every registered technology's outputs under a folder and draft a cohort file.

Each technology's module says whether a folder is one of its outputs (``detect``) and drafts its entries
(``scan_entries``); this module walks the tree and holds what they share (slide guessing, placeholders).

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
from histotx.sharding.technologies import Folder, readers

SLIDE_PATTERNS = ("*_he_image.ome.tif", "*.svs", "*.ome.tif", "*.tif", "*.tiff")  # best first
NOT_HE = ("morphology",)  # Xenium fluorescence images, never the H&E
PATIENT_TODO = f"{TODO}: patient id (sections of one patient share it; until set, the sample is its own patient)"


def sample_id_of(name: str) -> str:
    """A cohort sample id from a folder or file name."""
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


def rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base)


def todo_slide(folder: Path, base: Path) -> str:
    return f"{TODO}: path to the H&E slide (none found near {rel(folder, base)})"


def folder_entry(folder: Folder, technology: str, sample_folder: Path | None = None) -> dict:
    """The entry of a sample whose outputs sit in one folder (its ``data``), its slide guessed from that
    folder and ``sample_folder`` (default the folder), or a file naming the sample next to ``sample_folder``."""
    data, base = folder.path, folder.base
    sample_folder = sample_folder or data
    sid = sample_id_of(sample_folder.name)
    own = [data] + ([data.parent] if data.name == "outs" else [])
    if sample_folder not in own:
        own.append(sample_folder)
    nearby = [sample_folder.parent] if sample_folder != folder.root else []
    slide = guess_slide(own, nearby, sid)
    return {
        "id": sid,
        "patient": PATIENT_TODO,
        "technology": technology,
        "slide": rel(slide, base) if slide else todo_slide(data, base),
        "data": rel(data, base),
        "mpp": None,
    }


def scan(root: Path, relative_to: Path | None = None) -> list[dict]:
    """Cohort entries (sharding/cohort.py schema) for every output under `root`, paths relative to
    `relative_to` (default `root`; pass the cohort file's folder when it is written elsewhere)."""
    root = Path(root).resolve()
    base = Path(relative_to).resolve() if relative_to else root
    entries: list[dict] = []
    technologies = readers()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        folder = Folder(Path(dirpath), dirnames, filenames, root, base)
        reader = next((r for _, r in technologies if r.detect(folder)), None)
        if reader is None:
            continue
        dirnames[:] = []  # an output's insides are not further outputs
        entries += reader.scan_entries(folder)
    seen: dict[str, int] = {}
    for entry in entries:  # unique ids: the second "outs" of a name becomes name_2
        n = seen[entry["id"]] = seen.get(entry["id"], 0) + 1
        if n > 1:
            entry["id"] = f"{entry['id']}_{n}"
    return entries
