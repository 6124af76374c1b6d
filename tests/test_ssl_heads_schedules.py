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


# ---------------------------------------------------------------------------------------------- recipe rules


def test_prototypes_keep_the_default_linear_init():
    """DINO/DINOv2 build the prototype layer after their trunc_normal(0.02) init: nn.Linear's own init
    U(±1/sqrt(in)) (std 1/sqrt(3·in)), not std 0.02; only the MLP gets trunc_normal(0.02)."""
    torch.manual_seed(0)
    head = DINOHead(in_dim=16, out_dim=4096, hidden_dim=24, bottleneck_dim=64, n_layers=3)
    v = head.last_layer.parametrizations.weight.original1
    bound = 1 / math.sqrt(64)
    assert v.abs().max() <= bound and v.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert head.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_lr_rules_of_dino_and_dinov2():
    assert scaled_lr(4e-3, 256, 1024, "sqrt") == pytest.approx(2e-3)  # DINOv2: base · sqrt(batch / 1024)
    assert scaled_lr(5e-4, 64, 256, "linear") == pytest.approx(1.25e-4)  # DINO: 5e-4 · batch / 256
    with pytest.raises(ValueError, match="scaling"):
        scaled_lr(1e-3, 64, 256, "cube")
    cfg = load_config(
        SSLConfig,
        overrides=[
            "schedule.lr=5e-4",
            "schedule.lr_reference_batch=256",
            "schedule.lr_scaling=linear",
            "schedule.warmup_steps=0",
        ],
    )
    assert SSLSchedules(cfg.schedule, total_steps=10, global_batch=32)(0).lr == pytest.approx(5e-4 / 8)
    with pytest.raises(ConfigError, match="lr_scaling"):
        load_config(SSLConfig, overrides=["schedule.lr_scaling=log"])


@pytest.mark.parametrize("steps", [20, 150, 1000])
def test_teacher_momentum_sized_to_the_run(steps):
    """teacher_init_kept: the start momentum is chosen so that the product of the momenta over the run (the
    share of the random init left in the exported teacher) is that value; 0.99 → 1 over 150 steps leaves 47 %."""
    fixed = load_config(SSLConfig, overrides=["schedule.momentum_teacher=0.99"])
    if steps == 150:
        assert SSLSchedules(fixed.schedule, steps, 32).teacher_init_kept() == pytest.approx(0.4687, abs=1e-3)
    cfg = load_config(SSLConfig, overrides=["schedule.teacher_init_kept=0.01"])
    sched = SSLSchedules(cfg.schedule, steps, 32)
    assert sched.teacher_init_kept() == pytest.approx(0.01, rel=1e-6)
    assert 0 < sched(0).momentum < 1 and sched(steps).momentum == pytest.approx(1.0)
    prod = math.prod(sched(t).momentum for t in range(steps))  # the EMA's own arithmetic
    assert prod == pytest.approx(0.01, rel=1e-6)
    assert sched.teacher_init_kept(steps // 2) > sched.teacher_init_kept(steps)  # incremental, any order
    with pytest.raises(ConfigError, match="teacher_init_kept"):
        load_config(SSLConfig, overrides=["schedule.teacher_init_kept=1.0"])


def test_head_warmup_holds_the_backbone_then_warms_it_up():
    cfg = load_config(
        SSLConfig,
        overrides=["schedule.head_warmup_steps=10", "schedule.warmup_steps=4", "schedule.freeze_last_layer_steps=2"],
    )
    sched = SSLSchedules(cfg.schedule, total_steps=100, global_batch=1024)
    assert all(sched(t).backbone_lr == 0.0 for t in range(10))
    assert sched(5).lr > 0 and sched(5).last_layer_lr > 0  # the heads train meanwhile
    ramp = [sched(t).backbone_lr / sched(t).lr for t in range(10, 16)]
    assert ramp == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    plain = SSLSchedules(load_config(SSLConfig).schedule, 100, 1024)
    assert all(plain(t).backbone_lr == plain(t).lr for t in range(0, 100, 7))
    with pytest.raises(ConfigError, match="head_warmup_steps"):
        load_config(SSLConfig, overrides=["schedule.head_warmup_steps=-1"])
