"""Header rules at the edge: hop-by-hop, forwarding headers, ids, trace context, override headers."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.edge.headers import (
    connection_listed,
    parse_overrides,
    request_id,
    response_headers,
    strip_sidecar_headers,
    upstream_headers,
    valid_traceparent,
)
from proxy.errors import BadRequest

VALID_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _h(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def _up(*pairs: tuple[str, str], client_ip: str | None = "10.0.0.7", host: str | None = "127.0.0.1:15001",
        rid: str = "rid-1") -> CIMultiDict[str]:
    return upstream_headers(_h(*pairs), client_ip=client_ip, host=host, rid=rid)


# --- hop-by-hop ---


def test_standard_hop_by_hop_headers_are_not_sent_upstream() -> None:
    out = _up(("Connection", "keep-alive"), ("Keep-Alive", "timeout=5"), ("TE", "trailers"), ("Trailer", "X-T"),
              ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"), ("Accept", "*/*"))
    for name in ("Connection", "Keep-Alive", "TE", "Trailer", "Transfer-Encoding", "Upgrade"):
        assert name not in out
    assert out["Accept"] == "*/*"


def test_headers_listed_in_connection_are_not_sent_upstream() -> None:
    out = _up(("Connection", "X-Secret, x-other"), ("Connection", "close"), ("X-Secret", "s"), ("X-Other", "o"),
              ("X-Kept", "k"))
    assert "X-Secret" not in out and "X-Other" not in out
    assert out["X-Kept"] == "k"


def test_any_proxy_prefixed_header_is_not_sent_upstream() -> None:
    out = _up(("Proxy-Authorization", "Basic eA=="), ("Proxy-Connection", "keep-alive"), ("Proxy-Foo", "1"),
              ("Authorization", "Bearer t"))
    assert [k for k in out if k.lower().startswith("proxy-")] == []
    assert out["Authorization"] == "Bearer t"


def test_response_hop_by_hop_and_connection_listed_headers_are_removed() -> None:
    upstream = CIMultiDict([("Connection", "X-Internal"), ("X-Internal", "1"), ("Keep-Alive", "timeout=5"),
                            ("Transfer-Encoding", "chunked"), ("Proxy-Authenticate", "Basic"),
                            ("Content-Type", "text/plain"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")])
    out = response_headers(upstream.items(), connection_listed(upstream))
    assert list(out.items()) == [("Content-Type", "text/plain"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]


def test_upstream_x_outrigger_headers_are_stripped_in_any_case() -> None:
    upstream = CIMultiDict([("X-Outrigger-Error", "circuit_open"), ("x-outrigger-fallback", "true"),
                            ("Content-Type", "text/plain"), ("x-outriggers", "not ours"),
                            ("x-outrigger-attempts", "7")])
    strip_sidecar_headers(upstream)
    assert list(upstream.items()) == [("Content-Type", "text/plain"), ("x-outriggers", "not ours")]


def test_repeated_end_to_end_headers_keep_every_value_in_order() -> None:
    out = _up(("Accept", "a"), ("X-Multi", "1"), ("X-Multi", "2"))
    assert out.getall("X-Multi") == ["1", "2"]


# --- forwarding ---


def test_x_forwarded_for_is_set_to_the_client_ip_when_absent() -> None:
    assert _up()["X-Forwarded-For"] == "10.0.0.7"


def test_x_forwarded_for_appends_the_client_ip_to_every_prior_hop() -> None:
    out = _up(("X-Forwarded-For", "1.1.1.1, 2.2.2.2"), ("X-Forwarded-For", "3.3.3.3"))
    assert out.getall("X-Forwarded-For") == ["1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.7"]


def test_x_forwarded_proto_and_host_describe_the_app_side() -> None:
    out = _up(("X-Forwarded-Host", "spoofed"))
    assert out["X-Forwarded-Proto"] == "http"
    assert out.getall("X-Forwarded-Host") == ["127.0.0.1:15001"]


def test_app_host_header_and_override_headers_never_travel_upstream() -> None:
    out = _up(("Host", "evil.example"), ("x-outrigger-timeout-ms", "100"), ("x-outrigger-max-attempts", "1"))
    assert "Host" not in out  # the upstream call sets the upstream's own host
    assert "x-outrigger-timeout-ms" not in out and "x-outrigger-max-attempts" not in out


# --- request id ---


def test_valid_request_id_is_kept_and_forwarded() -> None:
    headers = _h(("x-request-id", "abc-123_X.y:z/+="))
    assert request_id(headers) == "abc-123_X.y:z/+="
    assert _up(rid=request_id(headers)).getall("x-request-id") == ["abc-123_X.y:z/+="]


@pytest.mark.parametrize("bad", ["", "has space", "semi;colon", "x" * 129, "ok\n", "<script>", "é"])
def test_malformed_request_id_is_replaced_with_a_fresh_one(bad: str) -> None:
    rid = request_id(_h(("x-request-id", bad)))
    assert rid != bad
    assert len(rid) == 32 and int(rid, 16) >= 0


def test_missing_request_id_is_generated_uniquely() -> None:
    assert request_id(_h()) != request_id(_h())


def test_the_app_request_id_header_is_replaced_by_the_chosen_one() -> None:
    out = _up(("x-request-id", "bad id"), rid="fresh")
    assert out.getall("x-request-id") == ["fresh"]


# --- trace context ---


def test_valid_traceparent_is_forwarded() -> None:
    assert _up(("traceparent", VALID_TRACEPARENT))["traceparent"] == VALID_TRACEPARENT


@pytest.mark.parametrize("bad", [
    "garbage",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
    VALID_TRACEPARENT + "\n",
])
def test_malformed_traceparent_is_dropped_not_forwarded(bad: str) -> None:
    assert not valid_traceparent(bad)
    assert "traceparent" not in _up(("traceparent", bad))


# --- override headers ---


def test_no_override_headers_means_no_overrides() -> None:
    assert parse_overrides(_h()) == (None, None)


@pytest.mark.parametrize(("raw", "seconds"), [("250", 0.25), (" 1500 ", 1.5), ("0.5", 0.0005)])
def test_timeout_override_is_read_in_milliseconds(raw: str, seconds: float) -> None:
    timeout_s, _ = parse_overrides(_h(("x-outrigger-timeout-ms", raw)))
    assert timeout_s == pytest.approx(seconds)


@pytest.mark.parametrize("raw", ["-1", "0", "NaN", "nan", "inf", "1e3", "1_000", "²", "", "abc",
                                 "99999999999999999999", "86400001"])
def test_garbage_timeout_override_is_a_bad_request(raw: str) -> None:
    with pytest.raises(BadRequest):
        parse_overrides(_h(("x-outrigger-timeout-ms", raw)))


@pytest.mark.parametrize(("raw", "attempts"), [("1", 1), ("3", 3), (" 100 ", 100)])
def test_max_attempts_override_is_read_as_an_integer(raw: str, attempts: int) -> None:
    assert parse_overrides(_h(("x-outrigger-max-attempts", raw))) == (None, attempts)


@pytest.mark.parametrize("raw", ["0", "101", "-1", "2.5", "two", "²", "\u0661", ""])
def test_garbage_max_attempts_override_is_a_bad_request(raw: str) -> None:
    with pytest.raises(BadRequest):
        parse_overrides(_h(("x-outrigger-max-attempts", raw)))


def test_connection_listed_is_the_same_for_a_value_seen_before_and_combines_several_lines() -> None:
    # One Connection value is parsed once and kept; the kept answer must stay right for the
    # next head with that value, and several lines are never answered from one line's entry.
    one = CIMultiDict([("Connection", "Keep-Alive, X-Internal")])
    assert connection_listed(one) == connection_listed(one) == {"keep-alive", "x-internal"}
    two = CIMultiDict([("Connection", "Keep-Alive, X-Internal"), ("Connection", "close")])
    assert connection_listed(two) == {"keep-alive", "x-internal", "close"}
    assert connection_listed(CIMultiDict([("Connection", " , ")])) == frozenset()
    assert connection_listed(CIMultiDict()) == frozenset()
