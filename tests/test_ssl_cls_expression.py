"""The CLS expression term (``ssl.loss.cls_expression_weight``): every student global crop's CLS predicts the
gene composition of its crop's transcripts as the teacher sees them, whatever modality the student saw."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_train_units import config, meta_arch, ssl_batch

from histotx.config import ConfigError
from histotx.data.collate import IMAGE_ONLY, TRANSCRIPTS_ONLY

ON = "ssl.loss.cls_expression_weight=1.0"


def _by_hand(logits: torch.Tensor, teacher) -> torch.Tensor:
    """Multinomial NLL of each crop's summed token compositions, averaged over crops holding counts."""
    log_p = torch.log_softmax(logits.double(), dim=-1)
    lengths = teacher.lengths.tolist()
    losses, token = [], 0
    for crop, n in enumerate(lengths):
        composition = torch.zeros(logits.shape[1], dtype=torch.float64)
        for t in range(token, token + n):
            a, b = int(teacher.offsets[t]), int(teacher.offsets[t + 1])
            composition.index_add_(0, teacher.gene[a:b].long(), torch.expm1(teacher.weight[a:b].double()))
        token += n
        if composition.sum() > 0:
            losses.append(-(composition / composition.sum() * log_p[crop]).sum())
    return torch.stack(losses).mean()


def test_each_global_crop_predicts_its_whole_crop_composition_whatever_the_student_saw():
    cfg = config(ON)
    meta = meta_arch(cfg)
    batch = ssl_batch(cfg, n=6, seed=3, p_image_only=0.4, p_transcripts_only=0.3)
    modality = batch.modality.tolist()
    assert IMAGE_ONLY in modality and TRANSCRIPTS_ONLY in modality  # the draw covers every case
    out = meta.student(batch)
    n_global = batch.global_images.shape[0]
    assert out["cls_expression_logits"].shape == (n_global, cfg.model_config().vocab_size)
    losses = meta.losses(out, meta.teacher_targets(batch, 0.04), batch)
    expected = _by_hand(out["cls_expression_logits"].detach(), batch.teacher_transcripts)
    assert losses["cls_expression"].item() == pytest.approx(expected.item(), rel=1e-5)
    # the target is the teacher's (fused) crop, not what the student saw: image-only crops hold no student tokens
    image_only = np.tile(np.array(modality) == IMAGE_ONLY, n_global // batch.batch_size)
    assert (batch.student_global_transcripts.lengths[torch.from_numpy(image_only)] == 0).all()
    assert (batch.teacher_transcripts.lengths[torch.from_numpy(image_only)] > 0).all()


def test_image_only_views_train_the_backbone_and_the_teacher_gets_nothing():
    cfg = config(ON, "ssl.loss.masked_expression_weight=0")
    meta = meta_arch(cfg)
    batch = ssl_batch(cfg, p_image_only=1.0, p_transcripts_only=0.0)
    assert batch.student_global_transcripts.n_tokens == 0  # the student saw images only
    teacher_before = {k: v.clone() for k, v in meta.teacher.state_dict().items()}
    loss = meta.losses(meta.student(batch), meta.teacher_targets(batch, 0.04), batch)["cls_expression"]
    assert loss.item() > 0
    loss.backward()
    backbone = meta.student.backbone
    assert backbone.patch_embed.proj.weight.grad.abs().sum() > 0  # image → CLS → expression
    assert meta.student.cls_expression_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in meta.teacher.parameters())
    for k, v in meta.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


def test_off_by_default_and_a_negative_weight_is_refused_by_name():
    meta = meta_arch(config())
    assert meta.student.cls_expression_head is None
    batch = ssl_batch(config())
    losses = meta.losses(meta.student(batch), meta.teacher_targets(batch, 0.04), batch)
    assert losses["cls_expression"].item() == 0.0
    on = meta_arch(config(ON))
    assert {n for n in on.student.new_parameter_names() if n.startswith("cls_expression_head.")} == {
        "cls_expression_head.weight",
        "cls_expression_head.bias",
    }
    with pytest.raises(ConfigError, match="ssl.loss.cls_expression_weight must be >= 0"):
        config("ssl.loss.cls_expression_weight=-0.5")
