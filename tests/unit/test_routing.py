"""Routing: first match in written order on prefix, methods and headers; rewrite_prefix."""

from __future__ import annotations

import random
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.app import build_runtime
from proxy.clock import SystemClock
from proxy.edge.routing import Router
from proxy.telemetry.metrics import Metrics
from tests.support.sidecar import base_config, to_config


def _router(*routes: dict[str, Any]) -> Router:
    data = base_config("http://upstream:8080")
    data["listeners"][0]["routes"] = list(routes)
    runtime = build_runtime(to_config(data), metrics=Metrics(process_collectors=False), tracing=None,
                            clock=SystemClock(), rng=random.Random(1))
    return runtime.routers["main"]


def _match(router: Router, method: str, path: str, **headers: str) -> str | None:
    route = router.match(method, path, CIMultiDictProxy(CIMultiDict(headers)))
    return route.name if route is not None else None


def _r(name: str, prefix: str = "/", **extra: Any) -> dict[str, Any]:
    match = {"path_prefix": prefix, **extra.pop("match", {})}
    return {"name": name, "upstream": "svc", "match": match, **extra}


def test_routes_match_in_written_order_first_match_wins() -> None:
    router = _router(_r("catch_all", "/"), _r("specific", "/v1/charges"))
    assert _match(router, "GET", "/v1/charges") == "catch_all"
    router = _router(_r("specific", "/v1/charges"), _r("catch_all", "/"))
    assert _match(router, "GET", "/v1/charges/ch_1") == "specific"
    assert _match(router, "GET", "/v2") == "catch_all"


def test_path_prefix_that_does_not_match_falls_through_to_no_route() -> None:
    router = _router(_r("charges", "/v1/charges"))
    assert _match(router, "GET", "/v1/refunds") is None
    assert _match(router, "GET", "/v1/charge") is None


def test_path_prefix_is_a_plain_string_prefix_like_envoy() -> None:
    router = _router(_r("charges", "/v1/charges"))
    assert _match(router, "GET", "/v1/charges-archive") == "charges"


def test_methods_restrict_the_route_and_others_fall_through() -> None:
    router = _router(_r("post_only", "/v1", match={"methods": ["POST", "PUT"]}), _r("rest", "/"))
    assert _match(router, "POST", "/v1/x") == "post_only"
    assert _match(router, "PUT", "/v1/x") == "post_only"
    assert _match(router, "GET", "/v1/x") == "rest"


def test_header_match_needs_every_header_with_the_exact_value() -> None:
    router = _router(_r("gold", "/", match={"headers": {"x-tenant": "gold", "x-region": "eu"}}), _r("rest", "/"))
    assert _match(router, "GET", "/", **{"X-Tenant": "gold", "x-region": "eu"}) == "gold"
    assert _match(router, "GET", "/", **{"x-tenant": "gold"}) == "rest"
    assert _match(router, "GET", "/", **{"x-tenant": "Gold", "x-region": "eu"}) == "rest"
    assert _match(router, "GET", "/") == "rest"


def test_prefix_methods_and_headers_must_all_match() -> None:
    router = _router(_r("charges", "/v1/charges", match={"methods": ["POST"], "headers": {"x-tenant": "gold"}}))
    assert _match(router, "POST", "/v1/charges", **{"x-tenant": "gold"}) == "charges"
    assert _match(router, "GET", "/v1/charges", **{"x-tenant": "gold"}) is None
    assert _match(router, "POST", "/v1/other", **{"x-tenant": "gold"}) is None
    assert _match(router, "POST", "/v1/charges", **{"x-tenant": "silver"}) is None


@pytest.mark.parametrize(("prefix", "rewrite", "raw", "expected"), [
    ("/v1/charges", "/api/charges", "/v1/charges", "/api/charges"),
    ("/v1/charges", "/api/charges", "/v1/charges/ch_1?expand=a%2Fb", "/api/charges/ch_1?expand=a%2Fb"),
    ("/v1/", "/", "/v1/charges", "/charges"),
    ("/v1", "/", "/v1/charges", "/charges"),
    ("/v1", "/", "/v1", "/"),
    ("/legacy", "/v2/", "/legacy/x", "/v2/x"),
])
def test_rewrite_prefix_replaces_the_matched_prefix_and_keeps_the_query(prefix: str, rewrite: str, raw: str,
                                                                        expected: str) -> None:
    router = _router(_r("r", prefix, rewrite_prefix=rewrite))
    route = router.routes[0]
    assert route.upstream_path(raw) == expected


def test_without_rewrite_prefix_the_raw_path_is_sent_unchanged() -> None:
    route = _router(_r("r", "/v1")).routes[0]
    assert route.upstream_path("/v1/a%20b?q=1&q=2") == "/v1/a%20b?q=1&q=2"


def test_route_knows_its_upstream_name() -> None:
    route = _router(_r("r", "/")).routes[0]
    assert (route.name, route.upstream, route.listener) == ("r", "svc", "main")
