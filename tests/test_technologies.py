"""The technology registry: every technology's reader follows the protocol, and the cohort's allowed
technologies, options and scan's detection all come from it."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from histotx.sharding.cohort import load_cohort
from histotx.sharding.technologies import IMAGE_ONLY, TECHNOLOGIES, Reader, readers

PROTOCOL = [name for name in dir(Reader) if not name.startswith("_")]


def test_every_reader_follows_the_protocol():
    assert set(PROTOCOL) == {"read", "mpp_hint", "genes", "detect", "scan_entries"}
    assert [t.name for t, _ in readers()] == [n for n, t in TECHNOLOGIES.items() if t.reader is not None]
    for tech, module in readers():
        missing = [name for name in PROTOCOL if not callable(getattr(module, name, None))]
        assert not missing, f"{tech.name}: {module.__name__} lacks {missing}"
        assert tech.needs_slide or callable(getattr(module, "slide", None)), tech.name
    assert TECHNOLOGIES[IMAGE_ONLY].reader is None


def write(tmp_path, text):
    path = tmp_path / "cohort.yaml"
    path.write_text(text)
    return load_cohort(path)


def test_cohort_options_nest_under_the_sample_or_stay_flat(tmp_path):
    cohort = write(
        tmp_path,
        "samples:\n"
        "  - {id: a, technology: visium_hd, slide: a.tif, data: a, options: {bin_size_um: 8}}\n"
        "  - {id: b, technology: visium_hd, slide: b.tif, data: b, bin_size_um: 16, image_scale: hires}\n"
        "  - {id: c, technology: image_only, slide: c.tif}\n",
    )
    a, b, c = cohort.samples
    assert (a.options.bin_size_um, a.options.image_scale) == (8.0, "fullres")
    assert (b.options.bin_size_um, b.options.image_scale) == (16.0, "hires")
    assert type(c.options).__name__ == "NoOptions" and not cohort.invalid


def test_cohort_refuses_what_the_registry_does_not_know(tmp_path):
    cohort = write(
        tmp_path,
        "samples:\n"
        "  - {id: a, technology: spatialomics, slide: a.tif, data: a}\n"
        "  - {id: b, technology: xenium, slide: b.tif, data: b, options: {bin_size_um: 8}}\n"
        "  - {id: c, technology: visium, slide: c.tif, data: c, options: {image_scale: midres}}\n"
        "  - {id: d, technology: visium, slide: d.tif, data: d, image_scale: hires, options: {image_scale: hires}}\n"
        "  - {id: e, technology: xenium, slide: e.tif}\n",
    )
    errors = dict(cohort.invalid)
    assert f"expected one of {', '.join(TECHNOLOGIES)}" in errors["a"]
    assert "sample b: options: unknown key" in errors["b"] and "bin_size_um" in errors["b"]
    assert "known: ['alignment']" in errors["b"]
    assert "image_scale must be one of" in errors["c"] and "midres" in errors["c"]
    assert "both at the top level and under options" in errors["d"]
    assert "needs `data:` (the Xenium output bundle)" in errors["e"]


def test_cosmx_export_is_found_read_and_checked(tmp_path):
    """The synthetic CosMx export: scan finds it, negative probes stay out of the genes, and a positions file
    that misses a FOV of the transcripts is refused naming it."""
    from histotx.sharding.errors import InputError
    from histotx.sharding.readers import read_genes, read_sites
    from histotx.sharding.scan import scan
    from histotx.synth import generate_cohort

    cohort_path = generate_cohort(tmp_path / "c", seed=1, technologies=("cosmx",))
    (entry,) = scan(tmp_path / "c")
    assert entry["technology"] == "cosmx" and entry["data"] == "cosmx/flatFiles"
    assert entry["slide"] == "cosmx/cosmx_he.ome.tif"
    cohort = load_cohort(cohort_path)
    (sample,) = cohort.samples
    genes = read_genes(sample, cohort)
    assert genes and not any(g.startswith("NegPrb") for g, _ in genes)
    sites = read_sites(sample, cohort)
    assert sites.n_sites > 1000 and sites.dropped["control_probe"] > 0
    assert abs(sites.mpp_estimate - 0.5) < 1e-6  # the slide's µm/px, from the alignment and the camera's
    # newer exports: FOV corners in mm, the transcripts gzipped; the same molecules land in the same places
    folder = tmp_path / "c" / "cosmx" / "flatFiles"
    fovs, tx = folder / "cosmx_fov_positions_file.csv", folder / "cosmx_tx_file.csv"
    rows = [line.split(",") for line in fovs.read_text().splitlines()[1:]]
    mm = [f"{r[0]},{float(r[1]) * 0.12028 / 1000:.9f},{float(r[2]) * 0.12028 / 1000:.9f}" for r in rows]
    fovs.write_text('"FOV","x_global_mm","y_global_mm"\n' + "\n".join(mm) + "\n")
    with gzip.open(folder / "cosmx_tx_file.csv.gz", "wb") as fh:
        fh.write(tx.read_bytes())
    tx.unlink()
    again = read_sites(sample, cohort)
    assert np.array_equal(again.xy_px, sites.xy_px) and again.info["fov_offset_max_px"] < 0.01
    fovs.write_text("\n".join(fovs.read_text().splitlines()[:-1]) + "\n")  # the last FOV left out
    with pytest.raises(InputError, match="cosmx_fov_positions_file.csv.*not listed"):
        read_sites(sample, cohort)
