"""One exception for bad input, carrying the file and the problem, so summaries say exactly what broke."""

from __future__ import annotations

import json
import os
from pathlib import Path


class OutputError(ValueError):
    """The run cannot write its output (folder locked by another run, disk full, file-size limit): the run
    stops with this one clear line (``histotx`` prints ValueErrors without a traceback) and a rerun resumes."""


class InputError(Exception):
    """Bad input for one sample. ``str()`` reads ``<path>: <problem>``."""

    def __init__(self, path: str | os.PathLike | None, problem: str) -> None:
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


def read_json_object(path: str | os.PathLike, what: str) -> dict:
    """A JSON object from ``path``; a missing, unreadable or non-object file is an InputError naming it."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InputError(path, f"{what} missing") from exc
    except (OSError, ValueError) as exc:
        raise InputError(path, f"unreadable {what} ({exc})") from exc
    if not isinstance(doc, dict):
        raise InputError(path, f"{what} must be a JSON object")
    return doc
