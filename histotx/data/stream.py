"""The streaming loader: shards of a manifest → per-rank batches, deterministic and resumable.

Order. For epoch ``e`` the manifest's shards are shuffled with ``(seed, e)``, split by rank, then by
worker *slot* (``W`` slots per rank, ``W`` = DataLoader workers). Each slot reads its shards in order
(cycling, reshuffled, if it needs more), through a shuffle buffer of raw member bytes, and decodes each
sample with :mod:`histotx.format` (never webdataset's decoders, never pickle). With ``resample`` a slot
draws shards with replacement instead. Batch ``b`` of epoch ``e`` comes from slot ``b % W``; every rank
yields exactly ``steps_per_epoch`` batches per epoch, so ranks never wait on each other. An epoch
covers every tile once when each slot's shards hold its share of the epoch's samples (equal shards,
``steps_per_epoch`` a multiple of ``W``); otherwise a slot runs short and repeats (reshuffled) or stops
early, and the next epoch reshuffles.

Randomness. Each sample's augmentation uses a generator seeded by ``(seed, e, rank, slot, position)``
and each batch's collation one seeded by ``(seed, e, rank, b)``: a sample's views and a batch's masks
do not depend on timing, worker count or which process made them.

Resume. The loader's state is the number of batches handed out and, for the current epoch, how many
raw samples each slot had consumed. A resumed run replays each slot's shard order and shuffle buffer
on raw bytes, skips the consumed samples without decoding them, and continues with the next sample.
DataLoader workers take turns (worker ``p`` makes batches ``G0 + p + kW``), so after a resume the first
worker serves whichever slot is due next.

Where. ``shards`` is a folder or any fsspec URL (:mod:`histotx.shard_location`): from s3://, gs://, ...
the manifest and vocabulary are read as bytes and the shards streamed (ranged reads, no local copy), each
rank and worker slot reading its own split as from a folder.

Faults. Shards are read by :mod:`histotx.shard_reader` (plain regular members only, every size checked
against the file before reading; links, special files and unsafe names skipped and counted as
``skipped_members``). Each shard's size and SHA-256 are checked against the manifest once per worker
process before it is streamed (``checksums: false`` turns this off); a shard that differs, or one that is
damaged, is skipped with a warning and counted (``corrupt_shards``; a damaged one after the samples before
the damage). An undecodable sample (any :class:`~histotx.format.FormatError`, or a gene id beyond the
shard set's vocabulary, which would index past the model's gene table) is skipped and counted
(``bad_samples``). The shuffle buffer holds at most ``shuffle_buffer`` samples and about
``shuffle_buffer_bytes`` raw bytes. A slot whose shards hold nothing readable, or a long run of bad
samples, stops the loader with an error rather than spinning forever.
"""

from __future__ import annotations

import itertools
import random
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from histotx.data.config import StreamConfig
from histotx.format import FormatError, TileSample, decode_sample
from histotx.shard_location import load_manifest, load_vocab, shard_url
from histotx.shard_reader import ReadCounts, check_shard_file, iter_samples, open_shard

_SHARD_ORDER, _SHUFFLE, _SAMPLE, _BATCH, _RESAMPLE, _REPEAT = range(6)


class ShardWarning(UserWarning):
    """A shard or sample was skipped because it could not be read."""


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from a tuple of non-negative integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


@dataclass
class LoaderStats:
    shards_read: int = 0
    corrupt_shards: int = 0  # unreadable, or failing the manifest's size / SHA-256 (skipped whole)
    bad_samples: int = 0
    skipped_members: int = 0  # tar members stepped over: links, special files, unsafe names, oversized
    samples: int = 0  # delivered in batches
    worker_cpu_s: float = (
        0.0  # CPU seconds of the worker process(es) when their last batch was made (0 without workers)
    )

    def __add__(self, other: "LoaderStats") -> "LoaderStats":
        return LoaderStats(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values(), strict=True)))


def read_shard(url: str, stats: LoaderStats, entry: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples (member name → bytes) of one tar shard, read by :mod:`histotx.shard_reader` (plain
    regular members only, sizes checked before reading; others skipped and counted in
    ``stats.skipped_members``). With ``entry`` (the shard's manifest entry) the file's size and SHA-256 are
    checked first and a shard that differs is skipped whole. Damage ends the shard with a warning; both
    count as ``corrupt_shards``."""
    stats.shards_read += 1
    n, counts, base = 0, ReadCounts(), stats.skipped_members
    try:
        if entry is not None:
            problems = check_shard_file(url, entry)
            if problems:
                raise FormatError("; ".join(problems) + " (not streamed; `histotx shard verify` to check the set)")
        fh, size = open_shard(url)
        with fh:
            for sample in iter_samples(fh, url, size, counts):
                n += 1
                stats.skipped_members = base + counts.skipped_members
                yield sample
        stats.skipped_members = base + counts.skipped_members
    except (FormatError, OSError) as exc:  # any damage skips the rest of the shard
        stats.skipped_members = base + counts.skipped_members
        stats.corrupt_shards += 1
        warnings.warn(
            f"{url}: unreadable after {n} samples, rest of the shard skipped ({exc})",
            ShardWarning,
            stacklevel=2,
        )
    if counts.skipped_members:
        warnings.warn(f"{url}: tar members skipped ({counts.summary()})", ShardWarning, stacklevel=2)


def shuffle_bounded(
    samples: Iterator[dict[str, Any]], size: int, max_bytes: int, rng: random.Random
) -> Iterator[dict[str, Any]]:
    """webdataset's buffered shuffle (``shuffle(size, size, rng)``: same draws, same order), with the buffer
    also bounded by the raw bytes it holds: it yields as soon as it holds ``size`` samples or
    ``max_bytes`` bytes, so large members cannot make it hold more than about ``max_bytes`` + one sample."""
    buf: list[dict[str, Any]] = []
    held = 0

    def nbytes(sample: dict[str, Any]) -> int:
        return sum(len(v) for v in sample.values() if isinstance(v, (bytes, bytearray)))

    def pick() -> dict[str, Any]:
        nonlocal held
        k = rng.randint(0, len(buf) - 1)
        sample = buf[k]
        buf[k] = buf[-1]
        buf.pop()
        held -= nbytes(sample)
        return sample

    for sample in samples:
        buf.append(sample)
        held += nbytes(sample)
        if len(buf) < size and held < max_bytes:
            nxt = next(samples, None)
            if nxt is not None:
                buf.append(nxt)
                held += nbytes(nxt)
        if len(buf) >= size or held >= max_bytes:
            yield pick()
    while buf:
        yield pick()


class ShardStream(IterableDataset):
    """Batches of one rank, made in DataLoader workers (see the module docstring for the contract).

    ``transform(tile, rng)`` turns a decoded :class:`~histotx.format.TileSample` into a training item
    (decode the image, multi-crop); ``collate(items, rng)`` packs ``batch_size`` items into a batch.
    """

    def __init__(
        self,
        cfg: StreamConfig,
        transform: Callable[[TileSample, np.random.Generator], Any],
        collate: Callable[[list, np.random.Generator], Any],
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not cfg.shards:
            raise ValueError("data.stream.shards is empty: set it to a shard folder made by `histotx shard`")
        manifest = load_manifest(cfg.shards)  # a folder or any fsspec URL (histotx.shard_location)
        self.cfg, self.transform, self.collate = cfg, transform, collate
        self.rank, self.world_size = rank, world_size
        self.urls = [shard_url(cfg.shards, s["name"]) for s in manifest["shards"]]
        self.entries = {url: entry for url, entry in zip(self.urls, manifest["shards"], strict=True)}
        self._verdicts: dict[str, str] = {}  # shard → its problems ("" if none), checked once per process
        self.n_slots = max(1, cfg.num_workers)
        if not self.urls:
            raise ValueError(f"{cfg.shards}: the manifest lists no shards")
        if not cfg.resample and len(self.urls) < world_size * self.n_slots:
            raise ValueError(
                f"{cfg.shards}: {len(self.urls)} shards cannot feed {world_size} ranks × {self.n_slots} workers "
                "(each needs a shard of its own); write smaller shards, use fewer workers, or set "
                "data.stream.resample=true"
            )
        self.vocab_path = manifest["vocab"]
        vocab = load_vocab(cfg.shards, manifest["vocab"])
        self.vocab_size: int | None = None if vocab is None else len(vocab)
        tiles = int(manifest["totals"]["tiles"])
        self.steps_per_epoch = cfg.steps_per_epoch or max(1, tiles // (world_size * cfg.batch_size))
        self.start_batch = 0  # batches already handed out on this rank
        self.start_positions: dict[int, int] = {}  # raw samples consumed per slot, in the start batch's epoch

    # ------------------------------------------------------------------ shard order
    def slot_shards(self, epoch: int, slot: int) -> list[str]:
        """This rank's and slot's shards in epoch ``epoch`` (a partition over ranks and slots)."""
        order = random.Random(derive_seed(self.cfg.seed, _SHARD_ORDER, epoch)).sample(self.urls, len(self.urls))
        return order[self.rank :: self.world_size][slot :: self.n_slots]

    def _shard_sequence(self, epoch: int, slot: int) -> Iterator[list[str]]:
        """Passes over a slot's shards: its share (then reshuffled repeats), or resampled draws."""
        if self.cfg.resample:
            rng = random.Random(derive_seed(self.cfg.seed, _RESAMPLE, epoch, self.rank, slot))
            while True:
                yield [rng.choice(self.urls) for _ in range(len(self.urls))]
        mine = self.slot_shards(epoch, slot)
        yield mine
        for repeat in itertools.count(1):
            yield random.Random(derive_seed(self.cfg.seed, _REPEAT, epoch, self.rank, slot, repeat)).sample(
                mine, len(mine)
            )

    def _slot_stream(self, epoch: int, slot: int, start: int, stats: LoaderStats) -> Iterator[tuple[int, dict]]:
        """(position, raw sample) from ``start`` on, each pass over the slot's shards shuffled through the
        buffer (drained at the end of a pass, so a pass is a permutation of its samples). Shuffling raw
        bytes lets a resume replay the buffer without decoding anything."""
        rng = random.Random(derive_seed(self.cfg.seed, _SHUFFLE, epoch, self.rank, slot))
        size = self.cfg.shuffle_buffer

        def passes() -> Iterator[dict[str, Any]]:
            for shards in self._shard_sequence(epoch, slot):
                n = 0
                raw = (s for url in shards for s in self._read_checked(url, stats))
                for sample in shuffle_bounded(raw, size, self.cfg.shuffle_buffer_bytes, rng):
                    n += 1
                    yield sample
                if n == 0:
                    raise RuntimeError(
                        f"rank {self.rank} worker slot {slot}: no readable sample in its shards "
                        f"{[Path(u).name for u in shards]}"
                    )

        return itertools.islice(enumerate(passes(), start=1), start, None)

    def _read_checked(self, url: str, stats: LoaderStats) -> Iterator[dict[str, Any]]:
        """:func:`read_shard`, after the shard's size and SHA-256 were checked against the manifest (once per
        shard and process: a worker re-reads its shards every epoch); a shard that differs is skipped whole
        and counted corrupt, as `histotx shard verify` reports it. ``checksums: false`` skips the check."""
        if self.cfg.checksums:
            if url not in self._verdicts:
                self._verdicts[url] = "; ".join(check_shard_file(url, self.entries[url]))
            if self._verdicts[url]:
                stats.shards_read += 1
                stats.corrupt_shards += 1
                warnings.warn(f"{self._verdicts[url]}: shard skipped", ShardWarning, stacklevel=2)
                return
        yield from read_shard(url, stats)

    # ------------------------------------------------------------------ batches
    def _decode(self, raw: dict[str, Any]) -> TileSample:
        tile = decode_sample(raw)
        genes = tile.grid.gene
        if self.vocab_size is not None and genes.size and int(genes.max()) >= self.vocab_size:
            raise FormatError(
                f"sample {tile.key}: gene id {int(genes.max())} is beyond the shard set's "
                f"vocabulary ({self.vocab_path}: {self.vocab_size} genes)"
            )
        return tile

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        if n_workers != self.n_slots:
            raise RuntimeError(f"ShardStream was set up for {self.n_slots} workers but runs in {n_workers}")
        cfg, stats = self.cfg, LoaderStats()
        start_epoch = self.start_batch // self.steps_per_epoch
        current, stream, bad_run = None, None, 0
        for g in itertools.count(self.start_batch + worker, n_workers):
            epoch, index = divmod(g, self.steps_per_epoch)
            slot = index % n_workers
            if current != (epoch, slot):
                start = self.start_positions.get(slot, 0) if epoch == start_epoch else 0
                current, stream, position = (epoch, slot), self._slot_stream(epoch, slot, start, stats), start
            items = []
            while len(items) < cfg.batch_size:
                position, raw = next(stream)
                try:
                    rng = np.random.default_rng([cfg.seed, _SAMPLE, epoch, self.rank, slot, position])
                    items.append(self.transform(self._decode(raw), rng))
                    bad_run = 0
                except Exception as exc:  # noqa: BLE001 — a bad sample must not stop training
                    stats.bad_samples += 1
                    bad_run += 1
                    warnings.warn(
                        f"{raw.get('__url__', '?')}: sample {raw.get('__key__', '?')} skipped "
                        f"({type(exc).__name__}: {exc})",
                        ShardWarning,
                        stacklevel=2,
                    )
                    if bad_run >= cfg.max_consecutive_bad_samples:
                        raise RuntimeError(
                            f"{bad_run} bad samples in a row on rank {self.rank} slot {slot}; last: {exc}"
                        ) from exc
            batch = self.collate(items, np.random.default_rng([cfg.seed, _BATCH, epoch, self.rank, index]))
            stats.samples += len(items)
            stats.worker_cpu_s = time.process_time() if info else 0.0
            yield {
                "batch": batch,
                "epoch": epoch,
                "index": index,
                "slot": slot,
                "position": position,
                "worker": worker,
                "stats": asdict(stats),
            }


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers parallelise over samples; threads inside them only contend


class StreamLoader:
    """One rank's endless batch iterator over a :class:`ShardStream`; its ``state_dict`` resumes exactly.

    The state counts the batches *handed to the caller*: save it after training on the last batch
    taken, and a resumed run gets the next one.
    """

    def __init__(self, dataset: ShardStream, pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.pin_memory = pin_memory
        self.batches = 0
        self.positions: dict[int, int] = {}
        self._worker_stats: dict[int, LoaderStats] = {}

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset.steps_per_epoch

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self.batches // self.steps_per_epoch

    @property
    def stats(self) -> LoaderStats:
        """Shards read, corrupt shards and bad samples so far (summed over this rank's workers)."""
        return sum(self._worker_stats.values(), LoaderStats())

    def __iter__(self) -> Iterator[Any]:
        ds, cfg = self.dataset, self.dataset.cfg
        ds.start_batch, ds.start_positions = self.batches, dict(self.positions)
        loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=cfg.num_workers,
            pin_memory=self.pin_memory,
            worker_init_fn=_worker_init if cfg.num_workers else None,
            prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
        )
        for delivery in loader:
            expected = divmod(self.batches, self.steps_per_epoch)
            if (delivery["epoch"], delivery["index"]) != expected:
                raise RuntimeError(
                    f"loader delivered batch {(delivery['epoch'], delivery['index'])}, expected "
                    f"{expected} (epoch, index)"
                )
            self.positions[delivery["slot"]] = delivery["position"]
            self.batches += 1
            if self.batches % self.steps_per_epoch == 0:
                self.positions = {}
            self._worker_stats[delivery["worker"]] = LoaderStats(**delivery["stats"])
            yield delivery["batch"]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of this rank's loader."""
        ds = self.dataset
        return {
            "batches": self.batches,
            "positions": {str(k): v for k, v in sorted(self.positions.items())},
            "rank": ds.rank,
            "world_size": ds.world_size,
            "num_workers": ds.n_slots,
            "seed": ds.cfg.seed,
            "batch_size": ds.cfg.batch_size,
            "steps_per_epoch": ds.steps_per_epoch,
            "resample": ds.cfg.resample,
            "shards": len(ds.urls),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        fixed = ("rank", "world_size", "num_workers", "seed", "batch_size", "steps_per_epoch", "resample", "shards")
        changed = [f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in fixed if state.get(k) != mine[k]]
        if changed:
            raise ValueError("cannot resume the data loader exactly, its set-up changed (" + "; ".join(changed) + ")")
        self.batches = int(state["batches"])
        self.positions = {int(k): int(v) for k, v in state["positions"].items()}
