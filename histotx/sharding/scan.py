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
from dataclasses import dataclass, field
from pathlib import Path

from histotx.sharding.cohort import TODO
from histotx.sharding.technologies import Folder, readers

WSI_SUFFIXES = (".svs", ".ndpi", ".scn", ".mrxs", ".bif")  # whole-slide files: alone, an image_only sample
SPACERANGER_IMAGES = ("hires", "lowres")  # spatial/tissue_{scale}_image.png, best first

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
    root = Path(os.path.abspath(root))  # as given: symlinks stay (the cohort names what the user named)
    base = Path(os.path.abspath(relative_to)) if relative_to else root
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


@dataclass
class Draft:
    """What `histotx shard scan` proposes: the cohort's samples (every path one that exists), the guesses it
    made (said in words), and what it found but left out (with why)."""

    samples: list[dict] = field(default_factory=list)
    guesses: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)


def _blank(image: Path) -> bool:
    """An image of one colour (a placeholder some pipelines write), or one that does not open."""
    from PIL import Image

    try:
        with Image.open(image) as im:
            return all(lo == hi for lo, hi in im.getextrema()) if im.mode != "L" else len(set(im.getextrema())) == 1
    except (OSError, ValueError):
        return True


def _spaceranger_image(entry: dict, base: Path) -> tuple[Path, str] | None:
    """Space Ranger's own H&E image of an output: hires, else lowres (a blank one is skipped)."""
    spatial = base / entry["data"] / "spatial"
    for scale in SPACERANGER_IMAGES:
        image = spatial / f"tissue_{scale}_image.png"
        if image.is_file() and not _blank(image):
            return image, scale
    return None


def _loose_slides(root: Path, base: Path, used: set[str], outputs: list[Path]) -> list[dict]:
    """An image_only sample for each whole-slide file that is no sample's slide and lies in no output."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        folder = Path(dirpath)
        if any(folder == o or o in folder.parents for o in outputs):
            dirnames[:] = []
            continue
        for name in sorted(filenames):
            path = folder / name
            if name.lower().endswith(WSI_SUFFIXES) and rel(path, base) not in used:
                stem = name[: -len(path.suffix)]
                entries.append(
                    {
                        "id": sample_id_of(stem),
                        "patient": PATIENT_TODO,
                        "technology": "image_only",
                        "slide": rel(path, base),
                        "mpp": None,
                    }
                )
    return entries


def draft_cohort(root: Path, relative_to: Path | None = None) -> Draft:
    """:func:`scan`, made ready to shard: a Space Ranger output without an H&E slide gets its own
    ``spatial/tissue_hires_image.png`` (else ``_lowres_``) as the slide, named as a guess; a loose whole-slide
    file becomes an ``image_only`` sample; a sample still without a slide (a Xenium bundle without its H&E,
    say) is left out and said so, never written with a placeholder path. Raises FileNotFoundError for a
    folder that does not exist."""
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"{root}: no such folder" if not root_path.exists() else f"{root}: not a folder")
    root_abs = Path(os.path.abspath(root_path))
    base = Path(os.path.abspath(relative_to)) if relative_to else root_abs
    draft = Draft()
    outputs = []
    for entry in scan(root_path, relative_to):
        if entry.get("data"):
            outputs.append(Path(os.path.normpath(base / entry["data"])))
        slide = entry.get("slide")
        if isinstance(slide, str) and slide.startswith(TODO):
            found = _spaceranger_image(entry, base) if entry["technology"] == "visium" else None
            if found is None:
                draft.left_out.append(f"{entry['id']} ({entry['technology']}, {entry.get('data')}): no H&E slide found")
                continue
            image, scale = found
            entry["slide"] = rel(image, base)
            entry["options"] = {**(entry.get("options") or {}), "image_scale": scale}
            about = (
                "; Space Ranger's images are several µm/px (lowres about 15): shard at a coarse mpp (`shard run` "
                "refuses to enlarge past max_upsample and names the mpp that works) or give the full-resolution H&E"
            )
            draft.guesses.append(
                f"{entry['id']}: no H&E slide beside the Space Ranger output; using its {scale} image "
                f"{entry['slide']} (image_scale: {scale}{about})"
            )
        draft.samples.append(entry)
    used = {e["slide"] for e in draft.samples if isinstance(e.get("slide"), str)}
    for entry in _loose_slides(root_abs, base, used, outputs):
        draft.guesses.append(f"{entry['id']}: a whole-slide file on its own → image_only sample ({entry['slide']})")
        draft.samples.append(entry)
    seen: dict[str, int] = {}
    for entry in draft.samples:  # unique ids (an image_only id may repeat an output's)
        n = seen[entry["id"]] = seen.get(entry["id"], 0) + 1
        if n > 1:
            entry["id"] = f"{entry['id']}_{n}"
    return draft
