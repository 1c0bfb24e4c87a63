"""Typed configs from TOML: trees of dataclasses checked, loaded from layered files and dotted overrides, saved.

A schema is a tree of dataclasses whose sections derive from :class:`Section` (its help: :mod:`pretrain.confighelp`).
:func:`load_config` layers defaults < a base table < files (TOML, or JSON as :func:`save_config` writes) <
``section.field=value`` overrides < a layer implied by the merged table. Tables merge key by key (free-form ``dict``
fields too); arrays and values replace. Unknown keys and wrong types are ValueErrors naming the dotted key and its
source. A leaf: it imports nothing of momrec's.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import os
import tomllib
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

__all__ = [
    "Section",
    "all_keys",
    "at_least",
    "check",
    "deep_merge",
    "field_types",
    "fraction",
    "from_dict",
    "load_config",
    "save_config",
    "to_dict",
    "type_name",
]


# ---- rules -----------------------------------------------------------------------------------------------


def check(ok: bool, path: str, message: str) -> None:
    """Raise ``ValueError(f"{path} {message}")`` unless ``ok``: a rule of a config, naming its dotted key."""
    if not ok:
        raise ValueError(f"{path} {message}")


def at_least(section: Section, low: float, *names: str) -> None:
    """Each named field of ``section`` is >= ``low``."""
    for name in names:
        value = getattr(section, name)
        check(value >= low, f"{section.PATH}.{name}", f"must be >= {low}, got {value!r}")


def fraction(section: Section, *names: str) -> None:
    """Each named field of ``section`` lies in [0, 1)."""
    for name in names:
        value = getattr(section, name)
        check(0 <= value < 1, f"{section.PATH}.{name}", f"must be in [0, 1), got {value!r}")


class Section:
    """Base of config sections (dataclasses): Literal-typed fields hold one of their options, then
    :meth:`validate` holds the section to its own rules; both run whenever a section is built, in Python too."""

    PATH: ClassVar[str] = ""
    """Dotted name of the section in its root ('' for the root): errors name fields by it."""
    CHOICE_HINTS: ClassVar[dict[str, str]] = {}
    """Field name -> why its options are what they are (added to the error of a value that is not one of them)."""
    FOREIGN: ClassVar[tuple[str, ...]] = ()
    """Root only: top-level tables of another schema (e.g. a later stage's section) that files and saved tables
    may hold: read past, neither checked nor kept."""
    NOTES: ClassVar[dict[str, str]] = {}
    """Root only: dotted key -> a sentence added to its help text (e.g. that its value follows another key)."""

    def __post_init__(self) -> None:
        for name, hint in field_types(type(self)).items():
            value = getattr(self, name)
            if typing.get_origin(hint) is Literal and not _is_choice(value, typing.get_args(hint)):
                raise _choices_error(_join(self.PATH, name), value, hint, self.CHOICE_HINTS.get(name, ""))
        self.validate()

    def validate(self) -> None:
        """The section's own rules (ValueError naming the key, see :func:`check`); none by default."""

    @classmethod
    def derive(cls, given: Mapping[str, Any], table: dict[str, Any]) -> None:
        """Root only: set, in ``table`` (defaults and every layer merged), the keys whose value follows another key,
        before the table is built; ``given`` holds the layers alone (what a file, override or base table set).
        Nothing is derived by default."""


def _is_choice(value: Any, options: Sequence[Any]) -> bool:
    return any(value == option and type(value) is type(option) for option in options)  # True is not 1


def _choices_error(path: str, value: Any, hint: Any, why: str = "") -> ValueError:
    options = ", ".join(map(repr, typing.get_args(hint)))
    return ValueError(f"{path} must be one of {options}; got {value!r}{f' ({why})' if why else ''}")


# ---- dicts <-> dataclasses -------------------------------------------------------------------------------


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation, for the init fields of dataclass ``cls`` (inherited ones included)."""
    resolved = typing.get_type_hints(cls)
    return {f.name: resolved[f.name] for f in dataclasses.fields(cls) if f.init}


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def type_name(hint: Any) -> str:
    """How an annotation reads in errors and help: 'list[str]', "'fp32' | 'bf16'", 'table'..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " | ".join(map(repr, args))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if hint is type(None):
        return "none"
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    return "table" if dataclasses.is_dataclass(hint) else getattr(hint, "__name__", str(hint))


def _type_error(path: str, hint: Any, value: Any) -> ValueError:
    return ValueError(f"{path}: expected {type_name(hint)}, got {type(value).__name__} {value!r}")


def _convert(value: Any, hint: Any, path: str, why: str = "") -> Any:
    """``value`` (from TOML, JSON or the command line) checked against ``hint`` and converted (int -> float,
    list -> tuple, table -> dataclass); a ValueError names ``path`` (and ``why`` for a value not among a
    Literal's options)."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    origin = typing.get_origin(hint)
    if hint is Any:
        return copy.deepcopy(value)
    if origin is Literal:
        if not _is_choice(value, typing.get_args(hint)):
            raise _choices_error(path, value, hint, why)
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(value, hint, path)
    if origin in (list, tuple):
        return _convert_sequence(value, hint, path)
    if hint is dict or origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _type_error(path, hint, value)
        return copy.deepcopy(dict(value))
    return _convert_scalar(value, hint, path)


def _convert_union(value: Any, hint: Any, path: str) -> Any:
    for arm in typing.get_args(hint):
        try:
            return _convert(value, arm, path)
        except ValueError:
            continue
    raise _type_error(path, hint, value)


def _convert_sequence(value: Any, hint: Any, path: str) -> list | tuple:
    if not isinstance(value, (list, tuple)):
        raise _type_error(path, hint, value)
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        return [_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if len(args) == 2 and args[1] is Ellipsis:
        args = (args[0],) * len(value)
    if len(value) != len(args):
        raise ValueError(f"{path}: expected {len(args)} values ({type_name(hint)}), got {len(value)}: {value!r}")
    return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


def _convert_scalar(value: Any, hint: Any, path: str) -> Any:
    if hint is type(None) and value is None:
        return None
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (bool, int, str) and type(value) is hint:
        return value
    if hint in (type(None), bool, int, float, str):
        raise _type_error(path, hint, value)
    raise TypeError(f"{path}: unsupported annotation {hint!r}")  # a schema bug, not a user error


def _build(cls: type, data: Any, path: str) -> Any:
    """Dataclass ``cls`` from a table: unknown keys and wrong types are errors naming the dotted key."""
    if not isinstance(data, Mapping):
        raise _type_error(path or "config", cls, data)
    _check_known(cls, data, path)
    hints, why = field_types(cls), getattr(cls, "CHOICE_HINTS", {})
    kwargs = {key: _convert(value, hints[key], _join(path, key), why.get(key, "")) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        if issubclass(cls, Section):
            raise
        raise ValueError(f"{path}: {e}") from None  # a dataclass of another package (StreamConfig): add our name


def _check_known(cls: type, data: Mapping[str, Any], path: str, source: str = "") -> None:
    for key in data:
        if key not in field_types(cls):
            raise _unknown_key(_join(path, key), source, [_join(path, k) for k in field_types(cls)])


def _unknown_key(dotted: str, source: str, known: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(dotted, list(known), n=3, cutoff=0.6)
    suggestion = f"; did you mean {' or '.join(close)}?" if close else ""
    where = f" (in {source})" if source else ""
    return ValueError(f"unknown config key '{dotted}'{where}{suggestion}")


def all_keys(cls: type, path: str = "") -> Iterator[str]:
    """Every dotted key of schema ``cls``, sections included."""
    for name, hint in field_types(cls).items():
        yield _join(path, name)
        if dataclasses.is_dataclass(hint):
            yield from all_keys(hint, _join(path, name))


def _own(root: type, table: Mapping[str, Any]) -> dict[str, Any]:
    """``table`` without the root's foreign tables (:attr:`Section.FOREIGN`)."""
    foreign = getattr(root, "FOREIGN", ())
    return {k: v for k, v in table.items() if k not in foreign}


def _resolve(root: type, given: Mapping[str, Any]) -> Any:
    """The root built from its defaults, the layers ``given`` merged, and the keys the root derives."""
    table = deep_merge(to_dict(root()), given)
    if issubclass(root, Section):
        root.derive(given, table)
    return _build(root, table, "")


def from_dict(root: type, data: Mapping[str, Any]) -> Any:
    """Schema ``root`` from a (possibly partial) table such as :func:`to_dict` gives; missing keys take defaults."""
    if not isinstance(data, Mapping):
        raise _type_error("config", root, data)
    return _resolve(root, _own(root, data))


def to_dict(cfg: Any) -> Any:
    """``cfg`` as plain JSON-compatible data (tables, lists, strings, numbers, booleans, None)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


# ---- files and overrides ---------------------------------------------------------------------------------


def deep_merge(base: dict[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``layer`` into ``base`` (in place, and returned): tables merge, everything else replaces."""
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _check_layer(layer: Mapping[str, Any], cls: type, path: str, source: str) -> None:
    """Keys and types of one layer (file or override) against the schema, so an error names its source."""
    _check_known(cls, layer, path, source)
    for key, value in layer.items():
        hint, dotted = field_types(cls)[key], _join(path, key)
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            _check_layer(value, hint, dotted, source)
            continue
        try:
            _convert(value, hint, dotted, getattr(cls, "CHOICE_HINTS", {}).get(key, ""))
        except ValueError as e:
            raise ValueError(f"{e} (in {source})") from None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text(encoding="utf-8"))
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ValueError(f"cannot read config file {path}: {e.strerror}") from None
    except ValueError as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None


def _hint_at(dotted: str, root: type) -> Any:
    """The annotation at a dotted key (Any inside a free-form table); None when the key is not in the schema."""
    cls: Any = root
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return Any if cls is dict or typing.get_origin(cls) is dict else None
        if part not in field_types(cls):
            return None
        cls = field_types(cls)[part]
    return cls


def _accepts(hint: Any, kind: type) -> bool:
    """Whether ``hint`` admits a value of ``kind`` (str also through a Literal of strings)."""
    if hint is kind:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return any(type(a) is kind for a in args)
    return origin in (Union, types.UnionType) and any(_accepts(a, kind) for a in args)


def _parse_value(raw: str, hint: Any) -> Any:
    """A command-line value: a TOML literal when it parses, else the raw string; 'none' for an optional field;
    the raw text for a string field; a comma-separated list for a list of strings."""
    if raw.strip().lower() in ("none", "null") and _accepts(hint, type(None)):
        return None
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if _accepts(hint, str) and not isinstance(value, str):
        return raw  # e.g. run.out_dir=2024 stays a folder name
    if isinstance(value, str) and typing.get_origin(hint) in (list, Union, types.UnionType) and _lists_str(hint):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _lists_str(hint: Any) -> bool:
    if typing.get_origin(hint) is list:
        return typing.get_args(hint) == (str,)
    return any(_lists_str(a) for a in typing.get_args(hint))


def _override_layer(item: str, root: type) -> dict[str, Any]:
    """'a.b.c=value' -> {'a': {'b': {'c': value}}}."""
    key, sep, raw = item.removeprefix("--").partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"config override {item!r} is not of the form section.field=value")
    hint = _hint_at(key, root)
    if hint is None:
        raise _unknown_key(key, f"command-line override {item!r}", list(all_keys(root)))
    layer: dict[str, Any] = {}
    node = layer
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = _parse_value(raw, hint)
    return layer


def load_config(
    root: type,
    paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
    implied: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
) -> Any:
    """Schema ``root`` from defaults < ``base`` < each file of ``paths`` in order (TOML, or JSON as
    :func:`save_config` writes) < ``overrides`` ('section.field=value', the value a TOML literal or else a plain
    string) < ``implied(table)``, a layer derived from the merged table (defaults included), merged before anything
    is checked; then the root derives what follows other keys (:meth:`Section.derive`). ``base`` is a (partial)
    table such as :func:`to_dict` gives."""
    paths = [] if paths is None else [paths] if isinstance(paths, (str, os.PathLike)) else paths
    given: dict[str, Any] = {}
    layers: list[tuple[Mapping[str, Any], str]] = []
    if base is not None:
        layers.append((base, "the base config"))
    layers += [(_read_file(path), str(path)) for path in map(Path, paths)]
    for layer, source in layers:
        if not isinstance(layer, Mapping):
            raise _type_error(f"config (in {source})", root, layer)
        layer = _own(root, layer)
        _check_layer(layer, root, "", source)
        deep_merge(given, layer)
    for item in overrides:
        layer = _override_layer(item, root)
        _check_layer(layer, root, "", f"command-line override {item!r}")
        deep_merge(given, layer)
    if implied is not None:
        deep_merge(given, implied(deep_merge(to_dict(root()), given)))
    return _resolve(root, given)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved ``cfg`` as JSON (``tomllib`` reads TOML but cannot write it); :func:`load_config`
    and :func:`from_dict` read it back exactly."""
    path = Path(path)
    if path.suffix != ".json":
        raise ValueError(f"save_config writes JSON: name the file *.json, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_dict(cfg), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a crash never leaves half a config
