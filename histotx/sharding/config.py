"""Settings of a sharding run (``histotx shard run --config shard.yaml key=value ...``)."""

from __future__ import annotations

from dataclasses import dataclass

from histotx.config import ConfigError
from histotx.format import IMAGE_EXTENSIONS, JPEG_SUBSAMPLINGS, MAX_TILE_PX, MAX_TILE_UM, MPP_RANGE
from histotx.sharding.slides import RESAMPLE_FILTERS

TILINGS = ("grid", "grid_sites", "spots")


@dataclass
class ShardConfig:
    mpp: float = 0.5  # µm/px of every output tile
    tile_px: int = 256  # output tile side in px (256 px at 0.5 µm/px = 128 µm)
    tiling: str = "grid"  # grid: tissue tiles over the whole slide; grid_sites: those plus every grid tile
    # holding a site (even where the mask says background); spots: one tile
    # centred on each spot (HEST-style)
    min_tissue_fraction: float = 0.25  # grid tiles with less tissue are skipped
    mask_mpp: float = 8.0  # µm/px of the thumbnail the tissue mask is computed on
    image_format: str = "jpg"  # jpg | png | webp
    jpeg_quality: int = 90
    jpeg_subsampling: str = "444"  # 444 | 422 | 420: 4:2:0 encodes ~1.5x faster, a third smaller (CMU-1 tiles),
    # but blurs colour edges
    shard_max_tiles: int = 1000  # a shard closes at this many tiles ...
    shard_max_bytes: int = 512 * 1024 * 1024  # ... or this many bytes
    max_tiles_per_sample: int = 0  # 0 = all; else a seeded random subset
    seed: int = 0
    qv_min: float = 20.0  # Xenium: keep molecules with qv >= qv_min
    in_tissue_only: bool = True  # Visium/HD/HEST: drop spots that Space Ranger called out of tissue
    mpp_tolerance: float = 0.05  # warn when the data's own pixel size and the slide's disagree by more
    max_outside_fraction: float = 0.5  # fail a sample when more of its sites than this lie outside the slide
    max_dropped_fraction: float = 0.05  # warn when more of a sample's sites than this lie under no kept tile
    resample: str = "area"  # area (OpenCV: area average shrinking, bilinear enlarging; fast) | bilinear |
    # bicubic | lanczos (Pillow; anti-aliased when shrinking; 3-25x slower)
    decode_reduce: bool = True  # shrink by 2/4/8 inside the JPEG decoder (DCT scaling) when tiles need at
    # least that much shrinking (40x scans to 0.5 µm/px): ~2x faster; a 4:2:0
    # source's colour then stays at half the tile's resolution (Aperio's 4:4:4
    # is unaffected); false: decode in full and area-average
    snap_tolerance: float = 0.02  # a pyramid level this close to `mpp` is cut 1:1 (tiles keep its exact µm/px)
    run_tiles: int = 16  # neighbouring tiles of a row read and resampled together as one region
    # A slide coarser than `mpp` is enlarged into tiles (no detail is added): above warn_upsample× the sample gets
    # a WARNING, above max_upsample× it fails (e.g. a 16 µm/px low-res image cut at 0.5 µm/px: 32×); 0: no limit.
    # The factor is in the manifest (samples.<id>.upsample).
    warn_upsample: float = 2.0
    max_upsample: float = 4.0

    def validate(self) -> None:
        if self.tiling not in TILINGS:
            raise ConfigError(f"tiling must be one of {', '.join(TILINGS)}, got {self.tiling}")
        if self.image_format not in IMAGE_EXTENSIONS:
            raise ConfigError(f"image_format must be one of {IMAGE_EXTENSIONS}, got {self.image_format!r}")
        lo, hi = MPP_RANGE
        if not (lo <= self.mpp <= hi and 16 <= self.tile_px <= MAX_TILE_PX and self.tile_px * self.mpp <= MAX_TILE_UM):
            raise ConfigError(
                f"mpp must be within [{lo}, {hi}] µm/px, tile_px within [16, {MAX_TILE_PX}] and tile_px × mpp at most "
                f"{MAX_TILE_UM:g} µm (the shard format's limits; readers refuse larger tiles), got mpp {self.mpp}, "
                f"tile_px {self.tile_px}"
            )
        if not (0 <= self.min_tissue_fraction <= 1 and 0 <= self.max_dropped_fraction <= 1):
            raise ConfigError("min_tissue_fraction and max_dropped_fraction must be within [0, 1]")
        if self.jpeg_subsampling not in JPEG_SUBSAMPLINGS:
            raise ConfigError(f"jpeg_subsampling must be one of {JPEG_SUBSAMPLINGS}, got {self.jpeg_subsampling!r}")
        if self.resample not in RESAMPLE_FILTERS:
            raise ConfigError(f"resample must be one of {RESAMPLE_FILTERS}, got {self.resample!r}")
        if self.warn_upsample < 1 or self.max_upsample < 0:
            raise ConfigError("warn_upsample must be >= 1 and max_upsample >= 0 (0: no limit)")
        if min(self.shard_max_tiles, self.run_tiles) < 1:
            raise ConfigError("shard_max_tiles and run_tiles must be >= 1")
