"""``load_model(source)``: the teacher backbone of any HistoTx artefact, ready to embed with.

Sources: a run folder (its ``latest`` checkpoint) or one checkpoint folder, of any ZeRO stage; a
HistoTx export folder; the Hugging Face folder of an export; the timm folder of an export (image
backbone only, no genes). No DeepSpeed engine, process group or GPU is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from histotx.export.targets import TARGETS
from histotx.format import VOCAB_NAME, FormatError
from histotx.model import FusedViT
from histotx.model.fused import ModelConfigError
from histotx.model.pretrained import NATIVE_CONFIG, NATIVE_WEIGHTS, check_config_fits_weights, load_pretrained
from histotx.vocab import Vocab


@dataclass
class LoadedModel:
    """A backbone in eval mode and what feeding it needs: transcript gene id i ↔ ``genes[i]``, input tiles
    at ``mpp`` µm/px, ``image_size`` px, normalised by ``mean`` / ``std``."""

    model: FusedViT
    genes: list[str]
    mpp: float
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str


def folder_genes(folder: Path) -> list[str]:
    path = folder / VOCAB_NAME
    if not path.is_file():
        return []
    vocab = Vocab.load(path)
    return [vocab.name(i) for i in range(len(vocab))]


def triple(values) -> tuple[float, float, float]:
    return tuple(float(v) for v in values)


def source_kind(path: Path) -> str:
    """An export target's name (``hf``, ``timm``: :data:`~histotx.export.targets.TARGETS`), ``native`` (a
    HistoTx export folder) or ``run`` (a run or checkpoint folder)."""
    for name, target in TARGETS.items():
        if target.target().detect(path):
            return name
    if (path / "config.json").is_file():
        raise ValueError(f"{path / 'config.json'}: not a folder of any export target ({', '.join(TARGETS)})")
    if (path / NATIVE_CONFIG).is_file() and (path / NATIVE_WEIGHTS).is_file():
        return "native"
    return "run"


def _describe(path: Path, kind: str, model: FusedViT) -> LoadedModel:
    """A loaded export's genes, µm/px, input size and normalisation, read from its folder."""
    if kind == "native":
        from histotx.export.native import read_meta

        meta = read_meta(path)
        return LoadedModel(
            model,
            folder_genes(path),
            float(meta["mpp"]),
            int(meta["image_size"]),
            triple(meta["mean"]),
            triple(meta["std"]),
            str(meta["name"]),
        )
    return TARGETS[kind].target().load(path, model)


def load_model(
    source: str | Path, device: str | torch.device = "cpu", shards: str | Path | None = None, which: str = "teacher"
) -> LoadedModel:
    """The teacher backbone of ``source`` (see the module docstring), in eval mode on ``device``.
    ``shards``: a run's shard set when it is no longer where the run's config says; ``which``: of a run or
    checkpoint, the teacher or the student."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model folder, run or checkpoint")
    kind = source_kind(path)
    if kind == "run":
        from histotx.export.source import read_teacher

        teacher = read_teacher(path, shards, which)
        shapes = {k: tuple(v.shape) for k, v in teacher.state.items()}
        check_config_fits_weights(teacher.config, shapes, str(path))
        model = FusedViT(teacher.config)
        model.load_state_dict(teacher.state, strict=True)
        loaded = LoadedModel(
            model, teacher.genes, teacher.mpp, teacher.image_size, teacher.mean, teacher.std, teacher.name
        )
    else:
        model, _ = load_pretrained(path)
        try:
            loaded = _describe(path, kind, model)
        except (ModelConfigError, FormatError):
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise ModelConfigError(
                f"{path}: the export's metadata is incomplete or of the wrong type ({type(exc).__name__}: {exc})"
            ) from None
    loaded.model.to(device).eval()
    return loaded
