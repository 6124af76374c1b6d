"""Faults around the sharding run, not the data: a second run on the same folder, a full disk."""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
import time

import pytest
import yaml

from histotx.cli import main as histotx_main
from histotx.format import read_manifest
from histotx.sharding.errors import OutputError
from histotx.sharding.verify import verify
from histotx.sharding.writer import OutputLock

ARGS = ["mpp=16", "tile_px=32", "mask_mpp=16", "shard_max_tiles=20"]


@pytest.fixture
def cohort(shared_data, tmp_path):
    outs = shared_data / "scanpy-visium/visium_data/1.0.0"
    v = {
        "technology": "visium",
        "image_scale": "lowres",
        "data": str(outs),
        "slide": str(outs / "spatial/tissue_lowres_image.png"),
    }
    path = tmp_path / "cohort.yaml"
    path.write_text(yaml.safe_dump({"samples": [{"id": "a", **v}, {"id": "b", **v}]}))
    return path


def test_a_second_run_on_the_same_folder_refuses(cohort, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stands in for a live run
    try:
        (out / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": owner.pid, "started": time.time()}))
        assert histotx_main(["shard", "run", str(cohort), "--out", str(out), *ARGS]) == 2
        message = caplog.text
        assert f"process {owner.pid} on host {socket.gethostname()}" in message and ".lock" in message, message
        assert not (out / "manifest.json").exists() and not list(out.glob("*.tar"))
    finally:
        owner.kill()
        owner.wait()
    # Its owner gone, the lock is stale: the next run takes it over, finishes and releases it.
    assert histotx_main(["shard", "run", str(cohort), "--out", str(out), *ARGS]) == 0
    assert not list(out.glob(".lock*"))


def test_parts_lock_separately_and_exclude_a_whole_run(tmp_path):
    with OutputLock(tmp_path, 0, 2), OutputLock(tmp_path, 1, 2):
        with pytest.raises(OutputError, match=r"already writing here \(lock file .*\.lock\.part-0000-of-0002"):
            OutputLock(tmp_path).acquire()
        with pytest.raises(OutputError, match="part-0001-of-0002"):
            OutputLock(tmp_path, 1, 2).acquire()
    with OutputLock(tmp_path):
        with pytest.raises(OutputError, match=r"lock file .*/\.lock\)"):
            OutputLock(tmp_path, 0, 2).acquire()
    assert not list(tmp_path.glob(".lock*"))


def test_file_size_limit_stops_clearly_and_the_rerun_finishes(cohort, tmp_path, caplog):
    """RLIMIT_FSIZE (ulimit -f) below one shard's size: the run stops with a clear error, no partial shard is
    listed or left behind, and the same command without the limit finishes the job with every tile.
    (Python ignores SIGXFSZ, so the write fails with EFBIG; the soft limit is restored afterwards.)"""
    out = tmp_path / "out"
    argv = ["shard", "run", str(cohort), "--out", str(out), *ARGS, "shard_max_tiles=1000"]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, hard))
    try:
        rc = histotx_main(argv)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert rc == 2
    assert "file larger than the file-size limit" in caplog.text and "run the same command again" in caplog.text
    assert not list(out.glob("*.tar")) and not list(out.glob(".*.tmp")) and not list(out.glob(".lock*"))
    assert not (out / "manifest.json").exists() and not list((out / ".done").glob("*.json"))
    assert histotx_main(argv) == 0
    manifest = read_manifest(out)
    assert {s["sample_id"] for s in manifest["shards"]} == {"a", "b"}
    assert manifest["samples"]["a"]["tiles"] == manifest["samples"]["b"]["tiles"] > 50
    assert max(s["bytes"] for s in manifest["shards"]) > 60_000  # the limit really cut a shard
    assert verify(out)["problems"] == []


def test_no_shard_of_a_sample_appears_before_its_last_tile(tmp_path):
    """Shards close as they fill, but take their final names only when the sample is complete: a sample that
    fails midway (abort) leaves nothing behind, one that completes has every shard in place."""
    import numpy as np
    from shardkit import tile_sample

    from histotx.sharding.writer import ShardSink

    rng = np.random.default_rng(0)
    sink = ShardSink(tmp_path, "s1", max_tiles=3, max_bytes=1 << 30)
    for i in range(10):
        sink.add(tile_sample(rng, "s1", i, tile_px=16))
    assert len(sink.shards) == 3 and not list(tmp_path.glob("*.tar"))
    sink.abort()
    assert not list(tmp_path.iterdir())
    sink = ShardSink(tmp_path, "s1", max_tiles=3, max_bytes=1 << 30)
    for i in range(10):
        sink.add(tile_sample(rng, "s1", i, tile_px=16))
    shards = sink.close()
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [s["name"] for s in shards]
    assert [s["samples"] for s in shards] == [3, 3, 3, 1] and not list(tmp_path.glob(".*.tmp"))


def test_a_growing_shard_is_synced_in_the_background_and_a_failed_sync_stops_the_sample(tmp_path, monkeypatch):
    """A shard is fdatasynced in the background each SYNC_BYTES while it grows (so closing the sample waits for
    its tail only), with the same bytes as without; a sync that fails (a full disk) fails close(), which then
    renames no shard into place."""
    import errno
    import os

    import numpy as np
    from shardkit import tile_sample

    from histotx.sharding import writer

    def write(folder, n_tiles=12):
        folder.mkdir()
        sink = writer.ShardSink(folder, "s1", max_tiles=1000, max_bytes=1 << 30)
        rng = np.random.default_rng(0)
        for i in range(n_tiles):
            sink.add(tile_sample(rng, "s1", i, tile_px=32))
        return sink

    synced_at = []  # the shard's size on disk when each background sync ran
    real_sync = os.fdatasync
    monkeypatch.setattr(writer, "SYNC_BYTES", 20_000)
    monkeypatch.setattr(writer.os, "fdatasync", lambda fd: synced_at.append(os.fstat(fd).st_size) or real_sync(fd))
    often = write(tmp_path / "often").close()
    monkeypatch.setattr(writer, "SYNC_BYTES", 1 << 40)
    never = write(tmp_path / "never").close()
    assert len(synced_at) >= 1 and synced_at == sorted(synced_at)  # (one at a time, as the shard grows)
    assert often == never
    assert (tmp_path / "often/s1.00000.tar").read_bytes() == (tmp_path / "never/s1.00000.tar").read_bytes()

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "SYNC_BYTES", 20_000)
    monkeypatch.setattr(writer.os, "fdatasync", full)
    sink = write(tmp_path / "full")
    with pytest.raises(OSError, match="No space"):
        sink.close()
    sink.abort()  # as the pipeline does
    assert not list((tmp_path / "full").iterdir())
