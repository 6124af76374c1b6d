"""Files written whole or not at all, and their checksums: the one home of atomic writes in HistoTx.

A file is written under a hidden temporary name in its own folder, flushed to disk and renamed over the
target (``os.replace`` is atomic within a file system), so a reader sees the old file or the new one,
never half of one, whatever happens to the writer; the temporary is removed on any error. A folder
(an export) is built beside its target and renamed into place the same way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that takes a file name (h5py, anndata, safetensors):
    once the block ends without error the file is flushed to disk and renamed onto ``path``. It has an
    ordinary file's permissions (as the umask allows; a temporary file is made 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """A fresh folder path beside ``out`` to build in (not created); once the block ends without error it
    replaces ``out`` (a folder or file there is removed first), otherwise it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.stem}.partial-{os.getpid()}{out.suffix}"  # the suffix kept: a.zarr stays .zarr
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        elif out.exists() or out.is_symlink():
            out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes, as 64 lower-case hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


NO_SPACE = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file larger than the file-size limit (ulimit -f)",
}
"""The errors of a write that failed for lack of space (the disk, a quota, ``ulimit -f``), in words."""

NOT_ALLOWED = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}
"""The errors of a file operation the system refuses."""


def environment_problem(exc: BaseException) -> str | None:
    """``"<file>: <what the system said>"`` when ``exc`` is an OSError the machine caused (a full disk, a
    quota, the file-size limit, a permission, a read-only file system), not the data; else None."""
    if not isinstance(exc, OSError) or exc.errno not in {**NO_SPACE, **NOT_ALLOWED}:
        return None
    words = {**NO_SPACE, **NOT_ALLOWED}[exc.errno]
    where = exc.filename if exc.filename is not None else "a file"
    return f"{where}: {words}"
