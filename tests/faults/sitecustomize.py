"""Fault injection for the job-script and failing-rank tests (a test folder on PYTHONPATH, never installed).

Python imports `sitecustomize` at start-up; with HISTOTX_TEST_FAULT set, this one patches the trainer
before any rank runs, so the real launcher (torchrun, srun, slurm/pretrain.sbatch) starts real ranks
that fail the way GPU ranks do:

- ``step:RANK:STEP``  rank RANK raises a RuntimeError (worded like a CUDA OOM) taking optimiser step STEP;
- ``save:RANK``       rank RANK's checkpoint save raises OSError (a full disk), whatever the step;
- ``crash:STEP``      every rank of every start raises at step STEP (a crash that a retry does not cure).
"""

from __future__ import annotations

import os

FAULT = os.environ.get("HISTOTX_TEST_FAULT", "")


def _install(fault: str) -> None:
    import histotx.train.checkpoint as checkpoint
    import histotx.train.loop as loop

    kind, *args = fault.split(":")
    if kind in ("step", "crash"):
        rank, step = (int(args[0]), int(args[1])) if kind == "step" else (None, int(args[0]))
        train_step = loop.Trainer.train_step

        def failing_step(self, batch, window=None):
            if (rank is None or self.rank == rank) and self.step + 1 == step:
                raise RuntimeError(f"injected fault: rank {self.rank} out of memory taking step {step}")
            return train_step(self, batch, window)

        loop.Trainer.train_step = failing_step
    elif kind == "save":
        rank, save = int(args[0]), checkpoint.save

        def failing_save(root, step, engine, *rest, **kw):
            import torch.distributed as dist

            if dist.get_rank() == rank:
                raise OSError(28, f"injected fault: no space left on device saving step {step}")
            return save(root, step, engine, *rest, **kw)

        checkpoint.save = failing_save
    else:
        raise ValueError(f"HISTOTX_TEST_FAULT={fault!r}: expected step:RANK:STEP, save:RANK or crash:STEP")


if FAULT:
    _install(FAULT)
