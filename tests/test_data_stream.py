"""The streaming loader on tiny shard sets: coverage, splits, determinism, exact resume, faults."""

from __future__ import annotations

import json
import warnings
from itertools import islice

import pytest
from shardkit import write_shard_set

from histotx.config import load_config
from histotx.data.config import DataConfig
from histotx.data.stream import ShardStream, ShardWarning, StreamLoader


def tile_index(tile, rng):
    """Per-sample transform of these tests: the tile's number and a draw from its generator."""
    return tile.meta["index"], float(rng.random())


def as_list(items, rng):
    return {"items": items, "draw": float(rng.random())}


def make_loader(shards, rank=0, world_size=1, **stream):
    overrides = [f"stream.shards={shards}", "stream.batch_size=4", "stream.shuffle_buffer=5"]
    overrides += [f"stream.{k}={v}" for k, v in stream.items()]
    cfg = load_config(DataConfig, overrides=overrides).stream
    return StreamLoader(ShardStream(cfg, tile_index, as_list, rank=rank, world_size=world_size))


def indices(batches):
    return [i for b in batches for i, _ in b["items"]]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shard_set(tmp_path_factory.mktemp("shards"), n_shards=4, per_shard=6, tile_px=16)


def test_one_epoch_covers_every_tile_once_with_two_workers(shards):
    loader = make_loader(shards, num_workers=2)
    assert loader.steps_per_epoch == 6  # 24 tiles / batch 4
    epoch0 = list(islice(loader, 6))
    assert sorted(indices(epoch0)) == list(range(24))
    assert loader.epoch == 1 and loader.stats.shards_read == 4 and loader.stats.corrupt_shards == 0
    # each worker reports the samples it delivered and its own CPU clock (what benchmarks/train_step.py reads)
    assert loader.stats.samples == 24 and loader.stats.worker_cpu_s > 0
    epoch1 = list(islice(loader, 6))
    assert sorted(indices(epoch1)) == list(range(24)) and indices(epoch1) != indices(epoch0)


def test_order_is_a_function_of_the_seed(shards):
    a = list(islice(make_loader(shards, num_workers=2), 8))
    b = list(islice(make_loader(shards, num_workers=2), 8))
    c = list(islice(make_loader(shards, num_workers=2, seed=1), 8))
    assert a == b  # same items, same augmentation draws, same batch draws
    assert indices(a) != indices(c)


def test_ranks_split_the_shards_and_take_equal_steps(shards):
    r0 = make_loader(shards, rank=0, world_size=2, num_workers=1)
    r1 = make_loader(shards, rank=1, world_size=2, num_workers=1)
    assert r0.steps_per_epoch == r1.steps_per_epoch == 3
    i0, i1 = indices(islice(r0, 3)), indices(islice(r1, 3))
    assert not set(i0) & set(i1) and sorted(i0 + i1) == list(range(24))


def test_too_few_shards_fails_clearly_unless_resampled(shards):
    with pytest.raises(ValueError, match=r"4 shards cannot feed 3 ranks × 2 workers.*resample"):
        make_loader(shards, world_size=3, num_workers=2)
    loader = make_loader(shards, world_size=3, num_workers=2, resample=True)
    batches = list(islice(loader, 7))
    assert len(batches) == 7 and all(len(b["items"]) == 4 for b in batches)


@pytest.mark.parametrize("cut", [1, 4, 6])
def test_resume_continues_with_the_next_sample(shards, cut):
    straight = list(islice(make_loader(shards, num_workers=2), 9))
    first = make_loader(shards, num_workers=2)
    head = list(islice(first, cut))
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make_loader(shards, num_workers=2)
    resumed.load_state_dict(state)
    assert head + list(islice(resumed, 9 - cut)) == straight


def test_resume_refuses_a_changed_setup(shards):
    loader = make_loader(shards, num_workers=2)
    list(islice(loader, 2))
    other = make_loader(shards, num_workers=1)
    with pytest.raises(ValueError, match="num_workers: saved 2, now 1"):
        other.load_state_dict(loader.state_dict())


@pytest.fixture
def damaged(tmp_path):
    """6 shards of 4 tiles (indices 4s..4s+3): shard 1 truncated mid-way, shard 2 garbage,
    shard 3 with one sample whose grid member is corrupt."""
    out = write_shard_set(tmp_path / "damaged", n_shards=6, per_shard=4, tile_px=16)
    raw = (out / "shard-00001.tar").read_bytes()
    (out / "shard-00001.tar").write_bytes(raw[: len(raw) // 2])
    (out / "shard-00002.tar").write_bytes(b"not a tar file " * 300)
    import io
    import tarfile

    src = out / "shard-00003.tar"
    members = []
    with tarfile.open(src) as tf:
        for m in tf.getmembers():
            data = tf.extractfile(m).read()
            members.append((m, b"HTXG garbage" if m.name == "s03__t00013.tx" else data))
    with tarfile.open(src, "w") as tf:
        for m, data in members:
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    return out


def test_damaged_shards_are_skipped_and_counted(damaged):
    """The reader's own damage handling (manifest checksums off: they would refuse these shards whole)."""
    loader = make_loader(damaged, num_workers=0, steps_per_epoch=4, checksums="false")
    with pytest.warns(ShardWarning) as record:
        got = indices(islice(loader, 4))
    messages = " ".join(str(w.message) for w in record)
    assert "shard-00001.tar: unreadable after" in messages and "shard-00002.tar" in messages
    assert "s03__t00013 skipped" in messages
    assert len(got) == 16 and 13 not in got and not set(got) & {8, 9, 10, 11}
    assert set(got) & {4, 5, 6, 7} <= {4, 5}  # only what precedes the truncation
    assert loader.stats.corrupt_shards >= 2 and loader.stats.bad_samples >= 1


def test_damaged_shards_with_two_workers_neither_crash_nor_hang(damaged):
    loader = make_loader(damaged, num_workers=2, steps_per_epoch=5, checksums="false")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ShardWarning)
        batches = list(islice(loader, 10))
    assert len(batches) == 10 and all(len(b["items"]) == 4 for b in batches)
    assert loader.stats.corrupt_shards >= 2 and loader.stats.bad_samples >= 1


def test_a_slot_without_any_readable_shard_stops_with_an_error(tmp_path):
    out = write_shard_set(tmp_path / "bad", n_shards=2, per_shard=2, tile_px=16)
    for name in ("shard-00000.tar", "shard-00001.tar"):
        (out / name).write_bytes(b"\0garbage" * 200)
    loader = make_loader(out, num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ShardWarning)
        with pytest.raises(RuntimeError, match="no readable sample"):
            next(iter(loader))
