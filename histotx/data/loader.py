"""The training loader of one rank: shard stream → multi-crop → SSL collation."""
from __future__ import annotations

from histotx.data.augment import MultiCrop
from histotx.data.collate import SSLCollate
from histotx.data.config import DataConfig
from histotx.data.stream import ShardStream, StreamLoader


def build_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> StreamLoader:
    """An endless, resumable iterator of :class:`~histotx.data.collate.SSLBatch` for this rank."""
    stream = ShardStream(cfg.stream, MultiCrop(cfg.augment), SSLCollate(cfg), rank=rank, world_size=world_size)
    return StreamLoader(stream, pin_memory=pin_memory)
