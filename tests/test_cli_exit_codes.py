"""The exit status table (`histotx --help`, README): the real command in its own process, for each status.

0 done; 1 some inputs failed (the others done, the summary names the failure); 2 bad usage or an unusable
environment (a bad override, an output locked by another run, a full disk, a read-only file system). The full
disk is a real one where the machine allows it: a 800 kB tmpfs mounted in a private mount namespace
(``unshare``), on which the first sample's shard fits and the second's does not; everywhere else it is the
same ENOSPC raised inside the shard writer by ``tests/fault_injection/sitecustomize.py``.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from histotx.cli import EXIT_STATUS, build_parser

REPO = Path(__file__).resolve().parents[1]
FAULTS = Path(__file__).resolve().parent / "fault_injection"
ARGS = ["mpp=16", "tile_px=32", "mask_mpp=16"]  # the real Visium low-res image: 153 tiles, one 645 kB shard each
TMPFS_BYTES = 800_000


@pytest.fixture
def cohort(shared_data, tmp_path):
    outs = shared_data / "scanpy-visium/visium_data/1.0.0"
    png = outs / "spatial/tissue_lowres_image.png"
    cut = tmp_path / "cut.png"
    cut.write_bytes(png.read_bytes()[: png.stat().st_size // 2])  # a slide cut in half
    v = {"technology": "visium", "image_scale": "lowres", "data": str(outs)}
    good = [{"id": "a", **v, "slide": str(png)}, {"id": "b", **v, "slide": str(png)}]
    paths = {}
    for name, samples in (("good", good), ("one_bad", [*good, {"id": "c", **v, "slide": str(cut)}])):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump({"samples": samples}))
    return paths


@functools.cache
def _private_mounts() -> bool:
    """Whether this process may mount a tmpfs in a private user + mount namespace (no root needed)."""
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", 'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d"'],
        capture_output=True,
    )
    return probe.returncode == 0


def _histotx(args: list[str], *, mount: str | None = None, out: Path | None = None, faults: dict | None = None):
    """`python -m histotx ARGS` in its own process; ``mount``: tmpfs options for ``out`` (a private mount);
    ``faults``: the fault injection's settings (its sitecustomize goes first on the path)."""
    path = [str(FAULTS)] if faults else []
    path += [str(REPO), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), **(faults or {})}
    cmd = [sys.executable, "-m", "histotx", *args]
    if mount is not None:
        out.mkdir(parents=True, exist_ok=True)
        cmd = ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o {mount} tmpfs "$0" && exec "$@"', str(out), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def _locked(out: Path) -> None:
    """``out`` held by a live run (this test's own process stands in for it) on this host."""
    import json

    out.mkdir()
    (out / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}))


CASES = {
    # name: (cohort, extra args, setup, status, what the output says)
    "done": ("good", [], None, 0, "2 samples ok, 0 failed"),
    "one bad slide among good ones": ("one_bad", [], None, 1, "2 samples ok, 1 failed"),
    "a bad override": ("good", ["tile_px=big"], None, 2, "command line 'tile_px=big'"),
    "an unknown override": ("good", ["tile_pix=32"], None, 2, "unknown key 'tile_pix'"),
    "a wrong option (argparse)": ("good", ["--workerz", "2"], None, 2, "unrecognized arguments: --workerz"),
    "output locked by another run": ("good", [], _locked, 2, "is already writing here (lock file"),
    "full disk (tmpfs)": ("good", [], f"size={TMPFS_BYTES}", 2, "no space left on the device"),
    "read-only file system (tmpfs)": ("good", [], "ro", 2, "read-only file system"),
    "full disk (injected ENOSPC)": ("good", [], {"HISTOTX_FAULT_ENOSPC_AFTER_TILES": "200"}, 2, "no space left"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exit_status(cohort, tmp_path, case):
    which, extra, setup, status, says = CASES[case]
    out = tmp_path / "out"
    mount, faults = None, None
    if isinstance(setup, str):
        if not _private_mounts():
            pytest.skip("cannot mount a tmpfs in a private namespace here (unshare -rm); the injected ENOSPC runs")
        mount = setup
    elif isinstance(setup, dict):
        faults = setup
    elif setup is not None:
        setup(out)
    run = _histotx(
        ["shard", "run", str(cohort[which]), "--out", str(out), *ARGS, *extra], mount=mount, out=out, faults=faults
    )
    text = run.stdout + run.stderr
    assert run.returncode == status, text[-3000:]
    assert says in text, text[-3000:]
    if status == 2 and not text.count("usage:"):  # not argparse's: one line, no traceback
        assert "Traceback" not in text, text[-3000:]
    if case == "one bad slide among good ones":  # the summary names the failure and its file
        assert "cut.png: cannot open" in text and "image file is truncated" in text
    if case == "full disk (injected ENOSPC)":  # the sample finished before the disk filled is kept
        assert (out / ".done" / "a.json").is_file() and not (out / ".done" / "b.json").exists()
        assert "run the same command again" in text


def test_the_table_is_in_the_help_and_the_readme():
    assert EXIT_STATUS in build_parser().format_help()
    readme = (REPO / "README.md").read_text()
    for status, meaning in (("0", "done"), ("1", "some inputs failed"), ("2", "bad usage or an unusable environment")):
        assert f"| {status} | {meaning}" in readme


def test_predict_a_full_disk_stops_the_run_and_a_bad_slide_does_not(tmp_path, monkeypatch, caplog):
    """`histotx predict` over several slides: a bad slide is counted and the others go on (1); a full disk
    stops at once (2), not counted as a bad slide; a missing head, or an output folder another run is writing
    into, stops before any slide (2)."""
    import errno

    import histotx.predict.cli as predict_cli
    import histotx.predict.slide as slide_mod
    from histotx.cli import main
    from histotx.sharding.errors import InputError

    seen = []

    def fake(slide, *_a, **_k):
        seen.append(slide.name)
        if slide.name == "bad.svs":
            raise InputError(slide, "truncated: level 0 tile 3 ends past the end of the file")
        if slide.name == "full.svs":
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "pred" / "x.h5ad"))
        return {}

    monkeypatch.setattr(slide_mod, "predict_slide", fake)
    args = ["predict", "good.svs", "--model", "m", "--head", str(tmp_path / "nohead"), "--out", str(tmp_path / "p")]
    assert main(args) == 2 and not seen
    assert "nohead/head.json: not an expression head folder" in caplog.text
    monkeypatch.setattr(predict_cli, "_model_for_head", lambda _args: "the model")
    common = ["--model", "m", "--head", "h", "--out", str(tmp_path / "pred")]
    assert main(["predict", "bad.svs", "good.svs", *common]) == 1 and seen == ["bad.svs", "good.svs"]
    assert "bad.svs: truncated" in caplog.text
    seen.clear()
    assert main(["predict", "full.svs", "good.svs", *common]) == 2 and seen == ["full.svs"]
    assert "x.h5ad: no space left on the device" in caplog.text
    assert not list((tmp_path / "pred").glob(".lock*"))  # released whatever the end
    seen.clear()
    _locked(tmp_path / "held")  # another predict writing into that folder
    assert main(["predict", "good.svs", *common[:-1], str(tmp_path / "held")]) == 2 and not seen
    assert "is already writing here (lock file" in caplog.text
