"""Typed configs: dataclasses filled from YAML (``yaml.safe_load``) and ``key=value`` overrides.

Every stage defines its own dataclass (nested dataclasses for sections); this module turns YAML and
command-line overrides into an instance, checks types and unknown keys, and dumps the resolved config
beside a run or shard set so that what ran can always be read back.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


_MISSING = object()


def config_error(
    where: str,
    *,
    value: Any = _MISSING,
    expected: str = "",
    unknown: Sequence[str] = (),
    known: Sequence[str] = (),
) -> ConfigError:
    """Every config message is worded here: ``where`` (the file, then the dotted key), and either the value
    with what was expected, or the unknown keys with the known ones."""
    if unknown:
        return ConfigError(unknown_keys_message(where, unknown, known))
    return ConfigError(f"{where}: expected {expected}, got {value!r}")


def _in_order(tp: Any) -> Any:
    """``tp`` with every union tried left to right, as written (``float | str`` reads "16" as 16.0)."""
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        union = typing.Union[tuple(_in_order(a) for a in args)]
        if len([a for a in args if a is not type(None)]) < 2:  # X | None: no order to keep
            return union
        from pydantic import Field

        return Annotated[union, Field(union_mode="left_to_right")]
    if origin in (list, tuple, dict) and args:
        return origin[tuple(a if a is Ellipsis else _in_order(a) for a in args)]
    return tp


@functools.lru_cache(maxsize=None)
def _adapter(tp: Any) -> Any:
    """pydantic's validator of ``tp`` (imported on first use: ~0.2 s that ``histotx --help`` need not pay)."""
    from pydantic import ConfigDict, TypeAdapter

    return TypeAdapter(_in_order(tp), config=ConfigDict(coerce_numbers_to_str=True))


_EXPECTED = {  # pydantic error type prefix → what the message says was expected
    "int": "an integer",
    "float": "a number",
    "bool": "true/false",
    "string": "a string",
    "list": "a list",
    "tuple": "a list",
    "iterable": "a list",
    "dict": "a mapping",
    "none": "null",
}


def _expected(error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind in ("too_long", "too_short"):
        ctx = error.get("ctx", {})
        n = ctx.get("max_length") if kind == "too_long" else ctx.get("min_length")
        return f"a list of {'at most' if kind == 'too_long' else 'at least'} {n} items"
    return _EXPECTED.get(kind.split("_")[0], error["msg"].lower())


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one value against a type annotation: sections (dataclasses) here, so that unknown keys
    and each section's ``validate()`` are reported with their path; everything else by pydantic."""
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise config_error(where, value=value, expected=f"a mapping for {tp.__name__}")
        return from_dict(tp, value, where)
    if typing.get_origin(tp) in (list, tuple) and isinstance(value, str):  # "[4, 8]" or "a,b" on a command line
        value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
    if tp in (int, float) and isinstance(value, bool):  # YAML's true is no number
        raise config_error(where, value=value, expected=_EXPECTED[tp.__name__])
    from pydantic import ValidationError

    try:
        return _adapter(tp).validate_python(value)
    except ValidationError as exc:
        errors = exc.errors()
        path = "".join(f"[{p}]" for p in errors[0]["loc"] if isinstance(p, int))
        expected = " or ".join(dict.fromkeys(_expected(e) for e in errors))
        raise config_error(where + path, value=errors[0]["input"], expected=expected) from None


def unknown_keys_message(where: str, unknown: typing.Iterable[str], known: typing.Iterable[str]) -> str:
    """``where: unknown key 'shardz' (did you mean 'shards'?); known: [...]``: one message for every config
    loader (difflib's close matches, at most one suggestion per key)."""
    known = sorted(known)
    parts = []
    for key in sorted(unknown):
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        parts.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    noun = "key" if len(parts) == 1 else "keys"
    return f"{where}: unknown {noun} {', '.join(parts)}; known: {known}"


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise config_error(where, unknown=unknown, known=sorted(names))
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    check = getattr(obj, "validate", None)
    if callable(check):
        check()
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict[str, Any], dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "data.resolutions=[8,16]"]`` → nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=1e-4)")
        key, raw = item.split("=", 1)
        _set_dotted(out, key.strip(), raw.strip())
    return out


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key of dataclass ``cls`` and of its sections, dotted (``data.stream.shards``)."""
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        if name not in {f.name for f in dataclasses.fields(cls)}:
            continue
        out.append(prefix + name)
        if _is_dataclass_type(tp):
            out.extend(_dotted_keys(tp, f"{prefix}{name}."))
    return out


def _field_type(cls: type, dotted: str, item: str) -> Any:
    """The annotation of ``dotted`` (``data.stream.shards``) in dataclass ``cls``; None below a free-form
    mapping (``model``, ``deepspeed.extra``), whose keys are checked where they are used."""
    tp: Any = cls
    keys = dotted.split(".")
    for i, key in enumerate(keys):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
            tp = args[0]
        if not _is_dataclass_type(tp):
            if tp is Any or typing.get_origin(tp) is dict or tp is dict:
                return None
            raise ConfigError(f"command line {item!r}: {'.'.join(keys[:i])} is a value, not a section")
        names = {f.name for f in dataclasses.fields(tp)}
        if key not in names:
            section = ".".join(keys[:i]) or "the top level"
            message = unknown_keys_message(f"command line {item!r}: in {section}", [key], names)
            if not difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6):  # a key of another section?
                elsewhere = {k: k.rsplit(".", 1)[-1] for k in _dotted_keys(cls) if "." in k}
                close = difflib.get_close_matches(key, sorted(set(elsewhere.values())), n=1, cutoff=0.75)
                full = sorted(k for k, leaf in elsewhere.items() if close and leaf == close[0])
                if full:
                    message = f"command line {item!r}: unknown key {key!r} (did you mean {' or '.join(full)}?)"
            raise ConfigError(message)
        tp = typing.get_type_hints(tp)[key]
    return tp


def check_overrides(cls: type, overrides: list[str]) -> None:
    """Each ``key=value`` against ``cls`` on its own, so that a wrong key or value on the command line is
    blamed on the command line (``command line 'steps=abc': expected an integer, got 'abc'``), not on the
    YAML file it is merged into."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=1e-4)")
        key, raw = (part.strip() for part in item.split("=", 1))
        tp = _field_type(cls, key, item)
        if tp is None:
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"command line {item!r}: not a valid value ({exc})") from exc
        _coerce(value, tp, f"command line {item!r}")


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``, nested dicts merged key by key (a new dict; neither is changed)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


BASE_KEY = "_base_"  # in a YAML section: another YAML file (relative to this one) whose keys this section overrides


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return loaded


def _with_bases(node: Any, folder: Path, seen: frozenset[Path], where: str) -> Any:
    """``node`` with every ``_base_: FILE`` replaced by that file's mapping, the section's own keys over it."""
    if not isinstance(node, dict):
        return node
    out = {k: _with_bases(v, folder, seen, where) for k, v in node.items() if k != BASE_KEY}
    if BASE_KEY not in node:
        return out
    if not isinstance(node[BASE_KEY], str):
        raise config_error(f"{where}.{BASE_KEY}", value=node[BASE_KEY], expected="a YAML file's path")
    base_path = (folder / node[BASE_KEY]).resolve()
    if base_path in seen:
        raise ConfigError(f"{where}: {base_path} includes itself")
    base = _with_bases(_read_mapping(base_path), base_path.parent, seen | {base_path}, str(base_path))
    return merge(base, out)


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of ``cls`` ← YAML file ← overrides; validated; errors name the file and the key. A section
    of the file may start from another file (``model: {_base_: ../model/vit_l16.yaml, drop_path_rate: 0.2}``).

    Only the keys given are passed on, so fields a dataclass derives from others (a size preset filling
    in widths, say) are derived from what the file says, not frozen at the defaults' derived values."""
    data: dict[str, Any] = {}
    where = "config"
    check_overrides(cls, overrides or [])
    if path is not None:
        where = str(path)
        path = Path(path)
        data = _with_bases(_read_mapping(path), path.parent, frozenset({path.resolve()}), where)
    data = merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data, where)


def dump_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically)."""
    from histotx.files import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
    return path
