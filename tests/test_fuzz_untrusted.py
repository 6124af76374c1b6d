"""Seeded fuzz of the untrusted inputs of a shard set beyond its members (tests/test_format_untrusted.py fuzzes
those): the tar stream, manifest.json, vocab.tsv and each sample's metadata, 5,000 cases each. Every case
ends in a FormatError (named), a skip that is counted, or a valid result that the next stage consumes
within bounds (tokens of a whole-tile view; file names that stay in the output folder)."""

from __future__ import annotations

import io
import json
import math
import resource
import time
from pathlib import Path

import numpy as np
import pytest
from shardkit import write_shard_set

from histotx.config import load_config
from histotx.data.augment import MultiCrop
from histotx.data.collate import SSLCollate
from histotx.data.config import DataConfig
from histotx.format import MAX_TILE_UM, FormatError, decode_sample, output_path, parse_manifest
from histotx.shard_reader import ReadCounts, iter_samples, shard_path
from histotx.tokens import bin_grid
from histotx.vocab import Vocab

FUZZ_CASES = 5000
_ODD = [0, -1, 1, 7, 2000.0, 1e12, 1e-300, 1e300, -0.0, 8192, 1 << 40, 10**30, True, None, "", "../x", "/abs", "s00"]
_ODD += [[], [1], [1e300, 0], {}, {"a": 1}, "x" * 300]


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> Path:
    out = write_shard_set(tmp_path_factory.mktemp("fuzz"), n_shards=2, per_shard=3, tile_px=16)
    vocab = Vocab()
    vocab.extend((f"G{i}", f"ENSG{i:011d}" if i % 3 else "") for i in range(50))
    vocab.save(out / "vocab.tsv")
    return out


def _report(capsys, what: str, outcome: dict, t0: float, rss0: int) -> None:
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    wall = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\n{what} fuzz: {FUZZ_CASES} cases, {outcome}, {wall:.1f} s; max RSS grew {grew:.0f} MB")
    assert sum(outcome.values()) >= FUZZ_CASES and grew < 200


def _count(outcome: dict, key: str, n: int = 1) -> None:
    outcome[key] = outcome.get(key, 0) + n


# ---------------------------------------------------------------- the tar stream


def _set_field(data: bytearray, header: int, start: int, value: bytes) -> None:
    """Write a header field and re-seal the header's checksum, so the parser reads past it."""
    field = data[header + start : header + start + len(value)]
    if len(field) < len(value):
        return
    data[header + start : header + start + len(value)] = value
    data[header + 148 : header + 156] = b"        "
    data[header + 148 : header + 156] = b"%06o\0 " % sum(data[header : header + 512])


def _headers(data: bytes) -> list[int]:
    """Offsets of the member headers of a well-formed tar."""
    out, pos = [], 0
    while pos + 512 <= len(data) and data[pos : pos + 512] != bytes(512):
        out.append(pos)
        size = int(data[pos + 124 : pos + 135].strip(b"\0 ") or b"0", 8)
        pos += 512 + -(-size // 512) * 512
    return out


def _edit_header(rng: np.random.Generator, data: bytearray, h: int, op: int) -> None:
    if op == 0:  # the size field: 0, small, exact, more than the file, the largest octal
        size = int(rng.choice([0, 1, 511, 512, 4096, len(data), len(data) * 4, 8**11 - 1]))
        _set_field(data, h, 124, b"%011o\0" % size)
    elif op == 1:  # the type: links, devices, FIFOs, folders, sparse, PAX, GNU long names, unknown
        _set_field(data, h, 156, bytes([int(rng.choice(list(b"0123456789xgLKSA\0")))]))
    elif op == 2:  # the name: unsafe, nested, absolute, empty, not UTF-8, duplicated key
        names = [b"../s00__t0.json", b"/etc/passwd", b"a/b.jpg", b"", b"\xff\xfe.json", b"s00__t00000.json", b"x"]
        _set_field(data, h, 0, names[int(rng.integers(len(names)))].ljust(100, b"\0"))
    else:  # a ustar prefix
        _set_field(data, h, 345, b"..".ljust(155, b"\0"))


_EXTENDED = [b"30 path=../../etc/passwd\n", b"22 size=99999999999\n", b"9 x\n", b"20 GNU.sparse.map=1\n"]
_MAGIC = [b"\x1f\x8b\x08\x00\x00\x00", b"BZh91A", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd\x00\x00"]


def _mutate_tar(rng: np.random.Generator, base: bytes, heads: list[int]) -> bytes:
    data = bytearray(base)
    for _ in range(int(rng.integers(1, 4))):
        h = heads[int(rng.integers(len(heads)))]
        op = int(rng.integers(0, 9))
        if op < 4:
            _edit_header(rng, data, h, op)
        elif op == 4:
            data = data[: int(rng.integers(0, len(data)))]
        elif op == 5:
            for _ in range(int(rng.integers(1, 8))):
                data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        elif op == 6:  # an extended header before a member: PAX records or a GNU long name
            body = _EXTENDED[int(rng.integers(len(_EXTENDED)))]
            ext = bytearray(bytes(512))
            ext[0:9] = b"././@PaxH"
            ext[156:157] = bytes([int(rng.choice(list(b"xL")))])
            _set_field(ext, 0, 124, b"%011o\0" % len(body))
            data[h:h] = bytes(ext) + body.ljust(-(-len(body) // 512) * 512, b"\0")
        elif op == 7:  # a member's bytes repeated (duplicate extension in a sample, non-adjacent keys)
            a, b = sorted(int(x) for x in rng.choice(heads, 2))
            if b > a:
                data[b:b] = base[a:b]
        else:  # a compressed stream's magic
            data[0:6] = _MAGIC[int(rng.integers(len(_MAGIC)))]
    return bytes(data)


def test_fuzzed_tar_streams_give_format_errors_or_counted_skips(shard_set, capsys):
    base = (shard_set / "shard-00000.tar").read_bytes()
    heads = _headers(base)
    rng = np.random.default_rng(11)
    outcome: dict[str, int] = {}
    rss0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    for case in range(FUZZ_CASES):
        data = _mutate_tar(rng, base, heads)
        counts = ReadCounts()
        try:
            samples = list(iter_samples(io.BytesIO(data), "fuzz.tar", len(data), counts))
            _count(outcome, "read")
        except FormatError:
            _count(outcome, "shard_format_error")
            continue
        except Exception as exc:  # noqa: BLE001 — the assertion names the case
            raise AssertionError(f"case {case}: {type(exc).__name__}: {exc}") from exc
        _count(outcome, "members_skipped", counts.skipped_members)
        for raw in samples:
            assert all(len(v) <= len(data) for v in raw.values() if isinstance(v, bytes)), case
            try:
                decode_sample(raw)
                _count(outcome, "valid_samples")
            except FormatError:
                _count(outcome, "sample_format_error")
            except Exception as exc:  # noqa: BLE001
                raise AssertionError(f"case {case}: sample {raw.get('__key__')}: {type(exc).__name__}: {exc}") from exc
    _report(capsys, "tar", {k: v for k, v in outcome.items() if k in ("read", "shard_format_error")}, t0, rss0)
    assert outcome["shard_format_error"] > 500 and outcome["members_skipped"] > 500 and outcome["valid_samples"] > 500


# ---------------------------------------------------------------- manifest.json


def _paths(obj, prefix=()):
    """Every (path, value) of a JSON document, to a depth of 6."""
    yield prefix, obj
    if len(prefix) >= 6:
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _mutate_json(rng: np.random.Generator, doc: dict) -> bytes:
    doc = json.loads(json.dumps(doc))
    for _ in range(int(rng.integers(1, 4))):
        paths = [p for p, _ in _paths(doc) if p]
        path = paths[int(rng.integers(len(paths)))]
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        op = int(rng.integers(0, 4))
        if op == 0:
            parent[path[-1]] = _ODD[int(rng.integers(len(_ODD)))]
        elif op == 1 and isinstance(parent, dict):
            del parent[path[-1]]
        elif op == 2 and isinstance(parent, dict):
            parent[rng.choice(["../../evil", "a.b", "", "s99", "x" * 300])] = parent.pop(path[-1])
        else:
            parent[path[-1]] = json.loads("[" * 50 + "]" * 50)
    text = json.dumps(doc).encode()
    r = rng.random()
    if r < 0.1:
        text = text[: int(rng.integers(0, len(text)))]
    elif r < 0.2:
        i = int(rng.integers(0, len(text)))
        text = text[:i] + rng.choice([b"\xff", b"NaN", b"Infinity", b"[" * 100_000, b"\x00"]) + text[i:]
    return text


def test_fuzzed_manifests_give_format_errors_or_names_inside_the_folder(shard_set, tmp_path, capsys):
    doc = json.loads((shard_set / "manifest.json").read_text())
    rng = np.random.default_rng(12)
    outcome: dict[str, int] = {}
    rss0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    for case in range(FUZZ_CASES):
        data = _mutate_json(rng, doc)
        try:
            manifest = parse_manifest(data, "fuzz/manifest.json")
        except FormatError as exc:
            assert str(exc).startswith("fuzz/manifest.json"), (case, str(exc))
            _count(outcome, "format_error")
            continue
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(f"case {case}: {type(exc).__name__}: {exc}\n{data[:400]!r}") from exc
        _count(outcome, "valid")
        for entry in manifest["shards"]:  # every name a reader or writer takes from it stays in its folder
            assert shard_path(tmp_path, entry["name"]).parent == tmp_path
            int(entry["bytes"]) + int(entry["samples"]) + int(manifest["totals"]["tiles"])
        for sid in manifest["samples"]:
            assert output_path(tmp_path, sid, ".h5ad").parent == tmp_path
        assert "/" not in manifest["vocab"]
    _report(capsys, "manifest", outcome, t0, rss0)
    assert outcome["format_error"] > 1000 and outcome["valid"] > 100


# ---------------------------------------------------------------- vocab.tsv


def _mutate_vocab(rng: np.random.Generator, text: bytes) -> bytes:
    lines = text.split(b"\n")
    for _ in range(int(rng.integers(1, 4))):
        lines = lines or [b""]
        i = int(rng.integers(0, len(lines)))
        op = int(rng.integers(0, 7))
        if op == 0:
            lines.insert(i, lines[int(rng.integers(0, len(lines)))])  # a duplicate gene (or header)
        elif op == 1:
            del lines[i]
        elif op == 2:
            lines[i] = lines[i].replace(b"\t", b"", 1)
        elif op == 3:
            lines[i] = rng.choice([b"x\tA\t", b"-1\tA\t", b"1e3\tB\t", b"\xff\xfe", b"0\t\t", b"\t\t\t", b"1 \tA\t"])
        elif op == 4:
            lines[i], lines[-1] = lines[-1], lines[i]
        elif op == 5 and lines[i]:
            b = bytearray(lines[i])
            b[int(rng.integers(len(b)))] = int(rng.integers(0, 256))
            lines[i] = bytes(b)
        else:
            lines = lines[:i]
    return b"\n".join(lines)


def test_fuzzed_vocabularies_give_format_errors_or_a_consistent_vocabulary(shard_set, capsys):
    text = (shard_set / "vocab.tsv").read_bytes()
    rng = np.random.default_rng(13)
    outcome: dict[str, int] = {}
    rss0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    for case in range(FUZZ_CASES):
        data = _mutate_vocab(rng, text)
        try:
            vocab = Vocab.from_bytes(data, "fuzz/vocab.tsv")
        except FormatError as exc:
            assert str(exc).startswith("fuzz/vocab.tsv"), (case, str(exc))
            _count(outcome, "format_error")
            continue
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(f"case {case}: {type(exc).__name__}: {exc}\n{data[:400]!r}") from exc
        _count(outcome, "valid")
        assert all(vocab.name(i) for i in range(len(vocab)))
        keys = [e.split(".")[0] for e in vocab.ensembl if e]
        assert len(keys) == len(set(keys)), case
    _report(capsys, "vocab", outcome, t0, rss0)
    assert outcome["format_error"] > 1000 and outcome["valid"] > 100


# ---------------------------------------------------------------- sample metadata


def test_fuzzed_metadata_gives_format_errors_or_bounded_tokens(shard_set, tmp_path, capsys):
    """Valid metadata is consumed as the loader consumes it: every valid case's grid is tokenised for a
    whole-tile view at native resolution and at 2 µm (the bound: ≤ (MAX_TILE_UM / 2)² cells), and every
    50th valid case goes through the training transform and collation with small crops."""
    with open(shard_set / "shard-00000.tar", "rb") as fh:
        members = list(iter_samples(fh, "s", None))
    cfg = load_config(
        DataConfig,
        overrides=["augment.global_crop_size=32", "augment.local_crop_size=16", "augment.local_crops_number=2"],
    )
    cfg.mask.patch_size = 8
    transform, collate = MultiCrop(cfg.augment), SSLCollate(cfg)
    rng = np.random.default_rng(14)
    outcome: dict[str, int] = {}
    rss0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    for case in range(FUZZ_CASES):
        raw = dict(members[int(rng.integers(len(members)))])
        meta = json.loads(raw["json"])
        for _ in range(int(rng.integers(1, 4))):
            key = list(meta)[int(rng.integers(len(meta)))]
            op = int(rng.integers(0, 3))
            if op == 0:
                meta[key] = _ODD[int(rng.integers(len(_ODD)))]
            elif op == 1:
                meta.pop(key)
            else:
                meta[key] = float(rng.choice([0.01, 0.5, 16.0, 100.0, 256.0, 2000.0])) if key.endswith("mpp") else 16
        text = json.dumps(meta).encode()
        if rng.random() < 0.05:
            i = int(rng.integers(0, len(text)))
            text = text[:i] + rng.choice([b"NaN", b"\xff", b"1e999", b"}"]) + text[i:]
        raw["json"] = text
        try:
            tile = decode_sample(raw)
        except FormatError:
            _count(outcome, "format_error")
            continue
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(f"case {case}: {type(exc).__name__}: {exc}\n{text!r}") from exc
        _count(outcome, "valid")
        assert output_path(tmp_path, tile.meta["sample"], ".h5ad").parent == tmp_path
        px, mpp = int(tile.meta["tile_px"]), float(tile.meta["mpp"])
        view_mpp = mpp * px / 32  # the whole tile shown at the global crop size
        native = bin_grid(tile.grid, view_mpp, None, (32, 32))
        assert native.n_cells <= tile.grid.n_sites
        cells = bin_grid(tile.grid, view_mpp, 2.0, (32, 32))  # ≤ (MAX_TILE_UM / 2 µm)² cells
        assert cells.n_cells <= math.ceil(px * mpp / 2.0) ** 2 <= (MAX_TILE_UM / 2) ** 2
        if outcome["valid"] % 50 == 1:
            item = transform(tile, np.random.default_rng(case))
            collate([item], np.random.default_rng(case))
    _report(capsys, "metadata", outcome, t0, rss0)
    assert outcome["format_error"] > 1000 and outcome["valid"] > 100
