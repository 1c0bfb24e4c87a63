"""The one guarded JSON decoder of every reader: the source formats' JSON lines and JSON files
(:mod:`shards.formats`) and the JSON member of every shard sample (:mod:`shards.schema`).

Python's decoder fails on hostile input in ways that are no :class:`json.JSONDecodeError`: a value nested a few
thousand levels deep raises RecursionError, a number of more than ``sys.get_int_max_str_digits()`` digits (4300
unless changed) a plain ValueError. A value nested less deeply than that still overflows the stack later, in the
code that walks it recursively (text cleaning and rendering). :func:`loads` and :func:`raw_decode` turn each of
these into a :class:`JSONProblem` with a short reason and the offset it concerns, so that every caller can make it
a counted skip (or an error) naming its file and line, or its shard and sample.
"""

from __future__ import annotations

import json
from json.decoder import WHITESPACE
from typing import Any

MAX_JSON_DEPTH = 100
"""The deepest nesting of lists and objects a decoded value may have (``[1]``: 1). Item fields are cleaned and
rendered recursively, two Python frames a level, so a value the decoder still reads (up to the interpreter's
recursion limit) would raise a RecursionError later; a shard sample nests 3 levels."""

_DECODER = json.JSONDecoder()


class JSONProblem(ValueError):
    """Why a text holds no usable JSON value: ``reason`` in a few words, and ``pos``, the offset (in characters)
    where the decoder stopped or where the unusable value begins."""

    def __init__(self, reason: str, pos: int) -> None:
        self.reason, self.pos = reason, pos
        super().__init__(reason)

    def column(self, text: str) -> int:
        """The column (from 1) of :attr:`pos` within its line of ``text``."""
        return self.pos - (text.rfind("\n", 0, self.pos) + 1) + 1


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (a string or number: 0, ``[1]``: 1), without recursion."""
    depth, todo = 0, [(value, 0)]
    while todo:
        value, level = todo.pop()
        if isinstance(value, (list, dict)):
            depth = max(depth, level + 1)
            todo.extend((v, level + 1) for v in (value.values() if isinstance(value, dict) else value))
    return depth


def raw_decode(text: str, pos: int = 0) -> tuple[Any, int]:
    """The JSON value that begins at ``text[pos]`` and the offset just after it (as
    :meth:`json.JSONDecoder.raw_decode`); a :class:`JSONProblem` if it is malformed, nested deeper than
    :data:`MAX_JSON_DEPTH`, or holds a number too long to convert."""
    try:
        value, end = _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError as e:
        raise JSONProblem(e.msg, e.pos) from None
    except RecursionError:
        raise JSONProblem("nested too deeply", pos) from None
    except ValueError as e:  # a number of more than sys.get_int_max_str_digits() digits
        raise JSONProblem(f"unreadable value ({str(e).split(':')[0]})", pos) from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise JSONProblem(f"nested too deeply (more than {MAX_JSON_DEPTH} levels)", pos)
    return value, end


def loads(text: str) -> Any:
    """The one JSON value of ``text``, whitespace around it allowed (as :func:`json.loads`); a
    :class:`JSONProblem` as :func:`raw_decode` says, or for anything after the value."""
    value, end = raw_decode(text, WHITESPACE.match(text, 0).end())
    end = WHITESPACE.match(text, end).end()
    if end != len(text):
        raise JSONProblem("Extra data", end)
    return value
