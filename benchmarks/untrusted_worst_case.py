"""Peak RSS and wall time of `verify`, the training loader and `embed` on the worst case of each class of
untrusted input (issue 23), each run in a fresh process (so RSS is that reader's own, torch included).

    python benchmarks/untrusted_worst_case.py [--out DIR] [--cases a,b,...]

Cases (each a shard set made here; readers refuse, skip and count, or read within the stated limits):
  baseline       a clean set: 2 shards × 16 tiles of 16 px (the readers' own floor: imports, torch)
  lying_size     a member header declaring 8 GiB in a 30 KB shard (manifest resealed to match)
  gzip_bomb      a shard that is gzip of 1 GiB of zeros (1 MB on disk) posing as .tar
  sparse         a GNU sparse member declaring an 8 GiB real size, before the real members
  absurd_meta    every tile of a shard with mpp 2000 / 1e12 / origin 1e300 (the tokeniser once took 31 GiB)
  max_tiles      64 tiles at the format's limit, 2048² px PNG (flat colour: KB on disk, 12.6 MB decoded);
                 plus one 8192² tile (beyond the limit: refused from its header)
  fifo           a shard that is a named pipe (once hung every reader)
  unsafe_members links, devices, FIFOs, folders, ../ and absolute names inside a shard
  lying_checksum a shard whose bytes differ from the manifest's SHA-256
  huge_model     (embed only) a model folder whose config asks for embed_dim 16384 over tiny weights
Each reader runs in its own process over every case (imports first, reported apart); per case the peak RSS
(VmHWM, reset before the case: the process's resident size after imports plus what the case adds) and the
wall time; a case gets 120 s. The loader reads 2 batches of the default size (32, default augmentation),
0 workers (the work of one worker, in this process).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
READERS = ("verify", "loader", "embed")
BATCHES = 2  # loader batches of the default size (32) per case


# ---------------------------------------------------------------- shard sets


def _base(out: Path, per_shard: int = 16) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from shardkit import write_shard_set

    from histotx.vocab import Vocab

    write_shard_set(out, n_shards=2, per_shard=per_shard, tile_px=16)
    vocab = Vocab()
    vocab.extend((f"G{i}", "") for i in range(50))
    vocab.save(out / "vocab.tsv")
    return out


def _reseal(out: Path, name: str) -> None:
    from histotx.files import sha256_file

    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["name"] == name:
            entry["bytes"], entry["sha256"] = (out / name).stat().st_size, sha256_file(out / name)
    (out / "manifest.json").write_text(json.dumps(manifest))


def _members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tf:
        return [(m, tf.extractfile(m).read()) for m in tf.getmembers()]


def _tar(members, fmt=tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _seal_header(hdr: bytearray) -> bytes:
    hdr[148:156] = b"        "
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    return bytes(hdr)


def _lying_size(shard: Path, good: bytes) -> None:
    hdr = bytearray(good[:512])
    hdr[124:136] = b"%011o\0" % (8**11 - 1)
    shard.write_bytes(_seal_header(hdr) + good[512:])


def _gzip_bomb(shard: Path, good: bytes) -> None:  # noqa: ARG001 — the same signature as the other cases
    zeros, buf = bytes(1 << 24), io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9) as gz:
        for _ in range(64):
            gz.write(zeros)
    shard.write_bytes(buf.getvalue())


def _sparse(shard: Path, good: bytes) -> None:
    info = tarfile.TarInfo("s00__t99999.jpg")
    info.type = tarfile.GNUTYPE_SPARSE
    hdr = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    hdr[124:136] = b"%011o\0" % 512
    hdr[483:495] = b"%011o\0" % (8**11 - 1)
    shard.write_bytes(_seal_header(hdr) + bytes(512) + good)


def _absurd_meta(shard: Path, good: bytes) -> None:  # noqa: ARG001
    bad = [{"mpp": 2000.0}, {"mpp": 1e12}, {"origin_um": [1e300, 0.0]}]
    members, n = [], 0
    for info, data in _members(shard):
        if info.name.endswith(".json"):
            data = json.dumps({**json.loads(data), **bad[n % 3]}).encode()
            n += 1
        members.append((info, data))
    shard.write_bytes(_tar(members))


def _unsafe_members(shard: Path, good: bytes) -> None:  # noqa: ARG001
    extra = []
    for name, kind in [
        ("../s00__t9.json", tarfile.REGTYPE),
        ("/etc/s00__t8.json", tarfile.REGTYPE),
        ("s00__t7.jpg", tarfile.SYMTYPE),
        ("s00__t6.jpg", tarfile.LNKTYPE),
        ("s00__t5.jpg", tarfile.CHRTYPE),
        ("s00__t4.jpg", tarfile.FIFOTYPE),
    ]:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, "/dev/zero" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
        extra.append((info, b"{}"))
    shard.write_bytes(_tar(extra + _members(shard)))


def _lying_checksum(shard: Path, good: bytes) -> None:
    data = bytearray(good)
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))


def _fifo(shard: Path, good: bytes) -> None:  # noqa: ARG001
    shard.unlink()
    os.mkfifo(shard)


RESEALED = {"lying_size": _lying_size, "gzip_bomb": _gzip_bomb, "sparse": _sparse, "absurd_meta": _absurd_meta}
RESEALED["unsafe_members"] = _unsafe_members
AS_IS = {"lying_checksum": _lying_checksum, "fifo": _fifo}  # the manifest keeps the true size and checksum


def make_case(case: str, out: Path) -> Path:
    out = _base(out)
    shard = out / "shard-00000.tar"
    if case == "max_tiles":
        _max_tiles(out)
    elif case in RESEALED:
        RESEALED[case](shard, shard.read_bytes())
        _reseal(out, shard.name)
    elif case in AS_IS:
        AS_IS[case](shard, shard.read_bytes())
    elif case not in ("baseline", "huge_model"):
        raise SystemExit(f"unknown case {case}")
    return out


def _max_tiles(out: Path) -> None:
    import webdataset as wds
    from shardkit import random_grid

    from histotx.files import sha256_file
    from histotx.format import TileSample, encode_image_rgb, encode_sample, new_manifest, write_manifest

    rng = np.random.default_rng(0)
    for p in out.glob("*.tar"):
        p.unlink()
    shards, samples = [], {}
    for s, (px, n) in enumerate([(2048, 64), (8192, 1)]):
        sid, name = f"s{s:02d}", f"shard-{s:05d}.tar"
        rgb = np.zeros((px, px, 3), np.uint8)
        rgb[..., 0], rgb[..., 1] = 200, np.arange(px, dtype=np.uint8)[None, :]  # a ramp: KB as PNG
        image = encode_image_rgb(rgb, "png")
        with wds.TarWriter(str(out / name), encoder=False, mtime=0) as sink:
            for i in range(n):
                grid = random_grid(rng, px)
                meta = {
                    "sample": sid,
                    "patient": sid,
                    "technology": "visium",
                    "tile_px": px,
                    "mpp": 0.5 if px <= 2048 else 0.25,
                    "origin_level0_px": [0.0, float(i * px)],
                    "origin_um": [0.0, i * px * 0.5],
                    "source_mpp": 0.5,
                    "n_sites": grid.n_sites,
                    "n_genes": int(np.unique(grid.gene).size),
                    "total_count": grid.total_count,
                }
                sink.write(encode_sample(TileSample(f"{sid}__t{i:05d}", image, "png", grid, meta)))
        path = out / name
        shards.append({"name": name, "samples": n, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
        shards[-1]["sample_id"] = sid
        samples[sid] = {"status": "ok", "technology": "visium", "tiles": n}
    write_manifest(out, new_manifest({"synthetic": True}, shards, samples))


# ---------------------------------------------------------------- readers (in a child process)


def _tiny_model(huge_folder: Path | None):
    import torch

    from histotx.export import LoadedModel
    from histotx.model import FusedViT, FusedViTConfig
    from histotx.preprocess import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    config = FusedViTConfig(size="custom", embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8)
    if huge_folder is not None:  # a model folder whose config asks for embed_dim 16384 over these weights
        import yaml
        from safetensors.torch import save

        from histotx.config import dump_config
        from histotx.model.pretrained import NATIVE_CONFIG, NATIVE_WEIGHTS, load_pretrained

        huge_folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in FusedViT(config).state_dict().items()}
        (huge_folder / NATIVE_WEIGHTS).write_bytes(save(state))
        dump_config(config, huge_folder / NATIVE_CONFIG)
        fields = yaml.safe_load((huge_folder / NATIVE_CONFIG).read_text())
        fields.update(embed_dim=16384, num_heads=16, mlp_hidden_dim=65536)
        (huge_folder / NATIVE_CONFIG).write_text(yaml.safe_dump(fields))
        return load_pretrained(huge_folder)  # refused before building (ModelConfigError)
    return LoadedModel(FusedViT(config).eval(), [], 0.5, 32, IMAGENET_MEAN, IMAGENET_STD, "tiny")


def run_reader(reader: str, case: str, shards: Path, work: Path) -> str:
    import warnings

    if reader == "verify":
        from histotx.sharding.verify import verify

        result = verify(shards)
        return f"{result['tiles']} tiles, {len(result['problems'])} problems"
    if reader == "loader":
        from itertools import islice

        from histotx.config import load_config
        from histotx.data.augment import MultiCrop
        from histotx.data.collate import SSLCollate
        from histotx.data.config import DataConfig
        from histotx.data.stream import ShardStream, StreamLoader

        cfg = load_config(DataConfig, overrides=[f"stream.shards={shards}", "stream.num_workers=0"])
        cfg.stream.max_consecutive_bad_samples = 10_000
        loader = StreamLoader(ShardStream(cfg.stream, MultiCrop(cfg.augment), SSLCollate(cfg)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                n = sum(1 for _ in islice(loader, BATCHES))
            except RuntimeError as exc:
                return f"stopped: {str(exc)[:80]}"
        s = loader.stats
        return f"{n} batches; corrupt {s.corrupt_shards}, bad {s.bad_samples}, skipped members {s.skipped_members}"
    from histotx.eval.embed import embed_shards

    model = _tiny_model(work / "huge" if case == "huge_model" else None)
    paths = embed_shards(model, shards, work / "emb", progress=False, device="cpu")
    return f"{len(paths)} h5ad"


def _peak_mb() -> float:
    """This process's peak RSS since the last :func:`_reset_peak` (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux ≥ 4.0: VmHWM restarts from the current RSS


def _warm(reader: str) -> None:
    """Import what the reader needs, so the figures are the reader's work, not imports."""
    import histotx.sharding.verify  # noqa: F401

    if reader != "verify":
        import histotx.data.augment  # noqa: F401
        import histotx.data.collate  # noqa: F401
        import histotx.data.stream  # noqa: F401
        import histotx.eval.embed  # noqa: F401


def child(reader: str, root: str, cases: str) -> None:
    """One reader over every case, in this one process: per case, the peak RSS above the process's own
    resident size after imports, and the wall time; a case that runs past 120 s is stopped (SIGALRM)."""
    import signal

    t0 = time.perf_counter()
    _warm(reader)
    print(json.dumps({"case": "(imports)", "wall_s": time.perf_counter() - t0, "rss_mb": _peak_mb()}), flush=True)

    def stop(*_):
        raise TimeoutError("still running after 120 s")

    signal.signal(signal.SIGALRM, stop)
    for case in cases.split(","):
        shards, work = Path(root) / case / "shards", Path(root) / case / reader
        work.mkdir(parents=True, exist_ok=True)
        _reset_peak()
        t0 = time.perf_counter()
        signal.alarm(120)
        try:
            what = run_reader(reader, case, shards, work)
        except Exception as exc:  # noqa: BLE001 — a named refusal is the expected outcome of several cases
            what = f"{type(exc).__name__}: {' '.join(str(exc).split())[:100]}"
        finally:
            signal.alarm(0)
        row = {"case": case, "wall_s": time.perf_counter() - t0, "rss_mb": _peak_mb(), "outcome": what}
        print(json.dumps(row), flush=True)


ALL_CASES = [
    "baseline", "lying_size", "gzip_bomb", "sparse", "absurd_meta", "max_tiles", "fifo", "unsafe_members",
    "lying_checksum", "huge_model",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--cases", default=None, help="comma-separated cases (default: all)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    cases = args.cases.split(",") if args.cases else ALL_CASES
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="untrusted-bench-") as tmp:
        root = Path(args.out or tmp)
        for case in cases:
            make_case(case, root / case / "shards")
        print(f"{'reader':7s} {'case':15s} {'wall s':>7s} {'peak RSS MB':>12s}  outcome")
        for reader in READERS:
            mine = [c for c in cases if reader == "embed" or c != "huge_model"]
            proc = subprocess.Popen(
                [sys.executable, __file__, "--child", reader, str(root), ",".join(mine)],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            for line in proc.stdout:
                row = json.loads(line)
                figures = f"{row['wall_s']:7.2f} {row['rss_mb']:12.0f}"
                print(f"{reader:7s} {row['case']:15s} {figures}  {row.get('outcome', '')}", flush=True)
            proc.wait()


if __name__ == "__main__":
    main()
