"""Shard sets in object storage, against an S3-compatible server on 127.0.0.1 (moto's server mode, s3fs):

- `histotx shard run --out s3://bucket/prefix` uploads the finished shards, then the manifest last;
- the training loader streams the set from the URL (no local copy), each rank and worker its own split,
  batch for batch the same as from the local folder; training's preflight accepts the URL;
- a shard that vanishes and one that is corrupted while a run reads them are skipped and counted
  (corrupt_shards in metrics.jsonl), and training goes on to its last step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import s3kit
import torch
from test_train_distributed import RUN, TINY

REPO = Path(__file__).resolve().parents[1]
BUCKET = "histotx-shards"

pytestmark = pytest.mark.skipif(s3kit.missing() is not None, reason=str(s3kit.missing()))


@pytest.fixture(scope="module")
def server():
    with s3kit.s3_server() as endpoint:
        s3kit.client().create_bucket(Bucket=BUCKET)
        yield endpoint


@pytest.fixture(scope="module")
def uploaded(server, tmp_path_factory, monkeypatch_module):
    """A synthetic cohort sharded straight to s3:// by the CLI (staged in a kept folder to compare)."""
    assert server.startswith("http://127.0.0.1:")
    import histotx.shard_location as location
    from histotx.cli import main
    from histotx.synth import generate_cohort

    root = tmp_path_factory.mktemp("s3_cohort")
    cohort = generate_cohort(root / "synth", seed=0, size="small")
    puts: list[str] = []
    real = location.filesystem

    class Recording:
        def __init__(self, fs):
            self.fs = fs

        def put_file(self, local, remote):
            puts.append(remote.rsplit("/", 1)[-1])
            return self.fs.put_file(local, remote)

    monkeypatch_module.setattr(location, "filesystem", lambda url: Recording(real(url)))
    url = f"s3://{BUCKET}/cohort-a"
    overrides = ["mpp=8.0", "tile_px=32", "mask_mpp=16.0", "min_tissue_fraction=0.3", "shard_max_tiles=4"]
    assert main(["shard", "run", str(cohort), "--out", url, "--stage", str(root / "stage"), *overrides]) == 0
    monkeypatch_module.setattr(location, "filesystem", real)
    return url, root / "stage", puts


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_shard_run_uploads_shards_then_the_manifest(uploaded):
    url, stage, puts = uploaded
    manifest = json.loads((stage / "manifest.json").read_text())
    names = [s["name"] for s in manifest["shards"]]
    assert len(names) >= 4 and puts[-1] == "manifest.json" and sorted(puts[:-1]) == sorted([*names, "vocab.tsv"])
    s3 = s3kit.client()
    for entry in manifest["shards"]:
        body = s3.get_object(Bucket=BUCKET, Key=f"cohort-a/{entry['name']}")["Body"].read()
        assert len(body) == entry["bytes"] and hashlib.sha256(body).hexdigest() == entry["sha256"]


def _data_cfg(shards: str, workers: int):
    from histotx.config import load_config
    from histotx.train.config import TrainConfig

    overrides = [*RUN, f"data.stream.shards={shards}", f"data.stream.num_workers={workers}", "require_cuda=false"]
    return load_config(TrainConfig, TINY, overrides).data


def _flat(batch) -> list:
    out = []
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        if dataclasses.is_dataclass(v):
            out += _flat(v)
        elif isinstance(v, torch.Tensor):
            out.append(v.numpy())
        else:
            out.append(v)
    return out


def test_the_loader_streams_from_s3_exactly_as_from_the_folder(uploaded, tmp_path):
    from histotx.data.loader import build_loader
    from histotx.train.config import ModelSection, TrainConfig
    from histotx.train.preflight import check_run_inputs

    url, stage, _ = uploaded
    batches = {}
    for name, where in (("local", str(stage)), ("s3", url)):
        loader = build_loader(_data_cfg(where, workers=2), rank=1, world_size=2)
        it = iter(loader)
        batches[name] = [_flat(next(it)) for _ in range(4)]
        assert loader.stats.corrupt_shards == 0 and loader.stats.shards_read > 0
        del it
    for a, b in zip(batches["local"], batches["s3"], strict=True):
        assert len(a) == len(b) and all(
            np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y for x, y in zip(a, b, strict=True)
        )
    # each rank and worker slot its own shards (a partition of the set's URLs)
    from histotx.data.stream import ShardStream

    cfg = _data_cfg(url, workers=2).stream
    cfg.resample = False
    splits = [
        ShardStream(cfg, None, None, rank=r, world_size=2).slot_shards(0, slot) for r in (0, 1) for slot in (0, 1)
    ]
    every = [u for s in splits for u in s]
    assert all(u.startswith(url + "/") for u in every) and len(every) == len(set(every)) and all(splits)
    tc = TrainConfig(out=str(tmp_path / "run"))
    tc.data.stream.shards = url
    tc.model = ModelSection(size="tiny", embed_dim=32, num_heads=2, img_size=32, patch_size=8, vocab_size=1024)
    tc.data.mask.patch_size = 8
    check_run_inputs(tc)  # the manifest read and the shards listed from the URL


@pytest.mark.slow
def test_a_shard_that_vanishes_or_is_corrupted_mid_run_is_skipped_and_counted(uploaded, tmp_path):
    url, stage, _ = uploaded
    s3 = s3kit.client()
    prefix = "cohort-b"
    names = sorted(p.name for p in stage.iterdir() if p.is_file())
    for name in names:  # a copy of the set of its own: this test damages it
        s3.upload_file(str(stage / name), BUCKET, f"{prefix}/{name}")
    shards = sorted(n for n in names if n.endswith(".tar"))
    out, n = tmp_path / "run", 12
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "histotx.launch.train",
            str(TINY),
            f"out={out}",
            *RUN,
            f"data.stream.shards=s3://{BUCKET}/{prefix}",
            f"steps={n}",
            "data.stream.num_workers=1",
            "data.stream.shuffle_buffer=2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0][-4000:]
            time.sleep(0.1)
        # mid-run: one shard is deleted, another overwritten with the same number of garbage bytes
        s3.delete_object(Bucket=BUCKET, Key=f"{prefix}/{shards[0]}")
        size = (stage / shards[1]).stat().st_size
        garbage = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{shards[1]}", Body=garbage)
        log, _ = job.communicate(timeout=400)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, log[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, n + 1)), log[-3000:]  # training went on to the end
    assert rows[-1]["corrupt_shards"] >= 1, (rows[-1], log[-3000:])
    assert f"s3://{BUCKET}/{prefix}/{shards[0]}" in log or f"s3://{BUCKET}/{prefix}/{shards[1]}" in log
