"""Whole-slide images, read lazily: tifffile pyramids through zarr, OME-Zarr images (a SpatialData store's
image element) through zarr, plain PNG/JPEG through Pillow.

Aperio SVS, pyramidal TIFF (levels as SubIFDs or pages) and OME-TIFF all come through
``tifffile``; each pyramid level is opened as a zarr array over the file so a region read decodes
only the tiles it touches, never a whole level. Levels stored as tiled pages (nearly every WSI)
additionally keep their recently decoded tiles in a bounded LRU cache (:class:`_TiledLevel`), so that
neighbouring output tiles — which share source tiles whenever the two tile grids differ — decode each
source tile once; zarr offers no such cache and decodes again on every read. A reader going down the slide
row by row lets the cache forget the rows above it (:meth:`Slide.forget_above`), so it stays a few rows deep and
reuses its memory. JPEG tiles are decoded by simplejpeg as standalone JPEGs (checked equal to tifffile's decode
on each level's first textured tile). A level can also be read
*reduced* by 2, 4 or 8 (each output px the mean of a k×k block): JPEG tiles are then decoded at that scale
inside libjpeg-turbo (DCT scaling, via simplejpeg; checked against a full decode up to a level's first textured
tile), which costs a fraction of a full decode, other data is
decoded in full and area-averaged. µm/px comes from the
file (SVS ``MPP =``, OME ``PhysicalSizeX``, TIFF X/YResolution), the data (a hint) or an override.

Damage is an error, never background. tifffile opens a truncated file with only logged warnings and
reads tiles past its end as empty (white), so opening checks the whole file cheaply: everything tifffile
logs while parsing is an error, every IFD (pages and SubIFD levels) lies inside the file, every data
segment (offset + byte count) ends inside it, and no level is all empty segments. A segment that then
fails to decode raises an error naming the level, the tile and its offset. Empty segments (byte count 0)
in an otherwise intact level are background, as sparse TIFFs (e.g. Philips) mean them.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histotx.sharding.errors import InputError

log = logging.getLogger(__name__)

_SVS_MPP = re.compile(r"\bMPP\s*=\s*([0-9.eE+-]+)")
_PLAIN_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
_PLAUSIBLE_MPP = (0.02, 100.0)  # outside this a resolution tag is a default (72 dpi), not a measurement
_OME_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
TILE_CACHE_BYTES = 256 * 1024 * 1024
THUMB_BAND_BYTES = 64 * 1024 * 1024
"""A thumbnail (or tissue-mask picture) is made from bands of its level holding at most about this many decoded
bytes, so its memory follows the thumbnail, not the level it comes from (a slide without a pyramid)."""


class _TiledLevel:
    """One tiled RGB (or grey) TIFF page read through tifffile's segment API with a shared LRU cache of
    decoded tiles. ``region(y0, y1, x0, x1)`` mirrors ``zarr_array[y0:y1, x0:x1]`` for in-bounds boxes."""

    def __init__(self, tif, page, level: int, cache: "OrderedDict", budget: list[int]) -> None:
        self._tif, self._page, self._level = tif, page, level
        self._th, self._tw = page.chunks[:2]
        self._per_row = -(-page.imagewidth // self._tw)
        self._cache, self._budget = cache, budget  # budget: [bytes still free], shared by all levels
        self._key = id(page)
        self._dct = standalone_jpeg_prefix(page)  # None, or the bytes to put before a tile for a standalone JPEG
        self._dct_checked = False  # scaled decodes are compared with full ones up to a textured tile
        self._standalone = self._dct is not None  # full decodes as standalone JPEGs, until one differs
        self._standalone_checked = False  # ... from tifffile's decode, checked on the first textured tile
        self._forgotten_rows = 0  # tile rows above this one have left the cache (forget_above)

    @staticmethod
    def supports(series_level) -> bool:
        pages = getattr(series_level, "pages", [])
        if len(pages) != 1:
            return False
        page = pages[0]
        return (
            page is not None
            and page.is_tiled
            and page.planarconfig == 1
            and page.imagedepth == 1
            and series_level.axes in ("YXS", "YX")
            and page.dtype == "uint8"
        )

    def _tiles(self, indices: list[int], k: int = 1) -> dict[int, "np.ndarray"]:
        page, out, missing = self._page, {}, []
        for i in indices:
            hit = self._cache.get((self._key, i, k))
            if hit is None:
                missing.append(i)
            else:
                self._cache.move_to_end((self._key, i, k))
                out[i] = hit
        if missing:
            fd = self._tif.filehandle.fileno()  # pread: no seek, no lock, no generator per tile
            for i in missing:
                count = page.databytecounts[i]
                tile = self._decode(os.pread(fd, count, page.dataoffsets[i]) if count else None, i, k)
                out[i] = tile
                self._cache[(self._key, i, k)] = tile
                self._budget[0] -= tile.nbytes
            while self._budget[0] < 0 and self._cache:
                _, old = self._cache.popitem(last=False)
                self._budget[0] += old.nbytes
        return out

    def _decode(self, data: bytes | None, i: int, k: int = 1) -> np.ndarray:
        """Tile ``i`` decoded (reduced by ``k``); an empty segment (byte count 0) is background, a damaged one an
        InputError."""
        page = self._page
        count = page.databytecounts[i]
        if count == 0:
            return np.full((self._th // k, self._tw // k, 3), 255, np.uint8)
        if data is None or len(data) != count:
            raise InputError(
                self._tif.filehandle.path,
                f"{_segment_name(page, self._level, i)}: read "
                f"{0 if data is None else len(data)} of "
                f"{count} bytes (file truncated or changed since opened)",
            )
        try:
            if k > 1 and self._dct is not None:
                return self._decode_scaled(data, i, k)
            if self._standalone and self._dct is not None:  # (a failed scaled-decode check drops the prefix)
                tile = self._decode_standalone(data, i)
            else:
                tile = np.asarray(page.decode(data, i, jpegtables=page.jpegtables)[0]).reshape(self._th, self._tw, -1)
        except InputError:
            raise
        except Exception as exc:  # imagecodecs/tifffile/simplejpeg raise many types for damaged data
            raise InputError(
                self._tif.filehandle.path,
                f"{_segment_name(page, self._level, i)} does not decode ({type(exc).__name__}: {exc})",
            ) from exc
        return tile if k == 1 else area_reduce(tile, k)

    def _decode_standalone(self, data: bytes, i: int) -> np.ndarray:
        """Full decode by simplejpeg as a standalone JPEG: the same libjpeg-turbo work as tifffile's (imagecodecs,
        abbreviated stream), ~9 % fewer instructions per tile (callgrind) and no per-tile wrapping. Tiles are
        compared with tifffile's decode until one with texture (a flat tile decodes alike by any IDCT) is equal;
        a level where one differs is decoded by tifffile from then on."""
        import simplejpeg

        tile = simplejpeg.decode_jpeg(self._dct + data[2:], colorspace="RGB")
        if not self._standalone_checked:
            ref = np.asarray(self._page.decode(data, i, jpegtables=self._page.jpegtables)[0]).reshape(
                self._th, self._tw, -1
            )
            if ref.shape != tile.shape or not np.array_equal(ref, tile):
                log.info(
                    "%s level %d: simplejpeg decodes JPEG tiles differently from tifffile; decoding by tifffile",
                    self._tif.filehandle.path,
                    self._level,
                )
                self._standalone = False
                return ref
            self._standalone_checked = int(np.ptp(tile)) > 32
        return tile

    def _decode_scaled(self, data: bytes, i: int, k: int) -> np.ndarray:
        """DCT-scaled decode at 1/k, checked against a full decode area-averaged (mean difference ≤ 3 of 255)
        until a tile with texture has passed (a flat tile shows colour errors, not spatial ones); a level whose
        JPEG the check rejects is decoded in full from then on."""
        import simplejpeg

        h, w = self._th // k, self._tw // k
        tile = simplejpeg.decode_jpeg(self._dct + bytes(data)[2:], colorspace="RGB", min_height=h, min_width=w)
        if tile.shape != (h, w, 3):
            raise ValueError(f"scaled decode gave {tile.shape}, expected {(h, w, 3)}")
        if not self._dct_checked:
            full = np.asarray(self._page.decode(data, i, jpegtables=self._page.jpegtables)[0]).reshape(
                self._th, self._tw, -1
            )
            if full.shape[-1] != 3 or np.abs(area_reduce(full, k).astype(np.int16) - tile).mean() > 3:
                log.warning(
                    "%s level %d: decoding JPEG tiles at reduced scale does not match a full decode; decoding in full",
                    self._tif.filehandle.path,
                    self._level,
                )
                self._dct = None
                return area_reduce(full, k)
            self._dct_checked = int(np.ptp(full)) > 32
        return tile

    def forget_above(self, y: int) -> None:
        """Drop the cached tiles of this level (at any reduction) lying wholly above level row ``y``; the cache is
        scanned only when ``y`` enters a new row of tiles."""
        row = y // self._th
        if row <= self._forgotten_rows:
            return
        self._forgotten_rows = row
        stale = [key for key in self._cache if key[0] == self._key and key[1] // self._per_row < row]
        for key in stale:
            self._budget[0] += self._cache.pop(key).nbytes

    def forget_reduced(self, k: int) -> None:
        """Drop every cached tile of this level decoded at reduction ``k`` (a thumbnail's, read once)."""
        stale = [key for key in self._cache if key[0] == self._key and key[2] == k]
        for key in stale:
            self._budget[0] += self._cache.pop(key).nbytes

    def reducible(self, k: int) -> bool:
        """Whether tiles split into whole k×k blocks, so the level reduced by ``k`` is read tile by tile."""
        return self._th % k == 0 and self._tw % k == 0

    def region(self, y0: int, y1: int, x0: int, x1: int, k: int = 1) -> np.ndarray:
        """``[y0:y1, x0:x1]`` of the level reduced by ``k`` (needs :meth:`reducible`); in-bounds boxes only."""
        th, tw = self._th // k, self._tw // k
        rows, cols = range(y0 // th, (y1 - 1) // th + 1), range(x0 // tw, (x1 - 1) // tw + 1)
        tiles = self._tiles([r * self._per_row + c for r in rows for c in cols], k)
        first = next(iter(tiles.values()))
        out = np.empty((y1 - y0, x1 - x0, first.shape[-1]), np.uint8)
        for r in rows:
            for c in cols:
                ty0, tx0 = max(y0, r * th), max(x0, c * tw)
                ty1, tx1 = min(y1, (r + 1) * th), min(x1, (c + 1) * tw)
                out[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0] = tiles[r * self._per_row + c][
                    ty0 - r * th : ty1 - r * th, tx0 - c * tw : tx1 - c * tw
                ]
        return out


_ADOBE_RGB = bytes.fromhex("ffee000e") + b"Adobe" + bytes([0, 100, 0, 0, 0, 0, 0])  # APP14, transform 0: no YCbCr


def standalone_jpeg_prefix(page) -> bytes | None:
    """For a page of 8-bit 3-sample JPEG tiles, the prefix that makes a tile a standalone JPEG a decoder can
    scale: SOI, an Adobe marker saying "RGB, no colour transform" where tifffile would decode the tile as
    RGB (Aperio's photometric-RGB tiles carry no JFIF marker and are not YCbCr), and the shared tables."""
    if page.compression != 7 or page.samplesperpixel != 3 or page.bitspersample != 8 or page.extrasamples:
        return None
    tables = page.jpegtables or b""
    if tables and not (tables[:2] == b"\xff\xd8" and tables[-2:] == b"\xff\xd9"):
        return None
    if page.photometric == 2:  # a tile with its own JFIF marker stays YCbCr to libjpeg (JFIF wins), as to tifffile
        prefix = b"\xff\xd8" + _ADOBE_RGB
    elif page.photometric == 6:  # YCbCr, libjpeg's default for 3 components
        prefix = b"\xff\xd8"
    else:
        return None
    return prefix + tables[2:-2]


@functools.cache
def _cv2():
    import cv2

    cv2.setNumThreads(1)  # one core per sharding worker: parallelism comes from the worker processes
    return cv2


def area_reduce(rgb: np.ndarray, k: int) -> np.ndarray:
    """Each output px the mean of a k×k block (partial blocks at the far edges dropped)."""
    cv2, h, w = _cv2(), rgb.shape[0] // k, rgb.shape[1] // k
    return cv2.resize(np.ascontiguousarray(rgb[: h * k, : w * k]), (w, h), interpolation=cv2.INTER_AREA)


def _segment_name(page, level: int | str, i: int) -> str:
    """``level 0 tile 68 (row 5, col 8) at offset 123456`` — what a person needs to find a bad segment."""
    kind = "tile" if page.is_tiled else "strip"
    where = f"level {level}" if isinstance(level, int) else level
    text = f"{where} {kind} {i}"
    if page.is_tiled and page.planarconfig == 1 and page.imagedepth == 1:
        per_row = -(-page.imagewidth // page.tilewidth)
        per_plane = per_row * -(-page.imagelength // page.tilelength)
        if i < per_plane:
            text += f" (row {i // per_row}, col {i % per_row})"
    return f"{text} at offset {page.dataoffsets[i]}"


class _TiffLog(logging.Handler):
    """What tifffile logs while parsing a file; its warnings ("corrupted tag list", ...) mean damage."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = re.sub(r"^<[^>]*>\s*", "", record.getMessage())  # drop tifffile's "<tifffile.TiffFile '…'>"
        if message not in self.messages:
            self.messages.append(message)


@contextmanager
def _tifffile_log():
    logger = logging.getLogger("tifffile")
    handler = _TiffLog()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def _check_segments(page, label: str | int, size: int, path: Path) -> None:
    """One page's data segments: as many offsets as byte counts, not all empty for a level, all inside
    the file of ``size`` bytes."""
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    if offsets.shape != counts.shape:
        raise InputError(path, f"damaged TIFF: {label} has {offsets.size} data offsets but {counts.size} byte counts")
    if offsets.size and not counts.any() and isinstance(label, int):
        raise InputError(
            path,
            f"level {label} has no image data: all its {counts.size} "
            f"{'tiles' if page.is_tiled else 'strips'} are 0 bytes",
        )
    past = np.flatnonzero((offsets < 0) | (counts < 0) | (offsets + counts > size))
    if past.size:
        i = int(past[0])
        raise InputError(
            path,
            f"truncated: {_segment_name(page, label, i)} + {counts[i]} bytes ends past "
            f"the end of the file ({size} bytes); {past.size} of {offsets.size} segments "
            "of this level are beyond it",
        )


def _check_tiff_file(tif, series, path: Path) -> None:
    """The whole-file check at open: every IFD and every data segment inside the file, no empty level.

    Pages of the main IFD chain are named ``page i``, pyramid levels ``level i``; costs one pass over the
    offset tables, no pixel data is read.
    """
    size = tif.filehandle.size
    labelled: dict[int, tuple[str | int, object]] = {}
    for li, level in enumerate(series.levels):
        for page in level.pages:
            if page is not None:
                labelled[id(page)] = (li, page)
    pages, lost_ifds = [], []
    for pi, page in enumerate(tif.pages):  # reads the whole IFD chain
        pages.append(labelled.pop(id(page), (f"page {pi}", page)))
        tag = page.tags.get("SubIFDs") if hasattr(page, "tags") else None
        for k, offset in enumerate(tag.value if tag is not None else ()):
            if offset + 2 > size:
                lost_ifds.append(
                    f"page {pi}'s SubIFD {k} (pyramid level {k + 1}) lies at offset {offset}, past "
                    f"the end of the file ({size} bytes)"
                )
    pages += labelled.values()  # levels stored as SubIFDs
    for label, page in pages:
        _check_segments(page, label, size, path)
    if lost_ifds:
        raise InputError(path, f"truncated or damaged: {'; '.join(lost_ifds)}")


def _as_rgb8(patch: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 from a decoded region: gray (h, w) or (h, w, 1) repeated, alpha dropped, rescaled."""
    if patch.ndim == 3 and patch.shape[-1] == 1:
        patch = patch[..., 0]
    if patch.ndim == 2:
        patch = np.repeat(patch[..., None], 3, axis=-1)
    if patch.shape[-1] == 4:
        patch = patch[..., :3]
    if patch.dtype != np.uint8:
        patch = _to_uint8(patch)
    return patch


@dataclass(frozen=True)
class Level:
    height: int
    width: int
    downsample_x: float  # level-0 px per level px
    downsample_y: float


def _mpp_from_tiff(tif) -> tuple[float | None, str]:
    """µm/px of level 0 from the file's own metadata, with the name of the source."""
    page = tif.pages[0]
    desc = page.description or ""
    if tif.is_svs:
        m = _SVS_MPP.search(desc)
        if m:
            return float(m.group(1)), "svs:MPP"
    if tif.is_ome and tif.ome_metadata:
        import tifffile

        meta = tifffile.xml2dict(tif.ome_metadata).get("OME", {})
        image = meta.get("Image", {})
        image = image[0] if isinstance(image, list) else image
        pixels = image.get("Pixels", {})
        size = pixels.get("PhysicalSizeX")
        if size:
            unit = pixels.get("PhysicalSizeXUnit", "µm")
            if unit not in _OME_UNIT_TO_UM:
                raise InputError(tif.filehandle.path, f"OME PhysicalSizeXUnit {unit!r} is not a length unit")
            return float(size) * _OME_UNIT_TO_UM[unit], "ome:PhysicalSizeX"
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        per_unit_um = {2: 25400.0, 3: 10000.0}.get(unit)
        if per_unit_um and num > 0 and den > 0:
            mpp = per_unit_um * den / num
            if _PLAUSIBLE_MPP[0] <= mpp <= _PLAUSIBLE_MPP[1]:
                return mpp, "tiff:XResolution"
            log.debug("%s: ignoring implausible resolution tag (%.3g µm/px)", tif.filehandle.path, mpp)
    return None, "none"


_NGFF_UNIT_TO_UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6}


def _mpp_from_ngff(image: dict) -> tuple[float | None, str]:
    """µm/px of an OME-NGFF image's first level: its x scale, when the x axis has a length unit."""
    axes = image.get("axes", [])
    units = [a.get("unit") if isinstance(a, dict) else None for a in axes]
    names = [a["name"] if isinstance(a, dict) else str(a) for a in axes]
    if "x" not in names or units[names.index("x")] not in _NGFF_UNIT_TO_UM:
        return None, "none"
    for t in image["datasets"][0].get("coordinateTransformations", []):
        if t.get("type") == "scale":
            mpp = float(t["scale"][names.index("x")]) * _NGFF_UNIT_TO_UM[units[names.index("x")]]
            if _PLAUSIBLE_MPP[0] <= mpp <= _PLAUSIBLE_MPP[1]:
                return mpp, "ngff:scale"
    return None, "none"


class Slide:
    """A pyramid of RGB levels with a known level-0 µm/px.

    ``read_region(level, x, y, w, h)`` returns an (h, w, 3) uint8 array of that level, filling the
    part outside the image with white (background), so tiles at the border need no special case.
    """

    def __init__(self, path: str | Path, mpp: float | None = None, mpp_hint: float | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(self.path, "slide file not found")
        self._tif = None
        self._levels_data: list = []
        try:
            if self.path.suffix.lower() in _PLAIN_IMAGE_SUFFIXES:
                file_mpp, self.mpp_source = None, "none"
                self._open_plain()
            elif self.path.is_dir():
                file_mpp, self.mpp_source = self._open_ome_zarr()
            else:
                file_mpp, self.mpp_source = self._open_tiff()
        except Exception as exc:  # tifffile/PIL raise many types for damaged files
            self.close()
            if isinstance(exc, InputError):
                raise
            raise InputError(self.path, f"cannot open slide ({type(exc).__name__}: {exc})") from exc
        self.file_mpp = file_mpp
        if mpp is not None:
            self.mpp, self.mpp_source = float(mpp), "override"
        elif file_mpp is not None:
            self.mpp = file_mpp
        elif mpp_hint is not None:
            self.mpp, self.mpp_source = float(mpp_hint), "data"
        else:
            raise InputError(
                self.path,
                "slide has no µm/px in its metadata (SVS MPP, OME PhysicalSizeX or TIFF resolution); "
                "set `mpp:` for this sample in the cohort file",
            )

    # ------------------------------------------------------------------ opening
    def _open_tiff(self) -> tuple[float | None, str]:
        import tifffile

        with _tifffile_log() as logged:
            tif = tifffile.TiffFile(self.path)
            self._tif = tif
            if not tif.series:
                raise InputError(self.path, "TIFF holds no image series (truncated, or not a slide image?)")
            series = tif.series[0]
            _check_tiff_file(tif, series, self.path)
            levels = series.levels
        if logged:
            raise InputError(
                self.path,
                f"damaged TIFF (truncated or corrupt): tifffile reports "
                f"{'; '.join(logged[:3])} (the file has {tif.filehandle.size} bytes)",
            )
        axes = series.axes
        if axes not in ("YXS", "YX", "CYX", "SYX"):
            raise InputError(self.path, f"unsupported slide axes {axes} (expected RGB YXS, CYX or grey YX)")
        self._axes = axes
        cache, budget = OrderedDict(), [TILE_CACHE_BYTES]
        for i, level in enumerate(levels):
            if _TiledLevel.supports(level):
                self._levels_data.append(_TiledLevel(tif, level.pages[0], i, cache, budget))
            else:
                import zarr  # only for levels the tile cache cannot read (strips, planar, odd dtypes)

                self._levels_data.append(zarr.open(series.aszarr(level=i), mode="r"))
        mpp, source = _mpp_from_tiff(tif)
        self._init_levels([self._hw(level.shape) for level in series.levels])
        return mpp, source

    def _open_ome_zarr(self) -> tuple[float | None, str]:
        """An OME-Zarr image (OME-NGFF ``multiscales``: a SpatialData image element, bioformats2raw's series):
        each level a zarr array read chunk by chunk, never whole. µm/px only where the first level's scale is
        in a length unit (SpatialData writes none: its sample's data or `mpp:` says it)."""
        import zarr

        try:
            group = zarr.open_group(str(self.path), mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise InputError(self.path, "a folder that is not an OME-Zarr image (no zarr group in it)") from exc
        attrs = group.attrs.asdict()
        scales = (attrs.get("ome") or {}).get("multiscales") or attrs.get("multiscales")
        if not scales:
            raise InputError(
                self.path, "a folder that is not an OME-Zarr image: no `multiscales` in its zarr attributes"
            )
        image = scales[0]
        names = [a["name"] if isinstance(a, dict) else str(a) for a in image.get("axes", [])]
        axes = {"cyx": "CYX", "yx": "YX", "yxc": "YXS"}.get("".join(names).lower())
        if axes is None:
            raise InputError(self.path, f"unsupported OME-Zarr axes {names} (expected c, y, x or y, x)")
        self._axes = axes
        self._levels_data = [group[d["path"]] for d in image["datasets"]]
        self._init_levels([self._hw(a.shape) for a in self._levels_data])
        return _mpp_from_ngff(image)

    def _open_plain(self) -> None:
        from PIL import Image

        with Image.open(self.path) as img:
            rgb = np.asarray(img.convert("RGB"))
        self._axes = "YXS"
        self._levels_data = [rgb]
        self._init_levels([rgb.shape[:2]])

    def _hw(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return (shape[1], shape[2]) if self._axes in ("CYX", "SYX") else (shape[0], shape[1])

    def _init_levels(self, shapes: list[tuple[int, int]]) -> None:
        h0, w0 = shapes[0]
        self.levels = [Level(h, w, w0 / w, h0 / h) for h, w in shapes]

    # ------------------------------------------------------------------ geometry
    @property
    def width(self) -> int:
        return self.levels[0].width

    @property
    def height(self) -> int:
        return self.levels[0].height

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.levels[level].downsample_x

    def best_level(self, target_mpp: float, tolerance: float = 0.01) -> int:
        """The coarsest level still at least as fine as ``target_mpp``: downsample, never upsample."""
        best = 0
        for i in range(len(self.levels)):
            if self.level_mpp(i) <= target_mpp * (1 + tolerance):
                best = i
        return best

    # ------------------------------------------------------------------ pixels
    def read_region(self, level: int, x: int, y: int, w: int, h: int, reduce: int = 1) -> np.ndarray:
        """(h, w, 3) uint8 of ``level`` reduced by ``reduce`` (1, 2, 4, 8: each px the mean of a block of that
        side) at integer origin (x, y) of that reduced grid; outside the image is white."""
        k = reduce
        lv = self.levels[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, lv.width // k), min(y + h, lv.height // k)
        if x1 <= x0 or y1 <= y0:
            return np.full((h, w, 3), 255, dtype=np.uint8)
        data = self._levels_data[level]
        try:
            if isinstance(data, _TiledLevel) and data.reducible(k):
                patch = data.region(y0, y1, x0, x1, k)
            elif k > 1:
                patch = area_reduce(self.read_region(level, x0 * k, y0 * k, (x1 - x0) * k, (y1 - y0) * k), k)
            elif self._axes in ("CYX", "SYX"):
                patch = np.moveaxis(np.asarray(data[:, y0:y1, x0:x1]), 0, -1)
            else:
                patch = np.asarray(data[y0:y1, x0:x1])
        except InputError:
            raise
        except Exception as exc:
            raise InputError(
                self.path,
                f"cannot decode region x={x0}..{x1} y={y0}..{y1} of level {level} ({type(exc).__name__}: {exc})",
            ) from exc
        patch = _as_rgb8(patch)
        if (x0, y0, x1, y1) == (x, y, x + w, y + h):
            return patch
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        out[y0 - y : y1 - y, x0 - x : x1 - x] = patch
        return out

    def forget_above(self, level: int, y: int, reduce: int = 1) -> None:
        """A reader going down the slide row by row will not read above row ``y`` (of ``level`` reduced by
        ``reduce``) again: the decoded tiles there leave the cache, which then stays a few tile rows deep and
        keeps reusing the same memory (fresh memory costs a page fault per 4 kB: ~10 % of a 1:1 tile's time)."""
        data = self._levels_data[level]
        if isinstance(data, _TiledLevel):
            data.forget_above(y * reduce)

    def thumbnail(self, target_mpp: float) -> tuple[np.ndarray, float]:
        """Whole slide at about ``target_mpp`` (from the coarsest adequate level, reduced by 2/4/8 while decoding,
        then area-averaged); returns (rgb, level-0 px per px). A level whose reduced picture would exceed
        :data:`THUMB_BAND_BYTES` is read in bands of rows, each shrunk to its share of the output, so the memory
        is the output's plus one band's (the bands' seams may differ from a whole-level resize by rounding)."""
        level = self.best_level(target_mpp)
        lv = self.levels[level]
        scale = target_mpp / self.level_mpp(level)
        k = 1
        while k < 8 and 2 * k <= scale * 1.01:
            k *= 2
        w, h = max(1, lv.width // k), max(1, lv.height // k)
        data = self._levels_data[level]
        decoded_per_row = 3 * w * (1 if isinstance(data, _TiledLevel) and data.reducible(k) else k * k)
        shrink = scale / k > 1.01
        if not shrink or h * decoded_per_row <= THUMB_BAND_BYTES:  # not shrunk: the picture is this size anyway
            rgb = self.read_region(level, 0, 0, w, h, reduce=k)
            if shrink:
                size = (max(1, round(lv.width / scale)), max(1, round(lv.height / scale)))
                rgb = _cv2().resize(rgb, size, interpolation=_cv2().INTER_AREA)
            return rgb, self.width / rgb.shape[1]
        out_w, out_h = max(1, round(lv.width / scale)), max(1, round(lv.height / scale))
        rows = h / out_h  # reduced rows per output row
        step = max(1, int(THUMB_BAND_BYTES // decoded_per_row / rows))  # output rows per band
        parts = []
        for j0 in range(0, out_h, step):
            j1 = min(out_h, j0 + step)
            y0, y1 = int(j0 * rows), min(h, max(int(j0 * rows) + 1, round(j1 * rows)))
            band = self.read_region(level, 0, y0, w, y1 - y0, reduce=k)
            parts.append(_cv2().resize(band, (out_w, j1 - j0), interpolation=_cv2().INTER_AREA))
            del band
            if isinstance(data, _TiledLevel):
                data.forget_reduced(k)
        rgb = np.concatenate(parts)
        return rgb, self.width / rgb.shape[1]

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _to_uint8(patch: np.ndarray) -> np.ndarray:
    if np.issubdtype(patch.dtype, np.integer):
        peak = np.iinfo(patch.dtype).max
        return (patch.astype(np.float32) * (255.0 / peak)).round().astype(np.uint8)
    return np.clip(patch * 255.0 if patch.max() <= 1.0 else patch, 0, 255).astype(np.uint8)


RESAMPLE_FILTERS = ("area", "bilinear", "bicubic", "lanczos")


def resize_pixels(region: np.ndarray, out_w: int, out_h: int, resample: str = "area") -> np.ndarray:
    """``region`` resized to out_w × out_h, its whole extent onto the whole output (pixel centres map as
    (u + ½)·s − ½; the filters see no pixels outside ``region``: its edge is repeated).

    ``area`` (OpenCV): an exact area average when shrinking (anti-aliased, fast), bilinear when enlarging.
    ``bilinear``/``bicubic``/``lanczos`` (Pillow): those filters widened by the shrink factor, so also
    anti-aliased; 3–25× slower than ``area`` at tile size (measured: benchmarks/shard_throughput.py).
    """
    h, w = region.shape[:2]
    if (w, h) == (out_w, out_h):
        return region
    if resample == "area":
        cv2 = _cv2()
        shrink = w > out_w or h > out_h
        return cv2.resize(region, (out_w, out_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    from PIL import Image

    return np.asarray(Image.fromarray(region).resize((out_w, out_h), Image.Resampling[resample.upper()]))
