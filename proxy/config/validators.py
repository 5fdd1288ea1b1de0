"""The config's value rules, each in one place: names, header names and number checks.

``types.py`` applies them inside blocks (as msgspec constraints or in ``__post_init__``,
so msgspec reports them at the block's path); ``checks.py`` applies the same rules to
what msgspec never sees as a field, such as the keys of ``upstreams:`` and of
``match.headers``.  A rule changed here changes for both.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

__all__ = ["HEADER_NAME_PATTERN", "NAME_PATTERN", "HeaderName", "Name", "at_least", "is_header_name", "is_name",
           "not_above", "positive"]

# --- names: upstreams, listeners, routes, shared limits (the `route` and `upstream` labels) ---

# Patterns end in \Z, never $: msgspec searches with them, and Python's $ also matches before a
# final newline ("api\n" would pass); the compiled ones are used with fullmatch.
_NAME_CHAR = "[A-Za-z0-9_.-]"
_NAME_MAX = 64
NAME_PATTERN = f"^{_NAME_CHAR}+\\Z"
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=_NAME_MAX, pattern=NAME_PATTERN)]
_NAME = re.compile(f"{_NAME_CHAR}{{1,{_NAME_MAX}}}")


def is_name(value: object) -> bool:
    """Whether ``value`` is a valid name: what a ``Name`` field accepts, for names that are mapping keys."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


# --- header names: an RFC 9110 token ---

_TCHAR = "[!#$%&'*+.^_`|~0-9A-Za-z-]"
HEADER_NAME_PATTERN = f"^{_TCHAR}+\\Z"
HeaderName = Annotated[str, msgspec.Meta(min_length=1, pattern=HEADER_NAME_PATTERN)]
_HEADER_NAME = re.compile(f"{_TCHAR}+")


def is_header_name(value: str) -> bool:
    """Whether ``value`` is a header name (a token), for header names that are mapping keys."""
    return _HEADER_NAME.fullmatch(value) is not None


# --- numbers, for ``__post_init__``: each raises the ValueError msgspec reports at the block ---


def positive(name: str, value: float) -> None:
    """``name`` must be greater than 0 (a zero duration would switch its feature off or spin)."""
    if value <= 0:
        raise ValueError(f"{name} must be greater than 0")


def at_least(name: str, value: int, floor: int, floor_text: str, why: str = "") -> None:
    """``name`` must be at least ``floor`` (written ``floor_text``, like ``64KiB``); ``why`` follows ': '."""
    if value < floor:
        raise ValueError(f"{name} ({value}) must be at least {floor_text}" + (f": {why}" if why else ""))


def not_above(name: str, value: float, limit_name: str, limit: float, *, seconds: bool = True,
              relation: str = "is larger than", why: str = "") -> None:
    """``name`` must not exceed ``limit_name``: ``base (2s) is larger than max (1s)``.

    ``seconds`` shows both as durations (``2s``) rather than counts; ``why`` follows ', '.
    """
    if value > limit:
        shown, shown_limit = (f"{value:g}s", f"{limit:g}s") if seconds else (f"{value}", f"{limit}")
        raise ValueError(f"{name} ({shown}) {relation} {limit_name} ({shown_limit})" + (f", {why}" if why else ""))
