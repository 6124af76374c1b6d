"""DeepSpeed set-up from a :class:`~histotx.train.config.TrainConfig`: process group, precision,
optimiser parameter groups, the engine, and the student's full fp32 weights for the teacher's EMA.

Precision. On GPU the student computes in bf16 under ``torch.autocast`` (DeepSpeed's
``torch_autocast``) while its weights, gradients' master copy and Adam states stay fp32; on CPU
everything is fp32. Keeping the weights fp32 means the EMA reads the very values the optimiser
wrote, under ZeRO 0/1/2 without any communication.

Parameter groups (DINOv2's rules, with continued pretraining in mind): backbone lr × layer_decay^(depth
+ 1 − layer) and × patch_embed_lr_mult for the patch embedding; the modules no image checkpoint
provides (the image mask token, the transcript tokenizer with its mask token, the heads) × new_module_lr_mult,
without layer decay; the DINO prototypes in groups of their own whose lr the schedule holds at 0 while
the last layer is frozen.

Weight decay. DINOv2 exempts biases, norms and LayerScale (``.bias``, ``norm``, ``gamma`` in the name)
and decays everything else, its cls/register/mask tokens and position embedding included. HistoTx
exempts every tensor of at most one dimension (biases, norms, LayerScale, the transcript branch's
modality and mask vectors, the DINO heads' biases) and, as timm/BEiT do, the cls and register tokens,
the position embedding and the image mask token (:meth:`FusedViT.no_weight_decay`): continued
pretraining should not shrink the position embedding and tokens a checkpoint brings. Each group carries
``lr_mult``, ``wd_mult``, ``last_layer`` and ``backbone`` (held at lr 0 during the head warm-up,
``ssl.schedule.head_warmup_steps``); :func:`apply_schedule` turns a step's schedule values into every
group's lr and decay.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Any, Iterator

import torch
from torch import nn

from histotx.config import merge
from histotx.ssl.meta import SSLNetwork
from histotx.ssl.schedules import StepValues
from histotx.train.config import TrainConfig

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CudaUnavailableError(RuntimeError):
    """GPUs were expected (``require_cuda``) but torch cannot use CUDA here."""


def _nvidia_driver() -> str:
    """The NVIDIA kernel driver's version line, or why none was found."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            first = f.readline().strip()
        return first.split("Kernel Module", 1)[-1].split()[0] if "Kernel Module" in first else first
    except OSError:
        pass
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.split()[0]
            return f"nvidia-smi failed: {(out.stderr or out.stdout).strip()[:200]}"
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"nvidia-smi failed: {exc}"
    return "none found (no /proc/driver/nvidia/version, no nvidia-smi)"


def cuda_report() -> str:
    """What a user needs to see when CUDA is unavailable: the driver, torch's CUDA build, torch's error."""
    reason = ""
    if torch.version.cuda is not None:
        try:
            torch.cuda.init()
        except Exception as exc:  # the driver's own words (too old, no device, ...)
            reason = f"; torch.cuda.init(): {str(exc).strip().splitlines()[0][:300]}"
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build (no CUDA)"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (
        f"NVIDIA driver: {_nvidia_driver()}; torch {torch.__version__} is {build}"
        f"{'' if visible is None else f'; CUDA_VISIBLE_DEVICES={visible!r}'}{reason}"
    )


def check_cuda(cfg: TrainConfig) -> None:
    """Fail fast when the config expects GPUs (``require_cuda``) and torch cannot use CUDA."""
    if cfg.require_cuda and not torch.cuda.is_available():
        raise CudaUnavailableError(
            f"require_cuda is set but CUDA is unavailable on {socket.gethostname()}: {cuda_report()}. "
            "torch's cu130 wheels need an NVIDIA driver >= 580; to train on CPU on purpose, pass "
            "require_cuda=false (or --allow-cpu; slurm/pretrain.sbatch: HISTOTX_REQUIRE_CUDA=false)"
        )


def init_distributed(cfg: TrainConfig) -> torch.device:
    """Join (or, alone, create) the process group from RANK / WORLD_SIZE / MASTER_ADDR (see launch/)."""
    import deepspeed

    from histotx.train.ds_ops import skip_unused_builds

    check_cuda(cfg)  # before the rendezvous: every rank stops at once, none waits for the others
    skip_unused_builds()  # no JIT-compiled shared-memory op on CPU: training never uses it
    if "WORLD_SIZE" not in os.environ:  # a plain single-process run
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    cuda = torch.cuda.is_available()
    backend = cfg.deepspeed.backend if cfg.deepspeed.backend != "auto" else ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.deepspeed.precision == "auto":
        return device.type == "cuda"
    return cfg.deepspeed.precision == "bf16"


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The compute precision of forward passes outside the engine (the teacher's)."""
    if use_bf16(cfg, device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def deepspeed_config(cfg: TrainConfig, world_size: int, device: torch.device) -> dict[str, Any]:
    ds, o = cfg.deepspeed, cfg.optim
    micro = cfg.data.stream.batch_size
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "reduce_bucket_size": ds.bucket_size,
        "overlap_comm": device.type == "cuda",
        "contiguous_gradients": True,
    }
    if ds.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = ds.bucket_size
    if ds.zero_stage == 3:
        zero.update(
            stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
            stage3_prefetch_bucket_size=ds.bucket_size,
        )
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": o.accumulation_steps,
        "train_batch_size": micro * o.accumulation_steps * world_size,
        # lr and weight decay are set on every group at every step (apply_schedule)
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 0.0, "betas": list(o.betas), "eps": o.eps, "weight_decay": 0.0, "torch_adam": True},
        },
        "gradient_clipping": o.clip_grad,
        "zero_optimization": zero,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if use_bf16(cfg, device):
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return merge(config, ds.extra)


def _no_decay(network: SSLNetwork) -> set[str]:
    backbone = {f"backbone.{n}" for n in network.backbone.no_weight_decay()}
    heads = {n for n, p in network.named_parameters() if not n.startswith("backbone.") and p.ndim <= 1}
    return backbone | heads


def param_groups(network: SSLNetwork, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups of the student's trainable parameters (see the module docstring)."""
    o = cfg.optim
    depth = network.backbone.config.depth
    no_decay = _no_decay(network)
    new = network.new_parameter_names()
    last_layer = {
        id(p)
        for head in (network.dino_head, network.ibot_head)
        if head is not None
        for p in head.last_layer_parameters()
    }
    groups: dict[tuple, dict[str, Any]] = {}
    for name, p in network.named_parameters():
        if not p.requires_grad:
            continue
        if name in new:
            kind, lr_mult = "new", o.new_module_lr_mult
        else:
            inner = name[len("backbone.") :]
            layer = network.backbone.layer_id(inner)
            kind, lr_mult = f"layer{layer}", o.layer_decay ** (depth + 1 - layer)
            if inner.startswith("patch_embed."):
                kind, lr_mult = "patch_embed", lr_mult * o.patch_embed_lr_mult
        is_last = id(p) in last_layer
        wd_mult = 0.0 if name in no_decay else 1.0
        backbone = kind != "new"
        key = (lr_mult, wd_mult, is_last, backbone)  # one group per setting: ZeRO-1/2 pay collectives per group
        if key not in groups:
            label = f"{kind}{'-last_layer' if is_last else ''}{'-no_decay' if not wd_mult else ''}"
            groups[key] = {
                "params": [],
                "name": label,
                "lr_mult": lr_mult,
                "wd_mult": wd_mult,
                "last_layer": is_last,
                "backbone": backbone,
                "lr": 0.0,
                "weight_decay": 0.0,
            }
        groups[key]["params"].append(p)
    return list(groups.values())


def apply_schedule(optimizer: torch.optim.Optimizer, values: StepValues) -> None:
    for group in optimizer.param_groups:
        if group["last_layer"]:
            lr = values.last_layer_lr
        else:
            lr = values.backbone_lr if group.get("backbone") else values.lr
        group["lr"] = lr * group["lr_mult"]
        group["weight_decay"] = values.weight_decay * group["wd_mult"]


def build_engine(cfg: TrainConfig, student: nn.Module, groups: list[dict[str, Any]], device: torch.device):
    """The DeepSpeed engine around the student (moved to ``device``)."""
    import deepspeed
    import torch.distributed as dist

    student.to(device)
    config = deepspeed_config(cfg, dist.get_world_size(), device)
    engine, optimizer, _, _ = deepspeed.initialize(model=student, model_parameters=groups, config=config)
    if len(optimizer.param_groups) != len(groups):
        raise RuntimeError(f"DeepSpeed made {len(optimizer.param_groups)} optimiser groups of {len(groups)}")
    return engine, optimizer


def student_weights(engine, params: list[nn.Parameter]) -> Iterator[torch.Tensor]:
    """Each parameter's full fp32 value, in order: the parameter itself under ZeRO 0/1/2 (whole and
    fp32 on every rank), gathered from the optimiser's fp32 partitions under ZeRO-3. Collective under
    ZeRO-3: every rank must consume the whole iterator."""
    if engine.zero_optimization_stage() != 3:
        yield from (p.detach() for p in params)
        return
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    for p in params:
        if p.requires_grad:
            yield safe_get_full_fp32_param(p)
        else:  # frozen (e.g. the prototypes' norm): not in the optimiser, gather the weight itself
            with deepspeed.zero.GatheredParameters([p]):
                value = p.data.detach().float().clone()  # a copy: the gathered buffer goes on exit
            yield value


def memory_mb(device: torch.device) -> float:
    """Peak memory: allocated on the GPU, resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
