"""The fused model: packing, modality presence, masks, positions, backends, checkpointing, configs.

Equivalences between different computations of the same maths (packed vs alone, a backend vs the
reference, checkpointed vs not) sum in different orders, and the order depends on the CPU's kernels
(default / AVX2 / AVX-512). So the model and its inputs are float64 here, where every such order agrees
to ~1e-13 relative and a tolerance of 1e-9 is meaningful on any CPU; fp32 would need a tolerance derived
from each reduction's length, which a fixed 1e-5 is not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from histotx.config import load_config
from histotx.format import TranscriptGrid
from histotx.model import FusedViT, FusedViTConfig, ModelConfigError, TranscriptBatch
from histotx.model.transcripts import TranscriptTokenizer
from histotx.tokens import TranscriptCells, bin_grid

REPO = Path(__file__).resolve().parents[1]
VOCAB = 40


def tiny(**kw) -> FusedViT:
    """A tiny float64 model whose blocks matter (LayerScale 1, not 1e-5), in eval mode."""
    torch.manual_seed(0)
    args = dict(size="tiny", img_size=32, patch_size=8, num_registers=2, vocab_size=VOCAB, init_values=1.0)
    return FusedViT(FusedViTConfig(**{**args, **kw})).double().eval()


def random_cells(n: int, seed: int, hw=(32, 32), resolution_um=None) -> TranscriptCells:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, hw[1], size=(n, 2))
    nnz = rng.integers(1, 5, size=n)
    offsets = np.concatenate([[0], np.cumsum(nnz)])
    gene, count = rng.integers(0, VOCAB, offsets[-1]), rng.uniform(1, 9, offsets[-1])
    grid = TranscriptGrid(xy, offsets, gene, count, 2.0, "square")
    return bin_grid(grid, mpp=0.5, resolution_um=resolution_um, image_hw=hw)


def batch_of(*ns: int, resolution_um=None) -> TranscriptBatch:
    return TranscriptBatch.collate([random_cells(n, seed=i, resolution_um=resolution_um) for i, n in enumerate(ns)])


def images(b: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sample_of(tb: TranscriptBatch, b: int) -> TranscriptBatch:
    """Sample b of a packed batch, as a batch of one."""
    start = int(tb.lengths[:b].sum())
    n = int(tb.lengths[b])
    lo, hi = int(tb.offsets[start]), int(tb.offsets[start + n])
    return TranscriptBatch(
        tb.lengths[b : b + 1],
        tb.xy[start : start + n],
        tb.offsets[start : start + n + 1] - lo,
        tb.gene[lo:hi],
        tb.weight[lo:hi],
        tb.resolution_um,
    )


def assert_close(a, b, tol=1e-9):
    """float64 agreement; outputs here are O(1) after the final norm, so atol = rtol."""
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_output_shapes_and_collate():
    model = tiny()
    tb = batch_of(0, 7, 20)
    assert tb.lengths.tolist() == [0, 7, 20] and tb.offsets.shape == (28,) and tb.offsets[0] == 0
    out = model(images(3), tb)
    assert out.cls.shape == (3, 64) and out.registers.shape == (3, 2, 64) and out.patch.shape == (3, 16, 64)
    assert out.transcript.shape == (27, 64) and out.transcript_lengths.tolist() == [0, 7, 20]
    assert out.grid_size == (4, 4)
    with pytest.raises(ValueError, match="summing"):
        TranscriptBatch(torch.tensor([1, 1]), tb.xy, tb.offsets, tb.gene, tb.weight, tb.resolution_um)
    mixed = TranscriptBatch.collate([random_cells(3, 0, resolution_um=8.0), random_cells(3, 1, resolution_um=16.0)])
    assert mixed.resolution_um.tolist() == [8.0] * mixed.lengths[0] + [16.0] * mixed.lengths[1]  # per token


def test_no_transcripts_is_exactly_the_image_backbone():
    model = tiny()
    x = images(3)
    plain = model(x)
    empty = model(x, TranscriptBatch.empty(3))
    for name in ("cls", "registers", "patch"):
        assert torch.equal(getattr(plain, name), getattr(empty, name)), name
    # in a mixed batch, the sample without transcript tokens still computes its image-only output
    mixed = model(x, batch_of(5, 0, 9))
    assert_close(mixed.cls[1], plain.cls[1])
    assert_close(mixed.patch[1], plain.patch[1])
    assert (mixed.cls[0] - plain.cls[0]).abs().max() > 1e-3  # transcripts do change the others


@pytest.mark.parametrize("backend", ["sdpa", "loop", "reference"])
def test_packed_batch_equals_each_sample_alone(backend):
    model = tiny(attention=backend)
    x, tb = images(4), batch_of(6, 0, 13, 1)
    present = torch.tensor([True, True, False, True])
    image_mask = torch.rand(4, 16, generator=torch.Generator().manual_seed(3)) < 0.3
    tx_mask = torch.rand(tb.n_tokens, generator=torch.Generator().manual_seed(4)) < 0.3
    out = model(x, tb, image_present=present, image_mask=image_mask, transcript_mask=tx_mask)
    assert torch.count_nonzero(out.patch[2]) == 0
    for b in range(4):
        start, n = int(tb.lengths[:b].sum()), int(tb.lengths[b])
        one = model(
            x[b : b + 1],
            sample_of(tb, b),
            image_present=present[b : b + 1],
            image_mask=image_mask[b : b + 1],
            transcript_mask=tx_mask[start : start + n],
        )
        assert_close(out.cls[b], one.cls[0])
        assert_close(out.registers[b], one.registers[0])
        assert_close(out.patch[b], one.patch[0])
        assert_close(out.transcript[start : start + n], one.transcript)


@pytest.mark.parametrize("backend", ["sdpa", "loop"])
def test_backends_agree_with_reference_on_outputs_and_gradients(backend):
    x, tb = images(3), batch_of(4, 17, 0)
    present = torch.tensor([True, False, True])
    results = []
    for attention in (backend, "reference"):
        model = tiny(attention=attention)
        out = model(x, tb, image_present=present)
        loss = out.cls.square().sum() + out.patch.sum() + out.transcript.sin().sum() + out.registers.mean()
        loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = results
    for name in ("cls", "registers", "patch", "transcript"):
        assert_close(getattr(a, name), getattr(b, name))
    assert ga.keys() == gb.keys() and "transcript.gene_embed.weight" in ga and "blocks.1.attn.qkv.weight" in ga
    for name in ga:  # float64 sums in another order: relative to each gradient's scale
        scale = gb[name].abs().max().item()
        torch.testing.assert_close(ga[name], gb[name], atol=1e-9 * max(scale, 1.0), rtol=0, msg=name)


def test_missing_images_and_masks_remove_what_they_hide():
    model = tiny()
    x, tb = images(2), batch_of(5, 8)
    present = torch.tensor([False, True])
    out = model(x, tb, image_present=present)
    # an absent image's pixels (even NaN) do not matter
    x2 = x.clone()
    x2[0] = float("nan")
    again = model(x2, tb, image_present=present)
    assert torch.equal(out.cls, again.cls) and torch.count_nonzero(again.patch[0]) == 0
    # transcripts alone, no image at all: sample 0 computes what it computed without its image
    alone = model(None, tb)
    assert_close(alone.cls[0], out.cls[0])
    assert alone.patch.shape == (2, 16, 64) and torch.count_nonzero(alone.patch) == 0
    # masked patches: their pixels no longer matter
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 5] = True
    x3 = x.clone()
    x3[:, :, 8:16, 8:16] += 5.0  # patch (1, 1) = index 5
    m1, m2 = model(x, tb, image_mask=mask), model(x3, tb, image_mask=mask)
    assert_close(m1.cls, m2.cls)
    assert (model(x, tb).cls - model(x3, tb).cls).abs().max() > 1e-3
    # masked transcript tokens: their expression no longer matters, their position does
    tmask = torch.zeros(tb.n_tokens, dtype=torch.bool)
    tmask[2] = True
    gene = tb.gene.clone()
    gene[tb.offsets[2] : tb.offsets[3]] = (gene[tb.offsets[2] : tb.offsets[3]] + 1) % VOCAB
    tb2 = TranscriptBatch(tb.lengths, tb.xy, tb.offsets, gene, tb.weight, tb.resolution_um)
    assert_close(model(x, tb, transcript_mask=tmask).transcript[2], model(x, tb2, transcript_mask=tmask).transcript[2])
    assert (model(x, tb).transcript[2] - model(x, tb2).transcript[2]).abs().max() > 1e-3
    xy = tb.xy.clone()
    xy[2] += 10.0
    moved = TranscriptBatch(tb.lengths, xy, tb.offsets, tb.gene, tb.weight, tb.resolution_um)
    assert (
        model(x, tb, transcript_mask=tmask).transcript[2] - model(x, moved, transcript_mask=tmask).transcript[2]
    ).abs().max() > 1e-3


def test_transcript_position_samples_the_patch_position_grid():
    torch.manual_seed(0)
    grid = torch.randn(3, 4, 5)
    p = 8
    centres = torch.tensor([[(j + 0.5) * p, (i + 0.5) * p] for i in range(3) for j in range(4)])
    assert_close(TranscriptTokenizer.position(centres, grid, p), grid.reshape(12, 5), tol=1e-6)
    between = torch.tensor([[p * 1.0, p * 0.5], [p * 1.5, p * 1.0]])  # halfway right; halfway down
    want = torch.stack([(grid[0, 0] + grid[0, 1]) / 2, (grid[0, 1] + grid[1, 1]) / 2])
    assert_close(TranscriptTokenizer.position(between, grid, p), want, tol=1e-6)
    corner = torch.tensor([[0.0, 0.0], [32.0, 24.0]])  # beyond the outer centres: border value
    assert_close(TranscriptTokenizer.position(corner, grid, p), torch.stack([grid[0, 0], grid[2, 3]]), tol=1e-6)


def test_resolution_embedding_accepts_any_size():
    model = tiny()
    tb = batch_of(4, 4)
    outs = []
    for r in (2.0, 8.0, 13.7, 55.0):
        tb_r = TranscriptBatch(tb.lengths, tb.xy, tb.offsets, tb.gene, tb.weight, r)
        outs.append(model.transcript(tb_r, model.pos_grid((4, 4)), 8))
    for i in range(len(outs) - 1):
        assert (outs[i] - outs[i + 1]).abs().max() > 1e-4


def test_other_input_sizes_interpolate_the_position_embedding():
    model = tiny()
    out = model(images(2, size=48), batch_of(3, 2))
    assert out.patch.shape == (2, 36, 64) and out.grid_size == (6, 6)
    assert torch.equal(model.pos_grid((4, 4)).reshape(1, 16, 64), model.pos_embed)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(images(1, size=30))


def test_checkpointing_and_drop_path():
    x, tb = images(3), batch_of(3, 0, 5)
    ref, ckpt = tiny(), tiny(grad_checkpointing=True)
    ckpt.load_state_dict(ref.state_dict())
    grads = []
    for model in (ref, ckpt):
        model.train()
        model(x, tb).cls.sum().backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad)
    assert_close(grads[0], grads[1])
    dropping = tiny(drop_path_rate=0.5)
    dropping.load_state_dict(ref.state_dict())
    assert_close(dropping.eval()(x, tb).cls, ref.eval()(x, tb).cls, tol=0)  # inactive in eval
    torch.manual_seed(1)
    assert torch.isfinite(dropping.train()(x, tb).cls).all()


def test_backbone_state_dict_round_trip_and_loud_failures():
    model = tiny()
    sd = model.image_backbone_state_dict()
    assert "pos_embed" in sd and "reg_token" in sd and "blocks.1.mlp.fc2.weight" in sd
    assert not any(k.startswith("transcript.") or k == "mask_token" for k in sd)
    fresh = tiny(vocab_size=0)
    torch.manual_seed(5)
    fresh._init_weights()
    report = fresh.load_image_backbone_state_dict(sd)
    assert report.missing == ["mask_token"] and not report.unexpected and len(report.loaded) == len(sd)
    assert_close(fresh(images(2)).cls, model(images(2)).cls, tol=0)
    no_blocks = {k: v for k, v in sd.items() if not k.startswith("blocks.")}
    with pytest.raises(ModelConfigError, match="blocks did not load"):
        fresh.load_image_backbone_state_dict(no_blocks, strict=True)
    wrong = dict(sd, **{"blocks.0.attn.qkv.weight": torch.zeros(3, 3)})
    with pytest.raises(ModelConfigError, match="blocks.0.attn.qkv.weight"):
        fresh.load_image_backbone_state_dict(wrong, strict=True)
    with pytest.raises(ModelConfigError, match="unexpected"):
        fresh.load_image_backbone_state_dict(dict(sd, **{"head.weight": torch.zeros(2)}))
    # a 6×6 grid checkpoint is interpolated to the model's 4×4 grid
    big = dict(sd, pos_embed=torch.randn(1, 36, 64))
    assert fresh.load_image_backbone_state_dict(big).resized == ["pos_embed (6, 6) → (4, 4)"]


def test_optimiser_helpers():
    model = tiny()
    no_decay = model.no_weight_decay()
    assert {"pos_embed", "cls_token", "blocks.0.ls1.gamma", "blocks.0.norm1.weight", "transcript.modality"} <= no_decay
    assert "blocks.0.attn.qkv.weight" not in no_decay and "transcript.gene_embed.weight" not in no_decay
    assert [model.layer_id(n) for n in ("pos_embed", "blocks.0.mlp.fc1.weight", "blocks.1.ls2.gamma", "norm.bias")] == [
        0,
        1,
        2,
        3,
    ]


def test_config_presets_yaml_and_validation():
    cfg = FusedViTConfig(size="L")
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_hidden_dim) == (1024, 24, 16, 4096)
    g = FusedViTConfig(size="g", patch_size=14, num_registers=4)
    assert g.mlp == "swiglu" and g.mlp_hidden_dim == 8192
    for bad in (dict(size="XL"), dict(embed_dim=65), dict(attention="magic"), dict(img_size=30, patch_size=16)):
        with pytest.raises(ModelConfigError):
            FusedViTConfig(**bad)
    presets = sorted((REPO / "configs" / "model").glob("*.yaml"))
    assert presets, "configs/model/*.yaml presets are missing"
    for path in presets:
        loaded = load_config(FusedViTConfig, path, ["drop_path_rate=0.1"])
        assert loaded.drop_path_rate == 0.1 and loaded.embed_dim % loaded.num_heads == 0
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in tiny().modules())


def test_config_presets_follow_the_file():
    """Fields derived from a preset come from the preset the file names, not from the defaults' preset."""
    from histotx.config import load_config
    from histotx.model import FusedViTConfig

    cfg = load_config(FusedViTConfig, None, ["size=L"])
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == (1024, 24, 16)
