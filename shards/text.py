"""Item text from source fields, by a template.

A template is parts separated by ``|``; each part is text with ``{field}`` placeholders. A part
appears only when every field it names is present and non-empty, so missing fields never
leave dangling labels; the parts that appear are joined by one space. Example::

    "{title}.|Genres: {genres}.|{plot}"  ->  "Toy Story (1995). Genres: Animation, Comedy."

Lists render as comma-separated values. With no template, every field is used, in order, each
value ending with a period. Whitespace runs collapse to one space; an item whose text renders empty has no text.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_WS = re.compile(r"\s+")


class TemplateError(ValueError):
    pass


def _value_text(value: Any) -> str | None:
    """The text of a field value; None if absent or empty; raises TypeError for objects."""
    if value is None:
        return None
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, (str, int, float)):
        text = _WS.sub(" ", str(value)).strip()
    elif isinstance(value, list):
        parts = [_value_text(v) for v in value]
        text = ", ".join(p for p in parts if p)
    else:
        raise TypeError(f"expected text, a number or a list, got {type(value).__name__}")
    return text or None


@dataclass(frozen=True)
class Template:
    """A parsed template; ``Template.parse(None)`` renders every field."""

    parts: tuple[tuple[str, tuple[str, ...]], ...] | None

    @classmethod
    def parse(cls, spec: str | None) -> Template:
        if spec is None:
            return cls(None)
        parts = []
        for part in spec.split("|"):
            try:
                names = tuple(name for _, name, _, _ in string.Formatter().parse(part) if name is not None)
            except ValueError as e:
                raise TemplateError(f"text template part {part!r}: {e}") from None
            if any(not n.isidentifier() for n in names):
                raise TemplateError(f"text template part {part!r}: fields must be plain names like {{title}}")
            parts.append((part, names))
        if not any(names for _, names in parts):
            raise TemplateError(f"text template {spec!r} names no field")
        return cls(tuple(parts))

    @property
    def fields(self) -> tuple[str, ...] | None:
        """The field names the template uses (None: all)."""
        return None if self.parts is None else tuple(dict.fromkeys(n for _, names in self.parts for n in names))

    def render(self, fields: Mapping[str, Any]) -> str | None:
        """The item text, or None when nothing renders. Raises TypeError naming a field of a wrong type."""
        texts: dict[str, str | None] = {}
        for name in self.fields if self.parts is not None else fields:
            try:
                texts[name] = _value_text(fields.get(name))
            except TypeError as e:
                raise TypeError(f"field {name!r}: {e}") from None
        if self.parts is None:  # "Title. Description." -- no doubled period after a value that ends a sentence
            out = " ".join(t if t[-1] in ".!?" else t + "." for t in texts.values() if t)
        else:
            rendered = [part.format(**texts) for part, names in self.parts if all(texts[n] for n in names)]
            out = " ".join(r.strip() for r in rendered if r.strip())
        return _WS.sub(" ", out).strip() or None
