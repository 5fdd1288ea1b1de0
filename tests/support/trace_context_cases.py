"""The W3C Trace Context test suite's cases (github w3c/trace-context, ``test/test.py``), as data.

Each case is the headers an app sends and what must reach the upstream:
either the app's trace continued (its trace id and sampled flag, a new parent
id, and exactly the given ``tracestate``), or a restart (a new trace id, no
``tracestate``).  Shared by the unit tests of ``proxy.telemetry.propagation``
and the tests that send them through a real sidecar.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

T = "12345678901234567890123456789012"
P = "1234567890123456"
SAMPLED_TP = f"00-{T}-{P}-01"
UNSAMPLED_TP = f"00-{T}-{P}-00"
KEY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_-*/"
VALUE_CHARS = "".join(map(chr, range(0x20, 0x2C))) + "".join(map(chr, range(0x2D, 0x3D))) \
    + "".join(map(chr, range(0x3E, 0x7F)))
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


@dataclass(frozen=True)
class Case:
    name: str
    headers: tuple[tuple[str, str], ...]
    continued: bool  # the app's trace T goes on; else a restart
    sampled: bool | None = None  # for a continued trace: the parent's flag
    tracestate: str | None = None  # what must be forwarded (None: no tracestate header)
    random_flag: bool = False


def cont(name: str, *headers: tuple[str, str], sampled: bool = False, tracestate: str | None = None,
         random_flag: bool = False) -> Case:
    return Case(name, headers, True, sampled, tracestate, random_flag)


def restart(name: str, *headers: tuple[str, str]) -> Case:
    return Case(name, headers, False)


def _tp(value: str) -> tuple[str, str]:
    return ("traceparent", value)


def _ts(value: str) -> tuple[str, str]:
    return ("tracestate", value)


BARS = [",".join(f"bar{i:02d}={i:02d}" for i in range(a, b)) for a, b in ((1, 11), (11, 21), (21, 31))]
CASES: tuple[Case, ...] = (
    restart("both_missing"),
    cont("traceparent_only", _tp(SAMPLED_TP), sampled=True),
    restart("traceparent_duplicated", _tp(f"00-{T[:-1]}1-{P}-01"), _tp(SAMPLED_TP)),
    restart("traceparent_duplicated_unsampled", _tp(UNSAMPLED_TP), _tp(UNSAMPLED_TP)),
    restart("traceparent_name_dash", ("trace-parent", SAMPLED_TP)),
    restart("traceparent_name_dot", ("trace.parent", SAMPLED_TP)),
    cont("traceparent_casing_1", ("TraceParent", SAMPLED_TP), sampled=True),
    cont("traceparent_casing_2", ("TrAcEpArEnT", SAMPLED_TP), sampled=True),
    cont("traceparent_casing_3", ("TRACEPARENT", SAMPLED_TP), sampled=True),
    restart("version_00_trailing_dot", _tp(SAMPLED_TP + ".")),
    restart("version_00_future_fields", _tp(SAMPLED_TP + "-what-the-future-will-be-like")),
    cont("version_cc", _tp(f"cc-{T}-{P}-01"), sampled=True),
    cont("version_cc_future_fields", _tp(f"cc-{T}-{P}-01-what-the-future-will-be-like"), sampled=True),
    cont("version_cc_unsampled_future_fields", _tp(f"cc-{T}-{P}-00-extra"), sampled=False),
    restart("version_cc_bad_separator", _tp(f"cc-{T}-{P}-01.what-the-future-will-be-like")),
    restart("version_ff", _tp(f"ff-{T}-{P}-01")),
    restart("version_illegal_1", _tp(f".0-{T}-{P}-01")),
    restart("version_illegal_2", _tp(f"0.-{T}-{P}-01")),
    restart("version_too_long_1", _tp(f"000-{T}-{P}-01")),
    restart("version_too_long_2", _tp(f"0000-{T}-{P}-01")),
    restart("version_too_short", _tp(f"0-{T}-{P}-01")),
    restart("trace_id_zero", _tp(f"00-{'0' * 32}-{P}-01")),
    restart("trace_id_illegal_1", _tp(f"00-.{T[1:]}-{P}-01")),
    restart("trace_id_illegal_2", _tp(f"00-{T[:-1]}.-{P}-01")),
    restart("trace_id_too_long", _tp(f"00-{T}3-{P}-01")),
    restart("trace_id_too_short", _tp(f"00-{T[:-1]}-{P}-01")),
    restart("parent_id_zero", _tp(f"00-{T}-{'0' * 16}-01")),
    restart("parent_id_illegal_1", _tp(f"00-{T}-.{P[1:]}-01")),
    restart("parent_id_illegal_2", _tp(f"00-{T}-{P[:-1]}.-01")),
    restart("parent_id_too_long", _tp(f"00-{T}-{P}7-01")),
    restart("parent_id_too_short", _tp(f"00-{T}-{P[:-1]}-01")),
    restart("flags_illegal_1", _tp(f"00-{T}-{P}-.0")),
    restart("flags_illegal_2", _tp(f"00-{T}-{P}-0.")),
    restart("flags_too_long", _tp(f"00-{T}-{P}-001")),
    restart("flags_too_short", _tp(f"00-{T}-{P}-1")),
    cont("ows_leading_space", _tp(" " + SAMPLED_TP), sampled=True),
    cont("ows_leading_tab", _tp("\t" + SAMPLED_TP), sampled=True),
    cont("ows_trailing_space", _tp(SAMPLED_TP + " "), sampled=True),
    cont("ows_trailing_tab", _tp(SAMPLED_TP + "\t"), sampled=True),
    cont("ows_both", _tp("\t " + SAMPLED_TP + " \t"), sampled=True),
    restart("tracestate_without_traceparent", _ts("foo=1")),
    restart("tracestate_without_traceparent_2", _ts("foo=1,bar=2")),
    restart("tracestate_with_malformed_traceparent", _tp("00-zz"), _ts("foo=1")),
    cont("tracestate_included", _tp(UNSAMPLED_TP), _ts("foo=1,bar=2"), tracestate="foo=1,bar=2"),
    cont("tracestate_name_dash", _tp(UNSAMPLED_TP), ("trace-state", "foo=1")),
    cont("tracestate_name_dot", _tp(UNSAMPLED_TP), ("trace.state", "foo=1")),
    cont("tracestate_casing", _tp(UNSAMPLED_TP), ("TrAcEsTaTe", "foo=1"), tracestate="foo=1"),
    cont("tracestate_empty", _tp(UNSAMPLED_TP), _ts("")),
    cont("tracestate_empty_whitespace", _tp(UNSAMPLED_TP), _ts(" ,\t, ")),
    cont("tracestate_empty_second", _tp(UNSAMPLED_TP), _ts("foo=1"), _ts(""), tracestate="foo=1"),
    cont("tracestate_empty_first", _tp(UNSAMPLED_TP), _ts(""), _ts("foo=1"), tracestate="foo=1"),
    cont("tracestate_multiple_headers", _tp(UNSAMPLED_TP), _ts("foo=1,bar=2"), _ts("rojo=1,congo=2"),
         _ts("baz=3"), tracestate="foo=1,bar=2,rojo=1,congo=2,baz=3"),
    cont("tracestate_duplicated_keys_same", _tp(UNSAMPLED_TP), _ts("foo=1,foo=1"), tracestate="foo=1"),
    cont("tracestate_duplicated_keys_diff", _tp(UNSAMPLED_TP), _ts("foo=1,foo=2"), tracestate="foo=1"),
    cont("tracestate_duplicated_headers", _tp(UNSAMPLED_TP), _ts("foo=1"), _ts("foo=2"), tracestate="foo=1"),
    cont("tracestate_all_chars", _tp(UNSAMPLED_TP), _ts(KEY_CHARS + "=" + VALUE_CHARS),
         tracestate=KEY_CHARS + "=" + VALUE_CHARS),
    cont("tracestate_all_chars_vendor", _tp(UNSAMPLED_TP), _ts(KEY_CHARS + "@a-z0-9_-*/=" + VALUE_CHARS),
         tracestate=KEY_CHARS + "@a-z0-9_-*/=" + VALUE_CHARS),
    cont("tracestate_ows_1", _tp(UNSAMPLED_TP), _ts("foo=1 \t , \t bar=2, \t baz=3"), tracestate="foo=1,bar=2,baz=3"),
    cont("tracestate_ows_2", _tp(UNSAMPLED_TP), _ts("foo=1\t \t,\t \tbar=2,\t \tbaz=3"),
         tracestate="foo=1,bar=2,baz=3"),
    cont("tracestate_ows_3", _tp(UNSAMPLED_TP), _ts("\t foo=1 \t"), tracestate="foo=1"),
    cont("tracestate_value_leading_space_kept", _tp(UNSAMPLED_TP), _ts("foo= 1"), tracestate="foo= 1"),
    cont("tracestate_key_space", _tp(UNSAMPLED_TP), _ts("foo =1")),
    cont("tracestate_key_upper", _tp(UNSAMPLED_TP), _ts("FOO=1")),
    cont("tracestate_key_dot", _tp(UNSAMPLED_TP), _ts("foo.bar=1")),
    cont("tracestate_key_at_end", _tp(UNSAMPLED_TP), _ts("foo@=1,bar=2"), tracestate="foo@=1,bar=2"),
    cont("tracestate_key_digit_first", _tp(UNSAMPLED_TP), _ts("1foo=1"), tracestate="1foo=1"),
    cont("tracestate_key_at_first", _tp(UNSAMPLED_TP), _ts("@foo=1,bar=2")),
    cont("tracestate_key_double_at", _tp(UNSAMPLED_TP), _ts("foo@@bar=1,bar=2"), tracestate="foo@@bar=1,bar=2"),
    cont("tracestate_key_two_ats", _tp(UNSAMPLED_TP), _ts("foo@bar@baz=1,bar=2"), tracestate="foo@bar@baz=1,bar=2"),
    cont("tracestate_32_members", _tp(UNSAMPLED_TP), *(_ts(b) for b in BARS), _ts("bar31=31,bar32=32"),
         tracestate=",".join([*BARS, "bar31=31,bar32=32"])),
    cont("tracestate_33_members", _tp(UNSAMPLED_TP), *(_ts(b) for b in BARS), _ts("bar31=31,bar32=32,bar33=33")),
    cont("tracestate_key_256", _tp(UNSAMPLED_TP), _ts("foo=1"), _ts("z" * 256 + "=1"),
         tracestate="foo=1," + "z" * 256 + "=1"),
    cont("tracestate_key_257", _tp(UNSAMPLED_TP), _ts("foo=1"), _ts("z" * 257 + "=1")),
    cont("tracestate_key_vendor_long", _tp(UNSAMPLED_TP), _ts("foo=1"), _ts("t" * 241 + "@" + "v" * 14 + "=1"),
         tracestate="foo=1," + "t" * 241 + "@" + "v" * 14 + "=1"),
    cont("tracestate_key_vendor_short", _tp(UNSAMPLED_TP), _ts("t@" + "v" * 15 + "=1"),
         tracestate="t@" + "v" * 15 + "=1"),
    cont("tracestate_value_equals", _tp(UNSAMPLED_TP), _ts("foo=bar=baz")),
    cont("tracestate_value_empty", _tp(UNSAMPLED_TP), _ts("foo=,bar=3")),
    cont("random_flag", _tp(f"00-{T}-{P}-02"), sampled=False, random_flag=True),
    cont("random_and_sampled_flags", _tp(f"00-{T}-{P}-03"), sampled=True, random_flag=True),
)


def check(case: Case, traceparents: list[str], tracestates: list[str],
          root_sampled: bool | None) -> tuple[str, str, str]:
    """Assert what reached the upstream for ``case``; return (trace id, parent id, flags).

    ``root_sampled`` is the sampling decision expected for a restarted trace
    (None: either is fine, as at ratio 0.01).
    """
    assert len(traceparents) == 1, f"{case.name}: expected one traceparent, got {traceparents!r}"
    match = _TRACEPARENT.fullmatch(traceparents[0])
    assert match, f"{case.name}: invalid traceparent {traceparents[0]!r}"
    trace_id, parent_id, flags_hex = match.groups()
    flags = int(flags_hex, 16)
    assert trace_id != "0" * 32 and parent_id != "0" * 16, case.name
    assert flags & ~0x03 == 0, f"{case.name}: unknown flags sent: {flags_hex}"
    assert parent_id != P, f"{case.name}: the app's parent id was forwarded as Outrigger's"
    if case.continued:
        assert trace_id == T, f"{case.name}: the app's trace was not continued"
        assert bool(flags & 0x01) == case.sampled, f"{case.name}: sampled flag {flags_hex}"
        if case.random_flag:
            assert flags & 0x02, f"{case.name}: random flag dropped"
        expected = [case.tracestate] if case.tracestate is not None else []
        assert tracestates == expected, f"{case.name}: tracestate {tracestates!r}, expected {expected!r}"
    else:
        assert trace_id not in (T, T[:-1] + "1"), f"{case.name}: the trace was not restarted"
        assert tracestates == [], f"{case.name}: tracestate forwarded on a restart: {tracestates!r}"
        if root_sampled is not None:
            assert bool(flags & 0x01) == root_sampled, f"{case.name}: root sampled flag {flags_hex}"
    return trace_id, parent_id, flags_hex
