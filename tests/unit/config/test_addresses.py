"""Config addresses and URLs (proxy/config/addresses.py): host:port parsing, port clashes, url checks."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config.addresses import parse_address, redis_url_problem, same_socket, upstream_url_problem
from proxy.config.issues import ConfigError
from tests.support.sidecar import base_config, to_config


@pytest.mark.parametrize(("address", "parsed"), [
    ("127.0.0.1:8080", ("127.0.0.1", 8080)),
    ("localhost:0", ("localhost", 0)),
    ("[::1]:15001", ("::1", 15001)),
    ("[::]:80", ("::", 80)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ("svc.default.svc.cluster.local:53", ("svc.default.svc.cluster.local", 53)),
    ("::1:80", ("::1", 80)),  # the last colon splits: an unbracketed v6 host is taken as written
])
def test_parse_address_splits_host_and_port_and_unbrackets_ipv6(address: str, parsed: tuple[str, int]) -> None:
    assert parse_address(address) == parsed


@pytest.mark.parametrize(("address", "message"), [
    ("15001", "invalid address '15001'; expected host:port"),
    (":80", "invalid address ':80'; expected host:port"),
    ("host:", "invalid address 'host:'; expected host:port"),
    ("host:-1", "invalid address 'host:-1'; expected host:port"),
    ("host:http", "invalid address 'host:http'; expected host:port"),
    ("host:65536", "invalid port 65536 in 'host:65536'"),
])
def test_parse_address_refuses_a_malformed_address_saying_why(address: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_address(address)
    assert str(info.value) == message


def test_parse_address_refuses_a_bracketed_host_that_is_not_ipv6() -> None:
    with pytest.raises(ValueError):
        parse_address("[not-v6]:80")


@pytest.mark.parametrize(("a", "b", "clash"), [
    ("127.0.0.1:80", "127.0.0.1:80", True),
    ("0.0.0.0:80", "127.0.0.2:80", True),
    ("*:80", "[::1]:80", True),
    ("localhost:80", "[::1]:80", True),
    ("127.0.0.1:80", "127.0.0.1:81", False),
    ("127.0.0.1:80", "10.0.0.1:80", False),
    ("localhost:80", "127.0.0.2:80", False),  # localhost binds 127.0.0.1 (and ::1), not the whole /8
    ("0.0.0.0:0", "0.0.0.0:0", False),  # port 0: the kernel picks a free port for each
])
def test_same_socket_is_symmetric_and_knows_wildcards_loopback_and_port_0(a: str, b: str, clash: bool) -> None:
    assert same_socket(a, b) is clash
    assert same_socket(b, a) is clash


def test_same_socket_raises_for_an_address_that_does_not_parse() -> None:
    with pytest.raises(ValueError):
        same_socket("127.0.0.1:80", "nope")


@pytest.mark.parametrize("url", ["http://payments:8080", "https://example.com/v1/prefix", "http://[::1]:80/"])
def test_an_upstream_url_with_scheme_host_and_an_optional_path_prefix_is_fine(url: str) -> None:
    assert upstream_url_problem(url) is None


@pytest.mark.parametrize(("url", "message"), [
    ("ftp://h", "unsupported scheme in 'ftp://h'; use http:// or https://"),
    ("payments:8080", "unsupported scheme in 'payments:8080'; use http:// or https://"),
    ("http:///path", "missing host in 'http:///path'"),
    ("http://u:p@h", "credentials in the upstream url are not supported (they would not be sent); "
                     "let the app send its Authorization header"),
    ("http://h/p?q=1", "the upstream url may carry a path prefix but no query or fragment: 'http://h/p?q=1'"),
    ("http://h#top", "the upstream url may carry a path prefix but no query or fragment: 'http://h#top'"),
    ("http://h:99999", "invalid port in 'http://h:99999'"),
    ("http://h/a b", "the upstream url must not contain whitespace or control characters: 'http://h/a b'"),
    ("http://h/\x7f", "the upstream url must not contain whitespace or control characters: 'http://h/\\x7f'"),
])
def test_an_upstream_url_problem_says_what_is_wrong(url: str, message: str) -> None:
    assert upstream_url_problem(url) == message


def test_an_upstream_url_reports_its_first_problem_in_a_fixed_order() -> None:
    """Whitespace before scheme, credentials before query, query before port: one message, always the same."""
    assert (upstream_url_problem("ftp://h/a b") or "").startswith("the upstream url must not contain whitespace")
    assert (upstream_url_problem("http://u@h:x/?q") or "").startswith("credentials")
    assert upstream_url_problem("http://h:x/?q") == "the upstream url may carry a path prefix but no query or " \
                                                    "fragment: 'http://h:x/?q'"


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379", "rediss://redis:6380/0", "redis://h/15", "redis://h/"])
def test_a_redis_url_with_scheme_host_and_a_database_number_is_fine(url: str) -> None:
    assert redis_url_problem(url) is None


@pytest.mark.parametrize(("url", "message"), [
    ("http://h", "unsupported scheme in 'http://h'; use redis:// or rediss:// (TLS)"),
    ("redis://", "missing host in 'redis://'"),
    ("redis://h:x", "invalid port in 'redis://h:x'"),
    ("redis://h/cache", "the path of 'redis://h/cache' must be a database number, like /0"),
    ("redis://h:x/cache", "invalid port in 'redis://h:x/cache'"),  # the port is checked before the path
])
def test_a_redis_url_problem_says_what_is_wrong(url: str, message: str) -> None:
    assert redis_url_problem(url) == message


@pytest.mark.parametrize("check", [upstream_url_problem, redis_url_problem])
def test_a_url_that_does_not_even_split_is_a_problem_not_a_crash(check: Any) -> None:
    problem = check("http://[::1")
    assert problem is not None and "is not a valid URL" in problem


def test_a_config_with_an_unsplittable_upstream_url_names_its_path() -> None:
    data = base_config("http://[::1")
    with pytest.raises(ConfigError) as caught:
        to_config(data)
    assert "upstreams.svc.url" in str(caught.value) and "is not a valid URL" in str(caught.value)
