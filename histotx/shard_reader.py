"""Reading shard files: the one tar reader of verify, qc, the training loader, embed, eval and the monitor.

A shard is untrusted input. This reader parses the tar stream itself (no ``tarfile``, no webdataset, no
decompression) so that every size is checked before anything is read:

- only *plain regular* members with a safe flat name (``key.ext``: letters, digits, ``_``, ``-``; no
  ``/``, no ``..``, not absolute) are returned. Links, devices, FIFOs, directories, sparse members (GNU
  ``S`` or PAX ``GNU.sparse.*``), oversized members and unsafe names are **skipped and counted**
  (:attr:`ReadCounts.skipped_members`, by reason); their data is stepped over in bounded chunks;
- a member's declared size is checked against what the shard really has left (its file size) and
  against :data:`MAX_MEMBER_BYTES` before a byte of it is read; PAX / GNU long-name headers are at most
  :data:`MAX_EXTENDED_HEADER` bytes. A member that declares more than the shard holds, a bad header
  checksum, or a compressed stream (gzip, bzip2, xz, zstd, lz4 posing as ``.tar``) is a
  :class:`~histotx.format.FormatError` that ends the shard: memory stays below one member, whatever the
  headers claim;
- members are grouped into samples as webdataset groups them (key = name up to its first dot, adjacent
  members). A sample that holds the same extension twice is yielded with ``__problem__`` set, which
  :func:`~histotx.format.decode_sample` turns into a FormatError: every reader skips and counts it as a bad
  sample (the rest of the shard is read).

Files are opened by :func:`open_shard`: a manifest's shard name must be a plain file name of the shard
folder (:func:`shard_path`), and the file must be a regular file (checked with ``fstat`` on a descriptor
opened non-blocking, so a named pipe or a device is refused instead of hanging). :func:`iter_samples`
takes any binary file object (an fsspec stream too) and, optionally, its size.

Integrity: :func:`check_shard_file` compares a shard's size and SHA-256 with its manifest entry; verify
reports its findings and the training loader skips (and counts as corrupt) a shard that fails it.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

from histotx.format import SHARD_NAME, FormatError

BLOCK = 512
MAX_MEMBER_BYTES = 64 << 20
"""A member larger than this is skipped and counted (a tile image is at most ``MAX_TILE_PX``² px; see
:mod:`histotx.format`). With it a reader holds at most one member, whatever a header declares."""
MAX_EXTENDED_HEADER = 1 << 16
"""PAX and GNU long-name headers (what ``tarfile`` may write for a long name) are at most this long."""
MEMBER_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_-]*)\.([A-Za-z0-9]+(?:\.[A-Za-z0-9]+)*)$")
_SKIP_CHUNK = 1 << 20
_COMPRESSED = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x04\x22\x4d\x18": "lz4",
}
_REGULAR = (b"0", b"\0")
_KIND = {
    b"1": "hard link",
    b"2": "symbolic link",
    b"3": "character device",
    b"4": "block device",
    b"5": "directory",
    b"6": "FIFO",
    b"7": "contiguous file",
    b"S": "sparse member",
}


@dataclass
class ReadCounts:
    """What a reader stepped over; ``skipped`` counts members by reason."""

    skipped_members: int = 0
    skipped: Counter = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        self.skipped_members += 1
        self.skipped[reason] += 1

    def summary(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))


def shard_path(shard_dir: str | os.PathLike, name: Any) -> Path:
    """``shard_dir / name`` for a manifest's shard name that is a plain ``*.tar`` file name of the folder
    (no separator, no ``..``, not absolute: a manifest cannot point a reader at ``/dev/zero``)."""
    if not isinstance(name, str) or not SHARD_NAME.match(name):
        raise FormatError(
            f"{Path(shard_dir) / 'manifest.json'}: shard name {name!r} is not a plain *.tar file name of the "
            "shard folder (letters, digits, '.', '_', '-')"
        )
    return Path(shard_dir) / name


def open_shard(path: str | os.PathLike) -> tuple[IO[bytes], int]:
    """(binary file, size) of a regular file; a FIFO, device, socket or folder is a FormatError (opened
    non-blocking and checked with ``fstat`` before any read, so nothing can hang). A remote URL (s3://,
    gs://, ...) is opened as a stream by :func:`histotx.shard_location.open_remote_shard`."""
    from histotx.shard_location import is_remote, local_path, open_remote_shard

    if is_remote(path):
        return open_remote_shard(str(path))
    path = local_path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise FormatError(f"{path}: cannot open ({exc.strerror or exc})") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = (
                "a named pipe"
                if stat.S_ISFIFO(st.st_mode)
                else "a device"
                if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a folder"
                if stat.S_ISDIR(st.st_mode)
                else "not a regular file"
            )
            raise FormatError(f"{path}: {kind}, not a shard file; only regular files are read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=1 << 20), st.st_size
    except BaseException:
        os.close(fd)
        raise


def check_shard_file(path: str | os.PathLike, entry: dict[str, Any], checksums: bool = True) -> list[str]:
    """Problems of one shard against its manifest entry (size, then SHA-256): empty when it is intact.
    What verify reports and what the loader refuses to stream are the same list."""
    try:
        fh, size = open_shard(path)
    except FormatError as exc:
        return [str(exc)]
    with fh:
        if size != entry.get("bytes"):
            return [f"{path}: {size} bytes, manifest says {entry.get('bytes')}"]
        if checksums:
            h = hashlib.sha256()
            while block := fh.read(_SKIP_CHUNK):
                h.update(block)
            if h.hexdigest() != entry.get("sha256"):
                return [f"{path}: sha256 differs from the manifest"]
    return []


def _read(fh: IO[bytes], n: int) -> bytes:
    """Exactly ``n`` bytes, or fewer at the end of the stream (reads in bounded chunks)."""
    parts, left = [], n
    while left > 0:
        chunk = fh.read(min(left, _SKIP_CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _skip(fh: IO[bytes], n: int) -> int:
    """Step over ``n`` bytes without holding them; returns how many there were."""
    done = 0
    while done < n:
        chunk = fh.read(min(n - done, _SKIP_CHUNK))
        if not chunk:
            break
        done += len(chunk)
    return done


def _octal(field_bytes: bytes, what: str, where: str) -> int:
    if field_bytes[:1] in (b"\x80", b"\xff"):  # base-256 (GNU): sizes beyond 8 GiB; none is valid here
        raise FormatError(f"{where}: {what} in base-256 (a member of 8 GiB or more)")
    text = field_bytes.split(b"\0", 1)[0].strip(b" \0")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise FormatError(f"{where}: {what} field {field_bytes!r} is not octal") from None


_HIGH = bytes(range(128, 256))


def _header_ok(block: bytes, where: str) -> None:
    stored = _octal(block[148:156], "checksum", where)
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    if stored != unsigned:  # some writers sum the bytes as signed chars
        rest = block[:148] + block[156:]
        high = len(rest) - len(rest.translate(None, _HIGH))  # bytes ≥ 128, counted 256 lower when signed
        if stored != unsigned - 256 * high:
            raise FormatError(f"{where}: bad tar header checksum (not a tar stream, or damaged)")


def _pax(data: bytes, where: str) -> dict[str, str]:
    """PAX records ``"%d %s=%s\\n"``; malformed records are a FormatError."""
    out, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 20)
        try:
            length = int(data[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        record = data[pos : pos + length]
        if length <= space - pos + 1 or len(record) != length or not record.endswith(b"\n") or b"=" not in record:
            raise FormatError(f"{where}: malformed PAX header record")
        key, _, value = record[space - pos + 1 : -1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


class _TarStream:
    """A tar stream read block by block, tracking the position (for messages and the size check)."""

    def __init__(self, fh: IO[bytes], source: str, size: int | None) -> None:
        self.fh, self.source, self.size, self.pos = fh, source, size, 0

    @property
    def where(self) -> str:
        return f"{self.source}: byte {self.pos}"

    def read(self, n: int, what: str) -> bytes:
        data = _read(self.fh, n)
        if len(data) < n:
            raise FormatError(f"{self.where}: truncated {what} ({len(data)} of {n} bytes)")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        if _skip(self.fh, n) < n:
            raise FormatError(f"{self.where}: truncated {what}")
        self.pos += n

    def header(self) -> bytes | None:
        """The next header block (checksum checked), or None at the end of the archive."""
        block = _read(self.fh, BLOCK)
        if not block:
            return None  # the end without the end-of-archive blocks: tolerated, as tarfile does
        if self.pos == 0:
            for magic, kind in _COMPRESSED.items():
                if block.startswith(magic):
                    raise FormatError(
                        f"{self.source}: a {kind}-compressed stream, not a plain tar; HistoTx shards are "
                        "uncompressed tar (decompress it first)"
                    )
        if len(block) < BLOCK:
            raise FormatError(f"{self.where}: truncated tar header ({len(block)} of {BLOCK} bytes)")
        if block == bytes(BLOCK):
            return None  # end of archive
        _header_ok(block, self.where)
        self.pos += BLOCK
        return block

    def data_size(self, block: bytes) -> tuple[int, int]:
        """(declared, stored) bytes of a header's data, checked against what the stream has left."""
        declared = _octal(block[124:136], "size", self.where)
        left = None if self.size is None else self.size - self.pos
        if left is not None and declared > left:
            raise FormatError(
                f"{self.source}: byte {self.pos - BLOCK}: a member declares {declared} bytes, the shard has "
                f"{max(left, 0)} left (truncated, or a header that lies)"
            )
        return declared, -(-declared // BLOCK) * BLOCK


def _name(block: bytes, pax: dict[str, str], long_name: str | None) -> str:
    name = block[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    if block[257:262] == b"ustar" and block[345:500].strip(b"\0"):
        name = block[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
    return pax.get("path", long_name or name)


def _skip_reason(typeflag: bytes, sparse: bool, name: str, declared: int) -> str | None:
    """Why a member is not returned (skipped and counted), or None for a plain regular member."""
    if sparse:
        return "sparse member"
    if typeflag not in _REGULAR:
        return _KIND.get(typeflag, f"member of type {typeflag!r}")
    if not MEMBER_NAME.match(name):
        return "unsafe or non-flat member name"
    if declared > MAX_MEMBER_BYTES:
        return f"member over {MAX_MEMBER_BYTES} bytes"
    return None


def iter_members(
    fh: IO[bytes], source: str, size: int | None = None, counts: ReadCounts | None = None
) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each plain regular member with a safe name, in order (see the module docstring).
    ``size``: the stream's length in bytes when known (a member that claims more is a FormatError before
    it is read). Raises FormatError for a damaged stream; the members before the damage were yielded."""
    counts = counts if counts is not None else ReadCounts()
    tar, long_name, pax = _TarStream(fh, source, size), None, {}
    while (block := tar.header()) is not None:
        typeflag = block[156:157]
        declared, stored = tar.data_size(block)
        if typeflag in (b"x", b"g", b"L", b"K"):
            if declared > MAX_EXTENDED_HEADER:
                raise FormatError(
                    f"{tar.where}: an extended tar header of {declared} bytes (limit {MAX_EXTENDED_HEADER})"
                )
            data = tar.read(stored, "extended tar header")[:declared]
            if typeflag == b"x":
                pax = _pax(data, tar.where)
            elif typeflag == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            continue  # global PAX headers and GNU long link names carry nothing a sample needs
        if typeflag == b"S" and block[482]:  # old GNU sparse: extension blocks of the sparse map follow
            while tar.read(BLOCK, "sparse map")[504]:
                pass
        name = _name(block, pax, long_name)
        sparse = typeflag == b"S" or any(k.startswith("GNU.sparse") for k in pax)
        if "size" in pax and not sparse and pax["size"] != str(declared):
            raise FormatError(f"{tar.where}: PAX size {pax['size']!r} and header size {declared} disagree")
        long_name, pax = None, {}
        reason = _skip_reason(typeflag, sparse, name, declared)
        if reason is not None:
            counts.skip(reason)
            tar.skip(stored, f"member {name!r}")
            continue
        data = tar.read(declared, f"member {name!r}")
        tar.skip(stored - declared, f"member {name!r}")
        yield name, data


def iter_samples(
    fh: IO[bytes], source: str, size: int | None = None, counts: ReadCounts | None = None
) -> Iterator[dict[str, Any]]:
    """Samples (``__key__``, ``__url__``, extension → bytes) of a tar stream: adjacent members sharing a
    key, as webdataset groups them (extensions lower-cased). A sample with a repeated extension carries
    ``__problem__`` (decode_sample refuses it). Raises FormatError for a damaged stream."""
    sample: dict[str, Any] = {}
    for name, data in iter_members(fh, source, size, counts):
        key, ext = MEMBER_NAME.match(name).groups()
        ext = ext.lower()
        if key != sample.get("__key__"):
            if sample:
                yield sample
            sample = {"__key__": key, "__url__": source}
        if ext in sample:
            sample["__problem__"] = f"member {key}.{ext} appears twice in the sample"
            continue
        sample[ext] = data
    if sample:
        yield sample


def read_shard_file(path: str | os.PathLike, counts: ReadCounts | None = None) -> Iterator[dict[str, Any]]:
    """:func:`iter_samples` of a local shard file opened by :func:`open_shard`."""
    fh, size = open_shard(path)
    with fh:
        yield from iter_samples(fh, str(path), size, counts)
