"""`python sharding/shard.py ...` is `histotx shard ...` (the code lives in histotx.sharding).

python sharding/shard.py run cohort.yaml --out shards/ --workers 8
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's histotx, installed or not

from histotx.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["shard", *sys.argv[1:]]))
