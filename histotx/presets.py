"""The configs that ship inside the package (``histotx/configs/{train,model}/*.yaml``, package data).

``histotx train tiny_cpu`` and ``histotx demo`` find them with :mod:`importlib.resources`, so they work from
a wheel as from a checkout (where ``histotx/configs`` is the repository's ``configs/`` folder).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

KINDS = ("train", "model")


def names(kind: str = "train") -> list[str]:
    """The packaged config names of a kind (file names without ``.yaml``)."""
    folder = resources.files("histotx") / "configs" / kind
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def packaged(name: str, kind: str = "train") -> Path:
    """The file of packaged config ``name`` (``tiny_cpu`` or ``tiny_cpu.yaml``); a wheel installs it as a
    plain file, so the path stays valid for the life of the process."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    ref = resources.files("histotx") / "configs" / kind / f"{stem}.yaml"
    if not ref.is_file():
        raise FileNotFoundError(
            f"{name}: no such config file, and no packaged {kind} config of that name "
            f"(packaged: {', '.join(names(kind))})"
        )
    return Path(str(ref))


def resolve(config: str | Path, kind: str = "train") -> Path:
    """A config argument as a file: an existing path as given, else a packaged config's name."""
    path = Path(config)
    if path.exists() or len(path.parts) > 1:
        return path
    return packaged(str(config), kind)
