"""`histotx export` and `histotx.export.load_model` on real checkpoints of short 2-rank CPU runs.

- ZeRO-1 and ZeRO-3 runs (2 steps each): the export reads the teacher without DeepSpeed, a process group
  or a GPU; it is the checkpoint's teacher bit for bit, and both stages give the same teacher; the
  student, reassembled from the ranks' ZeRO partitions, is the ZeRO-1 module's weights bit for bit and
  the same under ZeRO-3;
- the Hugging Face folder through ``AutoModel.from_pretrained(trust_remote_code=True)`` and the timm
  folder through ``timm.create_model("local-dir:...")``, both in a process where HistoTx cannot be
  imported, give the trained teacher's outputs (float64 on both sides) for image-only,
  transcripts-only and fused inputs (timm: image-only);
- export → ``init.backbone`` → identical weights, for the HistoTx, Hugging Face and timm folders;
- ``checkpoint.export_every`` (the ZeRO-1 run checkpoints every step, exports every 2nd): rank 0 writes
  RUN/exports/step_* at those steps only, the same folder ``histotx export --format timm`` writes, which
  ``timm.create_model("local-dir:...")`` loads as the teacher (float64); export_every=0 writes nothing;
- the generated remote code imports nothing transformers would refuse; the CLI teaches and fails clearly.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train_distributed import RUN, TINY, start_ranks, wait_ranks

REPO = Path(__file__).resolve().parents[1]
STEPS = 2
EXPORT_EVERY = 2  # the ZeRO-1 run: a checkpoint at every step, the timm export at every 2nd


def build_synthetic_shard_set(root: Path) -> Path:
    """The synthetic cohort (every technology) sharded like the training tests' set, at 8 µm/px."""
    from histotx.sharding.config import ShardConfig
    from histotx.sharding.pipeline import run_cohort
    from histotx.synth import generate_cohort

    cohort = generate_cohort(root / "synth", seed=0, size="small")
    cfg = ShardConfig(
        mpp=8.0, tile_px=32, mask_mpp=16.0, min_tissue_fraction=0.3, shard_max_tiles=4, max_tiles_per_sample=4
    )
    manifest = run_cohort(cohort, root / "shards", cfg)
    assert manifest["totals"]["samples_failed"] == 0, manifest["samples"]
    return root / "shards"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    """A 2-step, 2-rank run per ZeRO stage (1 and 3) on a synthetic shard set; the ZeRO-1 run also
    checkpoints every step and exports for timm every ``EXPORT_EVERY``."""
    root = tmp_path_factory.mktemp("export_runs")
    shards = build_synthetic_shard_set(root / "data")
    out = {}
    for stage in (1, 3):
        out[stage] = root / f"zero{stage}"
        exporting = ["checkpoint.every_steps=1", f"checkpoint.export_every={EXPORT_EVERY}"] if stage == 1 else []
        wait_ranks(
            start_ranks(
                [
                    str(REPO / "launch" / "train.py"),
                    str(TINY),
                    f"out={out[stage]}",
                    *RUN,
                    f"data.stream.shards={shards}",
                    f"steps={STEPS}",
                    f"deepspeed.zero_stage={stage}",
                    *exporting,
                ]
            )
        )
    return out


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory) -> dict[int, Path]:
    from histotx.cli import main

    root = tmp_path_factory.mktemp("exports")
    out = {}
    for stage, run in runs.items():
        out[stage] = root / f"zero{stage}"
        assert main(["export", str(run), "--out", str(out[stage]), "--format", "both"]) == 0
    return out


def _teacher_in_checkpoint(run: Path) -> dict[str, torch.Tensor]:
    path = run / "checkpoints" / f"step_{STEPS:08d}" / "teacher.safetensors"
    prefix = "teacher.backbone."
    return {k[len(prefix) :]: v for k, v in load_file(path).items() if k.startswith(prefix)}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_export_of_a_zero_checkpoint_is_its_teacher(runs, exports, stage):
    from histotx.export import load_model

    expected = _teacher_in_checkpoint(runs[stage])
    folder = exports[stage]
    assert {p.name for p in folder.iterdir()} == {
        "teacher.safetensors",
        "model_config.yaml",
        "vocab.tsv",
        "export.json",
        "hf",
        "timm",
    }
    assert not list(folder.parent.glob(".*partial*"))  # built aside, renamed into place
    exported = load_file(folder / "teacher.safetensors")
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)
    shards = Path(
        json.loads((runs[stage] / "checkpoints" / f"step_{STEPS:08d}" / "trainer.json").read_text())["config"]["data"][
            "stream"
        ]["shards"]
    )
    genes = (shards / "vocab.tsv").read_text().splitlines()[1:]
    for source in (runs[stage], runs[stage] / "checkpoints" / f"step_{STEPS:08d}", folder, folder / "hf"):
        loaded = load_model(source)
        assert not loaded.model.training and loaded.mpp == 8.0 and loaded.image_size == 32
        assert loaded.genes == [g.split("\t")[1] or g.split("\t")[2] for g in genes]
        state = loaded.model.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected), source
    timm_only = load_model(folder / "timm")
    assert timm_only.genes == [] and timm_only.mpp == 8.0 and timm_only.model.transcript is None
    for k, v in timm_only.model.image_backbone_state_dict().items():
        assert torch.equal(v, expected[k]), k


@pytest.mark.slow
def test_zero1_and_zero3_exports_hold_the_same_teacher(exports):
    """The same seed and steps under both stages: the same teacher, up to the reduction order of ZeRO-3."""
    one, three = (load_file(exports[s] / "teacher.safetensors") for s in (1, 3))
    assert one.keys() == three.keys()
    for k in one:
        torch.testing.assert_close(three[k], one[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.slow
def test_student_is_reassembled_from_the_zero_partitions(runs, tmp_path):
    from histotx.cli import main
    from histotx.export import load_model
    from histotx.export.source import read_teacher, student_state
    from histotx.train.checkpoint import load_deepspeed_file

    one = runs[1] / "checkpoints" / f"step_{STEPS:08d}"
    # ZeRO-1: the optimiser's fp32 partitions of both ranks, reassembled, are the module's own weights
    module = load_deepspeed_file(one / "mp_rank_00_model_states.pt", "cpu")["module"]
    full = student_state(one, 1)
    assert len(full) > 40 and all(torch.equal(full[k], module[k].float()) for k in full)
    # ZeRO-3: the same student as ZeRO-1's (same seed and steps), and not the teacher
    students = {s: read_teacher(runs[s], which="student").state for s in (1, 3)}
    assert students[3].keys() == students[1].keys()
    for k in students[1]:
        torch.testing.assert_close(students[3][k], students[1][k], rtol=1e-4, atol=1e-6, msg=k)
    teacher = _teacher_in_checkpoint(runs[3])
    assert students[3].keys() == teacher.keys()
    assert not all(torch.equal(students[3][k], teacher[k]) for k in teacher)
    assert main(["export", str(runs[3]), "--out", str(tmp_path / "s"), "--which", "student"]) == 0
    loaded = load_model(tmp_path / "s" / "hf")
    assert loaded.name.endswith("/student")
    assert all(torch.equal(v, students[3][k]) for k, v in loaded.model.state_dict().items())


# ------------------------------------------------------------------------------ the folders without HistoTx

OUTSIDE = r"""
import sys
sys.modules["histotx"] = None  # the exported folders must work where HistoTx cannot be imported
import timm, torch
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoModel

hf_dir, timm_dir, inputs_file, out_file = sys.argv[1:5]
x = load_file(inputs_file)
tx = {k: v for k, v in x.items() if k.startswith("transcript_")}
tx["transcript_resolution_um"] = 16.0
model = AutoModel.from_pretrained(hf_dir, trust_remote_code=True).double().eval()
out = {}
with torch.no_grad():
    for mode, kwargs in (("image", {"pixel_values": x["images"]}), ("transcripts", tx),
                         ("fused", {"pixel_values": x["images"], **tx})):
        o = model(**kwargs)
        for field in ("pooler_output", "patch_embeddings", "register_embeddings", "transcript_embeddings"):
            out[f"{mode}.{field}"] = o[field]
        assert o.last_hidden_state.shape[1] == 1 + o.register_embeddings.shape[1] + o.patch_embeddings.shape[1]
    packed = model.pack_transcripts([{"xy": [[4.0, 4.0], [20.0, 12.0]], "token": [0, 0, 1, 1],
                                      "gene": [3, 3, 7, 0], "count": [1.0, 2.0, 5.0, 0.0]}], 16.0)
    assert packed["transcript_lengths"].tolist() == [2] and packed["transcript_genes"].tolist() == [3, 7]
    model(**packed)
    processor = AutoImageProcessor.from_pretrained(hf_dir)
    assert processor.microns_per_pixel == 8.0 and processor.size["height"] == 32
    # the image-feature-extraction pipeline (processor + model) gives the model's CLS
    import numpy as np
    from PIL import Image
    from transformers import pipeline
    tile = Image.fromarray((np.arange(32 * 32 * 3) % 251).astype(np.uint8).reshape(32, 32, 3))
    pooled = pipeline("image-feature-extraction", model=hf_dir, trust_remote_code=True)(tile, return_tensors=True,
                                                                                         pool=True)
    direct = model(**processor(images=tile, return_tensors="pt")).pooler_output
    assert torch.allclose(pooled.double(), direct, atol=1e-5), (pooled, direct)
    # weights in bf16: computed under autocast, close to float64 at bf16 precision
    low = AutoModel.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.bfloat16).eval()
    fused = low(pixel_values=x["images"], **tx).patch_embeddings.double()
    ref = out["fused.patch_embeddings"]
    assert (fused - ref).abs().max() < 0.1 * ref.abs().max(), (fused - ref).abs().max()
    encoder = timm.create_model(f"local-dir:{timm_dir}", pretrained=True).double().eval()
    feats = encoder.forward_features(x["images"])
    r = encoder.num_reg_tokens
    out["timm.cls"], out["timm.registers"], out["timm.patch"] = feats[:, 0], feats[:, 1:1 + r], feats[:, 1 + r:]
    out["timm.pooled"] = encoder(x["images"])
save_file({k: v.contiguous() for k, v in out.items()}, out_file)
print("outside ok", type(model).__module__, type(encoder).__name__)
"""


def _inputs(vocab: int) -> dict[str, torch.Tensor]:
    """Two 32-px images and their transcript tokens (3 and 2 tokens; genes within the vocabulary)."""
    g = torch.Generator().manual_seed(0)
    offsets = torch.tensor([0, 2, 5, 6, 9, 10])
    n = int(offsets[-1])
    return {
        "images": torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64),
        "transcript_lengths": torch.tensor([3, 2]),
        "transcript_xy": torch.rand(5, 2, generator=g) * 32,
        "transcript_offsets": offsets,
        "transcript_genes": torch.randint(0, vocab, (n,), generator=g),
        "transcript_weights": torch.rand(n, generator=g, dtype=torch.float64) * 3,
    }


@pytest.mark.slow
def test_hf_and_timm_folders_without_histotx_give_the_teachers_outputs(runs, exports, tmp_path):
    from histotx.export import load_model
    from histotx.model import TranscriptBatch

    teacher = load_model(runs[3])
    x = _inputs(len(teacher.genes))
    save_file(x, str(tmp_path / "inputs.safetensors"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WORLD_SIZE", "RANK")}
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1"
    )
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            OUTSIDE,
            str(exports[3] / "hf"),
            str(exports[3] / "timm"),
            str(tmp_path / "inputs.safetensors"),
            str(tmp_path / "outputs.safetensors"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "outside ok transformers_modules." in run.stdout
    got = load_file(str(tmp_path / "outputs.safetensors"))

    model = teacher.model.double()
    tx = TranscriptBatch(
        lengths=x["transcript_lengths"],
        xy=x["transcript_xy"],
        offsets=x["transcript_offsets"],
        gene=x["transcript_genes"],
        weight=x["transcript_weights"],
        resolution_um=16.0,
    )
    with torch.no_grad():
        expected = {
            "image": model(x["images"]),
            "transcripts": model(None, tx, image_hw=(32, 32)),
            "fused": model(x["images"], tx),
        }
    # float64 on both sides: a difference of kernels or summation order stays ~1e-15 of the O(1) outputs.
    for mode, out in expected.items():
        for field, ours in (
            ("pooler_output", out.cls),
            ("patch_embeddings", out.patch),
            ("register_embeddings", out.registers),
            ("transcript_embeddings", out.transcript),
        ):
            theirs = got[f"{mode}.{field}"]
            assert theirs.dtype == torch.float64 and theirs.shape == ours.shape, (mode, field)
            torch.testing.assert_close(theirs, ours, rtol=1e-9, atol=1e-12, msg=f"{mode}.{field}")
    image = expected["image"]
    assert expected["transcripts"].transcript.shape == (5, model.config.embed_dim)
    assert not torch.allclose(expected["fused"].cls, image.cls)  # the transcripts change the CLS
    for name, ours in (
        ("cls", image.cls),
        ("registers", image.registers),
        ("patch", image.patch),
        ("pooled", image.cls),
    ):
        torch.testing.assert_close(got[f"timm.{name}"], ours, rtol=1e-9, atol=1e-12, msg=f"timm.{name}")


# ------------------------------------------------------------------------------ round trip into training


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["", "hf", "timm"])
def test_export_then_init_backbone_gives_identical_weights(runs, exports, folder):
    from histotx.config import load_config
    from histotx.train.config import TrainConfig
    from histotx.train.loop import build_backbone

    cfg = load_config(TrainConfig, TINY, [f"init.backbone={exports[1] / folder}"])  # the runs' config
    torch.manual_seed(123)  # another init than the run's: every exported tensor must be overwritten
    backbone = build_backbone(cfg).state_dict()
    teacher = _teacher_in_checkpoint(runs[1])
    if folder == "timm":  # the image backbone only; the transcript branch and mask token start fresh
        keys = [k for k in teacher if not k.startswith("transcript.") and k != "mask_token"]
    else:
        keys = list(teacher)
    assert len(keys) > 20 and backbone.keys() >= set(keys)
    different = [k for k in keys if not torch.equal(backbone[k], teacher[k])]
    assert not different, different


# ------------------------------------------------------------------------------ exports while training


@pytest.mark.slow
def test_export_every_writes_the_checkpoint_teacher_for_timm(runs, exports):
    import timm

    from histotx.export import load_model

    checkpoints = sorted(p.name for p in (runs[1] / "checkpoints").glob("step_*"))
    assert checkpoints == [f"step_{s:08d}" for s in range(1, STEPS + 1)]
    exported = sorted(p.name for p in (runs[1] / "exports").iterdir())  # nothing half-written left beside
    assert exported == [f"step_{s:08d}" for s in range(1, STEPS + 1) if s % EXPORT_EVERY == 0]
    got, reference = runs[1] / "exports" / f"step_{STEPS:08d}", exports[1] / "timm"
    cards = {"README.md", "LICENSE.md"}  # `histotx export` adds the model card (and a license note) to the timm folder
    assert {p.name for p in got.iterdir()} == {p.name for p in reference.iterdir()} - cards
    assert json.loads((got / "config.json").read_text()) == json.loads((reference / "config.json").read_text())
    ours, theirs = load_file(got / "model.safetensors"), load_file(reference / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not (runs[3] / "exports").exists()  # export_every = 0

    teacher = load_model(runs[1]).model.double()
    encoder = timm.create_model(f"local-dir:{got}", pretrained=True).double().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        feats, expected = encoder.forward_features(x), teacher(x)
    r = encoder.num_reg_tokens
    # float64 on both sides: a difference of kernels or summation order stays ~1e-15 of the O(1) outputs.
    for name, a, b in (
        ("cls", feats[:, 0], expected.cls),
        ("registers", feats[:, 1 : 1 + r], expected.registers),
        ("patch", feats[:, 1 + r :], expected.patch),
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


def test_export_every_is_off_by_default_and_wired_into_histotx_train(tmp_path):
    from histotx.cli import build_parser
    from histotx.config import ConfigError, load_config
    from histotx.export.during_training import checkpoint_hooks, is_due
    from histotx.train.config import TrainConfig

    base = [f"out={tmp_path}", "steps=25", "checkpoint.every_steps=5"]
    off = load_config(TrainConfig, TINY, base)
    assert off.checkpoint.export_every == 0 and checkpoint_hooks(off) == []  # the trainer gets no hook, no barrier
    [hook] = checkpoint_hooks(load_config(TrainConfig, TINY, base + ["checkpoint.export_every=10"]))
    assert [s for s in range(1, 26) if is_due(s, 10, 25)] == [10, 20, 25]  # its multiples and the last step
    assert not any(is_due(s, 0, 25) for s in range(1, 26))
    assert hook(tmp_path / "checkpoints" / "step_00000005", 5) is None and not (tmp_path / "exports").exists()
    for bad in ("7", "-5"):  # exports are made from checkpoints
        with pytest.raises(ConfigError, match="export_every"):
            load_config(TrainConfig, TINY, base + [f"checkpoint.export_every={bad}"])
    args = build_parser().parse_args(["train", str(TINY)])
    assert args.func.keywords["checkpoint_hooks"] is checkpoint_hooks


# ------------------------------------------------------------------------------ code, CLI


def test_remote_code_is_the_model_source_and_passes_transformers_import_check(tmp_path):
    from transformers.dynamic_module_utils import get_imports

    from histotx.export.remote_code import ALWAYS_AVAILABLE, SOURCES, remote_code_files

    files = remote_code_files()
    assert set(files) == {t for t, _ in SOURCES.values()} | {"configuration_histotx.py", "modeling_histotx.py"}
    for name, text in files.items():
        assert not re.search(r"^\s*(from|import)\s+histotx", text, re.M), name
        (tmp_path / name).write_text(text)
        assert set(get_imports(tmp_path / name)) <= ALWAYS_AVAILABLE, name  # what remote-code loading checks
    with_xformers = files["histotx_attention.py"]
    assert 'importlib.import_module("xformers.ops").fmha' in with_xformers and "from xformers" not in with_xformers
    # the model's source is copied, not rewritten: every line of fused.py but its imports is there verbatim
    source = (REPO / "histotx" / "model" / "fused.py").read_text().splitlines()
    assert [line for line in source if "import" not in line] == [
        line for line in files["histotx_fused.py"].splitlines()[2:] if "import" not in line
    ]


def test_export_cli_teaches_and_fails_clearly(tmp_path, capsys):
    from histotx.cli import main

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    assert "RUN_OR_CHECKPOINT" in text and "trust_remote_code" in text and "init.backbone" in text
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("keep me")
    empty_run = tmp_path / "run"
    empty_run.mkdir()
    assert main(["export", str(empty_run), "--out", str(tmp_path / "full")]) == 2
    assert (tmp_path / "full" / "file").read_text() == "keep me"


def test_adapters_are_inverse_key_maps():
    from histotx.model import FusedViT, FusedViTConfig
    from histotx.model.pretrained import HFAdapter, TimmAdapter

    torch.manual_seed(0)
    model = FusedViT(
        FusedViTConfig(
            size="custom", embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8, num_registers=2, vocab_size=10
        )
    )
    state = model.state_dict()

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    hf = HFAdapter.to_target(state)
    assert all(k.startswith("backbone.") for k in hf) and same(HFAdapter.from_target(hf), state)
    timm_state = TimmAdapter.to_target(state)
    assert same(timm_state, model.image_backbone_state_dict())
    assert not any(k.startswith("transcript.") for k in timm_state)
    back, dropped = TimmAdapter.from_target(
        {**timm_state, "head.weight": torch.zeros(1)}, embed_class=False, n_registers=2
    )
    assert same(back, timm_state) and dropped == ["head.weight"]
    # timm's other layout: position rows for CLS and registers fold into those tokens
    pos = torch.randn(1, 3 + 16, 32)
    folded, _ = TimmAdapter.from_target({**timm_state, "pos_embed": pos}, embed_class=True, n_registers=2)
    assert torch.equal(folded["pos_embed"], pos[:, 3:])
    assert torch.equal(folded["cls_token"], timm_state["cls_token"] + pos[:, :1])
    assert torch.equal(folded["reg_token"], timm_state["reg_token"] + pos[:, 1:3])
    with pytest.raises(ValueError, match="outside"):
        HFAdapter.from_target({"other.weight": torch.zeros(1)})


def test_export_targets_follow_the_protocol():
    """Every registered target's module writes, recognises and loads its folder; --format derives from them."""
    from histotx.export.targets import FORMATS, TARGETS, Target

    protocol = [name for name in dir(Target) if not name.startswith("_")]
    assert set(protocol) == {"write", "detect", "load"}
    for name, target in TARGETS.items():
        module = target.target()
        missing = [p for p in protocol if not callable(getattr(module, p, None))]
        assert not missing, f"{name}: {module.__name__} lacks {missing}"
        assert "{folder}" in target.usage
    assert FORMATS == {**{n: (n,) for n in TARGETS}, "both": tuple(TARGETS)}
