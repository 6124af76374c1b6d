"""The shard sample format: HistoTx's central contract.

One WebDataset sample per tile, three members sharing a key:

- ``{key}.jpg`` (or ``.png``/``.webp``): the tile, RGB, at a fixed physical scale (µm/px in the metadata);
- ``{key}.tx``: the transcripts under the tile as a sparse grid (:class:`TranscriptGrid`), a small
  binary container of numcodecs-compressed arrays with a JSON header (no pickle);
- ``{key}.json``: metadata (sample, patient, technology, tile origin, µm/px, panel, counts).

A shard set is a folder of ``*.tar`` shards plus ``manifest.json`` (see :func:`write_manifest`) and the
gene vocabulary (``vocab.tsv``, see :mod:`histotx.vocab`). This module is imported by the writer
(``sharding/``) and the reader (``histotx.data``) alike and must not import torch.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "histotx-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
VOCAB_NAME = "vocab.tsv"
IMAGE_EXTENSIONS = ("jpg", "png", "webp")
GRID_EXTENSION = "tx"
META_EXTENSION = "json"
FOOTPRINT_SHAPES = ("disk", "square", "point")

_GRID_MAGIC = b"HTXG"
_GRID_ARRAYS = {"xy": np.float32, "offsets": np.int64, "gene": np.int32, "count": np.float32}
_SAMPLE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class FormatError(ValueError):
    """A shard member or manifest that does not follow this format."""


def check_sample_id(sample_id: str) -> str:
    """WebDataset splits a member name at its first dot, so ids are restricted to [A-Za-z0-9_-]."""
    if not _SAMPLE_ID.match(sample_id):
        raise FormatError(
            f"sample id {sample_id!r} is not allowed: use letters, digits, '_' and '-' only "
            "(WebDataset keys cannot hold dots)"
        )
    return sample_id


def tile_key(sample_id: str, name: str) -> str:
    """Key of one tile: ``{sample}__{name}``, e.g. ``s01__r00012_c00040`` or ``s01__spot000123``."""
    return f"{check_sample_id(sample_id)}__{name}"


@dataclass
class TranscriptGrid:
    """Expression under one tile, as measured: one *site* per spot, bin or molecule.

    ``xy[i]`` is site i's centre in tile pixels (x right, y down; pixel (0, 0) covers [0, 1)²);
    ``gene[offsets[i]:offsets[i+1]]`` and ``count[...]`` are its non-zero genes (global vocabulary ids)
    and counts. ``footprint_um`` is the native site size: spot diameter, bin side, or 0 for molecules.
    """

    xy: np.ndarray
    offsets: np.ndarray
    gene: np.ndarray
    count: np.ndarray
    footprint_um: float
    footprint_shape: str

    def __post_init__(self) -> None:
        self.xy = np.ascontiguousarray(self.xy, dtype=np.float32).reshape(-1, 2)
        self.offsets = np.ascontiguousarray(self.offsets, dtype=np.int64)
        self.gene = np.ascontiguousarray(self.gene, dtype=np.int32)
        self.count = np.ascontiguousarray(self.count, dtype=np.float32)
        self.validate()

    @property
    def n_sites(self) -> int:
        return int(self.xy.shape[0])

    @property
    def total_count(self) -> float:
        return float(self.count.sum(dtype=np.float64))

    def validate(self) -> None:
        n = self.xy.shape[0]
        if self.offsets.shape != (n + 1,):
            raise FormatError(f"offsets must have n_sites + 1 = {n + 1} entries, got {self.offsets.shape}")
        if n + 1 and self.offsets[0] != 0:
            raise FormatError("offsets must start at 0")
        if np.any(np.diff(self.offsets) < 0):
            raise FormatError("offsets must be non-decreasing")
        if self.gene.shape != self.count.shape or self.gene.shape[0] != self.offsets[-1]:
            raise FormatError(
                f"gene ({self.gene.shape}) and count ({self.count.shape}) must both hold offsets[-1] = "
                f"{self.offsets[-1]} entries"
            )
        if not np.all(np.isfinite(self.count)) or not np.all(np.isfinite(self.xy)):
            raise FormatError("counts and positions must be finite")
        if self.gene.size and self.gene.min() < 0:
            raise FormatError("gene ids must be >= 0")
        if self.footprint_shape not in FOOTPRINT_SHAPES:
            raise FormatError(f"footprint_shape must be one of {FOOTPRINT_SHAPES}, got {self.footprint_shape!r}")

    @classmethod
    def empty(cls, footprint_um: float = 0.0, footprint_shape: str = "point") -> "TranscriptGrid":
        return cls(np.zeros((0, 2)), np.zeros(1), np.zeros(0), np.zeros(0), footprint_um, footprint_shape)

    def site_of_entry(self) -> np.ndarray:
        """Site index of each (gene, count) entry: the CSR rows expanded."""
        return np.repeat(np.arange(self.n_sites), np.diff(self.offsets))


@functools.lru_cache(maxsize=1)
def _default_codec():
    import numcodecs

    return numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)


def encode_grid(grid: TranscriptGrid, codec=None) -> bytes:
    """Serialise a grid: magic, header length, JSON header (codec config, dtypes, shapes), payloads."""
    codec = codec or _default_codec()
    payloads, arrays = [], {}
    for name, dtype in _GRID_ARRAYS.items():
        arr = np.ascontiguousarray(getattr(grid, name), dtype=dtype)
        buf = bytes(codec.encode(arr)) if arr.size else b""  # blosc cannot round-trip empty buffers
        arrays[name] = {"dtype": np.dtype(dtype).str, "shape": list(arr.shape), "nbytes": len(buf)}
        payloads.append(buf)
    header = {
        "version": FORMAT_VERSION,
        "codec": codec.get_config(),
        "arrays": arrays,
        "footprint_um": float(grid.footprint_um),
        "footprint_shape": grid.footprint_shape,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([_GRID_MAGIC, struct.pack("<I", len(head)), head, *payloads])


def decode_grid(data: bytes) -> TranscriptGrid:
    import numcodecs

    if len(data) < 8 or data[:4] != _GRID_MAGIC:
        raise FormatError("not a HistoTx transcript grid (bad magic)")
    (hlen,) = struct.unpack("<I", data[4:8])
    try:
        header = json.loads(data[8 : 8 + hlen])
    except ValueError as exc:
        raise FormatError(f"transcript grid header is not JSON: {exc}") from exc
    codec = numcodecs.get_codec(header["codec"])
    pos, out = 8 + hlen, {}
    for name, dtype in _GRID_ARRAYS.items():
        spec = header["arrays"][name]
        if np.dtype(spec["dtype"]) != np.dtype(dtype):
            raise FormatError(f"grid array {name!r} has dtype {spec['dtype']}, expected {np.dtype(dtype).str}")
        chunk = data[pos : pos + spec["nbytes"]]
        if len(chunk) != spec["nbytes"]:
            raise FormatError(f"grid array {name!r} is truncated")
        pos += spec["nbytes"]
        raw = codec.decode(chunk) if spec["nbytes"] else b""
        out[name] = np.frombuffer(raw, dtype=dtype).reshape(spec["shape"])
    return TranscriptGrid(footprint_um=header["footprint_um"], footprint_shape=header["footprint_shape"], **out)


@dataclass
class TileSample:
    """One decoded shard sample."""

    key: str
    image: bytes  # encoded image bytes; decoding is the loader's business
    image_ext: str
    grid: TranscriptGrid
    meta: dict[str, Any] = field(default_factory=dict)


REQUIRED_META = (
    "sample", "patient", "technology", "tile_px", "mpp", "origin_level0_px", "origin_um", "source_mpp",
    "n_sites", "n_genes", "total_count",
)


def encode_sample(sample: TileSample) -> dict[str, Any]:
    """The member dict a ``webdataset.TarWriter`` writes."""
    if sample.image_ext not in IMAGE_EXTENSIONS:
        raise FormatError(f"image extension must be one of {IMAGE_EXTENSIONS}")
    missing = [k for k in REQUIRED_META if k not in sample.meta]
    if missing:
        raise FormatError(f"tile {sample.key}: metadata lacks {missing}")
    return {
        "__key__": sample.key,
        sample.image_ext: sample.image,
        GRID_EXTENSION: encode_grid(sample.grid),
        META_EXTENSION: json.dumps(sample.meta, sort_keys=True).encode(),
    }


def decode_sample(members: dict[str, Any]) -> TileSample:
    """Inverse of :func:`encode_sample` over raw member bytes (as webdataset yields them undecoded)."""
    key = members.get("__key__", "?")
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if image_ext is None or GRID_EXTENSION not in members or META_EXTENSION not in members:
        have = sorted(k for k in members if not k.startswith("__"))
        raise FormatError(f"sample {key}: expected an image, .{GRID_EXTENSION} and .{META_EXTENSION}, found {have}")
    meta = members[META_EXTENSION]
    meta = json.loads(meta) if isinstance(meta, (bytes, str)) else meta
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise FormatError(f"sample {key}: metadata lacks {missing}")
    return TileSample(key, bytes(members[image_ext]), image_ext, decode_grid(bytes(members[GRID_EXTENSION])), meta)


# ---------------------------------------------------------------- files: atomic writes, checksums, manifest


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then rename: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(shard_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.exists():
        raise FormatError(f"{path}: no manifest; is this a HistoTx shard folder (made by `histotx shard`)?")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise FormatError(f"{path}: format version {manifest.get('version')}, this HistoTx reads {FORMAT_VERSION}")
    return manifest


def new_manifest(config: dict[str, Any], shards: list[dict], samples: dict[str, dict]) -> dict[str, Any]:
    """Manifest of a shard set: shards (name, samples, bytes, sha256), per-sample stats, resolved config."""
    ok = [s for s in samples.values() if s.get("status") == "ok"]
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "vocab": VOCAB_NAME,
        "config": config,
        "shards": sorted(shards, key=lambda s: s["name"]),
        "samples": dict(sorted(samples.items())),
        "totals": {
            "shards": len(shards),
            "tiles": sum(s["samples"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "samples_ok": len(ok),
            "samples_failed": len(samples) - len(ok),
        },
    }


def write_manifest(shard_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    path = Path(shard_dir) / MANIFEST_NAME
    atomic_write_json(path, manifest)
    return path


def encode_image_rgb(rgb: np.ndarray, ext: str = "jpg", quality: int = 90) -> bytes:
    """Encode an HxWx3 uint8 tile with Pillow (JPEG by default)."""
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB")
    if ext == "jpg":
        img.save(buf, format="JPEG", quality=quality, subsampling=0)
    elif ext == "png":
        img.save(buf, format="PNG", compress_level=1)
    elif ext == "webp":
        img.save(buf, format="WEBP", quality=quality)
    else:
        raise FormatError(f"image extension must be one of {IMAGE_EXTENSIONS}, got {ext!r}")
    return buf.getvalue()


def decode_image_rgb(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))
