"""The model cards of an export are huggingface_hub ModelCards built from the run's real settings: the true tile
(µm, px, µm/px) and input size, license_name/license_link with `license: other`, base_model for a continued
foundation model, and a card in the timm folder too."""

from __future__ import annotations

import pytest
from test_embed import tiny_model

from histotx.export.card import LICENSE_FILE, base_model, model_card
from histotx.export.targets import ExportContext
from histotx.format import new_manifest
from histotx.vocab import Vocab


def _teacher(tmp_path, backbone: str = ""):
    from histotx.export.source import Teacher

    loaded = tiny_model()  # 32 px input
    vocab = Vocab()
    vocab.extend((g, "") for g in loaded.genes)
    augment = {"global_crop_size": loaded.image_size, "mean": list(loaded.mean), "std": list(loaded.std)}
    manifest = new_manifest(
        {"mpp": 0.5, "tile_px": 256, "tiling": "grid", "min_tissue_fraction": 0.25},
        [{"name": "a.tar", "samples": 10, "bytes": 1, "sha256": "x"}],
        {"a": {"status": "ok", "technology": "visium", "patient": "P1", "tiles": 10}},
    )
    train = {"data": {"augment": augment}, "init": {"backbone": backbone}}
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    return loaded, Teacher(loaded.model.state_dict(), loaded.model.config, train, vocab, manifest, ckpt, 1)


def test_card_says_the_real_tile_and_license(tmp_path):
    from huggingface_hub import ModelCard

    loaded, teacher = _teacher(tmp_path)
    text = model_card(teacher, "other", timm=True)
    card = ModelCard(text)
    assert card.data.license == "other" and card.data.license_name == "unspecified"
    assert card.data.license_link == LICENSE_FILE and card.data.library_name == "transformers"
    assert card.data.base_model is None  # trained from scratch
    assert "a whole **128 µm** tile (trained on 256 px tiles at 0.5 µm/px) resized to 32 × 32 px" in text
    assert "4 µm per input pixel" in text and "antialiased bilinear" in text
    assert "32 × 32 px RGB tiles at **0.5 µm/px**" not in text  # what the card used to claim
    named = ModelCard(model_card(teacher, "other", license_name="acme-research", license_link="https://x.org/l"))
    assert named.data.license_name == "acme-research" and named.data.license_link == "https://x.org/l"
    assert "license_name" not in ModelCard(model_card(teacher, "cc-by-nc-sa-4.0")).data.to_dict()


@pytest.mark.parametrize(
    ("backbone", "expected"),
    [("hf-hub:MahmoodLab/UNI", "MahmoodLab/UNI"), ("MahmoodLab/UNI", "MahmoodLab/UNI"), ("", None)],
)
def test_base_model_of_a_continued_foundation_model(tmp_path, backbone, expected):
    from huggingface_hub import ModelCard

    _, teacher = _teacher(tmp_path, backbone)
    assert base_model(teacher) == expected
    assert ModelCard(model_card(teacher)).data.base_model == expected


def test_local_timm_backbone_names_its_hub_id(tmp_path):
    import json

    folder = tmp_path / "uni"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "vit", "pretrained_cfg": {"hf_hub_id": "org/m"}}))
    _, teacher = _teacher(tmp_path, str(folder))
    assert base_model(teacher) == "org/m"
    (folder / "config.json").write_text(json.dumps({"architecture": "vit", "pretrained_cfg": {}}))
    assert base_model(teacher) is None  # a local folder of unknown origin is not claimed as a Hub model


def test_both_folders_get_cards(tmp_path):
    from huggingface_hub import ModelCard

    from histotx.export import hf, timm_hub

    loaded, teacher = _teacher(tmp_path, "hf-hub:MahmoodLab/UNI")
    ctx = ExportContext(teacher, loaded.model, "other", ("hf", "timm"))
    hf.write(ctx, tmp_path / "hf")
    timm_hub.write(ctx, tmp_path / "timm")
    for name, library in (("hf", "transformers"), ("timm", "timm")):
        card = ModelCard.load(tmp_path / name / "README.md")
        assert card.data.library_name == library and card.data.base_model == "MahmoodLab/UNI"
        assert (tmp_path / name / LICENSE_FILE).read_text().startswith("# License")
    assert "timm.create_model" in (tmp_path / "timm" / "README.md").read_text()
