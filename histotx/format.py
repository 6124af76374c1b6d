"""The shard sample format: HistoTx's central contract.

One WebDataset sample per tile, three members sharing a key:

- ``{key}.jpg`` (or ``.png``/``.webp``): the tile, RGB, at a fixed physical scale (µm/px in the metadata);
- ``{key}.tx``: the transcripts under the tile as a sparse grid (:class:`TranscriptGrid`), a small
  binary container of numcodecs-compressed arrays with a JSON header (no pickle);
- ``{key}.json``: metadata (sample, patient, technology, tile origin, µm/px, panel, counts).

A shard set is a folder of ``*.tar`` shards plus ``manifest.json`` (see :func:`write_manifest`) and the
gene vocabulary (``vocab.tsv``, see :mod:`histotx.vocab`). This module is imported by the writer
(``sharding/``) and the reader (``histotx.data``) alike and must not import torch.

Shards are untrusted input (they travel between sites and object stores): every decoder here raises
:class:`FormatError` for any malformed member, never another exception; a grid names its codec, and only
the codecs HistoTx writes are accepted (:data:`GRID_CODECS`, never ``pickle``); sizes are checked before
anything is allocated, so a member decodes to at most ``MAX_EXPANSION`` × its size + ``EXPANSION_FLOOR``
bytes and an image to at most ``MAX_TILE_PX``² pixels of the size its metadata states.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import math
import os
import re
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from histotx.files import atomic_write_json

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
GRID_CODECS = ("blosc", "zstd", "lz4", "zlib")  # numcodecs ids a grid may name; anything else is refused
MAX_HEADER_BYTES = 1 << 16
MAX_EXPANSION = 64  # a grid member decodes to ≤ MAX_EXPANSION × its size + EXPANSION_FLOOR bytes
EXPANSION_FLOOR = 1 << 24
MAX_TILE_PX = 2048
"""Tile side bound: an image decodes to ≤ MAX_TILE_PX² px (12.6 MB of RGB), so a batch of 32 tiles decoded at
once (``decode_device: cuda``) holds ≤ 403 MB, and a loader worker decodes one tile at a time."""
MPP_RANGE = (0.01, 100.0)  # µm/px of a tile (and of its source level): anything else is not a microscope
MAX_TILE_UM = 4096.0  # tile side in µm (tile_px × mpp): bounds the transcript token grid a view makes
MAX_FOOTPRINT_UM = 1000.0  # a site's footprint (spot diameter, bin side): Visium spots are 55 µm
MAX_COORD = 1e9  # |origin| in level-0 px or µm
MAX_MANIFEST_BYTES = 256 << 20
MAX_VOCAB_BYTES = 64 << 20
SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.tar$")  # a plain file name of the shard folder
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


class FormatError(ValueError):
    """A shard member or manifest that does not follow this format."""


def check_sample_id(sample_id: str) -> str:
    """WebDataset splits a member name at its first dot, so ids are restricted to [A-Za-z0-9_-] (which also
    keeps ids that name output files from holding ``/`` or ``..``)."""
    if not isinstance(sample_id, str) or len(sample_id) > 200 or not _SAMPLE_ID.match(sample_id):
        raise FormatError(
            f"sample id {sample_id!r} is not allowed: use letters, digits, '_' and '-' only "
            "(WebDataset keys cannot hold dots)"
        )
    return sample_id


def output_path(out_dir: str | os.PathLike, sample_id: Any, suffix: str) -> Path:
    """``out_dir / f"{sample_id}{suffix}"`` for a sample id taken from data: the id is checked (no ``/``,
    ``..``, dots or absolute paths can pass :func:`check_sample_id`) and the path is confirmed to lie
    directly in ``out_dir``, so nothing a shard set names is written outside the output folder."""
    if not isinstance(sample_id, str):
        raise FormatError(f"sample id {sample_id!r} is not a string")
    check_sample_id(sample_id)
    out_dir = Path(out_dir)
    path = out_dir / f"{sample_id}{suffix}"
    if path.resolve().parent != out_dir.resolve():
        raise FormatError(f"{path}: would be written outside {out_dir}")
    return path


def tile_key(sample_id: str, name: str) -> str:
    """Key of one tile: ``{sample}__{name}``, e.g. ``s01__r00012_c00040`` or ``s01__spot000123``."""
    return f"{check_sample_id(sample_id)}__{name}"


@dataclass
class TranscriptGrid:
    """Expression under one tile, as measured: one *site* per spot, bin or molecule.

    ``xy[i]`` is site i's centre in tile pixels (x right, y down; pixel (0, 0) covers [0, 1)²);
    ``gene[offsets[i]:offsets[i+1]]`` and ``count[...]`` are its non-zero genes (global vocabulary ids)
    and counts. ``footprint_um`` is the native site size: spot diameter, bin side, or 0 for molecules;
    ``footprint_angle_deg`` turns a square footprint by that angle (x towards y, tile px; HEST pseudo-spots
    mapped through a rotated alignment), stored in the header only when not 0.
    """

    xy: np.ndarray
    offsets: np.ndarray
    gene: np.ndarray
    count: np.ndarray
    footprint_um: float
    footprint_shape: str
    footprint_angle_deg: float = 0.0

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
        if not (math.isfinite(self.footprint_angle_deg) and abs(self.footprint_angle_deg) <= 180):
            raise FormatError(
                f"footprint_angle_deg must be a finite angle in [-180, 180], got {self.footprint_angle_deg}"
            )

    def select_many(self, keep: np.ndarray) -> list["TranscriptGrid"]:
        """One subset per row of ``keep`` (bool, ``[subsets, n_sites]``), made in one pass. A subset of a
        valid grid is valid: it is not checked again (the loader takes ten per sample, one per view)."""
        subset, site = np.nonzero(keep)  # ordered by subset, then site
        nnz = (self.offsets[1:] - self.offsets[:-1])[site]
        offsets = np.zeros(site.size + 1, dtype=np.int64)
        np.cumsum(nnz, out=offsets[1:])
        entry = np.repeat(self.offsets[site] - offsets[:-1], nnz) + np.arange(offsets[-1])
        xy, gene, count = self.xy[site], self.gene[entry], self.count[entry]
        bounds = np.searchsorted(subset, np.arange(keep.shape[0] + 1))
        out = []
        for a, b in pairwise(bounds):
            grid = copy.copy(self)  # (no __init__: no re-validation)
            e0, e1 = offsets[a], offsets[b]
            grid.xy, grid.offsets, grid.gene, grid.count = xy[a:b], offsets[a : b + 1] - e0, gene[e0:e1], count[e0:e1]
            out.append(grid)
        return out

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
    if codec is None and grid.n_sites == 0:  # every tile of an image-only slide: encoded once
        return _empty_grid_bytes(float(grid.footprint_um), grid.footprint_shape, float(grid.footprint_angle_deg))
    return _encode_grid(grid, codec or _default_codec())


@functools.lru_cache(maxsize=16)
def _empty_grid_bytes(footprint_um: float, footprint_shape: str, footprint_angle_deg: float = 0.0) -> bytes:
    empty = TranscriptGrid.empty(footprint_um, footprint_shape)
    empty.footprint_angle_deg = footprint_angle_deg
    return _encode_grid(empty, _default_codec())


def _encode_grid(grid: TranscriptGrid, codec) -> bytes:
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
    if grid.footprint_angle_deg:  # absent when 0: shards of unrotated footprints stay as they were
        header["footprint_angle_deg"] = float(grid.footprint_angle_deg)
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([_GRID_MAGIC, struct.pack("<I", len(head)), head, *payloads])


def _json_object(data: bytes | str, what: str) -> dict[str, Any]:
    """A JSON object from untrusted bytes: strict UTF-8, no NaN/Infinity, bounded nesting."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray, memoryview)) else data
        if not isinstance(text, str):
            raise TypeError(f"expected bytes, got {type(data).__name__}")
        obj = json.loads(text, parse_constant=lambda c: _raise(f"non-finite number {c}"))
    except (ValueError, TypeError, RecursionError) as exc:
        raise FormatError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise FormatError(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


def _raise(message: str):
    raise ValueError(message)


def _count(value: Any, what: str, limit: int = 1 << 40) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise FormatError(f"{what} must be an integer in [0, {limit}], got {value}")
    return value


def _array_spec(spec: Any, name: str, dtype: type) -> tuple[tuple[int, ...], int, int]:
    """(shape, nbytes stored, bytes decoded) of one grid array, every field checked."""
    if not isinstance(spec, dict):
        raise FormatError(f"grid array {name} is missing from the header")
    if spec.get("dtype") != np.dtype(dtype).str:
        raise FormatError(f"grid array {name} has dtype {spec.get('dtype')}, expected {np.dtype(dtype).str}")
    shape = spec.get("shape")
    ndim = 2 if name == "xy" else 1
    if not isinstance(shape, list) or len(shape) != ndim:
        raise FormatError(f"grid array {name} must have a {ndim}-d shape, got {shape}")
    shape = tuple(_count(n, f"grid array {name} shape") for n in shape)
    if name == "xy" and shape[1] != 2:
        raise FormatError(f"grid array xy must have shape [n, 2], got {list(shape)}")
    nbytes = _count(spec.get("nbytes"), f"grid array {name} nbytes")
    raw = math.prod(shape) * np.dtype(dtype).itemsize
    if (raw == 0) != (nbytes == 0):
        raise FormatError(f"grid array {name}: {nbytes} stored bytes for shape {list(shape)}")
    return shape, nbytes, raw


@functools.lru_cache(maxsize=None)
def _decoder(codec_id: str):
    """One numcodecs decoder per allowed id: decoding needs no parameters, the stream carries them."""
    import numcodecs

    return {"blosc": numcodecs.Blosc, "zstd": numcodecs.Zstd, "lz4": numcodecs.LZ4, "zlib": numcodecs.Zlib}[codec_id]()


def _zstd_content_size(chunk: bytes) -> int | None:
    """Frame_Content_Size of a single zstd frame (RFC 8878 §3.1.1.1), or None when the frame omits it."""
    if len(chunk) < 6 or chunk[:4] != b"\x28\xb5\x2f\xfd":
        return None
    fhd = chunk[4]
    fcs_flag, single, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if size == 0 or len(chunk) < pos + size:
        return None
    value = int.from_bytes(chunk[pos : pos + size], "little")
    return value + 256 if size == 2 else value


def _stored_size(codec_id: str, chunk: bytes) -> int | None:
    """The decoded size a compressed chunk announces in its own header (checked before decoding)."""
    if codec_id == "blosc":  # 16-byte header: version, versionlz, flags, typesize, nbytes, blocksize, cbytes
        if len(chunk) < 16:
            return None
        nbytes, _, cbytes = struct.unpack("<III", chunk[4:16])
        return nbytes if cbytes == len(chunk) else None
    if codec_id == "lz4":  # numcodecs prefixes the block with its decoded size (int32)
        return struct.unpack("<i", chunk[:4])[0] if len(chunk) >= 4 else None
    if codec_id == "zstd":
        return _zstd_content_size(chunk)
    return None  # zlib: bounded by decompressobj(max_length) instead


def _decompress(codec_id: str, chunk: bytes, raw: int, name: str) -> bytes:
    """Exactly ``raw`` decoded bytes of one array, never allocating more (bombs and lies are FormatErrors)."""
    try:
        if codec_id == "zlib":
            d = zlib.decompressobj()
            out = d.decompress(chunk, raw)
            if not d.eof or d.unconsumed_tail or d.unused_data:
                raise FormatError(f"grid array {name}: zlib stream does not decode to exactly {raw} bytes")
        else:
            announced = _stored_size(codec_id, chunk)
            if announced != raw:
                raise FormatError(
                    f"grid array {name}: {codec_id} chunk announces {announced} decoded bytes, the "
                    f"header's shape needs {raw}"
                )
            out = bytes(_decoder(codec_id).decode(chunk))
    except FormatError:
        raise
    except Exception as exc:  # numcodecs raises RuntimeError/ValueError/... for damaged streams
        raise FormatError(
            f"grid array {name}: {codec_id} payload does not decode ({type(exc).__name__}: {exc})"
        ) from exc
    if len(out) != raw:
        raise FormatError(f"grid array {name}: decoded {len(out)} bytes, expected {raw}")
    return out


def decode_grid(data: bytes) -> TranscriptGrid:
    """Inverse of :func:`encode_grid` for untrusted bytes: any malformation is a :class:`FormatError`."""
    data = bytes(data)
    if len(data) < 8 or data[:4] != _GRID_MAGIC:
        raise FormatError("not a HistoTx transcript grid (bad magic)")
    (hlen,) = struct.unpack("<I", data[4:8])
    if hlen > min(MAX_HEADER_BYTES, len(data) - 8):
        raise FormatError(f"transcript grid header of {hlen} bytes does not fit the {len(data)}-byte member")
    header = _json_object(data[8 : 8 + hlen], "transcript grid header")
    if header.get("version") != FORMAT_VERSION:
        raise FormatError(f"transcript grid version {header.get('version')}, this HistoTx reads {FORMAT_VERSION}")
    codec = header.get("codec")
    codec_id = codec.get("id") if isinstance(codec, dict) else None
    if codec_id not in GRID_CODECS:
        raise FormatError(f"transcript grid codec {codec_id} is not allowed (HistoTx reads {', '.join(GRID_CODECS)})")
    arrays = header.get("arrays")
    if not isinstance(arrays, dict):
        raise FormatError("transcript grid header lacks its arrays")
    specs = {name: _array_spec(arrays.get(name), name, dtype) for name, dtype in _GRID_ARRAYS.items()}
    budget = MAX_EXPANSION * len(data) + EXPANSION_FLOOR
    decoded = sum(raw for _, _, raw in specs.values())
    if decoded > budget:
        raise FormatError(
            f"transcript grid would decode to {decoded} bytes from {len(data)} (limit {budget}): "
            "a decompression bomb or a damaged header"
        )
    pos, out = 8 + hlen, {}
    for name, dtype in _GRID_ARRAYS.items():
        shape, nbytes, raw = specs[name]
        chunk = data[pos : pos + nbytes]
        if len(chunk) != nbytes:
            raise FormatError(f"grid array {name} is truncated ({len(chunk)} of {nbytes} bytes)")
        pos += nbytes
        buf = _decompress(codec_id, chunk, raw, name) if nbytes else b""
        out[name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
    if pos != len(data):
        raise FormatError(f"transcript grid has {len(data) - pos} bytes after its last array")
    footprint_um, shape, angle = _footprint(header)
    return TranscriptGrid(footprint_um=footprint_um, footprint_shape=shape, footprint_angle_deg=angle, **out)


def _footprint(header: dict[str, Any]) -> tuple[float, str, float]:
    """(footprint_um, footprint_shape, footprint_angle_deg) of a grid header: a finite size in
    [0, MAX_FOOTPRINT_UM], a string, and an optional finite angle in [-180, 180] (0 when absent)."""
    footprint_um, shape = header.get("footprint_um"), header.get("footprint_shape")
    if (
        not isinstance(footprint_um, (int, float))
        or isinstance(footprint_um, bool)
        or not (math.isfinite(footprint_um) and 0 <= footprint_um <= MAX_FOOTPRINT_UM)
    ):
        raise FormatError(
            f"transcript grid footprint_um must be a finite number in [0, {MAX_FOOTPRINT_UM}] µm, got {footprint_um}"
        )
    if not isinstance(shape, str):
        raise FormatError(f"transcript grid footprint_shape must be a string, got {shape}")
    angle = header.get("footprint_angle_deg", 0.0)
    if (
        not isinstance(angle, (int, float))
        or isinstance(angle, bool)
        or not (math.isfinite(angle) and abs(angle) <= 180)
    ):
        raise FormatError(f"transcript grid footprint_angle_deg must be a finite angle in [-180, 180], got {angle}")
    return float(footprint_um), shape, float(angle)


@dataclass
class TileSample:
    """One decoded shard sample."""

    key: str
    image: bytes  # encoded image bytes; decoding is the loader's business
    image_ext: str
    grid: TranscriptGrid
    meta: dict[str, Any] = field(default_factory=dict)


REQUIRED_META = (
    "sample",
    "patient",
    "technology",
    "tile_px",
    "mpp",
    "origin_level0_px",
    "origin_um",
    "source_mpp",
    "n_sites",
    "n_genes",
    "total_count",
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


_META_TYPES = {
    "sample": str,
    "patient": str,
    "technology": str,
    "tile_px": int,
    "mpp": float,
    "source_mpp": float,
    "origin_level0_px": list,
    "origin_um": list,
    "n_sites": int,
    "n_genes": int,
    "total_count": float,
}


def _check_meta_ranges(meta: dict[str, Any], key: str) -> None:
    """Every number that sizes an allocation downstream, against the format's limits."""
    lo, hi = MPP_RANGE
    ranges = {
        "tile_px": (1 <= meta["tile_px"] <= MAX_TILE_PX, f"[1, {MAX_TILE_PX}]"),
        "mpp": (lo <= meta["mpp"] <= hi, f"[{lo}, {hi}] µm/px"),
        "source_mpp": (lo <= meta["source_mpp"] <= hi, f"[{lo}, {hi}] µm/px"),
        "tile_px × mpp": (meta["tile_px"] * meta["mpp"] <= MAX_TILE_UM, f"at most {MAX_TILE_UM} µm"),
        "origin_level0_px": (max(map(abs, meta["origin_level0_px"])) <= MAX_COORD, f"within ±{MAX_COORD:g}"),
        "origin_um": (max(map(abs, meta["origin_um"])) <= MAX_COORD, f"within ±{MAX_COORD:g}"),
        "n_sites": (meta["n_sites"] < 1 << 31, "below 2^31"),
        "n_genes": (meta["n_genes"] < 1 << 31, "below 2^31"),
    }
    for name, (ok, limit) in ranges.items():
        if not ok:
            value = meta["tile_px"] * meta["mpp"] if "×" in name else meta[name]
            raise FormatError(f"sample {key}: metadata {name} = {value} is out of the format's range ({limit})")


def _check_meta(meta: dict[str, Any], key: str) -> None:
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise FormatError(f"sample {key}: metadata lacks {', '.join(missing)}")
    for name, kind in _META_TYPES.items():
        v = meta[name]
        if kind is str:
            ok = isinstance(v, str)
        elif kind is int:
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= 0
        elif kind is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        else:
            ok = (
                isinstance(v, list)
                and len(v) == 2
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
            )
        if not ok:
            raise FormatError(f"sample {key}: metadata {name} = {v} is not a valid {kind.__name__}")
    _check_meta_ranges(meta, key)
    try:
        check_sample_id(meta["sample"])
    except FormatError as exc:
        raise FormatError(f"sample {key}: metadata {exc}") from None
    if not key.startswith(f"{meta['sample']}__"):
        raise FormatError(f"sample {key}: the key does not start with its metadata's sample id {meta['sample']!r}")


def _image_header(data: bytes, ext: str, what: str):
    """Pillow's lazy open (header only) of an encoded tile, checked to be the format its extension says."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # the size bound below replaces Pillow's bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[_IMAGE_FORMATS[ext]] if ext else list(_IMAGE_FORMATS.values()))
    except Exception as exc:  # Pillow raises UnidentifiedImageError, SyntaxError, struct.error, ...
        raise FormatError(f"{what} is not a readable {ext or 'image'} ({type(exc).__name__}: {exc})") from exc
    w, h = img.size
    if not (0 < w <= MAX_TILE_PX and 0 < h <= MAX_TILE_PX):
        img.close()
        raise FormatError(f"{what} is {w}×{h} px, beyond the {MAX_TILE_PX}-px bound (a decompression bomb?)")
    return img


def decode_sample(members: dict[str, Any]) -> TileSample:
    """Inverse of :func:`encode_sample` over raw member bytes (as webdataset yields them undecoded).

    Checks everything but the image's pixels (decoding those is the loader's business, see
    :func:`decode_image_rgb`): the image header must be a tile of the metadata's ``tile_px``."""
    key = members.get("__key__", "?")
    key = key if isinstance(key, str) else "?"
    if members.get("__problem__"):  # set by the shard reader (e.g. a member twice in one sample)
        raise FormatError(f"sample {key}: {members['__problem__']}")
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if image_ext is None or GRID_EXTENSION not in members or META_EXTENSION not in members:
        have = sorted(str(k) for k in members if not str(k).startswith("__"))
        raise FormatError(
            f"sample {key}: expected an image, .{GRID_EXTENSION} and .{META_EXTENSION}, "
            f"found {', '.join(have) or 'nothing'}"
        )
    meta = members[META_EXTENSION]
    meta = meta if isinstance(meta, dict) else _json_object(meta, f"sample {key}: metadata")
    _check_meta(meta, key)
    image = members[image_ext]
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise FormatError(f"sample {key}: image member is {type(image).__name__}, not bytes")
    image = bytes(image)
    with _image_header(image, image_ext, f"sample {key}: image") as img:
        if img.size != (meta["tile_px"], meta["tile_px"]):
            raise FormatError(
                f"sample {key}: image is {img.size[0]}×{img.size[1]} px, metadata says tile_px {meta['tile_px']}"
            )
    grid = members[GRID_EXTENSION]
    if not isinstance(grid, (bytes, bytearray, memoryview)):
        raise FormatError(f"sample {key}: grid member is {type(grid).__name__}, not bytes")
    try:
        grid = decode_grid(grid)
    except FormatError as exc:
        raise FormatError(f"sample {key}: {exc}") from exc
    return TileSample(key, image, image_ext, grid, meta)


# ---------------------------------------------------------------- files: bounded reads, the manifest


def read_regular(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes. A named pipe, device or folder is refused
    without blocking (opened non-blocking, checked with ``fstat``); errors are "file: problem"."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise FormatError(f"{path}: cannot open ({exc.strerror or exc})") from exc
    with os.fdopen(fd, "rb", buffering=0) as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{path}: not a regular file (a pipe, device or folder); refused")
        if st.st_size > limit:
            raise FormatError(f"{path}: {st.st_size} bytes, beyond the {limit}-byte limit for this file")
        os.set_blocking(fd, True)
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise FormatError(f"{path}: more than {limit} bytes, beyond the limit for this file")
    return data


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62


def _manifest_shards(shards: Any, bad) -> None:
    if not isinstance(shards, list):
        bad(f"shards must be a list, got {type(shards).__name__}")
    names = set()
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict):
            bad(f"shards[{i}] must be an object, got {type(entry).__name__}")
        name = entry.get("name")
        if not isinstance(name, str) or not SHARD_NAME.match(name):
            bad(f"shards[{i}].name {name!r} is not a plain *.tar file name of the shard folder")
        if name in names:
            bad(f"shard {name} is listed twice")
        names.add(name)
        for key in ("samples", "bytes"):
            if not _is_count(entry.get(key)):
                bad(f"shard {name}: {key} must be a non-negative integer, got {entry.get(key)!r}")
        if not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
            bad(f"shard {name}: sha256 must be 64 lower-case hex digits, got {entry.get('sha256')!r}")
        sid = entry.get("sample_id")
        if sid is not None and (not isinstance(sid, str) or not _SAMPLE_ID.match(sid)):
            bad(f"shard {name}: sample_id {sid!r} is not a valid sample id")


def _manifest_samples(samples: Any, bad) -> None:
    if not isinstance(samples, dict):
        bad(f"samples must be an object of sample id → record, got {type(samples).__name__}")
    for sid, rec in samples.items():
        if not _SAMPLE_ID.match(sid) or len(sid) > 200:
            bad(f"sample id {sid!r} is not allowed (letters, digits, '_' and '-' only)")
        if not isinstance(rec, dict):
            bad(f"samples.{sid} must be an object, got {type(rec).__name__}")
        if not isinstance(rec.get("status", ""), str):
            bad(f"samples.{sid}.status must be a string")
        if "tiles" in rec and not _is_count(rec["tiles"]):
            bad(f"samples.{sid}.tiles must be a non-negative integer, got {rec['tiles']!r}")
        if rec.get("tile_mpp") is not None and not _in_mpp_range(rec["tile_mpp"]):
            bad(f"samples.{sid}.tile_mpp must be a number within {MPP_RANGE} µm/px, got {rec['tile_mpp']!r}")


def _in_mpp_range(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and MPP_RANGE[0] <= v <= MPP_RANGE[1]


def _manifest_config(config: Any, bad) -> None:
    """The fields of the sharding config that readers use to size things: tile_px and mpp."""
    if not isinstance(config, dict):
        bad("config must be an object")
    tile_px = config.get("tile_px")
    if tile_px is not None and not (_is_count(tile_px) and 1 <= tile_px <= MAX_TILE_PX):
        bad(f"config.tile_px must be an integer in [1, {MAX_TILE_PX}], got {tile_px!r}")
    if config.get("mpp") is not None and not _in_mpp_range(config["mpp"]):
        bad(f"config.mpp must be a number within {MPP_RANGE} µm/px, got {config['mpp']!r}")


def check_manifest(manifest: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """The manifest, every field a reader uses checked (types, names, counts); a problem is a
    FormatError naming ``path`` and the field. Fills ``vocab`` with its default when absent."""

    def bad(problem: str):
        raise FormatError(f"{path}: {problem}")

    if manifest.get("format") != FORMAT_NAME:
        bad(f"not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        bad(f"format version {manifest.get('version')}, this HistoTx reads {FORMAT_VERSION}")
    vocab = manifest.setdefault("vocab", VOCAB_NAME)
    if not isinstance(vocab, str) or not _FILE_NAME.match(vocab):
        bad(f"vocab {vocab!r} is not a plain file name of the shard folder")
    _manifest_config(manifest.setdefault("config", {}), bad)
    _manifest_shards(manifest.get("shards"), bad)
    _manifest_samples(manifest.get("samples"), bad)
    totals = manifest.get("totals")
    if not isinstance(totals, dict):
        bad("totals is missing (or not an object)")
    for key in ("tiles", "shards"):
        if not _is_count(totals.get(key)):
            bad(f"totals.{key} must be a non-negative integer, got {totals.get(key)!r}")
    return manifest


def read_manifest(shard_dir: str | os.PathLike) -> dict[str, Any]:
    """The checked manifest of a shard folder (see :func:`check_manifest`); any problem is a FormatError
    "manifest.json: problem" (not UTF-8, not JSON, nested too deep, NaN, wrong types, missing fields)."""
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.exists():
        raise FormatError(f"{path}: no manifest; is this a HistoTx shard folder (made by `histotx shard`)?")
    return parse_manifest(read_regular(path, MAX_MANIFEST_BYTES), path)


def parse_manifest(data: bytes, path: str | os.PathLike) -> dict[str, Any]:
    """:func:`read_manifest` of the manifest's bytes (``path`` names it in errors)."""
    return check_manifest(_json_object(data, str(path)), path)


def manifest_sample(manifest: dict[str, Any], sample_id: str, where: str) -> dict[str, Any]:
    """The manifest's record of a tile's sample; a tile of a sample the manifest does not list is a
    FormatError naming ``where`` (the shard and tile)."""
    rec = manifest["samples"].get(sample_id)
    if rec is None:
        raise FormatError(f"{where}: sample {sample_id!r} is not in the shard set's manifest")
    return rec


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


JPEG_SUBSAMPLINGS = ("444", "422", "420")  # chroma subsampling of JPEG tiles (4:4:4 keeps H&E colour edges)


def encode_image_rgb(rgb: np.ndarray, ext: str = "jpg", quality: int = 90, subsampling: str = "444") -> bytes:
    """Encode an HxWx3 uint8 tile. JPEG goes through imagecodecs' libjpeg-turbo binding, ~2.7× faster than
    Pillow's (whose per-image overhead dominates at tile size); PNG and WebP through Pillow."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if ext == "jpg":
        import imagecodecs

        if subsampling not in JPEG_SUBSAMPLINGS:
            raise FormatError(f"JPEG subsampling must be one of {JPEG_SUBSAMPLINGS}, got {subsampling!r}")
        return bytes(
            imagecodecs.jpeg8_encode(
                rgb, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=subsampling
            )
        )
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(rgb, "RGB")
    if ext == "png":
        img.save(buf, format="PNG", compress_level=1)
    elif ext == "webp":
        img.save(buf, format="WEBP", quality=quality)
    else:
        raise FormatError(f"image extension must be one of {IMAGE_EXTENSIONS}, got {ext!r}")
    return buf.getvalue()


def decode_image_rgb(data: bytes) -> np.ndarray:
    """HxWx3 uint8 pixels of an encoded tile (JPEG/PNG/WebP, at most ``MAX_TILE_PX`` a side); a damaged or
    oversized image is a FormatError. JPEG goes through simplejpeg (libjpeg-turbo, ~1.6× faster than
    Pillow at tile size, same pixels): its header is read and bounded before any pixel buffer exists, and
    ``strict`` decoding turns libjpeg's recoverable warnings (a truncated scan) into errors."""
    data = bytes(data)
    if data[:2] == b"\xff\xd8":
        import simplejpeg

        try:
            h, w, colourspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as exc:
            raise FormatError(f"tile image is not a readable jpg ({exc})") from exc
        if not (0 < w <= MAX_TILE_PX and 0 < h <= MAX_TILE_PX):
            raise FormatError(f"tile image is {w}×{h} px, beyond the {MAX_TILE_PX}-px bound (a decompression bomb?)")
        if colourspace in ("YCbCr", "Gray", "RGB"):  # CMYK/YCCK: Pillow below
            try:
                return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
            except ValueError as exc:
                raise FormatError(f"tile image does not decode (jpg: {exc})") from exc
    with _image_header(data, "", "tile image") as img:
        try:
            rgb = np.asarray(img.convert("RGB"))
        except Exception as exc:  # truncated or corrupt pixel data
            raise FormatError(f"tile image does not decode ({type(exc).__name__}: {exc})") from exc
    return rgb
