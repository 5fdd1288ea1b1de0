"""Config checks across fields (proxy/config/checks.py), on typed blocks: each issue at the key to change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config import (
    AdminConfig,
    DeadLetterConfig,
    DiscoveryConfig,
    IdempotencyConfig,
    ListenerConfig,
    MatchConfig,
    RateLimitConfig,
    RouteConfig,
    RouteDeadLetterConfig,
    TlsConfig,
    UpstreamConfig,
)
from proxy.config.checks import (
    check_addresses,
    check_dead_letter,
    check_route,
    check_route_names,
    check_shared_state,
    check_upstream,
    dead_letter_dir_problem,
)
from proxy.config.issues import ConfigIssue


def _issues(check: Any, *args: Any) -> list[str]:
    issues: list[ConfigIssue] = []
    check(*args, issues)
    return [str(issue) for issue in issues]


def _listener(*routes: RouteConfig, name: str = "l", address: str = "127.0.0.1:15001") -> ListenerConfig:
    return ListenerConfig(name=name, address=address, routes=routes)


# --- upstreams ---


def test_a_plain_upstream_passes() -> None:
    assert _issues(check_upstream, UpstreamConfig(url="http://payments:8080"), "upstreams.p") == []


def test_endpoint_problems_are_each_reported_at_their_own_key() -> None:
    upstream = UpstreamConfig(url="http://p", endpoints=("127.0.0.1:1", "127.0.0.1:0", "nope", "127.0.0.1:1"),
                              discovery=DiscoveryConfig(nameservers=("127.0.0.1:53", "dns")),
                              max_connections=2, preconnect=3)
    assert _issues(check_upstream, upstream, "upstreams.p") == [
        "upstreams.p.discovery: endpoints and discovery exclude each other: a static list is never re-resolved",
        "upstreams.p.endpoints[1]: port 0 in '127.0.0.1:0': an endpoint needs the port it listens on",
        "upstreams.p.endpoints[2]: invalid address 'nope'; expected host:port",
        "upstreams.p.endpoints: lists the same address twice",
        "upstreams.p.discovery.nameservers[1]: invalid address 'dns'; expected host:port",
        "upstreams.p.preconnect: 3 is larger than max_connections (2)",
    ]


def test_an_empty_endpoint_list_says_to_list_one_or_leave_it_out() -> None:
    assert _issues(check_upstream, UpstreamConfig(url="http://p", endpoints=()), "upstreams.p") == [
        "upstreams.p.endpoints: empty list; list at least one host:port or leave endpoints out to use the url's host"]


def test_a_nameserver_may_use_port_0_unlike_an_endpoint() -> None:
    upstream = UpstreamConfig(url="http://p", discovery=DiscoveryConfig(nameservers=("127.0.0.1:0",)))
    assert _issues(check_upstream, upstream, "upstreams.p") == []


def test_a_missing_tls_file_is_reported_and_no_context_is_built(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("not a key")
    tls = TlsConfig(cert_file=str(tmp_path / "missing.pem"), key_file=str(key))
    upstream = UpstreamConfig(url="https://p", tls=tls)
    assert _issues(check_upstream, upstream, "upstreams.p") == [
        f"upstreams.p.tls.cert_file: file not found: {tmp_path / 'missing.pem'}"]


def test_a_url_problem_is_reported_at_the_url() -> None:
    assert _issues(check_upstream, UpstreamConfig(url="ftp://p"), "upstreams.p") == [
        "upstreams.p.url: unsupported scheme in 'ftp://p'; use http:// or https://"]


# --- routes ---


def test_a_route_naming_an_unknown_upstream_says_which() -> None:
    assert _issues(check_route, RouteConfig(name="r", upstream="paymnts"), {}, "listeners[0].routes[0]", False) == [
        "listeners[0].routes[0].upstream: unknown upstream 'paymnts'"]


@pytest.mark.parametrize(("written", "refused"), [
    ({"circuit_breaker": {"consecutive_failures": 2}}, True),
    ({"circuit_breaker": {"scope": "upstream"}}, True),
    ({"circuit_breaker": {"scope": "route", "consecutive_failures": 2}}, False),
    ({"circuit_breaker": {}}, False),  # an empty block sets nothing
    ({}, False),  # inherited keys (defaults, the upstream's) configure the upstream-scoped breaker
])
def test_a_routes_own_breaker_keys_need_scope_route(written: dict[str, Any], refused: bool) -> None:
    issues = _issues(check_route, RouteConfig(name="r", upstream="u"), written, "r", True)
    assert issues == (["r.circuit_breaker: per-route breaker settings need 'scope: route'; the upstream-scoped "
                       "breaker is configured under defaults or upstreams.<name>.circuit_breaker"] if refused else [])


@pytest.mark.parametrize(("prefix", "refused"), [("/v2/api", False), ("/a/../b", True), ("/a/./b", True),
                                                 ("/a..b/c.", False)])
def test_a_rewrite_prefix_with_dot_segments_is_refused(prefix: str, refused: bool) -> None:
    issues = _issues(check_route, RouteConfig(name="r", upstream="u", rewrite_prefix=prefix), {}, "r", True)
    assert issues == (["r.rewrite_prefix: must not contain '.' or '..' segments"] if refused else [])


def test_each_invalid_match_header_name_is_reported_at_its_key() -> None:
    route = RouteConfig(name="r", upstream="u", match=MatchConfig(headers={"x-ok": "1", "bad name": "2", "a:b": "3"}))
    assert _issues(check_route, route, {}, "r", True) == ["r.match.headers.bad name: invalid header name",
                                                          "r.match.headers.a:b: invalid header name"]


# --- listeners and addresses ---


def test_listener_names_are_unique_and_addresses_clash_with_the_first_user() -> None:
    listeners = [(0, _listener(RouteConfig(name="a", upstream="u"), address="0.0.0.0:15001")),
                 (2, _listener(RouteConfig(name="b", upstream="u"), address="127.0.0.1:15001")),
                 (3, _listener(RouteConfig(name="c", upstream="u"), name="m", address="localhost:9901"))]
    assert _issues(check_addresses, listeners, AdminConfig(address="127.0.0.1:9901")) == [
        "listeners[2].name: duplicate listener name 'l'",
        "listeners[2].address: address 127.0.0.1:15001 is already used by listeners[0].address",
        "listeners[3].address: address localhost:9901 is already used by admin.address",
    ]


def test_an_unparsable_address_is_reported_once_and_takes_no_port() -> None:
    listeners = [(0, _listener(address="15001")), (1, _listener(name="m", address="127.0.0.1:15001"))]
    assert _issues(check_addresses, listeners, None) == ["listeners[0].address: invalid address '15001'; "
                                                         "expected host:port"]


def test_route_names_are_unique_across_listeners_and_none_is_reserved() -> None:
    raw = [{"routes": [{"name": "a"}, {"name": "none"}, {"name": "a"}, {"name": 5}, "junk"]},
           {"routes": [{"name": "a"}]}, "junk"]
    assert _issues(check_route_names, raw) == [
        "listeners[0].routes[1].name: route name 'none' is reserved for requests no route matched",
        "listeners[0].routes[2].name: duplicate route name 'a'",
        "listeners[1].routes[0].name: duplicate route name 'a' (also listeners[0].routes[0]; route names label "
        "metrics, so they are unique across listeners)",
    ]


# --- what routes need from top-level sections ---


def test_global_limits_and_redis_idempotency_need_redis_and_global_cannot_queue() -> None:
    routes = (RouteConfig(name="a", upstream="u", rate_limit=RateLimitConfig(scope="global", mode="queue")),
              RouteConfig(name="b", upstream="u", idempotency=IdempotencyConfig(store="redis")),
              RouteConfig(name="c", upstream="u", rate_limit=RateLimitConfig(mode="queue"),
                          idempotency=IdempotencyConfig()))
    without = _issues(check_shared_state, [_listener(*routes)], False)
    assert without == [
        "listeners[0].routes[0].rate_limit.scope: scope: global needs a top-level redis.url",
        "listeners[0].routes[0].rate_limit.mode: mode: queue is not supported with scope: global; use reject",
        "listeners[0].routes[1].idempotency.store: store: redis needs a top-level redis.url",
    ]
    assert _issues(check_shared_state, [_listener(*routes)], True) == [without[1]]


def test_routes_that_spool_need_the_top_level_spool_unless_the_key_is_written(tmp_path: Path) -> None:
    listeners = [_listener(RouteConfig(name="a", upstream="u")),
                 _listener(RouteConfig(name="b", upstream="u"),
                           RouteConfig(name="c", upstream="u", dead_letter=RouteDeadLetterConfig()))]
    assert _issues(check_dead_letter, None, False, listeners) == [
        "listeners[1].routes[1].dead_letter: needs the top-level dead_letter.dir (the spool) to be configured"]
    assert _issues(check_dead_letter, None, True, listeners) == []
    assert _issues(check_dead_letter, DeadLetterConfig(dir=str(tmp_path)), True, listeners) == []


def test_the_spool_directory_must_exist_be_a_directory_and_take_a_file(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("")
    assert dead_letter_dir_problem(str(tmp_path)) is None
    assert list(tmp_path.iterdir()) == [file]  # the probe file is removed
    assert dead_letter_dir_problem(str(tmp_path / "nope")) == f"directory not found: {tmp_path / 'nope'}"
    assert dead_letter_dir_problem(str(file)) == f"not a directory: {file}"
    assert _issues(check_dead_letter, DeadLetterConfig(dir=str(file)), True, []) == [
        f"dead_letter.dir: not a directory: {file}"]
