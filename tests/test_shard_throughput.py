"""benchmarks/shard_throughput.py runs end to end on small slides of the real CMU-1 region: every case's row,
with the pipeline, bound, naive (OpenSlide) and scaling columns, so a benchmark session does not find it broken.
The figures themselves are not checked here (speed is measured by running the script, not by tests)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "shard_throughput.py"


def _module():
    spec = importlib.util.spec_from_file_location("shard_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_case_holds_the_same_tissue():
    bench = _module()
    assert {case: bench.case_mosaic(6, mpp) for case, mpp in bench.CASES.items()} == {
        "1:1": 6,
        "upsample": 4,
        "down2": 12,
    }


@pytest.mark.slow
@pytest.mark.usefixtures("shared_data")
def test_the_benchmark_prints_every_case():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--mosaic", "1", "--rounds", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    out = run.stdout
    assert "bound x2/x1" in out and "x1/naive" in out
    for case in ("1:1", "upsample", "down2"):
        # case, tiles, 3 × "rate (cpu)", x2 rate, "ratio (cpu)" × 2, x2/x1, bound/naive, bound x2/x1
        row = re.search(
            rf"^\s*{re.escape(case)}\s+(\d+)((?:\s+[\d.]+\s+\(\s*[\d.]+\)){{3}})\s+(\d+)"
            rf"((?:\s+[\d.]+\s+\([\d.]+\)){{2}})\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$",
            out,
            re.M,
        )
        assert row, (case, out)
        assert int(row.group(1)) > 0 and all(float(v) > 0 for v in row.groups()[4:])
        steps = r" bound's fastest steps: decode: .+; assemble\+resize: .+; encode: "
        assert re.search(rf"^\[{re.escape(case)}\] .*{steps}", out, re.M), out
