"""`scan` drafts a cohort file from a folder of outputs; the draft loads, validates and reads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from histotx.sharding.cohort import dump_cohort, load_cohort
from histotx.sharding.readers import read_sites, slide_path
from histotx.sharding.scan import PATIENT_TODO, TODO, draft_cohort, scan

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VISIUM = DATA / "scanpy-visium" / "visium_data" / "1.0.0"
XENIUM = DATA / "moleculeexperiment-xenium" / "xenium_V1_FF_Mouse_Brain" / "sample1"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real test data not found at {DATA}")


def touch(path: Path, size: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "cohort_dir"
    shutil.copytree(VISIUM, root / "lungA" / "outs")
    touch(root / "lungA" / "lungA_HE.svs", 100)
    touch(root / "lungA" / "small_preview.tif", 10)  # smaller than the svs and a worse pattern
    shutil.copytree(VISIUM, root / "lungB" / "outs")  # no slide anywhere near it
    touch(root / "unrelated.tif")  # at the root: must not become lungB's slide
    touch(root / "lungB_scan.svs")  # ... but one that names the sample may
    shutil.copytree(VISIUM, root / "batch1" / "s1" / "outs")
    shutil.copytree(VISIUM, root / "batch2" / "s1" / "outs")
    for size in ("002", "008", "016"):  # Visium HD: only the layout matters to scan
        touch(root / "hd1" / "outs" / "binned_outputs" / f"square_{size}um" / "filtered_feature_bc_matrix.h5")
        touch(root / "hd1" / "outs" / "binned_outputs" / f"square_{size}um" / "spatial" / "tissue_positions.parquet")
    touch(root / "hd1" / "outs" / "spatial" / "tissue_hires_image.png")
    touch(root / "hd1" / "hd1.tif", 50)
    bundle = root / "xen" / "run1__region1"
    bundle.mkdir(parents=True)
    shutil.copy(XENIUM / "experiment.xenium", bundle)
    shutil.copy(XENIUM / "transcripts.csv", bundle)
    touch(bundle / "morphology_focus.ome.tif", 1000)  # fluorescence, never the H&E
    touch(bundle / "run1_he_image.ome.tif", 10)
    (bundle / "run1_he_imagealignment.csv").write_text("2,0,0\n0,2,0\n0,0,1\n")
    for hid in ("TENX01", "NCBI7"):
        touch(root / "hest" / "st" / f"{hid}.h5ad")
        touch(root / "hest" / "metadata" / f"{hid}.json")
    touch(root / "hest" / "wsis" / "TENX01.tif")
    return root


def by_id(entries: list[dict]) -> dict[str, dict]:
    return {e["id"]: e for e in entries}


def test_scan_finds_every_kind(tree):
    entries = by_id(scan(tree))
    assert set(entries) == {"lungA", "lungB", "s1", "s1_2", "hd1", "run1_region1", "TENX01", "NCBI7"}
    assert {k: e["technology"] for k, e in entries.items()} == {
        "lungA": "visium",
        "lungB": "visium",
        "s1": "visium",
        "s1_2": "visium",
        "hd1": "visium_hd",
        "run1_region1": "xenium",
        "TENX01": "hest",
        "NCBI7": "hest",
    }
    assert entries["lungA"]["data"] == "lungA/outs" and entries["lungA"]["slide"] == "lungA/lungA_HE.svs"
    assert entries["lungB"]["slide"] == "lungB_scan.svs"
    assert entries["s1"]["slide"].startswith(TODO) and "batch1/s1/outs" in entries["s1"]["slide"]
    assert entries["hd1"]["data"] == "hd1/outs" and entries["hd1"]["options"]["bin_size_um"] == 2
    assert entries["hd1"]["slide"] == "hd1/hd1.tif"
    xen = entries["run1_region1"]
    assert xen["slide"] == "xen/run1__region1/run1_he_image.ome.tif" and "options" not in xen  # found in the bundle
    assert entries["TENX01"]["data"] == "hest" and "slide" not in entries["TENX01"]
    assert entries["NCBI7"]["slide"].startswith(TODO)
    # no patient information in Space Ranger / Xenium outputs (nor in an unreadable HEST metadata file)
    assert {e["patient"] for e in entries.values()} == {PATIENT_TODO}


def test_scan_inside_a_visium_hd_output(tree):
    (entry,) = scan(tree / "hd1" / "outs" / "binned_outputs")
    assert entry["technology"] == "visium_hd" and entry["data"] == "." and entry["options"]["bin_size_um"] == 2
    (entry,) = scan(tree / "hd1" / "outs" / "binned_outputs" / "square_008um")
    assert entry["technology"] == "visium_hd" and entry["options"]["bin_size_um"] == 8


def test_scan_without_a_nearby_slide_marks_todo(tree):
    (tree / "lungB_scan.svs").unlink()
    lungB = by_id(scan(tree))["lungB"]
    assert lungB["slide"] == f"{TODO}: path to the H&E slide (none found near lungB/outs)"


def test_scanned_cohort_loads_and_reads(tree):
    out = tree / "cohorts" / "cohort.yaml"
    out.parent.mkdir()
    draft = draft_cohort(tree, relative_to=out.parent)
    dump_cohort(draft.samples, out, draft.guesses)
    cohort = load_cohort(out)
    assert cohort.invalid == [] and len(cohort.samples) == 7  # NCBI7 (HEST, no slide) is left out
    assert [x.split(" (")[0] for x in draft.left_out] == ["NCBI7"]  # HEST, no slide: left out, not TODO
    for s in cohort.samples:
        s.validate()
    lungA = next(s for s in cohort.samples if s.id == "lungA")
    assert lungA.data == "../lungA/outs"
    assert slide_path(lungA, cohort).resolve() == tree / "lungA" / "lungA_HE.svs"
    sites = read_sites(lungA, cohort)
    assert sites.n_sites == 100
    tenx = next(s for s in cohort.samples if s.id == "TENX01")
    assert slide_path(tenx, cohort).resolve() == tree / "hest" / "wsis" / "TENX01.tif"
    xen = next(s for s in cohort.samples if s.technology == "xenium")
    sites = read_sites(xen, cohort)
    assert sites.n_sites == 776 and sites.info["alignment"] == "run1_he_imagealignment.csv"


def test_draft_guesses_spaceranger_images_and_never_writes_a_placeholder(tree):
    draft = draft_cohort(tree)
    entries = by_id(draft.samples)
    s1 = entries["s1"]  # a Space Ranger output with no slide near it: its own lowres image (the hires one of
    # the shared data is blank: one colour, skipped), said as a guess
    assert s1["slide"] == "batch1/s1/outs/spatial/tissue_lowres_image.png" and s1["options"]["image_scale"] == "lowres"
    assert any(
        g.startswith("s1: no H&E slide beside the Space Ranger output; using its lowres image") for g in draft.guesses
    )
    assert not any(str(e.get("slide", "")).startswith(TODO) for e in draft.samples)
    assert [x.split(" ")[0] for x in draft.left_out] == ["NCBI7"]


def test_a_slide_on_its_own_becomes_an_image_only_sample(tmp_path):
    touch(tmp_path / "slides" / "case 7.svs", 10)
    draft = draft_cohort(tmp_path)
    assert draft.samples == [
        {"id": "case_7", "patient": PATIENT_TODO, "technology": "image_only", "slide": "slides/case 7.svs", "mpp": None}
    ]
    assert draft.guesses == ["case_7: a whole-slide file on its own → image_only sample (slides/case 7.svs)"]


def test_paths_stay_as_given_through_symlinks(tree, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tree, target_is_directory=True)
    out = tmp_path / "cohorts" / "c.yaml"
    draft = draft_cohort(link, relative_to=out.parent)
    lungA = by_id(draft.samples)["lungA"]
    assert lungA["data"] == "../link/lungA/outs" and lungA["slide"] == "../link/lungA/lungA_HE.svs"


def test_scan_of_a_missing_folder_says_no_such_folder(tmp_path, caplog):
    from histotx.cli import main

    assert main(["shard", "scan", str(tmp_path / "nope"), "--out", str(tmp_path / "c.yaml")]) == 2
    assert f"{tmp_path / 'nope'}: no such folder" in caplog.text
    assert not (tmp_path / "c.yaml").exists()


def test_a_placeholder_left_in_a_cohort_is_refused_as_such(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "samples:\n- {id: a, technology: image_only, slide: 'TODO: path to the H&E slide'}\n"
    )
    cohort = load_cohort(tmp_path / "c.yaml")
    assert cohort.samples == [] and "`slide:` is still a placeholder" in cohort.invalid[0][1]


def test_scan_of_the_shared_data_gives_a_cohort_shard_run_takes_unedited(tmp_path, capsys):
    """The round trip a newcomer makes: scan ../shared/data, then shard the file as written (settings for
    Space Ranger's low-res image, 16 µm/px: the sample's own H&E is not in the data)."""
    from histotx.cli import main

    cohort = tmp_path / "cohort.yaml"
    assert main(["shard", "scan", str(DATA), "--out", str(cohort)]) == 0
    printed = capsys.readouterr().out
    assert "guessed: 1_0_0: no H&E slide beside the Space Ranger output; using its lowres image" in printed
    assert "left out: sample1 (xenium" in printed and "TODO: path" not in cohort.read_text()
    out = tmp_path / "shards"
    args = ["shard", "run", str(cohort), "--out", str(out), "mpp=8", "tile_px=32", "mask_mpp=16"]
    assert main([*args, "max_tiles_per_sample=6"]) == 0
    manifest = yaml.safe_load((out / "manifest.json").read_text())
    samples = manifest["samples"]
    assert {k: v["status"] for k, v in samples.items()} == {"1_0_0": "ok", "cmu-1-small-region": "ok"}
    assert samples["1_0_0"]["sites_kept"] > 0 and samples["cmu-1-small-region"]["technology"] == "image_only"
