"""Typed configuration of the training data pipeline (see histotx.config for YAML and overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field

from histotx.config import ConfigError
from histotx.preprocess import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class StreamConfig:
    # a shard folder with manifest.json (made by `histotx shard`), or an fsspec URL: s3://b/p, gs://, file://
    shards: str = ""
    batch_size: int = 32  # per rank
    num_workers: int = 4  # per rank; a resumed run must use the same number
    seed: int = 0
    shuffle_buffer: int = 1000  # samples (raw bytes, before decoding)
    shuffle_buffer_bytes: int = 256 << 20  # ... and at most this many raw bytes per worker (large tiles)
    checksums: bool = True  # check each shard's size and SHA-256 against the manifest (once per worker)
    steps_per_epoch: int = 0  # batches per rank and epoch; 0: one pass, tiles // (ranks × batch_size)
    resample: bool = False  # draw shards with replacement (allows fewer shards than ranks × workers)
    prefetch_factor: int = 2
    max_consecutive_bad_samples: int = 1000  # more in a row and the loader stops with an error


@dataclass
class AugmentConfig:
    global_crop_size: int = 224
    global_crop_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_number: int = 8
    local_crop_size: int = 96
    local_crop_scale: tuple[float, float] = (0.05, 0.32)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    vflip_p: float = 0.5  # tissue has no up or down
    rot90: bool = True  # a random quarter turn per crop
    color_jitter_p: float = 0.8
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02
    hed_jitter_p: float = 0.5  # stain jitter in haematoxylin-eosin-DAB space
    hed_sigma: float = 0.05
    grayscale_p: float = 0.2
    blur_p_global1: float = 1.0  # DINOv2: first global crop always blurred,
    blur_p_global2: float = 0.1  # the second rarely,
    blur_p_local: float = 0.5  # the local crops half of the time
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p_global2: float = 0.2
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Where JPEG tiles are decoded and the views' pixels made. "cpu": in the loader workers. "cuda": the
    # workers draw the views and hand over the JPEG bytes; the trainer decodes a batch at once on its GPU
    # (torchvision.io.decode_jpeg) and crops/colours there (histotx.data.device_decode): for nodes with
    # few CPU cores per GPU. The same draws either way; pixels differ by the decoders' rounding only.
    decode_device: str = "cpu"


@dataclass
class MaskConfig:
    patch_size: int = 16  # must match the model's
    image_mask_probability: float = 0.5  # share of global crops with an iBOT block mask
    image_mask_ratio: tuple[float, float] = (0.1, 0.5)  # spread evenly over the masked crops
    mask_aspect: tuple[float, float] = (0.3, 3.3)
    min_block_patches: int = 4
    transcript_mask_probability: float = 0.5  # share of global crops with masked transcript tokens
    transcript_mask_ratio: tuple[float, float] = (0.1, 0.5)


@dataclass
class CollateConfig:
    # Transcript token size per batch, drawn uniformly: µm, or "native" (one token per spot/bin/molecule).
    resolutions_um: list[float | str] = field(default_factory=lambda: ["native", 8.0, 16.0, 32.0, 55.0])
    p_image_only: float = 0.2  # per sample: transcripts dropped (keeps image-only inference strong)
    p_transcripts_only: float = 0.1  # per sample: image dropped


@dataclass
class DataConfig:
    stream: StreamConfig = field(default_factory=StreamConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    collate: CollateConfig = field(default_factory=CollateConfig)

    def validate(self) -> None:
        _check_stream(self.stream)
        _check_augment(self.augment, self.mask.patch_size)
        _check_mask(self.mask)
        _check_collate(self.collate)


def _check_stream(s: StreamConfig) -> None:
    if (
        s.batch_size < 1
        or s.shuffle_buffer < 1
        or s.shuffle_buffer_bytes < 1
        or min(s.num_workers, s.steps_per_epoch, s.seed) < 0
    ):
        raise ConfigError(
            "data.stream: batch_size, shuffle_buffer and shuffle_buffer_bytes must be >= 1; "
            "num_workers, steps_per_epoch and seed >= 0"
        )


def _check_augment(a: AugmentConfig, patch_size: int) -> None:
    for name in ("global_crop_scale", "local_crop_scale", "crop_ratio", "blur_sigma"):
        lo, hi = getattr(a, name)
        if not 0 < lo <= hi:
            raise ConfigError(f"data.augment.{name} must be an interval 0 < low <= high, got {(lo, hi)}")
    if a.global_crop_scale[1] > 1 or a.local_crop_scale[1] > 1:
        raise ConfigError("data.augment crop scales are shares of the tile: at most 1")
    if a.decode_device not in ("cpu", "cuda"):
        raise ConfigError(f"data.augment.decode_device must be 'cpu' or 'cuda', got {a.decode_device!r}")
    for size in (a.global_crop_size, a.local_crop_size):
        if size % patch_size:
            raise ConfigError(f"data.augment crop size {size} is not a multiple of data.mask.patch_size {patch_size}")


def _check_mask(m: MaskConfig) -> None:
    for name in ("image_mask_ratio", "transcript_mask_ratio"):
        lo, hi = getattr(m, name)
        if not 0 <= lo <= hi <= 1:
            raise ConfigError(f"data.mask.{name} must satisfy 0 <= low <= high <= 1, got {(lo, hi)}")


def _check_collate(c: CollateConfig) -> None:
    if not c.resolutions_um:
        raise ConfigError("data.collate.resolutions_um needs at least one entry")
    for r in c.resolutions_um:
        if not (r == "native" or (isinstance(r, float) and r > 0)):
            raise ConfigError(f"data.collate.resolutions_um: {r!r} is neither a positive size in µm nor 'native'")
    if c.p_image_only < 0 or c.p_transcripts_only < 0 or c.p_image_only + c.p_transcripts_only > 1:
        raise ConfigError("data.collate: p_image_only and p_transcripts_only must be >= 0 and sum to <= 1")
