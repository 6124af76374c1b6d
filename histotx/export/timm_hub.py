"""The image backbone alone as a timm hub folder (``config.json`` + ``model.safetensors``).

Loadable with timm alone, no HistoTx installed (``timm.create_model("local-dir:DIR", pretrained=True)``,
or ``hf-hub:ORG/NAME`` once uploaded), so every tool that takes a timm pathology encoder (HEST-Bench,
trident, CLAM-style pipelines) can use it. The key map is :class:`histotx.model.pretrained.TimmAdapter`
(through :func:`~histotx.model.pretrained.save_timm`). timm ignores top-level keys it does not know;
``histotx`` there records the µm/px the model expects and where it came from.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from histotx.files import atomic_write_json
from histotx.model import FusedViT
from histotx.model.pretrained import read_json_file, save_timm

if TYPE_CHECKING:
    from histotx.export.load import LoadedModel
    from histotx.export.targets import ExportContext

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


# ---------------------------------------------------------------------------------------------- export target
# (histotx.export.targets.Target)


def write(ctx: ExportContext, folder: Path) -> None:
    from histotx.export.card import LICENSE_FILE, license_note, model_card
    from histotx.files import atomic_write_bytes

    t = ctx.teacher
    write_timm(ctx.model, folder, t.mpp, t.mean, t.std, t.name)
    card = model_card(t, ctx.license, license_name=ctx.license_name, license_link=ctx.license_link, library="timm")
    atomic_write_bytes(folder / "README.md", card.encode())
    if ctx.license == "other" and not ctx.license_link:
        atomic_write_bytes(folder / LICENSE_FILE, license_note().encode())


def detect(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and "architecture" in read_json_file(config)


def load(path: Path, model: FusedViT) -> LoadedModel:
    """The image backbone alone: no genes; µm/px and name from the ``histotx`` key when it is there."""
    from histotx.export.load import LoadedModel, triple

    hub = read_json_file(path / "config.json")
    extra, pre = hub.get(HISTOTX_KEY, {}), hub["pretrained_cfg"]
    mpp = float(extra.get("mpp", math.nan))
    size = int(pre["input_size"][-1])
    return LoadedModel(model, [], mpp, size, triple(pre["mean"]), triple(pre["std"]), extra.get("name", path.name))
