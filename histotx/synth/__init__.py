"""Synthetic cohorts in genuine file formats, for tests, the demo and benchmarks (``histotx synth``).

:func:`generate_cohort` is imported on first use (pandas, anndata, scipy): the CLI's parser needs only
:func:`register_cli`.
"""

from histotx.synth.cli import register_cli
from histotx.synth.variants import ALL_VARIANTS, SIZES, VARIANTS

__all__ = ["ALL_VARIANTS", "SIZES", "VARIANTS", "generate_cohort", "register_cli"]


def __getattr__(name: str):
    if name == "generate_cohort":
        from histotx.synth.cohort import generate_cohort

        return generate_cohort
    raise AttributeError(f"module 'histotx.synth' has no attribute {name!r}")
