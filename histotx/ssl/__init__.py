"""The self-supervised objective: DINO/iBOT heads, losses, teacher normalisation and schedules."""
