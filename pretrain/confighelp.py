"""The ``--help-config`` text of a config schema: every dotted key with its type, default and field docstring."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
from collections.abc import Iterator, Mapping
from typing import Any

from .configlib import field_types, to_dict, type_name

__all__ = ["config_help"]


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` and its dataclass bases (a subclass's wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
            ):
                docs[node.target.id] = inspect.cleandoc(str(nxt.value.value))
    return docs


def _help_lines(cls: type, instance: Any, path: str, notes: Mapping[str, str]) -> Iterator[str]:
    docs = _field_docs(cls)
    for name, hint in field_types(cls).items():
        dotted, value = f"{path}.{name}" if path else name, getattr(instance, name)
        if dataclasses.is_dataclass(hint):
            yield f"\n[{dotted}]  {inspect.cleandoc(hint.__doc__ or '').splitlines()[0]}"
            yield from _help_lines(hint, value, dotted, notes)
            continue
        default = "none" if value is None else json.dumps(to_dict(value))
        yield f"  {dotted}: {type_name(hint)} = {default}"
        doc = " ".join(f"{docs.get(name, '')} {notes.get(dotted, '')}".split())
        yield from textwrap.wrap(doc, 116, initial_indent=" " * 6, subsequent_indent=" " * 6, break_on_hyphens=False)


def config_help(root: type) -> str:
    """Every dotted key of schema ``root`` with its type, default and docstring (and the sentence the root's
    ``NOTES`` adds to a key, :attr:`pretrain.configlib.Section.NOTES`)."""
    lines = ["Config keys (set in a TOML file, or on the command line as section.field=value):"]
    lines += _help_lines(root, root(), "", getattr(root, "NOTES", {}))
    return "\n".join(lines) + "\n"
