"""The shard format, vocabulary and configs: round trips, validation, append-only ids, overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from histotx.config import ConfigError, dump_config, load_config
from histotx.format import (
    FormatError,
    TileSample,
    TranscriptGrid,
    decode_grid,
    decode_sample,
    encode_grid,
    encode_image_rgb,
    encode_sample,
)
from histotx.vocab import Vocab


def _grid(n=5, seed=0):
    rng = np.random.default_rng(seed)
    per = rng.integers(0, 4, n)
    offsets = np.concatenate([[0], np.cumsum(per)])
    return TranscriptGrid(
        rng.uniform(0, 256, (n, 2)),
        offsets,
        rng.integers(0, 300, offsets[-1]),
        rng.integers(1, 9, offsets[-1]).astype(float),
        55.0,
        "disk",
    )


def test_grid_round_trip_is_exact_and_pickle_free():
    g = _grid()
    blob = encode_grid(g)
    assert b"pickle" not in blob.lower()
    h = decode_grid(blob)
    for name in ("xy", "offsets", "gene", "count"):
        np.testing.assert_array_equal(getattr(g, name), getattr(h, name))
    assert (h.footprint_um, h.footprint_shape) == (55.0, "disk")
    assert decode_grid(encode_grid(TranscriptGrid.empty())).n_sites == 0


def test_grid_validation_and_truncation():
    with pytest.raises(FormatError, match="offsets"):
        TranscriptGrid(np.zeros((2, 2)), [0, 1], [1], [1.0], 0, "point")
    with pytest.raises(FormatError, match="finite"):
        TranscriptGrid(np.zeros((1, 2)), [0, 1], [1], [np.nan], 0, "point")
    blob = encode_grid(_grid())
    with pytest.raises(FormatError, match="truncated"):
        decode_grid(blob[:-5])
    with pytest.raises(FormatError, match="magic"):
        decode_grid(b"garbage!")


def test_sample_round_trip():
    meta = {
        "sample": "s1",
        "patient": "p",
        "technology": "visium",
        "tile_px": 8,
        "mpp": 0.5,
        "source_mpp": 0.25,
        "origin_level0_px": [0.0, 0.0],
        "origin_um": [0.0, 0.0],
        "n_sites": 5,
        "n_genes": 3,
        "total_count": 9.0,
    }
    s = TileSample("s1__r00000_c00001", encode_image_rgb(np.zeros((8, 8, 3), np.uint8)), "jpg", _grid(), meta)
    members = encode_sample(s)
    assert set(members) == {"__key__", "jpg", "tx", "json"}
    back = decode_sample(members)
    assert back.key == s.key and back.meta == meta and back.grid.n_sites == 5
    with pytest.raises(FormatError, match="metadata lacks"):
        encode_sample(TileSample("k", b"", "jpg", _grid(), {}))


def test_vocab_is_append_only(tmp_path):
    v = Vocab()
    assert v.extend([("ACTB", "ENSG00000075624"), ("GAPDH", ""), ("ENSG00000141510", "")]) == [0, 1, 2]
    # GAPDH's Ensembl id arrives later (versioned): same id, filled in.
    assert v.add("GAPDH", "ENSG00000111640.15") == 1
    assert v.lookup("", "ENSG00000111640") == 1 and v.lookup("TP53", "ENSG00000141510") == 2
    v.save(tmp_path / "vocab.tsv")
    w = Vocab.load(tmp_path / "vocab.tsv")
    assert w.add("ACTB") == 0 and w.add("NEW1") == 3 and len(w) == 4
    assert w.lookup("", "ENSG00000075624.3") == 0


@dataclass
class _Inner:
    lr: float = 1e-3
    sizes: list[int] = field(default_factory=lambda: [1, 2])


@dataclass
class _Cfg:
    name: str = "x"
    flag: bool = False
    inner: _Inner = field(default_factory=_Inner)


def test_config_yaml_overrides_and_dump(tmp_path):
    (tmp_path / "c.yaml").write_text("name: y\ninner:\n  lr: 0.1\n")
    cfg = load_config(_Cfg, tmp_path / "c.yaml", ["inner.sizes=[4,8]", "flag=true"])
    assert cfg.name == "y" and cfg.inner.lr == 0.1 and cfg.inner.sizes == [4, 8] and cfg.flag is True
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(_Cfg, tmp_path / "resolved.yaml") == cfg
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(_Cfg, None, ["inner.lrr=1"])
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(_Cfg, None, ["inner.lr=abc"])


def test_config_messages_name_the_key_the_value_and_what_was_expected(tmp_path):
    (tmp_path / "c.yaml").write_text("inner:\n  sizes: [1, x]\n")
    with pytest.raises(ConfigError, match=r"c.yaml.inner.sizes\[1\]: expected an integer, got 'x'"):
        load_config(_Cfg, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="command line 'flag=maybe': expected true/false, got 'maybe'"):
        load_config(_Cfg, None, ["flag=maybe"])
    with pytest.raises(ConfigError, match="command line 'inner.lr=true': expected a number, got True"):
        load_config(_Cfg, None, ["inner.lr=true"])  # YAML's true is no number
    with pytest.raises(ConfigError, match="command line 'inner=3': expected a mapping for _Inner, got 3"):
        load_config(_Cfg, None, ["inner=3"])
    with pytest.raises(ConfigError, match="command line 'name=\\[1\\]': expected a string, got \\[1\\]"):
        load_config(_Cfg, None, ["name=[1]"])
    assert load_config(_Cfg, None, ["inner.sizes=3,4", "name=5"]) == _Cfg(name="5", inner=_Inner(sizes=[3, 4]))


def test_config_unions_are_tried_in_order_and_tuples_keep_their_length():
    from histotx.config import _coerce

    assert _coerce(["16", "native", 8], list[float | str], "x") == [16.0, "native", 8.0]
    with pytest.raises(ConfigError, match="x: expected a list of at most 2 items"):
        _coerce([1, 2, 3], tuple[float, float], "x")
    with pytest.raises(ConfigError, match="x: expected a number or a string, got \\[1\\]"):
        _coerce([1], float | str | None, "x")


def test_config_sections_start_from_a_base_file(tmp_path):
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "inner.yaml").write_text("lr: 0.5\nsizes: [3]\n")
    (tmp_path / "c.yaml").write_text("inner:\n  _base_: presets/inner.yaml\n  sizes: [7, 8]\n")
    cfg = load_config(_Cfg, tmp_path / "c.yaml", ["name=z"])
    assert cfg.inner == _Inner(lr=0.5, sizes=[7, 8]) and cfg.name == "z"
    (tmp_path / "presets" / "inner.yaml").write_text("_base_: inner.yaml\nlr: 0.5\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(_Cfg, tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("inner:\n  _base_: presets/missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(_Cfg, tmp_path / "c.yaml")
