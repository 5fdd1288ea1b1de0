"""Typed conversion: raw YAML data to a config struct, each problem a ``ConfigIssue`` at its path.

``msgspec.convert`` does the work and reports the path of the first bad value; this
rewrites that path relative to where the block sits in the file, checks a block key by
key first so that every bad key of it is reported, and adds the hints of ``hints.py``.
"""

from __future__ import annotations

import re
import typing
from typing import Any, TypeVar

import msgspec

from proxy.config.hints import block_expected, field_named, hint, unknown_key
from proxy.config.issues import ConfigIssue, join_path, path_key
from proxy.config.units import decode_hook

__all__ = ["convert"]

T = TypeVar("T")
_UNKNOWN = re.compile(r"Object contains unknown field `([^`]*)`")


def _struct_in(tp: Any) -> type[msgspec.Struct] | None:
    """The config block type ``tp`` is (``Block`` or ``Block | None``), else None."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return tp
    structs = [arg for arg in typing.get_args(tp) if isinstance(arg, type) and issubclass(arg, msgspec.Struct)]
    return structs[0] if len(structs) == 1 and type(None) in typing.get_args(tp) else None


def convert(raw: Any, tp: type[T], path: str, issues: list[ConfigIssue]) -> T | None:
    """msgspec.convert with the error path rewritten relative to ``path``; None after an issue.

    A block is checked key by key first, so that every bad key of it is
    reported, not only the first one msgspec meets; checks across keys
    (``attempt`` longer than ``total``) run once each key is valid.
    """
    struct = _struct_in(tp)
    if struct is not None and raw is not None and not isinstance(raw, dict):
        issues.append(ConfigIssue(path, block_expected(struct, raw)))  # `timeout: 5s`
        return None
    if struct is not None and isinstance(raw, dict):
        fields = {field.encode_name: field for field in msgspec.structs.fields(struct)}
        found = len(issues)
        for key, value in raw.items():
            field = fields.get(key)
            if field is None:
                issues.append(ConfigIssue(join_path(path, path_key(key)), unknown_key(key, fields)))
            else:
                convert(value, field.type, join_path(path, str(key)), issues)
        if len(issues) > found:
            return None
    try:
        return msgspec.convert(raw, tp, dec_hook=decode_hook)
    except msgspec.ValidationError as exc:
        text = str(exc)
        message, _, where = text.rpartition(" - at `")
        if not message:  # the error is at the converted object itself
            message, where = text, "$"
        where = where.rstrip("`")
        sub = where[2:] if where.startswith("$.") else where.lstrip("$")
        unknown = _UNKNOWN.fullmatch(message)
        if unknown:
            sub, message = join_path(sub, unknown[1]), "unknown key"
        elif not sub and struct is not None:
            sub = field_named(message, struct) or ""  # a block's own check about one of its keys
        issues.append(ConfigIssue(join_path(path, sub), hint(message, tp)))
        return None
