"""Initialise :class:`FusedViT` from pathology foundation models; save its image backbone for timm.

Sources (all local, nothing is downloaded):

- a timm hub folder, ``config.json`` (``architecture``, ``model_args``, ``pretrained_cfg``) +
  ``model.safetensors`` (or ``pytorch_model.bin``, read with ``weights_only``): UNI
  (``vit_large_patch16_224``), H-optimus-0 (``vit_giant_patch14_reg4_dinov2``), Virchow2
  (``vit_huge_patch14_224`` with 4 registers and a SwiGLUPacked MLP);
- a timm model name plus a weights file (``weights=``) and the model's kwargs (``model_args=``);
- a transformers folder of a ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (Phikon-v2);
- a HistoTx export (``histotx export``): its Hugging Face folder (``config.json`` with ``model_type``
  ``histotx``) or its own folder (``teacher.safetensors`` + ``model_config.yaml``). These hold the whole
  FusedViT, transcript branch included, and load with it.

The architecture is read from the checkpoint itself: timm's model is instantiated on the meta device
(no memory, no weights) to learn heads, patch size, registers and the position-embedding layout, and
the MLP kind is taken from the weight shapes (Virchow2's hub config cannot name its SwiGLUPacked
layer: a fc1 twice as wide as fc2's input identifies it; its gate is SiLU, as in every such model).

Key map into FusedViT (timm ``VisionTransformer`` names, ``no_embed_class`` layout):

=========================================================  ==============================
timm                                                       FusedViT
=========================================================  ==============================
``patch_embed.proj``, ``cls_token``, ``reg_token``,        same names
``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,
ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}``, ``norm``
``pos_embed`` rows of CLS / registers (no_embed_class off) added to ``cls_token`` / ``reg_token``
``head.*``, ``fc_norm.*``                                  dropped (reported unused)
=========================================================  ==============================

=========================================================  ==============================
transformers Dinov2                                        FusedViT
=========================================================  ==============================
``embeddings.cls_token`` + ``position_embeddings[:, 0]``   ``cls_token``
``embeddings.position_embeddings[:, 1:]``                  ``pos_embed``
``embeddings.register_tokens`` / ``mask_token``            ``reg_token`` / ``mask_token``
``embeddings.patch_embeddings.projection``                 ``patch_embed.proj``
``encoder.layer.N.norm1`` / ``norm2``                      ``blocks.N.norm1`` / ``norm2``
``….attention.attention.{query,key,value}``                ``blocks.N.attn.qkv`` (stacked)
  (transformers ≥ 5 in memory: ``attention.{q,k,v}_proj``)
``….attention.output.dense`` (or ``attention.o_proj``)     ``blocks.N.attn.proj``
``….layer_scale{1,2}.lambda1``                             ``blocks.N.ls{1,2}.gamma``
``….mlp.fc1`` / ``fc2``                                    ``blocks.N.mlp.fc1`` / ``fc2``
``….mlp.weights_in`` (or ``[gate_proj; up_proj]``)        ``blocks.N.mlp.fc1`` (SwiGLU)
``….mlp.weights_out`` (or ``down_proj``)                   ``blocks.N.mlp.fc2`` (SwiGLU)
``layernorm``                                              ``norm``
=========================================================  ==============================

The key map of each format that HistoTx writes is one adapter with pure ``to_target`` /
``from_target`` functions (:class:`TimmAdapter`, :class:`HFAdapter`), used both by the writer
(``save_timm``, :mod:`histotx.export`) and by the reader here.

Folding the CLS / register position rows into the tokens is exact: those tokens always sit at the
same place. Every load returns a :class:`~histotx.model.fused.LoadReport` and fails unless all of
the blocks' tensors load with their shapes (a silent non-strict load is the known failure mode).
Position embeddings are interpolated like timm's (bicubic, antialiased) when grids differ; transformers'
Dinov2 interpolates without antialiasing, so a Phikon-v2 backbone matches transformers' outputs at its
native input size and differs slightly at others.
"""

from __future__ import annotations

import inspect
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from histotx.files import atomic_write_bytes, atomic_write_json
from histotx.model.fused import BACKBONE_KEYS, PRESETS, FusedViT, FusedViTConfig, LoadReport, ModelConfigError
from histotx.preprocess import IMAGENET_MEAN, IMAGENET_STD, TIMM_INTERPOLATION

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
ARCHITECTURE_FIELDS = (
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp",
    "mlp_hidden_dim",
    "qkv_bias",
    "num_registers",
    "norm_eps",
)
"""Fields a checkpoint fixes; the others (img_size, vocab, drop path, attention, ...) may be overridden."""

TIMM_EXPORT_ARCHITECTURE = {"mlp": "vit_base_patch16_224", "swiglu": "vit_giant_patch14_dinov2"}
"""Base timm names for :func:`save_timm`; ``model_args`` override every size, these fix the MLP kind."""

HISTOTX_MODEL_TYPE = "histotx"
"""``model_type`` of the Hugging Face export's config.json."""
HF_CONFIG_KEY = "fused_vit"
"""The config.json entry holding the exported model's resolved :class:`FusedViTConfig`."""
HF_PREPROCESSOR = "preprocessor_config.json"
NATIVE_WEIGHTS, NATIVE_CONFIG, NATIVE_META = "teacher.safetensors", "model_config.yaml", "export.json"
"""HistoTx's own export folder: FusedViT weights, its config (as training writes it), and preprocessing."""
BUILD_FIELDS = ARCHITECTURE_FIELDS + ("img_size", "in_chans", "init_values", "vocab_size", "gene_dim")
"""Fields a HistoTx export fixes: the architecture, the transcript branch and the stored position grid."""


class TimmAdapter:
    """FusedViT ↔ timm ``VisionTransformer``. FusedViT's backbone already uses timm's names in the
    ``no_embed_class`` layout; timm models without it carry position rows for CLS / registers, which
    are folded into those tokens (exact: they always sit at the same place)."""

    @staticmethod
    def to_target(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """FusedViT state → timm state (``no_embed_class=True``): the image backbone's tensors."""
        return {k: v for k, v in state.items() if k.startswith(BACKBONE_KEYS)}

    @staticmethod
    def from_target(
        state: dict[str, torch.Tensor], embed_class: bool, n_registers: int
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """timm state → (FusedViT backbone state, dropped head keys). ``embed_class``: the timm model
        adds position rows to CLS and registers (``no_embed_class=False``)."""
        state = dict(state)
        dropped = sorted(k for k in state if k.startswith(("head.", "fc_norm.")))
        for k in dropped:
            state.pop(k)
        if embed_class and "pos_embed" in state:
            n_prefix = 1 + n_registers
            pos = state["pos_embed"]
            state["cls_token"] = state["cls_token"] + pos[:, :1]
            if n_registers:
                state["reg_token"] = state["reg_token"] + pos[:, 1:n_prefix]
            state["pos_embed"] = pos[:, n_prefix:]
        return state, dropped


class HFAdapter:
    """FusedViT ↔ the Hugging Face export's ``HistoTxModel``, which holds the FusedViT as ``backbone``."""

    PREFIX = "backbone."

    @staticmethod
    def to_target(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {HFAdapter.PREFIX + k: v for k, v in state.items()}

    @staticmethod
    def from_target(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        other = sorted(k for k in state if not k.startswith(HFAdapter.PREFIX))
        if other:
            raise ModelConfigError(f"HistoTx HF weights hold keys outside {HFAdapter.PREFIX!r}: {other[:6]}")
        return {k[len(HFAdapter.PREFIX) :]: v for k, v in state.items()}


@dataclass
class Checkpoint:
    """A backbone read from disk, already in FusedViT's key layout."""

    source: str
    state_dict: dict[str, torch.Tensor]
    config: dict  # FusedViTConfig fields the checkpoint determines
    pos_grid_hw: tuple[int, int] | None  # None: a square grid
    dropped: list[str] = field(default_factory=list)
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or (never unpickling code) a torch ``.bin``/``.pth``. Any problem
    is a ModelConfigError "file: problem": not a regular file, not safetensors, a pickle holding more than
    tensors (refused: HistoTx never runs a checkpoint's code, whatever the file asks)."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in WEIGHT_FILES if (path / n).exists()]
        if not found:
            raise ModelConfigError(f"{path}: no {' or '.join(WEIGHT_FILES)} in this folder")
        path = found[0]
    if not path.exists():
        raise ModelConfigError(f"{path}: weights file not found")
    if not path.is_file():  # stat, no open: a FIFO or device is refused before anything could block
        raise ModelConfigError(f"{path}: not a regular file (a pipe, device or folder); refused")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # SafetensorError, OSError, ...: a damaged or foreign file
            raise ModelConfigError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelConfigError(
            f"{path}: a pickle that holds more than tensors (objects or code); HistoTx loads only plain "
            "state dicts and never unpickles anything else. Ask for the weights as .safetensors"
        ) from None
    except Exception as exc:  # truncated zip, not a torch file, ...
        raise ModelConfigError(f"{path}: not a readable torch weights file ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelConfigError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    return state


def read_json_file(path: Path) -> dict:
    """A model folder's JSON file (regular, ≤ 16 MiB, UTF-8, an object), or a ModelConfigError naming it."""
    from histotx.format import FormatError, _json_object, read_regular

    try:
        return _json_object(read_regular(path, 16 << 20), str(path))
    except FormatError as exc:
        raise ModelConfigError(str(exc)) from None


def parse_yaml(data: bytes, source: str) -> Any:
    """Plain YAML data from a model folder's file (the safe loader: a python tag or any other non-standard
    tag is refused, and named)."""
    import yaml

    try:
        return yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ModelConfigError(f"{source}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())[:300]
        raise ModelConfigError(f"{source}: not plain YAML data ({problem})") from None


def _read_yaml(path: Path) -> Any:
    from histotx.format import FormatError, read_regular

    try:
        data = read_regular(path, 16 << 20)
    except FormatError as exc:
        raise ModelConfigError(str(exc)) from None
    return parse_yaml(data, str(path))


def weights_from_bytes(data: bytes, source: str) -> dict[str, torch.Tensor]:
    """:func:`read_weights` of safetensors bytes in memory."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as exc:  # SafetensorError, ...: a damaged or foreign file
        raise ModelConfigError(f"{source}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def read_checkpoint(
    source: str | Path, weights: str | Path | None = None, model_args: dict | None = None
) -> Checkpoint:
    """Read a timm hub folder, a transformers Dinov2 folder, a HistoTx export (Hugging Face or
    HistoTx folder), or a timm name + ``weights`` file."""
    path = Path(source)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.exists():
            if (path / NATIVE_CONFIG).is_file() and (path / NATIVE_WEIGHTS).is_file():
                return _from_histotx_native(path)
            raise ModelConfigError(
                f"{path}: no config.json (nor {NATIVE_CONFIG} + {NATIVE_WEIGHTS}); expected a "
                "timm, transformers or HistoTx export folder (a run or checkpoint folder: "
                "export it first, `histotx export RUN --out DIR`)"
            )
        hub = read_json_file(config_path)
        state = read_weights(weights or path)
        if "architecture" in hub:
            for key in ("model_args", "pretrained_cfg"):
                if not isinstance(hub.get(key, {}), dict):
                    raise ModelConfigError(f"{config_path}: {key} must be an object, got {type(hub[key]).__name__}")
            args = {**hub.get("model_args", {}), **(model_args or {})}
            return _from_timm(str(path), hub["architecture"], args, state, hub.get("pretrained_cfg", {}))
        if hub.get("model_type") == HISTOTX_MODEL_TYPE:
            return _from_histotx_hf(path, hub, state)
        if str(hub.get("model_type", "")).startswith("dinov2"):
            return _from_dinov2(path, state)
        raise ModelConfigError(
            f"{config_path}: neither a timm config (no 'architecture'), a HistoTx export nor a Dinov2 config"
        )
    if weights is None:
        raise ModelConfigError(f"{source}: not a folder; a timm model name needs weights=<file>")
    return _from_timm(f"{source} ({weights})", str(source), dict(model_args or {}), read_weights(weights), {})


def _preset_name(config: dict) -> str:
    for name, (dim, depth, heads, mlp, _) in PRESETS.items():
        if (dim, depth, heads, mlp) == (config["embed_dim"], config["depth"], config["num_heads"], config["mlp"]):
            return name
    return "custom"


def _mlp_kind(state: dict[str, torch.Tensor], source: str) -> tuple[str, int]:
    """("mlp" | "swiglu", fc1 width) from block 0's weight shapes."""
    try:
        fc1, fc2 = state["blocks.0.mlp.fc1.weight"], state["blocks.0.mlp.fc2.weight"]
    except KeyError:
        found = sorted(state)[:6]
        raise ModelConfigError(
            f"{source}: no blocks.0.mlp weights in the checkpoint (keys start {found}); the blocks would not load"
        ) from None
    if fc1.shape[0] == fc2.shape[1]:
        return "mlp", fc1.shape[0]
    if fc1.shape[0] == 2 * fc2.shape[1]:
        return "swiglu", fc1.shape[0]
    raise ModelConfigError(
        f"{source}: MLP shapes fc1 {tuple(fc1.shape)} / fc2 {tuple(fc2.shape)} match neither "
        "a GELU MLP nor a packed SwiGLU"
    )


_TIMM_NAME = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)?$")


def _check_timm_request(source: str, architecture: Any, args: dict) -> None:
    """A timm config.json names a model and its arguments: only a plain timm model name (``hf-hub:`` or
    ``local-dir:`` would fetch or read elsewhere) and only VisionTransformer's own arguments (timm's loader
    arguments, ``checkpoint_path`` and the like, would open files the folder names)."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(architecture, str) or not _TIMM_NAME.match(architecture):
        raise ModelConfigError(f"{source}: architecture {architecture!r} is not a plain timm model name")
    allowed = set(inspect.signature(VisionTransformer.__init__).parameters) - {"self"}
    unknown = sorted(str(k) for k in args if k not in allowed)
    if unknown:
        raise ModelConfigError(f"{source}: model_args {unknown} are not arguments of timm's VisionTransformer; refused")


def _from_timm(source: str, architecture: str, args: dict, state: dict, pretrained_cfg: dict) -> Checkpoint:
    import timm
    from timm.layers import LayerScale
    from timm.models.vision_transformer import Block, VisionTransformer

    args = {**args, "num_classes": 0}
    _check_timm_request(source, architecture, args)
    try:
        with torch.device("meta"):
            ref = timm.create_model(architecture, pretrained=False, **args)
    except Exception as exc:  # timm raises several types for unknown names and bad kwargs
        raise ModelConfigError(f"{source}: timm cannot build {architecture!r} with {args}: {exc}") from exc
    unsupported = []
    if not isinstance(ref, VisionTransformer):
        unsupported.append(f"{type(ref).__name__} is not a timm VisionTransformer")
    else:
        block = ref.blocks[0]
        checks = {
            "no class token": not ref.has_class_token,
            "attention pooling": ref.attn_pool is not None,
            "pre-norm": not isinstance(ref.norm_pre, torch.nn.Identity),
            "fc_norm instead of a final norm": not isinstance(ref.fc_norm, torch.nn.Identity),
            "another block type": type(block) is not Block,
            "q/k norm": not isinstance(block.attn.q_norm, torch.nn.Identity),
            "no position embedding": ref.pos_embed is None,
        }
        unsupported += [name for name, bad in checks.items() if bad]
    if unsupported:
        raise ModelConfigError(f"{source}: {architecture} uses what FusedViT does not: {unsupported}")

    mlp, hidden = _mlp_kind(state, source)
    if mlp == "mlp" and not isinstance(block.mlp.act, torch.nn.GELU):
        raise ModelConfigError(f"{source}: a plain MLP with {type(block.mlp.act).__name__}; FusedViT's uses GELU")
    patch = ref.patch_embed.patch_size
    grid = tuple(ref.patch_embed.grid_size)
    if patch[0] != patch[1]:
        raise ModelConfigError(f"{source}: non-square patches {patch}")
    config = dict(
        img_size=grid[0] * patch[0],
        patch_size=patch[0],
        embed_dim=ref.embed_dim,
        depth=len(ref.blocks),
        num_heads=block.attn.num_heads,
        mlp=mlp,
        mlp_hidden_dim=hidden,
        qkv_bias=block.attn.qkv.bias is not None,
        num_registers=ref.num_reg_tokens,
        init_values=block.ls1.init_values if isinstance(block.ls1, LayerScale) else None,
        norm_eps=ref.norm.eps,
    )

    state, dropped = TimmAdapter.from_target(state, not ref.no_embed_class, ref.num_reg_tokens)
    pos_rows = state["pos_embed"].shape[1] if "pos_embed" in state else 0
    pos_grid = grid if pos_rows == grid[0] * grid[1] else None
    mean, std = pretrained_cfg.get("mean"), pretrained_cfg.get("std")
    return Checkpoint(
        source, state, config, pos_grid, dropped, tuple(mean) if mean else None, tuple(std) if std else None
    )


_INT_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_hidden_dim", "num_registers", "img_size")
_INT_FIELDS += ("in_chans", "vocab_size", "gene_dim")
MAX_POSITIONS = 1 << 16
"""Position-embedding rows a config may ask for (img_size / patch_size squared): 256² patches."""


def _check_field_types(config: dict, source: str) -> None:
    """A model folder's config fields have the types FusedViTConfig expects (its numbers come from a file)."""
    problems = [
        f"{k} = {config[k]!r} (expected an integer in [0, 2^31))"
        for k in _INT_FIELDS
        if not (isinstance(config[k], int) and not isinstance(config[k], bool) and 0 <= config[k] < 1 << 31)
    ]
    if not isinstance(config["mlp"], str):
        problems.append(f"mlp = {config['mlp']!r} (expected a string)")
    if not isinstance(config["qkv_bias"], bool):
        problems.append(f"qkv_bias = {config['qkv_bias']!r} (expected true or false)")
    for k, top in (("norm_eps", 1.0), ("init_values", 1e6)):
        v = config[k]
        if not (v is None and k == "init_values") and not (
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= top
        ):
            problems.append(f"{k} = {v!r} (expected a number in [0, {top:g}])")
    if not problems and config["patch_size"] < 1:
        problems.append("patch_size must be >= 1")
    if problems:
        raise ModelConfigError(f"{source}: model config fields of the wrong type: {'; '.join(problems)}")


def check_config_fits_weights(config: FusedViTConfig, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Refuse a config that asks for another model than its weights hold, by arithmetic on the tensors'
    shapes alone (before any parameter is allocated): embed_dim, depth, patch size, input channels,
    registers, MLP width and, for a checkpoint with a transcript branch, its vocabulary and gene width
    must be the weights' own; the position grid is at most :data:`MAX_POSITIONS` rows. So a model folder
    whose config says ``embed_dim: 16384`` over a small checkpoint fails here, naming both."""
    d, hidden = config.embed_dim, config.mlp_hidden_dim
    expect = {
        "cls_token": (1, 1, d),
        "patch_embed.proj.weight": (d, config.in_chans, config.patch_size, config.patch_size),
        "norm.weight": (d,),
        "blocks.0.attn.qkv.weight": (3 * d, d),
        "blocks.0.mlp.fc1.weight": (hidden, d),
        "blocks.0.mlp.fc2.weight": (d, hidden // 2 if config.mlp == "swiglu" else hidden),
    }
    if config.num_registers:
        expect["reg_token"] = (1, config.num_registers, d)
    if "transcript.gene_embed.weight" in shapes:
        expect["transcript.gene_embed.weight"] = (config.vocab_size, config.gene_dim)
    problems = [
        f"{k}: the config needs {want}, the weights hold {tuple(shapes[k]) if k in shapes else 'nothing'}"
        for k, want in expect.items()
        if tuple(shapes.get(k, ())) != want
    ]
    blocks = {k.split(".")[1] for k in shapes if k.startswith("blocks.")}
    if len(blocks) != config.depth:
        problems.append(f"depth: the config needs {config.depth} blocks, the weights hold {len(blocks)}")
    positions = (config.img_size // config.patch_size) ** 2
    if positions > MAX_POSITIONS:
        problems.append(f"img_size {config.img_size} / patch_size {config.patch_size} asks for {positions} positions")
    if problems:
        raise ModelConfigError(
            f"{source}: the config does not fit its weights (checked before building the model): "
            + "; ".join(problems[:8])
        )


def _from_histotx(source: str, fields: dict, state: dict, mean, std) -> Checkpoint:
    missing = [k for k in BUILD_FIELDS if k not in fields]
    if missing:
        raise ModelConfigError(f"{source}: the model config lacks {missing}")
    config = {k: fields[k] for k in BUILD_FIELDS}
    _check_field_types(config, source)
    side = config["img_size"] // config["patch_size"]
    return Checkpoint(
        source, state, config, (side, side), [], tuple(mean) if mean else None, tuple(std) if std else None
    )


def _from_histotx_hf(path: Path, hub: dict, state: dict) -> Checkpoint:
    if HF_CONFIG_KEY not in hub:
        raise ModelConfigError(f"{path}/config.json: model_type {HISTOTX_MODEL_TYPE!r} without {HF_CONFIG_KEY!r}")
    pre = path / HF_PREPROCESSOR
    pre = read_json_file(pre) if pre.exists() else {}
    return _from_histotx(
        str(path), hub[HF_CONFIG_KEY], HFAdapter.from_target(state), pre.get("image_mean"), pre.get("image_std")
    )


def _from_histotx_native(path: Path) -> Checkpoint:
    meta = path / NATIVE_META
    meta = read_json_file(meta) if meta.exists() else {}
    weights = read_weights(path / NATIVE_WEIGHTS)
    return native_checkpoint(str(path), _read_yaml(path / NATIVE_CONFIG), weights, meta)


def native_checkpoint(
    source: str, fields: Any, weights: dict[str, torch.Tensor], meta: dict | None = None
) -> Checkpoint:
    """A HistoTx export folder's checkpoint from its parsed ``model_config.yaml``, weights and ``export.json``."""
    if not isinstance(fields, dict):
        raise ModelConfigError(f"{source}/{NATIVE_CONFIG}: expected a mapping of model config fields")
    meta = meta or {}
    return _from_histotx(source, fields, weights, meta.get("mean"), meta.get("std"))


_DINOV2_RENAMES = [
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.register_tokens$", "reg_token"),
    (r"^encoder\.layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.(output\.dense|o_proj)\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.(fc1|fc2)\.", r"blocks.\1.mlp.\2."),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.mlp\.(weights_out|down_proj)\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
]
# Tensors that are concatenated (dim 0) into one: (pattern with the part name, parts in order, target).
_DINOV2_STACKS = [
    (
        r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$",
        ("query", "key", "value"),
        r"blocks.{0}.attn.qkv.{2}",
    ),
    (
        r"^encoder\.layer\.(\d+)\.attention\.(q_proj|k_proj|v_proj)\.(weight|bias)$",
        ("q_proj", "k_proj", "v_proj"),
        r"blocks.{0}.attn.qkv.{2}",
    ),
    (
        r"^encoder\.layer\.(\d+)\.mlp\.(gate_proj|up_proj)\.(weight|bias)$",
        ("gate_proj", "up_proj"),
        r"blocks.{0}.mlp.fc1.{2}",
    ),
]


def _dinov2_config(path: Path):
    """transformers' config of a Dinov2 folder. Never asks on the terminal whether to run the folder's code
    (transformers does when trust_remote_code is left unset and config.json has an ``auto_map``): remote
    code is refused outright; only transformers' own Dinov2 classes are read."""
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # ValueError (remote code refused), OSError, ...
        raise ModelConfigError(
            f"{path}/config.json: transformers cannot read it ({type(exc).__name__}: {exc})"
        ) from None
    return hf


def _dinov2_keys(state: dict, source: str) -> tuple[dict, list[str]]:
    """transformers Dinov2Model tensors (``dinov2.`` prefix removed) under FusedViT names, q/k/v and the
    SwiGLU halves stacked; and the keys left out (the tokens and position embedding are the caller's)."""
    out, dropped, stacks = {}, [], {}
    for key, value in state.items():
        for pattern, parts, target in _DINOV2_STACKS:
            m = re.match(pattern, key)
            if m:
                stacks.setdefault(target.format(*m.groups()), {})[parts.index(m.group(2))] = (value, len(parts))
                break
        else:
            for pattern, target in _DINOV2_RENAMES:
                if re.match(pattern, key):
                    out[re.sub(pattern, target, key)] = value
                    break
            else:
                if key not in ("embeddings.cls_token", "embeddings.position_embeddings"):
                    dropped.append(key)
    for target, parts in stacks.items():
        n = next(iter(parts.values()))[1]
        if sorted(parts) != list(range(n)):
            raise ModelConfigError(f"{source}: {target} lacks some of its {n} parts in the checkpoint")
        out[target] = torch.cat([parts[i][0] for i in range(n)], dim=0)
    return out, dropped


def _from_dinov2(path: Path, state: dict) -> Checkpoint:
    source = str(path)
    hf = _dinov2_config(path)
    if hf.hidden_act != "gelu":
        raise ModelConfigError(f"{path}/config.json: hidden_act {hf.hidden_act!r}; FusedViT's MLP uses exact GELU")
    state = {re.sub(r"^dinov2\.", "", k): v for k, v in state.items()}
    out, dropped = _dinov2_keys(state, source)
    pos = state["embeddings.position_embeddings"]
    out["cls_token"] = state["embeddings.cls_token"] + pos[:, :1]
    out["pos_embed"] = pos[:, 1:]
    if "mask_token" in out:
        out["mask_token"] = out["mask_token"].reshape(1, -1)

    mlp, hidden = _mlp_kind(out, source)
    if mlp != ("swiglu" if hf.use_swiglu_ffn else "mlp"):
        raise ModelConfigError(f"{source}: use_swiglu_ffn={hf.use_swiglu_ffn} but the weights hold a {mlp} MLP")
    grid = hf.image_size // hf.patch_size
    config = dict(
        img_size=grid * hf.patch_size,
        patch_size=hf.patch_size,
        embed_dim=hf.hidden_size,
        depth=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        mlp=mlp,
        mlp_hidden_dim=hidden,
        qkv_bias=hf.qkv_bias,
        num_registers=int(getattr(hf, "num_register_tokens", 0)),
        init_values=hf.layerscale_value,
        norm_eps=hf.layer_norm_eps,
    )
    mean = std = None
    preprocessor = path / "preprocessor_config.json"
    if preprocessor.exists():
        pre = read_json_file(preprocessor)
        mean, std = pre.get("image_mean"), pre.get("image_std")
    return Checkpoint(
        source, out, config, (grid, grid), sorted(dropped), tuple(mean) if mean else None, tuple(std) if std else None
    )


def _load(model: FusedViT, ckpt: Checkpoint, strict: bool) -> LoadReport:
    """The image backbone (position grid resized if needed), then a HistoTx export's transcript branch."""
    prefix = "transcript."
    image = {k: v for k, v in ckpt.state_dict.items() if not k.startswith(prefix)}
    tokenizer = {k[len(prefix) :]: v for k, v in ckpt.state_dict.items() if k.startswith(prefix)}
    report = model.load_image_backbone_state_dict(image, ckpt.pos_grid_hw, ckpt.source, strict)
    if tokenizer and model.transcript is None:
        if strict:
            raise ModelConfigError(
                f"{ckpt.source}: the checkpoint has a transcript branch, the model none (model.vocab_size is 0)"
            )
        report.unexpected += sorted(prefix + k for k in tokenizer)
    elif tokenizer:
        own = model.transcript.state_dict()
        wrong = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in tokenizer.items()
            if k in own and v.shape != own[k].shape
        ]
        if wrong:
            raise ModelConfigError(
                f"{ckpt.source}: the transcript branch does not fit ({'; '.join(wrong)}); set "
                f"model.vocab_size={ckpt.config.get('vocab_size')} and gene_dim as exported"
            )
        try:
            model.transcript.load_state_dict(tokenizer, strict=True)
        except RuntimeError as exc:
            raise ModelConfigError(f"{ckpt.source}: the transcript branch did not load: {exc}") from exc
        report.loaded = sorted(report.loaded + [prefix + k for k in tokenizer])
    report.unexpected = sorted(report.unexpected + ckpt.dropped)
    report.image_mean, report.image_std = ckpt.image_mean, ckpt.image_std
    return report


def load_pretrained(
    source: str | Path,
    weights: str | Path | None = None,
    model_args: dict | None = None,
    strict: bool = True,
    **overrides,
) -> tuple[FusedViT, LoadReport]:
    """Build the FusedViT a checkpoint describes and load it. ``overrides`` set the fields a checkpoint
    does not fix (``img_size`` interpolates the position embedding once, ``vocab_size``,
    ``drop_path_rate``, ``attention``, ``grad_checkpointing``, ...)."""
    return model_from_checkpoint(read_checkpoint(source, weights, model_args), strict, **overrides)


def model_from_checkpoint(ckpt: Checkpoint, strict: bool = True, **overrides) -> tuple[FusedViT, LoadReport]:
    """:func:`load_pretrained` of a checkpoint already read: the config is checked against the weights'
    shapes (:func:`check_config_fits_weights`) before the model is built."""
    fixed = {
        k: (overrides[k], ckpt.config[k])
        for k in ARCHITECTURE_FIELDS
        if k in overrides and overrides[k] != ckpt.config[k]
    }
    if fixed:
        raise ModelConfigError(f"{ckpt.source}: the checkpoint fixes {fixed} (requested, checkpoint)")
    config = FusedViTConfig(**{**ckpt.config, "size": _preset_name(ckpt.config), **overrides})
    check_config_fits_weights(config, {k: tuple(v.shape) for k, v in ckpt.state_dict.items()}, ckpt.source)
    model = FusedViT(config)
    return model, _load(model, ckpt, strict)


def init_from_pretrained(
    model: FusedViT,
    source: str | Path,
    weights: str | Path | None = None,
    model_args: dict | None = None,
    strict: bool = True,
) -> LoadReport:
    """Load a checkpoint's image backbone into an existing model (whose architecture must match)."""
    ckpt = read_checkpoint(source, weights, model_args)
    differ = {
        k: (getattr(model.config, k), ckpt.config[k])
        for k in ARCHITECTURE_FIELDS
        if getattr(model.config, k) != ckpt.config[k]
    }
    if differ:
        raise ModelConfigError(f"{ckpt.source}: model and checkpoint differ in {differ} (model, checkpoint)")
    return _load(model, ckpt, strict)


def save_timm(
    model: FusedViT,
    folder: str | Path,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Path:
    """Write the image backbone as a timm hub folder (config.json + model.safetensors) that
    ``timm.create_model('local-dir:<folder>', pretrained=True)`` loads with no extra kwargs."""
    from safetensors.torch import save

    cfg = model.config
    if cfg.norm_eps != 1e-6:
        raise ModelConfigError(f"timm's ViT fixes LayerNorm eps at 1e-6; this model uses {cfg.norm_eps}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_args = dict(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        # timm computes fc1's width as int(dim · ratio): aim half a unit above to survive the rounding.
        mlp_ratio=(cfg.mlp_hidden_dim + 0.5) / cfg.embed_dim,
        qkv_bias=cfg.qkv_bias,
        init_values=cfg.init_values,
        reg_tokens=cfg.num_registers,
        no_embed_class=True,
        class_token=True,
        global_pool="token",
        num_classes=0,
        dynamic_img_size=True,
    )
    hub = {
        "architecture": TIMM_EXPORT_ARCHITECTURE[cfg.mlp],
        "num_classes": 0,
        "num_features": cfg.embed_dim,
        "global_pool": "token",
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [cfg.in_chans, cfg.img_size, cfg.img_size],
            "fixed_input_size": False,
            "interpolation": TIMM_INTERPOLATION,  # as training and embed resize (histotx.preprocess)
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(mean),
            "std": list(std),
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in TimmAdapter.to_target(model.state_dict()).items()}
    atomic_write_bytes(folder / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    atomic_write_json(folder / "config.json", hub)
    return folder
