"""Re-read a shard set end to end: checksums, schema, counts, key uniqueness, positions, vocabulary ids."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from histotx.format import FormatError, TileSample, decode_image_rgb, decode_sample, read_manifest
from histotx.shard_reader import ReadCounts, check_shard_file, read_shard_file, shard_path
from histotx.vocab import Vocab


def iter_shard(path: Path, counts: ReadCounts | None = None) -> Iterator[dict[str, Any]]:
    """Raw members of each sample of one shard (bytes; nothing decoded, nothing unpickled), read by
    :mod:`histotx.shard_reader` as the training loader reads them (no torch, no webdataset). A damaged tar
    raises FormatError; members that are not plain regular files are skipped and counted in ``counts``."""
    yield from read_shard_file(path, counts)


def check_tile(sample: TileSample, vocab_size: int) -> list[str]:
    problems = []
    meta, grid = sample.meta, sample.grid
    rgb = decode_image_rgb(sample.image)
    if rgb.shape != (meta["tile_px"], meta["tile_px"], 3):
        problems.append(f"image is {rgb.shape}, metadata says {meta['tile_px']} px")
    if grid.n_sites and (grid.xy.min() < 0 or grid.xy.max() >= meta["tile_px"]):
        problems.append("a site lies outside the tile")
    if grid.gene.size and grid.gene.max() >= vocab_size:
        problems.append(f"gene id {int(grid.gene.max())} beyond the vocabulary ({vocab_size})")
    if meta["n_sites"] != grid.n_sites:
        problems.append("metadata n_sites disagrees with the grid")
    if not sample.key.startswith(f"{meta['sample']}__"):
        problems.append("key does not start with its sample id")
    return problems


@dataclass
class _Tally:
    """What verify has found so far, over every shard."""

    problems: list[str] = field(default_factory=list)
    keys: Counter = field(default_factory=Counter)
    per_sample: Counter = field(default_factory=Counter)
    sites: int = 0
    counts: float = 0.0

    def add(self, sample: TileSample) -> None:
        self.keys[sample.key] += 1
        self.per_sample[sample.meta["sample"]] += 1
        self.sites += sample.grid.n_sites
        self.counts += sample.grid.total_count


def _verify_shard(path: Path, entry: dict, manifest: dict, vocab_size: int, checksums: bool, tally: _Tally) -> None:
    """One shard, read as the loader reads it (:mod:`histotx.shard_reader`): its file against the manifest
    (size, SHA-256), every sample decoded and checked, skipped members and damage reported."""
    tally.problems += check_shard_file(path, entry, checksums)
    seen, counts = 0, ReadCounts()
    try:
        for members in iter_shard(path, counts):
            seen += 1
            try:
                sample = decode_sample(members)
                tally.problems += [f"{path}: {sample.key}: {p}" for p in check_tile(sample, vocab_size)]
                if sample.meta["sample"] not in manifest["samples"]:
                    tally.problems.append(
                        f"{path}: {sample.key}: sample {sample.meta['sample']!r} is not in the manifest"
                    )
            except (FormatError, OSError, ValueError) as exc:
                tally.problems.append(f"{path}: {members.get('__key__')}: {exc}")
                continue
            tally.add(sample)
    except (FormatError, OSError) as exc:  # a damaged tar, a FIFO or device, an I/O error
        tally.problems.append(f"{exc} (unreadable after {seen} samples)")
    if counts.skipped_members:
        tally.problems.append(f"{path}: tar members skipped ({counts.summary()})")
    if seen != entry["samples"]:
        tally.problems.append(f"{path}: {seen} samples, manifest says {entry['samples']}")


def verify(shard_dir: Path, checksums: bool = True) -> dict[str, Any]:
    """Returns {"shards": n, "tiles": n, "sites": n, "counts": x, "per_sample": {...}, "problems": [...]}."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    vocab = Vocab.load(shard_dir / manifest["vocab"])
    tally = _Tally()
    for entry in manifest["shards"]:
        path = shard_path(shard_dir, entry["name"])
        if not path.exists():
            tally.problems.append(f"{path}: missing")
            continue
        _verify_shard(path, entry, manifest, len(vocab), checksums, tally)
    dups = [k for k, c in tally.keys.items() if c > 1]
    if dups:
        tally.problems.append(f"{len(dups)} duplicate keys, e.g. {', '.join(dups[:3])}")
    for sid, rec in manifest["samples"].items():
        found = tally.per_sample.get(sid, 0)
        if rec.get("status") == "ok" and found != rec.get("tiles"):
            tally.problems.append(f"sample {sid}: {found} tiles in shards, manifest says {rec.get('tiles')}")
    return {
        "shards": len(manifest["shards"]),
        "tiles": sum(tally.keys.values()),
        "sites": tally.sites,
        "counts": tally.counts,
        "per_sample": dict(tally.per_sample),
        "problems": tally.problems,
    }
