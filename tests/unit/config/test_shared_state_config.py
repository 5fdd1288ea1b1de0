"""Config of the shared-state features: `redis:`, global rate limits and `idempotency:`, with their path errors."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from proxy.config import ConfigError, load_config


def doc(route: dict[str, Any] | None = None, **top: Any) -> str:
    data: dict[str, Any] = {
        "version": 1,
        "upstreams": {"svc": {"url": "http://127.0.0.1:9"}},
        "listeners": [{"name": "main", "address": "127.0.0.1:0",
                       "routes": [{"name": "r", "upstream": "svc", **(route or {})}]}],
        **top,
    }
    return yaml.safe_dump(data)


def issues(text: str, env: dict[str, str] | None = None) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load_config(text, env=env or {})
    return {issue.path: issue.message for issue in info.value.issues}


def test_global_limit_and_redis_idempotency_load_with_their_defaults() -> None:
    config = load_config(doc({"rate_limit": {"scope": "global", "name": "partner-api"},
                              "idempotency": {"store": "redis", "ttl": "1h", "max_response_bytes": "64KiB"}},
                             redis={"url": "${REDIS_URL}"}), env={"REDIS_URL": "rediss://cache:6380/2"})
    route = config.listeners[0].routes[0]
    assert config.redis is not None and config.redis.url == "rediss://cache:6380/2"
    assert config.redis.timeout == pytest.approx(0.02)
    assert route.rate_limit is not None and route.rate_limit.scope == "global"
    assert route.rate_limit.on_store_error == "local" and route.rate_limit.shadow is False
    assert route.idempotency is not None and float(route.idempotency.ttl) == 3600
    assert route.idempotency.max_response_bytes == 64 * 1024


def test_defaults_keep_limits_local_and_idempotency_off() -> None:
    route = load_config(doc({"rate_limit": {}}), env={}).listeners[0].routes[0]
    assert route.rate_limit is not None and route.rate_limit.scope == "local"
    assert route.idempotency is None


def test_global_scope_without_redis_url_is_an_error_at_the_routes_path() -> None:
    found = issues(doc({"rate_limit": {"scope": "global"}}))
    assert found == {"listeners[0].routes[0].rate_limit.scope": "scope: global needs a top-level redis.url"}


def test_global_scope_inherited_from_defaults_is_reported_on_each_route() -> None:
    found = issues(doc(defaults={"rate_limit": {"scope": "global"}}))
    assert "listeners[0].routes[0].rate_limit.scope" in found


def test_redis_idempotency_store_without_redis_url_is_an_error() -> None:
    found = issues(doc({"idempotency": {"store": "redis"}}))
    assert found == {"listeners[0].routes[0].idempotency.store": "store: redis needs a top-level redis.url"}


def test_unknown_on_store_error_is_an_error_with_its_path() -> None:
    found = issues(doc({"rate_limit": {"scope": "global", "on_store_error": "panic"}}, redis={"url": "redis://r"}))
    assert list(found) == ["listeners[0].routes[0].rate_limit.on_store_error"]
    assert "panic" in found["listeners[0].routes[0].rate_limit.on_store_error"] or \
        "local" in found["listeners[0].routes[0].rate_limit.on_store_error"]


@pytest.mark.parametrize(("url", "needle"), [
    ("http://cache:6379", "redis://"), ("redis://", "missing host"), ("redis://cache:99999", "port"),
    ("redis://cache/x", "database number"),
])
def test_bad_redis_url_is_an_error_at_redis_url(url: str, needle: str) -> None:
    found = issues(doc(redis={"url": url}))
    assert needle in found["redis.url"]


def test_redis_block_needs_a_url_and_rejects_unknown_keys() -> None:
    assert "`url`" in issues(doc(redis={"timeout": "20ms"}))["redis"]
    assert issues(doc(redis={"url": "redis://r", "pool": 3})) == {"redis.pool": "unknown key; valid keys: timeout, url"}


def test_queue_mode_is_refused_for_global_limits() -> None:
    found = issues(doc({"rate_limit": {"scope": "global", "mode": "queue"}}, redis={"url": "redis://r"}))
    assert "listeners[0].routes[0].rate_limit.mode" in found


def test_idempotency_ttl_must_be_positive() -> None:
    assert "listeners[0].routes[0].idempotency" in " ".join(issues(doc({"idempotency": {"ttl": "0s"}})))
