"""What a training run checks before any heavy initialisation (torch, DeepSpeed, the model, the loader).

A config that loads can still point at nothing: an empty or mistyped shard folder, a vocabulary larger than
the model's gene table, an output path that is a file or cannot be written. Each of these used to surface
only after the process group, the model and the engine were built (a minute or more on a CPU); here each is
one line naming the key, the path and the problem, raised as :class:`~histotx.config.ConfigError` (the
CLI's exit status 2). Nothing is written. Imports neither torch nor DeepSpeed.
"""

from __future__ import annotations

import os
from pathlib import Path

from histotx.config import ConfigError
from histotx.train.config import TrainConfig


def _remote_shard_set(key: str, value: str) -> dict:
    """The manifest of a shard set at a URL, and one listing for the shards it names."""
    from histotx.format import MANIFEST_NAME, FormatError
    from histotx.shard_location import listed_objects, load_manifest

    try:
        manifest = load_manifest(value)
    except (FormatError, ValueError) as exc:
        raise ConfigError(f"{key}={value}: {exc}") from exc
    listed = listed_objects(value)
    missing = [s["name"] for s in manifest.get("shards", []) if s["name"] not in listed]
    if not manifest.get("shards") or missing:
        raise ConfigError(
            f"{key}={value}: {len(missing)} of {len(manifest.get('shards', []))} shards listed in "
            f"{MANIFEST_NAME} are missing" + (f" (e.g. {missing[0]})" if missing else "")
        )
    return manifest


def _shard_folder(key: str, value: str) -> dict:
    """The manifest of the shard folder a config key names, every listed shard present."""
    from histotx.format import MANIFEST_NAME, FormatError, read_manifest
    from histotx.shard_location import is_remote, local_path

    if not value:
        raise ConfigError(f"{key} is not set: give the shard folder made by `histotx shard run` ({key}=DIR)")
    if is_remote(value):  # s3://, gs://, ...
        return _remote_shard_set(key, value)
    path = local_path(value)
    if not path.exists():
        raise ConfigError(f"{key}={value}: no such folder")
    if not path.is_dir():
        raise ConfigError(f"{key}={value}: not a folder (expected the shard folder made by `histotx shard run`)")
    if not (path / MANIFEST_NAME).is_file():
        tars = sorted(p.name for p in path.glob("*.tar"))
        hint = (
            f"it holds {len(tars)} .tar files but no {MANIFEST_NAME}: an unfinished `histotx shard run` "
            "(rerun it to finish) or a `--part` run not merged (`histotx shard merge`)"
            if tars
            else f"no {MANIFEST_NAME} there: is this the folder `histotx shard run --out` wrote?"
        )
        raise ConfigError(f"{key}={value}: {hint}")
    try:
        manifest = read_manifest(path)
    except (FormatError, ValueError) as exc:
        raise ConfigError(f"{key}={value}: {exc}") from exc
    names = [s["name"] for s in manifest.get("shards", [])]
    if not names:
        raise ConfigError(f"{key}={value}: {MANIFEST_NAME} lists no shards (every sample failed, or none was given)")
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise ConfigError(
            f"{key}={value}: {len(missing)} of {len(names)} shards listed in {MANIFEST_NAME} are missing "
            f"(e.g. {missing[0]}); `histotx shard verify {value}` checks the folder"
        )
    return manifest


def _vocabulary(value: str, manifest: dict, vocab_size: int) -> None:
    from histotx.shard_location import join, load_vocab

    path = join(value, manifest.get("vocab", "vocab.tsv"))
    vocab = load_vocab(value, manifest.get("vocab", "vocab.tsv"))
    if vocab is not None:
        n = len(vocab)
        if n > vocab_size:
            raise ConfigError(
                f"{path}: the shard set's vocabulary has {n} genes, more than model.vocab_size={vocab_size}; "
                f"set model.vocab_size={n} or more"
            )


def _writable_folder(key: str, value: str) -> None:
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={value}: exists and is not a folder")
    existing = path
    while not existing.exists():  # the folder, or the nearest parent that exists, must be writable
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={value}: cannot write there ({existing} is not a writable folder)")


def check_run_inputs(cfg: TrainConfig, resume: str | None = None) -> None:
    """Raise :class:`ConfigError` for the first input of ``cfg`` that cannot work (see the module docstring)."""
    manifest = _shard_folder("data.stream.shards", cfg.data.stream.shards)
    _vocabulary(cfg.data.stream.shards, manifest, cfg.model_config().vocab_size)
    if cfg.monitor.every_steps:
        _shard_folder("monitor.shards", cfg.monitor.shards)
    if cfg.init.backbone and (os.sep in cfg.init.backbone or cfg.init.backbone.startswith(".")):
        if not Path(cfg.init.backbone).exists():
            raise ConfigError(f"init.backbone={cfg.init.backbone}: no such file or folder")
    _writable_folder("out", cfg.out)
    if resume not in (None, "auto") and not Path(resume).exists():
        raise ConfigError(f"--resume {resume}: no such checkpoint or run folder")
