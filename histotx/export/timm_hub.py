"""The image backbone alone as a timm hub folder (``config.json`` + ``model.safetensors``).

Loadable with timm alone, no HistoTx installed (``timm.create_model("local-dir:DIR", pretrained=True)``,
or ``hf-hub:ORG/NAME`` once uploaded), so every tool that takes a timm pathology encoder (HEST-Bench,
trident, CLAM-style pipelines) can use it. The key map is :class:`histotx.model.pretrained.TimmAdapter`
(through :func:`~histotx.model.pretrained.save_timm`). timm ignores top-level keys it does not know;
``histotx`` there records the µm/px the model expects and where it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

from histotx.format import atomic_write_json
from histotx.model import FusedViT
from histotx.model.pretrained import save_timm

HISTOTX_KEY = "histotx"


def write_timm(model: FusedViT, out: str | Path, mpp: float, mean, std, name: str) -> Path:
    out = save_timm(model, out, tuple(mean), tuple(std))
    hub = json.loads((out / "config.json").read_text())
    hub[HISTOTX_KEY] = {
        "mpp": mpp,
        "name": name,
        "note": "image backbone of a HistoTx early-fusion model; the transcript branch is in the Hugging Face export",
    }
    atomic_write_json(out / "config.json", hub)
    return out
