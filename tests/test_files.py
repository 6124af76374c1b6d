"""histotx.files: a file or folder is replaced whole or not at all; a failed write leaves nothing behind."""

from __future__ import annotations

import os
import stat

import pytest

from histotx.files import atomic_folder, atomic_path, atomic_write_bytes, atomic_write_json, sha256_file


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"v": 1})
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(path) as tmp:
        tmp.write_bytes(b"half a fi")
        raise RuntimeError("disk full")
    assert path.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_written_file_is_an_ordinary_file(tmp_path):
    """mkstemp makes 0600; the result has the permissions the umask gives any new file."""
    umask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "b.bin", b"xyz")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o644
    assert sha256_file(tmp_path / "b.bin") == "3608bca1e44ea6c4d268eb6db02260269892c0b42b86bbf1e77a6fa16c3c9282"


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    out = tmp_path / "export"
    with atomic_folder(out) as tmp:
        tmp.mkdir()
        (tmp / "one").write_text("1")
    assert [p.name for p in out.iterdir()] == ["one"]
    with pytest.raises(RuntimeError), atomic_folder(out) as tmp:
        tmp.mkdir()
        (tmp / "two").write_text("2")
        raise RuntimeError("the export failed")
    assert [p.name for p in out.iterdir()] == ["one"]  # the old folder stands
    with atomic_folder(out) as tmp:
        tmp.mkdir()
        (tmp / "two").write_text("2")
    assert [p.name for p in out.iterdir()] == ["two"]  # replaced, nothing of the old one kept
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no partial folder left
