"""DINO head structure and the per-step schedules."""

import math

import pytest
import torch

from histotx.config import ConfigError, load_config
from histotx.ssl.config import SSLConfig
from histotx.ssl.heads import DINOHead
from histotx.ssl.schedules import CosineSchedule, SSLSchedules, scaled_lr


def test_dino_head_logits_are_cosines_to_unit_prototypes():
    torch.manual_seed(0)
    head = DINOHead(in_dim=16, out_dim=32, hidden_dim=24, bottleneck_dim=8, n_layers=3)
    x = torch.randn(5, 16)
    logits = head(x)
    assert logits.shape == (5, 32)
    assert logits.abs().max() <= 1.0 + 1e-5  # unit bottleneck · unit prototypes
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    v = head.last_layer.parametrizations.weight.original1
    assert torch.allclose(logits, z @ torch.nn.functional.normalize(v, dim=-1).t(), atol=1e-6)
    trainable = head.last_layer_parameters()
    assert len(trainable) == 1 and trainable[0] is v  # the norm g stays fixed at 1


def test_dino_head_single_layer_and_gradients():
    head = DINOHead(in_dim=4, out_dim=6, hidden_dim=9, bottleneck_dim=3, n_layers=1)
    assert [m.out_features for m in head.mlp if isinstance(m, torch.nn.Linear)] == [3]
    head(torch.randn(2, 4)).sum().backward()
    assert head.last_layer.parametrizations.weight.original0.grad is None


def test_cosine_schedule_warmup_cosine_and_tail():
    s = CosineSchedule(base=1.0, final=0.1, total_steps=110, warmup_steps=10, warmup_start=0.5)
    assert s(0) == 0.5 and s(5) == pytest.approx(0.75) and s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert s(110) == pytest.approx(0.1) and s(10_000) == pytest.approx(0.1)
    assert all(s(i) >= s(i + 1) for i in range(10, 120))
    with pytest.raises(ValueError):
        CosineSchedule(1.0, 0.0, total_steps=5, warmup_steps=6)


def test_ssl_schedules_from_config():
    cfg = load_config(
        SSLConfig,
        overrides=[
            "schedule.lr=1e-3",
            "schedule.warmup_steps=10",
            "schedule.freeze_last_layer_steps=5",
            "schedule.teacher_temp_warmup_steps=20",
        ],
    )
    sched = SSLSchedules(cfg.schedule, total_steps=100, global_batch=256)
    peak = 1e-3 * math.sqrt(256 / 1024)
    assert scaled_lr(1e-3, 256) == pytest.approx(peak)
    assert sched(10).lr == pytest.approx(peak) and sched(0).lr == 0.0
    assert sched(4).last_layer_lr == 0.0 and sched(5).last_layer_lr == sched(5).lr > 0
    assert sched(0).teacher_temperature == pytest.approx(0.04)
    assert sched(10).teacher_temperature == pytest.approx(0.055)
    assert sched(50).teacher_temperature == pytest.approx(0.07)
    assert sched(0).momentum == pytest.approx(0.994) and sched(100).momentum == pytest.approx(1.0)
    assert sched(0).weight_decay == pytest.approx(0.04) and sched(100).weight_decay == pytest.approx(0.2)


def test_ssl_config_rejects_bad_values(tmp_path):
    path = tmp_path / "ssl.yaml"
    path.write_text("loss:\n  teacher_norm: softmax\n")
    with pytest.raises(ConfigError, match="teacher_norm"):
        load_config(SSLConfig, path)
    with pytest.raises(ConfigError, match="center_momentum"):
        load_config(SSLConfig, overrides=["loss.center_momentum=1.5"])
