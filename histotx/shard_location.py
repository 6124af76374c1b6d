"""Where a shard set lives: a local folder, or any fsspec URL (``s3://bucket/prefix``, ``gs://``, ``file://``).

A location names the folder that holds ``manifest.json``, ``vocab.tsv`` and the ``*.tar`` shards. A plain
path or a ``file://`` URL is a local folder: every reader uses the local, untrusted-input checks of
:mod:`histotx.format` and :mod:`histotx.shard_reader` on it unchanged. Any other URL is read through fsspec
(s3fs, gcsfs, ...: install the filesystem's package; credentials and endpoints come from the usual
environment, e.g. ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``):

- the manifest and the vocabulary are read as bytes, their size checked against the same limits as local
  files before a byte is read, then parsed and checked by the same functions;
- a shard is opened as a stream (ranged reads, nothing is copied to local disk) after its listing says it
  is a regular object of known size; :func:`histotx.shard_reader.open_shard` hands such URLs here, so the
  tar reader's checks (sizes against the object's size, member kinds and names) and the loader's manifest
  size/SHA-256 check apply to remote shards too. Any error while reading is an ``OSError`` naming the URL
  (a shard that vanishes mid-run is skipped and counted like a damaged one).

fsspec filesystems are made per process (never inherited across fork: the async clients of s3fs/gcsfs
hold event loops and connections that a forked DataLoader worker must not share).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

from histotx.format import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SHARD_NAME,
    FormatError,
    _json_object,
    check_manifest,
    read_manifest,
)

REMOTE_BLOCK = 8 << 20  # bytes per ranged read of a remote shard
_FILESYSTEMS: dict[tuple[int, str], Any] = {}


def is_url(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (``file://`` included); False for a plain path."""
    return isinstance(location, str) and "://" in location and not location.startswith("/")


def is_remote(location: str | os.PathLike) -> bool:
    """A URL that is not ``file://``: read through fsspec."""
    return is_url(location) and not str(location).startswith("file://")


def local_path(location: str | os.PathLike) -> Path:
    """The local folder of a plain path or a ``file://`` URL."""
    text = str(location)
    if text.startswith("file://"):
        parsed = urlparse(text)
        return Path(
            unquote(parsed.netloc + parsed.path) if parsed.netloc not in ("", "localhost") else unquote(parsed.path)
        )
    return Path(text)


def filesystem(url: str):
    """This process's fsspec filesystem for ``url``'s protocol (made on first use in each process)."""
    import fsspec

    protocol = url.split("://", 1)[0]
    key = (os.getpid(), protocol)
    if key not in _FILESYSTEMS:
        try:
            _FILESYSTEMS[key] = fsspec.filesystem(protocol, skip_instance_cache=True)
        except (ImportError, ValueError) as exc:
            raise FormatError(
                f"{url}: no fsspec filesystem for {protocol}:// ({exc}); install its package "
                "(s3://: pip install 'histotx[s3]'; gs://: gcsfs)"
            ) from exc
    return _FILESYSTEMS[key]


def join(location: str, name: str) -> str:
    """``location/name`` for a URL or a path, ``name`` a plain file name of the folder (checked)."""
    if not isinstance(name, str) or "/" in name or name in ("", ".", "..") or name.startswith("."):
        raise FormatError(f"{location}: {name!r} is not a plain file name of the shard folder")
    if is_remote(location):
        return location.rstrip("/") + "/" + name
    return str(local_path(location) / name)


def shard_url(location: str, name: Any) -> str:
    """A manifest's shard name as a URL or path of ``location`` (a plain ``*.tar`` name, as for folders)."""
    if not isinstance(name, str) or not SHARD_NAME.match(name):
        raise FormatError(
            f"{join(location, MANIFEST_NAME)}: shard name {name!r} is not a plain *.tar file name of the "
            "shard folder (letters, digits, '.', '_', '-')"
        )
    return join(location, name)


def _remote_info(url: str) -> dict[str, Any]:
    fs = filesystem(url)
    try:
        info = fs.info(url)
    except FileNotFoundError as exc:
        raise FormatError(f"{url}: no such object") from exc
    except Exception as exc:  # noqa: BLE001 - any transport or permission error, named
        raise FormatError(f"{url}: cannot stat ({type(exc).__name__}: {exc})") from exc
    if info.get("type") != "file" or not isinstance(info.get("size"), int):
        raise FormatError(f"{url}: not a regular object (a prefix or a folder); only objects are read")
    return info


def read_bytes(url: str, limit: int) -> bytes:
    """The bytes of a small object (manifest, vocabulary) of at most ``limit`` bytes, size checked first."""
    if not is_remote(url):
        from histotx.format import read_regular

        return read_regular(local_path(url), limit)
    size = _remote_info(url)["size"]
    if size > limit:
        raise FormatError(f"{url}: {size} bytes, more than the {limit} allowed for this file")
    try:
        with filesystem(url).open(url, "rb") as fh:
            data = fh.read(limit + 1)
    except Exception as exc:  # noqa: BLE001
        raise FormatError(f"{url}: cannot read ({type(exc).__name__}: {exc})") from exc
    if len(data) != size:
        raise FormatError(f"{url}: read {len(data)} bytes, its listing says {size}")
    return data


def exists(url: str) -> bool:
    if not is_remote(url):
        return local_path(url).exists()
    try:
        return bool(filesystem(url).exists(url))
    except Exception:  # noqa: BLE001
        return False


def load_manifest(location: str) -> dict[str, Any]:
    """The checked manifest of a shard set at a folder or URL (:func:`histotx.format.read_manifest`'s checks)."""
    if not is_remote(location):
        return read_manifest(local_path(location))
    url = join(location, MANIFEST_NAME)
    if not exists(url):
        raise FormatError(f"{url}: no manifest; is this a HistoTx shard set (made by `histotx shard run`)?")
    return check_manifest(_json_object(read_bytes(url, MAX_MANIFEST_BYTES), url), url)


def load_vocab(location: str, name: str):
    """The shard set's vocabulary (:class:`histotx.vocab.Vocab`), or None when the set has none."""
    from histotx.vocab import MAX_VOCAB_BYTES, Vocab

    url = join(location, name)
    if not is_remote(location):
        return Vocab.load(url) if Path(url).exists() else None
    if not exists(url):
        return None
    data = read_bytes(url, MAX_VOCAB_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{url}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return Vocab.parse(text, url)


def listed_objects(location: str) -> set[str]:
    """Names of the objects directly under a remote location (one listing)."""
    fs = filesystem(location)
    try:
        return {Path(p.rstrip("/")).name for p in fs.ls(location.rstrip("/"), detail=False)}
    except FileNotFoundError:
        return set()


class _RemoteShard:
    """A remote shard as a binary stream; every failure of the transport is an OSError naming the URL."""

    def __init__(self, url: str, fh: IO[bytes]) -> None:
        self.url, self._fh = url, fh

    def read(self, n: int = -1) -> bytes:
        try:
            return self._fh.read(n)
        except OSError as exc:
            raise OSError(f"{self.url}: read failed ({type(exc).__name__}: {exc})") from exc
        except Exception as exc:  # noqa: BLE001 - botocore/aiohttp errors are not OSErrors
            raise OSError(f"{self.url}: read failed ({type(exc).__name__}: {exc})") from exc

    def close(self) -> None:
        try:
            self._fh.close()
        except Exception:  # noqa: BLE001
            pass

    def __enter__(self) -> "_RemoteShard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_remote_shard(url: str) -> tuple[IO[bytes], int]:
    """(stream, size) of a remote shard object: its listing must say a regular object of known size."""
    size = _remote_info(url)["size"]
    try:
        fh = filesystem(url).open(url, "rb", block_size=REMOTE_BLOCK, cache_type="readahead")
    except FileNotFoundError as exc:
        raise FormatError(f"{url}: no such object") from exc
    except Exception as exc:  # noqa: BLE001
        raise FormatError(f"{url}: cannot open ({type(exc).__name__}: {exc})") from exc
    return _RemoteShard(url, fh), size  # type: ignore[return-value]


def upload_shard_set(folder: Path, location: str, names: list[str]) -> None:
    """Upload a finished local shard set: shards and vocabulary first, the manifest last (readers look for
    the manifest first, so they never see a set whose shards are still uploading)."""
    fs = filesystem(location)
    for name in [*names, MANIFEST_NAME]:
        fs.put_file(str(folder / name), join(location, name))
