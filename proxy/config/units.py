"""Duration and size scalars used by config fields.

Durations are written as ``250ms``, ``2s``, ``1m30s`` or a bare number of
seconds; sizes as an integer of bytes or ``64KiB`` / ``10MB``.  Both parse to
plain numbers (seconds as ``float``, bytes as ``int``) so runtime code never
has to guess the unit.  ``decode_hook`` plugs them into msgspec so that a bad
value is reported with its config path.
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["Duration", "Size", "decode_hook", "parse_duration", "parse_size"]


class Duration(float):
    """Seconds, parsed from ``250ms`` / ``2s`` / ``1m`` / a number."""

    __slots__ = ()


class Size(int):
    """Bytes, parsed from an integer or ``64KiB`` / ``1MB``."""

    __slots__ = ()


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|s|m|h|d)")
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?")
_SIZE_UNITS = {
    None: 1, "B": 1, "KB": 1000, "KiB": 1024, "MB": 1000**2,
    "MiB": 1024**2, "GB": 1000**3, "GiB": 1024**3,
}


def parse_duration(value: object) -> Duration:
    if isinstance(value, bool):
        raise TypeError("expected a duration like '250ms' or '2s', got a boolean")
    if isinstance(value, (int, float)) or (isinstance(value, str) and re.fullmatch(r"\d+(?:\.\d+)?", value.strip())):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        pos, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match[1]) * _DURATION_UNITS[match[2]]
            pos = match.end()
        if pos != len(text) or not text:
            raise ValueError(f"invalid duration {value!r}; use a number of seconds or e.g. '250ms', '2s', '1m'")
    else:
        raise TypeError(f"expected a duration like '250ms' or '2s', got {type(value).__name__}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must be a finite, non-negative number of seconds")
    return Duration(seconds)


def parse_size(value: object) -> Size:
    if isinstance(value, bool):
        raise TypeError("expected a size like 65536 or '64KiB', got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid size {value}: must not be negative")
        return Size(value)
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match:
            return Size(int(match[1]) * _SIZE_UNITS[match[2]])
        raise ValueError(f"invalid size {value!r}; use bytes or e.g. '64KiB', '10MB'")
    raise TypeError(f"expected a size like 65536 or '64KiB', got {type(value).__name__}")


def decode_hook(tp: type, value: Any) -> Any:
    """msgspec ``dec_hook``: errors raised here carry the field's path."""
    if tp is Duration:
        return parse_duration(value)
    if tp is Size:
        return parse_size(value)
    raise NotImplementedError(f"no decoder for {tp!r}")
