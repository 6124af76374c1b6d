"""The model card (README.md) of an export: YAML front matter, usage, training cohort and config, limitations."""

from __future__ import annotations

from collections import Counter

import yaml

from histotx.export.source import Teacher

TAGS = [
    "histopathology",
    "spatial-transcriptomics",
    "pathology",
    "vision-transformer",
    "dinov2",
    "multimodal",
    "histotx",
]


def cohort_table(manifest: dict) -> str:
    """One row per technology: samples, patients, tiles, sites and counts kept (from the shard manifest)."""
    rows: dict[str, Counter] = {}
    patients: dict[str, set] = {}
    for sample in manifest["samples"].values():
        if sample.get("status") != "ok":
            continue
        tech = sample.get("technology", "?")
        row = rows.setdefault(tech, Counter())
        row["samples"] += 1
        row["tiles"] += int(sample.get("tiles", 0))
        row["sites"] += int(sample.get("sites_kept", 0))
        row["counts"] += float(sample.get("counts_kept", 0))
        patients.setdefault(tech, set()).add(sample.get("patient", "?"))
    lines = ["| technology | samples | patients | tiles | sites kept | counts kept |", "|---|---:|---:|---:|---:|---:|"]
    for tech in sorted(rows):
        r = rows[tech]
        lines.append(
            f"| {tech} | {r['samples']} | {len(patients[tech])} | {r['tiles']:,} | {r['sites']:,} | "
            f"{r['counts']:,.0f} |"
        )
    total = manifest["totals"]
    all_patients = set().union(*patients.values()) if patients else set()
    lines.append(f"| **all** | {total['samples_ok']} | {len(all_patients)} | {total['tiles']:,} | | |")
    return "\n".join(lines)


LICENSE_FILE = "LICENSE.md"


def license_note() -> str:
    """The LICENSE.md an export with ``license: other`` and no link of its own points at."""
    return (
        "# License\n\nNo license was chosen when this model was exported (`histotx export --license`), so "
        "none is granted here. The terms of the data it was trained on (see README.md, Training cohort) "
        "apply to it in any case. Ask the model's authors.\n"
    )


def base_model(teacher: Teacher) -> str | None:
    """The Hub id of the foundation model a run continued from (``init.backbone``), when it names one:
    ``hf-hub:ORG/NAME`` / ``ORG/NAME``, or a local timm folder whose ``pretrained_cfg.hf_hub_id`` says it."""
    import json
    import re
    from pathlib import Path

    source = str((teacher.train_config.get("init") or {}).get("backbone") or "")
    if not source:
        return None
    if source.startswith("hf-hub:"):
        return source[len("hf-hub:") :]
    path = Path(source)
    config = path / "config.json"
    if config.is_file():
        try:
            hub = json.loads(config.read_text())
        except ValueError:
            return None
        hub_id = (hub.get("pretrained_cfg") or {}).get("hf_hub_id") or hub.get("_name_or_path")
        return str(hub_id).removeprefix("hf-hub:") if hub_id and re.fullmatch(r"[\w.-]+/[\w.-]+", str(hub_id)) else None
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return source
    return None


def card_data(teacher: Teacher, license: str, library: str, license_name: str = "", license_link: str = ""):
    """The card's metadata (huggingface_hub.ModelCardData), from the run's real settings."""
    from huggingface_hub import ModelCardData

    extra = {}
    if license == "other":
        extra = {"license_name": license_name or "unspecified", "license_link": license_link or LICENSE_FILE}
    base = base_model(teacher)
    return ModelCardData(
        license=license,
        tags=TAGS,
        library_name=library,
        pipeline_tag="image-feature-extraction",
        base_model=base,
        base_model_relation="finetune" if base else None,
        **extra,
    )


def model_card(
    teacher: Teacher,
    license: str = "other",
    timm: bool = False,
    *,
    license_name: str = "",
    license_link: str = "",
    library: str = "transformers",
) -> str:
    """The export's README.md, built as a huggingface_hub.ModelCard (metadata validated by it); ``library``
    "timm" gives the card of the timm folder (its usage first)."""
    from huggingface_hub import ModelCard

    data = card_data(teacher, license, library, license_name, license_link)
    usage = _timm_usage(teacher) if library == "timm" else _usage(teacher, timm)
    body = f"{_summary(teacher)}\n{usage}\n{_training(teacher)}\n{LIMITATIONS.format(**_tile(teacher))}"
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def _tile(teacher: Teacher) -> dict:
    """The tile the model reads, from the shard set it was trained on: px, µm/px, µm, and per input pixel."""
    shard = teacher.manifest.get("config") or {}
    tile_px, mpp = int(shard.get("tile_px") or 0), float(shard.get("mpp") or teacher.mpp)
    tile_um = tile_px * mpp if tile_px else teacher.image_size * mpp
    return {"tile_px": tile_px, "mpp": mpp, "tile_um": tile_um, "input_mpp": tile_um / teacher.image_size}


def _timm_usage(teacher: Teacher) -> str:
    t = _tile(teacher)
    return f"""## Usage (timm; the image backbone alone)

```python
import timm
encoder = timm.create_model("local-dir:PATH", pretrained=True).eval()   # or "hf-hub:ORG/NAME"
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=encoder))
features = encoder(transform(tile).unsqueeze(0))   # (1, {teacher.config.embed_dim}) CLS embedding
```

`tile`: a whole {t["tile_um"]:g} µm square of the slide (e.g. {t["tile_px"] or "N"} px at {t["mpp"]:g} µm/px, a
PIL image); the transform resizes it to {teacher.image_size} px with antialiased bilinear, as in training. The
transcript branch and the gene vocabulary are in the Hugging Face folder of the same export.
"""


def _summary(teacher: Teacher) -> str:
    """The title, what the export is and a table of its architecture, input and outputs."""
    cfg, size, t = teacher.config, teacher.image_size, _tile(teacher)
    role = "EMA **teacher**" if teacher.which == "teacher" else f"**{teacher.which}**"
    rows = {
        "architecture": f"ViT, {cfg.depth} blocks × {cfg.embed_dim} wide, {cfg.num_heads} heads, {cfg.mlp} MLP "
        f"({cfg.mlp_hidden_dim}), patch {cfg.patch_size} px, {cfg.num_registers} register(s)",
        "input": f"a whole **{t['tile_um']:g} µm** tile (trained on {t['tile_px']} px tiles at {t['mpp']:g} µm/px) "
        f"resized to {size} × {size} px ({t['input_mpp']:.3g} µm per input pixel; antialiased bilinear), "
        f"normalised with mean {list(teacher.mean)} / std {list(teacher.std)}",
        "transcripts": f"{len(teacher.vocab)} genes (`vocab.tsv`; the embedding has {cfg.vocab_size} rows), "
        "tokens of any side in µm",
        "outputs": "CLS (`pooler_output`), patch and register embeddings, one embedding per transcript token; "
        f"width {cfg.embed_dim}",
    }
    table = "\n".join(f"| {k} | {v} |" for k, v in rows.items())
    return f"""# {teacher.name}

An early-fusion ViT over H&E image patches and spatial-transcriptomics tokens, pretrained with
HistoTx (DINOv2-style DINO / iBOT / KoLeo + masked expression). This is the {role}
of `{teacher.checkpoint}` (step {teacher.step}). One transformer reads the patches of a tile and
the transcript tokens under it; either modality may be missing.

| | |
|---|---|
{table}
"""


def _usage(teacher: Teacher, timm: bool) -> str:
    """Loading with transformers (image only, transcripts only, fused), the pipeline, timm and HistoTx."""
    cfg, size = teacher.config, teacher.image_size
    timm_usage = (
        f"""
The image backbone alone is also exported for timm (the `timm/` folder beside this one; no HistoTx needed):

```python
import timm
encoder = timm.create_model("local-dir:PATH/timm", pretrained=True).eval()   # or "hf-hub:ORG/NAME-timm"
features = encoder(x)   # (B, {cfg.embed_dim}) CLS embedding
```
"""
        if timm
        else ""
    )
    return f"""## Usage

```python
import torch
from transformers import AutoImageProcessor, AutoModel

model = AutoModel.from_pretrained("PATH", trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained("PATH")   # processor.microns_per_pixel == {teacher.mpp:g}
```

**Image only** (whole tiles of {_tile(teacher)["tile_um"]:g} µm, e.g. cut at {teacher.mpp:g} µm/px):

```python
inputs = processor(images=tiles, return_tensors="pt")
with torch.no_grad():
    out = model(**inputs)
out.pooler_output        # (B, {cfg.embed_dim}) CLS embedding
out.patch_embeddings     # (B, {(size // cfg.patch_size) ** 2}, {cfg.embed_dim})
```

**Transcripts only**: each token is a cell of side `resolution_um` at a position in input pixels, with its
raw counts; gene ids are rows of `vocab.tsv`. `pack_transcripts` normalises the counts as in training
(log1p of counts scaled to 10⁴ per token) and packs the batch:

```python
tx = model.pack_transcripts([
    {{"xy": [[8.0, 8.0], [24.0, 8.0]],      # token centres (x, y) in pixels of the {size}-px tile
     "token": [0, 0, 1], "gene": [12, 40, 12], "count": [3, 1, 5]}},   # entries: token index, gene id, count
], resolution_um=16.0)
with torch.no_grad():
    out = model(**tx)                    # image_size=(H, W) sets the frame when it is not {size} px
out.pooler_output                        # (B, {cfg.embed_dim})
out.transcript_embeddings                # (tokens, {cfg.embed_dim}), out.transcript_lengths per sample
```

**Fused** (both; the same tokens over the same tile):

```python
with torch.no_grad():
    out = model(**processor(images=tiles, return_tensors="pt"), **tx)
```

Image features through the pipeline: `pipeline("image-feature-extraction", model="PATH",
trust_remote_code=True)(tile, pool=True)` gives the CLS embedding. Loading with `dtype=torch.bfloat16`
computes under autocast, as HistoTx does on a GPU.
{timm_usage}
HistoTx itself reads this folder too: `histotx.export.load_model(PATH)`, `histotx embed`, and
`histotx train ... init.backbone=PATH` to continue pretraining from it.
"""


def _training(teacher: Teacher) -> str:
    """The cohort (per technology, from the shard manifest), the tiling and the training configuration."""
    shard, failed = teacher.manifest["config"], teacher.manifest["totals"]["samples_failed"]
    return f"""## Training cohort

{cohort_table(teacher.manifest)}

Tiles of {shard["tile_px"]} px at {shard["mpp"]:g} µm/px ({shard["tile_px"] * shard["mpp"]:g} µm), tiling
`{shard.get("tiling", "?")}`, minimum tissue fraction {shard.get("min_tissue_fraction", "?")}
{f"; {failed} sample(s) failed sharding and were left out" if failed else ""}.

## Training configuration

```yaml
{yaml.safe_dump(teacher.train_config, sort_keys=False).strip()}
```
"""


LIMITATIONS = """## Limitations

- Trained on the cohort above only: other organs, stains, scanners, magnifications or transcript
  panels are out of distribution. Give it whole {tile_um:g} µm tiles ({tile_px} px at {mpp:g} µm/px); the
  processor resizes pixels to the input size, it does not know the physical scale of your image.
- Genes outside `vocab.tsv` cannot be given; a gene the cohort never measured has an untrained embedding.
- Self-supervised features: no task was trained. Evaluate with a linear or ridge probe on held-out
  patients before relying on them (`histotx eval`).
- Research use only; not a medical device. The license above must also respect the training data's terms.
"""
