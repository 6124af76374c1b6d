"""SSL collation: per-batch token size, per-sample modality dropout, masks, teacher/student pairing,
the tiny fused model on the result, and the whole pipeline with two loader workers."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch
from shardkit import tile_sample, write_shard_set

from histotx.config import load_config
from histotx.data.augment import MultiCrop
from histotx.data.collate import BOTH, IMAGE_ONLY, TRANSCRIPTS_ONLY, SSLCollate
from histotx.data.config import DataConfig
from histotx.data.device_decode import BatchDecoder
from histotx.data.loader import build_loader
from histotx.format import TranscriptGrid
from histotx.model import FusedViT, FusedViTConfig, TranscriptBatch

SMALL = [
    "augment.global_crop_size=32",
    "augment.local_crop_size=16",
    "augment.local_crops_number=2",
    "mask.patch_size=8",
    "augment.global_crop_scale=[0.5,1]",
    "augment.local_crop_scale=[0.2,0.5]",
]


def config(*extra):
    return load_config(DataConfig, overrides=SMALL + list(extra))


def items(cfg, n=6, seed=0, empty=()):
    rng = np.random.default_rng(seed)
    crop = MultiCrop(cfg.augment)
    out = []
    for i in range(n):
        grid = TranscriptGrid.empty(55.0, "disk") if i in empty else None
        out.append(crop(tile_sample(rng, "s", i, tile_px=48, grid=grid), np.random.default_rng([seed, i])))
    return out


def test_batch_layout_and_teacher_student_pairing():
    cfg = config(
        "collate.p_image_only=0.3",
        "collate.p_transcripts_only=0.3",
        "collate.resolutions_um=[8]",
        "mask.transcript_mask_probability=1",
    )
    batch = SSLCollate(cfg)(items(cfg, n=8), np.random.default_rng(1))
    b = 8
    assert batch.global_images.shape == (2 * b, 3, 32, 32) and batch.local_images.shape == (2 * b, 3, 16, 16)
    assert batch.image_mask.shape == (2 * b, 16) and batch.resolution_um == 8.0 and not batch.native
    mod = batch.modality.numpy()
    assert set(mod) == {BOTH, IMAGE_ONLY, TRANSCRIPTS_ONLY}  # this seed draws all three
    teacher, student = batch.teacher_transcripts, batch.student_global_transcripts
    assert teacher.batch_size == student.batch_size == 2 * b
    crop_mod = np.tile(mod, 2)
    assert np.all(student.lengths.numpy()[crop_mod == IMAGE_ONLY] == 0)
    assert np.array_equal(
        student.lengths.numpy()[crop_mod != IMAGE_ONLY], teacher.lengths.numpy()[crop_mod != IMAGE_ONLY]
    )
    assert torch.equal(batch.student_global_image_present, torch.from_numpy(crop_mod != TRANSCRIPTS_ONLY))
    assert not batch.image_mask[crop_mod == TRANSCRIPTS_ONLY].any()
    # each student token is its teacher token: same place, same expression
    idx = batch.transcript_index
    assert idx.shape == (student.n_tokens,) and batch.transcript_mask.shape == (student.n_tokens,)
    assert torch.equal(student.xy, teacher.xy[idx])
    for t in range(student.n_tokens):
        s_lo, s_hi = student.offsets[t], student.offsets[t + 1]
        t_lo, t_hi = teacher.offsets[idx[t]], teacher.offsets[idx[t] + 1]
        assert torch.equal(student.gene[s_lo:s_hi], teacher.gene[t_lo:t_hi])
    assert 0 < batch.transcript_mask.float().mean() < 0.6
    local_mod = np.tile(mod, 2)
    assert np.all(batch.student_local_transcripts.lengths.numpy()[local_mod == IMAGE_ONLY] == 0)


def test_tiles_without_transcripts_stay_image_only():
    cfg = config("collate.p_image_only=0", "collate.p_transcripts_only=1")
    batch = SSLCollate(cfg)(items(cfg, n=4, empty=(1, 3)), np.random.default_rng(0))
    assert batch.modality.tolist() == [TRANSCRIPTS_ONLY, IMAGE_ONLY, TRANSCRIPTS_ONLY, IMAGE_ONLY]
    assert batch.student_global_image_present.tolist() == [False, True, False, True] * 2


def test_token_size_drawn_per_batch_and_modality_rates():
    cfg = config(
        "collate.resolutions_um=[native, 8, 16]", "collate.p_image_only=0.25", "collate.p_transcripts_only=0.25"
    )
    collate, views = SSLCollate(cfg), items(cfg, n=8)
    sizes, mods = set(), []
    for s in range(40):
        batch = collate(views, np.random.default_rng(s))
        sizes.add("native" if batch.native else batch.resolution_um)
        mods.extend(batch.modality.tolist())
        if batch.native:
            assert batch.resolution_um is None and batch.teacher_transcripts.resolution_um == 55.0  # shard kit spots
    assert sizes == {"native", 8.0, 16.0}
    share = np.bincount(mods, minlength=3) / len(mods)
    assert share[IMAGE_ONLY] == pytest.approx(0.25, abs=0.08) and share[TRANSCRIPTS_ONLY] == pytest.approx(
        0.25, abs=0.08
    )


def test_the_fused_model_takes_teacher_and_student_inputs():
    cfg = config("collate.p_image_only=0.3", "collate.p_transcripts_only=0.3", "collate.resolutions_um=[16]")
    made = SSLCollate(cfg)(items(cfg, n=4), np.random.default_rng(2))
    with pytest.raises(ValueError, match="BatchDecoder"):  # a CPU worker's views: bytes until the device stage
        made.teacher_inputs()
    batch = BatchDecoder(cfg.augment, "cpu")(made)
    torch.manual_seed(0)
    model = FusedViT(FusedViTConfig(size="tiny", img_size=32, patch_size=8, vocab_size=64)).eval()
    with torch.no_grad():
        teacher = model(**batch.teacher_inputs())
        student = model(**batch.student_global_inputs())
        local = model(**batch.student_local_inputs())
    assert teacher.cls.shape == student.cls.shape == (8, 64) and local.cls.shape == (8, 64)
    assert student.transcript.shape[0] == batch.student_global_transcripts.n_tokens
    assert teacher.transcript[batch.transcript_index].shape == student.transcript.shape


def test_pipeline_with_two_workers_is_deterministic_and_resumable(tmp_path):
    shards = write_shard_set(tmp_path / "shards", n_shards=4, per_shard=4, tile_px=48)
    overrides = [f"stream.shards={shards}", "stream.batch_size=4", "stream.num_workers=2", "stream.shuffle_buffer=4"]
    cfg = config(*overrides)
    straight = list(islice(build_loader(cfg), 5))
    assert all(b.global_images.shape == (8, 3, 32, 32) for b in straight)
    assert sorted(k for b in straight[:4] for k in b.keys) == sorted(f"s{i // 4:02d}__t{i:05d}" for i in range(16))
    first = build_loader(cfg)
    head = list(islice(first, 3))
    resumed = build_loader(cfg)
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(head + list(islice(resumed, 2)), straight, strict=True):
        assert a.keys == b.keys and torch.equal(a.global_images, b.global_images)
        assert torch.equal(a.image_mask, b.image_mask) and torch.equal(a.transcript_mask, b.transcript_mask)
        assert torch.equal(a.teacher_transcripts.xy, b.teacher_transcripts.xy)


def _spot_and_molecule_items(cfg, n=4, seed=0):
    """Alternating Visium-like tiles (55 µm spots, 0.5 µm/px) and Xenium-like tiles (molecules)."""
    rng = np.random.default_rng(seed)
    crop = MultiCrop(cfg.augment)
    out = []
    for i in range(n):
        grid = None
        if i % 2:
            k = 60
            grid = TranscriptGrid(
                rng.uniform(0, 48, (k, 2)),
                np.arange(k + 1),
                rng.integers(0, 50, k),
                np.ones(k, np.float32),
                0.0,
                "point",
            )
        out.append(crop(tile_sample(rng, "s", i, tile_px=48, grid=grid), np.random.default_rng([seed, i])))
    return out


def _compositions(tb, lo, hi):
    return [
        tuple(
            zip(
                tb.gene[tb.offsets[t] : tb.offsets[t + 1]].tolist(),
                np.round(tb.weight[tb.offsets[t] : tb.offsets[t + 1]].numpy(), 5).tolist(),
                strict=True,
            )
        )
        for t in range(lo, hi)
    ]


def _visium_items(cfg, n=4, seed=0):
    """128 µm tiles (256 px at 0.5 µm/px) under a Visium lattice: 55 µm spots 100 µm apart, each spot
    with a composition of its own (a gene no other spot has)."""
    rng = np.random.default_rng(seed)
    crop = MultiCrop(cfg.augment)
    out = []
    for i in range(n):
        ticks = np.arange(-2, 4) * 200.0
        xy = np.stack(np.meshgrid(ticks, ticks), -1).reshape(-1, 2) + rng.uniform(0, 200, 2)
        xy = xy[np.all((xy > -110) & (xy < 366), axis=1)]
        k = len(xy)
        gene = np.stack([np.arange(k), 40 + np.arange(k) % 7], 1).ravel()
        count = np.stack([1.0 + np.arange(k) % 4, np.full(k, 3.0)], 1).ravel().astype(np.float32)
        grid = TranscriptGrid(xy, np.arange(0, 2 * k + 1, 2), gene, count, 55.0, "disk")
        out.append(crop(tile_sample(rng, "s", i, tile_px=256, grid=grid), np.random.default_rng([seed, i])))
    return out


def test_no_masked_token_target_is_visible_in_an_unmasked_token_of_its_view():
    """A spot binned finer than itself must not leave copies of a masked token's expression in view."""
    cfg = config(
        "collate.resolutions_um=[8]",
        "collate.p_image_only=0",
        "collate.p_transcripts_only=0",
        "mask.transcript_mask_probability=1",
        "mask.transcript_mask_ratio=[0.3,0.5]",
    )
    collate = SSLCollate(cfg)
    leaks = masked = 0
    for seed in range(4):
        batch = collate(_visium_items(cfg, n=4, seed=seed), np.random.default_rng(seed))
        student, mask = batch.student_global_transcripts, batch.transcript_mask.numpy()
        starts = np.concatenate([[0], np.cumsum(student.lengths.numpy())])
        for v in range(student.batch_size):
            comps = _compositions(student, starts[v], starts[v + 1])
            view_mask = mask[starts[v] : starts[v + 1]]
            visible = {c for c, m in zip(comps, view_mask, strict=True) if not m}
            masked += int(view_mask.sum())
            leaks += sum(c in visible for c, m in zip(comps, view_mask, strict=True) if m)
    assert masked > 0 and leaks == 0


def test_token_sizes_per_sample_and_native_footprints_kept_when_coarser():
    # a draw of 8 µm: the spots (55 µm) keep their size, one token per spot; the molecules take 8 µm cells
    cfg = config("collate.resolutions_um=[8]", "collate.p_image_only=0", "collate.p_transcripts_only=0")
    batch = SSLCollate(cfg)(_spot_and_molecule_items(cfg), np.random.default_rng(0))
    tb = batch.teacher_transcripts
    size = torch.as_tensor(tb.resolution_um, dtype=torch.float32).expand(tb.n_tokens)
    sample = torch.repeat_interleave(torch.arange(tb.batch_size), tb.lengths) % 4  # crop-major: sample index
    spots, molecules = sample % 2 == 0, sample % 2 == 1
    assert spots.any() and molecules.any()
    assert torch.all(size[spots] == 55.0) and torch.all(size[molecules] == 8.0)
    # a "native" draw: every sample its own footprint (molecules: one pixel of the view)
    cfg = config("collate.resolutions_um=[native]", "collate.p_image_only=0", "collate.p_transcripts_only=0")
    batch = SSLCollate(cfg)(_spot_and_molecule_items(cfg), np.random.default_rng(0))
    tb = batch.teacher_transcripts
    size = torch.as_tensor(tb.resolution_um, dtype=torch.float32).expand(tb.n_tokens)
    sample = torch.repeat_interleave(torch.arange(tb.batch_size), tb.lengths) % 4
    assert torch.all(size[sample % 2 == 0] == 55.0) and torch.all(size[sample % 2 == 1] < 2.0)


def test_the_model_reads_each_token_size():
    """In a batch mixing spots (55 µm) and 8 µm cells, each sample's output is what it gets alone."""
    cfg = config("collate.resolutions_um=[8]", "collate.p_image_only=0", "collate.p_transcripts_only=0")
    batch = SSLCollate(cfg)(_spot_and_molecule_items(cfg), np.random.default_rng(0))
    tb = batch.teacher_transcripts
    assert isinstance(tb.resolution_um, torch.Tensor) and set(tb.resolution_um.tolist()) == {8.0, 55.0}
    torch.manual_seed(0)
    model = FusedViT(FusedViTConfig(size="tiny", img_size=32, patch_size=8, vocab_size=64)).double().eval()
    with torch.no_grad():
        out = model(batch.global_images.double(), tb)
        starts = np.concatenate([[0], np.cumsum(tb.lengths.numpy())])
        for b in range(tb.batch_size):
            lo, hi = starts[b], starts[b + 1]
            one = TranscriptBatch(
                tb.lengths[b : b + 1],
                tb.xy[lo:hi],
                tb.offsets[lo : hi + 1] - tb.offsets[lo],
                tb.gene[tb.offsets[lo] : tb.offsets[hi]],
                tb.weight[tb.offsets[lo] : tb.offsets[hi]],
                float(tb.resolution_um[lo]) if hi > lo else 1.0,
            )
            alone = model(batch.global_images[b : b + 1].double(), one)
            assert torch.allclose(out.cls[b], alone.cls[0], rtol=0, atol=1e-10)
            assert torch.allclose(out.transcript[lo:hi], alone.transcript, rtol=0, atol=1e-10)
