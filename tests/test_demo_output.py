"""The demo's terminal output: its table explained (every group column, and why one is empty), and log lines
kept out of the stage lines (they go to demo.log; a stage line counts its warnings)."""

from __future__ import annotations

import logging

from histotx.demo import _Quiet, _stage, explain_table


def test_the_table_is_explained_and_an_empty_group_says_why():
    groups = {"region": ["A", "B"], "crowding": ["C"], "hidden": ["D"], "housekeeping": ["ACTB"]}
    text = explain_table(["A", "B", "C", "D"], groups)
    flat = " ".join(text.split())
    assert "the mean over the 4 target genes" in flat
    assert "region the same mean over this group's target genes (2 of the targets)" in flat
    assert "housekeeping the same mean over this group's target genes (no target gene in this group: column" in flat
    assert "the H&E does not show" in flat and "random_init the same architecture untrained" in flat
    assert max(map(len, text.splitlines())) <= 110


def test_log_lines_go_to_the_log_file_and_the_stage_line_counts_warnings(tmp_path, capsys):
    log = logging.getLogger("histotx.sharding.pipeline")
    with _Quiet(tmp_path / "demo.log") as quiet:
        log.warning("every one of the 2 samples is its own patient")
        log.info("vocabulary: 84 genes")
        _stage(2, "sharded", 0.0, quiet)
        _stage(3, "verified", 0.0, quiet)
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].endswith(f"sharded (1 warning: see {tmp_path / 'demo.log'})") and lines[1].endswith("verified")
    assert "own patient" not in out.err + out.out
    text = (tmp_path / "demo.log").read_text()
    assert "WARNING histotx.sharding.pipeline: every one of the 2 samples" in text and "vocabulary: 84 genes" in text
