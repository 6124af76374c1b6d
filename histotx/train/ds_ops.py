"""DeepSpeed's just-in-time C++ builds that a training run does not need, turned off before they start.

On a machine without a GPU, DeepSpeed picks its CPU accelerator, and every ``TorchBackend`` it creates
(``deepspeed.init_distributed``, also reached from ``deepspeed.initialize``) loads the
``deepspeed_shm_comm`` op first (``deepspeed/comm/torch.py: build_shm_op``). No pip wheel ships it
built, so it is compiled with ninja and g++ into ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions/py<ver>_<cuda>``, shared by every venv of the user, behind a file lock): 1–4
minutes before the first step on 2 cores, every time that folder is new or taken by another build. The op
serves one collective only, ``inference_all_reduce`` (shared-memory all-reduce for tensor-parallel
*inference*, ``deepspeed/module_inject``); ZeRO training calls torch.distributed's collectives over gloo,
never that one, with one process or many. ``build_shm_op`` skips the build when
``deepspeed.ops.__compatible_ops__`` marks the op incompatible, which is what :func:`skip_unused_builds`
does. On a GPU (the CUDA accelerator has no such op) nothing changes.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

UNUSED_OPS = ("deepspeed_shm_comm",)  # built by TorchBackend on the CPU accelerator; training never calls it


def skip_unused_builds() -> list[str]:
    """Mark the ops of :data:`UNUSED_OPS` not buildable for this process (before any process group is made
    through DeepSpeed). Returns the ops it marked; nothing on a non-CPU accelerator."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return []
    import deepspeed.ops

    try:
        compatible = deepspeed.ops.__compatible_ops__  # probed once per process (~0.3 s), then cached
    except AttributeError:  # a DeepSpeed without the lazy table: leave it as it is
        log.debug("deepspeed.ops has no __compatible_ops__; not touching its op builds")
        return []
    marked = [op for op in UNUSED_OPS if compatible.get(op)]
    for op in marked:
        compatible[op] = False
    return marked
