"""Hugging Face export (in progress)."""
MPP_KEY = "microns_per_pixel"
