"""Untrusted model folders: a config is checked against its weights' shapes before any parameter exists,
weights are never unpickled beyond tensors, YAML is plain data, a folder's remote code is never run nor
asked about, and a seeded fuzz of 5,000 model folders gives only ModelConfigError or a model that fits."""

from __future__ import annotations

import builtins
import json
import pickle
import resource
import time
from dataclasses import asdict

import numpy as np
import pytest
import torch
import transformers
import yaml
from safetensors.torch import save

from histotx.config import dump_config
from histotx.model import FusedViT, FusedViTConfig
from histotx.model.fused import ModelConfigError
from histotx.model.pretrained import (
    MAX_POSITIONS,
    NATIVE_CONFIG,
    NATIVE_WEIGHTS,
    load_pretrained,
    model_from_checkpoint,
    native_checkpoint,
    parse_yaml,
    read_weights,
    weights_from_bytes,
)

FUZZ_CASES = 5000
TINY = FusedViTConfig(
    size="custom", embed_dim=8, depth=2, num_heads=2, img_size=16, patch_size=8, num_registers=1, vocab_size=6
)


def native_folder(path, config: FusedViTConfig = TINY, weights: bytes | None = None):
    path.mkdir(parents=True, exist_ok=True)
    if weights is None:
        torch.manual_seed(0)
        weights = save({k: v.contiguous() for k, v in FusedViT(config).state_dict().items()})
    (path / NATIVE_WEIGHTS).write_bytes(weights)
    dump_config(config, path / NATIVE_CONFIG)
    return path


def test_a_config_asking_for_a_huge_model_is_refused_before_building(tmp_path):
    """Limit: the config's embed_dim, depth, patch, channels, registers, MLP width and transcript branch must
    be the weights' own, checked by arithmetic on the shapes; ≤ MAX_POSITIONS position rows. embed_dim
    16384 over a 2-block 8-dim checkpoint (the model would take ~26 GB) fails in well under a second with
    under 50 MB of growth."""
    folder = native_folder(tmp_path / "m")
    fields = yaml.safe_load((folder / NATIVE_CONFIG).read_text())
    for change, match in [
        ({"embed_dim": 16384, "num_heads": 16, "mlp_hidden_dim": 65536}, "cls_token: the config needs"),
        ({"depth": 4000}, "depth: the config needs 4000 blocks, the weights hold 2"),
        ({"img_size": 8 * 4096}, f"asks for {4096**2} positions"),
        ({"vocab_size": 10_000_000}, "transcript.gene_embed.weight"),
    ]:
        (folder / NATIVE_CONFIG).write_text(yaml.safe_dump({**fields, **change}))
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        with pytest.raises(ModelConfigError, match=match) as info:
            load_pretrained(folder)
        assert time.perf_counter() - t0 < 30 and str(info.value).startswith(str(folder))
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 50_000, change  # KiB
    assert MAX_POSITIONS == 1 << 16
    (folder / NATIVE_CONFIG).write_text(yaml.safe_dump(fields))
    model, _ = load_pretrained(folder)
    assert model.config.embed_dim == 8


def test_pickle_weights_are_refused_without_advice_to_unpickle(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this would run",))

    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "x": Payload()}, path)
    with pytest.raises(ModelConfigError, match="a pickle that holds more than tensors") as info:
        read_weights(path)
    assert "weights_only" not in str(info.value) and str(info.value).startswith(str(path))
    path.write_bytes(pickle.dumps({"w": [1, 2]}))
    with pytest.raises(ModelConfigError, match=str(path)):
        read_weights(path)
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelConfigError, match="bad.safetensors: not a readable safetensors file"):
        read_weights(tmp_path / "bad.safetensors")


def test_a_yaml_python_tag_is_refused_and_named(tmp_path):
    folder = native_folder(tmp_path / "m")
    (folder / NATIVE_CONFIG).write_text('embed_dim: !!python/object/apply:os.system ["echo pwned"]\n')
    with pytest.raises(ModelConfigError, match=f"{NATIVE_CONFIG}: not plain YAML data") as info:
        load_pretrained(folder)
    assert str(info.value).startswith(str(folder / NATIVE_CONFIG))
    (folder / NATIVE_CONFIG).write_bytes(b"embed_dim: \xff\n")
    with pytest.raises(ModelConfigError, match="not UTF-8"):
        load_pretrained(folder)


def test_remote_code_is_never_asked_about_nor_run(tmp_path, monkeypatch):
    """A Dinov2 folder whose config.json carries an auto_map: transformers would ask on the terminal
    whether to run modeling code from the folder; HistoTx passes trust_remote_code=False (no question, no
    code; the built-in Dinov2 classes are used)."""
    config = transformers.Dinov2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
    )
    torch.manual_seed(0)
    transformers.Dinov2Model(config).save_pretrained(tmp_path / "d")
    hub = json.loads((tmp_path / "d/config.json").read_text())
    hub["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (tmp_path / "d/config.json").write_text(json.dumps(hub))
    (tmp_path / "d/evil.py").write_text("raise SystemExit('remote code ran')\n")

    def no_prompt(*_a, **_k):
        raise AssertionError("asked on the terminal")

    monkeypatch.setattr(builtins, "input", no_prompt)
    model, _ = load_pretrained(tmp_path / "d")
    assert model.config.embed_dim == 16


# ---------------------------------------------------------------- fuzz: model folders

_ODD_VALUES = [
    0,
    -1,
    1,
    2,
    3,
    7,
    16384,
    1 << 31,
    1 << 62,
    10**30,
    0.5,
    1e308,
    -0.0,
    True,
    False,
    None,
    "8",
    "",
    [8],
    {},
]


def _mutate_folder(rng: np.random.Generator, fields: dict, weights: bytes) -> tuple[dict | bytes, bytes]:
    """(model_config.yaml fields or bytes, weights bytes) with one to three mutations."""
    fields = dict(fields)
    data = bytearray(weights)
    for _ in range(rng.integers(1, 4)):
        op = rng.integers(0, 7)
        key = list(fields)[rng.integers(0, len(fields))]
        if op == 0:
            fields[key] = _ODD_VALUES[rng.integers(0, len(_ODD_VALUES))]
        elif op == 1:
            fields.pop(key, None)
        elif op == 2 and isinstance(fields.get(key), int) and not isinstance(fields.get(key), bool):
            fields[key] = int(fields[key]) * int(rng.choice([2, 4, 1024, 1 << 20]))
        elif op == 3:  # the safetensors header: flip a byte in it
            i = int(rng.integers(0, min(len(data), 600)))
            data[i] = int(rng.integers(0, 256))
        elif op == 4:
            del data[int(rng.integers(8, len(data))) :]
        elif op == 5:
            fields["depth"] = int(rng.integers(0, 6))
        else:
            fields["embed_dim"], fields["num_heads"] = int(rng.choice([4, 8, 16, 16384])), int(rng.choice([1, 2, 4]))
    if rng.random() < 0.2:  # through YAML text, a byte changed in one case of two
        text = yaml.dump(fields, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper)).encode()
        if rng.random() < 0.5:
            text = text[: int(rng.integers(0, len(text)))] + bytes([int(rng.integers(0, 256))])
        return text, bytes(data)
    return fields, bytes(data)


def test_fuzzed_model_folders_give_model_config_error_or_a_fitting_model(tmp_path, capsys):
    """5,000 mutated export folders (model_config.yaml fields and bytes, the safetensors header, truncation),
    read from bytes through the path `load_pretrained` takes: only ModelConfigError, or a model no larger
    than twice the checkpoint's parameter count."""
    folder = native_folder(tmp_path / "m")
    fields = yaml.safe_load((folder / NATIVE_CONFIG).read_text())
    weights = (folder / NATIVE_WEIGHTS).read_bytes()
    limit = 2 * sum(t.numel() for t in FusedViT(TINY).parameters())
    parsed = weights_from_bytes(weights, "m/teacher.safetensors")  # reused when a case leaves them intact
    rng = np.random.default_rng(2026)
    outcome: dict[str, int] = {}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for case in range(FUZZ_CASES):
        text, data = _mutate_folder(rng, fields, weights)
        try:
            config = parse_yaml(text, "m/model_config.yaml") if isinstance(text, bytes) else text
            state = dict(parsed) if data == weights else weights_from_bytes(data, "m/teacher.safetensors")
            ckpt = native_checkpoint("m", config, state)
            model, _ = model_from_checkpoint(ckpt)
        except ModelConfigError:
            outcome["model_config_error"] = outcome.get("model_config_error", 0) + 1
            continue
        except Exception as exc:  # noqa: BLE001 — the assertion below names the case
            raise AssertionError(f"case {case}: {type(exc).__name__}: {exc}\n{text!r}") from exc
        assert sum(p.numel() for p in model.parameters()) <= limit, (case, asdict(model.config))
        outcome["loaded"] = outcome.get("loaded", 0) + 1
    wall = time.perf_counter() - t0
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    with capsys.disabled():
        print(f"\nmodel-folder fuzz: {FUZZ_CASES} cases, {outcome}, {wall:.1f} s; process max RSS grew {grew:.0f} MB")
    assert sum(outcome.values()) == FUZZ_CASES and outcome.get("model_config_error", 0) > FUZZ_CASES // 2
    assert grew < 500


def test_a_timm_folder_cannot_make_timm_fetch_or_open_other_files(tmp_path):
    """config.json of a timm folder: a plain model name (no hf-hub:/local-dir:) and VisionTransformer's own
    arguments only (timm's checkpoint_path would open, and unpickle with timm's settings, a file it names)."""
    import timm
    from safetensors.torch import save_file

    folder = tmp_path / "t"
    folder.mkdir()
    with torch.device("meta"):
        timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    save_file({"x": torch.zeros(1)}, folder / "model.safetensors")
    for hub, match in [
        ({"architecture": "hf-hub:evil/model"}, "is not a plain timm model name"),
        ({"architecture": "local-dir:/etc"}, "is not a plain timm model name"),
        ({"architecture": "vit_tiny_patch16_224", "model_args": {"checkpoint_path": "/etc/passwd"}}, "checkpoint_path"),
        ({"architecture": "vit_tiny_patch16_224", "model_args": "x"}, "model_args must be an object"),
    ]:
        (folder / "config.json").write_text(json.dumps(hub))
        with pytest.raises(ModelConfigError, match=match):
            load_pretrained(folder)
