"""Per-rank entry points for torchrun, the deepspeed launcher and srun."""
