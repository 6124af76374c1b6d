"""The trainer's parts without a process group: config, optimiser groups and schedules, the DeepSpeed
config, checkpoint discovery, the launch environment, the FLOP count, and the student's graph."""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch
import yaml
from shardkit import tile_sample

from histotx.config import ConfigError, load_config
from histotx.data.augment import MultiCrop
from histotx.data.collate import IMAGE_ONLY, TRANSCRIPTS_ONLY, SSLCollate
from histotx.data.device_decode import BatchDecoder
from histotx.format import TranscriptGrid
from histotx.launch.env import first_host, set_distributed_env
from histotx.model import FusedViT
from histotx.ssl.meta import SSLMetaArch
from histotx.ssl.schedules import SSLSchedules
from histotx.train import checkpoint
from histotx.train.config import TrainConfig
from histotx.train.engine import apply_schedule, deepspeed_config, param_groups
from histotx.train.flops import step_flops

TINY = [
    "model.size=tiny",
    "model.embed_dim=32",
    "model.num_heads=2",
    "model.img_size=32",
    "model.patch_size=8",
    "model.vocab_size=64",
    "data.mask.patch_size=8",
    "data.augment.global_crop_size=32",
    "data.augment.local_crop_size=16",
    "data.augment.local_crops_number=2",
    "data.augment.global_crop_scale=[0.5,1]",
    "data.augment.local_crop_scale=[0.2,0.5]",
    "data.collate.resolutions_um=[16.0]",
    "ssl.head.out_dim=32",
    "ssl.head.hidden_dim=16",
    "ssl.head.bottleneck_dim=8",
    "ssl.loss.masked_expression_weight=0.5",
]


def config(*extra: str) -> TrainConfig:
    return load_config(TrainConfig, overrides=TINY + list(extra))


def meta_arch(cfg: TrainConfig) -> SSLMetaArch:
    torch.manual_seed(0)
    return SSLMetaArch(FusedViT(cfg.model_config()), cfg.ssl)


def ssl_batch(cfg: TrainConfig, n: int = 4, seed: int = 0, empty_grids: bool = False, **collate):
    data = load_config(type(cfg.data), overrides=[f"collate.{k}={v}" for k, v in collate.items()])
    data.augment, data.mask = cfg.data.augment, cfg.data.mask
    data.collate.resolutions_um = cfg.data.collate.resolutions_um
    rng = np.random.default_rng(seed)
    crop = MultiCrop(data.augment)
    items = [
        crop(
            tile_sample(rng, "s", i, tile_px=48, grid=TranscriptGrid.empty(55.0, "disk") if empty_grids else None),
            np.random.default_rng([seed, i]),
        )
        for i in range(n)
    ]
    return BatchDecoder(data.augment, "cpu")(SSLCollate(data)(items, np.random.default_rng(seed)))


# ---------------------------------------------------------------------------------------------- config


def test_model_section_takes_the_size_preset_and_names_bad_keys():
    cfg = load_config(TrainConfig, overrides=["model={size: L, vocab_size: 100}", "data.mask.patch_size=16"])
    model = cfg.model_config()
    assert (model.embed_dim, model.depth, model.num_heads) == (1024, 24, 16)  # not the default tiny widths
    with pytest.raises(ConfigError, match="model.*unknown key.*embed_dims"):
        load_config(TrainConfig, overrides=TINY + ["model.embed_dims=3"])
    with pytest.raises(ConfigError, match="patch_size"):
        config("data.mask.patch_size=16")
    with pytest.raises(ConfigError, match="zero_stage"):
        config("deepspeed.zero_stage=4")
    with pytest.raises(ConfigError, match="vocab_size"):
        config("model.vocab_size=0")


def test_shipped_configs_load():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "configs" / "train"
    for path in sorted(folder.glob("*.yaml")):
        cfg = load_config(TrainConfig, path)
        assert cfg.data.mask.patch_size == cfg.model_config().patch_size, path
        base = yaml.safe_load(path.read_text())["model"]["_base_"]  # a preset of configs/model and its diffs
        assert (path.parent / base).resolve().parent == folder.parent / "model", path


# ---------------------------------------------------------------------------------------------- optimiser


def test_loss_terms_are_declared_once():
    """Every weight field of the loss config belongs to one declared term, every term's head exists, and a
    module the SSL network gains without a declaring term is refused."""
    from dataclasses import fields

    from histotx.ssl.config import LossConfig
    from histotx.ssl.terms import LOSS_TERMS

    weights = [f.name for f in fields(LossConfig) if f.name.endswith("_weight")]
    assert sorted(weights) == sorted(t.weight for t in LOSS_TERMS)
    assert len({t.name for t in LOSS_TERMS}) == len(LOSS_TERMS)
    cfg = config("ssl.head.separate_ibot_head=true", "ssl.loss.cls_expression_weight=1")  # every head built
    network = meta_arch(cfg).student
    assert {t.head for t in LOSS_TERMS if t.head} == {n for n, _ in network.named_children()} - {"backbone"}
    network.extra_head = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="extra_head"):
        network.new_parameter_names()


def test_param_groups_follow_the_recipe():
    cfg = config("optim.layer_decay=0.5", "optim.patch_embed_lr_mult=0.2", "optim.new_module_lr_mult=2.0")
    network = meta_arch(cfg).student
    groups = param_groups(network, cfg)
    of = {id(p): g for g in groups for p in g["params"]}
    trainable = [(n, p) for n, p in network.named_parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(of) == len(trainable)  # each parameter exactly once
    frozen = network.dino_head.last_layer.parametrizations.weight.original0
    assert id(frozen) not in of  # the prototypes' norm stays 1
    named = dict(network.named_parameters())

    def group(name):
        return of[id(named[name])]

    depth = network.backbone.config.depth  # 2: embeddings layer 0, blocks 1..2, final norm 3
    assert group("backbone.blocks.0.attn.qkv.weight")["lr_mult"] == pytest.approx(0.5**depth)
    assert group("backbone.blocks.1.mlp.fc1.weight")["lr_mult"] == pytest.approx(0.5)
    assert group("backbone.norm.weight")["lr_mult"] == pytest.approx(1.0)
    assert group("backbone.patch_embed.proj.weight")["lr_mult"] == pytest.approx(0.5 ** (depth + 1) * 0.2)
    for name in ("backbone.transcript.gene_embed.weight", "dino_head.mlp.0.weight", "expression_head.weight"):
        assert group(name)["lr_mult"] == 2.0, name
    decay = {n for n, _ in trainable if group(n)["wd_mult"] == 1.0}
    assert "backbone.blocks.0.attn.qkv.weight" in decay and "dino_head.mlp.0.weight" in decay
    for name in (
        "backbone.pos_embed",
        "backbone.cls_token",
        "backbone.reg_token" if "backbone.reg_token" in named else "backbone.mask_token",
        "backbone.blocks.0.ls1.gamma",
        "backbone.blocks.0.norm1.weight",
        "backbone.blocks.0.attn.qkv.bias",
        "dino_head.mlp.0.bias",
    ):
        assert name not in decay, name
    new = {n for n, _ in trainable if group(n)["lr_mult"] == 2.0}  # the rule the heads' declarations replaced
    prefixes = ("backbone.mask_token", "backbone.transcript.", "dino_head.", "ibot_head.", "expression_head.")
    assert new == {n for n, _ in trainable if n.startswith(prefixes)}
    last = group("dino_head.last_layer.parametrizations.weight.original1")
    assert last["last_layer"] and sum(g["last_layer"] for g in groups) == 1

    class Optim:
        param_groups = groups

    schedules = SSLSchedules(cfg.ssl.schedule, total_steps=100, global_batch=1024)
    apply_schedule(Optim, schedules(0))  # warm-up start: lr 0
    assert all(g["lr"] == 0 for g in groups)
    values = schedules(cfg.ssl.schedule.warmup_steps // 2)
    apply_schedule(Optim, values)
    assert values.last_layer_lr == 0 and last["lr"] == 0  # frozen prototypes
    qkv = group("backbone.blocks.0.attn.qkv.weight")
    assert qkv["lr"] == pytest.approx(values.lr * 0.25) and qkv["weight_decay"] == pytest.approx(values.weight_decay)
    assert group("backbone.pos_embed")["weight_decay"] == 0.0


def test_deepspeed_config_from_the_train_config():
    cfg = config(
        "deepspeed.zero_stage=3",
        "optim.accumulation_steps=2",
        "data.stream.batch_size=8",
        "deepspeed.precision=bf16",
        "optim.clip_grad=1.5",
        "deepspeed.extra={zero_optimization: {sub_group_size: 7}}",
    )
    ds = deepspeed_config(cfg, world_size=4, device=torch.device("cpu"))
    assert ds["train_batch_size"] == 8 * 2 * 4 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["sub_group_size"] == 7
    assert (
        ds["zero_optimization"]["stage3_param_persistence_threshold"]
        == cfg.deepspeed.stage3_param_persistence_threshold
    )
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["gradient_clipping"] == 1.5
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}  # weights stay fp32
    auto = deepspeed_config(config(), world_size=1, device=torch.device("cpu"))
    assert "torch_autocast" not in auto and "bf16" not in auto and "fp16" not in auto  # fp32 on CPU


# ---------------------------------------------------------------------------------------------- the student


@pytest.mark.parametrize("case", ["image_only", "transcripts_only", "no_sites"])
def test_every_trainable_parameter_gets_a_gradient_whatever_the_batch(case):
    """A data-parallel rank may draw such a batch; ZeRO-1/2 then still reduce the same gradients."""
    cfg = config()
    meta = meta_arch(cfg)
    if case == "no_sites":
        batch = ssl_batch(cfg, empty_grids=True)
    else:
        batch = ssl_batch(
            cfg,
            **{
                "p_image_only": 1.0 if case == "image_only" else 0.0,
                "p_transcripts_only": 1.0 if case == "transcripts_only" else 0.0,
            },
        )
        assert set(batch.modality.tolist()) == {IMAGE_ONLY if case == "image_only" else TRANSCRIPTS_ONLY}
    targets = meta.teacher_targets(batch, 0.04)
    losses = meta.losses(meta.student(batch), targets, batch)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    missing = [n for n, p in meta.student.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_teacher_is_an_fp32_copy_without_gradients_and_the_ema_is_exact():
    cfg = config()
    meta = meta_arch(cfg)
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in meta.teacher.parameters())
    before = [p.clone() for p in meta.teacher.parameters()]
    with torch.no_grad():
        for p in meta.student.parameters():
            p.add_(1.0)
    meta.update_teacher(0.75)
    for t, b, s in zip(meta.teacher.parameters(), before, meta.student.parameters(), strict=True):
        assert torch.allclose(t, 0.75 * b + 0.25 * s, rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="gathered"):
        meta.update_teacher(0.5, (torch.zeros(0) for _ in meta.student.parameters()))


def test_flop_count_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    cfg = config("model.attention=reference", "model.drop_path_rate=0")
    meta = meta_arch(cfg)
    batch = ssl_batch(cfg, n=4, seed=3)
    lengths = meta.sequence_lengths(batch)
    with FlopCounterMode(display=False) as counter:
        targets = meta.teacher_targets(batch, 0.04)
        meta.losses(meta.student(batch), targets, batch)["loss"].backward()
    counted, estimated = counter.get_total_flops(), step_flops(cfg.model_config(), cfg.ssl, batch, lengths)
    # The estimate leaves out the image gradient of the first layer and small non-matmul terms.
    assert estimated == pytest.approx(counted, rel=0.05)


# ---------------------------------------------------------------------------------------------- checkpoints


def _fake(root, step, complete=True):
    path = root / checkpoint.tag_of(step)
    path.mkdir(parents=True)
    if complete:
        (path / checkpoint.COMPLETE).write_text("{}")
    return path


def test_resume_auto_takes_the_newest_complete_checkpoint(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    assert checkpoint.resolve("auto", root) is None  # a new run
    old, mid = _fake(root, 5), _fake(root, 20)
    broken = _fake(root, 30, complete=False)  # killed while saving
    (root / checkpoint.LATEST).write_text(broken.name)
    assert checkpoint.resolve("auto", root) == mid
    (root / checkpoint.LATEST).write_text(old.name)
    assert checkpoint.resolve("auto", root) == old  # the pointer wins when it names a complete one
    assert checkpoint.resolve(str(mid), root) == mid
    assert checkpoint.resolve(str(tmp_path / "run"), root) == old
    with pytest.raises(FileNotFoundError, match="incomplete"):
        checkpoint.resolve(str(broken), root)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint.resolve(str(tmp_path / "elsewhere"), root)


def test_rng_states_round_trip_through_json():
    import json
    import random

    state = json.loads(json.dumps(checkpoint.rng_state()))
    drawn = (torch.rand(3), np.random.rand(), random.random())
    checkpoint.set_rng_state(state)
    again = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(drawn[0], again[0]) and drawn[1:] == again[1:]


def test_checkpoint_hooks_run_on_rank_0_and_a_failing_one_does_not_stop_the_run(tmp_path, monkeypatch, caplog):
    from types import SimpleNamespace

    from histotx.train import loop

    calls, barriers = [], []

    def broken(_path, _step):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save", lambda root, step, *_: root / checkpoint.tag_of(step))
    monkeypatch.setattr(loop.dist, "barrier", lambda: barriers.append(1))

    def save(rank, hooks):
        trainer = SimpleNamespace(
            cfg=config(),
            checkpoints=tmp_path,
            step=7,
            engine=None,
            meta=None,
            loader=None,
            nonfinite_total=0,
            rank=rank,
            hooks=hooks,
        )
        assert loop.Trainer.save(trainer) == tmp_path / "step_00000007"

    for rank in (0, 1):
        save(rank, (broken, lambda path, step: calls.append((path, step))))
    assert calls == [(tmp_path / "step_00000007", 7)]  # on rank 0 only, also after a hook that failed
    assert len(barriers) == 2 and "failed at step 7" in caplog.text and "disk full" in caplog.text
    barriers.clear()
    save(0, ())
    assert barriers == []  # no hooks (checkpoint.export_every=0): no collective besides the checkpoint's


# ---------------------------------------------------------------------------------------------- launch, CLI


def test_launch_environment_from_srun_and_launchers():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_JOB_ID": "12345",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
    }
    set_distributed_env(env)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("5", "1", "8")
    assert env["MASTER_ADDR"] == first_host("gpu[07-08]") and env["MASTER_PORT"] == str(20000 + 12345 % 20000)
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}
    assert set_distributed_env(torchrun) == {} and torchrun["RANK"] == "3"  # the launcher's values stand
    batch_shell = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}  # inside sbatch but not in an srun step
    assert set_distributed_env(batch_shell) == {} and "RANK" not in batch_shell


def test_train_cli_parses_config_overrides_and_resume():
    from histotx.train.cli import register_cli

    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "c.yaml", "steps=3", "optim.clip_grad=1", "--resume", "auto"])
    assert args.overrides == ["steps=3", "optim.clip_grad=1"] and args.resume == "auto"
    assert math.isclose(load_config(TrainConfig, overrides=TINY + args.overrides).optim.clip_grad, 1.0)


def test_pretrained_backbone_goes_into_student_and_teacher_and_heads_start_fresh(tmp_path):
    from histotx.model import FusedViTConfig
    from histotx.model.pretrained import save_timm
    from histotx.train.loop import build_backbone

    cfg = config()
    torch.manual_seed(123)
    fields = {k: v for k, v in asdict(cfg.model).items() if k != "vocab_size"}
    source = FusedViT(FusedViTConfig(**fields, vocab_size=0))
    save_timm(source, tmp_path / "ckpt")
    torch.manual_seed(0)
    meta = SSLMetaArch(build_backbone(config(f"init.backbone={tmp_path / 'ckpt'}")), cfg.ssl)
    fresh = meta_arch(cfg)  # the same seed (0), without the checkpoint
    for name, value in source.image_backbone_state_dict().items():
        assert torch.equal(meta.student.backbone.state_dict()[name], value), name
        assert torch.equal(meta.teacher.backbone.state_dict()[name], value), name
    assert torch.equal(meta.student.dino_head.mlp[0].weight, fresh.student.dino_head.mlp[0].weight)
    assert torch.equal(meta.teacher.dino_head.mlp[0].weight, meta.student.dino_head.mlp[0].weight)


def test_pruning_keeps_the_newest_complete_checkpoints_and_drops_interrupted_saves(tmp_path):
    steps = {5: True, 10: False, 15: True, 20: True, 25: True, 30: False}
    for step, complete in steps.items():
        _fake(tmp_path, step, complete)
    checkpoint.prune(tmp_path, step=25, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.tag_of(s) for s in (20, 25, 30)]


def test_head_warmup_gives_the_backbone_groups_lr_0_and_the_heads_theirs():
    cfg = config("ssl.schedule.head_warmup_steps=5", "ssl.schedule.warmup_steps=2")
    network = SSLMetaArch(FusedViT(cfg.model_config()), cfg.ssl).student
    groups = param_groups(network, cfg)

    class Optim:
        param_groups = groups

    schedules = SSLSchedules(cfg.ssl.schedule, total_steps=100, global_batch=1024)
    apply_schedule(Optim, schedules(3))
    by_param = {id(p): g for g in groups for p in g["params"]}
    for name, p in network.named_parameters():
        if not p.requires_grad:
            continue
        g = by_param[id(p)]
        if name.startswith(("backbone.blocks.", "backbone.patch_embed.", "backbone.pos_embed", "backbone.cls_token")):
            assert g["backbone"] and g["lr"] == 0.0, name
        elif name.startswith(("dino_head.mlp.", "backbone.transcript.")):
            assert not g["backbone"] and g["lr"] > 0, name
    apply_schedule(Optim, schedules(40))
    assert all(g["lr"] > 0 for g in groups if not g["last_layer"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "unreadable checkpoint record"),
        ('{"step": 3}', "lacks ['world_size']"),
        ("[1, 2]", "lacks"),
    ],
)
def test_a_damaged_checkpoint_record_is_named_with_its_problem(tmp_path, text, message):
    record = tmp_path / checkpoint.COMPLETE
    record.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        checkpoint._read_record(record, ("world_size", "step"))
    assert str(record) in str(caught.value)


def test_a_missing_checkpoint_record_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing from the checkpoint"):
        checkpoint._read_record(tmp_path / "rank_00001.json", ("loader", "rng"))
