"""Untrusted shard sets, second round: one test per class of attack, each stating the limit it enforces,
run through every reader (verify, the training loader, embed, eval targets). Each case either is a
named error ("file: problem") or is skipped and counted; nothing hangs, nothing is written outside the
output folder, and memory stays bounded by the limits named in histotx.format / histotx.shard_reader."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import tarfile
import tracemalloc
import warnings
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from shardkit import tile_sample, write_shard_set

from histotx.config import load_config
from histotx.data.config import DataConfig
from histotx.data.stream import LoaderStats, ShardStream, ShardWarning, StreamLoader, read_shard, shuffle_bounded
from histotx.files import sha256_file
from histotx.format import (
    MAX_FOOTPRINT_UM,
    MAX_TILE_PX,
    MAX_TILE_UM,
    MPP_RANGE,
    FormatError,
    decode_sample,
    encode_sample,
    output_path,
    read_manifest,
)
from histotx.shard_reader import MAX_MEMBER_BYTES, ReadCounts, iter_samples, read_shard_file
from histotx.sharding.verify import verify
from histotx.vocab import Vocab

N_GENES = 50


@contextmanager
def deadline(seconds: int = 20):
    """A hang fails the test instead of stopping the suite."""

    def fail(*_):
        raise TimeoutError(f"still running after {seconds} s: a reader hangs")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def make_set(out: Path, n_shards: int = 2, per_shard: int = 3) -> Path:
    write_shard_set(out, n_shards=n_shards, per_shard=per_shard, tile_px=16)
    vocab = Vocab()
    vocab.extend((f"G{i}", "") for i in range(N_GENES))
    vocab.save(out / "vocab.tsv")
    return out


def edit_manifest(out: Path, fn) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    fn(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))


def replace_shard(out: Path, name: str, data: bytes, reseal: bool = True) -> None:
    """Put ``data`` in place of shard ``name``; ``reseal``: the manifest's size and checksum follow (a set
    made by someone else, consistent, so the readers' own policy is what is tested)."""
    (out / name).write_bytes(data)
    if reseal:

        def fix(m):
            entry = next(e for e in m["shards"] if e["name"] == name)
            entry["bytes"], entry["sha256"] = len(data), sha256_file(out / name)

        edit_manifest(out, fix)


def tar_of(members: list[tuple[tarfile.TarInfo, bytes]], fmt=tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def members_of(out: Path, name: str) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(out / name) as tf:
        return [(m, tf.extractfile(m).read()) for m in tf.getmembers()]


def loader_run(out: Path, batches: int = 2, **stream):
    overrides = [f"stream.shards={out}", "stream.batch_size=1", "stream.shuffle_buffer=2", "stream.num_workers=0"]
    overrides += [f"stream.{k}={v}" for k, v in stream.items()]
    cfg = load_config(DataConfig, overrides=overrides).stream
    loader = StreamLoader(
        ShardStream(cfg, lambda tile, _rng: tile.key, lambda items, _rng: items, rank=0, world_size=1)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ShardWarning)
        try:
            keys = [k for b in islice(loader, batches) for k in b]
        except RuntimeError as exc:  # a slot with nothing readable: a named error
            keys = [f"error: {exc}"]
    return keys, loader.stats, " ".join(str(w.message) for w in caught)


def embed_run(out: Path, dest: Path):
    from test_embed import tiny_model

    from histotx.eval.embed import embed_shards

    return embed_shards(tiny_model(), out, dest, progress=False, image_px=32)


def targets_run(out: Path):
    from histotx.eval.targets import tile_expression

    return tile_expression(out)


# ---------------------------------------------------------------- memory and time that the data decides


def test_tar_bombs_are_refused_before_any_read(tmp_path):
    """Limit: a member is read only when its declared size fits what the file really has left and
    MAX_MEMBER_BYTES (64 MiB); sparse members are skipped; compressed streams are refused. Peak memory of
    reading each bomb stays under 4 MiB whatever the header declares (8 GiB here)."""
    out = make_set(tmp_path / "set")
    good = (out / "shard-00000.tar").read_bytes()
    header = bytearray(good[:512])  # the first member's ustar header, its size set to 8 GiB - 1
    header[124:136] = b"%011o\0" % (8**11 - 1)
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    lying = bytes(header) + good[512:]
    sparse = tarfile.TarInfo("s00__t00000.jpg")
    sparse.type = tarfile.GNUTYPE_SPARSE
    # a GNU sparse header that declares an 8 GiB real size for 512 stored bytes
    hdr = bytearray(sparse.tobuf(tarfile.GNU_FORMAT))
    hdr[124:136] = b"%011o\0" % 512
    hdr[483:495] = b"%011o\0" % (8**11 - 1)  # realsize
    hdr[148:156] = b"        "
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    sparse_bytes = bytes(hdr) + bytes(512) + good
    cases = {
        "lying size": (lying, "declares 8589934591 bytes"),
        "gzip as .tar": (gzip.compress(good * 50), "gzip-compressed"),
        "sparse member": (sparse_bytes, None),
    }
    for name, (data, match) in cases.items():
        counts = ReadCounts()
        tracemalloc.start()
        try:
            if match:
                with pytest.raises(FormatError, match=match):
                    list(iter_samples(io.BytesIO(data), name, len(data), counts))
            else:
                samples = list(iter_samples(io.BytesIO(data), name, len(data), counts))
                assert counts.skipped == {"sparse member": 1} and len(samples) == 3, (name, counts)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 4 << 20, (name, peak)
    # every reader, on a set whose first shard is the lying one (manifest resealed to match)
    replace_shard(out, "shard-00000.tar", lying)
    with deadline():
        problems = verify(out)["problems"]
        assert any("shard-00000.tar: byte 0: a member declares" in p for p in problems), problems
        keys, stats, messages = loader_run(out, batches=3)
        assert stats.corrupt_shards == 1 and len(keys) == 3 and "declares" in messages
        with pytest.raises(FormatError, match="shard-00000.tar"):
            targets_run(out)
        with pytest.raises(FormatError, match="shard-00000.tar"):
            embed_run(out, tmp_path / "emb")
    assert MAX_MEMBER_BYTES == 64 << 20


def test_member_over_the_member_limit_is_skipped_and_counted():
    """Limit: MAX_MEMBER_BYTES per member (read never, stepped over in 1 MiB chunks, counted)."""
    big = tarfile.TarInfo("s00__t00000.jpg")
    data = tar_of([(big, bytes(MAX_MEMBER_BYTES + 1))])
    counts = ReadCounts()
    tracemalloc.start()
    assert list(iter_samples(io.BytesIO(data), "big.tar", len(data), counts)) == []
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert counts.skipped == {f"member over {MAX_MEMBER_BYTES} bytes": 1} and peak < 4 << 20


def _meta_edit(member_json: bytes, **changes) -> bytes:
    return json.dumps({**json.loads(member_json), **changes}).encode()


def test_absurd_metadata_is_refused_at_decode_and_skipped_by_the_loader(tmp_path):
    """Limits: mpp and source_mpp in MPP_RANGE (0.01–100 µm/px), tile_px × mpp ≤ MAX_TILE_UM (4096 µm: the
    token grid of a view is ≤ (4096 / resolution)² cells), footprint ≤ MAX_FOOTPRINT_UM, origins ≤ 1e9.
    mpp 2000 once made the tokeniser allocate 31 GiB; 1e12 ended in an IndexError."""
    out = make_set(tmp_path / "set")
    members = members_of(out, "shard-00000.tar")
    changes = {
        "s00__t00000.json": {"mpp": 2000.0},
        "s00__t00001.json": {"mpp": 1e12},
        "s00__t00002.json": {"origin_um": [1e300, 0.0]},
    }
    edited = [
        (info, _meta_edit(data, **changes[info.name]) if info.name in changes else data) for info, data in members
    ]
    replace_shard(out, "shard-00000.tar", tar_of(edited))
    samples = list(read_shard_file(out / "shard-00000.tar"))
    for raw, match in zip(samples, ["mpp = 2000.0", "mpp = 1000000000000.0", "origin_um"], strict=True):
        with pytest.raises(FormatError, match=f"sample {raw['__key__']}: metadata {match}.*out of the format's range"):
            decode_sample(raw)
    keys, stats, messages = loader_run(out, batches=3)
    assert stats.bad_samples == 3 and len(keys) == 3 and all(k.startswith("s01__") for k in keys)
    assert MPP_RANGE == (0.01, 100.0) and MAX_TILE_UM == 4096.0 and MAX_FOOTPRINT_UM == 1000.0


def test_tile_size_limit_is_what_a_batch_holds_and_the_shuffle_buffer_is_bounded_in_bytes():
    """Limits: a tile is at most MAX_TILE_PX = 2048 px a side (12.6 MB of RGB; a batch of 32 decoded at once
    ≤ 403 MB), and a loader worker's shuffle buffer holds ≤ shuffle_buffer_bytes + one sample of raw bytes."""
    assert MAX_TILE_PX == 2048 and 32 * MAX_TILE_PX**2 * 3 < 420e6
    cfg = DataConfig().stream
    assert cfg.shuffle_buffer_bytes == 256 << 20
    held, peak = set(), 0
    big = ({"__key__": str(i), "jpg": bytes(1 << 20)} for i in range(100))

    def watch(samples):
        nonlocal peak
        for s in samples:
            held.add(s["__key__"])
            peak = max(peak, len(held))
            yield s

    import random

    for s in shuffle_bounded(watch(big), 1000, 8 << 20, random.Random(0)):
        held.discard(s["__key__"])
    assert peak <= 8 + 2  # 8 MiB of 1 MiB samples, + the one read ahead
    # with small samples the order is webdataset's own shuffle
    from webdataset.filters import shuffle

    small = [{"__key__": str(i), "jpg": b"x"} for i in range(50)]
    ours = [s["__key__"] for s in shuffle_bounded(iter(small), 10, 1 << 20, random.Random(3))]
    theirs = [s["__key__"] for s in shuffle(10, 10, rng=random.Random(3))(iter(small))]
    assert ours == theirs


def test_pipes_devices_and_names_outside_the_folder_are_refused_without_hanging(tmp_path):
    """Limit: only regular files named plainly inside the shard folder are opened (non-blocking + fstat)."""
    out = make_set(tmp_path / "set")
    (out / "shard-00001.tar").unlink()
    os.mkfifo(out / "shard-00001.tar")
    with deadline():
        problems = verify(out)["problems"]
        assert any("shard-00001.tar: a named pipe, not a shard file" in p for p in problems), problems
        keys, stats, messages = loader_run(out, batches=3)
        assert stats.corrupt_shards == 1 and "named pipe" in messages and len(keys) == 3
        with pytest.raises(FormatError, match="named pipe"):
            embed_run(out, tmp_path / "emb")
        with pytest.raises(FormatError, match="named pipe"):
            targets_run(out)
        for name in ("/dev/zero", "../shard-00000.tar", "sub/x.tar", "..", "x.tar/../../y.tar"):
            edit_manifest(out, lambda m, name=name: m["shards"][1].update(name=name))
            with pytest.raises(FormatError, match="manifest.json: shards\\[1\\].name .* is not a plain"):
                read_manifest(out)
        edit_manifest(out, lambda m: m["shards"][1].update(name="shard-00001.tar"))
        (out / "manifest.json").unlink()
        os.mkfifo(out / "manifest.json")
        with pytest.raises(FormatError, match="manifest.json: not a regular file"):
            read_manifest(out)


# ---------------------------------------------------------------- names that come from the data


def test_unsafe_tar_members_are_skipped_and_counted_by_every_reader(tmp_path):
    """Policy: links, special files, folders, ``../``, absolute or nested names are skipped and counted;
    the shard's real samples are all read."""
    out = make_set(tmp_path / "set")
    members = members_of(out, "shard-00000.tar")
    extra = []
    for name, kind in [
        ("../s00__t99999.json", tarfile.REGTYPE),
        ("/etc/s00__t99998.json", tarfile.REGTYPE),
        ("sub/s00__t99997.json", tarfile.REGTYPE),
        ("s00__t99996.jpg", tarfile.SYMTYPE),
        ("s00__t99995.jpg", tarfile.LNKTYPE),
        ("s00__t99994.jpg", tarfile.FIFOTYPE),
        ("s00__t99993.jpg", tarfile.CHRTYPE),
        ("s00__t99992", tarfile.DIRTYPE),
    ]:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
        extra.append((info, b"{}" if kind == tarfile.REGTYPE else b""))
    replace_shard(out, "shard-00000.tar", tar_of(extra[:4] + members + extra[4:], fmt=tarfile.GNU_FORMAT))
    counts = ReadCounts()
    assert len(list(read_shard_file(out / "shard-00000.tar", counts))) == 3
    assert counts.skipped_members == 8 and counts.skipped["unsafe or non-flat member name"] == 3
    assert {"symbolic link", "hard link", "FIFO", "character device", "directory"} <= set(counts.skipped)
    with deadline():
        result = verify(out)
        assert any("tar members skipped (1 FIFO" in p for p in result["problems"]) and result["tiles"] == 6
        keys, stats, messages = loader_run(out, batches=6)
        assert stats.skipped_members == 8 and stats.bad_samples == 0 and len(set(keys)) == 6
        assert len(embed_run(out, tmp_path / "emb")) == 2
        assert set(targets_run(out)) == {"s00", "s01"}


def test_duplicate_member_in_a_sample_skips_that_sample_only(tmp_path):
    out = make_set(tmp_path / "set", n_shards=2, per_shard=4)
    members = members_of(out, "shard-00000.tar")
    dup = [(m, d) for m, d in members if m.name == "s00__t00001.json"]
    i = next(i for i, (m, _) in enumerate(members) if m.name == "s00__t00001.json")
    replace_shard(out, "shard-00000.tar", tar_of(members[: i + 1] + dup + members[i + 1 :]))
    samples = list(read_shard_file(out / "shard-00000.tar"))
    assert len(samples) == 4
    with pytest.raises(FormatError, match="sample s00__t00001: member s00__t00001.json appears twice"):
        decode_sample(samples[1])
    keys, stats, _ = loader_run(out, batches=7)
    assert stats.bad_samples == 1 and len(set(keys)) == 7 and "s00__t00003" in keys
    assert any("appears twice" in p for p in verify(out)["problems"])


def test_sample_ids_from_data_cannot_name_paths_outside_the_output(tmp_path):
    """Limit: a sample id is [A-Za-z0-9_-] (≤ 200 chars), checked in the manifest, in each tile's metadata,
    and again where a file is named (output_path), so embed and shard qc write only inside --out."""
    for bad in ("../evil", "/tmp/evil", "a/b", "..", "", "a.b"):
        with pytest.raises(FormatError):
            output_path(tmp_path, bad, ".h5ad")
    assert output_path(tmp_path, "s01", ".h5ad") == tmp_path / "s01.h5ad"
    out = make_set(tmp_path / "set")
    edit_manifest(out, lambda m: m["samples"].update({"../../evil": {"status": "ok", "tiles": 1}}))
    with pytest.raises(FormatError, match="manifest.json: sample id '../../evil' is not allowed"):
        read_manifest(out)
    rng = np.random.default_rng(0)
    tile = tile_sample(rng, "s00", 0, 16)
    raw = encode_sample(tile)
    raw["json"] = _meta_edit(raw["json"], sample="../../evil")
    with pytest.raises(FormatError, match="metadata sample id '../../evil' is not allowed"):
        decode_sample(raw)
    raw = encode_sample(tile)
    raw["json"] = _meta_edit(raw["json"], sample="s01")
    with pytest.raises(FormatError, match="key does not start with its metadata's sample id 's01'"):
        decode_sample(raw)


def test_tile_of_a_sample_not_in_the_manifest_is_a_named_error(tmp_path):
    out = make_set(tmp_path / "set")
    edit_manifest(out, lambda m: m["samples"].pop("s01"))
    with pytest.raises(FormatError, match="shard-00001.tar: tile s01__t00003: sample 's01' is not in the"):
        embed_run(out, tmp_path / "emb")
    with pytest.raises(FormatError, match="shard-00001.tar: tile s01__t00003: sample 's01' is not in the"):
        targets_run(out)
    assert not list((tmp_path / "emb").glob("*.h5ad")) if (tmp_path / "emb").exists() else True


# ---------------------------------------------------------------- integrity and clear errors


def test_loader_checks_manifest_checksums_once_and_agrees_with_verify(tmp_path):
    out = make_set(tmp_path / "set", n_shards=3)
    data = bytearray((out / "shard-00001.tar").read_bytes())
    data[600] ^= 0xFF  # inside the first member's data: same size, different bytes
    (out / "shard-00001.tar").write_bytes(bytes(data))
    problems = verify(out)["problems"]
    refused = [p for p in problems if "sha256 differs from the manifest" in p]
    assert refused and "shard-00001.tar" in refused[0]
    keys, stats, messages = loader_run(out, batches=6)
    assert refused[0] in messages and stats.corrupt_shards >= 1
    assert not any(k.startswith("s01__") for k in keys)
    # checked once per shard and process: later epochs reuse the verdict
    cfg = load_config(DataConfig, overrides=[f"stream.shards={out}", "stream.num_workers=0"]).stream
    ds = ShardStream(cfg, lambda t, _r: t, lambda i, _r: i)
    calls = []
    import histotx.data.stream as stream_mod

    real = stream_mod.check_shard_file
    stream_mod.check_shard_file = lambda *a, **k: calls.append(a[0]) or real(*a, **k)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ShardWarning)
            for _ in range(3):
                for url in ds.urls:
                    list(ds._read_checked(url, LoaderStats()))
    finally:
        stream_mod.check_shard_file = real
    assert sorted(calls) == sorted(ds.urls)
    # the stated opt-out streams it (and the reader's own checks still apply)
    keys, stats, _ = loader_run(out, batches=9, checksums="false")
    assert stats.corrupt_shards == 0


MANIFEST_CASES = {
    "nested": (lambda _m: b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    "not UTF-8": (lambda _m: b'{"format": "\xff"}', "not valid JSON"),
    "truncated": (lambda m: json.dumps(m).encode()[:-40], "not valid JSON"),
    "no totals": (lambda m: m.pop("totals"), "totals is missing"),
    "no name": (lambda m: m["shards"][0].pop("name"), r"shards\[0\].name None"),
    "shards a dict": (lambda m: m.update(shards={"a": 1}), "shards must be a list, got dict"),
    "shard a string": (lambda m: m["shards"].__setitem__(0, "x.tar"), r"shards\[0\] must be an object"),
    "NaN count": (lambda _m: b'{"format": "histotx-shards", "version": 1, "n": NaN}', "non-finite number NaN"),
    "float count": (lambda m: m["shards"][0].update(samples=3.0), "samples must be a non-negative integer"),
    "negative bytes": (lambda m: m["shards"][0].update(bytes=-1), "bytes must be a non-negative integer"),
    "bad sha": (lambda m: m["shards"][0].update(sha256="zz"), "sha256 must be 64"),
    "samples a list": (lambda m: m.update(samples=[]), "samples must be an object"),
    "vocab a path": (lambda m: m.update(vocab="../../etc/passwd"), "vocab '../../etc/passwd' is not a plain"),
    "config tile_px huge": (
        lambda m: m["config"].update(tile_px=10**9),
        r"config.tile_px must be an integer in \[1, 2048\]",
    ),
    "tile_mpp absurd": (lambda m: m["samples"]["s00"].update(tile_mpp=2000.0), "samples.s00.tile_mpp must be"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_manifest_problems_are_named(tmp_path, case):
    out = make_set(tmp_path / "set")
    edit, match = MANIFEST_CASES[case]
    manifest = json.loads((out / "manifest.json").read_text())
    result = edit(manifest)
    (out / "manifest.json").write_bytes(result if isinstance(result, bytes) else json.dumps(manifest).encode())
    with pytest.raises(FormatError, match=match) as info:
        read_manifest(out)
    assert str(info.value).startswith(str(out / "manifest.json"))


VOCAB_CASES = {
    "non-integer index": (b"index\tsymbol\tensembl_id\nx\tA\t\n", ":2: expected '0<TAB>symbol"),
    "not UTF-8": (b"index\tsymbol\tensembl_id\n0\t\xff\t\n", "not UTF-8"),
    "duplicate symbol": (b"index\tsymbol\tensembl_id\n0\tA\t\n1\tA\t\n", ":3: gene A is listed twice"),
    "duplicate ensembl": (
        b"index\tsymbol\tensembl_id\n0\tA\tENSG00000000001\n1\tB\tENSG00000000001.2\n",
        ":3: Ensembl id ENSG00000000001.2 is listed twice",
    ),
    "empty gene": (b"index\tsymbol\tensembl_id\n0\t\t\n", "neither a symbol nor an Ensembl id"),
    "bad header": (b"gene\n", "not a HistoTx vocabulary"),
}


@pytest.mark.parametrize("case", sorted(VOCAB_CASES))
def test_vocab_problems_are_named(tmp_path, case):
    data, match = VOCAB_CASES[case]
    (tmp_path / "vocab.tsv").write_bytes(data)
    with pytest.raises(FormatError, match=match) as info:
        Vocab.load(tmp_path / "vocab.tsv")
    assert str(info.value).startswith(str(tmp_path / "vocab.tsv"))


def test_too_few_genes_names_the_vocabulary_and_the_tile(tmp_path):
    out = make_set(tmp_path / "set")
    vocab = Vocab()
    vocab.extend((f"G{i}", "") for i in range(5))
    vocab.save(out / "vocab.tsv")
    keys, stats, messages = loader_run(out, batches=1, max_consecutive_bad_samples=100)
    assert "vocab.tsv: 5 genes" in messages and "sample s0" in messages and "shard-0000" in messages
    assert any("beyond the vocabulary (5)" in p and "shard-0000" in p for p in verify(out)["problems"])
    with pytest.raises(FormatError, match=r"shard-00000.tar: tile s00__t00000: gene id \d+ is outside"):
        from test_embed import tiny_model

        from histotx.eval.embed import embed_shards

        embed_shards(tiny_model(), out, tmp_path / "emb", modes=["fused"], progress=False, image_px=32)


def test_read_shard_keeps_its_signature_for_callers(tmp_path):
    out = make_set(tmp_path / "set")
    stats = LoaderStats()
    assert len(list(read_shard(str(out / "shard-00000.tar"), stats))) == 3 and stats.shards_read == 1


def test_qc_refuses_a_slide_path_that_is_a_pipe_and_writes_only_in_its_folder(tmp_path):
    """shard qc opens the slide the manifest names: a pipe or device is refused by stat, before any open."""
    from histotx.sharding.qc import write_overview, write_qc

    out = make_set(tmp_path / "set")
    os.mkfifo(tmp_path / "slide.svs")
    edit_manifest(out, lambda m: m["samples"]["s00"].update(slide=str(tmp_path / "slide.svs"), slide_mpp=0.5))
    with deadline(), pytest.raises(FormatError, match=r"samples.s00.slide .* is not a file or folder"):
        write_overview(out, read_manifest(out), "s00", tmp_path / "qc")
    edit_manifest(out, lambda m: [e.update(sample_id=f"s{i:02d}") for i, e in enumerate(m["shards"])])
    written = write_qc(out, tmp_path / "qc")
    assert sorted(p.name for p in written) == ["s00.png", "s01.png"]
    assert all(p.parent == tmp_path / "qc" for p in written)
