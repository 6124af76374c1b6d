"""Shards on disk: crash-safe writing, per-sample completion records, manifests, merging parts.

Each sample writes its own shards ``{sample}.{k:05d}.tar``, each first as a hidden temporary file; all of
a sample's shards are renamed into place only when its last tile is written, so a sample that fails
midway (a tile that does not decode, a full disk) never leaves a shard under a final name. When all of a
sample's shards are in place, ``.done/{sample}.json`` records them (atomically). A rerun skips samples whose
record and shards are intact and redoes the others from scratch after removing their leftovers; since tiling
is deterministic, a run killed at any point and rerun yields exactly the tiles of an uninterrupted run, none
lost, none twice.

A run holds a lock file in its folder (:class:`OutputLock`, owner host and pid) so a second run on the
same folder refuses to start; a write that fails for lack of space (disk full, quota, file-size limit)
stops the run with an :class:`~histotx.sharding.errors.OutputError` and leaves no partial shard behind.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import tarfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from histotx.files import NO_SPACE, NOT_ALLOWED, atomic_write_json
from histotx.format import MANIFEST_NAME, TileSample, encode_sample, new_manifest, write_manifest
from histotx.sharding.errors import OutputError

DONE_DIR = ".done"
SYNC_BYTES = 8 << 20  # an open shard's data is synced to disk in the background every this many bytes


def shard_name(sample_id: str, index: int) -> str:
    return f"{sample_id}.{index:05d}.tar"


class _HashingFile:
    """A write-only file that hashes what passes through, so a closed shard's sha256 needs no second read.
    Buffered by the megabyte: one write call per ~40 tiles, not one per tile."""

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "wb", buffering=1 << 20)
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.synced = 0  # bytes handed to a background sync so far

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._fh.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._fh.flush()

    def sync_so_far(self) -> int:
        """Flush, then return the descriptor for a background ``os.fdatasync`` of the bytes written so far."""
        self._fh.flush()
        self.synced = self.size
        return self._fh.fileno()

    def sync_and_close(self) -> None:
        """fsync (the data on disk before the shard is renamed into place) and close, after :meth:`flush`; it
        releases the GIL while it waits for the disk, so a background thread runs it while the next shard is
        encoded."""
        try:
            os.fsync(self._fh.fileno())
        finally:
            self._fh.close()


@functools.cache
def _ustar_template() -> tuple[bytes, bytes, bytes, int]:
    """tarfile's header of a read-only file, mtime 0, cut around name, size and checksum: (mode..mtime fields,
    the type..end fields after the checksum, the mtime field, the sum of all bytes but name and size)."""
    info = tarfile.TarInfo("x")
    info.mode, info.mtime = 0o444, 0
    t = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
    return t[100:124], t[156:], t[136:148], sum(t[100:124]) + sum(t[136:148]) + 8 * ord(" ") + sum(t[156:])


def ustar_header(name: str, size: int) -> bytes:
    """The header ``tarfile`` writes for a read-only regular file of ``size`` bytes, mtime 0 (tested equal),
    made from its template with name, size and checksum filled in: a fifth of ``TarInfo.tobuf``'s cost."""
    raw = name.encode("utf-8")
    if len(raw) > 100 or size >= 8**11:  # tarfile's rules for long names and large files apply
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o444, 0
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
    fields, rest, mtime, fixed = _ustar_template()
    size_field = b"%011o\0" % size
    checksum = fixed + sum(raw) + sum(size_field)  # all bytes summed, the checksum field counted as spaces
    return b"".join((raw.ljust(100, b"\0"), fields, size_field, mtime, b"%06o\0 " % checksum, rest))


class ShardSink:
    """Writes one sample's tiles into size-bounded shards, renamed into place together by :meth:`close`.

    Shards are plain ustar archives with ``tarfile``'s headers (:func:`ustar_header`; what webdataset reads —
    webdataset's own writer would import torch into the sharding stage): one member per sample field,
    ``{key}.{ext}``, mtime 0 so the same tiles give byte-identical shards and checksums on every run."""

    def __init__(self, out_dir: Path, sample_id: str, max_tiles: int, max_bytes: int) -> None:
        self.out_dir, self.sample_id = Path(out_dir), sample_id
        self.max_tiles, self.max_bytes = max_tiles, max_bytes
        self.shards: list[dict[str, Any]] = []
        self._fh: _HashingFile | None = None
        self._count = 0
        self._pending: list[tuple[Path, Path]] = []  # (temporary, final) of closed shards not yet renamed
        self._syncs: list[Future] = []  # fsync + close of closed shards, in a background thread
        self._syncer: ThreadPoolExecutor | None = None

    def _open(self) -> None:
        name = shard_name(self.sample_id, len(self.shards))
        self._tmp = self.out_dir / f".{name}.tmp"
        self._fh = _HashingFile(self._tmp)
        self._name = name
        self._count = 0

    def _write_members(self, members: dict[str, Any]) -> None:
        """Each member as a ustar header, the data, zero padding to the 512-byte block; one write per tile."""
        key, parts = members["__key__"], []
        for ext, data in members.items():
            if ext != "__key__":
                parts += [ustar_header(f"{key}.{ext}", len(data)), data, bytes(-len(data) % tarfile.BLOCKSIZE)]
        self._fh.write(b"".join(parts))

    def add(self, sample: TileSample) -> None:
        if self._fh is None:
            self._open()
        self._write_members(encode_sample(sample))
        self._count += 1
        if self._count >= self.max_tiles or self._fh.size >= self.max_bytes:
            self._close_current()
        elif self._fh.size - self._fh.synced >= SYNC_BYTES and (not self._syncs or self._syncs[-1].done()):
            # a sample's last shard is waited for at close: sync it as it grows, so little is left to wait for
            self._submit(os.fdatasync, self._fh.sync_so_far())

    def _submit(self, fn, *args) -> None:
        """Run ``fn(*args)`` in the background sync thread (in order); failures are raised by close()."""
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(1, thread_name_prefix="shard-fsync")
        self._syncs.append(self._syncer.submit(fn, *args))

    def _close_current(self) -> None:
        if self._fh is None:
            return
        self._fh.write(bytes(2 * tarfile.BLOCKSIZE))  # end of archive, as tarfile writes it
        self._fh.write(bytes(-self._fh.size % tarfile.RECORDSIZE))
        self._fh.flush()  # a full disk fails here, in this thread
        self._submit(self._fh.sync_and_close)
        self.shards.append(
            {
                "name": self._name,
                "samples": self._count,
                "bytes": self._fh.size,
                "sha256": self._fh.sha256.hexdigest(),
                "sample_id": self.sample_id,
            }
        )
        self._pending.append((self._tmp, self.out_dir / self._name))
        self._fh = None

    def _wait_syncs(self) -> None:
        """Wait for the background fsyncs; the first failure (a full disk) is raised once all have ended."""
        if self._syncer is None:
            return
        self._syncer.shutdown(wait=True)
        self._syncer, syncs, self._syncs = None, self._syncs, []
        for sync in syncs:
            sync.result()

    def close(self) -> list[dict[str, Any]]:
        self._close_current()
        self._wait_syncs()  # every shard on disk before any is renamed into place
        for tmp, final in self._pending:
            os.replace(tmp, final)
        self._pending = []
        return self.shards

    def abort(self) -> None:
        """Drop every shard of the sample; never raises over the error that caused the abort."""
        try:
            self._wait_syncs()  # before closing a file a background sync may be using
        except OSError:
            pass
        if self._fh is not None:
            try:
                self._fh._fh.close()
            except OSError:  # e.g. the final flush hits the same full disk
                pass
            finally:
                Path(self._tmp).unlink(missing_ok=True)
                self._fh = None
        for tmp, _ in self._pending:
            tmp.unlink(missing_ok=True)
        self._pending = []


def done_path(out_dir: Path, sample_id: str) -> Path:
    return Path(out_dir) / DONE_DIR / f"{sample_id}.json"


def write_done(out_dir: Path, record: dict[str, Any]) -> None:
    (Path(out_dir) / DONE_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_json(done_path(out_dir, record["sample"]), record)


def load_done(out_dir: Path, sample_id: str) -> dict[str, Any] | None:
    """The completion record of a sample if it and all its shards are intact, else None."""
    path = done_path(out_dir, sample_id)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return None
    for shard in record.get("shards", []):
        f = Path(out_dir) / shard["name"]
        if not f.exists() or f.stat().st_size != shard["bytes"]:
            return None
    return record


def clear_sample(out_dir: Path, sample_id: str) -> int:
    """Remove a sample's leftovers (shards, temporaries, record) before it is redone; returns files removed."""
    out_dir = Path(out_dir)
    victims = list(out_dir.glob(f"{sample_id}.*.tar")) + list(out_dir.glob(f".{sample_id}.*.tar.tmp"))
    victims.append(done_path(out_dir, sample_id))
    removed = 0
    for f in victims:
        if f.exists():
            f.unlink()
            removed += 1
    return removed


def out_of_space(exc: BaseException, out_dir: Path) -> OutputError | None:
    """The clear error for a write that failed for lack of space, or that the system refused inside the
    output folder (permission, read-only file system); None for any other failure (the sample's own)."""
    if not isinstance(exc, OSError):
        return None
    if exc.errno in NO_SPACE:
        words, fix = NO_SPACE[exc.errno], "free space (or raise the limit)"
    elif exc.errno in NOT_ALLOWED and exc.filename and _inside(exc.filename, out_dir):
        words, fix = NOT_ALLOWED[exc.errno], "make the folder writable"
    else:
        return None
    where = exc.filename or out_dir
    return OutputError(
        f"{where}: cannot write: {words}. Samples finished so far are kept, the one being written was "
        f"removed; {fix} and run the same command again: it resumes where it stopped"
    )


def _inside(path: str | os.PathLike, folder: Path) -> bool:
    return Path(os.path.abspath(path)).is_relative_to(Path(os.path.abspath(folder)))


class OutputLock:
    """One ``histotx shard run`` (or one part of a split run) at a time per output folder.

    The lock file ``.lock`` (``.lock.part-IIII-of-NNNN`` for a part) holds the owner's host, pid and start
    time, created with O_EXCL. A whole-folder run conflicts with every other run on the folder, a part only
    with the same part and whole-folder runs. A lock left by a dead process on this host is taken over; one
    from another host must be removed by hand (the message says which file).
    """

    def __init__(self, out_dir: Path, part: int = 0, n_parts: int = 1) -> None:
        self.out_dir = Path(out_dir)
        self.name = ".lock" if n_parts == 1 else f".lock.part-{part:04d}-of-{n_parts:04d}"
        self.path = self.out_dir / self.name
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}

    def _conflicts(self) -> list[Path]:
        if self.name == ".lock":
            return sorted(p for p in self.out_dir.glob(".lock*") if p.name != self.name)
        return [self.out_dir / ".lock"]

    @staticmethod
    def _stale(path: Path) -> bool:
        try:
            owner = json.loads(path.read_text())
        except (OSError, ValueError):
            return False  # being written right now, or not ours to judge
        if owner.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError, TypeError):
            return False
        return False

    def _refuse(self, path: Path) -> OutputError:
        try:
            owner = json.loads(path.read_text())
            who = (
                f"process {owner.get('pid')} on host {owner.get('host')}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner.get('started', 0)))}"
            )
        except (OSError, ValueError):
            who = "another run"
        return OutputError(
            f"{self.out_dir}: {who} is already writing here (lock file {path}); wait for it to "
            f"finish, or if no such process is alive, delete {path} and run again"
        )

    def acquire(self) -> "OutputLock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._stale(self.path):
                    self.path.unlink(missing_ok=True)
                    continue
                raise self._refuse(self.path) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(self.owner, fh)
            break
        else:
            raise self._refuse(self.path)
        for other in self._conflicts():
            if other.exists() and not self._stale(other):
                self.release()
                raise self._refuse(other)
        return self

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("pid") == self.owner["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def part_manifest_name(part: int, n_parts: int) -> str:
    return f"manifest.part-{part:04d}-of-{n_parts:04d}.json"


def assemble_manifest(config: dict[str, Any], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Manifest from per-sample records (completed and failed)."""
    shards = [s for r in records.values() for s in r.get("shards", [])]
    samples = {sid: {k: v for k, v in r.items() if k not in ("shards", "sample")} for sid, r in records.items()}
    return new_manifest(config, shards, samples)


def merge_parts(out_dir: Path) -> dict[str, Any]:
    """Join ``manifest.part-*-of-N.json`` into ``manifest.json``; every part must be present and agree."""
    out_dir = Path(out_dir)
    parts = sorted(out_dir.glob("manifest.part-*-of-*.json"))
    if not parts:
        raise FileNotFoundError(f"{out_dir}: no part manifests (manifest.part-XXXX-of-NNNN.json) to merge")
    docs = [json.loads(p.read_text()) for p in parts]
    totals = {int(p.name.split("-of-")[1].split(".")[0]) for p in parts}
    if len(totals) != 1:
        raise ValueError(f"{out_dir}: part manifests of different splits {sorted(totals)}; remove stale ones")
    n_parts = totals.pop()
    have = {int(p.name.split("part-")[1].split("-of")[0]) for p in parts}
    missing = sorted(set(range(n_parts)) - have)
    if missing:
        raise ValueError(f"{out_dir}: parts {missing} of {n_parts} have not finished (no manifest yet)")
    base = {k: v for k, v in docs[0]["config"].items() if k != "part"}
    for p, d in zip(parts, docs, strict=True):
        if {k: v for k, v in d["config"].items() if k != "part"} != base:
            raise ValueError(f"{p}: was made with a different config than {parts[0].name}")
    records: dict[str, dict[str, Any]] = {}
    shards = []
    for d in docs:
        shards += d["shards"]
        records.update(d["samples"])
    manifest = new_manifest(dict(base, part=None), shards, records)
    write_manifest(out_dir, manifest)
    return manifest


__all__ = [
    "OutputLock",
    "out_of_space",
    "ShardSink",
    "shard_name",
    "write_done",
    "load_done",
    "clear_sample",
    "assemble_manifest",
    "merge_parts",
    "part_manifest_name",
    "MANIFEST_NAME",
]
