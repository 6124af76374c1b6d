"""Pathology foundation models into FusedViT: small random UNI / H-optimus-0 / Virchow2 (timm) and
Phikon-v2 (transformers) in their hub layouts, loaded and compared with the original model's outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from histotx.model import FusedViT, FusedViTConfig, ModelConfigError
from histotx.model.pretrained import init_from_pretrained, load_pretrained, read_checkpoint, save_timm

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

FP32_FOLD_TOL = 32 * 2.0**-24
HOPTIMUS_MEAN, HOPTIMUS_STD = (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every tensor off its init (LayerScale to O(1)) so that a wrong map cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "lambda1")):
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.2)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def save_timm_hub(model, folder, architecture, model_args, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """The hub layout: config.json (architecture, model_args, pretrained_cfg) + model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": model.embed_dim,
        "global_pool": "token",
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, model_args["img_size"], model_args["img_size"]],
            "interpolation": "bicubic",
            "mean": list(mean),
            "std": list(std),
            "num_classes": 0,
        },
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def timm_tokens(model, x):
    """(cls, registers, patches) of timm's normalised forward_features."""
    feats = model.forward_features(x)
    r = model.num_reg_tokens
    return feats[:, 0], feats[:, 1 : 1 + r], feats[:, 1 + r :]


def dinov2_tokens(model, x):
    """(cls, registers, patches) of transformers' Dinov2 last hidden state (no registers)."""
    h = model(pixel_values=x).last_hidden_state
    return h[:, 0], h[:, 1:1], h[:, 1:]


def assert_same_image_outputs(ours: FusedViT, theirs: torch.nn.Module, size: int, seed: int = 0):
    """Same weights, other kernels (timm / transformers vs ours, each summing in its own order): compared
    on float64 copies, so that kernel order (which differs between CPUs) is ~1e-15 and out of the picture.
    What remains is deterministic: loaders that fold the CLS position row into the token (UNI, Virchow2,
    Phikon) add two fp32 tensors once, one fp32 rounding (≤ 2⁻²⁴ relative) of an input to the network;
    FP32_FOLD_TOL allows 32 such roundings at the output's scale."""
    ours, theirs = copy.deepcopy(ours).double().eval(), copy.deepcopy(theirs).double().eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        tokens = timm_tokens if hasattr(theirs, "forward_features") else dinov2_tokens
        cls, regs, patches = tokens(theirs, x)
        out = ours(x)
    for got, want in ((out.cls, cls), (out.registers, regs), (out.patch, patches)):
        scale = float(want.abs().max()) if want.numel() else 1.0
        torch.testing.assert_close(got, want, atol=FP32_FOLD_TOL * scale, rtol=0)


def check_report(report, model):
    block_keys = [k for k in model.image_backbone_state_dict() if k.startswith("blocks.")]
    assert set(block_keys) <= set(report.loaded) and len(block_keys) == len(model.blocks) * len(
        [k for k in block_keys if k.startswith("blocks.0.")]
    )
    assert all(k == "mask_token" or k.startswith("transcript.") for k in report.missing)
    assert "blocks" in report.summary()


def test_uni_layout(tmp_path):
    args = dict(
        img_size=64,
        patch_size=16,
        depth=2,
        embed_dim=64,
        num_heads=2,
        init_values=1e-5,
        num_classes=0,
        dynamic_img_size=True,
    )
    torch.manual_seed(0)
    uni = randomise(timm.create_model("vit_large_patch16_224", pretrained=False, **args))
    folder = save_timm_hub(uni, tmp_path / "uni", "vit_large_patch16_224", args)
    # the fixture really is a timm hub folder
    again = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    torch.testing.assert_close(
        again.forward_features(torch.ones(1, 3, 64, 64)), uni.forward_features(torch.ones(1, 3, 64, 64))
    )

    # hub folders holding pytorch_model.bin instead (read with weights_only) load the same
    as_bin = tmp_path / "uni_bin"
    as_bin.mkdir()
    (as_bin / "config.json").write_text((folder / "config.json").read_text())
    torch.save(uni.state_dict(), as_bin / "pytorch_model.bin")
    assert_same_image_outputs(load_pretrained(as_bin)[0], uni, 64)

    model, report = load_pretrained(folder, vocab_size=50)
    assert model.config.size == "custom" and model.config.mlp == "mlp" and model.config.num_registers == 0
    check_report(report, model)
    assert report.image_mean == (0.485, 0.456, 0.406)
    assert_same_image_outputs(model, uni, 64)
    assert_same_image_outputs(model, uni, 96, seed=1)  # dynamic size: the position grid is interpolated alike
    # with transcripts of no tokens nothing changes; with some, the image model is extended, not replaced
    from histotx.model import TranscriptBatch

    zeros = torch.zeros(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        out = copy.deepcopy(model).double()(zeros, TranscriptBatch.empty(2))
        want = timm_tokens(copy.deepcopy(uni).double(), zeros)[0]
    torch.testing.assert_close(out.cls, want, atol=FP32_FOLD_TOL * float(want.abs().max()), rtol=0)
    # a larger stored grid is interpolated once, at load
    big, report = load_pretrained(folder, img_size=96)
    assert report.resized == ["pos_embed (4, 4) → (6, 6)"] and big.pos_embed.shape == (1, 36, 64)


def test_hoptimus_layout_registers_swiglu(tmp_path):
    args = dict(
        img_size=56,
        depth=2,
        embed_dim=64,
        num_heads=2,
        mlp_ratio=4.0,
        init_values=1e-5,
        num_classes=0,
        dynamic_img_size=True,
    )
    torch.manual_seed(1)
    hopt = randomise(timm.create_model("vit_giant_patch14_reg4_dinov2", pretrained=False, **args))
    folder = save_timm_hub(hopt, tmp_path / "hopt", "vit_giant_patch14_reg4_dinov2", args, HOPTIMUS_MEAN, HOPTIMUS_STD)
    model, report = load_pretrained(folder)
    cfg = model.config
    assert (cfg.patch_size, cfg.num_registers, cfg.mlp, cfg.mlp_hidden_dim) == (14, 4, "swiglu", 256)
    assert report.image_mean == HOPTIMUS_MEAN and report.image_std == HOPTIMUS_STD
    check_report(report, model)
    assert_same_image_outputs(model, hopt, 56)
    assert_same_image_outputs(model, hopt, 84, seed=2)


def test_virchow2_layout_by_config_and_by_name(tmp_path):
    from timm.layers import SwiGLUPacked

    args = dict(
        img_size=56,
        depth=2,
        embed_dim=96,
        num_heads=2,
        reg_tokens=4,
        mlp_ratio=5.3375,
        init_values=1e-5,
        num_classes=0,
        global_pool="",
        dynamic_img_size=True,
    )
    torch.manual_seed(2)
    virchow = randomise(
        timm.create_model(
            "vit_huge_patch14_224", pretrained=False, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, **args
        )
    )
    assert not virchow.no_embed_class  # CLS and registers have position rows, folded in at load
    # as on the hub, config.json cannot name the MLP layer: the weights' shapes must tell
    folder = save_timm_hub(virchow, tmp_path / "virchow2", "vit_huge_patch14_224", args)
    model, report = load_pretrained(folder)
    assert model.config.mlp == "swiglu" and model.config.mlp_hidden_dim == 512 and model.config.num_registers == 4
    check_report(report, model)
    assert_same_image_outputs(model, virchow, 56)
    assert_same_image_outputs(model, virchow, 70, seed=3)
    # the same weights by timm name + weights file
    by_name, _ = load_pretrained("vit_huge_patch14_224", weights=folder / "model.safetensors", model_args=args)
    assert_same_image_outputs(by_name, virchow, 56)


def make_dinov2(swiglu: bool, seed: int):
    config = transformers.Dinov2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=4,
        image_size=64,
        patch_size=16,
        layerscale_value=1e-5,
        use_swiglu_ffn=swiglu,
    )
    torch.manual_seed(seed)
    return randomise(transformers.Dinov2Model(config), seed)


@pytest.mark.parametrize("swiglu", [False, True])
def test_phikon_v2_layout(tmp_path, swiglu):
    phikon = make_dinov2(swiglu, seed=3)
    phikon.save_pretrained(tmp_path / "phikon")  # the hub's (legacy) key names
    model, report = load_pretrained(tmp_path / "phikon")
    assert model.config.mlp == ("swiglu" if swiglu else "mlp") and model.config.size == "custom"
    check_report(report, model)
    assert "mask_token" in report.loaded and "qkv" in " ".join(report.loaded)
    assert_same_image_outputs(model, phikon, 64)
    # transformers' in-memory names (q_proj/k_proj/v_proj, gate/up/down_proj) map as well
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "config.json").write_text((tmp_path / "phikon" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in phikon.state_dict().items()}, str(renamed / "model.safetensors"))
    assert any("q_proj" in k for k in load_file(str(renamed / "model.safetensors")))
    again, _ = load_pretrained(renamed)
    assert_same_image_outputs(again, phikon, 64)


def test_loads_fail_loudly(tmp_path):
    args = dict(img_size=32, patch_size=16, depth=2, embed_dim=32, num_heads=2, num_classes=0)
    torch.manual_seed(4)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, **args)
    state = vit.state_dict()
    # a checkpoint saved from a wrapper: every key prefixed, no block matches
    prefixed = tmp_path / "prefixed"
    save_timm_hub(vit, prefixed, "vit_base_patch16_224", args)
    save_file({f"model.{k}": v.contiguous() for k, v in state.items()}, str(prefixed / "model.safetensors"))
    with pytest.raises(ModelConfigError, match="blocks"):
        load_pretrained(prefixed)
    # a block tensor missing
    partial = tmp_path / "partial"
    save_timm_hub(vit, partial, "vit_base_patch16_224", args)
    save_file(
        {k: v.contiguous() for k, v in state.items() if k != "blocks.1.attn.proj.weight"},
        str(partial / "model.safetensors"),
    )
    with pytest.raises(ModelConfigError, match="blocks.1.attn.proj.weight"):
        load_pretrained(partial)
    # into a model of another shape
    wrong = FusedViT(FusedViTConfig(size="custom", embed_dim=32, depth=3, num_heads=2, img_size=32))
    with pytest.raises(ModelConfigError, match="depth"):
        init_from_pretrained(wrong, partial)
    with pytest.raises(ModelConfigError, match="fixes"):
        load_pretrained(partial, embed_dim=64)
    with pytest.raises(ModelConfigError, match="config.json"):
        read_checkpoint(tmp_path)
    with pytest.raises(ModelConfigError, match="weights"):
        read_checkpoint("vit_base_patch16_224")


@pytest.mark.parametrize("mlp,registers", [("mlp", 0), ("swiglu", 4)])
def test_save_timm_round_trip(tmp_path, mlp, registers):
    torch.manual_seed(5)
    ours = randomise(
        FusedViT(
            FusedViTConfig(
                size="custom",
                embed_dim=64,
                depth=2,
                num_heads=2,
                mlp=mlp,
                mlp_hidden_dim=170 if mlp == "swiglu" else 128,
                patch_size=8,
                img_size=32,
                num_registers=registers,
                vocab_size=20,
            )
        )
    )
    folder = save_timm(ours, tmp_path / "export", mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD)
    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert theirs.pretrained_cfg["mean"] == HOPTIMUS_MEAN or tuple(theirs.pretrained_cfg["mean"]) == HOPTIMUS_MEAN
    assert_same_image_outputs(ours, theirs, 32)
    assert_same_image_outputs(ours, theirs, 48, seed=1)
    back, report = load_pretrained(folder, vocab_size=20)
    assert not report.unexpected and back.config.mlp_hidden_dim == ours.config.mlp_hidden_dim
    assert_same_image_outputs(back, theirs, 32)
