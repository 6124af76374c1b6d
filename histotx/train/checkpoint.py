"""Checkpoints of a run: DeepSpeed's student + optimiser, plus what exact resume needs besides.

Layout under ``<out>/checkpoints``::

    step_00001000/                 DeepSpeed's files (module, optimiser partitions of every rank)
        teacher.safetensors        teacher weights and centres (rank 0; identical on every rank)
        rank_00000.json ...        per rank: loader position, RNG states (torch, CUDA, numpy, random)
        trainer.json               step, counters, world size, the resolved config — written last
    latest                         the newest complete checkpoint's folder name

A checkpoint is complete once ``trainer.json`` exists: rank 0 writes it only after every rank has
finished writing, and moves ``latest`` after it (both atomically). A run killed mid-save leaves a
folder without ``trainer.json``, which ``--resume auto`` passes over. What HistoTx writes is JSON and
safetensors; DeepSpeed's own files are ``torch.save`` archives, read back only with torch's weights-only
unpickler (:func:`load_deepspeed_file`), never DeepSpeed's default ``weights_only=False``.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from histotx.files import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

COMPLETE = "trainer.json"
LATEST = "latest"
TEACHER = "teacher.safetensors"
_TAG = re.compile(r"^step_(\d{8,})$")


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def rng_state() -> dict[str, Any]:
    """Every random generator the main process draws from, as JSON."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "random": [version, list(internal), py_gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = state["random"]
    random.setstate((version, tuple(internal), py_gauss))


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _TAG.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def newest(root: Path) -> Path | None:
    """The checkpoint ``latest`` names if it is complete, else the newest complete one."""
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if is_complete(path):
            return path
        log.warning(
            "%s names %s, which is not a complete checkpoint; looking for the newest complete one", pointer, path.name
        )
    found = complete_checkpoints(root)
    return found[-1] if found else None


def resolve(spec: str, root: Path) -> Path | None:
    """``--resume`` → a checkpoint folder: ``auto`` = the newest under this run's ``root`` (None when
    the run has none yet); a path = that checkpoint, or the newest one under a run or checkpoints folder."""
    if spec == "auto":
        return newest(root)
    path = Path(spec)
    if is_complete(path):
        return path
    for candidate in (path, path / "checkpoints"):
        found = newest(candidate)
        if found is not None:
            return found
    if path.is_dir() and _TAG.match(path.name):
        raise FileNotFoundError(f"{path}: checkpoint is incomplete (no {COMPLETE}); it was interrupted while saving")
    raise FileNotFoundError(
        f"{path}: no complete checkpoint there (a step_* folder with {COMPLETE}, or a run folder holding checkpoints/)"
    )


def prune(root: Path, step: int, keep: int) -> None:
    """Remove interrupted saves older than ``step`` and all but the ``keep`` newest complete checkpoints."""
    stale = [p for p in root.iterdir() if (m := _TAG.match(p.name)) and int(m.group(1)) < step and not is_complete(p)]
    for old in stale + (complete_checkpoints(root)[:-keep] if keep else []):
        shutil.rmtree(old, ignore_errors=True)


def save(root: Path, step: int, engine, meta, loader, trainer_state: dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls it after the same step."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tag = tag_of(step)
    path = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if path.exists():  # an earlier, interrupted save of this step
            shutil.rmtree(path)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    atomic_write_json(path / f"rank_{rank:05d}.json", {"rank": rank, "loader": loader.state_dict(), "rng": rng_state()})
    if rank == 0:
        from safetensors.torch import save as to_bytes

        state = {k: v.detach().cpu().contiguous() for k, v in meta.teacher_state_dict().items()}
        atomic_write_bytes(path / TEACHER, to_bytes(state))
    dist.barrier()
    if rank == 0:
        atomic_write_json(path / COMPLETE, {"step": step, "world_size": world, **trainer_state})
        atomic_write_bytes(root / LATEST, tag.encode())
        prune(root, step, keep)
    dist.barrier()
    return path


def load_deepspeed_file(path: str | Path, map_location=None) -> Any:
    """Read one of DeepSpeed's checkpoint files with torch's restricted unpickler (tensors, containers,
    numbers, plus the few DeepSpeed classes its state dicts hold, allowed by name) — never arbitrary code,
    which DeepSpeed's own loader (``weights_only=False``) would run."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


def _weights_only_engine(engine) -> None:
    """Make the engine read its checkpoint files through :func:`load_deepspeed_file`."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_deepspeed_file(path, map_location)

    current = engine.checkpoint_engine
    if type(current) is TorchCheckpointEngine:
        safe = WeightsOnlyCheckpointEngine.__new__(WeightsOnlyCheckpointEngine)
        safe.__dict__.update(current.__dict__)
        engine.checkpoint_engine = safe


def _read_record(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """One of the checkpoint's JSON records, or a ValueError naming the file and what is wrong with it."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing from the checkpoint") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable checkpoint record ({exc})") from None
    missing = [k for k in keys if not isinstance(record, dict) or k not in record]
    if missing:
        raise ValueError(f"{path}: checkpoint record lacks {missing}")
    return record


def load(path: Path, engine, meta, loader) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore student, optimiser, teacher and loader from ``path``; returns the trainer state and
    this rank's RNG states (to set once the loader's workers are started, which draws from torch's RNG)."""
    from safetensors.torch import load_file

    info = _read_record(path / COMPLETE, ("world_size", "step"))
    rank, world = dist.get_rank(), dist.get_world_size()
    if info["world_size"] != world:
        raise ValueError(
            f"{path}: saved by {info['world_size']} ranks, resumed by {world}; exact resume needs the "
            "same world size (the data order and the ZeRO partitions depend on it)"
        )
    _weights_only_engine(engine)
    load_path, _ = engine.load_checkpoint(
        str(path.parent),
        tag=path.name,
        load_module_strict=True,
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
    )
    if load_path is None:
        raise FileNotFoundError(f"{path}: DeepSpeed found no checkpoint files there")
    meta.load_teacher_state_dict(load_file(path / TEACHER, device=str(next(meta.teacher.parameters()).device)))
    mine = _read_record(path / f"rank_{rank:05d}.json", ("loader", "rng"))
    loader.load_state_dict(mine["loader"])
    return info, mine["rng"]
