"""HistoTx from its wheel, away from the source tree: build the wheel, install it (not editable) into a fresh
virtual environment in a temporary folder, and run `histotx demo --help`, `histotx synth` and `histotx shard
run` (a one-sample cohort), a 1-step `histotx train` of a packaged config (by name: the YAML comes from the
wheel's package data) and `histotx export` there.

The fresh environment gets its dependencies (torch 2.14.1, DeepSpeed, ...) from the test's own environment
through a .pth file naming that environment's site-packages, and only the wheel is installed into it
(--no-deps): nothing is downloaded, and the torch wheels already on disk are used as they are. A .pth entry
is appended to sys.path after the fresh environment's own site-packages, and .pth files in the appended
folder are not processed, so the editable install of the source tree that the test environment has (its
finder lives in such a .pth file) is not seen: the test checks that `histotx` is imported from the wheel.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(argv: list[str], cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    run = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"{' '.join(map(str, argv))}\n{(run.stdout + run.stderr)[-4000:]}"
    return run


@pytest.mark.slow
def test_the_wheel_installed_in_a_fresh_venv_runs_demo_train_and_export(tmp_path):
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    clean["OMP_NUM_THREADS"] = "1"
    wheels = tmp_path / "wheels"
    _run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)],
        tmp_path,
        clean,
    )
    wheel = next(wheels.glob("histotx-*.whl"))

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, clean)
    py = venv / "bin" / "python"
    purelib = Path(
        _run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, clean
        ).stdout.strip()
    )
    ours = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if Path(p).is_dir()]
    (purelib / "histotx-test-deps.pth").write_text("".join(f"{p}\n" for p in ours))
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp_path, clean)

    work = tmp_path / "elsewhere"  # away from the source tree
    work.mkdir()
    where = _run([str(py), "-c", "import histotx; print(histotx.__file__)"], work, clean).stdout.strip()
    assert where.startswith(str(purelib)), f"histotx imported from {where}, not from the wheel"
    histotx = str(venv / "bin" / "histotx")
    assert "usage: histotx demo" in _run([histotx, "demo", "--help"], work, clean).stdout

    # a shard set made by the installed histotx itself: a one-sample synthetic cohort, sharded small
    _run([histotx, "synth", "cohort", "--technologies", "visium"], work, clean)
    shard_args = ["mpp=8.0", "tile_px=32", "mask_mpp=16.0", "min_tissue_fraction=0.3", "shard_max_tiles=4"]
    _run([histotx, "shard", "run", "cohort/cohort.yaml", "--out", "shards", *shard_args], work, clean)
    shards = work / "shards"
    _run(
        [
            histotx,
            "train",
            "tiny_cpu",
            "out=run",
            f"data.stream.shards={shards}",
            "steps=1",
            "log.every_steps=1",
            "data.collate.resolutions_um=[16.0, 32.0]",
            "log.tensorboard=false",
        ],
        work,
        clean,
    )
    assert (work / "run" / "checkpoints" / "latest").read_text() == "step_00000001"
    _run([histotx, "export", "run", "--out", "exported"], work, clean)
    assert (work / "exported" / "hf" / "config.json").is_file() and (
        work / "exported" / "teacher.safetensors"
    ).is_file()
