"""Config value rules (proxy/config/validators.py): one rule for a name wherever it is written."""

from __future__ import annotations

import msgspec
import pytest

from proxy.config.validators import HeaderName, Name, at_least, is_header_name, is_name, not_above, positive

# A trailing newline is the case a `$` in the pattern let through ("api\n" matched ^...$).
NAMES = ["api", "a.b-c_d", "A9", "a" * 64, "", "a" * 65, "a b", "a/b", "é", "x:y", "route\t", "api\n",
         "a" * 64 + "\n", "\napi"]
HEADERS = ["x-tenant", "X_Key", "!#$%&'*+.^_`|~", "", "a b", "a:b", "é", "(x)", "x\r", "x-tenant\n"]


def _accepts(tp: object, value: str) -> bool:
    try:
        msgspec.convert(value, tp)
    except msgspec.ValidationError:
        return False
    return True


@pytest.mark.parametrize("value", NAMES)
def test_a_name_key_follows_the_same_rule_as_a_name_field(value: str) -> None:
    """The keys of ``upstreams:`` are checked by hand; route and listener names by msgspec."""
    assert is_name(value) is _accepts(Name, value)


def test_a_name_is_1_to_64_letters_digits_and_underscore_dot_dash() -> None:
    assert [v for v in NAMES if is_name(v)] == ["api", "a.b-c_d", "A9", "a" * 64]
    assert not is_name(5) and not is_name(None)


@pytest.mark.parametrize("value", HEADERS)
def test_a_header_name_key_follows_the_same_rule_as_a_header_name_field(value: str) -> None:
    """``match.headers`` keys are checked by hand; ``rate_limit.key.header`` by msgspec."""
    assert is_header_name(value) is _accepts(HeaderName, value)


def test_a_header_name_is_a_token() -> None:
    assert [v for v in HEADERS if is_header_name(v)] == ["x-tenant", "X_Key", "!#$%&'*+.^_`|~"]


def test_positive_refuses_zero_and_below_naming_the_key() -> None:
    positive("window", 0.001)
    for value in (0.0, -1.0):
        with pytest.raises(ValueError, match=r"^window must be greater than 0$"):
            positive("window", value)


def test_at_least_names_the_key_its_value_the_floor_and_why() -> None:
    at_least("max_bytes", 65536, 65536, "64KiB")
    with pytest.raises(ValueError) as plain:
        at_least("max_bytes", 65535, 65536, "64KiB")
    assert str(plain.value) == "max_bytes (65535) must be at least 64KiB"
    with pytest.raises(ValueError) as why:
        at_least("max_header_bytes", 512, 1024, "1KiB", why="every request would be refused with 431")
    assert str(why.value) == "max_header_bytes (512) must be at least 1KiB: every request would be refused with 431"


def test_not_above_allows_equal_and_shows_durations_or_counts() -> None:
    not_above("attempt", 5.0, "total", 5.0)
    with pytest.raises(ValueError) as durations:
        not_above("attempt", 6.0, "total", 5.0, relation="is longer than")
    assert str(durations.value) == "attempt (6s) is longer than total (5s)"
    with pytest.raises(ValueError) as counts:
        not_above("adaptive.initial", 2_000_000, "max_active", 100, seconds=False, relation="is above",
                  why="the ceiling of the adaptive limit")
    assert str(counts.value) == ("adaptive.initial (2000000) is above max_active (100), "
                                 "the ceiling of the adaptive limit")
    with pytest.raises(ValueError) as default:
        not_above("base", 0.5, "max", 0.25)
    assert str(default.value) == "base (0.5s) is larger than max (0.25s)"
