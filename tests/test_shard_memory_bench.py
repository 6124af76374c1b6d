"""benchmarks/shard_memory.py --small runs end to end: it writes a Xenium bundle and a Visium HD 2 µm output in
their real layouts, shards each in a child process and prints one row per input with its peak RSS, times,
throughput and the most sites held at once, and a second run reuses the cached inputs. The figures themselves
are not checked here (memory and speed are measured by running the script, not by tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "shard_memory.py"


def _run(cache: Path, tmp: Path) -> dict[str, list[str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(SCRIPT), "--small", "--cache", str(cache), "--work", str(tmp)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    header, *rows = done.stdout.strip().splitlines()
    assert "peak RSS GB" in header and "units/s" in header and "held at once" in header
    return {row.split()[0]: row.split() for row in rows}


@pytest.mark.slow
def test_small_mode_prints_both_inputs_and_reuses_them(tmp_path):
    rows = _run(tmp_path / "cache", tmp_path)
    assert set(rows) == {"xenium", "visium_hd"}
    for row in rows.values():
        peak_rss, held, tiles = float(row[7]), int(row[11].replace(",", "")), int(row[9].replace(",", ""))
        assert 0.05 < peak_rss < 4 and held > 0 and tiles > 0
    bundle = tmp_path / "cache" / "xenium-2e+06" / "xenium"
    schema = pq.read_schema(bundle / "transcripts.parquet")
    assert schema.names[:4] == ["transcript_id", "cell_id", "overlaps_nucleus", "feature_name"]
    assert pq.ParquetFile(bundle / "transcripts.parquet").metadata.num_row_groups == 2  # 1 M-row groups
    assert (tmp_path / "cache" / "visium_hd-0.15" / "hd" / "outs" / "binned_outputs" / "square_002um").is_dir()
    again = _run(tmp_path / "cache", tmp_path)
    assert float(again["xenium"][4]) == 0.0  # make s: the cached input was reused
    assert list(tmp_path.glob("shard-memory-*")) == []  # shards removed after each measurement
