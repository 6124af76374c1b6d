"""The per-rank script that torchrun, the deepspeed launcher and srun start (see histotx.launch.train).

torchrun --nproc-per-node 2 launch/train.py CONFIG.yaml [key=value ...] [--resume auto]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's histotx, installed or not

from histotx.launch.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
