"""Synthetic cohorts in genuine file formats, for tests, the demo and benchmarks (``histotx synth``)."""

from histotx.synth.cohort import SIZES, VARIANTS, generate_cohort, register_cli

__all__ = ["SIZES", "VARIANTS", "generate_cohort", "register_cli"]
