"""The training loader of one rank: shard stream → multi-crop → SSL collation."""

from __future__ import annotations

import torch.distributed as dist

from histotx.data.augment import MultiCrop
from histotx.data.collate import SSLCollate
from histotx.data.config import DataConfig
from histotx.data.stream import ShardStream, StreamLoader


def build_loader(
    cfg: DataConfig, rank: int | None = None, world_size: int | None = None, pin_memory: bool = False
) -> StreamLoader:
    """An endless, resumable iterator of :class:`~histotx.data.collate.SSLBatch` for this rank
    (rank and world size default to torch.distributed's when it is initialised)."""
    distributed = dist.is_available() and dist.is_initialized()
    rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
    world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
    stream = ShardStream(cfg.stream, MultiCrop(cfg.augment), SSLCollate(cfg), rank=rank, world_size=world_size)
    return StreamLoader(stream, pin_memory=pin_memory)
