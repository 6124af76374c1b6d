"""The teacher as a Hugging Face model folder, usable with transformers alone.

    config.json               HistoTxConfig (model_type "histotx", auto_map → the shipped code)
    model.safetensors         HistoTxModel weights (key map: histotx.model.pretrained.HFAdapter)
    configuration_histotx.py, modeling_histotx.py, histotx_*.py   the code (histotx.export.remote_code)
    preprocessor_config.json  ViTImageProcessor: size, mean, std, + microns_per_pixel
    vocab.tsv                 the gene vocabulary: transcript gene id i ↔ row i
    README.md                 model card (histotx.export.card)

``AutoModel.from_pretrained(DIR, trust_remote_code=True)`` and ``AutoImageProcessor.from_pretrained(DIR)``
work offline where HistoTx is not installed; ``init.backbone=DIR`` and ``load_model(DIR)`` read it back.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from histotx.export.card import model_card
from histotx.export.remote_code import remote_code_files
from histotx.export.source import Teacher
from histotx.files import atomic_write_bytes, atomic_write_json
from histotx.format import VOCAB_NAME
from histotx.model.pretrained import HF_CONFIG_KEY, HF_PREPROCESSOR, HISTOTX_MODEL_TYPE, HFAdapter, read_json_file
from histotx.preprocess import PIL_RESAMPLE

if TYPE_CHECKING:
    from histotx.export.load import LoadedModel
    from histotx.export.targets import ExportContext
    from histotx.model import FusedViT

MPP_KEY = "microns_per_pixel"
WEIGHTS = "model.safetensors"
CARD = "README.md"
SOURCE_KEY = "histotx_source"


def hf_config(teacher: Teacher) -> dict:
    import transformers

    return {
        "model_type": HISTOTX_MODEL_TYPE,
        "architectures": ["HistoTxModel"],
        "auto_map": {"AutoConfig": "configuration_histotx.HistoTxConfig", "AutoModel": "modeling_histotx.HistoTxModel"},
        HF_CONFIG_KEY: asdict(teacher.config),
        MPP_KEY: teacher.mpp,
        "image_size": teacher.image_size,
        "num_genes": len(teacher.vocab),
        SOURCE_KEY: {"name": teacher.name, "checkpoint": str(teacher.checkpoint), "step": teacher.step},
        "dtype": "float32",
        "transformers_version": transformers.__version__,
    }


def preprocessor_config(teacher: Teacher) -> dict:
    """A plain ViTImageProcessor (resize, rescale to [0, 1], normalise); tiles should already be at
    ``microns_per_pixel``, which the processor keeps as an attribute for the caller to check."""
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": teacher.image_size, "width": teacher.image_size},
        "resample": PIL_RESAMPLE,  # bilinear (antialiased when shrinking), as training and embed resize
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(teacher.mean),
        "image_std": list(teacher.std),
        MPP_KEY: teacher.mpp,
    }


def write_hf(teacher: Teacher, out: str | Path, card: str) -> Path:
    from safetensors.torch import save

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in remote_code_files().items():
        atomic_write_bytes(out / name, text.encode())
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in HFAdapter.to_target(teacher.state).items()}
    atomic_write_bytes(out / WEIGHTS, save(tensors, metadata={"format": "pt"}))
    atomic_write_json(out / "config.json", hf_config(teacher))
    atomic_write_json(out / HF_PREPROCESSOR, preprocessor_config(teacher))
    atomic_write_bytes(out / VOCAB_NAME, teacher.vocab.to_tsv().encode())
    atomic_write_bytes(out / CARD, card.encode())
    return out


# ---------------------------------------------------------------------------------------------- export target
# (histotx.export.targets.Target)


def write(ctx: ExportContext, folder: Path) -> None:
    from histotx.export.card import LICENSE_FILE, license_note

    card = model_card(
        ctx.teacher,
        ctx.license,
        timm="timm" in ctx.formats,
        license_name=ctx.license_name,
        license_link=ctx.license_link,
    )
    write_hf(ctx.teacher, folder, card)
    if ctx.license == "other" and not ctx.license_link:
        atomic_write_bytes(folder / LICENSE_FILE, license_note().encode())


def detect(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and read_json_file(config).get("model_type") == HISTOTX_MODEL_TYPE


def load(path: Path, model: FusedViT) -> LoadedModel:
    from histotx.export.load import LoadedModel, folder_genes, triple

    pre = read_json_file(path / HF_PREPROCESSOR)
    name = read_json_file(path / "config.json").get(SOURCE_KEY, {}).get("name", path.name)
    size = int(pre["size"]["height"])
    return LoadedModel(
        model, folder_genes(path), float(pre[MPP_KEY]), size, triple(pre["image_mean"]), triple(pre["image_std"]), name
    )
