"""The names a synthetic cohort is made of (no heavy imports: the CLI's parser lists them)."""

VARIANTS = ("visium", "visium_sr2", "visium_hd", "xenium", "hest", "image_only")
"""The default cohort, one sample per variant: Space Ranger 1.x (visium) and 2.x (visium_sr2) outs, Visium HD,
a Xenium bundle, a HEST-layout sample, an image-only slide."""
EXTRA_VARIANTS = (
    "cosmx",
    "spatialdata_points",
    "spatialdata_shapes",
)  # written only when asked for: the default cohort stays as it was
ALL_VARIANTS = VARIANTS + EXTRA_VARIANTS
SIZES = ("small", "medium", "bench")
