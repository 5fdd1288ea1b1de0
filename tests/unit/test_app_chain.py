"""The policy chain ``proxy.app`` builds per route: its order, and what each config block adds.

The order is load-bearing (see the comments in ``app._build_route``): the
rate limit must run before anything spends work, the deadline outside retry,
the breaker and bulkhead per attempt, the attempt telemetry just outside the
attempt timeout.  These tests pin it, so a reordering is a deliberate change.
"""

from __future__ import annotations

import random
from typing import Any

from multidict import CIMultiDict

from proxy.app import build_runtime
from proxy.chain import Layer, ProxyRequest, ProxyResponse, RequestBody, build_chain
from proxy.clock import FakeClock
from proxy.edge.routing import Route
from proxy.policies.bulkhead import Bulkhead
from proxy.policies.circuit_breaker import CircuitBreakerPolicy
from proxy.policies.deadline import Deadline
from proxy.policies.fallback import Fallback
from proxy.policies.hedge import Hedge
from proxy.policies.idempotency import Idempotency
from proxy.policies.rate_limit import RateLimit
from proxy.policies.retry import Retry
from proxy.policies.stale_resend import StaleResend
from proxy.policies.timeout import AttemptTimeout
from proxy.telemetry.attempts import AttemptTelemetry
from proxy.telemetry.metrics import Metrics
from proxy.upstream.call import UpstreamCall
from proxy.upstream.endpoints.policy import Balance
from tests.support.sidecar import base_config, to_config


def layers(route: Route) -> list[Any]:
    """The chain's layers, outermost first, ending with the innermost handler."""
    found: list[Any] = []
    handler: Any = route.handler
    while isinstance(handler, Layer):
        found.append(handler.policy)
        handler = handler.call_next
    found.append(handler)
    return found


def route_for(data: dict[str, Any]) -> Route:
    runtime = build_runtime(to_config(data), metrics=Metrics(process_collectors=False), tracing=None,
                            clock=FakeClock(), rng=random.Random(7))
    return runtime.routes[0]


def test_a_route_with_every_policy_nests_them_in_the_documented_order() -> None:
    route = route_for(base_config(
        "http://127.0.0.1:9", rate_limit={"requests_per_second": 10, "burst": 10},
        fallback={"status": 503, "body": "degraded"}))
    assert [type(layer) for layer in layers(route)] == [
        Fallback, RateLimit, Deadline, Retry, CircuitBreakerPolicy, Bulkhead, StaleResend, AttemptTelemetry,
        AttemptTimeout, UpstreamCall]


def test_idempotency_hedge_and_balance_sit_where_the_assembly_says() -> None:
    data = base_config("http://127.0.0.1:9", fallback={"status": 503, "body": "degraded"},
                       idempotency={"store": "local"}, hedge={"delay": "50ms"})
    data["upstreams"]["svc"]["endpoints"] = ["127.0.0.1:9", "127.0.0.1:10"]
    assert [type(layer) for layer in layers(route_for(data))] == [
        Fallback, Idempotency, Deadline, Retry, Hedge, CircuitBreakerPolicy, Bulkhead, Balance, StaleResend,
        AttemptTelemetry, AttemptTimeout, UpstreamCall]


def test_the_default_route_has_no_fallback_or_rate_limit_but_keeps_the_rest_in_order() -> None:
    route = route_for(base_config("http://127.0.0.1:9"))
    assert [type(layer) for layer in layers(route)] == [
        Deadline, Retry, CircuitBreakerPolicy, Bulkhead, StaleResend, AttemptTelemetry, AttemptTimeout, UpstreamCall]


def test_one_attempt_leaves_retry_out_and_buffers_no_body() -> None:
    route = route_for(base_config("http://127.0.0.1:9", retry={"max_attempts": 1}))
    assert Retry not in [type(layer) for layer in layers(route)]
    assert route.buffer_limit == 0


def test_a_disabled_breaker_leaves_the_breaker_layer_out() -> None:
    data = base_config("http://127.0.0.1:9")
    data["upstreams"]["svc"]["circuit_breaker"] = {"enabled": False}
    route = route_for(data)
    assert CircuitBreakerPolicy not in [type(layer) for layer in layers(route)]


def test_the_bulkhead_layer_is_the_upstreams_own_shared_by_its_routes() -> None:
    data = base_config("http://127.0.0.1:9")
    data["listeners"][0]["routes"].insert(0, {"name": "other", "match": {"path_prefix": "/o"}, "upstream": "svc"})
    runtime = build_runtime(to_config(data), metrics=Metrics(process_collectors=False), tracing=None,
                            clock=FakeClock(), rng=random.Random(7))
    bulkheads = [next(layer for layer in layers(route) if isinstance(layer, Bulkhead)) for route in runtime.routes]
    assert bulkheads[0] is bulkheads[1] is runtime.upstreams["svc"].bulkhead


async def test_build_chain_calls_policies_outermost_first_and_the_innermost_handler_last() -> None:
    calls: list[str] = []

    class Layer:
        def __init__(self, name: str) -> None:
            self.name = name

        async def __call__(self, request: ProxyRequest, call_next: Any) -> ProxyResponse:
            calls.append(f"{self.name} in")
            response: ProxyResponse = await call_next(request)
            calls.append(f"{self.name} out")
            return response

    async def innermost(request: ProxyRequest) -> ProxyResponse:
        calls.append("upstream")
        return ProxyResponse(204, CIMultiDict())

    handler = build_chain([Layer("a"), Layer("b")], innermost)
    response = await handler(ProxyRequest("GET", "/", CIMultiDict(), RequestBody(None), request_id="r"))
    assert response.status == 204
    assert calls == ["a in", "b in", "upstream", "b out", "a out"]


def test_build_chain_with_no_policies_is_the_innermost_handler_itself() -> None:
    async def innermost(request: ProxyRequest) -> ProxyResponse:
        return ProxyResponse(200, CIMultiDict())

    assert build_chain([], innermost) is innermost


def test_every_route_times_out_on_the_sidecars_one_timer_wheel_and_a_reload_keeps_it() -> None:
    data = base_config("http://127.0.0.1:9")
    routes = data["listeners"][0]["routes"]
    routes.insert(0, {**routes[0], "name": "second", "match": {"path_prefix": "/second"}})
    kwargs: dict[str, Any] = {"metrics": Metrics(process_collectors=False), "tracing": None, "clock": FakeClock(),
                              "rng": random.Random(7)}
    first = build_runtime(to_config(data), **kwargs)
    reloaded = build_runtime(to_config(data), previous=first, **kwargs)
    assert reloaded.timers is first.timers
    wheels = {id(layer._wheel) for runtime in (first, reloaded) for route in runtime.routes
              for layer in layers(route) if isinstance(layer, Deadline | AttemptTimeout)}
    assert wheels == {id(first.timers)}
    assert len(first.routes) == 2
