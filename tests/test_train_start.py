"""`histotx train` as a newcomer meets it: input checked before anything heavy (message, exit status, nothing
left behind), command-line values blamed on the command line, did-you-mean for unknown keys, no DeepSpeed
JIT build, what the console says; `histotx --version` and `histotx` alone."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from histotx.cli import main
from histotx.config import ConfigError, load_config, unknown_keys_message
from histotx.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "train" / "tiny_cpu.yaml"


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    from shardkit import write_shard_set

    return write_shard_set(tmp_path / "shards", n_shards=2, per_shard=8, tile_px=32)


def errors(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def train_rc(caplog, *args: str) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rc = main(["train", str(TINY), *args])
    return rc, errors(caplog)


# ---------------------------------------------------------------- the top-level command


def test_version(capsys):
    from histotx import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"histotx {__version__}"


def test_histotx_alone_prints_help_and_exits_0(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: histotx" in out and "histotx train CONFIG.yaml" in out


# ---------------------------------------------------------------- input checked first


def test_empty_shard_folder_is_refused_before_anything_and_leaves_nothing(tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    rc, msg = train_rc(caplog, f"data.stream.shards={tmp_path / 'empty'}", f"out={out}")
    assert rc == 2
    assert f"data.stream.shards={tmp_path / 'empty'}: no manifest.json there" in msg
    assert not out.exists()


def test_missing_shard_folder_says_no_such_folder(tmp_path, caplog):
    rc, msg = train_rc(caplog, f"data.stream.shards={tmp_path / 'nope'}", f"out={tmp_path / 'run'}")
    assert rc == 2 and msg.endswith(f"data.stream.shards={tmp_path / 'nope'}: no such folder")
    assert not (tmp_path / "run").exists()


def test_no_shards_key(tmp_path, caplog):
    rc, msg = train_rc(caplog, f"out={tmp_path / 'run'}")
    assert rc == 2 and "data.stream.shards is not set" in msg


def test_unfinished_shard_folder_is_named_as_such(tmp_path, caplog):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "s.00000.tar").write_bytes(b"")
    rc, msg = train_rc(caplog, f"data.stream.shards={tmp_path / 'half'}", f"out={tmp_path / 'run'}")
    assert rc == 2 and "1 .tar files but no manifest.json" in msg and "histotx shard merge" in msg


def test_missing_shard_of_the_manifest(shards, tmp_path, caplog):
    victim = sorted(shards.glob("*.tar"))[0]
    victim.unlink()
    rc, msg = train_rc(caplog, f"data.stream.shards={shards}", f"out={tmp_path / 'run'}")
    assert rc == 2 and f"1 of 2 shards listed in manifest.json are missing (e.g. {victim.name})" in msg


def test_vocabulary_larger_than_the_model(shards, tmp_path, caplog):
    (shards / "vocab.tsv").write_text("index\tsymbol\tensembl_id\n" + "".join(f"{i}\tG{i}\t\n" for i in range(40)))
    rc, msg = train_rc(caplog, f"data.stream.shards={shards}", f"out={tmp_path / 'run'}", "model.vocab_size=16")
    assert rc == 2 and "40 genes, more than model.vocab_size=16" in msg


def test_output_that_is_a_file(shards, tmp_path, caplog):
    (tmp_path / "file").write_text("x")
    rc, msg = train_rc(caplog, f"data.stream.shards={shards}", f"out={tmp_path / 'file'}")
    assert rc == 2 and msg.endswith(f"out={tmp_path / 'file'}: exists and is not a folder")


def test_resume_path_that_does_not_exist(shards, tmp_path, caplog):
    rc, msg = train_rc(caplog, f"data.stream.shards={shards}", f"out={tmp_path / 'run'}", "--resume", "/nope/run")
    assert rc == 2 and "--resume /nope/run: no such checkpoint or run folder" in msg


# ---------------------------------------------------------------- config messages


def test_command_line_value_is_blamed_on_the_command_line(caplog):
    rc, msg = train_rc(caplog, "steps=abc")
    assert rc == 2
    assert msg.endswith("command line 'steps=abc': expected an integer, got 'abc'")
    assert "tiny_cpu.yaml" not in msg


def test_yaml_value_is_blamed_on_the_file(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("steps: abc\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.steps: expected an integer, got 'abc'"):
        load_config(TrainConfig, cfg, [])


def test_unknown_key_in_the_file_gets_a_suggestion(tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("data:\n  stream:\n    shardz: /x\n")
    with pytest.raises(ConfigError, match=r"typo.yaml.data.stream: unknown key 'shardz' \(did you mean 'shards'\?\)"):
        load_config(TrainConfig, cfg, [])


def test_unknown_key_on_the_command_line_gets_a_suggestion_across_sections(caplog):
    rc, msg = train_rc(caplog, "shardz=/x")
    assert rc == 2 and "command line 'shardz=/x': unknown key 'shardz' (did you mean data.stream.shards" in msg
    rc, msg = train_rc(caplog, "data.stream.batchsize=4")
    assert rc == 2 and "unknown key 'batchsize' (did you mean 'batch_size'?)" in msg


def test_unknown_keys_message_without_a_close_match():
    msg = unknown_keys_message("f.yaml", ["zzz"], ["steps", "seed"])
    assert msg == "f.yaml: unknown key 'zzz'; known: ['seed', 'steps']"


# ---------------------------------------------------------------- a failed start, and what stays


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(shards, tmp_path, monkeypatch):
    import histotx.train.loop as loop

    out = tmp_path / "run"

    def failing_train(cfg, *_args, **_kw):
        Path(cfg.out).mkdir(parents=True)
        (Path(cfg.out) / "config.yaml").write_text("half made")
        raise RuntimeError("engine would not build")

    monkeypatch.setattr(loop, "train", failing_train)
    with pytest.raises(RuntimeError, match="engine would not build"):
        main(["train", str(TINY), f"data.stream.shards={shards}", f"out={out}"])
    assert not out.exists()


def test_a_run_that_fails_after_a_checkpoint_says_so(shards, tmp_path, monkeypatch):
    import histotx.train.loop as loop

    out = tmp_path / "run"
    (out / "checkpoints" / "step_10").mkdir(parents=True)

    def failing_train(*_args, **_kw):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(loop, "train", failing_train)
    with pytest.raises(RuntimeError):
        main(["train", str(TINY), f"data.stream.shards={shards}", f"out={out}"])
    assert "RuntimeError: disk on fire" in (out / "FAILED.txt").read_text()


# ---------------------------------------------------------------- DeepSpeed's JIT build


def test_deepspeed_shm_op_is_not_built_on_cpu(monkeypatch):
    """The trigger, and its switch: TorchBackend's build_shm_op loads (JIT-builds) the op when it is marked
    compatible; skip_unused_builds marks it not, so build_shm_op returns None without building."""
    pytest.importorskip("deepspeed")
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    if get_accelerator().device_name() != "cpu":
        pytest.skip("the shm op is built on DeepSpeed's CPU accelerator only")
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    from histotx.train.ds_ops import skip_unused_builds

    def no_build(self, verbose=False):  # noqa: ARG001 (OpBuilder.load's signature)
        raise AssertionError(f"{self.name} would be JIT-compiled")

    monkeypatch.setattr(ShareMemCommBuilder, "load", no_build)
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", True)
    with pytest.raises(AssertionError, match="deepspeed_shm_comm would be JIT-compiled"):
        build_shm_op()  # what every TorchBackend (deepspeed.init_distributed) does first
    assert skip_unused_builds() == ["deepspeed_shm_comm"]
    assert build_shm_op() is None


def test_a_real_run_builds_nothing_and_says_where_it_went(shards, tmp_path, caplog, monkeypatch):
    """2 steps in this process: no file in a fresh TORCH_EXTENSIONS_DIR, the run folder at the start, the
    loss and the monitors per record, the checkpoint at the end."""
    ext = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        rc = main(
            [
                "train",
                str(TINY),
                f"data.stream.shards={shards}",
                f"out={out}",
                "steps=2",
                "log.every_steps=1",
                "log.tensorboard=false",
                "deepspeed.zero_stage=0",
            ]
        )
    assert rc == 0
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"run folder {out}" in text
    assert "step 1/2: loss " in text and "prototypes used" in text
    assert f"checkpoint: {out / 'checkpoints' / 'step_00000002'}" in text
    assert not ext.exists() or not any(ext.rglob("*")), sorted(os.listdir(ext))


# ---------------------------------------------------------------- what the console warns about


def _rec(loss: float, used: int = 40) -> dict:
    import math

    return {"loss": loss, "teacher/entropy": 2.0, "teacher/entropy_max": math.log(128), "teacher/prototypes_used": used}


def test_console_warns_once_when_the_teacher_stays_on_one_prototype():
    from histotx.train.console import Watch, summary

    watch = Watch()
    assert watch.check(1, _rec(5.0, used=1)) == [] and watch.check(2, _rec(5.0, used=1)) == []  # early: allowed
    (warning,) = watch.check(3, _rec(5.0, used=1))
    assert "put every sample on one prototype for 3 logging windows (teacher/prototypes_used=1 of 128)" in warning
    assert watch.check(4, _rec(5.0, used=1)) == []  # said once
    assert summary(4, 10, _rec(5.0, used=1)) == (
        "step 4/10: loss 5.000, teacher entropy 2.00 of 4.85, 1 of 128 prototypes used"
    )


def test_console_warns_when_the_loss_climbs_and_when_it_ends_higher():
    from histotx.train.console import Watch

    watch = Watch()
    said = [w for step, loss in enumerate([3.6, 3.5, 3.7, 4.0, 6.8], 1) for w in watch.check(step, _rec(loss))]
    assert said == ["step 5: the loss is climbing: 6.800 now, 3.500 at step 2. " + said[0].split(". ", 1)[1]]
    slow = Watch()
    for step, loss in enumerate([3.6, 3.7, 3.8, 4.0], 1):
        assert slow.check(step, _rec(loss)) == []
    (end,) = slow.at_end()
    assert end.startswith("the loss finished higher than it started (3.600 at step 1 → 4.000 at step 4)")
    falling = Watch()
    for step, loss in enumerate([3.6, 3.0, 2.5], 1):
        falling.check(step, _rec(loss))
    assert falling.at_end() == []


def test_a_run_that_fails_after_recording_steps_keeps_them_and_says_so(shards, tmp_path, monkeypatch):
    import histotx.train.loop as loop

    out = tmp_path / "run"

    def diverging_train(cfg, *_args, **_kw):
        Path(cfg.out).mkdir(parents=True)
        (Path(cfg.out) / "metrics.jsonl").write_text('{"step": 5, "loss": NaN}\n')
        raise loop.NonFiniteLossError("3 steps in a row had a NaN/inf loss")

    monkeypatch.setattr(loop, "train", diverging_train)
    assert main(["train", str(TINY), f"data.stream.shards={shards}", f"out={out}"]) == 3
    assert (out / "metrics.jsonl").is_file() and "NaN/inf loss" in (out / "FAILED.txt").read_text()


def test_console_warns_when_the_teacher_stays_uniform():
    import math

    from histotx.train.console import Watch

    watch = Watch()
    flat = {**_rec(8.0), "teacher/entropy": 0.999 * math.log(128)}
    assert watch.check(1, flat) == [] and watch.check(2, flat) == []
    (warning,) = watch.check(3, flat)
    assert "the teacher's output has been uniform for 3 logging windows (teacher entropy 4.85 of" in warning
    assert Watch().check(1, _rec(8.0)) == []  # entropy 2.0 of 4.85: not uniform


def test_console_on_a_terminal_draws_a_progress_line_with_the_monitors(monkeypatch, capsys, caplog):
    import sys

    from histotx.train.console import Console

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    console = Console(total_steps=10, start_step=0, progress=True)
    assert console.bar is not None and not console.plain
    with caplog.at_level(logging.WARNING):
        for step in (1, 2, 3):
            console.advance()
            console.record(step, _rec(5.0, used=1))
    console.bar.refresh()
    line = capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]
    assert "3/10" in line and "loss=5.000" in line and "protos=1/128" in line and "ent=2.00/4.85" in line
    assert "one prototype for 3 logging windows" in caplog.text
    console.close()


def test_a_rank_ended_by_a_known_error_leaves_it_in_torchruns_error_file(tmp_path, monkeypatch, caplog):
    """The per-rank entry returns 2 for a meaningful error, yet torchrun's error file (which slurm/pretrain.sbatch
    reads to name the root cause among the ranks) still holds it, as it would an escaping exception."""
    import json

    from histotx.launch.train import main as rank_main

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    with caplog.at_level(logging.INFO):
        rc = rank_main([str(TINY), f"data.stream.shards={tmp_path / 'nope'}", f"out={tmp_path / 'run'}"])
    assert rc == 2
    message = json.loads(error_file.read_text())["message"]["message"]
    assert message == f"ConfigError: data.stream.shards={tmp_path / 'nope'}: no such folder", message
