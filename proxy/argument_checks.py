"""Argument checks shared by the policies' state machines.

Config values are checked, with their config path, in ``proxy.config``; these
guard the constructors themselves (a test or a library caller passing nonsense)
and say which argument was wrong, in one wording.
"""

from __future__ import annotations

import math

__all__ = ["at_least_one", "finite_non_negative", "finite_positive"]


def finite_positive(name: str, value: float) -> float:
    """``value`` as a float, when it is a finite number greater than 0."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number greater than 0, got {value!r}")
    return float(value)


def finite_non_negative(name: str, value: float) -> float:
    """``value`` as a float, when it is a finite number >= 0."""
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def at_least_one(name: str, value: int) -> int:
    """``value``, when it is an integer >= 1 (a bool is no integer here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value
