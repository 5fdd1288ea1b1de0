"""What to do about a config error: the hint added to msgspec's bare messages.

Used by ``convert.convert`` where a value fails its type: an enum lists its
valid values, an unknown key suggests the nearest valid one, a quoted boolean
says that only ``true``/``false`` are booleans, and a scalar where a block is
expected shows the block's keys.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Iterable
from typing import Any, Literal

import msgspec

__all__ = ["block_expected", "field_named", "hint", "unknown_key"]

_ENUM = re.compile(r"Invalid enum value (.*)")


def unknown_key(key: object, valid: Iterable[str]) -> str:
    """``unknown key; did you mean `max_connections`?`` (or the valid keys when none is near)."""
    names = sorted(valid)
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean `{close[0]}`?"
    return f"unknown key; valid keys: {', '.join(names)}"


def block_expected(struct: type[msgspec.Struct], raw: Any) -> str:
    keys = ", ".join(f.encode_name for f in msgspec.structs.fields(struct))
    return f"expected a block (a mapping with the keys {keys}), got the {type(raw).__name__} {raw!r}"


def _literals(tp: Any) -> list[Any]:
    if typing.get_origin(tp) is Literal:
        return list(typing.get_args(tp))
    return [value for arg in typing.get_args(tp) for value in _literals(arg)]


def hint(message: str, tp: Any) -> str:
    """msgspec's ``message`` for a value of type ``tp``, with what to write instead."""
    enum = _ENUM.fullmatch(message)
    values = _literals(tp)
    if enum and values:
        return f"invalid value {enum[1]}; valid values: {', '.join(str(v) for v in values)}"
    if message.startswith("Expected `bool") and message.endswith("got `str`"):
        return f"{message}; only true and false (unquoted) are booleans"
    return message


def field_named(message: str, struct: type[msgspec.Struct]) -> str | None:
    """The one field a block-level check's message is about (``max_header_bytes (512) must be ...``).

    None when it names no field first or names several (``attempt (6s) is longer than
    total (5s)`` is about the pair, so it stays at the block).
    """
    names = [f.encode_name for f in msgspec.structs.fields(struct)]
    named = [n for n in names if re.search(rf"\b{re.escape(n)}\b", message)]
    if len(named) == 1 and message.startswith(named[0]):
        return named[0]
    return None
