"""What `histotx train` tells the person at the terminal (rank 0 only): where the run goes, a progress line
with the loss and the teacher-collapse monitors, warnings in plain words, and where the checkpoint is.

The numbers are the logging window's record (``metrics.jsonl``; see :mod:`histotx.train.metrics` and
:class:`histotx.train.monitor.CollapseStats`). On a terminal the line is a tqdm bar; otherwise (a log file,
a batch job, or ``log.progress=false``) each record is one log line. Two things are said in words, once each,
when they happen:

- the teacher puts every sample on one prototype (``teacher/prototypes_used`` ≤ 1) in
  :data:`COLLAPSE_AFTER` logging windows in a row: it has collapsed and its targets teach nothing;
- the teacher's output is uniform (entropy ≥ :data:`UNIFORM_FRACTION` × ln K) in as many windows in a row:
  the other collapse, targets that say nothing;
- the loss climbs: a window's loss is more than :data:`CLIMB_FACTOR` × the lowest so far, after
  :data:`CLIMB_AFTER` windows (DINO's loss may rise for a few windows while the teacher warms up), and, at
  the end, a loss that finished more than 10 % above where it started.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("histotx.train")

CLIMB_FACTOR = 1.5
CLIMB_AFTER = 3
UNIFORM_FRACTION = 0.99  # teacher entropy at least this share of ln K: a uniform teacher
COLLAPSE_AFTER = 3  # windows in a row (a freshly initialised teacher may use one prototype for a step or two)


def _prototypes(record: dict[str, Any]) -> tuple[int, int] | None:
    if "teacher/prototypes_used" not in record:
        return None
    k = round(math.exp(record["teacher/entropy_max"])) if "teacher/entropy_max" in record else 0
    return int(record["teacher/prototypes_used"]), k


def summary(step: int, total: int, record: dict[str, Any]) -> str:
    """One record in words: ``step 10/20: loss 3.612, teacher entropy 4.10 of 4.85, 37 of 128 prototypes``."""
    parts = [f"step {step}/{total}: loss {record.get('loss', float('nan')):.3f}"]
    if "teacher/entropy" in record:
        parts.append(f"teacher entropy {record['teacher/entropy']:.2f} of {record.get('teacher/entropy_max', 0):.2f}")
    protos = _prototypes(record)
    if protos:
        parts.append(f"{protos[0]} of {protos[1]} prototypes used")
    if "samples_per_s" in record:
        parts.append(f"{record['samples_per_s']:.1f} samples/s")
    return ", ".join(parts)


class Watch:
    """The warnings' state over a run: loss history, and which warning was already given."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []
        self.said: set[str] = set()
        self.one_prototype = 0  # logging windows in a row with at most one prototype used
        self.uniform = 0  # ... with the teacher's entropy within UNIFORM_FRACTION of ln K

    def check(self, step: int, record: dict[str, Any]) -> list[str]:
        """The warnings this record raises (each kind once per run)."""
        out = []
        protos = _prototypes(record)
        self.one_prototype = self.one_prototype + 1 if protos and protos[0] <= 1 else 0
        if self.one_prototype >= COLLAPSE_AFTER and "collapse" not in self.said:
            self.said.add("collapse")
            out.append(
                f"step {step}: the teacher has put every sample on one prototype for {self.one_prototype} logging "
                f"windows (teacher/prototypes_used={protos[0]} of {protos[1]}): it has collapsed and its targets "
                "teach nothing. Usual causes: a teacher "
                "temperature too low for the batch (ssl.schedule.teacher_temp), a learning rate too high "
                "(ssl.schedule.lr), too few distinct tiles"
            )
        entropy, most = record.get("teacher/entropy"), record.get("teacher/entropy_max")
        flat = entropy is not None and most and entropy >= UNIFORM_FRACTION * most
        self.uniform = self.uniform + 1 if flat else 0
        if self.uniform >= COLLAPSE_AFTER and "uniform" not in self.said:
            self.said.add("uniform")
            out.append(
                f"step {step}: the teacher's output has been uniform for {self.uniform} logging windows (teacher "
                f"entropy {entropy:.2f} of the most possible {most:.2f}): its targets say nothing about the tile, so "
                "the student learns nothing from them. Usual causes: a teacher temperature too high for the "
                "prototypes (ssl.schedule.teacher_temp), or too few steps for the tiny model to leave its start"
            )
        loss = record.get("loss")
        if loss is not None and math.isfinite(loss):
            self.losses.append((step, float(loss)))
            low_step, low = min(self.losses, key=lambda s: s[1])
            if (
                len(self.losses) > CLIMB_AFTER
                and loss > low + (CLIMB_FACTOR - 1) * abs(low)
                and "climb" not in self.said
            ):
                self.said.add("climb")
                out.append(
                    f"step {step}: the loss is climbing: {loss:.3f} now, {low:.3f} at step {low_step}. "
                    "A rising SSL loss usually means a learning rate too high or a teacher that is collapsing "
                    "(watch teacher/prototypes_used); check metrics.jsonl"
                )
        return out

    def at_end(self) -> list[str]:
        if len(self.losses) < 2 or "climb" in self.said:
            return []
        (s0, first), (s1, last) = self.losses[0], self.losses[-1]
        if last > first + 0.1 * abs(first):
            return [
                f"the loss finished higher than it started ({first:.3f} at step {s0} → {last:.3f} at step {s1}): "
                "the run did not learn; see metrics.jsonl (teacher/*, lr)"
            ]
        return []


class Console:
    """Rank 0's progress line and warnings; a console that says nothing on the other ranks."""

    def __init__(self, total_steps: int, start_step: int, progress: bool, enabled: bool = True) -> None:
        self.enabled, self.total, self.step = enabled, total_steps, start_step
        self.watch = Watch()
        self.bar = None
        if enabled and progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self.plain = enabled and self.bar is None  # no bar (off, or not a terminal): one log line per record

    def record(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            postfix = {"loss": f"{record.get('loss', float('nan')):.3f}"}
            if "teacher/entropy" in record:
                postfix["ent"] = f"{record['teacher/entropy']:.2f}/{record.get('teacher/entropy_max', 0):.2f}"
            protos = _prototypes(record)
            if protos:
                postfix["protos"] = f"{protos[0]}/{protos[1]}"
            self.bar.set_postfix(postfix, refresh=False)
        elif self.plain:
            log.info("%s", summary(step, self.total, record))
        for warning in self.watch.check(step, record):
            self._warn(warning)

    def advance(self, steps: int = 1) -> None:
        self.step += steps
        if self.bar is not None:
            self.bar.update(steps)

    def _warn(self, text: str) -> None:
        if self.bar is not None:
            self.bar.clear()
        log.warning("%s", text)
        if self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.enabled:
            for warning in self.watch.at_end():
                log.warning("%s", warning)


def say_start(out: Path, shards: str, world: int, steps: int, resume: str | None) -> None:
    """The run folder, before anything is built."""
    how = f", resuming ({resume})" if resume else ""
    log.info(
        "training %d steps on %d rank%s%s from %s → run folder %s (config.yaml, metrics.jsonl, checkpoints/)",
        steps,
        world,
        "" if world == 1 else "s",
        how,
        shards,
        out.resolve(),
    )


def say_end(out: Path) -> None:
    """The newest complete checkpoint, and how to use it."""
    from histotx.train.checkpoint import newest

    path = newest(out / "checkpoints")
    if path is None:
        log.info("no checkpoint was written under %s", out)
        return
    log.info("checkpoint: %s (resume: --resume auto; export: histotx export %s --out DIR)", path.resolve(), out)
