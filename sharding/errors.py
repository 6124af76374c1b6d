"""One exception for bad input, carrying the file and the problem, so summaries say exactly what broke."""
from __future__ import annotations

import os


class InputError(Exception):
    """Bad input for one sample. ``str()`` reads ``<path>: <problem>``."""

    def __init__(self, path: str | os.PathLike | None, problem: str) -> None:
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
