"""The sharding run: cohort → vocabulary → one worker task per sample → per-sample records → manifest.

A sample that fails (bad file, empty tissue, spots off the slide, ...) is recorded with the error
naming its file and never stops the others; the run's exit status reports it.
"""

from __future__ import annotations

import logging
import os
import re
import time
import traceback
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from histotx.config import ConfigError, dump_config
from histotx.format import VOCAB_NAME, TileSample, TranscriptGrid, encode_image_rgb, write_manifest
from histotx.sharding.cohort import Cohort, CohortSample, load_cohort, patient_warning
from histotx.sharding.config import ShardConfig
from histotx.sharding.errors import InputError, OutputError
from histotx.sharding.readers import ReaderOptions, read_genes, read_sites, slide_mpp_hint, slide_path
from histotx.sharding.slides import Slide
from histotx.sharding.technologies import TECHNOLOGIES
from histotx.sharding.tiles import (
    TileGeometry,
    TilePlan,
    plan_grid,
    plan_spots,
    render_run,
    runs,
    sample_subset,
    tile_geometry,
)
from histotx.sharding.tissue import TissueMap, tissue_mask
from histotx.sharding.writer import (
    OutputLock,
    ShardSink,
    assemble_manifest,
    clear_sample,
    load_done,
    out_of_space,
    part_manifest_name,
    write_done,
)
from histotx.vocab import Vocab

if TYPE_CHECKING:
    from histotx.sharding.bands import BandedSites
    from histotx.sharding.sites import Sites

log = logging.getLogger(__name__)


@dataclass
class Part:
    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> "Part":
        if not text:
            return cls()
        try:
            i, n = (int(v) for v in text.split("/"))
        except ValueError as exc:
            raise ConfigError(f"--part must look like i/n (e.g. 0/4), got {text!r}") from exc
        if not 0 <= i < n:
            raise ConfigError(f"--part {text}: need 0 <= i < n")
        return cls(i, n)

    def selects(self, position: int) -> bool:
        return position % self.count == self.index


_ENSEMBL_SPECIES = {"ENSG": "human", "ENSMUSG": "mouse"}


def _gene_naming(genes: list[tuple[str, str]]) -> tuple[str, str]:
    """(naming, species) of a sample's genes. Naming: 'symbols' or 'Ensembl ids' when it names them only that
    way, else 'both'. Species, as far as the names tell: ENSG… or ACTB-style symbols 'human', ENSMUSG… or
    Actb-style 'mouse', other Ensembl prefixes themselves, else ''."""
    symbols, ids = [s for s, _ in genes if s], [e for _, e in genes if e]
    if symbols and ids:
        return "both", ""
    if ids:
        prefix = Counter(re.match(r"[A-Z]+", e).group() for e in ids).most_common(1)[0][0]
        return "Ensembl ids", _ENSEMBL_SPECIES.get(prefix, prefix)
    lettered = [s for s in symbols if any(c.isalpha() for c in s)] or [""]
    caps = sum(s == s.upper() for s in lettered) / len(lettered)
    title = sum(s[:1].isupper() and s[1:] != s[1:].upper() for s in lettered) / len(lettered)
    return "symbols", "human" if caps >= 0.8 else "mouse" if title >= 0.8 else ""


def build_vocab(cohort: Cohort, out_dir: Path, start_from: Path | None) -> tuple[Vocab, dict[str, InputError]]:
    """Append every cohort gene, in cohort order, to the existing vocabulary (ids never change).

    Every part of a split run computes this over the whole cohort, so all parts agree on the ids. A sample
    naming its genes only by symbol when an earlier one of the same species names them only by Ensembl id
    (or the reverse) is rejected if the vocabulary cannot match its genes: they would become new genes.
    """
    existing = out_dir / VOCAB_NAME
    vocab = Vocab.load_or_new(existing if existing.exists() else (start_from or existing))
    before = len(vocab)
    first_of: dict[tuple[str, str], str] = {}  # (naming, species) → first sample that uses only that naming
    rejected: dict[str, InputError] = {}
    for sample in cohort.samples:
        if sample.tech.reader is None:
            continue
        try:
            genes = read_genes(sample, cohort)
        except InputError as exc:
            log.warning("vocabulary: skipping %s: %s", sample.id, exc)
            continue
        naming, species = _gene_naming(genes)
        other = ({"symbols": "Ensembl ids", "Ensembl ids": "symbols"}.get(naming), species)
        if species and other in first_of:
            unmatched = [s or e for s, e in genes if vocab.lookup(s, e) is None]
            if unmatched:
                rejected[sample.id] = InputError(
                    cohort.resolve(sample.data),
                    f"genes are named by {naming} only (e.g. {unmatched[0]}) while "
                    f"sample {first_of[other]} ({species}) names them by {other[0]} only: {len(unmatched)} of "
                    f"{len(genes)} cannot be matched to its genes; use feature files that give both (10x features "
                    "id and name), or start from a vocabulary that has both (--vocab)",
                )
                continue
        if naming != "both":
            first_of.setdefault((naming, species), sample.id)
        vocab.extend(genes)
    vocab.save(existing)
    log.info("vocabulary: %d genes (%d new) → %s", len(vocab), len(vocab) - before, existing)
    return vocab, rejected


def drop_unused_genes(out_dir: Path, keep_first: int, records: dict[str, dict[str, Any]]) -> int:
    """Cut from ``vocab.tsv`` the genes this run appended that no written sample holds (their samples
    failed), so they reach neither the model's vocabulary nor an export's gene list. The ``keep_first``
    genes the folder (or ``--vocab``) had before stay. Ids never change inside a shard set: the unused genes
    at the end go; unused genes followed by a used one cannot (the written shards use the later ids) and are
    reported. Returns the number of genes cut."""
    path = out_dir / VOCAB_NAME
    vocab = Vocab.load(path)
    used = np.zeros(len(vocab), dtype=bool)
    used[:keep_first] = True
    for record in records.values():
        if record.get("status") == "ok":
            for start, stop in record.get("gene_ranges") or []:
                used[start:stop] = True
    keep = int(np.flatnonzero(used)[-1]) + 1 if used.any() else 0
    cut = len(vocab) - keep
    if cut:
        lines = vocab.to_tsv().splitlines()[: keep + 1]
        Vocab.parse("\n".join(lines) + "\n", str(path)).save(path)
        failed = sorted(sid for sid, r in records.items() if r.get("status") != "ok")
        log.info("vocabulary: %d genes of failed samples (%s) removed → %d genes", cut, ", ".join(failed), keep)
    stranded = int((~used[:keep]).sum())
    if stranded:
        log.warning(
            "vocabulary: %d genes that only failed samples hold stay in %s (ids of a shard set never change and "
            "later samples use the ids after them); they are unused. Fix those samples and rerun, or shard into a "
            "new folder to leave them out",
            stranded,
            path,
        )
    return cut


def _vocab_id(vocab: Vocab, symbol: str, ensembl_id: str) -> int:
    idx = vocab.lookup(symbol, ensembl_id)
    return -1 if idx is None else idx


def _id_ranges(ids: np.ndarray) -> list[list[int]]:
    """A sample's gene panel as half-open vocabulary id runs ``[[start, stop], ...]``: compact, since a
    panel's genes were appended to the vocabulary together. Read by the training loader (the
    masked-expression loss leaves genes outside a sample's panel out)."""
    ids = np.unique(ids)
    if ids.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(ids) > 1)
    starts, stops = ids[np.r_[0, breaks + 1]], ids[np.r_[breaks, ids.size - 1]] + 1
    return [[int(a), int(b)] for a, b in zip(starts, stops, strict=True)]


def _check_upsample(slide: Slide, geom, cfg: ShardConfig, warnings: list[str]) -> float:
    """How many times the slide's pixels are enlarged into tiles (1: not at all); a sample past
    ``max_upsample`` fails, one past ``warn_upsample`` gets a warning."""
    factor = round(cfg.tile_px / geom.size_px, 3)
    if factor <= 1 + cfg.snap_tolerance:
        return factor
    what = (
        f"the slide's finest level is {slide.level_mpp(geom.level):.3g} µm/px, coarser than mpp={cfg.mpp:g}: "
        f"its pixels are enlarged {factor:.3g}× into tiles (no detail is added)"
    )
    if cfg.max_upsample and factor > cfg.max_upsample:
        raise InputError(
            str(slide.path),
            f"{what}, more than max_upsample={cfg.max_upsample:g}; give the full-resolution image (for Visium, "
            f"the slide Space Ranger was given, not spatial/tissue_*_image.png), or tile at "
            f"mpp={slide.level_mpp(geom.level) / max(cfg.max_upsample, 1):.3g} or coarser, or raise max_upsample",
        )
    if factor > cfg.warn_upsample:
        msg = f"{slide.path}: {what}"
        log.warning(msg)
        warnings.append(msg)
    return factor


def _check_pixel_size(slide: Slide, sites: Sites, cfg: ShardConfig, warnings: list[str]) -> None:
    if sites.mpp_estimate is None or slide.mpp_source in ("data", "override"):
        return
    rel = abs(sites.mpp_estimate - slide.mpp) / slide.mpp
    if rel > cfg.mpp_tolerance:
        msg = (
            f"{slide.path}: the data's pixel size ({sites.mpp_estimate:.4f} µm/px) and the slide's "
            f"({slide.mpp:.4f} µm/px, {slide.mpp_source}) differ by {rel:.1%}"
        )
        log.warning(msg)
        warnings.append(msg)


def _sites_on_slide(slide: Slide, sites: Sites | BandedSites, cfg: ShardConfig, data_path: str) -> int:
    n_out = sites.count_outside(slide.width, slide.height)
    if sites.n_sites and n_out > cfg.max_outside_fraction * sites.n_sites:
        raise InputError(
            data_path,
            f"{n_out} of {sites.n_sites} sites lie outside the slide {slide.path.name} "
            f"({slide.width}×{slide.height} px): wrong slide, image_scale or alignment?",
        )
    if n_out:
        sites.dropped["outside_slide"] = sites.dropped.get("outside_slide", 0) + n_out
    return sites.n_sites - n_out


def _dropped_warning(n_dropped: int, n_on_slide: int, cfg: ShardConfig) -> str:
    """What the summary says when many sites lie under no kept tile, and how to keep them."""
    why = (
        "the tissue mask called their area background"
        if cfg.tiling != "spots"
        else "their tiles hold less tissue than min_tissue_fraction"
    )
    if cfg.max_tiles_per_sample:
        why += ", or max_tiles_per_sample left their tiles out"
    keep = (
        "tiling=grid_sites (also cuts a tile wherever there are sites) or a lower min_tissue_fraction"
        if cfg.tiling != "spots"
        else "a lower min_tissue_fraction"
    )
    return (
        f"{n_dropped} of {n_on_slide} sites on the slide ({n_dropped / n_on_slide:.1%}, more than "
        f"max_dropped_fraction={cfg.max_dropped_fraction:g}) lie under no kept tile ({why}); to keep them, "
        f"set {keep}"
    )


def shard_sample(sample: CohortSample, cohort: Cohort, cfg: ShardConfig, out_dir: Path, vocab: Vocab) -> dict[str, Any]:
    """Tile one sample and write its shards; returns its completion record."""
    t0 = time.time()
    warnings: list[str] = []
    spath = slide_path(sample, cohort)
    with Slide(spath, mpp=sample.mpp, mpp_hint=slide_mpp_hint(sample, cohort)) as slide:
        sites = read_sites(
            sample,
            cohort,
            ReaderOptions(qv_min=cfg.qv_min, in_tissue_only=cfg.in_tissue_only, slide_px=(slide.width, slide.height)),
        )
        data_path = str(cohort.resolve(sample.data)) if sample.data else str(spath)
        on_count, gene_ids = 0, np.zeros(0, dtype=np.int64)
        if sites is not None:
            _check_pixel_size(slide, sites, cfg, warnings)
            on_count = _sites_on_slide(slide, sites, cfg, data_path)
            gene_ids = np.array([_vocab_id(vocab, s, e) for s, e in sites.genes], dtype=np.int64)
            if (gene_ids < 0).any():
                raise InputError(data_path, "genes missing from the vocabulary (was it edited during the run?)")
        geom = tile_geometry(slide, cfg)
        upsample = _check_upsample(slide, geom, cfg, warnings)
        plan = _plan(slide, sites, sample, cfg, geom, data_path)
        sample_meta = {
            "sample": sample.id,
            "patient": sample.patient_id,
            "technology": sample.technology,
            "tile_px": cfg.tile_px,
            "mpp": geom.mpp,
            "source_mpp": slide.mpp,
            "panel": sites.panel if sites is not None else "",
        }
        sink = ShardSink(out_dir, sample.id, cfg.shard_max_tiles, cfg.shard_max_bytes)
        try:
            total_count = _write_tiles(sink, slide, geom, plan, cfg, sites, gene_ids, sample_meta)
            shards = sink.close()
        except BaseException:
            sink.abort()
            raise
        n_kept = sites.n_kept if sites is not None else 0
        dropped = dict(sites.dropped) if sites is not None else {}
        if on_count - n_kept:
            dropped["not_under_a_tile"] = on_count - n_kept
            if on_count - n_kept > cfg.max_dropped_fraction * on_count:
                warnings.append(_dropped_warning(on_count - n_kept, on_count, cfg))
        record = {
            "sample": sample.id,
            "status": "ok",
            "technology": sample.technology,
            "patient": sample.patient_id,
            "organ": sample.organ,
            "species": sample.species,
            "slide": str(spath),
            "slide_mpp": slide.mpp,
            "slide_mpp_source": slide.mpp_source,
            "data_mpp_estimate": sites.mpp_estimate if sites is not None else None,
            "level": geom.level,
            "read_reduce": geom.reduce,
            "tile_mpp": geom.mpp,
            "upsample": upsample,
            "tiles": int(sum(s["samples"] for s in shards)),
            "sites_read": sites.n_sites if sites is not None else 0,
            "sites_kept": n_kept,
            "dropped": dropped,
            "counts_kept": total_count,
            "footprint_um": sites.footprint_um if sites is not None else None,
            "panel": sites.panel if sites is not None else "",
            "warnings": warnings,
            "gene_ranges": _id_ranges(gene_ids) if sites is not None else [],
            "seconds": round(time.time() - t0, 2),
            "shards": shards,
        }
        if sites is not None:
            record["reader"] = sites.info
    return record


def _plan(
    slide: Slide,
    sites: Sites | BandedSites | None,
    sample: CohortSample,
    cfg: ShardConfig,
    geom: TileGeometry,
    data_path: str,
) -> TilePlan:
    """The tiles to cut (grid over tissue, or one per spot), after ``max_tiles_per_sample``; an InputError
    when no tile holds enough tissue."""
    thumb, scale = slide.thumbnail(cfg.mask_mpp)
    tissue = TissueMap(tissue_mask(thumb), scale)
    if cfg.tiling == "spots":
        if sites is None or not sample.tech.spots:
            spotted = ", ".join(t.name for t in TECHNOLOGIES.values() if t.spots)
            raise InputError(data_path, f"tiling=spots needs spot data ({spotted}), not {sample.technology}")
        plan = plan_spots(sites.xy_px[sites.on_slide(slide.width, slide.height)], tissue, cfg, geom)
    else:
        plan = plan_grid(slide, tissue, cfg, geom, sites=sites if cfg.tiling == "grid_sites" else None)
    if len(plan) == 0:
        raise InputError(
            slide.path,
            f"no tissue tiles: tissue covers {tissue.fraction:.1%} of the slide and no "
            f"{cfg.tile_px}px tile at {geom.mpp:.4g} µm/px reaches min_tissue_fraction="
            f"{cfg.min_tissue_fraction}",
        )
    return sample_subset(plan, cfg, sample.id)


def _write_tiles(
    sink: ShardSink,
    slide: Slide,
    geom: TileGeometry,
    plan: TilePlan,
    cfg: ShardConfig,
    sites: Sites | BandedSites | None,
    gene_ids: np.ndarray,
    sample_meta: dict[str, Any],
) -> float:
    """Render, encode and add every planned tile with the sites under it to ``sink``; the counts written."""
    scale0 = plan.size0 / cfg.tile_px  # level-0 px per tile px
    total_count = 0.0
    origins, tissue_fractions = plan.origins.tolist(), plan.tissue.tolist()  # Python floats: no numpy per tile
    for idx in runs(plan, cfg.run_tiles):
        # each stage over the whole run before the next: the codec's code and tables stay in cache
        images = [
            encode_image_rgb(rgb, cfg.image_format, cfg.jpeg_quality, cfg.jpeg_subsampling)
            for rgb in render_run(slide, geom, plan, idx, cfg.tile_px, cfg.resample)
        ]
        for i, image in zip(idx.tolist(), images, strict=True):
            origin = origins[i]
            grid, n_genes = _tile_grid(sites, gene_ids, origin, plan.size0, scale0, slide)
            total_count += grid.total_count
            meta = {
                **sample_meta,
                "origin_level0_px": origin,
                "origin_um": [origin[0] * slide.mpp, origin[1] * slide.mpp],
                "tissue_fraction": round(tissue_fractions[i], 4),
                "n_sites": grid.n_sites,
                "n_genes": n_genes,
                "total_count": grid.total_count,
            }
            sink.add(TileSample(f"{sample_meta['sample']}__{plan.names[i]}", image, cfg.image_format, grid, meta))
    return total_count


def _tile_grid(
    sites: Sites | BandedSites | None,
    gene_ids: np.ndarray,
    origin: list[float],
    size0: float,
    scale0: float,
    slide: Slide,
) -> tuple[TranscriptGrid, int]:
    """The sites whose centre lies in the tile at ``origin`` (and on the slide), in tile pixels, and the
    number of distinct genes they hold."""
    if sites is None:  # an image-only sample
        return TranscriptGrid.empty(), 0
    xy, sub = sites.in_box(
        max(origin[0], 0),
        max(origin[1], 0),
        min(origin[0] + size0, slide.width),
        min(origin[1] + size0, slide.height),
    )
    grid = TranscriptGrid(
        xy=(xy - origin) / scale0,
        offsets=sub.indptr,
        gene=gene_ids[sub.indices],
        count=sub.data,
        footprint_um=sites.footprint_um,
        footprint_shape=sites.footprint_shape,
        footprint_angle_deg=sites.footprint_angle_deg,
    )
    return grid, int(np.unique(grid.gene).size)


def _failure(sample_id: str, technology: str, exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, (InputError, ConfigError)):
        message = str(exc)
    else:
        message = f"{type(exc).__name__}: {exc}"
        log.debug("%s failed:\n%s", sample_id, "".join(traceback.format_exception(exc)))
    return {"sample": sample_id, "status": "failed", "technology": technology, "error": message, "tiles": 0}


def _fail_or_stop(out_dir: Path, sample: CohortSample, exc: Exception) -> dict[str, Any]:
    """The failure record of a sample, or an OutputError stopping the run when the disk (not the sample)
    is the problem: such a sample is not recorded at all, so the rerun does it."""
    clear_sample(out_dir, sample.id)
    stop = out_of_space(exc, out_dir)
    if stop is not None:
        raise stop from exc
    return _failure(sample.id, sample.technology, exc)


def _worker(sample: CohortSample, cohort: Cohort, cfg: ShardConfig, out_dir: str) -> dict[str, Any]:
    """Runs in a worker process: loads the vocabulary the parent wrote, shards one sample."""
    out = Path(out_dir)
    try:
        clear_sample(out, sample.id)
        record = shard_sample(sample, cohort, cfg, out, Vocab.load(out / VOCAB_NAME))
        write_done(out, record)
        return record
    except Exception as exc:  # one bad sample never stops the cohort (a full disk does)
        return _fail_or_stop(out, sample, exc)


def run_cohort(
    cohort_path: Path,
    out_dir: Path,
    cfg: ShardConfig,
    workers: int = 1,
    part: Part | None = None,
    vocab_from: Path | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Shard (this part of) a cohort into ``out_dir``; resumes what an earlier run finished.

    Holds the folder's lock (a second run on it refuses); a full disk stops the run with an OutputError."""
    part = part or Part()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with OutputLock(out_dir, part.index, part.count):
        try:
            return _run_locked(cohort_path, out_dir, cfg, workers, part, vocab_from, progress)
        except OSError as exc:
            stop = out_of_space(exc, out_dir)
            if stop is None:
                raise
            raise stop from exc


def _run_locked(
    cohort_path: Path,
    out_dir: Path,
    cfg: ShardConfig,
    workers: int,
    part: Part,
    vocab_from: Path | None,
    progress: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    cohort = load_cohort(cohort_path)
    if message := patient_warning(cohort):
        log.warning(message)
    config = {
        **asdict(cfg),
        "cohort": str(Path(cohort_path).resolve()),
        "part": f"{part.index}/{part.count}" if part.count > 1 else None,
    }
    dump_config(cfg, out_dir / ("shard_config.yaml" if part.count == 1 else f"shard_config.part-{part.index:04d}.yaml"))
    existing = out_dir / VOCAB_NAME
    vocab_start = len(Vocab.load_or_new(existing if existing.exists() else (vocab_from or existing)))
    vocab, rejected = build_vocab(cohort, out_dir, vocab_from)
    records: dict[str, dict[str, Any]] = {}

    def finish(record: dict[str, Any]) -> None:
        records[record["sample"]] = record
        if progress:
            progress(record)

    for label, message in cohort.invalid:
        records[label] = {"sample": label, "status": "failed", "technology": "?", "error": message, "tiles": 0}
    todo = _todo(cohort, out_dir, part, rejected, records, finish)
    log.info(
        "%d samples to shard, %d already done, %d workers",
        len(todo),
        sum(1 for r in records.values() if r.get("resumed")),
        workers,
    )
    if workers <= 1:
        for sample in todo:
            clear_sample(out_dir, sample.id)
            try:
                record = shard_sample(sample, cohort, cfg, out_dir, vocab)
                write_done(out_dir, record)
            except Exception as exc:
                record = _fail_or_stop(out_dir, sample, exc)
            finish(record)
    elif todo:
        _shard_in_workers(todo, cohort, cfg, out_dir, workers, finish)
    return _finish_run(out_dir, part, config, records, vocab_start)


def _finish_run(
    out_dir: Path, part: Part, config: dict[str, Any], records: dict[str, dict[str, Any]], vocab_start: int
) -> dict[str, Any]:
    """The run's manifest (a part's own manifest in a split run), written; a whole run first drops the
    genes only failed samples brought from the vocabulary."""
    if part.count == 1:  # a part cannot know what the other parts wrote
        drop_unused_genes(out_dir, vocab_start, records)
    manifest = assemble_manifest(config, records)
    if part.count == 1:
        write_manifest(out_dir, manifest)
    else:
        from histotx.files import atomic_write_json

        atomic_write_json(out_dir / part_manifest_name(part.index, part.count), manifest)
    return manifest


def _todo(
    cohort: Cohort,
    out_dir: Path,
    part: Part,
    rejected: dict[str, InputError],
    records: dict[str, dict[str, Any]],
    finish: Callable[[dict[str, Any]], None],
) -> list[CohortSample]:
    """This part's samples still to shard; those the vocabulary rejected are recorded as failed, those a
    previous run finished are reported (``finish``) as resumed."""
    todo = []
    for pos, sample in enumerate(cohort.samples):
        if not part.selects(pos):
            continue
        if sample.id in rejected:
            clear_sample(out_dir, sample.id)
            records[sample.id] = _failure(sample.id, sample.technology, rejected[sample.id])
            continue
        done = load_done(out_dir, sample.id)
        if done is not None:
            done["resumed"] = True
            finish(done)
        else:
            todo.append(sample)
    return todo


def _shard_in_workers(
    todo: list[CohortSample],
    cohort: Cohort,
    cfg: ShardConfig,
    out_dir: Path,
    workers: int,
    finish: Callable[[dict[str, Any]], None],
) -> None:
    """Shard ``todo`` in a pool of worker processes, reporting each record as it completes."""
    env_threads = os.environ.setdefault("OMP_NUM_THREADS", "1")
    log.debug("worker threads per process: %s", env_threads)
    # forkserver: workers start clean (no inherited threads or open files) yet share the imports of the
    # preloaded server (the pixel codecs included), so each does not pay seconds of imports.
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload(
        ["histotx.sharding.pipeline", "tifffile", "imagecodecs", "simplejpeg", "cv2", "PIL.Image", "numcodecs"]
    )
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(_worker, s, cohort, cfg, str(out_dir)): s for s in todo}
        for fut in as_completed(futures):
            sample = futures[fut]
            try:
                finish(fut.result())
            except OutputError:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            except BrokenProcessPool as exc:
                finish(
                    _failure(
                        sample.id,
                        sample.technology,
                        RuntimeError(f"worker process died while sharding {sample.id}: {exc}"),
                    )
                )
