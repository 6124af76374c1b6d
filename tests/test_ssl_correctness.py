"""Training-correctness fixes of issue 9: a deterministic teacher, fp32 head outputs, views without
tokens, the panel-aware expression loss and the new modules' learning rate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from shardkit import tile_sample, write_shard_set
from test_train_units import config, meta_arch, ssl_batch

from histotx.data.augment import MultiCrop
from histotx.data.collate import SSLCollate
from histotx.data.device_decode import BatchDecoder
from histotx.data.loader import build_loader
from histotx.data.views import TileViews
from histotx.format import TranscriptGrid
from histotx.ssl.heads import DINOHead
from histotx.train.engine import param_groups


def test_teacher_is_deterministic_in_training_mode_with_drop_path():
    cfg = config("model.drop_path_rate=0.5")
    meta = meta_arch(cfg).train()
    batch = ssl_batch(cfg)
    first, second = meta.teacher.teacher_logits(batch), meta.teacher.teacher_logits(batch)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert not any(m.training for m in meta.teacher.modules())  # no dropout of any kind either
    with torch.no_grad():  # the student still drops paths
        assert not torch.equal(meta.student(batch)["cls_logits"], meta.student(batch)["cls_logits"])


def test_head_outputs_are_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    head = DINOHead(32, 256, 64, 16)
    x = torch.randn(40, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x)
        hidden = head.mlp(x)  # the MLP itself may run in bf16
    assert out.dtype == torch.float32
    z = F.normalize(hidden.double(), dim=-1)
    reference = z @ head.last_layer.weight.double().t()  # the prototype layer in exact arithmetic
    assert (out.double() - reference).abs().max().item() < 1e-4

    cfg = config()
    meta = meta_arch(cfg)
    batch = ssl_batch(cfg, p_image_only=0.0, p_transcripts_only=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student = meta.student(batch)
        teacher = meta.teacher.teacher_logits(batch)
    for name in ("cls_logits", "patch_logits", "transcript_logits", "expression_logits"):
        assert student[name].dtype == torch.float32, name
    assert all(v.dtype == torch.float32 for v in teacher.values())


def _views_with_empty_crops(cfg, n=4):
    """Tiles whose sites all sit in one corner; the last tile's local crops and second global crop are
    given no sites, so under transcripts-only they hold no token at all."""
    rng = np.random.default_rng(0)
    crop = MultiCrop(cfg.data.augment)
    out = []
    for i in range(n):
        views = crop(tile_sample(rng, "s", i, tile_px=48), np.random.default_rng([0, i]))
        if i == n - 1:
            for v in views.locals + views.globals[1:]:
                v.grid = TranscriptGrid.empty(55.0, "disk")
        out.append(TileViews(views.key, views.globals, views.locals))
    return out


def test_views_without_tokens_are_dropped_from_every_loss_term_and_counted():
    cfg = config("data.collate.p_transcripts_only=1.0", "data.collate.p_image_only=0.0")
    meta = meta_arch(cfg)
    data = cfg.data
    batch = BatchDecoder(data.augment, "cpu")(SSLCollate(data)(_views_with_empty_crops(cfg), np.random.default_rng(0)))
    b = batch.batch_size
    n_global, n_local = 2, data.augment.local_crops_number
    image = torch.cat([batch.student_global_image_present, batch.student_local_image_present])
    tokens = torch.cat([batch.student_global_transcripts.lengths, batch.student_local_transcripts.lengths])
    empty = ~image & (tokens == 0)  # [CLS, registers] only
    expected = torch.zeros((n_global + n_local) * b, dtype=torch.bool)
    expected[[b + b - 1] + [n_global * b + k * b + b - 1 for k in range(n_local)]] = True
    assert torch.equal(empty, expected)

    targets = meta.teacher_targets(batch, 0.04)
    out = meta.student(batch)
    for key in ("cls_logits", "cls_features"):
        out[key].retain_grad()
    losses = meta.losses(out, targets, batch)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    assert out["cls_logits"].grad[empty].abs().max().item() == 0.0
    assert out["cls_features"].grad[empty[: n_global * b]].abs().max().item() == 0.0
    assert out["cls_logits"].grad[~empty].abs().sum().item() > 0
    assert batch.n_empty_views == n_local + 1  # what the metrics count


def test_expression_loss_gives_no_gradient_to_genes_outside_the_sample_panel(tmp_path):
    shards = write_shard_set(tmp_path / "shards", n_shards=2, per_shard=4, tile_px=48)
    manifest_path = shards / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    # shardkit's tiles use genes 0..49; the vocabulary of the model holds 64
    manifest["samples"]["s00"]["gene_ranges"] = [[0, 50]]
    manifest["samples"]["s01"]["gene_ranges"] = [[0, 50], [60, 64]]
    manifest_path.write_text(json.dumps(manifest))
    cfg = config(
        f"data.stream.shards={shards}",
        "data.stream.batch_size=8",
        "data.stream.num_workers=0",
        "data.collate.p_image_only=0.0",
        "data.mask.transcript_mask_probability=1.0",
    )
    batch = BatchDecoder(cfg.data.augment, "cpu")(next(iter(build_loader(cfg.data, rank=0, world_size=1))))
    assert batch.transcript_mask.any()
    meta = meta_arch(cfg)
    out = meta.student(batch)
    meta.losses(out, meta.teacher_targets(batch, 0.04), batch)["expression"].backward()
    grad = meta.student.expression_head.bias.grad
    assert {k.split("__")[0] for k in batch.keys} == {"s00", "s01"}
    assert grad[50:60].abs().max().item() == 0.0  # in no sample's panel
    assert grad[:50].abs().min().item() > 0 and grad[60:].abs().min().item() > 0  # measured (60.. by s01 only)


def test_new_modules_get_the_full_learning_rate():
    cfg = config("optim.layer_decay=0.5", "optim.new_module_lr_mult=1.0")
    network = meta_arch(cfg).student
    of = {id(p): g for g in param_groups(network, cfg) for p in g["params"]}
    named = dict(network.named_parameters())
    for name in (
        "backbone.mask_token",
        "backbone.transcript.mask_token",
        "backbone.transcript.gene_embed.weight",
        "dino_head.mlp.0.weight",
        "expression_head.weight",
    ):
        assert of[id(named[name])]["lr_mult"] == 1.0, name
    assert of[id(named["backbone.cls_token"])]["lr_mult"] == pytest.approx(0.5**3)  # from the checkpoint


def test_dino_shuffled_control_pairs_each_tile_with_another_tiles_teacher():
    """The monitor's negative control is the DINO loss against the teacher rows of the next tile; a teacher
    that says which tile it saw gives a real loss well below the control, one that says nothing gives both equal."""
    from histotx.ssl.meta import TeacherTargets

    cfg = config()
    meta = meta_arch(cfg)
    batch = ssl_batch(cfg, p_image_only=0.0, p_transcripts_only=0.0)
    b = batch.batch_size
    with torch.no_grad():
        out = meta.student(batch)
    n_crops = out["cls_logits"].shape[0] // b
    k = out["cls_logits"].shape[-1]
    valid = batch.student_view_nonempty().view(n_crops, b)
    # a teacher that tells tiles apart: tile i's crops all point at prototype i, and so does the student
    hot = F.one_hot(torch.arange(b) % k, k).float()
    out["cls_logits"] = (10 * hot)[None].expand(n_crops, b, k).reshape(-1, k).clone()
    informative = TeacherTargets(hot.repeat(2, 1), torch.zeros(0, k), torch.zeros(0, k), {})
    real = meta.dino_loss(out["cls_logits"].view(n_crops, b, k), informative.cls.view(2, b, k), valid)
    control = meta.dino_shuffled(out, informative, batch)
    rolled = informative.cls.view(2, b, k).roll(1, dims=1)
    assert control == pytest.approx(float(meta.dino_loss(out["cls_logits"].view(n_crops, b, k), rolled, valid)))
    assert float(control) - float(real) > 5.0
    # a teacher that says the same for every tile: no gap
    same = TeacherTargets(
        torch.softmax(torch.randn(1, k), -1).expand(2 * b, k), torch.zeros(0, k), torch.zeros(0, k), {}
    )
    real_same = meta.dino_loss(out["cls_logits"].view(n_crops, b, k), same.cls.view(2, b, k), valid)
    assert float(meta.dino_shuffled(out, same, batch)) == pytest.approx(float(real_same), rel=1e-6)
