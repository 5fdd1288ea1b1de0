"""Config inheritance (proxy/config/inherit.py): defaults < upstream < route, merged key by key."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from proxy.config import load_config
from proxy.config.inherit import ROUTE_BLOCKS, merge, route_blocks, upstream_blocks


def test_merge_merges_mappings_key_by_key_at_every_depth() -> None:
    base = {"backoff": {"base": "25ms", "max": "1s"}, "max_attempts": 3}
    override = {"backoff": {"max": "2s"}, "budget": {"ratio": 0.1}}
    assert merge(base, override) == {"backoff": {"base": "25ms", "max": "2s"}, "max_attempts": 3,
                                     "budget": {"ratio": 0.1}}


@pytest.mark.parametrize(("base", "override"), [
    ({"retry_on": ["reset", "timeout"]}, {"retry_on": ["5xx"]}),  # a list is replaced, never appended to
    ({"backoff": {"base": "1s"}}, {"backoff": None}),  # null replaces a block
    ({"backoff": {"base": "1s"}}, {"backoff": "5s"}),  # a scalar replaces a block (conversion reports it)
])
def test_merge_replaces_anything_but_a_mapping_merged_into_a_mapping(base: dict[str, Any],
                                                                     override: dict[str, Any]) -> None:
    key = next(iter(override))
    assert merge(base, override)[key] == override[key]


def test_merge_leaves_its_inputs_unchanged() -> None:
    base = {"backoff": {"base": "1s"}}
    override = {"backoff": {"max": "2s"}}
    merge(base, override)
    assert base == {"backoff": {"base": "1s"}} and override == {"backoff": {"max": "2s"}}


def test_an_upstream_block_is_the_defaults_overridden_key_by_key() -> None:
    defaults = {"circuit_breaker": {"consecutive_failures": 5, "half_open_requests": 2},
                "concurrency": {"max_active": 100}, "timeout": {"total": "9s"}}
    blocks = upstream_blocks(defaults, {"url": "http://x", "circuit_breaker": {"consecutive_failures": 3}})
    assert blocks == {"circuit_breaker": {"consecutive_failures": 3, "half_open_requests": 2},
                      "concurrency": {"max_active": 100}}  # timeout is a route block: not the upstream's


def test_an_upstream_block_written_null_or_left_out_is_the_defaults() -> None:
    defaults = {"concurrency": {"max_active": 7}}
    assert upstream_blocks(defaults, {"concurrency": None})["concurrency"] == {"max_active": 7}
    assert upstream_blocks({}, {}) == {"circuit_breaker": {}, "concurrency": {}}


def test_a_route_block_is_defaults_then_upstream_breaker_then_the_routes_own_keys() -> None:
    defaults = {"circuit_breaker": {"consecutive_failures": 5, "half_open_requests": 2, "scope": "upstream"}}
    upstream = {"url": "http://x", "circuit_breaker": {"consecutive_failures": 3, "half_open_requests": 4}}
    route = {"name": "r", "upstream": "svc", "circuit_breaker": {"scope": "route", "half_open_requests": 1}}
    assert route_blocks(route, defaults, upstream)["circuit_breaker"] == {
        "consecutive_failures": 3, "half_open_requests": 1, "scope": "route"}


def test_only_the_breaker_is_inherited_from_the_upstream() -> None:
    upstream = {"url": "http://x", "concurrency": {"max_active": 1}, "timeout": {"total": "1s"}}
    merged = route_blocks({"name": "r", "upstream": "svc"}, {}, upstream)
    assert merged == {"name": "r", "upstream": "svc"}


def test_a_route_null_switches_an_inherited_block_off_and_other_keys_pass_through() -> None:
    defaults = {"rate_limit": {"requests_per_second": 5}, "fallback": {"status": 503}, "timeout": {"total": "9s"}}
    route = {"name": "r", "upstream": "svc", "rate_limit": None, "match": {"path_prefix": "/a"}}
    merged = route_blocks(route, defaults, None)
    assert merged == {"name": "r", "upstream": "svc", "rate_limit": None, "match": {"path_prefix": "/a"},
                      "fallback": {"status": 503}, "timeout": {"total": "9s"}}
    assert route == {"name": "r", "upstream": "svc", "rate_limit": None, "match": {"path_prefix": "/a"}}


def test_a_block_neither_inherited_nor_written_is_left_out_for_its_default() -> None:
    assert route_blocks({"name": "r"}, {}, None) == {"name": "r"}
    assert set(ROUTE_BLOCKS) == {"timeout", "retry", "circuit_breaker", "rate_limit", "fallback"}


def _route_breaker_failures(upstream: dict[str, Any]) -> int:
    doc = {"version": 1, "defaults": {"circuit_breaker": {"consecutive_failures": 10}},
           "upstreams": {"svc": upstream},
           "listeners": [{"name": "l", "address": "127.0.0.1:0", "routes": [
               {"name": "r", "upstream": "svc", "circuit_breaker": {"scope": "route"}}]}]}
    return load_config(yaml.safe_dump(doc), env={}).listeners[0].routes[0].circuit_breaker.consecutive_failures


def test_a_route_breaker_inherits_the_defaults_through_an_upstream_breaker_block() -> None:
    assert _route_breaker_failures({"url": "http://x", "circuit_breaker": {}}) == 10
    assert _route_breaker_failures({"url": "http://x", "circuit_breaker": {"consecutive_failures": 3}}) == 3


def test_a_route_breaker_inherits_the_defaults_when_its_upstream_has_no_breaker_block() -> None:
    assert _route_breaker_failures({"url": "http://x"}) == 10
