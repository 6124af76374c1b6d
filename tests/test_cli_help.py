"""Every `histotx` subcommand explains itself: a description, help for every argument and its default; the
README and `histotx train --help` start several ranks the same way."""

from __future__ import annotations

import argparse
from pathlib import Path

from histotx.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _parsers(parser: argparse.ArgumentParser, name: str = "histotx"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _parsers(p, f"{name} {sub}")


def test_every_subcommand_has_a_description_and_every_argument_its_help_and_default():
    problems = []
    for name, parser in _parsers(build_parser()):
        shows_defaults = issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
        if not parser.description:
            problems.append(f"{name}: no description")
        for a in parser._actions:
            if isinstance(a, (argparse._SubParsersAction, argparse._HelpAction, argparse._VersionAction)):
                continue
            if a.help == argparse.SUPPRESS:
                continue
            if not a.help:
                problems.append(f"{name} {a.dest}: no help")
            elif a.default not in (None, False, []) and "default" not in a.help and not shows_defaults:
                problems.append(f"{name} {a.dest}: the default {a.default!r} is not in its help")
    assert not problems, "\n".join(problems)


def test_train_help_and_readme_launch_several_ranks_alike():
    train = dict(_parsers(build_parser()))["histotx train"]
    launch = "torchrun --nproc-per-node 2 -m histotx.launch.train configs/train/tiny_cpu.yaml"
    assert launch in train.format_help()
    assert launch in README.read_text()
