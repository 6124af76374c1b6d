"""The cohort file: which samples to shard, with what technology and which files.

```yaml
samples:
  - id: lung01                 # [A-Za-z0-9_-]; becomes the WebDataset key prefix
    patient: P01               # sections of one patient share it (patient-stratified splits);
                               # empty or "TODO: ..." → the sample counts as its own patient
    organ: Lung                # optional labels, recorded in the manifest
    species: Homo sapiens
    technology: visium         # one of histotx.sharding.technologies.TECHNOLOGIES
    slide: lung01/he.svs       # the H&E (SVS, pyramidal TIFF, OME-TIFF; PNG/JPEG for small images)
    data: lung01/outs          # what the technology reads (its Technology.data), e.g. Space Ranger outs/
    mpp: null                  # µm/px of the slide's level 0, overriding its metadata
    options:                   # the technology's own options (its dataclass in histotx.sharding.technologies)
      image_scale: fullres     # visium: which image `slide` is (fullres | hires | lowres)
```
Each technology's options are the fields of its dataclass there (e.g. visium_hd ``bin_size_um``, xenium
``alignment``); `histotx shard scan` writes them. An option may also be given at the sample's top level
(``image_scale: lowres``), as cohort files written before options nested did. Relative paths are resolved
against the cohort file's folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from histotx.config import ConfigError, from_dict
from histotx.format import FormatError, check_sample_id
from histotx.sharding.technologies import TECHNOLOGIES, Technology

TODO = "TODO"  # marks a value `histotx shard scan` could not fill in


@dataclass
class CohortSample:
    id: str
    technology: str
    slide: str | None = None
    data: str | None = None
    patient: str = ""
    organ: str = ""
    species: str = ""
    mpp: float | None = None
    options: Any = None  # the technology's options dataclass (a mapping in the cohort file)

    def __post_init__(self) -> None:
        tech = TECHNOLOGIES.get(self.technology)
        if tech is not None and not isinstance(self.options, tech.options):  # unknown technology: validate() says
            if self.options is not None and not isinstance(self.options, dict):
                raise ConfigError(f"sample {self.id}: options must be a mapping, got {self.options!r}")
            try:
                self.options = from_dict(tech.options, self.options or {}, "options")
            except ConfigError as exc:
                raise ConfigError(f"sample {self.id}: {exc}") from exc

    @property
    def tech(self) -> Technology:
        return TECHNOLOGIES[self.technology]

    def validate(self) -> None:
        """Checks that need no file access; a sample that fails here is reported, not fatal to the cohort."""
        try:
            check_sample_id(self.id)
        except FormatError as exc:
            raise ConfigError(str(exc)) from exc
        if self.technology not in TECHNOLOGIES:
            raise ConfigError(
                f"sample {self.id}: unknown technology {self.technology!r}; expected one of {', '.join(TECHNOLOGIES)}"
            )
        if self.tech.reader is not None and not self.data:
            raise ConfigError(f"sample {self.id}: technology {self.technology} needs `data:` ({self.tech.data})")
        if self.tech.needs_slide and not self.slide:
            raise ConfigError(f"sample {self.id}: needs `slide:` (the H&E image)")
        for key in ("slide", "data"):
            value = getattr(self, key)
            if isinstance(value, str) and value.startswith(TODO):
                raise ConfigError(f"sample {self.id}: `{key}:` is still a placeholder ({value!r}): give the path")
        if self.mpp is not None and not self.mpp > 0:
            raise ConfigError(f"sample {self.id}: mpp must be > 0, got {self.mpp}")

    @property
    def patient_known(self) -> bool:
        return bool(self.patient) and not self.patient.startswith(TODO)

    @property
    def patient_id(self) -> str:
        return self.patient if self.patient_known else self.id


@dataclass
class Cohort:
    path: Path
    samples: list[CohortSample] = field(default_factory=list)
    # Entries that could not be parsed: (index or id, message). Reported as failed samples.
    invalid: list[tuple[str, str]] = field(default_factory=list)

    def resolve(self, p: str | None) -> Path | None:
        if p is None:
            return None
        q = Path(p).expanduser()
        return q if q.is_absolute() else (self.path.parent / q)


def patient_warning(cohort: Cohort) -> str | None:
    """A warning when every sample counts as its own patient: sections of one patient would then
    land on both sides of a patient-stratified split."""
    n = len(cohort.samples)
    if n < 2 or len({s.patient_id for s in cohort.samples}) < n:
        return None
    unknown = [s.id for s in cohort.samples if not s.patient_known]
    why = (
        f"{len(unknown)} have no patient (e.g. {', '.join(unknown[:3])}) and count as their own"
        if unknown
        else "all patients differ"
    )
    return (
        f"{cohort.path}: every one of the {n} samples is its own patient ({why}); if sections come from "
        "the same patient, give them one `patient:` or patient-stratified splits will leak"
    )


def nest_options(entry: dict[str, Any]) -> dict[str, Any]:
    """A cohort entry with its technology's options given at the top level (as before they nested under
    ``options:``) moved there; an option given in both places is an error."""
    tech = TECHNOLOGIES.get(entry.get("technology"))
    flat = sorted(set(entry) & tech.option_names()) if tech is not None else []
    if not flat:
        return entry
    options = entry.get("options") or {}
    if not isinstance(options, dict) or set(flat) & set(options):
        raise ConfigError(f"sample {entry.get('id')}: {flat} given both at the top level and under options")
    out = {k: v for k, v in entry.items() if k not in flat}
    out["options"] = {**options, **{k: entry[k] for k in flat}}
    return out


def load_cohort(path: str | Path) -> Cohort:
    """Parse a cohort file; a malformed entry is kept as `invalid` so the other samples still run."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: cohort file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("samples"), list):
        raise ConfigError(f"{path}: a cohort file needs a top-level `samples:` list")
    cohort = Cohort(path=Path(os.path.abspath(path)))  # not resolved: relative paths are from the folder as given
    seen: set[str] = set()
    for i, entry in enumerate(doc["samples"]):
        label = str(entry.get("id", f"#{i}")) if isinstance(entry, dict) else f"#{i}"
        try:
            if not isinstance(entry, dict):
                raise ConfigError(f"entry {i} is not a mapping")
            sample = from_dict(CohortSample, nest_options(entry), where=f"{path}: sample {label}")
            if sample.id in seen:
                raise ConfigError(f"{path}: sample id {sample.id!r} appears twice")
            seen.add(sample.id)
            cohort.samples.append(sample)
        except ConfigError as exc:
            message = str(exc)
            cohort.invalid.append((label, message if str(path) in message else f"{path}: {message}"))
    return cohort


def dump_cohort(samples: list[dict[str, Any]], path: str | Path, notes: list[str] = ()) -> None:
    """Write a cohort file; ``notes`` go above the samples as YAML comments."""
    from histotx.files import atomic_write_bytes

    header = "".join(f"# {line}\n" for note in notes for line in note.splitlines())
    atomic_write_bytes(path, (header + yaml.safe_dump({"samples": samples}, sort_keys=False)).encode())
