"""Shards are untrusted input: every malformed member is a FormatError (never another exception, never
pickle), decoding allocates a bounded multiple of the member's size, and a seeded fuzz of real shard
members yields only FormatError or a valid sample. The training stream skips and counts such samples."""

from __future__ import annotations

import io
import json
import pickle
import resource
import struct
import time
import tracemalloc
import warnings
import zlib
from collections import Counter
from itertools import islice

import numcodecs
import numpy as np
import pytest
import webdataset as wds
import yaml
from PIL import Image

from histotx.files import sha256_file
from histotx.format import (
    EXPANSION_FLOOR,
    MAX_EXPANSION,
    MAX_TILE_PX,
    FormatError,
    TranscriptGrid,
    decode_grid,
    decode_image_rgb,
    decode_sample,
    encode_grid,
    new_manifest,
    read_manifest,
    write_manifest,
)
from histotx.sharding.config import ShardConfig
from histotx.sharding.pipeline import run_cohort
from histotx.sharding.verify import iter_shard

FUZZ_CASES = 5000


@pytest.fixture(scope="module")
def real_members(shared_data, tmp_path_factory):
    """Raw members of every tile `histotx shard` writes for the real Visium sample (JPEG + spot grids)."""
    root = tmp_path_factory.mktemp("real")
    outs = shared_data / "scanpy-visium/visium_data/1.0.0"
    (root / "cohort.yaml").write_text(
        yaml.safe_dump(
            {
                "samples": [
                    {
                        "id": "v1",
                        "technology": "visium",
                        "image_scale": "lowres",
                        "data": str(outs),
                        "slide": str(outs / "spatial/tissue_lowres_image.png"),
                    }
                ]
            }
        )
    )
    manifest = run_cohort(root / "cohort.yaml", root / "out", ShardConfig(mpp=16, tile_px=32, mask_mpp=16))
    assert manifest["samples"]["v1"]["status"] == "ok"
    members = [dict(m) for e in manifest["shards"] for m in iter_shard(root / "out" / e["name"])]
    assert len(members) > 50 and sum(decode_sample(m).grid.n_sites for m in members) > 50
    return members


def _header(blob: bytes) -> tuple[dict, bytes]:
    (hlen,) = struct.unpack("<I", blob[4:8])
    return json.loads(blob[8 : 8 + hlen]), blob[8 + hlen :]


def _with_header(header: dict, payload: bytes) -> bytes:
    head = json.dumps(header).encode()
    return b"HTXG" + struct.pack("<I", len(head)) + head + payload


def _grid(n=30, seed=0) -> TranscriptGrid:
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 5, n)
    offsets = np.concatenate([[0], np.cumsum(per)])
    return TranscriptGrid(
        rng.uniform(0, 64, (n, 2)),
        offsets,
        rng.integers(0, 300, offsets[-1]),
        rng.integers(1, 9, offsets[-1]).astype(np.float32),
        55.0,
        "disk",
    )


@pytest.mark.parametrize(
    "codec",
    [
        numcodecs.Blosc(cname="zstd"),
        numcodecs.Blosc(cname="lz4"),
        numcodecs.Zstd(),
        numcodecs.LZ4(),
        numcodecs.Zlib(level=6),
    ],
    ids=lambda c: c.codec_id,
)
def test_every_allowed_codec_round_trips(codec):
    g = _grid()
    h = decode_grid(encode_grid(g, codec))
    np.testing.assert_array_equal(h.gene, g.gene)
    np.testing.assert_array_equal(h.xy, g.xy)


def test_pickle_codec_is_refused_before_anything_is_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    header, _ = _header(encode_grid(_grid()))
    payload = pickle.dumps(Boom())
    header["codec"] = {"id": "pickle", "protocol": 5}
    for spec in header["arrays"].values():
        spec["nbytes"] = 0
    header["arrays"]["xy"]["nbytes"] = len(payload)
    with pytest.raises(FormatError, match="codec pickle is not allowed"):
        decode_grid(_with_header(header, payload))
    assert not (tmp_path / "pwned").exists()
    assert tuple(int(v) for v in numcodecs.__version__.split(".")[:3]) >= (0, 16, 6)  # pickle refuses by default


def _edit(**changes):
    """A grid blob whose header (or arrays[name]) has the given edits."""
    header, payload = _header(encode_grid(_grid()))
    for k, v in changes.items():
        if k in header["arrays"]:
            header["arrays"][k].update(v)
        else:
            header[k] = v
    return _with_header(header, payload)


MALFORMED_GRIDS = {
    "shape disagrees with nbytes": (_edit(gene={"shape": [7]}), "announces"),
    "negative size": (_edit(count={"nbytes": -4}), "nbytes must be an integer"),
    "absurd shape": (_edit(xy={"shape": [1 << 38, 2]}), "decompression bomb"),
    "3-d shape": (_edit(xy={"shape": [30, 2, 1]}), "2-d shape"),
    "float shape": (_edit(gene={"shape": [3.5]}), "shape must be an integer"),
    "wrong dtype": (_edit(gene={"dtype": "<f8"}), "dtype"),
    "unknown codec": (_edit(codec={"id": "bz2"}), "not allowed"),
    "codec not a dict": (_edit(codec="blosc"), "not allowed"),
    "missing array": (_edit(arrays={}), "missing from the header"),
    "wrong version": (_edit(version=99), "version"),
    "NaN footprint": (_edit(footprint_um=float("nan")), "valid JSON|footprint"),
    "footprint shape": (_edit(footprint_shape="hexagon"), "footprint_shape"),
    "truncated payload": (encode_grid(_grid())[:-9], "truncated"),
    "trailing bytes": (encode_grid(_grid()) + b"\0\0", "after its last array"),
    "bad JSON": (b"HTXG" + struct.pack("<I", 5) + b"{nope", "not valid JSON"),
    "bad UTF-8": (b"HTXG" + struct.pack("<I", 3) + b'"\xff"', "not valid JSON"),
    "deep JSON": (b"HTXG" + struct.pack("<I", 60000) + b"[" * 60000, "not valid JSON"),
    "header past the end": (b"HTXG" + struct.pack("<I", 1 << 30) + b"{}", "does not fit"),
    "JSON not an object": (b"HTXG" + struct.pack("<I", 2) + b"[]", "must be a JSON object"),
    "bad magic": (b"PK\x03\x04" + b"\0" * 40, "bad magic"),
    "empty": (b"", "bad magic"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_GRIDS))
def test_malformed_grid_is_a_format_error(case):
    blob, match = MALFORMED_GRIDS[case]
    with pytest.raises(FormatError, match=match):
        decode_grid(blob)


@pytest.mark.parametrize("codec", ["blosc", "zlib", "zstd", "lz4"])
def test_decompression_bombs_are_refused_before_allocating(codec):
    """64 MiB of zeros compressed to a few KiB, announced honestly in the header: over the expansion bound."""
    n = 1 << 24  # float32 → 64 MiB
    c = {
        "blosc": numcodecs.Blosc(cname="zstd", clevel=9),
        "zlib": numcodecs.Zlib(level=9),
        "zstd": numcodecs.Zstd(),
        "lz4": numcodecs.LZ4(),
    }[codec]
    header, _ = _header(encode_grid(TranscriptGrid.empty(), c))
    payload = bytes(c.encode(np.zeros(n, np.float32)))
    assert 64 * len(payload) + EXPANSION_FLOOR < 4 * n  # a bomb by our own definition
    header["arrays"]["count"] = {"dtype": "<f4", "shape": [n], "nbytes": len(payload)}
    header["arrays"]["gene"] = {"dtype": "<i4", "shape": [0], "nbytes": 0}
    tracemalloc.start()
    with pytest.raises(FormatError, match="decompression bomb"):
        decode_grid(_with_header(header, payload))
    assert tracemalloc.get_traced_memory()[1] < 1 << 20
    tracemalloc.stop()
    # Lying about the shape (small) does not help: the stream's own size must match it exactly.
    header["arrays"]["count"]["shape"] = [16]
    with pytest.raises(FormatError):
        decode_grid(_with_header(header, payload))


def _png(w, h) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (255, 255, 255)).save(buf, format="PNG")
    return buf.getvalue()


def _png_bomb(w, h) -> bytes:
    """A valid PNG header announcing w × h RGB pixels, with a few bytes of (zlib) data: a bomb's shape."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


def test_malformed_sample_members_are_format_errors(real_members):
    good = real_members[0]
    meta = json.loads(good["json"])
    without_jpg = {k: v for k, v in good.items() if k != "jpg"}
    cases = {
        "missing grid": ({k: v for k, v in good.items() if k != "tx"}, "expected an image, .tx and .json"),
        "meta not JSON": ({**good, "json": b"{"}, "not valid JSON"),
        "meta bad UTF-8": ({**good, "json": b'{"sample": "\xc3"}'}, "not valid JSON"),
        "meta NaN": ({**good, "json": json.dumps({**meta, "mpp": float("nan")}).encode()}, "not valid JSON"),
        "meta a list": ({**good, "json": b"[1]"}, "must be a JSON object"),
        "meta wrong type": ({**good, "json": json.dumps({**meta, "tile_px": "32"}).encode()}, "tile_px"),
        "meta lacks a key": (
            {**good, "json": json.dumps({k: v for k, v in meta.items() if k != "mpp"}).encode()},
            "lacks mpp",
        ),
        "image not an image": ({**good, "jpg": b"this is not a JPEG"}, "not a readable jpg"),
        "image wrong size": ({**without_jpg, "png": _png(64, 64)}, "image is 64×64 px, metadata says tile_px 32"),
        "image bomb": ({**without_jpg, "png": _png_bomb(10000, 10000)}, f"beyond the {MAX_TILE_PX}-px bound"),
        "grid garbage": ({**good, "tx": b"HTXG\xff\xff"}, "sample v1__"),
    }
    for members, match in cases.values():
        with pytest.raises(FormatError, match=match):
            decode_sample(members)
    with pytest.raises(FormatError, match="does not decode"):
        decode_image_rgb(good["jpg"][: len(good["jpg"]) // 2])
    with pytest.raises(FormatError, match="not a readable"):
        decode_image_rgb(b"GIF89a" + b"\0" * 100)
    with pytest.raises(FormatError, match=f"beyond the {MAX_TILE_PX}-px bound"):
        decode_image_rgb(_png_bomb(10000, 10000))


def _mutate(rng: np.random.Generator, members: dict) -> dict:
    """One random damage: bit flips, truncation, byte splices, member loss, or a grid header edit."""
    m = {k: v for k, v in members.items() if k != "__url__"}
    target = rng.choice(["tx", "tx", "tx", "json", "jpg"])
    blob = bytearray(m[target])
    kind = rng.integers(0, 6)
    if kind == 0:  # bit flips
        for _ in range(rng.integers(1, 9)):
            i = rng.integers(0, len(blob))
            blob[i] ^= 1 << int(rng.integers(0, 8))
    elif kind == 1:  # truncation
        blob = blob[: rng.integers(0, len(blob))]
    elif kind == 2:  # splice random bytes in
        i = rng.integers(0, len(blob) + 1)
        blob[i:i] = rng.bytes(int(rng.integers(1, 64)))
    elif kind == 3:  # overwrite a run
        i = rng.integers(0, len(blob))
        blob[i : i + 16] = rng.bytes(16)
    elif kind == 4 and target == "tx":  # header edit: one field set to a hostile value
        header, payload = _header(bytes(blob))
        name = rng.choice(["xy", "offsets", "gene", "count"])
        field = rng.choice(["shape", "nbytes", "dtype", "codec", "footprint_um", "version"])
        value = [
            None,
            -1,
            0,
            1 << 40,
            "x",
            [3],
            [1, 2],
            [-5, 2],
            2.5,
            {"id": "pickle"},
            {"id": "zlib"},
            "<f8",
            [1 << 20, 2],
            True,
        ][rng.integers(0, 14)]
        if field in ("shape", "nbytes", "dtype"):
            header["arrays"][name][field] = value
        else:
            header[field] = value
        blob = bytearray(_with_header(header, payload))
    elif kind == 4:  # JSON/image: keep only a prefix of random length plus garbage
        blob = blob[: rng.integers(0, len(blob))] + rng.bytes(8)
    else:  # a member lost
        del m[target]
        return m
    m[target] = bytes(blob)
    return m


def _decode_fully(members: dict) -> str:
    """'valid' for a sample whose grid is valid and whose image decodes to its tile size, else 'format_error'."""
    try:
        tile = decode_sample(members)
        rgb = decode_image_rgb(tile.image)
    except FormatError:
        return "format_error"
    assert rgb.shape == (tile.meta["tile_px"], tile.meta["tile_px"], 3)
    tile.grid.validate()
    return "valid"


def test_fuzzed_real_members_give_format_error_or_a_valid_sample(real_members, capsys):
    """≥ 5,000 seeded mutations of real shard members: only FormatError or a valid sample, in bounded time;
    every 4th case is re-run under tracemalloc, its peak allocation within the format's bound."""
    rng = np.random.default_rng(20261201)
    bases = list(real_members)
    for codec in (numcodecs.Zlib(level=6), numcodecs.Zstd(), numcodecs.LZ4()):  # every allowed codec
        for m in real_members[:10]:
            bases.append({**m, "tx": encode_grid(decode_sample(m).grid, codec)})
    cases = [_mutate(rng, bases[rng.integers(0, len(bases))]) for _ in range(FUZZ_CASES)]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    outcomes = Counter(_decode_fully(m) for m in cases)  # any other exception fails the test
    seconds = time.perf_counter() - t0
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    worst_ratio, peak_overall = 0.0, 0
    tracemalloc.start()
    for members in cases[::4]:
        size = sum(len(v) for v in members.values() if isinstance(v, bytes))
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        _decode_fully(members)
        peak = tracemalloc.get_traced_memory()[1] - base
        peak_overall, worst_ratio = max(peak_overall, peak), max(worst_ratio, peak / size)
        assert peak <= MAX_EXPANSION * size + EXPANSION_FLOOR
    tracemalloc.stop()
    with capsys.disabled():
        print(
            f"\nfuzz: {FUZZ_CASES} cases, {dict(outcomes)}, {seconds:.1f} s; peak traced allocation of a case "
            f"{peak_overall / 1e6:.3f} MB (worst {worst_ratio:.1f}× its members' size, {len(cases[::4])} cases "
            f"traced); process max RSS grew {rss_growth / 1024:.1f} MB"
        )
    assert sum(outcomes.values()) == FUZZ_CASES and outcomes["format_error"] > FUZZ_CASES // 2
    assert seconds < 30


def test_training_stream_skips_and_counts_fuzzed_samples(real_members, tmp_path):
    """A shard whose every other sample is damaged: the loader yields full batches of good samples only and
    counts every damaged one, without stopping."""
    from histotx.config import load_config
    from histotx.data.config import DataConfig
    from histotx.data.stream import ShardStream, ShardWarning, StreamLoader

    rng = np.random.default_rng(7)
    goods, n_bad = real_members[:24], 0
    path = tmp_path / "mixed.tar"
    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
        for i, m in enumerate(goods):
            sink.write({k: v for k, v in m.items() if k != "__url__"})
            while True:  # a damaged copy that decode_sample rejects, under its own key
                bad = _mutate(rng, m)
                try:
                    decode_sample(bad)
                except FormatError:
                    break
            bad["__key__"] = f"v1__bad{i:03d}"
            sink.write(bad)
            n_bad += 1
    write_manifest(
        tmp_path,
        new_manifest(
            {},
            [{"name": path.name, "samples": 2 * len(goods), "bytes": path.stat().st_size, "sha256": sha256_file(path)}],
            {"v1": {"status": "ok", "tiles": 2 * len(goods)}},
        ),
    )
    cfg = load_config(
        DataConfig,
        overrides=[
            f"stream.shards={tmp_path}",
            "stream.batch_size=4",
            "stream.num_workers=0",
            "stream.shuffle_buffer=8",
            "stream.steps_per_epoch=6",
        ],
    ).stream
    loader = StreamLoader(ShardStream(cfg, lambda tile, _rng: tile.key, lambda items, _rng: items))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ShardWarning)
        keys = [k for batch in islice(loader, 6) for k in batch]
    assert sorted(keys) == sorted(m["__key__"] for m in goods)
    assert loader.stats.bad_samples == n_bad and loader.stats.corrupt_shards == 0
    assert read_manifest(tmp_path)["totals"]["tiles"] == 48

    # A well-formed sample whose gene ids lie beyond the vocabulary would index past the model's gene
    # table: skipped and counted too.
    genes = max(int(decode_sample(m).grid.gene.max(initial=0)) for m in goods)
    (tmp_path / "vocab.tsv").write_text(
        "index\tsymbol\tensembl_id\n"  # one gene short of the largest id
        + "".join(f"{i}\tG{i}\t\n" for i in range(genes))
    )
    loader = StreamLoader(ShardStream(cfg, lambda tile, _rng: tile.key, lambda items, _rng: items))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ShardWarning)
        list(islice(loader, 6))
    assert loader.stats.bad_samples > n_bad and any(
        "beyond the shard set's vocabulary" in str(w.message) for w in caught
    )
