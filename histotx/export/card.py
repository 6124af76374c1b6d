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


def model_card(teacher: Teacher, license: str = "other", timm: bool = False) -> str:
    front = {
        "license": license,
        "tags": TAGS,
        "library_name": "transformers",
        "pipeline_tag": "image-feature-extraction",
    }
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

{_summary(teacher)}
{_usage(teacher, timm)}
{_training(teacher)}
{LIMITATIONS.format(mpp=teacher.mpp)}"""


def _summary(teacher: Teacher) -> str:
    """The title, what the export is and a table of its architecture, input and outputs."""
    cfg, size = teacher.config, teacher.image_size
    role = "EMA **teacher**" if teacher.which == "teacher" else f"**{teacher.which}**"
    rows = {
        "architecture": f"ViT, {cfg.depth} blocks × {cfg.embed_dim} wide, {cfg.num_heads} heads, {cfg.mlp} MLP "
        f"({cfg.mlp_hidden_dim}), patch {cfg.patch_size} px, {cfg.num_registers} register(s)",
        "input": f"{size} × {size} px RGB tiles at **{teacher.mpp:g} µm/px**, normalised with mean "
        f"{list(teacher.mean)} / std {list(teacher.std)}",
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

**Image only** (tiles cut at {teacher.mpp:g} µm/px):

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
  panels are out of distribution. Tiles must be at {mpp:g} µm/px; the processor resizes pixels, it
  does not know the physical scale of your image.
- Genes outside `vocab.tsv` cannot be given; a gene the cohort never measured has an untrained embedding.
- Self-supervised features: no task was trained. Evaluate with a linear or ridge probe on held-out
  patients before relying on them (`histotx eval`).
- Research use only; not a medical device. The license above must also respect the training data's terms.
"""
