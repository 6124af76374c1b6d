"""HistoTx's own export folder: the teacher backbone as FusedViT weights plus what using it needs.

    teacher.safetensors   FusedViT state dict (image backbone + transcript branch), fp32
    model_config.yaml     the FusedViTConfig, as training writes it beside a run
    vocab.tsv             the gene vocabulary: transcript gene id i ↔ row i
    export.json           µm/px, input size, normalisation, provenance

``init.backbone`` and :func:`histotx.export.load_model` read it back
(:func:`histotx.model.pretrained.read_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from histotx.config import dump_config
from histotx.export.source import Teacher
from histotx.files import atomic_write_bytes, atomic_write_json
from histotx.format import VOCAB_NAME
from histotx.model.pretrained import NATIVE_CONFIG, NATIVE_META, NATIVE_WEIGHTS, read_json_file

FORMAT = "histotx-export"
VERSION = 1


def preprocessing(teacher: Teacher) -> dict[str, Any]:
    return {"mpp": teacher.mpp, "image_size": teacher.image_size, "mean": list(teacher.mean), "std": list(teacher.std)}


def write_native(teacher: Teacher, out: str | Path) -> Path:
    from safetensors.torch import save

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in teacher.state.items()}
    atomic_write_bytes(out / NATIVE_WEIGHTS, save(tensors, metadata={"format": "pt"}))
    dump_config(teacher.config, out / NATIVE_CONFIG)
    atomic_write_bytes(out / VOCAB_NAME, teacher.vocab.to_tsv().encode())
    atomic_write_json(
        out / NATIVE_META,
        {
            "format": FORMAT,
            "version": VERSION,
            "name": teacher.name,
            **preprocessing(teacher),
            "genes": len(teacher.vocab),
            "source": str(teacher.checkpoint),
            "step": teacher.step,
        },
    )
    return out


def read_meta(path: str | Path) -> dict[str, Any]:
    meta = read_json_file(Path(path) / NATIVE_META)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{Path(path) / NATIVE_META}: not a {FORMAT} file")
    return meta
